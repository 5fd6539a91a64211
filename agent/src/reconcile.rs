//! The reconciler: diffs desired state against what the maps hold and writes
//! only the difference. It keeps a mirror of every entry it wrote (it is the
//! only writer), rebuilt from the pinned maps when the agent starts, so a
//! diff never needs to read the kernel.
//!
//! Write order keeps every intermediate state safe for the packets reading
//! the maps concurrently: an app's backends are written before its count
//! grows, its count shrinks before slots are deleted, its VIP entries appear
//! after its backends and disappear before them.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    time::{Instant, SystemTime},
};

use serviceless_common::{
    AppValue, BACKEND_DRAINING, BACKEND_READY, Backend, BackendKey, HOSTNAME_LEN,
    NODE_LOCAL, SERVICE_F_ACTIVATOR_ONLY, ServiceKey, ServiceValue, hash::name_hash, map_names,
};
use tracing::{debug, error, warn};

use crate::{
    maps::{DataplaneMaps, MapWriteError},
    metrics::{KindLabel, MapLabel, Metrics},
    model::{AppSpec, BackendSpec, PortSpec, Protocol, from_addr, to_addr},
    nodes::Nodes,
    source::Batch,
};

/// What the maps hold for one app.
#[derive(Clone, Debug)]
struct Programmed {
    id: u32,
    vip: IpAddr,
    ports: Vec<PortSpec>,
    /// The `svl_apps_v1` entry.
    value: AppValue,
    /// Contents of slots 0.. in `svl_backends_v1` (may run past the count
    /// after a failed write; those slots are invisible to the kernel).
    slots: Vec<Backend>,
    /// Pod names per slot, for `inspect`.
    sources: Vec<Option<String>>,
}

/// App ids index the array maps; freed ids are reused lowest first.
#[derive(Debug, Default)]
struct Ids {
    next: u32,
    free: BTreeSet<u32>,
    max: u32,
}

impl Ids {
    fn alloc(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        (self.next < self.max).then(|| {
            self.next += 1;
            self.next - 1
        })
    }

    fn release(&mut self, id: u32) {
        self.free.insert(id);
    }
}

/// Result of one reconcile pass.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Apps written (or removed) successfully.
    pub programmed: usize,
    /// Apps that failed and should be retried.
    pub failed: Vec<String>,
}

/// A VIP claimed by several apps.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Collision {
    pub vip: IpAddr,
    pub hostnames: Vec<String>,
}

pub struct Reconciler {
    maps: DataplaneMaps,
    apps: HashMap<String, Programmed>,
    services: BTreeMap<ServiceKey, ServiceValue>,
    /// Desired: VIP -> hostnames claiming it.
    vip_claims: HashMap<IpAddr, BTreeSet<String>>,
    /// Desired: hostname -> VIP.
    desired_vip: HashMap<String, IpAddr>,
    /// Desired ports of apps, kept to build VIP entries.
    desired_ports: HashMap<String, Vec<PortSpec>>,
    ids: Ids,
    nodes: Nodes,
    metrics: Metrics,
    collisions: BTreeMap<IpAddr, Vec<String>>,
    /// Slots in `svl_backends_v1`, kept as a count so gauges stay O(1) per change.
    backend_slots: usize,
    /// VIP entries per app id (in `services`), so removing an app can tell
    /// in O(1) whether any still names its id.
    service_refs: HashMap<u32, usize>,
}

impl Reconciler {
    /// Adopts whatever the maps already hold (from an earlier agent run)
    /// without changing it; the first full batch then diffs against it.
    pub fn adopt(maps: DataplaneMaps, metrics: Metrics, own_addrs: HashSet<IpAddr>) -> Self {
        let services: BTreeMap<_, _> = maps.services().collect();
        let mut ids_in_use: BTreeSet<u32> = services.values().map(|v| v.app_id).collect();
        let mut slots: HashMap<u32, BTreeMap<u32, Backend>> = HashMap::new();
        for (key, backend) in maps.backends() {
            ids_in_use.insert(key.app_id);
            slots.entry(key.app_id).or_default().insert(key.slot, backend);
        }
        let mut apps = HashMap::new();
        for &id in &ids_in_use {
            let Some(value) = maps.app(id) else { continue };
            let ports: Vec<PortSpec> = services
                .iter()
                .filter(|(_, v)| v.app_id == id)
                .filter_map(|(k, v)| {
                    Some(PortSpec {
                        port: u16::from_be(k.port),
                        target_port: u16::from_be(v.target_port),
                        protocol: Protocol::from_ip_proto(k.proto)?,
                    })
                })
                .collect();
            let vip = services
                .iter()
                .find(|(_, v)| v.app_id == id)
                .map(|(k, _)| from_addr(&k.vip))
                .unwrap_or(IpAddr::from([0, 0, 0, 0]));
            let app_slots: Vec<Backend> =
                slots.remove(&id).map(|s| s.into_values().collect()).unwrap_or_default();
            let sources = vec![None; app_slots.len()];
            let programmed = Programmed { id, vip, ports, value, slots: app_slots, sources };
            // Keyed by the exact hostname when the map holds all of it, else
            // by a placeholder the first batch renames (see `adopted_key`);
            // a duplicate becomes an orphan, removed by the first full batch.
            let mut key = adopted_key(&value);
            if apps.contains_key(&key) {
                key = format!("\0orphan:{id}");
            }
            apps.insert(key, programmed);
        }
        let nodes = Nodes::adopt(&maps, own_addrs, apps.values().flat_map(|p| p.slots.iter().map(|b| b.node)));
        let cap = maps.capacity();
        let mut ids = Ids { next: 0, free: BTreeSet::new(), max: cap.apps };
        let used: HashSet<u32> = apps.values().map(|p| p.id).collect();
        if let Some(&top) = used.iter().max() {
            ids.next = top + 1;
            ids.free = (0..top).filter(|i| !used.contains(i)).collect();
        }
        let mut reconciler = Self {
            maps,
            apps,
            services,
            vip_claims: HashMap::new(),
            desired_vip: HashMap::new(),
            desired_ports: HashMap::new(),
            ids,
            nodes,
            metrics,
            collisions: BTreeMap::new(),
            backend_slots: 0,
            service_refs: HashMap::new(),
        };
        for v in reconciler.services.values() {
            *reconciler.service_refs.entry(v.app_id).or_default() += 1;
        }
        reconciler.backend_slots = reconciler.apps.values().map(|p| p.slots.len()).sum();
        // Programmed apps count as desired until the first full batch says otherwise.
        for (host, p) in &reconciler.apps {
            reconciler.vip_claims.entry(p.vip).or_default().insert(host.clone());
            reconciler.desired_vip.insert(host.clone(), p.vip);
            reconciler.desired_ports.insert(host.clone(), p.ports.clone());
        }
        reconciler.update_gauges();
        reconciler
    }

    pub fn maps(&self) -> &DataplaneMaps {
        &self.maps
    }

    /// Writes this node's fabric entry.
    pub fn set_fabric(&mut self, fabric: &serviceless_common::Fabric) -> Result<(), MapWriteError> {
        self.maps.set_fabric(fabric)
    }

    /// Writes the dataplane configuration entry.
    pub fn set_config(&mut self, config: &serviceless_common::Config) -> Result<(), MapWriteError> {
        self.maps.set_config(config)
    }

    pub fn collisions(&self) -> Vec<Collision> {
        self.collisions
            .iter()
            .map(|(vip, hostnames)| Collision { vip: *vip, hostnames: hostnames.clone() })
            .collect()
    }

    /// Addresses of the other nodes backends are on, sorted.
    pub fn remote_nodes(&self) -> Vec<IpAddr> {
        let mut nodes = self.nodes.remote();
        nodes.sort();
        nodes
    }

    /// The address of node `id` (`None` for this node).
    pub fn node_addr(&self, id: u16) -> Option<IpAddr> {
        self.nodes.addr(id)
    }

    /// The kernel's id of a programmed app.
    pub fn app_id(&self, host: &str) -> Option<u32> {
        self.apps.get(host).map(|p| p.id)
    }

    pub fn app_count(&self) -> usize {
        self.apps.len()
    }

    /// Applies one batch of changes.
    pub fn apply(&mut self, batch: Batch) -> Outcome {
        self.metrics.reconciles.inc();
        for (host, _, _) in &batch.changed {
            self.claim_adopted(host);
        }
        let mut work = batch.changed;
        if let Some(observed) = batch.full {
            let present: HashSet<&String> = work.iter().map(|(h, _, _)| h).collect();
            let gone: Vec<String> = self
                .apps
                .keys()
                .chain(self.desired_vip.keys())
                .filter(|h| !present.contains(h))
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            work.extend(gone.into_iter().map(|h| (h, None, observed)));
        }

        // Update the desired VIP claims; every VIP touched is re-diffed.
        let mut vips: BTreeSet<IpAddr> = BTreeSet::new();
        for (host, spec, _) in &work {
            if let Some(old) = self.desired_vip.remove(host) {
                if let Some(claims) = self.vip_claims.get_mut(&old) {
                    claims.remove(host);
                    if claims.is_empty() {
                        self.vip_claims.remove(&old);
                    }
                }
                vips.insert(old);
            }
            self.desired_ports.remove(host);
            if let Some(spec) = spec {
                self.desired_vip.insert(host.clone(), spec.vip);
                self.desired_ports.insert(host.clone(), spec.ports.clone());
                self.vip_claims.entry(spec.vip).or_default().insert(host.clone());
                vips.insert(spec.vip);
            }
            if let Some(p) = self.apps.get(host) {
                vips.insert(p.vip);
            }
        }

        let mut outcome = Outcome::default();
        let mut done: Vec<(String, crate::source::Observed)> = Vec::new();
        // 1. Apps that exist: backends, then the app entry.
        for (host, spec, observed) in &work {
            let Some(spec) = spec else { continue };
            match self.write_app(spec) {
                Ok(()) => done.push((host.clone(), *observed)),
                Err(e) => self.failed(host, &e, &mut outcome),
            }
        }
        // 2. VIP entries for every VIP touched.
        for vip in vips {
            if let Err((host, e)) = self.write_vip(vip) {
                self.failed(&host, &e, &mut outcome);
            }
        }
        // 3. Apps that are gone: after their VIP entries.
        for (host, spec, observed) in &work {
            if spec.is_some() || !self.apps.contains_key(host) {
                continue;
            }
            match self.remove_app(host) {
                Ok(()) => done.push((host.clone(), *observed)),
                Err(e) => self.failed(host, &e, &mut outcome),
            }
        }

        let now = Instant::now();
        let wall = SystemTime::now();
        for (host, observed) in &done {
            if outcome.failed.contains(host) {
                continue;
            }
            outcome.programmed += 1;
            self.metrics.programming_latency.observe(now.duration_since(observed.at).as_secs_f64());
            if let Some(origin) = observed.origin {
                let secs = wall.duration_since(origin).map(|d| d.as_secs_f64()).unwrap_or(0.0);
                self.metrics.origin_latency.observe(secs);
            }
        }
        self.nodes.sweep(&mut self.maps);
        self.update_gauges();
        outcome
    }

    /// An app adopted under a placeholder (its hostname was too long for
    /// the map) takes its real name once the source names it.
    fn claim_adopted(&mut self, host: &str) {
        if self.apps.contains_key(host) {
            return;
        }
        let placeholder = placeholder_key(host);
        let Some(p) = self.apps.remove(&placeholder) else { return };
        debug!(app = host, id = p.id, "adopted app matched by its name hash");
        if let Some(claims) = self.vip_claims.get_mut(&p.vip)
            && claims.remove(&placeholder)
        {
            claims.insert(host.to_string());
        }
        if let Some(vip) = self.desired_vip.remove(&placeholder) {
            self.desired_vip.insert(host.to_string(), vip);
        }
        if let Some(ports) = self.desired_ports.remove(&placeholder) {
            self.desired_ports.insert(host.to_string(), ports);
        }
        self.apps.insert(host.to_string(), p);
    }

    fn failed(&mut self, host: &str, e: &MapWriteError, outcome: &mut Outcome) {
        error!(app = host, error = %e, "app not programmed; other apps are unaffected, will retry");
        self.metrics.map_write_errors.get_or_create(&MapLabel { map: e.map().into() }).inc();
        let kind = match e {
            MapWriteError::Full { .. } => "map_full",
            MapWriteError::Syscall { .. } => "syscall",
            MapWriteError::StillReferenced { .. } => "still_referenced",
        };
        self.metrics.reconcile_errors.get_or_create(&KindLabel { kind: kind.into() }).inc();
        if !outcome.failed.iter().any(|h| h == host) {
            outcome.failed.push(host.to_string());
        }
    }

    fn write_app(&mut self, spec: &AppSpec) -> Result<(), MapWriteError> {
        let (id, is_new) = match self.apps.get(&spec.hostname) {
            Some(p) => (p.id, false),
            None => {
                let id = self.ids.alloc().ok_or(MapWriteError::Full {
                    map: map_names::APPS,
                    capacity: self.maps.capacity().apps,
                    flag: "--max-apps",
                })?;
                (id, true)
            }
        };
        if is_new {
            // The id may have served another app before: start from zero.
            if let Err(e) = self.maps.reset_activity(id) {
                self.ids.release(id);
                return Err(e);
            }
            self.apps.insert(
                spec.hostname.clone(),
                Programmed {
                    id,
                    vip: spec.vip,
                    ports: spec.ports.clone(),
                    value: AppValue::default(),
                    slots: Vec::new(),
                    sources: Vec::new(),
                },
            );
        }
        let mut node_ids = HashMap::new();
        for b in &spec.backends {
            if let Some(node) = b.node
                && !node_ids.contains_key(&node)
            {
                match self.nodes.id(&mut self.maps, Some(node)) {
                    Ok(id) => drop(node_ids.insert(node, id)),
                    Err(e) => {
                        self.forget_if_unwritten(&spec.hostname, id, is_new);
                        return Err(e);
                    }
                }
            }
        }
        let (target, sources) = {
            let current = &self.apps[&spec.hostname];
            let visible = &current.slots[..current.value.backend_count as usize];
            plan_backends(visible, &spec.backends, &node_ids)
        };
        let mut value = AppValue {
            backend_count: target.len() as u32,
            ready_count: target.iter().filter(|b| b.state == BACKEND_READY).count() as u32,
            name_hash: name_hash(spec.hostname.as_bytes()),
            hostname: [0; HOSTNAME_LEN],
        };
        set_hostname(&mut value.hostname, &spec.hostname);

        let result = self.write_slots_and_value(&spec.hostname, id, &target, &value);
        let p = self.apps.get_mut(&spec.hostname).expect("inserted above");
        p.vip = spec.vip;
        p.ports = spec.ports.clone();
        p.sources = sources;
        p.sources.resize(p.slots.len(), None);
        if let Err(e) = result {
            self.forget_if_unwritten(&spec.hostname, id, is_new);
            return Err(e);
        }
        Ok(())
    }

    /// A new app of which nothing reached the kernel is forgotten entirely.
    fn forget_if_unwritten(&mut self, host: &str, id: u32, is_new: bool) {
        if is_new && self.apps.get(host).is_some_and(|p| p.value.backend_count == 0 && p.slots.is_empty()) {
            self.apps.remove(host);
            self.ids.release(id);
        }
    }

    /// Slots first (invisible past the current count), then the count, then
    /// deletes the slots past the new count.
    fn write_slots_and_value(
        &mut self,
        host: &str,
        id: u32,
        target: &[Backend],
        value: &AppValue,
    ) -> Result<(), MapWriteError> {
        let p = self.apps.get_mut(host).expect("caller inserted");
        for (slot, backend) in target.iter().enumerate() {
            if p.slots.get(slot) == Some(backend) {
                continue;
            }
            self.maps.put_backend(&BackendKey { app_id: id, slot: slot as u32 }, backend)?;
            self.nodes.referenced(backend.node);
            if slot < p.slots.len() {
                self.nodes.released(p.slots[slot].node);
                p.slots[slot] = *backend;
            } else {
                p.slots.push(*backend);
                self.backend_slots += 1;
            }
        }
        if p.value != *value {
            self.maps.put_app(id, value)?;
            p.value = *value;
        }
        while p.slots.len() > target.len() {
            let slot = p.slots.len() - 1;
            self.maps.delete_backend(&BackendKey { app_id: id, slot: slot as u32 })?;
            if let Some(gone) = p.slots.pop() {
                self.nodes.released(gone.node);
            }
            self.backend_slots -= 1;
        }
        Ok(())
    }

    /// Makes the VIP's entries match the apps claiming it.
    fn write_vip(&mut self, vip: IpAddr) -> Result<(), (String, MapWriteError)> {
        let claims: Vec<String> = self
            .vip_claims
            .get(&vip)
            .map(|c| c.iter().filter(|h| self.apps.contains_key(*h)).cloned().collect())
            .unwrap_or_default();
        let contested = claims.len() > 1;
        if contested {
            if self.collisions.get(&vip) != Some(&claims) {
                warn!(%vip, apps = ?claims, "VIP claimed by several apps: its traffic goes to the activator");
            }
            self.collisions.insert(vip, claims.clone());
        } else {
            self.collisions.remove(&vip);
        }
        let mut want: BTreeMap<ServiceKey, (ServiceValue, String)> = BTreeMap::new();
        for host in &claims {
            let id = self.apps[host].id;
            for port in self.desired_ports.get(host).into_iter().flatten() {
                let key = service_key(vip, port);
                let value = ServiceValue {
                    app_id: id,
                    target_port: port.target_port.to_be(),
                    flags: if contested { SERVICE_F_ACTIVATOR_ONLY } else { 0 },
                };
                // Sorted claims: the first hostname owns a shared key.
                want.entry(key).or_insert((value, host.clone()));
            }
        }
        let addr = to_addr(vip);
        let have: Vec<ServiceKey> = self
            .services
            .range(ServiceKey { vip: addr, port: 0, proto: 0, pad: 0 }..)
            .take_while(|(k, _)| k.vip == addr)
            .map(|(k, _)| *k)
            .collect();
        for key in have {
            if !want.contains_key(&key) {
                let owner = self.services.get(&key).map(|v| v.app_id);
                self.maps.delete_service(&key).map_err(|e| (owner_name(&self.apps, owner), e))?;
                if let Some(old) = self.services.remove(&key) {
                    self.unref_service(old.app_id);
                }
            }
        }
        for (key, (value, host)) in want {
            if self.services.get(&key) != Some(&value) {
                self.maps.put_service(&key, &value).map_err(|e| (host.clone(), e))?;
                *self.service_refs.entry(value.app_id).or_default() += 1;
                if let Some(old) = self.services.insert(key, value) {
                    self.unref_service(old.app_id);
                }
            }
        }
        Ok(())
    }

    fn unref_service(&mut self, id: u32) {
        if let Some(n) = self.service_refs.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.service_refs.remove(&id);
            }
        }
    }

    fn remove_app(&mut self, host: &str) -> Result<(), MapWriteError> {
        let Some(p) = self.apps.get(host).cloned() else { return Ok(()) };
        // A VIP entry whose delete failed still names this id: releasing it
        // would let the next app inherit that VIP. Keep it until a retry
        // deletes the entry.
        if self.service_refs.contains_key(&p.id) {
            return Err(MapWriteError::StillReferenced { map: map_names::SERVICES, id: p.id });
        }
        debug!(app = host, id = p.id, "removing app");
        let empty = AppValue::default();
        let result = self.write_slots_and_value(host, p.id, &[], &empty);
        result?;
        self.maps.reset_activity(p.id)?;
        self.apps.remove(host);
        self.ids.release(p.id);
        Ok(())
    }

    fn update_gauges(&self) {
        let slots = self.backend_slots;
        for (map, n) in [
            (map_names::SERVICES, self.services.len()),
            (map_names::APPS, self.apps.len()),
            (map_names::BACKENDS, slots),
        ] {
            self.metrics.map_entries.get_or_create(&MapLabel { map: map.into() }).set(n as i64);
        }
        self.metrics.apps_programmed.set(self.apps.len() as i64);
        self.metrics.vip_collisions.set(self.collisions.len() as i64);
    }

    /// Pod names behind every app, as last programmed.
    pub fn all_sources(&self) -> BTreeMap<String, Vec<String>> {
        self.apps
            .iter()
            .map(|(h, p)| {
                let names = p.sources[..(p.value.backend_count as usize).min(p.sources.len())]
                    .iter()
                    .flatten()
                    .cloned()
                    .collect();
                (h.clone(), names)
            })
            .collect()
    }
}

fn owner_name(apps: &HashMap<String, Programmed>, id: Option<u32>) -> String {
    id.and_then(|id| apps.iter().find(|(_, p)| p.id == id).map(|(h, _)| h.clone()))
        .unwrap_or_else(|| "<unknown>".into())
}

pub fn service_key(vip: IpAddr, port: &PortSpec) -> ServiceKey {
    ServiceKey { vip: to_addr(vip), port: port.port.to_be(), proto: port.protocol.ip_proto(), pad: 0 }
}

/// New slot contents for an app: backends keep their slots in order (the
/// kernel's flow entries remember slots), removed ones close up, new ones
/// are appended. Returns the slots and the pod name of each.
pub fn plan_backends(
    current: &[Backend],
    desired: &[BackendSpec],
    node_ids: &HashMap<IpAddr, u16>,
) -> (Vec<Backend>, Vec<Option<String>>) {
    let backend = |spec: &BackendSpec| Backend {
        addr: to_addr(spec.ip),
        state: if spec.ready { BACKEND_READY } else { BACKEND_DRAINING },
        pad: 0,
        node: spec.node.and_then(|n| node_ids.get(&n).copied()).unwrap_or(NODE_LOCAL),
    };
    let mut want: HashMap<[u8; 16], &BackendSpec> = desired.iter().map(|b| (to_addr(b.ip), b)).collect();
    let mut slots = Vec::with_capacity(desired.len());
    let mut sources = Vec::with_capacity(desired.len());
    for b in current {
        if let Some(spec) = want.remove(&b.addr) {
            slots.push(backend(spec));
            sources.push(spec.source.clone());
        }
    }
    for spec in desired {
        if want.remove(&to_addr(spec.ip)).is_some() {
            slots.push(backend(spec));
            sources.push(spec.source.clone());
        }
    }
    (slots, sources)
}

/// The key an adopted app is known by until the source names it: its
/// hostname when the map holds all of it (checked against the name hash),
/// else `placeholder_key` of the full name, which only the full name matches.
fn adopted_key(value: &AppValue) -> String {
    let stored = stored_hostname(&value.hostname);
    if value.name_hash == 0 || name_hash(stored.as_bytes()) == value.name_hash {
        stored
    } else {
        format!("\0adopted:{stored}:{:016x}", value.name_hash)
    }
}

/// The placeholder a hostname too long for the map was adopted under.
fn placeholder_key(hostname: &str) -> String {
    let mut raw = [0u8; HOSTNAME_LEN];
    set_hostname(&mut raw, hostname);
    format!("\0adopted:{}:{:016x}", stored_hostname(&raw), name_hash(hostname.as_bytes()))
}

/// Stores a hostname NUL-padded, truncated to what the map holds.
pub fn set_hostname(out: &mut [u8; HOSTNAME_LEN], hostname: &str) {
    let bytes = hostname.as_bytes();
    let n = bytes.len().min(HOSTNAME_LEN - 1);
    out[..n].copy_from_slice(&bytes[..n]);
}

/// The hostname as stored in a map entry.
pub fn stored_hostname(raw: &[u8; HOSTNAME_LEN]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(ip: &str, ready: bool) -> BackendSpec {
        BackendSpec { ip: ip.parse().unwrap(), ready, source: Some(ip.into()), node: None }
    }

    fn addrs(slots: &[Backend]) -> Vec<IpAddr> {
        slots.iter().map(|b| from_addr(&b.addr)).collect()
    }

    #[test]
    fn backends_keep_their_slots_and_new_ones_append() {
        let none = HashMap::new();
        let (first, _) = plan_backends(&[], &[spec("10.0.0.1", true), spec("10.0.0.2", true)], &none);
        let (second, src) = plan_backends(
            &first,
            &[spec("10.0.0.3", true), spec("10.0.0.2", false), spec("10.0.0.1", true)],
            &none,
        );
        assert_eq!(addrs(&second), ["10.0.0.1", "10.0.0.2", "10.0.0.3"].map(|s| s.parse::<IpAddr>().unwrap()));
        assert_eq!(second[1].state, BACKEND_DRAINING);
        assert_eq!(src[2].as_deref(), Some("10.0.0.3"));
        let (third, _) = plan_backends(&second, &[spec("10.0.0.3", true), spec("10.0.0.1", true)], &none);
        assert_eq!(addrs(&third), ["10.0.0.1", "10.0.0.3"].map(|s| s.parse::<IpAddr>().unwrap()));
    }

    #[test]
    fn backends_name_their_node_by_id_and_unknown_nodes_are_local() {
        let node: IpAddr = "192.0.2.12".parse().unwrap();
        let ids = HashMap::from([(node, 3u16)]);
        let mut remote = spec("10.0.0.1", true);
        remote.node = Some(node);
        let mut unknown_node = spec("10.0.0.2", true);
        unknown_node.node = Some("192.0.2.99".parse().unwrap());
        let (slots, _) = plan_backends(&[], &[remote, unknown_node, spec("10.0.0.3", true)], &ids);
        assert_eq!(slots.iter().map(|b| b.node).collect::<Vec<_>>(), [3, NODE_LOCAL, NODE_LOCAL]);
    }

    #[test]
    fn hostnames_are_stored_truncated_and_read_back() {
        let mut raw = [0u8; HOSTNAME_LEN];
        set_hostname(&mut raw, "hello.example.com");
        assert_eq!(stored_hostname(&raw), "hello.example.com");
        let long = "a".repeat(100);
        let mut raw = [0u8; HOSTNAME_LEN];
        set_hostname(&mut raw, &long);
        assert_eq!(stored_hostname(&raw).len(), HOSTNAME_LEN - 1);
    }

    #[test]
    fn ids_reuse_lowest_freed_first_and_stop_at_capacity() {
        let mut ids = Ids { max: 3, ..Default::default() };
        assert_eq!((ids.alloc(), ids.alloc(), ids.alloc(), ids.alloc()), (Some(0), Some(1), Some(2), None));
        ids.release(1);
        ids.release(0);
        assert_eq!(ids.alloc(), Some(0));
    }
}
