//! `serviceless-bench`: Serviceless side by side with kube-proxy-style
//! iptables and nftables, in the same run (`cargo xtask bench` runs it).
//!
//! Scenarios at N apps: per-packet cost (BPF_PROG_TEST_RUN, against an
//! XDP_PASS floor), programming latency (one backend change, full resync
//! from empty), real traffic through network namespaces, and memory; then
//! pods on other nodes and scale to zero (wake overhead, held connections). Writes
//! `results.json` and `results.md` into `--out`. Never asserts numbers.

use serviceless_tests::xdp_pass as floor;
#[path = "bench/fabric.rs"]
mod fabric;
#[path = "bench/identity.rs"]
mod identity;
// In-node clients through the socket hooks vs iptables/nftables DNAT.
#[path = "bench/east_west.rs"]
mod east_west;
#[path = "bench/rules.rs"]
mod rules;
#[path = "bench/traffic.rs"]
mod traffic;
#[path = "bench/wake.rs"]
mod wake;
// Packet rate (trafgen) and new connections/s (nginx + wrk) through veths.
#[path = "bench/http_rate.rs"]
mod http_rate;
#[path = "bench/packet_rate.rs"]
mod packet_rate;

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use rules::Svc;
use serde_json::{Value, json};
use serviceless_agent::{
    dataplane::Sizes,
    model::{AppSpec, BackendSpec, PortSpec, Protocol},
};
use serviceless_tests::{
    TestDataplane, ensure_bpffs,
    flood::{Flood, syn_flood},
    netns::Netns,
    packet::Packet,
    topology::Topology,
};

const VIP_BASE: u32 = u32::from_be_bytes([10, 96, 0, 1]);
const POD_BASE: u32 = u32::from_be_bytes([10, 128, 0, 2]);
const VIP_RANGE: &str = "10.96.0.0/12";
const UNKNOWN_VIP: &str = "10.111.255.200";
const TRAFFIC_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const PROG_NS: &str = "svlb-prog";
/// New-connection table of the traffic agent: small, so the SYN flood row
/// shows it churning.
const NEW_CONNECTIONS: u32 = 16_384;

struct Opts {
    quick: bool,
    out: PathBuf,
    sizes: Vec<usize>,
    traffic: bool,
    /// Measure iptables/nftables too (off inside VMs, which have neither).
    baselines: bool,
    /// Only the scale-to-zero rows (`--scale-to-zero-only`).
    wake_only: bool,
    /// Only the app-identity rows: VIP collisions, DNS, allocation (`--identity-only`).
    identity_only: bool,
    /// Only the east-west rows: in-node clients through the socket hooks
    /// vs iptables/nftables DNAT (`--east-west-only`).
    east_west_only: bool,
    /// Only the packet-rate and/or nginx+wrk rows (`--packet-rate-only`, `--http-only`).
    rate_only: Option<packet_rate::Plan>,
}

/// How much of each scenario to run.
struct Budget {
    pkt_repeat: u32,
    pkt_trials: usize,
    ours_full: (usize, Duration),
    ours_change: (usize, Duration),
    base_full: (usize, Duration),
    base_change: (usize, Duration),
    /// A baseline is skipped at the next N when its extrapolated full sync exceeds this.
    base_limit: Duration,
    traffic_secs: Duration,
}

impl Budget {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                pkt_repeat: 100_000,
                pkt_trials: 5,
                ours_full: (5, Duration::from_secs(3)),
                ours_change: (200, Duration::from_secs(2)),
                base_full: (3, Duration::from_secs(5)),
                base_change: (10, Duration::from_secs(5)),
                base_limit: Duration::from_secs(10),
                traffic_secs: Duration::from_secs(2),
            }
        } else {
            Self {
                pkt_repeat: 1_000_000,
                pkt_trials: 11,
                ours_full: (20, Duration::from_secs(30)),
                ours_change: (20_000, Duration::from_secs(20)),
                base_full: (10, Duration::from_secs(45)),
                base_change: (50, Duration::from_secs(30)),
                base_limit: Duration::from_secs(60),
                traffic_secs: Duration::from_secs(3),
            }
        }
    }
}

#[derive(Clone, Debug)]
struct Stat {
    median: f64,
    p99: f64,
    samples: usize,
}

fn stat(mut v: Vec<f64>) -> Option<Stat> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    Some(Stat {
        median: q(0.5),
        p99: q(0.99),
        samples: v.len(),
    })
}

/// The median of `v` (NaN when empty).
fn median(v: &[f64]) -> f64 {
    stat(v.to_vec()).map_or(f64::NAN, |s| s.median)
}

fn single(x: f64) -> Option<Stat> {
    Some(Stat {
        median: x,
        p99: x,
        samples: 1,
    })
}

struct Row {
    scenario: &'static str,
    path: String,
    n: usize,
    unit: &'static str,
    /// true when lower is better (costs), false for throughput.
    lower_better: bool,
    ours: Option<Stat>,
    iptables: Option<Stat>,
    nftables: Option<Stat>,
    note: String,
}

impl Row {
    fn new(scenario: &'static str, path: &str, n: usize, unit: &'static str) -> Self {
        Self {
            scenario,
            path: path.into(),
            n,
            unit,
            lower_better: true,
            ours: None,
            iptables: None,
            nftables: None,
            note: String::new(),
        }
    }

    /// How many times better ours is than `base` (by median).
    fn ratio(&self, base: &Option<Stat>) -> Option<f64> {
        let (o, b) = (self.ours.as_ref()?.median, base.as_ref()?.median);
        if o <= 0.0 || b <= 0.0 {
            return None;
        }
        Some(if self.lower_better { b / o } else { o / b })
    }
}

fn stat_json(s: &Option<Stat>) -> Value {
    match s {
        Some(s) => json!({ "median": s.median, "p99": s.p99, "samples": s.samples }),
        None => Value::Null,
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("serviceless-bench: {e:#}");
        std::process::exit(1);
    }
    let unproven = UNPROVEN.load(std::sync::atomic::Ordering::Relaxed);
    if unproven > 0 {
        eprintln!("serviceless-bench: {unproven} row(s) did not take the path they name (NOT PROVEN in the results); failing");
        std::process::exit(1);
    }
}

fn parse_opts() -> anyhow::Result<Opts> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut o = Opts {
        quick: false,
        out: PathBuf::from("target/bench/latest"),
        sizes: Vec::new(),
        traffic: true,
        baselines: true,
        wake_only: false,
        identity_only: false,
        east_west_only: false,
        rate_only: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--no-traffic" => o.traffic = false,
            // Serviceless only (per-packet against the floor, programming, memory).
            "--ours-only" => {
                o.traffic = false;
                o.baselines = false;
            }
            "--scale-to-zero-only" => o.wake_only = true,
            "--identity-only" => o.identity_only = true,
            "--east-west-only" => o.east_west_only = true,
            "--packet-rate-only" => o.rate_only.get_or_insert_default().packets = true,
            "--http-only" => o.rate_only.get_or_insert_default().http = true,
            "--out" => o.out = it.next().context("--out DIR")?.into(),
            "--sizes" => {
                o.sizes = it
                    .next()
                    .context("--sizes 1,1000,...")?
                    .split(',')
                    .map(|s| s.trim().replace('_', "").parse())
                    .collect::<Result<_, _>>()?
            }
            other => bail!(
                "unknown argument {other}; usage: serviceless-bench [--quick] [--out DIR] [--sizes 1,1000] [--no-traffic] [--ours-only] [--scale-to-zero-only] [--identity-only] [--east-west-only] [--packet-rate-only] [--http-only]"
            ),
        }
    }
    if o.sizes.is_empty() {
        o.sizes = if o.quick {
            vec![1, 1_000]
        } else {
            vec![1, 1_000, 10_000, 100_000, 1_000_000]
        };
    }
    Ok(o)
}

fn run() -> anyhow::Result<()> {
    let opts = parse_opts()?;
    // SAFETY: no preconditions.
    anyhow::ensure!(
        unsafe { libc::geteuid() } == 0,
        "needs root (BPF_PROG_TEST_RUN, network namespaces)"
    );
    ensure_bpffs()?;
    std::fs::create_dir_all(&opts.out)?;
    let budget = Budget::new(opts.quick);
    let started = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let mut skipped: Vec<String> = Vec::new();
    if opts.identity_only {
        let server = std::env::current_exe()?.parent().context("exe dir")?.join("svl-test-server");
        run_identity(&opts, &budget, &server, &mut rows, &mut skipped);
        write_outputs(&opts, &rows, &skipped, started.elapsed())?;
        println!("serviceless-bench: results in {}", opts.out.display());
        return Ok(());
    }
    if opts.east_west_only {
        let server = std::env::current_exe()?.parent().context("exe dir")?.join("svl-test-server");
        run_east_west(&opts, &budget, &server, &mut rows, &mut skipped);
        write_outputs(&opts, &rows, &skipped, started.elapsed())?;
        println!("serviceless-bench: results in {}", opts.out.display());
        return Ok(());
    }
    if let Some(plan) = opts.rate_only {
        packet_rate::only(&opts, plan, &mut rows, &mut skipped, started)?;
        write_outputs(&opts, &rows, &skipped, started.elapsed())?;
        println!("serviceless-bench: results in {}", opts.out.display());
        return Ok(());
    }
    if opts.wake_only {
        let server = std::env::current_exe()?.parent().context("exe dir")?.join("svl-test-server");
        wake::run(&budget, &server, &mut rows)?;
        write_outputs(&opts, &rows, &skipped, started.elapsed())?;
        println!("serviceless-bench: results in {}", opts.out.display());
        return Ok(());
    }

    let floor = floor::Floor::load()?;
    let prog_ns = if opts.baselines { Some(Netns::new(PROG_NS)?) } else { None };
    let mut ipt = Baseline::new("iptables");
    let mut nft = Baseline::new("nftables");

    let topo = if opts.traffic {
        Some(TrafficBed::new()?)
    } else {
        None
    };

    for &n in &opts.sizes {
        eprintln!(
            "== N = {n} apps ({:.0} s elapsed)",
            started.elapsed().as_secs_f64()
        );
        let apps = bench_apps(n);
        let svcs: Vec<Svc> = (0..n)
            .map(|i| Svc {
                vip: vip(i),
                pod: pod(i),
            })
            .collect();

        // --- Serviceless: programming, memory, per-packet -----------------
        let ours = ours_at(n, &apps, &floor, &budget, &mut rows)?;

        // --- Baselines: programming + memory ------------------------------
        let (ipt_res, nft_res) = match &prog_ns {
            Some(ns) => (
                ipt.measure(n, &budget, &ns.name, &svcs, &mut skipped),
                nft.measure(n, &budget, &ns.name, &svcs, &mut skipped),
            ),
            None => (None, None),
        };
        let mut change = Row::new("programming", "one backend change", n, "us");
        change.ours = stat(ours.change_us.clone());
        change.iptables = ipt_res.as_ref().and_then(|r| stat(r.change_us.clone()));
        change.nftables = nft_res.as_ref().and_then(|r| stat(r.change_us.clone()));
        change.note = format!("ours: Store upsert + Reconciler::apply (map writes included), {}; baselines: kube-proxy partial sync through iptables-restore / nft -f (process start included, as kube-proxy pays it)", ours.change_tail);
        rows.push(change);
        let mut full = Row::new("programming", "full resync from empty", n, "ms");
        full.ours = stat(ours.full_ms.clone());
        full.iptables = ipt_res.as_ref().and_then(|r| stat(r.full_ms.clone()));
        full.nftables = nft_res.as_ref().and_then(|r| stat(r.full_ms.clone()));
        rows.push(full);
        let mut mem = Row::new("memory", "kernel bytes per app", n, "B/app");
        mem.ours = single(ours.map_bytes_per_app);
        mem.iptables = ipt_res
            .as_ref()
            .and_then(|r| r.mem_per_app.and_then(single));
        mem.nftables = nft_res
            .as_ref()
            .and_then(|r| r.mem_per_app.and_then(single));
        mem.note = format!(
            "ours: memlock of the app-sized maps (services, apps, activity, backends, wake gate) from /proc/self/fdinfo, sized to N; all maps incl. a 64k-connection conntrack table: {:.0} B/app; baselines: Slab+VmallocUsed+Percpu delta in /proc/meminfo{}",
            ours.all_bytes_per_app,
            if n < 1000 {
                " (meaningless below 1000 apps: noise)"
            } else {
                ""
            }
        );
        rows.push(mem);
        let mut ct = Row::new("memory", "kernel bytes per tracked connection", n, "B/conn");
        ct.ours = single(ours.ct_bytes_per_connection);
        ct.note = "memlock of svl_ct_v1 (preallocated hash map, two entries per connection: forward and reply) / --max-connections; independent of N".into();
        rows.push(ct);

        write_outputs(&opts, &rows, &skipped, started.elapsed())?;

        // --- Real traffic -------------------------------------------------
        if let Some(bed) = &topo
            && let Err(e) = bed.measure(
                n,
                &budget,
                &svcs,
                ipt_res.is_some(),
                nft_res.is_some(),
                &mut rows,
                &mut skipped,
            )
        {
            eprintln!("traffic at {n} apps failed: {e:#}");
            skipped.push(format!("traffic at {n} apps: {e:#}"));
        }
        if let Some(bed) = &topo {
            let baselines = (ipt_res.is_some(), nft_res.is_some());
            packet_rate::at(bed, n, opts.quick, packet_rate::Plan::ALL, baselines, &mut rows, &mut skipped);
        }
        write_outputs(&opts, &rows, &skipped, started.elapsed())?;
    }
    drop(topo);
    // --- Pods on other nodes (once; independent of N) ---------------------
    eprintln!("== remote pods ({:.0} s elapsed)", started.elapsed().as_secs_f64());
    if let Err(e) = fabric::per_packet(&budget, &mut rows) {
        eprintln!("remote-pod per-packet rows failed: {e:#}");
        skipped.push(format!("remote-pod per-packet rows: {e:#}"));
    }
    if opts.traffic {
        let server = std::env::current_exe()?.parent().context("exe dir")?.join("svl-test-server");
        if let Err(e) = fabric::traffic(&budget, &server, &mut rows) {
            eprintln!("remote-pod traffic failed: {e:#}");
            skipped.push(format!("remote-pod traffic: {e:#}"));
        }
        eprintln!("== scale to zero ({:.0} s elapsed)", started.elapsed().as_secs_f64());
        if let Err(e) = wake::run(&budget, &server, &mut rows) {
            eprintln!("scale-to-zero rows failed: {e:#}");
            skipped.push(format!("scale to zero: {e:#}"));
        }
        eprintln!("== app identity ({:.0} s elapsed)", started.elapsed().as_secs_f64());
        run_identity(&opts, &budget, &server, &mut rows, &mut skipped);
        eprintln!("== east-west ({:.0} s elapsed)", started.elapsed().as_secs_f64());
        run_east_west(&opts, &budget, &server, &mut rows, &mut skipped);
    }
    drop(prog_ns);
    let total = started.elapsed();
    write_outputs(&opts, &rows, &skipped, total)?;
    println!(
        "serviceless-bench: done in {:.0} s; results in {}",
        total.as_secs_f64(),
        opts.out.display()
    );
    Ok(())
}

/// The file source's desired state for `svcs`: app-<i>.bench.example on
/// VIP:80/TCP -> its pod:8080.
fn write_file_source(file: &std::path::Path, svcs: &[Svc]) -> anyhow::Result<()> {
    let apps: Vec<Value> = svcs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({ "hostname": format!("app-{i}.bench.example"), "vip": s.vip.to_string(),
                    "ports": [{ "port": 80, "targetPort": 8080, "protocol": "TCP" }],
                    "pods": [{ "name": "pod-1", "ip": s.pod.to_string(), "ready": true }] })
        })
        .collect();
    std::fs::write(file, serde_json::to_vec(&json!({ "apps": apps }))?)?;
    Ok(())
}

/// The connections/s and latency rows of a load against ours and the
/// baselines: `names` is (scenario, rate row, latency row); the rate row's
/// note gets the errors appended.
fn connection_rows(
    names: (&'static str, &str, &str),
    n: usize,
    ours: traffic::Load,
    ipt: Option<traffic::Load>,
    nft: Option<traffic::Load>,
    note: String,
    latency_note: &str,
) -> [Row; 2] {
    let (scenario, rate, latency) = names;
    let mut cps = Row::new(scenario, rate, n, "conn/s");
    cps.lower_better = false;
    cps.ours = single(ours.conns_per_s);
    cps.iptables = ipt.as_ref().and_then(|l| single(l.conns_per_s));
    cps.nftables = nft.as_ref().and_then(|l| single(l.conns_per_s));
    let errors = |l: &Option<traffic::Load>| l.as_ref().map_or("-".into(), |l| l.errors.to_string());
    cps.note = format!("{note}; errors: ours {}, iptables {}, nftables {}", ours.errors, errors(&ipt), errors(&nft));
    let mut lat = Row::new(scenario, latency, n, "us");
    lat.ours = stat(ours.latencies_us);
    lat.iptables = ipt.and_then(|l| stat(l.latencies_us));
    lat.nftables = nft.and_then(|l| stat(l.latencies_us));
    lat.note = latency_note.into();
    [cps, lat]
}

/// In-node clients through the socket hooks vs DNAT on OUTPUT, at the sizes up to 10k.
fn run_east_west(opts: &Opts, budget: &Budget, server: &std::path::Path, rows: &mut Vec<Row>, skipped: &mut Vec<String>) {
    let sizes: Vec<usize> = opts.sizes.iter().copied().filter(|n| *n <= 10_000).collect();
    if let Err(e) = east_west::run(budget, server, &sizes, opts.baselines, rows) {
        eprintln!("east-west rows failed: {e:#}");
        skipped.push(format!("east-west: {e:#}"));
    }
}

/// VIP collisions (old derivation vs the allocator), DNS, allocation through the API server.
fn run_identity(opts: &Opts, budget: &Budget, server: &std::path::Path, rows: &mut Vec<Row>, skipped: &mut Vec<String>) {
    identity::collisions(opts.quick, rows);
    if let Err(e) = identity::dns(budget, server, rows) {
        eprintln!("DNS rows failed: {e:#}");
        skipped.push(format!("DNS: {e:#}"));
    }
    let dir = std::path::Path::new("/run/serviceless-test/bench-alloc");
    let _ = std::fs::remove_dir_all(dir);
    if let Err(e) = identity::allocation(opts.quick, dir, rows) {
        eprintln!("allocation rows failed: {e:#}");
        skipped.push(format!("VIP allocation: {e:#}"));
    }
}

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(VIP_BASE + i as u32)
}

fn pod(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(POD_BASE + i as u32)
}

fn bench_app(host: String, vip: Ipv4Addr, pods: &[(Ipv4Addr, bool)]) -> AppSpec {
    bench_app_to(host, vip, pods, 8080)
}

fn bench_app_to(host: String, vip: Ipv4Addr, pods: &[(Ipv4Addr, bool)], target_port: u16) -> AppSpec {
    AppSpec {
        hostname: host,
        vip: IpAddr::V4(vip),
        ports: vec![PortSpec {
            port: 80,
            target_port,
            protocol: Protocol::Tcp,
        }],
        backends: pods
            .iter()
            .map(|(ip, ready)| BackendSpec {
                ip: IpAddr::V4(*ip),
                ready: *ready,
                source: Some(format!("pod-{ip}")),
                node: None,
            })
            .collect(),
        lifecycle: Default::default(),
    }
}

/// N apps (one TCP port, one pod each), plus probe apps for the per-packet
/// paths (see `per_packet`): one with 8 pods, one with none ready
/// (activator), "mirrors" whose pods are other probes' VIPs, and one on a
/// UDP port.
fn bench_apps(n: usize) -> Vec<AppSpec> {
    let mut apps: Vec<AppSpec> = (0..n)
        .map(|i| bench_app(format!("app-{i}.bench.example"), vip(i), &[(pod(i), true)]))
        .collect();
    // probe-8's pods are the VIPs of eight mirrors whose pod is probe-8's VIP.
    let eight: Vec<(Ipv4Addr, bool)> = (0..8).map(|k| (vip(n + 4 + k), true)).collect();
    apps.push(bench_app_to("probe-8.bench.example".into(), vip(n), &eight, 80));
    apps.push(bench_app(
        "probe-idle.bench.example".into(),
        vip(n + 1),
        &[(Ipv4Addr::new(10, 250, 1, 2), false)],
    ));
    // ping's pod is pong's VIP and the other way round.
    apps.push(bench_app_to("probe-ping.bench.example".into(), vip(n + 2), &[(vip(n + 3), true)], 80));
    apps.push(bench_app_to("probe-pong.bench.example".into(), vip(n + 3), &[(vip(n + 2), true)], 80));
    for k in 0..8 {
        apps.push(bench_app_to(format!("probe-8-mirror-{k}.bench.example"), vip(n + 4 + k), &[(vip(n), true)], 80));
    }
    let mut udp = bench_app("probe-udp.bench.example".into(), vip(n + 12), &[(Ipv4Addr::new(10, 250, 1, 3), true)]);
    udp.ports[0].protocol = Protocol::Udp;
    apps.push(udp);
    apps
}

fn trials(
    max: usize,
    budget: Duration,
    mut f: impl FnMut() -> anyhow::Result<f64>,
) -> anyhow::Result<Vec<f64>> {
    let start = Instant::now();
    let mut out = Vec::new();
    while out.len() < max && (out.is_empty() || start.elapsed() < budget) {
        out.push(f()?);
    }
    Ok(out)
}

/// The traffic load measured while a SYN flood runs.
struct Flooded {
    load: traffic::Load,
    syns_per_s: f64,
}

struct Ours {
    /// Kernel bytes of the conntrack table per connection it can hold.
    ct_bytes_per_connection: f64,
    change_us: Vec<f64>,
    /// What the change trials' tail is made of (see `ours_at`).
    change_tail: String,
    full_ms: Vec<f64>,
    map_bytes_per_app: f64,
    all_bytes_per_app: f64,
}

fn ours_at(
    n: usize,
    apps: &[AppSpec],
    floor: &floor::Floor,
    b: &Budget,
    rows: &mut Vec<Row>,
) -> anyhow::Result<Ours> {
    let cap = n as u32 + 64; // N apps and the probes
    let sizes = Sizes {
        services: cap,
        apps: cap,
        backends: cap + 64,
        connections: 1 << 16,
        new_connections: 1 << 16,
        nodes: 16,
        remote_flows: 1024,
        socket_translations: 1024,
    };
    let mut dp = TestDataplane::new(sizes)?;
    dp.configure_ranges(Some("10.245.0.2:8080"), None, VIP_RANGE, "fd00:96::/64")?;

    // Full resync from empty: the first on fresh maps, then empty -> all.
    let mut first = true;
    let full_ms = trials(b.ours_full.0, b.ours_full.1, || {
        if !first {
            let o = dp.apply(Vec::new());
            anyhow::ensure!(o.failed.is_empty(), "clearing failed: {:?}", o.failed);
        }
        first = false;
        let all = apps.to_vec();
        let t = Instant::now();
        let o = dp.apply(all);
        let took = t.elapsed();
        anyhow::ensure!(
            o.failed.is_empty(),
            "reconcile failed for {} apps",
            o.failed.len()
        );
        Ok(took.as_secs_f64() * 1e3)
    })?;

    let (map_bytes, all_bytes, ct_bytes) = map_memory()?;

    // One backend change: the last app's pod alternates between two IPs.
    // Each trial also counts this thread's involuntary context switches and
    // page faults, so the tail can be told apart: the program's own work, or
    // the machine taking the CPU away.
    let last = apps[n - 1].clone();
    let mut flip = false;
    let mut disturbed: Vec<bool> = Vec::new();
    let change_us = trials(b.ours_change.0, b.ours_change.1, || {
        flip = !flip;
        let mut a = last.clone();
        if flip {
            a.backends[0].ip = IpAddr::V4(Ipv4Addr::new(10, 251, 0, 2));
            a.backends[0].source = Some("pod-moved".into());
        }
        let before = thread_usage();
        let t = Instant::now();
        let o = dp.upsert(a);
        let took = t.elapsed();
        let after = thread_usage();
        disturbed.push(after.0 > before.0 || after.1 > before.1);
        anyhow::ensure!(
            o.failed.is_empty() && o.programmed == 1,
            "one change: {o:?}"
        );
        Ok(took.as_secs_f64() * 1e6)
    })?;
    let quiet: Vec<f64> = change_us.iter().zip(&disturbed).filter(|(_, d)| !**d).map(|(t, _)| *t).collect();
    let change_tail = format!(
        "{} trials; {} had an involuntary context switch or a page fault; without them median {} us, p99 {} us",
        change_us.len(),
        change_us.len() - quiet.len(),
        stat(quiet.clone()).map_or("-".into(), |s| fmt(s.median)),
        stat(quiet).map_or("-".into(), |s| fmt(s.p99)),
    );
    if flip {
        dp.upsert(last);
    }
    dp.clear_conntrack()?;

    per_packet(&dp, floor, n, b, rows)?;
    Ok(Ours {
        ct_bytes_per_connection: ct_bytes as f64 / f64::from(sizes.connections),
        change_us,
        change_tail,
        full_ms,
        map_bytes_per_app: map_bytes as f64 / n as f64,
        all_bytes_per_app: all_bytes as f64 / n as f64,
    })
}

/// This thread's (involuntary context switches, minor + major page faults).
fn thread_usage() -> (i64, i64) {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) };
    (u.ru_nivcsw, u.ru_minflt + u.ru_majflt)
}

/// Rows whose path check failed: the run fails at the end (its figures are
/// written, marked NOT PROVEN).
static UNPROVEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Records a row that did not take the path it names: said now, and the
/// run fails at the end.
fn not_proven(what: &str) {
    eprintln!("error: a row did not take its path: {what}");
    UNPROVEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Runs `runs()` and proves it took the path it names: the verdict
/// counters must move by exactly `expected` on `verdicts` (and by nothing
/// else). Returns what `runs` measured and the proof for the row's note.
fn proven<T>(
    dp: &TestDataplane,
    verdicts: &[serviceless_common::Verdict],
    expected: u64,
    runs: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, String)> {
    let before = dp.verdicts();
    let samples = runs()?;
    let after = dp.verdicts();
    let moved: Vec<String> = after
        .iter()
        .filter(|(k, v)| before[k] != **v)
        .map(|(k, v)| format!("{} +{}", k.name(), v - before[k]))
        .collect();
    let on_path: u64 = verdicts.iter().map(|v| after[v] - before[v]).sum();
    let total: u64 = after.iter().map(|(k, v)| v - before[k]).sum();
    let ok = on_path == expected && total == expected;
    let proof = format!(
        "{} verdicts: {} (expected {expected} on {})",
        if ok { "PROVEN" } else { "NOT PROVEN" },
        moved.join(", "),
        verdicts.iter().map(|v| v.name()).collect::<Vec<_>>().join("+")
    );
    if !ok {
        not_proven(&proof);
    }
    Ok((samples, proof))
}

/// Runs `frame` through the replay wrapper (`serviceless_tests::replay`)
/// into `target`, `trials` times `repeat` runs, each trial beside the same
/// wrapper around the XDP_PASS floor and the plain floor. A sample is
/// `wrapped - wrapped floor + plain floor`: the wrapper's own cost
/// subtracted, so it compares with the plain floor row. `between` runs after
/// each trial (to clear conntrack for new-connection rows). Returns the
/// samples and a note with the raw medians.
#[expect(clippy::too_many_arguments, reason = "each is one knob of the measurement")]
pub fn replayed(
    target: std::os::fd::BorrowedFd<'_>,
    floor: &floor::Floor,
    frame: &[u8],
    vary: bool,
    repeat: u32,
    trials: usize,
    ifindex: Option<u32>,
    mut between: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<(Vec<f64>, String)> {
    use serviceless_tests::replay::Replay;
    let path = Replay::new(target, frame, vary)?;
    let wrapped_floor = Replay::new(floor.fd(), frame, vary)?;
    let (mut raw, mut wf, mut pf, mut out) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..trials {
        path.reset_counter()?;
        wrapped_floor.reset_counter()?;
        let (_, _, w) = wrapped_floor.run(repeat, ifindex)?;
        let p = floor.run(frame, repeat)?;
        let (_, _, t) = path.run(repeat, ifindex)?;
        between()?;
        out.push(t - w + p);
        raw.push(t);
        wf.push(w);
        pf.push(p);
    }
    let note = format!(
        "{:.1}x this run's XDP_PASS floor; {trials} trials x repeat {repeat}, replayed{}: wrapped {:.1} ns - wrapper around the floor {:.1} + floor {:.1}",
        median(&out) / median(&pf),
        if vary { " as a new connection on every run" } else { "" },
        median(&raw),
        median(&wf),
        median(&pf)
    );
    Ok((out, note))
}

/// Per-packet cost. BPF_PROG_TEST_RUN's `repeat` runs the program again on
/// the buffer it has already rewritten; every row here is replayed instead
/// (the original frame restored before each run, see `replayed`), and
/// checks that the verdict counters moved by exactly its number of runs on
/// the verdict it names. The established hit is also measured without the
/// wrapper, on "mirror" apps whose pods are each other's VIPs (client ->
/// ping VIP becomes client -> pong VIP, and back): a cross-check of the
/// wrapper's subtraction. Egress reply translation uses the mirrors too.
fn per_packet(
    dp: &TestDataplane,
    floor: &floor::Floor,
    n: usize,
    b: &Budget,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    use serviceless_common::Verdict as V;
    use serviceless_tests::packet::{ACK as TCP_ACK_FLAG, SYN as TCP_SYN_FLAG};
    let client = "10.1.0.1";
    let ack = |dst: Ipv4Addr| Packet::tcp(client, 40000, &dst.to_string(), 80).flags(TCP_ACK_FLAG).frame();
    let syn = |dst: Ipv4Addr| Packet::tcp(client, 40000, &dst.to_string(), 80).frame();
    let pass = Packet::tcp(client, 40000, "192.168.50.1", 80).frame();

    let mut add = |path: &str, samples: Vec<f64>, note: String| {
        let mut r = Row::new("per-packet", path, n, "ns");
        r.ours = stat(samples);
        r.note = note;
        rows.push(r);
    };
    let (repeat, trials) = (b.pkt_repeat, b.pkt_trials);
    let runs = u64::from(repeat) * trials as u64;
    let floor_runs: Vec<f64> = (0..trials).map(|_| floor.run(&pass, repeat)).collect::<anyhow::Result<_>>()?;
    let floor_median = median(&floor_runs);
    add("floor: XDP_PASS program", floor_runs, format!("{trials} trials x repeat {repeat}"));
    let ingress = dp.ingress_fd()?;
    let fixed = |frame: &[u8]| replayed(ingress, floor, frame, false, repeat, trials, None, || Ok(()));

    // Established connections: a handshake seen from both sides first.
    let establish = |dst: Ipv4Addr, sport: u16| -> anyhow::Result<Vec<u8>> {
        let syn = Packet::tcp(client, sport, &dst.to_string(), 80);
        let (_, out) = dp.ingress(&syn.frame())?;
        let pod = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
        let port = u16::from_be_bytes([out[36], out[37]]);
        let synack = Packet::tcp(&pod.to_string(), port, client, sport).flags(TCP_SYN_FLAG | TCP_ACK_FLAG).with(|p| p.seq = 5000);
        dp.egress(&synack.frame())?;
        let ack = syn.flags(TCP_ACK_FLAG).with(|p| p.ack = 5001);
        dp.ingress(&ack.frame())?;
        Ok(ack.frame())
    };
    for (path, dst, sport, verdict) in [
        ("hit, 1 backend, established", vip(n - 1), 41000, V::BackendEstablished),
        ("hit, 8 backends, established", vip(n), 41001, V::BackendEstablished),
        ("activator (no ready pod), established", vip(n + 1), 41002, V::ActivatorNoBackend),
    ] {
        let frame = establish(dst, sport)?;
        let ((samples, note), proof) = proven(dp, &[verdict], runs, || fixed(&frame))?;
        add(path, samples, format!("{note}; {proof}"));
    }
    let ((samples, note), proof) = proven(dp, &[V::PassNotVip], runs, || fixed(&pass))?;
    add("non-VIP pass-through", samples, format!("{note}; {proof}"));

    // New connections: every run stamped with its own client address and
    // port; the tables are emptied after each trial, so each trial starts
    // from the same state.
    let new_runs = repeat.min(20_000);
    let fresh = |dst: Ipv4Addr, udp: bool| {
        let p = if udp { Packet::udp("10.2.0.0", 0, &dst.to_string(), 80) } else { Packet::tcp("10.2.0.0", 0, &dst.to_string(), 80) };
        p.with(|p| p.ip_id = 0).frame()
    };
    for (path, frame, verdict) in [
        ("new connection, 1 backend", fresh(vip(n - 1), false), V::BackendNewFlow),
        ("new connection, 8 backends", fresh(vip(n), false), V::BackendNewFlow),
        ("new UDP flow, 1 backend", fresh(vip(n + 12), true), V::BackendNewFlow),
        ("activator (no ready pod), new connection", fresh(vip(n + 1), false), V::ActivatorNoBackend),
        ("unknown VIP (activator), new connection", fresh(UNKNOWN_VIP.parse()?, false), V::ActivatorUnknownService),
    ] {
        dp.clear_conntrack()?;
        let expected = u64::from(new_runs) * trials as u64;
        let ((samples, note), proof) = proven(dp, &[verdict], expected, || {
            replayed(ingress, floor, &frame, true, new_runs, trials, None, || dp.clear_conntrack())
        })?;
        add(path, samples, format!("{note}; conntrack emptied after each trial; {proof}"));
    }
    dp.clear_conntrack()?;

    // Cross-check without the wrapper: the mirror connections (ping <->
    // pong; probe-8 <-> its mirror), opened with complete handshakes so both
    // live in the established table as real connections do.
    let promoted_before = dp.ct_events()[&serviceless_common::CtEvent::Promoted];
    for dst in [vip(n + 2), vip(n)] {
        let (_, out) = dp.ingress(&syn(dst))?;
        let mirror = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
        dp.ingress(&out)?;
        for pod in [mirror, dst] {
            let synack = Packet::tcp(&pod.to_string(), 80, client, 40000).flags(TCP_SYN_FLAG | TCP_ACK_FLAG).with(|p| p.seq = 5000);
            dp.egress(&synack.frame())?;
        }
        let ack = Packet::tcp(client, 40000, &dst.to_string(), 80).flags(TCP_ACK_FLAG).with(|p| p.ack = 5001);
        let (_, out) = dp.ingress(&ack.frame())?;
        dp.ingress(&out)?;
    }
    let promoted = dp.ct_events()[&serviceless_common::CtEvent::Promoted] - promoted_before;
    anyhow::ensure!(promoted == 4, "the mirror connections did not all reach the established table ({promoted} of 4)");
    let repeated = |frame: &[u8]| -> anyhow::Result<Vec<f64>> {
        (0..trials).map(|_| dp.ingress_repeat(frame, repeat).map(|(_, _, d)| d.as_nanos() as f64)).collect()
    };
    let frame = ack(vip(n + 2));
    let (samples, proof) = proven(dp, &[V::BackendEstablished], runs, || repeated(&frame))?;
    let x = median(&samples) / floor_median;
    add("hit, 1 backend, established (mirror apps, no wrapper)", samples, format!("{x:.1}x this run's XDP_PASS floor; {trials} trials x repeat {repeat}, alternating between two mirror connections; {proof}"));
    // Egress: the reply of the first mirror connection comes from its "pod"
    // (the other mirror VIP) and leaves from the first VIP, which is in
    // turn the pod of the second mirror connection: every repeat is a reply
    // translation.
    let (_, out) = dp.ingress(&ack(vip(n + 2)))?;
    let mirror = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
    let reply = Packet::tcp(&mirror.to_string(), 80, client, 40000).flags(TCP_ACK_FLAG).frame();
    let tc_floor = floor::Floor::load_tc()?;
    let tc_floor_runs: Vec<f64> = (0..trials).map(|_| tc_floor.run(&reply, repeat)).collect::<anyhow::Result<_>>()?;
    let tc_floor_median = median(&tc_floor_runs);
    add("floor: TC_ACT_OK program (for egress)", tc_floor_runs, format!("{trials} trials x repeat {repeat}; a TC program's test run builds an skb, so its floor is higher than XDP's"));
    let (samples, proof) = proven(dp, &[V::ReplyTranslated], runs, || {
        (0..trials).map(|_| dp.egress_repeat(&reply, repeat).map(|(_, _, d)| d.as_nanos() as f64)).collect::<anyhow::Result<Vec<f64>>>()
    })?;
    let x = median(&samples) / tc_floor_median;
    add("egress reply translation, established", samples, format!("{x:.1}x this run's TC floor; {trials} trials x repeat {repeat} (TC), alternating between the two mirror connections' replies; {proof}"));
    Ok(())
}

/// (bytes of the app-sized maps, bytes of all our maps, bytes of the
/// conntrack table), from fdinfo memlock.
fn map_memory() -> anyhow::Result<(u64, u64, u64)> {
    let names = bpftool_names();
    let mut seen = HashMap::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let Ok(link) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if link.to_string_lossy() != "anon_inode:bpf-map" {
            continue;
        }
        let fd = entry.file_name();
        let Ok(info) =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.to_string_lossy()))
        else {
            continue;
        };
        let field = |k: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) {
            seen.insert(id, memlock);
        }
    }
    anyhow::ensure!(!seen.is_empty(), "no BPF map fds found in /proc/self/fd");
    let mut app_sized = 0;
    let mut all = 0;
    let mut ct = 0;
    for (id, memlock) in &seen {
        all += memlock;
        let name = names.get(id).map(String::as_str).unwrap_or("");
        if name == serviceless_common::map_names::CONNTRACK {
            ct += memlock;
        }
        if ["svl_services", "svl_apps", "svl_activity", "svl_backends", "svl_wakegate"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            app_sized += memlock;
        }
    }
    if app_sized == 0 {
        eprintln!("note: bpftool gave no map names; counting all maps as app-sized");
        app_sized = all;
    }
    Ok((app_sized, all, ct))
}

fn bpftool_names() -> HashMap<u64, String> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "show"])
        .output();
    let Ok(out) = out else { return HashMap::new() };
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| Some((m["id"].as_u64()?, m["name"].as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn kernel_mem_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .filter(|l| {
            l.starts_with("Slab:") || l.starts_with("VmallocUsed:") || l.starts_with("Percpu:")
        })
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum::<u64>()
        * 1024
}

struct BaselineResult {
    full_ms: Vec<f64>,
    change_us: Vec<f64>,
    mem_per_app: Option<f64>,
}

struct Baseline {
    name: &'static str,
    /// Set once a size is too slow: larger ones are skipped.
    too_slow: Option<String>,
    measured: bool,
}

impl Baseline {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            too_slow: None,
            measured: false,
        }
    }

    fn measure(
        &mut self,
        n: usize,
        b: &Budget,
        ns: &str,
        svcs: &[Svc],
        skipped: &mut Vec<String>,
    ) -> Option<BaselineResult> {
        if let Some(why) = &self.too_slow {
            skipped.push(format!("{} at {n} apps: {why}", self.name));
            return None;
        }
        if !self.measured && n > 10_000 {
            // Without a smaller size to extrapolate from, one sync could take hours.
            skipped.push(format!(
                "{} at {n} apps: no smaller size measured in this run to show it finishes in time",
                self.name
            ));
            return None;
        }
        self.measured = true;
        match self.try_measure(n, b, ns, svcs) {
            Ok(r) => {
                let worst = r.full_ms.iter().copied().fold(0.0, f64::max) / 1e3;
                // Extrapolate linearly to 10x the size (optimistic for iptables).
                if worst * 10.0 > b.base_limit.as_secs_f64() {
                    self.too_slow = Some(format!(
                        "too slow: one full sync took {worst:.1} s at {n} apps (extrapolated > {} s at 10x)",
                        b.base_limit.as_secs()
                    ));
                }
                Some(r)
            }
            Err(e) => {
                skipped.push(format!("{} at {n} apps: failed: {e:#}", self.name));
                self.too_slow = Some(format!("failed at {n} apps"));
                None
            }
        }
    }

    fn try_measure(
        &self,
        n: usize,
        b: &Budget,
        ns: &str,
        svcs: &[Svc],
    ) -> anyhow::Result<BaselineResult> {
        let ipt = self.name == "iptables";
        let full_text = if ipt {
            rules::iptables_full(svcs)
        } else {
            rules::nft_full(svcs)
        };
        let clear = || -> anyhow::Result<()> {
            if ipt {
                rules::iptables_restore(ns, rules::IPTABLES_EMPTY, false)?;
            } else {
                rules::nft_clear(ns);
            }
            Ok(())
        };
        clear()?;
        std::thread::sleep(Duration::from_millis(200));
        let before = kernel_mem_bytes();
        let mut mem_per_app = None;
        let mut first = true;
        let full_ms = trials(b.base_full.0, b.base_full.1, || {
            if !first {
                clear()?;
            }
            let took = if ipt {
                rules::iptables_restore(ns, &full_text, true)?
            } else {
                rules::nft_apply(ns, &full_text)?
            };
            if first {
                std::thread::sleep(Duration::from_millis(200));
                mem_per_app = Some(kernel_mem_bytes().saturating_sub(before) as f64 / n as f64);
                first = false;
            }
            Ok(took.as_secs_f64() * 1e3)
        })?;
        let i = n - 1;
        let mut generation = 0u8;
        let change_us = trials(b.base_change.0, b.base_change.1, || {
            generation = 1 - generation;
            let new_pod = if generation == 1 {
                Ipv4Addr::new(10, 251, 0, 2)
            } else {
                svcs[i].pod
            };
            let text = if ipt {
                rules::iptables_one_change(svcs, i, new_pod, generation)
            } else {
                rules::nft_one_change(i, new_pod, generation)
            };
            let took = if ipt {
                rules::iptables_restore(ns, &text, true)?
            } else {
                rules::nft_apply(ns, &text)?
            };
            Ok(took.as_secs_f64() * 1e6)
        })?;
        clear()?;
        Ok(BaselineResult {
            full_ms,
            change_us,
            mem_per_app,
        })
    }
}

/// The traffic topology: client -> node -> pod-1, plus the agent binary.
struct TrafficBed {
    topo: Topology,
    agent: PathBuf,
}

impl TrafficBed {
    fn new() -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let dir = exe.parent().context("exe dir")?;
        let server = dir.join("svl-test-server");
        let agent = dir.join("serviceless");
        anyhow::ensure!(
            server.is_file() && agent.is_file(),
            "svl-test-server and serviceless must be built next to {}",
            exe.display()
        );
        let mut topo = Topology::new("svlb", &server)?;
        topo.add_pod(1, "pod-1")?;
        for (k, v) in [
            ("net.ipv4.ip_local_port_range", "1024 65000"),
            ("net.ipv4.tcp_tw_reuse", "1"),
        ] {
            topo.client.exec("sysctl", &["-qw", &format!("{k}={v}")])?;
        }
        Ok(Self { topo, agent })
    }

    /// Checks the VIP answers from pod-1, then loads it.
    fn load(&self, target: SocketAddr, secs: Duration) -> anyhow::Result<traffic::Load> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let t = target.to_string();
            match self
                .topo
                .client
                .run(move || serviceless_tests::topology::http_get(&t, "/"))?
            {
                Ok(r) if r.server() == "pod-1" => break,
                other => {
                    if Instant::now() > deadline {
                        bail!(
                            "{target} does not reach pod-1: {:?}",
                            other.map(|r| r.server().to_string())
                        );
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        self.topo.client.run(move || traffic::run(target, 4, secs))
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one call site; a struct would only rename them"
    )]
    fn measure(
        &self,
        n: usize,
        b: &Budget,
        svcs: &[Svc],
        with_ipt: bool,
        with_nft: bool,
        rows: &mut Vec<Row>,
        skipped: &mut Vec<String>,
    ) -> anyhow::Result<()> {
        let svcs: Vec<Svc> = svcs
            .iter()
            .map(|s| Svc {
                vip: s.vip,
                pod: TRAFFIC_POD,
            })
            .collect();
        // The target is the last service: the worst case for iptables' linear KUBE-SERVICES.
        let target = SocketAddr::new(IpAddr::V4(svcs[n - 1].vip), 80);
        let node = self.topo.node.name.clone();
        let (ours, flooded, rss) = self.ours(n, &svcs, target, b.traffic_secs)?;
        let mut under = Row::new("traffic", "new connections/s under a SYN flood", n, "conn/s");
        under.lower_better = false;
        under.ours = single(flooded.load.conns_per_s);
        under.note = format!(
            "the same load while {:.0} spoofed SYNs/s hit the same VIP (new-connection table {} connections, default flood settings); without the flood {:.0} conn/s ({:.0}% kept); errors during the flood {}",
            flooded.syns_per_s,
            NEW_CONNECTIONS,
            ours.conns_per_s,
            100.0 * flooded.load.conns_per_s / ours.conns_per_s.max(1.0),
            flooded.load.errors
        );
        rows.push(under);
        let run_base = |ipt: bool| -> anyhow::Result<traffic::Load> {
            let load = if ipt {
                rules::iptables_restore(&node, &rules::iptables_full(&svcs), true)?;
                self.load(target, b.traffic_secs)
            } else {
                rules::nft_apply(&node, &rules::nft_full(&svcs))?;
                self.load(target, b.traffic_secs)
            };
            let _ = self.topo.node.exec("nft", &["flush", "ruleset"]);
            load
        };
        let ipt = if with_ipt {
            Some(run_base(true)?)
        } else {
            None
        };
        let nft = if with_nft {
            Some(run_base(false)?)
        } else {
            None
        };
        if !with_ipt || !with_nft {
            skipped.push(format!(
                "traffic at {n} apps: baselines without a ruleset at this size are not measured"
            ));
        }
        let note = format!(
            "4 closed-loop clients, {} s, one request per connection; ours {} ok",
            b.traffic_secs.as_secs(),
            ours.ok
        );
        rows.extend(connection_rows(("traffic", "new connections/s", "request latency (p50, p99)"), n, ours, ipt, nft, note, "connect to EOF; median column is p50"));
        let mut r = Row::new("memory", "agent RSS", n, "MiB");
        r.ours = rss.and_then(single);
        r.note = "VmRSS of the agent running the file source with N apps".into();
        rows.push(r);
        Ok(())
    }

    /// Runs the real agent on the file source with N apps, attached to the node uplink.
    fn ours(
        &self,
        n: usize,
        svcs: &[Svc],
        target: SocketAddr,
        secs: Duration,
    ) -> anyhow::Result<(traffic::Load, Flooded, Option<f64>)> {
        let file = self.topo.work_dir.join(format!("apps-{n}.json"));
        write_file_source(&file, svcs)?;
        let cap = (n + 64).to_string();
        let new_connections = NEW_CONNECTIONS.to_string();
        let pin = self.topo.bpf_dir.join(format!("svl-{n}"));
        let pin_s = pin.display().to_string();
        let source = format!("file:{}", file.display());
        let agent = self.agent.to_str().context("path")?;
        let args = [
            "run",
            "--iface",
            "up0",
            "--activator",
            "10.245.0.2:8080",
            "--source",
            &source,
            "--vip-range",
            VIP_RANGE,
            "--pin-dir",
            &pin_s,
            "--listen",
            "127.0.0.1:9095",
            "--max-apps",
            &cap,
            "--max-services",
            &cap,
            "--max-backends",
            &cap,
            "--max-connections",
            "65536",
            "--max-new-connections",
            &new_connections,
            "--detach-on-exit",
            // The client is outside the node: the per-packet path is what is measured.
            "--socket-lb",
            "off",
        ];
        let log = self.topo.work_dir.join(format!("agent-{n}.log"));
        let mut proc = self.topo.node.spawn(agent, &args, Some(&log))?;
        let result = (|| {
            self.topo.wait_ready(Duration::from_secs(300))?;
            // Ready means the first full sync is written; check the VIP anyway.
            let load = self.load(target, secs)?;
            // The same load while a spoofed SYN flood hits the same VIP, at
            // about 50k SYNs/s: far past what the table could hold for long,
            // but not so fast that the flood sender and the pod's own SYN
            // handling take both CPUs of a small machine (which would
            // measure the CPU, not the dataplane).
            let ns = self.topo.client.name.clone();
            let flood = Flood { count: u32::MAX, max: secs, pause_per_1000: Duration::from_millis(20) };
            let flooder = std::thread::spawn(move || syn_flood(&ns, target, flood));
            let during = self.load(target, secs)?;
            let sent = flooder.join().map_err(|_| anyhow::anyhow!("flood thread panicked"))??;
            let flooded = Flooded { load: during, syns_per_s: f64::from(sent) / secs.as_secs_f64() };
            let rss = std::fs::read_to_string(format!("/proc/{}/status", proc.pid()))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                })
                .map(|kb| kb / 1024.0);
            anyhow::Ok((load, flooded, rss))
        })();
        proc.terminate();
        let _ = self
            .topo
            .node
            .exec(agent, &["detach", "--iface", "up0", "--pin-dir", &pin_s]);
        let _ = std::fs::remove_file(&file);
        result.with_context(|| format!("agent at {n} apps; log: {}", log.display()))
    }
}

fn cmd_out(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|s| s.trim_start_matches([' ', '\t', ':']).to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse::<u64>()
        .unwrap_or(0);
    json!({
        "kernel": cmd_out("uname", &["-srvm"]),
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "mem_gib": (mem as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "iptables": cmd_out("iptables", &["--version"]),
        "nft": cmd_out("nft", &["--version"]),
        "date": cmd_out("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
    })
}

fn fmt(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn cell(s: &Option<Stat>) -> (String, String) {
    match s {
        Some(s) if s.samples > 1 => (fmt(s.median), fmt(s.p99)),
        Some(s) => (fmt(s.median), "-".into()),
        None => ("-".into(), "-".into()),
    }
}

fn write_outputs(
    opts: &Opts,
    rows: &[Row],
    skipped: &[String],
    took: Duration,
) -> anyhow::Result<()> {
    let machine = machine();
    let json_rows: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "scenario": r.scenario, "path": r.path, "n": r.n, "unit": r.unit,
                "better": if r.lower_better { "lower" } else { "higher" },
                "ours": stat_json(&r.ours), "iptables": stat_json(&r.iptables), "nftables": stat_json(&r.nftables),
                "ratio_vs_iptables": r.ratio(&r.iptables), "ratio_vs_nftables": r.ratio(&r.nftables),
                "note": r.note,
            })
        })
        .collect();
    let doc = json!({
        "quick": opts.quick, "sizes": opts.sizes, "duration_s": took.as_secs_f64(),
        "machine": machine, "rows": json_rows, "skipped": skipped,
        "ratio_meaning": "how many times better Serviceless is than the baseline, by median (baseline/ours for costs, ours/baseline for throughput)",
    });
    std::fs::write(
        opts.out.join("results.json"),
        serde_json::to_string_pretty(&doc)?,
    )?;
    std::fs::write(
        opts.out.join("results.md"),
        markdown(&doc, rows, skipped, opts, took),
    )?;
    Ok(())
}

fn find<'a>(rows: &'a [Row], scenario: &str, path: &str, n: usize) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.scenario == scenario && r.path == path && r.n == n)
}

fn markdown(doc: &Value, rows: &[Row], skipped: &[String], opts: &Opts, took: Duration) -> String {
    let m = &doc["machine"];
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Serviceless benchmark{}\n",
        if opts.quick {
            " (quick: CI smoke, do not judge numbers)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "Machine: {} ({} CPUs, {} GiB), kernel `{}`, `{}`, `{}`; run {} in {:.0} s. Sizes: {:?}.\n",
        m["cpu"].as_str().unwrap_or("?"),
        m["cpus"],
        m["mem_gib"],
        m["kernel"].as_str().unwrap_or("?"),
        m["iptables"].as_str().unwrap_or("?"),
        m["nft"].as_str().unwrap_or("?"),
        m["date"].as_str().unwrap_or("?"),
        took.as_secs_f64(),
        opts.sizes
    );
    // Headline.
    let small = opts.sizes.first().copied().unwrap_or(1);
    let big = opts
        .sizes
        .iter()
        .copied()
        .filter(|n| find(rows, "per-packet", "hit, 1 backend, established", *n).is_some())
        .max()
        .unwrap_or(small);
    let _ = writeln!(
        s,
        "## Headline\n\n| what | Serviceless | iptables | nftables |\n|---|---|---|---|"
    );
    for n in [small, big] {
        if let Some(r) = find(rows, "per-packet", "hit, 1 backend, established", n) {
            let floor = find(rows, "per-packet", "floor: XDP_PASS program", n)
                .and_then(|f| f.ours.as_ref())
                .map_or(0.0, |f| f.median);
            let _ = writeln!(
                s,
                "| per-packet, hit (1 backend, established), {n} apps | {} ns (floor {} ns) | n/a | n/a |",
                cell(&r.ours).0,
                fmt(floor)
            );
        }
    }
    let mid = if opts.sizes.contains(&10_000) {
        10_000
    } else {
        *opts.sizes.last().unwrap_or(&1)
    };
    for (path, unit) in [
        ("one backend change", "us"),
        ("full resync from empty", "ms"),
    ] {
        if let Some(r) = find(rows, "programming", path, mid) {
            let c = |x: &Option<Stat>| {
                let (a, b) = cell(x);
                if a == "-" {
                    "skipped".into()
                } else {
                    format!("{a} {unit} (p99 {b})")
                }
            };
            let ratio = |x: &Option<Stat>| {
                r.ratio(x)
                    .map_or(String::new(), |q| format!(", ours {}x faster", fmt(q)))
            };
            let _ = writeln!(
                s,
                "| {path}, {mid} apps (median) | {} | {}{} | {}{} |",
                c(&r.ours),
                c(&r.iptables),
                ratio(&r.iptables),
                c(&r.nftables),
                ratio(&r.nftables)
            );
        }
    }
    let mem_n = opts
        .sizes
        .iter()
        .copied()
        .filter(|n| find(rows, "memory", "kernel bytes per app", *n).is_some())
        .max()
        .unwrap_or(small);
    if let Some(r) = find(rows, "memory", "kernel bytes per app", mem_n) {
        let mem_base = |x: &Option<Stat>| {
            x.as_ref()
                .map_or("skipped".to_string(), |v| format!("{} B", fmt(v.median)))
        };
        let _ = writeln!(
            s,
            "| kernel memory per app, {mem_n} apps | {} B | {} | {} |",
            cell(&r.ours).0,
            mem_base(&r.iptables),
            mem_base(&r.nftables)
        );
    }
    let _ = writeln!(
        s,
        "\nRatios are how many times better Serviceless is than the baseline, by median.\n"
    );

    for (scenario, title) in [
        (
            "per-packet",
            "Per-packet cost (BPF_PROG_TEST_RUN, ns per packet)",
        ),
        ("programming", "Programming latency"),
        ("traffic", "Real traffic through network namespaces"),
        ("memory", "Memory"),
        ("scale to zero", "Scale to zero"),
        ("identity", "App identity: VIP collisions, DNS, allocation"),
        ("east-west", "East-west: a client on the node (socket hooks vs DNAT on OUTPUT)"),
        ("packet-rate", "Packet rate through veths (trafgen; a new 5-tuple per packet)"),
        ("http", "New connections/s with nginx and wrk"),
    ] {
        let _ = writeln!(s, "## {title}\n");
        let _ = writeln!(
            s,
            "| path | N | unit | ours median | ours p99 | iptables median | iptables p99 | nft median | nft p99 | x vs iptables | x vs nft | note |"
        );
        let _ = writeln!(
            s,
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        );
        for r in rows.iter().filter(|r| r.scenario == scenario) {
            let (om, op) = cell(&r.ours);
            let (im, ip) = cell(&r.iptables);
            let (nm, np) = cell(&r.nftables);
            let ratio = |x: Option<f64>| x.map_or("-".to_string(), fmt);
            let _ = writeln!(
                s,
                "| {} | {} | {} | {om} | {op} | {im} | {ip} | {nm} | {np} | {} | {} | {} |",
                r.path,
                r.n,
                r.unit,
                ratio(r.ratio(&r.iptables)),
                ratio(r.ratio(&r.nftables)),
                r.note
            );
        }
        s.push('\n');
    }
    if !skipped.is_empty() {
        let _ = writeln!(s, "## Skipped\n");
        for k in skipped {
            let _ = writeln!(s, "- {k}");
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "Plots: `per_packet.png`, `programming.png`, `traffic.png`, `memory.png` (log axes) in this folder."
    );
    s
}
