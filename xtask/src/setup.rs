//! Installs what building and testing need, only where missing, so every
//! task can call it and a machine that has everything pays well under a
//! second. Facts behind each step: ../shared/toolchain.md.

use std::process::Command;

use anyhow::{Context as _, bail};

/// Debian packages the build, the tests and the demo use.
pub const PACKAGES: &[&str] = &[
    // Debian's rustc (1.96) ships a precompiled core for bpfel-unknown-none.
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    // bpf-linker links against LLVM 22 (the LLVM of that rustc).
    "llvm-22-dev",
    // Inspecting and testing: bpftool, ip/tc, ethtool (checksum offload off on test veths).
    "bpftool",
    "iproute2",
    "ethtool",
    "curl",
    // dig, for the DNS tests' real queries.
    "bind9-dnsutils",
];

/// bpf-linker version known to build against Debian's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The rustup name of Debian's toolchain, used by agent/build.rs.
pub const BPF_TOOLCHAIN: &str = "serviceless-bpf";

pub fn run() -> anyhow::Result<()> {
    ensure_packages(PACKAGES)?;
    ensure_bpf_linker()?;
    ensure_toolchain_link()?;
    Ok(())
}

/// Installs the missing ones among `packages` with apt-get.
pub fn ensure_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing = missing_packages(packages)?;
    if missing.is_empty() {
        return Ok(());
    }
    println!("xtask: installing Debian packages: {}", missing.join(" "));
    let install = |pkgs: &[String]| {
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(pkgs)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
    };
    let ok = install(&missing).context("running apt-get (root needed)")?.success();
    if !ok {
        // The package lists may be stale or absent on a fresh machine.
        let updated = Command::new("apt-get").args(["update", "-q"]).status()?.success();
        if !updated || !install(&missing)?.success() {
            bail!("apt-get install {} failed", missing.join(" "));
        }
    }
    Ok(())
}

fn missing_packages(packages: &[&str]) -> anyhow::Result<Vec<String>> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Abbrev}\n"])
        .args(packages)
        .output()
        .context("running dpkg-query (is this Debian?)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, status)| status.starts_with("ii"))
        .map(|(name, _)| name)
        .collect();
    Ok(packages.iter().filter(|p| !installed.contains(p)).map(|p| p.to_string()).collect())
}

fn cargo_bin(name: &str) -> std::path::PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo"));
    home.join("bin").join(name)
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    let linker = cargo_bin("bpf-linker");
    let version = Command::new(&linker).arg("--version").output().ok().map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if version.is_some_and(|v| v.contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    println!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    let status = Command::new("cargo")
        .args(["install", "--locked", &format!("bpf-linker@{BPF_LINKER_VERSION}"), "--no-default-features", "--features", "llvm-22"])
        // Without this, its build looks for libLLVM in /usr/lib64.
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() {
        bail!("cargo install bpf-linker failed");
    }
    Ok(())
}

fn ensure_toolchain_link() -> anyhow::Result<()> {
    let list = Command::new("rustup").args(["toolchain", "list"]).output().context("running rustup")?;
    if String::from_utf8_lossy(&list.stdout).lines().any(|l| l.starts_with(BPF_TOOLCHAIN)) {
        return Ok(());
    }
    println!("xtask: linking Debian's rustc as the rustup toolchain '{BPF_TOOLCHAIN}'");
    let status = Command::new("rustup").args(["toolchain", "link", BPF_TOOLCHAIN, "/usr"]).status()?;
    if !status.success() {
        bail!("rustup toolchain link {BPF_TOOLCHAIN} /usr failed");
    }
    Ok(())
}

/// Mounts bpffs at /sys/fs/bpf when it is not (it is not at boot here).
pub fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if mounts.lines().any(|l| l.starts_with("bpf /sys/fs/bpf ")) {
        return Ok(());
    }
    let status = Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]).status()?;
    if !status.success() {
        bail!("mount -t bpf bpf /sys/fs/bpf failed (root needed)");
    }
    Ok(())
}

/// Whether we run as root (kernel tests and the demo need it).
pub fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}
