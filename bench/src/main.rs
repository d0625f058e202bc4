//! `dataplane-bench`: what `cargo xtask bench` runs once it has set up and built (see
//! bench/README.md). Needs root.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
};

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
    Probe { addr: SocketAddr, secs: u32 },
    /// The paced generator of the xdp-drop scenario, run by the bench in the outside
    /// namespace (scenarios/drop_gen.rs).
    #[command(hide = true)]
    DropGen {
        /// Towards the path under test.
        #[arg(long)]
        dev: String,
        /// A device that frees what it is given (the reference).
        #[arg(long)]
        sink: String,
        #[arg(long)]
        dst_mac: String,
        #[arg(long)]
        src_mac: String,
        #[arg(long)]
        saddr: Ipv4Addr,
        #[arg(long)]
        daddr: Ipv4Addr,
        /// Packets per second to the path (as many again to the sink).
        #[arg(long)]
        rate: u32,
        #[arg(long)]
        secs: u32,
        #[arg(long, default_value_t = 0)]
        cpu: usize,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run {
            dataplane,
            quick,
            scenarios,
        } => dataplane_bench::run::run(&dataplane, quick, &scenarios),
        Command::Probe { addr, secs } => dataplane_bench::scenarios::probe::main(addr, secs),
        Command::DropGen {
            dev,
            sink,
            dst_mac,
            src_mac,
            saddr,
            daddr,
            rate,
            secs,
            cpu,
        } => {
            use dataplane_bench::scenarios::drop_gen::{Plan, main, parse_mac};
            main(&Plan {
                dev,
                sink,
                dst_mac: parse_mac(&dst_mac)?,
                src_mac: parse_mac(&src_mac)?,
                saddr,
                daddr,
                rate,
                secs,
                cpu,
            })
        }
    }
}
