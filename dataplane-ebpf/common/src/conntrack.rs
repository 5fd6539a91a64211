//! Connection tracking: the entry layout of `svl_ct_v1` and the pure parts
//! of its logic (TCP state transitions, timeouts), shared by the kernel
//! programs and the agent and unit-tested on the host.
//!
//! Every translated connection has exactly two entries, in one of two tables:
//! - the **forward** entry, keyed by the 5-tuple the client sends
//!   (client -> VIP:port), holds the whole truth: where the connection goes,
//!   its TCP state and when it was last seen (in either direction);
//! - the **reply** entry, keyed by the 5-tuple the backend answers with
//!   (backend -> client), holds only what turns a reply back into the VIP
//!   and points at the forward entry.
//!
//! Both are created together by a packet that may open a connection (a TCP
//! SYN, any UDP datagram) in the **new-connection table**, an LRU: a SYN
//! flood churns it and pushes out only other unanswered connections. When
//! the client completes the TCP handshake (its ACK acknowledges the pod's
//! initial sequence number, which a blind spoofer never sees) the
//! connection moves to the **established table**, a plain hash map nothing
//! evicts (as Linux conntrack early-drops only unassured entries). Both
//! entries leave together when the garbage collector finds the connection
//! idle past its state's timeout. UDP flows stay in the new-connection
//! table: a flood can push one out, and its next datagram opens it again.

use crate::{Addr, Config, ipv4_mapped};

/// Key of `svl_ct_v1`: a 5-tuple as seen on the wire, and which entry it is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    /// Source address, network order.
    pub src: Addr,
    /// Destination address, network order.
    pub dst: Addr,
    /// Source port, network order.
    pub sport: u16,
    /// Destination port, network order.
    pub dport: u16,
    pub proto: u8,
    /// `CT_DIR_FORWARD` (client -> VIP) or `CT_DIR_REPLY` (backend -> client).
    pub dir: u8,
    pub pad: [u8; 2],
}

pub const CT_DIR_FORWARD: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;

/// Forward entry: the connection goes to a pod.
pub const CT_KIND_BACKEND: u8 = 1;
/// Forward entry: the connection is held by the activator.
pub const CT_KIND_ACTIVATOR: u8 = 2;
/// Reply entry (the reverse index of a forward entry).
pub const CT_KIND_REPLY: u8 = 3;

/// TCP: the client's SYN was seen, nothing from the backend yet.
pub const CT_STATE_SYN_SENT: u8 = 1;
/// TCP: the backend answered the SYN.
pub const CT_STATE_SYN_RECV: u8 = 2;
/// TCP: the client acknowledged the backend's SYN-ACK.
pub const CT_STATE_ESTABLISHED: u8 = 3;
/// TCP: one side sent FIN (half-closed; may still carry data for long).
pub const CT_STATE_FIN_WAIT: u8 = 4;
/// TCP: both sides sent FIN, or a RST was seen.
pub const CT_STATE_CLOSING: u8 = 5;
/// UDP: any datagram.
pub const CT_STATE_UDP: u8 = 6;

/// `CtEntry::flags`: the client sent FIN.
pub const CT_F_FIN_CLIENT: u16 = 1;
/// `CtEntry::flags`: the backend sent FIN.
pub const CT_F_FIN_BACKEND: u16 = 1 << 1;
/// `CtEntry::flags`: a RST was seen.
pub const CT_F_RST: u16 = 1 << 2;
/// `CtEntry::flags`: the backend has answered at least once.
pub const CT_F_REPLY_SEEN: u16 = 1 << 3;
/// `CtEntry::flags`: carried over from an earlier map layout whose tables did
/// not know whether the connection had ended; it lives `MIGRATED_TIMEOUT_S`
/// unless a packet shows it is alive (which clears the flag).
pub const CT_F_MIGRATED: u16 = 1 << 4;
/// `CtEntry::flags`: the connection goes to a pod on another node with its
/// source translated to this node's address (`--remote-mode snat`).
/// Forward entries: `snat_addr` is that address. Reply entries (keyed by
/// the pod's reply to it): `snat_addr` is the client's IPv4 address.
pub const CT_F_SNAT: u16 = 1 << 5;

/// Idle timeout of a migrated connection that has seen no packet since.
pub const MIGRATED_TIMEOUT_S: u32 = 600;

/// Value of `svl_ct_v1`. Which fields mean what depends on `kind`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtEntry {
    /// Forward: the backend (pod or activator) address. Reply: the VIP the
    /// reply must come from. Network order.
    pub addr: Addr,
    /// Forward: the backend port. Reply: the VIP port. Network order.
    pub port: u16,
    /// Forward: the client port as the backend sees it (differs from the
    /// key's only when a reply-tuple clash forced a rewrite). Reply: the
    /// client's own port, restored on replies. Network order.
    pub client_port: u16,
    /// App the connection belongs to (`u32::MAX` for an unknown VIP).
    pub app_id: u32,
    /// Forward to a pod: the slot the pod had when last checked.
    pub slot: u32,
    /// `CT_KIND_*`.
    pub kind: u8,
    /// `CT_STATE_*` (forward entries).
    pub state: u8,
    /// `CT_F_*` bits (forward entries).
    pub flags: u16,
    /// TCP forward entries: the backend's initial sequence number, from its
    /// SYN-ACK; the client's ACK must acknowledge it to establish.
    pub server_isn: u32,
    /// IPv4, network order, with `CT_F_SNAT` (see there); else zero.
    pub snat_addr: [u8; 4],
    /// CLOCK_MONOTONIC nanoseconds when the entry was created.
    pub created_ns: u64,
    /// CLOCK_MONOTONIC (coarse) nanoseconds of the last packet, either
    /// direction (forward entries; refreshed at most every `CT_REFRESH_NS`).
    pub last_seen_ns: u64,
}

/// `last_seen_ns` is written at most this often per connection, so the hot
/// path mostly reads the entry's cache line instead of dirtying it.
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

/// Default idle timeouts, seconds. Half-open and closing entries go fast
/// (a SYN flood's entries are gone within `SYN`), established ones last
/// (idle keep-alive, websocket and gRPC connections).
pub mod default_timeout {
    pub const SYN: u32 = 20;
    pub const ESTABLISHED: u32 = 6 * 3600;
    pub const CLOSE: u32 = 10;
    pub const UDP: u32 = 60;
    /// New tracked connections per CPU per second; 0: no limit. Off by
    /// default: the new-connection table absorbs floods without touching
    /// established connections, while a rate limit past its budget refuses
    /// legitimate new connections along with the flood. Set it to cap the
    /// CPU a flood can make the dataplane spend on new state.
    pub const NEW_PER_CPU_PER_SEC: u32 = 0;
}

/// The reply tuple of a connection: target -> client.
#[inline(always)]
pub fn reply_key(target: &Addr, target_port: u16, client: &Addr, client_port: u16, proto: u8) -> CtKey {
    CtKey { src: *target, dst: *client, sport: target_port, dport: client_port, proto, dir: CT_DIR_REPLY, pad: [0; 2] }
}

/// The reply tuple of the connection `fwd` -> `entry`: the backend's
/// packets to the client, or to this node's address when the source was
/// translated (`CT_F_SNAT`).
#[inline(always)]
pub fn reply_key_of(fwd: &CtKey, entry: &CtEntry) -> CtKey {
    let mut key = reply_key(&entry.addr, entry.port, &fwd.src, entry.client_port, fwd.proto);
    if entry.flags & CT_F_SNAT != 0 {
        key.dst = ipv4_mapped(entry.snat_addr);
    }
    key
}

/// The forward tuple a reply entry points at.
#[inline(always)]
pub fn forward_of_reply(key: &CtKey, rev: &CtEntry) -> CtKey {
    let mut fwd = forward_of_plain_reply(key, rev);
    if rev.flags & CT_F_SNAT != 0 {
        fwd.src = ipv4_mapped(rev.snat_addr);
    }
    fwd
}

/// `forward_of_reply` for a reply entry known not to be `CT_F_SNAT`'s.
#[inline(always)]
pub fn forward_of_plain_reply(key: &CtKey, rev: &CtEntry) -> CtKey {
    CtKey {
        src: key.dst,
        dst: rev.addr,
        sport: rev.client_port,
        dport: rev.port,
        proto: key.proto,
        dir: CT_DIR_FORWARD,
        pad: [0; 2],
    }
}

/// The reply entry of the connection `fwd` -> `entry`.
#[inline(always)]
pub fn reply_entry(fwd: &CtKey, entry: &CtEntry, now: u64) -> CtEntry {
    let snat = entry.flags & CT_F_SNAT != 0;
    CtEntry {
        addr: fwd.dst,
        port: fwd.dport,
        client_port: fwd.sport,
        app_id: entry.app_id,
        kind: CT_KIND_REPLY,
        flags: if snat { CT_F_SNAT } else { 0 },
        snat_addr: if snat { [fwd.src[12], fwd.src[13], fwd.src[14], fwd.src[15]] } else { [0; 4] },
        created_ns: now,
        ..CtEntry::default()
    }
}

/// The TCP flags the state machine reads.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Whether a TCP segment with these flags may open a connection: a bare
/// SYN. Anything else without state is a stray (or spoofed) segment.
#[inline(always)]
pub const fn tcp_may_open(flags: u8) -> bool {
    flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
}

/// The state after a TCP segment with `tcp_flags` travelling `dir`
/// (`CT_DIR_FORWARD`: from the client) on a connection in `state`/`flags`.
#[inline(always)]
pub const fn tcp_next(state: u8, flags: u16, dir: u8, tcp_flags: u8) -> (u8, u16) {
    let mut flags = flags;
    if dir == CT_DIR_REPLY {
        flags |= CT_F_REPLY_SEEN;
    }
    if tcp_flags & TCP_RST != 0 {
        return (CT_STATE_CLOSING, flags | CT_F_RST);
    }
    let mut state = state;
    if dir == CT_DIR_REPLY && state == CT_STATE_SYN_SENT && tcp_flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK) {
        state = CT_STATE_SYN_RECV;
    } else if dir == CT_DIR_FORWARD && state == CT_STATE_SYN_RECV && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_ACK {
        state = CT_STATE_ESTABLISHED;
    }
    if tcp_flags & TCP_FIN != 0 {
        flags |= if dir == CT_DIR_FORWARD { CT_F_FIN_CLIENT } else { CT_F_FIN_BACKEND };
    }
    if flags & (CT_F_FIN_CLIENT | CT_F_FIN_BACKEND) == (CT_F_FIN_CLIENT | CT_F_FIN_BACKEND) {
        state = CT_STATE_CLOSING;
    } else if flags & (CT_F_FIN_CLIENT | CT_F_FIN_BACKEND) != 0 && state != CT_STATE_CLOSING {
        state = CT_STATE_FIN_WAIT;
    }
    (state, flags)
}

/// Whether a client segment completes the handshake of a connection in
/// `state`: an ACK (no SYN, no RST) acknowledging the backend's SYN-ACK.
#[inline(always)]
pub const fn completes_handshake(state: u8, server_isn: u32, tcp_flags: u8, ack: u32) -> bool {
    state == CT_STATE_SYN_RECV
        && tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_ACK
        && ack == server_isn.wrapping_add(1)
}

/// Whether a bare SYN on a tracked tuple starts a new connection (the old
/// one is closing or closed: the client reuses its port) rather than being a
/// retransmission or a spoofed SYN, which must not move the connection.
#[inline(always)]
pub const fn syn_reopens(state: u8) -> bool {
    state == CT_STATE_CLOSING
}

/// Idle timeout of a state, nanoseconds.
#[inline(always)]
pub fn timeout_ns(cfg: &Config, state: u8) -> u64 {
    let s = match state {
        CT_STATE_SYN_SENT | CT_STATE_SYN_RECV => cfg.ct_syn_timeout_s,
        CT_STATE_ESTABLISHED | CT_STATE_FIN_WAIT => cfg.ct_established_timeout_s,
        CT_STATE_CLOSING => cfg.ct_close_timeout_s,
        _ => cfg.ct_udp_timeout_s,
    };
    s as u64 * 1_000_000_000
}

/// Whether a forward entry has been idle past its state's timeout at `now`.
#[inline(always)]
pub fn expired(cfg: &Config, entry: &CtEntry, now: u64) -> bool {
    let mut timeout = timeout_ns(cfg, entry.state);
    if entry.flags & CT_F_MIGRATED != 0 && timeout > MIGRATED_TIMEOUT_S as u64 * 1_000_000_000 {
        timeout = MIGRATED_TIMEOUT_S as u64 * 1_000_000_000;
    }
    now.saturating_sub(entry.last_seen_ns) > timeout
}

/// Conntrack lifecycle events; index of `svl_ct_events_v1`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CtEvent {
    /// A connection was tracked (forward + reply entries created).
    Created = 0,
    /// A new connection reused the tuple of a closing one.
    Reopened = 1,
    /// The client port was rewritten to keep the reply tuple unique.
    PortRewritten = 2,
    /// Expired half-open (SYN seen, never established).
    ExpiredHalfOpen = 3,
    /// Expired after being idle while established (or half-closed).
    ExpiredEstablished = 4,
    /// Expired after FIN/RST.
    ExpiredClosing = 5,
    /// UDP flow expired.
    ExpiredUdp = 6,
    /// Reply entry without its forward entry, removed.
    ReplyOrphanRemoved = 7,
    /// Connection removed because its pod is gone (a RST was sent).
    BackendGone = 8,
    /// Garbage-collector passes.
    GcRuns = 9,
    /// A missing reply entry was re-created from its forward entry.
    ReplyRepaired = 10,
    /// A connection completed its handshake and moved to the established table.
    Promoted = 11,
    /// A completed handshake found the established table full: the
    /// connection stays in the new-connection table (raise --max-connections).
    PromoteFailed = 12,
    /// An ACK in the handshake that did not acknowledge the backend's SYN-ACK
    /// (a blind spoofer's guess): not established.
    HandshakeMismatch = 13,
    /// The MSS option of a SYN or SYN-ACK was lowered so that segments fit
    /// the fabric once encapsulated.
    MssClamped = 14,
    /// The agent was told, through the wake ring buffer, that a sleeping
    /// app was hit (at most once per app per `WAKE_SIGNAL_INTERVAL_NS`).
    WakeSignalled = 15,
    /// A wake signal was lost: the ring buffer was full (the agent is
    /// behind; it also wakes apps from the connections its activator takes).
    WakeSignalLost = 16,
}

impl CtEvent {
    pub const COUNT: u32 = 32;

    pub const ALL: [CtEvent; 17] = [
        CtEvent::Created,
        CtEvent::Reopened,
        CtEvent::PortRewritten,
        CtEvent::ExpiredHalfOpen,
        CtEvent::ExpiredEstablished,
        CtEvent::ExpiredClosing,
        CtEvent::ExpiredUdp,
        CtEvent::ReplyOrphanRemoved,
        CtEvent::BackendGone,
        CtEvent::GcRuns,
        CtEvent::ReplyRepaired,
        CtEvent::Promoted,
        CtEvent::PromoteFailed,
        CtEvent::HandshakeMismatch,
        CtEvent::MssClamped,
        CtEvent::WakeSignalled,
        CtEvent::WakeSignalLost,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            CtEvent::Created => "created",
            CtEvent::Reopened => "reopened",
            CtEvent::PortRewritten => "port_rewritten",
            CtEvent::ExpiredHalfOpen => "expired_half_open",
            CtEvent::ExpiredEstablished => "expired_established",
            CtEvent::ExpiredClosing => "expired_closing",
            CtEvent::ExpiredUdp => "expired_udp",
            CtEvent::ReplyOrphanRemoved => "reply_orphan_removed",
            CtEvent::BackendGone => "backend_gone",
            CtEvent::GcRuns => "gc_runs",
            CtEvent::ReplyRepaired => "reply_repaired",
            CtEvent::Promoted => "promoted",
            CtEvent::PromoteFailed => "promote_failed",
            CtEvent::HandshakeMismatch => "handshake_mismatch",
            CtEvent::MssClamped => "mss_clamped",
            CtEvent::WakeSignalled => "wake_signalled",
            CtEvent::WakeSignalLost => "wake_signal_lost",
        }
    }

    /// The expiry event of a state.
    #[inline(always)]
    pub const fn expiry(state: u8) -> CtEvent {
        match state {
            CT_STATE_SYN_SENT | CT_STATE_SYN_RECV => CtEvent::ExpiredHalfOpen,
            CT_STATE_ESTABLISHED | CT_STATE_FIN_WAIT => CtEvent::ExpiredEstablished,
            CT_STATE_CLOSING => CtEvent::ExpiredClosing,
            _ => CtEvent::ExpiredUdp,
        }
    }
}

/// Value of `svl_ct_budget_v1` (per-CPU): new connections tracked in the
/// current one-second window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtBudget {
    pub window_start_ns: u64,
    pub used: u64,
}

/// Value of `svl_ct_summary_v1`, written by each GC pass: what the table
/// held (counting it from userspace would cost two syscalls per entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtSummary {
    /// Forward entries (connections) by `CT_STATE_*` (index 0 unused).
    pub by_state: [u64; 8],
    /// Reply entries.
    pub replies: u64,
    /// Entries removed by the pass.
    pub removed: u64,
    /// When the pass ran (CLOCK_MONOTONIC coarse ns).
    pub at_ns: u64,
}

/// Key of `svl_frags_v1`: one fragmented IPv4 datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    /// Source and destination as the fragments carry them, network order.
    pub src: Addr,
    pub dst: Addr,
    /// IP identification, network order.
    pub id: u16,
    pub proto: u8,
    /// `CT_DIR_FORWARD` (to a VIP) or `CT_DIR_REPLY` (from a backend).
    pub dir: u8,
    pub pad: [u8; 4],
}

/// Value of `svl_frags_v1`: the address the first fragment was translated to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragValue {
    /// Forward: the new destination. Reply: the new source (the VIP).
    pub addr: Addr,
    /// When the first fragment passed (CLOCK_MONOTONIC coarse ns).
    pub seen_ns: u64,
    pub app_id: u32,
    pub pad: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk(steps: &[(u8, u8)]) -> (u8, u16) {
        let mut s = (CT_STATE_SYN_SENT, 0u16);
        for &(dir, f) in steps {
            s = tcp_next(s.0, s.1, dir, f);
        }
        s
    }

    const F: u8 = CT_DIR_FORWARD;
    const R: u8 = CT_DIR_REPLY;

    #[test]
    fn handshake_establishes_and_only_a_bare_syn_opens() {
        assert!(tcp_may_open(TCP_SYN));
        for f in [TCP_SYN | TCP_ACK, TCP_ACK, TCP_RST, TCP_SYN | TCP_FIN, TCP_SYN | TCP_RST, 0] {
            assert!(!tcp_may_open(f), "flags {f:#x} must not open");
        }
        assert_eq!(walk(&[(R, TCP_SYN | TCP_ACK)]).0, CT_STATE_SYN_RECV);
        let (state, flags) = walk(&[(R, TCP_SYN | TCP_ACK), (F, TCP_ACK)]);
        assert_eq!(state, CT_STATE_ESTABLISHED);
        assert_ne!(flags & CT_F_REPLY_SEEN, 0);
        // A spoofed ACK before any reply does not establish.
        assert_eq!(walk(&[(F, TCP_ACK)]).0, CT_STATE_SYN_SENT);
        // Completing the handshake takes the backend's ISN + 1.
        assert!(completes_handshake(CT_STATE_SYN_RECV, 41, TCP_ACK, 42));
        assert!(completes_handshake(CT_STATE_SYN_RECV, u32::MAX, TCP_ACK, 0), "wraps");
        assert!(!completes_handshake(CT_STATE_SYN_RECV, 41, TCP_ACK, 43), "a guessed ack");
        assert!(!completes_handshake(CT_STATE_SYN_SENT, 41, TCP_ACK, 42), "no SYN-ACK seen");
        assert!(!completes_handshake(CT_STATE_SYN_RECV, 41, TCP_ACK | TCP_RST, 42));
    }

    #[test]
    fn fin_from_one_side_half_closes_both_close_rst_closes_at_once() {
        let est = [(R, TCP_SYN | TCP_ACK), (F, TCP_ACK)];
        let half = [est[0], est[1], (F, TCP_FIN | TCP_ACK)];
        assert_eq!(walk(&half).0, CT_STATE_FIN_WAIT);
        let both = [half[0], half[1], half[2], (R, TCP_FIN | TCP_ACK)];
        assert_eq!(walk(&both).0, CT_STATE_CLOSING);
        let rst = walk(&[est[0], est[1], (R, TCP_RST)]);
        assert_eq!(rst.0, CT_STATE_CLOSING);
        assert_ne!(rst.1 & CT_F_RST, 0);
        assert!(syn_reopens(CT_STATE_CLOSING));
        assert!(!syn_reopens(CT_STATE_ESTABLISHED) && !syn_reopens(CT_STATE_SYN_SENT));
    }

    #[test]
    fn timeouts_follow_the_state() {
        let cfg = Config {
            ct_syn_timeout_s: 2,
            ct_established_timeout_s: 100,
            ct_close_timeout_s: 3,
            ct_udp_timeout_s: 4,
            ..Default::default()
        };
        let s = 1_000_000_000u64;
        let e = |state| CtEntry { state, last_seen_ns: 10 * s, ..Default::default() };
        assert!(!expired(&cfg, &e(CT_STATE_SYN_SENT), 12 * s));
        assert!(expired(&cfg, &e(CT_STATE_SYN_SENT), 12 * s + 1));
        assert!(!expired(&cfg, &e(CT_STATE_ESTABLISHED), 60 * s));
        assert!(expired(&cfg, &e(CT_STATE_CLOSING), 14 * s));
        assert!(expired(&cfg, &e(CT_STATE_UDP), 15 * s));
        assert!(!expired(&cfg, &e(CT_STATE_UDP), 5 * s), "a clock behind the entry never expires it");
        let long = Config { ct_established_timeout_s: 3600, ..cfg };
        let migrated = CtEntry { flags: CT_F_MIGRATED, ..e(CT_STATE_ESTABLISHED) };
        assert!(!expired(&long, &e(CT_STATE_ESTABLISHED), 700 * s));
        assert!(expired(&long, &migrated, (10 + 601) * s), "a migrated connection with no traffic goes after 10 min");
        assert!(!expired(&long, &migrated, (10 + 599) * s));
    }
}
