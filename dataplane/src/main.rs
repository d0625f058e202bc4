//! `dataplane`: the host agent and its command line (shared/DESIGN.md section 6).

mod agent;
mod conntrack;
mod control;
mod docker;
mod ebpf;
mod flows;
mod maglev;
mod metrics;
mod model;
mod netdev;
mod observe;
mod policy;
mod reconciler;
mod sandbox;
mod server;
mod status;
#[cfg(test)]
mod tests;

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/dataplane";
pub const DEFAULT_SOCKET: &str = "/run/dataplane/dataplane.sock";

#[derive(Parser)]
#[command(
    name = "dataplane",
    version,
    about = "eBPF dataplane for container hosts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: load and attach the kernel programs and keep their maps in line with the
    /// desired state.
    Agent(agent::AgentArgs),
    /// Show what is attached where, how full each map is, endpoints and drops.
    Status {
        /// The agent's control socket.
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Print the raw JSON the agent sends.
        #[arg(long)]
        json: bool,
    },
    /// Show the flows the agent saw (like `hubble observe`): the latest, or new ones as they
    /// come, filtered.
    Observe(observe::ObserveArgs),
    /// Build or remove a host with networks, containers and an outside client, all as network
    /// namespaces, for demos and tests.
    #[command(subcommand)]
    Sandbox(sandbox::SandboxCommand),
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if let Err(err) = run(Cli::parse()) {
        // The chain of causes, without a backtrace: these errors are for people.
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(agent::run(args))
        }
        Command::Status { socket, json } => status::print(&socket, json),
        Command::Observe(args) => observe::run(args),
        Command::Sandbox(command) => sandbox::run(command),
    }
}

/// Parses `host:port` for `--metrics`.
pub fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not an address like 127.0.0.1:9965"))
}
