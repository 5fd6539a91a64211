//! Builds through cargo with the workspace's settings.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The workspace root (xtask's parent directory).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Runs cargo with `args` in the workspace root.
pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(root())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(())
}

/// Builds the release agent; returns its path.
pub fn agent() -> anyhow::Result<PathBuf> {
    cargo(&["build", "--release", "-p", "serviceless-agent"])?;
    let path = root().join("target/release/serviceless");
    println!("xtask: built {}", path.display());
    Ok(path)
}
