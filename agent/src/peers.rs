//! The other agents, for putting apps to sleep on traffic seen by every
//! node: an app sleeps only when no node carried a packet for it within its
//! idle window.
//!
//! Each agent serves its per-app idle times at `/v1/activity` (on
//! `--listen`). One agent decides (the one with the lowest address among
//! itself and its `--peers`, so decisions are not duplicated), asks every
//! peer only when it has a candidate, and puts nothing to sleep when a peer
//! does not answer: a missed sleep costs money, a wrong one costs a cold
//! start. The API server sees one write per sleep, nothing per interval.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
    time::Duration,
};

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

/// The `/v1/activity` answer: seconds since each app's last packet on that
/// node (apps it never saw are absent).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ActivityReport {
    pub idle_seconds: HashMap<String, f64>,
}

/// Largest answer accepted from a peer (about 20k apps per MiB).
const MAX_REPORT: usize = 64 << 20;
const TIMEOUT: Duration = Duration::from_secs(3);

/// Cheap to clone; clones share the list.
#[derive(Clone, Debug, Default)]
pub struct Peers {
    inner: Arc<RwLock<Known>>,
    own: Option<IpAddr>,
}

#[derive(Debug, Default)]
struct Known {
    peers: Vec<SocketAddr>,
    /// False until the list is known (a discovered list not listed yet):
    /// nothing sleeps meanwhile.
    complete: bool,
}

/// The peers' answers together.
pub struct PeerIdle {
    reports: Vec<ActivityReport>,
}

impl PeerIdle {
    /// The shortest idle time any peer reports for `host` (None: no peer saw it).
    pub fn idle(&self, host: &str) -> Option<Duration> {
        self.reports
            .iter()
            .filter_map(|r| r.idle_seconds.get(host))
            .map(|s| Duration::from_secs_f64(s.max(0.0)))
            .min()
    }
}

impl Peers {
    /// A fixed list (`--peers`; empty: this agent is alone).
    pub fn new(peers: Vec<SocketAddr>, own: Option<IpAddr>) -> Self {
        Self { inner: Arc::new(RwLock::new(Known { peers, complete: true })), own }
    }

    /// A list `discover` fills in.
    pub fn discovered(own: Option<IpAddr>) -> Self {
        Self { inner: Arc::default(), own }
    }

    fn set(&self, peers: Vec<SocketAddr>) {
        let mut known = self.inner.write().unwrap_or_else(|p| p.into_inner());
        *known = Known { peers, complete: true };
    }

    fn list(&self) -> Option<Vec<SocketAddr>> {
        let known = self.inner.read().unwrap_or_else(|p| p.into_inner());
        known.complete.then(|| known.peers.iter().copied().filter(|p| Some(p.ip()) != self.own).collect())
    }

    /// Whether this agent makes the sleep decisions.
    pub fn decides(&self) -> bool {
        let Some(peers) = self.list() else { return false };
        match self.own {
            Some(own) => peers.iter().all(|p| own < p.ip()),
            None => peers.is_empty(),
        }
    }

    /// Every peer's report; an error if any did not answer.
    pub async fn idle_times(&self) -> anyhow::Result<PeerIdle> {
        let peers = self.list().ok_or_else(|| anyhow::anyhow!("the other agents are not known yet"))?;
        let fetches = peers.into_iter().map(|p| async move {
            tokio::time::timeout(TIMEOUT, fetch(p)).await.map_err(|_| anyhow::anyhow!("peer {p}: no answer within {TIMEOUT:?}"))?
        });
        let reports = futures::future::try_join_all(fetches).await?;
        Ok(PeerIdle { reports })
    }
}

/// Keeps `peers` up to date with the agent pods (the DaemonSet's, by
/// `selector` in `namespace`; hostNetwork, so their pod IP is their node's),
/// each serving `/v1/activity` on `port`. One small watch per agent.
pub async fn discover(client: kube::Client, namespace: String, selector: String, port: u16, peers: Peers) {
    use futures::TryStreamExt as _;
    use k8s_openapi::api::core::v1::Pod;
    use kube::runtime::{WatchStreamExt as _, watcher};
    let api: kube::Api<Pod> = kube::Api::namespaced(client, &namespace);
    // A few objects: listed from the watch cache, retried like the app watches.
    let config = watcher::Config { page_size: None, ..watcher::Config::default().any_semantic() };
    let stream = watcher::watcher(api, config.labels(&selector)).backoff(crate::source::kubernetes::watch_backoff());
    let mut stream = std::pin::pin!(stream);
    let mut agents: HashMap<String, IpAddr> = HashMap::new();
    let mut listing: Option<HashMap<String, IpAddr>> = None;
    let address = |pod: &Pod| pod.status.as_ref()?.pod_ip.as_deref()?.parse::<IpAddr>().ok();
    loop {
        let event = match stream.try_next().await {
            Ok(Some(e)) => e,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "watching the other agents failed; retrying (nothing is put to sleep meanwhile if the list is not known)");
                continue;
            }
        };
        let name = |pod: &Pod| pod.metadata.name.clone().unwrap_or_default();
        match event {
            watcher::Event::Init => listing = Some(HashMap::new()),
            watcher::Event::InitApply(pod) => {
                if let (Some(l), Some(ip)) = (listing.as_mut(), address(&pod)) {
                    l.insert(name(&pod), ip);
                }
            }
            watcher::Event::InitDone => agents = listing.take().unwrap_or_default(),
            watcher::Event::Apply(pod) => match address(&pod) {
                Some(ip) if pod.metadata.deletion_timestamp.is_none() => {
                    agents.insert(name(&pod), ip);
                }
                _ => {
                    agents.remove(&name(&pod));
                }
            },
            watcher::Event::Delete(pod) => {
                agents.remove(&name(&pod));
            }
        }
        if listing.is_none() {
            let mut list: Vec<SocketAddr> = agents.values().map(|ip| SocketAddr::new(*ip, port)).collect();
            list.sort();
            list.dedup();
            peers.set(list);
        }
    }
}

async fn fetch(peer: SocketAddr) -> anyhow::Result<ActivityReport> {
    let stream = tokio::net::TcpStream::connect(peer).await.map_err(|e| anyhow::anyhow!("peer {peer}: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = hyper::Request::get("/v1/activity").header("host", peer.to_string()).body(Empty::<Bytes>::new())?;
    let response = send.send_request(request).await?;
    anyhow::ensure!(response.status().is_success(), "peer {peer}: HTTP {}", response.status());
    let body = Limited::new(response.into_body(), MAX_REPORT)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("peer {peer}: {e}"))?
        .to_bytes();
    Ok(serde_json::from_slice(&body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lowest_address_decides_and_the_shortest_idle_time_counts() {
        let a: SocketAddr = "10.0.0.11:9095".parse().unwrap();
        let b: SocketAddr = "10.0.0.12:9095".parse().unwrap();
        assert!(Peers::new(vec![b], Some(a.ip())).decides());
        assert!(!Peers::new(vec![a], Some(b.ip())).decides());
        assert!(Peers::new(vec![], None).decides(), "alone, it decides");
        assert!(Peers::new(vec![a, b], Some(a.ip())).decides(), "itself in the list does not count");
        assert!(!Peers::discovered(Some(a.ip())).decides(), "nobody sleeps anything until the others are known");
        let idle = PeerIdle {
            reports: vec![
                ActivityReport { idle_seconds: [("x".to_string(), 30.0)].into() },
                ActivityReport { idle_seconds: [("x".to_string(), 2.0)].into() },
            ],
        };
        assert_eq!(idle.idle("x"), Some(Duration::from_secs(2)));
        assert_eq!(idle.idle("y"), None);
    }
}
