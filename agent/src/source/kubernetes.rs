//! Desired state from one Kubernetes Pod watch and one metadata-only
//! Deployment watch (no Services read or created).
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
//! A good API-server citizen: one list-then-watch per kind for the whole cluster,
//! bookmarks and resourceVersion resume (kube-runtime's watcher), a relist
//! only when the server says 410 Gone, exponential backoff with jitter on
//! errors, a client-side request rate limit, no periodic relists. Only the
//! few fields the dataplane needs are kept per pod, never whole objects.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
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
        hostname,
        vip,
        port,
        created: meta.creation_timestamp.as_ref().map_or(0, |t| t.0.as_second()),
    })
}

/// The VIP for a hostname without an explicit one: a stable hash of the
/// name inside the configured range (IPv4 preferred).
pub fn derive_vip(hostname: &str, ranges: &VipRanges) -> Option<IpAddr> {
    let range = ranges.v4.or(ranges.v6)?;
    let h = serviceless_common::hash::mix64(
        hostname.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)),
    );
    // Skip the network address itself.
    let size = range.size().max(2);
    Some(range.nth(1 + u128::from(h) % (size - 1)))
}

/// Pods grouped into apps.
#[derive(Default)]
pub struct PodIndex {
    pods: HashMap<PodKey, PodInfo>,
    by_host: HashMap<String, BTreeSet<PodKey>>,
    deployments: HashMap<PodKey, DeploymentInfo>,
    deployments_by_host: HashMap<String, BTreeSet<PodKey>>,
    /// The VIP each published app holds, and who holds each VIP.
    app_vip: HashMap<String, IpAddr>,
    vip_hosts: HashMap<IpAddr, BTreeSet<String>>,
}

/// A hostname or VIP claimed by more than one app.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub what: String,
    pub pods: Vec<PodKey>,
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
            self.unindex(&key, &old_host);
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

    fn unindex(&mut self, key: &PodKey, host: &str) {
        unindex(&mut self.by_host, key, host);
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

    /// Takes the Deployments of another index (a Pod relist keeps them, and
    /// a Deployment relist keeps the pods).
    pub fn take_deployments_from(&mut self, other: &mut PodIndex) {
        self.deployments = std::mem::take(&mut other.deployments);
        self.deployments_by_host = std::mem::take(&mut other.deployments_by_host);
    }

    pub fn take_pods_from(&mut self, other: &mut PodIndex) {
        self.pods = std::mem::take(&mut other.pods);
        self.by_host = std::mem::take(&mut other.by_host);
    }

    pub fn deployment_count(&self) -> usize {
        self.deployments.len()
    }

    /// Records that `host` now holds `vip` (or nothing); returns the other
    /// hostnames holding the same VIP.
    pub fn claim_vip(&mut self, host: &str, vip: Option<IpAddr>) -> Vec<String> {
        if let Some(old) = self.app_vip.remove(host)
            && let Some(set) = self.vip_hosts.get_mut(&old)
        {
            set.remove(host);
            if set.is_empty() {
                self.vip_hosts.remove(&old);
            }
        }
        let Some(vip) = vip else { return Vec::new() };
        self.app_vip.insert(host.to_string(), vip);
        let set = self.vip_hosts.entry(vip).or_default();
        set.insert(host.to_string());
        set.iter().filter(|h| *h != host).cloned().collect()
    }

    /// Drops every VIP claim (before all hostnames claim theirs anew).
    pub fn forget_vip_claims(&mut self) {
        self.app_vip.clear();
        self.vip_hosts.clear();
    }

    pub fn hostnames(&self) -> Vec<String> {
        self.by_host.keys().chain(self.deployments_by_host.keys()).cloned().collect::<BTreeSet<_>>().into_iter().collect()
    }

    pub fn pod(&self, key: &PodKey) -> Option<&PodInfo> {
        self.pods.get(key)
    }

    /// The app for `host`, or None if no pod or Deployment claims it. A
    /// hostname claimed from several namespaces is contested: it gets no
    /// backends (its VIP goes to the activator) and is returned as a conflict.
    pub fn app(&self, host: &str, ranges: &VipRanges) -> (Option<AppSpec>, Option<Conflict>) {
        let pod_keys = self.by_host.get(host);
        let deployment_keys = self.deployments_by_host.get(host);
        let pods: Vec<&PodInfo> = pod_keys.into_iter().flatten().filter_map(|k| self.pods.get(k)).collect();
        let deployments: Vec<&DeploymentInfo> =
            deployment_keys.into_iter().flatten().filter_map(|k| self.deployments.get(k)).collect();
        let namespaces: BTreeSet<&str> =
            pods.iter().map(|p| p.namespace.as_str()).chain(deployments.iter().map(|d| d.namespace.as_str())).collect();
        // A Deployment's settings win (they hold while it sleeps); else the
        // newest pod's (a rollout changes them pod by pod).
        let deployment = deployments.iter().max_by_key(|d| (d.created, d.name.as_str()));
        let newest = pods.iter().max_by_key(|p| (p.created, p.name.as_str()));
        let (vip, port) = match (deployment, newest) {
            (Some(d), _) => (d.vip, d.port),
            (None, Some(p)) => (p.vip, p.port),
            (None, None) => return (None, None),
        };
        let Some(vip) = vip.or_else(|| derive_vip(host, ranges)) else { return (None, None) };
        let conflict = (namespaces.len() > 1).then(|| Conflict {
            what: format!("hostname {host} is claimed from namespaces {}", namespaces.iter().copied().collect::<Vec<_>>().join(", ")),
            pods: pod_keys.into_iter().flatten().cloned().collect(),
        });
        let mut backends: Vec<BackendSpec> = if conflict.is_some() {
            Vec::new()
        } else {
            pods.iter()
                .filter_map(|p| {
                    Some(BackendSpec {
                        ip: p.ip.filter(|ip| ip.is_ipv4() == vip.is_ipv4())?,
                        ready: p.ready && !p.terminating,
                        source: Some(format!("{}/{}", p.namespace, p.name)),
                        node: p.node,
                    })
                })
                .collect()
        };
        // Ready first, then the per-app limit.
        backends.sort_by_key(|b| !b.ready);
        backends.truncate(serviceless_common::MAX_BACKENDS_PER_APP as usize);
        // A contested app is never woken nor put to sleep.
        let lifecycle = match (deployment, &conflict) {
            (Some(d), None) => d.lifecycle.clone(),
            _ => Lifecycle::default(),
        };
        let spec = AppSpec { hostname: host.to_string(), vip, ports: vec![port], backends, lifecycle };
        (Some(spec), conflict)
    }

    /// Apps whose VIPs collide (different hostnames, same VIP).
    pub fn vip_conflicts(&self, apps: &[AppSpec]) -> Vec<Conflict> {
        let mut by_vip: BTreeMap<IpAddr, Vec<&str>> = BTreeMap::new();
        for a in apps {
            by_vip.entry(a.vip).or_default().push(&a.hostname);
        }
        by_vip
            .into_iter()
            .filter(|(_, hosts)| hosts.len() > 1)
            .map(|(vip, hosts)| Conflict {
                what: format!("VIP {vip} is claimed by {}", hosts.join(", ")),
                pods: hosts.iter().flat_map(|h| self.by_host.get(*h).into_iter().flatten().cloned()).collect(),
            })
            .collect()
    }
}

fn unindex(index: &mut HashMap<String, BTreeSet<PodKey>>, key: &PodKey, host: &str) {
    if let Some(set) = index.get_mut(host) {
        set.remove(key);
        if set.is_empty() {
            index.remove(host);
        }
    }
}

/// An Event to post about a pod.
struct PodEvent {
    pod: PodInfo,
    reason: &'static str,
    note: String,
}

/// Events go through a bounded queue to one poster that paces itself: a
/// burst of bad pods cannot turn into a burst of API requests.
const EVENT_QUEUE: usize = 256;
const EVENT_INTERVAL: Duration = Duration::from_millis(50);

pub async fn client(api_qps: u32) -> anyhow::Result<Client> {
    let config = kube::Config::infer().await.map_err(|e| {
        anyhow::anyhow!("no Kubernetes configuration (in-cluster service account or KUBECONFIG/~/.kube/config): {e}")
    })?;
    let client = kube::client::ClientBuilder::try_from(config)?
        .with_layer(&tower::limit::RateLimitLayer::new(u64::from(api_qps.max(1)), Duration::from_secs(1)))
        .build();
    Ok(client)
}

/// What either watch reported.
#[expect(clippy::large_enum_variant, reason = "one value at a time, moved straight into the match")]
enum Change {
    Pod(Event<Pod>),
    Deployment(Event<PartialObjectMeta<Deployment>>),
}

/// Runs the watches until the process stops; errors are retried with backoff.
pub async fn watch(client: Client, opts: KubeOptions, store: Store, health: Health, metrics: Metrics) -> anyhow::Result<()> {
    let (events_tx, events_rx) = mpsc::channel::<PodEvent>(EVENT_QUEUE);
    tokio::spawn(post_events(client.clone(), opts.instance.clone(), events_rx));

    let selector = format!("{LABEL}=true");
    let pods = watcher::watcher(Api::<Pod>::all(client.clone()), watcher::Config::default().labels(&selector))
        .default_backoff()
        .map_ok(Change::Pod);
    let deployments =
        watcher::watcher(Api::<PartialObjectMeta<Deployment>>::all(client), watcher::Config::default().labels(&selector))
            .default_backoff()
            .map_ok(Change::Deployment);
    let mut stream = futures::stream::select(pods.boxed(), deployments.boxed());
    let mut index = PodIndex::default();
    let mut pod_listing: Option<PodIndex> = None;
    let mut deployment_listing: Option<PodIndex> = None;
    let mut invalid: HashMap<PodKey, String> = HashMap::new();
    let mut invalid_deployments: HashMap<PodKey, String> = HashMap::new();
    let mut reported: HashMap<PodKey, String> = HashMap::new();
    // Nothing is published until both lists are in: a Pod list without the
    // Deployments would put every app to sleep for a moment, and the other
    // way round would send them all to the activator.
    let (mut pods_synced, mut deployments_synced) = (false, false);
    let emit = |pod: &PodInfo, reason: &'static str, note: String, reported: &mut HashMap<PodKey, String>| {
        let key = (pod.namespace.clone(), pod.name.clone());
        if reported.get(&key) == Some(&note) {
            return;
        }
        reported.insert(key, note.clone());
        if events_tx.try_send(PodEvent { pod: pod.clone(), reason, note }).is_err() {
            debug!("event queue full; event dropped");
        }
    };

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
        let synced = pods_synced && deployments_synced;
        if synced {
            health.set_source_ok();
        }
        match change {
            Change::Pod(Event::Init) => {
                pod_listing = Some(PodIndex::default());
                invalid.clear();
            }
            Change::Pod(Event::InitApply(pod)) => {
                if let Some(next) = pod_listing.as_mut() {
                    match parse_pod(&pod, &opts.ranges) {
                        Ok(info) => {
                            next.upsert(info);
                        }
                        Err(reason) => {
                            invalid.insert(key_of(&pod), reason);
                        }
                    }
                }
            }
            Change::Pod(Event::InitDone) => {
                // Level-triggered: the listing replaces every pod; pods not
                // listed are gone, whatever delete events were missed.
                if let Some(mut next) = pod_listing.take() {
                    index.take_pods_from(&mut next);
                }
                pods_synced = true;
                info!(pods = index.len(), invalid = invalid.len(), "Pod list synced");
                if deployments_synced {
                    publish_all(&mut index, &opts.ranges, &store, &emit, &mut reported);
                    health.set_source_ok();
                }
                metrics.invalid_apps.set((invalid.len() + invalid_deployments.len()) as i64);
            }
            Change::Pod(Event::Apply(pod)) => {
                let key = key_of(&pod);
                let observed_at = Observed::now();
                let touched = match parse_pod(&pod, &opts.ranges) {
                    Ok(info) => {
                        invalid.remove(&key);
                        let origin = info.ready_since;
                        let touched = index.upsert(info);
                        if synced {
                            let observed = Observed { origin, ..observed_at };
                            publish(&mut index, &touched, &opts.ranges, &store, observed, &emit, &mut reported);
                        }
                        touched
                    }
                    Err(reason) => {
                        warn!(pod = %format!("{}/{}", key.0, key.1), %reason, "pod skipped: bad serviceless annotation");
                        if invalid.insert(key.clone(), reason.clone()).as_ref() != Some(&reason) {
                            let stub = stub_info(&pod);
                            emit(&stub, "InvalidServicelessAnnotation", reason, &mut reported);
                        }
                        // A pod that turned invalid no longer backs its old app.
                        let touched: Vec<String> = index.remove(&key.0, &key.1).into_iter().collect();
                        if synced {
                            publish(&mut index, &touched, &opts.ranges, &store, observed_at, &emit, &mut reported);
                        }
                        touched
                    }
                };
                debug!(pod = %format!("{}/{}", key.0, key.1), apps = ?touched, "pod applied");
                metrics.invalid_apps.set((invalid.len() + invalid_deployments.len()) as i64);
            }
            Change::Pod(Event::Delete(pod)) => {
                // A hint only: the next relist is the truth.
                let key = key_of(&pod);
                invalid.remove(&key);
                reported.remove(&key);
                let touched: Vec<String> = index.remove(&key.0, &key.1).into_iter().collect();
                if synced {
                    publish(&mut index, &touched, &opts.ranges, &store, Observed::now(), &emit, &mut reported);
                }
                metrics.invalid_apps.set((invalid.len() + invalid_deployments.len()) as i64);
            }
            Change::Deployment(Event::Init) => {
                deployment_listing = Some(PodIndex::default());
                invalid_deployments.clear();
            }
            Change::Deployment(Event::InitApply(d)) => {
                if let Some(next) = deployment_listing.as_mut() {
                    match parse_deployment(&d.metadata, &opts.ranges) {
                        Ok(info) => {
                            next.upsert_deployment(info);
                        }
                        Err(reason) => {
                            invalid_deployments.insert(meta_key(&d.metadata), reason);
                        }
                    }
                }
            }
            Change::Deployment(Event::InitDone) => {
                if let Some(mut next) = deployment_listing.take() {
                    index.take_deployments_from(&mut next);
                }
                deployments_synced = true;
                info!(deployments = index.deployment_count(), invalid = invalid_deployments.len(), "Deployment list synced");
                if pods_synced {
                    publish_all(&mut index, &opts.ranges, &store, &emit, &mut reported);
                    health.set_source_ok();
                }
                metrics.invalid_apps.set((invalid.len() + invalid_deployments.len()) as i64);
            }
            Change::Deployment(Event::Apply(d)) => {
                let key = meta_key(&d.metadata);
                let touched = match parse_deployment(&d.metadata, &opts.ranges) {
                    Ok(info) => {
                        invalid_deployments.remove(&key);
                        index.upsert_deployment(info)
                    }
                    Err(reason) => {
                        if invalid_deployments.insert(key.clone(), reason.clone()).as_ref() != Some(&reason) {
                            warn!(deployment = %format!("{}/{}", key.0, key.1), %reason, "Deployment's app skipped: bad serviceless annotation");
                        }
                        index.remove_deployment(&key.0, &key.1).into_iter().collect()
                    }
                };
                if synced {
                    publish(&mut index, &touched, &opts.ranges, &store, Observed::now(), &emit, &mut reported);
                }
                metrics.invalid_apps.set((invalid.len() + invalid_deployments.len()) as i64);
            }
            Change::Deployment(Event::Delete(d)) => {
                let key = meta_key(&d.metadata);
                invalid_deployments.remove(&key);
                let touched: Vec<String> = index.remove_deployment(&key.0, &key.1).into_iter().collect();
                if synced {
                    publish(&mut index, &touched, &opts.ranges, &store, Observed::now(), &emit, &mut reported);
                }
                metrics.invalid_apps.set((invalid.len() + invalid_deployments.len()) as i64);
            }
        }
    }
}

/// Replaces the whole desired state with what the index holds.
fn publish_all(
    index: &mut PodIndex,
    ranges: &VipRanges,
    store: &Store,
    emit: &impl Fn(&PodInfo, &'static str, String, &mut HashMap<PodKey, String>),
    reported: &mut HashMap<PodKey, String>,
) {
    let mut apps = Vec::new();
    let mut conflicts = Vec::new();
    // Every claim is made again below: a hostname the new lists no longer
    // have must not keep its VIP claimed.
    index.forget_vip_claims();
    for host in index.hostnames() {
        let (app, conflict) = index.app(&host, ranges);
        index.claim_vip(&host, app.as_ref().map(|a| a.vip));
        apps.extend(app);
        conflicts.extend(conflict);
    }
    conflicts.extend(index.vip_conflicts(&apps));
    let asleep = apps.iter().filter(|a| !a.has_ready_pod()).count();
    info!(apps = apps.len(), asleep, "desired state from Kubernetes replaced");
    store.replace_all(apps, Observed::now());
    report_conflicts(index, &conflicts, emit, reported);
}

fn meta_key(meta: &ObjectMeta) -> PodKey {
    (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default())
}

fn key_of(pod: &Pod) -> PodKey {
    (pod.metadata.namespace.clone().unwrap_or_default(), pod.metadata.name.clone().unwrap_or_default())
}

/// Enough of a pod to post an Event about it.
fn stub_info(pod: &Pod) -> PodInfo {
    PodInfo {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        hostname: String::new(),
        vip: None,
        port: PortSpec { port: 0, target_port: 0, protocol: Protocol::Tcp },
        ip: None,
        node: None,
        ready: false,
        terminating: false,
        created: 0,
        ready_since: None,
    }
}

fn publish(
    index: &mut PodIndex,
    hosts: &[String],
    ranges: &VipRanges,
    store: &Store,
    observed: Observed,
    emit: &impl Fn(&PodInfo, &'static str, String, &mut HashMap<PodKey, String>),
    reported: &mut HashMap<PodKey, String>,
) {
    let mut conflicts = Vec::new();
    for host in hosts {
        match index.app(host, ranges) {
            (Some(app), conflict) => {
                // The reconciler sends a shared VIP to the activator; this only reports it.
                let others = index.claim_vip(host, Some(app.vip));
                if !others.is_empty() {
                    let mut hosts = others.clone();
                    hosts.push(host.clone());
                    conflicts.push(Conflict {
                        what: format!("VIP {} is claimed by {}", app.vip, hosts.join(", ")),
                        pods: hosts.iter().flat_map(|h| index.by_host.get(h).into_iter().flatten().cloned()).collect(),
                    });
                }
                conflicts.extend(conflict);
                store.upsert(app, observed);
            }
            (None, _) => {
                index.claim_vip(host, None);
                store.remove(host, observed);
            }
        }
    }
    report_conflicts(index, &conflicts, emit, reported);
}

fn report_conflicts(
    index: &PodIndex,
    conflicts: &[Conflict],
    emit: &impl Fn(&PodInfo, &'static str, String, &mut HashMap<PodKey, String>),
    reported: &mut HashMap<PodKey, String>,
) {
    for c in conflicts {
        warn!(conflict = %c.what, "collision: the contested traffic goes to the activator");
        for key in &c.pods {
            if let Some(pod) = index.pod(key) {
                emit(pod, "ServicelessCollision", format!("{}; its traffic goes to the activator", c.what), reported);
            }
        }
    }
}

async fn post_events(client: Client, instance: String, mut rx: mpsc::Receiver<PodEvent>) {
    let reporter = Reporter { controller: "serviceless-agent".into(), instance: Some(instance) };
    let recorder = Recorder::new(client, reporter);
    while let Some(ev) = rx.recv().await {
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(Pod::api_version(&()).into_owned()),
            kind: Some(Pod::kind(&()).into_owned()),
            namespace: Some(ev.pod.namespace.clone()),
            name: Some(ev.pod.name.clone()),
            uid: Some(ev.pod.uid.clone()),
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
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn ranges() -> VipRanges {
        VipRanges::from_list(&["10.96.0.0/16".parse().unwrap()]).unwrap()
    }

    fn pod(ns: &str, name: &str, ann: &[(&str, &str)], ip: Option<&str>, ready: bool) -> Pod {
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
        let (app, conflict) = idx.app("x.example.com", &ranges());
        let app = app.expect("an app with no pods");
        assert!(conflict.is_none() && app.backends.is_empty());
        assert_eq!(app.vip.to_string(), "10.96.0.7");
        // A pod annotated differently does not move the VIP of a Deployment's app.
        let p = pod("a", "web-1", &[host, (annotations::VIP, "10.96.0.99")], Some("10.244.0.5"), true);
        idx.upsert(parse_pod(&p, &ranges()).unwrap());
        let app = idx.app("x.example.com", &ranges()).0.unwrap();
        assert_eq!((app.vip.to_string().as_str(), app.backends.len()), ("10.96.0.7", 1));
        // Another namespace claiming the hostname makes it contested: no backends, never scaled.
        idx.upsert(parse_pod(&pod("b", "q", &[host], Some("10.244.1.5"), true), &ranges()).unwrap());
        let (app, conflict) = idx.app("x.example.com", &ranges());
        let app = app.unwrap();
        assert!(conflict.is_some() && app.backends.is_empty() && app.lifecycle.scaler.is_none());
        assert_eq!(idx.remove_deployment("a", "web").as_deref(), Some("x.example.com"));
    }

    #[test]
    fn a_relist_forgets_the_vip_claims_of_hostnames_that_are_gone() {
        let mut idx = PodIndex::default();
        let vip: IpAddr = "10.96.0.7".parse().unwrap();
        assert!(idx.claim_vip("gone.example.com", Some(vip)).is_empty());
        assert_eq!(idx.claim_vip("new.example.com", Some(vip)), ["gone.example.com"], "both claim it");
        idx.forget_vip_claims();
        assert!(idx.claim_vip("new.example.com", Some(vip)).is_empty(), "no stale claim after a relist");
    }

    #[test]
    fn apps_group_pods_and_contested_hostnames_get_no_backends() {
        let mut idx = PodIndex::default();
        let host = [(annotations::HOSTNAME, "x.example.com")];
        idx.upsert(parse_pod(&pod("a", "p1", &host, Some("10.244.0.5"), true), &ranges()).unwrap());
        idx.upsert(parse_pod(&pod("a", "p2", &host, Some("10.244.0.6"), false), &ranges()).unwrap());
        idx.upsert(parse_pod(&pod("a", "p3", &host, None, false), &ranges()).unwrap());
        let (app, conflict) = idx.app("x.example.com", &ranges());
        let app = app.unwrap();
        assert!(conflict.is_none());
        assert_eq!(app.backends.len(), 2, "pods without an IP are ignored");
        assert!(app.backends[0].ready && !app.backends[1].ready);
        assert!(ranges().v4.unwrap().contains(app.vip), "derived VIP inside the range");
        assert_eq!(derive_vip("x.example.com", &ranges()), Some(app.vip), "derivation is stable");

        idx.upsert(parse_pod(&pod("b", "q1", &host, Some("10.244.1.5"), true), &ranges()).unwrap());
        let (app, conflict) = idx.app("x.example.com", &ranges());
        assert!(app.unwrap().backends.is_empty(), "contested hostname goes to the activator");
        assert_eq!(conflict.unwrap().pods.len(), 4);
    }
}
