//! The cluster's VIP allocator (`serviceless allocate`), one elected replica.
//!
//! It watches what the agents watch (labelled Pods and Deployments, and the
//! AppAddress records) and, as the Lease holder, makes the records match:
//!
//! - a hostname without a record gets one: its owner is the namespace whose
//!   object declaring it is oldest (and that the hostname rules allow); the
//!   VIP is the owner's `serviceless.io/vip` if free, else allocated. One
//!   create per new app.
//! - an owner that asks for another free VIP gets a record for it; the old
//!   record is then superseded and deleted.
//! - objects from other namespaces, taken VIPs and disallowed hostnames are
//!   refused with an Event (once per object and reason) and a counter.
//! - records whose app is gone for `--release-after` are deleted.
//!
//! Why this is safe: records are named after their VIP, so the API server
//! refuses a second record for a taken VIP whatever any replica believes.
//! Two replicas that both think they lead (a Lease handover) can at worst
//! give one new app two records; every node then uses the same one (the
//! oldest, or the one the app asks for) and the leader deletes the other.
//! State lives only in the records: a crash between decisions loses
//! nothing, and a record whose app vanished meanwhile is released later.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use futures::{StreamExt as _, TryStreamExt as _};
use kube::{
    Api,
    api::{DeleteParams, PostParams},
    runtime::events::Reporter,
};
use kube_lease_manager::LeaseManagerBuilder;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::{
    app_address::{AppAddress, Claim, new_record},
    cli::{AllocateArgs, HostnameRule},
    model::VipRanges,
    source::kubernetes::{self, ClusterView, Decision, EVENT_QUEUE, ObjectEvent, ObjectRef},
    vip_pool::VipPool,
};

/// Writes in flight at once (the client's QPS limit paces them).
const WRITES_IN_FLIGHT: usize = 16;
/// How often every hostname is looked at again (releases are timed).
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);
/// A failed write is retried no sooner than this.
const RETRY_AFTER: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabel {
    op: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The allocator's metrics (prefix `serviceless_allocator`).
#[derive(Clone)]
struct AllocatorMetrics {
    registry: Arc<Mutex<Registry>>,
    leader: Gauge,
    synced: Gauge,
    records: Gauge,
    pending: Gauge,
    writes: Family<WriteLabel, Counter>,
    refusals: Family<ReasonLabel, Counter>,
}

impl AllocatorMetrics {
    fn new() -> Self {
        let m = Self {
            registry: Arc::new(Mutex::new(Registry::with_prefix("serviceless_allocator"))),
            leader: Gauge::default(),
            synced: Gauge::default(),
            records: Gauge::default(),
            pending: Gauge::default(),
            writes: Family::default(),
            refusals: Family::default(),
        };
        {
            let mut r = m.registry.lock().unwrap_or_else(|p| p.into_inner());
            r.register("leader", "1 while this replica holds the Lease and allocates", m.leader.clone());
            r.register("synced", "1 once every watch has listed", m.synced.clone());
            r.register("records", "AppAddress records (apps holding a VIP)", m.records.clone());
            r.register("pending_writes", "Record creates and deletes in flight", m.pending.clone());
            r.register("writes", "API writes by operation and outcome", m.writes.clone());
            r.register(
                "refusals",
                "Objects refused, by reason (hostname_taken, vip_taken, not_allowed, range_full), once per object and reason",
                m.refusals.clone(),
            );
        }
        m
    }

    fn encode(&self) -> anyhow::Result<String> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry.lock().unwrap_or_else(|p| p.into_inner()))?;
        Ok(out)
    }
}

/// A write to the API.
enum Write {
    Create(Box<AppAddress>),
    Delete(String),
}

/// How a write ended.
struct Written {
    /// The record (create) or its name (delete).
    name: String,
    created: Option<Claim>,
    outcome: Result<(), kube::Error>,
}

/// The hostname rules: who may take an unrecorded hostname.
#[derive(Clone, Debug, Default)]
pub struct Rules(pub Vec<HostnameRule>);

impl Rules {
    pub fn allows(&self, namespace: &str, hostname: &str) -> bool {
        self.0.is_empty() || self.0.iter().any(|r| r.matches(namespace, hostname))
    }
}

/// The decisions, and the writes they lead to (pure: no API calls here).
pub struct Allocator {
    ranges: VipRanges,
    rules: Rules,
    release_after: Duration,
    /// Creates in flight, by hostname, and their VIPs.
    pending_hosts: HashMap<String, IpAddr>,
    /// Deletes in flight.
    pending_deletes: HashSet<String>,
    /// Records whose app is gone, since when.
    orphaned: HashMap<String, Instant>,
    /// When to look at a hostname again to release its records.
    release_checks: BTreeSet<(Instant, String)>,
    /// Hostnames not to retry before a time (after a failed write).
    backoff: HashMap<String, Instant>,
    /// What was reported on each object, so each is told once.
    reported: HashMap<(String, String, &'static str), String>,
}

/// One thing to do.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Create { vip: IpAddr, hostname: String, namespace: String },
    Delete { name: String, why: &'static str },
    Refuse { object: ObjectRef, reason: &'static str, note: String },
}

impl Allocator {
    pub fn new(ranges: VipRanges, rules: Rules, release_after: Duration) -> Self {
        Self {
            ranges,
            rules,
            release_after,
            pending_hosts: HashMap::new(),
            pending_deletes: HashSet::new(),
            orphaned: HashMap::new(),
            release_checks: BTreeSet::new(),
            backoff: HashMap::new(),
            reported: HashMap::new(),
        }
    }

    /// Pools of the VIPs recorded or being recorded.
    pub fn pools(&self, view: &ClusterView) -> [Option<VipPool>; 2] {
        let mut pools = [self.ranges.v4.map(VipPool::new), self.ranges.v6.map(VipPool::new)];
        for ip in view.index.claims().map(|c| c.vip).chain(self.pending_hosts.values().copied()) {
            if let Some(pool) = pools[usize::from(ip.is_ipv6())].as_mut() {
                pool.reserve(ip);
            }
        }
        pools
    }

    /// What to do about `host`; takes the VIPs it allocates from `pools`.
    pub fn plan(&mut self, view: &ClusterView, host: &str, pools: &mut [Option<VipPool>; 2], now: Instant) -> Vec<Action> {
        if self.pending_hosts.contains_key(host) || self.backoff.get(host).is_some_and(|t| *t > now) {
            return Vec::new();
        }
        let d: Decision = view.index.decide(host, &|ns| self.rules.allows(ns, host));
        let mut actions = Vec::new();
        let holder = |ip: IpAddr| view.index.claims().find(|c| c.vip == ip).map(|c| c.hostname.clone());

        let Some(owner) = d.owner.clone() else {
            for object in &d.refused {
                let note = format!("hostname {host} is not allowed for namespace {} by the platform's hostname rules", object.namespace);
                self.refuse(&mut actions, object, "not_allowed", note);
            }
            return actions;
        };
        for object in &d.refused {
            let note = format!("hostname {host} belongs to namespace {owner}; this {} is not served", object.kind);
            self.refuse(&mut actions, object, "hostname_taken", note);
        }

        let all_claims: Vec<&Claim> = d.chosen.iter().chain(d.superseded.iter()).collect();
        let Some(owner_object) = d.owner_object.clone() else {
            // Nothing in the owner's namespace declares it any more: release
            // its records once it has been gone long enough.
            for c in all_claims {
                let since = *self.orphaned.entry(c.name.clone()).or_insert(now);
                if now.duration_since(since) >= self.release_after {
                    if !self.pending_deletes.contains(&c.name) {
                        actions.push(Action::Delete { name: c.name.clone(), why: "released" });
                    }
                } else {
                    self.release_checks.insert((since + self.release_after, host.to_string()));
                }
            }
            return actions;
        };
        for c in &all_claims {
            self.orphaned.remove(&c.name);
        }

        match &d.chosen {
            Some(chosen) => {
                for c in &d.superseded {
                    if !self.pending_deletes.contains(&c.name) {
                        actions.push(Action::Delete { name: c.name.clone(), why: "superseded" });
                    }
                }
                // The owner asks for another VIP: record it if free.
                if let Some(wanted) = d.wanted.filter(|w| *w != chosen.vip) {
                    let granted = pools[usize::from(wanted.is_ipv6())].as_mut().is_some_and(|pool| pool.reserve(wanted));
                    if granted {
                        actions.push(Action::Create { vip: wanted, hostname: host.into(), namespace: owner });
                    } else {
                        let note = format!(
                            "VIP {wanted} is held by {}; {host} keeps {}",
                            holder(wanted).unwrap_or_else(|| "another app".into()),
                            chosen.vip
                        );
                        self.refuse(&mut actions, &owner_object, "vip_taken", note);
                    }
                }
            }
            None => {
                let family = usize::from(d.wanted.map_or(d.ipv6 && pools[1].is_some(), |w| w.is_ipv6()) || pools[0].is_none());
                let Some(pool) = pools[family].as_mut() else { return actions };
                match d.wanted {
                    Some(wanted) if pool.is_free(wanted) => {
                        pool.reserve(wanted);
                        actions.push(Action::Create { vip: wanted, hostname: host.into(), namespace: owner });
                    }
                    Some(wanted) => {
                        let note = format!(
                            "VIP {wanted} is held by {}; {host} is not served until it asks for a free VIP or none",
                            holder(wanted).unwrap_or_else(|| "another app".into())
                        );
                        self.refuse(&mut actions, &owner_object, "vip_taken", note);
                    }
                    None => match pool.allocate(host) {
                        Some(vip) => actions.push(Action::Create { vip, hostname: host.into(), namespace: owner }),
                        None => {
                            let note = format!("the VIP range {} is full; {host} is not served", pool.range());
                            self.refuse(&mut actions, &owner_object, "range_full", note);
                        }
                    },
                }
            }
        }
        actions
    }

    /// Forgets what concerns objects and records that are gone (each sweep),
    /// so churn cannot grow the allocator's memory.
    fn forget_gone(&mut self, view: &ClusterView, now: Instant) {
        self.reported.retain(|(ns, name, kind), _| view.index.has_object(kind, ns, name));
        self.orphaned.retain(|name, _| view.index.has_claim(name));
        self.backoff.retain(|_, until| *until > now);
    }

    /// Hostnames whose release time has come.
    fn due_releases(&mut self, now: Instant) -> Vec<String> {
        let mut due = Vec::new();
        while let Some(first) = self.release_checks.first()
            && first.0 <= now
        {
            due.push(self.release_checks.pop_first().expect("first exists").1);
        }
        due
    }

    fn next_release(&self) -> Option<Instant> {
        self.release_checks.first().map(|(at, _)| *at)
    }

    fn refuse(&mut self, actions: &mut Vec<Action>, object: &ObjectRef, reason: &'static str, note: String) {
        let key = (object.namespace.clone(), object.name.clone(), object.kind);
        if self.reported.get(&key) != Some(&note) {
            self.reported.insert(key, note.clone());
            actions.push(Action::Refuse { object: object.clone(), reason, note });
        }
    }
}

/// Runs the allocator until the process stops.
pub async fn run(args: AllocateArgs) -> anyhow::Result<()> {
    let ranges = VipRanges::from_list(&args.vip_ranges).map_err(anyhow::Error::msg).context("--vip-range")?;
    let identity = args.identity.clone().unwrap_or_else(|| {
        format!("{}-{}", std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim(), std::process::id())
    });
    let client = kubernetes::client(args.api_qps, &format!("serviceless-allocator/{} ({identity})", env!("CARGO_PKG_VERSION"))).await?;
    let metrics = AllocatorMetrics::new();
    let synced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(serve(args.listen, metrics.clone(), synced.clone()));

    let lease = LeaseManagerBuilder::new(client.clone(), &args.lease_name)
        .with_namespace(&args.namespace)
        .with_identity(&identity)
        .with_duration(15)
        .with_grace(5)
        .build()
        .await
        .with_context(|| format!("the election Lease {}/{}", args.namespace, args.lease_name))?;
    let (mut leader, lease_task) = lease.watch().await;
    info!(%identity, lease = %format!("{}/{}", args.namespace, args.lease_name), "allocator started; waiting for the Lease");

    let (events_tx, events_rx) = mpsc::channel::<ObjectEvent>(EVENT_QUEUE);
    let reporter = Reporter { controller: "serviceless-allocator".into(), instance: Some(identity.clone()) };
    tokio::spawn(kubernetes::post_events(client.clone(), reporter, events_rx));
    let (writes_tx, writes_rx) = mpsc::channel::<Write>(WRITES_IN_FLIGHT);
    let (done_tx, mut done_rx) = mpsc::channel::<Written>(WRITES_IN_FLIGHT * 2);
    tokio::spawn(write_records(Api::<AppAddress>::all(client.clone()), writes_rx, done_tx));

    let mut view = ClusterView::new(ranges.clone());
    let mut alloc = Allocator::new(ranges, Rules(args.hostname_rules.clone()), args.release_after);
    let mut stream = std::pin::pin!(kubernetes::changes(client));
    let mut dirty: BTreeSet<String> = BTreeSet::new();
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    let mut is_leader = *leader.borrow();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            // Stopping hands the Lease over at once instead of after it expires.
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            change = stream.try_next() => match change {
                Ok(Some(change)) => {
                    let update = view.apply(change);
                    // Cluster-wide facts are the allocator's to report: bad
                    // Deployments, and pods no node's agent owns yet.
                    if let Some((object, note)) = update.invalid
                        && object.node.is_none()
                        && is_leader
                        && events_tx.try_send(ObjectEvent { object, reason: "InvalidServicelessAnnotation", note }).is_err()
                    {
                        debug!("event queue full; event dropped");
                    }
                    if update.full {
                        dirty.extend(view.index.hostnames());
                        synced.store(true, std::sync::atomic::Ordering::Relaxed);
                        metrics.synced.set(1);
                    } else {
                        dirty.extend(update.hosts);
                    }
                }
                Ok(None) => anyhow::bail!("Kubernetes watch ended"),
                Err(e) => warn!(error = %e, "Kubernetes watch failed; retrying with backoff"),
            },
            Some(done) = done_rx.recv() => {
                if let Some(host) = finish(&mut alloc, &mut view, done, &metrics) {
                    dirty.insert(host);
                }
            }
            changed = leader.changed() => {
                if changed.is_err() {
                    anyhow::bail!("the Lease manager stopped");
                }
                is_leader = *leader.borrow();
                metrics.leader.set(i64::from(is_leader));
                if is_leader {
                    info!(%identity, "holding the Lease: allocating");
                    dirty.extend(view.index.hostnames());
                } else {
                    warn!(%identity, "lost the Lease: not allocating");
                }
            }
            _ = sweep.tick() => {
                alloc.forget_gone(&view, Instant::now());
                dirty.extend(view.index.hostnames());
            }
            _ = sleep_until(alloc.next_release()) => dirty.extend(alloc.due_releases(Instant::now())),
        }
        metrics.records.set(view.index.claim_count() as i64);
        if !(is_leader && view.synced()) || dirty.is_empty() {
            continue;
        }
        // One pass over what changed, until the write queue is full.
        let now = Instant::now();
        let mut pools = alloc.pools(&view);
        while let Some(host) = dirty.pop_first() {
            let actions = alloc.plan(&view, &host, &mut pools, now);
            let mut queue_full = false;
            for action in actions {
                match action {
                    Action::Refuse { object, reason, note } => {
                        metrics.refusals.get_or_create(&ReasonLabel { reason }).inc();
                        info!(object = %format!("{} {}/{}", object.kind, object.namespace, object.name), reason, %note, "refused");
                        if events_tx.try_send(ObjectEvent { object, reason: refusal_event(reason), note }).is_err() {
                            debug!("event queue full; event dropped");
                        }
                    }
                    Action::Create { vip, hostname, namespace } => {
                        match writes_tx.try_send(Write::Create(Box::new(new_record(vip, &hostname, &namespace)))) {
                            Ok(()) => {
                                alloc.pending_hosts.insert(hostname, vip);
                            }
                            Err(_) => queue_full = true,
                        }
                    }
                    Action::Delete { name, why } => match writes_tx.try_send(Write::Delete(name.clone())) {
                        Ok(()) => {
                            info!(record = %name, why, "deleting VIP record");
                            alloc.pending_deletes.insert(name);
                        }
                        Err(_) => queue_full = true,
                    },
                }
            }
            if queue_full {
                // Decided again once writes complete.
                dirty.insert(host);
                break;
            }
        }
        metrics.pending.set((alloc.pending_hosts.len() + alloc.pending_deletes.len()) as i64);
    }
    info!(%identity, "stopping: releasing the Lease");
    drop(leader);
    match tokio::time::timeout(Duration::from_secs(5), lease_task).await {
        Ok(Ok(Ok(_))) => info!("Lease released"),
        other => warn!(outcome = ?other.map(|r| r.map(|r| r.map(|_| ()))), "the Lease was not released; the next replica takes over when it expires"),
    }
    Ok(())
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

fn refusal_event(reason: &'static str) -> &'static str {
    match reason {
        "hostname_taken" => "ServicelessHostnameTaken",
        "vip_taken" => "ServicelessVIPTaken",
        "not_allowed" => "ServicelessHostnameNotAllowed",
        _ => "ServicelessVIPRangeFull",
    }
}

/// Records a write's outcome; returns the hostname to decide again.
fn finish(alloc: &mut Allocator, view: &mut ClusterView, done: Written, metrics: &AllocatorMetrics) -> Option<String> {
    match done.created {
        Some(claim) => {
            alloc.pending_hosts.remove(&claim.hostname);
            let host = claim.hostname.clone();
            let outcome = match &done.outcome {
                Ok(()) => {
                    info!(vip = %claim.vip, hostname = %host, namespace = %claim.namespace, "VIP recorded");
                    // Known before the watch says so: the next decision sees it.
                    view.index.upsert_claim(claim);
                    "ok"
                }
                // Another replica (or a stale view) took it: the watch brings the record.
                Err(kube::Error::Api(s)) if s.code == 409 => "conflict",
                Err(e) => {
                    warn!(vip = %claim.vip, hostname = %host, error = %e, "recording a VIP failed; retrying");
                    alloc.backoff.insert(host.clone(), Instant::now() + RETRY_AFTER);
                    "error"
                }
            };
            metrics.writes.get_or_create(&WriteLabel { op: "create", outcome }).inc();
            Some(host)
        }
        None => {
            alloc.pending_deletes.remove(&done.name);
            let outcome = match &done.outcome {
                Ok(()) => "ok",
                Err(kube::Error::Api(s)) if s.code == 404 => "gone",
                Err(e) => {
                    warn!(record = %done.name, error = %e, "deleting a VIP record failed; retrying");
                    "error"
                }
            };
            metrics.writes.get_or_create(&WriteLabel { op: "delete", outcome }).inc();
            if done.outcome.is_ok() {
                alloc.orphaned.remove(&done.name);
                return view.index.remove_claim(&done.name);
            }
            None
        }
    }
}

/// Performs writes, a few at a time.
async fn write_records(api: Api<AppAddress>, mut rx: mpsc::Receiver<Write>, done: mpsc::Sender<Written>) {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
        .for_each_concurrent(WRITES_IN_FLIGHT, |write| {
            let (api, done) = (api.clone(), done.clone());
            async move {
                let written = match write {
                    Write::Create(record) => {
                        let name = record.metadata.name.clone().unwrap_or_default();
                        match api.create(&PostParams::default(), &record).await {
                            Ok(obj) => match Claim::parse(&obj) {
                                Ok(claim) => Written { name, created: Some(claim), outcome: Ok(()) },
                                Err(e) => {
                                    error!(error = %e, "the API server returned an unreadable record");
                                    return;
                                }
                            },
                            Err(e) => {
                                let claim = Claim::parse(&record).ok();
                                Written { name, created: claim, outcome: Err(e) }
                            }
                        }
                    }
                    Write::Delete(name) => {
                        let outcome = api.delete(&name, &DeleteParams::default()).await.map(|_| ());
                        Written { name, created: None, outcome }
                    }
                };
                let _ = done.send(written).await;
            }
        })
        .await;
}

async fn serve(listen: std::net::SocketAddr, metrics: AllocatorMetrics, synced: Arc<std::sync::atomic::AtomicBool>) {
    async fn metrics_handler(State((m, _)): State<(AllocatorMetrics, Arc<std::sync::atomic::AtomicBool>)>) -> impl IntoResponse {
        match m.encode() {
            Ok(body) => (StatusCode::OK, [("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
                .into_response(),
            Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "metrics encoding failed\n").into_response(),
        }
    }
    async fn readyz(State((_, synced)): State<(AllocatorMetrics, Arc<std::sync::atomic::AtomicBool>)>) -> impl IntoResponse {
        if synced.load(std::sync::atomic::Ordering::Relaxed) {
            (StatusCode::OK, "ok\n")
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, "watches not listed yet\n")
        }
    }
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(16))
        .with_state((metrics, synced));
    match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => {
            info!(%listen, "serving /metrics, /healthz, /readyz");
            if let Err(e) = axum::serve(listener, app).await {
                error!(error = %e, "metrics listener failed");
            }
        }
        Err(e) => error!(%listen, error = %e, "binding the metrics listener (--listen) failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::kubernetes::{
        annotations, parse_pod,
        tests::{claim, created, pod},
    };

    fn ranges() -> VipRanges {
        VipRanges::from_list(&["10.96.0.0/16".parse().unwrap()]).unwrap()
    }

    /// Namespace, name, annotations, creation time.
    type TestPod<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], i64);

    fn view_with(pods: &[TestPod]) -> ClusterView {
        let mut view = ClusterView::new(ranges());
        for (ns, name, ann, at) in pods {
            let p = created(pod(ns, name, ann, Some("10.244.0.5"), true), *at);
            view.index.upsert(parse_pod(&p, &ranges()).unwrap());
        }
        view
    }

    fn plan(alloc: &mut Allocator, view: &ClusterView, host: &str, now: Instant) -> Vec<Action> {
        let mut pools = alloc.pools(view);
        alloc.plan(view, host, &mut pools, now)
    }

    #[test]
    fn a_new_app_gets_its_first_choice_and_a_taken_vip_or_hostname_is_refused_once() {
        let x = [(annotations::HOSTNAME, "x.example.com")];
        let y = [(annotations::HOSTNAME, "y.example.com"), (annotations::VIP, "10.96.0.7")];
        let mut view = view_with(&[("a", "x1", &x, 10), ("b", "x2", &x, 20), ("c", "y1", &y, 30)]);
        view.index.upsert_claim(claim("10.96.0.7", "z.example.com", "z", 1));
        let mut alloc = Allocator::new(ranges(), Rules::default(), Duration::from_secs(60));
        let now = Instant::now();
        let preferred = VipPool::new(ranges().v4.unwrap()).preferred("x.example.com");
        let actions = plan(&mut alloc, &view, "x.example.com", now);
        assert!(actions.contains(&Action::Create { vip: preferred, hostname: "x.example.com".into(), namespace: "a".into() }));
        assert!(actions.iter().any(|a| matches!(a, Action::Refuse { object, reason: "hostname_taken", .. } if object.name == "x2")));
        let actions = plan(&mut alloc, &view, "y.example.com", now);
        assert!(
            matches!(&actions[..], [Action::Refuse { reason: "vip_taken", note, .. }] if note.contains("z.example.com")),
            "{actions:?}"
        );
        assert!(plan(&mut alloc, &view, "y.example.com", now).is_empty(), "told once");
    }

    #[test]
    fn records_of_apps_that_are_gone_are_released_after_the_grace_and_extra_ones_at_once() {
        let x = [(annotations::HOSTNAME, "x.example.com")];
        let mut view = view_with(&[("a", "x1", &x, 10)]);
        view.index.upsert_claim(claim("10.96.0.20", "x.example.com", "a", 50));
        view.index.upsert_claim(claim("10.96.0.21", "x.example.com", "a", 51));
        view.index.upsert_claim(claim("10.96.0.30", "gone.example.com", "a", 52));
        let mut alloc = Allocator::new(ranges(), Rules::default(), Duration::from_secs(60));
        let now = Instant::now();
        assert_eq!(
            plan(&mut alloc, &view, "x.example.com", now),
            [Action::Delete { name: "10.96.0.21".into(), why: "superseded" }]
        );
        assert!(plan(&mut alloc, &view, "gone.example.com", now).is_empty(), "within the grace");
        assert_eq!(alloc.next_release(), Some(now + Duration::from_secs(60)), "looked at again when it ends");
        assert!(alloc.due_releases(now).is_empty());
        assert_eq!(alloc.due_releases(now + Duration::from_secs(60)), ["gone.example.com"]);
        assert_eq!(
            plan(&mut alloc, &view, "gone.example.com", now + Duration::from_secs(61)),
            [Action::Delete { name: "10.96.0.30".into(), why: "released" }]
        );
    }

    #[test]
    fn hostname_rules_limit_who_takes_a_hostname() {
        let rules = Rules(vec!["team-a=.a.example.com".parse().unwrap(), "*=.shared.example.com".parse().unwrap()]);
        assert!(rules.allows("team-a", "web.a.example.com") && rules.allows("x", "web.shared.example.com"));
        assert!(!rules.allows("team-b", "web.a.example.com") && !rules.allows("team-a", "a.example.com"));
        let host = [(annotations::HOSTNAME, "web.a.example.com")];
        let view = view_with(&[("team-b", "p", &host, 10)]);
        let mut alloc = Allocator::new(ranges(), rules, Duration::from_secs(60));
        let actions = plan(&mut alloc, &view, "web.a.example.com", Instant::now());
        assert!(matches!(&actions[..], [Action::Refuse { reason: "not_allowed", .. }]), "{actions:?}");
        assert!("no-equals".parse::<HostnameRule>().is_err() && "a=Bad_Suffix".parse::<HostnameRule>().is_err());
    }
}
