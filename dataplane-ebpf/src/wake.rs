//! Wake signals: the agent learns that a sleeping app was hit at its first
//! packet (the SYN, or the first datagram), before any request is parsed,
//! so scaling starts a round trip earlier than the activator could tell.

use serviceless_common::{CtEvent, WAKE_SIGNAL_INTERVAL_NS, WakeEvent};

use crate::maps::{WAKE_GATE, WAKES, event};

/// Signals that `app_id` (which has no ready pod) was hit, at most once per
/// app per interval: a flood to a sleeping app costs one ring entry a
/// second. Returns whether a signal was sent.
#[inline(never)]
pub fn signal_call(app_id: u32, proto: u8, now: u64) -> u32 {
    if let Some(last) = WAKE_GATE.get_ptr_mut(app_id) {
        // SAFETY: a map value pointer. Two CPUs racing here at worst both
        // send a signal; the agent wakes an app once however many arrive.
        unsafe {
            if *last != 0 && now.wrapping_sub(*last) < WAKE_SIGNAL_INTERVAL_NS {
                return 0;
            }
            *last = now;
        }
    }
    let Some(mut entry) = WAKES.reserve(0) else {
        event(CtEvent::WakeSignalLost);
        return 0;
    };
    entry.write(WakeEvent { app_id, proto, pad: [0; 3], at_ns: now });
    entry.submit(0);
    event(CtEvent::WakeSignalled);
    1
}
