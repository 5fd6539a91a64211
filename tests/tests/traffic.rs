//! Real TCP/HTTP traffic between network namespaces through the agent and
//! its programs (see `serviceless_tests::topology` for the network).
//! Needs root; skipped (with a message) otherwise.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::Duration,
};

use serviceless_tests::{
    kernel_tests_enabled,
    scenario::{backend_states, inspect, wait_until, write_apps, write_raw},
    topology::{Topology, agent_binary},
};

const VIP: &str = "10.96.0.10:80";

fn server_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_svl-test-server"))
}

struct Setup {
    topo: Topology,
    file: PathBuf,
}

fn setup(tag: &str, pods: &[(u8, &str)]) -> Setup {
    let mut topo = Topology::new(tag, &server_bin()).expect("topology");
    for (n, name) in pods {
        topo.add_pod(*n, name).expect("pod");
    }
    let file = topo.work_dir.join("apps.yaml");
    Setup { topo, file }
}

#[test]
fn vip_is_answered_by_a_pod_and_the_client_only_sees_the_vip() {
    if !kernel_tests_enabled("traffic: vip answered") {
        return;
    }
    let s = setup("svt1", &[(1, "pod-1")]);
    write_apps(&s.file, &[("hello.example.com", "10.96.0.10", &[("pod-1", "10.244.1.2", true)])]);
    let _agent = s.topo.start_agent(&s.file, "agent.log", &[]).expect("agent");
    s.topo.wait_ready(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e:#}\n{}", s.topo.agent_log("agent.log")));
    let r = s.topo.request(VIP).expect("request to the VIP");
    assert_eq!(r.status, 200);
    assert_eq!(r.server(), "pod-1", "{r:?}");
    assert_eq!(r.peer.to_string(), VIP, "the client's peer is the VIP");
    assert!(r.body.contains("peer=10.0.0.2:"), "the pod sees the client's own address: {}", r.body);
    let report = inspect(&s.topo);
    assert_eq!(report["apps"][0]["hostname"], "hello.example.com");
    assert!(report["apps"][0]["packets"].as_u64().unwrap_or(0) > 0, "activity counted: {report}");
    assert!(report["counters"]["reply_translated"].as_u64().unwrap_or(0) > 0);
}

#[test]
fn two_pods_both_get_flows_and_unready_keeps_established() {
    if !kernel_tests_enabled("traffic: two pods") {
        return;
    }
    let s = setup("svt2", &[(1, "pod-1"), (2, "pod-2")]);
    let both = [("pod-1", "10.244.1.2", true), ("pod-2", "10.244.2.2", true)];
    write_apps(&s.file, &[("hello.example.com", "10.96.0.10", &both)]);
    let _agent = s.topo.start_agent(&s.file, "agent.log", &[]).expect("agent");
    s.topo.wait_ready(Duration::from_secs(20)).expect("ready");

    let mut seen: HashMap<String, u32> = HashMap::new();
    for _ in 0..40 {
        let r = s.topo.request(VIP).expect("request");
        *seen.entry(r.server().to_string()).or_default() += 1;
    }
    assert_eq!(seen.len(), 2, "both pods get new flows: {seen:?}");

    // An established connection, then its pod turns not ready.
    let mut conn = s.topo.connect(VIP).expect("connect");
    let first = conn.get().expect("first request").server().to_string();
    let (other, other_ip) = if first == "pod-1" { ("pod-2", "10.244.2.2") } else { ("pod-1", "10.244.1.2") };
    let first_ip = if first == "pod-1" { "10.244.1.2" } else { "10.244.2.2" };
    write_apps(
        &s.file,
        &[("hello.example.com", "10.96.0.10", &[(first.as_str(), first_ip, false), (other, other_ip, true)])],
    );
    wait_until("the pod to drain in the maps", Duration::from_secs(5), || {
        backend_states(&s.topo, "hello.example.com").contains(&(first_ip.to_string(), "draining".to_string()))
    });
    for _ in 0..20 {
        let r = s.topo.request(VIP).expect("request");
        assert_eq!(r.server(), other, "new connections avoid the not-ready pod");
    }
    for _ in 0..3 {
        assert_eq!(conn.get().expect("established request").server(), first, "established connection stays put");
    }
}

#[test]
fn app_without_ready_pods_reaches_the_activator_then_a_file_change_wakes_it() {
    if !kernel_tests_enabled("traffic: activator") {
        return;
    }
    let s = setup("svt3", &[(1, "pod-1")]);
    write_apps(&s.file, &[("sleepy.example.com", "10.96.0.10", &[])]);
    let mut agent = s.topo.start_agent(&s.file, "agent.log", &[]).expect("agent");
    s.topo.wait_ready(Duration::from_secs(20)).expect("ready");
    let r = s.topo.request(VIP).expect("request");
    assert_eq!(r.server(), "activator", "{r:?}");
    assert_eq!(r.peer.to_string(), VIP, "the activator's reply comes from the VIP");
    let r = s.topo.request("10.96.0.99:80").expect("request to a VIP nobody holds");
    assert_eq!(r.server(), "activator");

    // The file changes; the running agent picks it up, no restart.
    let pid = agent.pid();
    write_apps(&s.file, &[("sleepy.example.com", "10.96.0.10", &[("pod-1", "10.244.1.2", true)])]);
    wait_until("traffic to follow the file change", Duration::from_secs(5), || {
        s.topo.request(VIP).map(|r| r.server() == "pod-1").unwrap_or(false)
    });
    assert!(agent.is_running() && agent.pid() == pid, "same agent process");

    // A malformed file keeps the last good state, is reported, and readiness drops.
    write_raw(&s.file, "apps:\n  - hostname: [broken\n");
    wait_until("the parse error to be logged", Duration::from_secs(5), || {
        s.topo.agent_log("agent.log").contains("desired-state file not applied")
    });
    let log = s.topo.agent_log("agent.log");
    assert!(log.contains("apps.yaml:"), "error names the file and position:\n{log}");
    assert_eq!(s.topo.request(VIP).expect("request").server(), "pod-1", "last good state kept");
    let ready = s.topo.node.run(|| serviceless_tests::topology::http_get("127.0.0.1:9095", "/readyz").map(|r| r.status)).expect("ns");
    assert_eq!(ready.ok(), Some(503), "readyz reports the bad source");
    let metrics = s.topo.node.run(|| serviceless_tests::topology::http_get("127.0.0.1:9095", "/metrics")).expect("ns").expect("metrics");
    assert!(metrics.body.contains("serviceless_source_errors_total 1"), "{}", metrics.body);
    assert!(metrics.body.contains("serviceless_programming_latency_seconds_bucket"), "NPL histogram exported");
    assert!(metrics.body.contains("serviceless_packets_total{verdict=\"backend_new_flow\"}"), "verdict counters exported");

    // Invalid apps are skipped, the rest applied.
    write_raw(
        &s.file,
        "apps:\n  - hostname: Bad_Name\n    vip: 10.96.0.11\n    ports: [{ port: 80 }]\n  - hostname: sleepy.example.com\n    vip: 10.96.0.10\n    ports: [{ port: 80, targetPort: 8080 }]\n    pods: [{ name: pod-1, ip: 10.244.1.2 }]\n",
    );
    wait_until("the rejection to be logged", Duration::from_secs(5), || {
        s.topo.agent_log("agent.log").contains("app rejected")
    });
    assert_eq!(s.topo.request(VIP).expect("request").server(), "pod-1");
}

#[test]
fn an_empty_file_or_a_slow_writer_never_wipes_the_state() {
    if !kernel_tests_enabled("traffic: empty and half-written files") {
        return;
    }
    let s = setup("svt6", &[(1, "pod-1"), (2, "pod-2")]);
    let apps = [("a.example.com", "10.96.0.10", &[("pod-1", "10.244.1.2", true)][..]), ("b.example.com", "10.96.0.11", &[("pod-2", "10.244.2.2", true)][..])];
    write_apps(&s.file, &apps);
    let _agent = s.topo.start_agent(&s.file, "agent.log", &[]).expect("agent");
    s.topo.wait_ready(Duration::from_secs(20)).expect("ready");
    let both = || {
        s.topo.request("10.96.0.10:80").is_ok_and(|r| r.server() == "pod-1")
            && s.topo.request("10.96.0.11:80").is_ok_and(|r| r.server() == "pod-2")
    };
    assert!(both());
    let full = std::fs::read_to_string(&s.file).expect("file");

    // Emptied in place (truncated to 0 bytes, then closed): refused.
    std::fs::write(&s.file, "").expect("truncate");
    wait_until("the empty file to be reported", Duration::from_secs(5), || s.topo.agent_log("agent.log").contains("is empty"));
    assert!(both(), "an empty file changes nothing");

    // A slow writer, in place: half of the document (which would parse as
    // only the first app), a pause, then the rest.
    let cut = full.find("  - hostname: b.example.com").expect("second app");
    {
        let mut f = std::fs::File::create(&s.file).expect("open for writing");
        std::io::Write::write_all(&mut f, &full.as_bytes()[..cut]).expect("first half");
        std::io::Write::flush(&mut f).expect("flush");
        thread::sleep(Duration::from_millis(600));
        assert!(both(), "nothing applied while the writer is half-way through");
        std::io::Write::write_all(&mut f, &full.as_bytes()[cut..]).expect("second half");
    }
    thread::sleep(Duration::from_millis(300));
    assert!(both(), "the finished file is the same state");
    let log = s.topo.agent_log("agent.log");
    assert_eq!(log.matches("desired state loaded").count(), 2, "loaded at start and once the writer closed:\n{log}");
}

#[test]
fn kill_9_and_restart_of_the_agent_lose_no_request() {
    if !kernel_tests_enabled("traffic: restart") {
        return;
    }
    let s = setup("svt4", &[(1, "pod-1"), (2, "pod-2")]);
    write_apps(
        &s.file,
        &[("hello.example.com", "10.96.0.10", &[("pod-1", "10.244.1.2", true), ("pod-2", "10.244.2.2", true)])],
    );
    let mut agent = s.topo.start_agent(&s.file, "agent.log", &[]).expect("agent");
    s.topo.wait_ready(Duration::from_secs(20)).expect("ready");

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU32::new(0));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let client = {
        let topo_client = s.topo.client.name.clone();
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        thread::spawn(move || {
            serviceless_tests::netns::enter(&topo_client).expect("enter the client namespace");
            while !stop.load(Ordering::Relaxed) {
                match serviceless_tests::topology::http_get(VIP, "/") {
                    Ok(r) if r.status == 200 && r.server().starts_with("pod-") => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failed.lock().expect("lock").push(format!("{r:?}")),
                    Err(e) => failed.lock().expect("lock").push(format!("{e:#}")),
                }
                thread::sleep(Duration::from_millis(5));
            }
        })
    };
    thread::sleep(Duration::from_millis(300));
    agent.kill9();
    let at_kill = ok.load(Ordering::Relaxed);
    thread::sleep(Duration::from_millis(700));
    assert!(ok.load(Ordering::Relaxed) > at_kill, "traffic flows while the agent is down");
    let _agent2 = s.topo.start_agent(&s.file, "agent2.log", &[]).expect("restart");
    s.topo.wait_ready(Duration::from_secs(20)).expect("ready again");
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    client.join().expect("client thread");
    let failed = failed.lock().expect("lock");
    assert!(failed.is_empty(), "{} failed requests (of {}): {:?}", failed.len(), ok.load(Ordering::Relaxed), &failed[..failed.len().min(5)]);
    assert!(ok.load(Ordering::Relaxed) > 50, "enough requests ran");
    let log2 = s.topo.agent_log("agent2.log");
    assert!(log2.contains("adopted pinned maps"), "restart adopts the maps:\n{log2}");
    assert!(log2.contains("replaced in the existing link"), "restart reuses the XDP link:\n{log2}");
}

#[test]
fn bad_interface_and_attach_mode_give_clear_errors() {
    if !kernel_tests_enabled("traffic: bad interface") {
        return;
    }
    let s = setup("svt5", &[]);
    write_apps(&s.file, &[("hello.example.com", "10.96.0.10", &[])]);
    let bin = agent_binary().expect("agent");
    let run = |iface: &str, extra: &[&str]| {
        let pin = s.topo.bpf_dir.join(format!("pins-{iface}"));
        let source = format!("file:{}", s.file.display());
        let mut args = vec!["run", "--iface", iface, "--activator", "10.245.0.2:8080", "--source", &source, "--vip-range", "10.96.0.0/16"];
        let pin = pin.display().to_string();
        args.extend(["--pin-dir", pin.as_str(), "--listen", "127.0.0.1:0"]);
        args.extend(extra);
        let out = s.topo.node.exec(bin.to_str().expect("path"), &args);
        out.expect_err("agent must refuse").to_string()
    };
    let err = run("nosuch0", &[]);
    assert!(err.contains("'nosuch0' not found") && err.contains("--iface"), "{err}");
    s.topo.node.ip("link add br9 type bridge").expect("bridge");
    s.topo.node.ip("link set br9 up").expect("up");
    let err = run("br9", &[]);
    assert!(err.contains("--xdp-mode=generic"), "{err}");
}

#[test]
fn apps_without_a_vip_get_unique_ones_that_survive_restarts() {
    if !kernel_tests_enabled("traffic: file source VIP allocation") {
        return;
    }
    let s = setup("svt9", &[(1, "pod-1")]);
    let app = |host: &str, vip: Option<&str>, pod: bool| {
        let vip = vip.map(|v| format!("    vip: {v}\n")).unwrap_or_default();
        let pods = if pod { "    pods: [{ name: pod-1, ip: 10.244.1.2 }]\n" } else { "" };
        format!("  - hostname: {host}\n{vip}    ports: [{{ port: 80, targetPort: 8080 }}]\n{pods}")
    };
    let hosts = ["a.example.com", "b.example.com", "c.example.com"];
    let text: String = hosts.iter().enumerate().map(|(i, h)| app(h, None, i == 0)).collect();
    write_raw(&s.file, &format!("apps:\n{text}"));
    let mut agent = s.topo.start_agent(&s.file, "agent.log", &[]).expect("agent");
    s.topo.wait_ready(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e:#}\n{}", s.topo.agent_log("agent.log")));
    let vips = |s: &Setup| -> HashMap<String, String> {
        inspect(&s.topo)["apps"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| (a["hostname"].as_str().unwrap_or_default().to_string(), a["vip"].as_str().unwrap_or_default().to_string()))
            .collect()
    };
    let first = vips(&s);
    assert_eq!(first.len(), 3, "{first:?}");
    assert_eq!(first.values().collect::<std::collections::HashSet<_>>().len(), 3, "unique: {first:?}");
    assert!(first.values().all(|v| v.starts_with("10.96.")), "inside --vip-range: {first:?}");
    let r = s.topo.request(&format!("{}:80", first["a.example.com"])).expect("request to the allocated VIP");
    assert_eq!(r.server(), "pod-1");

    // A restart keeps them; a newcomer asking for a taken VIP is refused and
    // moves nobody; the others keep theirs.
    agent.terminate();
    let taken = first["b.example.com"].clone();
    let text = format!("apps:\n{text}{}{}", app("thief.example.com", Some(&taken), false), app("d.example.com", None, false));
    write_raw(&s.file, &text);
    agent = s.topo.start_agent(&s.file, "agent.log", &[]).expect("agent");
    s.topo.wait_ready(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e:#}\n{}", s.topo.agent_log("agent.log")));
    wait_until("the new app", Duration::from_secs(10), || vips(&s).contains_key("d.example.com"));
    let second = vips(&s);
    for h in hosts {
        assert_eq!(second[h], first[h], "{h} kept its VIP across the restart");
    }
    assert!(!second.contains_key("thief.example.com"), "{second:?}");
    assert!(s.topo.agent_log("agent.log").contains("already held by b.example.com"));
    assert_eq!(s.topo.request(&format!("{}:80", first["a.example.com"])).expect("request").server(), "pod-1");
    drop(agent);
}
