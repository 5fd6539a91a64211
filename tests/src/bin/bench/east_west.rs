//! East-west: a client on the node (a process in the node namespace)
//! opening short HTTP connections to a VIP, through the socket hooks vs
//! kube-proxy-style iptables DNAT and nftables DNAT on the OUTPUT hook, at
//! N apps, in the same run against the same pod. Each configuration runs
//! the same client binary (`svl-sock-client load`, 4 closed-loop threads,
//! SO_LINGER 0) in the agent's hooked cgroup.
//!
//! The hooks row proves its path: the `sock_connect_backend` counter moves
//! by exactly the number of connections made, and `backend_new_flow` (the
//! XDP path) not at all.

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context as _, bail};
use serviceless_tests::{cluster::sock_client_command, netns::output, scenario::inspect, topology::Topology};

use super::{Budget, Row, TRAFFIC_POD, connection_rows, rules, rules::Svc, traffic::Load, vip, write_file_source};

const THREADS: &str = "4";

pub fn run(b: &Budget, server: &Path, sizes: &[usize], baselines: bool, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let mut topo = Topology::new("svlbe", server)?;
    topo.add_pod(1, "pod-1")?;
    for (k, v) in [("net.ipv4.ip_local_port_range", "1024 65000"), ("net.ipv4.tcp_tw_reuse", "1")] {
        topo.node.exec("sysctl", &["-qw", &format!("{k}={v}")])?;
    }
    // The node's own route to the VIPs, as a node's default route gives
    // one: iptables/nftables DNAT on OUTPUT needs a route to start from.
    topo.node.ip("route replace 10.96.0.0/16 dev up0")?;
    let cgroup = topo.cgroup.as_ref().context("no cgroup v2 hierarchy: the socket hooks cannot be measured")?.path.clone();
    for &n in sizes {
        let svcs: Vec<Svc> = (0..n).map(|i| Svc { vip: vip(i), pod: TRAFFIC_POD }).collect();
        // The last service: the worst case for iptables' linear KUBE-SERVICES.
        let target = SocketAddr::new(svcs[n - 1].vip.into(), 80);
        topo.max_apps = n as u32 + 64;
        let load = |tag: &str| -> anyhow::Result<Load> { client_load(&topo, &cgroup, target, b.traffic_secs, tag) };
        let node = topo.node.name.clone();
        let (ipt, nft) = if baselines {
            rules::iptables_restore(&node, &rules::iptables_full_local(&svcs), true)?;
            let ipt = load("iptables");
            rules::iptables_restore(&node, rules::IPTABLES_EMPTY, false)?;
            rules::nft_apply(&node, &rules::nft_full_local(&svcs))?;
            let nft = load("nftables");
            rules::nft_clear(&node);
            (Some(ipt?), Some(nft?))
        } else {
            (None, None)
        };

        let file = topo.work_dir.join(format!("east-west-{n}.json"));
        write_file_source(&file, &svcs)?;
        let mut agent = topo.start_agent(&file, &format!("east-west-agent-{n}.log"), &["--detach-on-exit"])?;
        let ours = (|| {
            topo.wait_ready(Duration::from_secs(300))?;
            let counters = |name: &str| inspect(&topo)["counters"][name].as_u64().unwrap_or(0);
            let before = (counters("sock_connect_backend"), counters("backend_new_flow"));
            let ours = load("hooks")?;
            let after = (counters("sock_connect_backend"), counters("backend_new_flow"));
            let attempts = ours.ok + ours.errors;
            println!(
                "east-west path check at {n} apps: sock_connect_backend +{} for {attempts} connections, backend_new_flow +{}",
                after.0 - before.0,
                after.1 - before.1
            );
            if after.0 - before.0 != attempts || after.1 != before.1 {
                bail!("the hooks row did not take the path it names: sock_connect_backend +{} for {attempts} connections, backend_new_flow +{}", after.0 - before.0, after.1 - before.1);
            }
            Ok(ours)
        })();
        agent.terminate();
        let ours = ours?;

        let note = format!(
            "a process on the node, {THREADS} closed-loop clients, {} s, one request per connection, to the last of N VIPs; ours: socket hooks (path checked: one sock_connect_backend per connection, no XDP flow); baselines: DNAT on OUTPUT",
            b.traffic_secs.as_secs()
        );
        let names = ("east-west", "in-node new connections/s", "in-node connect+request latency (p50, p99)");
        rows.extend(connection_rows(names, n, ours, ipt, nft, note, "connect to EOF, from a process on the node; median column is p50"));
    }
    Ok(())
}

/// `svl-sock-client load` in the node namespace and the hooked cgroup.
fn client_load(topo: &Topology, cgroup: &Path, target: SocketAddr, secs: Duration, tag: &str) -> anyhow::Result<Load> {
    let latencies = topo.work_dir.join(format!("east-west-{tag}.lat"));
    let (target, secs_arg) = (target.to_string(), secs.as_secs_f64().to_string());
    let args = ["load", &target, "--threads", THREADS, "--secs", &secs_arg, "--latencies", latencies.to_str().context("path")?];
    let out = output(sock_client_command(&topo.node, cgroup, &args)?)?;
    let field = |name: &str| -> u64 {
        out.split_whitespace().find_map(|w| w.strip_prefix(name)).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    let (ok, errors) = (field("ok="), field("err="));
    if ok == 0 {
        bail!("{tag}: no connection succeeded to {target}: {out}");
    }
    let latencies_us: Vec<f64> = std::fs::read_to_string(&latencies)?.lines().filter_map(|l| l.parse().ok()).collect();
    Ok(Load { ok, errors, conns_per_s: ok as f64 / secs.as_secs_f64(), latencies_us })
}
