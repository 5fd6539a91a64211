//! The activator every agent hosts: it takes every connection the kernel
//! sends to an app that has no ready pod, holds it while the app wakes,
//! and then splices it to the first ready pod. New connections go straight
//! to the pod through XDP as soon as the maps say so; the activator only
//! finishes what it holds.
//!
//! * Which app a connection is for comes from its conntrack reply entry
//!   (the kernel keeps reply tuples unique, rewriting a clashing client
//!   port), so one client port to two sleeping VIPs is told apart.
//! * Any TCP protocol works: bytes are spliced both ways untouched
//!   (half-close and backpressure by `copy_bidirectional`).
//! * Accepted sockets get TCP_NODELAY, like the pod side: the splice
//!   forwards whatever arrives at once.
//! * Held connections are bounded per app and in total. Past the hold
//!   timeout, a bound, or a refused wake, an HTTP/1 client gets `503` with
//!   `Retry-After` (the first bytes are peeked to tell), anything else is
//!   closed.
//! * UDP datagrams to a sleeping app start its wake and are dropped (the
//!   flow moves to a pod once one is ready).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serviceless_common::{IPPROTO_TCP, IPPROTO_UDP, reply_key};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
};
use tracing::{debug, info, warn};

use crate::{
    directory::Directory,
    maps::DataplaneMaps,
    metrics::{Metrics, OutcomeLabel},
    model::{AppSpec, Protocol, from_addr, to_addr},
    wake::Waker,
};

#[derive(Clone, Debug)]
pub struct ActivatorOptions {
    /// The address the kernel sends activator traffic to (TCP and UDP).
    pub listen: SocketAddr,
    /// Default wait for a ready pod (an app may set its own).
    pub hold_timeout: Duration,
    pub max_held_per_app: usize,
    pub max_held: usize,
    /// Seconds in the `Retry-After` of a 503.
    pub retry_after: u32,
}

/// Connections held per app, shared with the sleeper (an app with held
/// connections is not idle).
#[derive(Clone, Default)]
pub struct HeldCounts {
    inner: Arc<Mutex<HeldInner>>,
}

#[derive(Default)]
struct HeldInner {
    per_app: HashMap<String, usize>,
    total: usize,
}

/// One held connection; released on drop.
pub struct Held {
    counts: HeldCounts,
    host: String,
    metrics: Metrics,
}

impl HeldCounts {
    fn lock(&self) -> std::sync::MutexGuard<'_, HeldInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn of(&self, host: &str) -> usize {
        self.lock().per_app.get(host).copied().unwrap_or(0)
    }

    pub fn total(&self) -> usize {
        self.lock().total
    }

    /// Apps with held connections.
    pub fn apps(&self) -> Vec<String> {
        self.lock().per_app.keys().cloned().collect()
    }

    /// Takes a slot, or says which bound is reached.
    fn hold(&self, host: &str, opts: &ActivatorOptions, metrics: &Metrics) -> Result<Held, &'static str> {
        let mut inner = self.lock();
        if inner.total >= opts.max_held {
            return Err("refused_total_bound");
        }
        let n = inner.per_app.entry(host.to_string()).or_default();
        if *n >= opts.max_held_per_app {
            return Err("refused_app_bound");
        }
        *n += 1;
        inner.total += 1;
        metrics.held_connections.set(inner.total as i64);
        Ok(Held { counts: self.clone(), host: host.to_string(), metrics: metrics.clone() })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut inner = self.counts.lock();
        if let Some(n) = inner.per_app.get_mut(&self.host) {
            *n -= 1;
            if *n == 0 {
                inner.per_app.remove(&self.host);
            }
        }
        inner.total -= 1;
        self.metrics.held_connections.set(inner.total as i64);
    }
}

/// The activator and what every connection task shares.
pub struct Activator {
    pub opts: ActivatorOptions,
    /// For reading conntrack (which app a connection is for).
    pub maps: Arc<DataplaneMaps>,
    pub directory: Directory,
    pub waker: Waker,
    pub held: HeldCounts,
    pub metrics: Metrics,
}

/// Serves until the listener fails.
pub async fn serve(activator: Activator) -> anyhow::Result<()> {
    let listen = activator.opts.listen;
    let tcp = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("activator: binding TCP {listen} (--activator-port): {e}"))?;
    let udp = UdpSocket::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("activator: binding UDP {listen} (--activator-port): {e}"))?;
    info!(%listen, "activator serving (TCP and UDP)");
    let ctx = Arc::new(activator);
    tokio::spawn(sink_udp(udp, ctx.clone()));
    loop {
        let (stream, peer) = match tcp.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                warn!(error = %e, "activator: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(handle(stream, peer, ctx.clone()));
    }
}

/// What the connection was sent for: its VIP:port and the client's own port.
fn identify(ctx: &Activator, local: SocketAddr, peer: SocketAddr, proto: u8) -> Option<(SocketAddr, u16)> {
    let key = reply_key(&to_addr(local.ip()), local.port().to_be(), &to_addr(peer.ip()), peer.port().to_be(), proto);
    let (_, entry) = ctx.maps.conntrack_entry(&key)?;
    Some((SocketAddr::new(from_addr(&entry.addr), u16::from_be(entry.port)), u16::from_be(entry.client_port)))
}

async fn handle(mut client: TcpStream, peer: SocketAddr, ctx: Arc<Activator>) {
    let accepted = Instant::now();
    let outcome = serve_one(&mut client, peer, &ctx, accepted).await;
    ctx.metrics.activator_connections.get_or_create(&OutcomeLabel { outcome }).inc();
}

async fn serve_one(client: &mut TcpStream, peer: SocketAddr, ctx: &Activator, accepted: Instant) -> &'static str {
    let Ok(local) = client.local_addr() else { return "closed_early" };
    let (vip, client_port, app) = match identify(ctx, local, peer, IPPROTO_TCP) {
        Some((vip, client_port)) => {
            let Some(app) = ctx.directory.by_service(vip.ip(), vip.port(), Protocol::Tcp) else {
                // A VIP port no app holds, or one two apps claim.
                refuse(client, 404, "no app serves this address", 0).await;
                return "unknown_app";
            };
            (vip, client_port, app)
        }
        // A connection the socket hooks sent from this node has no
        // conntrack entry: an HTTP client names its app in Host (as
        // Knative's activator routes).
        None => match by_host_header(client, ctx).await {
            Some((vip, app)) => (vip, peer.port(), app),
            None => {
                debug!(%peer, "activator: connection without a conntrack entry or an HTTP Host of a known app; closed");
                return "unknown_connection";
            }
        },
    };
    let host = app.hostname.clone();
    let _held = match ctx.held.hold(&host, &ctx.opts, &ctx.metrics) {
        Ok(held) => held,
        Err(bound) => {
            refuse(client, 503, "too many connections are waiting for this app", ctx.opts.retry_after).await;
            return bound;
        }
    };
    ctx.waker.request(&host, accepted, "connection held");
    let timeout = app.lifecycle.hold_timeout.unwrap_or(ctx.opts.hold_timeout);
    let deadline = tokio::time::Instant::from_std(accepted + timeout);
    let mut changes = ctx.directory.subscribe();
    let mut tried: Vec<SocketAddr> = Vec::new();
    loop {
        let Some(app) = ctx.directory.get(&host) else {
            refuse(client, 503, "the app is gone", 0).await;
            return "app_removed";
        };
        if let Some(mut pod) = connect_ready(&app, vip.port(), peer, &mut tried).await {
            if app.lifecycle.proxy_protocol {
                let header = proxy_v2_header(SocketAddr::new(peer.ip(), client_port), vip);
                if pod.write_all(&header).await.is_err() {
                    return "pod_write_failed";
                }
            }
            ctx.waker.forwarded(&host);
            debug!(app = %host, %peer, held_ms = accepted.elapsed().as_secs_f64() * 1e3, "held connection handed to a pod");
            // Both ways until both sides are done; errors are the peers' own resets.
            let _ = tokio::io::copy_bidirectional_with_sizes(client, &mut pod, SPLICE_BUFFER, SPLICE_BUFFER).await;
            return "spliced";
        }
        if ctx.waker.refused(&host) {
            refuse(client, 503, "this app cannot be woken right now (wake budget spent)", ctx.opts.retry_after).await;
            return "refused_budget";
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return "shutdown" },
            () = tokio::time::sleep_until(deadline) => {
                info!(app = %host, %peer, waited_s = timeout.as_secs_f64(), "held connection timed out: no ready pod");
                let http = refuse(client, 503, "the app is starting; try again shortly", ctx.opts.retry_after).await;
                return if http { "timeout_http_503" } else { "timeout_closed" };
            }
            // A pod that refused us may take connections a moment later.
            () = tokio::time::sleep(Duration::from_millis(250)), if !tried.is_empty() => tried.clear(),
        }
    }
}

/// Bytes of a request the activator reads to find its Host header.
const HOST_PEEK_BYTES: usize = 4096;

/// The app an HTTP/1 request names in its Host header (peeked, so the
/// request still reaches the pod whole), and that app's first TCP VIP port.
/// Waits at most a second for the request headers.
async fn by_host_header(client: &TcpStream, ctx: &Activator) -> Option<(SocketAddr, Arc<AppSpec>)> {
    let mut buf = vec![0u8; HOST_PEEK_BYTES];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    let mut n = 0;
    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") && n < buf.len() {
        match tokio::time::timeout_at(deadline, client.peek(&mut buf)).await {
            Ok(Ok(got)) if got > n => n = got,
            // Nothing new yet: peek returns at once while bytes wait.
            Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(5)).await,
            _ => break,
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
    }
    let host = http_host(&buf[..n])?;
    let app = ctx.directory.get(&host)?;
    let port = app.ports.iter().find(|p| p.protocol == Protocol::Tcp)?.port;
    Some((SocketAddr::new(app.vip, port), app))
}

/// The Host of an HTTP/1 request head, lowercased, without a port.
pub fn http_host(head: &[u8]) -> Option<String> {
    if !looks_like_http(head) {
        return None;
    }
    let text = std::str::from_utf8(head).ok()?;
    let value = text.split("\r\n").skip(1).take_while(|l| !l.is_empty()).find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim().eq_ignore_ascii_case("host").then(|| value.trim().to_string())
    })?;
    let host = match value.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !h.contains(':') => h,
        _ => value.as_str(),
    };
    Some(host.trim_end_matches('.').to_ascii_lowercase())
}

/// Connects to a ready pod of `app` not yet tried (the client's address
/// picks which first, so clients spread over pods).
async fn connect_ready(app: &AppSpec, vip_port: u16, peer: SocketAddr, tried: &mut Vec<SocketAddr>) -> Option<TcpStream> {
    let target_port = app.port(vip_port, Protocol::Tcp)?.target_port;
    let mut pods: Vec<SocketAddr> = app
        .ready_backends()
        .map(|b| SocketAddr::new(b.ip, target_port))
        .filter(|a| !tried.contains(a))
        .collect();
    if pods.is_empty() {
        return None;
    }
    let start = (serviceless_common::hash::mix64(u64::from(peer.port())) as usize) % pods.len();
    pods.rotate_left(start);
    for pod in pods {
        match tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(pod)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Some(stream);
            }
            _ => {
                debug!(app = %app.hostname, %pod, "activator: ready pod not accepting yet");
                tried.push(pod);
            }
        }
    }
    None
}

/// Bytes buffered per direction of a spliced connection (the default 8 KiB
/// halves a long download's throughput).
const SPLICE_BUFFER: usize = 64 * 1024;

/// HTTP/1 request methods, to tell an HTTP client from any other.
const HTTP_METHODS: [&[u8]; 9] =
    [b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE "];

pub fn looks_like_http(first: &[u8]) -> bool {
    first.len() >= 3
        && HTTP_METHODS.iter().any(|m| {
            let n = first.len().min(m.len());
            first[..n] == m[..n]
        })
}

/// Answers an HTTP client with `status`, or closes anything else; returns
/// whether it was HTTP.
async fn refuse(client: &mut TcpStream, status: u16, why: &str, retry_after: u32) -> bool {
    let mut first = [0u8; 8];
    // A client refused at once may not have sent its request yet: give it a moment.
    let n = match tokio::time::timeout(Duration::from_secs(1), client.peek(&mut first)).await {
        Ok(Ok(n)) => n,
        _ => 0,
    };
    if !looks_like_http(&first[..n]) {
        return false;
    }
    let reason = if status == 404 { "Not Found" } else { "Service Unavailable" };
    let retry = if retry_after > 0 { format!("Retry-After: {retry_after}\r\n") } else { String::new() };
    let body = format!("{why}\n");
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\n{retry}Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), client.write_all(response.as_bytes())).await;
    let _ = client.shutdown().await;
    linger(client).await;
    true
}

/// Reads what the client still sends (the rest of its request) for a
/// moment before the socket closes: closing with unread bytes would reset
/// the connection, and the client would lose the answer it was sent.
async fn linger(client: &mut TcpStream) {
    let mut sink = [0u8; 4096];
    let drain = async {
        let mut left = 64 * 1024usize;
        while left > 0 {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// A PROXY protocol v2 header (PROXY command, TCP) saying the connection
/// came from `client` to `vip`.
pub fn proxy_v2_header(client: SocketAddr, vip: SocketAddr) -> Vec<u8> {
    const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
    let mut h = SIGNATURE.to_vec();
    h.push(0x21); // version 2, PROXY
    match (client.ip(), vip.ip()) {
        (IpAddr::V4(c), IpAddr::V4(v)) => {
            h.push(0x11); // TCP over IPv4
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&c.octets());
            h.extend_from_slice(&v.octets());
        }
        (c, v) => {
            h.push(0x21); // TCP over IPv6
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&to_addr(c));
            h.extend_from_slice(&to_addr(v));
        }
    }
    h.extend_from_slice(&client.port().to_be_bytes());
    h.extend_from_slice(&vip.port().to_be_bytes());
    h
}

/// Reads and drops datagrams to sleeping apps, waking them.
async fn sink_udp(socket: UdpSocket, ctx: Arc<Activator>) {
    let mut buf = vec![0u8; 65536];
    let Ok(local) = socket.local_addr() else { return };
    loop {
        let Ok((_, peer)) = socket.recv_from(&mut buf).await else { continue };
        ctx.metrics.activator_udp_dropped.inc();
        let Some((vip, _)) = identify(&ctx, local, peer, IPPROTO_UDP) else { continue };
        if let Some(app) = ctx.directory.by_service(vip.ip(), vip.port(), Protocol::Udp) {
            ctx.waker.request(&app.hostname, Instant::now(), "UDP datagram");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_header_names_the_app() {
        assert_eq!(http_host(b"GET / HTTP/1.1\r\nUser-Agent: x\r\nHOST: App.Example.com:8080\r\n\r\n").as_deref(), Some("app.example.com"));
        assert_eq!(http_host(b"GET / HTTP/1.1\r\nhost: a.example.com.\r\n\r\n").as_deref(), Some("a.example.com"));
        assert_eq!(http_host(b"GET / HTTP/1.1\r\n\r\nHost: late.example.com\r\n"), None, "a Host past the headers is body");
        assert_eq!(http_host(b"\x16\x03\x01 tls hello"), None);
        assert_eq!(http_host(b"GET / HTTP/1.1\r\nHost"), None);
        assert_eq!(http_host(b""), None);
    }

    #[test]
    fn http_clients_are_told_from_others() {
        for yes in [&b"GET / HTTP/1.1"[..], b"POST /x", b"GET", b"DELETE /", b"OPTIONS *"] {
            assert!(looks_like_http(yes), "{}", String::from_utf8_lossy(yes));
        }
        for no in [&b""[..], b"\x16\x03\x01\x02", b"PRI * HTTP/2.0", b"SSH-2.0", b"hello"] {
            assert!(!looks_like_http(no), "{}", String::from_utf8_lossy(no));
        }
    }

    #[test]
    fn proxy_v2_headers_follow_the_spec() {
        let h = proxy_v2_header("192.0.2.7:41000".parse().unwrap(), "10.96.0.10:80".parse().unwrap());
        assert_eq!(&h[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(&h[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(&h[16..20], &[192, 0, 2, 7]);
        assert_eq!(&h[20..24], &[10, 96, 0, 10]);
        assert_eq!(&h[24..], &[0xa0, 0x28, 0, 80]);
        assert_eq!(proxy_v2_header("[2001:db8::1]:1".parse().unwrap(), "[fd00::1]:80".parse().unwrap()).len(), 16 + 36);
    }
}
