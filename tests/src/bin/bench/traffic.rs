//! Real traffic: short HTTP connections (connect, one request with
//! `Connection: close`, read to EOF) from the client namespace to a VIP,
//! through the node namespace, to a pod.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

pub struct Load {
    pub conns_per_s: f64,
    pub ok: u64,
    pub errors: u64,
    /// Per-request latency (connect to EOF), microseconds.
    pub latencies_us: Vec<f64>,
}

fn one(target: SocketAddr) -> anyhow::Result<()> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::with_capacity(256);
    s.read_to_end(&mut buf)?;
    // Close with RST (SO_LINGER 0), as load generators do, so neither side
    // keeps TIME_WAIT and source ports are reusable at once.
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid socket fd and option struct.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    anyhow::ensure!(buf.starts_with(b"HTTP/1.1 200"), "bad response");
    Ok(())
}

/// Runs `threads` closed-loop clients for `duration`; call from a thread
/// inside the client namespace (threads spawned here inherit it).
pub fn run(target: SocketAddr, threads: usize, duration: Duration) -> Load {
    let deadline = Instant::now() + duration;
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                let mut errors = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match one(target) {
                        Ok(()) => lat.push(t.elapsed().as_secs_f64() * 1e6),
                        Err(_) => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut latencies_us = Vec::new();
    let mut errors = 0;
    for h in handles {
        if let Ok((l, e)) = h.join() {
            latencies_us.extend(l);
            errors += e;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let ok = latencies_us.len() as u64;
    Load {
        conns_per_s: ok as f64 / secs,
        ok,
        errors,
        latencies_us,
    }
}
