//! Loading, attaching and adopting the eBPF programs. All bpffs paths live
//! here.
//!
//! Restart safety: maps are pinned by name and reused by the next load, the
//! XDP program is attached through a pinned bpf_link, and the TC program
//! through a netlink filter at a fixed priority and handle. A restarted agent
//! loads the same object, atomically swaps its programs into the existing
//! attachments and keeps the maps untouched, so no packet sees an empty or
//! missing dataplane. Nothing is detached when the agent stops, unless asked.

use std::{
    io,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupSockAddr, Link as _, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        xdp::XdpLink,
    },
};
use serviceless_common::{default_capacity, map_names, program_names};
use tracing::{info, warn};

use crate::maps::{Capacities, DataplaneMaps};

/// The eBPF object, built by build.rs and embedded so the agent is one file.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/serviceless"));

/// Priority and handle of our TC egress filter: fixed so a restarted agent
/// finds and replaces it instead of stacking a second one.
pub const TC_PRIORITY: u16 = 0x5356; // "SV"
pub const TC_HANDLE: u32 = 0x5356;

/// bpffs magic number (statfs f_type).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// How to attach XDP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpAttachMode {
    /// In the driver (native XDP): fastest; needs driver support.
    #[default]
    Driver,
    /// In the kernel's generic path (SKB mode): works on any device, slower.
    Generic,
}

impl XdpAttachMode {
    fn aya(self) -> XdpMode {
        match self {
            XdpAttachMode::Driver => XdpMode::Driver,
            XdpAttachMode::Generic => XdpMode::Skb,
        }
    }
}

/// Requested map capacities (entries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub services: u32,
    pub apps: u32,
    pub backends: u32,
    /// Established connections tracked (the table holds two entries each).
    pub connections: u32,
    /// New (half-open) connections and UDP flows tracked (LRU, two entries each).
    pub new_connections: u32,
    /// Other nodes backends can be on.
    pub nodes: u32,
    /// Flows sent to pods on other nodes, remembered (LRU).
    pub remote_flows: u32,
    /// Sockets the cgroup hooks translated, remembered (LRU).
    pub socket_translations: u32,
}

impl Default for Sizes {
    fn default() -> Self {
        Self {
            services: default_capacity::SERVICES,
            apps: default_capacity::APPS,
            backends: default_capacity::BACKENDS,
            connections: default_capacity::CONNTRACK / 2,
            new_connections: default_capacity::CT_NEW / 2,
            nodes: default_capacity::NODES,
            remote_flows: default_capacity::REMOTE_FLOWS,
            socket_translations: default_capacity::SOCK_REV,
        }
    }
}

impl Sizes {
    fn conntrack_entries(&self) -> u32 {
        self.connections.saturating_mul(2)
    }

    fn ct_new_entries(&self) -> u32 {
        self.new_connections.saturating_mul(2)
    }
}

/// Where everything is pinned.
#[derive(Clone, Debug)]
pub struct Pins {
    pub dir: PathBuf,
}

impl Pins {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.dir.join("links")
    }

    pub fn xdp_link(&self, iface: &str) -> PathBuf {
        self.links_dir().join(format!("xdp_{iface}"))
    }

    /// A socket hook's link: `cgroup_<cgroup id>_<hook>`.
    pub fn socket_link(&self, hook: &str, cgroup_id: u64) -> PathBuf {
        self.links_dir().join(format!("cgroup_{cgroup_id}_{hook}"))
    }

    /// (cgroup id, hook) of a `socket_link` file name.
    pub fn parse_socket_link(name: &str) -> Option<(u64, &str)> {
        let (id, hook) = name.strip_prefix("cgroup_")?.split_once('_')?;
        Some((id.parse().ok()?, hook))
    }
}

/// A loaded object: programs verified, maps created or adopted from pins.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub maps: DataplaneMaps,
}

/// Loads the object, reusing maps already pinned under `pins.dir`.
pub fn load(pins: &Pins, sizes: Sizes) -> anyhow::Result<Loaded> {
    ensure_bpffs(&pins.dir)?;
    std::fs::create_dir_all(&pins.dir)
        .with_context(|| format!("creating pin directory {}", pins.dir.display()))?;
    let adopted: Vec<&str> = map_names::ALL.iter().copied().filter(|n| pins.map(n).exists()).collect();

    let mut loader = EbpfLoader::new();
    let paths: Vec<(&str, PathBuf)> = map_names::ALL.iter().map(|n| (*n, pins.map(n))).collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    loader
        .map_max_entries(map_names::SERVICES, sizes.services)
        .map_max_entries(map_names::APPS, sizes.apps)
        .map_max_entries(map_names::ACTIVITY, sizes.apps)
        .map_max_entries(map_names::BACKENDS, sizes.backends)
        .map_max_entries(map_names::CONNTRACK, sizes.conntrack_entries())
        .map_max_entries(map_names::CT_NEW, sizes.ct_new_entries())
        .map_max_entries(map_names::NODES, sizes.nodes)
        .map_max_entries(map_names::REMOTE_FLOWS, sizes.remote_flows)
        .map_max_entries(map_names::WAKE_GATE, sizes.apps)
        .map_max_entries(map_names::SOCK_REV, sizes.socket_translations);
    let mut ebpf = loader.load(EBPF_OBJECT).context(
        "loading the eBPF object (needs root or CAP_BPF+CAP_NET_ADMIN+CAP_PERFMON, and a kernel with BTF, >= 6.1)",
    )?;

    let ingress: &mut Xdp = program(&mut ebpf, program_names::INGRESS)?.try_into()?;
    ingress.load().context("verifier rejected the XDP ingress program")?;
    let egress: &mut SchedClassifier = program(&mut ebpf, program_names::EGRESS)?.try_into()?;
    egress.load().context("verifier rejected the TC egress program")?;
    let gc: &mut Xdp = program(&mut ebpf, program_names::CT_GC)?.try_into()?;
    gc.load().context("verifier rejected the conntrack GC program")?;
    for (name, hook) in program_names::SOCKET_HOOKS {
        let loaded = match program(&mut ebpf, name)? {
            aya::programs::Program::CgroupSkb(p) => p.load(),
            other => <&mut CgroupSockAddr>::try_from(other)?.load(),
        };
        loaded.with_context(|| format!("verifier rejected the {hook} socket hook"))?;
    }

    let maps = DataplaneMaps::from_ebpf(&mut ebpf)?;
    if !adopted.is_empty() {
        info!(dir = %pins.dir.display(), maps = adopted.len(), "adopted pinned maps; their contents are kept");
        let have = maps.capacity();
        let want = Capacities {
            services: sizes.services,
            apps: sizes.apps,
            backends: sizes.backends,
            conntrack: sizes.conntrack_entries(),
            ct_new: sizes.ct_new_entries(),
            fragments: have.fragments,
            nodes: sizes.nodes,
            remote_flows: sizes.remote_flows,
        };
        if have != want {
            warn!(
                ?have, ?want,
                "pinned maps keep the capacities they were created with; to resize, run `serviceless detach` and restart (this drops established connections)"
            );
        }
    }
    Ok(Loaded { ebpf, maps })
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name).with_context(|| format!("program {name} missing from the eBPF object"))
}

/// Refuses to pin anywhere but a bpffs, with the command that fixes it.
fn ensure_bpffs(dir: &Path) -> anyhow::Result<()> {
    let mut probe = dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    let c = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes())?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("statfs {}", probe.display()));
    }
    if st.f_type as i64 != BPF_FS_MAGIC {
        bail!(
            "{} is not on a bpffs, so maps cannot be pinned there; mount one (`mount -t bpf bpf /sys/fs/bpf`) or choose another --pin-dir",
            probe.display()
        );
    }
    Ok(())
}

/// Attaches (or re-attaches, replacing our earlier programs in place) to `iface`.
pub fn attach(loaded: &mut Loaded, pins: &Pins, iface: &str, mode: XdpAttachMode) -> anyhow::Result<()> {
    if if_index(iface).is_none() {
        bail!("{}", missing_interface(iface));
    }
    std::fs::create_dir_all(pins.links_dir())?;

    let xdp: &mut Xdp = program(&mut loaded.ebpf, program_names::INGRESS)?.try_into()?;
    let link_path = pins.xdp_link(iface);
    match PinnedLink::from_pin(&link_path) {
        Ok(pinned) => {
            let link = XdpLink::try_from(FdLink::from(pinned))?;
            xdp.attach_to_link(link)
                .with_context(|| format!("replacing the XDP program on {iface} through {}", link_path.display()))?;
            info!(%iface, link = %link_path.display(), "XDP program replaced in the existing link");
        }
        Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {
            let id = xdp.attach(iface, mode.aya()).map_err(|e| {
                anyhow::Error::new(e).context(format!(
                    "attaching XDP to {iface} in {mode:?} mode failed; if the device lacks native XDP, use --xdp-mode=generic"
                ))
            })?;
            let link = xdp.take_link(id)?;
            let fd_link = FdLink::try_from(link).context(
                "the kernel attached XDP without a bpf_link (pre-5.9 kernel?); restart safety needs bpf_link",
            )?;
            fd_link.pin(&link_path).with_context(|| format!("pinning the XDP link at {}", link_path.display()))?;
            info!(%iface, ?mode, link = %link_path.display(), "XDP program attached");
        }
        Err(e) => return Err(e).with_context(|| format!("opening pinned link {}", link_path.display())),
    }

    if let Err(e) = tc::qdisc_add_clsact(iface) {
        // Already present is the normal case after a restart.
        if !matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST)) {
            return Err(e).with_context(|| format!("adding the clsact qdisc to {iface}"));
        }
    }
    let egress: &mut SchedClassifier = program(&mut loaded.ebpf, program_names::EGRESS)?.try_into()?;
    let options = NlOptions { priority: TC_PRIORITY, handle: TcHandle::from(TC_HANDLE), classid: None };
    match egress.attach_with_options(iface, TcAttachType::Egress, TcAttachOptions::Netlink(options)) {
        Ok(id) => {
            // Keep the filter when this process exits: take the link out of
            // the program so dropping the program does not detach it.
            std::mem::forget(egress.take_link(id)?);
            info!(%iface, "TC egress program attached");
        }
        Err(_) => {
            let link = SchedClassifierLink::attached(iface, TcAttachType::Egress, TC_PRIORITY, TcHandle::from(TC_HANDLE), None)?;
            let id = egress
                .attach_to_link(link)
                .with_context(|| format!("replacing the TC egress program on {iface}"))?;
            std::mem::forget(egress.take_link(id)?);
            info!(%iface, "TC egress program replaced in the existing filter");
        }
    }
    Ok(())
}

/// The error for an `--iface` that does not exist.
pub fn missing_interface(iface: &str) -> String {
    format!("network interface '{iface}' not found; pass the node's uplink with --iface")
}

/// Unpins maps of an earlier release that nothing carries over (once the
/// new programs are live, nothing uses them).
pub fn unpin_retired(pins: &Pins) {
    for name in map_names::RETIRED {
        let path = pins.map(name);
        if path.exists() {
            match std::fs::remove_file(&path) {
                Ok(()) => info!(map = name, "unpinned a map of an earlier release"),
                Err(e) => warn!(map = name, error = %e, "could not unpin a map of an earlier release"),
            }
        }
    }
}

/// Removes everything: programs from `iface`, links and map pins.
pub fn detach(pins: &Pins, iface: &str) -> anyhow::Result<()> {
    let link_path = pins.xdp_link(iface);
    if link_path.exists() {
        std::fs::remove_file(&link_path).with_context(|| format!("removing {}", link_path.display()))?;
        info!(%iface, "XDP link unpinned (the program detaches when its last reference closes)");
    }
    if if_index(iface).is_some() {
        match SchedClassifierLink::attached(iface, TcAttachType::Egress, TC_PRIORITY, TcHandle::from(TC_HANDLE), None) {
            Ok(link) => {
                if let Err(e) = link.detach() {
                    warn!(%iface, error = %e, "TC egress filter not removed (already gone?)");
                }
            }
            Err(e) => warn!(%iface, error = %e, "TC egress filter not found"),
        }
    }
    crate::socket_lb::detach(pins);
    for name in map_names::ALL.iter().chain(&map_names::previous::ALL).chain(&map_names::RETIRED) {
        let path = pins.map(name);
        if path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    let _ = std::fs::remove_dir(pins.links_dir());
    let _ = std::fs::remove_dir(&pins.dir);
    info!(dir = %pins.dir.display(), "maps unpinned");
    Ok(())
}

fn if_index(iface: &str) -> Option<u32> {
    let c = std::ffi::CString::new(iface).ok()?;
    // SAFETY: valid C string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}
