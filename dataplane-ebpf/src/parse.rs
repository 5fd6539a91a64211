//! Ingress parsing: Ethernet (+ one VLAN tag), IPv4 (options, fragments)
//! or IPv6 (extension headers), then TCP/UDP/ICMP. Every length is checked
//! against the IP header's own length, not only against the frame end
//! (Ethernet pads short frames), so a truncated or inconsistent header is
//! reported as malformed and never rewritten or tracked.

use aya_ebpf::programs::XdpContext;
use serviceless_common::{Addr, Config, FABRIC_F_ENCAP, FABRIC_F_SNAT, Fabric, IPPROTO_TCP, IPPROTO_UDP, ipv4_mapped};

use crate::{fabric, packet::*};

/// What the ingress path needs to know about a packet to a VIP.
pub struct Parsed {
    pub v4: bool,
    /// Offset of the IP header.
    l3: u16,
    /// Offset of the L4 header.
    l4: u16,
    /// Offset of the end of the IP packet (frame padding excluded).
    ip_end: u16,
    pub proto: u8,
    pub src: Addr,
    pub dst: Addr,
    /// Network order (zero for ICMP and later fragments).
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte (zero for UDP).
    pub tcp_flags: u8,
    /// TCP acknowledgment number (host order; zero for UDP).
    pub tcp_ack: u32,
    /// TCP sequence number (host order; zero for UDP).
    pub tcp_seq: u32,
    /// IPv4 fragmentation.
    pub frag: Frag,
    /// IPv4 identification, network order (for fragments).
    pub ip_id: u16,
    /// Another node encapsulated it here (set after parsing the inner packet).
    pub tunneled: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    None,
    /// Offset 0 with more fragments: carries the L4 header.
    First,
    /// Offset > 0: no L4 header.
    Later,
    /// An IPv6 fragment header (not translated; see the README).
    V6,
}

// This struct lives in a map (the per-CPU scratch), and a value read back
// from a map is unknown to the verifier. The header offsets are masked to
// their largest possible values on the way out (a no-op for every value
// `parse` stores: l3 <= 18, l4 <= MAX_L4_OFFSET), which bounds them for
// packet-pointer arithmetic on every kernel: 6.1's verifier forgets bounds
// learned by a comparison when the compiler reloads the value from the
// stack, and accepts a variable packet offset only well below 64 KiB.
const L3_MASK: u16 = 0x1f;
const L4_MASK: u16 = 0x3ff;
const _: () = assert!(ETH_HLEN + 4 <= L3_MASK as usize && MAX_L4_OFFSET <= L4_MASK as usize);

impl Parsed {
    #[inline(always)]
    pub fn l3(&self) -> usize {
        (self.l3 & L3_MASK) as usize
    }

    #[inline(always)]
    pub fn l4(&self) -> usize {
        (self.l4 & L4_MASK) as usize
    }

    #[inline(always)]
    pub fn ip_end(&self) -> usize {
        self.ip_end as usize
    }

    /// Written once a packet is known to be for a VIP (never for
    /// pass-through traffic, which does not touch the scratch map).
    const EMPTY: Parsed = Parsed {
        v4: false,
        l3: 0,
        l4: 0,
        ip_end: 0,
        proto: 0,
        src: [0; 16],
        dst: [0; 16],
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        tcp_ack: 0,
        tcp_seq: 0,
        frag: Frag::None,
        ip_id: 0,
        tunneled: false,
    };
}

pub enum Parse {
    NotVip,
    Malformed,
    /// The packet is for a VIP; the out-parameter holds what was read.
    Vip,
    /// Encapsulated to this node by another (nothing read yet).
    Tunnel,
    /// TCP/UDP to this node's address (`--remote-mode snat`): perhaps a
    /// pod's reply to a translated connection (nothing read yet; see
    /// `snat_reply`).
    SnatReply,
}

/// Parses into `p` (an out-parameter: one copy on the stack, not several).
#[inline(always)]
pub fn parse(ctx: &XdpContext, cfg: &Config, fabric: &Fabric, p: &mut Parsed) -> Parse {
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Parse::Malformed;
    };
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut l3 = ETH_HLEN;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let Ok(vlan) = ptr_at::<VlanHdr>(ctx, l3) else {
            return Parse::Malformed;
        };
        ether_type = unsafe { (*vlan).ether_type };
        l3 += core::mem::size_of::<VlanHdr>();
    }
    if ether_type == ETH_P_IP {
        ipv4(ctx, cfg, fabric, l3, p)
    } else if ether_type == ETH_P_IPV6 {
        ipv6(ctx, cfg, l3, p)
    } else {
        Parse::NotVip
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, cfg: &Config, fabric: &Fabric, l3: usize, p: &mut Parsed) -> Parse {
    let Ok(ip) = ptr_at::<Ipv4Hdr>(ctx, l3) else {
        return Parse::Malformed;
    };
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let dst = ipv4_mapped(ip.dst);
    if !cfg.is_vip(&dst, true) {
        if fabric.flags & FABRIC_F_ENCAP != 0 && ip.dst == fabric.node4 && l3 == ETH_HLEN && fabric::is_tunnel(ctx, ip, fabric) {
            return Parse::Tunnel;
        }
        if fabric.flags & FABRIC_F_SNAT != 0 && ip.dst == fabric.node4 && (ip.proto == IPPROTO_TCP || ip.proto == IPPROTO_UDP) {
            return Parse::SnatReply;
        }
        return Parse::NotVip;
    }
    let ihl = (ip.version_ihl & 0x0f) as usize;
    let total = be16(ip.tot_len) as usize;
    let hdr_len = ihl * 4;
    if ip.version_ihl >> 4 != 4 || ihl < 5 || total < hdr_len {
        return Parse::Malformed;
    }
    // Ethernet may pad short frames, so the frame can exceed the IP length, never the reverse.
    if l3 + total > ctx.data_end() - ctx.data() {
        return Parse::Malformed;
    }
    let frag_off = be16(ip.frag_off);
    let frag = if frag_off & 0x1fff != 0 {
        Frag::Later
    } else if frag_off & 0x2000 != 0 {
        Frag::First
    } else {
        Frag::None
    };
    *p = Parsed::EMPTY;
    p.v4 = true;
    p.l3 = l3 as u16;
    p.l4 = (l3 + hdr_len) as u16;
    p.ip_end = (l3 + total) as u16;
    p.proto = ip.proto;
    p.src = ipv4_mapped(ip.src);
    p.dst = dst;
    p.frag = frag;
    p.ip_id = u16::from_ne_bytes(ip.id);
    if frag == Frag::Later {
        return Parse::Vip;
    }
    if l4_header(ctx, p).is_err() {
        return Parse::Malformed;
    }
    Parse::Vip
}

/// Reads a TCP/UDP packet to this node's address (a `Parse::SnatReply`)
/// into `p`: a plain IPv4 header (no options, no fragment) right after an
/// untagged Ethernet header, as a pod's reply is. False: anything else,
/// which is not a reply we translated.
#[inline(always)]
pub fn snat_reply(ctx: &XdpContext, p: &mut Parsed) -> bool {
    let Ok(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) else { return false };
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let total = be16(ip.tot_len) as usize;
    if ip.version_ihl != 0x45 || be16(ip.frag_off) & 0x3fff != 0 || total < 20 || ETH_HLEN + total > ctx.data_end() - ctx.data() {
        return false;
    }
    *p = Parsed::EMPTY;
    p.v4 = true;
    p.l3 = ETH_HLEN as u16;
    p.l4 = (ETH_HLEN + 20) as u16;
    p.ip_end = (ETH_HLEN + total) as u16;
    p.proto = ip.proto;
    p.src = ipv4_mapped(ip.src);
    p.dst = ipv4_mapped(ip.dst);
    l4_header(ctx, p).is_ok()
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, cfg: &Config, l3: usize, p: &mut Parsed) -> Parse {
    let Ok(ip) = ptr_at::<Ipv6Hdr>(ctx, l3) else {
        return Parse::Malformed;
    };
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    if !cfg.is_vip(&ip.dst, false) {
        return Parse::NotVip;
    }
    let payload = be16(ip.payload_len) as usize;
    // A zero payload length means a jumbogram, which we do not route.
    if ip.vtc_flow[0] >> 4 != 6 || payload == 0 {
        return Parse::Malformed;
    }
    let hdr_end = l3 + IPV6_HLEN;
    if hdr_end + payload > ctx.data_end() - ctx.data() {
        return Parse::Malformed;
    }
    let mut next = ip.next_hdr;
    let mut l4 = hdr_end;
    let mut frag = Frag::None;
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        match next {
            IPV6_HDR_HOPOPTS | IPV6_HDR_ROUTING | IPV6_HDR_DSTOPTS => {
                let Ok(ext) = ptr_at::<[u8; 2]>(ctx, l4) else {
                    return Parse::Malformed;
                };
                let ext = unsafe { *ext };
                next = ext[0];
                l4 += (ext[1] as usize + 1) * 8;
                if l4 > MAX_L4_OFFSET {
                    return Parse::Malformed;
                }
            }
            IPV6_HDR_FRAGMENT => {
                frag = Frag::V6;
                break;
            }
            _ => break,
        }
    }
    *p = Parsed::EMPTY;
    p.v4 = false;
    p.l3 = l3 as u16;
    p.l4 = l4 as u16;
    p.ip_end = (hdr_end + payload) as u16;
    p.proto = next;
    p.src = ip.src;
    p.dst = ip.dst;
    p.frag = frag;
    if frag == Frag::V6 {
        return Parse::Vip;
    }
    if l4 > p.ip_end() || l4_header(ctx, p).is_err() {
        return Parse::Malformed;
    }
    Parse::Vip
}

/// Reads ports and flags, checking that the whole L4 header lies inside the
/// IP packet: the TCP data offset is at least 5 words and within the
/// packet, the UDP length covers its header and no more than the packet
/// (for a first fragment, only the header must fit).
#[inline(always)]
fn l4_header(ctx: &XdpContext, p: &mut Parsed) -> Result<(), ()> {
    if p.l4() > MAX_L4_OFFSET || p.l4() > p.ip_end() {
        return Err(());
    }
    let l4_len = p.ip_end() - p.l4();
    match p.proto {
        IPPROTO_TCP => {
            let tcp = ptr_at::<[u8; TCP_MIN_HLEN]>(ctx, p.l4())?;
            // SAFETY: bounds checked by ptr_at.
            let tcp = unsafe { &*tcp };
            let doff = (tcp[TCP_DOFF_OFFSET] >> 4) as usize * 4;
            if doff < TCP_MIN_HLEN || doff > l4_len {
                return Err(());
            }
            p.sport = u16::from_ne_bytes([tcp[0], tcp[1]]);
            p.dport = u16::from_ne_bytes([tcp[2], tcp[3]]);
            p.tcp_flags = tcp[TCP_FLAGS_OFFSET];
            p.tcp_ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
            p.tcp_seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        }
        IPPROTO_UDP => {
            let udp = ptr_at::<[u8; UDP_HLEN]>(ctx, p.l4())?;
            // SAFETY: bounds checked by ptr_at.
            let udp = unsafe { &*udp };
            let len = be16([udp[4], udp[5]]) as usize;
            let whole = p.frag == Frag::None;
            if l4_len < UDP_HLEN || len < UDP_HLEN || (whole && len > l4_len) {
                return Err(());
            }
            p.sport = u16::from_ne_bytes([udp[0], udp[1]]);
            p.dport = u16::from_ne_bytes([udp[2], udp[3]]);
        }
        _ => {}
    }
    Ok(())
}
