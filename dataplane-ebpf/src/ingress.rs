//! XDP ingress: packets to a VIP are DNATed to a live pod chosen by
//! rendezvous hashing (and remembered in the flow table), or to the activator.
//! Everything else passes untouched after one range check.
//!
//! Safe verdicts for bad input: headers we cannot parse are passed untouched
//! (counted `pass_malformed`; the kernel's own checks drop them), fragments
//! and unsupported protocols addressed to a VIP are dropped (counted), so a
//! packet is never rewritten on a guess.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    cty::{c_long, c_void},
    helpers::{bpf_ktime_get_coarse_ns, bpf_loop},
    programs::XdpContext,
};
use core::intrinsics::{AtomicOrdering, atomic_xadd};
use serviceless_common::{
    Addr, BACKEND_READY, BackendKey, Config, FLOW_TO_ACTIVATOR, FLOW_TO_BACKEND, FlowKey,
    FlowValue, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, MAX_BACKENDS_PER_APP,
    RevNatValue, SERVICE_F_ACTIVATOR_ONLY, ServiceKey, Verdict, addr_eq, as_ipv4, csum,
    hash::{backend_hash, flow_hash, score},
    ipv4_mapped,
};

use crate::{
    maps::{ACTIVITY, APPS, BACKENDS, CONFIG, FLOWS, REVNAT, SERVICES, count},
    packet::*,
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

const MALFORMED: (Verdict, u32) = (Verdict::PassMalformed, XDP_PASS);
const NOT_VIP: (Verdict, u32) = (Verdict::PassNotVip, XDP_PASS);

#[inline(always)]
fn route(ctx: &XdpContext) -> (Verdict, u32) {
    let Some(cfg) = CONFIG.get(0) else {
        return NOT_VIP;
    };
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return MALFORMED;
    };
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut off = ETH_HLEN;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let Ok(vlan) = ptr_at::<VlanHdr>(ctx, off) else {
            return MALFORMED;
        };
        ether_type = unsafe { (*vlan).ether_type };
        off += core::mem::size_of::<VlanHdr>();
    }
    if ether_type == ETH_P_IP {
        ipv4(ctx, cfg, off)
    } else if ether_type == ETH_P_IPV6 {
        ipv6(ctx, cfg, off)
    } else {
        NOT_VIP
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, cfg: &Config, off: usize) -> (Verdict, u32) {
    let Ok(ip) = ptr_at::<Ipv4Hdr>(ctx, off) else {
        return MALFORMED;
    };
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &mut *ip };
    let vip = ipv4_mapped(ip.dst);
    if !cfg.is_vip(&vip, true) {
        return NOT_VIP;
    }
    let ihl = (ip.version_ihl & 0x0f) as usize;
    let total = be16(ip.tot_len) as usize;
    let hdr_len = ihl * 4;
    if ip.version_ihl >> 4 != 4 || ihl < 5 || total < hdr_len {
        return MALFORMED;
    }
    // Ethernet may pad short frames, so the frame can exceed the IP length, never the reverse.
    if off + total > ctx.data_end() - ctx.data() {
        return MALFORMED;
    }
    if be16(ip.frag_off) & 0x3fff != 0 {
        return (Verdict::DropFragment, XDP_DROP);
    }
    let l4 = off + hdr_len;
    let src = ipv4_mapped(ip.src);
    match ip.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let Ok(l4_hdr) = L4::at(ctx, l4, ip.proto) else {
                return MALFORMED;
            };
            let flow = l4_hdr.flow_key(src, vip, ip.proto);
            match decide(cfg, &flow, l4_hdr.is_syn(ctx), true) {
                Target::Drop(verdict) => (verdict, XDP_DROP),
                Target::Forward { verdict, addr, port, app_id } => {
                    let Some(new4) = as_ipv4(&addr) else {
                        return (Verdict::DropNoActivator, XDP_DROP);
                    };
                    let acc = csum::diff_addr4(0, ip.dst, new4);
                    set_check(&mut ip.check, acc);
                    ip.dst = new4;
                    l4_hdr.rewrite_dst(acc, port, true);
                    record_activity(app_id, total as u64);
                    (verdict, XDP_PASS)
                }
            }
        }
        IPPROTO_ICMP => icmp4_error(ctx, ip, l4),
        _ => (Verdict::DropUnsupportedProtocol, XDP_DROP),
    }
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, cfg: &Config, off: usize) -> (Verdict, u32) {
    let Ok(ip) = ptr_at::<Ipv6Hdr>(ctx, off) else {
        return MALFORMED;
    };
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &mut *ip };
    let vip: Addr = ip.dst;
    if !cfg.is_vip(&vip, false) {
        return NOT_VIP;
    }
    let payload = be16(ip.payload_len) as usize;
    // A zero payload length means a jumbogram, which we do not route.
    if ip.vtc_flow[0] >> 4 != 6 || payload == 0 {
        return MALFORMED;
    }
    let hdr_end = off + core::mem::size_of::<Ipv6Hdr>();
    if hdr_end + payload > ctx.data_end() - ctx.data() {
        return MALFORMED;
    }
    let mut next = ip.next_hdr;
    let mut l4 = hdr_end;
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        match next {
            IPV6_HDR_HOPOPTS | IPV6_HDR_ROUTING | IPV6_HDR_DSTOPTS => {
                let Ok(ext) = ptr_at::<[u8; 2]>(ctx, l4) else {
                    return MALFORMED;
                };
                let ext = unsafe { *ext };
                next = ext[0];
                l4 += (ext[1] as usize + 1) * 8;
                if l4 > MAX_L4_OFFSET {
                    return MALFORMED;
                }
            }
            IPV6_HDR_FRAGMENT => return (Verdict::DropFragment, XDP_DROP),
            _ => break,
        }
    }
    let src: Addr = ip.src;
    match next {
        IPPROTO_TCP | IPPROTO_UDP => {
            let Ok(l4_hdr) = L4::at(ctx, l4, next) else {
                return MALFORMED;
            };
            let flow = l4_hdr.flow_key(src, vip, next);
            match decide(cfg, &flow, l4_hdr.is_syn(ctx), false) {
                Target::Drop(verdict) => (verdict, XDP_DROP),
                Target::Forward { verdict, addr, port, app_id } => {
                    if as_ipv4(&addr).is_some() {
                        return (Verdict::DropNoActivator, XDP_DROP);
                    }
                    let acc = csum::diff_addr16(0, &ip.dst, &addr);
                    ip.dst = addr;
                    l4_hdr.rewrite_dst(acc, port, false);
                    record_activity(app_id, (hdr_end - off + payload) as u64);
                    (verdict, XDP_PASS)
                }
            }
        }
        IPPROTO_ICMPV6 => (Verdict::DropUnsupportedProtocol, XDP_DROP),
        _ => (Verdict::DropUnsupportedProtocol, XDP_DROP),
    }
}

/// The TCP or UDP header of a packet, with the offsets its rewrite needs.
struct L4 {
    ports: *mut Ports,
    check: *mut [u8; 2],
    flags_off: usize,
    udp: bool,
}

impl L4 {
    #[inline(always)]
    fn at(ctx: &XdpContext, l4: usize, proto: u8) -> Result<Self, ()> {
        if l4 > MAX_L4_OFFSET {
            return Err(());
        }
        let udp = proto == IPPROTO_UDP;
        let check_off = if udp { UDP_CSUM_OFFSET } else { TCP_CSUM_OFFSET };
        let ports = ptr_at::<Ports>(ctx, l4)?;
        let check = ptr_at::<[u8; 2]>(ctx, l4 + check_off)?;
        Ok(Self { ports, check, flags_off: l4 + TCP_FLAGS_OFFSET, udp })
    }

    #[inline(always)]
    fn flow_key(&self, src: Addr, dst: Addr, proto: u8) -> FlowKey {
        // SAFETY: bounds checked in `at`.
        let (sport, dport) = unsafe { ((*self.ports).src, (*self.ports).dst) };
        FlowKey { src, dst, sport, dport, proto, pad: [0; 3] }
    }

    /// A TCP SYN without ACK: the start of a new connection.
    #[inline(always)]
    fn is_syn(&self, ctx: &XdpContext) -> bool {
        if self.udp {
            return false;
        }
        match ptr_at::<u8>(ctx, self.flags_off) {
            Ok(flags) => {
                let flags = unsafe { *flags };
                flags & TCP_FLAG_SYN != 0 && flags & TCP_FLAG_ACK == 0
            }
            Err(()) => false,
        }
    }

    /// Writes the new destination port and fixes the L4 checksum for it and
    /// for the address change already summed in `acc` (pseudo-header).
    #[inline(always)]
    fn rewrite_dst(&self, acc: u32, port: u16, v4: bool) {
        // SAFETY: bounds checked in `at`.
        unsafe {
            let old_port = (*self.ports).dst;
            (*self.ports).dst = port;
            let check = be16(*self.check);
            // IPv4 UDP may omit its checksum (zero); IPv6 UDP may not.
            if self.udp && v4 && check == 0 {
                return;
            }
            let acc = csum::diff16(acc, u16::from_be(old_port), u16::from_be(port));
            let mut new = csum::apply(check, acc);
            if self.udp && new == 0 {
                new = 0xffff;
            }
            *self.check = new.to_be_bytes();
        }
    }
}

#[inline(always)]
fn set_check(check: &mut [u8; 2], acc: u32) {
    *check = csum::apply(be16(*check), acc).to_be_bytes();
}

/// Where a packet goes.
enum Target {
    Forward { verdict: Verdict, addr: Addr, port: u16, app_id: Option<u32> },
    Drop(Verdict),
}

#[inline(always)]
fn decide(cfg: &Config, flow: &FlowKey, syn: bool, v4: bool) -> Target {
    // Looked up once: every path below either follows it or records a new one.
    // SAFETY: copied out at once (LRU entries can be evicted and reused).
    let known = unsafe { FLOWS.get(flow) }.copied();
    let key = ServiceKey { vip: flow.dst, port: flow.dport, proto: flow.proto, pad: 0 };
    // SAFETY: copied out at once; the agent may replace the entry at any time.
    let Some(svc) = (unsafe { SERVICES.get(&key) }).copied() else {
        return to_activator(cfg, flow, &known, v4, Verdict::ActivatorUnknownService, None);
    };
    if svc.flags & SERVICE_F_ACTIVATOR_ONLY != 0 {
        return to_activator(cfg, flow, &known, v4, Verdict::ActivatorCollision, None);
    }
    let app_id = svc.app_id;
    let Some(app) = APPS.get(app_id) else {
        return to_activator(cfg, flow, &known, v4, Verdict::ActivatorUnknownService, None);
    };
    let (backend_count, ready_count) = (app.backend_count, app.ready_count);

    if let Some(known) = known {
        if known.kind == FLOW_TO_BACKEND && known.app_id == app_id {
            if let Some(slot) = find_backend(app_id, &known.backend, known.slot, backend_count) {
                if slot != known.slot {
                    let moved = FlowValue { slot, ..known };
                    let _ = FLOWS.insert(flow, &moved, 0);
                }
                return Target::Forward {
                    verdict: Verdict::BackendEstablished,
                    addr: known.backend,
                    port: known.backend_port,
                    app_id: Some(app_id),
                };
            }
            // Its backend is gone: choose again below.
        } else if known.kind == FLOW_TO_ACTIVATOR && !(syn && ready_count > 0) {
            // A connection held by the activator stays there; a new SYN may go to a pod.
            return to_activator(cfg, flow, &Some(known), v4, Verdict::ActivatorNoBackend, Some(app_id));
        }
    }

    if ready_count == 0 {
        return to_activator(cfg, flow, &known, v4, Verdict::ActivatorNoBackend, Some(app_id));
    }
    let Some((addr, slot)) = choose_backend(app_id, flow, backend_count) else {
        return to_activator(cfg, flow, &known, v4, Verdict::ActivatorNoBackend, Some(app_id));
    };
    let port = svc.target_port;
    let value = FlowValue {
        backend: addr,
        backend_port: port,
        kind: FLOW_TO_BACKEND,
        pad: 0,
        app_id,
        slot,
    };
    remember(flow, &value, &known);
    Target::Forward { verdict: Verdict::BackendNewFlow, addr, port, app_id: Some(app_id) }
}

/// The slot holding `addr` (ready or draining), trying the remembered slot first.
#[inline(always)]
fn find_backend(app_id: u32, addr: &Addr, hint: u32, count: u32) -> Option<u32> {
    if hint < count {
        if let Some(b) = unsafe { BACKENDS.get(BackendKey { app_id, slot: hint }) } {
            if addr_eq(&b.addr, addr) {
                return Some(hint);
            }
        }
    }
    let mut search = FindBackend { app_id, addr: *addr, found: u32::MAX };
    for_each_slot(count, find_backend_step, &mut search);
    (search.found != u32::MAX).then_some(search.found)
}

struct FindBackend {
    app_id: u32,
    addr: Addr,
    found: u32,
}

extern "C" fn find_backend_step(slot: u64, ctx: *mut c_void) -> c_long {
    // SAFETY: `for_each_slot` passes the `FindBackend` it was given.
    let search = unsafe { &mut *ctx.cast::<FindBackend>() };
    let slot = slot as u32;
    match unsafe { BACKENDS.get(BackendKey { app_id: search.app_id, slot }) } {
        Some(b) if addr_eq(&b.addr, &search.addr) => {
            search.found = slot;
            LOOP_BREAK
        }
        _ => LOOP_CONTINUE,
    }
}

/// Rendezvous hashing over the app's ready backends.
#[inline(always)]
fn choose_backend(app_id: u32, flow: &FlowKey, count: u32) -> Option<(Addr, u32)> {
    let mut choice = ChooseBackend {
        app_id,
        flow_hash: flow_hash(flow),
        best_score: 0,
        best_slot: u32::MAX,
        best_addr: [0; 16],
    };
    for_each_slot(count, choose_backend_step, &mut choice);
    (choice.best_slot != u32::MAX).then_some((choice.best_addr, choice.best_slot))
}

struct ChooseBackend {
    app_id: u32,
    flow_hash: u64,
    best_score: u64,
    best_slot: u32,
    best_addr: Addr,
}

extern "C" fn choose_backend_step(slot: u64, ctx: *mut c_void) -> c_long {
    // SAFETY: `for_each_slot` passes the `ChooseBackend` it was given.
    let choice = unsafe { &mut *ctx.cast::<ChooseBackend>() };
    let slot = slot as u32;
    let Some(b) = (unsafe { BACKENDS.get(BackendKey { app_id: choice.app_id, slot }) }) else {
        return LOOP_CONTINUE;
    };
    if b.state == BACKEND_READY {
        let s = score(choice.flow_hash, backend_hash(&b.addr));
        if choice.best_slot == u32::MAX || s > choice.best_score {
            choice.best_score = s;
            choice.best_slot = slot;
            choice.best_addr = b.addr;
        }
    }
    LOOP_CONTINUE
}

const LOOP_CONTINUE: c_long = 0;
const LOOP_BREAK: c_long = 1;

/// Runs `step(slot, state)` for slots `0..count` (at most
/// MAX_BACKENDS_PER_APP) through `bpf_loop` (Linux 5.17, commit e6f2dd0f8067),
/// so the verifier checks the body once instead of once per iteration.
#[inline(always)]
fn for_each_slot<T>(count: u32, step: extern "C" fn(u64, *mut c_void) -> c_long, state: &mut T) {
    let n = if count > MAX_BACKENDS_PER_APP { MAX_BACKENDS_PER_APP } else { count };
    // SAFETY: `step` only casts the context back to `T`.
    unsafe {
        bpf_loop(n, step as *mut c_void, (state as *mut T).cast(), 0);
    }
}

#[inline(always)]
fn to_activator(
    cfg: &Config,
    flow: &FlowKey,
    known: &Option<FlowValue>,
    v4: bool,
    verdict: Verdict,
    app_id: Option<u32>,
) -> Target {
    let (addr, port, present) = if v4 {
        (cfg.activator4, cfg.activator4_port, cfg.flags & serviceless_common::CONFIG_F_ACTIVATOR4)
    } else {
        (cfg.activator6, cfg.activator6_port, cfg.flags & serviceless_common::CONFIG_F_ACTIVATOR6)
    };
    if present == 0 {
        return Target::Drop(Verdict::DropNoActivator);
    }
    let value = FlowValue {
        backend: addr,
        backend_port: port,
        kind: FLOW_TO_ACTIVATOR,
        pad: 0,
        app_id: app_id.unwrap_or(u32::MAX),
        slot: 0,
    };
    remember(flow, &value, known);
    Target::Forward { verdict, addr, port, app_id }
}

/// Records the flow and its reverse NAT entry, unless the flow table
/// (`known`, as `decide` read it) already says the same.
#[inline(always)]
fn remember(flow: &FlowKey, value: &FlowValue, known: &Option<FlowValue>) {
    let unchanged = match known {
        Some(v) => addr_eq(&v.backend, &value.backend) && v.backend_port == value.backend_port && v.kind == value.kind,
        None => false,
    };
    if unchanged {
        return;
    }
    let reply = FlowKey {
        src: value.backend,
        dst: flow.src,
        sport: value.backend_port,
        dport: flow.sport,
        proto: flow.proto,
        pad: [0; 3],
    };
    let rev = RevNatValue { vip: flow.dst, vport: flow.dport, pad: [0; 2], app_id: value.app_id };
    if FLOWS.insert(flow, value, 0).is_err() || REVNAT.insert(&reply, &rev, 0).is_err() {
        count(Verdict::FlowInsertFailed);
    }
}

#[inline(always)]
fn record_activity(app_id: Option<u32>, bytes: u64) {
    let Some(app_id) = app_id else { return };
    let Some(activity) = ACTIVITY.get_ptr_mut(app_id) else { return };
    // SAFETY: array slots are stable; concurrent CPUs only use atomic adds and plain stores.
    unsafe {
        (*activity).last_seen_ns = bpf_ktime_get_coarse_ns();
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*activity).packets, 1);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*activity).bytes, bytes);
    }
}

/// An ICMPv4 error from a client about a reply it got from a VIP (for
/// example "fragmentation needed"): send it to the backend that sent the
/// reply, with the quoted packet rewritten to name that backend.
#[inline(always)]
fn icmp4_error(ctx: &XdpContext, ip: &mut Ipv4Hdr, l4: usize) -> (Verdict, u32) {
    let Ok(icmp) = ptr_at::<[u8; ICMP_ERROR_HLEN]>(ctx, l4) else {
        return MALFORMED;
    };
    let icmp = unsafe { &mut *icmp };
    if !is_icmp4_error(icmp[0]) {
        return (Verdict::DropUnsupportedProtocol, XDP_DROP);
    }
    let inner_off = l4 + ICMP_ERROR_HLEN;
    let Ok(inner) = ptr_at::<Ipv4Hdr>(ctx, inner_off) else {
        return MALFORMED;
    };
    let inner = unsafe { &mut *inner };
    let inner_len = ((inner.version_ihl & 0x0f) as usize) * 4;
    if inner_len < 20 || (inner.proto != IPPROTO_TCP && inner.proto != IPPROTO_UDP) {
        return (Verdict::DropUnsupportedProtocol, XDP_DROP);
    }
    let ports_off = inner_off + inner_len;
    if ports_off > MAX_L4_OFFSET {
        return MALFORMED;
    }
    let Ok(ports) = ptr_at::<Ports>(ctx, ports_off) else {
        return MALFORMED;
    };
    let ports = unsafe { &mut *ports };
    // The quoted packet went VIP -> client; its flow is client -> VIP.
    let quoted = FlowKey {
        src: ipv4_mapped(inner.src),
        dst: ipv4_mapped(inner.dst),
        sport: ports.src,
        dport: ports.dst,
        proto: inner.proto,
        pad: [0; 3],
    };
    let flow = quoted.reversed();
    let Some(known) = (unsafe { FLOWS.get(&flow) }).copied() else {
        return (Verdict::DropUnsupportedProtocol, XDP_DROP);
    };
    let Some(backend) = as_ipv4(&known.backend) else {
        return (Verdict::DropUnsupportedProtocol, XDP_DROP);
    };
    // Outer destination: VIP -> backend (IP header checksum only; ICMP has no pseudo-header).
    let outer = csum::diff_addr4(0, ip.dst, backend);
    set_check(&mut ip.check, outer);
    ip.dst = backend;
    // Quoted source address and port, and the quoted header's checksum; the
    // ICMP checksum covers all three.
    let old_inner_check = be16(inner.check);
    let addr_acc = csum::diff_addr4(0, inner.src, backend);
    let new_inner_check = csum::apply(old_inner_check, addr_acc);
    inner.src = backend;
    inner.check = new_inner_check.to_be_bytes();
    let old_port = ports.src;
    ports.src = known.backend_port;
    let port_acc = csum::diff16(0, u16::from_be(old_port), u16::from_be(known.backend_port));
    let mut icmp_acc = csum::diff16(addr_acc, old_inner_check, new_inner_check);
    icmp_acc = csum::diff16(icmp_acc, u16::from_be(old_port), u16::from_be(known.backend_port));
    // The quoted L4 checksum, when quoted, must stay valid for the backend too.
    let l4_check_off = ports_off + if inner.proto == IPPROTO_UDP { UDP_CSUM_OFFSET } else { TCP_CSUM_OFFSET };
    if let Ok(l4_check) = ptr_at::<[u8; 2]>(ctx, l4_check_off) {
        let l4_check = unsafe { &mut *l4_check };
        let old = be16(*l4_check);
        if !(inner.proto == IPPROTO_UDP && old == 0) {
            let new = csum::apply(old, addr_acc + port_acc);
            *l4_check = new.to_be_bytes();
            icmp_acc = csum::diff16(icmp_acc, old, new);
        }
    }
    let icmp_check = be16([icmp[ICMP_CSUM_OFFSET], icmp[ICMP_CSUM_OFFSET + 1]]);
    let new = csum::apply(icmp_check, icmp_acc).to_be_bytes();
    icmp[ICMP_CSUM_OFFSET] = new[0];
    icmp[ICMP_CSUM_OFFSET + 1] = new[1];
    (Verdict::IcmpErrorTranslated, XDP_PASS)
}
