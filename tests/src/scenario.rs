//! Shared steps of the network-namespace scenarios: the desired-state file,
//! waiting for a condition, and `serviceless inspect` on a topology.

use std::{path::Path, thread, time::{Duration, Instant}};

use crate::topology::{Topology, agent_binary};

/// (name, ip, ready)
pub type PodState<'a> = (&'a str, &'a str, bool);

/// Writes the desired-state file atomically (the agent never sees half a file).
pub fn write_apps(path: &Path, apps: &[(&str, &str, &[PodState])]) {
    let mut yaml = String::from("apps:\n");
    for (host, vip, pods) in apps {
        yaml.push_str(&format!("  - hostname: {host}\n    vip: {vip}\n    ports: [{{ port: 80, targetPort: 8080 }}]\n    pods:\n"));
        if pods.is_empty() {
            yaml.truncate(yaml.len() - "    pods:\n".len());
        }
        for (name, ip, ready) in pods.iter() {
            yaml.push_str(&format!("      - {{ name: {name}, ip: {ip}, ready: {ready} }}\n"));
        }
    }
    write_raw(path, &yaml);
}

pub fn write_raw(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write desired state");
    std::fs::rename(&tmp, path).expect("rename desired state");
}

pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// `serviceless inspect --json` against the topology's pins.
pub fn inspect(topo: &Topology) -> serde_json::Value {
    inspect_with(topo, &[])
}

/// `serviceless inspect --json <extra>` against the topology's pins.
pub fn inspect_with(topo: &Topology, extra: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(agent_binary().expect("agent binary"))
        .args(["inspect", "--json"])
        .args(extra)
        .arg("--pin-dir")
        .arg(topo.pin_dir())
        .arg("--state-file")
        .arg(topo.work_dir.join("sources.json"))
        .output()
        .expect("run inspect");
    assert!(out.status.success(), "inspect failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("inspect JSON")
}

pub fn backend_states(topo: &Topology, host: &str) -> Vec<(String, String)> {
    inspect(topo)["apps"]
        .as_array()
        .expect("apps")
        .iter()
        .filter(|a| a["hostname"] == host)
        .flat_map(|a| a["backends"].as_array().cloned().unwrap_or_default())
        .map(|b| (b["ip"].as_str().unwrap_or("").to_string(), b["state"].as_str().unwrap_or("").to_string()))
        .collect()
}


/// One HTTP request from network namespace `ns` on its own thread, with a
/// timeout long enough to be held while an app wakes: (status, the server
/// that answered).
pub fn held_request(ns: &str, target: &str) -> std::thread::JoinHandle<anyhow::Result<(u16, String)>> {
    let ns = ns.to_string();
    let target: std::net::SocketAddr = target.parse().expect("target");
    thread::spawn(move || {
        crate::netns::enter(&ns)?;
        let mut c = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
        c.set_read_timeout(Some(Duration::from_secs(60)))?;
        std::io::Write::write_all(&mut c, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut c, &mut text)?;
        let status = text.split_whitespace().nth(1).unwrap_or("0").parse()?;
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").split_whitespace().next().unwrap_or("").to_string();
        Ok((status, body))
    })
}
