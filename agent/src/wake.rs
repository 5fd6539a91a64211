//! Waking sleeping apps and putting idle ones to sleep.
//!
//! A wake starts at the first packet: the kernel signals it through a ring
//! buffer (see `read_signals`), and the activator asks again for every
//! connection it takes (in case a signal was lost). Requests go through a
//! bounded queue to one task that deduplicates them (one wake in flight per
//! app), charges the wake budgets (per node and per namespace: a scanner
//! sweeping sleeping VIPs must not scale them all), and scales the app from
//! 0 to 1 with retries and backoff.
//!
//! Sleeping: the sleeper reads the kernel's per-app activity counters
//! (last packet seen) and scales an app with a scaler and an idle window to
//! 0 once it has carried no packet for that long on this node and on every
//! peer (`Peers`). API writes happen only at transitions.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use backon::{ExponentialBuilder, Retryable as _};
use serviceless_common::WakeEvent;
use tokio::{io::unix::AsyncFd, sync::mpsc};
use tracing::{debug, info, warn};

use crate::{
    conntrack::monotonic_coarse_ns,
    directory::Directory,
    maps::DataplaneMaps,
    metrics::{Metrics, OutcomeLabel, PhaseLabel},
    model::AppSpec,
    peers::Peers,
    scale::{ScaleError, Scaled, Scaler},
};

/// Wake requests waiting for the waker; past this, requests are dropped
/// (counted): the kernel signals again within a second.
const QUEUE: usize = 4096;
/// How long a refused app's connections are answered at once.
const REFUSED_FOR: Duration = Duration::from_secs(10);
/// A wake whose pod never becomes ready is forgotten after this long (the
/// next packet starts another).
const WAKE_FORGOTTEN_AFTER: Duration = Duration::from_secs(300);

#[derive(Clone, Debug)]
pub struct WakeOptions {
    /// Wakes this node may start per minute.
    pub node_per_minute: u32,
    /// Wakes per namespace per minute (from this node).
    pub namespace_per_minute: u32,
    /// How long a failing scale request is retried.
    pub retry_for: Duration,
    /// Where wakes in flight are recorded, so a restarted agent does not
    /// start them again (a scale command is not a compare-and-set).
    pub journal: Option<PathBuf>,
    /// How long a wake in flight when the agent stopped keeps others from
    /// starting (the longest a scale command runs).
    pub resume_window: Duration,
}

/// What a person (and `inspect`) calls the app's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Awake,
    Waking,
    Asleep,
    /// Sleeping, and its wake was refused by a budget.
    Refused,
    /// Put to sleep; its pods are going.
    Sleeping,
}

struct Waking {
    first_packet: Instant,
    /// Forgotten (and tried again by the next packet) if no pod is ready by then.
    forget_at: Instant,
    ready_at: Option<Instant>,
    first_byte_seen: bool,
}

#[derive(Default)]
struct Shared {
    waking: HashMap<String, Waking>,
    refused: HashMap<String, Instant>,
    /// Apps put to sleep, and when (until their pods are gone).
    sleeping: HashMap<String, Instant>,
}

impl Shared {
    /// A wake is in flight (no ready pod yet).
    fn is_waking(&self, host: &str) -> bool {
        self.waking.get(host).is_some_and(|w| w.ready_at.is_none())
    }

    /// Its last wake was refused by a budget, recently.
    fn is_refused(&self, host: &str, now: Instant) -> bool {
        self.refused.get(host).is_some_and(|until| *until > now)
    }
}

/// Wakes in flight, by app: UNIX seconds when each started.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Journal {
    wakes: HashMap<String, u64>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Journal {
    fn load(path: &std::path::Path) -> Self {
        crate::files::read_json(path).ok().flatten().unwrap_or_default()
    }

    /// Best effort: without it a restart may only repeat a wake.
    fn save(&self, path: &std::path::Path) {
        if let Err(e) = crate::files::write_json(path, self) {
            debug!(error = %e, path = %path.display(), "wake journal not written");
        }
    }
}

struct Request {
    host: String,
    first_packet: Instant,
    why: &'static str,
}

/// Cheap to clone; every clone feeds the same waker task.
#[derive(Clone)]
pub struct Waker {
    tx: mpsc::Sender<Request>,
    shared: Arc<Mutex<Shared>>,
    directory: Directory,
    metrics: Metrics,
    journal: Option<PathBuf>,
}

impl Waker {
    /// Starts the waker task.
    pub fn spawn(directory: Directory, scaler: Scaler, opts: WakeOptions, metrics: Metrics) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let waker = Self { tx, shared: Arc::default(), directory, metrics, journal: opts.journal.clone() };
        waker.resume_journal(opts.resume_window);
        tokio::spawn(waker.clone().run(rx, scaler, opts));
        tokio::spawn(waker.clone().follow_readiness());
        waker
    }

    /// Wakes a previous agent started recently stay in flight: their
    /// command may still be running.
    fn resume_journal(&self, window: Duration) {
        let Some(path) = &self.journal else { return };
        let journal = Journal::load(path);
        let now = unix_now();
        let mut shared = self.lock();
        for (host, started) in journal.wakes {
            let age = Duration::from_secs(now.saturating_sub(started));
            if age < window {
                info!(app = %host, age_s = age.as_secs(), "a wake the previous agent started is still in flight; not starting it again");
                let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
                shared.waking.insert(host, Waking { first_packet: at, forget_at: Instant::now() + (window - age), ready_at: None, first_byte_seen: false });
            }
        }
        self.save_journal(&shared);
    }

    fn save_journal(&self, shared: &Shared) {
        let Some(path) = &self.journal else { return };
        let now = unix_now();
        let wakes = shared
            .waking
            .iter()
            .filter(|(_, w)| w.ready_at.is_none())
            .map(|(h, w)| (h.clone(), now.saturating_sub(w.first_packet.elapsed().as_secs())))
            .collect();
        Journal { wakes }.save(path);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks for `host` to be woken (never blocks; duplicates are free).
    pub fn request(&self, host: &str, first_packet: Instant, why: &'static str) {
        let request = Request { host: host.to_string(), first_packet, why };
        if self.tx.try_send(request).is_err() {
            self.metrics.wakes.get_or_create(&OutcomeLabel { outcome: "dropped_queue_full" }).inc();
        }
    }

    /// Whether the app's wake was refused (its held connections are answered now).
    pub fn refused(&self, host: &str) -> bool {
        self.lock().is_refused(host, Instant::now())
    }

    /// Records the first byte a held connection forwarded to a woken pod.
    pub fn forwarded(&self, host: &str) {
        let mut shared = self.lock();
        if let Some(w) = shared.waking.get_mut(host)
            && !w.first_byte_seen
        {
            w.first_byte_seen = true;
            let took = w.first_packet.elapsed();
            self.metrics.wake_phase.get_or_create(&PhaseLabel { phase: "first_byte_forwarded" }).observe(took.as_secs_f64());
            info!(app = host, first_packet_to_first_byte_ms = took.as_secs_f64() * 1e3, "woken app served its first held connection");
        }
    }

    pub fn phase(&self, app: &AppSpec) -> Phase {
        let shared = self.lock();
        if app.has_ready_pod() {
            return if shared.sleeping.contains_key(&app.hostname) { Phase::Sleeping } else { Phase::Awake };
        }
        if shared.is_waking(&app.hostname) {
            Phase::Waking
        } else if shared.is_refused(&app.hostname, Instant::now()) {
            Phase::Refused
        } else {
            Phase::Asleep
        }
    }

    fn is_waking(&self, host: &str) -> bool {
        self.lock().is_waking(host)
    }

    async fn run(self, mut rx: mpsc::Receiver<Request>, scaler: Scaler, opts: WakeOptions) {
        let mut budgets = Budgets::new(opts.node_per_minute, opts.namespace_per_minute);
        while let Some(req) = rx.recv().await {
            let Some(app) = self.directory.get(&req.host) else { continue };
            if app.has_ready_pod() || self.is_waking(&req.host) {
                continue;
            }
            let Some(target) = app.lifecycle.scaler.as_ref() else {
                debug!(app = %req.host, "no ready pod and no scaler: held connections wait for pods to appear");
                continue;
            };
            let now = Instant::now();
            if let Err(which) = budgets.admit(target.namespace(), now) {
                self.metrics.wakes.get_or_create(&OutcomeLabel { outcome: which }).inc();
                self.lock().refused.insert(req.host.clone(), now + REFUSED_FOR);
                self.directory.touch();
                debug!(app = %req.host, namespace = target.namespace(), outcome = which, "wake refused: budget spent");
                continue;
            }
            {
                let mut shared = self.lock();
                shared.refused.remove(&req.host);
                shared.sleeping.remove(&req.host);
                shared.waking.insert(
                    req.host.clone(),
                    Waking { first_packet: req.first_packet, forget_at: now + WAKE_FORGOTTEN_AFTER, ready_at: None, first_byte_seen: false },
                );
                self.save_journal(&shared);
            }
            info!(app = %req.host, why = req.why, "waking app: scaling 0 -> 1");
            tokio::spawn(self.clone().scale_up(app, scaler.clone(), opts.retry_for, req.first_packet));
        }
    }

    async fn scale_up(self, app: Arc<AppSpec>, scaler: Scaler, retry_for: Duration, first_packet: Instant) {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times()
            .with_total_delay(Some(retry_for));
        let result = (|| scaler.scale(&app, 1))
            .retry(backoff)
            .when(|e| !matches!(e, ScaleError::NoTarget | ScaleError::NoClient(_)))
            .notify(|e, delay| {
                self.metrics.scale_errors.inc();
                warn!(app = %app.hostname, error = %e, retry_in_ms = delay.as_millis() as u64, "wake: scale request failed; retrying");
            })
            .await;
        let took = first_packet.elapsed();
        match result {
            Ok(scaled) => {
                let outcome = if scaled == Scaled::Changed { "scaled" } else { "already_awake" };
                self.metrics.wakes.get_or_create(&OutcomeLabel { outcome }).inc();
                self.metrics.wake_phase.get_or_create(&PhaseLabel { phase: "scale_accepted" }).observe(took.as_secs_f64());
                info!(app = %app.hostname, outcome, first_packet_to_accepted_ms = took.as_secs_f64() * 1e3, "wake: scale request accepted");
            }
            Err(e) => {
                self.metrics.wakes.get_or_create(&OutcomeLabel { outcome: "failed" }).inc();
                warn!(app = %app.hostname, error = %e, "wake failed; the next packet to the app tries again");
                let mut shared = self.lock();
                shared.waking.remove(&app.hostname);
                self.save_journal(&shared);
            }
        }
    }

    /// Notes when waking apps get a ready pod, and forgets old wakes.
    async fn follow_readiness(self) {
        let mut changes = self.directory.subscribe();
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            let mut shared = self.lock();
            let before = shared.waking.values().filter(|w| w.ready_at.is_none()).count();
            let hosts: Vec<String> = shared.waking.keys().cloned().collect();
            for host in hosts {
                let ready = self.directory.get(&host).is_some_and(|a| a.has_ready_pod());
                let Some(w) = shared.waking.get_mut(&host) else { continue };
                if ready && w.ready_at.is_none() {
                    w.ready_at = Some(now);
                    let took = w.first_packet.elapsed();
                    self.metrics.wake_phase.get_or_create(&PhaseLabel { phase: "pod_ready" }).observe(took.as_secs_f64());
                    info!(app = %host, first_packet_to_ready_ms = took.as_secs_f64() * 1e3, "app awake: a pod is ready");
                }
                let done = match w.ready_at {
                    Some(at) => now - at > Duration::from_secs(60),
                    None => now > w.forget_at,
                };
                if done {
                    if w.ready_at.is_none() {
                        self.metrics.wakes.get_or_create(&OutcomeLabel { outcome: "never_ready" }).inc();
                        warn!(app = %host, "woken app has no ready pod yet; the next packet tries again");
                    }
                    shared.waking.remove(&host);
                }
            }
            if shared.waking.values().filter(|w| w.ready_at.is_none()).count() != before {
                self.save_journal(&shared);
            }
            shared.refused.retain(|_, until| *until > now);
            // An app put to sleep is awake again once someone wakes it; its
            // mark goes when its pods are gone.
            let directory = &self.directory;
            shared.sleeping.retain(|host, _| directory.get(host).is_some_and(|a| a.has_ready_pod()));
        }
    }

    /// Marks an app put to sleep.
    fn slept(&self, host: &str) {
        self.lock().sleeping.insert(host.to_string(), Instant::now());
    }

    fn sleep_pending(&self, host: &str) -> bool {
        self.lock().sleeping.get(host).is_some_and(|at| at.elapsed() < Duration::from_secs(60))
    }
}

/// The wake budgets: one for the node, one per namespace (Kubernetes; the
/// file source's apps have none).
struct Budgets {
    node: Budget,
    per_namespace: u32,
    namespaces: HashMap<String, Budget>,
}

impl Budgets {
    fn new(node_per_minute: u32, namespace_per_minute: u32) -> Self {
        Self { node: Budget::per_minute(node_per_minute), per_namespace: namespace_per_minute, namespaces: HashMap::new() }
    }

    /// Takes one wake from every budget that applies, or names the one spent.
    fn admit(&mut self, namespace: &str, now: Instant) -> Result<(), &'static str> {
        if !self.node.available(now) {
            return Err("refused_node_budget");
        }
        if !namespace.is_empty() {
            let per = self.per_namespace;
            let ns = self.namespaces.entry(namespace.to_string()).or_insert_with(|| Budget::per_minute(per));
            if !ns.available(now) {
                return Err("refused_namespace_budget");
            }
            ns.take(now);
        }
        self.node.take(now);
        Ok(())
    }
}

/// A token bucket refilled continuously: `per_minute` wakes a minute, in
/// bursts of up to `per_minute`.
struct Budget {
    capacity: f64,
    tokens: f64,
    per_sec: f64,
    at: Instant,
}

impl Budget {
    fn per_minute(n: u32) -> Self {
        let capacity = f64::from(n);
        Self { capacity, tokens: capacity, per_sec: capacity / 60.0, at: Instant::now() }
    }

    fn refill(&mut self, now: Instant) {
        self.tokens = (self.tokens + (now - self.at).as_secs_f64() * self.per_sec).min(self.capacity);
        self.at = now;
    }

    fn available(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= 1.0
    }

    fn take(&mut self, now: Instant) {
        self.refill(now);
        self.tokens -= 1.0;
    }
}

/// Reads the kernel's wake signals (first packets to sleeping apps).
pub async fn read_signals(ring: RingBuf<MapData>, directory: Directory, waker: Waker, metrics: Metrics) {
    #[expect(deprecated, reason = "the replacement API is not in this tokio release yet")]
    let mut fd = match AsyncFd::new(ring) {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "wake signals unavailable; apps wake when the activator takes their first connection");
            return;
        }
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else { return };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() < size_of::<WakeEvent>() {
                continue;
            }
            // SAFETY: the kernel wrote a whole WakeEvent (checked length; read unaligned).
            let event: WakeEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            metrics.wake_signals.inc();
            let Some(app) = directory.by_id(event.app_id) else { continue };
            // The packet's time, in this process's clock.
            let age = Duration::from_nanos(monotonic_coarse_ns().saturating_sub(event.at_ns));
            let first_packet = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            waker.request(&app.hostname, first_packet, "first packet");
        }
        guard.clear_ready();
    }
}

/// After a restart: connections the activator held when the previous agent
/// stopped died with it, but their apps may still need waking (the clients
/// retry). Wakes every app that has a young activator connection in
/// conntrack and no ready pod, once the first full reconcile is in.
pub async fn resume_held(maps: Arc<DataplaneMaps>, directory: Directory, waker: Waker) {
    let mut changes = directory.subscribe();
    if changes.changed().await.is_err() {
        return;
    }
    let now = monotonic_coarse_ns();
    let ids: std::collections::BTreeSet<u32> = tokio::task::block_in_place(|| {
        maps.conntrack()
            .filter(|(_, k, e)| {
                k.dir == serviceless_common::CT_DIR_FORWARD
                    && e.kind == serviceless_common::CT_KIND_ACTIVATOR
                    && e.app_id != u32::MAX
                    && now.saturating_sub(e.last_seen_ns) < 60_000_000_000
            })
            .map(|(_, _, e)| e.app_id)
            .collect()
    });
    for id in ids {
        if let Some(app) = directory.by_id(id) {
            waker.request(&app.hostname, Instant::now(), "held before a restart");
        }
    }
}

/// An app's scale-to-zero state, as `inspect` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AppStatus {
    pub state: Phase,
    /// Connections the activator holds for it.
    pub held: usize,
}

/// Where `inspect` finds each app's state: next to `--state-file`.
pub fn status_path(state_file: &std::path::Path) -> PathBuf {
    state_file.with_extension("lifecycle.json")
}

/// Writes the state of every app in transition (waking, refused, put to
/// sleep, or holding connections) for `inspect`, when it changes (checked
/// every second). The others are awake or asleep, which `inspect` reads
/// from the maps: the cost follows the apps in transition, not all apps.
pub async fn publish_status(path: PathBuf, directory: Directory, waker: Waker, held: crate::activator::HeldCounts) {
    let mut last: Option<HashMap<String, AppStatus>> = None;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let notable: std::collections::BTreeSet<String> = {
            let shared = waker.lock();
            shared.waking.keys().chain(shared.refused.keys()).chain(shared.sleeping.keys()).cloned().collect()
        };
        let now: HashMap<String, AppStatus> = notable
            .into_iter()
            .chain(held.apps())
            .filter_map(|host| {
                let app = directory.get(&host)?;
                Some((host.clone(), AppStatus { state: waker.phase(&app), held: held.of(&host) }))
            })
            .collect();
        if last.as_ref() == Some(&now) {
            continue;
        }
        if let Err(e) = crate::files::write_json(&path, &now) {
            debug!(error = %e, path = %path.display(), "app states for inspect not written");
        }
        last = Some(now);
    }
}

/// How often the sleeper looks, for the shortest idle window it serves.
fn check_interval(shortest: Option<Duration>) -> Duration {
    shortest.map_or(Duration::from_secs(30), |d| d / 4).clamp(Duration::from_millis(500), Duration::from_secs(30))
}

/// Puts idle apps to sleep.
pub async fn run_sleeper(
    maps: Arc<DataplaneMaps>,
    directory: Directory,
    waker: Waker,
    scaler: Scaler,
    peers: Peers,
    held: crate::activator::HeldCounts,
    metrics: Metrics,
) {
    // When each app was first seen awake by this agent: an app nobody sent
    // a packet yet is idle from then, not from the epoch.
    let mut awake_since: HashMap<String, u64> = HashMap::new();
    let mut interval = Duration::from_secs(1);
    loop {
        tokio::time::sleep(interval).await;
        let apps = directory.all();
        interval = check_interval(apps.iter().filter_map(|(a, _)| a.lifecycle.idle_after).min());
        let now = monotonic_coarse_ns();
        let mut candidates = Vec::new();
        for (app, id) in &apps {
            let (Some(idle_after), Some(_), Some(id)) = (app.lifecycle.idle_after, &app.lifecycle.scaler, id) else { continue };
            if !app.has_ready_pod() {
                awake_since.remove(&app.hostname);
                continue;
            }
            let since = *awake_since.entry(app.hostname.clone()).or_insert(now);
            let last = maps.activity(*id).map_or(0, |a| a.last_seen_ns).max(since);
            let idle = Duration::from_nanos(now.saturating_sub(last));
            if idle >= idle_after && held.of(&app.hostname) == 0 && !waker.sleep_pending(&app.hostname) && !waker.is_waking(&app.hostname) {
                candidates.push((app.clone(), idle));
            }
        }
        let present: std::collections::HashSet<&str> = apps.iter().map(|(a, _)| a.hostname.as_str()).collect();
        awake_since.retain(|h, _| present.contains(h.as_str()));
        if candidates.is_empty() {
            continue;
        }
        if !peers.decides() {
            continue;
        }
        // Every peer must have seen the app idle as long.
        let remote = peers.idle_times().await;
        for (app, idle) in candidates {
            let idle_after = app.lifecycle.idle_after.unwrap_or_default();
            let remote_idle = match &remote {
                Ok(r) => r.idle(&app.hostname),
                Err(e) => {
                    debug!(error = %e, "peers not all reachable: nothing is put to sleep this round");
                    break;
                }
            };
            if remote_idle.is_some_and(|r| r < idle_after) {
                continue;
            }
            waker.slept(&app.hostname);
            match scaler.scale(&app, 0).await {
                Ok(_) => {
                    metrics.sleeps.get_or_create(&OutcomeLabel { outcome: "scaled" }).inc();
                    info!(app = %app.hostname, idle_s = idle.as_secs_f64(), window_s = idle_after.as_secs_f64(), "idle app put to sleep: scaled to 0");
                }
                Err(e) => {
                    metrics.sleeps.get_or_create(&OutcomeLabel { outcome: "failed" }).inc();
                    metrics.scale_errors.inc();
                    warn!(app = %app.hostname, error = %e, "putting an idle app to sleep failed; retried next round");
                    waker.lock().sleeping.remove(&app.hostname);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_allow_a_burst_then_refill_over_the_minute() {
        let mut b = Budget::per_minute(3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(b.available(t0));
            b.take(t0);
        }
        assert!(!b.available(t0), "burst spent");
        assert!(!b.available(t0 + Duration::from_secs(10)), "one token takes 20 s");
        assert!(b.available(t0 + Duration::from_secs(21)));
    }

    #[test]
    fn a_namespace_spends_its_own_budget_and_the_node_budget_caps_all() {
        let mut b = Budgets::new(5, 2);
        let t = Instant::now();
        assert_eq!(b.admit("a", t), Ok(()));
        assert_eq!(b.admit("a", t), Ok(()));
        assert_eq!(b.admit("a", t), Err("refused_namespace_budget"));
        assert_eq!(b.admit("b", t), Ok(()), "other namespaces are not charged");
        assert_eq!(b.admit("", t), Ok(()), "apps without a namespace (file source) only count for the node");
        assert_eq!(b.admit("", t), Ok(()));
        assert_eq!(b.admit("c", t), Err("refused_node_budget"), "5 wakes: the node's budget is spent");
    }

    #[test]
    fn the_sleeper_looks_often_enough_for_short_windows() {
        assert_eq!(check_interval(Some(Duration::from_secs(4))), Duration::from_secs(1));
        assert_eq!(check_interval(Some(Duration::from_secs(900))), Duration::from_secs(30));
        assert_eq!(check_interval(None), Duration::from_secs(30));
        assert_eq!(check_interval(Some(Duration::from_millis(100))), Duration::from_millis(500));
    }
}
