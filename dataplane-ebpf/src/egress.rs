//! TC egress: replies from a backend (or the activator) leave with the VIP
//! and VIP port as their source, and ICMP errors a backend sends about a
//! translated flow quote the VIP instead of the pod. Uses the skb checksum
//! helpers, which handle CHECKSUM_PARTIAL packets from local pods correctly.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK},
    helpers::{bpf_csum_diff, bpf_ktime_get_coarse_ns},
    programs::TcContext,
};
use serviceless_common::{
    Addr, CT_DIR_REPLY, CtEvent, CtEntry, CtKey, FragValue, TCP_SYN, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP,
    IPPROTO_UDP, Verdict, addr_eq, as_ipv4, csum, ipv4_mapped,
};

use crate::{
    conntrack::{self, reply_key},
    frag,
    maps::{FABRIC, FRAGMENTS, count, event},
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

/// The connection a reply belongs to (see `conntrack::follow_reply`).
#[inline(always)]
fn reply_connection(key: &CtKey, tcp: &TcpInfo) -> Result<Option<CtEntry>, Verdict> {
    conntrack::follow_reply::<false>(key, tcp.flags, tcp.seq)
}

/// What the state machine needs of a reply's TCP header.
struct TcpInfo {
    flags: u8,
    /// Sequence number, host order.
    seq: u32,
}

/// The TCP flags and sequence number of a segment at `l4` (zeros for UDP).
#[inline(always)]
fn tcp_info(ctx: &TcContext, l4: usize, proto: u8) -> TcpInfo {
    if proto != IPPROTO_TCP {
        return TcpInfo { flags: 0, seq: 0 };
    }
    TcpInfo {
        flags: ctx.load::<u8>(l4 + TCP_FLAGS_OFFSET).unwrap_or(0),
        seq: ctx.load::<[u8; 4]>(l4 + 4).map(u32::from_be_bytes).unwrap_or(0),
    }
}

/// Rewrites the reply's ports: source becomes the VIP port, destination
/// the client's own port (when a clash made the backend see another one),
/// with the L4 checksum fixed for both.
#[inline(always)]
fn reply_ports(ctx: &TcContext, l4: usize, ports: &Ports, rev: &CtEntry, check_off: usize, mangled: u64, sum: bool) -> Result<(), ()> {
    if sum {
        ctx.l4_csum_replace(check_off, ports.src as u64, rev.port as u64, mangled | CSUM_SIZE_2).map_err(drop)?;
        if ports.dst != rev.client_port {
            ctx.l4_csum_replace(check_off, ports.dst as u64, rev.client_port as u64, mangled | CSUM_SIZE_2)
                .map_err(drop)?;
        }
    }
    ctx.store(l4, &rev.port, 0).map_err(drop)?;
    ctx.store(l4 + 2, &rev.client_port, 0).map_err(drop)
}

#[inline(always)]
fn l4_check_offset(l4: usize, proto: u8) -> usize {
    if proto == IPPROTO_UDP { l4 + UDP_CSUM_OFFSET } else { l4 + TCP_CSUM_OFFSET }
}

// Out of line: the two families share the stack below `translate`.
#[inline(never)]
fn reply4(ctx: &TcContext, off: usize) -> Result<Verdict, ()> {
    let ip: Ipv4Hdr = ctx.load(off).map_err(drop)?;
    let ihl = (ip.version_ihl & 0x0f) as usize;
    if ihl < 5 {
        return Ok(Verdict::EgressPass);
    }
    let frag_off = be16(ip.frag_off);
    let id = u16::from_ne_bytes(ip.id);
    if frag_off & 0x1fff != 0 {
        return later_fragment4(ctx, off, &ip, id);
    }
    let l4 = off + ihl * 4;
    match ip.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let ports: Ports = ctx.load(l4).map_err(drop)?;
            let key = reply_key(&ipv4_mapped(ip.src), ports.src, &ipv4_mapped(ip.dst), ports.dst, ip.proto);
            let rev = match reply_connection(&key, &tcp_info(ctx, l4, ip.proto)) {
                Ok(Some(rev)) => rev,
                Ok(None) => return Ok(Verdict::EgressPass),
                Err(verdict) => return Ok(verdict),
            };
            let vip = as_ipv4(&rev.addr).ok_or(())?;
            let udp = ip.proto == IPPROTO_UDP;
            let check_off = l4_check_offset(l4, ip.proto);
            let check: u16 = ctx.load(check_off).map_err(drop)?;
            let mangled = if udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
            // IPv4 UDP without a checksum stays without one.
            let sum = !(udp && check == 0);
            if sum {
                ctx.l4_csum_replace(
                    check_off,
                    u32::from_ne_bytes(ip.src) as u64,
                    u32::from_ne_bytes(vip) as u64,
                    BPF_F_PSEUDO_HDR as u64 | mangled | CSUM_SIZE_4,
                )
                .map_err(drop)?;
            }
            reply_ports(ctx, l4, &ports, &rev, check_off, mangled, sum)?;
            set_src4(ctx, off, &ip, vip)?;
            if frag_off & 0x2000 != 0 {
                // First fragment: its later fragments get the same source.
                let k = frag::key(&key.src, &key.dst, id, ip.proto, CT_DIR_REPLY);
                let now = unsafe { bpf_ktime_get_coarse_ns() };
                let _ = FRAGMENTS.insert(&k, &FragValue { addr: rev.addr, seen_ns: now, app_id: rev.app_id, pad: 0 }, 0);
            }
            if ip.proto == IPPROTO_TCP {
                clamp_mss(ctx, l4, true);
            }
            Ok(Verdict::ReplyTranslated)
        }
        IPPROTO_ICMP => icmp4_error(ctx, off, &ip, l4),
        _ => Ok(Verdict::EgressPass),
    }
}

#[inline(always)]
fn set_src4(ctx: &TcContext, off: usize, ip: &Ipv4Hdr, vip: [u8; 4]) -> Result<(), ()> {
    ctx.l3_csum_replace(off + IPV4_CHECK, u32::from_ne_bytes(ip.src) as u64, u32::from_ne_bytes(vip) as u64, CSUM_SIZE_4)
        .map_err(drop)?;
    ctx.store(off + IPV4_SRC, &vip, 0).map_err(drop)
}

/// A later fragment of a reply: the source its first fragment got.
#[inline(always)]
fn later_fragment4(ctx: &TcContext, off: usize, ip: &Ipv4Hdr, id: u16) -> Result<Verdict, ()> {
    let k = frag::key(&ipv4_mapped(ip.src), &ipv4_mapped(ip.dst), id, ip.proto, CT_DIR_REPLY);
    // SAFETY: copied out at once (LRU entries can be evicted and reused).
    let Some(to) = (unsafe { FRAGMENTS.get(&k) }).copied() else { return Ok(Verdict::EgressPass) };
    let vip = as_ipv4(&to.addr).ok_or(())?;
    set_src4(ctx, off, ip, vip)?;
    Ok(Verdict::FragmentTranslated)
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
    // The quoted packet went client -> backend; its reply tuple is the reverse.
    let key = reply_key(&ipv4_mapped(inner.dst), ports.dst, &ipv4_mapped(inner.src), ports.src, inner.proto);
    // SAFETY: copied out at once.
    let Some(rev) = conntrack::lookup(&key).map(|(_, rev)| unsafe { *rev }) else { return Ok(Verdict::EgressPass) };
    let vip = as_ipv4(&rev.addr).ok_or(())?;
    let icmp_check = l4 + ICMP_CSUM_OFFSET;

    // Quoted destination address, with the quoted IP checksum kept valid.
    let old_inner_check: u16 = ctx.load(inner_off + IPV4_CHECK).map_err(drop)?;
    let addr_acc = csum::diff_addr4(0, inner.dst, vip);
    let new_inner_check = csum::apply(be16(old_inner_check.to_ne_bytes()), addr_acc);
    let new_inner_check = u16::from_ne_bytes(new_inner_check.to_be_bytes());
    ctx.l4_csum_replace(icmp_check, u32::from_ne_bytes(inner.dst) as u64, u32::from_ne_bytes(vip) as u64, CSUM_SIZE_4)
        .map_err(drop)?;
    ctx.l4_csum_replace(icmp_check, old_inner_check as u64, new_inner_check as u64, CSUM_SIZE_2).map_err(drop)?;
    quoted_ports(ctx, icmp_check, ports_off, &ports, inner.proto, &rev, addr_acc)?;
    ctx.store(inner_off + IPV4_DST, &vip, 0).map_err(drop)?;
    ctx.store(inner_off + IPV4_CHECK, &new_inner_check, 0).map_err(drop)?;

    // The error's own source is the backend: it becomes the VIP.
    if ip.src == inner.dst {
        set_src4(ctx, off, ip, vip)?;
    }
    Ok(Verdict::IcmpErrorTranslated)
}

/// Rewrites the quoted ports (destination: the VIP port; source: the
/// client's own port), keeps the quoted L4 checksum valid (when quoted) for
/// them and for the quoted address change `addr_acc`, and folds every
/// change into the ICMP checksum.
#[inline(always)]
fn quoted_ports(
    ctx: &TcContext,
    icmp_check: usize,
    ports_off: usize,
    ports: &Ports,
    proto: u8,
    rev: &CtEntry,
    addr_acc: u32,
) -> Result<(), ()> {
    ctx.l4_csum_replace(icmp_check, ports.dst as u64, rev.port as u64, CSUM_SIZE_2).map_err(drop)?;
    ctx.l4_csum_replace(icmp_check, ports.src as u64, rev.client_port as u64, CSUM_SIZE_2).map_err(drop)?;
    let mut acc = csum::diff16(addr_acc, u16::from_be(ports.dst), u16::from_be(rev.port));
    acc = csum::diff16(acc, u16::from_be(ports.src), u16::from_be(rev.client_port));
    let off = l4_check_offset(ports_off, proto);
    if let Ok(old) = ctx.load::<u16>(off)
        && !(proto == IPPROTO_UDP && old == 0)
    {
        let new = csum::apply(u16::from_be(old), acc).to_be();
        ctx.l4_csum_replace(icmp_check, old as u64, new as u64, CSUM_SIZE_2).map_err(drop)?;
        ctx.store(off, &new, 0).map_err(drop)?;
    }
    ctx.store(ports_off, &rev.client_port, 0).map_err(drop)?;
    ctx.store(ports_off + 2, &rev.port, 0).map_err(drop)
}

/// Lowers the MSS a pod's SYN-ACK announces so that the client's segments
/// still fit the fabric when another node encapsulates them here (the
/// client may reach this node through any node).
#[inline(always)]
fn clamp_mss(ctx: &TcContext, l4: usize, v4: bool) {
    let Some(fabric) = FABRIC.get(0) else { return };
    let mss = if v4 { fabric.mss4 } else { fabric.mss6 };
    if mss == 0 || ctx.load::<u8>(l4 + TCP_FLAGS_OFFSET).unwrap_or(0) & TCP_SYN == 0 {
        return;
    }
    let Ok(doff) = ctx.load::<u8>(l4 + TCP_DOFF_OFFSET) else { return };
    let end = l4 + (doff >> 4) as usize * 4;
    let mut off = l4 + TCP_MIN_HLEN;
    for _ in 0..10 {
        if off + 4 > end {
            return;
        }
        let Ok([kind, len]) = ctx.load::<[u8; 2]>(off) else { return };
        match kind {
            0 => return,
            1 => off += 1,
            2 if len == 4 => break,
            _ if len < 2 => return,
            _ => off += len as usize,
        }
    }
    if off + 4 > end {
        return;
    }
    let at = off + 2;
    let Ok(old) = ctx.load::<[u8; 2]>(at) else { return };
    if u16::from_be_bytes(old) <= mss {
        return;
    }
    let new = mss.to_be_bytes();
    // A field at an odd offset straddles two checksum words: its bytes swap.
    let (from, to) = if (at - l4) & 1 == 0 {
        (u16::from_ne_bytes(old), u16::from_ne_bytes(new))
    } else {
        (u16::from_ne_bytes([old[1], old[0]]), u16::from_ne_bytes([new[1], new[0]]))
    };
    if ctx.l4_csum_replace(l4 + TCP_CSUM_OFFSET, from as u64, to as u64, CSUM_SIZE_2).is_ok()
        && ctx.store(at, &new, 0).is_ok()
    {
        event(CtEvent::MssClamped);
    }
}

/// Checksum difference between two 16-byte addresses, for the csum helpers.
#[inline(always)]
fn addr_diff(old: &Addr, new: &Addr) -> Result<u64, ()> {
    let mut from = *old;
    let mut to = *new;
    let diff = unsafe { bpf_csum_diff(from.as_mut_ptr().cast(), 16, to.as_mut_ptr().cast(), 16, 0) };
    if diff < 0 { Err(()) } else { Ok(diff as u64) }
}

/// The L4 header offset and protocol of an IPv6 packet, past hop-by-hop,
/// routing and destination options headers; `None` for a fragment (IPv6
/// fragments are not translated) or too many extension headers.
#[inline(always)]
fn ipv6_l4(ctx: &TcContext, off: usize, first: u8) -> Option<(usize, u8)> {
    let mut next = first;
    let mut l4 = off + IPV6_HLEN;
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        match next {
            IPV6_HDR_HOPOPTS | IPV6_HDR_ROUTING | IPV6_HDR_DSTOPTS => {
                let ext: [u8; 2] = ctx.load(l4).ok()?;
                next = ext[0];
                l4 += (ext[1] as usize + 1) * 8;
                if l4 > MAX_L4_OFFSET {
                    return None;
                }
            }
            IPV6_HDR_FRAGMENT => return None,
            _ => return Some((l4, next)),
        }
    }
    None
}

// Out of line: the two families share the stack below `translate`.
#[inline(never)]
fn reply6(ctx: &TcContext, off: usize) -> Result<Verdict, ()> {
    let ip: Ipv6Hdr = ctx.load(off).map_err(drop)?;
    let Some((l4, proto)) = ipv6_l4(ctx, off, ip.next_hdr) else { return Ok(Verdict::EgressPass) };
    match proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let ports: Ports = ctx.load(l4).map_err(drop)?;
            let key = reply_key(&ip.src, ports.src, &ip.dst, ports.dst, proto);
            let rev = match reply_connection(&key, &tcp_info(ctx, l4, proto)) {
                Ok(Some(rev)) => rev,
                Ok(None) => return Ok(Verdict::EgressPass),
                Err(verdict) => return Ok(verdict),
            };
            let udp = proto == IPPROTO_UDP;
            let mangled = if udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
            let check_off = l4_check_offset(l4, proto);
            let diff = addr_diff(&ip.src, &rev.addr)?;
            ctx.l4_csum_replace(check_off, 0, diff, BPF_F_PSEUDO_HDR as u64 | mangled).map_err(drop)?;
            reply_ports(ctx, l4, &ports, &rev, check_off, mangled, true)?;
            ctx.store(off + IPV6_SRC, &rev.addr, 0).map_err(drop)?;
            if proto == IPPROTO_TCP {
                clamp_mss(ctx, l4, false);
            }
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
    let key = reply_key(&inner.dst, ports.dst, &inner.src, ports.src, inner.next_hdr);
    // SAFETY: copied out at once.
    let Some(rev) = conntrack::lookup(&key).map(|(_, rev)| unsafe { *rev }) else { return Ok(Verdict::EgressPass) };
    let icmp_check = l4 + ICMP_CSUM_OFFSET;
    let inner_diff = addr_diff(&inner.dst, &rev.addr)?;
    ctx.l4_csum_replace(icmp_check, 0, inner_diff, 0).map_err(drop)?;
    quoted_ports(ctx, icmp_check, ports_off, &ports, inner.next_hdr, &rev, csum::diff_addr16(0, &inner.dst, &rev.addr))?;
    ctx.store(inner_off + IPV6_DST, &rev.addr, 0).map_err(drop)?;
    if addr_eq(&ip.src, &inner.dst) {
        let outer_diff = addr_diff(&ip.src, &rev.addr)?;
        ctx.l4_csum_replace(icmp_check, 0, outer_diff, BPF_F_PSEUDO_HDR as u64).map_err(drop)?;
        ctx.store(off + IPV6_SRC, &rev.addr, 0).map_err(drop)?;
    }
    Ok(Verdict::IcmpErrorTranslated)
}
