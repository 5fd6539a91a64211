//! XDP ingress: a packet to a VIP follows its tracked connection, or opens
//! one (a TCP SYN, any UDP datagram) to a pod chosen by rendezvous hashing,
//! or to the activator. Everything else passes untouched after one range
//! check.
//!
//! Safe verdicts for bad input: headers we cannot parse pass untouched
//! (`pass_malformed`; the kernel's own checks drop them) and create no
//! state; a TCP segment that cannot open a connection and has none is
//! answered with a RST (a RST itself is dropped); unsupported protocols and
//! IPv6 fragments addressed to a VIP are dropped. Every case is counted.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::bpf_ktime_get_coarse_ns,
    programs::XdpContext,
};
use serviceless_common::{
    CONFIG_F_UPGRADING, CT_DIR_FORWARD, CT_KIND_ACTIVATOR, CT_KIND_BACKEND,
    CT_F_SNAT, CT_STATE_SYN_RECV, CT_STATE_SYN_SENT, Config, CtEntry, CtEvent, CtKey, FABRIC_F_ENCAP, FABRIC_F_PREFER_LOCAL, FABRIC_F_SNAT, as_ipv4,
    Fabric, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, NODE_LOCAL, SERVICE_F_ACTIVATOR_ONLY,
    RemoteFlow, ServiceKey, TCP_ACK, TCP_SYN, Verdict, completes_handshake, syn_reopens, tcp_may_open,
};

use crate::{
    conntrack::{self, Refused, Table, Target},
    fabric, frag, icmp, snat, wake,
    lb::{self, Scope},
    maps::{ACTIVITY, APPS, CONFIG, FABRIC, REMOTE_FLOWS, SCRATCH, SERVICES, Scratch, count, event},
    nat,
    parse::{self, Frag, Parse, Parsed},
};

pub fn handle(ctx: &XdpContext) -> Result<u32, ()> {
    let (verdict, action) = route(ctx);
    count(verdict);
    if verdict == Verdict::DropNoActivator {
        // A configuration problem, not a traffic pattern: say so in the agent's log.
        aya_log_ebpf::warn!(ctx, "VIP traffic dropped: no activator configured for its address family");
    }
    Ok(action)
}

pub const MALFORMED: (Verdict, u32) = (Verdict::PassMalformed, XDP_PASS);
const NOT_VIP: (Verdict, u32) = (Verdict::PassNotVip, XDP_PASS);
const TUNNEL_INVALID: (Verdict, u32) = (Verdict::DropTunnelInvalid, XDP_DROP);

#[inline(always)]
fn route(ctx: &XdpContext) -> (Verdict, u32) {
    let (Some(cfg), Some(fabric)) = (CONFIG.get(0), FABRIC.get(0)) else {
        return NOT_VIP;
    };
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return NOT_VIP;
    };
    // SAFETY: this CPU's scratch slot; nothing else runs on it mid-packet.
    // `parse` writes every field before it says Vip (and nothing before the
    // VIP check: pass-through traffic never touches the scratch).
    let scratch = unsafe { &mut *scratch };
    match parse::parse(ctx, cfg, fabric, &mut scratch.parsed) {
        Parse::NotVip => return NOT_VIP,
        Parse::Malformed => return MALFORMED,
        Parse::Vip => {}
        Parse::SnatReply => return unpack(snat::reply_call(ctx, fabric, scratch)),
        Parse::Tunnel => {
            if !tunnel_call(ctx, cfg, fabric, &mut scratch.parsed) {
                return TUNNEL_INVALID;
            }
        }
    }
    to_vip(ctx, cfg, fabric, scratch)
}

/// Strips another node's encapsulation and parses the inner packet, which
/// must be for a VIP: it is never forwarded on to another node, nor passed
/// to the stack here.
#[inline(never)]
fn tunnel_call(ctx: &XdpContext, cfg: &Config, fabric: &Fabric, p: &mut Parsed) -> bool {
    if fabric::decapsulate(ctx).is_err() {
        return false;
    }
    count(Verdict::Decapsulated);
    if !matches!(parse::parse(ctx, cfg, fabric, p), Parse::Vip) {
        return false;
    }
    p.tunneled = true;
    true
}

#[inline(always)]
fn to_vip(ctx: &XdpContext, cfg: &Config, fabric: &Fabric, scratch: &mut Scratch) -> (Verdict, u32) {
    let p = &scratch.parsed;
    match p.frag {
        Frag::V6 => return (Verdict::DropFragment, XDP_DROP),
        Frag::Later => return unpack(frag::forward_later(ctx, p)),
        Frag::None | Frag::First => {}
    }
    match p.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            scratch.key = CtKey {
                src: p.src,
                dst: p.dst,
                sport: p.sport,
                dport: p.dport,
                proto: p.proto,
                dir: CT_DIR_FORWARD,
                pad: [0; 2],
            };
            unpack(connection(ctx, cfg, fabric, scratch))
        }
        IPPROTO_ICMP if p.v4 => {
            let packed = icmp::error4(ctx, scratch);
            icmp_error(ctx, cfg, fabric, scratch, packed)
        }
        IPPROTO_ICMPV6 if !p.v4 => {
            let packed = icmp::error6(ctx, scratch);
            icmp_error(ctx, cfg, fabric, scratch, packed)
        }
        _ => (Verdict::DropUnsupportedProtocol, XDP_DROP),
    }
}

/// An ICMP error about a connection not tracked here may be about one
/// another node owns (it opened through that node): it goes where that
/// connection's packets go (`s.key` holds the connection, as `icmp` read
/// it from the quoted packet).
#[inline(always)]
fn icmp_error(ctx: &XdpContext, cfg: &Config, fabric: &Fabric, s: &mut Scratch, packed: u64) -> (Verdict, u32) {
    let (verdict, action) = unpack(packed);
    if verdict != Verdict::IcmpErrorNoConnection || fabric.flags & FABRIC_F_ENCAP == 0 || s.parsed.tunneled {
        return (verdict, action);
    }
    unpack(icmp_remote_call(ctx, cfg, fabric, s))
}

#[inline(never)]
fn icmp_remote_call(ctx: &XdpContext, cfg: &Config, fabric: &Fabric, s: &mut Scratch) -> u64 {
    // SAFETY: copied out at once.
    if let Some(flow) = (unsafe { REMOTE_FLOWS.get(&s.key) }).copied() {
        // SAFETY: no preconditions.
        return fabric::encapsulate_call(ctx, fabric, &s.parsed, flow.node, unsafe { bpf_ktime_get_coarse_ns() });
    }
    if choose_call(cfg, fabric, s) && s.opening.target.kind == CT_KIND_BACKEND && s.opening.target.node != NODE_LOCAL {
        // SAFETY: no preconditions.
        return fabric::encapsulate_call(ctx, fabric, &s.parsed, s.opening.target.node, unsafe { bpf_ktime_get_coarse_ns() });
    }
    pack(Verdict::IcmpErrorNoConnection, XDP_DROP)
}

/// What a tracked connection's entry says about this packet.
enum Follow {
    /// Forward along the connection (copied to `Scratch::entry`).
    Forward(Verdict),
    /// The entry was removed: open the connection anew.
    Reopen,
    /// A flow the activator never answered moves to the app's pods.
    MoveFromActivator,
    /// The connection's pod is gone (entry removed): answer with a RST.
    BackendGone,
}

// The paths below run as BPF-to-BPF calls (`inline(never)`): siblings share
// the stack below their caller instead of one function holding every path's
// locals at once, and the largest values live in the per-CPU `Scratch`.
// Results cross a call as one u64 register.
const REOPEN: u64 = u64::MAX;
const MOVE_FROM_ACTIVATOR: u64 = u64::MAX - 1;
const BACKEND_GONE: u64 = u64::MAX - 2;

#[inline(always)]
pub fn pack(verdict: Verdict, action: u32) -> u64 {
    ((verdict as u64) << 32) | action as u64
}

#[inline(always)]
pub fn unpack(packed: u64) -> (Verdict, u32) {
    let v = (packed >> 32) as u32;
    let verdict = if v < Verdict::ALL.len() as u32 {
        // SAFETY: `Verdict` is repr(u32) with dense discriminants 0..ALL.len(),
        // and `pack` only ever stores one of them. (A table lookup here would be
        // hoisted above the bound check, which the verifier rejects.)
        unsafe { core::mem::transmute::<u32, Verdict>(v) }
    } else {
        Verdict::Aborted
    };
    (verdict, packed as u32)
}

#[inline(never)]
fn follow_call(s: &mut Scratch, table: Table, entry: *mut CtEntry, now: u64) -> u64 {
    match follow(s, table, entry, now) {
        Follow::Forward(verdict) => pack(verdict, XDP_PASS),
        Follow::Reopen => REOPEN,
        Follow::MoveFromActivator => MOVE_FROM_ACTIVATOR,
        Follow::BackendGone => BACKEND_GONE,
    }
}

/// A new connection being opened: where it goes and how it was chosen.
pub struct Opening {
    pub target: Target,
    pub verdict: Verdict,
    /// The flow moves from the activator to a pod.
    pub moved: bool,
}

/// Chooses where a new connection goes (into `s.opening`); false: drop it
/// (`s.opening.verdict` says why).
#[inline(never)]
fn choose_call(cfg: &Config, fabric: &Fabric, s: &mut Scratch) -> bool {
    let scope = if s.parsed.tunneled {
        Scope::LocalOnly
    } else if fabric.flags & FABRIC_F_PREFER_LOCAL != 0 {
        Scope::PreferLocal
    } else {
        Scope::Any
    };
    match lb::choose(cfg, s.parsed.v4, &s.key, scope, &mut s.choose) {
        Ok((target, verdict)) => {
            s.opening.target = target;
            s.opening.verdict = verdict;
            true
        }
        Err(verdict) => {
            s.opening.verdict = verdict;
            false
        }
    }
}

/// Tracks the chosen connection (its entry into `Scratch::entry`);
/// returns the verdict, or the refusal and XDP_DROP.
/// With `snat`, the pod sees the connection come from this node (see `snat`).
#[inline(never)]
fn track_call(cfg: &Config, s: &mut Scratch, now: u64, snat: bool) -> u64 {
    let snat = if snat { FABRIC.get(0).and_then(|f| snat::source(f, s.parsed.v4)) } else { None };
    match conntrack::create(cfg, &s.key, &s.opening.target, now, snat.as_ref(), &mut s.entry, &mut s.reply) {
        Ok(()) => pack(s.opening.verdict, XDP_PASS),
        Err(Refused::Full) => pack(Verdict::DropCtFull, XDP_DROP),
        Err(Refused::RateLimited) => pack(Verdict::DropCtRateLimited, XDP_DROP),
        Err(Refused::Clash) if snat.is_some() => pack(Verdict::DropSnatPortsExhausted, XDP_DROP),
        Err(Refused::Clash) => pack(Verdict::DropCtClash, XDP_DROP),
    }
}

#[inline(never)]
fn forward_call(ctx: &XdpContext, s: &Scratch, verdict: Verdict, now: u64) -> u64 {
    let (verdict, action) = forward(ctx, &s.parsed, &s.entry, verdict, now);
    pack(verdict, action)
}

/// After `forward_call`: a source-translated connection's packet is sent
/// to its pod's node by XDP itself (the stack drops packets from its own
/// address), and counted as such.
#[inline(always)]
fn send_translated(ctx: &XdpContext, s: &Scratch, forwarded: u64) -> u64 {
    let (_, action) = unpack(forwarded);
    if action != XDP_PASS || s.entry.flags & CT_F_SNAT == 0 {
        return forwarded;
    }
    let Some(pod) = as_ipv4(&s.entry.addr) else { return pack(Verdict::DropNoNextHop, XDP_DROP) };
    let len = (s.parsed.ip_end() - s.parsed.l3()) as u16;
    fabric::send_call(ctx, s.entry.snat_addr, pod, len, Verdict::SnatForwarded)
}

#[inline(never)]
fn rst_call(ctx: &XdpContext, p: &Parsed, verdict: Verdict) -> u64 {
    if p.tunneled {
        // The RST would go back through the node that sent it here.
        return pack(Verdict::DropTunnelInvalid, XDP_DROP);
    }
    let (verdict, action) = no_connection(ctx, p, verdict);
    pack(verdict, action)
}

/// A TCP segment that cannot open a connection, and none is tracked here.
/// Its connection may live on another node (it opened through another
/// node, or the client's route moved): send it where a new connection of
/// this flow would go. If that is here, the connection does not exist.
#[inline(always)]
fn untracked_segment(ctx: &XdpContext, cfg: &Config, fabric: &Fabric, s: &mut Scratch, now: u64) -> u64 {
    if fabric.flags & FABRIC_F_ENCAP != 0 && !s.parsed.tunneled {
        if choose_call(cfg, fabric, s) && s.opening.target.node != NODE_LOCAL {
            return send_to_node(ctx, fabric, s, now);
        }
    }
    if cfg.flags & CONFIG_F_UPGRADING != 0 {
        return pack(Verdict::DropNoConnection, XDP_DROP);
    }
    rst_call(ctx, &s.parsed, Verdict::RstNoConnection)
}

/// Encapsulates the flow to the chosen pod's node, and remembers that node
/// for the flow's later packets.
#[inline(always)]
fn send_to_node(ctx: &XdpContext, fabric: &Fabric, s: &Scratch, now: u64) -> u64 {
    let target = &s.opening.target;
    let flow = RemoteFlow { node: target.node, pad: 0, app_id: target.app_id };
    let _ = REMOTE_FLOWS.insert(&s.key, &flow, 0);
    record_activity(target.app_id, (s.parsed.ip_end() - s.parsed.l3()) as u64, now);
    fabric::encapsulate_call(ctx, fabric, &s.parsed, target.node, now)
}

const NOT_REMEMBERED: u64 = u64::MAX - 3;

/// A packet of a flow this node sent to another node's pod (not one that
/// opens a connection: a SYN chooses anew) goes to that node again, even
/// if the app's pods changed since (hashing anew could pick another). The
/// other node owns the connection.
#[inline(never)]
fn remembered_call(ctx: &XdpContext, fabric: &Fabric, s: &Scratch, now: u64) -> u64 {
    let p = &s.parsed;
    if p.tunneled || fabric.flags & FABRIC_F_ENCAP == 0 || (p.proto == IPPROTO_TCP && tcp_may_open(p.tcp_flags)) {
        return NOT_REMEMBERED;
    }
    // SAFETY: copied out at once (LRU entries can be evicted and reused).
    let Some(flow) = (unsafe { REMOTE_FLOWS.get(&s.key) }).copied() else { return NOT_REMEMBERED };
    record_activity(flow.app_id, (p.ip_end() - p.l3()) as u64, now);
    fabric::encapsulate_call(ctx, fabric, p, flow.node, now)
}

/// TCP or UDP to a VIP (`s.parsed`, `s.key`). Returns the packed (verdict, action).
#[inline(never)]
fn connection(ctx: &XdpContext, cfg: &Config, fabric: &Fabric, s: &mut Scratch) -> u64 {
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let tcp = s.parsed.proto == IPPROTO_TCP;
    if tcp && s.parsed.tcp_flags & TCP_SYN != 0 {
        // Before anything else: the segment may be encapsulated below.
        let mss = if s.parsed.v4 { fabric.mss4 } else { fabric.mss6 };
        if mss != 0 {
            fabric::clamp_mss_call(ctx, &s.parsed, mss);
        }
    }
    // In the scratch map, not a register: 6.1's verifier mis-tracks
    // registers held across the backend choice's bpf_loop (it prunes one
    // value's path and hard-wires the branch to the other).
    s.opening.moved = false;
    if let Some((table, entry)) = conntrack::lookup(&s.key) {
        match follow_call(s, table, entry, now) {
            REOPEN => {}
            MOVE_FROM_ACTIVATOR => s.opening.moved = true,
            BACKEND_GONE => return rst_call(ctx, &s.parsed, Verdict::RstBackendGone),
            follow => return send_translated(ctx, s, forward_call(ctx, s, unpack(follow).0, now)),
        }
    } else {
        let remembered = remembered_call(ctx, fabric, s, now);
        if remembered != NOT_REMEMBERED {
            return remembered;
        }
        if tcp && !tcp_may_open(s.parsed.tcp_flags) {
            return untracked_segment(ctx, cfg, fabric, s, now);
        }
    }
    if !choose_call(cfg, fabric, s) {
        return pack(if s.parsed.tunneled { Verdict::DropTunnelInvalid } else { s.opening.verdict }, XDP_DROP);
    }
    let snat = s.opening.target.node != NODE_LOCAL && fabric.flags & FABRIC_F_SNAT != 0 && s.parsed.v4;
    if s.opening.target.node != NODE_LOCAL && !snat {
        return send_to_node(ctx, fabric, s, now);
    }
    if s.parsed.tunneled && s.opening.target.kind != CT_KIND_BACKEND {
        // No ready pod here after all (the sender's view was newer or
        // older): drop, and let the client's retransmission find one.
        return pack(Verdict::DropTunnelInvalid, XDP_DROP);
    }
    if s.opening.verdict == Verdict::ActivatorNoBackend {
        // A sleeping app: start waking it now, at the first packet.
        wake::signal_call(s.opening.target.app_id, s.parsed.proto, now);
    }
    let (verdict, action) = unpack(track_call(cfg, s, now, snat));
    if action != XDP_PASS {
        return pack(verdict, action);
    }
    let verdict = if s.opening.moved && verdict == Verdict::BackendNewFlow { Verdict::MovedFromActivator } else { verdict };
    send_translated(ctx, s, forward_call(ctx, s, verdict, now))
}

/// A segment of a connection we do not track: RST (a RST itself is dropped).
#[inline(always)]
fn no_connection(ctx: &XdpContext, p: &Parsed, verdict: Verdict) -> (Verdict, u32) {
    match nat::answer_rst(ctx, p) {
        Ok(XDP_DROP) | Err(()) => (Verdict::DropNoConnection, XDP_DROP),
        Ok(action) => (verdict, action),
    }
}

#[inline(always)]
fn follow(s: &mut Scratch, table: Table, ptr: *mut CtEntry, now: u64) -> Follow {
    // SAFETY: copied out at once; routing fields never change in place.
    s.entry = unsafe { *ptr };
    let (p, key, entry) = (&s.parsed, &s.key, &s.entry);
    let tcp = p.proto == IPPROTO_TCP;
    if tcp && tcp_may_open(p.tcp_flags) && syn_reopens(entry.state) {
        // The client reuses the port of a closed connection: a new one.
        conntrack::remove(table, key, entry);
        event(CtEvent::Reopened);
        return Follow::Reopen;
    }
    if entry.kind == CT_KIND_BACKEND {
        let Some(slot) = lb::find_backend(entry.app_id, &entry.addr, entry.slot) else {
            // Its pod is gone: never hand a mid-stream segment to another pod.
            conntrack::remove(table, key, entry);
            event(CtEvent::BackendGone);
            if !tcp || tcp_may_open(p.tcp_flags) {
                return Follow::Reopen;
            }
            return Follow::BackendGone;
        };
        if slot != entry.slot {
            // SAFETY: a map value pointer.
            unsafe { (*ptr).slot = slot };
        }
        track(table, key, ptr, entry, p, now);
        return Follow::Forward(Verdict::BackendEstablished);
    }
    // A flow the activator holds but never answered (any UDP flow; a TCP
    // connection still at its SYN, which this packet retransmits) moves to
    // the app's pods once one is ready. An answered TCP connection stays: a
    // SYN must not move it mid-stream.
    let unanswered = !tcp || (tcp_may_open(p.tcp_flags) && entry.state == CT_STATE_SYN_SENT);
    if entry.kind == CT_KIND_ACTIVATOR && unanswered && app_has_ready_pods(p) {
        conntrack::remove(table, key, entry);
        return Follow::MoveFromActivator;
    }
    track(table, key, ptr, entry, p, now);
    Follow::Forward(if entry.app_id == u32::MAX { Verdict::ActivatorUnknownService } else { Verdict::ActivatorNoBackend })
}

/// Updates the connection for a client packet. In the new-connection table
/// a TCP connection is established only by the ACK that acknowledges the
/// backend's SYN-ACK (a blind spoofer cannot produce it), and then moves to
/// the established table.
#[inline(always)]
fn track(table: Table, key: &CtKey, ptr: *mut CtEntry, entry: &CtEntry, p: &Parsed, now: u64) {
    let mut flags = p.tcp_flags;
    let mut establishes = false;
    if table == Table::New && p.proto == IPPROTO_TCP && entry.state == CT_STATE_SYN_RECV && flags & TCP_ACK != 0 {
        establishes = completes_handshake(entry.state, entry.server_isn, flags, p.tcp_ack);
        if !establishes {
            event(CtEvent::HandshakeMismatch);
            flags &= !TCP_ACK;
        }
    }
    if conntrack::observe(ptr, p.proto, CT_DIR_FORWARD, flags, now) {
        conntrack::repair_reply(table, key, entry, now);
    }
    if establishes {
        // SAFETY: a map value pointer; the entry as `observe` left it.
        conntrack::promote(key, &unsafe { *ptr }, now);
    }
}

/// Whether the VIP:port now belongs to an uncontested app with a ready pod.
#[inline(always)]
fn app_has_ready_pods(p: &Parsed) -> bool {
    let key = ServiceKey { vip: p.dst, port: p.dport, proto: p.proto, pad: 0 };
    // SAFETY: copied out at once.
    let Some(svc) = (unsafe { SERVICES.get(&key) }).copied() else { return false };
    svc.flags & SERVICE_F_ACTIVATOR_ONLY == 0 && APPS.get(svc.app_id).is_some_and(|a| a.ready_count > 0)
}

/// DNATs the packet along its connection and counts the app's activity.
#[inline(always)]
fn forward(ctx: &XdpContext, p: &Parsed, entry: &CtEntry, verdict: Verdict, now: u64) -> (Verdict, u32) {
    if nat::dnat(ctx, p, &entry.addr, entry.port, entry.client_port).is_err() {
        return MALFORMED;
    }
    if entry.flags & CT_F_SNAT != 0 && nat::rewrite4(ctx, p, Some((entry.snat_addr, entry.client_port)), None).is_err() {
        return MALFORMED;
    }
    record_activity(entry.app_id, (p.ip_end() - p.l3()) as u64, now);
    if p.frag == Frag::First {
        frag::remember_forward(p, &entry.addr, entry.app_id, now);
    }
    (verdict, XDP_PASS)
}

/// Per-CPU: no atomics, no cache line shared between CPUs.
#[inline(always)]
pub fn record_activity(app_id: u32, bytes: u64, now: u64) {
    if app_id == u32::MAX {
        return;
    }
    let Some(activity) = ACTIVITY.get_ptr_mut(app_id) else { return };
    // SAFETY: this CPU's slot; BPF programs do not migrate mid-run.
    unsafe {
        (*activity).last_seen_ns = now;
        (*activity).packets += 1;
        (*activity).bytes += bytes;
    }
}
