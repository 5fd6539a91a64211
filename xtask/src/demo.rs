//! `cargo xtask demo`: builds, then runs the self-contained demo (network
//! namespaces, the agent on the embedded file source, real traffic).

use crate::{build, setup};

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: &Args) -> anyhow::Result<()> {
    setup::run()?;
    anyhow::ensure!(setup::is_root(), "the demo creates network namespaces and attaches XDP: run it as root");
    setup::ensure_bpffs()?;
    build::cargo(&["build", "--quiet", "-p", "serviceless-agent", "-p", "serviceless-tests", "--bins"])?;
    let demo = build::root().join("target/debug/serviceless-demo");
    let status = std::process::Command::new(&demo).status()?;
    anyhow::ensure!(status.success(), "demo failed");
    Ok(())
}
