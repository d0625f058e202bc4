//! Project tasks: `cargo xtask setup | test | demo | bench`.
//!
//! Every task first runs `setup`, which installs what a new machine lacks (Debian packages,
//! the nightly toolchain's rust-src, bpf-linker built against Debian's LLVM 22), skips what is
//! present, and stops with the name of the step that failed. That is why xtask depends on no
//! crate of the workspace: building `dataplane` needs what setup installs. The demo (the test
//! bed's `dataplane-demo`) and the bench (`dataplane-bench`, bench/) are binaries it builds and
//! runs after setup.

mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent).
    Setup,
    /// Set up, build, and run every test (unit, packet, namespace). Needs root.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter), after `--`.
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Set up, build, and show the dataplane at work in a sandbox of network namespaces.
    Demo,
    /// Set up, build (release), and measure the dataplane against iptables and plain routing
    /// in sandboxes of network namespaces (see bench/README.md). Needs root.
    Bench {
        /// Shorter runs (3 s instead of 5 s each; still 3 runs) for a result in a few minutes.
        #[arg(long)]
        quick: bool,
        /// Run only these scenarios (repeatable or comma-separated, `--only` is the same;
        /// default all). Results of such a run go to bench/results/latest-NAME.* instead of
        /// latest.*.
        #[arg(
            long = "scenario",
            alias = "only",
            value_name = "NAME",
            value_delimiter = ','
        )]
        scenarios: Vec<String>,
    },
    /// The bench's latency probe, run by the bench in a client's namespace (not for people).
    #[command(hide = true)]
    BenchProbe {
        addr: std::net::SocketAddrV4,
        secs: u32,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup::run(),
        Task::Test { cargo_test_args } => {
            setup::run()?;
            require_root("the tests load kernel programs and create network namespaces")?;
            build()?;
            step(
                "test",
                "cargo test (unit, packet and whole-host tests of every package)",
            );
            let mut cmd = cargo();
            cmd.arg("test");
            // The whole-host tests are not a default member (a plain `cargo test` is for any
            // user); name every package so they run here.
            for package in TEST_PACKAGES {
                cmd.args(["-p", package]);
            }
            if !cargo_test_args.is_empty() {
                cmd.arg("--").args(&cargo_test_args);
            }
            run_checked(&mut cmd, "cargo test")
        }
        Task::Demo => {
            setup::run()?;
            require_root("the demo loads kernel programs and creates network namespaces")?;
            build()?;
            run_checked(
                &mut Command::new(target_dir().join("debug").join("dataplane-demo")),
                "demo",
            )
        }
        // Kept for anyone who ran the probe by hand; the bench runs its own binary's `probe`.
        Task::BenchProbe { addr, secs } => run_checked(
            Command::new(bench_binary())
                .arg("probe")
                .arg(addr.to_string())
                .arg(secs.to_string()),
            "bench probe",
        ),
        Task::Bench { quick, scenarios } => {
            setup::run()?;
            require_root("the bench loads kernel programs and creates network namespaces")?;
            // Optimised code in the agent; the kernel programs are built the same either way.
            step(
                "build",
                "cargo build --release -p dataplane -p dataplane-bench (the agent it measures \
                 and the bench)",
            );
            run_checked(
                cargo().args([
                    "build",
                    "--release",
                    "-p",
                    "dataplane",
                    "-p",
                    "dataplane-bench",
                ]),
                "cargo build --release",
            )?;
            let mut bench = Command::new(bench_binary());
            bench
                .arg("run")
                .arg("--dataplane")
                .arg(target_dir().join("release").join("dataplane"));
            if quick {
                bench.arg("--quick");
            }
            if !scenarios.is_empty() {
                bench.arg("--scenario").arg(scenarios.join(","));
            }
            run_checked(&mut bench, "bench")
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_owned()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Every package `cargo xtask test` tests (the kernel crate builds only for BPF).
const TEST_PACKAGES: &[&str] = &[
    "dataplane",
    "dataplane-common",
    "xtask",
    "testbed",
    "dataplane-bench",
    "dataplane-tests",
];

/// The bench's binary, as `cargo build --release -p dataplane-bench` leaves it.
fn bench_binary() -> PathBuf {
    target_dir().join("release").join("dataplane-bench")
}

/// `cargo` with ~/.cargo/bin on PATH, so a freshly installed bpf-linker is found.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd.env("PATH", setup::path_with_cargo_bin());
    cmd
}

fn build() -> anyhow::Result<()> {
    step(
        "build",
        "cargo build (the kernel object is built and embedded by dataplane/build.rs)",
    );
    run_checked(cargo().args(["build"]), "cargo build")
}

fn require_root(why: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!("run as root: {why}");
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// Prints a progress line for a task step.
pub fn step(name: &str, what: &str) {
    eprintln!("\x1b[1m==> [{name}]\x1b[0m {what}");
}

/// Runs `cmd`, failing with the step's name when it does not succeed.
pub fn run_checked(cmd: &mut Command, step_name: &str) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("step `{step_name}`: cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("step `{step_name}` failed ({status}): {cmd:?}");
    }
    Ok(())
}
