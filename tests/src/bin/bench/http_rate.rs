//! New connections/s that measure the dataplane, not the test programs:
//! nginx (one process, a tiny fixed body, no access log) in the pod and
//! wrk (one thread) in the client, pinned to different CPUs. With
//! `Connection: close` every request is a new connection (the
//! dataplane's new-flow path); the keep-alive run measures established
//! connections. CPU per request is all non-idle CPU time over the run
//! (client, server and kernel) divided by the requests answered.

use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serviceless_tests::{
    netns::{Netns, Proc, output},
    topology::http_get,
};

use super::packet_rate::{Cpu, tick_ns};

/// What nginx answers: the first word tells a VIP check who answered.
pub const BODY: &str = "nginx-rate";
/// Connections wrk keeps open (and reopens, with `Connection: close`).
pub const CONNECTIONS: u64 = 32;

/// Starts nginx in `ns` on `listen`, pinned to `cpu`, with its own prefix
/// and configuration under `dir`.
pub fn start_nginx(ns: &Netns, dir: &Path, listen: SocketAddr, cpu: usize) -> anyhow::Result<Proc> {
    std::fs::create_dir_all(dir)?;
    let d = dir.display();
    // One process (master_process off): nothing to fork, easy to pin and
    // kill; keep-alive connections are never closed by request count.
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 100000000;\n\
         client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         server {{\n    listen {listen} backlog=4096;\n    location / {{ return 200 \"{BODY}\\n\"; }}\n  }}\n}}\n"
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let (cpu, prefix, conf_path, log) = (cpu.to_string(), format!("{d}/"), conf_path.display().to_string(), format!("{d}/error.log"));
    let args = ["-c", &cpu, "nginx", "-p", &prefix, "-c", &conf_path, "-e", &log];
    let mut proc = ns.spawn("taskset", &args, Some(&dir.join("stdout.log")))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let target = listen.to_string();
    loop {
        let t = target.clone();
        if ns.run(move || http_get(&t, "/").is_ok_and(|r| r.server() == BODY))? {
            return Ok(proc);
        }
        if !proc.is_running() || Instant::now() > deadline {
            bail!("nginx did not answer on {listen}: {}", std::fs::read_to_string(&log).unwrap_or_default().trim());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One wrk run.
pub struct Run {
    /// Requests answered per second (wrk's Requests/sec).
    pub per_s: f64,
    pub requests: u64,
    /// Socket errors plus non-2xx answers.
    pub errors: u64,
    /// All non-idle CPU time over the run per request answered, microseconds.
    pub cpu_us: f64,
}

/// Runs wrk (one thread, pinned to `cpu`) from `client` against `target`
/// for `secs`; `close`: one request per connection.
pub fn wrk(client: &Netns, target: SocketAddr, secs: Duration, close: bool, cpu: usize) -> anyhow::Result<Run> {
    let url = format!("http://{target}/");
    let (cpu, conns, dur) = (cpu.to_string(), CONNECTIONS.to_string(), format!("{}s", secs.as_secs().max(1)));
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &client.name, "taskset", "-c", &cpu, "wrk", "-t1", "-c", &conns, "-d", &dur, "--timeout", "2s"]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(&url);
    let before = Cpu::now()?;
    let out = output(cmd).context("running wrk")?;
    let after = Cpu::now()?;
    // "  37446 requests in 2.00s, 5.29MB read"
    let requests: u64 = out
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no request count in wrk's output: {out}"))?;
    let per_s: f64 = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output: {out}"))?;
    // "Socket errors: connect 0, read 0, write 0, timeout 0" and "Non-2xx or 3xx responses: 5"
    let socket_errors: u64 = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
        .map_or(0, |l| l.split(',').filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok()).sum());
    let non_2xx: u64 = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    if requests == 0 {
        bail!("wrk got no answer from {url}: {out}");
    }
    let busy = after.busy.saturating_sub(before.busy) as f64 * tick_ns();
    Ok(Run { per_s, requests, errors: socket_errors + non_2xx, cpu_us: busy / 1e3 / requests as f64 })
}
