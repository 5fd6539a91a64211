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

use std::{collections::HashMap, net::{IpAddr, SocketAddr}, time::Duration};

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

#[derive(Clone, Debug, Default)]
pub struct Peers {
    peers: Vec<SocketAddr>,
    own: Option<IpAddr>,
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
    pub fn new(peers: Vec<SocketAddr>, own: Option<IpAddr>) -> Self {
        Self { peers, own }
    }

    /// Whether this agent makes the sleep decisions.
    pub fn decides(&self) -> bool {
        match self.own {
            Some(own) => self.peers.iter().all(|p| p.ip() == own || own < p.ip()),
            None => self.peers.is_empty(),
        }
    }

    /// Every peer's report; an error if any did not answer.
    pub async fn idle_times(&self) -> anyhow::Result<PeerIdle> {
        let fetches = self.peers.iter().map(|p| async move {
            tokio::time::timeout(TIMEOUT, fetch(*p)).await.map_err(|_| anyhow::anyhow!("peer {p}: no answer within {TIMEOUT:?}"))?
        });
        let reports = futures::future::try_join_all(fetches).await?;
        Ok(PeerIdle { reports })
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
