//! This node's place in the cluster fabric: its own addresses (pods there
//! are local), the `svl_fabric_v1` entry (encapsulation port, MTU, MSS
//! clamps, mode), and keeping the other nodes' link-layer addresses
//! resolved, because XDP cannot resolve a neighbour itself: its
//! `bpf_fib_lookup` only reads the kernel's neighbour table.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use anyhow::Context as _;
use serviceless_common::{ENCAP_OVERHEAD, FABRIC_F_ENCAP, FABRIC_F_PREFER_LOCAL, FABRIC_F_SNAT, Fabric};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::cli::{RemoteMode, RunArgs};

/// Every address configured on `iface`.
pub fn interface_addresses(iface: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getifaddrs");
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a NUL-terminated name from the kernel.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if name.to_bytes() != iface.as_bytes() {
            continue;
        }
        // SAFETY: the family says which sockaddr this is.
        match unsafe { (*ifa.ifa_addr).sa_family } as i32 {
            libc::AF_INET => {
                let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                out.push(IpAddr::from(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
            }
            libc::AF_INET6 => {
                let sin6 = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in6>() };
                out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
            }
            _ => {}
        }
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The interface's MTU.
pub fn interface_mtu(iface: &str) -> anyhow::Result<u16> {
    let path = format!("/sys/class/net/{iface}/mtu");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.trim().parse::<u16>().with_context(|| format!("{path}: '{}' is not an MTU", text.trim()))
}

/// Where this node stands: its addresses and the kernel's fabric entry.
pub struct NodeFabric {
    /// Pods on these addresses are local.
    pub own: HashSet<IpAddr>,
    pub config: Fabric,
}

/// Works out this node's address, MTU and mode from the flags and `iface`.
pub fn configure(args: &RunArgs) -> anyhow::Result<NodeFabric> {
    anyhow::ensure!(
        std::path::Path::new("/sys/class/net").join(&args.iface).exists(),
        "{}",
        crate::dataplane::missing_interface(&args.iface)
    );
    let mut own: HashSet<IpAddr> = interface_addresses(&args.iface)?.into_iter().collect();
    own.extend(args.node_address);
    let node4 = match args.node_address {
        Some(IpAddr::V4(a)) => Some(a),
        Some(IpAddr::V6(a)) => anyhow::bail!(
            "--node-address {a}: node-to-node encapsulation runs over IPv4; give the node's IPv4 address"
        ),
        None => own.iter().filter_map(|a| match a {
            IpAddr::V4(v4) if !v4.is_loopback() && !v4.is_link_local() => Some(*v4),
            _ => None,
        }).min(),
    };
    let mut config = Fabric { encap_port: args.encap_port.to_be(), ..Fabric::default() };
    let mtu = match args.fabric_mtu {
        Some(m) => m,
        None => interface_mtu(&args.iface)?,
    };
    anyhow::ensure!(mtu >= 576 + ENCAP_OVERHEAD, "--fabric-mtu {mtu} is too small to encapsulate into");
    config.mtu = mtu;
    match (args.remote_mode, node4) {
        (RemoteMode::Route, _) => {
            info!("--remote-mode route: pods on other nodes are reached by routing; their replies must come back through this node");
        }
        (RemoteMode::Dsr | RemoteMode::Snat, None) => {
            warn!(iface = %args.iface, "no IPv4 address on the interface and no --node-address: pods on other nodes are reached by routing, not encapsulation");
        }
        (mode @ (RemoteMode::Dsr | RemoteMode::Snat), Some(addr)) => {
            config.node4 = addr.octets();
            config.flags |= FABRIC_F_ENCAP;
            // Payload that still fits once an IPv4/IPv6 and a TCP header
            // and the encapsulation are added.
            config.mss4 = mtu - ENCAP_OVERHEAD - 20 - 20;
            config.mss6 = mtu - ENCAP_OVERHEAD - 40 - 20;
            if mode == RemoteMode::Snat {
                check_snat_ports(args.snat_ports.min, args.snat_ports.max)?;
                config.flags |= FABRIC_F_SNAT;
                config.snat_port_min = args.snat_ports.min;
                config.snat_port_max = args.snat_ports.max;
                info!(node = %addr, ports = ?args.snat_ports, "pods on other nodes: IPv4 connections translated to this node's address (SNAT); IPv6 ones encapsulated");
            } else {
                info!(node = %addr, mtu, mss4 = config.mss4, encap_port = args.encap_port, "pods on other nodes: encapsulated to their node, which replies directly (DSR)");
            }
        }
    }
    if args.prefer_local {
        config.flags |= FABRIC_F_PREFER_LOCAL;
    }
    Ok(NodeFabric { own, config })
}

/// Refuses a SNAT port range that overlaps the node's own ephemeral ports:
/// the pod's replies to the node's own connections would be taken for
/// translated ones (and the other way round).
fn check_snat_ports(min: u16, max: u16) -> anyhow::Result<()> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_local_port_range";
    let text = std::fs::read_to_string(PATH).with_context(|| format!("reading {PATH}"))?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(lo)), Some(Ok(hi))) = (it.next(), it.next()) else {
        anyhow::bail!("{PATH}: '{}' is not a port range", text.trim());
    };
    anyhow::ensure!(
        max < lo || min > hi,
        "--snat-ports {min}-{max} overlaps this node's ephemeral ports {lo}-{hi} ({PATH}); choose a range outside it, or narrow net.ipv4.ip_local_port_range"
    );
    Ok(())
}

/// How often every other node's address is refreshed in the neighbour table.
const NEIGHBOUR_REFRESH: Duration = Duration::from_secs(10);
/// The discard port: the packet exists only to make the kernel resolve
/// (and keep resolved) the other node's link-layer address.
const DISCARD_PORT: u16 = 9;

/// Keeps the link-layer address of every node in `nodes` resolved: a
/// one-byte datagram to each, on every change and every 10 s, makes the
/// kernel resolve it and keeps its entry in use (an unused one is
/// collected). Without it the first packets to a new node are dropped
/// (`drop_encap_no_neighbour`) until something else resolves it.
pub async fn keep_neighbours_resolved(mut nodes: watch::Receiver<Vec<IpAddr>>) {
    let socket = match UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot open a socket to resolve other nodes' addresses; encapsulated traffic waits for the kernel to resolve them");
            return;
        }
    };
    let _ = socket.set_nonblocking(true);
    let mut tick = tokio::time::interval(NEIGHBOUR_REFRESH);
    loop {
        tokio::select! {
            changed = nodes.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
        }
        let addrs = nodes.borrow_and_update().clone();
        for addr in addrs.iter().filter(|a| a.is_ipv4()) {
            if let Err(e) = socket.send_to(&[0], SocketAddr::new(*addr, DISCARD_PORT)) {
                debug!(node = %addr, error = %e, "neighbour refresh not sent");
            }
        }
    }
}
