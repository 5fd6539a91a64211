//! East-west: clients on a node (host processes and pods) reach apps by VIP
//! through the cgroup socket hooks, with no Service and no per-packet NAT.
//! Real TCP/UDP between network namespaces on the two-node cluster
//! topology; each node's agent hooks a test cgroup of its own, and the
//! clients (`svl-sock-client`) join it. Needs root and a cgroup v2 hierarchy.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use serviceless_tests::{cluster::Cluster, kernel_tests_enabled, scenario::wait_until};

const A: &str = "10.96.0.10";
const B: &str = "10.96.0.20";
const SLEEPY: &str = "10.96.0.30";
const PORTS: &str = "[{port: 80, targetPort: 8080}, {port: 80, targetPort: 8080, protocol: UDP}]";

fn server_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_svl-test-server"))
}

fn enabled(what: &str) -> bool {
    if !kernel_tests_enabled(what) {
        return false;
    }
    if serviceless_agent::socket_lb::find_root(None).ok().flatten().is_none() {
        eprintln!("skipping {what}: no cgroup v2 hierarchy is mounted on this machine");
        return false;
    }
    true
}

/// Two nodes: app A on a pod of each, app B on node 1, and a sleeping app.
fn cluster(tag: &str) -> Cluster {
    let mut c = Cluster::new(tag, 2, &server_bin()).expect("cluster");
    c.add_pod(1, "a1").expect("pod");
    c.add_pod(2, "a2").expect("pod");
    c.add_pod(1, "b1").expect("pod");
    write(&c, &["a1", "a2"]);
    for i in 1..=2 {
        c.start_agent(i, &[]).expect("agent");
    }
    c.wait_ready(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e:#}\n{}", c.agent_log(1)));
    c
}

fn write(c: &Cluster, a_pods: &[&str]) {
    c.write_apps_with_ports(&[("a.example.com", A, a_pods), ("b.example.com", B, &["b1"]), ("sleepy.example.com", SLEEPY, &[])], PORTS)
        .expect("desired state");
}

/// Parsed `ok server=<s> peer=<p>` lines; panics on `err` lines.
fn answers(lines: &[String]) -> Vec<(String, String)> {
    lines
        .iter()
        .map(|l| {
            let rest = l.strip_prefix("ok ").unwrap_or_else(|| panic!("client failed: {lines:?}"));
            let (server, peer) = rest.split_once(' ').expect("two fields");
            (server.trim_start_matches("server=").to_string(), peer.trim_start_matches("peer=").to_string())
        })
        .collect()
}

fn counter(c: &Cluster, node: u8, name: &str) -> u64 {
    c.verdict(node, name).expect("inspect")
}

#[test]
fn node_and_pod_clients_reach_apps_by_vip_through_the_socket_hooks() {
    if !enabled("east-west: socket hooks") {
        return;
    }
    let c = cluster("sew1");
    let inspect: serde_json::Value = serde_json::from_str(&c.inspect(1).expect("inspect")).expect("json");
    let hooks: BTreeSet<&str> = inspect["socket_hooks"].as_array().expect("hooks").iter().filter_map(|h| h["hook"].as_str()).collect();
    assert_eq!(hooks.len(), 9, "inspect reports every attached hook: {hooks:?}");

    // A process on node 1 calls app A: answered by its pods on both nodes;
    // getpeername() shows the VIP; nothing went through conntrack.
    let before = (counter(&c, 1, "sock_connect_backend"), counter(&c, 1, "backend_new_flow"));
    let node1 = &c.node(1).ns;
    let got = answers(&c.sock_client(1, node1, &["http", &format!("{A}:80"), "--count", "30"]).expect("client"));
    let servers: BTreeSet<&str> = got.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(servers, BTreeSet::from(["a1", "a2"]), "connections spread over the app's pods on both nodes");
    assert!(got.iter().all(|(_, p)| p == &format!("{A}:80")), "getpeername shows the VIP: {got:?}");
    assert_eq!(counter(&c, 1, "sock_connect_backend") - before.0, 30, "one connect verdict per connection");
    assert_eq!(counter(&c, 1, "backend_new_flow"), before.1, "no packet took the per-packet path");
    assert!(counter(&c, 1, "sock_getpeername_translated") >= 30);

    // A long-lived connection keeps its app awake by its traffic, not only
    // by its connect: 10 requests on one keep-alive connection move the
    // app's activity by more than the one connect.
    let packets = |c: &Cluster| -> u64 {
        let v: serde_json::Value = serde_json::from_str(&c.inspect(1).expect("inspect")).expect("json");
        v["apps"].as_array().expect("apps").iter().find(|a| a["hostname"] == "b.example.com").and_then(|a| a["packets"].as_u64()).unwrap_or(0)
    };
    let before = packets(&c);
    let held = answers(&c.sock_client(1, node1, &["hold", &format!("{B}:80"), "--secs", "2", "--interval-ms", "150"]).expect("client"));
    assert!(held.len() >= 10, "{held:?}");
    let moved = packets(&c) - before;
    assert!(moved > held.len() as u64, "the connection's packets count as activity: {moved} for {} requests", held.len());

    // A dual-stack (IPv6) socket dialling the IPv4 VIP in its mapped form
    // goes through the IPv6 hooks: TCP and UDP, the VIP shown back.
    let mapped = format!("[::ffff:{A}]:80");
    let before = (counter(&c, 1, "sock_connect_backend"), counter(&c, 1, "sock_sendmsg_backend"));
    let got = answers(&c.sock_client(1, node1, &["http", &mapped, "--count", "5"]).expect("client"));
    assert!(got.iter().all(|(s, p)| (s == "a1" || s == "a2") && *p == mapped), "{got:?}");
    let got = answers(&c.sock_client(1, node1, &["udp", &mapped, "--count", "3"]).expect("client"));
    assert!(got.iter().all(|(s, p)| (s == "a1" || s == "a2") && *p == mapped), "{got:?}");
    assert_eq!(counter(&c, 1, "sock_connect_backend") - before.0, 5);
    assert_eq!(counter(&c, 1, "sock_sendmsg_backend") - before.1, 3);

    // A pod (in its own network namespace) calls another app.
    let b1 = &c.node(1).pods[1].ns;
    let got = answers(&c.sock_client(1, b1, &["http", &format!("{A}:80"), "--count", "10"]).expect("client"));
    assert!(got.iter().all(|(s, p)| (s == "a1" || s == "a2") && p == &format!("{A}:80")), "{got:?}");
    // A pod calls its own app's VIP (hairpin): itself or its sibling.
    let a1 = &c.node(1).pods[0].ns;
    let got = answers(&c.sock_client(1, a1, &["http", &format!("{A}:80"), "--count", "10"]).expect("client"));
    assert!(got.iter().all(|(s, _)| s == "a1" || s == "a2"), "{got:?}");
    // A pod on node 2 calls an app whose only pod is on node 1.
    let a2 = &c.node(2).pods[0].ns;
    let got = answers(&c.sock_client(2, a2, &["http", &format!("{B}:80"), "--count", "5"]).expect("client"));
    assert!(got.iter().all(|(s, p)| s == "b1" && p == &format!("{B}:80")), "{got:?}");

    // UDP: each datagram is sent to a pod and its reply comes from the VIP,
    // on unconnected and connected sockets alike.
    let before = counter(&c, 1, "sock_sendmsg_backend");
    let got = answers(&c.sock_client(1, b1, &["udp", &format!("{A}:80"), "--count", "5"]).expect("client"));
    assert!(got.iter().all(|(s, p)| (s == "a1" || s == "a2") && p == &format!("{A}:80")), "{got:?}");
    assert_eq!(counter(&c, 1, "sock_sendmsg_backend") - before, 5);
    let got = answers(&c.sock_client(1, node1, &["udp-connected", &format!("{B}:80"), "--count", "3"]).expect("client"));
    assert!(got.iter().all(|(s, p)| s == "b1" && p == &format!("{B}:80")), "{got:?}");
    // recvfrom() on the unconnected socket was translated; a connected
    // socket's recv() asks for no address (getpeername() shows the VIP).
    assert_eq!(counter(&c, 1, "sock_recvmsg_translated"), 3 + 5);
}

#[test]
fn a_sleeping_app_is_reached_through_the_activator_and_removed_pods_get_no_new_connections() {
    if !enabled("east-west: activator and pod removal") {
        return;
    }
    let c = cluster("sew2");
    // A sleeping app: the connection goes to this node's activator, which
    // holds it; once a pod is up, the held request is answered by it.
    let held = c
        .sock_client_background(1, &c.node(1).ns, &["http", &format!("{SLEEPY}:80"), "--host", "sleepy.example.com"])
        .expect("client");
    wait_until("the connection to reach the activator", Duration::from_secs(10), || counter(&c, 1, "sock_connect_activator") == 1);
    c.write_apps_with_ports(
        &[("a.example.com", A, &["a1", "a2"]), ("b.example.com", B, &["b1"]), ("sleepy.example.com", SLEEPY, &["a2"])],
        PORTS,
    )
    .expect("desired state");
    let out = held.join().expect("client thread").expect("client").join("\n");
    assert!(out.starts_with("ok server=a2 "), "the held request reached the woken app's pod: {out}\n{}", c.agent_log(1));
    // The next connection goes straight to the pod.
    let before = counter(&c, 1, "sock_connect_backend");
    let got = answers(&c.sock_client(1, &c.node(1).ns, &["http", &format!("{SLEEPY}:80")]).expect("client"));
    assert_eq!(got[0].0, "a2");
    assert_eq!(counter(&c, 1, "sock_connect_backend") - before, 1);

    // A pod removed from app A while a client holds a connection to it:
    // new connections never go to it; the held one stays with its pod
    // (an ordinary socket to the pod) for as long as the pod answers.
    let holder = c.sock_client_background(1, &c.node(1).ns, &["hold", &format!("{A}:80"), "--secs", "4"]).expect("client");
    thread::sleep(Duration::from_millis(800));
    write(&c, &["a2"]);
    let removed_at = Instant::now();
    // The agent programs the change within a moment; from then on, no new
    // connection reaches a1.
    wait_until("a1 to leave app A", Duration::from_secs(5), || {
        let got = answers(&c.sock_client(1, &c.node(1).ns, &["http", &format!("{A}:80"), "--count", "10"]).expect("client"));
        got.iter().all(|(s, _)| s == "a2")
    });
    let got = answers(&c.sock_client(1, &c.node(1).ns, &["http", &format!("{A}:80"), "--count", "30"]).expect("client"));
    assert!(got.iter().all(|(s, _)| s == "a2"), "new connections never go to a removed pod: {got:?}");
    let held = answers(&holder.join().expect("holder").expect("client"));
    assert!(held.len() >= 10, "{held:?}");
    let first = held[0].0.clone();
    assert!(held.iter().all(|(s, p)| *s == first && p == &format!("{A}:80")), "the held connection stayed with its pod: {held:?}");
    eprintln!("pod removal: new connections avoided it within {:?}", removed_at.elapsed());
}

#[test]
fn socket_hooks_survive_an_agent_crash_under_load_and_honour_the_skip_switches() {
    if !enabled("east-west: restart and skip switches") {
        return;
    }
    let mut c = cluster("sew3");
    let links = |c: &Cluster| -> Vec<(String, u64, u64)> {
        let v: serde_json::Value = serde_json::from_str(&c.inspect(1).expect("inspect")).expect("json");
        v["socket_hooks"]
            .as_array()
            .expect("hooks")
            .iter()
            .map(|h| (h["hook"].as_str().unwrap_or("").to_string(), h["link_id"].as_u64().unwrap_or(0), h["program_id"].as_u64().unwrap_or(0)))
            .collect()
    };
    let before = links(&c);
    // New connections for 6 s from a pod while node 1's agent is killed
    // (kill -9) and restarted: not one fails.
    let load = c.sock_client_background(1, &c.node(1).pods[1].ns, &["load", &format!("{A}:80"), "--secs", "6"]).expect("client");
    thread::sleep(Duration::from_secs(1));
    c.nodes[0].agent.as_mut().expect("agent").kill9();
    thread::sleep(Duration::from_secs(1));
    c.start_agent(1, &[]).expect("restart");
    c.wait_ready(Duration::from_secs(30)).expect("ready again");
    let out = load.join().expect("load").expect("client").join("\n");
    let ok: u64 = out.trim().strip_prefix("ok=").and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(ok > 50 && out.contains(" err=0"), "every connection across the crash and restart succeeded: {out}");
    let after = links(&c);
    assert_eq!(after.len(), 9);
    for ((hook, link, prog), (hook2, link2, prog2)) in before.iter().zip(&after) {
        assert_eq!((hook, link), (hook2, link2), "the pinned link was kept");
        assert_ne!(prog, prog2, "{hook}: the restarted agent swapped its own program in");
    }

    // Skip switches: a skipped cgroup's sockets are left alone (counted).
    let cg = c.node(1).cgroup.as_ref().expect("cgroup").path.clone();
    let skipped = cg.join("skipped");
    std::fs::create_dir_all(&skipped).expect("child cgroup");
    c.start_agent(1, &["--socket-lb-skip-cgroup", skipped.to_str().unwrap()]).expect("restart");
    c.wait_ready(Duration::from_secs(30)).expect("ready");
    let (skips, connects) = (counter(&c, 1, "sock_skipped"), counter(&c, 1, "sock_connect_backend"));
    let client = serviceless_tests::cluster::sock_client_command(&c.node(1).ns, &skipped, &["http", &format!("{A}:80")]).expect("client");
    let out = serviceless_tests::netns::output(client).expect("client");
    assert!(out.starts_with("err "), "untranslated, the node has no route to the VIP: {out}");
    assert_eq!(counter(&c, 1, "sock_skipped") - skips, 1);
    assert_eq!(counter(&c, 1, "sock_connect_backend"), connects);
    // Host network namespace only: a pod's socket is skipped, the node's is not.
    c.start_agent(1, &["--socket-lb-host-netns-only"]).expect("restart");
    c.wait_ready(Duration::from_secs(30)).expect("ready");
    let skips = counter(&c, 1, "sock_skipped");
    let _ = c.sock_client(1, &c.node(1).pods[1].ns, &["http", &format!("{A}:80")]).expect("client");
    assert_eq!(counter(&c, 1, "sock_skipped") - skips, 1, "the pod's connect was left to the per-packet path");
    let got = answers(&c.sock_client(1, &c.node(1).ns, &["http", &format!("{A}:80")]).expect("client"));
    assert_eq!(got[0].1, format!("{A}:80"));

    // --socket-lb off removes the hooks.
    c.start_agent(1, &["--socket-lb", "off"]).expect("restart");
    c.wait_ready(Duration::from_secs(30)).expect("ready");
    assert!(links(&c).is_empty(), "hooks removed");
    std::fs::remove_dir(&skipped).ok();
}
