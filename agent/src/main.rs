//! The `serviceless` binary: parse, set up logging, dispatch.

use clap::Parser as _;
use serviceless_agent::{
    cli::{Cli, Command},
    allocator, dataplane, inspect, run,
};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The DNS library logs every malformed query it drops: a junk flood
    // must not become a log flood (its errors only, unless asked for more).
    let filter = EnvFilter::try_new(format!("hickory_server=error,hickory_proto=error,{}", cli.log))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if cli.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    let result = match cli.command {
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(run::run(*args))),
        Command::Allocate(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(allocator::run(args))),
        Command::Inspect(args) => inspect::run(&args),
        Command::Detach(args) => dataplane::detach(&dataplane::Pins::new(&args.pin_dir), &args.iface),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
