//! The maps, declared with BTF so `bpftool map dump` prints field names.
//! Capacities here are defaults; the agent sets the real ones at load time.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use serviceless_common::{
    Activity, AppValue, Backend, BackendKey, Config, FlowKey, FlowValue, RevNatValue, ServiceKey,
    ServiceValue, Verdict, default_capacity as cap,
};

#[btf_map(name = "svl_services_v1")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { cap::SERVICES as usize }> = HashMap::new();

#[btf_map(name = "svl_apps_v1")]
pub static APPS: Array<AppValue, { cap::APPS as usize }> = Array::new();

#[btf_map(name = "svl_backends_v1")]
pub static BACKENDS: HashMap<BackendKey, Backend, { cap::BACKENDS as usize }> = HashMap::new();

#[btf_map(name = "svl_activity_v1")]
pub static ACTIVITY: Array<Activity, { cap::APPS as usize }> = Array::new();

#[btf_map(name = "svl_flows_v1")]
pub static FLOWS: LruHashMap<FlowKey, FlowValue, { cap::FLOWS as usize }> = LruHashMap::new();

#[btf_map(name = "svl_revnat_v1")]
pub static REVNAT: LruHashMap<FlowKey, RevNatValue, { cap::FLOWS as usize }> = LruHashMap::new();

#[btf_map(name = "svl_verdicts_v1")]
pub static VERDICTS: PerCpuArray<u64, { Verdict::COUNT as usize }> = PerCpuArray::new();

#[btf_map(name = "svl_config_v1")]
pub static CONFIG: Array<Config, 1> = Array::new();

/// Counts one packet under `verdict`.
#[inline(always)]
pub fn count(verdict: Verdict) {
    if let Some(counter) = VERDICTS.get_ptr_mut(verdict as u32) {
        // SAFETY: per-CPU slot, and BPF programs do not migrate CPUs mid-run.
        unsafe { *counter += 1 };
    }
}
