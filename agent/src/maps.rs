//! Typed access to the pinned dataplane maps. `DataplaneMaps` is the only
//! code that writes them (the reconciler calls it); `inspect` and metrics
//! use its read methods.

use std::path::Path;

use aya::{
    Ebpf,
    maps::{Array, HashMap, IterableMap as _, Map, MapData, MapError, PerCpuArray},
};
use serviceless_common::{
    Activity, AppValue, Backend, BackendKey, Config, FlowKey, FlowValue, RevNatValue, ServiceKey,
    ServiceValue, Verdict, map_names as names,
};

/// A failed map operation, with what a person needs to act on it.
#[derive(Debug, thiserror::Error)]
pub enum MapWriteError {
    #[error("map {map} is full ({capacity} entries); raise {flag}")]
    Full { map: &'static str, capacity: u32, flag: &'static str },
    #[error("{map}: {source}")]
    Syscall { map: &'static str, source: MapError },
}

impl MapWriteError {
    pub fn map(&self) -> &'static str {
        match self {
            MapWriteError::Full { map, .. } | MapWriteError::Syscall { map, .. } => map,
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
}

pub struct DataplaneMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    apps: Array<MapData, AppValue>,
    backends: HashMap<MapData, BackendKey, Backend>,
    activity: Array<MapData, Activity>,
    flows: HashMap<MapData, FlowKey, FlowValue>,
    revnat: HashMap<MapData, FlowKey, RevNatValue>,
    verdicts: PerCpuArray<MapData, u64>,
    config: Array<MapData, Config>,
    capacity: Capacities,
}

/// Capacity of each sized map, read from the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Capacities {
    pub services: u32,
    pub apps: u32,
    pub backends: u32,
    pub flows: u32,
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
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(OpenError::Missing(name));
        Self::from_maps([
            take(names::SERVICES)?,
            take(names::APPS)?,
            take(names::BACKENDS)?,
            take(names::ACTIVITY)?,
            take(names::FLOWS)?,
            take(names::REVNAT)?,
            take(names::VERDICTS)?,
            take(names::CONFIG)?,
        ])
    }

    /// Opens the maps pinned under `dir` (works while the agent is down).
    pub fn open_pinned(dir: &Path) -> Result<Self, OpenError> {
        let open = |name: &'static str| {
            let path = dir.join(name);
            MapData::from_pin(&path).map_err(|source| OpenError::NotPinned {
                name,
                path: path.display().to_string(),
                source,
            })
        };
        Self::from_maps([
            Map::HashMap(open(names::SERVICES)?),
            Map::Array(open(names::APPS)?),
            Map::HashMap(open(names::BACKENDS)?),
            Map::Array(open(names::ACTIVITY)?),
            Map::LruHashMap(open(names::FLOWS)?),
            Map::LruHashMap(open(names::REVNAT)?),
            Map::PerCpuArray(open(names::VERDICTS)?),
            Map::Array(open(names::CONFIG)?),
        ])
    }

    fn from_maps(maps: [Map; 8]) -> Result<Self, OpenError> {
        let [services, apps, backends, activity, flows, revnat, verdicts, config] = maps;
        let services: HashMap<_, _, _> = services.try_into().map_err(layout(names::SERVICES))?;
        let apps: Array<_, _> = apps.try_into().map_err(layout(names::APPS))?;
        let backends: HashMap<_, _, _> = backends.try_into().map_err(layout(names::BACKENDS))?;
        let flows: HashMap<_, _, _> = flows.try_into().map_err(layout(names::FLOWS))?;
        let capacity = Capacities {
            services: max_entries(services.map()),
            apps: max_entries(apps.map()),
            backends: max_entries(backends.map()),
            flows: max_entries(flows.map()),
        };
        Ok(Self {
            services,
            apps,
            backends,
            activity: activity.try_into().map_err(layout(names::ACTIVITY))?,
            flows,
            revnat: revnat.try_into().map_err(layout(names::REVNAT))?,
            verdicts: verdicts.try_into().map_err(layout(names::VERDICTS))?,
            config: config.try_into().map_err(layout(names::CONFIG))?,
            capacity,
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

    /// Clears an app id's activity before the id is reused.
    pub fn reset_activity(&mut self, id: u32) -> Result<(), MapWriteError> {
        self.activity
            .set(id, Activity::default(), 0)
            .map_err(|source| MapWriteError::Syscall { map: names::ACTIVITY, source })
    }

    pub fn set_config(&mut self, config: &Config) -> Result<(), MapWriteError> {
        self.config
            .set(0, config, 0)
            .map_err(|source| MapWriteError::Syscall { map: names::CONFIG, source })
    }

    // --- reads ---

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

    pub fn activity(&self, id: u32) -> Option<Activity> {
        self.activity.get(&id, 0).ok()
    }

    pub fn flows(&self) -> impl Iterator<Item = (FlowKey, FlowValue)> + '_ {
        self.flows.iter().filter_map(Result::ok)
    }

    pub fn revnat(&self) -> impl Iterator<Item = (FlowKey, RevNatValue)> + '_ {
        self.revnat.iter().filter_map(Result::ok)
    }

    pub fn config(&self) -> Option<Config> {
        self.config.get(&0, 0).ok()
    }

    /// Packets per verdict, summed over CPUs.
    pub fn verdicts(&self) -> Vec<(Verdict, u64)> {
        Verdict::ALL
            .iter()
            .map(|v| {
                let total = self
                    .verdicts
                    .get(&(*v as u32), 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (*v, total)
            })
            .collect()
    }

    /// Kernel ids of the maps, for `bpftool map show id`.
    pub fn ids(&self) -> Vec<(&'static str, u32)> {
        let id = |m: &MapData| m.info().map(|i| i.id()).unwrap_or(0);
        vec![
            (names::SERVICES, id(self.services.map())),
            (names::APPS, id(self.apps.map())),
            (names::BACKENDS, id(self.backends.map())),
            (names::ACTIVITY, id(self.activity.map())),
            (names::FLOWS, id(self.flows.map())),
            (names::REVNAT, id(self.revnat.map())),
            (names::VERDICTS, id(self.verdicts.map())),
            (names::CONFIG, id(self.config.map())),
        ]
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
