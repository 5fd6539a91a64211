//! Header layouts and bounds-checked packet access. Multi-byte fields are
//! raw network-order bytes; convert where the value is needed.

use aya_ebpf::programs::XdpContext;

pub const ETH_HLEN: usize = 14;
/// EtherTypes as they sit in memory (network order read as native u16).
pub const ETH_P_IP: u16 = 0x0800u16.to_be();
pub const ETH_P_IPV6: u16 = 0x86ddu16.to_be();
pub const ETH_P_8021Q: u16 = 0x8100u16.to_be();
pub const ETH_P_8021AD: u16 = 0x88a8u16.to_be();

pub const IPV6_HDR_HOPOPTS: u8 = 0;
pub const IPV6_HDR_ROUTING: u8 = 43;
pub const IPV6_HDR_FRAGMENT: u8 = 44;
pub const IPV6_HDR_DSTOPTS: u8 = 60;
/// Extension headers walked before giving up (treated as malformed).
pub const IPV6_MAX_EXT_HEADERS: usize = 4;
/// Deepest L4 offset accepted; bounds the verifier's view of offsets.
pub const MAX_L4_OFFSET: usize = 512;

pub const IPV6_HLEN: usize = 40;
pub const TCP_MIN_HLEN: usize = 20;
pub const TCP_DOFF_OFFSET: usize = 12;
pub const TCP_FLAGS_OFFSET: usize = 13;
pub const TCP_CSUM_OFFSET: usize = 16;
pub const UDP_HLEN: usize = 8;
pub const UDP_CSUM_OFFSET: usize = 6;
pub const ICMP_CSUM_OFFSET: usize = 2;
/// ICMP error header (type, code, checksum, 4 unused/MTU bytes) before the quoted packet.
pub const ICMP_ERROR_HLEN: usize = 8;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: u16,
}

#[repr(C)]
pub struct VlanHdr {
    pub tci: u16,
    pub ether_type: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

#[repr(C)]
pub struct Ipv6Hdr {
    pub vtc_flow: [u8; 4],
    pub payload_len: [u8; 2],
    pub next_hdr: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// The first four bytes of TCP and UDP headers.
#[repr(C)]
pub struct Ports {
    /// Network order.
    pub src: u16,
    /// Network order.
    pub dst: u16,
}

/// The first 20 bytes of a TCP header.
#[repr(C)]
pub struct TcpHdr {
    pub sport: u16,
    pub dport: u16,
    pub seq: [u8; 4],
    pub ack: [u8; 4],
    pub doff: u8,
    pub flags: u8,
    pub window: [u8; 2],
    pub check: [u8; 2],
    pub urg: [u8; 2],
}

/// Deepest offset `ptr_at` accepts. Offsets read back from a map (the
/// per-CPU scratch) are unknown to the verifier; this bound makes every
/// offset a bounded scalar it accepts in packet-pointer arithmetic.
pub const MAX_PACKET_OFFSET: usize = 1024;

/// Pointer to a `T` at `offset`, if the packet holds all of it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, ()> {
    if offset > MAX_PACKET_OFFSET {
        return Err(());
    }
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *mut T)
}

/// Whether an ICMPv4 type is an error that quotes the offending packet.
#[inline(always)]
pub fn is_icmp4_error(icmp_type: u8) -> bool {
    // Destination unreachable, time exceeded, parameter problem.
    matches!(icmp_type, 3 | 11 | 12)
}

/// Whether an ICMPv6 type is an error that quotes the offending packet.
#[inline(always)]
pub fn is_icmp6_error(icmp_type: u8) -> bool {
    // Destination unreachable, packet too big, time exceeded, parameter problem.
    matches!(icmp_type, 1..=4)
}

#[inline(always)]
pub fn be16(bytes: [u8; 2]) -> u16 {
    u16::from_be_bytes(bytes)
}
