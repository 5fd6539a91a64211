//! Test support: root checks, a dataplane loaded for BPF_PROG_TEST_RUN with
//! maps filled by the agent's own reconciler, a packet builder, and network
//! namespace topologies for real traffic.

/// The real control plane for tests (shared with `cargo xtask k8s-apiserver`).
#[path = "../../xtask/src/k8s.rs"]
pub mod k8s;
pub mod cluster;
pub mod fixture;
pub mod flood;
pub mod kube_env;
pub mod netns;
pub mod orchestrator;
pub mod packet;
pub mod replay;
pub mod scenario;
pub mod topology;
pub mod xdp_pass;

use std::{
    collections::HashMap,
    net::IpAddr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::Context as _;
use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp};
use serviceless_agent::{
    dataplane::{self, Loaded, Pins, Sizes},
    maps::{CtTable, DataplaneMaps},
    metrics::Metrics,
    model::{AppSpec, BackendSpec, PortSpec, Protocol, VipRange, to_addr},
    reconcile::{Outcome, Reconciler},
    source::{Observed, Store},
};
use serviceless_common::{
    CONFIG_F_ACTIVATOR4, CONFIG_F_ACTIVATOR6, CONFIG_F_VIP4, CONFIG_F_VIP6, Config, CtEntry, CtEvent,
    CtKey, Fabric, Verdict, default_timeout, program_names,
};

/// A command line: `defaults` then `extra`, where a flag given in `extra`
/// replaces its default (and the default's value).
pub fn command_line(defaults: &[&str], extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = defaults.iter().map(|s| s.to_string()).collect();
    for flag in extra.iter().filter(|f| f.starts_with("--")) {
        if let Some(at) = args.iter().position(|a| a == flag) {
            args.drain(at..at + 2);
        }
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Whether kernel tests can run here; prints why not. They need root
/// (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN for namespaces and bpffs).
pub fn kernel_tests_enabled(test: &str) -> bool {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP {test}: needs root (BPF_PROG_TEST_RUN, bpffs, network namespaces); CI runs it as root");
        return false;
    }
    if let Err(e) = ensure_bpffs() {
        eprintln!("SKIP {test}: {e:#}");
        return false;
    }
    true
}

/// Mounts bpffs at /sys/fs/bpf if it is not mounted (it is not at boot here).
pub fn ensure_bpffs() -> anyhow::Result<()> {
    let mounted = std::fs::read_to_string("/proc/self/mounts")?
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.starts_with("bpf "));
    if !mounted {
        let status = std::process::Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]).status()?;
        anyhow::ensure!(status.success(), "mounting bpffs at /sys/fs/bpf failed");
    }
    Ok(())
}

static NEXT_PIN_DIR: AtomicU32 = AtomicU32::new(0);

/// A unique pin directory under /sys/fs/bpf, removed on drop.
pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    pub fn new(tag: &str) -> Self {
        let n = NEXT_PIN_DIR.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!("/sys/fs/bpf/svl-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        Self { path }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Small tables: fixtures need a handful of entries, not a million.
pub const TEST_SIZES: Sizes = Sizes { services: 64, apps: 64, backends: 256, connections: 4096, new_connections: 4096, nodes: 16, remote_flows: 1024, socket_translations: 1024 };

pub const VIP_RANGE4: &str = "10.96.0.0/16";
pub const VIP_RANGE6: &str = "fd00:96::/64";

/// The real object, loaded (not attached), with maps filled through the
/// agent's reconciler, and its programs runnable with BPF_PROG_TEST_RUN.
pub struct TestDataplane {
    pub reconciler: Reconciler,
    pub metrics: Metrics,
    ebpf: aya::Ebpf,
    store: Store,
    pub pins: PinDir,
    /// This node's addresses, as `--node-address` and the uplink give them.
    own: std::collections::HashSet<IpAddr>,
}

impl TestDataplane {
    pub fn new(sizes: Sizes) -> anyhow::Result<Self> {
        let pins = PinDir::new("dp");
        let Loaded { ebpf, maps } = dataplane::load(&Pins::new(&pins.path), sizes)?;
        let metrics = Metrics::new();
        let mut dp = Self {
            reconciler: Reconciler::adopt(maps, metrics.clone(), Default::default()),
            metrics,
            ebpf,
            store: Store::default(),
            pins,
            own: Default::default(),
        };
        dp.configure(Some("10.245.0.2:8080"), Some("[fd00:245::2]:8080"))?;
        Ok(dp)
    }

    /// Writes the config entry: activators and the fixture VIP ranges.
    pub fn configure(&mut self, activator4: Option<&str>, activator6: Option<&str>) -> anyhow::Result<()> {
        self.configure_ranges(activator4, activator6, VIP_RANGE4, VIP_RANGE6)
    }

    /// Writes the config entry with explicit VIP ranges (the benchmark needs
    /// a /12 to hold a million apps).
    pub fn configure_ranges(
        &mut self,
        activator4: Option<&str>,
        activator6: Option<&str>,
        vip4: &str,
        vip6: &str,
    ) -> anyhow::Result<()> {
        let mut c = Config::default();
        for (text, v4) in [(activator4, true), (activator6, false)] {
            let Some(text) = text else { continue };
            let sa: std::net::SocketAddr = text.parse()?;
            if v4 {
                c.activator4 = to_addr(sa.ip());
                c.activator4_port = sa.port().to_be();
                c.flags |= CONFIG_F_ACTIVATOR4;
            } else {
                c.activator6 = to_addr(sa.ip());
                c.activator6_port = sa.port().to_be();
                c.flags |= CONFIG_F_ACTIVATOR6;
            }
        }
        let r4: VipRange = vip4.parse().map_err(anyhow::Error::msg)?;
        let r6: VipRange = vip6.parse().map_err(anyhow::Error::msg)?;
        (c.vip4_net, c.vip4_mask) = r4.to_net_mask();
        (c.vip6_net, c.vip6_mask) = r6.to_net_mask();
        c.flags |= CONFIG_F_VIP4 | CONFIG_F_VIP6;
        c.hash_key = [0x5356_6b65_7931_3233, 0x7465_7374_6b65_7921];
        c.ct_syn_timeout_s = default_timeout::SYN;
        c.ct_established_timeout_s = default_timeout::ESTABLISHED;
        c.ct_close_timeout_s = default_timeout::CLOSE;
        c.ct_udp_timeout_s = default_timeout::UDP;
        self.reconciler.set_config(&c)?;
        Ok(())
    }

    /// Replaces the desired state and reconciles, as the agent does.
    pub fn apply(&mut self, apps: Vec<AppSpec>) -> Outcome {
        self.store.replace_all(apps, Observed::now());
        self.reconciler.apply(self.store.take())
    }

    /// Changes (or adds) one app and reconciles only that change: the
    /// agent's incremental path for a single watch event.
    pub fn upsert(&mut self, app: AppSpec) -> Outcome {
        self.store.upsert(app, Observed::now());
        self.reconciler.apply(self.store.take())
    }

    pub fn maps(&self) -> &DataplaneMaps {
        self.reconciler.maps()
    }

    /// Runs the XDP ingress program once; returns the action and the packet after it.
    pub fn ingress(&self, frame: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        let (action, out, _) = self.ingress_repeat(frame, 1)?;
        Ok((action, out))
    }

    /// Runs the XDP ingress program `repeat` times; returns action, output and time per run.
    pub fn ingress_repeat(&self, frame: &[u8], repeat: u32) -> anyhow::Result<(u32, Vec<u8>, std::time::Duration)> {
        self.run_ingress(frame, repeat, None)
    }

    /// Runs the TC egress program once.
    pub fn egress(&self, frame: &[u8]) -> anyhow::Result<(i32, Vec<u8>)> {
        let (rc, out, _) = self.egress_repeat(frame, 1)?;
        Ok((rc, out))
    }

    /// Runs the TC egress program `repeat` times; returns the result, output and time per run.
    pub fn egress_repeat(&self, frame: &[u8], repeat: u32) -> anyhow::Result<(i32, Vec<u8>, std::time::Duration)> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(program_names::EGRESS)
            .context("egress program")?
            .try_into()?;
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), repeat, ..Default::default() };
        let r = prog.test_run(opts).context("BPF_PROG_TEST_RUN (tc)")?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value as i32, out, r.duration))
    }

    /// Verdict counters, summed over CPUs.
    pub fn verdicts(&self) -> HashMap<Verdict, u64> {
        self.maps().verdicts().into_iter().collect()
    }

    /// A conntrack table, writable.
    fn ct_table(&self, table: CtTable) -> anyhow::Result<aya::maps::HashMap<aya::maps::MapData, CtKey, CtEntry>> {
        let (name, kind): (&str, fn(aya::maps::MapData) -> aya::maps::Map) = match table {
            CtTable::Established => (serviceless_common::map_names::CONNTRACK, aya::maps::Map::HashMap),
            CtTable::New => (serviceless_common::map_names::CT_NEW, aya::maps::Map::LruHashMap),
        };
        let data = aya::maps::MapData::from_pin(self.pins.path.join(name))?;
        Ok(aya::maps::HashMap::try_from(kind(data))?)
    }

    /// Empties both conntrack tables (as if every connection had expired).
    pub fn clear_conntrack(&self) -> anyhow::Result<()> {
        for table in [CtTable::Established, CtTable::New] {
            let mut map = self.ct_table(table)?;
            let keys: Vec<_> = map.keys().filter_map(Result::ok).collect();
            for k in keys {
                let _ = map.remove(&k);
            }
        }
        Ok(())
    }

    /// Deletes one conntrack entry from whichever table holds it (to
    /// simulate a lost entry).
    pub fn delete_conntrack(&self, key: &CtKey) -> anyhow::Result<()> {
        let (table, _) = self.maps().conntrack_entry(key).context("no such conntrack entry")?;
        self.ct_table(table)?.remove(key)?;
        Ok(())
    }

    /// Overwrites one conntrack entry in the table that holds it (to age or
    /// corrupt state on purpose).
    pub fn put_conntrack(&self, key: &CtKey, entry: &CtEntry) -> anyhow::Result<()> {
        let (table, _) = self.maps().conntrack_entry(key).context("no such conntrack entry")?;
        self.ct_table(table)?.insert(key, entry, 0)?;
        Ok(())
    }

    /// The table a conntrack entry is in, if any.
    pub fn conntrack_table(&self, key: &CtKey) -> Option<CtTable> {
        self.maps().conntrack_entry(key).map(|(t, _)| t)
    }

    /// A restarted agent: a new reconciler adopting what the pinned maps hold.
    pub fn restart_reconciler(&mut self) -> anyhow::Result<()> {
        let maps = DataplaneMaps::open_pinned(&self.pins.path)?;
        self.reconciler = Reconciler::adopt(maps, self.metrics.clone(), self.own.clone());
        self.store = Store::default();
        Ok(())
    }

    /// Makes this dataplane a node with addresses `own` in a fabric, as an
    /// agent started with `--node-address` would be (the reconciler is
    /// restarted: call before `apply`).
    pub fn join_fabric(&mut self, own: &[&str], fabric: &Fabric) -> anyhow::Result<()> {
        self.own = own.iter().map(|a| a.parse()).collect::<Result<_, _>>()?;
        self.restart_reconciler()?;
        self.reconciler.set_fabric(fabric)?;
        Ok(())
    }

    /// Runs the XDP ingress program once as if the frame arrived on
    /// interface `ifindex` of the calling thread's network namespace (the
    /// program's route lookups then use that namespace's tables).
    pub fn ingress_on(&self, ifindex: u32, frame: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        let (action, out, _) = self.ingress_on_repeat(ifindex, frame, 1)?;
        Ok((action, out))
    }

    /// `ingress_on`, `repeat` times; returns action, output and time per run.
    pub fn ingress_on_repeat(&self, ifindex: u32, frame: &[u8], repeat: u32) -> anyhow::Result<(u32, Vec<u8>, std::time::Duration)> {
        self.run_ingress(frame, repeat, Some(ifindex))
    }

    /// The ingress program, for a replay wrapper to tail-call.
    pub fn ingress_fd(&self) -> anyhow::Result<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd as _;
        let prog: &Xdp = self.ebpf.program(program_names::INGRESS).context("ingress program")?.try_into()?;
        Ok(prog.fd()?.as_fd())
    }

    /// BPF_PROG_TEST_RUN of the ingress program, with the ingress interface
    /// set when `ifindex` is given (the kernel's loopback otherwise).
    fn run_ingress(&self, frame: &[u8], repeat: u32, ifindex: Option<u32>) -> anyhow::Result<(u32, Vec<u8>, std::time::Duration)> {
        let prog: &Xdp = self
            .ebpf
            .program(program_names::INGRESS)
            .context("ingress program")?
            .try_into()?;
        let mut out = vec![0u8; frame.len() + 256];
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let ctx: Option<Vec<u8>> = ifindex.map(|index| {
            [0, frame.len() as u32, 0, index, 0, 0].iter().flat_map(|w: &u32| w.to_ne_bytes()).collect()
        });
        let opts =
            TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ctx_in: ctx.as_deref(), repeat, ..Default::default() };
        let r = prog.test_run(opts).context("BPF_PROG_TEST_RUN (xdp)")?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out, r.duration))
    }

    /// Every conntrack entry, of both tables.
    pub fn conntrack(&self) -> Vec<(CtKey, CtEntry)> {
        self.maps().conntrack().map(|(_, k, e)| (k, e)).collect()
    }

    /// Runs one pass of the in-kernel conntrack garbage collector.
    pub fn collect_garbage(&self) -> anyhow::Result<()> {
        serviceless_agent::conntrack::collect(&self.ebpf).map(drop)
    }

    /// Conntrack lifecycle events, summed over CPUs.
    pub fn ct_events(&self) -> HashMap<CtEvent, u64> {
        self.maps().ct_events().into_iter().collect()
    }

    /// Rewrites the config entry through `f` (timeouts, flood budget, hash key).
    pub fn update_config(&mut self, f: impl FnOnce(&mut Config)) -> anyhow::Result<()> {
        let mut c = self.maps().config().unwrap_or_default();
        f(&mut c);
        self.reconciler.set_config(&c)?;
        Ok(())
    }
}

/// Pins the calling thread to CPU 0, so per-CPU state (the flood budget)
/// is the same across BPF_PROG_TEST_RUN calls.
pub fn pin_to_cpu0() -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    Ok(())
}

/// An app for fixtures: TCP 80 -> 8080 and UDP 53 -> 5353 on `vip`.
pub fn app(hostname: &str, vip: &str, pods: &[(&str, bool)]) -> AppSpec {
    AppSpec {
        hostname: hostname.into(),
        vip: vip.parse().expect("fixture VIP"),
        ports: vec![
            PortSpec { port: 80, target_port: 8080, protocol: Protocol::Tcp },
            PortSpec { port: 53, target_port: 5353, protocol: Protocol::Udp },
        ],
        backends: pods
            .iter()
            .map(|(ip, ready)| BackendSpec {
                ip: ip.parse::<IpAddr>().expect("fixture pod IP"),
                ready: *ready,
                source: Some(format!("pod-{ip}")),
                node: None,
            })
            .collect(),
        lifecycle: Default::default(),
    }
}

/// Where the tests mount the cgroup v2 hierarchy (see `TestCgroup::new`).
pub const TEST_CGROUP_MOUNT: &str = "/run/serviceless-test-cgroup2";

/// A cgroup v2 directory of a test's own for its agent's socket hooks
/// (`--cgroup-root`), so hooks a test attaches see only the processes the
/// test puts there, never the rest of the machine. Removed on drop (its
/// processes are killed first).
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    /// None where no cgroup v2 hierarchy is mounted (agents then run with
    /// `--socket-lb off`).
    pub fn new(name: &str) -> Option<Self> {
        // The hierarchy mounted once more outside /sys: `ip netns exec`
        // mounts a fresh sysfs, which hides /sys/fs/cgroup from agents and
        // clients it starts.
        serviceless_agent::socket_lb::find_root(None).ok()??;
        let root = PathBuf::from(TEST_CGROUP_MOUNT);
        if serviceless_agent::socket_lb::find_root(Some(&root)).is_err() {
            std::fs::create_dir_all(&root).ok()?;
            crate::netns::run("mount", &["-t", "cgroup2", "none", TEST_CGROUP_MOUNT]).ok()?;
        }
        let path = root.join(format!("svl-test-{name}"));
        let cg = Self { path };
        cg.kill_all();
        let _ = std::fs::remove_dir(&cg.path);
        std::fs::create_dir(&cg.path).ok()?;
        Some(cg)
    }

    /// The agent flags that keep its hooks in `cgroup` (or off without one).
    pub fn agent_flags(cgroup: Option<&TestCgroup>) -> Vec<String> {
        match cgroup {
            Some(cg) => vec!["--cgroup-root".into(), cg.path.display().to_string()],
            None => vec!["--socket-lb".into(), "off".into()],
        }
    }

    fn kill_all(&self) {
        for _ in 0..50 {
            let procs = std::fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
            let pids: Vec<i32> = procs.lines().filter_map(|l| l.trim().parse().ok()).collect();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        self.kill_all();
        let _ = std::fs::remove_dir(&self.path);
    }
}
