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

pub mod conntrack;
pub mod csum;
pub mod hash;

pub use conntrack::*;

/// Where the agent pins maps and links unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/serviceless";

/// Map names, as the kernel and `bpftool map dump name <name>` know them.
/// The kernel keeps at most 15 characters of a map name.
pub mod map_names {
    /// (VIP, port, protocol) -> app id and target port.
    pub const SERVICES: &str = "svl_services_v1";
    /// app id -> hostname, its hash and live backend counts (array).
    pub const APPS: &str = "svl_apps_v2";
    /// (app id, slot) -> backend pod address and state.
    pub const BACKENDS: &str = "svl_backends_v1";
    /// app id -> last-seen time, packets, bytes (per-CPU array, written by the kernel).
    pub const ACTIVITY: &str = "svl_activity_v2";
    /// Connection tracking, established TCP connections: one forward and one
    /// reply entry per connection. A plain hash map: nothing evicts them.
    pub const CONNTRACK: &str = "svl_ct_v1";
    /// Connection tracking, new connections (half-open TCP) and UDP flows:
    /// an LRU, so a SYN flood churns it and never reaches `CONNTRACK`.
    pub const CT_NEW: &str = "svl_ct_new_v1";
    /// Translations of IP fragments without ports, by datagram id (LRU).
    pub const FRAGMENTS: &str = "svl_frags_v1";
    /// verdict -> packet count (per-CPU array).
    pub const VERDICTS: &str = "svl_verdicts_v3";
    /// conntrack (and wake-signal) event -> count (per-CPU array).
    pub const CT_EVENTS: &str = "svl_ct_events_v2";
    /// Per-CPU budget of new connections (flood guard scratch state).
    pub const CT_BUDGET: &str = "svl_ct_budget_v1";
    /// Single entry: live conntrack entries by state, as the last GC pass counted them.
    pub const CT_SUMMARY: &str = "svl_ct_summary_v1";
    /// Single entry: activator addresses, VIP ranges, flow hash key, conntrack timeouts.
    pub const CONFIG: &str = "svl_config_v2";
    /// node id -> the address of another node that runs pods (array; id 0
    /// is this node). Backends name their node by id.
    pub const NODES: &str = "svl_nodes_v1";
    /// Single entry: this node's place in the cluster fabric (its address,
    /// the encapsulation port, the MTU, the remote-pod mode).
    pub const FABRIC: &str = "svl_fabric_v1";
    /// client 5-tuple -> the node this node encapsulated the flow to (LRU):
    /// its packets keep going there when the app's pods change.
    pub const REMOTE_FLOWS: &str = "svl_remote_flows_v1";
    /// Ring buffer of `WakeEvent`s: a sleeping app was hit. Not pinned (a
    /// signal, not state: a restarted agent finds held connections in
    /// conntrack).
    pub const WAKES: &str = "svl_wakes_v1";
    /// app id -> when its last wake signal was sent (array), so a flood to
    /// a sleeping app sends one signal per interval. Not pinned.
    pub const WAKE_GATE: &str = "svl_wakegate_v1";
    /// (socket cookie, pod or activator address, port) -> the VIP and port
    /// the socket hooks translated it from (LRU), so `recvmsg()` and
    /// `getpeername()` show the VIP.
    pub const SOCK_REV: &str = "svl_sock_rev_v1";
    /// socket -> the app id its connect() was pointed at (socket storage):
    /// its packets keep the app awake.
    pub const SOCK_APP: &str = "svl_sock_app_v1";
    /// Single entry: which sockets the cgroup hooks leave alone.
    pub const SOCK_CONFIG: &str = "svl_sock_cfg_v1";
    /// cgroup v2 id -> 1: sockets of processes in these cgroups (or below
    /// them) are left to the per-packet path (`--socket-lb-skip-cgroup`).
    pub const SOCK_SKIP: &str = "svl_sock_skip_v1";

    /// Every map the agent pins, in the order `inspect` reports them.
    pub const ALL: [&str; 19] = [
        SERVICES, APPS, BACKENDS, ACTIVITY, CONNTRACK, CT_NEW, FRAGMENTS, VERDICTS, CT_EVENTS, CT_BUDGET,
        CT_SUMMARY, CONFIG, NODES, FABRIC, REMOTE_FLOWS, SOCK_REV, SOCK_APP, SOCK_CONFIG, SOCK_SKIP,
    ];

    /// Maps of earlier layouts: an upgraded agent migrates what it can from
    /// them (see the agent's `upgrade` module) and then unpins them.
    pub mod previous {
        pub const APPS_V1: &str = "svl_apps_v1";
        pub const ACTIVITY_V1: &str = "svl_activity_v1";
        pub const FLOWS_V1: &str = "svl_flows_v1";
        pub const REVNAT_V1: &str = "svl_revnat_v1";
        pub const VERDICTS_V1: &str = "svl_verdicts_v1";
        pub const CONFIG_V1: &str = "svl_config_v1";
        pub const ALL: [&str; 6] = [APPS_V1, ACTIVITY_V1, FLOWS_V1, REVNAT_V1, VERDICTS_V1, CONFIG_V1];
    }

    /// Maps an earlier release pinned that nothing carries over (counters
    /// that restart from zero): unpinned once the new programs are live.
    pub const RETIRED: [&str; 2] = ["svl_verdicts_v2", "svl_ct_events_v1"];
}

/// Program names, as `bpftool prog` shows them (the kernel keeps 15 chars).
pub mod program_names {
    pub const INGRESS: &str = "svl_ingress";
    pub const EGRESS: &str = "svl_egress";
    /// Conntrack garbage collector: never attached; the agent runs it with
    /// BPF_PROG_TEST_RUN every few seconds.
    pub const CT_GC: &str = "svl_ct_gc";
    /// Connect-time load balancing on the cgroup v2 socket hooks.
    pub const CONNECT4: &str = "svl_connect4";
    pub const CONNECT6: &str = "svl_connect6";
    pub const SENDMSG4: &str = "svl_sendmsg4";
    pub const SENDMSG6: &str = "svl_sendmsg6";
    pub const RECVMSG4: &str = "svl_recvmsg4";
    pub const RECVMSG6: &str = "svl_recvmsg6";
    pub const GETPEERNAME4: &str = "svl_getpeername4";
    pub const GETPEERNAME6: &str = "svl_getpeername6";
    /// cgroup_skb egress: traffic of translated sockets counts as activity.
    pub const SOCK_EGRESS: &str = "svl_sock_egress";
    /// Every socket hook: (program, the hook's name as `bpftool cgroup` shows it).
    pub const SOCKET_HOOKS: [(&str, &str); 9] = [
        (CONNECT4, "connect4"),
        (CONNECT6, "connect6"),
        (SENDMSG4, "sendmsg4"),
        (SENDMSG6, "sendmsg6"),
        (RECVMSG4, "recvmsg4"),
        (RECVMSG6, "recvmsg6"),
        (GETPEERNAME4, "getpeername4"),
        (GETPEERNAME6, "getpeername6"),
        (SOCK_EGRESS, "egress"),
    ];
}

/// Compile-time capacities of the object file. The agent overrides them at
/// load time (`--max-apps`, `--max-backends`, `--max-connections`).
pub mod default_capacity {
    pub const SERVICES: u32 = 1 << 20;
    pub const APPS: u32 = 1 << 20;
    pub const BACKENDS: u32 = 1 << 21;
    /// Established-connection entries: two per connection (forward and
    /// reply), about 320 B of kernel memory per connection, preallocated:
    /// 256k connections, as Cilium's default TCP table (512k entries).
    pub const CONNTRACK: u32 = 1 << 19;
    /// New-connection (half-open TCP, UDP) entries, two per connection.
    pub const CT_NEW: u32 = 1 << 18;
    /// In-flight fragmented datagrams.
    pub const FRAGMENTS: u32 = 1 << 14;
    /// Nodes (ids) backends can be on.
    pub const NODES: u32 = 1 << 13;
    /// Flows this node sent to pods on other nodes, remembered (LRU).
    pub const REMOTE_FLOWS: u32 = 1 << 17;
    /// Sockets the hooks translated, remembered for `recvmsg`/`getpeername`
    /// (LRU, 56 B of key and value each, about 100 B with the map's own
    /// overhead): a forgotten one shows the pod's address instead.
    pub const SOCK_REV: u32 = 1 << 16;
    /// cgroups the hooks skip.
    pub const SOCK_SKIP: u32 = 256;
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
    /// `hash::name_hash` of the whole hostname: with `hostname` (which may be
    /// truncated) it lets a restarted agent recognise exactly the app it wrote.
    pub name_hash: u64,
    /// NUL-padded hostname, for people reading the map (truncated past 63 bytes).
    pub hostname: [u8; HOSTNAME_LEN],
}

impl Default for AppValue {
    fn default() -> Self {
        Self { backend_count: 0, ready_count: 0, name_hash: 0, hostname: [0; HOSTNAME_LEN] }
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
    pub pad: u8,
    /// The pod's node: `NODE_LOCAL` (this node, or not known), else an index
    /// of `svl_nodes_v1`. Host order.
    pub node: u16,
}

/// `Backend::node` of a pod on this node (or on an unknown one: such pods
/// are reached by routing, as before nodes were known).
pub const NODE_LOCAL: u16 = 0;

/// The entry is in use.
pub const NODE_F_PRESENT: u32 = 1;

/// Value of `svl_nodes_v1` (array indexed by node id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeValue {
    /// The node's address (IPv4-mapped), network order: the outer
    /// destination of packets encapsulated to it.
    pub addr: Addr,
    /// `NODE_F_*` bits.
    pub flags: u32,
    pub pad: u32,
}

/// Pods on other nodes are reached by encapsulating to their node, which
/// answers the client directly (DSR). Without it (a node that does not know
/// its own address) they are routed as local ones.
pub const FABRIC_F_ENCAP: u32 = 1;
/// A new connection prefers a ready pod on this node when there is one.
pub const FABRIC_F_PREFER_LOCAL: u32 = 2;
/// IPv4 connections to pods on other nodes get their source translated to
/// this node's address and a port of `snat_ports` (`--remote-mode snat`),
/// and are routed there; replies come back here. (IPv6 ones are still
/// encapsulated: the node address is IPv4.)
pub const FABRIC_F_SNAT: u32 = 4;

/// Value of `svl_remote_flows_v1`: where this node sent a flow for a pod on
/// another node (the other node owns the connection). Only a hint: without
/// it the flow is hashed anew, which picks the same node while the app's
/// pods stay the same.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RemoteFlow {
    /// Index of `svl_nodes_v1`.
    pub node: u16,
    pub pad: u16,
    pub app_id: u32,
}

/// Bytes encapsulation adds in front of the inner IP packet: an IPv4 and a
/// UDP header (GUE variant 1: the UDP payload is the IP packet itself).
pub const ENCAP_OVERHEAD: u16 = 28;

/// Value of `svl_fabric_v1` (single entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Fabric {
    /// This node's IPv4 address, network order: the source of encapsulated
    /// packets and the destination this node decapsulates.
    pub node4: [u8; 4],
    /// `FABRIC_F_*` bits.
    pub flags: u32,
    /// UDP port of the encapsulation, network order.
    pub encap_port: u16,
    /// Largest IP packet (outer headers included) the fabric carries, host order.
    pub mtu: u16,
    /// TCP MSS a SYN or SYN-ACK to or from a VIP is clamped to, so a segment
    /// still fits the fabric once encapsulated; host order, 0: no clamping.
    pub mss4: u16,
    pub mss6: u16,
    /// Source ports SNAT may use, inclusive, host order (outside the node's
    /// own ephemeral range, so replies to them are never the node's own).
    pub snat_port_min: u16,
    pub snat_port_max: u16,
}

/// Key of `svl_sock_rev_v1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    /// `bpf_get_socket_cookie`: the socket.
    pub cookie: u64,
    /// The pod (or activator) the socket was pointed at, network order.
    pub addr: Addr,
    /// Its port, network order.
    pub port: u16,
    pub pad: [u8; 6],
}

/// Value of `svl_sock_rev_v1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevValue {
    /// The VIP the socket asked for, network order.
    pub vip: Addr,
    /// Its port, network order.
    pub port: u16,
    pub pad: [u8; 2],
    pub app_id: u32,
}

/// `SockConfig::flags`: only sockets in the agent's own network namespace
/// (the host's) are translated; pods' go through the per-packet path.
pub const SOCK_F_HOST_NETNS_ONLY: u32 = 1;
/// `SockConfig::flags`: `svl_sock_skip_v1` lists cgroups to skip.
pub const SOCK_F_SKIP_CGROUPS: u32 = 2;

/// How deep below the hierarchy's root the hooks look for a skipped cgroup.
pub const MAX_CGROUP_DEPTH: i32 = 16;

/// Single entry of `svl_sock_cfg_v1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockConfig {
    /// `SOCK_F_*` bits.
    pub flags: u32,
    pub pad: u32,
    /// The agent's network namespace (`SO_NETNS_COOKIE`).
    pub host_netns_cookie: u64,
}

/// An entry of `svl_wakes_v1`: a new connection (or UDP flow) to an app
/// with no ready pod was sent to the activator.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WakeEvent {
    pub app_id: u32,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub proto: u8,
    pub pad: [u8; 3],
    /// CLOCK_MONOTONIC (coarse) nanoseconds of the packet.
    pub at_ns: u64,
}

/// At most one wake signal per app per this interval; the agent retries
/// a wake on its own, so one signal is enough.
pub const WAKE_SIGNAL_INTERVAL_NS: u64 = 1_000_000_000;

/// Bytes of the wake ring buffer: 16k signals (16 B each plus an 8-byte
/// header): a sweep over many sleeping apps at once is absorbed.
pub const WAKE_RING_BYTES: u32 = 1 << 19;

/// Value of `svl_activity_v2` (per-CPU array indexed by app id): each CPU
/// counts its own packets without atomics or shared cache lines; the agent
/// sums the CPUs (and takes the latest `last_seen_ns`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Activity {
    /// CLOCK_MONOTONIC (coarse) nanoseconds of the last packet seen.
    pub last_seen_ns: u64,
    pub packets: u64,
    pub bytes: u64,
}

/// `Config::flags`: an IPv4 activator is set.
pub const CONFIG_F_ACTIVATOR4: u32 = 1;
/// `Config::flags`: an IPv6 activator is set.
pub const CONFIG_F_ACTIVATOR6: u32 = 1 << 1;
/// `Config::flags`: the IPv4 VIP range is set.
pub const CONFIG_F_VIP4: u32 = 1 << 2;
/// `Config::flags`: the IPv6 VIP range is set.
pub const CONFIG_F_VIP6: u32 = 1 << 3;
/// `Config::flags`: the agent is carrying connections over from an earlier
/// map layout; a segment without state may belong to one not carried yet,
/// so it is dropped (the client retransmits) rather than reset.
pub const CONFIG_F_UPGRADING: u32 = 1 << 4;

/// Single entry of `svl_config_v2`. A map rather than load-time globals so a
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
    /// SipHash key of the flow hash that picks a backend for a new
    /// connection. The same on every node, so every node picks the same pod;
    /// secret, so a client cannot steer its flows to one pod.
    pub hash_key: [u64; 2],
    /// Conntrack idle timeouts, seconds (see `conntrack::Timeouts`).
    pub ct_syn_timeout_s: u32,
    pub ct_established_timeout_s: u32,
    pub ct_close_timeout_s: u32,
    pub ct_udp_timeout_s: u32,
    /// New connections each CPU may track per second (0: no limit). Past it
    /// new connections are refused (counted), so a flood can neither fill the
    /// table faster than half-open entries expire nor touch established ones.
    pub ct_new_per_cpu_per_sec: u32,
    pub pad: u32,
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

/// What the programs did with a packet; index of `svl_verdicts_v3`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Not addressed to a VIP: passed untouched.
    PassNotVip = 0,
    /// New connection DNATed to a backend chosen by consistent hash (conntrack entry created).
    BackendNewFlow = 1,
    /// Packet of a tracked connection DNATed to its backend.
    BackendEstablished = 2,
    /// App known but no ready backend: DNATed to the activator.
    ActivatorNoBackend = 3,
    /// VIP in range but no app holds this VIP/port/protocol: to the activator.
    ActivatorUnknownService = 4,
    /// Contested VIP: to the activator.
    ActivatorCollision = 5,
    /// IPv6 fragment addressed to a VIP: dropped (not translated; see README).
    DropFragment = 6,
    /// Neither TCP, UDP nor a translatable ICMP error, addressed to a VIP: dropped.
    DropUnsupportedProtocol = 7,
    /// Headers truncated or inconsistent: passed untouched for the kernel to judge.
    PassMalformed = 8,
    /// Would go to the activator but none is configured for the family: dropped.
    DropNoActivator = 9,
    /// New connection refused: the new-connection table would not take it.
    DropCtFull = 10,
    /// Reply from a backend or the activator rewritten to come from the VIP.
    ReplyTranslated = 11,
    /// ICMP error about a translated connection, translated.
    IcmpErrorTranslated = 12,
    /// Egress packet not belonging to a translated connection: passed untouched.
    EgressPass = 13,
    /// Internal error (helper failure); packet aborted.
    Aborted = 14,
    /// New connection refused: this CPU's budget of new connections per second is spent (flood guard).
    DropCtRateLimited = 15,
    /// New connection refused: no unique reply tuple could be found for it.
    DropCtClash = 16,
    /// TCP segment that cannot open a connection, for a connection we do not track: answered with a RST from XDP.
    RstNoConnection = 17,
    /// Segment of a connection whose pod is gone: answered with a RST, conntrack entry closed.
    RstBackendGone = 18,
    /// RST (or a segment a RST cannot answer) for a connection we do not track: dropped.
    DropNoConnection = 19,
    /// ICMP error to a VIP about no connection we track: dropped.
    IcmpErrorNoConnection = 20,
    /// Later IPv4 fragment translated like the first fragment of its datagram.
    FragmentTranslated = 21,
    /// IPv4 fragment to a VIP whose first fragment was not seen (or was refused): dropped.
    DropFragmentUnknown = 22,
    /// Reply matching a reply entry whose connection is gone: passed untranslated, entry removed.
    EgressStaleReply = 23,
    /// A flow the activator held but never answered (UDP, or a TCP SYN
    /// retransmission) moved to a pod that became ready.
    MovedFromActivator = 24,
    /// For a pod on another node: encapsulated to that node, which owns the
    /// connection and answers the client directly. No state is kept here.
    EncapForwarded = 25,
    /// Encapsulated by another node for a pod here: outer headers removed.
    /// The inner packet is then counted under its own verdict.
    Decapsulated = 26,
    /// For a pod on another node, but the kernel has no route to that node: dropped.
    DropEncapNoRoute = 27,
    /// For a pod on another node, but its node's link-layer address is not
    /// resolved yet (the agent keeps it resolved): dropped.
    DropEncapNoNeighbour = 28,
    /// Too big to encapsulate within the fabric MTU: answered with ICMP
    /// "fragmentation needed" / "packet too big" (dropped if it cannot be).
    EncapTooBig = 29,
    /// Encapsulated packet that is malformed, not for a VIP, or has no
    /// connection and no ready pod here: dropped (never forwarded again).
    DropTunnelInvalid = 30,
    /// For a pod on another node (`--remote-mode snat`): source translated
    /// to this node's address and a port it owns, routed to the pod.
    SnatForwarded = 31,
    /// A pod's reply to a translated connection, translated back and sent
    /// to the client from the VIP.
    SnatReplyTranslated = 32,
    /// New connection refused: every SNAT port towards that pod is in use
    /// (raise the `--snat-ports` range).
    DropSnatPortsExhausted = 33,
    /// For a pod on another node (SNAT or a reply to the client), but the
    /// kernel has no route or resolved neighbour for the next hop: dropped.
    DropNoNextHop = 34,
    /// Socket hooks: a `connect()` to a VIP was pointed at a pod.
    SockConnectBackend = 35,
    /// Socket hooks: a `connect()` to a VIP was pointed at the activator
    /// (the app has no ready pod, or the VIP port is unknown or contested).
    SockConnectActivator = 36,
    /// Socket hooks: a UDP datagram to a VIP was sent to a pod.
    SockSendmsgBackend = 37,
    /// Socket hooks: a UDP datagram to a VIP was sent to the activator.
    SockSendmsgActivator = 38,
    /// Socket hooks: a datagram from a pod was shown as from the VIP.
    SockRecvmsgTranslated = 39,
    /// Socket hooks: `getpeername()` showed the VIP instead of the pod.
    SockGetpeernameTranslated = 40,
    /// Socket hooks: refused (EPERM) for want of an activator of the
    /// address family (the app has no ready pod).
    SockRefusedNoActivator = 41,
    /// Socket hooks: refused (EPERM): the chosen pod is of the other
    /// address family than the socket.
    SockRefusedFamily = 42,
    /// Socket hooks: a socket to a VIP from a skipped cgroup or network
    /// namespace, left to the per-packet path.
    SockSkipped = 43,
}

impl Verdict {
    /// Entries in `svl_verdicts_v3`.
    pub const COUNT: u32 = 48;

    pub const ALL: [Verdict; 44] = [
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
        Verdict::DropCtFull,
        Verdict::ReplyTranslated,
        Verdict::IcmpErrorTranslated,
        Verdict::EgressPass,
        Verdict::Aborted,
        Verdict::DropCtRateLimited,
        Verdict::DropCtClash,
        Verdict::RstNoConnection,
        Verdict::RstBackendGone,
        Verdict::DropNoConnection,
        Verdict::IcmpErrorNoConnection,
        Verdict::FragmentTranslated,
        Verdict::DropFragmentUnknown,
        Verdict::EgressStaleReply,
        Verdict::MovedFromActivator,
        Verdict::EncapForwarded,
        Verdict::Decapsulated,
        Verdict::DropEncapNoRoute,
        Verdict::DropEncapNoNeighbour,
        Verdict::EncapTooBig,
        Verdict::DropTunnelInvalid,
        Verdict::SnatForwarded,
        Verdict::SnatReplyTranslated,
        Verdict::DropSnatPortsExhausted,
        Verdict::DropNoNextHop,
        Verdict::SockConnectBackend,
        Verdict::SockConnectActivator,
        Verdict::SockSendmsgBackend,
        Verdict::SockSendmsgActivator,
        Verdict::SockRecvmsgTranslated,
        Verdict::SockGetpeernameTranslated,
        Verdict::SockRefusedNoActivator,
        Verdict::SockRefusedFamily,
        Verdict::SockSkipped,
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
            Verdict::DropCtFull => "drop_ct_full",
            Verdict::ReplyTranslated => "reply_translated",
            Verdict::IcmpErrorTranslated => "icmp_error_translated",
            Verdict::EgressPass => "egress_pass",
            Verdict::Aborted => "aborted",
            Verdict::DropCtRateLimited => "drop_ct_rate_limited",
            Verdict::DropCtClash => "drop_ct_clash",
            Verdict::RstNoConnection => "rst_no_connection",
            Verdict::RstBackendGone => "rst_backend_gone",
            Verdict::DropNoConnection => "drop_no_connection",
            Verdict::IcmpErrorNoConnection => "icmp_error_no_connection",
            Verdict::FragmentTranslated => "fragment_translated",
            Verdict::DropFragmentUnknown => "drop_fragment_unknown",
            Verdict::EgressStaleReply => "egress_stale_reply",
            Verdict::MovedFromActivator => "moved_from_activator",
            Verdict::EncapForwarded => "encap_forwarded",
            Verdict::Decapsulated => "decapsulated",
            Verdict::DropEncapNoRoute => "drop_encap_no_route",
            Verdict::DropEncapNoNeighbour => "drop_encap_no_neighbour",
            Verdict::EncapTooBig => "encap_too_big",
            Verdict::DropTunnelInvalid => "drop_tunnel_invalid",
            Verdict::SnatForwarded => "snat_forwarded",
            Verdict::SnatReplyTranslated => "snat_reply_translated",
            Verdict::DropSnatPortsExhausted => "drop_snat_ports_exhausted",
            Verdict::DropNoNextHop => "drop_no_next_hop",
            Verdict::SockConnectBackend => "sock_connect_backend",
            Verdict::SockConnectActivator => "sock_connect_activator",
            Verdict::SockSendmsgBackend => "sock_sendmsg_backend",
            Verdict::SockSendmsgActivator => "sock_sendmsg_activator",
            Verdict::SockRecvmsgTranslated => "sock_recvmsg_translated",
            Verdict::SockGetpeernameTranslated => "sock_getpeername_translated",
            Verdict::SockRefusedNoActivator => "sock_refused_no_activator",
            Verdict::SockRefusedFamily => "sock_refused_family",
            Verdict::SockSkipped => "sock_skipped",
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
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for CtBudget {}
    unsafe impl aya::Pod for CtSummary {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for NodeValue {}
    unsafe impl aya::Pod for Fabric {}
    unsafe impl aya::Pod for RemoteFlow {}
    unsafe impl aya::Pod for WakeEvent {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SockRevValue {}
    unsafe impl aya::Pod for SockConfig {}
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
        assert_eq!(size_of::<AppValue>(), 16 + HOSTNAME_LEN);
        assert_eq!(size_of::<BackendKey>(), 8);
        assert_eq!(size_of::<Backend>(), 20);
        assert_eq!(size_of::<Activity>(), 24);
        assert_eq!(size_of::<CtKey>(), 40);
        assert_eq!(size_of::<CtEntry>(), 56);
        assert_eq!(size_of::<FragKey>(), 40);
        assert_eq!(size_of::<FragValue>(), 32);
        assert_eq!(size_of::<CtBudget>(), 16);
        assert_eq!(size_of::<CtSummary>(), 8 * 8 + 24);
        assert_eq!(size_of::<Config>(), 6 * 16 + 8 + 16 + 24);
        assert_eq!(size_of::<NodeValue>(), 24);
        assert_eq!(size_of::<Fabric>(), 20);
        assert_eq!(size_of::<WakeEvent>(), 16);
        assert_eq!(size_of::<SockRevKey>(), 32);
        assert_eq!(size_of::<SockRevValue>(), 24);
        assert_eq!(size_of::<SockConfig>(), 16);
        assert!(Verdict::ALL.len() as u32 <= Verdict::COUNT);
        assert!(CtEvent::ALL.len() as u32 <= CtEvent::COUNT);
        assert!(align_of::<Activity>() <= 8);
    }

    /// The kernel turns a packed verdict back into a `Verdict` by value,
    /// which is sound only if the discriminants are exactly 0..ALL.len().
    #[test]
    fn verdict_and_event_discriminants_are_dense() {
        for (i, v) in Verdict::ALL.iter().enumerate() {
            assert_eq!(*v as usize, i, "{}", v.name());
        }
        for (i, e) in CtEvent::ALL.iter().enumerate() {
            assert_eq!(*e as usize, i, "{}", e.name());
        }
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
