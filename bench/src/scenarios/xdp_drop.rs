//! `xdp-drop` (issue 5): how many packets per second of a denied outside source get dropped,
//! by the agent's XDP deny list on the uplink against iptables DROP rules in the host
//! namespace (raw PREROUTING, before conntrack; filter INPUT, after routing).
//!
//! The generator is trafgen (netsniff-ng) in the outside namespace, one process pinned to one
//! CPU, sending 60-byte UDP packets from 198.51.100.7 (in the denied 198.51.100.0/24) to the
//! host's uplink address as fast as it can. On a veth pair the receiving side runs on the
//! sending CPU (veth hands the packet to the peer's backlog or, with XDP attached, to its NAPI
//! queue, both processed in the sender's softirq), so the rate measured is what one CPU does
//! when it both sends and drops: a cheaper drop shows as a higher rate. The drop counts come
//! from the kernel's own counters: the rule's packet counter (`iptables -nvx -L`) and the
//! agent's POLICY_DENIED drop counter (`dataplane status`).

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use testbed::StatusExt as _;

use super::{HOST_IP, addr, path_of};
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
/// The generator's first second is not counted (trafgen maps its ring and forks first).
const WARMUP: Duration = Duration::from_secs(1);

pub static DROPS: Metric = Metric {
    key: "denied_packets_dropped_mpps",
    label: "Denied packets dropped/s",
    short: "dropped",
    unit: "Mpps",
    better: Better::Higher,
};
pub static SENT: Metric = Metric {
    key: "generator_packets_sent_mpps",
    label: "Packets sent/s by the generator",
    short: "sent",
    unit: "Mpps",
    better: Better::Higher,
};

static FLOOD: CustomWorkload = CustomWorkload {
    label: "trafgen flood",
    metrics: &[&DROPS, &SENT],
    run: flood,
};

static WORKLOADS: [Workload; 1] = [Workload::Custom(&FLOOD)];

static SERVERS: [Server; 1] = [Server::Nginx {
    target: "srv",
    port: 80,
}];

pub fn scenario() -> Scenario {
    Scenario {
        name: "xdp-drop",
        title: "UDP flood from a denied outside source (198.51.100.0/24) to the host, trafgen on \
                one CPU: packets dropped per second",
        spec: SPEC,
        servers: &SERVERS,
        // Only for the functional check (host -> container, which no path blocks); the flood
        // comes from the outside namespace.
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
        http: addr("172.31.0.2", 80),
        iperf: addr("172.31.0.2", 5201),
    }
}

fn filter_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    bed.run_ok(
        "host",
        &["iptables", "-A", "INPUT", "-s", DENIED_CIDR, "-j", "DROP"],
        Duration::from_secs(10),
    )?;
    Ok(targets())
}

fn raw_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
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
    bed.start_agent_with(&["--cgroup", "none", "--flow-events", "off"])?;
    check_xdp(bed, false)?;
    Ok(targets())
}

fn dataplane_xdp_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    bed.start_agent_with(&["--cgroup", "none", "--xdp", "always"])?;
    check_xdp(bed, true)?;
    Ok(targets())
}

fn dataplane_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
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
        _ => Ok(bed.agent_status()?.drops("POLICY_DENIED")),
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

/// Packets sent by the outside namespace's eth0, from its /proc/net/dev.
fn sent(bed: &Bed) -> anyhow::Result<u64> {
    let dev = bed.run_ok("outside", &["cat", "/proc/net/dev"], Duration::from_secs(5))?;
    tx_packets(&dev, "eth0").context("no eth0 in the outside namespace's /proc/net/dev")
}

fn tx_packets(proc_net_dev: &str, interface: &str) -> Option<u64> {
    proc_net_dev.lines().find_map(|line| {
        let (name, counters) = line.split_once(':')?;
        if name.trim() != interface {
            return None;
        }
        // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes packets ...
        counters.split_whitespace().nth(9)?.parse().ok()
    })
}

/// Both counters, and when they were read (the middle of the two reads).
fn sample(bed: &Bed) -> anyhow::Result<(u64, u64, Instant)> {
    let before = Instant::now();
    let drops = dropped(bed)?;
    let sent = sent(bed)?;
    let after = Instant::now();
    Ok((drops, sent, before + (after - before) / 2))
}

fn flood(
    bed: &Bed,
    _client: &str,
    _targets: &Targets,
    durations: Durations,
) -> anyhow::Result<Vec<(&'static Metric, f64)>> {
    let secs = super::secs(durations);
    let config = format!(
        "{{\n  eth(da={}, sa={}, type=0x0800),\n  ipv4(saddr={SOURCE}, daddr={HOST_IP}, \
         ttl=64),\n  udp(sport=40000, dport=9),\n  fill(0x00, 18)\n}}\n",
        mac(bed, "host")?,
        mac(bed, "outside")?
    );
    let config_path = bed.work_file("trafgen.cfg");
    std::fs::write(&config_path, config)?;
    // `timeout` ends the generator on its own even if the bench dies; SIGINT is how trafgen
    // wants to be stopped. --no-sock-mem and --notouch-irq: trafgen must not change the
    // machine's socket memory sysctls or IRQ affinities.
    let total = Duration::from_secs(u64::from(secs) + 2) + WARMUP;
    let mut generator = bed
        .sandbox()
        .command_in(
            "outside",
            &[
                "timeout",
                "--kill-after=3",
                "-s",
                "INT",
                &total.as_secs().to_string(),
                "trafgen",
                "--dev",
                "eth0",
                "--conf",
                &config_path.to_string_lossy(),
                "--cpus",
                "1",
                "--no-sock-mem",
                "--notouch-irq",
            ],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting trafgen in the outside namespace")?;
    let measured = (|| -> anyhow::Result<(u64, u64, f64)> {
        std::thread::sleep(WARMUP);
        if let Some(status) = generator.try_wait()? {
            bail!("trafgen exited early ({status})");
        }
        let (drops0, sent0, t0) = sample(bed)?;
        let deadline = t0 + Duration::from_secs(secs.into());
        while Instant::now() < deadline {
            testbed::interrupt::check()?;
            std::thread::sleep(Duration::from_millis(50));
        }
        let (drops1, sent1, t1) = sample(bed)?;
        Ok((
            drops1.saturating_sub(drops0),
            sent1.saturating_sub(sent0),
            (t1 - t0).as_secs_f64(),
        ))
    })();
    let status = generator.wait()?;
    let (drops, sent, elapsed) = measured?;
    // timeout exits 124 when it had to stop the command, as planned.
    if !(status.success() || status.code() == Some(124)) {
        let mut stderr = String::new();
        if let Some(mut pipe) = generator.stderr.take() {
            use std::io::Read as _;
            let _ = pipe.read_to_string(&mut stderr);
        }
        bail!("trafgen failed ({status}): {}", stderr.trim());
    }
    if sent == 0 {
        bail!("the generator sent nothing");
    }
    if (drops as f64) < 0.5 * sent as f64 {
        bail!("only {drops} of {sent} denied packets were counted as dropped");
    }
    Ok(vec![
        (&DROPS, drops as f64 / elapsed / 1e6),
        (&SENT, sent as f64 / elapsed / 1e6),
    ])
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
        let dev = "Inter-|   Receive                                                |  Transmit\n \
                   face |bytes    packets errs drop fifo frame compressed multicast|bytes    \
                   packets errs drop fifo colls carrier compressed\n    lo:       0       0    0 \
                   0    0     0          0         0        0       0    0    0    0     0       \
                   0          0\n  eth0: 1296 16 0 0 0 0 0 0 71255040 1187584 0 0 0 0 0 0\n";
        assert_eq!(tx_packets(dev, "eth0"), Some(1_187_584));
        assert_eq!(tx_packets(dev, "eth1"), None);
    }
}
