//! Scale to zero: the wake overhead Serviceless adds over the app's own
//! time to start (for 1, 25 and 100 parallel first requests), and what a
//! connection held by the activator costs once spliced (latency per
//! request, throughput) against one that reached the pod through XDP.
//!
//! The app's own time to start is the orchestrator's run: from the moment
//! the agent started it to the desired-state file holding the ready pod
//! (it sleeps `START` to stand for a pod starting). A first request's
//! overhead is its time from connect to response minus that.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::{Arc, Barrier},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serviceless_tests::{
    netns::enter,
    orchestrator::{ManagedApp, ScaleBed},
    topology::Topology,
};

use super::{Budget, Row, single, stat};

const HOST: &str = "sleepy.bench";
const VIP: &str = "10.96.0.30:80";
/// How long the stand-in orchestrator takes to "start" the pod.
const START: &str = "0.3";

fn unix_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// One request on a fresh connection, with a timeout long enough to be held.
fn request(target: SocketAddr) -> anyhow::Result<u16> {
    let mut c = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    c.write_all(b"GET / HTTP/1.1\r\nHost: sleepy.bench\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    c.read_to_string(&mut text)?;
    Ok(text.split_whitespace().nth(1).unwrap_or("0").parse()?)
}

pub fn run(b: &Budget, server: &Path, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let app = ManagedApp { hostname: HOST, vip: "10.96.0.30", pod: ("pod-1", "10.244.1.2"), extra: "", ports: "" };
    let bed = ScaleBed::new("svlbw", server, "", &[app], START)?;
    let _agent = bed.start(&[])?;
    let (topo, orchestrator) = (&bed.topo, &bed.orchestrator);
    let target: SocketAddr = VIP.parse()?;
    let trials = if b.pkt_trials <= 5 { 3 } else { 10 };
    for parallel in [1usize, 25, 100] {
        let mut overhead_ms = Vec::new();
        let mut total_ms = Vec::new();
        let mut awake_ms = Vec::new();
        let mut errors = 0;
        for _ in 0..trials {
            let calls_before = orchestrator.timings().len();
            let times = burst(topo, target, parallel)?;
            // The orchestrator logs its end just after writing the file the
            // agent (and so the answer) may already have acted on.
            let deadline = Instant::now() + Duration::from_secs(5);
            while orchestrator.timings().len() <= calls_before && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let timings = orchestrator.timings();
            anyhow::ensure!(timings.len() == calls_before + 1, "expected one wake per trial, saw {}", timings.len() - calls_before);
            let (start, end) = timings[calls_before];
            let own_ms = (end - start) as f64 / 1e6;
            for t in times {
                match t {
                    Ok((t0, t1)) => {
                        let took = (t1 - t0) as f64 / 1e6;
                        total_ms.push(took);
                        overhead_ms.push(took - own_ms);
                    }
                    Err(_) => errors += 1,
                }
            }
            // The same burst to the app awake: what the harness itself costs.
            for t in burst(topo, target, parallel)?.into_iter().flatten() {
                awake_ms.push((t.1 - t.0) as f64 / 1e6);
            }
            // Back to sleep for the next trial, and wait until the maps say so.
            orchestrator.run(HOST, 0)?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while serviceless_tests::scenario::backend_states(topo, HOST).iter().any(|(_, s)| s == "ready") {
                anyhow::ensure!(Instant::now() < deadline, "the app did not go back to sleep");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let p95 = percentile(&overhead_ms, 0.95);
        let mut row = Row::new("scale to zero", &format!("wake overhead over the app's own start, {parallel} parallel first requests"), 1, "ms");
        row.ours = stat(overhead_ms);
        row.note = format!(
            "{trials} wakes; p95 {p95:.1} ms; each request's connect-to-response time minus the orchestrator's run (started by the agent -> file holds the ready pod; it sleeps {START} s); one wake per trial checked; {errors} errors; total first-request time p50 {:.0} ms; the same {parallel} parallel requests to the app awake (XDP straight to the pod, no wake): p50 {:.1} ms, p95 {:.1} ms",
            percentile(&total_ms, 0.5),
            percentile(&awake_ms, 0.5),
            percentile(&awake_ms, 0.95)
        );
        rows.push(row);
    }

    // Held then spliced, against direct: latency per request and throughput.
    let client = topo.client.name.clone();
    let spliced = {
        let client = client.clone();
        std::thread::spawn(move || -> anyhow::Result<TcpStream> {
            enter(&client)?;
            Ok(TcpStream::connect_timeout(&target, Duration::from_secs(5))?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("panicked"))??
    };
    // The connection is held; wake the app with its first request on it.
    let (spliced_lat, spliced_mbps) = keep_alive(spliced, b)?;
    let direct = std::thread::spawn(move || -> anyhow::Result<TcpStream> {
        enter(&client)?;
        Ok(TcpStream::connect_timeout(&target, Duration::from_secs(5))?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("panicked"))??;
    let (direct_lat, direct_mbps) = keep_alive(direct, b)?;
    let mut lat = Row::new("scale to zero", "request latency on a held-then-spliced connection vs straight to the pod (p50, p99)", 1, "us");
    let direct_stat = stat(direct_lat.clone());
    lat.ours = stat(spliced_lat);
    lat.note = format!(
        "keep-alive connection opened while the app slept (spliced by the activator) vs one opened after (XDP to the pod): direct p50 {:.0} us, p99 {:.0} us",
        direct_stat.as_ref().map_or(0.0, |s| s.median),
        direct_stat.as_ref().map_or(0.0, |s| s.p99)
    );
    rows.push(lat);
    let mut tput = Row::new("scale to zero", "download throughput on a held-then-spliced connection", 1, "MB/s");
    tput.lower_better = false;
    tput.ours = single(spliced_mbps);
    tput.note = format!("64 MiB GET per connection; straight to the pod through XDP: {direct_mbps:.0} MB/s");
    rows.push(tput);
    Ok(())
}

/// `parallel` requests released at once from the client: (start, end) UNIX ns each.
fn burst(topo: &Topology, target: SocketAddr, parallel: usize) -> anyhow::Result<Vec<anyhow::Result<(u128, u128)>>> {
    let barrier = Arc::new(Barrier::new(parallel));
    let handles: Vec<_> = (0..parallel)
        .map(|_| {
            let (barrier, client) = (barrier.clone(), topo.client.name.clone());
            std::thread::spawn(move || -> anyhow::Result<(u128, u128)> {
                enter(&client)?;
                barrier.wait();
                let t0 = unix_ns();
                anyhow::ensure!(request(target)? == 200, "not answered by the pod");
                Ok((t0, unix_ns()))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().map_err(|_| anyhow::anyhow!("a client thread panicked"))).collect()
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(((v.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or(0.0)
}

/// Sequential small requests, then one 64 MiB download, on one connection.
fn keep_alive(stream: TcpStream, b: &Budget) -> anyhow::Result<(Vec<f64>, f64)> {
    // Requests leave in one segment, with no Nagle wait for a delayed ACK.
    stream.set_nodelay(true)?;
    let mut conn = serviceless_tests::topology::Conn::from_stream(stream)?;
    conn.get()?; // the first one wakes the app, if it sleeps
    let n = if b.pkt_trials <= 5 { 200 } else { 2000 };
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        conn.get()?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let t = Instant::now();
    let r = conn.get_path("/bytes/67108864", true)?;
    let mbps = r.body.len() as f64 / 1e6 / t.elapsed().as_secs_f64();
    Ok((lat, mbps))
}
