//! Serviceless dataplane: XDP ingress (VIP -> pod or activator DNAT, with
//! connection tracking), TC egress (reply and ICMP error reverse NAT), the
//! conntrack garbage collector, and the cgroup socket hooks (connect-time
//! load balancing for clients on the node). The entry points are here; the
//! logic lives in one module per concern (parse, conntrack, lb, nat, icmp,
//! frag, sock).
//! The agent writes the maps it owns (apps, services, backends, config);
//! the programs write conntrack, fragments, activity and counters.
#![no_std]
#![no_main]

mod conntrack;
mod egress;
mod fabric;
mod frag;
mod icmp;
mod ingress;
mod lb;
mod maps;
mod nat;
mod packet;
mod snat;
mod parse;
mod sock;
mod wake;

use aya_log_ebpf::error;
use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action},
    macros::{cgroup_skb, cgroup_sock_addr, classifier, xdp},
    programs::{SkBuffContext, SockAddrContext, TcContext, XdpContext},
};
use serviceless_common::Verdict;
use sock::{Family, Hook};

/// Ingress on the node uplink. Malformed input never aborts: it is counted
/// and passed for the kernel to judge (see `ingress`).
#[xdp]
pub fn svl_ingress(ctx: XdpContext) -> u32 {
    match ingress::handle(&ctx) {
        Ok(action) => action,
        Err(()) => {
            error!(&ctx, "ingress: internal error; packet aborted");
            maps::count(Verdict::Aborted);
            xdp_action::XDP_ABORTED
        }
    }
}

/// Egress on the node uplink. Never drops: at worst a reply leaves
/// untranslated, which the client's stack rejects.
#[classifier]
pub fn svl_egress(ctx: TcContext) -> i32 {
    match egress::handle(&ctx) {
        Ok(action) => action,
        Err(()) => {
            error!(&ctx, "egress: internal error; packet passed untranslated");
            maps::count(Verdict::Aborted);
            TC_ACT_OK
        }
    }
}

/// Conntrack garbage collection: one pass over the table. Never attached;
/// the agent runs it with BPF_PROG_TEST_RUN (any frame) every few seconds.
#[xdp]
pub fn svl_ct_gc(_ctx: XdpContext) -> u32 {
    if let Some(cfg) = maps::CONFIG.get(0) {
        // SAFETY: no preconditions.
        let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() };
        conntrack::collect(cfg, now);
    }
    xdp_action::XDP_PASS
}

// Socket hooks on the cgroup v2 hierarchy (see `sock`).

#[cgroup_sock_addr(connect4)]
pub fn svl_connect4(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, Family::V4, Hook::Connect)
}

#[cgroup_sock_addr(connect6)]
pub fn svl_connect6(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, Family::V6, Hook::Connect)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn svl_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, Family::V4, Hook::Sendmsg)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn svl_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, Family::V6, Hook::Sendmsg)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn svl_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, Family::V4, Verdict::SockRecvmsgTranslated)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn svl_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, Family::V6, Verdict::SockRecvmsgTranslated)
}

#[cgroup_sock_addr(getpeername4)]
pub fn svl_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, Family::V4, Verdict::SockGetpeernameTranslated)
}

#[cgroup_sock_addr(getpeername6)]
pub fn svl_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, Family::V6, Verdict::SockGetpeernameTranslated)
}

#[cgroup_skb]
pub fn svl_sock_egress(ctx: SkBuffContext) -> i32 {
    sock::egress_activity(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
