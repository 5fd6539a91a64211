//! Typed access to the pinned dataplane maps. `DataplaneMaps` is the only
//! code that writes them (the reconciler calls it); `inspect` and metrics
//! use its read methods.

use std::path::Path;

use aya::{
    Ebpf,
    maps::{Array, HashMap, IterableMap as _, Map, MapData, MapError, PerCpuArray, PerCpuValues},
};
use serviceless_common::{
    Activity, AppValue, Backend, BackendKey, Config, CtEntry, CtEvent, CtKey, CtSummary, Fabric, NodeValue,
    ServiceKey, ServiceValue, SockConfig, Verdict, map_names as names,
};

/// The two conntrack tables (see `serviceless_common::conntrack`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CtTable {
    /// `svl_ct_v1`: handshake completed; never evicted.
    Established,
    /// `svl_ct_new_v1`: half-open TCP connections and UDP flows (LRU).
    New,
}

/// A failed map operation, with what a person needs to act on it.
#[derive(Debug, thiserror::Error)]
pub enum MapWriteError {
    #[error("map {map} is full ({capacity} entries); raise {flag}")]
    Full { map: &'static str, capacity: u32, flag: &'static str },
    #[error("{map}: {source}")]
    Syscall { map: &'static str, source: MapError },
    #[error("app id {id} still has entries in {map} (their delete failed); the id stays reserved until a retry removes them")]
    StillReferenced { map: &'static str, id: u32 },
}

impl MapWriteError {
    pub fn map(&self) -> &'static str {
        match self {
            MapWriteError::Full { map, .. }
            | MapWriteError::Syscall { map, .. }
            | MapWriteError::StillReferenced { map, .. } => map,
        }
    }
}

/// Why the maps could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("map {name} is not pinned at {path}: is the agent running (or has it run) with this --pin-dir?")]
    NotPinned { name: &'static str, path: String, source: MapError },
    #[error("map {name} has an unexpected type or layout: {source}")]
    Layout { name: &'static str, source: MapError },
    #[error("map {0} is missing from the eBPF object")]
    Missing(&'static str),
    #[error("map {0} is not of the kind this agent expects")]
    Kind(&'static str),
}

pub struct DataplaneMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    apps: Array<MapData, AppValue>,
    backends: HashMap<MapData, BackendKey, Backend>,
    activity: PerCpuArray<MapData, Activity>,
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    ct_new: HashMap<MapData, CtKey, CtEntry>,
    verdicts: PerCpuArray<MapData, u64>,
    ct_events: PerCpuArray<MapData, u64>,
    ct_summary: Array<MapData, CtSummary>,
    config: Array<MapData, Config>,
    nodes: Array<MapData, NodeValue>,
    fabric: Array<MapData, Fabric>,
    /// Maps the agent never reads or writes, held for `ids()`.
    remote_flows: MapData,
    fragments: MapData,
    ct_budget: MapData,
    sock_rev: MapData,
    /// Socket storage: per socket, nothing to read from here.
    sock_app: MapData,
    sock_config: Array<MapData, SockConfig>,
    sock_skip: HashMap<MapData, u64, u8>,
    capacity: Capacities,
    /// Possible CPUs: the length of every per-CPU value.
    cpus: usize,
}

/// Capacity of each sized map, read from the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Capacities {
    pub services: u32,
    pub apps: u32,
    pub backends: u32,
    /// Established-connection entries (two per connection).
    pub conntrack: u32,
    /// New-connection entries (two per connection).
    pub ct_new: u32,
    pub fragments: u32,
    pub nodes: u32,
    pub remote_flows: u32,
}

fn layout(name: &'static str) -> impl FnOnce(MapError) -> OpenError {
    move |source| OpenError::Layout { name, source }
}

fn max_entries(data: &MapData) -> u32 {
    data.info().map(|i| i.max_entries()).unwrap_or(0)
}

impl DataplaneMaps {
    /// Takes the maps out of a freshly loaded (and pinned) object.
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, OpenError> {
        let mut maps = Vec::with_capacity(names::ALL.len());
        for name in names::ALL {
            maps.push(ebpf.take_map(name).ok_or(OpenError::Missing(name))?);
        }
        Self::from_maps(maps)
    }

    /// Opens the maps pinned under `dir` (works while the agent is down).
    pub fn open_pinned(dir: &Path) -> Result<Self, OpenError> {
        let mut maps = Vec::with_capacity(names::ALL.len());
        for name in names::ALL {
            let path = dir.join(name);
            let data = MapData::from_pin(&path).map_err(|source| OpenError::NotPinned {
                name,
                path: path.display().to_string(),
                source,
            })?;
            maps.push(as_map(name, data));
        }
        Self::from_maps(maps)
    }

    /// `maps` in the order of `map_names::ALL`.
    fn from_maps(maps: Vec<Map>) -> Result<Self, OpenError> {
        let mut maps = maps.into_iter();
        let mut next = |name: &'static str| maps.next().ok_or(OpenError::Missing(name));
        let services: HashMap<_, _, _> = next(names::SERVICES)?.try_into().map_err(layout(names::SERVICES))?;
        let apps: Array<_, _> = next(names::APPS)?.try_into().map_err(layout(names::APPS))?;
        let backends: HashMap<_, _, _> = next(names::BACKENDS)?.try_into().map_err(layout(names::BACKENDS))?;
        let activity: PerCpuArray<_, _> = next(names::ACTIVITY)?.try_into().map_err(layout(names::ACTIVITY))?;
        let conntrack: HashMap<_, _, _> = next(names::CONNTRACK)?.try_into().map_err(layout(names::CONNTRACK))?;
        let ct_new: HashMap<_, _, _> = next(names::CT_NEW)?.try_into().map_err(layout(names::CT_NEW))?;
        let fragments = into_data(names::FRAGMENTS, next(names::FRAGMENTS)?)?;
        let verdicts = next(names::VERDICTS)?.try_into().map_err(layout(names::VERDICTS))?;
        let ct_events = next(names::CT_EVENTS)?.try_into().map_err(layout(names::CT_EVENTS))?;
        let ct_budget = into_data(names::CT_BUDGET, next(names::CT_BUDGET)?)?;
        let ct_summary = next(names::CT_SUMMARY)?.try_into().map_err(layout(names::CT_SUMMARY))?;
        let config = next(names::CONFIG)?.try_into().map_err(layout(names::CONFIG))?;
        let nodes: Array<_, _> = next(names::NODES)?.try_into().map_err(layout(names::NODES))?;
        let fabric = next(names::FABRIC)?.try_into().map_err(layout(names::FABRIC))?;
        let remote_flows = into_data(names::REMOTE_FLOWS, next(names::REMOTE_FLOWS)?)?;
        let sock_rev = into_data(names::SOCK_REV, next(names::SOCK_REV)?)?;
        let sock_app = into_data(names::SOCK_APP, next(names::SOCK_APP)?)?;
        let sock_config = next(names::SOCK_CONFIG)?.try_into().map_err(layout(names::SOCK_CONFIG))?;
        let sock_skip = next(names::SOCK_SKIP)?.try_into().map_err(layout(names::SOCK_SKIP))?;
        let capacity = Capacities {
            services: max_entries(services.map()),
            apps: max_entries(apps.map()),
            backends: max_entries(backends.map()),
            conntrack: max_entries(conntrack.map()),
            ct_new: max_entries(ct_new.map()),
            fragments: max_entries(&fragments),
            nodes: max_entries(nodes.map()),
            remote_flows: max_entries(&remote_flows),
        };
        Ok(Self {
            services,
            apps,
            backends,
            activity,
            conntrack,
            ct_new,
            verdicts,
            ct_events,
            ct_summary,
            config,
            nodes,
            fabric,
            remote_flows,
            fragments,
            ct_budget,
            sock_rev,
            sock_app,
            sock_config,
            sock_skip,
            capacity,
            cpus: aya::util::nr_cpus().map(|n| n.max(1)).unwrap_or(1),
        })
    }

    pub fn capacity(&self) -> Capacities {
        self.capacity
    }

    // --- writes (the reconciler is the only caller) ---

    pub fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), MapWriteError> {
        self.services
            .insert(key, value, 0)
            .map_err(|e| classify(e, names::SERVICES, self.capacity.services, "--max-services"))
    }

    pub fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapWriteError> {
        ignore_missing(self.services.remove(key), names::SERVICES)
    }

    pub fn put_app(&mut self, id: u32, value: &AppValue) -> Result<(), MapWriteError> {
        if id >= self.capacity.apps {
            return Err(MapWriteError::Full { map: names::APPS, capacity: self.capacity.apps, flag: "--max-apps" });
        }
        self.apps
            .set(id, value, 0)
            .map_err(|source| MapWriteError::Syscall { map: names::APPS, source })
    }

    pub fn put_backend(&mut self, key: &BackendKey, value: &Backend) -> Result<(), MapWriteError> {
        self.backends
            .insert(key, value, 0)
            .map_err(|e| classify(e, names::BACKENDS, self.capacity.backends, "--max-backends"))
    }

    pub fn delete_backend(&mut self, key: &BackendKey) -> Result<(), MapWriteError> {
        ignore_missing(self.backends.remove(key), names::BACKENDS)
    }

    /// Clears an app id's activity (every CPU's slot) before the id is reused.
    pub fn reset_activity(&mut self, id: u32) -> Result<(), MapWriteError> {
        self.set_activity(id, Activity::default())
    }

    /// Sets an app's activity: `total` in the first CPU's slot, zero in the others.
    pub fn set_activity(&mut self, id: u32, total: Activity) -> Result<(), MapWriteError> {
        let syscall = |source| MapWriteError::Syscall { map: names::ACTIVITY, source };
        let mut values = vec![Activity::default(); self.cpus];
        values[0] = total;
        let values = PerCpuValues::try_from(values).map_err(|e| syscall(MapError::from(e)))?;
        self.activity.set(id, values, 0).map_err(syscall)
    }

    /// Writes a conntrack entry with `BPF_*` `flags`. Only the upgrade from
    /// an earlier map layout does this; the kernel owns the tables otherwise.
    pub fn insert_conntrack(&mut self, table: CtTable, key: &CtKey, entry: &CtEntry, flags: u64) -> Result<(), MapWriteError> {
        match table {
            CtTable::Established => self
                .conntrack
                .insert(key, entry, flags)
                .map_err(|e| classify(e, names::CONNTRACK, self.capacity.conntrack, "--max-connections")),
            CtTable::New => self
                .ct_new
                .insert(key, entry, flags)
                .map_err(|e| classify(e, names::CT_NEW, self.capacity.ct_new, "--max-new-connections")),
        }
    }

    pub fn set_config(&mut self, config: &Config) -> Result<(), MapWriteError> {
        self.config
            .set(0, config, 0)
            .map_err(|source| MapWriteError::Syscall { map: names::CONFIG, source })
    }

    /// Writes node `id`'s entry (`NodeValue::default()` frees it).
    pub fn put_node(&mut self, id: u16, value: &NodeValue) -> Result<(), MapWriteError> {
        if id as u32 >= self.capacity.nodes {
            return Err(MapWriteError::Full { map: names::NODES, capacity: self.capacity.nodes, flag: "--max-nodes" });
        }
        self.nodes
            .set(id as u32, value, 0)
            .map_err(|source| MapWriteError::Syscall { map: names::NODES, source })
    }

    pub fn set_fabric(&mut self, fabric: &Fabric) -> Result<(), MapWriteError> {
        self.fabric
            .set(0, fabric, 0)
            .map_err(|source| MapWriteError::Syscall { map: names::FABRIC, source })
    }

    /// What the socket hooks skip: the cgroups first, then the flags that
    /// make the hooks look at them.
    pub fn set_socket_lb(&mut self, config: &SockConfig, skip_cgroups: &[u64]) -> Result<(), MapWriteError> {
        let stale: Vec<u64> = self.sock_skip.keys().filter_map(Result::ok).filter(|id| !skip_cgroups.contains(id)).collect();
        for id in skip_cgroups {
            self.sock_skip
                .insert(id, 1, 0)
                .map_err(|e| classify(e, names::SOCK_SKIP, serviceless_common::default_capacity::SOCK_SKIP, "fewer --socket-lb-skip-cgroup"))?;
        }
        for id in stale {
            ignore_missing(self.sock_skip.remove(&id), names::SOCK_SKIP)?;
        }
        self.sock_config
            .set(0, config, 0)
            .map_err(|source| MapWriteError::Syscall { map: names::SOCK_CONFIG, source })
    }

    // --- reads ---

    /// Node entries in use, by id.
    pub fn nodes(&self) -> impl Iterator<Item = (u16, NodeValue)> + '_ {
        (0..self.capacity.nodes.min(u16::MAX as u32 + 1)).filter_map(|id| {
            let v = self.nodes.get(&id, 0).ok()?;
            (v.flags & serviceless_common::NODE_F_PRESENT != 0).then_some((id as u16, v))
        })
    }

    pub fn node(&self, id: u16) -> Option<NodeValue> {
        self.nodes.get(&(id as u32), 0).ok().filter(|v| v.flags & serviceless_common::NODE_F_PRESENT != 0)
    }

    pub fn fabric(&self) -> Option<Fabric> {
        self.fabric.get(&0, 0).ok()
    }

    pub fn services(&self) -> impl Iterator<Item = (ServiceKey, ServiceValue)> + '_ {
        self.services.iter().filter_map(Result::ok)
    }

    pub fn app(&self, id: u32) -> Option<AppValue> {
        self.apps.get(&id, 0).ok()
    }

    pub fn backend(&self, key: &BackendKey) -> Option<Backend> {
        self.backends.get(key, 0).ok()
    }

    pub fn backends(&self) -> impl Iterator<Item = (BackendKey, Backend)> + '_ {
        self.backends.iter().filter_map(Result::ok)
    }

    /// An app's activity, summed over CPUs (the latest `last_seen_ns` wins).
    pub fn activity(&self, id: u32) -> Option<Activity> {
        let per_cpu = self.activity.get(&id, 0).ok()?;
        Some(per_cpu.iter().fold(Activity::default(), |sum, a| Activity {
            last_seen_ns: sum.last_seen_ns.max(a.last_seen_ns),
            packets: sum.packets + a.packets,
            bytes: sum.bytes + a.bytes,
        }))
    }

    /// Every conntrack entry of both tables, with the table it is in (two
    /// syscalls each: for `inspect`, not for hot loops).
    pub fn conntrack(&self) -> impl Iterator<Item = (CtTable, CtKey, CtEntry)> + '_ {
        let established = self.conntrack.iter().filter_map(Result::ok).map(|(k, v)| (CtTable::Established, k, v));
        established.chain(self.ct_new.iter().filter_map(Result::ok).map(|(k, v)| (CtTable::New, k, v)))
    }

    /// One conntrack entry, from whichever table holds it.
    pub fn conntrack_entry(&self, key: &CtKey) -> Option<(CtTable, CtEntry)> {
        if let Ok(e) = self.conntrack.get(key, 0) {
            return Some((CtTable::Established, e));
        }
        self.ct_new.get(key, 0).ok().map(|e| (CtTable::New, e))
    }

    /// What the last GC pass counted.
    pub fn ct_summary(&self) -> CtSummary {
        self.ct_summary.get(&0, 0).unwrap_or_default()
    }

    /// Conntrack lifecycle events, summed over CPUs.
    pub fn ct_events(&self) -> Vec<(CtEvent, u64)> {
        CtEvent::ALL.iter().map(|e| (*e, sum_per_cpu(&self.ct_events, *e as u32))).collect()
    }

    pub fn config(&self) -> Option<Config> {
        self.config.get(&0, 0).ok()
    }

    /// Packets per verdict, summed over CPUs.
    pub fn verdicts(&self) -> Vec<(Verdict, u64)> {
        Verdict::ALL.iter().map(|v| (*v, sum_per_cpu(&self.verdicts, *v as u32))).collect()
    }

    /// Kernel ids of the maps, for `bpftool map show id`.
    pub fn ids(&self) -> Vec<(&'static str, u32)> {
        let id = |m: &MapData| m.info().map(|i| i.id()).unwrap_or(0);
        vec![
            (names::SERVICES, id(self.services.map())),
            (names::APPS, id(self.apps.map())),
            (names::BACKENDS, id(self.backends.map())),
            (names::ACTIVITY, id(self.activity.map())),
            (names::CONNTRACK, id(self.conntrack.map())),
            (names::CT_NEW, id(self.ct_new.map())),
            (names::FRAGMENTS, id(&self.fragments)),
            (names::VERDICTS, id(self.verdicts.map())),
            (names::CT_EVENTS, id(self.ct_events.map())),
            (names::CT_BUDGET, id(&self.ct_budget)),
            (names::CT_SUMMARY, id(self.ct_summary.map())),
            (names::CONFIG, id(self.config.map())),
            (names::NODES, id(self.nodes.map())),
            (names::FABRIC, id(self.fabric.map())),
            (names::REMOTE_FLOWS, id(&self.remote_flows)),
            (names::SOCK_REV, id(&self.sock_rev)),
            (names::SOCK_APP, id(&self.sock_app)),
            (names::SOCK_CONFIG, id(self.sock_config.map())),
            (names::SOCK_SKIP, id(self.sock_skip.map())),
        ]
    }
}

fn sum_per_cpu(map: &PerCpuArray<MapData, u64>, index: u32) -> u64 {
    map.get(&index, 0).map(|per_cpu| per_cpu.iter().sum()).unwrap_or(0)
}

/// The `Map` variant a pinned map of ours is, so typed views can be made.
fn as_map(name: &str, data: MapData) -> Map {
    match name {
        names::SERVICES | names::BACKENDS | names::CONNTRACK | names::SOCK_SKIP => Map::HashMap(data),
        names::FRAGMENTS | names::CT_NEW | names::REMOTE_FLOWS | names::SOCK_REV => Map::LruHashMap(data),
        names::ACTIVITY | names::VERDICTS | names::CT_EVENTS | names::CT_BUDGET => Map::PerCpuArray(data),
        names::SOCK_APP => Map::SkStorage(data),
        _ => Map::Array(data),
    }
}

fn into_data(name: &'static str, map: Map) -> Result<MapData, OpenError> {
    match map {
        Map::Array(d) | Map::HashMap(d) | Map::LruHashMap(d) | Map::PerCpuArray(d) | Map::SkStorage(d) => Ok(d),
        _ => Err(OpenError::Kind(name)),
    }
}

fn classify(e: MapError, map: &'static str, capacity: u32, flag: &'static str) -> MapWriteError {
    if let MapError::SyscallError(ref s) = e {
        // A full hash map refuses new keys with E2BIG.
        if s.io_error.raw_os_error() == Some(libc::E2BIG) {
            return MapWriteError::Full { map, capacity, flag };
        }
    }
    MapWriteError::Syscall { map, source: e }
}

fn ignore_missing(result: Result<(), MapError>, map: &'static str) -> Result<(), MapWriteError> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(ref s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(MapWriteError::Syscall { map, source }),
    }
}
