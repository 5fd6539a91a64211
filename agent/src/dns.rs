//! DNS for app hostnames (`--dns-listen`, UDP and TCP), answered from the
//! apps the agent programmed, whichever the source: A or AAAA with the
//! app's VIP, NXDOMAIN for an unknown name in a configured zone, REFUSED
//! for names outside the zones. Short TTLs, since VIPs may move.
//!
//! Parsing and framing are hickory's (malformed queries get FORMERR from it).
//! Bounded: each source address may ask `--dns-qps-per-source` a second
//! (past it, queries are dropped unanswered, so the agent cannot be used
//! to amplify a flood), and TCP connections idle out. A query for a
//! sleeping app starts its wake, so it is already starting when the first
//! packet arrives.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use hickory_server::{
    ServerFuture,
    authority::MessageResponseBuilder,
    proto::{
        op::{Header, MessageType, OpCode, ResponseCode},
        rr::{LowerName, Name, RData, Record, RecordType, rdata},
    },
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
};
use tracing::{debug, info};

use crate::{
    directory::Directory,
    metrics::{Metrics, OutcomeLabel},
    wake::Waker,
};

#[derive(Clone, Debug)]
pub struct DnsOptions {
    pub listen: SocketAddr,
    /// Zones answered for (app hostnames end in one of them).
    pub zones: Vec<String>,
    pub ttl: u32,
    pub qps_per_source: u32,
}

/// Source addresses remembered for rate limiting; past it the table starts
/// over (a spoofed-source flood cannot grow it).
const MAX_SOURCES: usize = 65_536;
/// An idle TCP client is dropped after this.
const TCP_TIMEOUT: Duration = Duration::from_secs(5);

struct Handler {
    directory: Directory,
    waker: Waker,
    zones: Vec<LowerName>,
    ttl: u32,
    qps_per_source: u32,
    /// Per source: the current one-second window and the queries in it.
    sources: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    metrics: Metrics,
}

/// What became of a query (the metric's label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Answered,
    NoData,
    NxDomain,
    Refused,
    NotImplemented,
    RateLimited,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::NoData => "nodata",
            Outcome::NxDomain => "nxdomain",
            Outcome::Refused => "refused",
            Outcome::NotImplemented => "not_implemented",
            Outcome::RateLimited => "rate_limited",
        }
    }
}

impl Handler {
    /// Whether `src` may ask one more query this second.
    fn admit(&self, src: IpAddr, now: Instant) -> bool {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if sources.len() >= MAX_SOURCES && !sources.contains_key(&src) {
            sources.clear();
        }
        let (window, used) = sources.entry(src).or_insert((now, 0));
        if now.duration_since(*window) >= Duration::from_secs(1) {
            (*window, *used) = (now, 0);
        }
        *used += 1;
        *used <= self.qps_per_source
    }

    /// The answer for one question: its code and records.
    fn answer(&self, name: &LowerName, qtype: RecordType) -> (Outcome, Vec<Record>) {
        if !self.zones.iter().any(|z| z.zone_of(name)) {
            return (Outcome::Refused, Vec::new());
        }
        let host = name.to_string();
        let host = host.trim_end_matches('.');
        let Some(app) = self.directory.get(host) else { return (Outcome::NxDomain, Vec::new()) };
        if !app.has_ready_pod() {
            self.waker.request(host, Instant::now(), "DNS query");
        }
        let rdata = match (app.vip, qtype) {
            (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => RData::A(rdata::A(v4)),
            (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => RData::AAAA(rdata::AAAA(v6)),
            _ => return (Outcome::NoData, Vec::new()),
        };
        (Outcome::Answered, vec![Record::from_rdata(Name::from(name.clone()), self.ttl, rdata)])
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler>(&self, request: &Request, mut response: R) -> ResponseInfo {
        let mut header = Header::response_from_request(request.header());
        let count = |o: Outcome| self.metrics.dns_queries.get_or_create(&OutcomeLabel { outcome: o.label() }).inc();
        if !self.admit(request.src().ip(), Instant::now()) {
            count(Outcome::RateLimited);
            header.set_response_code(ResponseCode::Refused);
            return header.into();
        }
        let builder = MessageResponseBuilder::from_message_request(request);
        let (outcome, records) = match request.request_info() {
            Ok(info) if request.message_type() == MessageType::Query && request.op_code() == OpCode::Query => {
                self.answer(info.query.name(), info.query.query_type())
            }
            _ => (Outcome::NotImplemented, Vec::new()),
        };
        count(outcome);
        header.set_authoritative(matches!(outcome, Outcome::Answered | Outcome::NoData | Outcome::NxDomain));
        header.set_response_code(match outcome {
            Outcome::Answered | Outcome::NoData => ResponseCode::NoError,
            Outcome::NxDomain => ResponseCode::NXDomain,
            Outcome::Refused | Outcome::RateLimited => ResponseCode::Refused,
            Outcome::NotImplemented => ResponseCode::NotImp,
        });
        let message = builder.build(header, records.iter(), [], [], []);
        match response.send_response(message).await {
            Ok(info) => info,
            Err(e) => {
                debug!(error = %e, "DNS answer not sent");
                header.into()
            }
        }
    }
}

/// Serves DNS until the sockets fail.
pub async fn serve(opts: DnsOptions, directory: Directory, waker: Waker, metrics: Metrics) -> anyhow::Result<()> {
    let mut zones = Vec::new();
    for z in &opts.zones {
        let name = Name::from_ascii(z).with_context(|| format!("--dns-zone {z}: not a DNS name"))?;
        zones.push(LowerName::from(name));
    }
    anyhow::ensure!(!zones.is_empty(), "--dns-listen needs at least one --dns-zone (the domain app hostnames are under)");
    let handler = Handler {
        directory,
        waker,
        zones,
        ttl: opts.ttl,
        qps_per_source: opts.qps_per_source,
        sources: Mutex::new(HashMap::new()),
        metrics,
    };
    let mut server = ServerFuture::new(handler);
    let udp = tokio::net::UdpSocket::bind(opts.listen)
        .await
        .with_context(|| format!("DNS: binding UDP {} (--dns-listen)", opts.listen))?;
    let tcp = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("DNS: binding TCP {} (--dns-listen)", opts.listen))?;
    server.register_socket(udp);
    server.register_listener(tcp, TCP_TIMEOUT);
    info!(listen = %opts.listen, zones = ?opts.zones, ttl = opts.ttl, "answering DNS for app hostnames (UDP and TCP)");
    server.block_until_done().await.context("DNS server")?;
    Ok(())
}
