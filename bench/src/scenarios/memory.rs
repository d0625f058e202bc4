//! Memory (issue 17): bytes per tracked connection and per service, measured from the
//! kernel's own accounting, beside Linux conntrack's. A workload of the masquerade scenario:
//! on the dataplane path it reads the conntrack map's `bytes_memlock` (`bpftool map show`:
//! the kernel's figure for the map, which for a hash map allocated on use grows with its
//! element count) and the agent's entry count, opens connections for a few seconds (their
//! entries stay for the closing timeout), and reads both again; the slope is what a
//! connection costs, both directions' entries with the map's per-element overhead. Per
//! service it divides the preallocated service and Maglev maps' figures by the services they
//! hold (backends are elements of a hash map allocated on use, each costing what a
//! conntrack entry's slope shows for its own size). On the iptables path it reports the nf_conntrack slab's object size (one object holds
//! both directions), once Linux is seen tracking the connections; on plain routing, nothing.

use std::time::Duration;

use anyhow::{Context as _, bail};

use super::{NEW_CONN_CONCURRENCY, secs};
use crate::bed::Bed;
use crate::client;
use crate::client::Targets;
use crate::framework::Durations;
use crate::framework::metric::{Better, Metric};
use crate::framework::workload::CustomWorkload;

pub static CT_BYTES: Metric = Metric {
    key: "memory_bytes_per_connection",
    label: "memory per tracked connection (both directions, with the table's per-entry overhead)",
    short: "B/conn",
    unit: "bytes",
    better: Better::Lower,
};

pub static SERVICE_BYTES: Metric = Metric {
    key: "memory_bytes_per_service",
    label: "memory per service slot (service entry + Maglev table, preallocated)",
    short: "B/service",
    unit: "bytes",
    better: Better::Lower,
};

pub static MEMORY: CustomWorkload = CustomWorkload {
    label: "memory",
    metrics: &[&CT_BYTES, &SERVICE_BYTES],
    run: run_memory,
};

/// The closing timeout of TCP entries and a GC pass.
const SETTLE: Duration = Duration::from_secs(dataplane_common::ct_timeout::TCP_CLOSING + 3);

/// Fewer new entries than this between the readings and the slope is noise.
const MIN_NEW_ENTRIES: i64 = 1000;

fn run_memory(
    bed: &Bed,
    client: &str,
    targets: &Targets,
    durations: Durations,
) -> anyhow::Result<Vec<(&'static Metric, f64)>> {
    let url = format!("http://{}/", targets.http);
    if bed.agent_pid().is_none() {
        return linux(bed, client, &url, durations);
    }
    // The entries of the workloads before have closed; once they expired the table holds
    // almost nothing, and the readings before and after differ by this run's connections only.
    std::thread::sleep(SETTLE);
    let status = bed.agent_status()?;
    let pin = |name: &str| format!("{}/{name}", status.pin_dir);
    let ct = dataplane_common::map_names::CONNTRACK;
    let (bytes0, entries0) = (memlock(&pin(ct))?, entries(bed, ct)?);
    client::wrk_with(
        bed,
        client,
        &url,
        secs(durations),
        NEW_CONN_CONCURRENCY,
        true,
    )?;
    let (bytes1, entries1) = (memlock(&pin(ct))?, entries(bed, ct)?);
    let new_entries = entries1 - entries0;
    if new_entries < MIN_NEW_ENTRIES {
        bail!("only {new_entries} new conntrack entries ({entries0} -> {entries1})");
    }
    // Two entries per connection, one per direction.
    let per_connection = 2.0 * (bytes1 - bytes0) as f64 / new_entries as f64;
    let mut values = vec![(&CT_BYTES, per_connection)];
    let services_capacity = capacity(bed, dataplane_common::map_names::SERVICES)?;
    if services_capacity > 0 {
        let slots = memlock(&pin(dataplane_common::map_names::SERVICES))?
            + memlock(&pin(dataplane_common::map_names::MAGLEV))?;
        values.push((&SERVICE_BYTES, slots as f64 / services_capacity as f64));
    }
    Ok(values)
}

/// The iptables path: Linux's conntrack object, if Linux tracks this path's connections.
fn linux(
    bed: &Bed,
    client: &str,
    url: &str,
    durations: Durations,
) -> anyhow::Result<Vec<(&'static Metric, f64)>> {
    client::wrk_with(
        bed,
        client,
        url,
        secs(durations),
        NEW_CONN_CONCURRENCY,
        true,
    )?;
    let count: u64 = bed
        .run_ok(
            "host",
            &["cat", "/proc/sys/net/netfilter/nf_conntrack_count"],
            Duration::from_secs(5),
        )
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if count == 0 {
        return Ok(Vec::new()); // plain routing: nothing tracked
    }
    // slab_size: the object with its alignment in the slab, what each one really takes.
    let size = std::fs::read_to_string("/sys/kernel/slab/nf_conntrack/slab_size")
        .context("/sys/kernel/slab/nf_conntrack/slab_size")?;
    let size: f64 = size.trim().parse().context("nf_conntrack slab_size")?;
    Ok(vec![(&CT_BYTES, size)])
}

/// `bytes_memlock` of the pinned map at `path`, as `bpftool map show` reports it.
fn memlock(path: &str) -> anyhow::Result<i64> {
    show(path)?["bytes_memlock"]
        .as_i64()
        .with_context(|| format!("no bytes_memlock for {path}"))
}

fn show(path: &str) -> anyhow::Result<serde_json::Value> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "show", "pinned", path])
        .output()
        .context("bpftool")?;
    if !out.status.success() {
        bail!(
            "bpftool map show pinned {path}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The agent's count of entries in the map `name`.
fn entries(bed: &Bed, name: &str) -> anyhow::Result<i64> {
    let status = bed.agent_status()?;
    let fill = status
        .maps
        .iter()
        .find(|m| m.name == name)
        .with_context(|| format!("no map {name} in the agent's status"))?;
    Ok(i64::from(fill.entries))
}

fn capacity(bed: &Bed, name: &str) -> anyhow::Result<i64> {
    let status = bed.agent_status()?;
    Ok(status
        .maps
        .iter()
        .find(|m| m.name == name)
        .map_or(0, |m| i64::from(m.capacity)))
}
