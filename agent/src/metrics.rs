//! All metrics, registered in one place (OpenMetrics, prefix `serviceless`).
//! No per-app labels: 100k apps would explode cardinality.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
    },
    registry::Registry,
};
use serviceless_common::map_names;

use crate::maps::DataplaneMaps;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: &'static str,
}

/// Buckets from 50 us to about 30 s: sub-millisecond resolution where the
/// dataplane lives, seconds where kube-proxy lives.
fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
        1.0, 2.5, 5.0, 10.0, 30.0,
    ]
    .into_iter()
}

#[derive(Clone)]
pub struct Metrics {
    pub registry: Arc<Mutex<Registry>>,
    /// Change observed by the agent -> map written.
    pub programming_latency: Histogram,
    /// Change at its origin (Pod Ready transition) -> map written.
    pub origin_latency: Histogram,
    pub reconciles: Counter,
    pub reconcile_errors: Family<KindLabel, Counter>,
    pub map_write_errors: Family<MapLabel, Counter>,
    pub map_entries: Family<MapLabel, Gauge>,
    pub apps_programmed: Gauge,
    pub invalid_apps: Gauge,
    pub vip_collisions: Gauge,
    /// Objects declaring a hostname another namespace owns (not programmed).
    pub refused_claims: Gauge,
    /// Apps waiting for the allocator to record their VIP.
    pub apps_awaiting_vip: Gauge,
    pub source_errors: Counter,
    pub watch_restarts: Counter,
    /// Duration of one in-kernel conntrack GC pass.
    pub ct_gc_duration: Histogram,
    pub ct_gc_errors: Counter,
    /// Cold start, from the first packet to a sleeping app, to each phase.
    pub wake_phase: Family<PhaseLabel, Histogram>,
    /// Wakes by outcome (`scaled`, `already_awake`, `refused_budget`, `failed`, ...).
    pub wakes: Family<OutcomeLabel, Counter>,
    /// Sleeps by outcome.
    pub sleeps: Family<OutcomeLabel, Counter>,
    /// Scale requests that failed and were retried.
    pub scale_errors: Counter,
    /// Connections the activator holds now.
    pub held_connections: Gauge,
    /// Connections the activator took, by how they ended (`spliced`,
    /// `timeout_http_503`, `timeout_closed`, `refused_*`, `unknown_app`, ...).
    pub activator_connections: Family<OutcomeLabel, Counter>,
    /// UDP datagrams to sleeping apps dropped by the activator (the flow
    /// moves to a pod once one is ready).
    pub activator_udp_dropped: Counter,
    /// Wake signals read from the kernel's ring buffer.
    pub wake_signals: Counter,
    /// DNS queries by outcome (`answered`, `nodata`, `nxdomain`, `refused`, `rate_limited`, ...).
    pub dns_queries: Family<OutcomeLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let m = Self {
            registry: Arc::new(Mutex::new(Registry::with_prefix("serviceless"))),
            programming_latency: Histogram::new(latency_buckets()),
            origin_latency: Histogram::new(latency_buckets()),
            reconciles: Counter::default(),
            reconcile_errors: Family::default(),
            map_write_errors: Family::default(),
            map_entries: Family::default(),
            apps_programmed: Gauge::default(),
            invalid_apps: Gauge::default(),
            vip_collisions: Gauge::default(),
            refused_claims: Gauge::default(),
            apps_awaiting_vip: Gauge::default(),
            source_errors: Counter::default(),
            watch_restarts: Counter::default(),
            ct_gc_duration: Histogram::new(latency_buckets()),
            ct_gc_errors: Counter::default(),
            wake_phase: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            wakes: Family::default(),
            sleeps: Family::default(),
            scale_errors: Counter::default(),
            held_connections: Gauge::default(),
            activator_connections: Family::default(),
            activator_udp_dropped: Counter::default(),
            wake_signals: Counter::default(),
            dns_queries: Family::default(),
        };
        {
            let mut r = m.registry.lock().unwrap_or_else(|p| p.into_inner());
            r.register(
                "programming_latency_seconds",
                "Time from a desired-state change being observed to the maps being written",
                m.programming_latency.clone(),
            );
            r.register(
                "origin_to_programmed_seconds",
                "Time from a change at its origin (Pod Ready condition lastTransitionTime) to the maps being written",
                m.origin_latency.clone(),
            );
            r.register("reconciles", "Reconcile passes", m.reconciles.clone());
            r.register("reconcile_errors", "Apps a reconcile could not program, by kind", m.reconcile_errors.clone());
            r.register("map_write_errors", "Failed map writes, by map", m.map_write_errors.clone());
            r.register("map_entries", "Entries the agent keeps in each map it writes", m.map_entries.clone());
            r.register("apps_programmed", "Apps present in the maps", m.apps_programmed.clone());
            r.register("invalid_apps", "Apps rejected by validation in the current desired state", m.invalid_apps.clone());
            r.register("vip_collisions", "VIPs claimed by more than one app (sent to the activator)", m.vip_collisions.clone());
            r.register(
                "refused_claims",
                "Pods and Deployments declaring a hostname another namespace owns (not programmed)",
                m.refused_claims.clone(),
            );
            r.register("apps_awaiting_vip", "Apps whose VIP the allocator has not recorded yet", m.apps_awaiting_vip.clone());
            r.register("source_errors", "Desired-state source errors (unparsable file, API errors)", m.source_errors.clone());
            r.register("watch_restarts", "Kubernetes watch restarts", m.watch_restarts.clone());
            r.register("conntrack_gc_duration_seconds", "Duration of one in-kernel conntrack GC pass", m.ct_gc_duration.clone());
            r.register("conntrack_gc_errors", "Conntrack GC passes that failed to run", m.ct_gc_errors.clone());
            r.register(
                "wake_seconds",
                "Cold start of a sleeping app: time from its first packet to each phase (scale_accepted, pod_ready, first_byte_forwarded)",
                m.wake_phase.clone(),
            );
            r.register("wakes", "Wakes of sleeping apps, by outcome", m.wakes.clone());
            r.register("sleeps", "Idle apps put to sleep, by outcome", m.sleeps.clone());
            r.register("scale_errors", "Scale requests (wake or sleep) that failed and are retried with backoff", m.scale_errors.clone());
            r.register("activator_held_connections", "Connections the activator holds for apps that are waking", m.held_connections.clone());
            r.register("activator_connections", "Connections the activator took, by how they ended", m.activator_connections.clone());
            r.register("activator_udp_dropped", "UDP datagrams to sleeping apps dropped while they wake", m.activator_udp_dropped.clone());
            r.register("wake_signals", "Wake signals read from the kernel (first packets to sleeping apps)", m.wake_signals.clone());
            r.register("dns_queries", "DNS queries for app hostnames, by outcome", m.dns_queries.clone());
        }
        m
    }

    /// Adds the collector that reads verdict counters and map capacities
    /// from the pinned maps at scrape time.
    pub fn register_dataplane(&self, pin_dir: PathBuf) {
        let mut r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        r.register_collector(Box::new(DataplaneCollector { pin_dir }));
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        prometheus_client::encoding::text::encode(&mut out, &r)?;
        Ok(out)
    }
}

#[derive(Debug)]
struct DataplaneCollector {
    pin_dir: PathBuf,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabel {
    verdict: &'static str,
}

impl Collector for DataplaneCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // The maps are pinned, so this works whatever state the loader is in.
        let Ok(maps) = DataplaneMaps::open_pinned(&self.pin_dir) else { return Ok(()) };
        let verdicts = maps.verdicts();
        let mut family = encoder.encode_descriptor(
            "packets",
            "Packets handled by the dataplane programs, by verdict",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (verdict, count) in verdicts {
            let label = VerdictLabel { verdict: verdict.name() };
            ConstCounter::new(count).encode(family.encode_family(&label)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "conntrack_events",
            "Conntrack lifecycle events (created, expired by state, removed), by event",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (event, count) in maps.ct_events() {
            ConstCounter::new(count).encode(family.encode_family(&EventLabel { event: event.name() })?)?;
        }
        // Counted by the last GC pass in the kernel (cheap to read, seconds old at most).
        let summary = maps.ct_summary();
        let mut family = encoder.encode_descriptor(
            "conntrack_connections",
            "Tracked connections by state, as of the last GC pass",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for state in crate::inspect::CT_STATES {
            let n = summary.by_state.get(state.0 as usize).copied().unwrap_or(0);
            ConstGauge::new(n as i64).encode(family.encode_family(&StateLabel { state: state.1 })?)?;
        }
        let cap = maps.capacity();
        let mut family = encoder.encode_descriptor(
            "map_capacity",
            "Maximum entries of each sized map",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (map, n) in [
            (map_names::SERVICES, cap.services),
            (map_names::APPS, cap.apps),
            (map_names::BACKENDS, cap.backends),
            (map_names::ACTIVITY, cap.apps),
            (map_names::CONNTRACK, cap.conntrack),
            (map_names::CT_NEW, cap.ct_new),
            (map_names::FRAGMENTS, cap.fragments),
            (map_names::NODES, cap.nodes),
            (map_names::REMOTE_FLOWS, cap.remote_flows),
        ] {
            ConstGauge::new(i64::from(n)).encode(family.encode_family(&MapLabel { map: map.into() })?)?;
        }
        let mut family = encoder.encode_descriptor(
            "conntrack_entries",
            "Entries in the conntrack tables (forward and reply, both tables), as of the last GC pass",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        let entries = summary.by_state.iter().sum::<u64>() + summary.replies;
        ConstGauge::new(entries as i64).encode(family.encode_family(&MapLabel { map: map_names::CONNTRACK.into() })?)?;
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabel {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}
