//! `dataplane`: the host agent and its command line (docs/DESIGN.md, "Command line").

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use dataplane::{agent, cli, control::DEFAULT_SOCKET, sandbox};

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
    Observe(cli::observe::ObserveArgs),
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
        Command::Status { socket, json } => cli::status::print(&socket, json),
        Command::Observe(args) => cli::observe::run(args),
        Command::Sandbox(command) => sandbox::run(command),
    }
}
