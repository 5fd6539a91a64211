//! Connect-time load balancing on the cgroup v2 socket hooks (as Cilium's
//! socket LB and Calico's connect-time LB): a `connect()` or UDP
//! `sendmsg()` to VIP:port is pointed straight at a pod chosen from the same
//! maps as the XDP path, or at the activator when the app has no ready pod
//! (which wakes it). The connection then needs no per-packet NAT and no
//! conntrack entry. `recvmsg()` and `getpeername()` show the VIP again,
//! from `svl_sock_rev_v1`.
//!
//! Any other address costs one range check. Safe verdicts: a socket the
//! hooks cannot point anywhere valid is refused (EPERM, counted), never sent
//! somewhere else; a skipped one is left to the per-packet path.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_coarse_ns,
        generated::{bpf_sk_fullsock, bpf_sk_storage_get},
    },
    programs::{SkBuffContext, SockAddrContext},
};
use serviceless_common::{
    Addr, CT_DIR_FORWARD, CT_KIND_ACTIVATOR, Config, CtKey, FABRIC_F_PREFER_LOCAL, IPPROTO_TCP, IPPROTO_UDP,
    MAX_CGROUP_DEPTH, SOCK_F_HOST_NETNS_ONLY, SOCK_F_SKIP_CGROUPS, SockRevKey, SockRevValue, Verdict, as_ipv4,
    ipv4_mapped,
};

use crate::{
    ingress::record_activity,
    lb::{self, Scope},
    maps::{CONFIG, FABRIC, SOCK_APP, SOCK_CONFIG, SOCK_REV, SOCK_SCRATCH, SOCK_SKIP, count},
    wake,
};

/// The socket call goes ahead (with the address as the hook left it).
pub const ALLOW: i32 = 1;
/// `connect()` / `sendmsg()` fail with EPERM.
pub const REFUSE: i32 = 0;

/// The socket's address family (which hook runs).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// The call being translated forward.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Connect,
    Sendmsg,
}

/// An address and port as the hook sees them, network order (IPv4 mapped).
struct Peer {
    addr: Addr,
    port: u16,
}

/// `connect4/6`, `sendmsg4/6`: a VIP destination becomes a pod's (or the
/// activator's) address.
#[inline(always)]
pub fn forward(ctx: &SockAddrContext, family: Family, hook: Hook) -> i32 {
    let Some(cfg) = CONFIG.get(0) else { return ALLOW };
    let dst = read_peer(ctx, family);
    let v4 = as_ipv4(&dst.addr).is_some();
    if !cfg.is_vip(&dst.addr, v4) {
        return ALLOW;
    }
    let proto = match hook {
        Hook::Sendmsg => IPPROTO_UDP,
        // SAFETY: a context field the verifier lets connect hooks read.
        Hook::Connect => (unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).protocol) }) as u8,
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return ALLOW;
    }
    if skipped(ctx) {
        count(Verdict::SockSkipped);
        return ALLOW;
    }
    let (verdict, allow) = translate_call(ctx, cfg, family, hook, &dst, proto, v4);
    count(verdict);
    allow
}

/// The choice and the rewrite.
#[inline(always)]
fn translate_call(ctx: &SockAddrContext, cfg: &Config, family: Family, hook: Hook, dst: &Peer, proto: u8, v4: bool) -> (Verdict, i32) {
    let Some(scratch) = SOCK_SCRATCH.get_ptr_mut(0) else { return (Verdict::Aborted, ALLOW) };
    // SAFETY: no preconditions.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // The socket names the flow: one socket, one choice (a UDP socket's
    // datagrams keep going to one pod while the app's pods stay the same).
    // SAFETY: [u64; 2] and [u8; 16] have the same size; any bytes are valid.
    let src: Addr = unsafe { core::mem::transmute::<[u64; 2], Addr>([cookie, 0]) };
    let key = CtKey { src, dst: dst.addr, sport: 0, dport: dst.port, proto, dir: CT_DIR_FORWARD, pad: [0; 2] };
    let scope = match FABRIC.get(0) {
        Some(f) if f.flags & FABRIC_F_PREFER_LOCAL != 0 => Scope::PreferLocal,
        _ => Scope::Any,
    };
    // SAFETY: this CPU's socket-hook scratch (see `SockScratch`).
    let choice = unsafe { &mut (*scratch).choose };
    let Ok((target, _)) = lb::choose(cfg, v4, &key, scope, choice) else {
        return (Verdict::SockRefusedNoActivator, REFUSE);
    };
    if !write_peer(ctx, family, &target.addr, target.port) {
        return (Verdict::SockRefusedFamily, REFUSE);
    }
    let rev_key = SockRevKey { cookie, addr: target.addr, port: target.port, pad: [0; 6] };
    let rev = SockRevValue { vip: dst.addr, port: dst.port, pad: [0; 2], app_id: target.app_id };
    // An LRU never refuses for being full; should the insert fail anyway,
    // only the peer address shown to the application is the pod's.
    let _ = SOCK_REV.insert(&rev_key, &rev, 0);
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // One "packet" per connection (or datagram) the app is asked for: what
    // keeps it awake; a connected socket's later traffic is counted by
    // `egress_activity`, through the app id it carries.
    record_activity(target.app_id, 0, now);
    if hook == Hook::Connect && target.app_id != u32::MAX {
        let mut app_id = target.app_id;
        // SAFETY: the hook's own socket. Without storage (out of memory),
        // only the connection's later packets go uncounted.
        let stored = unsafe { SOCK_APP.get_or_insert_ptr_mut(ctx, Some(&mut app_id)) };
        if !stored.is_null() {
            // SAFETY: a live storage value of this socket.
            unsafe { *stored = app_id };
        }
    }
    let to_activator = target.kind == CT_KIND_ACTIVATOR;
    if to_activator && target.app_id != u32::MAX {
        wake::signal_call(target.app_id, proto, now);
    }
    let verdict = match (hook, to_activator) {
        (Hook::Connect, false) => Verdict::SockConnectBackend,
        (Hook::Connect, true) => Verdict::SockConnectActivator,
        (Hook::Sendmsg, false) => Verdict::SockSendmsgBackend,
        (Hook::Sendmsg, true) => Verdict::SockSendmsgActivator,
    };
    (verdict, ALLOW)
}

/// `recvmsg4/6`, `getpeername4/6`: a pod's address the hooks gave this
/// socket is shown as the VIP it stands for. (These hooks must allow.)
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext, family: Family, verdict: Verdict) -> i32 {
    let peer = read_peer(ctx, family);
    // SAFETY: no preconditions.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevKey { cookie, addr: peer.addr, port: peer.port, pad: [0; 6] };
    // SAFETY: copied out at once.
    if let Some(rev) = unsafe { SOCK_REV.get(&key) }.copied()
        && write_peer(ctx, family, &rev.vip, rev.port)
    {
        count(verdict);
    }
    ALLOW
}

/// `cgroup_skb/egress`: a packet a connected socket the connect hook
/// translated sends counts as its app's activity, so an app used only over
/// long-lived connections (a client's pool) is not put to sleep. Every other
/// packet costs a socket-storage miss. Always passes the packet.
#[inline(always)]
pub fn egress_activity(ctx: &SkBuffContext) -> i32 {
    // SAFETY: `sk` is readable in cgroup_skb programs (NULL-checked).
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return ALLOW;
    }
    // SAFETY: a NULL-checked socket of this packet.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return ALLOW;
    }
    // SAFETY: a full socket; lookup only (no create).
    let app = unsafe { bpf_sk_storage_get(core::ptr::from_ref(&SOCK_APP).cast_mut().cast(), full.cast(), core::ptr::null_mut(), 0) };
    if !app.is_null() {
        // SAFETY: the storage value is a u32 written by `translate_call`; no preconditions for the clock.
        unsafe { record_activity(*app.cast::<u32>(), u64::from(ctx.len()), bpf_ktime_get_coarse_ns()) };
    }
    ALLOW
}

/// Sockets the agent was told to leave alone: other network namespaces
/// than its own (`--socket-lb-host-netns-only`), or processes in (or below)
/// a skipped cgroup.
#[inline(always)]
fn skipped(ctx: &SockAddrContext) -> bool {
    let Some(sc) = SOCK_CONFIG.get(0) else { return false };
    // SAFETY: no preconditions.
    if sc.flags & SOCK_F_HOST_NETNS_ONLY != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != sc.host_netns_cookie {
        return true;
    }
    if sc.flags & SOCK_F_SKIP_CGROUPS != 0 {
        for level in 0..MAX_CGROUP_DEPTH {
            // SAFETY: no preconditions; 0 past the cgroup's own level.
            let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
            if id == 0 {
                break;
            }
            // SAFETY: only tested for presence.
            if unsafe { SOCK_SKIP.get(&id) }.is_some() {
                return true;
            }
        }
    }
    false
}

// Context fields are read and written one 4-byte word at a time (volatile
// keeps the compiler from merging them), the only access the verifier allows.

#[inline(always)]
fn read_peer(ctx: &SockAddrContext, family: Family) -> Peer {
    let sa = ctx.sock_addr;
    // SAFETY: fields of the hook's context, readable in every sock_addr hook.
    unsafe {
        // The port is in network order in the low 16 bits.
        let port = core::ptr::read_volatile(&(*sa).user_port) as u16;
        let addr = match family {
            Family::V4 => ipv4_mapped(core::ptr::read_volatile(&(*sa).user_ip4).to_ne_bytes()),
            Family::V6 => {
                let ip = &(*sa).user_ip6;
                let words = [
                    core::ptr::read_volatile(&ip[0]),
                    core::ptr::read_volatile(&ip[1]),
                    core::ptr::read_volatile(&ip[2]),
                    core::ptr::read_volatile(&ip[3]),
                ];
                core::mem::transmute::<[u32; 4], Addr>(words)
            }
        };
        Peer { addr, port }
    }
}

/// False if `addr` does not fit the socket (an IPv6 address on an IPv4 socket).
#[inline(always)]
fn write_peer(ctx: &SockAddrContext, family: Family, addr: &Addr, port: u16) -> bool {
    let sa = ctx.sock_addr;
    // SAFETY: fields of the hook's context, writable in these hooks.
    unsafe {
        match family {
            Family::V4 => {
                let Some(v4) = as_ipv4(addr) else { return false };
                core::ptr::write_volatile(&mut (*sa).user_ip4, u32::from_ne_bytes(v4));
            }
            Family::V6 => {
                let words = core::mem::transmute::<Addr, [u32; 4]>(*addr);
                let ip = &mut (*sa).user_ip6;
                core::ptr::write_volatile(&mut ip[0], words[0]);
                core::ptr::write_volatile(&mut ip[1], words[1]);
                core::ptr::write_volatile(&mut ip[2], words[2]);
                core::ptr::write_volatile(&mut ip[3], words[3]);
            }
        }
        core::ptr::write_volatile(&mut (*sa).user_port, port as u32);
    }
    true
}
