//! `serviceless inspect`: what the dataplane holds, read straight from the
//! pinned maps, so it works while the daemon is down.

use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr};

use anyhow::Context as _;
use serde::Serialize;
use serviceless_common::{
    BACKEND_READY, BackendKey, CT_DIR_FORWARD, CT_F_MIGRATED, CT_KIND_ACTIVATOR, CT_STATE_CLOSING, CT_STATE_ESTABLISHED,
    CT_STATE_FIN_WAIT, CT_STATE_SYN_RECV, CT_STATE_SYN_SENT, CT_STATE_UDP, FABRIC_F_ENCAP, FABRIC_F_PREFER_LOCAL, FABRIC_F_SNAT,
    NODE_LOCAL, SERVICE_F_ACTIVATOR_ONLY,
};

use crate::{
    cli::InspectArgs,
    conntrack::monotonic_coarse_ns,
    maps::{Capacities, CtTable, DataplaneMaps},
    model::{Protocol, from_addr},
    reconcile::stored_hostname,
    wake::{AppStatus, Phase, status_path},
};

/// Conntrack states and the names `inspect` and metrics use for them.
pub const CT_STATES: [(u8, &str); 6] = [
    (CT_STATE_SYN_SENT, "syn_sent"),
    (CT_STATE_SYN_RECV, "syn_recv"),
    (CT_STATE_ESTABLISHED, "established"),
    (CT_STATE_FIN_WAIT, "fin_wait"),
    (CT_STATE_CLOSING, "closing"),
    (CT_STATE_UDP, "udp"),
];

fn state_name(state: u8) -> &'static str {
    CT_STATES.iter().find(|(s, _)| *s == state).map_or("unknown", |(_, n)| n)
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub apps: Vec<AppReport>,
    /// Tracked connections (up to `--connections` of them).
    pub connections: Vec<ConnectionReport>,
    /// Connections in the tables, and by state, as the last GC pass counted them.
    pub connections_total: u64,
    /// Seconds since that GC pass (none yet: null).
    pub connections_counted_seconds_ago: Option<f64>,
    pub connections_by_state: BTreeMap<&'static str, u64>,
    /// Packet verdicts.
    pub counters: BTreeMap<&'static str, u64>,
    /// Conntrack lifecycle events.
    pub conntrack_events: BTreeMap<&'static str, u64>,
    pub capacity: Capacities,
    pub config: ConfigReport,
    pub map_ids: BTreeMap<&'static str, u32>,
    /// The cgroup socket hooks pinned under the pin directory (connect-time
    /// load balancing for clients on the node).
    pub socket_hooks: Vec<crate::socket_lb::AttachedHook>,
}

#[derive(Debug, Serialize)]
pub struct AppReport {
    pub id: u32,
    pub hostname: String,
    pub vip: Option<IpAddr>,
    pub ports: Vec<String>,
    /// The VIP is contested: its traffic goes to the activator.
    pub collision: bool,
    pub backends: Vec<BackendReport>,
    pub packets: u64,
    pub bytes: u64,
    /// Seconds since the last packet, if any was seen.
    pub idle_seconds: Option<f64>,
    /// Pods behind the backends (namespace/name or file name), per the agent's record.
    pub pods: Vec<String>,
    /// Scale to zero: awake, waking, asleep, refused (wake budget spent),
    /// sleeping (put to sleep, pods going). Per the agent's record; while
    /// the agent is down: awake or asleep, from the maps.
    pub state: Phase,
    /// Connections the activator holds for it (agent's record).
    pub held_connections: usize,
}

#[derive(Debug, Serialize)]
pub struct BackendReport {
    pub slot: u32,
    pub ip: IpAddr,
    pub state: &'static str,
    /// The pod's node; `None`: this node (or not known).
    pub node: Option<IpAddr>,
}

#[derive(Debug, Serialize)]
pub struct ConnectionReport {
    /// "established" (handshake completed, never evicted) or "new" (half-open TCP, UDP).
    pub table: CtTable,
    pub client: String,
    pub vip: String,
    pub protocol: String,
    /// The backend (pod or activator) address and port.
    pub to: String,
    /// "backend" or "activator".
    pub kind: &'static str,
    pub state: &'static str,
    pub app_id: Option<u32>,
    /// The client port the backend sees, when a reply-tuple clash made it differ.
    pub client_port_rewritten: Option<u16>,
    /// Carried over from the previous map layout and not seen since (expires after 10 min idle).
    pub migrated: bool,
    pub age_seconds: f64,
    pub idle_seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct ConfigReport {
    pub activator4: Option<String>,
    pub activator6: Option<String>,
    /// How pods on other nodes are reached: "dsr" (encapsulated to their
    /// node, which answers the client), "snat" (source translated to this
    /// node) or "route" (the kernel's routing).
    pub remote_mode: &'static str,
    /// Source ports SNAT uses (inclusive).
    pub snat_ports: Option<(u16, u16)>,
    /// This node's address in the fabric (the encapsulation's source).
    pub node_address: Option<IpAddr>,
    pub encap_port: Option<u16>,
    pub fabric_mtu: u16,
    /// TCP MSS SYNs and SYN-ACKs to and from VIPs are clamped to (IPv4, IPv6).
    pub mss_clamp: Option<(u16, u16)>,
    pub prefer_local: bool,
    /// Other nodes backends are on.
    pub nodes: Vec<IpAddr>,
}

fn endpoint(addr: &[u8; 16], port_be: u16) -> String {
    match from_addr(addr) {
        IpAddr::V4(ip) => format!("{ip}:{}", u16::from_be(port_be)),
        IpAddr::V6(ip) => format!("[{ip}]:{}", u16::from_be(port_be)),
    }
}

/// Reads everything `inspect` shows.
pub fn report(maps: &DataplaneMaps, connection_limit: usize, only: Option<&str>) -> Report {
    let mut by_app: BTreeMap<u32, (Option<IpAddr>, Vec<String>, bool)> = BTreeMap::new();
    for (key, value) in maps.services() {
        let entry = by_app.entry(value.app_id).or_insert((None, Vec::new(), false));
        entry.0 = Some(from_addr(&key.vip));
        let proto = Protocol::from_ip_proto(key.proto).map(|p| p.to_string()).unwrap_or_else(|| key.proto.to_string());
        entry.1.push(format!("{}->{}/{proto}", u16::from_be(key.port), u16::from_be(value.target_port)));
        entry.2 |= value.flags & SERVICE_F_ACTIVATOR_ONLY != 0;
    }
    for (key, _) in maps.backends() {
        by_app.entry(key.app_id).or_insert((None, Vec::new(), false));
    }
    let now = monotonic_coarse_ns();
    let mut apps = Vec::new();
    for (id, (vip, ports, collision)) in by_app {
        let Some(value) = maps.app(id) else { continue };
        let hostname = stored_hostname(&value.hostname);
        if only.is_some_and(|h| h != hostname) {
            continue;
        }
        let backends = (0..value.backend_count)
            .filter_map(|slot| {
                let b = maps.backend(&BackendKey { app_id: id, slot })?;
                let state = if b.state == BACKEND_READY { "ready" } else { "draining" };
                let node = (b.node != NODE_LOCAL).then(|| maps.node(b.node).map(|n| from_addr(&n.addr))).flatten();
                Some(BackendReport { slot, ip: from_addr(&b.addr), state, node })
            })
            .collect();
        let activity = maps.activity(id).unwrap_or_default();
        apps.push(AppReport {
            id,
            hostname,
            vip,
            ports,
            collision,
            backends,
            packets: activity.packets,
            bytes: activity.bytes,
            idle_seconds: (activity.last_seen_ns != 0)
                .then(|| now.saturating_sub(activity.last_seen_ns) as f64 / 1e9),
            pods: Vec::new(),
            state: if value.ready_count > 0 { Phase::Awake } else { Phase::Asleep },
            held_connections: 0,
        });
    }
    let wanted_ids: Option<Vec<u32>> = only.map(|_| apps.iter().map(|a| a.id).collect());
    let mut connections = Vec::new();
    for (table, key, entry) in maps.conntrack() {
        if connections.len() >= connection_limit {
            break;
        }
        if key.dir != CT_DIR_FORWARD || wanted_ids.as_ref().is_some_and(|ids| !ids.contains(&entry.app_id)) {
            continue;
        }
        connections.push(ConnectionReport {
            table,
            client: endpoint(&key.src, key.sport),
            vip: endpoint(&key.dst, key.dport),
            protocol: Protocol::from_ip_proto(key.proto).map(|p| p.to_string()).unwrap_or_default(),
            to: endpoint(&entry.addr, entry.port),
            kind: if entry.kind == CT_KIND_ACTIVATOR { "activator" } else { "backend" },
            state: state_name(entry.state),
            app_id: (entry.app_id != u32::MAX).then_some(entry.app_id),
            client_port_rewritten: (entry.client_port != key.sport).then(|| u16::from_be(entry.client_port)),
            migrated: entry.flags & CT_F_MIGRATED != 0,
            age_seconds: now.saturating_sub(entry.created_ns) as f64 / 1e9,
            idle_seconds: now.saturating_sub(entry.last_seen_ns) as f64 / 1e9,
        });
    }
    let summary = maps.ct_summary();
    let config = maps.config().unwrap_or_default();
    let fabric = maps.fabric().unwrap_or_default();
    let encap = fabric.flags & FABRIC_F_ENCAP != 0;
    let config = ConfigReport {
        activator4: (config.flags & serviceless_common::CONFIG_F_ACTIVATOR4 != 0)
            .then(|| endpoint(&config.activator4, config.activator4_port)),
        activator6: (config.flags & serviceless_common::CONFIG_F_ACTIVATOR6 != 0)
            .then(|| endpoint(&config.activator6, config.activator6_port)),
        remote_mode: if fabric.flags & FABRIC_F_SNAT != 0 {
            "snat"
        } else if encap {
            "dsr"
        } else {
            "route"
        },
        snat_ports: (fabric.flags & FABRIC_F_SNAT != 0).then_some((fabric.snat_port_min, fabric.snat_port_max)),
        node_address: encap.then(|| IpAddr::from(fabric.node4)),
        encap_port: encap.then(|| u16::from_be(fabric.encap_port)),
        fabric_mtu: fabric.mtu,
        mss_clamp: (fabric.mss4 != 0).then_some((fabric.mss4, fabric.mss6)),
        prefer_local: fabric.flags & FABRIC_F_PREFER_LOCAL != 0,
        nodes: maps.nodes().map(|(_, n)| from_addr(&n.addr)).collect(),
    };
    Report {
        apps,
        connections,
        connections_total: summary.by_state.iter().sum(),
        connections_counted_seconds_ago: (summary.at_ns != 0).then(|| now.saturating_sub(summary.at_ns) as f64 / 1e9),
        connections_by_state: CT_STATES.iter().map(|(s, name)| (*name, summary.by_state[*s as usize])).collect(),
        counters: maps.verdicts().into_iter().map(|(v, n)| (v.name(), n)).collect(),
        conntrack_events: maps.ct_events().into_iter().map(|(e, n)| (e.name(), n)).collect(),
        capacity: maps.capacity(),
        config,
        map_ids: maps.ids().into_iter().collect(),
        socket_hooks: Vec::new(),
    }
}

pub fn render_table(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "APPS ({})", r.apps.len());
    let _ = writeln!(out, "{:<4} {:<32} {:<16} {:<22} {:>9} {:>11} {:>8} {:<18} BACKENDS", "ID", "HOSTNAME", "VIP", "PORTS", "PACKETS", "BYTES", "IDLE", "STATE");
    for a in &r.apps {
        let vip = a.vip.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
        let idle = a.idle_seconds.map(|s| format!("{s:.0}s")).unwrap_or_else(|| "never".into());
        let backends = if a.collision {
            "VIP COLLISION -> activator".to_string()
        } else if a.backends.is_empty() {
            "none -> activator".to_string()
        } else {
            a.backends
                .iter()
                .map(|b| match b.node {
                    Some(node) => format!("{}({}, node {node})", b.ip, b.state),
                    None => format!("{}({})", b.ip, b.state),
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        let backends = if a.pods.is_empty() { backends } else { format!("{backends}  pods: {}", a.pods.join(",")) };
        let state = match a.held_connections {
            0 => format!("{:?}", a.state).to_lowercase(),
            n => format!("{:?}({n} held)", a.state).to_lowercase(),
        };
        let _ = writeln!(
            out,
            "{:<4} {:<32} {:<16} {:<22} {:>9} {:>11} {:>8} {:<18} {}",
            a.id, a.hostname, vip, a.ports.join(","), a.packets, a.bytes, idle, state, backends
        );
    }
    let by_state: Vec<String> =
        r.connections_by_state.iter().filter(|(_, n)| **n > 0).map(|(s, n)| format!("{s}={n}")).collect();
    let counted = match r.connections_counted_seconds_ago {
        Some(ago) => format!(
            "{} tracked at the last GC pass, {ago:.0}s ago: {}",
            r.connections_total,
            if by_state.is_empty() { "none".to_string() } else { by_state.join(" ") }
        ),
        None => "no GC pass yet to count them".to_string(),
    };
    let _ = writeln!(out, "\nCONNECTIONS ({} shown; {counted})", r.connections.len());
    let _ = writeln!(out, "{:<5} {:<44} {:<44} {:<44} {:<9} {:<11} {:<11} {:>8} {:>8}", "PROTO", "CLIENT", "VIP", "TO", "KIND", "STATE", "TABLE", "AGE", "IDLE");
    for c in &r.connections {
        let to = match c.client_port_rewritten {
            Some(p) => format!("{} (client port {p})", c.to),
            None => c.to.clone(),
        };
        let _ = writeln!(
            out,
            "{:<5} {:<44} {:<44} {:<44} {:<9} {:<11} {:<11} {:>7.0}s {:>7.0}s",
            c.protocol,
            c.client,
            c.vip,
            to,
            c.kind,
            c.state,
            if c.table == CtTable::Established { "established" } else { "new" },
            c.age_seconds,
            c.idle_seconds
        );
    }
    let _ = writeln!(out, "\nCOUNTERS (packets)");
    for (name, n) in &r.counters {
        if *n > 0 {
            let _ = writeln!(out, "  {name:<28} {n}");
        }
    }
    let _ = writeln!(out, "\nCONNTRACK EVENTS");
    for (name, n) in &r.conntrack_events {
        if *n > 0 {
            let _ = writeln!(out, "  {name:<28} {n}");
        }
    }
    let _ = writeln!(
        out,
        "\nCONFIG  activator4={} activator6={}  capacity: apps={} services={} backends={} conntrack entries: established={} new={}",
        r.config.activator4.as_deref().unwrap_or("-"),
        r.config.activator6.as_deref().unwrap_or("-"),
        r.capacity.apps,
        r.capacity.services,
        r.capacity.backends,
        r.capacity.conntrack,
        r.capacity.ct_new
    );
    let c = &r.config;
    match c.node_address {
        Some(node) => {
            let nodes: Vec<String> = c.nodes.iter().map(IpAddr::to_string).collect();
            let _ = writeln!(
                out,
                "FABRIC node {node}, pods on other nodes: {}; MTU {}, MSS clamp {}{}; other nodes: {}",
                match c.snat_ports {
                    Some((lo, hi)) => format!("IPv4 connections translated to this node's address, ports {lo}-{hi} (SNAT), IPv6 encapsulated (UDP {})", c.encap_port.unwrap_or(0)),
                    None => format!("encapsulated (UDP {}) to their node, which replies directly", c.encap_port.unwrap_or(0)),
                },
                c.fabric_mtu,
                c.mss_clamp.map(|(m4, m6)| format!("{m4}/{m6}")).unwrap_or_else(|| "off".into()),
                if c.prefer_local { ", prefer local pods" } else { "" },
                if nodes.is_empty() { "none".into() } else { nodes.join(" ") }
            );
        }
        None => {
            let _ = writeln!(out, "FABRIC pods on other nodes are reached by routing (--remote-mode route, or no node address)");
        }
    }
    if r.socket_hooks.is_empty() {
        let _ = writeln!(out, "SOCKET HOOKS none attached: clients on this node reach VIPs only through the per-packet path");
    } else {
        let hooks: Vec<String> =
            r.socket_hooks.iter().map(|h| format!("{}(cgroup {}, link {}, prog {})", h.hook, h.cgroup_id, h.link_id, h.program_id)).collect();
        let _ = writeln!(out, "SOCKET HOOKS {}  (bpftool cgroup tree)", hooks.join(" "));
    }
    let ids: Vec<String> = r.map_ids.iter().map(|(n, id)| format!("{n}={id}")).collect();
    let _ = writeln!(out, "MAP IDS {}  (bpftool map dump id <id>)", ids.join(" "));
    out
}

pub fn run(args: &InspectArgs) -> anyhow::Result<()> {
    let maps = DataplaneMaps::open_pinned(&args.pin_dir)
        .with_context(|| format!("opening the maps pinned under {}", args.pin_dir.display()))?;
    let mut report = report(&maps, args.connections, args.app.as_deref());
    report.socket_hooks = crate::socket_lb::attached(&crate::dataplane::Pins::new(&args.pin_dir));
    // Pod names come from the agent's record, if it wrote one.
    if let Ok(text) = std::fs::read(&args.state_file)
        && let Ok(sources) = serde_json::from_slice::<BTreeMap<String, Vec<String>>>(&text)
    {
        for app in &mut report.apps {
            app.pods = sources.get(&app.hostname).cloned().unwrap_or_default();
        }
    }
    if let Ok(text) = std::fs::read(status_path(&args.state_file))
        && let Ok(states) = serde_json::from_slice::<BTreeMap<String, AppStatus>>(&text)
    {
        for app in &mut report.apps {
            if let Some(s) = states.get(&app.hostname) {
                (app.state, app.held_connections) = (s.state, s.held);
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render_table(&report));
    }
    Ok(())
}
