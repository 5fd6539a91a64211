//! Connect-time load balancing for clients on the node: the cgroup v2
//! socket hooks (the eBPF `sock` module) attached at the root of the node's
//! cgroup v2 hierarchy, so every process on the node, host network and pods
//! alike, reaches apps by VIP, with no per-packet NAT. (One more hook,
//! cgroup_skb egress, counts translated connections' traffic as activity.)
//!
//! Restart safety as for XDP: each hook is attached through a bpf_link
//! pinned under `links/` (named after the hook and the cgroup's id). A
//! restarted agent swaps its new program into the pinned link
//! (BPF_LINK_UPDATE, atomic), so no `connect()` ever runs without the hook.
//! `serviceless detach` unpins them, which detaches them.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::programs::{CgroupAttachMode, CgroupSkbAttachType, CgroupSockAddr, Program, links::FdLink, links::PinnedLink};
use serviceless_common::{SOCK_F_HOST_NETNS_ONLY, SOCK_F_SKIP_CGROUPS, SockConfig, program_names::SOCKET_HOOKS};
use tracing::{info, warn};

use crate::dataplane::{Loaded, Pins};

/// cgroup2 filesystem magic (statfs f_type).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// A hook as attached (for logs and `inspect`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AttachedHook {
    pub hook: String,
    /// The cgroup's id (its inode number in the cgroup v2 filesystem).
    pub cgroup_id: u64,
    pub link_id: u32,
    pub program_id: u32,
    pub pin: String,
}

/// The cgroup v2 hierarchy to attach at: `explicit` if given (or its
/// `unified/` subdirectory, the hybrid layout, when `explicit` is the v1
/// tree), else the node's own: `/sys/fs/cgroup` (unified layout),
/// `/sys/fs/cgroup/unified` (hybrid), or any cgroup2 mount. None: the node
/// has no cgroup v2 hierarchy mounted.
pub fn find_root(explicit: Option<&Path>) -> anyhow::Result<Option<PathBuf>> {
    if let Some(dir) = explicit {
        for candidate in [dir.to_path_buf(), dir.join("unified")] {
            if is_cgroup2(&candidate) {
                return Ok(Some(candidate));
            }
        }
        bail!(
            "--cgroup-root {}: not a cgroup v2 filesystem (nor is {}/unified); mount one (`mount -t cgroup2 none <dir>`) or pass the node's cgroup v2 mount",
            dir.display(),
            dir.display()
        );
    }
    for candidate in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if is_cgroup2(Path::new(candidate)) {
            return Ok(Some(candidate.into()));
        }
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    Ok(cgroup2_mounts(&mountinfo).into_iter().find(|p| is_cgroup2(p)))
}

/// Mount points of cgroup2 filesystems in a `/proc/<pid>/mountinfo` text.
pub fn cgroup2_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let fstype = fs.split_whitespace().next()?;
            let point = mount.split_whitespace().nth(4)?;
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(point)))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

fn is_cgroup2(dir: &Path) -> bool {
    let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else { return false };
    // SAFETY: zeroed statfs is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == CGROUP2_SUPER_MAGIC }
}

/// A cgroup v2 directory's id, as `bpf_get_current_cgroup_id` reports it.
fn cgroup_id(dir: &Path) -> anyhow::Result<u64> {
    if !is_cgroup2(dir) {
        bail!("{} is not a cgroup v2 directory", dir.display());
    }
    Ok(std::fs::metadata(dir).with_context(|| format!("stat {}", dir.display()))?.ino())
}

/// What the kernel side skips (`--socket-lb-host-netns-only`, the
/// `--socket-lb-skip-cgroup` directories): written before the hooks go live.
pub fn kernel_config(host_netns_only: bool, skip_cgroups: &[PathBuf]) -> anyhow::Result<(SockConfig, Vec<u64>)> {
    let mut config = SockConfig::default();
    if host_netns_only {
        config.flags |= SOCK_F_HOST_NETNS_ONLY;
        config.host_netns_cookie = own_netns_cookie().context("reading this agent's network namespace cookie (SO_NETNS_COOKIE, Linux >= 5.14)")?;
    }
    let mut skip = Vec::new();
    for dir in skip_cgroups {
        skip.push(cgroup_id(dir).with_context(|| format!("--socket-lb-skip-cgroup {}", dir.display()))?);
    }
    if !skip.is_empty() {
        config.flags |= SOCK_F_SKIP_CGROUPS;
    }
    Ok((config, skip))
}

fn own_netns_cookie() -> io::Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid socket and out-buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_NETNS_COOKIE, (&raw mut cookie).cast(), &mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Attaches every hook at `root` (or swaps this object's programs into the
/// hooks pinned there), then removes hooks pinned at another root.
pub fn attach(loaded: &mut Loaded, pins: &Pins, root: &Path) -> anyhow::Result<()> {
    let id = cgroup_id(root)?;
    let cgroup = std::fs::File::open(root).with_context(|| format!("opening cgroup {}", root.display()))?;
    std::fs::create_dir_all(pins.links_dir())?;
    for (program, hook) in SOCKET_HOOKS {
        let prog = loaded.ebpf.program_mut(program).with_context(|| format!("program {program} missing from the eBPF object"))?;
        let pin = pins.socket_link(hook, id);
        if pin.exists() {
            let link = bpf_obj_get(&pin).with_context(|| format!("opening pinned link {}", pin.display()))?;
            link_update(&link, prog.fd()?.as_fd().as_raw_fd())
                .with_context(|| format!("replacing the {hook} program through {}", pin.display()))?;
            continue;
        }
        // A bpf_link takes no attach flags: links always share the hook
        // with other programs (BPF_F_ALLOW_MULTI semantics).
        let attached = match prog {
            Program::CgroupSkb(p) => p
                .attach(&cgroup, CgroupSkbAttachType::Egress, CgroupAttachMode::Single)
                .and_then(|id| p.take_link(id))
                .map(FdLink::try_from),
            other => {
                let p = <&mut CgroupSockAddr>::try_from(other)?;
                p.attach(&cgroup, CgroupAttachMode::Single).and_then(|id| p.take_link(id)).map(FdLink::try_from)
            }
        };
        let link = attached
            .with_context(|| format!("attaching the {hook} hook to cgroup {}", root.display()))?
            .context("the kernel attached a cgroup hook without a bpf_link (pre-5.7 kernel?); restart safety needs bpf_link")?;
        link.pin(&pin).with_context(|| format!("pinning the {hook} link at {}", pin.display()))?;
    }
    for stale in pinned(pins).into_iter().filter(|(_, cgroup, _)| *cgroup != id) {
        remove_pin(&stale.2);
        info!(cgroup_id = stale.1, hook = %stale.0, "socket hook removed from the cgroup it was attached to before");
    }
    info!(cgroup = %root.display(), cgroup_id = id, hooks = SOCKET_HOOKS.len(), "socket hooks attached: connect/sendmsg/recvmsg/getpeername to VIPs are translated for every process below this cgroup");
    Ok(())
}

/// Unpins every hook (each detaches when its last reference closes).
pub fn detach(pins: &Pins) {
    for (hook, cgroup, path) in pinned(pins) {
        remove_pin(&path);
        info!(%hook, cgroup_id = cgroup, "socket hook unpinned");
    }
}

/// The hooks pinned under `pins`, with their kernel ids.
pub fn attached(pins: &Pins) -> Vec<AttachedHook> {
    pinned(pins)
        .into_iter()
        .map(|(hook, cgroup_id, path)| {
            let info = PinnedLink::from_pin(&path).ok().and_then(|l| FdLink::from(l).info().ok());
            AttachedHook {
                hook,
                cgroup_id,
                link_id: info.as_ref().map_or(0, |i| i.id()),
                program_id: info.as_ref().map_or(0, |i| i.program_id()),
                pin: path.display().to_string(),
            }
        })
        .collect()
}

/// (hook, cgroup id, pin path) of every pinned socket hook link.
fn pinned(pins: &Pins) -> Vec<(String, u64, PathBuf)> {
    let Ok(dir) = std::fs::read_dir(pins.links_dir()) else { return Vec::new() };
    let mut out: Vec<_> = dir
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let (cgroup, hook) = Pins::parse_socket_link(&name)?;
            Some((hook.to_string(), cgroup, e.path()))
        })
        .collect();
    out.sort();
    out
}

fn remove_pin(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        warn!(pin = %path.display(), error = %e, "could not unpin a socket hook link");
    }
}

// Two bpf(2) commands aya keeps private: opening a pinned object as an fd,
// and swapping the program of a link in place.

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

fn bpf(cmd: libc::c_long, attr: &[u64]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-padded bpf_attr prefix of the command's layout.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_ptr(), std::mem::size_of_val(attr)) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

fn bpf_obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // union bpf_attr for BPF_OBJ_GET: { u64 pathname; u32 bpf_fd; u32 file_flags; }
    let fd = bpf(BPF_OBJ_GET, &[c.as_ptr() as u64, 0])?;
    // SAFETY: the kernel returned a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn link_update(link: &OwnedFd, new_prog_fd: i32) -> io::Result<()> {
    // { u32 link_fd; u32 new_prog_fd; u32 flags; u32 old_prog_fd; }
    let words = [u64::from(link.as_raw_fd() as u32) | (u64::from(new_prog_fd as u32) << 32), 0];
    bpf(BPF_LINK_UPDATE, &words).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup2_mounts_are_found_in_hybrid_and_unified_layouts() {
        let hybrid = "\
25 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 25 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/cpu rw,nosuid shared:11 - cgroup cgroup rw,cpu
";
        assert_eq!(cgroup2_mounts(hybrid), vec![PathBuf::from("/sys/fs/cgroup/unified")]);
        let unified = "35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mounts(unified), vec![PathBuf::from("/sys/fs/cgroup")]);
        let spaced = "36 24 0:31 / /run/my\\040cgroup rw - cgroup2 none rw\n";
        assert_eq!(cgroup2_mounts(spaced), vec![PathBuf::from("/run/my cgroup")]);
        assert!(cgroup2_mounts("").is_empty());
        assert!(cgroup2_mounts("garbage line\n - \n").is_empty());
    }

    #[test]
    fn an_explicit_root_that_is_not_cgroup2_is_refused_with_the_fix() {
        let err = find_root(Some(Path::new("/proc"))).unwrap_err().to_string();
        assert!(err.contains("not a cgroup v2 filesystem") && err.contains("mount -t cgroup2"), "{err}");
    }

    #[test]
    fn socket_link_pin_names_round_trip() {
        let pins = Pins::new("/sys/fs/bpf/serviceless");
        let path = pins.socket_link("getpeername6", 4242);
        let name = path.file_name().unwrap().to_str().unwrap();
        assert_eq!(Pins::parse_socket_link(name), Some((4242, "getpeername6")));
        assert_eq!(Pins::parse_socket_link("xdp_eth0"), None);
        assert_eq!(Pins::parse_socket_link("cgroup_x_connect4"), None);
    }
}
