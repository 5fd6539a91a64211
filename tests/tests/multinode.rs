//! Pods on other nodes, with real TCP/HTTP traffic: two and three nodes and
//! a client on one flat segment, each node running its own agent (see
//! `serviceless_tests::cluster`). Needs root; skipped (with a message)
//! otherwise.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::Duration,
};

use serviceless_tests::{
    cluster::{CLIENT_IP, Cluster},
    kernel_tests_enabled,
};

const VIP: &str = "10.96.0.10";
const TARGET: &str = "10.96.0.10:80";

fn server_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_svl-test-server"))
}

/// A cluster of `nodes` nodes with pods `pods` (node, name), one app
/// (hello.example.com on VIP) backed by all of them, and every agent ready.
fn cluster(tag: &str, nodes: u8, pods: &[(u8, &str)], extra: &[&str]) -> Cluster {
    let mut c = Cluster::new(tag, nodes, &server_bin()).expect("cluster");
    for (node, name) in pods {
        c.add_pod(*node, name).expect("pod");
    }
    let names: Vec<&str> = pods.iter().map(|(_, n)| *n).collect();
    c.write_apps(&[("hello.example.com", VIP, &names)]).unwrap();
    for i in 1..=nodes {
        c.start_agent(i, extra).unwrap();
    }
    c.wait_ready(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&c)));
    c
}

/// Every agent's log and packet counters, for a failure message.
fn logs(c: &Cluster) -> String {
    c.nodes
        .iter()
        .map(|n| {
            let counters = c
                .inspect(n.index)
                .ok()
                .and_then(|r| serde_json::from_str::<serde_json::Value>(&r).ok())
                .map(|r| r["counters"].to_string())
                .unwrap_or_default();
            format!("--- agent {} (counters {counters}) ---\n{}", n.index, c.agent_log(n.index))
        })
        .collect()
}

#[test]
fn a_pod_on_another_node_answers_with_the_vip_and_sees_the_client() {
    if !kernel_tests_enabled("multinode: pod on another node") {
        return;
    }
    let c = cluster("mn1", 2, &[(2, "pod-b")], &[]);
    for i in 0..20 {
        let r = c.request(TARGET, "/").unwrap_or_else(|e| panic!("request {i} through node 1: {e:#}\n{}", logs(&c)));
        assert_eq!((r.status, r.server()), (200, "pod-b"));
        assert_eq!(r.peer.to_string(), TARGET, "the client's peer is the VIP");
        assert!(r.body.contains(&format!("peer={CLIENT_IP}:")), "the pod sees the client's own address: {}", r.body);
    }
    assert!(c.verdict(1, "encap_forwarded").unwrap() >= 20 * 3, "node 1 encapsulated every client packet");
    assert!(c.verdict(2, "decapsulated").unwrap() >= 20 * 3);
    assert!(c.verdict(2, "reply_translated").unwrap() >= 20 * 2, "node 2 answered the client directly");
    assert_eq!(c.verdict(1, "reply_translated").unwrap(), 0, "no reply went back through node 1");
    let report: serde_json::Value = serde_json::from_str(&c.inspect(1).unwrap()).unwrap();
    assert_eq!(report["apps"][0]["backends"][0]["node"], "10.0.0.12", "inspect names the pod's node: {report}");
    assert_eq!(report["connections"].as_array().map(Vec::len), Some(0), "node 1 keeps no state for them");
    assert_eq!(report["config"]["node_address"], "10.0.0.11", "found on the uplink");
    assert_eq!(report["config"]["remote_mode"], "dsr");
    let report: serde_json::Value = serde_json::from_str(&c.inspect(2).unwrap()).unwrap();
    assert!(report["connections"].as_array().is_some_and(|a| !a.is_empty()), "node 2 owns the connections");
}

#[test]
fn new_connections_spread_over_every_node_all_succeed() {
    if !kernel_tests_enabled("multinode: spread") {
        return;
    }
    let mut c = cluster("mn2", 3, &[(1, "pod-a"), (2, "pod-b"), (3, "pod-c")], &[]);
    c.add_pod(1, "solo-a").unwrap();
    let all = ["pod-a", "pod-b", "pod-c"];
    c.write_apps(&[("hello.example.com", VIP, &all), ("solo.example.com", "10.96.0.20", &["solo-a"])]).unwrap();
    // The load balancer spreads connections over all three nodes.
    c.route_vips_via(&[1, 2, 3]).unwrap();
    thread::sleep(Duration::from_millis(500));
    let mut answered = BTreeSet::new();
    let mut failed = Vec::new();
    for i in 0..100 {
        match c.request(TARGET, "/") {
            Ok(r) if r.status == 200 => drop(answered.insert(r.server().to_string())),
            other => failed.push(format!("{i}: {other:?}")),
        }
    }
    assert!(failed.is_empty(), "{} of 100 failed: {failed:?}\n{}", failed.len(), logs(&c));
    assert_eq!(answered.len(), 3, "every pod took connections: {answered:?}");
    // A node-local app reached through every node.
    for i in 0..30 {
        let r = c.request("10.96.0.20:80", "/").unwrap_or_else(|e| panic!("solo {i}: {e:#}"));
        assert_eq!(r.server(), "solo-a");
    }
    let front: u64 = (2..=3).map(|n| c.verdict(n, "encap_forwarded").unwrap()).sum();
    assert!(front > 0, "nodes 2 and 3 forwarded solo's connections to node 1");
}

#[test]
fn a_connection_survives_its_route_moving_between_nodes() {
    if !kernel_tests_enabled("multinode: route moves") {
        return;
    }
    let c = cluster("mn3", 3, &[(1, "pod-a"), (2, "pod-b")], &[]);
    // Several connections, so both pods (on node 1 and node 2) own some.
    let mut conns: Vec<_> = (0..8).map(|_| c.connect(TARGET).expect("connect")).collect();
    let mut owners = BTreeSet::new();
    for hop in [1u8, 2, 3, 1, 3, 2] {
        c.route_vips_via(&[hop]).unwrap();
        for (i, conn) in conns.iter_mut().enumerate() {
            let r = conn.get().unwrap_or_else(|e| panic!("connection {i} after moving to node {hop}: {e:#}\n{}", logs(&c)));
            assert_eq!(r.status, 200);
            owners.insert(r.server().to_string());
        }
    }
    assert_eq!(owners.len(), 2, "connections to pods on both nodes kept working: {owners:?}");
}

#[test]
fn megabyte_transfers_fit_the_fabric_mtu() {
    if !kernel_tests_enabled("multinode: 1 MB transfers") {
        return;
    }
    let c = cluster("mn4", 2, &[(2, "pod-b")], &[]);
    let mut conn = c.connect(TARGET).expect("connect");
    let mss = tcp_maxseg(conn.raw_fd());
    assert!(mss <= 1500 - 28 - 40, "the SYN-ACK's MSS was clamped for the encapsulation: {mss}");
    let r = conn.get_path("/bytes/1048576", true).expect("1 MB download");
    assert_eq!(r.body.len(), 1 << 20);
    let r = conn.post("/upload", 1 << 20).expect("1 MB upload through the encapsulated path");
    assert!(r.body.contains("received=1048576"), "{}", r.body);
    let events: serde_json::Value = serde_json::from_str(&c.inspect(1).unwrap()).unwrap();
    assert!(events["conntrack_events"]["mss_clamped"].as_u64().unwrap_or(0) >= 1, "node 1 clamped the SYN");
    let events: serde_json::Value = serde_json::from_str(&c.inspect(2).unwrap()).unwrap();
    assert!(events["conntrack_events"]["mss_clamped"].as_u64().unwrap_or(0) >= 1, "node 2 clamped the SYN-ACK");
    assert_eq!(c.verdict(1, "encap_too_big").unwrap(), 0);
}

/// The MSS a connected socket sends with (the peer's, clamped).
fn tcp_maxseg(fd: i32) -> u32 {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket fd and an int-sized buffer.
    unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_MAXSEG, (&mut v as *mut libc::c_int).cast(), &mut len) };
    v as u32
}

#[test]
fn killing_either_agent_during_traffic_fails_no_request() {
    if !kernel_tests_enabled("multinode: kill -9") {
        return;
    }
    let mut c = cluster("mn5", 2, &[(1, "pod-a"), (2, "pod-b")], &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let client = c.client.name.clone();
    let load = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        thread::spawn(move || {
            serviceless_tests::netns::enter(&client).unwrap();
            while !stop.load(Ordering::Relaxed) {
                match serviceless_tests::topology::http_get(TARGET, "/") {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    for node in [1u8, 2] {
        thread::sleep(Duration::from_millis(500));
        c.nodes[node as usize - 1].agent.as_mut().unwrap().kill9();
        thread::sleep(Duration::from_millis(500));
        c.start_agent(node, &[]).unwrap();
        c.wait_ready(Duration::from_secs(30)).unwrap();
    }
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 50, "traffic flowed: {ok} requests");
    assert_eq!(failed, 0, "{failed} of {} requests failed across kill -9 of each agent\n{}", ok + failed, logs(&c));
}

#[test]
fn snat_mode_reaches_a_pod_on_another_node_from_this_nodes_address() {
    if !kernel_tests_enabled("multinode: snat") {
        return;
    }
    let c = cluster("mn6", 2, &[(2, "pod-b")], &["--remote-mode", "snat"]);
    for i in 0..20 {
        let r = c.request(TARGET, "/").unwrap_or_else(|e| panic!("request {i}: {e:#}\n{}", logs(&c)));
        assert_eq!((r.status, r.server()), (200, "pod-b"));
        assert_eq!(r.peer.to_string(), TARGET, "the client's peer is the VIP");
        let seen = r.body.split("peer=").nth(1).and_then(|s| s.split_whitespace().next()).unwrap_or_default();
        let (addr, port) = seen.rsplit_once(':').unwrap_or_default();
        assert_eq!(addr, "10.0.0.11", "the pod sees node 1's address: {}", r.body);
        assert!(port.parse::<u16>().is_ok_and(|p| p >= 61000), "a port of --snat-ports: {}", r.body);
    }
    let mut conn = c.connect(TARGET).expect("connect");
    let r = conn.get_path("/bytes/1048576", true).expect("1 MB download");
    assert_eq!(r.body.len(), 1 << 20);
    let r = conn.post("/upload", 1 << 20).expect("1 MB upload");
    assert!(r.body.contains("received=1048576"), "{}", r.body);
    assert!(c.verdict(1, "snat_forwarded").unwrap() >= 20 * 3);
    assert!(c.verdict(1, "snat_reply_translated").unwrap() >= 20 * 2, "replies came back through node 1");
    assert_eq!(c.verdict(2, "decapsulated").unwrap(), 0, "nothing was encapsulated");
    assert_eq!(c.verdict(2, "reply_translated").unwrap(), 0, "node 2 translated nothing");
    let report: serde_json::Value = serde_json::from_str(&c.inspect(1).unwrap()).unwrap();
    assert_eq!(report["config"]["remote_mode"], "snat");
}

#[test]
fn traffic_on_one_node_keeps_an_app_awake_and_only_one_node_puts_it_to_sleep() {
    if !kernel_tests_enabled("multinode: idle across nodes") {
        return;
    }
    let mut c = Cluster::new("mn7", 2, &server_bin()).expect("cluster");
    c.add_pod(2, "pod-b").expect("pod");
    let log = c.work_dir.join("scale.log");
    let script = c.work_dir.join("orchestrate.sh");
    // The orchestrator only records what it is asked (the pod stays).
    std::fs::write(&script, format!("#!/bin/sh\necho \"$SERVICELESS_APP $1 $(hostname)\" >> {}\n", log.display())).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let pod_ip = c.node(2).pods[0].ip.clone();
    let yaml = format!(
        "apps:\n  - hostname: hello.example.com\n    vip: {VIP}\n    ports: [{{port: 80, targetPort: 8080}}]\n    scale: {{ exec: [\"{}\"] }}\n    idleAfter: 3s\n    pods:\n      - {{name: pod-b, ip: {pod_ip}, node: 10.0.0.12}}\n",
        script.display()
    );
    std::fs::write(&c.desired, yaml).unwrap();
    // Node 1 (the lowest address) decides, and sees none of the traffic.
    c.start_agent(1, &["--listen", "0.0.0.0:9095", "--peers", "10.0.0.12:9095"]).unwrap();
    c.start_agent(2, &["--listen", "0.0.0.0:9095", "--peers", "10.0.0.11:9095"]).unwrap();
    c.wait_ready(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&c)));
    c.route_vips_via(&[2]).unwrap();
    let calls = || std::fs::read_to_string(&log).unwrap_or_default().lines().map(str::to_string).collect::<Vec<_>>();
    let until = std::time::Instant::now() + Duration::from_secs(8);
    while std::time::Instant::now() < until {
        let r = c.request(TARGET, "/").unwrap_or_else(|e| panic!("request via node 2: {e:#}\n{}", logs(&c)));
        assert_eq!(r.server(), "pod-b");
        thread::sleep(Duration::from_millis(500));
    }
    assert!(calls().is_empty(), "traffic on node 2 kept the app awake: {:?}\n{}", calls(), logs(&c));
    assert_eq!(c.verdict(1, "backend_new_flow").unwrap(), 0, "node 1 saw none of it");
    // Quiet everywhere: put to sleep once, by one node.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while calls().is_empty() && std::time::Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_secs(3));
    let calls = calls();
    assert_eq!(calls.len(), 1, "one sleep, from one node: {calls:?}\n{}", logs(&c));
    assert!(calls[0].starts_with("hello.example.com 0"), "{calls:?}");
    assert!(c.agent_log(1).contains("idle app put to sleep"), "node 1 decided:\n{}", logs(&c));
}
