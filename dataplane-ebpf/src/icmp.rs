//! ICMP errors a client sends to a VIP about a reply it got from it
//! ("fragmentation needed", IPv6 "packet too big", unreachable, ...): sent
//! on to the backend of the connection, with the quoted packet rewritten to
//! name that backend, so path-MTU discovery works through the VIP.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    programs::XdpContext,
};
use serviceless_common::{
    Addr, CT_DIR_FORWARD, CtEntry, CtKey, IPPROTO_TCP, IPPROTO_UDP, Verdict, as_ipv4, csum,
    ipv4_mapped,
};

use crate::{
    ingress::pack,
    conntrack,
    maps::Scratch,
    nat::set_check,
    packet::*,
};

const MALFORMED: (Verdict, u32) = (Verdict::PassMalformed, XDP_PASS);
const UNSUPPORTED: (Verdict, u32) = (Verdict::DropUnsupportedProtocol, XDP_DROP);
const NO_CONNECTION: (Verdict, u32) = (Verdict::IcmpErrorNoConnection, XDP_DROP);

/// The tracked connection a quoted reply (VIP:vport -> client:cport)
/// belongs to, copied into `s.entry` (the key is built in `s.key`).
#[inline(always)]
fn connection(s: &mut Scratch, vip: &Addr, client: &Addr, vport: u16, cport: u16, proto: u8) -> bool {
    s.key = CtKey { src: *client, dst: *vip, sport: cport, dport: vport, proto, dir: CT_DIR_FORWARD, pad: [0; 2] };
    match conntrack::lookup(&s.key) {
        Some((_, entry)) => {
            // SAFETY: copied out at once.
            s.entry = unsafe { *entry };
            true
        }
        None => false,
    }
}

/// Rewrites the quoted ports (source: VIP port -> backend port; destination:
/// the client port the backend knows) and keeps the quoted L4 checksum valid
/// for `addr_acc` (the quoted source address change) too. Returns the sum of
/// every change to fold into the ICMP checksum.
#[inline(always)]
fn quoted_l4(ctx: &XdpContext, ports_off: usize, proto: u8, entry: &CtEntry, addr_acc: u32) -> Result<u32, ()> {
    if ports_off > MAX_L4_OFFSET {
        return Err(());
    }
    let ports = ptr_at::<Ports>(ctx, ports_off)?;
    // SAFETY: bounds checked by ptr_at.
    let ports = unsafe { &mut *ports };
    let mut port_acc = csum::diff16(0, u16::from_be(ports.src), u16::from_be(entry.port));
    port_acc = csum::diff16(port_acc, u16::from_be(ports.dst), u16::from_be(entry.client_port));
    ports.src = entry.port;
    ports.dst = entry.client_port;
    let mut icmp_acc = port_acc;
    // The quoted L4 checksum, when quoted, must stay valid for the backend too.
    let l4_check_off = ports_off + if proto == IPPROTO_UDP { UDP_CSUM_OFFSET } else { TCP_CSUM_OFFSET };
    if let Ok(l4_check) = ptr_at::<[u8; 2]>(ctx, l4_check_off) {
        // SAFETY: bounds checked by ptr_at.
        let l4_check = unsafe { &mut *l4_check };
        let old = be16(*l4_check);
        if !(proto == IPPROTO_UDP && old == 0) {
            let new = csum::apply(old, addr_acc + port_acc);
            *l4_check = new.to_be_bytes();
            icmp_acc = csum::diff16(icmp_acc, old, new);
        }
    }
    Ok(icmp_acc)
}

#[inline(always)]
fn fix_icmp_check(icmp: &mut [u8; ICMP_ERROR_HLEN], acc: u32) {
    let check = be16([icmp[ICMP_CSUM_OFFSET], icmp[ICMP_CSUM_OFFSET + 1]]);
    let new = csum::apply(check, acc).to_be_bytes();
    icmp[ICMP_CSUM_OFFSET] = new[0];
    icmp[ICMP_CSUM_OFFSET + 1] = new[1];
}

/// Returns the packed (verdict, action) (see `ingress::pack`).
#[inline(never)]
pub fn error4(ctx: &XdpContext, s: &mut Scratch) -> u64 {
    let (verdict, action) = error4_inner(ctx, s).unwrap_or(MALFORMED);
    pack(verdict, action)
}

#[inline(always)]
fn error4_inner(ctx: &XdpContext, s: &mut Scratch) -> Result<(Verdict, u32), ()> {
    let (l3, l4) = (s.parsed.l3(), s.parsed.l4());
    let icmp = ptr_at::<[u8; ICMP_ERROR_HLEN]>(ctx, l4)?;
    // SAFETY: bounds checked by ptr_at.
    let icmp = unsafe { &mut *icmp };
    if !is_icmp4_error(icmp[0]) {
        return Ok(UNSUPPORTED);
    }
    let inner_off = l4 + ICMP_ERROR_HLEN;
    let inner = ptr_at::<Ipv4Hdr>(ctx, inner_off)?;
    // SAFETY: bounds checked by ptr_at.
    let inner = unsafe { &mut *inner };
    let inner_len = ((inner.version_ihl & 0x0f) as usize) * 4;
    if inner_len < 20 || (inner.proto != IPPROTO_TCP && inner.proto != IPPROTO_UDP) {
        return Ok(UNSUPPORTED);
    }
    let ports_off = inner_off + inner_len;
    let ports = ptr_at::<Ports>(ctx, ports_off)?;
    // SAFETY: bounds checked by ptr_at.
    let (vport, cport) = unsafe { ((*ports).src, (*ports).dst) };
    // The quoted packet went VIP -> client; its connection is client -> VIP.
    if !connection(s, &ipv4_mapped(inner.src), &ipv4_mapped(inner.dst), vport, cport, inner.proto) {
        return Ok(NO_CONNECTION);
    }
    let entry = &s.entry;
    let Some(backend) = as_ipv4(&entry.addr) else { return Ok(NO_CONNECTION) };
    let ip = ptr_at::<Ipv4Hdr>(ctx, l3)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &mut *ip };
    // Outer destination: VIP -> backend (IP header checksum only; ICMP has no pseudo-header).
    set_check(&mut ip.check, csum::diff_addr4(0, ip.dst, backend));
    ip.dst = backend;
    // Quoted source and the quoted header's checksum; the ICMP checksum covers both.
    let old_inner_check = be16(inner.check);
    let addr_acc = csum::diff_addr4(0, inner.src, backend);
    let new_inner_check = csum::apply(old_inner_check, addr_acc);
    inner.src = backend;
    inner.check = new_inner_check.to_be_bytes();
    let mut icmp_acc = csum::diff16(addr_acc, old_inner_check, new_inner_check);
    icmp_acc += quoted_l4(ctx, ports_off, inner.proto, entry, addr_acc)?;
    fix_icmp_check(icmp, icmp_acc);
    Ok((Verdict::IcmpErrorTranslated, XDP_PASS))
}

/// ICMPv6: the checksum also covers the outer addresses (pseudo-header).
#[inline(never)]
pub fn error6(ctx: &XdpContext, s: &mut Scratch) -> u64 {
    let (verdict, action) = error6_inner(ctx, s).unwrap_or(MALFORMED);
    pack(verdict, action)
}

#[inline(always)]
fn error6_inner(ctx: &XdpContext, s: &mut Scratch) -> Result<(Verdict, u32), ()> {
    let (l3, l4) = (s.parsed.l3(), s.parsed.l4());
    let icmp = ptr_at::<[u8; ICMP_ERROR_HLEN]>(ctx, l4)?;
    // SAFETY: bounds checked by ptr_at.
    let icmp = unsafe { &mut *icmp };
    if !is_icmp6_error(icmp[0]) {
        return Ok(UNSUPPORTED);
    }
    let inner_off = l4 + ICMP_ERROR_HLEN;
    if inner_off > MAX_L4_OFFSET {
        return Err(());
    }
    let inner = ptr_at::<Ipv6Hdr>(ctx, inner_off)?;
    // SAFETY: bounds checked by ptr_at.
    let inner = unsafe { &mut *inner };
    if inner.next_hdr != IPPROTO_TCP && inner.next_hdr != IPPROTO_UDP {
        return Ok(UNSUPPORTED);
    }
    let ports_off = inner_off + IPV6_HLEN;
    let ports = ptr_at::<Ports>(ctx, ports_off)?;
    // SAFETY: bounds checked by ptr_at.
    let (vport, cport) = unsafe { ((*ports).src, (*ports).dst) };
    if !connection(s, &inner.src, &inner.dst, vport, cport, inner.next_hdr) {
        return Ok(NO_CONNECTION);
    }
    let entry = &s.entry;
    if as_ipv4(&entry.addr).is_some() {
        return Ok(NO_CONNECTION);
    }
    let ip = ptr_at::<Ipv6Hdr>(ctx, l3)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &mut *ip };
    let mut icmp_acc = csum::diff_addr16(0, &ip.dst, &entry.addr);
    ip.dst = entry.addr;
    let addr_acc = csum::diff_addr16(0, &inner.src, &entry.addr);
    inner.src = entry.addr;
    icmp_acc += addr_acc;
    icmp_acc += quoted_l4(ctx, ports_off, inner.next_hdr, entry, addr_acc)?;
    fix_icmp_check(icmp, icmp_acc);
    Ok((Verdict::IcmpErrorTranslated, XDP_PASS))
}
