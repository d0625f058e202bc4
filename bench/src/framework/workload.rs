//! How a path is measured: the built-in workloads (wrk, iperf3, new connections) and those a
//! scenario brings itself.

use anyhow::Context as _;

use super::{
    Durations,
    metric::{HTTP_P50, HTTP_P99, HTTP_RPS, Metric, NEW_CONNS, TCP_1, TCP_4},
};
use crate::{bed::Bed, client, client::Targets};

pub enum Workload {
    /// `wrk -t1 -c32` against the HTTP target: requests/s, p50 and p99 latency.
    Wrk,
    /// `iperf3 -P streams` against the iperf target: received Gbit/s.
    Iperf { streams: u32 },
    /// `wrk -t1 -cN` with `Connection: close` (every request a new connection) against the
    /// HTTP target at each concurrency N of `levels`, reading the agent's count of lost flow
    /// events (and of records made) before and after each: the highest rate of new
    /// connections at which no event was lost.
    NewConnections { levels: &'static [u32] },
    /// A workload a scenario brings itself (scenarios/): its label, metrics and run.
    Custom(&'static CustomWorkload),
}

/// The parts of a workload defined outside this file (scenarios/*.rs).
pub struct CustomWorkload {
    pub label: &'static str,
    pub metrics: &'static [&'static Metric],
    /// One measured run (bed, client target, targets, durations): a value for each of
    /// `metrics` (none at all: skipped, the cells stay empty).
    #[allow(clippy::type_complexity)]
    pub run: fn(&Bed, &str, &Targets, Durations) -> anyhow::Result<Vec<(&'static Metric, f64)>>,
}

impl Workload {
    pub fn label(&self) -> String {
        match self {
            Workload::Wrk => "wrk".into(),
            Workload::Iperf { streams: 1 } => "iperf3 1 stream".into(),
            Workload::Iperf { streams } => format!("iperf3 {streams} streams"),
            Workload::NewConnections { .. } => "new conns".into(),
            Workload::Custom(custom) => custom.label.into(),
        }
    }

    pub fn metrics(&self) -> Vec<&'static Metric> {
        match self {
            Workload::Wrk => vec![&HTTP_RPS, &HTTP_P50, &HTTP_P99],
            Workload::Iperf { streams: 1 } => vec![&TCP_1],
            Workload::Iperf { .. } => vec![&TCP_4],
            Workload::NewConnections { .. } => vec![&NEW_CONNS],
            Workload::Custom(custom) => custom.metrics.to_vec(),
        }
    }

    pub fn metric_keys(&self) -> Vec<&'static str> {
        self.metrics().iter().map(|m| m.key).collect()
    }

    /// One measured run; returns a value for each of `metrics()`.
    pub fn run(
        &self,
        bed: &Bed,
        client_target: &str,
        targets: &Targets,
        durations: Durations,
    ) -> anyhow::Result<Vec<(&'static Metric, f64)>> {
        match self {
            Workload::Custom(custom) => (custom.run)(bed, client_target, targets, durations),
            Workload::Wrk => {
                let url = format!("http://{}/", targets.http);
                client::wrk(bed, client_target, &url, durations.warmup_secs).context("warm-up")?;
                let r = client::wrk(bed, client_target, &url, durations.wrk_secs)?;
                Ok(vec![
                    (&HTTP_RPS, r.requests_per_sec),
                    (&HTTP_P50, r.p50_us / 1000.0),
                    (&HTTP_P99, r.p99_us / 1000.0),
                ])
            }
            Workload::Iperf { streams } => {
                let bps = client::iperf3(
                    bed,
                    client_target,
                    targets.iperf,
                    *streams,
                    durations.iperf_secs,
                )?;
                let metric = self.metrics()[0];
                Ok(vec![(metric, bps / 1e9)])
            }
            Workload::NewConnections { levels } => {
                let url = format!("http://{}/", targets.http);
                let mut best = 0.0f64;
                let mut steps = Vec::new();
                for &connections in *levels {
                    let before = flow_counts(bed)?;
                    let r = client::wrk_with(
                        bed,
                        client_target,
                        &url,
                        durations.wrk_secs,
                        connections,
                        true,
                    )?;
                    let after = flow_counts(bed)?;
                    let lost = after.lost.saturating_sub(before.lost);
                    // Records the agent made meanwhile (a new and a close per connection the
                    // kernel reported), per second of the run.
                    let records = after.records.saturating_sub(before.records);
                    let mut step = format!(
                        "c{connections} {} ({} records/s)",
                        NEW_CONNS.format_bare(r.requests_per_sec),
                        NEW_CONNS.format_bare(records as f64 / f64::from(durations.wrk_secs))
                    );
                    if lost > 0 {
                        step.push_str(&format!(" ({lost} events lost)"));
                    } else {
                        best = best.max(r.requests_per_sec);
                    }
                    steps.push(step);
                }
                // The steps on the progress line, before the value the table gets.
                eprint!("{} -> ", steps.join(", "));
                Ok(vec![(&NEW_CONNS, best)])
            }
        }
    }
}

/// The bed's agent's flow counters.
struct FlowCounts {
    /// Events the kernel could not write (ring buffer full).
    lost: u64,
    /// Records the agent made.
    records: u64,
}

fn flow_counts(bed: &Bed) -> anyhow::Result<FlowCounts> {
    let flows = bed
        .agent_status()
        .context("the agent's flow counters")?
        .flows;
    Ok(FlowCounts {
        lost: flows.lost,
        records: flows.records,
    })
}
