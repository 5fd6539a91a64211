//! Desired state from one Kubernetes Pod watch, one metadata-only
//! Deployment watch and one watch of the VIP records (`AppAddress`, written
//! by the allocator); no Services read or created.
//!
//! Pods opt in with the label `serviceless.io/enabled=true`; their pod
//! template carries the app in annotations (see `annotations`). Ready pods
//! with an IP are backends; terminating or not-ready pods with an IP drain;
//! pods on every node count, since any node can receive any app's traffic.
//!
//! An app must exist while it sleeps (no pods): Deployments with the same
//! label and the app's annotations on the Deployment itself are watched as
//! metadata only (`PartialObjectMetadata`, never whole objects). Such an
//! app keeps its VIP at zero replicas, its settings come from the
//! Deployment (so they do not change when it wakes), and it is woken and
//! put to sleep through the Deployment's `scale` subresource.
//!
//! An app is served once it holds a VIP record: the record gives its VIP
//! and the namespace that owns its hostname; objects from other namespaces
//! declaring the same hostname are refused (`PodIndex::decide`). The
//! allocator (`crate::allocator`) decides with the same index.
//!
//! A good API-server citizen: one list-then-watch per kind for the whole cluster,
//! bookmarks and resourceVersion resume (kube-runtime's watcher), a relist
//! only when the server says 410 Gone, exponential backoff with jitter on
//! errors, a client-side request rate limit, no periodic relists. Only the
//! few fields the dataplane needs are kept per pod, never whole objects.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    time::{Duration, SystemTime},
};

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::{
    api::{apps::v1::Deployment, core::v1::Pod},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Resource as _,
    core::PartialObjectMeta,
    runtime::{
        WatchStreamExt as _,
        events::{Event as K8sEvent, EventType, Recorder, Reporter},
        watcher::{self, Event},
    },
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{Observed, Store};
use crate::{
    app_address::{AppAddress, Claim},
    health::Health,
    metrics::Metrics,
    model::{AppSpec, BackendSpec, Lifecycle, PortSpec, Protocol, ScaleTarget, VipRanges, validate_hostname},
};

/// Label that opts a pod in (the watch's label selector).
pub const LABEL: &str = "serviceless.io/enabled";
/// Annotation names, set on the pod template.
pub mod annotations {
    /// The app's hostname (required), e.g. `hello.apps.example.com`.
    pub const HOSTNAME: &str = "serviceless.io/hostname";
    /// The app's VIP (optional; derived from the hostname inside --vip-range otherwise).
    pub const VIP: &str = "serviceless.io/vip";
    /// Port on the VIP (default 80).
    pub const PORT: &str = "serviceless.io/port";
    /// Port the pods listen on (default: the VIP port).
    pub const TARGET_PORT: &str = "serviceless.io/target-port";
    /// TCP (default) or UDP.
    pub const PROTOCOL: &str = "serviceless.io/protocol";
    /// On the Deployment: put to sleep after this long without traffic
    /// (default 15m; `0` never).
    pub const IDLE_AFTER: &str = "serviceless.io/idle-after";
    /// On the Deployment: how long connections wait while it wakes (default: `--hold-timeout`).
    pub const HOLD_TIMEOUT: &str = "serviceless.io/hold-timeout";
    /// On the Deployment: `v2` to hand held connections to the pod with a PROXY protocol v2 header.
    pub const PROXY_PROTOCOL: &str = "serviceless.io/proxy-protocol";
}

/// How long a Deployment's app may idle before it sleeps, unless annotated.
pub const DEFAULT_IDLE_AFTER: Duration = Duration::from_secs(15 * 60);

/// Settings of the Kubernetes source.
#[derive(Clone, Debug)]
pub struct KubeOptions {
    pub ranges: VipRanges,
    /// Identifies this agent in Events (the node name).
    pub instance: String,
}

type PodKey = (String, String);

/// The fields of one pod that matter, and nothing else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub hostname: String,
    pub vip: Option<IpAddr>,
    pub port: PortSpec,
    pub ip: Option<IpAddr>,
    /// The node's address (`status.hostIP`).
    pub node: Option<IpAddr>,
    /// The node's name (`spec.nodeName`), for who reports on the pod.
    pub node_name: Option<String>,
    pub ready: bool,
    pub terminating: bool,
    pub created: i64,
    pub ready_since: Option<SystemTime>,
}

/// The app an object's annotations describe.
struct Declared {
    hostname: String,
    vip: Option<IpAddr>,
    port: PortSpec,
}

fn parse_annotations(ann: &BTreeMap<String, String>, ranges: &VipRanges) -> Result<Declared, String> {
    let get = |k: &str| ann.get(k).map(|v| v.trim().to_string());
    let hostname = get(annotations::HOSTNAME).ok_or_else(|| format!("annotation {} is missing", annotations::HOSTNAME))?;
    validate_hostname(&hostname).map_err(|e| format!("annotation {}: {e}", annotations::HOSTNAME))?;
    let vip = match get(annotations::VIP) {
        None => None,
        Some(v) => {
            let ip: IpAddr = v.parse().map_err(|_| format!("annotation {}: '{v}' is not an IP address", annotations::VIP))?;
            let range = ranges.for_ip(ip);
            if !range.is_some_and(|r| r.contains(ip)) {
                return Err(format!(
                    "annotation {}: {ip} is outside the VIP range{}",
                    annotations::VIP,
                    range.map(|r| format!(" {r}")).unwrap_or_else(|| " (none configured for its address family)".into())
                ));
            }
            Some(ip)
        }
    };
    let port_of = |key: &str, default: Option<u16>| -> Result<u16, String> {
        match get(key) {
            None => default.ok_or_else(|| format!("annotation {key} is missing")),
            Some(v) => match v.parse::<u16>() {
                Ok(p) if p > 0 => Ok(p),
                _ => Err(format!("annotation {key}: '{v}' is not a port in 1..=65535")),
            },
        }
    };
    let port = port_of(annotations::PORT, Some(80))?;
    let target_port = port_of(annotations::TARGET_PORT, Some(port))?;
    let protocol = match get(annotations::PROTOCOL).as_deref().map(str::to_ascii_uppercase).as_deref() {
        None | Some("TCP") => Protocol::Tcp,
        Some("UDP") => Protocol::Udp,
        Some(other) => return Err(format!("annotation {}: '{other}' is not TCP or UDP", annotations::PROTOCOL)),
    };
    Ok(Declared { hostname, vip, port: PortSpec { port, target_port, protocol } })
}

/// Reads a pod's app description; `Err` explains a bad annotation.
pub fn parse_pod(pod: &Pod, ranges: &VipRanges) -> Result<PodInfo, String> {
    let meta = &pod.metadata;
    let Declared { hostname, vip, port } = parse_annotations(&meta.annotations.clone().unwrap_or_default(), ranges)?;
    let status = pod.status.as_ref();
    let finished = status.and_then(|s| s.phase.as_deref()).is_some_and(|p| p == "Succeeded" || p == "Failed");
    let ip = if finished { None } else { status.and_then(|s| s.pod_ip.as_deref()).and_then(|ip| ip.parse().ok()) };
    let node = status.and_then(|s| s.host_ip.as_deref()).and_then(|ip| ip.parse().ok());
    let ready_condition = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    let ready = ready_condition.is_some_and(|c| c.status == "True");
    let ready_since = ready_condition
        .and_then(|c| c.last_transition_time.as_ref())
        .map(|t| SystemTime::UNIX_EPOCH + Duration::from_secs(t.0.as_second().max(0) as u64));
    Ok(PodInfo {
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        uid: meta.uid.clone().unwrap_or_default(),
        hostname,
        vip,
        port,
        ip,
        node,
        node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        ready,
        terminating: meta.deletion_timestamp.is_some(),
        created: meta.creation_timestamp.as_ref().map_or(0, |t| t.0.as_second()),
        ready_since,
    })
}

/// The app a Deployment declares on itself (metadata only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeploymentInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub hostname: String,
    pub vip: Option<IpAddr>,
    pub port: PortSpec,
    pub lifecycle: Lifecycle,
    pub created: i64,
}

/// Reads a Deployment's app description and scale-to-zero settings.
pub fn parse_deployment(meta: &ObjectMeta, ranges: &VipRanges) -> Result<DeploymentInfo, String> {
    let ann = meta.annotations.clone().unwrap_or_default();
    let Declared { hostname, vip, port } = parse_annotations(&ann, ranges)?;
    let duration = |key: &str| -> Result<Option<Duration>, String> {
        ann.get(key)
            .map(|v| humantime::parse_duration(v.trim()).map_err(|e| format!("annotation {key}: '{v}': {e} (e.g. 15m, 30s)")))
            .transpose()
    };
    let idle_after = match duration(annotations::IDLE_AFTER)? {
        None => Some(DEFAULT_IDLE_AFTER),
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
    };
    let proxy_protocol = match ann.get(annotations::PROXY_PROTOCOL).map(|v| v.trim()) {
        None | Some("") | Some("none") => false,
        Some("v2") => true,
        Some(other) => return Err(format!("annotation {}: '{other}' is not v2 or none", annotations::PROXY_PROTOCOL)),
    };
    let namespace = meta.namespace.clone().unwrap_or_default();
    let name = meta.name.clone().unwrap_or_default();
    Ok(DeploymentInfo {
        lifecycle: Lifecycle {
            scaler: Some(ScaleTarget::Deployment { namespace: namespace.clone(), name: name.clone() }),
            idle_after,
            hold_timeout: duration(annotations::HOLD_TIMEOUT)?,
            proxy_protocol,
        },
        namespace,
        name,
        uid: meta.uid.clone().unwrap_or_default(),
        hostname,
        vip,
        port,
        created: meta.creation_timestamp.as_ref().map_or(0, |t| t.0.as_second()),
    })
}

/// Pods, Deployments and VIP records, grouped by hostname.
#[derive(Default)]
pub struct PodIndex {
    pods: HashMap<PodKey, PodInfo>,
    by_host: HashMap<String, BTreeSet<PodKey>>,
    deployments: HashMap<PodKey, DeploymentInfo>,
    deployments_by_host: HashMap<String, BTreeSet<PodKey>>,
    claims: HashMap<String, Claim>,
    claims_by_host: HashMap<String, BTreeSet<String>>,
}

/// An object that declares an app (for Events about it).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The node a pod is scheduled on (`spec.nodeName`): only that node's
    /// agent posts Events about it.
    pub node: Option<String>,
}

/// How one hostname is decided: who owns it, which VIP it holds, what is refused.
#[derive(Debug, Default)]
pub struct Decision {
    /// The app to program; `None` until it holds a VIP record (or when
    /// nothing in its owner's namespace declares it).
    pub app: Option<AppSpec>,
    /// The namespace that owns the hostname: its oldest record's, or, with
    /// no record yet, the namespace whose object declaring it is oldest.
    pub owner: Option<String>,
    /// The VIP the owner asks for by annotation.
    pub wanted: Option<IpAddr>,
    /// The record in force.
    pub chosen: Option<Claim>,
    /// The hostname's other records (left by a race or a VIP change).
    pub superseded: Vec<Claim>,
    /// Objects declaring the hostname from another namespace than the owner's.
    pub refused: Vec<ObjectRef>,
    /// The owner's oldest object, to report on.
    pub owner_object: Option<ObjectRef>,
    /// The owner's pods are IPv6: allocate from the IPv6 range.
    pub ipv6: bool,
}

impl PodIndex {
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// Inserts or replaces a pod; returns the hostnames whose app changed.
    pub fn upsert(&mut self, info: PodInfo) -> Vec<String> {
        let key = (info.namespace.clone(), info.name.clone());
        let mut touched = vec![info.hostname.clone()];
        if let Some(old) = self.pods.get(&key)
            && old.hostname != info.hostname
        {
            let old_host = old.hostname.clone();
            touched.push(old_host.clone());
            unindex(&mut self.by_host, &key, &old_host);
        }
        self.by_host.entry(info.hostname.clone()).or_default().insert(key.clone());
        self.pods.insert(key, info);
        touched
    }

    pub fn remove(&mut self, namespace: &str, name: &str) -> Option<String> {
        let key = (namespace.to_string(), name.to_string());
        let old = self.pods.remove(&key)?;
        unindex(&mut self.by_host, &key, &old.hostname);
        Some(old.hostname)
    }

    /// Inserts or replaces a Deployment; returns the hostnames whose app changed.
    pub fn upsert_deployment(&mut self, info: DeploymentInfo) -> Vec<String> {
        let key = (info.namespace.clone(), info.name.clone());
        let mut touched = vec![info.hostname.clone()];
        if let Some(old) = self.deployments.get(&key)
            && old.hostname != info.hostname
        {
            let old_host = old.hostname.clone();
            touched.push(old_host.clone());
            unindex(&mut self.deployments_by_host, &key, &old_host);
        }
        self.deployments_by_host.entry(info.hostname.clone()).or_default().insert(key.clone());
        self.deployments.insert(key, info);
        touched
    }

    pub fn remove_deployment(&mut self, namespace: &str, name: &str) -> Option<String> {
        let key = (namespace.to_string(), name.to_string());
        let old = self.deployments.remove(&key)?;
        unindex(&mut self.deployments_by_host, &key, &old.hostname);
        Some(old.hostname)
    }

    /// Inserts or replaces a VIP record; returns the hostnames it concerns.
    pub fn upsert_claim(&mut self, claim: Claim) -> Vec<String> {
        let mut touched = vec![claim.hostname.clone()];
        if let Some(old) = self.claims.get(&claim.name)
            && old.hostname != claim.hostname
        {
            touched.push(old.hostname.clone());
            unindex(&mut self.claims_by_host, &claim.name, &old.hostname);
        }
        self.claims_by_host.entry(claim.hostname.clone()).or_default().insert(claim.name.clone());
        self.claims.insert(claim.name.clone(), claim);
        touched
    }

    pub fn remove_claim(&mut self, name: &str) -> Option<String> {
        let old = self.claims.remove(name)?;
        unindex(&mut self.claims_by_host, &old.name, &old.hostname);
        Some(old.hostname)
    }

    /// A relist of one kind replaces only that kind.
    pub fn take_pods_from(&mut self, other: &mut PodIndex) {
        self.pods = std::mem::take(&mut other.pods);
        self.by_host = std::mem::take(&mut other.by_host);
    }

    pub fn take_deployments_from(&mut self, other: &mut PodIndex) {
        self.deployments = std::mem::take(&mut other.deployments);
        self.deployments_by_host = std::mem::take(&mut other.deployments_by_host);
    }

    pub fn take_claims_from(&mut self, other: &mut PodIndex) {
        self.claims = std::mem::take(&mut other.claims);
        self.claims_by_host = std::mem::take(&mut other.claims_by_host);
    }

    pub fn deployment_count(&self) -> usize {
        self.deployments.len()
    }

    pub fn claims(&self) -> impl Iterator<Item = &Claim> {
        self.claims.values()
    }

    pub fn claim_count(&self) -> usize {
        self.claims.len()
    }

    pub fn has_claim(&self, name: &str) -> bool {
        self.claims.contains_key(name)
    }

    /// Whether the pod or Deployment still exists.
    pub fn has_object(&self, kind: &str, namespace: &str, name: &str) -> bool {
        let key = (namespace.to_string(), name.to_string());
        match kind {
            "Deployment" => self.deployments.contains_key(&key),
            _ => self.pods.contains_key(&key),
        }
    }

    /// Every hostname some pod, Deployment or record names.
    pub fn hostnames(&self) -> Vec<String> {
        self.by_host
            .keys()
            .chain(self.deployments_by_host.keys())
            .chain(self.claims_by_host.keys())
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// Decides `host`. `may_own(namespace)` filters who may take an
    /// unrecorded hostname (the allocator's suffix policy); agents pass
    /// `|_| true`, since they follow the records.
    pub fn decide(&self, host: &str, may_own: &dyn Fn(&str) -> bool) -> Decision {
        let pods: Vec<&PodInfo> = self.by_host.get(host).into_iter().flatten().filter_map(|k| self.pods.get(k)).collect();
        let deployments: Vec<&DeploymentInfo> =
            self.deployments_by_host.get(host).into_iter().flatten().filter_map(|k| self.deployments.get(k)).collect();
        let mut claims: Vec<&Claim> =
            self.claims_by_host.get(host).into_iter().flatten().filter_map(|n| self.claims.get(n)).collect();
        claims.sort_by(|a, b| a.order().cmp(&b.order()));

        // Every declaring object, oldest first (the same order on every node).
        let mut objects: Vec<(i64, ObjectRef)> = deployments
            .iter()
            .map(|d| {
                let object = ObjectRef { kind: "Deployment", namespace: d.namespace.clone(), name: d.name.clone(), uid: d.uid.clone(), node: None };
                (d.created, object)
            })
            .chain(pods.iter().map(|p| {
                let object = ObjectRef { kind: "Pod", namespace: p.namespace.clone(), name: p.name.clone(), uid: p.uid.clone(), node: p.node_name.clone() };
                (p.created, object)
            }))
            .collect();
        objects.sort();
        let owner = match claims.first() {
            Some(c) => Some(c.namespace.clone()),
            None => objects.iter().find(|(_, o)| may_own(&o.namespace)).map(|(_, o)| o.namespace.clone()),
        };
        let refused = objects.iter().filter(|(_, o)| Some(&o.namespace) != owner.as_ref()).map(|(_, o)| o.clone()).collect();
        let Some(owner) = owner else { return Decision { refused, ..Default::default() } };
        let owner_object = objects.iter().find(|(_, o)| o.namespace == owner).map(|(_, o)| o.clone());

        let own_pods: Vec<&PodInfo> = pods.into_iter().filter(|p| p.namespace == owner).collect();
        // A Deployment's settings win (they hold while it sleeps); else the
        // newest pod's (a rollout changes them pod by pod).
        let deployment = deployments.into_iter().filter(|d| d.namespace == owner).max_by_key(|d| (d.created, d.name.as_str()));
        let newest = own_pods.iter().max_by_key(|p| (p.created, p.name.as_str()));
        let declared = match (deployment, newest) {
            (Some(d), _) => Some((d.vip, d.port)),
            (None, Some(p)) => Some((p.vip, p.port)),
            (None, None) => None,
        };
        let wanted = declared.and_then(|(vip, _)| vip);
        let own_claims: Vec<&Claim> = claims.iter().copied().filter(|c| c.namespace == owner).collect();
        let chosen = own_claims.iter().find(|c| Some(c.vip) == wanted).or(own_claims.first()).map(|c| (*c).clone());
        let superseded = claims.iter().filter(|c| Some(&c.name) != chosen.as_ref().map(|c| &c.name)).map(|c| (*c).clone()).collect();
        let ipv6 = own_pods.iter().find_map(|p| p.ip).is_some_and(|ip| ip.is_ipv6());

        let app = match (&chosen, declared) {
            (Some(claim), Some((_, port))) => {
                let vip = claim.vip;
                let mut backends: Vec<BackendSpec> = own_pods
                    .iter()
                    .filter_map(|p| {
                        Some(BackendSpec {
                            ip: p.ip.filter(|ip| ip.is_ipv4() == vip.is_ipv4())?,
                            ready: p.ready && !p.terminating,
                            source: Some(format!("{}/{}", p.namespace, p.name)),
                            node: p.node,
                        })
                    })
                    .collect();
                // Ready first, then the per-app limit.
                backends.sort_by_key(|b| !b.ready);
                backends.truncate(serviceless_common::MAX_BACKENDS_PER_APP as usize);
                let lifecycle = deployment.map(|d| d.lifecycle.clone()).unwrap_or_default();
                Some(AppSpec { hostname: host.to_string(), vip, ports: vec![port], backends, lifecycle })
            }
            _ => None,
        };
        Decision { app, owner: Some(owner), wanted, chosen, superseded, refused, owner_object, ipv6 }
    }
}

/// Takes `key` out of `host`'s set, and the set once it is empty.
fn unindex<K: Ord>(index: &mut HashMap<String, BTreeSet<K>>, key: &K, host: &str) {
    if let Some(set) = index.get_mut(host) {
        set.remove(key);
        if set.is_empty() {
            index.remove(host);
        }
    }
}

/// An Event to post about an object.
pub struct ObjectEvent {
    pub object: ObjectRef,
    pub reason: &'static str,
    pub note: String,
}

/// Events go through a bounded queue to one poster that paces itself: a
/// burst of bad pods cannot turn into a burst of API requests.
pub const EVENT_QUEUE: usize = 256;
const EVENT_INTERVAL: Duration = Duration::from_millis(50);

/// A client rate-limited to `api_qps` whose requests say who sends them
/// (`user_agent`, e.g. "serviceless-agent/0.1.0 (node node-1)"), so the
/// API server's audit log and metrics can tell the fleet's clients apart.
pub async fn client(api_qps: u32, user_agent: &str) -> anyhow::Result<Client> {
    let mut config = kube::Config::infer().await.map_err(|e| {
        anyhow::anyhow!("no Kubernetes configuration (in-cluster service account or KUBECONFIG/~/.kube/config): {e}")
    })?;
    let agent = axum::http::HeaderValue::from_str(user_agent).map_err(|e| anyhow::anyhow!("user agent '{user_agent}': {e}"))?;
    config.headers.push((axum::http::header::USER_AGENT, agent));
    let client = kube::client::ClientBuilder::try_from(config)?
        .with_layer(&tower::limit::RateLimitLayer::new(u64::from(api_qps.max(1)), Duration::from_secs(1)))
        .build();
    Ok(client)
}

/// What one of the watches reported.
#[expect(clippy::large_enum_variant, reason = "one value at a time, moved straight into the match")]
pub enum Change {
    Pod(Event<Pod>),
    Deployment(Event<PartialObjectMeta<Deployment>>),
    Address(Event<AppAddress>),
}

/// The three watches (labelled Pods, labelled Deployments as metadata, VIP
/// records), merged; each retries with backoff on its own.
///
/// The small kinds (Deployment metadata, records, and the peer agents in
/// `crate::peers`) are listed from the API server's watch cache
/// (resourceVersion "0", unpaged: the cache does not page), not by quorum
/// reads of etcd, which a fleet relisting at once
/// turns into a storm; the watch then resumes from the list's version, so
/// nothing is missed. Pods are still listed in pages of 500 from etcd: a
/// cached list is one response holding every Pod, too big to buffer at
/// 100k pods until pods are read as a projection or streamed. After a
/// failure a watch retries within 250 ms and backs off to 1-2 s against a
/// server that keeps failing (kube-runtime's default grows to 30 s, which
/// after an API-server restart left every node's maps stale that long).
pub fn changes(client: Client) -> impl futures::Stream<Item = Result<Change, watcher::Error>> + Send {
    let selector = format!("{LABEL}=true");
    let cached = || watcher::Config { page_size: None, ..watcher::Config::default().any_semantic() };
    let pods = watcher::watcher(Api::<Pod>::all(client.clone()), watcher::Config::default().labels(&selector))
        .backoff(watch_backoff())
        .map_ok(Change::Pod);
    let deployments = watcher::watcher(Api::<PartialObjectMeta<Deployment>>::all(client.clone()), cached().labels(&selector))
        .backoff(watch_backoff())
        .map_ok(Change::Deployment);
    let addresses = watcher::watcher(Api::<AppAddress>::all(client), cached()).backoff(watch_backoff()).map_ok(Change::Address);
    futures::stream::select_all([pods.boxed(), deployments.boxed(), addresses.boxed()])
}

/// 250 ms doubling to 1 s, plus up to as much again of jitter (so a fleet
/// does not retry in step): a restarted API server is listed again within
/// 2 s of being ready. Back to the start after a minute without errors.
pub fn watch_backoff() -> impl kube::runtime::utils::Backoff {
    let builder = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(1))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times();
    kube::runtime::utils::ResetTimerBackoff::new(watcher::ExponentialBackoff::from(builder), Duration::from_secs(60))
}

/// What a change means for the apps.
#[derive(Debug, Default)]
pub struct Update {
    /// Every list is in (again): decide every hostname.
    pub full: bool,
    /// Hostnames to decide again (after the first full update).
    pub hosts: Vec<String>,
    /// When the change happened at its origin (a Pod's Ready transition).
    pub origin: Option<SystemTime>,
    /// An object whose annotations just turned bad, and why.
    pub invalid: Option<(ObjectRef, String)>,
}

/// The cluster as the watches show it: the index, and the lists being read.
pub struct ClusterView {
    ranges: VipRanges,
    pub index: PodIndex,
    pod_listing: Option<PodIndex>,
    deployment_listing: Option<PodIndex>,
    claim_listing: Option<PodIndex>,
    invalid: HashMap<(&'static str, String, String), String>,
    // Nothing is decided until every list is in: a Pod list without the
    // Deployments would put every app to sleep for a moment; without the
    // records, every app would look unallocated.
    synced: [bool; 3],
}

impl ClusterView {
    pub fn new(ranges: VipRanges) -> Self {
        Self {
            ranges,
            index: PodIndex::default(),
            pod_listing: None,
            deployment_listing: None,
            claim_listing: None,
            invalid: HashMap::new(),
            synced: [false; 3],
        }
    }

    pub fn synced(&self) -> bool {
        self.synced.iter().all(|s| *s)
    }

    /// Objects whose serviceless annotations (or records) are bad.
    pub fn invalid_count(&self) -> usize {
        self.invalid.len()
    }

    /// Applies one change to the index.
    pub fn apply(&mut self, change: Change) -> Update {
        let was_synced = self.synced();
        let mut update = Update::default();
        match change {
            Change::Pod(Event::Init) => {
                self.pod_listing = Some(PodIndex::default());
                self.invalid.retain(|k, _| k.0 != "Pod");
            }
            Change::Pod(Event::InitApply(pod)) => {
                let key = ("Pod", pod.metadata.namespace.clone().unwrap_or_default(), pod.metadata.name.clone().unwrap_or_default());
                match parse_pod(&pod, &self.ranges) {
                    Ok(info) => {
                        if let Some(next) = self.pod_listing.as_mut() {
                            next.upsert(info);
                        }
                    }
                    Err(reason) => {
                        self.invalid.insert(key, reason);
                    }
                }
            }
            Change::Pod(Event::InitDone) => {
                // Level-triggered: the listing replaces every pod; pods not
                // listed are gone, whatever delete events were missed.
                if let Some(mut next) = self.pod_listing.take() {
                    self.index.take_pods_from(&mut next);
                }
                update.full = self.list_done(0, "pods", self.index.len());
            }
            Change::Pod(Event::Apply(pod)) => {
                let key = ("Pod", pod.metadata.namespace.clone().unwrap_or_default(), pod.metadata.name.clone().unwrap_or_default());
                match parse_pod(&pod, &self.ranges) {
                    Ok(info) => {
                        self.invalid.remove(&key);
                        update.origin = info.ready_since;
                        update.hosts = self.index.upsert(info);
                    }
                    Err(reason) => {
                        if self.invalid.insert(key.clone(), reason.clone()).as_ref() != Some(&reason) {
                            warn!(pod = %format!("{}/{}", key.1, key.2), %reason, "pod skipped: bad serviceless annotation");
                            let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
                            update.invalid = Some((object_ref("Pod", &pod.metadata, node), reason));
                        }
                        // A pod that turned invalid no longer backs its old app.
                        update.hosts = self.index.remove(&key.1, &key.2).into_iter().collect();
                    }
                }
            }
            Change::Pod(Event::Delete(pod)) => {
                // A hint only: the next relist is the truth.
                let (ns, name) = (pod.metadata.namespace.clone().unwrap_or_default(), pod.metadata.name.clone().unwrap_or_default());
                self.invalid.remove(&("Pod", ns.clone(), name.clone()));
                update.hosts = self.index.remove(&ns, &name).into_iter().collect();
            }
            Change::Deployment(Event::Init) => {
                self.deployment_listing = Some(PodIndex::default());
                self.invalid.retain(|k, _| k.0 != "Deployment");
            }
            Change::Deployment(Event::InitApply(d)) => match parse_deployment(&d.metadata, &self.ranges) {
                Ok(info) => {
                    if let Some(next) = self.deployment_listing.as_mut() {
                        next.upsert_deployment(info);
                    }
                }
                Err(reason) => {
                    self.invalid.insert(meta_key("Deployment", &d.metadata), reason);
                }
            },
            Change::Deployment(Event::InitDone) => {
                if let Some(mut next) = self.deployment_listing.take() {
                    self.index.take_deployments_from(&mut next);
                }
                update.full = self.list_done(1, "deployments", self.index.deployment_count());
            }
            Change::Deployment(Event::Apply(d)) => {
                let key = meta_key("Deployment", &d.metadata);
                update.hosts = match parse_deployment(&d.metadata, &self.ranges) {
                    Ok(info) => {
                        self.invalid.remove(&key);
                        self.index.upsert_deployment(info)
                    }
                    Err(reason) => {
                        if self.invalid.insert(key.clone(), reason.clone()).as_ref() != Some(&reason) {
                            warn!(deployment = %format!("{}/{}", key.1, key.2), %reason, "Deployment's app skipped: bad serviceless annotation");
                            update.invalid = Some((object_ref("Deployment", &d.metadata, None), reason));
                        }
                        self.index.remove_deployment(&key.1, &key.2).into_iter().collect()
                    }
                };
            }
            Change::Deployment(Event::Delete(d)) => {
                let key = meta_key("Deployment", &d.metadata);
                self.invalid.remove(&key);
                update.hosts = self.index.remove_deployment(&key.1, &key.2).into_iter().collect();
            }
            Change::Address(Event::Init) => {
                self.claim_listing = Some(PodIndex::default());
                self.invalid.retain(|k, _| k.0 != "AppAddress");
            }
            Change::Address(Event::InitApply(a)) => match self.parse_claim(&a) {
                Ok(claim) => {
                    if let Some(next) = self.claim_listing.as_mut() {
                        next.upsert_claim(claim);
                    }
                }
                Err(reason) => {
                    self.invalid.insert(meta_key("AppAddress", &a.metadata), reason);
                }
            },
            Change::Address(Event::InitDone) => {
                if let Some(mut next) = self.claim_listing.take() {
                    self.index.take_claims_from(&mut next);
                }
                update.full = self.list_done(2, "VIP records", self.index.claim_count());
            }
            Change::Address(Event::Apply(a)) => {
                let key = meta_key("AppAddress", &a.metadata);
                update.hosts = match self.parse_claim(&a) {
                    Ok(claim) => {
                        self.invalid.remove(&key);
                        self.index.upsert_claim(claim)
                    }
                    Err(reason) => {
                        if self.invalid.insert(key.clone(), reason.clone()).as_ref() != Some(&reason) {
                            warn!(%reason, "VIP record ignored");
                        }
                        self.index.remove_claim(&key.2).into_iter().collect()
                    }
                };
            }
            Change::Address(Event::Delete(a)) => {
                let key = meta_key("AppAddress", &a.metadata);
                self.invalid.remove(&key);
                update.hosts = self.index.remove_claim(&key.2).into_iter().collect();
            }
        }
        if !was_synced && !update.full {
            update.hosts.clear();
        }
        update
    }

    /// Marks one list as in; true once all are.
    fn list_done(&mut self, which: usize, what: &str, count: usize) -> bool {
        self.synced[which] = true;
        info!(what, count, invalid = self.invalid.len(), "list synced");
        self.synced()
    }

    fn parse_claim(&self, obj: &AppAddress) -> Result<Claim, String> {
        let claim = Claim::parse(obj)?;
        if !self.ranges.for_ip(claim.vip).is_some_and(|r| r.contains(claim.vip)) {
            return Err(format!("AppAddress {}: {} is outside this node's --vip-range", claim.name, claim.vip));
        }
        validate_hostname(&claim.hostname).map_err(|e| format!("AppAddress {}: {e}", claim.name))?;
        Ok(claim)
    }
}

fn meta_key(kind: &'static str, meta: &ObjectMeta) -> (&'static str, String, String) {
    (kind, meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default())
}

fn object_ref(kind: &'static str, meta: &ObjectMeta, node: Option<String>) -> ObjectRef {
    ObjectRef {
        kind,
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        uid: meta.uid.clone().unwrap_or_default(),
        node,
    }
}

/// Runs the watches until the process stops; errors are retried with backoff.
pub async fn watch(client: Client, opts: KubeOptions, store: Store, health: Health, metrics: Metrics) -> anyhow::Result<()> {
    let (events_tx, events_rx) = mpsc::channel::<ObjectEvent>(EVENT_QUEUE);
    let reporter = Reporter { controller: "serviceless-agent".into(), instance: Some(opts.instance.clone()) };
    tokio::spawn(post_events(client.clone(), reporter, events_rx));
    let mut stream = std::pin::pin!(changes(client));
    let mut view = ClusterView::new(opts.ranges.clone());
    // Per hostname: objects refused (another namespace owns it), and apps
    // waiting for their VIP record.
    let mut refused: HashMap<String, usize> = HashMap::new();
    let mut awaiting: HashSet<String> = HashSet::new();
    loop {
        let change = match stream.try_next().await {
            Ok(Some(change)) => change,
            Ok(None) => anyhow::bail!("Kubernetes watch ended"),
            Err(e) => {
                // The maps keep their last state; the watcher retries with backoff.
                metrics.watch_restarts.inc();
                metrics.source_errors.inc();
                warn!(error = %e, "Kubernetes watch failed; retrying with backoff (the dataplane keeps its last state)");
                health.set_source_error(format!("Kubernetes API: {e}"));
                continue;
            }
        };
        if view.synced() {
            health.set_source_ok();
        }
        let update = view.apply(change);
        // Only this node's pods: one Event per fact, not one per node. The
        // allocator reports Deployments and pods not on a node yet.
        if let Some((object, note)) = update.invalid
            && object.node.as_deref() == Some(opts.instance.as_str())
            && events_tx.try_send(ObjectEvent { object, reason: "InvalidServicelessAnnotation", note }).is_err()
        {
            debug!("event queue full; event dropped");
        }
        if update.full {
            publish_all(&view.index, &store, &mut refused, &mut awaiting);
            health.set_source_ok();
        } else if !update.hosts.is_empty() {
            let observed = Observed { origin: update.origin, ..Observed::now() };
            for host in &update.hosts {
                publish(&view.index, host, &store, observed, &mut refused, &mut awaiting);
            }
        }
        metrics.invalid_apps.set(view.invalid_count() as i64);
        metrics.refused_claims.set(refused.values().sum::<usize>() as i64);
        metrics.apps_awaiting_vip.set(awaiting.len() as i64);
    }
}

/// Replaces the whole desired state with what the index holds.
fn publish_all(index: &PodIndex, store: &Store, refused: &mut HashMap<String, usize>, awaiting: &mut HashSet<String>) {
    refused.clear();
    awaiting.clear();
    let mut apps = Vec::new();
    for host in index.hostnames() {
        let decision = index.decide(&host, &|_| true);
        note(&host, &decision, refused, awaiting);
        apps.extend(decision.app);
    }
    let asleep = apps.iter().filter(|a| !a.has_ready_pod()).count();
    info!(apps = apps.len(), asleep, awaiting_vip = awaiting.len(), "desired state from Kubernetes replaced");
    store.replace_all(apps, Observed::now());
}

/// Decides one hostname again and updates the store.
fn publish(
    index: &PodIndex,
    host: &str,
    store: &Store,
    observed: Observed,
    refused: &mut HashMap<String, usize>,
    awaiting: &mut HashSet<String>,
) {
    let decision = index.decide(host, &|_| true);
    note(host, &decision, refused, awaiting);
    match decision.app {
        Some(app) => store.upsert(app, observed),
        None => store.remove(host, observed),
    }
}

/// Keeps the per-hostname counts behind the refused and awaiting metrics.
fn note(host: &str, d: &Decision, refused: &mut HashMap<String, usize>, awaiting: &mut HashSet<String>) {
    if d.chosen.is_some() && !d.refused.is_empty() {
        refused.insert(host.to_string(), d.refused.len());
    } else {
        refused.remove(host);
    }
    if d.chosen.is_none() && d.owner_object.is_some() {
        awaiting.insert(host.to_string());
    } else {
        awaiting.remove(host);
    }
}

/// Posts Events from a bounded queue, paced.
pub async fn post_events(client: Client, reporter: Reporter, mut rx: mpsc::Receiver<ObjectEvent>) {
    let recorder = Recorder::new(client, reporter);
    while let Some(ev) = rx.recv().await {
        let (api_version, kind) = match ev.object.kind {
            "Deployment" => (Deployment::api_version(&()).into_owned(), Deployment::kind(&()).into_owned()),
            _ => (Pod::api_version(&()).into_owned(), Pod::kind(&()).into_owned()),
        };
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(api_version),
            kind: Some(kind),
            namespace: Some(ev.object.namespace.clone()),
            name: Some(ev.object.name.clone()),
            uid: Some(ev.object.uid.clone()),
            ..Default::default()
        };
        let event = K8sEvent {
            type_: EventType::Warning,
            reason: ev.reason.into(),
            note: Some(ev.note.chars().take(1000).collect()),
            action: "Programming".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &reference).await {
            debug!(error = %e, "posting an Event failed");
        }
        tokio::time::sleep(EVENT_INTERVAL).await;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn ranges() -> VipRanges {
        VipRanges::from_list(&["10.96.0.0/16".parse().unwrap()]).unwrap()
    }

    pub(crate) fn pod(ns: &str, name: &str, ann: &[(&str, &str)], ip: Option<&str>, ready: bool) -> Pod {
        let mut p = Pod {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                annotations: Some(ann.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ..Default::default()
            },
            ..Default::default()
        };
        let conditions = vec![k8s_openapi::api::core::v1::PodCondition {
            type_: "Ready".into(),
            status: if ready { "True" } else { "False" }.into(),
            ..Default::default()
        }];
        p.status = Some(k8s_openapi::api::core::v1::PodStatus {
            pod_ip: ip.map(Into::into),
            conditions: Some(conditions),
            ..Default::default()
        });
        p
    }

    #[test]
    fn annotations_are_parsed_and_bad_ones_explained() {
        let good = pod("a", "p1", &[(annotations::HOSTNAME, "x.example.com"), (annotations::TARGET_PORT, "8080")], Some("10.244.0.5"), true);
        let info = parse_pod(&good, &ranges()).unwrap();
        assert_eq!((info.port.port, info.port.target_port), (80, 8080));
        assert!(info.ready);
        for (ann, needle) in [
            (vec![], "missing"),
            (vec![(annotations::HOSTNAME, "Bad_Name")], "not a valid DNS name"),
            (vec![(annotations::HOSTNAME, "x.y"), (annotations::PORT, "70000")], "not a port"),
            (vec![(annotations::HOSTNAME, "x.y"), (annotations::VIP, "192.168.1.1")], "outside the VIP range"),
            (vec![(annotations::HOSTNAME, "x.y"), (annotations::VIP, "fd00::1")], "none configured"),
            (vec![(annotations::HOSTNAME, "x.y"), (annotations::PROTOCOL, "SCTP")], "not TCP or UDP"),
        ] {
            let err = parse_pod(&pod("a", "p", &ann, None, true), &ranges()).unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
    }

    pub(crate) fn claim(vip: &str, host: &str, ns: &str, created: i64) -> Claim {
        let vip: IpAddr = vip.parse().unwrap();
        Claim { name: crate::app_address::object_name(vip), vip, hostname: host.into(), namespace: ns.into(), created }
    }

    pub(crate) fn created(mut p: Pod, at: i64) -> Pod {
        p.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::from_second(at).unwrap()));
        p
    }

    #[test]
    fn a_deployment_keeps_its_app_asleep_and_its_settings_hold_when_pods_come() {
        let meta = |ann: &[(&str, &str)]| ObjectMeta {
            namespace: Some("a".into()),
            name: Some("web".into()),
            annotations: Some(ann.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..Default::default()
        };
        let host = (annotations::HOSTNAME, "x.example.com");
        let d = parse_deployment(&meta(&[host, (annotations::VIP, "10.96.0.7"), (annotations::IDLE_AFTER, "30s")]), &ranges()).unwrap();
        assert_eq!(d.lifecycle.idle_after, Some(Duration::from_secs(30)));
        assert_eq!(d.lifecycle.scaler, Some(ScaleTarget::Deployment { namespace: "a".into(), name: "web".into() }));
        assert_eq!(parse_deployment(&meta(&[host]), &ranges()).unwrap().lifecycle.idle_after, Some(DEFAULT_IDLE_AFTER));
        assert_eq!(parse_deployment(&meta(&[host, (annotations::IDLE_AFTER, "0")]), &ranges()).unwrap().lifecycle.idle_after, None);
        for bad in [(annotations::IDLE_AFTER, "later"), (annotations::PROXY_PROTOCOL, "v1"), (annotations::HOLD_TIMEOUT, "-1s")] {
            assert!(parse_deployment(&meta(&[host, bad]), &ranges()).is_err(), "{bad:?}");
        }

        let mut idx = PodIndex::default();
        idx.upsert_deployment(d);
        let decision = idx.decide("x.example.com", &|_| true);
        assert!(decision.app.is_none(), "no VIP record yet: not served");
        assert_eq!((decision.owner.as_deref(), decision.wanted), (Some("a"), Some("10.96.0.7".parse().unwrap())));
        idx.upsert_claim(claim("10.96.0.7", "x.example.com", "a", 10));
        let app = idx.decide("x.example.com", &|_| true).app.expect("an app with no pods");
        assert!(app.backends.is_empty());
        assert_eq!(app.vip.to_string(), "10.96.0.7");
        // A pod annotated differently does not move the VIP of a Deployment's app.
        let p = pod("a", "web-1", &[host, (annotations::VIP, "10.96.0.99")], Some("10.244.0.5"), true);
        idx.upsert(parse_pod(&p, &ranges()).unwrap());
        let app = idx.decide("x.example.com", &|_| true).app.unwrap();
        assert_eq!((app.vip.to_string().as_str(), app.backends.len()), ("10.96.0.7", 1));
        assert_eq!(idx.remove_deployment("a", "web").as_deref(), Some("x.example.com"));
    }

    #[test]
    fn the_oldest_namespace_owns_a_hostname_and_others_never_disturb_it() {
        let mut idx = PodIndex::default();
        let host = [(annotations::HOSTNAME, "x.example.com")];
        idx.upsert(parse_pod(&created(pod("b", "late", &host, Some("10.244.1.5"), true), 200), &ranges()).unwrap());
        idx.upsert(parse_pod(&created(pod("a", "p1", &host, Some("10.244.0.5"), true), 100), &ranges()).unwrap());
        idx.upsert(parse_pod(&created(pod("a", "p2", &host, Some("10.244.0.6"), false), 150), &ranges()).unwrap());
        idx.upsert(parse_pod(&pod("a", "p3", &host, None, false), &ranges()).unwrap());
        let d = idx.decide("x.example.com", &|_| true);
        assert_eq!(d.owner.as_deref(), Some("a"), "the namespace of the oldest object");
        assert_eq!(d.refused.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), ["late"]);
        // The hostname policy can keep a namespace from taking it.
        let d = idx.decide("x.example.com", &|ns| ns != "a");
        assert_eq!(d.owner.as_deref(), Some("b"));

        // Recorded for "a": the record decides, whatever is created later.
        idx.upsert_claim(claim("10.96.0.9", "x.example.com", "a", 300));
        idx.upsert(parse_pod(&created(pod("c", "early", &host, Some("10.244.2.5"), true), 1), &ranges()).unwrap());
        let d = idx.decide("x.example.com", &|_| true);
        let app = d.app.unwrap();
        assert_eq!(d.owner.as_deref(), Some("a"));
        assert_eq!(app.backends.len(), 2, "a's pods with an IP, nobody else's");
        assert!(app.backends.iter().all(|b| b.source.as_deref().unwrap().starts_with("a/")));
        assert!(app.backends[0].ready && !app.backends[1].ready);
        assert_eq!(d.refused.len(), 2);
    }

    #[test]
    fn one_record_is_chosen_the_same_way_everywhere() {
        let mut idx = PodIndex::default();
        let p = pod("a", "p", &[(annotations::HOSTNAME, "x.example.com")], Some("10.244.0.5"), true);
        idx.upsert(parse_pod(&p, &ranges()).unwrap());
        // Two records (two allocators in a handover): the oldest wins.
        idx.upsert_claim(claim("10.96.0.20", "x.example.com", "a", 50));
        idx.upsert_claim(claim("10.96.0.10", "x.example.com", "a", 51));
        let d = idx.decide("x.example.com", &|_| true);
        assert_eq!(d.chosen.unwrap().vip.to_string(), "10.96.0.20");
        assert_eq!(d.superseded.len(), 1);
        // The one the app asks for wins over age.
        let p = pod("a", "p", &[(annotations::HOSTNAME, "x.example.com"), (annotations::VIP, "10.96.0.10")], Some("10.244.0.5"), true);
        idx.upsert(parse_pod(&p, &ranges()).unwrap());
        let d = idx.decide("x.example.com", &|_| true);
        assert_eq!(d.app.unwrap().vip.to_string(), "10.96.0.10");
        assert_eq!(d.superseded[0].vip.to_string(), "10.96.0.20");
        assert_eq!(idx.remove_claim(&d.superseded[0].name).as_deref(), Some("x.example.com"));
    }

    #[test]
    fn bad_records_are_ignored() {
        let mut view = ClusterView::new(ranges());
        let outside = crate::app_address::new_record("192.168.0.1".parse().unwrap(), "x.example.com", "a");
        assert!(view.parse_claim(&outside).unwrap_err().contains("outside"));
        let bad_host = crate::app_address::new_record("10.96.0.1".parse().unwrap(), "Bad_Host", "a");
        assert!(view.parse_claim(&bad_host).is_err());
        view.apply(Change::Address(Event::Apply(outside)));
        assert_eq!(view.invalid_count(), 1);
        assert_eq!(view.index.claims().count(), 0);
    }
}
