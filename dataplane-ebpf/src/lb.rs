//! Load balancing: which app a VIP:port belongs to, and which of its pods a
//! new connection goes to (rendezvous hashing under the cluster's key, so
//! every node picks the same pod), or whether a tracked pod is still there.

use aya_ebpf::{
    cty::{c_long, c_void},
    helpers::bpf_loop,
};
use serviceless_common::{
    Addr, BACKEND_READY, BackendKey, CONFIG_F_ACTIVATOR4, CONFIG_F_ACTIVATOR6, CT_KIND_ACTIVATOR, CT_KIND_BACKEND, Config,
    CtKey, MAX_BACKENDS_PER_APP, NODE_LOCAL, SERVICE_F_ACTIVATOR_ONLY, ServiceKey, Verdict, addr_eq,
    hash::{backend_hash, flow_hash, score},
};

use crate::{
    conntrack::Target,
    maps::{APPS, BACKENDS, SCRATCH, SERVICES},
};

/// Where a new connection to `key.dst:key.dport` goes: a ready pod, else
/// the activator (`v4`: of the IPv4 family). Shared by the XDP path (`key`
/// is the packet's flow; for an ICMP error, the one it quotes) and the
/// socket hooks (`key` names the socket).
#[inline(always)]
pub fn choose(
    cfg: &Config,
    v4: bool,
    key: &CtKey,
    scope: Scope,
    choice: &mut ChooseBackend,
) -> Result<(Target, Verdict), Verdict> {
    let svc_key = ServiceKey { vip: key.dst, port: key.dport, proto: key.proto, pad: 0 };
    // SAFETY: copied out at once; the agent may replace the entry at any time.
    let Some(svc) = (unsafe { SERVICES.get(&svc_key) }).copied() else {
        return activator(cfg, v4, u32::MAX, Verdict::ActivatorUnknownService);
    };
    if svc.flags & SERVICE_F_ACTIVATOR_ONLY != 0 {
        return activator(cfg, v4, u32::MAX, Verdict::ActivatorCollision);
    }
    let Some(app) = APPS.get(svc.app_id) else {
        return activator(cfg, v4, u32::MAX, Verdict::ActivatorUnknownService);
    };
    if app.ready_count == 0 {
        return activator(cfg, v4, svc.app_id, Verdict::ActivatorNoBackend);
    }
    match choose_backend(choice, svc.app_id, key, app.backend_count, &cfg.hash_key, scope) {
        Some(b) => Ok((
            Target { addr: b.addr, port: svc.target_port, kind: CT_KIND_BACKEND, app_id: svc.app_id, slot: b.slot, node: b.node },
            Verdict::BackendNewFlow,
        )),
        None => activator(cfg, v4, svc.app_id, Verdict::ActivatorNoBackend),
    }
}

#[inline(always)]
fn activator(cfg: &Config, v4: bool, app_id: u32, verdict: Verdict) -> Result<(Target, Verdict), Verdict> {
    let (addr, port, present) = if v4 {
        (cfg.activator4, cfg.activator4_port, cfg.flags & CONFIG_F_ACTIVATOR4)
    } else {
        (cfg.activator6, cfg.activator6_port, cfg.flags & CONFIG_F_ACTIVATOR6)
    };
    if present == 0 {
        return Err(Verdict::DropNoActivator);
    }
    Ok((Target { addr, port, kind: CT_KIND_ACTIVATOR, app_id, slot: 0, node: NODE_LOCAL }, verdict))
}

/// The slot holding `addr` (ready or draining), trying the remembered slot
/// first: one lookup on the hot path, a search only after slots moved.
#[inline(always)]
pub fn find_backend(app_id: u32, addr: &Addr, hint: u32) -> Option<u32> {
    // SAFETY: copied out at once; the agent may rewrite slots at any time.
    if let Some(b) = unsafe { BACKENDS.get(BackendKey { app_id, slot: hint }) }
        && addr_eq(&b.addr, addr)
    {
        return Some(hint);
    }
    let count = APPS.get(app_id)?.backend_count;
    let state = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch slot; nothing else uses `find` now. (In
    // the map, not on the stack: see `choose_backend`.)
    let search = unsafe { &mut (*state).find };
    *search = FindBackend { app_id, addr: *addr, found: u32::MAX };
    for_each_slot(count, find_backend_step, search);
    (search.found != u32::MAX).then_some(search.found)
}

pub struct FindBackend {
    app_id: u32,
    addr: Addr,
    found: u32,
}

extern "C" fn find_backend_step(slot: u64, ctx: *mut c_void) -> c_long {
    // SAFETY: `for_each_slot` passes the `FindBackend` it was given.
    let search = unsafe { state_of::<FindBackend>(ctx) };
    let slot = slot as u32;
    match unsafe { BACKENDS.get(BackendKey { app_id: search.app_id, slot }) } {
        Some(b) if addr_eq(&b.addr, &search.addr) => {
            search.found = slot;
            LOOP_BREAK
        }
        _ => LOOP_CONTINUE,
    }
}

/// Which backends a new connection may go to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Any ready pod, on any node: every node makes the same choice.
    Any,
    /// A ready pod on this node if there is one (`--prefer-local`), else any.
    PreferLocal,
    /// Only pods on this node: a packet another node encapsulated here.
    LocalOnly,
}

/// The chosen backend.
pub struct Chosen {
    pub addr: Addr,
    pub slot: u32,
    pub node: u16,
}

/// Rendezvous hashing over the app's ready backends. The best-scoring pod
/// on this node is the overall best whenever the overall best is here, so a
/// node receiving an encapsulated packet (`LocalOnly`) picks the pod the
/// sending node picked, given the same backends.
///
/// The loop's state lives in the per-CPU scratch map, not on the stack:
/// 6.1's verifier checks a bpf_loop callback once and then mis-prunes the
/// caller's view of stack state it wrote, hard-wiring branches on it.
///
/// `choice` is the caller's per-CPU scratch (XDP's, or the socket hooks'
/// own: a socket hook may be interrupted by XDP on the same CPU). The slot
/// it ends with is read back under `app_id` itself, so even a clobbered
/// scratch could only pick another of this app's pods, never another app's.
#[inline(always)]
pub fn choose_backend(
    choice: &mut ChooseBackend,
    app_id: u32,
    flow: &CtKey,
    count: u32,
    hash_key: &[u64; 2],
    scope: Scope,
) -> Option<Chosen> {
    *choice = ChooseBackend {
        app_id,
        flow_hash: flow_hash(flow, hash_key),
        best: Best::NONE,
        best_local: Best::NONE,
    };
    for_each_slot(count, choose_backend_step, choice);
    let best = match scope {
        Scope::Any => choice.best,
        Scope::PreferLocal if choice.best_local.slot != u32::MAX => choice.best_local,
        Scope::PreferLocal => choice.best,
        Scope::LocalOnly => choice.best_local,
    };
    if best.slot == u32::MAX {
        return None;
    }
    // Read once here, not copied in the loop: the loop body stays small
    // for the verifier, which checks it until its state converges.
    // SAFETY: copied out at once.
    let b = unsafe { BACKENDS.get(BackendKey { app_id, slot: best.slot }) }?;
    Some(Chosen { addr: b.addr, slot: best.slot, node: b.node })
}

#[derive(Clone, Copy)]
pub struct Best {
    score: u64,
    slot: u32,
}

impl Best {
    const NONE: Best = Best { score: 0, slot: u32::MAX };

    #[inline(always)]
    fn offer(&mut self, score: u64, slot: u32) {
        if self.slot == u32::MAX || score > self.score {
            self.score = score;
            self.slot = slot;
        }
    }
}

pub struct ChooseBackend {
    app_id: u32,
    flow_hash: u64,
    best: Best,
    /// The best among pods on this node.
    best_local: Best,
}

extern "C" fn choose_backend_step(slot: u64, ctx: *mut c_void) -> c_long {
    // SAFETY: `for_each_slot` passes the `ChooseBackend` it was given.
    let choice = unsafe { state_of::<ChooseBackend>(ctx) };
    let slot = slot as u32;
    let Some(b) = (unsafe { BACKENDS.get(BackendKey { app_id: choice.app_id, slot }) }) else {
        return LOOP_CONTINUE;
    };
    if b.state == BACKEND_READY {
        let s = score(choice.flow_hash, backend_hash(&b.addr));
        choice.best.offer(s, slot);
        if b.node == NODE_LOCAL {
            choice.best_local.offer(s, slot);
        }
    }
    LOOP_CONTINUE
}

const LOOP_CONTINUE: c_long = 0;
const LOOP_BREAK: c_long = 1;

/// Runs `step(slot, state)` for slots `0..count` (at most
/// MAX_BACKENDS_PER_APP) through `bpf_loop` (Linux 5.17, commit e6f2dd0f8067),
/// so the verifier checks the body once instead of once per iteration.
/// bpf_loop's context must be on the stack: it holds a pointer to `state`
/// (in the scratch map), which `state_of` reads back in the callback.
#[inline(always)]
fn for_each_slot<T>(count: u32, step: extern "C" fn(u64, *mut c_void) -> c_long, state: &mut T) {
    let n = if count > MAX_BACKENDS_PER_APP { MAX_BACKENDS_PER_APP } else { count };
    let mut holder: *mut T = state;
    // SAFETY: `step` only reads the pointer back with `state_of::<T>`.
    unsafe {
        bpf_loop(n, step as *mut c_void, (&mut holder as *mut *mut T).cast(), 0);
    }
}

/// The state `for_each_slot` passed its callback.
///
/// # Safety
/// `ctx` is the context `for_each_slot::<T>` gave `bpf_loop`.
#[inline(always)]
unsafe fn state_of<'a, T>(ctx: *mut c_void) -> &'a mut T {
    // SAFETY: per the contract, a pointer to a live `*mut T`.
    unsafe { &mut **ctx.cast::<*mut T>() }
}
