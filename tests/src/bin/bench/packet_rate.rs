//! Real-traffic rates through veths at N apps, Serviceless XDP vs
//! kube-proxy-style iptables and nftables DNAT in the same run, on the
//! traffic topology (client -> node) with a pod of its own (10.244.9.2).
//!
//! Packet rate: `trafgen` (netsniff-ng) in the client sends UDP
//! datagrams, then TCP SYNs, to the last app's VIP (the last rule of
//! iptables' linear KUBE-SERVICES), every packet a new 5-tuple: source
//! address and port both count up, from a fresh /24 of 198.18.0.0/15 for
//! every trial, so no dataplane sees a tuple twice. The pod counts what
//! arrives with an nftables ingress counter that also drops it (no socket
//! or reply cost); the rate is that count over a window while trafgen
//! runs, the CPU is the system+softirq time of all CPUs over the same
//! window (/proc/stat). New connections/s with nginx and wrk: http_rate.rs.
//!
//! Every row proves its path over all its trials: ours by the XDP
//! `backend_new_flow` verdict counter, the baselines by the packet counter
//! of the last app's DNAT rule (NAT rules see the first packet of each
//! connection: here every packet). Each must move by about what the pod
//! received (packets) or the connections wrk made (HTTP).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use serviceless_agent::maps::DataplaneMaps;
use serviceless_tests::{
    netns::{Netns, Proc},
    topology::{http_get, link},
};

use super::{NEW_CONNECTIONS, Opts, Row, TrafficBed, VIP_RANGE, http_rate, rules, rules::Svc, stat, vip, write_outputs};

const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 9, 2);
/// trafgen runs this long before the window opens (ring set up, ARP resolved).
const WARMUP: Duration = Duration::from_millis(300);
/// The iptables chains of the last app's UDP port (kube-proxy hashes its names; any will do).
const UDP_SVC: &str = "KUBE-SVC-BENCHUDPLAST00000";
const UDP_SEP: &str = "KUBE-SEP-BENCHUDPLAST00000";

/// Which parts run: `--packet-rate-only`, `--http-only`, both in a full run.
#[derive(Clone, Copy, Default)]
pub struct Plan {
    pub packets: bool,
    pub http: bool,
}

impl Plan {
    pub const ALL: Self = Self { packets: true, http: true };
}

struct Settings {
    trials: usize,
    window: Duration,
    http_trials: usize,
    http_secs: Duration,
}

impl Settings {
    fn new(quick: bool) -> Self {
        // Quick checks the harness works (CI), not the numbers.
        let (trials, http_trials, http_secs) = if quick { (1, 1, 1) } else { (3, 3, 2) };
        Self { trials, window: Duration::from_secs(1), http_trials, http_secs: Duration::from_secs(http_secs) }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dp {
    Ours,
    Iptables,
    Nftables,
}

impl Dp {
    /// The counter (`Probe::read`'s key) that moves once per new connection.
    fn new_flow_counter(self, proto: &str) -> String {
        match self {
            Dp::Ours => "backend_new_flow".to_string(),
            _ => format!("DNAT {proto}"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Dp::Ours => "ours",
            Dp::Iptables => "iptables",
            Dp::Nftables => "nftables",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Udp,
    Syn,
}

impl Kind {
    fn proto(self) -> &'static str {
        match self {
            Kind::Udp => "udp",
            Kind::Syn => "tcp",
        }
    }
}

/// Counters that prove which dataplane translated the traffic.
enum Probe {
    /// Our verdict counters, from the agent's pinned maps.
    Ours(Box<DataplaneMaps>),
    /// The last app's iptables endpoint chain (`rules::sep_chain`) for TCP; `UDP_SEP`.
    Iptables { node: String, tcp: String },
    /// The last app's nftables endpoint chain for TCP; `endpoint-udp`.
    Nftables { node: String, tcp: String },
}

impl Probe {
    /// Ours: every verdict counter; the baselines: "DNAT <proto>", the
    /// packets of the last app's DNAT rule for `proto`.
    fn read(&self, proto: &str) -> anyhow::Result<BTreeMap<String, u64>> {
        let udp = proto == "udp";
        let (out, packets) = match self {
            Probe::Ours(maps) => return Ok(maps.verdicts().into_iter().map(|(v, n)| (v.name().to_string(), n)).collect()),
            Probe::Iptables { node, tcp } => {
                let out = netns_exec(node, "iptables", &["-t", "nat", "-L", if udp { UDP_SEP } else { tcp }, "-n", "-v", "-x"])?;
                // "     123     4567 DNAT       tcp  --  *  *  0.0.0.0/0 ..."
                let packets = out.lines().find_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    (f.get(2) == Some(&"DNAT")).then(|| f[0].parse::<u64>().ok()).flatten()
                });
                (out, packets)
            }
            Probe::Nftables { node, tcp } => {
                // Lists one chain, but nft reads the whole table: seconds at 10k services.
                let out = netns_exec(node, "nft", &["list", "chain", "ip", "kube-proxy", if udp { "endpoint-udp" } else { tcp }])?;
                // "meta l4proto tcp counter packets 12 bytes 720 dnat to ..."
                let packets = out.split("counter packets ").nth(1).and_then(|v| v.split_whitespace().next()?.parse().ok());
                (out, packets)
            }
        };
        let packets = packets.with_context(|| format!("no DNAT counter in: {out}"))?;
        Ok(BTreeMap::from([(format!("DNAT {proto}"), packets)]))
    }
}

fn netns_exec(ns: &str, cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["netns", "exec", ns, cmd];
    all.extend_from_slice(args);
    serviceless_tests::netns::run("ip", &all)
}

fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, into: &mut BTreeMap<String, u64>) {
    for (k, v) in after {
        *into.entry(k.clone()).or_default() += v.saturating_sub(before.get(k).copied().unwrap_or(0));
    }
}

/// All CPUs' time from /proc/stat, in clock ticks.
#[derive(Clone, Copy)]
pub struct Cpu {
    pub system: u64,
    pub softirq: u64,
    /// Everything but idle and iowait.
    pub busy: u64,
}

impl Cpu {
    pub fn now() -> anyhow::Result<Self> {
        let text = std::fs::read_to_string("/proc/stat")?;
        // cpu  user nice system idle iowait irq softirq steal ...
        let f: Vec<u64> = text.lines().next().context("empty /proc/stat")?.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
        anyhow::ensure!(f.len() >= 8, "unexpected /proc/stat: {}", text.lines().next().unwrap_or_default());
        Ok(Self { system: f[2], softirq: f[6], busy: f[0] + f[1] + f[2] + f[5] + f[6] + f[7] })
    }
}

/// Nanoseconds per /proc/stat tick.
pub fn tick_ns() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    1e9 / if hz > 0 { hz as f64 } else { 100.0 }
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Packet-rate results of one dataplane for one kind of packet.
#[derive(Default)]
struct Pkts {
    pps: Vec<f64>,
    /// system+softirq ns per delivered packet.
    cpu_ns: Vec<f64>,
    softirq_ns: Vec<f64>,
    /// Our XDP program's own run time per packet (bpf_stats).
    xdp_ns: Vec<f64>,
    sent: u64,
    delivered: u64,
    moved: BTreeMap<String, u64>,
}

#[derive(Default)]
struct Http {
    per_s: Vec<f64>,
    cpu_us: Vec<f64>,
    requests: u64,
    errors: u64,
    moved: BTreeMap<String, u64>,
}

#[derive(Default)]
struct Measured {
    udp: Pkts,
    syn: Pkts,
    close: Http,
    keep: Http,
}

impl Measured {
    fn pkts(&self, kind: Kind) -> &Pkts {
        if kind == Kind::Udp { &self.udp } else { &self.syn }
    }

    fn http(&self, close: bool) -> &Http {
        if close { &self.close } else { &self.keep }
    }
}

/// The pod of this scenario: its namespace, nginx, and the counter of
/// what reaches it.
struct RatePod {
    // Dropped first: nginx goes before its namespace.
    nginx: Option<Proc>,
    ns: Netns,
    node: String,
}

impl RatePod {
    fn new(bed: &TrafficBed, http: bool) -> anyhow::Result<Self> {
        let (tag, node) = (&bed.topo.tag, &bed.topo.node);
        let ns = Netns::new(&format!("{tag}-p9"))?;
        link(&format!("{tag}r9"), &ns, "eth0", &format!("{tag}s9"), node, "pod9")?;
        ns.ip(&format!("addr add {POD_IP}/24 dev eth0"))?;
        ns.ip("link set eth0 up")?;
        ns.ip("route add default via 10.244.9.1")?;
        node.ip("addr add 10.244.9.1/24 dev pod9")?;
        node.ip("link set pod9 up")?;
        // trafgen's sources, so a strict reverse-path check would pass them (removed on drop).
        node.ip("route replace 198.18.0.0/15 dev up0")?;
        let mut pod = Self { nginx: None, ns, node: node.name.clone() };
        if http {
            let dir = bed.topo.work_dir.join("rate-nginx");
            let _ = std::fs::remove_dir_all(&dir);
            pod.nginx = Some(http_rate::start_nginx(&pod.ns, &dir, SocketAddr::new(POD_IP.into(), 8080), cpus() - 1)?);
        }
        Ok(pod)
    }

    /// Counts (and drops) what reaches the pod on port 8080, per protocol.
    fn count_on(&self) -> anyhow::Result<()> {
        let text = format!(
            "add table netdev svl_rate\nadd counter netdev svl_rate udp_in\nadd counter netdev svl_rate tcp_in\n\
             add chain netdev svl_rate in {{ type filter hook ingress device eth0 priority 0 ; policy accept ; }}\n\
             add rule netdev svl_rate in ip daddr {POD_IP} udp dport 8080 counter name udp_in drop\n\
             add rule netdev svl_rate in ip daddr {POD_IP} tcp dport 8080 counter name tcp_in drop\n"
        );
        rules::nft_apply(&self.ns.name, &text).map(|_| ()).context("pod ingress counter")
    }

    fn count_off(&self) {
        let _ = self.ns.exec("nft", &["delete", "table", "netdev", "svl_rate"]);
    }

    fn delivered(&self, kind: Kind) -> anyhow::Result<u64> {
        let name = format!("{}_in", kind.proto());
        let out = self.ns.exec("nft", &["list", "counter", "netdev", "svl_rate", &name])?;
        out.split("packets ").nth(1).and_then(|v| v.split_whitespace().next()?.parse().ok()).with_context(|| format!("pod counter: {out}"))
    }
}

impl Drop for RatePod {
    fn drop(&mut self) {
        let _ = serviceless_tests::netns::ip(&format!("-n {} route del 198.18.0.0/15", self.node));
    }
}

/// Turns on kernel.bpf_stats_enabled (run_time_ns of our XDP program) while alive.
struct BpfStats(String);

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn on() -> anyhow::Result<Self> {
        let before = std::fs::read_to_string(BPF_STATS).context("reading kernel.bpf_stats_enabled")?;
        std::fs::write(BPF_STATS, "1").context("setting kernel.bpf_stats_enabled=1")?;
        Ok(Self(before.trim().to_string()))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, &self.0);
    }
}

/// (run_time_ns, run_cnt) of program `id`.
fn prog_stats(id: u64) -> anyhow::Result<(u64, u64)> {
    let out = serviceless_tests::netns::run("bpftool", &["-j", "prog", "show", "id", &id.to_string()])?;
    let v: Value = serde_json::from_str(&out).context("bpftool prog show JSON")?;
    Ok((v["run_time_ns"].as_u64().unwrap_or(0), v["run_cnt"].as_u64().unwrap_or(0)))
}

/// `ip -d -j link show dev` in `ns`.
fn link_info(ns: &Netns, dev: &str) -> anyhow::Result<Value> {
    let out = ns.ip(&format!("-d -j link show {dev}"))?;
    let v: Value = serde_json::from_str(&out).with_context(|| format!("ip link JSON: {out}"))?;
    Ok(v[0].clone())
}

/// The trafgen packet: `kind` from 198.<18+slot/256>.<slot%256>.x to `vip`
/// on the sender's CPU `cpu`. Address (1..=253) and port (1024..=65535)
/// both step by one per packet; their counts share no factor, so the
/// pair repeats only after millions of packets, far more than a trial sends.
fn trafgen_conf(mac: &str, vip: Ipv4Addr, kind: Kind, slot: u32, cpu: usize) -> String {
    let src = Ipv4Addr::new(198, 18 + (slot / 256 % 2) as u8, (slot % 256) as u8, 1);
    let l4 = match kind {
        Kind::Udp => "udp(sp=dinc(1024, 65535), dp=80), fill(0x61, 18)",
        Kind::Syn => "tcp(sp=dinc(1024, 65535), dp=80, syn, seq=drnd(), win=64240)",
    };
    format!("cpu({cpu}): {{ eth(da={mac}), ipv4(sa={src}, sa[3]=dinc(1, 253), da={vip}, ttl=64), {l4} }}\n")
}

/// Trial counter: a fresh source /24 for every trial of the run.
static SLOT: AtomicU32 = AtomicU32::new(0);

/// Runs this scenario at N apps on `bed`: ours, then the baselines
/// (`baselines`: iptables, nftables) where their rulesets are measured at
/// this size. Failures go to `skipped`, with the reason.
pub fn at(bed: &TrafficBed, n: usize, quick: bool, plan: Plan, baselines: (bool, bool), rows: &mut Vec<Row>, skipped: &mut Vec<String>) {
    let s = Settings::new(quick);
    let what = match (plan.packets, plan.http) {
        (true, true) => "packet rate and http",
        (true, false) => "packet rate",
        _ => "http",
    };
    let pod = match tools(plan).and_then(|()| RatePod::new(bed, plan.http)) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{what} at {n} apps failed: {e:#}");
            skipped.push(format!("{what} at {n} apps: {e:#}"));
            return;
        }
    };
    let mut results = Vec::new();
    for (dp, on) in [(Dp::Ours, true), (Dp::Iptables, baselines.0), (Dp::Nftables, baselines.1)] {
        if !on {
            continue;
        }
        eprintln!("   {what}: {} at {n} apps", dp.name());
        match measure(bed, &pod, dp, n, &s, plan) {
            Ok(m) => results.push((dp, m)),
            Err(e) => {
                eprintln!("{what} at {n} apps ({}) failed: {e:#}", dp.name());
                skipped.push(format!("{what} at {n} apps ({}): {e:#}", dp.name()));
            }
        }
    }
    drop(pod);
    if !baselines.0 || !baselines.1 {
        skipped.push(format!("{what} at {n} apps: baselines without a ruleset at this size are not measured"));
    }
    if !results.is_empty() {
        rows.extend(build_rows(n, &s, plan, &results, skipped));
    }
}

/// `--packet-rate-only` / `--http-only`: this scenario alone at every size.
pub fn only(opts: &Opts, plan: Plan, rows: &mut Vec<Row>, skipped: &mut Vec<String>, started: Instant) -> anyhow::Result<()> {
    let bed = TrafficBed::new()?;
    for &n in &opts.sizes {
        eprintln!("== N = {n} apps ({:.0} s elapsed)", started.elapsed().as_secs_f64());
        // No programming rows here to show a ruleset loads in time: the
        // baselines stop at 10k, as `Baseline::measure` does without a smaller size.
        let base = opts.baselines && n <= 10_000;
        at(&bed, n, opts.quick, plan, (base, base), rows, skipped);
        write_outputs(opts, rows, skipped, started.elapsed())?;
    }
    Ok(())
}

/// Fails with the package to install when a tool is missing.
fn tools(plan: Plan) -> anyhow::Result<()> {
    let mut need = vec![("conntrack", "conntrack")];
    if plan.packets {
        need.push(("trafgen", "netsniff-ng"));
    }
    if plan.http {
        need.extend([("nginx", "nginx-light"), ("wrk", "wrk")]);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for (bin, pkg) in need {
        let found = std::env::split_paths(&path).chain(["/usr/sbin".into(), "/sbin".into()]).any(|d| d.join(bin).is_file());
        anyhow::ensure!(found, "{bin} not found (Debian package {pkg}; cargo xtask bench installs it)");
    }
    Ok(())
}

/// Sets up `dp` at N apps (the agent, or the ruleset plus the last app's
/// UDP port), measures, and tears it down.
fn measure(bed: &TrafficBed, pod: &RatePod, dp: Dp, n: usize, s: &Settings, plan: Plan) -> anyhow::Result<Measured> {
    let svcs: Vec<Svc> = (0..n).map(|i| Svc { vip: vip(i), pod: POD_IP }).collect();
    let target = svcs[n - 1].vip;
    let node = &bed.topo.node;
    match dp {
        Dp::Ours => {
            let file = bed.topo.work_dir.join(format!("rate-apps-{n}.json"));
            write_source(&file, &svcs)?;
            let pin = bed.topo.bpf_dir.join(format!("svl-rate-{n}"));
            let log = bed.topo.work_dir.join(format!("rate-agent-{n}.log"));
            let mut agent = start_agent(bed, n, &file, &pin, &log)?;
            let r = (|| {
                bed.topo.wait_ready(Duration::from_secs(300))?;
                let probe = Probe::Ours(Box::new(DataplaneMaps::open_pinned(&pin).context("opening the agent's pinned maps")?));
                run_all(bed, pod, dp, &probe, target, s, plan)
            })();
            agent.terminate();
            let agent_bin = bed.agent.to_str().context("path")?;
            let _ = node.exec(agent_bin, &["detach", "--iface", "up0", "--pin-dir", &pin.display().to_string()]);
            let _ = std::fs::remove_file(&file);
            r.with_context(|| format!("agent log: {}", log.display()))
        }
        Dp::Iptables => {
            let r = (|| {
                rules::iptables_restore(&node.name, &rules::iptables_full(&svcs), true)?;
                rules::iptables_restore(&node.name, &iptables_udp(target), true)?;
                let probe = Probe::Iptables { node: node.name.clone(), tcp: rules::sep_chain(n - 1, 0) };
                run_all(bed, pod, dp, &probe, target, s, plan)
            })();
            let _ = node.exec("nft", &["flush", "ruleset"]);
            // The floods' entries would fill the table for the next scenario.
            let _ = flush_conntrack(dp, node);
            r
        }
        Dp::Nftables => {
            let r = (|| {
                // A counter on the last app's DNAT rule (kube-proxy's have none) for the path check.
                let i = n - 1;
                let plain = format!("add rule ip kube-proxy endpoint-{i}-0 meta l4proto tcp dnat to");
                let counted = format!("add rule ip kube-proxy endpoint-{i}-0 meta l4proto tcp counter dnat to");
                let full = rules::nft_full(&svcs);
                anyhow::ensure!(full.contains(&plain), "nft_full has no rule `{plain}`");
                rules::nft_apply(&node.name, &full.replacen(&plain, &counted, 1))?;
                rules::nft_apply(&node.name, &nft_udp(target))?;
                let probe = Probe::Nftables { node: node.name.clone(), tcp: format!("endpoint-{i}-0") };
                run_all(bed, pod, dp, &probe, target, s, plan)
            })();
            let _ = node.exec("nft", &["flush", "ruleset"]);
            // The floods' entries would fill the table for the next scenario.
            let _ = flush_conntrack(dp, node);
            r
        }
    }
}

/// The agent as `TrafficBed::ours` runs it, on its own pins.
fn start_agent(bed: &TrafficBed, n: usize, file: &std::path::Path, pin: &std::path::Path, log: &std::path::Path) -> anyhow::Result<Proc> {
    let cap = (n + 64).to_string();
    let new_connections = NEW_CONNECTIONS.to_string();
    let (pin, source) = (pin.display().to_string(), format!("file:{}", file.display()));
    let args = [
        "run", "--iface", "up0", "--activator", "10.245.0.2:8080", "--source", &source, "--vip-range", VIP_RANGE, "--pin-dir", &pin,
        "--listen", "127.0.0.1:9095", "--max-apps", &cap, "--max-services", &cap, "--max-backends", &cap, "--max-connections", "65536",
        "--max-new-connections", &new_connections, "--detach-on-exit", "--socket-lb", "off",
    ];
    bed.topo.node.spawn(bed.agent.to_str().context("path")?, &args, Some(log))
}

/// The file source: app-<i> on VIP:80/TCP -> pod:8080, and the last app
/// on VIP:80/UDP too (the UDP rows' target).
fn write_source(file: &std::path::Path, svcs: &[Svc]) -> anyhow::Result<()> {
    let last = svcs.len() - 1;
    let apps: Vec<Value> = svcs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut ports = vec![json!({ "port": 80, "targetPort": 8080, "protocol": "TCP" })];
            if i == last {
                ports.push(json!({ "port": 80, "targetPort": 8080, "protocol": "UDP" }));
            }
            json!({ "hostname": format!("app-{i}.bench.example"), "vip": s.vip.to_string(), "ports": ports,
                    "pods": [{ "name": "pod-9", "ip": s.pod.to_string(), "ready": true }] })
        })
        .collect();
    std::fs::write(file, serde_json::to_vec(&json!({ "apps": apps }))?)?;
    Ok(())
}

/// kube-proxy's chains for the last app's UDP port, appended after the N
/// TCP rules of KUBE-SERVICES (so its rule is the last one walked).
fn iptables_udp(vip: Ipv4Addr) -> String {
    format!(
        "*nat\n:{UDP_SVC} - [0:0]\n:{UDP_SEP} - [0:0]\n\
         -A KUBE-SERVICES -m comment --comment \"bench/last:udp cluster IP\" -m udp -p udp -d {vip}/32 --dport 80 -j {UDP_SVC}\n\
         -A {UDP_SVC} -m comment --comment \"bench/last:udp -> {POD_IP}:8080\" -j {UDP_SEP}\n\
         -A {UDP_SEP} -m comment --comment bench/last:udp -s {POD_IP}/32 -j KUBE-MARK-MASQ\n\
         -A {UDP_SEP} -m comment --comment bench/last:udp -m udp -p udp -j DNAT --to-destination {POD_IP}:8080\nCOMMIT\n"
    )
}

/// The same in kube-proxy's nftables mode (with a counter for the path check).
fn nft_udp(vip: Ipv4Addr) -> String {
    format!(
        "add chain ip kube-proxy service-udp\nadd chain ip kube-proxy endpoint-udp\n\
         add rule ip kube-proxy endpoint-udp ip saddr {POD_IP} jump mark-for-masquerade\n\
         add rule ip kube-proxy endpoint-udp meta l4proto udp counter dnat to {POD_IP}:8080\n\
         add rule ip kube-proxy service-udp numgen random mod 1 vmap {{ 0 : goto endpoint-udp }}\n\
         add element ip kube-proxy service-ips {{ {vip} . udp . 80 : goto service-udp }}\n"
    )
}

/// Every baseline trial starts from an empty kernel conntrack table.
fn flush_conntrack(dp: Dp, node: &Netns) -> anyhow::Result<()> {
    if dp != Dp::Ours {
        node.exec("conntrack", &["-F"]).context("conntrack -F")?;
    }
    Ok(())
}

fn run_all(bed: &TrafficBed, pod: &RatePod, dp: Dp, probe: &Probe, target: Ipv4Addr, s: &Settings, plan: Plan) -> anyhow::Result<Measured> {
    let mut m = Measured::default();
    let node = &bed.topo.node;
    if plan.http {
        // HTTP first, while the connection tables hold nothing of the floods.
        let vip = SocketAddr::new(target.into(), 80);
        reach(bed, vip)?;
        for (close, out) in [(true, &mut m.close), (false, &mut m.keep)] {
            // Counters are read around all trials of a kind: reading nft's takes seconds at 10k.
            let before = probe.read("tcp")?;
            for _ in 0..s.http_trials {
                flush_conntrack(dp, node)?;
                let r = http_rate::wrk(&bed.topo.client, vip, s.http_secs, close, 0)?;
                out.per_s.push(r.per_s);
                out.cpu_us.push(r.cpu_us);
                out.requests += r.requests;
                out.errors += r.errors;
            }
            delta(&before, &probe.read("tcp")?, &mut out.moved);
        }
    }
    if plan.packets {
        pod.count_on()?;
        let r = (|| -> anyhow::Result<()> {
            // Our XDP program's own cost per packet, from the kernel's BPF stats.
            let xdp = match dp {
                Dp::Ours => {
                    let id = link_info(node, "up0")?["xdp"]["prog"]["id"].as_u64().context("no XDP program on the node's up0")?;
                    // Only a figure in a note: without it (a read-only /proc/sys) the rows still stand.
                    BpfStats::on().inspect_err(|e| eprintln!("note: no XDP run time: {e:#}")).ok().map(|on| (id, on))
                }
                _ => None,
            };
            let mac = link_info(node, "up0")?["address"].as_str().context("up0 MAC")?.to_string();
            for (kind, out) in [(Kind::Udp, &mut m.udp), (Kind::Syn, &mut m.syn)] {
                let before = probe.read(kind.proto())?;
                for _ in 0..s.trials {
                    flush_conntrack(dp, node)?;
                    packet_trial(bed, pod, target, &mac, kind, s.window, xdp.as_ref().map(|x| x.0), out)?;
                }
                delta(&before, &probe.read(kind.proto())?, &mut out.moved);
            }
            Ok(())
        })();
        pod.count_off();
        r?;
    }
    Ok(m)
}

/// Waits until the VIP answers from nginx through the dataplane under test.
fn reach(bed: &TrafficBed, vip: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = vip.to_string();
        let r = bed.topo.client.run(move || http_get(&t, "/").map(|r| r.server().to_string()))?;
        match r {
            Ok(who) if who == http_rate::BODY => return Ok(()),
            other if Instant::now() > deadline => bail!("{vip} does not reach nginx: {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The counters at one end of a trial's window.
struct Sample {
    delivered: u64,
    cpu: Cpu,
    at: Instant,
    /// Our XDP program's (run_time_ns, run_cnt).
    xdp: Option<(u64, u64)>,
}

/// One trafgen run: the rate and CPU over a window, what the pod got over the whole run.
#[expect(clippy::too_many_arguments, reason = "one call site; a struct would only rename them")]
fn packet_trial(
    bed: &TrafficBed,
    pod: &RatePod,
    vip: Ipv4Addr,
    mac: &str,
    kind: Kind,
    window: Duration,
    xdp: Option<u64>,
    out: &mut Pkts,
) -> anyhow::Result<()> {
    let cpu = cpus() - 1;
    let slot = SLOT.fetch_add(1, Ordering::Relaxed) % 512;
    let work = &bed.topo.work_dir;
    let conf = work.join("trafgen.cfg");
    std::fs::write(&conf, trafgen_conf(mac, vip, kind, slot, cpu))?;
    let log = work.join("trafgen.log");
    let before = pod.delivered(kind)?;
    // `timeout` stops trafgen (SIGINT: it prints its totals) even if we fail.
    let secs = (WARMUP + window + Duration::from_millis(300)).as_secs_f64().to_string();
    let logf = std::fs::File::create(&log)?;
    let mut child = Command::new("ip")
        .args(["netns", "exec", &bed.topo.client.name, "timeout", "-s", "INT", &secs, "trafgen", "--no-sock-mem", "--dev", "eth0"])
        .args(["--conf", conf.to_str().context("path")?, "--cpus", &cpus().to_string()])
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .spawn()
        .context("starting trafgen")?;
    let sample = || -> anyhow::Result<Sample> {
        Ok(Sample { delivered: pod.delivered(kind)?, cpu: Cpu::now()?, at: Instant::now(), xdp: xdp.map(prog_stats).transpose()? })
    };
    let measured = (|| {
        std::thread::sleep(WARMUP);
        if let Some(status) = child.try_wait()? {
            bail!("trafgen exited early ({status}): {}", std::fs::read_to_string(&log).unwrap_or_default().trim());
        }
        let a = sample()?;
        std::thread::sleep(window);
        let b = sample()?;
        Ok((a, b))
    })();
    let _ = child.wait();
    let (a, b) = measured?;
    // Let what is still queued arrive before the totals are read.
    std::thread::sleep(Duration::from_millis(100));
    let after = pod.delivered(kind)?;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let sent: u64 = text
        .lines()
        .find(|l| l.contains("packets outgoing"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no packet count in trafgen's output: {}", text.trim()))?;
    let got = b.delivered.saturating_sub(a.delivered);
    anyhow::ensure!(got > 0, "no {} packet reached the pod in the window (trafgen sent {sent})", kind.proto());
    let ns = |ticks: u64| ticks as f64 * tick_ns() / got as f64;
    out.pps.push(got as f64 / (b.at - a.at).as_secs_f64());
    out.cpu_ns.push(ns((b.cpu.system + b.cpu.softirq).saturating_sub(a.cpu.system + a.cpu.softirq)));
    out.softirq_ns.push(ns(b.cpu.softirq.saturating_sub(a.cpu.softirq)));
    if let (Some((rt1, n1)), Some((rt2, n2))) = (a.xdp, b.xdp)
        && n2 > n1
    {
        out.xdp_ns.push((rt2 - rt1) as f64 / (n2 - n1) as f64);
    }
    out.sent += sent;
    out.delivered += after.saturating_sub(before);
    Ok(())
}

/// "<dp>: <counter> +<moved> for <what> (PROVEN | NOT PROVEN)", and
/// whether the counter moved within [lo, hi].
fn proof(dp: Dp, key: &str, moved: &BTreeMap<String, u64>, (lo, hi): (u64, u64), what: &str, others: bool) -> (bool, String) {
    let on = moved.get(key).copied().unwrap_or(0);
    let ok = lo <= on && on <= hi;
    let rest: Vec<String> = moved.iter().filter(|(k, v)| *k != key && **v > 0).map(|(k, v)| format!("{k} +{v}")).collect();
    let rest = if others && !rest.is_empty() { format!("; also {}", rest.join(", ")) } else { String::new() };
    (ok, format!("{}: {key} +{on} for {what} ({}{rest})", dp.name(), if ok { "PROVEN" } else { "NOT PROVEN" }))
}

fn build_rows(n: usize, s: &Settings, plan: Plan, results: &[(Dp, Measured)], skipped: &mut Vec<String>) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut checks = |proofs: Vec<(bool, String)>, row: &str| -> String {
        for (ok, p) in &proofs {
            if !ok {
                super::not_proven(&format!("{row} at {n} apps: {p}"));
                skipped.push(format!("{row} at {n} apps: path check failed: {p}"));
            }
        }
        proofs.into_iter().map(|(_, p)| p).collect::<Vec<_>>().join("; ")
    };
    let row = |scenario: &'static str, path: &str, unit: &'static str, higher: bool, get: &dyn Fn(&Measured) -> Vec<f64>, note: String| {
        let mut r = Row::new(scenario, path, n, unit);
        r.lower_better = !higher;
        let of = |dp: Dp| results.iter().find(|(d, _)| *d == dp).and_then(|(_, m)| stat(get(m)));
        (r.ours, r.iptables, r.nftables) = (of(Dp::Ours), of(Dp::Iptables), of(Dp::Nftables));
        r.note = note;
        r
    };
    let each = |f: &dyn Fn(Dp, &Measured) -> String| results.iter().map(|(d, m)| f(*d, m)).collect::<Vec<_>>().join(", ");
    if plan.packets {
        for (kind, label) in [(Kind::Udp, "UDP"), (Kind::Syn, "TCP SYN")] {
            let proofs = results
                .iter()
                .map(|(dp, m)| {
                    let p = m.pkts(kind);
                    let key = dp.new_flow_counter(kind.proto());
                    // Nothing reaches the pod untranslated; a few percent may be lost past the DNAT.
                    let range = (p.delivered, p.delivered + p.delivered / 20 + 64);
                    proof(*dp, &key, &p.moved, range, &format!("{} delivered", p.delivered), true)
                })
                .collect();
            let path_note = checks(proofs, &format!("{label} packet rate"));
            let sent = each(&|d, m| format!("{} {}/{}", d.name(), m.pkts(kind).delivered, m.pkts(kind).sent));
            let note = format!(
                "trafgen (one sender, CPU {}) to the last app's VIP:80, every packet a new 5-tuple; {} x {} s windows; delivered = the pod's ingress counter; delivered/sent: {sent}; path (all trials): {path_note}",
                cpus() - 1,
                s.trials,
                s.window.as_secs()
            );
            rows.push(row("packet-rate", &format!("{label}, a new 5-tuple per packet: packets/s delivered to the pod"), "pkt/s", true, &|m: &Measured| m.pkts(kind).pps.clone(), note));
            let soft = each(&|d, m| format!("{} {:.0}", d.name(), stat(m.pkts(kind).softirq_ns.clone()).map_or(0.0, |x| x.median)));
            let xdp = results
                .iter()
                .find(|(d, _)| *d == Dp::Ours)
                .and_then(|(_, m)| stat(m.pkts(kind).xdp_ns.clone()))
                .map_or("-".to_string(), |x| format!("{:.0}", x.median));
            let note = format!(
                "system+softirq time of all CPUs over the window / packets delivered (the sender's system time included); softirq alone (receive path: XDP or netfilter, forwarding, the pod's ingress), ns: {soft}; our XDP program alone: {xdp} ns/packet (kernel.bpf_stats_enabled, on during our runs)"
            );
            rows.push(row("packet-rate", &format!("{label}, a new 5-tuple per packet: CPU per delivered packet"), "ns/pkt", false, &|m: &Measured| m.pkts(kind).cpu_ns.clone(), note));
        }
    }
    if plan.http {
        let c = http_rate::CONNECTIONS;
        for (close, label) in [(true, "Connection: close"), (false, "keep-alive")] {
            let proofs = results
                .iter()
                .map(|(dp, m)| {
                    let h = m.http(close);
                    let key = dp.new_flow_counter("tcp");
                    // One new flow per request (close) or per connection (keep-alive),
                    // plus those open or failed when a run ended.
                    let slack = h.errors + c * s.http_trials as u64 + 16;
                    let (range, what) = if close {
                        ((h.requests, h.requests + slack), format!("{} requests", h.requests))
                    } else {
                        ((1, slack), format!("{c} connections, {} requests", h.requests))
                    };
                    proof(*dp, &key, &h.moved, range, &what, false)
                })
                .collect();
            let path_note = checks(proofs, &format!("http {label}"));
            let errors = each(&|d, m| format!("{} {}", d.name(), m.http(close).errors));
            let note = format!(
                "nginx (one process, CPU {}) and wrk (one thread, CPU 0, {c} connections) to the last app's VIP:80; {} x {} s; errors: {errors}; path: {path_note}",
                cpus() - 1,
                s.http_trials,
                s.http_secs.as_secs()
            );
            let (rate, unit, per) = if close {
                ("new connections/s (nginx + wrk, Connection: close)", "conn/s", "CPU per connection (all CPUs: client, server, kernel)")
            } else {
                ("keep-alive requests/s (nginx + wrk)", "req/s", "CPU per keep-alive request (all CPUs)")
            };
            rows.push(row("http", rate, unit, true, &|m: &Measured| m.http(close).per_s.clone(), note));
            let note = "all non-idle CPU time from /proc/stat over the wrk run / requests answered".to_string();
            rows.push(row("http", per, "us", false, &|m: &Measured| m.http(close).cpu_us.clone(), note));
        }
    }
    rows
}
