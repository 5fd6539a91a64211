//! The previous release's agent, built from git, for the upgrade test
//! (tests/tests/upgrade.rs): a node running it is upgraded to this one.
//! Cached in /var/cache/serviceless/previous/<commit>/serviceless.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::build;

/// The last release with the v1 map layout (loose flow tables).
pub const PREVIOUS_RELEASE: &str = "2e1a7657be245f14941976c763e8881fc972e694";

const CACHE: &str = "/var/cache/serviceless/previous";

/// The previous release's agent binary, built if not cached; `None` (with
/// the reason printed) when this checkout has no such commit (a shallow clone).
pub fn agent() -> anyhow::Result<Option<PathBuf>> {
    let dir = Path::new(CACHE).join(PREVIOUS_RELEASE);
    let bin = dir.join("serviceless");
    if bin.is_file() {
        return Ok(Some(bin));
    }
    let root = build::root();
    let have = Command::new("git")
        .args(["cat-file", "-e", &format!("{PREVIOUS_RELEASE}^{{commit}}")])
        .current_dir(&root)
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        println!("xtask: commit {PREVIOUS_RELEASE} (the previous release) is not in this checkout; the upgrade test will skip");
        return Ok(None);
    }
    println!("xtask: building the previous release's agent ({}) for the upgrade test", &PREVIOUS_RELEASE[..12]);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let src = dir.join("src");
    let _ = std::fs::remove_dir_all(&src);
    let _ = git(&root, &["worktree", "prune"]);
    git(&root, &["worktree", "add", "--detach", "--force", path_str(&src)?, PREVIOUS_RELEASE])?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target = dir.join("target");
    let built = Command::new(&cargo)
        .args(["build", "--quiet", "-p", "serviceless-agent", "--target-dir", path_str(&target)?])
        .current_dir(&src)
        .status()
        .context("running cargo build for the previous release")?;
    let result = if built.success() {
        std::fs::copy(target.join("debug/serviceless"), &bin)
            .with_context(|| format!("copying the previous agent to {}", bin.display()))
            .map(drop)
    } else {
        Err(anyhow::anyhow!("building the previous release {PREVIOUS_RELEASE} failed"))
    };
    let _ = git(&root, &["worktree", "remove", "--force", path_str(&src)?]);
    let _ = std::fs::remove_dir_all(&target);
    result.map(|()| Some(bin))
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

fn git(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("git").args(args).current_dir(root).status().context("running git")?;
    if !status.success() {
        bail!("git {} failed", args.join(" "));
    }
    Ok(())
}
