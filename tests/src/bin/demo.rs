//! `cargo xtask demo`: a client, a node running the agent on the file
//! source, two pods and an activator, each in a network namespace. Sends
//! traffic to a live app and to an app with no pods, then shows what the
//! dataplane holds (`serviceless inspect`, bpftool) and cleans up.

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::Context as _;
use serviceless_tests::{
    netns,
    topology::{Topology, agent_binary, http_get},
};

const APPS: &str = "\
# Desired state for the demo: the agent watches this file.
apps:
  - hostname: hello.apps.example.com
    vip: 10.96.0.10
    ports: [{ port: 80, targetPort: 8080 }]
    pods:
      - { name: pod-1, ip: 10.244.1.2, ready: true }
      - { name: pod-2, ip: 10.244.2.2, ready: true }
  - hostname: sleepy.apps.example.com   # scaled to zero: no pods
    vip: 10.96.0.20
    ports: [{ port: 80, targetPort: 8080 }]
";

fn main() -> anyhow::Result<()> {
    anyhow::ensure!(serviceless_tests::kernel_tests_enabled("demo"), "the demo needs root");
    let server = std::env::current_exe()?.with_file_name("svl-test-server");
    println!("== building the topology (network namespaces svdemo-*)");
    let mut topo = Topology::new("svdemo", &server)?;
    topo.add_pod(1, "pod-1")?;
    topo.add_pod(2, "pod-2")?;
    let file = topo.work_dir.join("apps.yaml");
    std::fs::write(&file, APPS)?;
    println!("{APPS}");

    println!("== starting the agent on uplink up0 (XDP ingress + TC egress), source file:{}", file.display());
    let _agent = topo.start_agent(&file, "agent.log", &[])?;
    topo.wait_ready(Duration::from_secs(20)).with_context(|| topo.agent_log("agent.log"))?;

    println!("\n== traffic from the client (10.0.0.2)");
    for _ in 0..6 {
        let r = topo.request("10.96.0.10:80")?;
        println!("  GET http://hello.apps.example.com (10.96.0.10:80) -> {} (client saw peer {})", r.body.trim(), r.peer);
    }
    for _ in 0..2 {
        let r = topo.request("10.96.0.20:80")?;
        println!("  GET http://sleepy.apps.example.com (10.96.0.20:80) -> {} (client saw peer {})", r.body.trim(), r.peer);
    }

    let pin_dir = topo.pin_dir();
    println!("\n== serviceless inspect --pin-dir {}", pin_dir.display());
    let out = Command::new(agent_binary()?).args(["inspect", "--pin-dir"]).arg(&pin_dir).output()?;
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
    }) {
        println!("  {line}");
    }
    println!("\n== done; removing namespaces (the agent log was {})", topo.work_dir.join("agent.log").display());
    Ok(())
}
