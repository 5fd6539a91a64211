//! TC egress: replies from a backend (or the activator) leave with the VIP
//! and VIP port as their source, and ICMP errors a backend sends about a
//! translated flow quote the VIP instead of the pod. Uses the skb checksum
//! helpers, which handle CHECKSUM_PARTIAL packets from local pods correctly.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use serviceless_common::{
    Addr, FlowKey, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, RevNatValue, Verdict,
    addr_eq, as_ipv4, csum, ipv4_mapped,
};

use crate::{
    maps::{REVNAT, count},
    packet::*,
};

pub fn handle(ctx: &TcContext) -> Result<i32, ()> {
    let verdict = translate(ctx).unwrap_or(Verdict::EgressPass);
    count(verdict);
    Ok(TC_ACT_OK)
}

/// Offsets of IPv4/IPv6 header fields.
const IPV4_CHECK: usize = 10;
const IPV4_SRC: usize = 12;
const IPV4_DST: usize = 16;
const IPV6_SRC: usize = 8;
const IPV6_DST: usize = 24;
const IPV6_HLEN: usize = 40;
/// Flag size bits of the csum helpers.
const CSUM_SIZE_2: u64 = 2;
const CSUM_SIZE_4: u64 = 4;

#[inline(always)]
fn translate(ctx: &TcContext) -> Result<Verdict, ()> {
    let mut ether_type: u16 = ctx.load(12).map_err(drop)?;
    let mut off = ETH_HLEN;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        ether_type = ctx.load(ETH_HLEN + 2).map_err(drop)?;
        off += 4;
    }
    if ether_type == ETH_P_IP {
        reply4(ctx, off)
    } else if ether_type == ETH_P_IPV6 {
        reply6(ctx, off)
    } else {
        Ok(Verdict::EgressPass)
    }
}

#[inline(always)]
fn lookup(key: &FlowKey) -> Option<RevNatValue> {
    // SAFETY: copied out at once (LRU entries can be evicted and reused).
    unsafe { REVNAT.get(key) }.copied()
}

#[inline(always)]
fn l4_check_offset(l4: usize, proto: u8) -> usize {
    if proto == IPPROTO_UDP { l4 + UDP_CSUM_OFFSET } else { l4 + TCP_CSUM_OFFSET }
}

#[inline(always)]
fn reply4(ctx: &TcContext, off: usize) -> Result<Verdict, ()> {
    let ip: Ipv4Hdr = ctx.load(off).map_err(drop)?;
    let ihl = (ip.version_ihl & 0x0f) as usize;
    if ihl < 5 || be16(ip.frag_off) & 0x1fff != 0 {
        return Ok(Verdict::EgressPass);
    }
    let l4 = off + ihl * 4;
    match ip.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let ports: Ports = ctx.load(l4).map_err(drop)?;
            let key = FlowKey {
                src: ipv4_mapped(ip.src),
                dst: ipv4_mapped(ip.dst),
                sport: ports.src,
                dport: ports.dst,
                proto: ip.proto,
                pad: [0; 3],
            };
            let Some(rev) = lookup(&key) else { return Ok(Verdict::EgressPass) };
            let vip = as_ipv4(&rev.vip).ok_or(())?;
            let udp = ip.proto == IPPROTO_UDP;
            let check_off = l4_check_offset(l4, ip.proto);
            let check: u16 = ctx.load(check_off).map_err(drop)?;
            let mangled = if udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
            // IPv4 UDP without a checksum stays without one.
            if !(udp && check == 0) {
                ctx.l4_csum_replace(
                    check_off,
                    u32::from_ne_bytes(ip.src) as u64,
                    u32::from_ne_bytes(vip) as u64,
                    BPF_F_PSEUDO_HDR as u64 | mangled | CSUM_SIZE_4,
                )
                .map_err(drop)?;
                ctx.l4_csum_replace(check_off, ports.src as u64, rev.vport as u64, mangled | CSUM_SIZE_2)
                    .map_err(drop)?;
            }
            ctx.l3_csum_replace(
                off + IPV4_CHECK,
                u32::from_ne_bytes(ip.src) as u64,
                u32::from_ne_bytes(vip) as u64,
                CSUM_SIZE_4,
            )
            .map_err(drop)?;
            ctx.store(off + IPV4_SRC, &vip, 0).map_err(drop)?;
            ctx.store(l4, &rev.vport, 0).map_err(drop)?;
            Ok(Verdict::ReplyTranslated)
        }
        IPPROTO_ICMP => icmp4_error(ctx, off, &ip, l4),
        _ => Ok(Verdict::EgressPass),
    }
}

/// An ICMPv4 error a backend sends about a client's packet: the quoted
/// packet went client -> backend; make it read client -> VIP.
#[inline(always)]
fn icmp4_error(ctx: &TcContext, off: usize, ip: &Ipv4Hdr, l4: usize) -> Result<Verdict, ()> {
    let icmp_type: u8 = ctx.load(l4).map_err(drop)?;
    if !is_icmp4_error(icmp_type) {
        return Ok(Verdict::EgressPass);
    }
    let inner_off = l4 + ICMP_ERROR_HLEN;
    let inner: Ipv4Hdr = ctx.load(inner_off).map_err(drop)?;
    let inner_len = ((inner.version_ihl & 0x0f) as usize) * 4;
    if inner_len < 20 || (inner.proto != IPPROTO_TCP && inner.proto != IPPROTO_UDP) {
        return Ok(Verdict::EgressPass);
    }
    let ports_off = inner_off + inner_len;
    let ports: Ports = ctx.load(ports_off).map_err(drop)?;
    // The quoted packet went client -> backend; the reply flow is its reverse.
    let quoted = FlowKey {
        src: ipv4_mapped(inner.src),
        dst: ipv4_mapped(inner.dst),
        sport: ports.src,
        dport: ports.dst,
        proto: inner.proto,
        pad: [0; 3],
    };
    let key = quoted.reversed();
    let Some(rev) = lookup(&key) else { return Ok(Verdict::EgressPass) };
    let vip = as_ipv4(&rev.vip).ok_or(())?;
    let icmp_check = l4 + ICMP_CSUM_OFFSET;

    // Quoted destination address, with the quoted IP checksum kept valid.
    let old_inner_check: u16 = ctx.load(inner_off + IPV4_CHECK).map_err(drop)?;
    let new_inner_check =
        csum::apply(be16(old_inner_check.to_ne_bytes()), csum::diff_addr4(0, inner.dst, vip));
    let new_inner_check = u16::from_ne_bytes(new_inner_check.to_be_bytes());
    ctx.l4_csum_replace(
        icmp_check,
        u32::from_ne_bytes(inner.dst) as u64,
        u32::from_ne_bytes(vip) as u64,
        CSUM_SIZE_4,
    )
    .map_err(drop)?;
    ctx.l4_csum_replace(icmp_check, old_inner_check as u64, new_inner_check as u64, CSUM_SIZE_2)
        .map_err(drop)?;
    ctx.l4_csum_replace(icmp_check, ports.dst as u64, rev.vport as u64, CSUM_SIZE_2)
        .map_err(drop)?;
    let l4_acc = csum::diff16(
        csum::diff_addr4(0, inner.dst, vip),
        u16::from_be(ports.dst),
        u16::from_be(rev.vport),
    );
    quoted_l4_check(ctx, icmp_check, ports_off, inner.proto, l4_acc)?;
    ctx.store(inner_off + IPV4_DST, &vip, 0).map_err(drop)?;
    ctx.store(inner_off + IPV4_CHECK, &new_inner_check, 0).map_err(drop)?;
    ctx.store(ports_off + 2, &rev.vport, 0).map_err(drop)?;

    // The error's own source is the backend: it becomes the VIP.
    if ip.src == inner.dst {
        ctx.l3_csum_replace(
            off + IPV4_CHECK,
            u32::from_ne_bytes(ip.src) as u64,
            u32::from_ne_bytes(vip) as u64,
            CSUM_SIZE_4,
        )
        .map_err(drop)?;
        ctx.store(off + IPV4_SRC, &vip, 0).map_err(drop)?;
    }
    Ok(Verdict::IcmpErrorTranslated)
}

/// Keeps the quoted packet's own L4 checksum valid (when the error quotes
/// it) after its destination changed by `acc`, and folds that change into
/// the ICMP checksum.
#[inline(always)]
fn quoted_l4_check(ctx: &TcContext, icmp_check: usize, ports_off: usize, proto: u8, acc: u32) -> Result<(), ()> {
    let off = l4_check_offset(ports_off, proto);
    let Ok(old) = ctx.load::<u16>(off) else { return Ok(()) };
    if proto == IPPROTO_UDP && old == 0 {
        return Ok(());
    }
    let new = csum::apply(u16::from_be(old), acc).to_be();
    ctx.l4_csum_replace(icmp_check, old as u64, new as u64, CSUM_SIZE_2).map_err(drop)?;
    ctx.store(off, &new, 0).map_err(drop)
}

/// Checksum difference between two 16-byte addresses, for the csum helpers.
#[inline(always)]
fn addr_diff(old: &Addr, new: &Addr) -> Result<u64, ()> {
    let mut from = *old;
    let mut to = *new;
    let diff = unsafe {
        bpf_csum_diff(from.as_mut_ptr().cast(), 16, to.as_mut_ptr().cast(), 16, 0)
    };
    if diff < 0 { Err(()) } else { Ok(diff as u64) }
}

#[inline(always)]
fn reply6(ctx: &TcContext, off: usize) -> Result<Verdict, ()> {
    let ip: Ipv6Hdr = ctx.load(off).map_err(drop)?;
    // Extension headers on replies are rare; such replies pass untranslated.
    let l4 = off + IPV6_HLEN;
    match ip.next_hdr {
        IPPROTO_TCP | IPPROTO_UDP => {
            let ports: Ports = ctx.load(l4).map_err(drop)?;
            let key = FlowKey {
                src: ip.src,
                dst: ip.dst,
                sport: ports.src,
                dport: ports.dst,
                proto: ip.next_hdr,
                pad: [0; 3],
            };
            let Some(rev) = lookup(&key) else { return Ok(Verdict::EgressPass) };
            let udp = ip.next_hdr == IPPROTO_UDP;
            let mangled = if udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
            let check_off = l4_check_offset(l4, ip.next_hdr);
            let diff = addr_diff(&ip.src, &rev.vip)?;
            ctx.l4_csum_replace(check_off, 0, diff, BPF_F_PSEUDO_HDR as u64 | mangled)
                .map_err(drop)?;
            ctx.l4_csum_replace(check_off, ports.src as u64, rev.vport as u64, mangled | CSUM_SIZE_2)
                .map_err(drop)?;
            ctx.store(off + IPV6_SRC, &rev.vip, 0).map_err(drop)?;
            ctx.store(l4, &rev.vport, 0).map_err(drop)?;
            Ok(Verdict::ReplyTranslated)
        }
        IPPROTO_ICMPV6 => icmp6_error(ctx, off, &ip, l4),
        _ => Ok(Verdict::EgressPass),
    }
}

/// The ICMPv6 counterpart of `icmp4_error`; ICMPv6 checksums also cover the
/// outer addresses (pseudo-header).
#[inline(always)]
fn icmp6_error(ctx: &TcContext, off: usize, ip: &Ipv6Hdr, l4: usize) -> Result<Verdict, ()> {
    let icmp_type: u8 = ctx.load(l4).map_err(drop)?;
    if !is_icmp6_error(icmp_type) {
        return Ok(Verdict::EgressPass);
    }
    let inner_off = l4 + ICMP_ERROR_HLEN;
    let inner: Ipv6Hdr = ctx.load(inner_off).map_err(drop)?;
    if inner.next_hdr != IPPROTO_TCP && inner.next_hdr != IPPROTO_UDP {
        return Ok(Verdict::EgressPass);
    }
    let ports_off = inner_off + IPV6_HLEN;
    let ports: Ports = ctx.load(ports_off).map_err(drop)?;
    let quoted = FlowKey {
        src: inner.src,
        dst: inner.dst,
        sport: ports.src,
        dport: ports.dst,
        proto: inner.next_hdr,
        pad: [0; 3],
    };
    let key = quoted.reversed();
    let Some(rev) = lookup(&key) else { return Ok(Verdict::EgressPass) };
    let icmp_check = l4 + ICMP_CSUM_OFFSET;
    let inner_diff = addr_diff(&inner.dst, &rev.vip)?;
    ctx.l4_csum_replace(icmp_check, 0, inner_diff, 0).map_err(drop)?;
    ctx.l4_csum_replace(icmp_check, ports.dst as u64, rev.vport as u64, CSUM_SIZE_2)
        .map_err(drop)?;
    let l4_acc = csum::diff16(
        csum::diff_addr16(0, &inner.dst, &rev.vip),
        u16::from_be(ports.dst),
        u16::from_be(rev.vport),
    );
    quoted_l4_check(ctx, icmp_check, ports_off, inner.next_hdr, l4_acc)?;
    ctx.store(inner_off + IPV6_DST, &rev.vip, 0).map_err(drop)?;
    ctx.store(ports_off + 2, &rev.vport, 0).map_err(drop)?;
    if addr_eq(&ip.src, &inner.dst) {
        let outer_diff = addr_diff(&ip.src, &rev.vip)?;
        ctx.l4_csum_replace(icmp_check, 0, outer_diff, BPF_F_PSEUDO_HDR as u64).map_err(drop)?;
        ctx.store(off + IPV6_SRC, &rev.vip, 0).map_err(drop)?;
    }
    Ok(Verdict::IcmpErrorTranslated)
}
