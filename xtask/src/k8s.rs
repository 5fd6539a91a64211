//! A real Kubernetes control plane for tests, built from Debian's sources.
//!
//! No allowed registry ships a prebuilt kube-apiserver, so [`ensure_binaries`] builds
//! kube-apiserver, kube-controller-manager and kubectl from Debian's `kubernetes` source
//! package (bookworm main) once per machine and caches them under
//! `/var/cache/serviceless/k8s/<source version>/` (the environment variable
//! `SERVICELESS_K8S_CACHE` moves that root). etcd comes from Debian's `etcd-server`.
//! A cold build takes about six minutes on two cores; afterwards the call returns at once.
//!
//! [`start_cluster`] runs etcd, kube-apiserver and kube-controller-manager (deployment and
//! replicaset controllers only) on free 127.0.0.1 ports and writes a kubeconfig for it. There is
//! no scheduler and no kubelet: tests play those parts themselves.
//!
//! This file depends on `std` and `anyhow` only, so another crate can reuse it with
//! `#[path = "../../xtask/src/k8s.rs"] mod k8s;`.
#![allow(
    dead_code,
    reason = "the cluster API is used by tests and the test harness, not by every task"
)]

use anyhow::{Context as _, Result, bail, ensure};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where the binaries are cached unless `SERVICELESS_K8S_CACHE` says otherwise.
pub const DEFAULT_CACHE_ROOT: &str = "/var/cache/serviceless/k8s";
/// Environment variable that overrides [`DEFAULT_CACHE_ROOT`].
pub const CACHE_ENV: &str = "SERVICELESS_K8S_CACHE";

const SOURCE_PACKAGE: &str = "kubernetes";
const SUITE: &str = "bookworm";
const COMPONENT: &str = "main";
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
const DEFAULT_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// Needed only to build the binaries.
const BUILD_PACKAGES: &[&str] = &[
    "golang-go",
    "rsync",
    "make",
    "dpkg-dev",
    "golang-github-modern-go-reflect2-dev",
];
/// Needed to run a cluster.
const RUNTIME_PACKAGES: &[&str] = &["etcd-server", "openssl"];
/// Debian's reflect2 v1.0.2; the vendored v1.0.1 crashes under Go >= 1.18.
const REFLECT2_DEBIAN: &str = "/usr/share/gocode/src/github.com/modern-go/reflect2";
const REFLECT2_VENDORED: &str = "vendor/github.com/modern-go/reflect2";

const APISERVER: &str = "kube-apiserver";
const CONTROLLER_MANAGER: &str = "kube-controller-manager";
const KUBECTL: &str = "kubectl";
/// Everything built from the source package; a cache entry is complete when all exist.
const COMMANDS: [&str; 3] = [APISERVER, CONTROLLER_MANAGER, KUBECTL];
/// Marks an extracted and patched source tree as ready to build.
const PREPARED_STAMP: &str = ".serviceless-prepared";
const LOG_TAIL_LINES: usize = 40;

/// The control-plane programs, all ready to run.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// kube-apiserver built from Debian's source.
    pub apiserver: PathBuf,
    /// kube-controller-manager built from the same source.
    pub controller_manager: PathBuf,
    /// kubectl built from the same source (so its version matches the server's).
    pub kubectl: PathBuf,
    /// etcd from Debian's `etcd-server`.
    pub etcd: PathBuf,
    /// Debian version of the `kubernetes` source package, e.g. `1.20.5+really1.20.2-1.1+deb12u1`.
    pub version: String,
    /// The cache directory holding the three built binaries and `build.log`.
    pub dir: PathBuf,
}

/// The cache root: `$SERVICELESS_K8S_CACHE` or [`DEFAULT_CACHE_ROOT`].
pub fn cache_root() -> PathBuf {
    std::env::var_os(CACHE_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_CACHE_ROOT), PathBuf::from)
}

/// Returns the cached binaries, building them first if the cache has none.
///
/// Idempotent and cheap once cached: it then only checks that the runtime Debian packages are
/// installed. Concurrent callers (other processes or threads) wait on a lock file instead of
/// building twice.
pub fn ensure_binaries() -> Result<Binaries> {
    ensure_packages(RUNTIME_PACKAGES)?;
    let etcd = which("etcd").context("etcd is not on PATH although etcd-server is installed")?;
    let root = cache_root();
    if let Some(bins) = cached_binaries(&root, &etcd) {
        report(&bins, "cached");
        return Ok(bins);
    }
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let lock_path = root.join(".lock");
    let lock =
        File::create(&lock_path).with_context(|| format!("creating {}", lock_path.display()))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            eprintln!(
                "xtask: another process is building Kubernetes; waiting for {}",
                lock_path.display()
            );
            lock.lock()
                .with_context(|| format!("locking {}", lock_path.display()))?;
        }
        Err(fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", lock_path.display()));
        }
    }
    if let Some(bins) = cached_binaries(&root, &etcd) {
        report(&bins, "cached");
        return Ok(bins);
    }
    let started = Instant::now();
    let bins = build(&root, etcd)?;
    eprintln!(
        "xtask: built Kubernetes {} in {:.0} s",
        bins.version,
        started.elapsed().as_secs_f64()
    );
    report(&bins, "built");
    Ok(bins)
}

/// The newest complete entry under [`cache_root`], if any; never builds or installs.
pub fn find_cached_binaries() -> Option<Binaries> {
    cached_binaries(&cache_root(), &which("etcd")?)
}

fn report(bins: &Binaries, how: &str) {
    eprintln!(
        "xtask: Kubernetes {} ({how}) in {}",
        bins.version,
        bins.dir.display()
    );
    eprintln!("xtask:   {APISERVER}: {}", bins.apiserver.display());
    eprintln!(
        "xtask:   {CONTROLLER_MANAGER}: {}",
        bins.controller_manager.display()
    );
    eprintln!("xtask:   {KUBECTL}: {}", bins.kubectl.display());
    eprintln!("xtask:   etcd: {}", bins.etcd.display());
}

fn cached_binaries(root: &Path, etcd: &Path) -> Option<Binaries> {
    let mut best: Option<(std::time::SystemTime, Binaries)> = None;
    for entry in fs::read_dir(root).ok()?.flatten() {
        let dir = entry.path();
        let Some(version) = dir.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        if !COMMANDS.iter().all(|c| dir.join(c).is_file()) {
            continue;
        }
        let modified = fs::metadata(dir.join(APISERVER))
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        if best.as_ref().is_some_and(|(t, _)| *t >= modified) {
            continue;
        }
        let bins = Binaries {
            apiserver: dir.join(APISERVER),
            controller_manager: dir.join(CONTROLLER_MANAGER),
            kubectl: dir.join(KUBECTL),
            etcd: etcd.to_path_buf(),
            version,
            dir,
        };
        best = Some((modified, bins));
    }
    best.map(|(_, b)| b)
}

// ---------------------------------------------------------------------------------------------
// Debian packages

fn missing_packages<'a>(packages: &[&'a str]) -> Result<Vec<&'a str>> {
    // dpkg-query exits non-zero when a package is unknown but still prints the known ones.
    let out = Command::new("dpkg-query")
        .arg("-W")
        .arg("-f=${Package} ${Status}\\n")
        .args(packages)
        .stderr(Stdio::null())
        .output()
        .context("running dpkg-query")?;
    let installed: HashSet<&str> = std::str::from_utf8(&out.stdout)
        .context("dpkg-query printed non-UTF-8")?
        .lines()
        .filter(|l| l.ends_with(" install ok installed"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    Ok(packages
        .iter()
        .copied()
        .filter(|p| !installed.contains(p))
        .collect())
}

fn apt_get_install(packages: &[&str]) -> Result<()> {
    run(Command::new("apt-get")
        .args(["install", "-y"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Installs whichever of `packages` is missing; `apt-get update` only if the install fails.
fn ensure_packages(packages: &[&str]) -> Result<()> {
    let missing = missing_packages(packages)?;
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    if let Err(e) = apt_get_install(&missing) {
        eprintln!("xtask: apt-get install failed ({e:#}); running apt-get update and retrying");
        run(Command::new("apt-get").arg("update")).context("apt-get update")?;
        apt_get_install(&missing).context("apt-get install after apt-get update")?;
    }
    let still = missing_packages(packages)?;
    ensure!(
        still.is_empty(),
        "Debian packages still missing after install: {}",
        still.join(" ")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Building from Debian's source package

/// A private apt configuration with one deb-src entry; /etc/apt stays untouched.
struct PrivateApt {
    dir: PathBuf,
}

impl PrivateApt {
    fn prepare(dir: &Path) -> Result<Self> {
        for sub in ["sources.list.d", "lists/partial", "cache/archives/partial"] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let (mirror, keyring) = machine_mirror();
        let signed_by = keyring
            .map(|k| format!("[signed-by={k}] "))
            .unwrap_or_default();
        let line = format!("deb-src {signed_by}{mirror} {SUITE} {COMPONENT}\n");
        let list = dir.join("sources.list");
        fs::write(&list, &line).with_context(|| format!("writing {}", list.display()))?;
        eprintln!("xtask: source entry: {}", line.trim_end());
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let d = &self.dir;
        for (key, value) in [
            ("Dir::Etc::SourceList", d.join("sources.list")),
            ("Dir::Etc::SourceParts", d.join("sources.list.d")),
            ("Dir::State::Lists", d.join("lists")),
            ("Dir::Cache", d.join("cache")),
        ] {
            cmd.arg("-o").arg(format!("{key}={}", value.display()));
        }
        // The downloads land in root-owned directories that the _apt user cannot write.
        cmd.args(["-o", "APT::Sandbox::User=root"]);
        cmd
    }

    fn update(&self) -> Result<()> {
        output(self.command("apt-get").arg("update"))
            .context("apt-get update (private source list)")?;
        Ok(())
    }

    /// The newest version of the source package the entry offers.
    fn source_version(&self) -> Result<String> {
        let text =
            output(
                self.command("apt-cache")
                    .args(["showsrc", "--only-source", SOURCE_PACKAGE]),
            )
            .with_context(|| format!("apt-cache showsrc {SOURCE_PACKAGE}"))?;
        let mut best: Option<String> = None;
        for v in text.lines().filter_map(|l| l.strip_prefix("Version: ")) {
            let newer = match &best {
                None => true,
                Some(b) => Command::new("dpkg")
                    .args(["--compare-versions", v, "gt", b])
                    .status()
                    .context("running dpkg --compare-versions")?
                    .success(),
            };
            if newer {
                best = Some(v.trim().to_owned());
            }
        }
        best.with_context(|| format!("no source package {SOURCE_PACKAGE} in {SUITE} {COMPONENT}"))
    }

    fn download_source(&self, into: &Path, version: &str) -> Result<PathBuf> {
        fs::create_dir_all(into).with_context(|| format!("creating {}", into.display()))?;
        output(
            self.command("apt-get")
                .args(["source", "--download-only"])
                .arg(format!("{SOURCE_PACKAGE}={version}"))
                .current_dir(into),
        )
        .with_context(|| format!("apt-get source {SOURCE_PACKAGE}={version}"))?;
        let upstream = version.split_once(':').map_or(version, |(_, v)| v);
        let dsc = into.join(format!("{SOURCE_PACKAGE}_{upstream}.dsc"));
        ensure!(
            dsc.is_file(),
            "apt-get source did not leave {}",
            dsc.display()
        );
        Ok(dsc)
    }
}

/// The Debian mirror (and its keyring) that the machine's apt already uses for bookworm main.
fn machine_mirror() -> (String, Option<String>) {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        let found = match file.extension().and_then(|e| e.to_str()) {
            Some("sources") => mirror_from_deb822(&text),
            Some("list") => mirror_from_one_line(&text),
            _ => None,
        };
        if let Some(found) = found {
            return found;
        }
    }
    (DEFAULT_MIRROR.to_owned(), Some(DEFAULT_KEYRING.to_owned()))
}

fn mirror_from_deb822(text: &str) -> Option<(String, Option<String>)> {
    for paragraph in text.split("\n\n") {
        let mut fields = std::collections::HashMap::new();
        for line in paragraph.lines().filter(|l| !l.starts_with('#')) {
            if let Some((k, v)) = line.split_once(':').filter(|_| !line.starts_with(' ')) {
                fields.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        let has = |key: &str, word: &str| {
            fields
                .get(key)
                .is_some_and(|v| v.split_whitespace().any(|w| w == word))
        };
        if fields.get("enabled").is_some_and(|v| v == "no")
            || !has("suites", SUITE)
            || !has("components", COMPONENT)
            || !(has("types", "deb") || has("types", "deb-src"))
        {
            continue;
        }
        let uri = fields.get("uris")?.split_whitespace().next()?.to_owned();
        let keyring = fields
            .get("signed-by")
            .filter(|k| k.starts_with('/'))
            .cloned();
        return Some((uri, keyring));
    }
    None
}

fn mirror_from_one_line(text: &str) -> Option<(String, Option<String>)> {
    for line in text.lines().map(str::trim) {
        let Some(rest) = line
            .strip_prefix("deb ")
            .or_else(|| line.strip_prefix("deb-src "))
        else {
            continue;
        };
        let (options, rest) = match rest.trim_start().strip_prefix('[') {
            Some(r) => r.split_once(']').unwrap_or(("", r)),
            None => ("", rest),
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        if words.len() >= 3 && words[1] == SUITE && words[2..].contains(&COMPONENT) {
            let keyring = options
                .split_whitespace()
                .find_map(|o| o.strip_prefix("signed-by="))
                .map(str::to_owned);
            return Some((words[0].to_owned(), keyring));
        }
    }
    None
}

fn build(root: &Path, etcd: PathBuf) -> Result<Binaries> {
    eprintln!(
        "xtask: no cached Kubernetes binaries in {}; building them (about 6 min on 2 cores)",
        root.display()
    );
    ensure_packages(BUILD_PACKAGES)?;
    let apt = PrivateApt::prepare(&root.join("apt"))?;
    eprintln!("xtask: reading the source index");
    apt.update()?;
    let version = apt.source_version()?;
    let build_dir = root.join("build");
    eprintln!("xtask: downloading source package {SOURCE_PACKAGE} {version}");
    let dsc = apt.download_source(&build_dir.join("download"), &version)?;
    let tree = build_dir.join(format!("src-{version}"));
    prepare_tree(&dsc, &tree)?;

    let out_dir = root.join(&version);
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let log = out_dir.join("build.log");
    run_make(&tree, &log)?;

    for name in COMMANDS {
        let built = [
            tree.join("_output/bin").join(name),
            tree.join("_output/local/bin/linux/amd64").join(name),
        ]
        .into_iter()
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "make finished but {name} is not under {}/_output",
                tree.display()
            )
        })?;
        let tmp = out_dir.join(format!("{name}.tmp"));
        fs::copy(&built, &tmp)
            .with_context(|| format!("copying {} to {}", built.display(), tmp.display()))?;
        fs::rename(&tmp, out_dir.join(name))
            .with_context(|| format!("renaming {}", tmp.display()))?;
    }
    eprintln!("xtask: removing the build tree {}", tree.display());
    fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    Ok(Binaries {
        apiserver: out_dir.join(APISERVER),
        controller_manager: out_dir.join(CONTROLLER_MANAGER),
        kubectl: out_dir.join(KUBECTL),
        etcd,
        version,
        dir: out_dir,
    })
}

/// Extracts the source package into `tree`, swaps in Debian's reflect2 and lays out the GOPATH.
/// A tree left by an earlier, failed build is reused (with its Go build cache).
fn prepare_tree(dsc: &Path, tree: &Path) -> Result<()> {
    if tree.join(PREPARED_STAMP).is_file() {
        eprintln!("xtask: reusing the prepared source tree {}", tree.display());
        return Ok(());
    }
    if tree.exists() {
        fs::remove_dir_all(tree).with_context(|| format!("removing stale {}", tree.display()))?;
    }
    eprintln!("xtask: unpacking {} into {}", dsc.display(), tree.display());
    output(Command::new("dpkg-source").arg("-x").arg(dsc).arg(tree))
        .with_context(|| format!("dpkg-source -x {}", dsc.display()))?;

    // dpkg-source leaves a copy of the upstream tarball beside the tree; download/ has one.
    if let Some(parent) = tree.parent() {
        for entry in
            fs::read_dir(parent).with_context(|| format!("reading {}", parent.display()))?
        {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if path.is_file() && name.starts_with(&format!("{SOURCE_PACKAGE}_")) {
                fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            }
        }
    }

    let vendored = tree.join(REFLECT2_VENDORED);
    eprintln!("xtask: replacing vendored modern-go/reflect2 with Debian's ({REFLECT2_DEBIAN})");
    let is_code = |p: &Path| {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        (name.ends_with(".go") && !name.ends_with("_test.go")) || name.ends_with(".s")
    };
    for entry in
        fs::read_dir(&vendored).with_context(|| format!("reading {}", vendored.display()))?
    {
        let path = entry?.path();
        if is_code(&path) {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    let mut copied = 0;
    for entry in
        fs::read_dir(REFLECT2_DEBIAN).with_context(|| format!("reading {REFLECT2_DEBIAN}"))?
    {
        let path = entry?.path();
        if is_code(&path) {
            let to = vendored.join(path.file_name().context("file without a name")?);
            fs::copy(&path, &to)
                .with_context(|| format!("copying {} to {}", path.display(), to.display()))?;
            copied += 1;
        }
    }
    ensure!(copied > 0, "no Go sources in {REFLECT2_DEBIAN}");

    // GOPATH mode, as Debian's own build does: .go/src/k8s.io/kubernetes -> the tree.
    let k8s_io = tree.join(".go/src/k8s.io");
    fs::create_dir_all(&k8s_io).with_context(|| format!("creating {}", k8s_io.display()))?;
    std::os::unix::fs::symlink("../../..", k8s_io.join("kubernetes"))
        .with_context(|| format!("linking {}/kubernetes", k8s_io.display()))?;
    fs::write(tree.join(PREPARED_STAMP), "").context("writing the prepared stamp")?;
    Ok(())
}

/// `make WHAT=...` in the tree, output to `log`, progress (the build's own `+++` lines and a
/// heartbeat) on stderr, the log's tail on failure.
fn run_make(tree: &Path, log_path: &Path) -> Result<()> {
    let what: Vec<String> = COMMANDS.iter().map(|c| format!("cmd/{c}")).collect();
    let what = what.join(" ");
    eprintln!("xtask: make WHAT=\"{what}\" (log: {})", log_path.display());
    let log = File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let log = Arc::new(Mutex::new(log));
    let mut child = Command::new("make")
        .arg(format!("WHAT={what}"))
        .current_dir(tree)
        .env("GOPATH", tree.join(".go"))
        .env("CGO_ENABLED", "0")
        .env("GO111MODULE", "off")
        .env_remove("GOFLAGS")
        .env_remove("GOBIN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting make (is the make package installed?)")?;
    let started = Instant::now();
    let mut readers = Vec::new();
    let stdout = child
        .stdout
        .take()
        .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>);
    let stderr = child
        .stderr
        .take()
        .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>);
    for stream in [stdout, stderr].into_iter().flatten() {
        let log = Arc::clone(&log);
        readers.push(std::thread::spawn(move || {
            // "+++ [date] Building go targets for linux/amd64:" is followed by indented targets.
            let mut in_list = false;
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if let Ok(mut f) = log.lock() {
                    let _ = writeln!(f, "{line}");
                }
                let progress = line.starts_with("+++") || (in_list && line.starts_with("    "));
                if progress {
                    let secs = started.elapsed().as_secs();
                    eprintln!(
                        "xtask: [{secs:>3} s] {}",
                        line.trim_start_matches("+++ ").trim_end()
                    );
                }
                in_list =
                    (progress && line.ends_with(':')) || (in_list && line.starts_with("    "));
            }
        }));
    }
    let mut next_heartbeat = Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for make")? {
            break status;
        }
        if started.elapsed() >= next_heartbeat {
            eprintln!(
                "xtask: [{:>3} s] still compiling (Go prints nothing while it works; log: {})",
                started.elapsed().as_secs(),
                log_path.display()
            );
            next_heartbeat += Duration::from_secs(60);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    for r in readers {
        let _ = r.join();
    }
    if !status.success() {
        eprintln!("xtask: make failed; last lines of {}:", log_path.display());
        eprintln!("{}", tail(log_path, LOG_TAIL_LINES));
        bail!(
            "make WHAT=\"{what}\" in {} failed ({status}); full log: {}",
            tree.display(),
            log_path.display()
        );
    }
    eprintln!("xtask: make finished in {} s", started.elapsed().as_secs());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A running control plane

/// Service IPs the API server hands out.
pub const SERVICE_CLUSTER_IP_RANGE: &str = "10.96.0.0/16";
const CLUSTER_NAME: &str = "serviceless-test";
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// A running etcd + kube-apiserver + kube-controller-manager on 127.0.0.1. Dropping it kills
/// the processes. Logs are `etcd.log`, `kube-apiserver.log` and `kube-controller-manager.log`
/// in the cluster's directory.
#[derive(Debug)]
pub struct Cluster {
    bins: Binaries,
    dir: PathBuf,
    kubeconfig: PathBuf,
    token: String,
    etcd_port: u16,
    etcd_peer_port: u16,
    apiserver_port: u16,
    etcd: Option<Proc>,
    apiserver: Option<Proc>,
    controller_manager: Option<Proc>,
}

/// Ensures the binaries (building them if needed) and starts a fresh cluster whose files live
/// in `dir` (created if missing; an earlier cluster's etcd data there is discarded).
pub fn start_cluster(dir: &Path) -> Result<Cluster> {
    let bins = ensure_binaries()?;
    Cluster::start(&bins, dir)
}

impl Cluster {
    /// Starts a fresh cluster with the given binaries; see [`start_cluster`].
    pub fn start(bins: &Binaries, dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("resolving {}", dir.display()))?;
        let etcd_data = dir.join("etcd");
        if etcd_data.exists() {
            fs::remove_dir_all(&etcd_data)
                .with_context(|| format!("removing {}", etcd_data.display()))?;
        }
        let [etcd_port, etcd_peer_port, apiserver_port] = free_ports()?;
        let token = random_hex(16)?;
        write_pki(&dir)?;
        let tokens = dir.join("tokens.csv");
        fs::write(&tokens, format!("{token},admin,admin,system:masters\n"))
            .with_context(|| format!("writing {}", tokens.display()))?;
        let kubeconfig = dir.join("kubeconfig");
        let ca = fs::read(dir.join("pki/ca.crt")).context("reading pki/ca.crt")?;
        fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\n\
                 kind: Config\n\
                 clusters:\n\
                 - name: {CLUSTER_NAME}\n  \
                   cluster:\n    \
                     server: https://127.0.0.1:{apiserver_port}\n    \
                     certificate-authority-data: {}\n\
                 users:\n\
                 - name: admin\n  \
                   user:\n    \
                     token: {token}\n\
                 contexts:\n\
                 - name: {CLUSTER_NAME}\n  \
                   context:\n    \
                     cluster: {CLUSTER_NAME}\n    \
                     user: admin\n    \
                     namespace: default\n\
                 current-context: {CLUSTER_NAME}\n",
                base64(&ca)
            ),
        )
        .with_context(|| format!("writing {}", kubeconfig.display()))?;

        let mut cluster = Self {
            bins: bins.clone(),
            dir,
            kubeconfig,
            token,
            etcd_port,
            etcd_peer_port,
            apiserver_port,
            etcd: None,
            apiserver: None,
            controller_manager: None,
        };
        // On any error below, dropping `cluster` kills what was started.
        cluster.start_etcd()?;
        cluster.start_apiserver()?;
        cluster.start_controller_manager()?;
        Ok(cluster)
    }

    /// The kubeconfig (server `https://127.0.0.1:<port>`, the cluster CA, an admin token).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.apiserver_port)
    }

    /// The API server's port; it stays the same across [`Self::stop_apiserver`] and
    /// [`Self::start_apiserver`].
    pub fn apiserver_port(&self) -> u16 {
        self.apiserver_port
    }

    /// Bearer token of a `system:masters` user.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// PEM file of the CA that signed the API server's certificate (for 127.0.0.1 and localhost).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("pki/ca.crt")
    }

    /// etcd's client URL.
    pub fn etcd_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.etcd_port)
    }

    /// The directory holding the kubeconfig, keys, etcd data and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The programs this cluster runs (and its kubectl).
    pub fn binaries(&self) -> &Binaries {
        &self.bins
    }

    /// A `kubectl --kubeconfig <this cluster>` command to add arguments to.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(&self.bins.kubectl);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        cmd
    }

    /// Whether kube-apiserver is running (started and not exited).
    /// The API server's audit log (JSON lines, one per request).
    pub fn audit_log_path(&self) -> PathBuf {
        self.dir.join("audit.log")
    }

    pub fn apiserver_running(&mut self) -> bool {
        self.apiserver
            .as_mut()
            .is_some_and(|p| matches!(p.exited(), Ok(None)))
    }

    /// Kills kube-apiserver (SIGKILL) and waits for it; etcd and the controller manager stay.
    pub fn stop_apiserver(&mut self) -> Result<()> {
        if let Some(apiserver) = self.apiserver.take() {
            apiserver.kill()?;
        }
        Ok(())
    }

    /// Starts kube-apiserver (again) on the same port with the same etcd, and waits until its
    /// /readyz answers ok. Does nothing if it is already running.
    pub fn start_apiserver(&mut self) -> Result<()> {
        if self.apiserver_running() {
            return Ok(());
        }
        let d = &self.dir;
        let mut cmd = Command::new(&self.bins.apiserver);
        cmd.arg(format!("--etcd-servers={}", self.etcd_url()))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={}", self.apiserver_port))
            .arg(format!(
                "--cert-dir={}",
                d.join("pki/apiserver-generated").display()
            ))
            .arg(format!(
                "--tls-cert-file={}",
                d.join("pki/apiserver.crt").display()
            ))
            .arg(format!(
                "--tls-private-key-file={}",
                d.join("pki/apiserver.key").display()
            ))
            .arg(format!(
                "--token-auth-file={}",
                d.join("tokens.csv").display()
            ))
            .arg("--authorization-mode=RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!(
                "--service-account-key-file={}",
                d.join("pki/sa.key").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                d.join("pki/sa.key").display()
            ))
            .arg(format!(
                "--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"
            ))
            .arg("--disable-admission-plugins=ServiceAccount")
            .arg("--allow-privileged=true")
            .arg("--logtostderr=true")
            .arg("--v=1");
        // Every request, at Metadata level (verb, resource, URI, user, user
        // agent), appended across restarts: what the tests count clients by.
        let policy = d.join("audit-policy.yaml");
        std::fs::write(
            &policy,
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n  - level: Metadata\n",
        )?;
        cmd.arg(format!("--audit-policy-file={}", policy.display()))
            .arg(format!("--audit-log-path={}", self.audit_log_path().display()))
            .arg("--audit-log-format=json");
        self.apiserver = Some(spawn_logged(cmd, &d.join("kube-apiserver.log"), APISERVER)?);
        self.wait_apiserver_ready()
    }

    fn start_etcd(&mut self) -> Result<()> {
        let client = self.etcd_url();
        let peer = format!("http://127.0.0.1:{}", self.etcd_peer_port);
        let mut cmd = Command::new(&self.bins.etcd);
        cmd.arg(format!("--name={CLUSTER_NAME}"))
            .arg(format!("--data-dir={}", self.dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={CLUSTER_NAME}={peer}"))
            .arg("--initial-cluster-state=new");
        let mut etcd = spawn_logged(cmd, &self.dir.join("etcd.log"), "etcd")?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if etcd_healthy(self.etcd_port) {
                break;
            }
            if let Some(status) = etcd.exited()? {
                bail!(
                    "etcd exited ({status}):\n{}",
                    tail(&self.dir.join("etcd.log"), LOG_TAIL_LINES)
                );
            }
            if Instant::now() > deadline {
                let _ = etcd.kill();
                bail!(
                    "etcd not healthy after {READY_TIMEOUT:?}:\n{}",
                    tail(&self.dir.join("etcd.log"), LOG_TAIL_LINES)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.etcd = Some(etcd);
        Ok(())
    }

    fn start_controller_manager(&mut self) -> Result<()> {
        let mut cmd = Command::new(&self.bins.controller_manager);
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg("--controllers=deployment,replicaset")
            .arg("--leader-elect=false")
            // Serve nothing, so clusters running side by side do not fight over ports.
            .arg("--port=0")
            .arg("--secure-port=0")
            .arg("--logtostderr=true")
            .arg("--v=1");
        self.controller_manager = Some(spawn_logged(
            cmd,
            &self.dir.join("kube-controller-manager.log"),
            CONTROLLER_MANAGER,
        )?);
        Ok(())
    }

    fn wait_apiserver_ready(&mut self) -> Result<()> {
        let log = self.dir.join("kube-apiserver.log");
        let started = Instant::now();
        loop {
            let out = self
                .kubectl()
                .args(["get", "--raw=/readyz", "--request-timeout=5s"])
                .output();
            if let Ok(out) = out
                && out.status.success()
                && out.stdout.starts_with(b"ok")
            {
                return Ok(());
            }
            if let Some(apiserver) = self.apiserver.as_mut()
                && let Some(status) = apiserver.exited()?
            {
                self.apiserver = None;
                bail!(
                    "kube-apiserver exited ({status}):\n{}",
                    tail(&log, LOG_TAIL_LINES)
                );
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!(
                    "kube-apiserver not ready after {READY_TIMEOUT:?} on {}:\n{}",
                    self.server_url(),
                    tail(&log, LOG_TAIL_LINES)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for proc in [
            self.controller_manager.take(),
            self.apiserver.take(),
            self.etcd.take(),
        ] {
            if let Some(proc) = proc
                && let Err(e) = proc.kill()
            {
                eprintln!("xtask: {e:#}");
            }
        }
    }
}

/// A control-plane process, and a watchdog shell that SIGKILLs it when this process dies
/// without dropping the [`Cluster`] (a test run killed on a timeout, say): the watchdog waits
/// for end-of-file on a pipe whose only writer is this process.
#[derive(Debug)]
struct Proc {
    name: &'static str,
    child: Child,
    watchdog: Child,
}

impl Proc {
    fn exited(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("waiting for {}", self.name))
    }

    /// SIGKILL and wait.
    fn kill(mut self) -> Result<()> {
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
        // kill() fails only if the process already exited, which wait() then reports.
        let _ = self.child.kill();
        self.child.wait().with_context(|| {
            format!(
                "waiting for {} (pid {}) to exit",
                self.name,
                self.child.id()
            )
        })?;
        Ok(())
    }
}

fn spawn_logged(mut cmd: Command, log: &Path, name: &'static str) -> Result<Proc> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = file
        .try_clone()
        .with_context(|| format!("duplicating {}", log.display()))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
    let watchdog = Command::new("sh")
        .args(["-c", "read -r _; kill -9 \"$1\" 2>/dev/null", "watchdog"])
        .arg(child.id().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match watchdog {
        Ok(watchdog) => Ok(Proc {
            name,
            child,
            watchdog,
        }),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e).with_context(|| format!("starting the watchdog shell for {name}"))
        }
    }
}

fn etcd_healthy(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

/// Three distinct free TCP ports on 127.0.0.1 (held together while choosing).
fn free_ports() -> Result<[u16; 3]> {
    let listeners = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("binding 127.0.0.1:0 to find free ports")?;
    let mut ports = [0; 3];
    for (p, l) in ports.iter_mut().zip(&listeners) {
        *p = l.local_addr().context("local_addr")?.port();
    }
    Ok(ports)
}

/// CA, API server serving certificate (127.0.0.1, localhost) and service-account key in
/// `dir/pki`, made with openssl. A real CA (not a self-signed leaf) so that rustls clients
/// accept it too.
fn write_pki(dir: &Path) -> Result<()> {
    let pki = dir.join("pki");
    fs::create_dir_all(&pki).with_context(|| format!("creating {}", pki.display()))?;
    let openssl = |args: &[&str]| -> Result<()> {
        output(Command::new("openssl").args(args).current_dir(&pki)).map(drop)
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "3650",
        "-subj",
        "/CN=serviceless-test-ca",
    ])
    .context("creating the test CA")?;
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "apiserver.key",
        "-out",
        "apiserver.csr",
        "-subj",
        "/CN=kube-apiserver",
    ])
    .context("creating the API server key")?;
    fs::write(
        pki.join("apiserver.ext"),
        "basicConstraints = critical, CA:FALSE\n\
         keyUsage = critical, digitalSignature, keyEncipherment\n\
         extendedKeyUsage = serverAuth\n\
         subjectAltName = IP:127.0.0.1, DNS:localhost, DNS:kubernetes, DNS:kubernetes.default, \
         DNS:kubernetes.default.svc\n",
    )
    .context("writing pki/apiserver.ext")?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "apiserver.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "apiserver.crt",
        "-days",
        "3650",
        "-extfile",
        "apiserver.ext",
    ])
    .context("signing the API server certificate")?;
    openssl(&["genrsa", "-out", "sa.key", "2048"]).context("creating the service-account key")?;
    Ok(())
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0; bytes];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom")?;
    Ok(buf.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Small helpers

fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Runs a command with inherited output; errors name the command.
fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed ({status})");
    Ok(())
}

/// Runs a command and returns its stdout; on failure the error holds its stderr and stdout.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            stdout
        );
    }
    Ok(stdout)
}

fn tail(path: &Path, lines: usize) -> String {
    match fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn parses_source_entries() {
        let deb822 = "Types: deb\n# comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n\
                      Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
                      Types: deb\nURIs: http://other.example/debian-security\nSuites: bookworm-security\nComponents: main\n";
        assert_eq!(
            mirror_from_deb822(deb822),
            Some((
                "http://mirror.example/debian".to_owned(),
                Some("/usr/share/keyrings/debian-archive-keyring.gpg".to_owned())
            ))
        );
        let list = "# x\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main contrib\n";
        assert_eq!(
            mirror_from_one_line(list),
            Some((
                "http://m.example/debian".to_owned(),
                Some("/k.gpg".to_owned())
            ))
        );
        assert_eq!(
            mirror_from_one_line("deb http://m.example/debian trixie main\n"),
            None
        );
    }

    fn kubectl_ok(cluster: &Cluster, args: &[&str]) -> String {
        let out = cluster
            .kubectl()
            .args(args)
            .output()
            .expect("running kubectl");
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Builds the binaries if needed (~6 min), then runs a whole control plane.
    #[test]
    #[ignore = "needs root, Debian packages and the Kubernetes build (cargo xtask k8s-apiserver)"]
    fn cluster_turns_deployments_into_pods_and_survives_an_apiserver_restart() {
        let dir = std::env::temp_dir().join(format!("serviceless-k8s-test-{}", std::process::id()));
        let started = Instant::now();
        let mut cluster = start_cluster(&dir).expect("starting the cluster");
        eprintln!(
            "cluster ready in {:?} at {}",
            started.elapsed(),
            cluster.server_url()
        );
        let kubeconfig = fs::read_to_string(cluster.kubeconfig_path()).expect("reading kubeconfig");
        assert!(kubeconfig.contains(&cluster.server_url()));

        let namespaces = kubectl_ok(&cluster, &["get", "ns", "-o", "name"]);
        assert!(namespaces.contains("namespace/default"), "{namespaces}");

        kubectl_ok(
            &cluster,
            &[
                "create",
                "deployment",
                "web",
                "--image=registry.invalid/web",
                "--replicas=2",
            ],
        );
        let pods = |c: &Cluster| {
            kubectl_ok(c, &["get", "pods", "-l", "app=web", "-o", "name"])
                .lines()
                .count()
        };
        wait_for("a ReplicaSet", || {
            !kubectl_ok(&cluster, &["get", "rs", "-l", "app=web", "-o", "name"])
                .trim()
                .is_empty()
        });
        wait_for("2 pods", || pods(&cluster) == 2);

        // The API server goes away and comes back on the same port with the same etcd.
        let port = cluster.apiserver_port();
        cluster.stop_apiserver().expect("stopping kube-apiserver");
        let down = cluster
            .kubectl()
            .args(["get", "ns", "--request-timeout=2s"])
            .output()
            .expect("kubectl");
        assert!(
            !down.status.success(),
            "kubectl worked with the API server stopped"
        );
        cluster
            .start_apiserver()
            .expect("restarting kube-apiserver");
        assert_eq!(cluster.apiserver_port(), port);
        kubectl_ok(&cluster, &["get", "deployment", "web"]);

        // The controller manager reconnected.
        kubectl_ok(&cluster, &["scale", "deployment", "web", "--replicas=3"]);
        wait_for("3 pods after the restart", || pods(&cluster) == 3);

        drop(cluster);
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "kube-apiserver still listening"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
