//! The maps, declared with BTF so `bpftool map dump` prints field names.
//! Capacities here are defaults; the agent sets the real ones at load time.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SkStorage},
    macros::btf_map,
};
use crate::{
    ingress::Opening,
    lb::{ChooseBackend, FindBackend},
    parse::Parsed,
};
use serviceless_common::{
    Activity, AppValue, Backend, BackendKey, Config, CtBudget, CtEntry, CtEvent, CtKey, CtSummary, Fabric,
    FragKey, FragValue, NodeValue, RemoteFlow, ServiceKey, ServiceValue, SockConfig, SockRevKey, SockRevValue, Verdict,
    WAKE_RING_BYTES, WakeEvent, default_capacity as cap,
};

#[btf_map(name = "svl_services_v1")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { cap::SERVICES as usize }> = HashMap::new();

#[btf_map(name = "svl_apps_v2")]
pub static APPS: Array<AppValue, { cap::APPS as usize }> = Array::new();

#[btf_map(name = "svl_backends_v1")]
pub static BACKENDS: HashMap<BackendKey, Backend, { cap::BACKENDS as usize }> = HashMap::new();

#[btf_map(name = "svl_activity_v2")]
pub static ACTIVITY: PerCpuArray<Activity, { cap::APPS as usize }> = PerCpuArray::new();

/// Established connections. A plain hash map, not an LRU: an entry leaves
/// only when the garbage collector finds it expired, so no flood can evict
/// a live connection.
#[btf_map(name = "svl_ct_v1")]
pub static CONNTRACK: HashMap<CtKey, CtEntry, { cap::CONNTRACK as usize }> = HashMap::new();

/// New connections (half-open TCP) and UDP flows. An LRU: a flood pushes
/// out only other entries that nothing has confirmed.
#[btf_map(name = "svl_ct_new_v1")]
pub static CT_NEW: LruHashMap<CtKey, CtEntry, { cap::CT_NEW as usize }> = LruHashMap::new();

/// LRU: losing an entry only loses the rest of one in-flight datagram.
#[btf_map(name = "svl_frags_v1")]
pub static FRAGMENTS: LruHashMap<FragKey, FragValue, { cap::FRAGMENTS as usize }> = LruHashMap::new();

#[btf_map(name = "svl_verdicts_v3")]
pub static VERDICTS: PerCpuArray<u64, { Verdict::COUNT as usize }> = PerCpuArray::new();

#[btf_map(name = "svl_ct_events_v2")]
pub static CT_EVENTS: PerCpuArray<u64, { CtEvent::COUNT as usize }> = PerCpuArray::new();

#[btf_map(name = "svl_ct_budget_v1")]
pub static CT_BUDGET: PerCpuArray<CtBudget, 1> = PerCpuArray::new();

#[btf_map(name = "svl_ct_summary_v1")]
pub static CT_SUMMARY: Array<CtSummary, 1> = Array::new();

#[btf_map(name = "svl_config_v2")]
pub static CONFIG: Array<Config, 1> = Array::new();

#[btf_map(name = "svl_nodes_v1")]
pub static NODES: Array<NodeValue, { cap::NODES as usize }> = Array::new();

#[btf_map(name = "svl_fabric_v1")]
pub static FABRIC: Array<Fabric, 1> = Array::new();

/// LRU: losing an entry only means the flow is hashed anew.
#[btf_map(name = "svl_remote_flows_v1")]
pub static REMOTE_FLOWS: LruHashMap<CtKey, RemoteFlow, { cap::REMOTE_FLOWS as usize }> = LruHashMap::new();

#[btf_map(name = "svl_wakes_v1")]
pub static WAKES: RingBuf<WakeEvent, { WAKE_RING_BYTES as usize }> = RingBuf::new();

#[btf_map(name = "svl_wakegate_v1")]
pub static WAKE_GATE: Array<u64, { cap::APPS as usize }> = Array::new();

/// Sockets the hooks translated, by cookie and the address they were
/// pointed at. An LRU: a socket closes without telling us.
#[btf_map(name = "svl_sock_rev_v1")]
pub static SOCK_REV: LruHashMap<SockRevKey, SockRevValue, { cap::SOCK_REV as usize }> = LruHashMap::new();

/// The app a connected socket was pointed at by the connect hook (per
/// socket, freed with it), so its traffic keeps the app awake.
#[btf_map(name = "svl_sock_app_v1")]
pub static SOCK_APP: SkStorage<u32> = SkStorage::new();

#[btf_map(name = "svl_sock_cfg_v1")]
pub static SOCK_CONFIG: Array<SockConfig, 1> = Array::new();

#[btf_map(name = "svl_sock_skip_v1")]
pub static SOCK_SKIP: HashMap<u64, u8, { cap::SOCK_SKIP as usize }> = HashMap::new();

/// The socket hooks' own scratch for the backend choice loop: they run in
/// process context, where XDP (softirq) may interrupt them on the same CPU
/// and reuse its own scratch. Not pinned.
pub struct SockScratch {
    pub choose: ChooseBackend,
}

#[btf_map]
pub static SOCK_SCRATCH: PerCpuArray<SockScratch, 1> = PerCpuArray::new();

/// A node's next hop as `bpf_fib_lookup` last found it (per CPU: no
/// sharing; not pinned: a cache, rebuilt within a second).
#[derive(Clone, Copy)]
pub struct NextHop {
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    /// The node address it was looked up for (an id may be reused).
    pub peer: [u8; 4],
    pub ifindex: u32,
    pub expires_ns: u64,
}

#[btf_map]
pub static NEXT_HOPS: PerCpuArray<NextHop, { cap::NODES as usize }> = PerCpuArray::new();

/// Per-CPU scratch space for the ingress path's largest values (the parsed
/// packet, its conntrack key), which would otherwise take room on the
/// 512-byte BPF stack every call below them shares (as Cilium and Katran
/// keep theirs). Not pinned: it holds nothing between packets.
pub struct Scratch {
    pub parsed: Parsed,
    pub key: CtKey,
    /// The connection the packet follows.
    pub entry: CtEntry,
    /// A new connection's reply entry, while it is created.
    pub reply: CtEntry,
    /// Where a new connection goes, once chosen.
    pub opening: Opening,
    /// State of the backend choice and search loops.
    pub choose: ChooseBackend,
    pub find: FindBackend,
}

#[btf_map]
pub static SCRATCH: PerCpuArray<Scratch, 1> = PerCpuArray::new();

/// Counts one packet under `verdict`.
#[inline(always)]
pub fn count(verdict: Verdict) {
    bump(&VERDICTS, verdict as u32);
}

/// Counts one conntrack lifecycle event.
#[inline(always)]
pub fn event(event: CtEvent) {
    bump(&CT_EVENTS, event as u32);
}

#[inline(always)]
fn bump<const N: usize>(counters: &PerCpuArray<u64, N>, index: u32) {
    if let Some(counter) = counters.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, and BPF programs do not migrate CPUs mid-run.
        unsafe { *counter += 1 };
    }
}
