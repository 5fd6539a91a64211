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

/// Builds the integration test `test` of `package` in release mode without
/// running it (`cargo test --release --no-run`, diagnostics rendered) and
/// returns the test executable's path, read from cargo's JSON messages.
pub fn test_binary(package: &str, test: &str) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let args = ["test", "--release", "-p", package, "--test", test, "--no-run", "--message-format=json-render-diagnostics"];
    let out = Command::new(&cargo)
        .args(args)
        .current_dir(root())
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let executable = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter(|m| m["target"]["name"] == test && m["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "test")))
        .find_map(|m| m["executable"].as_str().map(PathBuf::from));
    executable.with_context(|| format!("cargo reported no executable for test {test} of {package}"))
}
