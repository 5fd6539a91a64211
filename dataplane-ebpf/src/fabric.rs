//! Pods on other nodes. A packet for a pod on another node is encapsulated
//! (outer IPv4 + UDP, GUE variant 1: the UDP payload is the IP packet
//! itself, as Katran's GUE mode) and sent to that node, found with
//! `bpf_fib_lookup`; that node strips the outer headers, translates to its
//! pod, owns the connection and answers the client directly (DSR). The
//! kernels we run on have no ipip/gre/geneve devices, so both ends are done
//! here. MSS clamping keeps TCP segments within the fabric MTU once
//! encapsulated.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibLookup,
        xdp_action::{XDP_DROP, XDP_TX},
    },
    helpers::{bpf_csum_diff, bpf_fib_lookup, bpf_redirect, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use serviceless_common::{
    CtEvent, ENCAP_OVERHEAD, Fabric, IPPROTO_UDP, NODE_F_PRESENT, TCP_SYN, Verdict, as_ipv4, csum,
};

use crate::{
    ingress::pack,
    maps::{FABRIC, NEXT_HOPS, NODES, NextHop, event},
    nat::set_check,
    packet::*,
    parse::Parsed,
};

const AF_INET: u8 = 2;
const IPV4_DF: u16 = 0x4000;
/// Where the inner IP packet starts in an encapsulated frame.
pub const INNER_L3: usize = ETH_HLEN + 20 + UDP_HLEN;

/// Whether an IPv4 packet (already known to be addressed to this node, with
/// a 20-byte header at `ETH_HLEN`) is our encapsulation: UDP to the
/// encapsulation port, not fragmented.
#[inline(always)]
pub fn is_tunnel(ctx: &XdpContext, ip: &Ipv4Hdr, fabric: &Fabric) -> bool {
    if ip.proto != IPPROTO_UDP || ip.version_ihl != 0x45 || be16(ip.frag_off) & 0x3fff != 0 {
        return false;
    }
    match ptr_at::<Ports>(ctx, ETH_HLEN + 20) {
        // SAFETY: bounds checked by ptr_at.
        Ok(ports) => unsafe { (*ports).dst == fabric.encap_port },
        Err(()) => false,
    }
}

/// Strips the outer IPv4 and UDP headers in front of an inner IPv4 or IPv6
/// packet (the Ethernet header is kept, with the inner EtherType).
#[inline(always)]
pub fn decapsulate(ctx: &XdpContext) -> Result<(), ()> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    let outer = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN)?;
    let first = ptr_at::<u8>(ctx, INNER_L3)?;
    // SAFETY: bounds checked by ptr_at.
    let (dst, src, total, version) = unsafe { ((*eth).dst, (*eth).src, be16((*outer).tot_len) as usize, *first >> 4) };
    if total < INNER_L3 - ETH_HLEN || ETH_HLEN + total > ctx.data_end() - ctx.data() {
        return Err(());
    }
    let ether_type = match version {
        4 => ETH_P_IP,
        6 => ETH_P_IPV6,
        _ => return Err(()),
    };
    let new_eth = ptr_at::<EthHdr>(ctx, INNER_L3 - ETH_HLEN)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { *new_eth = EthHdr { dst, src, ether_type } };
    // SAFETY: shrinks the headroom side of our own frame.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, (INNER_L3 - ETH_HLEN) as i32) } != 0 {
        return Err(());
    }
    Ok(())
}

/// Encapsulates the packet to node `node` and sends it there. Returns the
/// packed (verdict, action). Nothing is remembered: the other node owns the
/// connection, so any node may forward its next packet.
#[inline(never)]
pub fn encapsulate_call(ctx: &XdpContext, fabric: &Fabric, p: &Parsed, node: u16, now: u64) -> u64 {
    match encapsulate(ctx, p, node, now) {
        Ok(action) => pack(Verdict::EncapForwarded, action),
        Err(Verdict::EncapTooBig) => pack(Verdict::EncapTooBig, too_big(ctx, fabric, p).unwrap_or(XDP_DROP)),
        Err(verdict) => pack(verdict, XDP_DROP),
    }
}

/// Bytes of the offending packet an ICMP "too big" error quotes: its IP
/// header and the start of its payload (ports and sequence numbers), which
/// is what the sender's stack needs to find the connection.
const QUOTE: usize = 64;
const ICMP_HLEN: usize = 8;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;

#[repr(C)]
struct IcmpHdr {
    kind: u8,
    code: u8,
    check: [u8; 2],
    /// Unused/next-hop MTU (IPv4), MTU (IPv6).
    rest: [u8; 4],
}

/// The IPv4 address of an IPv4-mapped address (no checks: the caller knows the family).
#[inline(always)]
fn ipv4_of(addr: &serviceless_common::Addr) -> [u8; 4] {
    [addr[12], addr[13], addr[14], addr[15]]
}

/// Answers a packet too big to encapsulate with ICMP "fragmentation
/// needed" (IPv4, when the packet forbids fragmenting; a packet that allows
/// it is dropped: XDP cannot fragment) or ICMPv6 "packet too big", from the
/// VIP, advertising the MTU left after encapsulation (RFC 1191, RFC 8201),
/// so the client lowers its path MTU instead of retransmitting into a black
/// hole. Rewrites the frame in place; returns XDP_TX.
#[inline(never)]
fn too_big(ctx: &XdpContext, fabric: &Fabric, p: &Parsed) -> Result<u32, ()> {
    if p.l3() != ETH_HLEN || p.ip_end() - p.l3() < QUOTE {
        return Err(());
    }
    let (dst, src) = {
        let eth = ptr_at::<EthHdr>(ctx, 0)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { ((*eth).src, (*eth).dst) }
    };
    let mtu = fabric.mtu.saturating_sub(ENCAP_OVERHEAD);
    let ip_hlen = if p.v4 { 20 } else { IPV6_HLEN };
    if p.v4 {
        let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN)?;
        // SAFETY: bounds checked by ptr_at.
        if unsafe { be16((*ip).frag_off) } & IPV4_DF == 0 {
            return Err(());
        }
    }
    // Make room for the new IP and ICMP headers in front of the quote.
    let grow = (ip_hlen + ICMP_HLEN) as i32;
    // SAFETY: grows our own frame at its head; pointers are re-derived below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -grow) } != 0 {
        return Err(());
    }
    let quote_at = ETH_HLEN + ip_hlen + ICMP_HLEN;
    let total = quote_at + QUOTE;
    // SAFETY: shrinks the frame to the error message.
    let len = unsafe { aya_ebpf::helpers::bpf_xdp_get_buff_len(ctx.ctx) } as i32;
    if unsafe { aya_ebpf::helpers::bpf_xdp_adjust_tail(ctx.ctx, total as i32 - len) } != 0 {
        return Err(());
    }
    // The helper sums the quote in place (an unrolled 64-byte sum would
    // take the whole stack). It adds native-order 32-bit words; folded and
    // byte-swapped, that is the sum of big-endian 16-bit words.
    let quote = ptr_at::<[u8; QUOTE]>(ctx, quote_at)?;
    // SAFETY: a readable packet range of QUOTE bytes.
    let native = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, quote.cast(), QUOTE as u32, 0) };
    if native < 0 {
        return Err(());
    }
    let quoted_sum = csum::fold(native as u32).swap_bytes() as u32;
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { *eth = EthHdr { dst, src, ether_type: if p.v4 { ETH_P_IP } else { ETH_P_IPV6 } } };
    let icmp_len = (ICMP_HLEN + QUOTE) as u16;
    let icmp = ptr_at::<IcmpHdr>(ctx, ETH_HLEN + ip_hlen)?;
    if p.v4 {
        let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN)?;
        let (vip, client) = (ipv4_of(&p.dst), ipv4_of(&p.src));
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            *ip = Ipv4Hdr {
                version_ihl: 0x45,
                tos: 0,
                tot_len: (20 + icmp_len).to_be_bytes(),
                id: [0, 0],
                frag_off: [0, 0],
                ttl: 64,
                proto: IPPROTO_ICMP,
                check: [0, 0],
                src: vip,
                dst: client,
            };
            let bytes: &[u8; 20] = &*ip.cast();
            (*ip).check = (!csum::fold(csum::add_words(0, bytes))).to_be_bytes();
            // Destination unreachable, fragmentation needed, next-hop MTU.
            *icmp = IcmpHdr { kind: 3, code: 4, check: [0, 0], rest: [0, 0, (mtu >> 8) as u8, mtu as u8] };
            let sum = csum::add_words(quoted_sum, &*icmp.cast::<[u8; ICMP_HLEN]>());
            (*icmp).check = (!csum::fold(sum)).to_be_bytes();
        }
    } else {
        let ip = ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            *ip = Ipv6Hdr {
                vtc_flow: [0x60, 0, 0, 0],
                payload_len: icmp_len.to_be_bytes(),
                next_hdr: IPPROTO_ICMPV6,
                hop_limit: 64,
                src: p.dst,
                dst: p.src,
            };
            // Packet too big, MTU; the checksum covers the pseudo-header.
            *icmp = IcmpHdr { kind: 2, code: 0, check: [0, 0], rest: (mtu as u32).to_be_bytes() };
            let mut sum = csum::add_words(quoted_sum, &*icmp.cast::<[u8; ICMP_HLEN]>());
            sum = csum::add_words(sum, &p.dst);
            sum = csum::add_words(sum, &p.src);
            sum += icmp_len as u32 + IPPROTO_ICMPV6 as u32;
            (*icmp).check = (!csum::fold(sum)).to_be_bytes();
        }
    }
    Ok(XDP_TX)
}

// Out of line, as `too_big`: the two share the stack below their caller.
#[inline(never)]
fn encapsulate(ctx: &XdpContext, p: &Parsed, node: u16, now: u64) -> Result<u32, Verdict> {
    // Looked up here, not passed: a fifth argument would not fit a BPF call.
    let Some(fabric) = FABRIC.get(0) else { return Err(Verdict::DropEncapNoRoute) };
    let Some(peer) = NODES.get(node as u32).filter(|n| n.flags & NODE_F_PRESENT != 0) else {
        return Err(Verdict::DropEncapNoRoute);
    };
    let Some(peer4) = as_ipv4(&peer.addr) else { return Err(Verdict::DropEncapNoRoute) };
    let l3 = p.l3();
    let inner_len = p.ip_end() - l3;
    let outer_len = (inner_len + ENCAP_OVERHEAD as usize) as u16;
    // Source-port entropy, so the fabric and the other node's NIC spread
    // flows over paths and receive queues (as GUE and VXLAN do).
    let (a, b) = serviceless_common::addr_words(&p.src);
    let mix = a ^ b ^ ((p.sport as u64) << 16) ^ p.dport as u64;
    let sport = ((mix ^ (mix >> 32) ^ (mix >> 16)) as u16 | 0xc000).to_be();
    if outer_len > fabric.mtu {
        return Err(Verdict::EncapTooBig);
    }
    let hop = next_hop(ctx, fabric, node, peer4, sport, outer_len, now)?;
    // SAFETY: grows the frame at its head; every pointer is re-derived below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, l3 as i32 - INNER_L3 as i32) } != 0 {
        return Err(Verdict::DropEncapNoRoute);
    }
    let hdr = ptr_at::<[u8; INNER_L3]>(ctx, 0).map_err(|()| Verdict::DropEncapNoRoute)?;
    // SAFETY: bounds checked by ptr_at.
    let hdr = unsafe { &mut *hdr };
    hdr[0..6].copy_from_slice(&hop.dmac);
    hdr[6..12].copy_from_slice(&hop.smac);
    hdr[12..14].copy_from_slice(&ETH_P_IP.to_ne_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&outer_len.to_be_bytes());
    ip[6..8].copy_from_slice(&IPV4_DF.to_be_bytes());
    ip[8] = 64;
    ip[9] = IPPROTO_UDP;
    ip[12..16].copy_from_slice(&fabric.node4);
    ip[16..20].copy_from_slice(&peer4);
    let check = !csum::fold(csum::add_words(0, &ip));
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    hdr[ETH_HLEN..ETH_HLEN + 20].copy_from_slice(&ip);
    let udp = ETH_HLEN + 20;
    hdr[udp..udp + 2].copy_from_slice(&sport.to_ne_bytes());
    hdr[udp + 2..udp + 4].copy_from_slice(&fabric.encap_port.to_ne_bytes());
    hdr[udp + 4..udp + 6].copy_from_slice(&(outer_len - 20).to_be_bytes());
    // A zero UDP checksum over IPv4: the inner packet carries its own.
    hdr[udp + 6..udp + 8].copy_from_slice(&[0, 0]);
    // SAFETY: reading our own context.
    if hop.ifindex == unsafe { (*ctx.ctx).ingress_ifindex } {
        Ok(XDP_TX)
    } else {
        // SAFETY: a plain helper call.
        Ok(unsafe { bpf_redirect(hop.ifindex, 0) } as u32)
    }
}

/// How long a node's next hop found by `bpf_fib_lookup` is reused: a
/// route or neighbour change reaches encapsulated traffic within this.
const NEXT_HOP_TTL_NS: u64 = 1_000_000_000;

/// The next hop towards node `node` (at `peer`): this CPU's copy from the
/// last second, else a fresh `bpf_fib_lookup` (also the MTU check of the
/// route), remembered for the next packets.
#[inline(always)]
fn next_hop(ctx: &XdpContext, fabric: &Fabric, node: u16, peer: [u8; 4], sport: u16, outer_len: u16, now: u64) -> Result<NextHop, Verdict> {
    let cached = NEXT_HOPS.get_ptr_mut(node as u32);
    if let Some(hop) = cached
        // SAFETY: this CPU's slot.
        && let hop = unsafe { *hop }
        && hop.peer == peer
        && now < hop.expires_ns
    {
        return Ok(hop);
    }
    // SAFETY: an all-zero request is valid; the helper fills in the answer.
    let mut fib: FibLookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = IPPROTO_UDP;
    fib.sport = sport;
    fib.dport = fabric.encap_port;
    fib.__bindgen_anon_1.tot_len = outer_len;
    // SAFETY: reading our own context.
    fib.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(fabric.node4);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(peer);
    // SAFETY: a helper call on our own context and a stack buffer of the given size.
    let rc = unsafe {
        bpf_fib_lookup(ctx.ctx.cast(), &mut fib, core::mem::size_of::<FibLookup>() as i32, 0)
    } as u32;
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        BPF_FIB_LKUP_RET_NO_NEIGH => return Err(Verdict::DropEncapNoNeighbour),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => return Err(Verdict::EncapTooBig),
        _ => return Err(Verdict::DropEncapNoRoute),
    }
    let hop = NextHop { dmac: fib.dmac, smac: fib.smac, peer, ifindex: fib.ifindex, expires_ns: now + NEXT_HOP_TTL_NS };
    if let Some(slot) = cached {
        // SAFETY: this CPU's slot.
        unsafe { *slot = hop };
    }
    Ok(hop)
}

/// The TCP header's options: where the MSS value is, if it has one.
/// Bounded scan (at most 10 options in 40 bytes), starting past the fixed
/// header at `l4` of a header `doff` bytes long.
#[inline(always)]
fn find_mss(ctx: &XdpContext, l4: usize, doff: usize) -> Option<usize> {
    let end = l4 + doff;
    let mut off = l4 + TCP_MIN_HLEN;
    for _ in 0..10 {
        // Bounded for the verifier (a no-op: off < end <= l4 + 60).
        off &= 0x3ff;
        if off + 1 >= end {
            return None;
        }
        let opt = ptr_at::<[u8; 2]>(ctx, off).ok()?;
        // SAFETY: bounds checked by ptr_at.
        let [kind, len] = unsafe { *opt };
        match kind {
            0 => return None,
            1 => off += 1,
            _ => {
                if len < 2 {
                    return None;
                }
                if kind == 2 {
                    return (len == 4 && off + 4 <= end).then_some(off + 2);
                }
                off += len as usize;
            }
        }
    }
    None
}

/// Lowers the MSS option of a TCP SYN (or SYN-ACK) at `p.l4()` to `mss`,
/// fixing the TCP checksum. True if it changed.
#[inline(never)]
pub fn clamp_mss_call(ctx: &XdpContext, p: &Parsed, mss: u16) -> bool {
    clamp_mss(ctx, p, mss).unwrap_or(false)
}

#[inline(always)]
fn clamp_mss(ctx: &XdpContext, p: &Parsed, mss: u16) -> Result<bool, ()> {
    if p.tcp_flags & TCP_SYN == 0 {
        return Ok(false);
    }
    let l4 = p.l4();
    if l4 > MAX_L4_OFFSET {
        return Err(());
    }
    let tcp = ptr_at::<TcpHdr>(ctx, l4)?;
    // SAFETY: bounds checked by ptr_at.
    let doff = unsafe { ((*tcp).doff >> 4) as usize * 4 };
    let Some(at) = find_mss(ctx, l4, doff) else { return Ok(false) };
    let value = ptr_at::<[u8; 2]>(ctx, at & 0x3ff)?;
    // SAFETY: bounds checked by ptr_at.
    let old = unsafe { *value };
    if be16(old) <= mss {
        return Ok(false);
    }
    let new = mss.to_be_bytes();
    // SAFETY: bounds checked by ptr_at (`tcp` covers the fixed header).
    unsafe {
        *value = new;
        set_check(&mut (*tcp).check, mss_diff(at - l4, old, new));
    }
    event(CtEvent::MssClamped);
    Ok(true)
}

/// Checksum change for a 16-bit field at byte offset `rel` of the TCP
/// header. A field at an odd offset straddles two checksum words, which
/// amounts to its bytes swapped.
#[inline(always)]
pub fn mss_diff(rel: usize, old: [u8; 2], new: [u8; 2]) -> u32 {
    if rel & 1 == 0 {
        csum::diff16(0, be16(old), be16(new))
    } else {
        csum::diff16(0, u16::from_le_bytes(old), u16::from_le_bytes(new))
    }
}

/// Sends an IPv4 packet (already rewritten: from `src` to `dst`) to its
/// next hop itself, found with `bpf_fib_lookup`: source-translated packets
/// to pods on other nodes, and their replies back to clients. (The stack
/// would drop the former, from one of its own addresses, and may drop the
/// latter, from a VIP it has no route for.) Returns the packed
/// (`verdict`, action), or `DropNoNextHop` and XDP_DROP.
#[inline(never)]
pub fn send_call(ctx: &XdpContext, src: [u8; 4], dst: [u8; 4], ip_len: u16, verdict: Verdict) -> u64 {
    match send(ctx, src, dst, ip_len) {
        Ok(action) => pack(verdict, action),
        Err(verdict) => pack(verdict, XDP_DROP),
    }
}

#[inline(always)]
fn send(ctx: &XdpContext, src: [u8; 4], dst: [u8; 4], ip_len: u16) -> Result<u32, Verdict> {
    // SAFETY: an all-zero request is valid; the helper fills in the answer.
    let mut fib: FibLookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.__bindgen_anon_1.tot_len = ip_len;
    // SAFETY: reading our own context.
    fib.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    // SAFETY: a helper call on our own context and a stack buffer of the given size.
    let rc = unsafe { bpf_fib_lookup(ctx.ctx.cast(), &mut fib, core::mem::size_of::<FibLookup>() as i32, 0) } as u32;
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        return Err(Verdict::DropNoNextHop);
    }
    let eth = ptr_at::<EthHdr>(ctx, 0).map_err(|()| Verdict::DropNoNextHop)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*eth).dst = fib.dmac;
        (*eth).src = fib.smac;
    }
    // SAFETY: reading our own context.
    if fib.ifindex == unsafe { (*ctx.ctx).ingress_ifindex } {
        Ok(XDP_TX)
    } else {
        // SAFETY: a plain helper call.
        Ok(unsafe { bpf_redirect(fib.ifindex, 0) } as u32)
    }
}
