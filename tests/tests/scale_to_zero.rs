//! Scale to zero on the file source, through the agent's own activator and
//! real traffic between network namespaces: the platform's orchestrator is
//! a script (`scale.exec`) that writes the app's pods into the desired-state
//! file, as a platform without Kubernetes would. Needs root.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use serviceless_tests::{
    kernel_tests_enabled,
    orchestrator::{ManagedApp, ScaleBed},
    scenario::{held_request, inspect, wait_until},
    topology::http_get,
};

const VIP: &str = "10.96.0.10:80";

fn server_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_svl-test-server"))
}

type Setup = ScaleBed;

/// Apps (hostname, VIP), each backed when awake by pod-1 (10.244.1.2:8080),
/// woken and put to sleep by the test orchestrator, which takes
/// `start_delay` seconds to start a pod.
fn setup(tag: &str, apps: &[(&str, &str)], extra_yaml: &str, start_delay: &str) -> Setup {
    let managed: Vec<ManagedApp> = apps
        .iter()
        .map(|(hostname, vip)| ManagedApp { hostname, vip, pod: ("pod-1", "10.244.1.2"), extra: extra_yaml, ports: "" })
        .collect();
    ScaleBed::new(tag, &server_bin(), "", &managed, start_delay).expect("test bed")
}

fn scale_calls(s: &Setup) -> Vec<String> {
    s.orchestrator.calls()
}

fn counter(s: &Setup, name: &str) -> u64 {
    inspect(&s.topo)["counters"][name].as_u64().unwrap_or(0)
}

fn metrics(s: &Setup) -> String {
    s.topo.node.run(|| http_get("127.0.0.1:9095", "/metrics").map(|r| r.body).unwrap_or_default()).unwrap_or_default()
}

fn start(s: &Setup, extra: &[&str]) -> serviceless_tests::netns::Proc {
    s.start(extra).unwrap_or_else(|e| panic!("agent: {e:#}"))
}

#[test]
fn a_sleeping_app_wakes_on_its_first_request_and_sleeps_again_when_idle() {
    if !kernel_tests_enabled("scale to zero: wake and sleep") {
        return;
    }
    let s = setup("svz1", &[("sleepy.example.com", "10.96.0.10")], "idleAfter: 3s", "0.3");
    let _agent = start(&s, &[]);
    assert!(s.topo.agent_log("agent.log").contains("activator serving"), "{}", s.topo.agent_log("agent.log"));

    let started = Instant::now();
    let r = s.topo.request(VIP).unwrap_or_else(|e| panic!("first request: {e:#}\n{}", s.topo.agent_log("agent.log")));
    let took = started.elapsed();
    assert_eq!((r.status, r.server()), (200, "pod-1"), "{r:?}");
    assert_eq!(r.peer.to_string(), VIP, "the woken app answers from the VIP");
    assert_eq!(scale_calls(&s), ["sleepy.example.com 1"], "woken exactly once");
    println!("first request to a sleeping app answered in {:.0} ms (orchestrator takes 300 ms)", took.as_secs_f64() * 1e3);

    // New connections now bypass the activator.
    let (activator, direct) = (counter(&s, "activator_no_backend"), counter(&s, "backend_new_flow"));
    for _ in 0..5 {
        assert_eq!(s.topo.request(VIP).expect("request").server(), "pod-1");
    }
    assert_eq!(counter(&s, "activator_no_backend"), activator, "no new connection went to the activator");
    assert!(counter(&s, "backend_new_flow") >= direct + 5);
    let m = metrics(&s);
    assert!(m.contains("serviceless_wakes_total{outcome=\"scaled\"} 1"), "{m}");
    assert!(m.contains("serviceless_wake_seconds_count{phase=\"first_byte_forwarded\"} 1"), "{m}");

    // Idle for its window: put to sleep, and the next request wakes it again.
    wait_until("the idle app to be put to sleep", Duration::from_secs(15), || scale_calls(&s).len() == 2);
    assert_eq!(scale_calls(&s)[1], "sleepy.example.com 0");
    wait_until("the app to have no pods", Duration::from_secs(5), || {
        inspect(&s.topo)["apps"][0]["backends"].as_array().is_some_and(|b| b.is_empty())
    });
    let r = s.topo.request(VIP).expect("request after sleeping");
    assert_eq!(r.server(), "pod-1");
    assert_eq!(scale_calls(&s).last().map(String::as_str), Some("sleepy.example.com 1"));
    assert!(s.topo.agent_log("agent.log").contains("idle app put to sleep"), "{}", s.topo.agent_log("agent.log"));
}

#[test]
fn parallel_first_requests_share_one_wake_and_a_chatty_connection_keeps_the_app_awake() {
    if !kernel_tests_enabled("scale to zero: parallel wake") {
        return;
    }
    let s = setup("svz2", &[("busy.example.com", "10.96.0.10")], "idleAfter: 2s", "0.5");
    let _agent = start(&s, &[]);
    let handles: Vec<_> = (0..100).map(|_| held_request(&s.topo.client.name, VIP)).collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().expect("thread")).collect();
    let ok = results.iter().filter(|r| matches!(r, Ok((200, s)) if s == "pod-1")).count();
    assert_eq!(ok, 100, "every held request is answered by the woken pod: {:?}", results.iter().filter(|r| r.is_err()).take(3).collect::<Vec<_>>());
    assert_eq!(scale_calls(&s), ["busy.example.com 1"], "one wake for 100 first requests");

    // A live connection that keeps sending keeps its app awake past the window.
    let mut conn = s.topo.connect(VIP).expect("connect");
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        assert_eq!(conn.get().expect("request on the chatty connection").server(), "pod-1");
        thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(scale_calls(&s).len(), 1, "not put to sleep while traffic flows: {:?}", scale_calls(&s));
}

#[test]
fn held_connections_time_out_with_a_503_for_http_and_a_close_for_anything_else() {
    if !kernel_tests_enabled("scale to zero: hold timeout") {
        return;
    }
    // The orchestrator never starts a pod (its pods never become ready).
    let s = setup("svz3", &[("stuck.example.com", "10.96.0.10")], "holdTimeout: 3s", "0");
    s.orchestrator.break_pods().expect("orchestrator");
    let _agent = start(&s, &[]);

    let started = Instant::now();
    let held = held_request(&s.topo.client.name, VIP);
    wait_until("inspect to show the held connection", Duration::from_secs(3), || {
        let app = &inspect(&s.topo)["apps"][0];
        app["state"] == "waking" && app["held_connections"] == 1
    });
    assert_eq!(held.join().expect("thread").expect("a held HTTP request is answered").0, 503);
    assert!(started.elapsed() >= Duration::from_millis(2900), "held for the app's 3 s timeout");
    let raw = s.topo.client.run(|| {
        let mut c = TcpStream::connect(VIP).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut headers = String::new();
        let mut http = TcpStream::connect(VIP).expect("connect");
        http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
        http.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        http.read_to_string(&mut headers).expect("503 answer");
        let mut buf = [0u8; 16];
        (c.read(&mut buf).map_err(|e| e.kind()), headers)
    }).expect("netns");
    assert_eq!(raw.0, Ok(0), "a raw TCP connection is closed at the timeout");
    assert!(raw.1.contains("503 Service Unavailable") && raw.1.contains("Retry-After:"), "{}", raw.1);
    let m = metrics(&s);
    assert!(m.contains("outcome=\"timeout_http_503\""), "{m}");
    assert!(m.contains("outcome=\"timeout_closed\""), "{m}");
}

#[test]
fn a_sweep_over_sleeping_vips_wakes_no_more_than_the_budget() {
    if !kernel_tests_enabled("scale to zero: wake budget") {
        return;
    }
    let apps: Vec<(String, String)> = (1..=6).map(|i| (format!("app{i}.example.com"), format!("10.96.0.{}", 10 + i))).collect();
    let refs: Vec<(&str, &str)> = apps.iter().map(|(h, v)| (h.as_str(), v.as_str())).collect();
    let s = setup("svz4", &refs, "holdTimeout: 3s", "0.2");
    let _agent = start(&s, &["--wakes-per-minute", "2"]);
    let mut statuses = Vec::new();
    for (_, vip) in &apps {
        let target = format!("{vip}:80");
        statuses.push(s.topo.request(&target).map(|r| r.status).unwrap_or_else(|e| { eprintln!("request to {target}: {e:#}"); 0 }));
    }
    if statuses.contains(&0) {
        eprintln!("{}", metrics(&s).lines().filter(|l| l.contains("activator_connections") || l.contains("wakes")).collect::<Vec<_>>().join("\n"));
    }
    assert!(scale_calls(&s).len() <= 2, "at most the budget woke: {:?}", scale_calls(&s));
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 2, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 503).count(), 4, "the rest are told to retry: {statuses:?}");
    let m = metrics(&s);
    assert!(m.contains("serviceless_wakes_total{outcome=\"refused_node_budget\"}"), "{m}");
}

#[test]
fn long_streams_cross_the_hand_over_both_ways() {
    if !kernel_tests_enabled("scale to zero: long streams") {
        return;
    }
    let s = setup("svz5", &[("stream.example.com", "10.96.0.10")], "", "0.5");
    let _agent = start(&s, &[]);
    // The upload starts at once and backs up while the app wakes; the
    // activator must not lose or reorder a byte when it splices.
    let mut conn = s.topo.connect(VIP).expect("connect while asleep");
    let r = conn.post("/upload", 8 << 20).expect("upload through the hand-over");
    assert_eq!(r.server(), "pod-1");
    assert!(r.body.contains("received=8388608"), "{}", r.body);
    // Same connection, now a long download from the pod.
    let r = conn.get_path("/bytes/16777216", true).expect("download on the spliced connection");
    assert_eq!(r.body.len(), 16 << 20);
    assert_eq!(scale_calls(&s), ["stream.example.com 1"]);
}

#[test]
fn kill_9_while_connections_are_held_still_wakes_the_app() {
    if !kernel_tests_enabled("scale to zero: kill -9") {
        return;
    }
    let s = setup("svz6", &[("held.example.com", "10.96.0.10")], "", "1.5");
    let mut agent = start(&s, &[]);
    let held = held_request(&s.topo.client.name, VIP);
    wait_until("the wake to start", Duration::from_secs(5), || scale_calls(&s).len() == 1);
    agent.kill9();
    // The held connection died with its process; the client learns at once.
    let _ = held.join().expect("thread");
    let _agent = s.topo.start_agent(&s.file, "agent2.log", &[]).expect("restart");
    s.topo.wait_ready(Duration::from_secs(20)).expect("ready again");
    // The orchestrator finishes the wake the first agent started.
    wait_until("the app to answer again", Duration::from_secs(15), || {
        s.topo.request(VIP).is_ok_and(|r| r.status == 200 && r.server() == "pod-1")
    });
    assert_eq!(scale_calls(&s), ["held.example.com 1"], "the restart did not wake it twice");
}

#[test]
fn a_raw_tcp_echo_app_crosses_the_hand_over_with_a_proxy_protocol_header() {
    if !kernel_tests_enabled("scale to zero: raw TCP and PROXY v2") {
        return;
    }
    let app = ManagedApp {
        hostname: "echo.example.com",
        vip: "10.96.0.10",
        pod: ("pod-1", "10.244.1.2"),
        extra: "proxyProtocol: true",
        ports: "[{ port: 7, targetPort: 7007 }]",
    };
    let bed = ScaleBed::new("svz7", &server_bin(), "", &[app], "0.3").expect("test bed");
    let echo = bed.topo.pods[0].ns.spawn(server_bin().to_str().expect("path"), &["--echo", "--listen", "10.244.1.2:7007"], None).expect("echo");
    let _agent = start(&bed, &[]);
    let (header, echoed, client) = bed
        .topo
        .client
        .run(|| -> std::io::Result<(Vec<u8>, Vec<u8>, std::net::SocketAddr)> {
            let mut c = TcpStream::connect("10.96.0.10:7")?;
            c.set_read_timeout(Some(Duration::from_secs(10)))?;
            // Not HTTP, client speaks first, while the app sleeps.
            c.write_all(b"\x16\x03\x01hello over raw TCP")?;
            c.shutdown(std::net::Shutdown::Write)?;
            let mut all = Vec::new();
            c.read_to_end(&mut all)?;
            let header = all[..28.min(all.len())].to_vec();
            Ok((header, all[28.min(all.len())..].to_vec(), c.local_addr()?))
        })
        .expect("netns")
        .expect("echo through the hand-over");
    assert_eq!(echoed, b"\x16\x03\x01hello over raw TCP", "bytes untouched, half-close carried");
    assert_eq!(&header[..12], b"\r\n\r\n\0\r\nQUIT\n", "PROXY v2 signature first");
    assert_eq!(&header[16..20], &[10, 0, 0, 2], "the client's address");
    assert_eq!(&header[20..24], &[10, 96, 0, 10], "the VIP");
    assert_eq!(u16::from_be_bytes([header[24], header[25]]), client.port(), "the client's port");
    assert_eq!(u16::from_be_bytes([header[26], header[27]]), 7);
    assert_eq!(bed.orchestrator.calls(), ["echo.example.com 1"]);
    drop(echo);
}

#[test]
fn a_udp_datagram_wakes_a_sleeping_app_and_is_dropped_meanwhile() {
    if !kernel_tests_enabled("scale to zero: UDP wake") {
        return;
    }
    let app = ManagedApp {
        hostname: "dns.example.com",
        vip: "10.96.0.10",
        pod: ("pod-1", "10.244.1.2"),
        extra: "",
        ports: "[{ port: 53, targetPort: 5353, protocol: UDP }]",
    };
    let bed = ScaleBed::new("svz8", &server_bin(), "", &[app], "0.1").expect("test bed");
    let _agent = start(&bed, &[]);
    let answered = bed
        .topo
        .client
        .run(|| -> std::io::Result<bool> {
            let s = std::net::UdpSocket::bind("10.0.0.2:0")?;
            s.set_read_timeout(Some(Duration::from_millis(300)))?;
            s.send_to(b"query", "10.96.0.10:53")?;
            let mut buf = [0u8; 64];
            Ok(s.recv_from(&mut buf).is_ok())
        })
        .expect("netns")
        .expect("send");
    assert!(!answered, "nothing answers a sleeping app's datagram (no ICMP error either)");
    wait_until("the datagram to wake the app", Duration::from_secs(5), || bed.orchestrator.calls() == ["dns.example.com 1"]);
    let m = metrics(&bed);
    assert!(m.contains("serviceless_activator_udp_dropped_total 1"), "{m}");
}
