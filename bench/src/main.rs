//! `dataplane-bench`: what `cargo xtask bench` runs once it has set up and built (see
//! bench/README.md). Needs root.

use std::{net::SocketAddrV4, path::PathBuf};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "dataplane-bench")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every scenario (or those named) against its baselines; results under bench/results/.
    Run {
        /// The `dataplane` binary to measure (cargo xtask bench builds it with --release).
        #[arg(long)]
        dataplane: PathBuf,
        /// Shorter runs (3 s instead of 5 s each; still 3 runs).
        #[arg(long)]
        quick: bool,
        /// Run only these scenarios (repeatable or comma-separated; default all).
        #[arg(
            long = "scenario",
            alias = "only",
            value_name = "NAME",
            value_delimiter = ','
        )]
        scenarios: Vec<String>,
    },
    /// The latency probe, run by the bench in a client's namespace (scenarios/probe.rs).
    #[command(hide = true)]
    Probe { addr: SocketAddrV4, secs: u32 },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run {
            dataplane,
            quick,
            scenarios,
        } => dataplane_bench::run::run(&dataplane, quick, &scenarios),
        Command::Probe { addr, secs } => dataplane_bench::scenarios::probe::main(addr, secs),
    }
}
