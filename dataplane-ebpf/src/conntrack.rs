//! Connection tracking in the kernel: creating a connection's two entries
//! (forward and reply, see `serviceless_common::conntrack`) in the
//! new-connection table, moving them to the established table when the
//! client completes the TCP handshake, updating state from packets in both
//! directions, removing them, and the garbage collector the agent runs.

use aya_ebpf::{
    cty::{c_long, c_void},
    helpers::{bpf_for_each_map_elem, bpf_get_prandom_u32},
};
use serviceless_common::{
    Addr, CT_DIR_REPLY, CT_F_MIGRATED, CT_KIND_REPLY, CT_REFRESH_NS, CT_STATE_SYN_SENT,
    CT_STATE_UDP, Config, CtEntry, CtEvent, CtKey, CtSummary, IPPROTO_TCP, TCP_ACK, TCP_SYN, Verdict, addr_eq,
    expired, tcp_next,
};

pub use serviceless_common::{forward_of_plain_reply, forward_of_reply, reply_key};
use serviceless_common::{CT_F_SNAT, reply_entry, reply_key_of};

use crate::maps::{CONNTRACK, CT_BUDGET, CT_NEW, CT_SUMMARY, event};

const BPF_NOEXIST: u64 = 1;
const E2BIG: i32 = 7;
/// Other client ports tried when the natural reply tuple is taken.
const PORT_REWRITE_TRIES: u32 = 3;
/// Further SNAT ports tried (consecutive from a random start) before a new
/// connection is refused as `DropSnatPortsExhausted`.
const SNAT_PORT_TRIES: u32 = 7;

/// Source translation for connections to pods on other nodes.
pub struct Snat {
    /// This node's IPv4 address, network order.
    pub addr: [u8; 4],
    /// The port range, inclusive, host order (min <= max).
    pub port_min: u16,
    pub port_max: u16,
}
/// Age below which a reply entry without its forward entry is left alone.
const ORPHAN_GRACE_NS: u64 = 1_000_000_000;

/// Which of the two tables an entry lives in.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Table {
    /// `svl_ct_v1`: handshake completed; never evicted.
    Established = 0,
    /// `svl_ct_new_v1`: half-open TCP and UDP; an LRU.
    New = 1,
}

impl Table {
    #[inline(always)]
    pub fn get_ptr_mut(self, key: &CtKey) -> Option<*mut CtEntry> {
        match self {
            Table::Established => CONNTRACK.get_ptr_mut(key),
            Table::New => CT_NEW.get_ptr_mut(key),
        }
    }

    #[inline(always)]
    pub fn insert(self, key: &CtKey, value: &CtEntry, flags: u64) -> Result<(), i32> {
        match self {
            Table::Established => CONNTRACK.insert(key, value, flags),
            Table::New => CT_NEW.insert(key, value, flags),
        }
    }

    #[inline(always)]
    pub fn remove(self, key: &CtKey) {
        let _ = match self {
            Table::Established => CONNTRACK.remove(key),
            Table::New => CT_NEW.remove(key),
        };
    }
}

/// The entry for `key`, established table first (where the hot path hits).
#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<(Table, *mut CtEntry)> {
    if let Some(e) = CONNTRACK.get_ptr_mut(key) {
        return Some((Table::Established, e));
    }
    CT_NEW.get_ptr_mut(key).map(|e| (Table::New, e))
}

/// Where a new connection goes.
#[derive(Clone, Copy)]
pub struct Target {
    pub addr: Addr,
    pub port: u16,
    /// `CT_KIND_BACKEND` or `CT_KIND_ACTIVATOR`.
    pub kind: u8,
    pub app_id: u32,
    pub slot: u32,
    /// The pod's node (`NODE_LOCAL`: here; no connection is tracked here otherwise).
    pub node: u16,
}

/// Why a connection was not tracked.
pub enum Refused {
    /// The new-connection table would not take it.
    Full,
    /// This CPU's budget of new connections for this second is spent.
    RateLimited,
    /// No free reply tuple (every client port tried is in use towards the target).
    Clash,
}

/// Tracks a new connection from `fwd` (the client's tuple) to `target` in
/// the new-connection table: the forward entry, and a reply entry whose
/// tuple no other connection uses in either table (rewriting the client
/// port if the natural one is taken, as a NAT does on a tuple clash).
/// Returns the forward entry written.
///
/// With `snat` (this node's IPv4 address and the port range it may use),
/// the pod sees the connection come from that address and a port of the
/// range, chosen so the reply tuple is unique; `Refused::Clash` then means
/// the range is exhausted towards that pod.
#[inline(always)]
///
/// The forward entry is built in `entry` and the reply entry in `rev`
/// (both in the per-CPU scratch map: off the 512-byte stack).
pub fn create(
    cfg: &Config,
    fwd: &CtKey,
    target: &Target,
    now: u64,
    snat: Option<&Snat>,
    entry: &mut CtEntry,
    rev: &mut CtEntry,
) -> Result<(), Refused> {
    take_budget(cfg, now)?;
    *entry = CtEntry {
        addr: target.addr,
        port: target.port,
        client_port: fwd.sport,
        app_id: target.app_id,
        slot: target.slot,
        kind: target.kind,
        state: if fwd.proto == IPPROTO_TCP { CT_STATE_SYN_SENT } else { CT_STATE_UDP },
        created_ns: now,
        last_seen_ns: now,
        ..CtEntry::default()
    };
    let tries = match snat {
        Some(snat) => {
            entry.flags |= CT_F_SNAT;
            entry.snat_addr = snat.addr;
            SNAT_PORT_TRIES
        }
        None => PORT_REWRITE_TRIES,
    };
    *rev = reply_entry(fwd, entry, now);
    // SNAT: consecutive ports from a random one, so a range no larger than
    // the tries is searched whole.
    // SAFETY: no preconditions.
    let start = unsafe { bpf_get_prandom_u32() };
    for attempt in 0..=tries {
        if let Some(snat) = snat {
            let span = (snat.port_max as u32).saturating_sub(snat.port_min as u32) + 1;
            entry.client_port = ((snat.port_min as u32 + start.wrapping_add(attempt) % span) as u16).to_be();
        } else if attempt > 0 {
            // An ephemeral port (32768..=60999), unpredictable to the client.
            entry.client_port = ((32768 + unsafe { bpf_get_prandom_u32() } % 28232) as u16).to_be();
        }
        let reply = reply_key_of(fwd, entry);
        if CONNTRACK.get_ptr(&reply).is_some() {
            continue;
        }
        match CT_NEW.insert(&reply, &*rev, BPF_NOEXIST) {
            Ok(()) => {
                if CT_NEW.insert(fwd, &*entry, 0).is_err() {
                    let _ = CT_NEW.remove(&reply);
                    return Err(Refused::Full);
                }
                event(CtEvent::Created);
                if attempt > 0 && snat.is_none() {
                    event(CtEvent::PortRewritten);
                }
                return Ok(());
            }
            Err(e) if e == -E2BIG => return Err(Refused::Full),
            Err(_) => {}
        }
    }
    Err(Refused::Clash)
}

/// Moves a connection whose handshake just completed from the new table to
/// the established one (reply entry first, so a reply never finds the
/// forward entry without it). A full established table leaves it where it
/// is, still working, and counts it.
#[inline(always)]
pub fn promote(fwd: &CtKey, entry: &CtEntry, now: u64) {
    let reply = reply_key_of(fwd, entry);
    let rev = reply_entry(fwd, entry, now);
    if CONNTRACK.insert(&reply, &rev, BPF_NOEXIST).is_err() {
        event(CtEvent::PromoteFailed);
        return;
    }
    if CONNTRACK.insert(fwd, entry, BPF_NOEXIST).is_err() {
        let _ = CONNTRACK.remove(&reply);
        event(CtEvent::PromoteFailed);
        return;
    }
    let _ = CT_NEW.remove(fwd);
    let _ = CT_NEW.remove(&reply);
    event(CtEvent::Promoted);
}

/// Removes a connection from `table`: its reply entry (if it still points
/// back at this connection), then its forward entry.
#[inline(always)]
pub fn remove(table: Table, fwd: &CtKey, entry: &CtEntry) {
    let reply = reply_key_of(fwd, entry);
    if let Some(rev) = table.get_ptr_mut(&reply)
        // SAFETY: a map value, read in place (no copy on the stack).
        && points_back(unsafe { &*rev }, fwd)
    {
        table.remove(&reply);
    }
    table.remove(fwd);
}

/// Re-creates a connection's reply entry if it is missing (the established
/// table never evicts, but a restore, a manual delete or a bug must not leave
/// a connection whose replies leave untranslated; in the new table an LRU
/// may take one entry of a pair). Called at most once per second per
/// connection, when `last_seen_ns` is refreshed.
#[inline(always)]
pub fn repair_reply(table: Table, fwd: &CtKey, entry: &CtEntry, now: u64) {
    let reply = reply_key_of(fwd, entry);
    if table.get_ptr_mut(&reply).is_some() {
        return;
    }
    if table.insert(&reply, &reply_entry(fwd, entry, now), BPF_NOEXIST).is_ok() {
        event(CtEvent::ReplyRepaired);
    }
}

/// The connection a reply belongs to, found through its reply entry and
/// updated (state, last seen) in its forward entry, the one truth; returns
/// the reply entry. A reply entry whose forward entry is gone (or belongs
/// to another connection now) is stale: removed, and reported as
/// `EgressStaleReply` (the packet passes untranslated). `tcp_flags` and
/// `tcp_seq` (host order) are zero for UDP. `SNAT`: whether a reply to a
/// source-translated connection may be followed (only the ingress path
/// sees those; egress leaves them alone, which also keeps its stack small).
#[inline(always)]
pub fn follow_reply<const SNAT: bool>(key: &CtKey, tcp_flags: u8, tcp_seq: u32) -> Result<Option<CtEntry>, Verdict> {
    let Some((table, rev)) = lookup(key) else { return Ok(None) };
    // SAFETY: copied out at once.
    let rev = unsafe { *rev };
    let fwd = if SNAT {
        forward_of_reply(key, &rev)
    } else if rev.flags & CT_F_SNAT != 0 {
        return Ok(None);
    } else {
        forward_of_plain_reply(key, &rev)
    };
    let Some(entry) = table.get_ptr_mut(&fwd) else {
        table.remove(key);
        return Err(Verdict::EgressStaleReply);
    };
    // SAFETY: a map value pointer; routing fields never change in place.
    let (addr, port, client_port, state) = unsafe { ((*entry).addr, (*entry).port, (*entry).client_port, (*entry).state) };
    if !addr_eq(&addr, &key.src) || port != key.sport || client_port != key.dport {
        table.remove(key);
        return Err(Verdict::EgressStaleReply);
    }
    if state == CT_STATE_SYN_SENT && tcp_flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK) {
        // The backend's ISN: the client's ACK must acknowledge it to establish.
        // SAFETY: a map value pointer.
        unsafe { (*entry).server_isn = tcp_seq };
    }
    // SAFETY: no preconditions. (Read here, not held by the caller: the
    // egress frame is at 6.1's stack limit.)
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() };
    let _ = observe(entry, key.proto, CT_DIR_REPLY, tcp_flags, now);
    Ok(Some(rev))
}

/// Whether a reply entry belongs to the connection `fwd`.
#[inline(always)]
fn points_back(rev: &CtEntry, fwd: &CtKey) -> bool {
    rev.kind == CT_KIND_REPLY && addr_eq(&rev.addr, &fwd.dst) && rev.port == fwd.dport && rev.client_port == fwd.sport
}

/// Updates a tracked connection for a packet travelling `dir`. Returns
/// whether `last_seen_ns` was refreshed (at most once per `CT_REFRESH_NS`).
#[inline(always)]
pub fn observe(entry: *mut CtEntry, proto: u8, dir: u8, tcp_flags: u8, now: u64) -> bool {
    // SAFETY: a map value pointer; concurrent updates from other CPUs can
    // only lose a state step or a timestamp, never corrupt routing fields.
    unsafe {
        if proto == IPPROTO_TCP {
            let (state, flags) = tcp_next((*entry).state, (*entry).flags, dir, tcp_flags);
            if state != (*entry).state || flags != (*entry).flags {
                (*entry).state = state;
                (*entry).flags = flags;
            }
        }
        if now.saturating_sub((*entry).last_seen_ns) >= CT_REFRESH_NS {
            (*entry).last_seen_ns = now;
            // Traffic shows a migrated connection is alive: normal lifetime from now on.
            (*entry).flags &= !CT_F_MIGRATED;
            return true;
        }
    }
    false
}

/// Flood guard: each CPU may track `ct_new_per_cpu_per_sec` new
/// connections per second (Katran caps LRU inserts per CPU the same way).
#[inline(always)]
fn take_budget(cfg: &Config, now: u64) -> Result<(), Refused> {
    let limit = cfg.ct_new_per_cpu_per_sec as u64;
    if limit == 0 {
        return Ok(());
    }
    let Some(budget) = CT_BUDGET.get_ptr_mut(0) else { return Ok(()) };
    // SAFETY: per-CPU slot.
    unsafe {
        if now.saturating_sub((*budget).window_start_ns) >= 1_000_000_000 {
            (*budget).window_start_ns = now;
            (*budget).used = 0;
        }
        if (*budget).used >= limit {
            return Err(Refused::RateLimited);
        }
        (*budget).used += 1;
    }
    Ok(())
}

struct Gc {
    cfg: Config,
    now: u64,
    table: Table,
    summary: CtSummary,
}

/// One garbage-collection pass over both tables (Linux 5.13,
/// bpf_for_each_map_elem, commit 69c087ba6225): expired connections lose
/// both entries, reply entries whose connection is gone are removed.
#[inline(always)]
pub fn collect(cfg: &Config, now: u64) {
    let mut gc = Gc { cfg: *cfg, now, table: Table::Established, summary: CtSummary { at_ns: now, ..CtSummary::default() } };
    // SAFETY: the callback only casts its context back to `Gc`.
    unsafe {
        bpf_for_each_map_elem(core::ptr::from_ref(&CONNTRACK).cast_mut().cast(), gc_step as *mut c_void, (&raw mut gc).cast(), 0);
    }
    gc.table = Table::New;
    // SAFETY: as above.
    unsafe {
        bpf_for_each_map_elem(core::ptr::from_ref(&CT_NEW).cast_mut().cast(), gc_step as *mut c_void, (&raw mut gc).cast(), 0);
    }
    let _ = CT_SUMMARY.set(0, &gc.summary, 0);
    event(CtEvent::GcRuns);
}

extern "C" fn gc_step(_map: *mut c_void, key: *const CtKey, value: *const CtEntry, ctx: *mut c_void) -> c_long {
    // SAFETY: the kernel passes this element's key and value, and our `Gc`.
    let (key, entry, gc) = unsafe { (*key, *value, &mut *ctx.cast::<Gc>()) };
    if key.dir == CT_DIR_REPLY {
        let fwd = forward_of_reply(&key, &entry);
        let (alive, expiring) = match gc.table.get_ptr_mut(&fwd) {
            // SAFETY: a map value, read in place.
            Some(f) => unsafe {
                (
                    addr_eq(&(*f).addr, &key.src) && (*f).port == key.sport && (*f).client_port == key.dport,
                    expired(&gc.cfg, &*f, gc.now),
                )
            },
            None => (false, false),
        };
        // A reply entry is written just before its forward entry: spare young ones.
        if !alive && gc.now.saturating_sub(entry.created_ns) > ORPHAN_GRACE_NS {
            gc.table.remove(&key);
            event(CtEvent::ReplyOrphanRemoved);
            gc.summary.removed += 1;
        } else if alive && !expiring {
            // (An expiring connection's reply entry goes with it this pass.)
            gc.summary.replies += 1;
        }
    } else if expired(&gc.cfg, &entry, gc.now) {
        remove(gc.table, &key, &entry);
        event(CtEvent::expiry(entry.state));
        gc.summary.removed += 2;
    } else if let Some(n) = gc.summary.by_state.get_mut((entry.state & 7) as usize) {
        *n += 1;
    }
    0
}
