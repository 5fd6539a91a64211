//! IPv4 fragments, both directions (as Cilium tracks them, by source,
//! destination, id and protocol): the first fragment carries the ports, so
//! it is routed like any packet and its translation remembered; the later
//! fragments carry none and get the same address rewrite from that memory.
//! A later fragment seen before its first is dropped (ingress: counted
//! `drop_fragment_unknown`) or left alone (egress), never half-translated.
//! IPv6 fragments are not translated (dropped at ingress, see the README).

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    programs::XdpContext,
};
use serviceless_common::{Addr, CT_DIR_FORWARD, FragKey, FragValue, Verdict};

use crate::{ingress, maps::FRAGMENTS, nat, parse::Parsed};

#[inline(always)]
pub fn key(src: &Addr, dst: &Addr, id: u16, proto: u8, dir: u8) -> FragKey {
    FragKey { src: *src, dst: *dst, id, proto, dir, pad: [0; 4] }
}

/// Remembers where the first fragment of a datagram to a VIP went.
#[inline(always)]
pub fn remember_forward(p: &Parsed, to: &Addr, app_id: u32, now: u64) {
    let k = key(&p.src, &p.dst, p.ip_id, p.proto, CT_DIR_FORWARD);
    let _ = FRAGMENTS.insert(&k, &FragValue { addr: *to, seen_ns: now, app_id, pad: 0 }, 0);
}

/// A later fragment to a VIP: the address its first fragment went to.
/// Returns the packed (verdict, action) (see `ingress::pack`).
#[inline(never)]
pub fn forward_later(ctx: &XdpContext, p: &Parsed) -> u64 {
    let (verdict, action) = forward_later_inner(ctx, p);
    ingress::pack(verdict, action)
}

#[inline(always)]
fn forward_later_inner(ctx: &XdpContext, p: &Parsed) -> (Verdict, u32) {
    let k = key(&p.src, &p.dst, p.ip_id, p.proto, CT_DIR_FORWARD);
    // SAFETY: copied out at once (LRU entries can be evicted and reused).
    let Some(to) = (unsafe { FRAGMENTS.get(&k) }).copied() else {
        return (Verdict::DropFragmentUnknown, XDP_DROP);
    };
    if nat::dnat(ctx, p, &to.addr, 0, 0).is_err() {
        return ingress::MALFORMED;
    }
    ingress::record_activity(to.app_id, (p.ip_end() - p.l3()) as u64, to.seen_ns);
    (Verdict::FragmentTranslated, XDP_PASS)
}
