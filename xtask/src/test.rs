//! `cargo xtask test`: everything CI runs. Kernel tests need root and skip
//! with a message elsewhere.

use crate::{bench, build, previous, setup, vm};

#[derive(clap::Args)]
pub struct Args {
    /// Skip clippy.
    #[arg(long)]
    pub no_lint: bool,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    setup::run()?;
    if setup::is_root() {
        setup::ensure_bpffs()?;
    } else {
        println!("xtask: not root: kernel tests (BPF_PROG_TEST_RUN, network namespaces) will skip");
    }
    if !args.no_lint {
        println!("xtask: clippy");
        build::cargo(&["clippy", "--workspace", "--exclude", "dataplane-ebpf", "--all-targets", "--quiet", "--", "-D", "warnings"])?;
    }
    // The traffic tests start the agent binary from the same target directory.
    build::cargo(&["build", "--quiet", "-p", "serviceless-agent", "-p", "serviceless-tests", "--bins"])?;
    // The upgrade test starts a node on the previous release's agent.
    if setup::is_root()
        && let Some(bin) = previous::agent()?
    {
        // SAFETY: single-threaded here; the variable is read by the test processes cargo starts.
        unsafe { std::env::set_var("SERVICELESS_PREVIOUS_BIN", bin) };
    }
    println!("xtask: unit tests, packet fixtures, network-namespace traffic tests, upgrade");
    // One test at a time: the traffic tests time real connections on 2 cores.
    build::cargo(&["test", "--workspace", "--exclude", "dataplane-ebpf", "--", "--test-threads=1"])?;
    if setup::is_root() {
        // The packet fixtures and the eBPF load/attach checks on the oldest
        // kernel we support and a current one (TCG: about 20 s each).
        println!("xtask: kernel tests in QEMU ({})", vm::DEFAULT_KERNELS.join(", "));
        vm::run(&vm::Args { timeout: 300, ..vm::Args::default() })?;
        // Proves the benchmark harness works end to end; numbers are not judged.
        println!("xtask: benchmark smoke run (cargo xtask bench --quick)");
        bench::run(&bench::Args::quick())?;
    } else {
        println!("xtask: not root: kernel tests in QEMU and the benchmark smoke run skipped");
    }
    println!("xtask: all tests passed");
    Ok(())
}
