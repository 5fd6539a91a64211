//! Debian kernels for the VM: resolve a kernel line ("6.1", "6.12") to the
//! newest `linux-image-<line>.*-cloud-amd64` package apt knows, fetch it with
//! `apt-get download`, unpack it with `dpkg -x` into the cache, and pick
//! modules (with their dependencies, decompressed) out of it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail, ensure};

use super::{cache_dir, command_output};

/// An unpacked kernel package.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// What was asked for: a line ("6.1") or a full package name.
    pub line: String,
    /// Package name, e.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub package: String,
    /// Package version, e.g. `6.1.192-2`.
    pub version: String,
    /// `uname -r` inside the VM, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    pub vmlinuz: PathBuf,
    pub modules_dir: PathBuf,
}

const FLAVOUR_SUFFIX: &str = "-cloud-amd64";

/// Whether `name` is a real (non-meta, signed) cloud image of `line`:
/// `linux-image-6.1` + `.0-56-cloud-amd64`, `linux-image-6.12` +
/// `.117+deb12-cloud-amd64`; not `linux-image-6.12-cloud-amd64` (the meta
/// package), not `linux-image-6.12.117+deb12-cloud-amd64-unsigned`.
fn is_image_of(name: &str, line: &str) -> bool {
    let Some(rest) = name
        .strip_prefix("linux-image-")
        .and_then(|r| r.strip_prefix(line))
    else {
        return false;
    };
    (rest.starts_with('.') || rest.starts_with('+')) && rest.ends_with(FLAVOUR_SUFFIX)
}

/// Returns the unpacked kernel for `line`, downloading it if the cache does
/// not hold the newest version apt knows. Works offline from the cache.
pub fn ensure(line: &str) -> anyhow::Result<Kernel> {
    let kernels = cache_dir().join("kernels");
    fs::create_dir_all(&kernels).with_context(|| format!("creating {}", kernels.display()))?;
    let resolved = match resolve(line) {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("vm: cannot resolve kernel {line} with apt ({e:#}); looking in the cache");
            None
        }
    };
    let (package, version) = match resolved {
        Some(pv) => pv,
        None => newest_cached(&kernels, line)?.with_context(|| {
            format!(
                "no kernel package for {line} in apt or in {}",
                kernels.display()
            )
        })?,
    };
    let dir = kernels.join(format!("{package}_{version}"));
    if !dir.join(".complete").exists() {
        download(&package, &version, &kernels, &dir)?;
    }
    open(line, &package, &version, &dir)
}

/// The newest package (name, version) for `line` apt knows.
fn resolve(line: &str) -> anyhow::Result<(String, String)> {
    if line.starts_with("linux-image-") {
        let version = candidates(&[line.to_owned()])?
            .pop()
            .map(|(_, v)| v)
            .with_context(|| format!("apt has no candidate for {line}"))?;
        return Ok((line.to_owned(), version));
    }
    let names: Vec<String> = command_output(
        Command::new("apt-cache").args(["pkgnames", &format!("linux-image-{line}")]),
    )?
    .lines()
    .map(str::trim)
    .filter(|n| is_image_of(n, line))
    .map(str::to_owned)
    .collect();
    ensure!(
        !names.is_empty(),
        "apt-cache knows no linux-image-{line}.*{FLAVOUR_SUFFIX} package"
    );
    let mut best: Option<(String, String)> = None;
    for (name, version) in candidates(&names)? {
        let newer = match &best {
            None => true,
            Some((_, v)) => version_gt(&version, v)?,
        };
        if newer {
            best = Some((name, version));
        }
    }
    best.with_context(|| format!("no installable candidate among {names:?}"))
}

/// Candidate versions of `names` from `apt-cache policy`.
fn candidates(names: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    let text = command_output(Command::new("apt-cache").arg("policy").args(names))?;
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            current = Some(line.trim_end_matches(':').to_owned());
        } else if let Some(v) = line.trim().strip_prefix("Candidate:") {
            let v = v.trim();
            if let Some(name) = current.take()
                && v != "(none)"
            {
                out.push((name, v.to_owned()));
            }
        }
    }
    Ok(out)
}

fn version_gt(a: &str, b: &str) -> anyhow::Result<bool> {
    let status = Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .context("running dpkg --compare-versions")?;
    Ok(status.success())
}

/// Offline fallback: the newest unpacked package for `line` in the cache.
fn newest_cached(kernels: &Path, line: &str) -> anyhow::Result<Option<(String, String)>> {
    let mut best: Option<(String, String)> = None;
    for entry in fs::read_dir(kernels)? {
        let entry = entry?;
        if !entry.path().join(".complete").exists() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((package, version)) = name.split_once('_') else {
            continue;
        };
        if !(is_image_of(package, line) || package == line) {
            continue;
        }
        let newer = match &best {
            None => true,
            Some((_, v)) => version_gt(version, v)?,
        };
        if newer {
            best = Some((package.to_owned(), version.to_owned()));
        }
    }
    Ok(best)
}

fn download(package: &str, version: &str, kernels: &Path, dir: &Path) -> anyhow::Result<()> {
    let tmp = kernels.join(format!(".tmp-{}-{package}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    eprintln!("vm: downloading {package} {version}");
    let get = |tmp: &Path| {
        Command::new("apt-get")
            .args([
                "-q",
                "-o",
                "APT::Sandbox::User=root",
                "download",
                &format!("{package}={version}"),
            ])
            .current_dir(tmp)
            .status()
    };
    if !get(&tmp).context("running apt-get download")?.success() {
        eprintln!("vm: apt-get download failed; running apt-get update and retrying");
        let _ = Command::new("apt-get").args(["-q", "update"]).status();
        ensure!(
            get(&tmp)?.success(),
            "apt-get download {package}={version} failed"
        );
    }
    let deb = fs::read_dir(&tmp)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download produced no .deb")?;
    let root = tmp.join("root");
    let status = Command::new("dpkg")
        .arg("-x")
        .arg(&deb)
        .arg(&root)
        .status()
        .context("running dpkg -x")?;
    ensure!(status.success(), "dpkg -x {} failed", deb.display());
    fs::write(root.join(".complete"), format!("{package} {version}\n"))?;
    let _ = fs::remove_dir_all(dir);
    fs::rename(&root, dir)
        .with_context(|| format!("moving the unpacked kernel to {}", dir.display()))?;
    let _ = fs::remove_dir_all(&tmp);
    Ok(())
}

fn open(line: &str, package: &str, version: &str, dir: &Path) -> anyhow::Result<Kernel> {
    let boot = dir.join("boot");
    let vmlinuz = fs::read_dir(&boot)
        .with_context(|| format!("reading {}", boot.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no vmlinuz in {}", boot.display()))?;
    let release =
        vmlinuz.file_name().unwrap_or_default().to_string_lossy()["vmlinuz-".len()..].to_owned();
    let modules_dir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|m| dir.join(m).join(&release))
        .find(|p| p.is_dir())
        .with_context(|| format!("no modules directory for {release} in {}", dir.display()))?;
    Ok(Kernel {
        line: line.to_owned(),
        package: package.to_owned(),
        version: version.to_owned(),
        release,
        vmlinuz,
        modules_dir,
    })
}

/// A module to load in the VM, already decompressed.
pub struct Module {
    pub name: String,
    pub data: Vec<u8>,
}

impl Kernel {
    /// `wanted` and their dependencies (from each module's `.modinfo`
    /// `depends=`, as the packages carry no modules.dep), in load order.
    /// Modules built into this kernel are skipped.
    pub fn modules(&self, wanted: &[String]) -> anyhow::Result<Vec<Module>> {
        let mut files = BTreeMap::new();
        index_modules(&self.modules_dir.join("kernel"), &mut files)?;
        let builtin: BTreeSet<String> =
            fs::read_to_string(self.modules_dir.join("modules.builtin"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.rsplit('/').next())
                .map(module_name)
                .collect();
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for name in wanted {
            self.visit(&module_name(name), &files, &builtin, &mut seen, &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        files: &BTreeMap<String, PathBuf>,
        builtin: &BTreeSet<String>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<Module>,
    ) -> anyhow::Result<()> {
        if !seen.insert(name.to_owned()) || builtin.contains(name) {
            return Ok(());
        }
        let path = files.get(name).with_context(|| {
            format!(
                "module {name} is neither built into {} nor shipped with it",
                self.release
            )
        })?;
        let data = decompress(path)?;
        for dep in depends(&data) {
            self.visit(&dep, files, builtin, seen, order)?;
        }
        order.push(Module {
            name: name.to_owned(),
            data,
        });
        Ok(())
    }
}

/// "net/sched/cls_bpf.ko.xz" or "cls-bpf" -> "cls_bpf".
fn module_name(file: &str) -> String {
    let base = file.rsplit('/').next().unwrap_or(file);
    let base = base.split(".ko").next().unwrap_or(base);
    base.replace('-', "_")
}

fn index_modules(dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            index_modules(&path, out)?;
        } else if path.to_string_lossy().contains(".ko") {
            out.insert(module_name(&path.to_string_lossy()), path);
        }
    }
    Ok(())
}

fn decompress(path: &Path) -> anyhow::Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        return fs::read(path).with_context(|| format!("reading {name}"));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("running {tool} -dc {name}"))?;
    if !out.status.success() {
        bail!(
            "{tool} -dc {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// The `depends=` entry of a module's `.modinfo` section (NUL-separated
/// `key=value` strings).
fn depends(module: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"depends=";
    let mut i = 0;
    while let Some(pos) = find(&module[i..], KEY) {
        let start = i + pos;
        i = start + KEY.len();
        if start > 0 && module[start - 1] != 0 {
            continue;
        }
        let end = module[i..]
            .iter()
            .position(|&b| b == 0)
            .map_or(module.len(), |e| i + e);
        return String::from_utf8_lossy(&module[i..end])
            .split(',')
            .filter(|d| !d.is_empty())
            .map(module_name)
            .collect();
    }
    Vec::new()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names() {
        assert!(is_image_of("linux-image-6.1.0-56-cloud-amd64", "6.1"));
        assert!(is_image_of(
            "linux-image-6.12.117+deb12-cloud-amd64",
            "6.12"
        ));
        assert!(!is_image_of(
            "linux-image-6.12.117+deb12-cloud-amd64",
            "6.1"
        ));
        assert!(!is_image_of("linux-image-6.12-cloud-amd64", "6.12"));
        assert!(!is_image_of(
            "linux-image-6.1.0-56-cloud-amd64-unsigned",
            "6.1"
        ));
        assert!(!is_image_of("linux-image-6.1.0-56-cloud-amd64-dbg", "6.1"));
    }

    #[test]
    fn modinfo_depends() {
        let blob = b"junk\0alias=x\0depends=virtio,virtio_ring,net-failover\0vermagic=6.1\0";
        assert_eq!(depends(blob), ["virtio", "virtio_ring", "net_failover"]);
        assert!(depends(b"\0depends=\0").is_empty());
        assert!(depends(b"xdepends=foo\0").is_empty());
    }
}
