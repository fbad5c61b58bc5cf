//! `extproxy`: eBPF proxy for Kubernetes Services whose endpoints live outside the cluster.
//!
//! This binary is the command line and the wiring around the library (`lib.rs`), which holds the
//! subsystems so that the tests reach them too.

mod cli;
mod oneshot;
mod run;

use std::io::IsTerminal as _;

use anyhow::Context as _;
use clap::Parser as _;

use crate::cli::{Cli, Command, LogFormat};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log, cli.log_format)?;
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

/// Logs go to stdout. Colour codes only where a terminal shows them: in `kubectl logs` or a
/// file they were escape sequences.
fn init_logging(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(filter).context("--log")?)
        .with_target(false);
    match format {
        LogFormat::Text => logs.with_ansi(colour()).init(),
        // {"timestamp":..,"level":"INFO","message":..}: the event's fields at the top level.
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
    Ok(())
}

/// On a terminal, unless NO_COLOR (https://no-color.org) is set to something.
fn colour() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
