//! The bench (`cargo xtask bench`, bench/README.md): every scenario's paths side by side in one
//! run, in sandboxes of network namespaces built by the test bed (tests/testbed).
//!
//! The modules depend downwards only:
//!
//! ```text
//!  run (the runner) ──> scenarios ──> framework (scenario, workload, metric, durations)
//!        │                  │               │
//!        └──> report        └───────────────┴──> client (curl, wrk, iperf3) ──> bed ──> testbed
//!             (results, table, svg) ──> framework
//! ```
//!
//! - [`bed`]: a sandbox with the bench's servers and agent, removed on drop;
//! - [`client`]: the clients and the parsing of what they report, where clients connect;
//! - [`framework`]: what a scenario, a path, a workload and a metric are (no scenario in it);
//! - [`scenarios`]: the scenarios, one file each, and [`scenarios::all`];
//! - [`report`]: statistics, ratios, the text and Markdown tables, the JSON and the chart;
//! - [`run`]: building every path's bed, interleaving the runs, writing the report.

pub mod bed;
pub mod client;
pub mod framework;
pub mod report;
pub mod run;
pub mod scenarios;

use std::path::{Path, PathBuf};

/// The workspace's root (results go to its bench/results/, the report names its commit).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench lives inside the workspace")
        .to_owned()
}

/// Prints a progress line for a step, as xtask does.
pub fn step(name: &str, what: &str) {
    eprintln!("\x1b[1m==> [{name}]\x1b[0m {what}");
}
