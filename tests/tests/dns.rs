//! The agent's DNS server, queried with real `dig` (Debian's
//! bind9-dnsutils) from the client's network namespace. Needs root.

use std::{path::PathBuf, time::Duration};

use serviceless_tests::{
    kernel_tests_enabled,
    orchestrator::{ManagedApp, ScaleBed},
    scenario::wait_until,
    topology::{Topology, http_get},
};

fn server_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_svl-test-server"))
}

/// `dig @10.0.0.1 <args>` from the client: its whole output.
fn dig(topo: &Topology, args: &[&str]) -> String {
    let mut all = vec!["@10.0.0.1", "+time=2", "+tries=1"];
    all.extend_from_slice(args);
    topo.client.exec("dig", &all).unwrap_or_else(|e| format!("dig failed: {e:#}"))
}

fn short(topo: &Topology, args: &[&str]) -> String {
    let mut all = vec!["+short"];
    all.extend_from_slice(args);
    dig(topo, &all).trim().to_string()
}

#[test]
fn app_hostnames_resolve_to_their_vips_and_the_server_survives_bad_queries() {
    if !kernel_tests_enabled("dns") {
        return;
    }
    if std::process::Command::new("dig").arg("-v").output().is_err() {
        eprintln!("skipped: dig missing (cargo xtask test installs bind9-dnsutils)");
        return;
    }
    let awake = "  - hostname: web.apps.example.com\n    vip: 10.96.0.10\n    ports: [{ port: 80, targetPort: 8080 }]\n    pods: [{ name: pod-1, ip: 10.244.1.2 }]";
    let sleepy = ManagedApp { hostname: "sleepy.apps.example.com", vip: "10.96.0.20", pod: ("pod-1", "10.244.1.2"), extra: "", ports: "" };
    let bed = ScaleBed::new("svd1", &server_bin(), awake, &[sleepy], "0.2").expect("test bed");
    let _agent = bed
        .start(&["--dns-listen", "10.0.0.1:53", "--dns-zone", "apps.example.com", "--dns-qps-per-source", "50"])
        .unwrap_or_else(|e| panic!("agent: {e:#}"));
    let (topo, file, orchestrator) = (&bed.topo, &bed.file, &bed.orchestrator);

    assert_eq!(short(topo, &["web.apps.example.com", "A"]), "10.96.0.10");
    assert_eq!(short(topo, &["+tcp", "web.apps.example.com", "A"]), "10.96.0.10", "over TCP too");
    assert_eq!(short(topo, &["WEB.Apps.Example.COM", "A"]), "10.96.0.10", "names are case-insensitive");
    let full = dig(topo, &["web.apps.example.com", "A"]);
    assert!(full.contains("flags: qr aa"), "authoritative: {full}");
    assert!(full.contains("\t5\tIN\tA\t10.96.0.10"), "TTL 5: {full}");
    let nodata = dig(topo, &["web.apps.example.com", "AAAA"]);
    assert!(nodata.contains("status: NOERROR") && nodata.contains("ANSWER: 0"), "no IPv6 VIP: {nodata}");
    assert!(dig(topo, &["nope.apps.example.com", "A"]).contains("status: NXDOMAIN"));
    assert!(dig(topo, &["www.google.com", "A"]).contains("status: REFUSED"), "outside the zone");

    // A query for a sleeping app starts its wake.
    assert_eq!(short(topo, &["sleepy.apps.example.com", "A"]), "10.96.0.20");
    wait_until("the DNS query to wake the app", Duration::from_secs(5), || orchestrator.calls() == ["sleepy.apps.example.com 1"]);
    wait_until("the orchestrator to finish", Duration::from_secs(5), || orchestrator.timings().len() == 1);

    // A VIP change is answered after one reconcile.
    let moved = std::fs::read_to_string(file).expect("file").replace("10.96.0.10", "10.96.0.11");
    serviceless_tests::scenario::write_raw(file, &moved);
    wait_until("the new VIP in DNS", Duration::from_secs(5), || short(topo, &["web.apps.example.com", "A"]) == "10.96.0.11");

    // Garbage, then a flood of real queries from one source: bounded, and
    // the server keeps answering. (A fresh second first: the polling above
    // spent part of this one's budget.)
    std::thread::sleep(Duration::from_millis(1100));
    let answered = topo
        .client
        .run(|| {
            let s = std::net::UdpSocket::bind("10.0.0.2:0").expect("socket");
            for n in 0..2000u32 {
                let junk = n.to_be_bytes().repeat(1 + (n as usize % 40));
                let _ = s.send_to(&junk, "10.0.0.1:53");
            }
            // Let the server drain the junk first (a UDP server's socket buffer
            // holds what it has not read yet, junk or not).
            std::thread::sleep(Duration::from_millis(500));
            // Its own socket: the junk's FORMERR answers would fill the first one's buffer.
            let s = std::net::UdpSocket::bind("10.0.0.2:0").expect("socket");
            let query = query_a(0x5151, "web.apps.example.com");
            for _ in 0..500 {
                let _ = s.send_to(&query, "10.0.0.1:53");
            }
            s.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
            let mut buf = [0u8; 512];
            let mut answered = 0;
            while let Ok((_, from)) = s.recv_from(&mut buf) {
                if from.port() == 53 && buf[..2] == [0x51, 0x51] {
                    answered += 1;
                }
            }
            answered
        })
        .expect("netns");
    // 50 a second (two windows at most, if the burst straddles one).
    assert!((40..=100).contains(&answered), "about --dns-qps-per-source (50) of 500 answered: {answered}");
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(short(topo, &["web.apps.example.com", "A"]), "10.96.0.11", "still serving after the flood");
    let metrics = topo.node.run(|| http_get("127.0.0.1:9095", "/metrics").map(|r| r.body)).expect("netns").expect("metrics");
    assert!(metrics.contains("serviceless_dns_queries_total{outcome=\"rate_limited\"}"), "{metrics}");
    assert!(metrics.contains("serviceless_dns_queries_total{outcome=\"nxdomain\"}"), "{metrics}");
}

/// A DNS query (RFC 1035 wire format) for the A record of `name`.
fn query_a(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; one question
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    q
}
