//! `cargo xtask demo`: a client, a node running the agent on the file
//! source, and pods, each in a network namespace. Shows the whole story: a
//! live app balanced over two pods; a sleeping app woken by its first
//! request (through the agent's own activator and a stand-in orchestrator
//! run by the file's `scale.exec` hook); the same app put to sleep when
//! idle; then what the dataplane holds (`serviceless inspect`, bpftool).

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serviceless_tests::{
    netns,
    orchestrator::{ManagedApp, Orchestrator},
    topology::{Topology, agent_binary, http_get},
};

/// The always-on app; the orchestrator manages sleepy.apps.example.com.
const HELLO: &str = "  - hostname: hello.apps.example.com
    vip: 10.96.0.10
    ports: [{ port: 80, targetPort: 8080 }]
    pods:
      - { name: pod-1, ip: 10.244.1.2, ready: true }
      - { name: pod-2, ip: 10.244.2.2, ready: true }";

fn main() -> anyhow::Result<()> {
    anyhow::ensure!(serviceless_tests::kernel_tests_enabled("demo"), "the demo needs root");
    let server = std::env::current_exe()?.with_file_name("svl-test-server");
    println!("== building the topology (network namespaces svdemo-*)");
    let mut topo = Topology::new("svdemo", &server)?;
    topo.external_activator = false;
    topo.add_pod(1, "pod-1")?;
    topo.add_pod(2, "pod-2")?;
    topo.add_pod(3, "sleepy-1")?;
    let file = topo.work_dir.join("apps.yaml");
    let sleepy = ManagedApp {
        hostname: "sleepy.apps.example.com",
        vip: "10.96.0.20",
        pod: ("sleepy-1", "10.244.3.2"),
        extra: "idleAfter: 4s",
        ports: "",
    };
    // The stand-in orchestrator takes 200 ms to "start" a pod.
    let orchestrator = Orchestrator::install(&topo.work_dir, &file, HELLO, &[sleepy], "0.2")?;
    println!("# {} (the agent watches it; {} rewrites it)", file.display(), orchestrator.script.display());
    print!("{}", std::fs::read_to_string(&file)?);

    println!("\n== starting the agent on uplink up0 (XDP ingress + TC egress, activator on 10.0.0.1:8012)");
    let _agent = topo.start_agent(&file, "agent.log", &[])?;
    topo.wait_ready(Duration::from_secs(20)).with_context(|| topo.agent_log("agent.log"))?;

    println!("\n== a live app: traffic from the client (10.0.0.2)");
    for _ in 0..6 {
        let r = topo.request("10.96.0.10:80")?;
        println!("  GET http://hello.apps.example.com (10.96.0.10:80) -> {} (client saw peer {})", r.body.trim(), r.peer);
    }

    println!("\n== a sleeping app: the first request wakes it");
    let started = Instant::now();
    let r = topo.request("10.96.0.20:80")?;
    println!(
        "  GET http://sleepy.apps.example.com (10.96.0.20:80) -> {} in {:.0} ms (held by the activator while the orchestrator took 200 ms)",
        r.body.trim(),
        started.elapsed().as_secs_f64() * 1e3
    );
    println!("  orchestrator calls: {:?}", orchestrator.calls());
    let r = topo.request("10.96.0.20:80")?;
    println!("  GET again -> {} (straight to the pod through XDP now)", r.body.trim());

    println!("\n== idle for its window (idleAfter: 4s): put to sleep");
    let idle_from = Instant::now();
    while orchestrator.calls().len() < 2 && idle_from.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("  after {:.1} s without traffic, orchestrator calls: {:?}", idle_from.elapsed().as_secs_f64(), orchestrator.calls());
    std::thread::sleep(Duration::from_millis(1500));

    let pin_dir = topo.pin_dir();
    println!("\n== serviceless inspect --pin-dir {}", pin_dir.display());
    let out = Command::new(agent_binary()?)
        .args(["inspect", "--pin-dir"])
        .arg(&pin_dir)
        .arg("--state-file")
        .arg(topo.work_dir.join("sources.json"))
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));

    use serviceless_common::map_names;
    for map in [map_names::SERVICES, map_names::BACKENDS, map_names::CONNTRACK] {
        let pin: PathBuf = pin_dir.join(map);
        println!("\n== bpftool map dump pinned {}", pin.display());
        match netns::run("bpftool", &["map", "dump", "pinned", pin.to_str().context("path")?]) {
            Ok(text) => print!("{}", text.lines().take(40).collect::<Vec<_>>().join("\n")),
            Err(e) => println!("  (bpftool: {e:#})"),
        }
        println!();
    }
    println!("\n== bpftool map lookup pinned {}/{} key 0 (hostname lives here)", pin_dir.display(), map_names::APPS);
    let app0 = pin_dir.join(map_names::APPS);
    if let Ok(text) = netns::run("bpftool", &["map", "lookup", "pinned", app0.to_str().context("path")?, "key", "0", "0", "0", "0"]) {
        println!("{}", text.trim());
    }

    println!("\n== metrics (excerpt of http://127.0.0.1:9095/metrics in the node namespace)");
    let metrics = topo.node.run(|| http_get("127.0.0.1:9095", "/metrics"))??;
    for line in metrics.body.lines().filter(|l| {
        l.starts_with("serviceless_packets_total") && !l.ends_with(" 0")
            || l.starts_with("serviceless_apps_programmed")
            || l.starts_with("serviceless_programming_latency_seconds_count")
            || l.starts_with("serviceless_conntrack_events_total") && !l.ends_with(" 0")
            || l.starts_with("serviceless_wakes_total")
            || l.starts_with("serviceless_sleeps_total")
            || l.starts_with("serviceless_wake_seconds_sum")
    }) {
        println!("  {line}");
    }
    println!("\n== done; removing namespaces (the agent log was {})", topo.work_dir.join("agent.log").display());
    Ok(())
}
