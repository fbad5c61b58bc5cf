//! `extproxy`: eBPF proxy for Kubernetes Services whose endpoints live outside the cluster.
//!
//! This binary is the command line and the wiring around the library (`lib.rs`), which holds the
//! subsystems so that the tests reach them too.

mod cli;
mod oneshot;
mod run;

use anyhow::Context as _;
use clap::Parser as _;

use crate::cli::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log).context("--log")?)
        .with_target(false)
        .init();
    match cli.command {
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(run::run(*args)),
        Command::Inspect(args) => oneshot::inspect(&args),
        Command::Cleanup(args) => oneshot::cleanup(&args.pin_dir, &args.state_dir),
        Command::Validate(args) => oneshot::validate(&args),
        Command::ConvertExternalname(args) => oneshot::convert_externalname(&args),
    }
}
