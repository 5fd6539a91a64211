//! `--remote-mode snat`: connections to pods on other nodes leave with this
//! node's address and a port it owns as their source, so the network never
//! sees a VIP-sourced packet from another node (cloud anti-spoofing drops
//! those); the pod's replies come back here and are translated back. The
//! pod sees this node's address, not the client's. Only this node holds
//! such a connection's state, so its packets must keep arriving here.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::bpf_ktime_get_coarse_ns,
    programs::XdpContext,
};
use serviceless_common::{CT_F_SNAT, Fabric, IPPROTO_TCP, Verdict, as_ipv4, reply_key};

use crate::{
    conntrack::{self, Snat},
    fabric,
    ingress::{pack, record_activity},
    maps::Scratch,
    nat, parse,
};

/// This node's translation source, when SNAT applies to the packet: IPv4
/// (the node address is IPv4; IPv6 connections are encapsulated instead).
#[inline(always)]
pub fn source(fabric: &Fabric, v4: bool) -> Option<Snat> {
    (fabric.flags & serviceless_common::FABRIC_F_SNAT != 0 && v4).then_some(Snat {
        addr: fabric.node4,
        port_min: fabric.snat_port_min,
        port_max: fabric.snat_port_max,
    })
}

/// A packet to this node's address at a SNAT port (`s.parsed`): a pod's
/// reply to a translated connection is translated back (from VIP:port to
/// the client) and sent to the client; anything else is the node's own
/// traffic and passes untouched.
#[inline(never)]
pub fn reply_call(ctx: &XdpContext, fabric: &Fabric, s: &mut Scratch) -> u64 {
    if !parse::snat_reply(ctx, &mut s.parsed) {
        return pack(Verdict::PassNotVip, XDP_PASS);
    }
    let p = &s.parsed;
    let port = u16::from_be(p.dport);
    if port < fabric.snat_port_min || port > fabric.snat_port_max {
        return pack(Verdict::PassNotVip, XDP_PASS);
    }
    let key = reply_key(&p.src, p.sport, &p.dst, p.dport, p.proto);
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let (flags, seq) = if p.proto == IPPROTO_TCP { (p.tcp_flags, p.tcp_seq) } else { (0, 0) };
    let rev = match conntrack::follow_reply::<true>(&key, flags, seq) {
        Ok(Some(rev)) if rev.flags & CT_F_SNAT != 0 => rev,
        Ok(_) => return pack(Verdict::PassNotVip, XDP_PASS),
        Err(verdict) => return pack(verdict, XDP_PASS),
    };
    let (Some(vip), client) = (as_ipv4(&rev.addr), rev.snat_addr) else {
        return pack(Verdict::DropNoNextHop, XDP_DROP);
    };
    if nat::rewrite4(ctx, p, Some((vip, rev.port)), Some((client, rev.client_port))).is_err() {
        return pack(Verdict::PassMalformed, XDP_PASS);
    }
    record_activity(rev.app_id, (p.ip_end() - p.l3()) as u64, now);
    fabric::send_call(ctx, vip, client, (p.ip_end() - p.l3()) as u16, Verdict::SnatReplyTranslated)
}
