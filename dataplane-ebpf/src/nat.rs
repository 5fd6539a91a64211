//! Packet rewrites in XDP: destination NAT with incremental checksums, and
//! a TCP RST answered in place (XDP_TX) for segments of connections that do
//! not exist (any more).

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_TX},
    helpers::{bpf_xdp_adjust_tail, bpf_xdp_get_buff_len},
    programs::XdpContext,
};
use serviceless_common::{
    Addr, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, as_ipv4, csum,
};

use crate::{
    packet::*,
    parse::{Frag, Parsed},
};

#[inline(always)]
pub fn set_check(check: &mut [u8; 2], acc: u32) {
    *check = csum::apply(be16(*check), acc).to_be_bytes();
}

/// Rewrites the destination to `addr:port` and the source port to
/// `client_port` (when it differs), fixing the IP and L4 checksums. A later
/// fragment has no L4 header: only its address changes.
#[inline(always)]
pub fn dnat(ctx: &XdpContext, p: &Parsed, addr: &Addr, port: u16, client_port: u16) -> Result<(), ()> {
    let acc = if p.v4 {
        let new4 = as_ipv4(addr).ok_or(())?;
        let ip = ptr_at::<Ipv4Hdr>(ctx, p.l3())?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &mut *ip };
        let acc = csum::diff_addr4(0, ip.dst, new4);
        set_check(&mut ip.check, acc);
        ip.dst = new4;
        acc
    } else {
        let ip = ptr_at::<Ipv6Hdr>(ctx, p.l3())?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &mut *ip };
        let acc = csum::diff_addr16(0, &ip.dst, addr);
        ip.dst = *addr;
        acc
    };
    if p.frag == Frag::Later || (p.proto != IPPROTO_TCP && p.proto != IPPROTO_UDP) {
        return Ok(());
    }
    if p.l4() > MAX_L4_OFFSET {
        return Err(());
    }
    let udp = p.proto == IPPROTO_UDP;
    let ports = ptr_at::<Ports>(ctx, p.l4())?;
    let check = ptr_at::<[u8; 2]>(ctx, p.l4() + if udp { UDP_CSUM_OFFSET } else { TCP_CSUM_OFFSET })?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        let old_dport = (*ports).dst;
        let old_sport = (*ports).src;
        (*ports).dst = port;
        (*ports).src = client_port;
        let old = be16(*check);
        // IPv4 UDP may omit its checksum (zero); IPv6 UDP may not.
        if udp && p.v4 && old == 0 {
            return Ok(());
        }
        let mut acc = csum::diff16(acc, u16::from_be(old_dport), u16::from_be(port));
        acc = csum::diff16(acc, u16::from_be(old_sport), u16::from_be(client_port));
        let mut new = csum::apply(old, acc);
        if udp && new == 0 {
            new = 0xffff;
        }
        *check = new.to_be_bytes();
    }
    Ok(())
}

/// Answers a TCP segment with a RST from the address it was sent to (the
/// VIP), as the host would for a connection it does not have (RFC 9293
/// 3.10.7.1): the client learns at once, instead of retransmitting into a
/// pod that never accepted the connection. Returns the XDP action.
#[inline(always)]
pub fn answer_rst(ctx: &XdpContext, p: &Parsed) -> Result<u32, ()> {
    if p.tcp_flags & TCP_RST != 0 {
        return Ok(XDP_DROP);
    }
    let (hlen, tcp_off) = if p.v4 { (20, p.l3() + 20) } else { (IPV6_HLEN, p.l3() + IPV6_HLEN) };
    // IPv4 options and IPv6 extension headers: not worth echoing; drop.
    if p.l4() != tcp_off || p.l3() > ETH_HLEN + 4 {
        return Ok(XDP_DROP);
    }
    let tcp = ptr_at::<TcpHdr>(ctx, tcp_off)?;
    // SAFETY: bounds checked by ptr_at.
    let tcp = unsafe { &mut *tcp };
    let doff = (tcp.doff >> 4) as u32 * 4;
    let payload = (p.ip_end() - p.l4()) as u32 - doff;
    let (seq, ack, flags) = if p.tcp_flags & TCP_ACK != 0 {
        (u32::from_be_bytes(tcp.ack), 0, TCP_RST)
    } else {
        let mut len = payload;
        if p.tcp_flags & TCP_SYN != 0 {
            len += 1;
        }
        if p.tcp_flags & TCP_FIN != 0 {
            len += 1;
        }
        (0, u32::from_be_bytes(tcp.seq).wrapping_add(len), TCP_RST | TCP_ACK)
    };
    let (sport, dport) = (tcp.sport, tcp.dport);
    tcp.sport = dport;
    tcp.dport = sport;
    tcp.seq = seq.to_be_bytes();
    tcp.ack = ack.to_be_bytes();
    tcp.doff = 5 << 4;
    tcp.flags = flags;
    tcp.window = [0, 0];
    tcp.check = [0, 0];
    tcp.urg = [0, 0];
    // SAFETY: a TcpHdr is 20 plain bytes.
    let tcp_bytes: &[u8; 20] = unsafe { &*(tcp as *const TcpHdr).cast() };
    let mut sum = csum::add_words(0, tcp_bytes);
    sum += IPPROTO_TCP as u32 + 20;
    if p.v4 {
        let ip = ptr_at::<Ipv4Hdr>(ctx, p.l3())?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &mut *ip };
        let (src, dst) = (ip.src, ip.dst);
        ip.src = dst;
        ip.dst = src;
        ip.version_ihl = 0x45;
        ip.tos = 0;
        ip.tot_len = 40u16.to_be_bytes();
        ip.id = [0, 0];
        ip.frag_off = 0x4000u16.to_be_bytes();
        ip.ttl = 64;
        ip.proto = IPPROTO_TCP;
        ip.check = [0, 0];
        // SAFETY: an Ipv4Hdr is 20 plain bytes.
        let ip_bytes: &[u8; 20] = unsafe { &*(ip as *const Ipv4Hdr).cast() };
        ip.check = (!csum::fold(csum::add_words(0, ip_bytes))).to_be_bytes();
        sum = csum::add_words(sum, &src);
        sum = csum::add_words(sum, &dst);
    } else {
        let ip = ptr_at::<Ipv6Hdr>(ctx, p.l3())?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &mut *ip };
        let (src, dst) = (ip.src, ip.dst);
        ip.src = dst;
        ip.dst = src;
        ip.vtc_flow = [0x60, 0, 0, 0];
        ip.payload_len = 20u16.to_be_bytes();
        ip.next_hdr = IPPROTO_TCP;
        ip.hop_limit = 64;
        sum = csum::add_words(sum, &src);
        sum = csum::add_words(sum, &dst);
    }
    let tcp = ptr_at::<TcpHdr>(ctx, tcp_off)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { (*tcp).check = (!csum::fold(sum)).to_be_bytes() };
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        let (src, dst) = ((*eth).src, (*eth).dst);
        (*eth).src = dst;
        (*eth).dst = src;
    }
    let keep = (p.l3() + hlen + 20) as i32;
    // SAFETY: plain helper calls on our context. (The length comes from the
    // helper: the verifier allows no arithmetic on the packet-end pointer.)
    let len = unsafe { bpf_xdp_get_buff_len(ctx.ctx) } as i32;
    // SAFETY: shrinks the frame to the headers just written.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, keep - len) } != 0 {
        return Err(());
    }
    Ok(XDP_TX)
}

/// An IPv4 endpoint: address and port (network order).
pub type Endpoint4 = ([u8; 4], u16);

/// Rewrites an IPv4 packet's source and/or destination endpoint (address
/// and port), fixing the IP and L4 checksums (the L4 one covers both
/// through the pseudo-header). Used by source translation, where XDP sends
/// the packet itself (the stack would drop a packet from its own address).
#[inline(always)]
pub fn rewrite4(ctx: &XdpContext, p: &Parsed, src: Option<Endpoint4>, dst: Option<Endpoint4>) -> Result<(), ()> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, p.l3())?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &mut *ip };
    let mut acc = 0;
    if let Some((addr, _)) = src {
        acc = csum::diff_addr4(acc, ip.src, addr);
        ip.src = addr;
    }
    if let Some((addr, _)) = dst {
        acc = csum::diff_addr4(acc, ip.dst, addr);
        ip.dst = addr;
    }
    set_check(&mut ip.check, acc);
    if p.frag == Frag::Later || (p.proto != IPPROTO_TCP && p.proto != IPPROTO_UDP) {
        return Ok(());
    }
    if p.l4() > MAX_L4_OFFSET {
        return Err(());
    }
    let udp = p.proto == IPPROTO_UDP;
    let ports = ptr_at::<Ports>(ctx, p.l4())?;
    let check = ptr_at::<[u8; 2]>(ctx, p.l4() + if udp { UDP_CSUM_OFFSET } else { TCP_CSUM_OFFSET })?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        if let Some((_, port)) = src {
            acc = csum::diff16(acc, u16::from_be((*ports).src), u16::from_be(port));
            (*ports).src = port;
        }
        if let Some((_, port)) = dst {
            acc = csum::diff16(acc, u16::from_be((*ports).dst), u16::from_be(port));
            (*ports).dst = port;
        }
        let old = be16(*check);
        // IPv4 UDP may omit its checksum (zero).
        if udp && old == 0 {
            return Ok(());
        }
        let mut new = csum::apply(old, acc);
        if udp && new == 0 {
            new = 0xffff;
        }
        *check = new.to_be_bytes();
    }
    Ok(())
}
