//! `cargo xtask vm`: boots Debian kernels in QEMU and runs kernel-level
//! checks inside, reporting pass/fail per kernel.
//!
//! The building block is [`run_in_vm`]: it fetches the kernel (cached under
//! [`CACHE_DIR`]), builds a newc initramfs with busybox, the host's `ip`,
//! `tc` and `bpftool`, the kernel modules the dataplane needs and the
//! caller's files (ELF executables get their shared libraries), boots it
//! (KVM where it works, else TCG) and runs the caller's shell script.
//!
//! Guest side: the script runs under busybox `sh` as root, with /proc, /sys,
//! /sys/fs/bpf (bpffs), /dev, /tmp and /run mounted, `lo` up, the modules
//! loaded, and these helpers defined (see `vm/initramfs.rs`):
//! - `svl_step NAME COMMAND [ARG...]` runs a program or shell function with
//!   its output on the console and reports it to the host as a
//!   [`StepResult`]; it returns the command's status and counts failures in
//!   `$svl_failures`;
//! - `svl_skip NAME REASON...` reports a step that could not run.
//!
//! The script's exit status is [`VmOutcome::script_status`]. The host's
//! `ip`, `tc` and `bpftool` are /sbin/{ip,tc,bpftool}; busybox applets are
//! in /bin, and since busybox's sh runs its own applets before searching
//! PATH, `ip` and `tc` are shell functions calling the /sbin ones (call them
//! by full path from other programs). Console logs are kept in
//! `target/vm/<kernel>-<label>.console.log`.
//!
//! ```ignore
//! let outcome = vm::run_in_vm(
//!     "6.1",
//!     &[(PathBuf::from("target/release/deps/fixtures-1234"), "/svl/bin/fixtures")],
//!     "svl_step fixtures /svl/bin/fixtures --test-threads=1",
//! )?;
//! ensure!(outcome.passed(), "{}", outcome.failure_report());
//! ```

mod cpio;
mod initramfs;
mod kernel;
mod qemu;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};

use crate::build;

pub use kernel::Kernel;

/// Kernel lines booted when none is given: Debian bookworm's own (6.1, the
/// oldest verifier we support) and its security/backports line (6.12).
pub const DEFAULT_KERNELS: &[&str] = &["6.1", "6.12"];

/// Downloaded and unpacked kernel packages live here, outside the repository.
pub const CACHE_DIR: &str = "/var/cache/serviceless/vm";

/// Modules loaded in every VM (with their dependencies): veth and virtio_net
/// for native XDP, sch_ingress (clsact) and cls_bpf for TC.
pub const DEFAULT_MODULES: &[&str] =
    &["virtio_pci", "virtio_net", "veth", "sch_ingress", "cls_bpf"];

/// Host packages the VMs need.
const HOST_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "bpftool",
    "iproute2",
    "xz-utils",
];

/// Where the packet-fixture test binary is copied in the guest for [`FIXTURE_CHECKS`].
pub const GUEST_FIXTURES: &str = "/svl/bin/packet_fixtures";
/// Where the conntrack-fixture test binary goes (GC, XDP_TX, fragments).
pub const GUEST_CT_FIXTURES: &str = "/svl/bin/conntrack_fixtures";
/// Where the fabric-fixture test binary goes (encapsulation to other nodes:
/// route lookups, MSS clamps, ICMP too-big, in a network namespace).
pub const GUEST_FABRIC_FIXTURES: &str = "/svl/bin/fabric_fixtures";

/// Where the benchmark binary goes in the guest.
pub const GUEST_BENCH: &str = "/svl/bin/serviceless-bench";

/// The quick benchmark, Serviceless only (the VM has no iptables/nft):
/// per-packet cost against the XDP_PASS floor measured in the same VM run.
/// Absolute times under TCG mean little; the ratios are the point.
pub const BENCH_CHECKS: &str = r#"
svl_bench() {
	/svl/bin/serviceless-bench --quick --ours-only --out /tmp/bench && sed -n '/^## Headline/,/^Ratios/p' /tmp/bench/results.md
}
svl_step bench svl_bench
"#;

/// The kernel-level packet tests: check that bpffs is mounted at /sys/fs/bpf
/// exactly as the tests look for it, then run the `packet_fixtures`,
/// `conntrack_fixtures` and `fabric_fixtures` test binaries (BPF_PROG_TEST_RUN on every program,
/// loaded by aya through this kernel's verifier). A run in which any test printed "SKIP" (not root, no
/// bpffs) fails: the step cannot pass vacuously. Runs before [`EBPF_CHECKS`],
/// which ends the script.
pub const FIXTURE_CHECKS: &str = r#"
svl_bpffs() {
	grep '^bpf /sys/fs/bpf ' /proc/self/mounts && return 0
	echo "bpffs is not mounted at /sys/fs/bpf; /proc/self/mounts:"
	cat /proc/self/mounts
	return 1
}

svl_fixtures() {
	{
		_all=0
		for _bin in /svl/bin/packet_fixtures /svl/bin/conntrack_fixtures /svl/bin/fabric_fixtures; do
			[ -x "$_bin" ] || continue
			"$_bin" --test-threads=1 2>&1 || _all=1
		done
		echo "$_all" >/tmp/fixtures.rc
	} | tee /tmp/fixtures.log
	_rc=$(cat /tmp/fixtures.rc)
	if grep -q '^SKIP' /tmp/fixtures.log; then
		echo "FIXTURES SKIPPED: the kernel tests did not run (see SKIP above); failing"
		return 1
	fi
	if ! grep -q '^test result: ' /tmp/fixtures.log; then
		echo "no test result from packet_fixtures (exit status $_rc)"
		[ "$_rc" -ne 0 ] || _rc=1
	fi
	return "$_rc"
}

svl_step bpffs svl_bpffs
svl_step fixtures svl_fixtures
"#;

/// Where the agent binary (which embeds the eBPF object) goes in the guest.
pub const GUEST_AGENT: &str = "/svl/bin/serviceless";

/// The agent checks: the real agent loads the programs (the kernel's
/// verifier judges them), attaches XDP natively to a veth and TC to its
/// clsact egress, and programs an app from a file; traffic crosses the veth;
/// the cgroup socket hooks attach at the cgroup v2 root; `inspect` reads
/// the maps; after `kill -9` the programs and hooks stay attached and a
/// restarted agent adopts the pinned maps.
pub const EBPF_CHECKS: &str = r#"
AGENT=/svl/bin/serviceless
ARGS="run --iface svl0 --activator 10.99.0.9:8080 --source file:/tmp/apps.yaml --vip-range 10.96.0.0/16 --listen 127.0.0.1:9095 --max-apps 1024 --max-services 4096 --max-backends 8192 --max-connections 65536 --state-file /tmp/sources.json"
printf 'apps:\n  - hostname: vm.example.com\n    vip: 10.96.0.10\n    ports: [{ port: 80, targetPort: 8080 }]\n    pods: [{ name: vm-pod, ip: 10.99.0.2 }]\n' >/tmp/apps.yaml

svl_peer() {
	ip link add svl0 type veth peer name svl1 &&
		ip netns add peer &&
		ip link set svl1 netns peer &&
		ip addr add 10.99.0.1/24 dev svl0 &&
		ip link set svl0 up &&
		ip -n peer addr add 10.99.0.2/24 dev svl1 &&
		ip -n peer link set lo up &&
		ip -n peer link set svl1 up
}

# Waits for a line in the agent log.
svl_wait_log() {
	for _ in $(seq 1 150); do
		grep -q "$1" "$2" && return 0
		sleep 0.2
	done
	echo "agent log has no '$1':"
	cat "$2"
	return 1
}

svl_attached() {
	ip link show dev svl0 | grep -q 'prog/xdp' || { echo "no XDP program on svl0"; ip -d link show dev svl0; return 1; }
	tc filter show dev svl0 egress | grep -q 'svl_egress' || { echo "no TC program on svl0 egress"; tc filter show dev svl0 egress; return 1; }
	echo "XDP and TC attached"
}

# The socket hooks, attached at the cgroup v2 root through pinned links.
svl_sock_hooks() {
	bpftool cgroup show /sys/fs/cgroup >/tmp/cgroup.txt 2>&1
	cat /tmp/cgroup.txt
	for _hook in connect4 connect6 sendmsg4 sendmsg6 recvmsg4 recvmsg6 getpeername4 getpeername6 egress; do
		grep -q "$_hook" /tmp/cgroup.txt || { echo "no $_hook hook on /sys/fs/cgroup"; return 1; }
	done
	$AGENT inspect --state-file /tmp/sources.json | grep 'SOCKET HOOKS connect4('
}

svl_inspect() {
	$AGENT inspect --state-file /tmp/sources.json >/tmp/inspect.txt 2>&1
	_rc=$?
	cat /tmp/inspect.txt
	[ "$_rc" -eq 0 ] && grep -q 'vm.example.com' /tmp/inspect.txt && grep -q 'pass_not_vip' /tmp/inspect.txt
}

svl_step peer svl_peer || exit 1
$AGENT $ARGS >/tmp/agent.log 2>&1 &
PID=$!
svl_step agent-start svl_wait_log reconciled /tmp/agent.log || exit 1
svl_step attached svl_attached
svl_step socket-hooks svl_sock_hooks
svl_step traffic ping -c 3 -W 5 10.99.0.2
svl_step inspect svl_inspect
kill -9 "$PID"
wait "$PID" 2>/dev/null
svl_step survives-kill-9 svl_attached
svl_step socket-hooks-survive-kill-9 svl_sock_hooks
svl_step traffic-after-kill ping -c 2 -W 5 10.99.0.2
$AGENT $ARGS >/tmp/agent2.log 2>&1 &
svl_step restart-adopts svl_wait_log 'adopted pinned maps' /tmp/agent2.log
exit "$svl_failures"
"#;

#[derive(clap::Args)]
pub struct Args {
    /// Kernel line to boot (repeatable): "6.1", "6.12", or a full
    /// `linux-image-*` package name. Default: 6.1 and 6.12.
    #[arg(long = "kernel", value_name = "VERSION")]
    pub kernels: Vec<String>,
    /// Agent binary to run (it embeds the eBPF object). Default: the
    /// release build, built first.
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
    /// Also run this executable in the VM (repeatable; a static or dynamic
    /// ELF, e.g. a Rust test binary); its exit status is a step.
    #[arg(long = "exec", value_name = "PATH")]
    pub execs: Vec<PathBuf>,
    /// Do not build and run the packet-fixture tests (tests/tests/packet_fixtures.rs).
    #[arg(long, conflicts_with = "fixtures")]
    pub no_fixtures: bool,
    /// Do not run the quick benchmark in the VM.
    #[arg(long)]
    pub no_bench: bool,
    /// Packet-fixture test binary to run instead of building it.
    #[arg(long, value_name = "PATH")]
    pub fixtures: Option<PathBuf>,
    /// Seconds each VM may run before it is killed.
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    pub timeout: u64,
    /// Accelerator: auto uses KVM where it boots and falls back to TCG.
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    pub accel: AccelChoice,
    /// Echo each VM's serial console as it runs.
    #[arg(long, short)]
    pub verbose: bool,
}

impl Default for Args {
    /// What `cargo xtask vm` does without options.
    fn default() -> Self {
        Self {
            kernels: Vec::new(),
            agent: None,
            execs: Vec::new(),
            no_fixtures: false,
            no_bench: false,
            fixtures: None,
            timeout: 600,
            accel: AccelChoice::Auto,
            verbose: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

/// The accelerator a VM ran with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// How to run a VM; [`VmConfig::default`] is what [`run_in_vm`] uses.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Whole-run limit (boot included); the VM is killed after it.
    pub timeout: Duration,
    pub accel: AccelChoice,
    /// Echo the serial console as it runs.
    pub verbose: bool,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Kernel modules to load (dependencies are added).
    pub modules: Vec<String>,
    /// Names the console log: `target/vm/<kernel>-<label>.console.log`.
    pub label: String,
    /// Extra QEMU arguments (a `-nic`/`-netdev` here replaces the default
    /// isolated virtio NIC).
    pub qemu_args: Vec<String>,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(600),
            accel: AccelChoice::Auto,
            verbose: false,
            memory_mib: 1024,
            cpus: 2,
            modules: DEFAULT_MODULES.iter().map(|m| (*m).to_owned()).collect(),
            label: "run".to_owned(),
            qemu_args: Vec::new(),
        }
    }
}

/// One `svl_step` (or `svl_skip`) reported by the guest.
#[derive(Clone, Debug)]
pub struct StepResult {
    pub name: String,
    /// `Some(0)` passed, `Some(n)` failed with status n, `None` skipped or
    /// never finished (VM died or timed out).
    pub status: Option<i32>,
    /// Console lines between the step's start and its verdict.
    pub output: Vec<String>,
    /// Host-measured; only ratios between steps of the same run mean much.
    pub duration: Duration,
    /// Reported by `svl_skip` (`output` holds the reason).
    pub skipped: bool,
}

impl StepResult {
    pub fn passed(&self) -> bool {
        self.status == Some(0)
    }
}

/// What happened in one VM.
#[derive(Clone, Debug)]
pub struct VmOutcome {
    /// The kernel booted (package, version, release).
    pub kernel: Kernel,
    pub accel: Accel,
    pub steps: Vec<StepResult>,
    /// Exit status of the script; `None` if it never finished.
    pub script_status: Option<i32>,
    pub timed_out: bool,
    /// QEMU start to /init running.
    pub boot_time: Option<Duration>,
    pub total_time: Duration,
    /// The whole serial console (and QEMU's stderr, prefixed "qemu: ").
    pub console: Vec<String>,
    pub console_log: PathBuf,
    /// Kernel log tail the guest prints when the script fails.
    pub dmesg: Vec<String>,
}

impl VmOutcome {
    /// Script exited 0 and no step failed or was left unfinished.
    pub fn passed(&self) -> bool {
        self.script_status == Some(0)
            && !self.timed_out
            && self.steps.iter().all(|s| s.passed() || s.skipped)
    }

    pub fn step(&self, name: &str) -> Option<&StepResult> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// Failed steps with the tail of their output, or the console tail when
    /// the VM itself failed: what to print when [`passed`](Self::passed) is false.
    pub fn failure_report(&self) -> String {
        let mut out = String::new();
        let tail = |lines: &[String], n: usize| -> String {
            let start = lines.len().saturating_sub(n);
            lines[start..]
                .iter()
                .map(|l| format!("    {l}\n"))
                .collect()
        };
        for s in self.steps.iter().filter(|s| !s.passed() && !s.skipped) {
            let status = s.status.map_or_else(
                || "did not finish".to_owned(),
                |c| format!("exit status {c}"),
            );
            out.push_str(&format!(
                "  step {} failed ({status}); last output:\n",
                s.name
            ));
            out.push_str(&tail(&s.output, 60));
        }
        if self.timed_out {
            out.push_str(&format!("  timed out after {:.0?}\n", self.total_time));
        }
        if self.script_status.is_none() || self.steps.is_empty() {
            out.push_str("  console tail:\n");
            out.push_str(&tail(&self.console, 40));
        } else if !self.dmesg.is_empty() {
            out.push_str("  kernel log tail:\n");
            out.push_str(&tail(&self.dmesg, 20));
        }
        out.push_str(&format!("  full console: {}\n", self.console_log.display()));
        out
    }
}

/// Boots `kernel` (a line like "6.1", or a package name) with `files`
/// (host path, absolute guest path) in its initramfs and runs `script`
/// (busybox sh, with the `svl_step` helpers sourced) inside, with the default
/// [`VmConfig`]. Errors only when the VM could not be set up; what happened
/// inside, boot failures included, is in the outcome.
#[allow(dead_code, reason = "API for the test tasks")]
pub fn run_in_vm(
    kernel: &str,
    files: &[(PathBuf, &str)],
    script: &str,
) -> anyhow::Result<VmOutcome> {
    run_in_vm_with(kernel, files, script, &VmConfig::default())
}

static KVM_BROKEN: AtomicBool = AtomicBool::new(false);
static RUNS: AtomicU32 = AtomicU32::new(0);

/// [`run_in_vm`] with an explicit configuration.
pub fn run_in_vm_with(
    kernel: &str,
    files: &[(PathBuf, &str)],
    script: &str,
    config: &VmConfig,
) -> anyhow::Result<VmOutcome> {
    ensure_host_packages()?;
    let kernel = kernel::ensure(kernel)?;
    let modules = kernel.modules(&config.modules)?;
    let archive = initramfs::build(&modules, files, script)?;

    let out_dir = workspace_root().join("target/vm");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let seq = RUNS.fetch_add(1, Ordering::Relaxed);
    let initrd = out_dir.join(format!(".initramfs-{}-{seq}.cpio", std::process::id()));
    fs::write(&initrd, archive.to_newc())
        .with_context(|| format!("writing {}", initrd.display()))?;
    let log = out_dir.join(format!(
        "{}-{}.console.log",
        sanitize(&kernel.line),
        sanitize(&config.label)
    ));

    let result = boot(&kernel, &initrd, &log, config);
    let _ = fs::remove_file(&initrd);
    let (accel, run) = result?;
    Ok(outcome(kernel, accel, run, log))
}

/// Boots with KVM where it works (tried once per process), else TCG.
fn boot(
    kernel: &Kernel,
    initrd: &Path,
    log: &Path,
    config: &VmConfig,
) -> anyhow::Result<(Accel, qemu::Run)> {
    let spec = |accel, boot_timeout| qemu::Spec {
        vmlinuz: &kernel.vmlinuz,
        initramfs: initrd,
        accel,
        memory_mib: config.memory_mib,
        cpus: config.cpus,
        extra_args: &config.qemu_args,
        boot_timeout,
        timeout: config.timeout,
        verbose: config.verbose,
        log,
    };
    let try_kvm = match config.accel {
        AccelChoice::Tcg => false,
        AccelChoice::Kvm => true,
        AccelChoice::Auto => !KVM_BROKEN.load(Ordering::Relaxed) && kvm_available(),
    };
    if try_kvm {
        // A KVM boot reaches /init in a second or two; a broken KVM
        // (e.g. a software implementation) aborts or hangs in the decompressor.
        let boot_timeout = if config.accel == AccelChoice::Kvm {
            config.timeout
        } else {
            Duration::from_secs(20)
        };
        let run = qemu::run(&spec(Accel::Kvm, boot_timeout))?;
        if !run.boot_failed || config.accel == AccelChoice::Kvm {
            return Ok((Accel::Kvm, run));
        }
        KVM_BROKEN.store(true, Ordering::Relaxed);
        let why = run
            .lines
            .iter()
            .rev()
            .find(|(_, l)| l.starts_with("qemu: "))
            .map_or("", |(_, l)| l.as_str());
        eprintln!("vm: KVM does not boot this kernel ({why}); using TCG");
    }
    // TCG boots take seconds to tens of seconds on a loaded machine.
    let run = qemu::run(&spec(Accel::Tcg, config.timeout))?;
    Ok((Accel::Tcg, run))
}

fn kvm_available() -> bool {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Turns the console into steps, the script status and the dmesg tail.
fn outcome(kernel: Kernel, accel: Accel, run: qemu::Run, console_log: PathBuf) -> VmOutcome {
    let mut steps: Vec<StepResult> = Vec::new();
    let mut open: Option<(usize, Duration)> = None;
    let mut script_status = None;
    let mut dmesg = Vec::new();
    let mut in_dmesg = false;
    for (at, line) in &run.lines {
        // Markers may follow kernel output on the same console line.
        let marker = [
            "SVL-STEP-BEGIN ",
            "SVL-STEP ",
            "SVL-SCRIPT-EXIT ",
            "SVL-DMESG-",
        ]
        .iter()
        .filter_map(|m| line.find(m))
        .min()
        .map(|i| &line[i..]);
        match marker {
            Some(m) if m.starts_with("SVL-STEP-BEGIN ") => {
                let name = m["SVL-STEP-BEGIN ".len()..].trim().to_owned();
                steps.push(StepResult {
                    name,
                    status: None,
                    output: Vec::new(),
                    duration: Duration::ZERO,
                    skipped: false,
                });
                open = Some((steps.len() - 1, *at));
            }
            Some(m) if m.starts_with("SVL-STEP ") => {
                let mut words = m.split_whitespace().skip(1);
                let verdict = words.next().unwrap_or_default();
                let name = words.next().unwrap_or_default().to_owned();
                let rest: Vec<&str> = words.collect();
                let status = match verdict {
                    "PASS" => Some(0),
                    "FAIL" => Some(
                        rest.iter()
                            .find_map(|w| w.strip_prefix("rc="))
                            .and_then(|c| c.parse().ok())
                            .unwrap_or(1),
                    ),
                    _ => None,
                };
                match open.take() {
                    Some((i, started)) if steps[i].name == name => {
                        steps[i].status = status;
                        steps[i].duration = *at - started;
                    }
                    other => {
                        open = other;
                        steps.push(StepResult {
                            name,
                            status,
                            output: vec![rest.join(" ")],
                            duration: Duration::ZERO,
                            skipped: verdict == "SKIP",
                        });
                    }
                }
            }
            Some(m) if m.starts_with("SVL-SCRIPT-EXIT ") => {
                script_status = m["SVL-SCRIPT-EXIT ".len()..].trim().parse().ok();
            }
            Some(m) if m.starts_with("SVL-DMESG-") => in_dmesg = m.starts_with("SVL-DMESG-BEGIN"),
            _ if in_dmesg => dmesg.push(line.clone()),
            _ => {
                if let Some((i, _)) = open {
                    steps[i].output.push(line.clone());
                }
            }
        }
    }
    if let Some((i, started)) = open {
        steps[i].duration = run.total.saturating_sub(started);
    }
    VmOutcome {
        kernel,
        accel,
        steps,
        script_status,
        timed_out: run.timed_out,
        boot_time: run.booted_at,
        total_time: run.total,
        console: run.lines.into_iter().map(|(_, l)| l).collect(),
        console_log,
        dmesg,
    }
}

/// Installs the host packages the VMs need, if missing.
pub fn ensure_host_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = HOST_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            Command::new("dpkg-query")
                .args(["-W", "-f=${db:Status-Status}", p])
                .output()
                .map_or(true, |o| {
                    String::from_utf8_lossy(&o.stdout).trim() != "installed"
                })
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("vm: installing {}", missing.join(" "));
    let install = || {
        Command::new("apt-get")
            .args(["-q", "-y", "--no-install-recommends", "install"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
    };
    if !install().context("running apt-get install")?.success() {
        let _ = Command::new("apt-get").args(["-q", "update"]).status();
        ensure!(
            install()?.success(),
            "apt-get install {} failed",
            missing.join(" ")
        );
    }
    Ok(())
}

/// `cargo xtask vm`: the packet fixtures, the eBPF checks (and `--exec`
/// binaries) on each kernel, then a summary table.
pub fn run(args: &Args) -> anyhow::Result<()> {
    ensure_host_packages()?;
    let agent = match &args.agent {
        Some(path) => {
            ensure!(path.is_file(), "agent binary {} not found", path.display());
            path.clone()
        }
        None => build::agent()?,
    };
    let mut files: Vec<(PathBuf, &str)> = vec![(agent.clone(), GUEST_AGENT)];
    let exec_guest: Vec<String> = args
        .execs
        .iter()
        .map(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            format!("/svl/bin/{}", sanitize(&name))
        })
        .collect();
    let mut script = String::new();
    for (host, guest) in args.execs.iter().zip(&exec_guest) {
        ensure!(host.is_file(), "{} not found", host.display());
        files.push((host.clone(), guest));
        let name = guest.rsplit('/').next().unwrap_or_default();
        script.push_str(&format!("svl_step exec-{name} {guest}\n"));
    }
    if !args.no_fixtures {
        let fixtures = match &args.fixtures {
            Some(path) => {
                ensure!(path.is_file(), "fixture binary {} not found", path.display());
                path.clone()
            }
            None => {
                eprintln!("vm: building the packet-fixture tests (release)");
                build::test_binary("serviceless-tests", "packet_fixtures")?
            }
        };
        println!("packet fixtures: {}", fixtures.display());
        files.push((fixtures, GUEST_FIXTURES));
        if args.fixtures.is_none() {
            files.push((build::test_binary("serviceless-tests", "conntrack_fixtures")?, GUEST_CT_FIXTURES));
            files.push((build::test_binary("serviceless-tests", "fabric_fixtures")?, GUEST_FABRIC_FIXTURES));
        }
        script.push_str(FIXTURE_CHECKS);
    }
    if !args.no_bench {
        build::cargo(&["build", "--release", "--quiet", "-p", "serviceless-tests", "--bin", "serviceless-bench"])?;
        files.push((build::root().join("target/release/serviceless-bench"), GUEST_BENCH));
        script.push_str(BENCH_CHECKS);
    }
    // The checks end with `exit`: everything else runs first.
    script.push_str(EBPF_CHECKS);

    let kernels: Vec<String> = if args.kernels.is_empty() {
        DEFAULT_KERNELS.iter().map(|k| (*k).to_owned()).collect()
    } else {
        args.kernels.clone()
    };
    let config = VmConfig {
        timeout: Duration::from_secs(args.timeout),
        accel: args.accel,
        verbose: args.verbose,
        label: "checks".to_owned(),
        ..VmConfig::default()
    };
    println!("agent: {}", agent.display());

    let mut summary = Vec::new();
    for line in &kernels {
        let started = Instant::now();
        let outcome = match run_in_vm_with(line, &files, &script, &config) {
            Ok(o) => o,
            Err(e) => {
                println!("== kernel {line}: could not run: {e:#}");
                summary.push(KernelSummary::setup_error(line, &e, started.elapsed()));
                continue;
            }
        };
        let k = &outcome.kernel;
        println!(
            "== kernel {line}: {} {} ({}), {:?}",
            k.package, k.version, k.release, outcome.accel
        );
        for s in &outcome.steps {
            let verdict = match s.status {
                Some(0) => "PASS",
                Some(_) => "FAIL",
                None if s.skipped => "SKIP",
                None => "DNF ",
            };
            println!("  {verdict} {:<16} {:>7.1?}", s.name, s.duration);
        }
        let passed = outcome.passed();
        if !passed {
            print!("{}", outcome.failure_report());
        }
        for (what, ours, floor) in per_packet_ratios(outcome.step("bench")) {
            println!("  in-VM per-packet {what}: {ours} ns vs XDP_PASS floor {floor} ns = {:.2}x the floor", ours / floor);
        }
        let row = KernelSummary::new(line, &outcome, args.no_fixtures, started.elapsed());
        println!(
            "  {} kernel {line}: boot {}, VM {:.1?}, with setup {:.1?}; console: {}",
            if passed { "PASS" } else { "FAIL" },
            row.boot,
            outcome.total_time,
            row.total,
            outcome.console_log.display()
        );
        summary.push(row);
    }

    print_summary(&summary);
    let failed: Vec<&str> = summary
        .iter()
        .filter(|s| !s.passed)
        .map(|s| s.line.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("VM checks failed on kernel(s): {}", failed.join(", "));
    }
    Ok(())
}

/// One row of the summary table.
struct KernelSummary {
    line: String,
    passed: bool,
    accel: String,
    boot: String,
    vm: String,
    /// Setup (kernel, initramfs) and VM.
    total: Duration,
    steps_passed: usize,
    steps_failed: usize,
    fixtures: String,
}

impl KernelSummary {
    fn new(line: &str, outcome: &VmOutcome, no_fixtures: bool, total: Duration) -> Self {
        let fixtures = if no_fixtures {
            "not run".to_owned()
        } else {
            fixture_result(outcome.step("fixtures"))
        };
        Self {
            line: line.to_owned(),
            passed: outcome.passed(),
            accel: format!("{:?}", outcome.accel).to_uppercase(),
            boot: outcome
                .boot_time
                .map_or_else(|| "never".to_owned(), |b| format!("{b:.1?}")),
            vm: format!("{:.1?}", outcome.total_time),
            total,
            steps_passed: outcome.steps.iter().filter(|s| s.passed()).count(),
            steps_failed: outcome
                .steps
                .iter()
                .filter(|s| !s.passed() && !s.skipped)
                .count(),
            fixtures,
        }
    }

    fn setup_error(line: &str, e: &anyhow::Error, total: Duration) -> Self {
        Self {
            line: line.to_owned(),
            passed: false,
            accel: "-".to_owned(),
            boot: "-".to_owned(),
            vm: "-".to_owned(),
            total,
            steps_passed: 0,
            steps_failed: 0,
            fixtures: format!("setup error: {e:#}"),
        }
    }
}

/// (path, ours ns, floor ns) from the bench step's headline rows
/// ("| per-packet, ... | 36.0 ns (floor 24.0 ns) | ...").
fn per_packet_ratios(step: Option<&StepResult>) -> Vec<(String, f64, f64)> {
    let Some(step) = step else { return Vec::new() };
    step.output
        .iter()
        .filter(|l| l.starts_with("| per-packet"))
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let what = cells.get(1)?.trim_start_matches("per-packet, ").to_owned();
            let cell = cells.get(2)?;
            let ours: f64 = cell.split_whitespace().next()?.parse().ok()?;
            let floor: f64 = cell.split("floor ").nth(1)?.split_whitespace().next()?.parse().ok()?;
            (floor > 0.0).then_some((what, ours, floor))
        })
        .collect()
}

/// "N passed / M failed" summed over libtest's "test result:" lines in the
/// fixtures step (one per test binary), or why there are none.
fn fixture_result(step: Option<&StepResult>) -> String {
    let Some(step) = step else {
        return "did not run".to_owned();
    };
    let count = |line: &str, what: &str| -> Option<u32> {
        let words: Vec<&str> = line.split_whitespace().collect();
        words
            .windows(2)
            .find(|w| w[1].trim_end_matches([';', ',']) == what)
            .and_then(|w| w[0].parse().ok())
    };
    let skipped = step.output.iter().any(|l| l.starts_with("SKIP"));
    let results: Vec<&String> = step.output.iter().filter(|l| l.starts_with("test result: ")).collect();
    let sum = |what: &str| results.iter().map(|l| count(l, what).unwrap_or(0)).sum::<u32>();
    let mut text = if !results.is_empty() {
        format!("{} passed / {} failed", sum("passed"), sum("failed"))
    } else if step.status.is_none() {
        "did not finish".to_owned()
    } else {
        "no test result".to_owned()
    };
    if skipped {
        text.push_str(" (SKIPPED: counted as failure)");
    }
    text
}

fn print_summary(rows: &[KernelSummary]) {
    println!("== summary");
    println!(
        "  {:<6} {:<6} {:<5} {:>7} {:>7} {:>9} {:>12}  fixtures",
        "result", "kernel", "accel", "boot", "VM", "total", "steps ok/bad"
    );
    for r in rows {
        println!(
            "  {:<6} {:<6} {:<5} {:>7} {:>7} {:>9} {:>12}  {}",
            if r.passed { "PASS" } else { "FAIL" },
            r.line,
            r.accel,
            r.boot,
            r.vm,
            format!("{:.1?}", r.total),
            format!("{}/{}", r.steps_passed, r.steps_failed),
            r.fixtures
        );
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

pub(crate) fn cache_dir() -> PathBuf {
    PathBuf::from(CACHE_DIR)
}


fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-+".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Runs `cmd`, returning its stdout; fails with its stderr.
pub(crate) fn command_output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
