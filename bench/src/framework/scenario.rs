//! A scenario: one kind of traffic, the paths it compares and the workloads that measure them,
//! with the goals its numbers are judged by.
//!
//! To add a scenario: write a function returning a `Scenario` (in scenarios/) with its sandbox
//! spec, servers, client namespace, paths (each a setup function that puts one translation in
//! place and says where clients connect) and workloads, and list it in `scenarios::all()`.
//! Running, interleaving, statistics, the table, JSON and chart come for free (run.rs,
//! report/).

use super::{metric::Metric, workload::Workload};
use crate::{
    bed::{Bed, Server},
    client::Targets,
};

pub struct Scenario {
    /// Short name, used in file names and JSON (`published-port`).
    pub name: &'static str,
    /// One line for people.
    pub title: &'static str,
    /// The sandbox spec (state file) every path's sandbox is built from; the same topology
    /// for every path, so they differ only in how the packets are translated.
    pub spec: &'static str,
    pub servers: &'static [Server],
    /// The sandbox target the clients run in (`outside`, or an endpoint name).
    pub client: &'static str,
    pub workloads: &'static [Workload],
    pub paths: Vec<PathDef>,
    /// The path under test; the others are its baselines and ratios are subject/baseline.
    pub subject: &'static str,
    /// Goals from the issues the numbers are judged by (shown in the table, not asserted).
    pub targets: &'static [Goal],
}

impl Scenario {
    /// Every metric the workloads produce, in table order.
    pub fn metrics(&self) -> Vec<&'static Metric> {
        self.workloads.iter().flat_map(|w| w.metrics()).collect()
    }
}

/// One way the client's traffic reaches the server.
pub struct PathDef {
    pub name: &'static str,
    pub description: &'static str,
    /// Runs once the sandbox and servers are up: installs the path's translation (routes,
    /// iptables rules, the agent) and returns where clients connect.
    pub setup: fn(&mut Bed) -> anyhow::Result<Targets>,
}

/// A goal: subject/baseline for `metric` (inverted for lower-is-better metrics) at least `min`.
pub struct Goal {
    pub metric: &'static Metric,
    pub baseline: &'static str,
    pub min: f64,
    /// Where the goal comes from.
    pub source: &'static str,
}
