//! Builds the eBPF object with Debian's rustc (the `serviceless-bpf` rustup
//! toolchain that `cargo xtask setup` links), which ships a precompiled
//! `core` for bpfel-unknown-none, and embeds it in the agent.
//!
//! `AYA_BUILD_SKIP=1` skips that (for `cargo check`/clippy without the eBPF
//! toolchain); the agent then embeds an empty object and says so at load.
use std::{env, fs, path::PathBuf};

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        fs::write(out_dir.join("serviceless"), b"")?;
        return Ok(());
    }
    // Debian's rustc is a stable compiler; aya-ebpf and our programs use a
    // few nightly features, enabled for exactly those crates. (A value of
    // "1" would make aya-build ask for -Z build-std, which needs rust-src.)
    // SAFETY: build scripts are single-threaded.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf,serviceless") };
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?);
    let root = manifest.join("../dataplane-ebpf");
    let root = root.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [Package { name: "dataplane-ebpf", root_dir: root, ..Default::default() }],
        Toolchain::Custom("serviceless-bpf"),
    )
}
