//! The one place where the kernel programs and the agent agree on what the
//! BPF maps hold.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding fields, so the
//! layout has no implicit holes and the BTF that `bpftool` prints names every
//! byte. Multi-byte fields that come straight from packets (addresses, ports)
//! are kept in network byte order and say so; counters and ids are host order.
//! Changing any layout means bumping the `_vN` suffix of the map's name.
//!
//! The pure logic both sides need (flow hashing, backend choice, checksum
//! arithmetic) lives here too, so it is unit-tested on the host.
#![no_std]

pub mod csum;
pub mod hash;

/// Where the agent pins maps and links unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/serviceless";

/// Map names, as the kernel and `bpftool map dump name <name>` know them.
/// The kernel keeps at most 15 characters of a map name.
pub mod map_names {
    /// (VIP, port, protocol) -> app id and target port.
    pub const SERVICES: &str = "svl_services_v1";
    /// app id -> hostname and live backend count (array).
    pub const APPS: &str = "svl_apps_v1";
    /// (app id, slot) -> backend pod address and state.
    pub const BACKENDS: &str = "svl_backends_v1";
    /// app id -> last-seen time, packets, bytes (array, written by the kernel).
    pub const ACTIVITY: &str = "svl_activity_v1";
    /// client 5-tuple -> chosen backend (LRU).
    pub const FLOWS: &str = "svl_flows_v1";
    /// backend-side 5-tuple of a reply -> the VIP:port to restore (LRU).
    pub const REVNAT: &str = "svl_revnat_v1";
    /// verdict -> packet count (per-CPU array).
    pub const VERDICTS: &str = "svl_verdicts_v1";
    /// Single entry: activator addresses and VIP ranges.
    pub const CONFIG: &str = "svl_config_v1";

    /// Every map the agent pins, in the order `inspect` reports them.
    pub const ALL: [&str; 8] = [
        SERVICES, APPS, BACKENDS, ACTIVITY, FLOWS, REVNAT, VERDICTS, CONFIG,
    ];
}

/// Program names, as `bpftool prog` shows them (the kernel keeps 15 chars).
pub mod program_names {
    pub const INGRESS: &str = "svl_ingress";
    pub const EGRESS: &str = "svl_egress";
}

/// Compile-time capacities of the object file. The agent overrides them at
/// load time (`--max-apps`, `--max-backends`, `--max-flows`).
pub mod default_capacity {
    pub const SERVICES: u32 = 1 << 20;
    pub const APPS: u32 = 1 << 20;
    pub const BACKENDS: u32 = 1 << 21;
    pub const FLOWS: u32 = 1 << 20;
}

/// Upper bound on live backends per app: the new-flow path scores each one
/// (rendezvous hashing), and the verifier needs a constant loop bound.
pub const MAX_BACKENDS_PER_APP: u32 = 64;

/// Bytes of hostname kept in `svl_apps_v1` for people reading the maps.
/// Longer names are truncated there; routing never depends on it.
pub const HOSTNAME_LEN: usize = 64;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// An IP address as 16 bytes in network order. IPv4 is stored IPv4-mapped
/// (`::ffff:a.b.c.d`) so one key type serves both families.
pub type Addr = [u8; 16];

/// Maps an IPv4 address (network order) into the 16-byte form.
#[inline(always)]
pub const fn ipv4_mapped(v4: [u8; 4]) -> Addr {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3]]
}

/// Returns the IPv4 address if `addr` is IPv4-mapped.
#[inline(always)]
pub fn as_ipv4(addr: &Addr) -> Option<[u8; 4]> {
    if addr[..10] == [0; 10] && addr[10] == 0xff && addr[11] == 0xff {
        Some([addr[12], addr[13], addr[14], addr[15]])
    } else {
        None
    }
}

/// Key of `svl_services_v1`: one port of one app's VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// VIP, network order (IPv4-mapped for IPv4).
    pub vip: Addr,
    /// VIP port, network order.
    pub port: u16,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub proto: u8,
    pub pad: u8,
}

/// The VIP itself is contested (two apps claim it): send it to the activator,
/// which routes by Host, instead of to either app's pods.
pub const SERVICE_F_ACTIVATOR_ONLY: u16 = 1;

/// Value of `svl_services_v1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Index into `svl_apps_v1`, `svl_activity_v1` and `svl_backends_v1`.
    pub app_id: u32,
    /// Port the pods listen on, network order.
    pub target_port: u16,
    /// `SERVICE_F_*` bits.
    pub flags: u16,
}

/// Value of `svl_apps_v1` (array indexed by app id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AppValue {
    /// Backends in slots `0..backend_count` of `svl_backends_v1` (ready or draining).
    pub backend_count: u32,
    /// Of those, how many take new flows (`BACKEND_READY`).
    pub ready_count: u32,
    /// NUL-padded hostname, for people reading the map.
    pub hostname: [u8; HOSTNAME_LEN],
}

impl Default for AppValue {
    fn default() -> Self {
        Self { backend_count: 0, ready_count: 0, hostname: [0; HOSTNAME_LEN] }
    }
}

/// Key of `svl_backends_v1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub app_id: u32,
    /// 0..backend_count; the agent keeps slots dense.
    pub slot: u32,
}

/// Takes new flows.
pub const BACKEND_READY: u8 = 1;
/// Terminating or not ready: keeps its established flows, takes no new ones.
pub const BACKEND_DRAINING: u8 = 2;

/// Value of `svl_backends_v1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend {
    /// Pod IP, network order.
    pub addr: Addr,
    /// `BACKEND_READY` or `BACKEND_DRAINING`.
    pub state: u8,
    pub pad: [u8; 3],
}

/// Value of `svl_activity_v1` (array indexed by app id), updated by the
/// ingress program with atomic adds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Activity {
    /// CLOCK_MONOTONIC (coarse) nanoseconds of the last packet seen.
    pub last_seen_ns: u64,
    pub packets: u64,
    pub bytes: u64,
}

/// Key of `svl_flows_v1` and `svl_revnat_v1`: a 5-tuple as seen on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// Source address, network order.
    pub src: Addr,
    /// Destination address, network order.
    pub dst: Addr,
    /// Source port, network order.
    pub sport: u16,
    /// Destination port, network order.
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

impl FlowKey {
    /// The same flow seen from the other end (source and destination swapped).
    #[inline(always)]
    pub fn reversed(&self) -> Self {
        Self { src: self.dst, dst: self.src, sport: self.dport, dport: self.sport, proto: self.proto, pad: [0; 3] }
    }
}

/// The flow goes to a pod.
pub const FLOW_TO_BACKEND: u8 = 1;
/// The flow goes to the activator.
pub const FLOW_TO_ACTIVATOR: u8 = 2;

/// Value of `svl_flows_v1`: where an established client flow goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowValue {
    /// Backend (or activator) address, network order.
    pub backend: Addr,
    /// Backend port, network order.
    pub backend_port: u16,
    /// `FLOW_TO_*`.
    pub kind: u8,
    pub pad: u8,
    pub app_id: u32,
    /// Slot the backend had when chosen; checked (and searched) on every packet.
    pub slot: u32,
}

/// Value of `svl_revnat_v1`: what a reply's source must be rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatValue {
    /// VIP, network order.
    pub vip: Addr,
    /// VIP port, network order.
    pub vport: u16,
    pub pad: [u8; 2],
    pub app_id: u32,
}

/// `Config::flags`: an IPv4 activator is set.
pub const CONFIG_F_ACTIVATOR4: u32 = 1;
/// `Config::flags`: an IPv6 activator is set.
pub const CONFIG_F_ACTIVATOR6: u32 = 1 << 1;
/// `Config::flags`: the IPv4 VIP range is set.
pub const CONFIG_F_VIP4: u32 = 1 << 2;
/// `Config::flags`: the IPv6 VIP range is set.
pub const CONFIG_F_VIP6: u32 = 1 << 3;

/// Single entry of `svl_config_v1`. A map rather than load-time globals so a
/// restarted agent can change it without replacing the attached programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Config {
    /// IPv4 activator (IPv4-mapped), network order.
    pub activator4: Addr,
    /// IPv6 activator, network order.
    pub activator6: Addr,
    /// Network of the IPv4 VIP range (IPv4-mapped), network order.
    pub vip4_net: Addr,
    /// Mask of the IPv4 VIP range (IPv4-mapped form, prefix ones), network order.
    pub vip4_mask: Addr,
    /// Network of the IPv6 VIP range, network order.
    pub vip6_net: Addr,
    /// Mask of the IPv6 VIP range, network order.
    pub vip6_mask: Addr,
    /// Activator ports, network order.
    pub activator4_port: u16,
    pub activator6_port: u16,
    /// `CONFIG_F_*` bits.
    pub flags: u32,
}

impl Config {
    /// Whether `addr` lies in the configured VIP range of its family.
    #[inline(always)]
    pub fn is_vip(&self, addr: &Addr, v4: bool) -> bool {
        let (net, mask, flag) = if v4 {
            (&self.vip4_net, &self.vip4_mask, CONFIG_F_VIP4)
        } else {
            (&self.vip6_net, &self.vip6_mask, CONFIG_F_VIP6)
        };
        if self.flags & flag == 0 {
            return false;
        }
        let (a0, a1) = addr_words(addr);
        let (m0, m1) = addr_words(mask);
        let (n0, n1) = addr_words(net);
        a0 & m0 == n0 && a1 & m1 == n1
    }
}

/// The address as two native-endian words, for cheap comparisons in the
/// kernel (byte loops and `memcmp` cost more, or do not exist there).
#[inline(always)]
pub fn addr_words(addr: &Addr) -> (u64, u64) {
    // SAFETY: 16 readable bytes; unaligned reads are allowed.
    unsafe {
        let p = addr.as_ptr().cast::<u64>();
        (core::ptr::read_unaligned(p), core::ptr::read_unaligned(p.add(1)))
    }
}

/// Address equality without `memcmp`.
#[inline(always)]
pub fn addr_eq(a: &Addr, b: &Addr) -> bool {
    addr_words(a) == addr_words(b)
}

/// What the programs did with a packet; index of `svl_verdicts_v1`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Not addressed to a VIP: passed untouched.
    PassNotVip = 0,
    /// New flow DNATed to a backend chosen by consistent hash.
    BackendNewFlow = 1,
    /// Established flow DNATed to its remembered backend.
    BackendEstablished = 2,
    /// App known but no ready backend: DNATed to the activator.
    ActivatorNoBackend = 3,
    /// VIP in range but no app holds this VIP/port/protocol: to the activator.
    ActivatorUnknownService = 4,
    /// Contested VIP: to the activator.
    ActivatorCollision = 5,
    /// IP fragment addressed to a VIP: dropped (no ports to route by).
    DropFragment = 6,
    /// Neither TCP, UDP nor a translatable ICMP error, addressed to a VIP: dropped.
    DropUnsupportedProtocol = 7,
    /// Headers truncated or inconsistent: passed untouched for the kernel to judge.
    PassMalformed = 8,
    /// Would go to the activator but none is configured for the family: dropped.
    DropNoActivator = 9,
    /// Flow table insert failed; the packet was still forwarded.
    FlowInsertFailed = 10,
    /// Reply from a backend or the activator rewritten to come from the VIP.
    ReplyTranslated = 11,
    /// ICMP error about a translated flow, translated.
    IcmpErrorTranslated = 12,
    /// Egress packet not belonging to a translated flow: passed untouched.
    EgressPass = 13,
    /// Internal error (helper failure); packet aborted.
    Aborted = 14,
}

impl Verdict {
    /// Entries in `svl_verdicts_v1`.
    pub const COUNT: u32 = 16;

    pub const ALL: [Verdict; 15] = [
        Verdict::PassNotVip,
        Verdict::BackendNewFlow,
        Verdict::BackendEstablished,
        Verdict::ActivatorNoBackend,
        Verdict::ActivatorUnknownService,
        Verdict::ActivatorCollision,
        Verdict::DropFragment,
        Verdict::DropUnsupportedProtocol,
        Verdict::PassMalformed,
        Verdict::DropNoActivator,
        Verdict::FlowInsertFailed,
        Verdict::ReplyTranslated,
        Verdict::IcmpErrorTranslated,
        Verdict::EgressPass,
        Verdict::Aborted,
    ];

    /// Stable snake_case name used in metrics labels, `inspect` and tests.
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::PassNotVip => "pass_not_vip",
            Verdict::BackendNewFlow => "backend_new_flow",
            Verdict::BackendEstablished => "backend_established",
            Verdict::ActivatorNoBackend => "activator_no_backend",
            Verdict::ActivatorUnknownService => "activator_unknown_service",
            Verdict::ActivatorCollision => "activator_collision",
            Verdict::DropFragment => "drop_fragment",
            Verdict::DropUnsupportedProtocol => "drop_unsupported_protocol",
            Verdict::PassMalformed => "pass_malformed",
            Verdict::DropNoActivator => "drop_no_activator",
            Verdict::FlowInsertFailed => "flow_insert_failed",
            Verdict::ReplyTranslated => "reply_translated",
            Verdict::IcmpErrorTranslated => "icmp_error_translated",
            Verdict::EgressPass => "egress_pass",
            Verdict::Aborted => "aborted",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are #[repr(C)], made only of integers and byte
    // arrays, with every padding byte an explicit field.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for AppValue {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for Activity {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for RevNatValue {}
    unsafe impl aya::Pod for Config {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, size_of};

    /// The sizes are the ABI with the kernel side: any change needs a `_vN` bump.
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(size_of::<ServiceValue>(), 8);
        assert_eq!(size_of::<AppValue>(), 8 + HOSTNAME_LEN);
        assert_eq!(size_of::<BackendKey>(), 8);
        assert_eq!(size_of::<Backend>(), 20);
        assert_eq!(size_of::<Activity>(), 24);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<FlowValue>(), 28);
        assert_eq!(size_of::<RevNatValue>(), 24);
        assert_eq!(size_of::<Config>(), 6 * 16 + 8);
        assert!(align_of::<Activity>() <= 8);
    }

    #[test]
    fn vip_range_matches_only_its_family_and_prefix() {
        let mut cfg = Config::default();
        assert!(!cfg.is_vip(&ipv4_mapped([10, 0, 0, 1]), true), "no range set, nothing is a VIP");
        cfg.flags = CONFIG_F_VIP4;
        cfg.vip4_net = ipv4_mapped([10, 96, 0, 0]);
        cfg.vip4_mask = ipv4_mapped([255, 255, 0, 0]);
        assert!(cfg.is_vip(&ipv4_mapped([10, 96, 3, 4]), true));
        assert!(!cfg.is_vip(&ipv4_mapped([10, 97, 3, 4]), true));
        assert!(!cfg.is_vip(&ipv4_mapped([10, 96, 3, 4]), false));
    }

    #[test]
    fn ipv4_mapping_round_trips() {
        assert_eq!(as_ipv4(&ipv4_mapped([192, 0, 2, 1])), Some([192, 0, 2, 1]));
        let v6 = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(as_ipv4(&v6), None);
    }
}
