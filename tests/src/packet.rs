//! A small packet builder for fixtures. Checksums are computed from scratch
//! here (full sums), independently of the incremental updates under test.

use std::net::IpAddr;

use serviceless_common::csum::checksum;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp { sport: u16, dport: u16, flags: u8 },
    Udp { sport: u16, dport: u16, zero_checksum: bool },
    /// ICMPv4/ICMPv6 error quoting `inner` (an IP packet without Ethernet).
    IcmpError { icmp_type: u8, code: u8, inner: Box<Packet> },
    /// Any other protocol, raw bytes after the IP header.
    Raw { proto: u8, bytes: Vec<u8> },
}

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

#[derive(Clone, Debug)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    pub vlan: Option<u16>,
    /// IPv4 options (multiple of 4 bytes).
    pub ipv4_options: Vec<u8>,
    /// IPv6 extension headers: (type, body after the 2-byte next/len prefix, padded to 8n-2).
    pub ipv6_ext: Vec<(u8, Vec<u8>)>,
    /// IPv4 fragment offset (8-byte units) and MF flag.
    pub fragment: Option<(u16, bool)>,
    pub payload: Vec<u8>,
    /// TCP sequence and acknowledgment numbers (the ack is written only with ACK) and window.
    pub seq: u32,
    pub ack: u32,
    pub window: u16,
    /// IPv4 identification.
    pub ip_id: u16,
    /// TCP options (padded by the builder to a multiple of 4 bytes).
    pub tcp_options: Vec<u8>,
}

impl Packet {
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Self::new(src, dst, L4::Tcp { sport, dport, flags: SYN })
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Self::new(src, dst, L4::Udp { sport, dport, zero_checksum: false })
    }

    pub fn new(src: &str, dst: &str, l4: L4) -> Self {
        Self {
            src: src.parse().expect("fixture address"),
            dst: dst.parse().expect("fixture address"),
            l4,
            vlan: None,
            ipv4_options: Vec::new(),
            ipv6_ext: Vec::new(),
            fragment: None,
            payload: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            seq: 1000,
            ack: 2000,
            window: 64240,
            ip_id: 0x1c46,
            tcp_options: Vec::new(),
        }
    }

    /// The same packet with other TCP flags.
    pub fn flags(mut self, new: u8) -> Self {
        if let L4::Tcp { flags, .. } = &mut self.l4 {
            *flags = new;
        }
        self
    }

    /// The RST a host sends for a segment of a connection it does not have
    /// (RFC 9293 3.10.7.1), built from first principles: from the segment's
    /// destination back to its source, no payload, no options.
    pub fn rst_answer(&self) -> Self {
        let L4::Tcp { sport, dport, flags } = self.l4 else { panic!("not TCP") };
        let mut r = Packet::new(&self.dst.to_string(), &self.src.to_string(), L4::Tcp { sport: dport, dport: sport, flags: RST });
        r.payload.clear();
        r.window = 0;
        r.ip_id = 0;
        r.vlan = self.vlan;
        if flags & ACK != 0 {
            r.seq = self.ack;
            r.ack = 0;
        } else {
            let mut len = self.payload.len() as u32;
            if flags & SYN != 0 {
                len += 1;
            }
            if flags & FIN != 0 {
                len += 1;
            }
            r.seq = 0;
            r.ack = self.seq.wrapping_add(len);
            r.l4 = L4::Tcp { sport: dport, dport: sport, flags: RST | ACK };
        }
        r
    }

    pub fn with(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }

    /// The same packet with other addresses/ports (an expected NAT result).
    pub fn nat(&self, src: Option<(&str, u16)>, dst: Option<(&str, u16)>) -> Self {
        let mut p = self.clone();
        if let Some((ip, port)) = src {
            p.src = ip.parse().expect("fixture address");
            match &mut p.l4 {
                L4::Tcp { sport, .. } | L4::Udp { sport, .. } => *sport = port,
                _ => {}
            }
        }
        if let Some((ip, port)) = dst {
            p.dst = ip.parse().expect("fixture address");
            match &mut p.l4 {
                L4::Tcp { dport, .. } | L4::Udp { dport, .. } => *dport = port,
                _ => {}
            }
        }
        p
    }

    fn proto(&self) -> u8 {
        match &self.l4 {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
            L4::IcmpError { .. } => if self.src.is_ipv4() { 1 } else { 58 },
            L4::Raw { proto, .. } => *proto,
        }
    }

    fn pseudo(&self, len: usize) -> Vec<u8> {
        let mut p = Vec::new();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                p.extend(s.octets());
                p.extend(d.octets());
                p.extend([0, self.proto()]);
                p.extend((len as u16).to_be_bytes());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                p.extend(s.octets());
                p.extend(d.octets());
                p.extend((len as u32).to_be_bytes());
                p.extend([0, 0, 0, self.proto()]);
            }
            _ => panic!("mixed address families in a fixture"),
        }
        p
    }

    fn l4_bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match &self.l4 {
            L4::Tcp { sport, dport, flags } => {
                b.extend(sport.to_be_bytes());
                b.extend(dport.to_be_bytes());
                b.extend(self.seq.to_be_bytes());
                b.extend(if flags & ACK != 0 { self.ack } else { 0 }.to_be_bytes());
                let mut options = self.tcp_options.clone();
                while !options.len().is_multiple_of(4) {
                    options.push(0);
                }
                b.extend([(((20 + options.len()) / 4) << 4) as u8, *flags]);
                b.extend(self.window.to_be_bytes());
                b.extend([0, 0, 0, 0]); // checksum, urgent
                b.extend(options);
                b.extend(&self.payload);
                let c = checksum(&[self.pseudo(b.len()), b.clone()].concat());
                b[16..18].copy_from_slice(&c.to_be_bytes());
            }
            L4::Udp { sport, dport, zero_checksum } => {
                b.extend(sport.to_be_bytes());
                b.extend(dport.to_be_bytes());
                b.extend(((8 + self.payload.len()) as u16).to_be_bytes());
                b.extend([0, 0]);
                b.extend(&self.payload);
                if !zero_checksum {
                    let mut c = checksum(&[self.pseudo(b.len()), b.clone()].concat());
                    if c == 0 {
                        c = 0xffff;
                    }
                    b[6..8].copy_from_slice(&c.to_be_bytes());
                }
            }
            L4::IcmpError { icmp_type, code, inner } => {
                b.extend([*icmp_type, *code, 0, 0, 0, 0, 0, 0]);
                b.extend(inner.ip_bytes());
                let sum_over = if self.src.is_ipv4() { b.clone() } else { [self.pseudo(b.len()), b.clone()].concat() };
                let c = checksum(&sum_over);
                b[2..4].copy_from_slice(&c.to_be_bytes());
            }
            L4::Raw { bytes, .. } => b.extend(bytes),
        }
        b
    }

    /// The IP packet (no Ethernet header).
    pub fn ip_bytes(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let mut out = Vec::new();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let hlen = 20 + self.ipv4_options.len();
                let total = hlen + l4.len();
                let frag = self.fragment.map_or(0x4000u16, |(off, mf)| off | if mf { 0x2000 } else { 0 });
                out.push(0x40 | (hlen / 4) as u8);
                out.push(0);
                out.extend((total as u16).to_be_bytes());
                out.extend(self.ip_id.to_be_bytes());
                out.extend(frag.to_be_bytes());
                out.extend([64, self.proto(), 0, 0]);
                out.extend(s.octets());
                out.extend(d.octets());
                out.extend(&self.ipv4_options);
                let c = checksum(&out);
                out[10..12].copy_from_slice(&c.to_be_bytes());
                out.extend(l4);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut ext = Vec::new();
                let mut next_types: Vec<u8> = self.ipv6_ext.iter().map(|(t, _)| *t).collect();
                next_types.push(self.proto());
                for (i, (_, body)) in self.ipv6_ext.iter().enumerate() {
                    assert_eq!((body.len() + 2) % 8, 0, "extension header bodies pad to 8n-2 bytes");
                    ext.push(next_types[i + 1]);
                    ext.push(((body.len() + 2) / 8 - 1) as u8);
                    ext.extend(body);
                }
                out.extend([0x60, 0, 0, 0]);
                out.extend(((ext.len() + l4.len()) as u16).to_be_bytes());
                out.push(next_types[0]);
                out.push(64);
                out.extend(s.octets());
                out.extend(d.octets());
                out.extend(ext);
                out.extend(l4);
            }
            _ => panic!("mixed address families in a fixture"),
        }
        out
    }

    /// The Ethernet frame (client -> node).
    pub fn frame(&self) -> Vec<u8> {
        self.frame_macs(NODE_MAC, CLIENT_MAC)
    }

    /// The Ethernet frame going the other way (node -> client), as an
    /// answer sent back out of the interface it came in on.
    pub fn frame_back(&self) -> Vec<u8> {
        self.frame_macs(CLIENT_MAC, NODE_MAC)
    }

    fn frame_macs(&self, dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(dst);
        out.extend(src);
        if let Some(vid) = self.vlan {
            out.extend(0x8100u16.to_be_bytes());
            out.extend(vid.to_be_bytes());
        }
        out.extend(if self.src.is_ipv4() { 0x0800u16 } else { 0x86ddu16 }.to_be_bytes());
        out.extend(self.ip_bytes());
        out
    }
}

/// The TCP MSS option (kind 2, length 4).
pub fn mss_option(mss: u16) -> Vec<u8> {
    let [hi, lo] = mss.to_be_bytes();
    vec![2, 4, hi, lo]
}

/// `inner` (an IP packet) encapsulated as GUE variant 1 (outer IPv4 + UDP,
/// DF set, TTL 64, UDP checksum zero), in an Ethernet frame. The UDP source
/// port is entropy the sender chooses: the caller passes what it saw.
pub fn gue_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    outer_src: std::net::Ipv4Addr,
    outer_dst: std::net::Ipv4Addr,
    sport: u16,
    dport: u16,
    inner: &[u8],
) -> Vec<u8> {
    let mut ip = Vec::new();
    ip.extend([0x45, 0]);
    ip.extend(((20 + 8 + inner.len()) as u16).to_be_bytes());
    ip.extend([0, 0, 0x40, 0, 64, 17, 0, 0]);
    ip.extend(outer_src.octets());
    ip.extend(outer_dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut out = Vec::new();
    out.extend(dst_mac);
    out.extend(src_mac);
    out.extend(0x0800u16.to_be_bytes());
    out.extend(ip);
    out.extend(sport.to_be_bytes());
    out.extend(dport.to_be_bytes());
    out.extend(((8 + inner.len()) as u16).to_be_bytes());
    out.extend([0, 0]);
    out.extend(inner);
    out
}

/// Hex dump a person can paste into `text2pcap -e 0x800`/scapy to replay.
pub fn hex(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .enumerate()
        .map(|(i, c)| {
            format!("{:04x}  {}", i * 16, c.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}
