//! Upgrading from the previous map layout (v1: loose `svl_flows_v1` /
//! `svl_revnat_v1` LRU tables, `svl_apps_v1` without name hashes, shared
//! `svl_activity_v1` counters) without dropping traffic.
//!
//! Maps whose layout did not change (`svl_services_v1`, `svl_backends_v1`)
//! are adopted as they are. Before the new programs go live, `migrate`
//! turns every remembered flow into a conntrack connection, copies the app
//! entries and activity; the programs are swapped in place; `finish` then
//! carries over the flows the old programs created in between and unpins
//! the old maps. Migrated TCP connections count as established and expire
//! after `CT_F_MIGRATED`'s 10 minutes without traffic (the old tables did
//! not know which flows had ended); their first packet gives them the normal
//! lifetime.

use anyhow::Context as _;
use aya::maps::{Array, HashMap, Map, MapData};
use serviceless_common::{
    Activity, Addr, AppValue, CT_DIR_FORWARD, CT_F_MIGRATED, CT_KIND_ACTIVATOR, CT_KIND_BACKEND,
    CT_STATE_ESTABLISHED, CT_STATE_UDP, CtEntry, CtKey, HOSTNAME_LEN, IPPROTO_TCP, hash::name_hash,
    map_names::previous as v1, reply_entry, reply_key,
};
use tracing::{info, warn};

use crate::{
    conntrack::monotonic_coarse_ns,
    dataplane::Pins,
    maps::{CtTable, DataplaneMaps},
};

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct FlowKeyV1 {
    src: Addr,
    dst: Addr,
    sport: u16,
    dport: u16,
    proto: u8,
    pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct FlowValueV1 {
    backend: Addr,
    backend_port: u16,
    kind: u8,
    pad: u8,
    app_id: u32,
    slot: u32,
}

const FLOW_TO_ACTIVATOR_V1: u8 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct AppValueV1 {
    backend_count: u32,
    ready_count: u32,
    hostname: [u8; HOSTNAME_LEN],
}

// SAFETY: #[repr(C)], integers and byte arrays only, every padding byte a field.
unsafe impl aya::Pod for FlowKeyV1 {}
unsafe impl aya::Pod for FlowValueV1 {}
unsafe impl aya::Pod for AppValueV1 {}

/// What was carried over, for the log.
#[derive(Debug, Default)]
pub struct Previous {
    pub apps: usize,
    pub connections: usize,
    pub skipped: usize,
}

fn open(pins: &Pins, name: &str) -> Option<MapData> {
    let path = pins.map(name);
    path.exists().then(|| MapData::from_pin(&path).ok()).flatten()
}

/// Whether maps of the previous layout are pinned (an upgrade is due).
pub fn pending(pins: &Pins) -> bool {
    v1::ALL.iter().any(|n| pins.map(n).exists())
}

/// First pass, before the new programs are attached. `None` when there is
/// no previous layout to upgrade from.
pub fn migrate(pins: &Pins, maps: &mut DataplaneMaps) -> anyhow::Result<Option<Previous>> {
    if !pending(pins) {
        return Ok(None);
    }
    info!(dir = %pins.dir.display(), "maps of the previous layout (v1) found: upgrading in place");
    let mut previous = Previous::default();
    if let Some(data) = open(pins, v1::APPS_V1) {
        let apps: Array<_, AppValueV1> = Array::try_from(Map::Array(data)).context("svl_apps_v1")?;
        let activity = open(pins, v1::ACTIVITY_V1)
            .and_then(|d| Array::<_, Activity>::try_from(Map::Array(d)).ok());
        let ids: std::collections::BTreeSet<u32> = maps
            .services()
            .map(|(_, v)| v.app_id)
            .chain(maps.backends().map(|(k, _)| k.app_id))
            .collect();
        for id in ids {
            let Ok(old) = apps.get(&id, 0) else { continue };
            let end = old.hostname.iter().position(|&b| b == 0).unwrap_or(HOSTNAME_LEN);
            let value = AppValue {
                backend_count: old.backend_count,
                ready_count: old.ready_count,
                // Exact for names that fit; a truncated one is re-created
                // under a new id by the first reconcile (see README).
                name_hash: name_hash(&old.hostname[..end]),
                hostname: old.hostname,
            };
            maps.put_app(id, &value)?;
            if let Some(a) = activity.as_ref().and_then(|a| a.get(&id, 0).ok()) {
                maps.set_activity(id, a)?;
            }
            previous.apps += 1;
        }
    }
    carry_flows(pins, maps, &mut previous)?;
    Ok(Some(previous))
}

/// Second pass, after the swap: flows the old programs created since the
/// first pass; then the old maps are unpinned (and freed once the old
/// programs are gone).
pub fn finish(pins: &Pins, maps: &mut DataplaneMaps, mut previous: Previous) -> anyhow::Result<()> {
    carry_flows(pins, maps, &mut previous)?;
    for name in v1::ALL {
        let path = pins.map(name);
        if path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
        }
    }
    info!(
        apps = previous.apps,
        connections = previous.connections,
        skipped = previous.skipped,
        "upgraded from map layout v1; old maps unpinned"
    );
    if previous.skipped > 0 {
        warn!(
            skipped = previous.skipped,
            "flows of the old layout that shared a reply tuple with another (activator flows of one client port to two VIPs) were not carried over"
        );
    }
    Ok(())
}

const BPF_NOEXIST: u64 = 1;

fn carry_flows(pins: &Pins, maps: &mut DataplaneMaps, previous: &mut Previous) -> anyhow::Result<()> {
    let Some(data) = open(pins, v1::FLOWS_V1) else { return Ok(()) };
    let flows: HashMap<_, FlowKeyV1, FlowValueV1> =
        HashMap::try_from(Map::LruHashMap(data)).context("svl_flows_v1")?;
    let now = monotonic_coarse_ns();
    for (k, v) in flows.iter().filter_map(Result::ok) {
        let fwd = CtKey { src: k.src, dst: k.dst, sport: k.sport, dport: k.dport, proto: k.proto, dir: CT_DIR_FORWARD, pad: [0; 2] };
        if maps.conntrack_entry(&fwd).is_some() {
            continue;
        }
        let tcp = k.proto == IPPROTO_TCP;
        let entry = CtEntry {
            addr: v.backend,
            port: v.backend_port,
            client_port: k.sport,
            app_id: v.app_id,
            slot: v.slot,
            kind: if v.kind == FLOW_TO_ACTIVATOR_V1 { CT_KIND_ACTIVATOR } else { CT_KIND_BACKEND },
            state: if tcp { CT_STATE_ESTABLISHED } else { CT_STATE_UDP },
            flags: CT_F_MIGRATED,
            created_ns: now,
            last_seen_ns: now,
            ..CtEntry::default()
        };
        let reply = reply_key(&entry.addr, entry.port, &fwd.src, entry.client_port, fwd.proto);
        // TCP connections were established (the old tables kept no state to
        // tell); UDP flows belong in the new-connection table.
        let table = if tcp { CtTable::Established } else { CtTable::New };
        if maps.insert_conntrack(table, &reply, &reply_entry(&fwd, &entry, now), BPF_NOEXIST).is_err() {
            previous.skipped += 1;
            continue;
        }
        maps.insert_conntrack(table, &fwd, &entry, BPF_NOEXIST)?;
        previous.connections += 1;
    }
    Ok(())
}
