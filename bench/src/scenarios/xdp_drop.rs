//! `xdp-drop` (issues 5 and 12): what a packet from a denied outside source costs the host, in
//! CPU time per dropped packet at one offered rate, for each way of dropping it: the agent's
//! deny list as `--xdp auto` places it on this veth uplink (tc ingress), the same with flow
//! events off, the same forced into XDP (`--xdp always`), and iptables DROP rules in the host
//! namespace (raw PREROUTING, before conntrack; filter INPUT, after routing).
//!
//! The generator (drop_gen.rs, run in the outside namespace and pinned to one CPU) sends
//! 60-byte UDP packets from 198.51.100.7 (in the denied 198.51.100.0/24) to the host's uplink
//! address at [`RATE`] packets a second, in blocks of 256, and as many again, interleaved
//! block by block, into a sink: a VXLAN device in the outside namespace with no remote, which
//! frees every packet it is given (this kernel has no dummy device). On a veth pair the
//! receiving side runs in the sender's context (the softirq run at the end of the send), and
//! this kernel has no IRQ time accounting, so softirq time is charged to the thread it
//! interrupted: a block to the path costs the generator's work plus the veth hand-over, the
//! receive and the drop; a block to the sink costs the generator's work alone. Per pair of
//! adjacent blocks the difference is the cost of the drop on the dataplane's side; the run's
//! value is the median over its pairs (pairs cancel the drift of the machine's other work,
//! the median ignores blocks an interrupt or a neighbour's cache use hit).
//!
//! Measured per run: that difference (the metric to compare), both sides' medians, the
//! agent's own CPU time per dropped packet (all its threads, /proc/PID/task/*/schedstat),
//! and the rate the path actually got. The drops are counted from the kernel's own counters
//! (the rule's packet counter, the agent's POLICY_DENY counter): a run where not every packet
//! sent to the path was counted as dropped fails.
//!
//! Why [`RATE`]: flooding as fast as one CPU can (the scenario's first form) measures the
//! generator, and the run-to-run noise of separate generator processes was as large as the
//! drop's cost. 50,000 packets a second, plus as many into the sink, keeps the generator's
//! CPU at about a fifth of a core, well under what the slowest path sustains on one CPU
//! (about 350,000 a second with the XDP path and events on; 120,000 with the machine's other
//! CPU-bound work beside it), so that every path drops every packet and the shared CPU can
//! keep the rate when other builds run. When the generator's CPU is saturated anyway (a
//! busy loop pinned beside it), it falls behind (25,000-32,000 a second) and says so; the
//! costs per packet stayed within a few percent of the unloaded runs.

use std::time::Duration;

use anyhow::{Context as _, bail};
use testbed::StatusExt as _;

use super::drop_gen::{BLOCK, Measured};
use super::{HOST_IP, path_of, socket_addr};
use crate::bed::Bed;
use crate::bed::Server;
use crate::client::Targets;
use crate::framework::Durations;
use crate::framework::metric::Better;
use crate::framework::metric::Metric;
use crate::framework::scenario::PathDef;
use crate::framework::scenario::Scenario;
use crate::framework::workload::CustomWorkload;
use crate::framework::workload::Workload;

const SPEC: &str = r#"# Written by cargo xtask bench (scenario xdp-drop).
uplink: eth0
networks:
  - {name: bench, bridge: br-bench, subnet: 172.31.0.0/24, gateway: 172.31.0.1}
endpoints:
  - name: srv
    interfaces: [{network: bench, ip: 172.31.0.2, mac: "02:42:ac:1f:00:02", host_veth: veth-srv}]
policies:
  - {name: deny-flood, action: deny, from: {cidr: 198.51.100.0/24}}
"#;

const DENIED_CIDR: &str = "198.51.100.0/24";
const SOURCE: &str = "198.51.100.7";
/// Packets per second offered to every path (see the module's doc for why this rate).
pub const RATE: u32 = 50_000;
/// The sink in the outside namespace: a VXLAN device without a remote frees what it is
/// given (no forwarding entry for any address).
const SINK: &str = "dpsink0";
/// The CPU the generator runs on.
const GENERATOR_CPU: usize = 0;

pub static DROP_NS: Metric = Metric {
    key: "drop_cpu_ns_per_packet",
    label: "CPU per dropped packet: receive and drop (path minus sink)",
    short: "drop",
    unit: "ns",
    better: Better::Lower,
};
pub static PATH_NS: Metric = Metric {
    key: "path_cpu_ns_per_packet",
    label: "CPU per packet into the path (generator, receive, drop)",
    short: "path",
    unit: "ns",
    better: Better::Lower,
};
pub static SINK_NS: Metric = Metric {
    key: "sink_cpu_ns_per_packet",
    label: "CPU per packet into the sink (the generator alone)",
    short: "sink",
    unit: "ns",
    better: Better::Lower,
};
pub static AGENT_NS: Metric = Metric {
    key: "agent_cpu_ns_per_dropped_packet",
    label: "Agent CPU per dropped packet",
    short: "agent",
    unit: "ns",
    better: Better::Lower,
};
pub static OFFERED: Metric = Metric {
    key: "offered_kpps",
    label: "Packets offered/s to the path",
    short: "offered",
    unit: "kpps",
    better: Better::Higher,
};

static DROP_COST: CustomWorkload = CustomWorkload {
    label: "paced denied packets",
    metrics: &[&DROP_NS, &PATH_NS, &SINK_NS, &AGENT_NS, &OFFERED],
    run: drop_cost,
};

static WORKLOADS: [Workload; 1] = [Workload::Custom(&DROP_COST)];

static SERVERS: [Server; 1] = [Server::Nginx {
    target: "srv",
    port: 80,
}];

pub fn scenario() -> Scenario {
    Scenario {
        name: "xdp-drop",
        title: "UDP packets from a denied outside source (198.51.100.0/24) to the host at \
                50,000/s: CPU time per dropped packet (generator into the path minus the same \
                into a sink)",
        spec: SPEC,
        servers: &SERVERS,
        // Only for the functional check (host -> container, which no path blocks); the
        // denied packets come from the outside namespace.
        client: "host",
        workloads: &WORKLOADS,
        paths: vec![
            PathDef {
                name: "iptables-filter",
                description: "iptables -A INPUT -s 198.51.100.0/24 -j DROP in the host \
                              namespace (after routing)",
                setup: filter_setup,
            },
            PathDef {
                name: "iptables-raw",
                description: "iptables -t raw -A PREROUTING -s 198.51.100.0/24 -j DROP in the \
                              host namespace (before conntrack and routing)",
                setup: raw_setup,
            },
            PathDef {
                name: "dataplane-no-events",
                description: "our agent's deny list as `--xdp auto` places it on a veth uplink \
                              (tc ingress: the skb exists already), with --flow-events off",
                setup: dataplane_no_events_setup,
            },
            PathDef {
                name: "dataplane-xdp",
                description: "our agent's deny list in XDP on the uplink (--xdp always; native \
                              XDP on the veth), drop events on (aggregated)",
                setup: dataplane_xdp_setup,
            },
            PathDef {
                name: "dataplane",
                description: "our agent's deny list as configured by default (--xdp auto: tc \
                              ingress on a veth uplink); drops send aggregated DROPPED events",
                setup: dataplane_setup,
            },
        ],
        subject: "dataplane",
        targets: &[],
    }
}

fn targets() -> Targets {
    // The functional check: the host reaches the container (nothing here translates).
    Targets {
        http: socket_addr("172.31.0.2", 80),
        iperf: socket_addr("172.31.0.2", 5201),
    }
}

/// The sink every path's runs compare against, in the outside namespace.
fn add_sink(bed: &Bed) -> anyhow::Result<()> {
    let t = Duration::from_secs(10);
    bed.run_ok(
        "outside",
        &[
            "ip",
            "link",
            "add",
            SINK,
            "type",
            "vxlan",
            "id",
            "4242",
            "dstport",
            "4789",
            "nolearning",
        ],
        t,
    )?;
    bed.run_ok("outside", &["ip", "link", "set", SINK, "up"], t)?;
    Ok(())
}

fn filter_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    add_sink(bed)?;
    bed.run_ok(
        "host",
        &["iptables", "-A", "INPUT", "-s", DENIED_CIDR, "-j", "DROP"],
        Duration::from_secs(10),
    )?;
    Ok(targets())
}

fn raw_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    add_sink(bed)?;
    bed.run_ok(
        "host",
        &[
            "iptables",
            "-t",
            "raw",
            "-A",
            "PREROUTING",
            "-s",
            DENIED_CIDR,
            "-j",
            "DROP",
        ],
        Duration::from_secs(10),
    )?;
    Ok(targets())
}

fn dataplane_no_events_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    add_sink(bed)?;
    bed.start_agent_with(&["--cgroup", "none", "--flow-events", "off"])?;
    check_xdp(bed, false)?;
    Ok(targets())
}

fn dataplane_xdp_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    add_sink(bed)?;
    bed.start_agent_with(&["--cgroup", "none", "--xdp", "always"])?;
    check_xdp(bed, true)?;
    Ok(targets())
}

fn dataplane_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    add_sink(bed)?;
    bed.start_agent_with(&["--cgroup", "none"])?;
    check_xdp(bed, false)?;
    Ok(targets())
}

/// Whether the XDP program is on the uplink is what the path says: `--xdp auto` keeps it off
/// a veth uplink (the deny list then drops at tc ingress), `--xdp always` puts it there.
fn check_xdp(bed: &Bed, wanted: bool) -> anyhow::Result<()> {
    let status = bed.agent_status()?;
    let attached = status
        .attachments
        .iter()
        .any(|a| a.interface == "eth0" && a.program == "dp_uplink_xdp");
    if attached != wanted {
        bail!("dp_uplink_xdp on eth0 is {attached}, the path wants {wanted}: {status:?}");
    }
    Ok(())
}

/// The MAC address of `eth0` in a target's namespace.
fn mac(bed: &Bed, target: &str) -> anyhow::Result<String> {
    let out = bed.run_ok(
        target,
        &["ip", "-j", "link", "show", "eth0"],
        Duration::from_secs(5),
    )?;
    let json: serde_json::Value = serde_json::from_str(&out).context("ip -j link")?;
    json[0]["address"]
        .as_str()
        .map(str::to_owned)
        .context("no address in `ip -j link show eth0`")
}

/// The packets the path dropped so far, from the kernel's counters.
fn dropped(bed: &Bed) -> anyhow::Result<u64> {
    match path_of(bed) {
        path @ ("iptables-filter" | "iptables-raw") => {
            let (table, chain) = if path == "iptables-raw" {
                ("raw", "PREROUTING")
            } else {
                ("filter", "INPUT")
            };
            let out = bed.run_ok(
                "host",
                &["iptables", "-t", table, "-nvxL", chain],
                Duration::from_secs(10),
            )?;
            rule_packets(&out, DENIED_CIDR)
                .with_context(|| format!("no DROP rule for {DENIED_CIDR} in {table} {chain}"))
        }
        // The deny list's drops (at XDP and at tc alike) are user rules: POLICY_DENY.
        _ => Ok(bed.agent_status()?.drops("POLICY_DENY")),
    }
}

/// The packet counter of the DROP rule for `source` in `iptables -nvxL` output.
fn rule_packets(listing: &str, source: &str) -> Option<u64> {
    listing.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.len() > 7 && fields[2] == "DROP" && fields.contains(&source))
            .then(|| fields[0].parse().ok())
            .flatten()
    })
}

/// CPU time (ns) a process's threads have run so far: the first field of each thread's
/// /proc schedstat (precise, unlike /proc/PID/stat's 10 ms ticks). Threads that ended are
/// not counted; the agent's threads live as long as it does.
fn process_cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let dir = format!("/proc/{pid}/task");
    let mut total = 0;
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let path = entry?.path().join("schedstat");
        // A thread may end between the listing and the read.
        if let Ok(text) = std::fs::read_to_string(&path) {
            total += schedstat_runtime(&text)
                .with_context(|| format!("{}: {text:?}", path.display()))?;
        }
    }
    Ok(total)
}

/// The run time (ns) in a /proc schedstat line (`runtime wait timeslices`).
fn schedstat_runtime(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// CPU ns per dropped packet from a CPU time delta (None without drops).
fn ns_per_drop(cpu_before: u64, cpu_after: u64, drops: u64) -> Option<f64> {
    (drops > 0).then(|| cpu_after.saturating_sub(cpu_before) as f64 / drops as f64)
}

/// Whether the path dropped every packet sent to it: the kernel's count of drops over the run
/// against what the generator sent (its measured blocks and the warm-up block before them).
fn check_all_dropped(drops: u64, m: &Measured) -> anyhow::Result<()> {
    let sent = m.path_packets + BLOCK as u64;
    if drops < sent {
        bail!(
            "only {drops} of the {sent} denied packets sent were counted as dropped: the path \
             does not sustain {RATE} packets/s"
        );
    }
    Ok(())
}

fn drop_cost(
    bed: &Bed,
    _client: &str,
    _targets: &Targets,
    durations: Durations,
) -> anyhow::Result<Vec<(&'static Metric, f64)>> {
    let secs = super::secs(durations);
    let (dst_mac, src_mac) = (mac(bed, "host")?, mac(bed, "outside")?);
    let agent = bed.agent_pid();
    let drops0 = dropped(bed)?;
    // After the status read above, so that the agent's answering it is not counted.
    let agent0 = agent.map(process_cpu_ns).transpose()?;
    // Our own binary through /proc: it still runs when a build beside the bench replaced
    // target/release/dataplane-bench.
    let exe = format!("/proc/{}/exe", std::process::id());
    let (rate, secs_arg, cpu) = (
        RATE.to_string(),
        secs.to_string(),
        GENERATOR_CPU.to_string(),
    );
    let out = bed.run(
        "outside",
        &[
            &exe,
            "drop-gen",
            "--dev",
            "eth0",
            "--sink",
            SINK,
            "--dst-mac",
            &dst_mac,
            "--src-mac",
            &src_mac,
            "--saddr",
            SOURCE,
            "--daddr",
            HOST_IP,
            "--rate",
            &rate,
            "--secs",
            &secs_arg,
            "--cpu",
            &cpu,
        ],
        Duration::from_secs(u64::from(secs) + 20),
    )?;
    if !out.status.success() {
        bail!("the generator failed: {}", out.complaint());
    }
    // The agent's time first: reading its drop counter makes it work too.
    let agent1 = agent.map(process_cpu_ns).transpose()?;
    let m = Measured::parse(&out.stdout).context("the generator's report")?;
    let drops = dropped(bed)?.saturating_sub(drops0);
    let agent_ns = match (agent0, agent1) {
        (Some(before), Some(after)) => ns_per_drop(before, after, drops),
        _ => None,
    };
    check_all_dropped(drops, &m)?;
    // Receive work that left the generator's context would be missing from its numbers.
    let mut notes = vec![format!("ksoftirqd {:.1} ns/packet", m.ksoftirqd_ns)];
    // A generator that shares its CPU with other work falls behind the rate (its blocks then
    // follow each other without a pause); the cost per packet hardly changes, so the run
    // counts, and the offered rate shows in its row.
    if m.rate_pps < 0.95 * f64::from(RATE) {
        notes.push(format!("generator behind: {:.0} packets/s", m.rate_pps));
    }
    if m.errors > 0 {
        notes.push(format!("{} sends failed", m.errors));
    }
    eprint!("({}) ", notes.join(", "));
    let mut values = vec![
        (&DROP_NS, m.drop_ns),
        (&PATH_NS, m.path_ns),
        (&SINK_NS, m.sink_ns),
    ];
    if let Some(ns) = agent_ns {
        values.push((&AGENT_NS, ns));
    }
    values.push((&OFFERED, m.rate_pps / 1000.0));
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_parsed() {
        let listing = "Chain PREROUTING (policy ACCEPT 0 packets, 0 bytes)\n    pkts      bytes \
                       target     prot opt in     out     source               destination\n \
                       1187584 54628864 DROP       0    --  *      *       198.51.100.0/24      \
                       0.0.0.0/0\n";
        assert_eq!(rule_packets(listing, DENIED_CIDR), Some(1_187_584));
        assert_eq!(rule_packets(listing, "10.0.0.0/8"), None);
        assert_eq!(
            schedstat_runtime("1834221107 52181 3312\n"),
            Some(1_834_221_107)
        );
        assert_eq!(schedstat_runtime(""), None);
    }

    #[test]
    fn agent_cpu_is_per_dropped_packet() {
        assert_eq!(ns_per_drop(1_000, 151_000, 150_000), Some(1.0));
        assert_eq!(ns_per_drop(5, 5, 0), None, "no drops, no value");
        assert_eq!(
            ns_per_drop(10, 5, 100),
            Some(0.0),
            "a clock never runs back"
        );
    }

    #[test]
    fn every_packet_sent_must_be_dropped() {
        let m = Measured {
            path_packets: 150_016,
            sink_packets: 150_016,
            path_ns: 1900.0,
            sink_ns: 1700.0,
            drop_ns: 200.0,
            rate_pps: 50_000.0,
            ksoftirqd_ns: 0.0,
            errors: 0,
        };
        // The warm-up block counts too: it was sent after the first reading.
        assert!(check_all_dropped(150_016 + BLOCK as u64, &m).is_ok());
        assert!(check_all_dropped(150_016, &m).is_err());
    }
}
