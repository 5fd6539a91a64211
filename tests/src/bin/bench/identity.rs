//! App identity: how often apps share a VIP under the old derivation (a
//! hash of the hostname) against the allocator's pool; DNS answers per
//! second and latency against a UDP echo floor in the same network; and
//! the time and API writes to allocate VIPs for new apps through a real
//! API server, against the time to create those apps.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr, UdpSocket},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{Name, RData, RecordType},
    serialize::binary::{BinDecodable as _, BinEncodable as _},
};
use serviceless_agent::{model::VipRange, vip_pool::VipPool};
use serviceless_tests::{netns::enter, topology::Topology};

use super::{Budget, Row, single, stat};

/// Share of apps whose VIP another app also got, per scheme.
pub fn collisions(quick: bool, rows: &mut Vec<Row>) {
    let ranges: &[(&str, usize)] = if quick {
        &[("10.96.0.0/16", 10_000), ("10.96.0.0/12", 10_000)]
    } else {
        &[("10.96.0.0/16", 10_000), ("10.96.0.0/12", 10_000), ("10.96.0.0/12", 100_000), ("10.96.0.0/12", 1_000_000)]
    };
    for &(cidr, n) in ranges {
        let (net, len) = cidr.split_once('/').expect("cidr");
        let range = VipRange { network: net.parse().expect("ip"), prefix_len: len.parse().expect("len") };
        let hosts: Vec<String> = (0..n).map(|i| format!("app-{i}.tenant-{}.apps.example.com", i % 97)).collect();
        // Today's derivation (before the allocator): the preferred address, unconditionally.
        let empty = VipPool::new(range);
        let mut count: HashMap<IpAddr, u32> = HashMap::new();
        for h in &hosts {
            *count.entry(empty.preferred(h)).or_default() += 1;
        }
        let derived_shared = hosts.iter().filter(|h| count[&empty.preferred(h)] > 1).count();
        // The allocator: the same first choice, then the next free address.
        let mut pool = VipPool::new(range);
        let t = Instant::now();
        let got: Vec<IpAddr> = hosts.iter().map(|h| pool.allocate(h).expect("the range has room")).collect();
        let per_app_ns = t.elapsed().as_nanos() as f64 / n as f64;
        let unique = got.iter().collect::<HashSet<_>>().len();
        let allocated_shared = n - unique;
        let kept_first_choice = hosts.iter().zip(&got).filter(|(h, ip)| empty.preferred(h) == **ip).count();
        let mut row = Row::new("identity", &format!("apps sharing a VIP in a {cidr} ({} addresses)", range.size() - 1), n, "%");
        row.ours = single(100.0 * allocated_shared as f64 / n as f64);
        row.note = format!(
            "ours: the allocator's pool ({unique} distinct VIPs for {n} apps, {per_app_ns:.0} ns per allocation, {:.1}% kept the old derived VIP); before: the hostname hash alone put {:.2}% of apps on a shared VIP (sent to the activator); expected 1 - e^(-n/m) = {:.2}%",
            100.0 * kept_first_choice as f64 / n as f64,
            100.0 * derived_shared as f64 / n as f64,
            100.0 * (1.0 - (-(n as f64) / (range.size() - 1) as f64).exp()),
        );
        rows.push(row);
    }
}

/// A DNS A query for `name` with `id`.
fn query(id: u16, name: &str) -> anyhow::Result<Vec<u8>> {
    let mut m = Message::new();
    m.set_id(id).set_message_type(MessageType::Query).set_op_code(OpCode::Query).set_recursion_desired(false);
    m.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
    Ok(m.to_bytes()?)
}

/// Closed-loop load: `threads` clients in `ns`, each one query in flight,
/// for `secs`. Returns (answers, latencies in us, wrong answers, timeouts).
fn load(
    ns: &str,
    server: SocketAddr,
    names: Arc<Vec<(String, IpAddr)>>,
    threads: usize,
    secs: Duration,
    check: bool,
) -> anyhow::Result<(usize, Vec<f64>, usize, usize)> {
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (ns, names, stop) = (ns.to_string(), names.clone(), stop.clone());
            std::thread::spawn(move || -> anyhow::Result<(usize, Vec<f64>, usize, usize)> {
                enter(&ns)?;
                let sock = UdpSocket::bind("0.0.0.0:0")?;
                sock.connect(server)?;
                sock.set_read_timeout(Some(Duration::from_millis(500)))?;
                let (mut ok, mut lat, mut wrong, mut lost) = (0, Vec::new(), 0, 0);
                let mut buf = [0u8; 1500];
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let (name, vip) = &names[i % names.len()];
                    i += threads;
                    let id = (i % 65536) as u16;
                    let q = query(id, name)?;
                    let start = Instant::now();
                    sock.send(&q)?;
                    let n = loop {
                        match sock.recv(&mut buf) {
                            Ok(n) if n >= 2 && buf[..2] == id.to_be_bytes() => break Some(n),
                            Ok(_) => continue, // a late answer to an earlier query
                            Err(_) => break None,
                        }
                    };
                    let Some(n) = n else {
                        lost += 1;
                        continue;
                    };
                    lat.push(start.elapsed().as_secs_f64() * 1e6);
                    ok += 1;
                    if check {
                        let m = Message::from_bytes(&buf[..n])?;
                        let right = m.answers().iter().any(|r| matches!(r.data(), RData::A(a) if IpAddr::V4(a.0) == *vip));
                        if !right {
                            wrong += 1;
                        }
                    }
                }
                Ok((ok, lat, wrong, lost))
            })
        })
        .collect();
    std::thread::sleep(secs);
    stop.store(true, Ordering::Relaxed);
    let mut total = (0, Vec::new(), 0, 0);
    for h in handles {
        let (ok, lat, wrong, lost) = h.join().map_err(|_| anyhow::anyhow!("a client panicked"))??;
        total.0 += ok;
        total.1.extend(lat);
        total.2 += wrong;
        total.3 += lost;
    }
    Ok(total)
}

/// `serviceless_dns_queries{outcome="answered"}` on the node.
fn answered(topo: &Topology) -> u64 {
    let text = topo
        .node
        .run(|| serviceless_tests::topology::http_get("127.0.0.1:9095", "/metrics").map(|r| r.body).unwrap_or_default())
        .unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("serviceless_dns_queries_total{") && l.contains("outcome=\"answered\""))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

pub fn dns(b: &Budget, server: &Path, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let apps = 1_000;
    let topo = Topology::new("svlbd", server)?;
    // Apps without a VIP: the file source allocates them.
    let mut text = String::from("apps:\n");
    for i in 0..apps {
        text.push_str(&format!("  - hostname: app-{i}.bench.example\n    ports: [{{ port: 80 }}]\n"));
    }
    let file = topo.work_dir.join("apps.yaml");
    std::fs::write(&file, text)?;
    let _agent = topo.start_agent(
        &file,
        "agent.log",
        &["--dns-listen", "10.0.0.1:53", "--dns-zone", "bench.example", "--dns-qps-per-source", "100000000"],
    )?;
    topo.wait_ready(Duration::from_secs(30)).map_err(|e| anyhow::anyhow!("{e:#}\n{}", topo.agent_log("agent.log")))?;
    let report = serviceless_tests::scenario::inspect(&topo);
    let names: Vec<(String, IpAddr)> = report["apps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| Some((format!("{}.", a["hostname"].as_str()?), a["vip"].as_str()?.parse().ok()?)))
        .collect();
    anyhow::ensure!(names.len() == apps, "{} of {apps} apps programmed", names.len());
    let names = Arc::new(names);

    // The floor: the same clients against a UDP echo in the node namespace.
    let echo = topo.node.run(|| UdpSocket::bind("10.0.0.1:5353"))??;
    let echo_stop = Arc::new(AtomicBool::new(false));
    let echo_thread = {
        let stop = echo_stop.clone();
        echo.set_read_timeout(Some(Duration::from_millis(100)))?;
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = echo.recv_from(&mut buf) {
                    let _ = echo.send_to(&buf[..n], from);
                }
            }
        })
    };
    let threads = 4;
    let secs = b.traffic_secs * 2;
    let client = topo.client.name.clone();
    let (echo_n, echo_lat, _, _) = load(&client, "10.0.0.1:5353".parse()?, names.clone(), threads, secs, false)?;
    echo_stop.store(true, Ordering::Relaxed);
    let _ = echo_thread.join();

    let before = answered(&topo);
    let (n, lat, wrong, lost) = load(&client, "10.0.0.1:53".parse()?, names.clone(), threads, secs, true)?;
    let counted = answered(&topo) - before;
    // The path ran: the server counted every answer the clients got (and
    // at most the ones they gave up on besides).
    anyhow::ensure!(
        counted >= n as u64 && counted <= (n + lost) as u64,
        "the agent counted {counted} answers, the clients got {n} (and lost {lost})"
    );
    anyhow::ensure!(wrong == 0, "{wrong} answers did not carry the app's VIP");
    let echo_stat = stat(echo_lat);
    let lat_stat = stat(lat);
    let mut rate = Row::new("identity", "DNS answers per second (A, 1,000 apps, 4 clients, one query in flight each)", apps, "answers/s");
    rate.lower_better = false;
    rate.ours = single(n as f64 / secs.as_secs_f64());
    rate.note = format!(
        "{n} answers in {:.0} s, all with the app's VIP, {lost} timed out; the agent's answered counter moved by {counted}; the same clients against a UDP echo in the node namespace (the floor of this harness): {:.0}/s",
        secs.as_secs_f64(),
        echo_n as f64 / secs.as_secs_f64()
    );
    rows.push(rate);
    let mut latency = Row::new("identity", "DNS query latency under that load (p50, p99)", apps, "us");
    latency.ours = lat_stat;
    latency.note = format!(
        "client send to answer; UDP echo floor p50 {:.0} us, p99 {:.0} us",
        echo_stat.as_ref().map_or(0.0, |s| s.median),
        echo_stat.as_ref().map_or(0.0, |s| s.p99)
    );
    rows.push(latency);
    Ok(())
}

/// VIP allocation through a real API server: `n` new Deployments, the
/// time until each holds a record, and the writes it took.
pub fn allocation(quick: bool, work_dir: &Path, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    use serviceless_tests::kube_env::KubeEnv;
    let n: usize = if quick { 1_000 } else { 10_000 };
    std::fs::create_dir_all(work_dir)?;
    let mut kube = KubeEnv::start_for(work_dir, &[]).context("control plane")?;
    // Unthrottled here, to measure the allocator and the API server rather
    // than the client's rate limit (the default, --api-qps 100, paces 10k
    // allocations over 100 s).
    kube.allocator.take();
    let _allocator = kube.start_allocator("allocator-bench", &["--api-qps", "100000"])?;
    // Let it take the Lease before the clock starts.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !kube.allocator_log("allocator-bench").contains("holding the Lease") {
        anyhow::ensure!(Instant::now() < deadline, "the allocator never took the Lease");
        std::thread::sleep(Duration::from_millis(50));
    }
    let posts_before = record_posts(&kube);
    let apps = (0..n)
        .map(|i| {
            let ann = serde_json::json!({"serviceless.io/hostname": format!("app-{i}.bench.example")});
            serviceless_tests::kube_env::app_deployment(&format!("app-{i}"), ann)
        })
        .collect();
    let started = Instant::now();
    kube.create_deployments(apps)?;
    let created = started.elapsed();
    let api: kube::Api<serviceless_agent::app_address::AppAddress> = kube::Api::all(kube.client.clone());
    let deadline = Instant::now() + Duration::from_secs(600);
    let all = loop {
        let count = kube.rt.block_on(api.list_metadata(&Default::default()))?.items.len();
        if count >= n {
            break started.elapsed();
        }
        anyhow::ensure!(Instant::now() < deadline, "only {count} of {n} VIPs recorded");
        std::thread::sleep(Duration::from_millis(100));
    };
    let writes = record_posts(&kube) - posts_before;
    let mut row = Row::new("identity", "time to record a unique VIP for every new app (real API server)", n, "s");
    row.ours = single(all.as_secs_f64());
    row.note = format!(
        "{n} Deployments created by 16 concurrent clients in {:.1} s (the baseline: the API server's write rate here); every app held a record {:.1} s after the first create; AppAddress creates: {writes} ({:.2} per app); the allocator ran unthrottled",
        created.as_secs_f64(),
        all.as_secs_f64(),
        writes as f64 / n as f64
    );
    rows.push(row);
    Ok(())
}

/// Successful AppAddress creates, from the API server's metrics.
fn record_posts(kube: &serviceless_tests::kube_env::KubeEnv) -> u64 {
    let text = kube.kubectl(&["get", "--raw", "/metrics"]).unwrap_or_default();
    text.lines()
        .filter(|l| {
            l.starts_with("apiserver_request_total{")
                && l.contains("resource=\"appaddresses\"")
                && l.contains("verb=\"POST\"")
                && l.contains("code=\"201\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}
