//! `cargo xtask bench`: Serviceless against kube-proxy-style iptables and
//! nftables in the same run. Installs what it needs, builds in release
//! mode, runs `serviceless-bench` (tests/src/bin/bench.rs) as root, plots
//! the results (matplotlib) and prints the results folder.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::{build, setup};

#[derive(clap::Args)]
pub struct Args {
    /// CI smoke run: N in {1, 1000}, few repeats, 2 s of traffic per point (a couple of minutes).
    #[arg(long)]
    quick: bool,
    /// Results folder (default: target/bench/<timestamp>[-quick]).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Comma-separated app counts (default: 1,1000,10000,100000,1000000; quick: 1,1000).
    #[arg(long)]
    sizes: Option<String>,
    /// Skip the network-namespace traffic scenario.
    #[arg(long)]
    no_traffic: bool,
}

impl Args {
    /// What CI runs: `--quick`, results under target/bench.
    pub fn quick() -> Self {
        Self { quick: true, out: None, sizes: None, no_traffic: false }
    }
}

const PLOT_SCRIPT: &str = include_str!("bench_plot.py");

pub fn run(args: &Args) -> anyhow::Result<()> {
    setup::run()?;
    setup::ensure_packages(&[
        "iptables",
        "nftables",
        "bpftool",
        "iproute2",
        "python3-matplotlib",
        // Packet rate (trafgen), nginx + wrk, and conntrack -F between baseline trials.
        "netsniff-ng",
        "nginx-light",
        "wrk",
        "conntrack",
    ])?;
    build::cargo(&[
        "build",
        "--release",
        "-p",
        "serviceless-agent",
        "-p",
        "serviceless-tests",
        "--bins",
    ])?;
    let root = build::root();
    let out = match &args.out {
        Some(p) => p.clone(),
        None => {
            let stamp = String::from_utf8_lossy(
                &Command::new("date")
                    .arg("-u")
                    .arg("+%Y%m%dT%H%M%SZ")
                    .output()?
                    .stdout,
            )
            .trim()
            .to_string();
            root.join("target/bench").join(if args.quick {
                format!("{stamp}-quick")
            } else {
                stamp
            })
        }
    };
    std::fs::create_dir_all(&out)?;
    let mut cmd = Command::new(root.join("target/release/serviceless-bench"));
    cmd.arg("--out").arg(&out);
    if args.quick {
        cmd.arg("--quick");
    }
    if let Some(s) = &args.sizes {
        cmd.args(["--sizes", s]);
    }
    if args.no_traffic {
        cmd.arg("--no-traffic");
    }
    let status = cmd
        .status()
        .context("running serviceless-bench (needs root)")?;
    if !status.success() {
        bail!(
            "serviceless-bench failed; partial results in {}",
            out.display()
        );
    }
    let script = out.join("plot.py");
    std::fs::write(&script, PLOT_SCRIPT)?;
    // Debian's python3 has python3-matplotlib; a pyenv python on PATH may not.
    let python = if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let plotted = Command::new(python)
        .arg(&script)
        .arg(&out)
        .status()
        .context("running python3 for the plots")?;
    let _ = std::fs::remove_file(&script);
    if !plotted.success() {
        bail!(
            "plotting failed; results (without plots) in {}",
            out.display()
        );
    }
    println!("xtask: bench results in {}", out.display());
    println!("xtask:   {}", out.join("results.md").display());
    println!("xtask:   {}", out.join("results.json").display());
    Ok(())
}
