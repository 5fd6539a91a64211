//! Pods on other nodes: the per-packet cost of the encapsulating (front
//! node) and decapsulating (pod's node) paths against the local hit path
//! measured alongside, and requests through a remote pod against a local
//! one on a two-node cluster.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use anyhow::Context as _;
use serviceless_agent::model::AppSpec;
use serviceless_common::{ENCAP_OVERHEAD, FABRIC_F_ENCAP, Fabric, Verdict as V};
use serviceless_tests::{
    TEST_SIZES, TestDataplane,
    xdp_pass::Floor,
    cluster::Cluster,
    netns::Netns,
    packet::{ACK, Packet, SYN},
};

use super::{Budget, Row, proven, replayed, single, stat, traffic};

const NODE_A: &str = "192.0.2.11";
const NODE_B: &str = "192.0.2.12";
const CLIENT: &str = "10.1.0.1";
const LOCAL_VIP: &str = "10.96.0.41";
const REMOTE_VIP: &str = "10.96.0.40";

fn fabric(node: &str) -> Fabric {
    let node4: Ipv4Addr = node.parse().expect("node address");
    Fabric { node4: node4.octets(), flags: FABRIC_F_ENCAP, encap_port: 6080u16.to_be(), mtu: 1500, mss4: 1500 - ENCAP_OVERHEAD - 40, mss6: 1500 - ENCAP_OVERHEAD - 60, snat_port_min: 0, snat_port_max: 0 }
}

fn one_pod(host: &str, vip: &str, pod: &str, node: Option<&str>) -> AppSpec {
    let mut a = serviceless_tests::app(host, vip, &[(pod, true)]);
    a.backends[0].node = node.map(|n| n.parse::<IpAddr>().expect("node"));
    a
}

/// Completes a handshake through `front` (and `owner`, when the front node
/// encapsulates) so the connection is in the owner's established table.
fn establish(front: &TestDataplane, owner: &TestDataplane, ifindex: u32, vip: &str, pod: &str, sport: u16) -> anyhow::Result<()> {
    let syn = Packet::tcp(CLIENT, sport, vip, 80);
    let (_, out) = front.ingress_on(ifindex, &syn.frame())?;
    if !std::ptr::eq(front, owner) {
        owner.ingress(&out)?;
    }
    let synack = Packet::tcp(pod, 8080, CLIENT, sport).flags(SYN | ACK).with(|p| p.seq = 7000);
    owner.egress(&synack.frame())?;
    let ack = Packet::tcp(CLIENT, sport, vip, 80).flags(ACK).with(|p| p.ack = 7001);
    let (_, out) = front.ingress_on(ifindex, &ack.frame())?;
    if !std::ptr::eq(front, owner) {
        owner.ingress(&out)?;
    }
    Ok(())
}

/// Per-packet rows, replayed (see `super::replayed`: each repeated run gets
/// the original frame back, so encapsulating or decapsulating it again is
/// what every run measures), in a network namespace whose routes and
/// neighbour entries the encapsulation looks up.
pub fn per_packet(b: &Budget, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let ns = Netns::new("svlbench-fab")?;
    ns.ip("link add fxa type veth peer name fxb")?;
    ns.ip(&format!("addr add {NODE_A}/24 dev fxa"))?;
    ns.ip("link set fxa up")?;
    ns.ip("link set fxb up")?;
    ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    ns.ip(&format!("neigh add {NODE_B} lladdr 02:00:00:00:00:12 dev fxa nud permanent"))?;
    let link = ns.ip("-o link show fxa")?;
    let ifindex: u32 = link.split(':').next().context("ifindex")?.trim().parse()?;
    let (repeat, trials) = (b.pkt_repeat, b.pkt_trials);
    let runs = u64::from(repeat) * trials as u64;
    let measured = ns.run(move || -> anyhow::Result<Vec<Row>> {
        let floor = Floor::load()?;
        let mut a = TestDataplane::new(TEST_SIZES)?;
        a.join_fabric(&[NODE_A], &fabric(NODE_A))?;
        let o = a.apply(vec![
            one_pod("remote.bench", REMOTE_VIP, "10.244.2.2", Some(NODE_B)),
            one_pod("local.bench", LOCAL_VIP, "10.244.1.2", None),
        ]);
        anyhow::ensure!(o.failed.is_empty(), "{o:?}");
        let mut bnode = TestDataplane::new(TEST_SIZES)?;
        bnode.join_fabric(&[NODE_B], &fabric(NODE_B))?;
        let o = bnode.apply(vec![one_pod("remote.bench", REMOTE_VIP, "10.244.2.2", None)]);
        anyhow::ensure!(o.failed.is_empty(), "{o:?}");
        establish(&a, &a, ifindex, LOCAL_VIP, "10.244.1.2", 40000)?;
        establish(&a, &bnode, ifindex, REMOTE_VIP, "10.244.2.2", 40001)?;

        let mut out = Vec::new();
        let mut add = |path: &str, samples: Vec<f64>, note: String| {
            let mut r = Row::new("per-packet", path, 1, "ns");
            r.ours = stat(samples);
            r.note = note;
            out.push(r);
        };
        let local = Packet::tcp(CLIENT, 40000, LOCAL_VIP, 80).flags(ACK).frame();
        let on_a = |frame: &[u8]| replayed(a.ingress_fd()?, &floor, frame, false, repeat, trials, Some(ifindex), || Ok(()));
        let ((s, note), proof) = proven(&a, &[V::BackendEstablished], runs, || on_a(&local))?;
        add("remote pod: local hit for comparison, established", s, format!("{note}; on the front node (ingress interface set, as below); {proof}"));
        let remote = Packet::tcp(CLIENT, 40001, REMOTE_VIP, 80).flags(ACK).frame();
        let ((s, note), proof) = proven(&a, &[V::EncapForwarded], runs, || on_a(&remote))?;
        add("remote pod: encapsulated at the front node", s, format!("{note}; no connection state on the front node: a flow-memory lookup (the node it sent the flow to) and a route lookup per packet; {proof}"));
        let (_, encapsulated) = a.ingress_on(ifindex, &remote)?;
        let ((s, note), proof) = proven(&bnode, &[V::Decapsulated, V::BackendEstablished], 2 * runs, || {
            replayed(bnode.ingress_fd()?, &floor, &encapsulated, false, repeat, trials, None, || Ok(()))
        })?;
        add("remote pod: decapsulated at the pod's node, established", s, format!("{note}; each run counts decapsulated and backend_established; {proof}"));
        Ok(out)
    })??;
    rows.extend(measured);
    Ok(())
}

/// Requests through a pod on another node against a pod on the node the
/// client reaches, on a two-node cluster with an agent on each node.
pub fn traffic(b: &Budget, server: &Path, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let mut c = Cluster::new("svlbf", 2, server)?;
    c.add_pod(1, "pod-local")?;
    c.add_pod(2, "pod-remote")?;
    c.write_apps(&[("local.bench", "10.96.0.20", &["pod-local"]), ("remote.bench", "10.96.0.10", &["pod-remote"])])?;
    for node in [1, 2] {
        c.start_agent(node, &[])?;
    }
    c.wait_ready(Duration::from_secs(30))?;
    for (path, vip, pod) in [("local pod (same node)", "10.96.0.20", "pod-local"), ("remote pod (encapsulated, DSR)", "10.96.0.10", "pod-remote")] {
        let target: SocketAddr = format!("{vip}:80").parse()?;
        let r = c.request(&target.to_string(), "/")?;
        anyhow::ensure!(r.server() == pod, "{target} answered by {}", r.server());
        let secs = b.traffic_secs;
        let load: traffic::Load = c.client.run(move || traffic::run(target, 4, secs))?;
        let mut cps = Row::new("traffic", &format!("requests/s through a {path}"), 1, "req/s");
        cps.lower_better = false;
        cps.ours = single(load.conns_per_s);
        cps.note = format!("two nodes, client routed to node 1; 4 closed-loop clients, {} s, one request per connection; {} ok, {} errors", secs.as_secs(), load.ok, load.errors);
        rows.push(cps);
        let mut lat = Row::new("traffic", &format!("request latency through a {path} (p50, p99)"), 1, "us");
        lat.ours = stat(load.latencies_us);
        lat.note = "connect to EOF; median column is p50".into();
        rows.push(lat);
    }
    Ok(())
}
