//! Connection tracking under real traffic between network namespaces (see
//! `serviceless_tests::topology`): idle keep-alive connections outlive a
//! flood of new ones, a spoofed SYN flood leaves established connections
//! alone, and a connection whose pod is removed ends at once with a RST.
//! Needs root; skipped (with a message) otherwise.

use std::{
    io::ErrorKind,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serviceless_tests::{
    flood::{Flood, syn_flood},
    kernel_tests_enabled,
    scenario::{inspect, wait_until, write_apps},
    topology::{Conn, Topology, http_get},
};

const VIP: &str = "10.96.0.10:80";
const HOST: &str = "hello.example.com";

fn server_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_svl-test-server"))
}

fn counter(report: &serde_json::Value, group: &str, name: &str) -> u64 {
    report[group][name].as_u64().unwrap_or(0)
}

/// A topology with `pods` and the agent running with a table of
/// `connections` and `extra` flags.
fn start(tag: &str, pods: &[(u8, &str)], connections: u32, extra: &[&str]) -> (Topology, PathBuf, serviceless_tests::netns::Proc) {
    let mut topo = Topology::new(tag, &server_bin()).expect("topology");
    topo.max_connections = connections;
    for (n, name) in pods {
        topo.add_pod(*n, name).expect("pod");
    }
    let file = topo.work_dir.join("apps.yaml");
    let states: Vec<(String, String)> = pods.iter().map(|(n, name)| (name.to_string(), format!("10.244.{n}.2"))).collect();
    let backends: Vec<(&str, &str, bool)> = states.iter().map(|(n, ip)| (n.as_str(), ip.as_str(), true)).collect();
    write_apps(&file, &[(HOST, "10.96.0.10", &backends)]);
    let agent = topo.start_agent(&file, "agent.log", extra).expect("agent");
    topo.wait_ready(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e:#}\n{}", topo.agent_log("agent.log")));
    (topo, file, agent)
}

#[test]
fn an_idle_keep_alive_connection_outlives_a_flood_of_new_connections() {
    if !kernel_tests_enabled("conntrack traffic: keep-alive outlives a flood") {
        return;
    }
    // A table of 128 connections; closed ones linger 1 s, the GC runs every second.
    let (topo, _file, _agent) = start(
        "svc1",
        &[(1, "pod-1")],
        128,
        &["--ct-close-timeout", "1s", "--ct-gc-interval", "1s"],
    );
    let mut idle = topo.connect(VIP).expect("keep-alive connection");
    let first = idle.get().expect("first request").server().to_string();

    // Ten times the table's capacity in new connections (an LRU this size
    // would have evicted the idle connection long before the end).
    let flood = 1280;
    let client = topo.client.name.clone();
    let (ok, failed) = thread::spawn(move || {
        serviceless_tests::netns::enter(&client).expect("client namespace");
        let (mut ok, mut failed) = (0u32, 0u32);
        for _ in 0..flood {
            match http_get(VIP, "/") {
                Ok(r) if r.status == 200 => ok += 1,
                _ => failed += 1,
            }
        }
        (ok, failed)
    })
    .join()
    .expect("flood thread");
    eprintln!("flood: {ok} of {flood} new connections served, {failed} refused or timed out");
    assert!(ok >= flood / 2, "most new connections are served as closed ones expire: {ok}/{flood}");
    assert_eq!(idle.get().expect("the idle connection still works").server(), first, "same pod");
    // Closed connections leave within the close timeout plus a GC interval.
    wait_until("closed connections to expire", Duration::from_secs(10), || {
        counter(&inspect(&topo), "conntrack_events", "expired_closing") > u64::from(flood) / 2
    });
    assert_eq!(idle.get().expect("the idle connection still works after the GC").server(), first);
}

#[test]
fn a_spoofed_syn_flood_breaks_neither_established_nor_new_connections() {
    if !kernel_tests_enabled("conntrack traffic: syn flood") {
        return;
    }
    // A new-connection table of 4,096 connections, far smaller than the flood.
    let (topo, _file, _agent) = start("svc2", &[(1, "pod-1")], 4096, &["--max-new-connections", "4096"]);
    let mut established = topo.connect(VIP).expect("connection");
    established.get().expect("first request");

    // Requests on the established connection, and new connections, all through the flood.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU32::new(0));
    let (fresh_ok, fresh_failed) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let mut conn = established;
    let worker = {
        let (stop, served) = (stop.clone(), served.clone());
        thread::spawn(move || -> anyhow::Result<Conn> {
            while !stop.load(Ordering::Relaxed) {
                conn.get()?;
                served.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(20));
            }
            Ok(conn)
        })
    };
    let newcomer = {
        let (stop, ok, failed) = (stop.clone(), fresh_ok.clone(), fresh_failed.clone());
        let client = topo.client.name.clone();
        thread::spawn(move || {
            serviceless_tests::netns::enter(&client).expect("client namespace");
            while !stop.load(Ordering::Relaxed) {
                match http_get(VIP, "/") {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let started = Instant::now();
    // 100,000 SYNs in bursts of 1,000 every 10 ms (about 2 s), at most 10 s.
    let flood = Flood { count: 100_000, max: Duration::from_secs(10), pause_per_1000: Duration::from_millis(10) };
    let sent = syn_flood(&topo.client.name, VIP.parse().expect("vip"), flood).expect("flood");
    let took = started.elapsed();
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let mut conn = worker.join().expect("worker").expect("the established connection kept working through the flood");
    newcomer.join().expect("newcomer");
    conn.get().expect("and after it");
    let (ok, failed) = (fresh_ok.load(Ordering::Relaxed), fresh_failed.load(Ordering::Relaxed));
    eprintln!(
        "syn flood: {sent} spoofed SYNs in {took:?}; established connection served {} requests; new connections {ok} ok, {failed} failed",
        served.load(Ordering::Relaxed)
    );
    assert!(served.load(Ordering::Relaxed) > 5, "requests ran during the flood");
    assert!(ok > 20 && failed * 20 <= ok, "new connections keep working during the flood: {ok} ok, {failed} failed");

    let report = inspect(&topo);
    let tracked = counter(&report, "counters", "backend_new_flow");
    let promoted = counter(&report, "conntrack_events", "promoted");
    eprintln!("flood counters: backend_new_flow={tracked} promoted={promoted}");
    assert!(tracked > u64::from(sent) / 2, "the flood became new-connection state: {report}");
    assert!(promoted <= u64::from(ok) + 10, "only real handshakes were established: {report}");
}

/// A keep-alive connection from a fixed client port (reused right away, as
/// busy clients do).
fn connect_from(topo: &Topology, port: u16) -> anyhow::Result<Conn> {
    let client = topo.client.name.clone();
    thread::spawn(move || {
        serviceless_tests::netns::enter(&client)?;
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        sock.set_reuse_address(true)?;
        sock.bind(&SocketAddr::from(([10, 0, 0, 2], port)).into())?;
        sock.connect_timeout(&VIP.parse::<SocketAddr>()?.into(), Duration::from_secs(2))?;
        Conn::from_stream(sock.into())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("connect thread panicked"))?
}

#[test]
fn removing_a_pod_ends_its_connections_at_once_with_no_hang() {
    if !kernel_tests_enabled("conntrack traffic: pod removed") {
        return;
    }
    let (topo, file, _agent) = start("svc3", &[(1, "pod-1"), (2, "pod-2")], 65536, &[]);
    let pods = [("pod-1", "10.244.1.2"), ("pod-2", "10.244.2.2")];
    for trial in 0..6 {
        let port = 40_000;
        let both: Vec<(&str, &str, bool)> = pods.iter().map(|(n, ip)| (*n, *ip, true)).collect();
        write_apps(&file, &[(HOST, "10.96.0.10", &both)]);
        wait_until("both pods programmed", Duration::from_secs(5), || {
            inspect(&topo)["apps"][0]["backends"].as_array().is_some_and(|b| b.len() == 2)
        });
        let mut conn = connect_from(&topo, port).unwrap_or_else(|e| panic!("trial {trial}: connect: {e:#}"));
        let on = conn.get().expect("request").server().to_string();
        let (keep, keep_ip) = *pods.iter().find(|(n, _)| *n != on).expect("the other pod");
        write_apps(&file, &[(HOST, "10.96.0.10", &[(keep, keep_ip, true)])]);
        wait_until("the pod to leave the maps", Duration::from_secs(5), || {
            inspect(&topo)["apps"][0]["backends"].as_array().is_some_and(|b| b.len() == 1)
        });
        let started = Instant::now();
        let err = conn.get().expect_err("the connection to the removed pod must end");
        let took = started.elapsed();
        let kind = err.downcast_ref::<std::io::Error>().map(|e| e.kind());
        assert!(
            matches!(kind, Some(ErrorKind::ConnectionReset) | Some(ErrorKind::UnexpectedEof) | Some(ErrorKind::BrokenPipe)),
            "trial {trial}: ended by a reset, not a timeout ({took:?}): {err:#}"
        );
        eprintln!("trial {trial}: connection on {on} reset after {took:?}");
        // The client reuses its port at once: the new connection lands on the pod left.
        let mut again = connect_from(&topo, port).unwrap_or_else(|e| panic!("trial {trial}: reconnect: {e:#}"));
        assert_eq!(again.get().expect("request after reconnect").server(), keep, "trial {trial}");
    }
    let report = inspect(&topo);
    assert!(counter(&report, "counters", "rst_backend_gone") >= 6, "{report}");
}

