//! Serviceless dataplane: XDP ingress (VIP -> pod or activator DNAT) and TC
//! egress (reply and ICMP error reverse NAT). Maps are in `maps.rs`, packet
//! layouts in `packet.rs`; the agent is the only writer of the maps it owns.
#![no_std]
#![no_main]
// Atomic adds to shared counters: core's atomics have no fetch_add on BPF.
#![feature(core_intrinsics)]
#![allow(internal_features, reason = "atomic_xadd is the only atomic add core offers on BPF")]

mod egress;
mod ingress;
mod maps;
mod packet;

use aya_log_ebpf::error;
use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

/// Ingress on the node uplink. Malformed input never aborts: it is counted
/// and passed for the kernel to judge (see `ingress`).
#[xdp]
pub fn svl_ingress(ctx: XdpContext) -> u32 {
    match ingress::handle(&ctx) {
        Ok(action) => action,
        Err(()) => {
            error!(&ctx, "ingress: internal error; packet aborted");
            maps::count(serviceless_common::Verdict::Aborted);
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
            maps::count(serviceless_common::Verdict::Aborted);
            TC_ACT_OK
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
