//! `cargo xtask <task>`: every project task, each in its own module.
//! Each task sets up what it needs first (see `setup`), so a fresh machine
//! needs nothing but this repository and cargo.

mod bench;
mod build;
mod demo;
mod k8s;
mod previous;
mod setup;
mod test;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Serviceless project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain pieces (Debian packages, bpf-linker) if missing.
    Setup,
    /// Build the agent (with its embedded eBPF object) in release mode.
    Build,
    /// Self-contained demo in network namespaces on the embedded file source.
    Demo(demo::Args),
    /// Run every test: unit, BPF_PROG_TEST_RUN fixtures, network namespaces.
    Test(test::Args),
    /// Boot Debian kernels in QEMU and run the kernel-level tests inside.
    Vm(vm::Args),
    /// Benchmarks against kube-proxy-style iptables and nftables; prints the results folder.
    Bench(bench::Args),
    /// Build (or reuse the cached) kube-apiserver for the Kubernetes tests.
    K8sApiserver,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Build => setup::run().and_then(|()| build::agent().map(drop)),
        Task::Demo(args) => demo::run(&args),
        Task::Test(args) => test::run(&args),
        Task::Vm(args) => vm::run(&args),
        Task::Bench(args) => bench::run(&args),
        Task::K8sApiserver => k8s::ensure_binaries().map(|bins| {
            println!("kube-apiserver: {}", bins.apiserver.display());
        }),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
