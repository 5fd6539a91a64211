//! Command line. Every option has a default a single node can run with.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    str::FromStr,
    time::Duration,
};

use clap::{Args, Parser, Subcommand};
use serviceless_common::DEFAULT_PIN_DIR;

use crate::{dataplane::XdpAttachMode, model::VipRange};

#[derive(Parser, Debug)]
#[command(
    name = "serviceless",
    version,
    about = "Node dataplane that sends each app's traffic (VIP:port) to its live pods, or to the activator when it has none, without Kubernetes Services",
    long_about = None
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log filter (tracing EnvFilter syntax), e.g. "info" or "serviceless=debug".
    #[arg(long, global = true, env = "SERVICELESS_LOG", default_value = "info")]
    pub log: String,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    pub log_json: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the node daemon: attach the programs and keep the maps up to date.
    Run(Box<RunArgs>),
    /// Show apps, backends, connections and counters from the pinned maps (works while the daemon is down).
    Inspect(InspectArgs),
    /// Remove the programs from an interface and unpin every map (drops all connections).
    Detach(DetachArgs),
    /// Run the cluster's VIP allocator (a Deployment; one replica is elected
    /// through a Lease): record a unique VIP for every new app as an
    /// AppAddress, decide which namespace owns each hostname, release the
    /// VIPs of apps that are gone.
    Allocate(AllocateArgs),
}

#[derive(Args, Debug, Clone)]
pub struct AllocateArgs {
    /// VIP range (CIDR) to allocate from; repeat for IPv4 and IPv6. Must
    /// match the agents' --vip-range. IPv4 is used unless an app's pods are IPv6.
    #[arg(long = "vip-range", env = "SERVICELESS_VIP_RANGES", value_delimiter = ',', default_value = "10.96.0.0/12")]
    pub vip_ranges: Vec<VipRange>,
    /// Which namespaces may take which hostnames: `<namespace>=<suffix>`,
    /// repeatable; the namespace may be `*` or end in `*` (a prefix), a
    /// suffix starting with '.' matches names under it, otherwise the exact
    /// name. With no rule every namespace may take any hostname. Example:
    /// `--hostname-rule 'team-a=.a.apps.example.com' --hostname-rule '*=.shared.example.com'`.
    #[arg(long = "hostname-rule", env = "SERVICELESS_HOSTNAME_RULES", value_delimiter = ',')]
    pub hostname_rules: Vec<HostnameRule>,
    /// How long an app may be gone (no pod, no Deployment in its namespace)
    /// before its VIP and hostname are released for others.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    pub release_after: Duration,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "SERVICELESS_LISTEN", default_value = "0.0.0.0:9096")]
    pub listen: SocketAddr,
    /// API requests per second (allocation is one create per new app).
    #[arg(long, env = "SERVICELESS_API_QPS", default_value_t = 100)]
    pub api_qps: u32,
    /// Namespace of the election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    pub namespace: String,
    /// Name of the election Lease.
    #[arg(long, default_value = "serviceless-vip-allocator")]
    pub lease_name: String,
    /// This replica's name in the Lease (default: the pod name, else host name and process id).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
}

/// `<namespace>=<suffix>`: who may take which hostnames.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostnameRule {
    pub namespace: String,
    pub suffix: String,
}

impl HostnameRule {
    pub fn matches(&self, namespace: &str, hostname: &str) -> bool {
        let ns_ok = match self.namespace.strip_suffix('*') {
            Some(prefix) => namespace.starts_with(prefix),
            None => namespace == self.namespace,
        };
        let host_ok = if self.suffix.starts_with('.') { hostname.ends_with(&self.suffix) } else { hostname == self.suffix };
        ns_ok && host_ok
    }
}

impl FromStr for HostnameRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ns, suffix) = s
            .split_once('=')
            .ok_or_else(|| format!("'{s}' is not <namespace>=<hostname suffix>, e.g. team-a=.a.apps.example.com"))?;
        let (ns, suffix) = (ns.trim(), suffix.trim().to_ascii_lowercase());
        if ns.is_empty() || suffix.is_empty() || suffix == "." {
            return Err(format!("'{s}': both a namespace (or *) and a suffix are needed"));
        }
        crate::model::validate_hostname(suffix.trim_start_matches('.')).map_err(|e| format!("'{s}': {e}"))?;
        Ok(Self { namespace: ns.to_string(), suffix })
    }
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Node uplink to attach to (XDP ingress, TC egress).
    #[arg(long, env = "SERVICELESS_IFACE")]
    pub iface: String,
    /// An external activator (IPv4 ip:port) to send traffic for apps with
    /// no ready pod (and unknown VIP ports) to. Default: this agent's own
    /// activator, on the node address and --activator-port, which holds
    /// those connections, wakes the app and hands them to its first pod.
    #[arg(long, env = "SERVICELESS_ACTIVATOR")]
    pub activator: Option<SocketAddr>,
    /// An external IPv6 activator, [ip]:port (the agent's own serves IPv4).
    #[arg(long, env = "SERVICELESS_ACTIVATOR6")]
    pub activator6: Option<SocketAddr>,
    /// Port of the agent's own activator (TCP and UDP, on the node address).
    #[arg(long, env = "SERVICELESS_ACTIVATOR_PORT", default_value_t = 8012)]
    pub activator_port: u16,
    /// How long a connection to a waking app waits for a ready pod before
    /// it gets 503 + Retry-After (HTTP) or is closed. An app may set its own
    /// (`serviceless.io/hold-timeout`, `holdTimeout:` in the file).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub hold_timeout: Duration,
    /// Connections held at once for one waking app; more get 503 / closed.
    #[arg(long, default_value_t = 1000)]
    pub max_held_per_app: usize,
    /// Connections held at once for all apps.
    #[arg(long, default_value_t = 10000)]
    pub max_held: usize,
    /// Wake budget: apps this node may wake per minute (bursts up to it).
    /// Past it, wakes are refused (counted) and their connections get 503,
    /// so a scanner sweeping sleeping VIPs cannot wake them all.
    #[arg(long, env = "SERVICELESS_WAKES_PER_MINUTE", default_value_t = 120)]
    pub wakes_per_minute: u32,
    /// Wake budget per namespace (Kubernetes apps; the file source has no namespaces).
    #[arg(long, env = "SERVICELESS_NAMESPACE_WAKES_PER_MINUTE", default_value_t = 30)]
    pub namespace_wakes_per_minute: u32,
    /// How long a failing wake (scale request) is retried, with backoff.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2m")]
    pub wake_retry_for: Duration,
    /// Longest a scale command (file source `scale.exec`) may run.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub scale_exec_timeout: Duration,
    /// Other agents (their --listen address, ip:port) whose traffic counts
    /// when putting idle apps to sleep: an app sleeps only when none of them
    /// saw a packet for it within its idle window. The agent with the lowest
    /// address decides; with peers, serve --listen on an address they reach.
    /// With the Kubernetes source and no --peers, the peers are the agent
    /// pods this selects in --namespace (the DaemonSet's; their pod IP is
    /// their node's, their port that of this agent's --listen).
    #[arg(long, env = "SERVICELESS_PEERS", value_delimiter = ',')]
    pub peers: Vec<SocketAddr>,
    /// Answer DNS for app hostnames on this address (UDP and TCP), e.g.
    /// 10.0.0.1:53 for the edge load balancer to look VIPs up. Off unless given.
    #[arg(long, env = "SERVICELESS_DNS_LISTEN")]
    pub dns_listen: Option<SocketAddr>,
    /// Zones the DNS server answers (app hostnames under them); names
    /// outside are refused, unknown ones inside get NXDOMAIN. Repeatable.
    #[arg(long = "dns-zone", env = "SERVICELESS_DNS_ZONES", value_delimiter = ',')]
    pub dns_zones: Vec<String>,
    /// TTL of DNS answers, seconds (short: a VIP may move).
    #[arg(long, default_value_t = 5)]
    pub dns_ttl: u32,
    /// DNS queries each source address may ask per second; past it they are
    /// dropped unanswered (counted), so floods cost little and amplify nothing.
    #[arg(long, default_value_t = 200)]
    pub dns_qps_per_source: u32,
    /// Label selector of the agent pods (Kubernetes peer discovery).
    #[arg(long, env = "SERVICELESS_PEER_SELECTOR", default_value = "app.kubernetes.io/name=serviceless-agent")]
    pub peer_selector: String,
    /// Namespace the agent pods run in (Kubernetes peer discovery).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    pub namespace: String,
    /// Desired state: `kubernetes` (Pod watch; in-cluster config or KUBECONFIG) or
    /// `file:<path>` (YAML or JSON, reloaded on change).
    #[arg(long, env = "SERVICELESS_SOURCE")]
    pub source: SourceSpec,
    /// VIP range (CIDR); repeat for IPv4 and IPv6. Only addresses in a range are treated as VIPs.
    #[arg(long = "vip-range", env = "SERVICELESS_VIP_RANGES", value_delimiter = ',', default_value = "10.96.0.0/12")]
    pub vip_ranges: Vec<VipRange>,
    /// bpffs directory for pinned maps and links.
    #[arg(long, env = "SERVICELESS_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// XDP attach mode; use `generic` for devices without native XDP.
    #[arg(long, value_enum, default_value_t = XdpAttachMode::Driver)]
    pub xdp_mode: XdpAttachMode,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "SERVICELESS_LISTEN", default_value = "127.0.0.1:9095")]
    pub listen: SocketAddr,
    /// Capacity of the app tables (apps).
    #[arg(long, default_value_t = serviceless_common::default_capacity::APPS)]
    pub max_apps: u32,
    /// Capacity of the VIP:port table (app ports).
    #[arg(long, default_value_t = serviceless_common::default_capacity::SERVICES)]
    pub max_services: u32,
    /// Capacity of the backend table (pods, all apps).
    #[arg(long, default_value_t = serviceless_common::default_capacity::BACKENDS)]
    pub max_backends: u32,
    /// Established connections the conntrack table holds. Nothing evicts
    /// them: when it is full, a newly completed handshake stays in the
    /// new-connection table (counted as `promote_failed`) until room frees up.
    #[arg(long, default_value_t = serviceless_common::default_capacity::CONNTRACK / 2)]
    pub max_connections: u32,
    /// New (half-open TCP) connections and UDP flows tracked. An LRU: a SYN
    /// flood larger than this pushes out other connections that have not
    /// completed their handshake (never established ones).
    #[arg(long, default_value_t = serviceless_common::default_capacity::CT_NEW / 2)]
    pub max_new_connections: u32,
    /// Conntrack: idle timeout of a half-open TCP connection (SYN seen, not established).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    pub ct_syn_timeout: Duration,
    /// Conntrack: idle timeout of an established (or half-closed) TCP connection.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "6h")]
    pub ct_established_timeout: Duration,
    /// Conntrack: how long a TCP connection is kept after FIN from both sides or a RST.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub ct_close_timeout: Duration,
    /// Conntrack: idle timeout of a UDP flow.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub ct_udp_timeout: Duration,
    /// Flood guard: new connections each CPU may track per second (0: no
    /// limit). Past it new connections are refused (`drop_ct_rate_limited`);
    /// established ones are never touched.
    #[arg(long, default_value_t = serviceless_common::default_timeout::NEW_PER_CPU_PER_SEC)]
    pub ct_new_per_cpu: u32,
    /// How often the in-kernel conntrack garbage collector runs.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
    pub ct_gc_interval: Duration,
    /// File with the 128-bit flow hash key (32 hex digits) that picks a pod
    /// for each new connection. Give every node the same key (in Kubernetes,
    /// a Secret) so they all pick the same pod; without one, a random key is
    /// kept for this node.
    #[arg(long, env = "SERVICELESS_FLOW_HASH_KEY_FILE")]
    pub flow_hash_key_file: Option<PathBuf>,
    /// This node's address: pods whose node (`status.hostIP`) is another
    /// address are reached by encapsulating to that node, which answers the
    /// client directly. Default: the first IPv4 address of --iface. In a
    /// DaemonSet, set it from the downward API (`status.hostIP`).
    #[arg(long, env = "SERVICELESS_NODE_ADDRESS")]
    pub node_address: Option<IpAddr>,
    /// How pods on other nodes are reached. `dsr`: encapsulated (UDP) to
    /// their node, which owns the connection and replies to the client
    /// directly, so pods see the client's address. `snat`: IPv4
    /// connections leave with this node's address (and a port of
    /// --snat-ports) as their source and replies come back here, for
    /// networks that drop packets from a VIP sent by another node (cloud
    /// anti-spoofing); pods see this node's address, and a connection's
    /// packets must keep arriving at this node. `route`: translated here
    /// and handed to the kernel's routing; works only where the pod's
    /// replies are routed back through this node.
    #[arg(long, value_enum, env = "SERVICELESS_REMOTE_MODE", default_value_t = RemoteMode::Dsr)]
    pub remote_mode: RemoteMode,
    /// --remote-mode snat: source ports this node may translate to, inclusive.
    /// Must not overlap the node's own ephemeral ports
    /// (net.ipv4.ip_local_port_range), whose replies would be taken for
    /// translated connections'.
    #[arg(long, env = "SERVICELESS_SNAT_PORTS", default_value = "61000-65535")]
    pub snat_ports: PortRange,
    /// UDP port of the node-to-node encapsulation (open it between nodes).
    #[arg(long, env = "SERVICELESS_ENCAP_PORT", default_value_t = 6080)]
    pub encap_port: u16,
    /// Largest packet the node-to-node network carries. Default: the MTU of
    /// --iface. TCP SYNs to VIPs are clamped to fit it once encapsulated.
    #[arg(long, env = "SERVICELESS_FABRIC_MTU")]
    pub fabric_mtu: Option<u16>,
    /// Send a new connection to a ready pod on this node when there is one
    /// (no node-to-node hop), instead of the same pod every node would pick.
    #[arg(long, env = "SERVICELESS_PREFER_LOCAL")]
    pub prefer_local: bool,
    /// Other nodes the node table can hold.
    #[arg(long, default_value_t = serviceless_common::default_capacity::NODES)]
    pub max_nodes: u32,
    /// Flows this node sent to pods on other nodes that it remembers (LRU,
    /// 48 B each), so their packets keep going to the same node when the
    /// app's pods change; a forgotten one is hashed anew.
    #[arg(long, default_value_t = serviceless_common::default_capacity::REMOTE_FLOWS)]
    pub max_remote_flows: u32,
    /// Connect-time load balancing for clients on this node (pods and host
    /// processes): cgroup v2 socket hooks point a connect() or UDP send to
    /// a VIP straight at a pod (or the activator), with no per-packet NAT.
    /// `on` (the default) attaches them wherever the node has a cgroup v2
    /// hierarchy, and says so when it has none; `off` removes them.
    #[arg(long, value_enum, env = "SERVICELESS_SOCKET_LB", default_value_t = SocketLb::On)]
    pub socket_lb: SocketLb,
    /// The cgroup v2 hierarchy the socket hooks attach to (every process
    /// below it is covered). A directory holding the v1 tree with v2 at
    /// `unified/` (the hybrid layout) works too. Default: the node's own
    /// (/sys/fs/cgroup, /sys/fs/cgroup/unified, or any cgroup2 mount). In a
    /// DaemonSet, mount the host's /sys/fs/cgroup and point here.
    #[arg(long, env = "SERVICELESS_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
    /// Socket hooks translate only sockets in this agent's network
    /// namespace (the host's); pods reach VIPs through the per-packet
    /// path. For sidecar meshes and sandboxed runtimes that must see the VIP.
    #[arg(long, env = "SERVICELESS_SOCKET_LB_HOST_NETNS_ONLY")]
    pub socket_lb_host_netns_only: bool,
    /// cgroup v2 directories whose processes (and those of cgroups below)
    /// the socket hooks leave alone (repeat, or separate with commas).
    #[arg(long = "socket-lb-skip-cgroup", env = "SERVICELESS_SOCKET_LB_SKIP_CGROUPS", value_delimiter = ',')]
    pub socket_lb_skip_cgroups: Vec<PathBuf>,
    /// Sockets the hooks translated that are remembered, so recvmsg() and
    /// getpeername() show the VIP (LRU, about 100 B each).
    #[arg(long, default_value_t = serviceless_common::default_capacity::SOCK_REV)]
    pub max_socket_translations: u32,
    /// On exit, detach the programs and unpin the maps (default: leave traffic flowing).
    #[arg(long)]
    pub detach_on_exit: bool,
    /// Kubernetes source: API requests per second this agent may send.
    #[arg(long, env = "SERVICELESS_API_QPS", default_value_t = 20)]
    pub api_qps: u32,
    /// Kubernetes source: this node's name (identifies the agent in Events).
    #[arg(long, env = "NODE_NAME", default_value = "unknown-node")]
    pub node_name: String,
    /// Where the agent records which pods back each app, for `inspect`.
    #[arg(long, env = "SERVICELESS_STATE_FILE", default_value = DEFAULT_STATE_FILE)]
    pub state_file: PathBuf,
}

/// An inclusive port range, `low-high`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (lo, hi) = s.split_once('-').ok_or_else(|| format!("'{s}' is not a range like 61000-65535"))?;
        let port = |p: &str| p.trim().parse::<u16>().map_err(|_| format!("'{p}' is not a port"));
        let (min, max) = (port(lo)?, port(hi)?);
        if min == 0 || min > max {
            return Err(format!("'{s}': the range must be low-high with 1 <= low <= high"));
        }
        Ok(Self { min, max })
    }
}

/// How pods on other nodes are reached (`--remote-mode`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteMode {
    /// Encapsulate to the pod's node; it replies to the client directly.
    Dsr,
    /// Translate the source to this node's address; replies come back here.
    Snat,
    /// Hand the translated packet to the kernel's routing.
    Route,
}

/// Pod names per app, written by `run`, read by `inspect`.
pub const DEFAULT_STATE_FILE: &str = "/run/serviceless/sources.json";

/// Where desired state comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    File(PathBuf),
    Kubernetes,
}

impl FromStr for SourceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "kubernetes" {
            return Ok(SourceSpec::Kubernetes);
        }
        match s.split_once(':') {
            Some(("file", path)) if !path.is_empty() => Ok(SourceSpec::File(path.into())),
            _ => Err(format!("unknown source '{s}'; expected `kubernetes` or file:<path>")),
        }
    }
}

/// `--socket-lb`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SocketLb {
    #[default]
    On,
    Off,
}

#[derive(Args, Debug, Clone)]
pub struct InspectArgs {
    /// bpffs directory of the pinned maps.
    #[arg(long, env = "SERVICELESS_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Show at most this many connections.
    #[arg(long, default_value_t = 50)]
    pub connections: usize,
    /// Only this app (hostname).
    #[arg(long)]
    pub app: Option<String>,
    /// The agent's record of which pods back each app (see `run --state-file`).
    #[arg(long, env = "SERVICELESS_STATE_FILE", default_value = DEFAULT_STATE_FILE)]
    pub state_file: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct DetachArgs {
    #[arg(long, env = "SERVICELESS_IFACE")]
    pub iface: String,
    #[arg(long, env = "SERVICELESS_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn port_ranges_parse_and_bad_ones_are_explained() {
        assert_eq!("61000-65535".parse::<PortRange>(), Ok(PortRange { min: 61000, max: 65535 }));
        assert_eq!("7-7".parse::<PortRange>(), Ok(PortRange { min: 7, max: 7 }));
        for bad in ["61000", "65535-61000", "0-10", "a-b", "1-70000"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn remote_mode_defaults_to_dsr_and_snat_ports_stay_off_linux_ephemeral_range() {
        let cli = Cli::try_parse_from(["serviceless", "run", "--iface", "eth0", "--source", "kubernetes"]).unwrap();
        let Command::Run(args) = cli.command else { panic!("run") };
        assert_eq!(args.remote_mode, RemoteMode::Dsr);
        assert!(!args.prefer_local);
        assert_eq!(args.encap_port, 6080);
        // Linux's default ip_local_port_range is 32768-60999.
        assert!(args.snat_ports.min > 60999);
        let cli = Cli::try_parse_from(["serviceless", "run", "--iface", "eth0", "--source", "kubernetes", "--remote-mode", "snat", "--snat-ports", "62000-62999"]).unwrap();
        let Command::Run(args) = cli.command else { panic!("run") };
        assert_eq!((args.remote_mode, args.snat_ports), (RemoteMode::Snat, PortRange { min: 62000, max: 62999 }));
    }
}
