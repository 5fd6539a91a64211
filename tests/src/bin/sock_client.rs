//! A client for the socket-hook tests. It first moves itself into a cgroup
//! (`--cgroup DIR`: the hooks only see processes below the cgroup they are
//! attached to; a thread cannot change cgroup alone), then talks to an
//! address and prints one line per attempt:
//!   `ok server=<name> peer=<what getpeername()/recvfrom() said>`, or `err <why>`.
//!
//! Modes: `http ADDR` (a GET on a fresh connection, `--count` times),
//! `udp ADDR` (unconnected sendto/recvfrom), `udp-connected ADDR`,
//! `hold ADDR` (one keep-alive connection, a GET every `--interval-ms` for
//! `--secs`), `load ADDR` (fresh connections for `--secs` from `--threads`
//! closed-loop clients; prints `ok=<n> err=<n>` at the end and writes each
//! request's latency, microseconds, to `--latencies FILE`).

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

const TIMEOUT: Duration = Duration::from_secs(3);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    if let Some(dir) = arg("--cgroup")
        && let Err(e) = std::fs::write(format!("{dir}/cgroup.procs"), std::process::id().to_string())
    {
        println!("err joining cgroup {dir}: {e}");
        std::process::exit(2);
    }
    let (Some(mode), Some(addr)) = (args.get(1), args.get(2).and_then(|a| a.parse::<SocketAddr>().ok())) else {
        eprintln!("usage: svl-sock-client <http|udp|udp-connected|hold|load> ADDR [--count N] [--secs S] [--host H] [--cgroup DIR]");
        std::process::exit(2);
    };
    let count: usize = arg("--count").and_then(|c| c.parse().ok()).unwrap_or(1);
    let secs: f64 = arg("--secs").and_then(|c| c.parse().ok()).unwrap_or(1.0);
    let interval = Duration::from_millis(arg("--interval-ms").and_then(|c| c.parse().ok()).unwrap_or(200));
    let host = arg("--host").unwrap_or_else(|| "test".into());
    let until = Instant::now() + Duration::from_secs_f64(secs);
    match mode.as_str() {
        "http" => (0..count).for_each(|_| report(http_once(addr, &host))),
        "udp" => (0..count).for_each(|_| report(udp_once(addr, false))),
        "udp-connected" => (0..count).for_each(|_| report(udp_once(addr, true))),
        "hold" => match connect(addr) {
            Ok(stream) => {
                let peer = peer_of(&stream);
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut writer = stream;
                while Instant::now() < until {
                    report(get(&mut reader, &mut writer, &host, false).map(|server| (server, peer.clone())));
                    std::thread::sleep(interval);
                }
            }
            Err(e) => report(Err(e)),
        },
        "load" => {
            let threads: usize = arg("--threads").and_then(|c| c.parse().ok()).unwrap_or(1);
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    let host = host.clone();
                    std::thread::spawn(move || {
                        let (mut latencies, mut failed, mut first) = (Vec::new(), 0u64, None);
                        while Instant::now() < until {
                            let t = Instant::now();
                            match http_once(addr, &host) {
                                Ok(_) => latencies.push(t.elapsed().as_secs_f64() * 1e6),
                                Err(e) => {
                                    failed += 1;
                                    first.get_or_insert(e);
                                }
                            }
                        }
                        (latencies, failed, first)
                    })
                })
                .collect();
            let (mut latencies, mut failed, mut first) = (Vec::new(), 0u64, None);
            for w in workers {
                let (l, f, e) = w.join().expect("worker");
                latencies.extend(l);
                failed += f;
                first = first.or(e);
            }
            if let Some(path) = arg("--latencies") {
                let text: String = latencies.iter().map(|l| format!("{l:.1}\n")).collect();
                let _ = std::fs::write(path, text);
            }
            println!("ok={} err={failed}{}", latencies.len(), first.map(|e| format!(" first_err={e}")).unwrap_or_default());
        }
        other => {
            eprintln!("unknown mode {other}");
            std::process::exit(2);
        }
    }
}

fn report(result: Result<(String, String), String>) {
    match result {
        Ok((server, peer)) => println!("ok server={server} peer={peer}"),
        Err(e) => println!("err {e}"),
    }
    let _ = std::io::stdout().flush();
}

fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
    Ok(stream)
}

fn peer_of(stream: &TcpStream) -> String {
    stream.peer_addr().map(|p| p.to_string()).unwrap_or_else(|e| format!("getpeername-failed:{e}"))
}

fn http_once(addr: SocketAddr, host: &str) -> Result<(String, String), String> {
    let stream = connect(addr)?;
    let peer = peer_of(&stream);
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut writer = stream;
    let answer = get(&mut reader, &mut writer, host, true).map(|server| (server, peer));
    // Close with RST (SO_LINGER 0), as load generators do: no TIME_WAIT,
    // so source ports are reusable at once.
    let _ = socket2::SockRef::from(&writer).set_linger(Some(Duration::ZERO));
    answer
}

/// One GET; returns the first word of the body (the server's name).
fn get(reader: &mut BufReader<TcpStream>, writer: &mut TcpStream, host: &str, close: bool) -> Result<String, String> {
    let connection = if close { "close" } else { "keep-alive" };
    write!(writer, "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: {connection}\r\n\r\n").map_err(|e| format!("write: {e}"))?;
    let mut status = String::new();
    reader.read_line(&mut status).map_err(|e| format!("read: {e}"))?;
    if !status.starts_with("HTTP/1.1 200") {
        return Err(format!("status {:?}", status.trim()));
    }
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).map_err(|e| format!("read: {e}"))? == 0 {
            return Err("closed mid-headers".into());
        }
        let l = line.trim_end().to_ascii_lowercase();
        if l.is_empty() {
            break;
        }
        if let Some(v) = l.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).map_err(|e| format!("body: {e}"))?;
    Ok(String::from_utf8_lossy(&body).split_whitespace().next().unwrap_or("").to_string())
}

fn udp_once(addr: SocketAddr, connected: bool) -> Result<(String, String), String> {
    let bind = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let socket = UdpSocket::bind(bind).map_err(|e| format!("bind: {e}"))?;
    socket.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 2048];
    let (n, from) = if connected {
        socket.connect(addr).map_err(|e| format!("connect: {e}"))?;
        socket.send(b"ping").map_err(|e| format!("send: {e}"))?;
        let n = socket.recv(&mut buf).map_err(|e| format!("recv: {e}"))?;
        (n, socket.peer_addr().map_err(|e| format!("getpeername: {e}"))?)
    } else {
        socket.send_to(b"ping", addr).map_err(|e| format!("sendto: {e}"))?;
        socket.recv_from(&mut buf).map_err(|e| format!("recvfrom: {e}"))?
    };
    let server = String::from_utf8_lossy(&buf[..n]).split_whitespace().next().unwrap_or("").to_string();
    Ok((server, from.to_string()))
}
