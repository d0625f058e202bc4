//! `scale-ports` and `scale-services` (issues 4 and 8): what one published port or one VIP
//! costs per request while N other published ports or services exist (N = 10, 1,000, 10,000
//! and, in the full run, 50,000), against iptables with as many rules, and how long putting
//! the N entries in place takes.
//!
//! Requests open a new connection each (`Connection: close`): iptables' nat rules are walked
//! only for a connection's first packet (later packets follow conntrack), so keep-alive
//! requests would not show the rule count at all; per-connection cost is where it shows.
//! The measured port or service is the last of the N+1 in iptables' chains (the most recently
//! published container, or the last service kube-proxy wrote), so every new connection walks
//! all N rules before it; on average a connection would walk half of them.
//!
//! Every run starts from the base state (one port or service), then applies the N more and
//! times it: for iptables the `iptables-restore` of the whole rule set, for the agent the time
//! from writing the state file (a temporary file renamed over it, which the agent reads at
//! once through inotify) until `dataplane status` shows the map filled (which includes
//! parsing and validating it, and the `status` calls themselves: every 2 ms), and the agent's
//! own reconcile time from its log (`applied state in ...`).

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::Context as _;

use super::published_port::docker_rules;
use super::{
    HOST_IP, KubeService, cpu_share_during, iptables_restore, kube_proxy_rules, last_reconcile,
    map_entries, new_conn_wrk, path_of, probe, socket_addr, timed_apply, wait_applied, write_state,
};
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

/// How many other ports or services each workload puts beside the measured one.
const SIZES: [usize; 4] = [10, 1_000, 10_000, 50_000];
/// Sizes above this are skipped with --quick.
const QUICK_MAX: usize = 10_000;
/// How long one apply (or the return to the base state) may take.
const APPLY_TIMEOUT: Duration = Duration::from_secs(180);
/// Services the agent's maps hold in `scale-services`, each reserving a Maglev table of
/// MAGLEV_SIZE slots ((1021 + 1) x 4 bytes = 4 KiB: about 200 MiB for this many; the default
/// 16381 slots would be 64 KiB each, 3.2 GiB). One backend per service needs no more.
const MAX_SERVICES: u32 = 51_200;
const MAGLEV_SIZE: u32 = 1021;

/// The metrics of one size: requests/s, p50, p99, apply time, agent reconcile time, agent CPU.
macro_rules! size_metrics {
    ($name:ident, $refs:ident, $n:literal) => {
        static $name: [Metric; 6] = [
            Metric {
                key: concat!("n", $n, "_new_conn_requests_per_sec"),
                label: concat!("N=", $n, ": requests/s, new connection each"),
                short: concat!("N=", $n, " req/s"),
                unit: "req/s",
                better: Better::Higher,
            },
            Metric {
                key: concat!("n", $n, "_new_conn_latency_p50_ms"),
                label: concat!("N=", $n, ": latency p50, handshake included"),
                short: "p50",
                unit: "ms",
                better: Better::Lower,
            },
            Metric {
                key: concat!("n", $n, "_new_conn_latency_p99_ms"),
                label: concat!("N=", $n, ": latency p99, handshake included"),
                short: "p99",
                unit: "ms",
                better: Better::Lower,
            },
            Metric {
                key: concat!("n", $n, "_apply_ms"),
                label: concat!("N=", $n, ": apply (written -> in the kernel)"),
                short: "apply",
                unit: "ms",
                better: Better::Lower,
            },
            Metric {
                key: concat!("n", $n, "_agent_reconcile_ms"),
                label: concat!("N=", $n, ": agent reconcile (its log)"),
                short: "reconcile",
                unit: "ms",
                better: Better::Lower,
            },
            Metric {
                key: concat!("n", $n, "_agent_cpu_percent"),
                label: concat!("N=", $n, ": agent CPU during the requests"),
                short: "agent cpu",
                unit: "% of a core",
                better: Better::Lower,
            },
        ];
        static $refs: [&Metric; 6] = [
            &$name[0], &$name[1], &$name[2], &$name[3], &$name[4], &$name[5],
        ];
    };
}

/// Also `scale-policy`'s, which measures the same things per size.
pub(super) use size_metrics;

size_metrics!(M10, R10, 10);
size_metrics!(M1K, R1K, 1000);
size_metrics!(M10K, R10K, 10000);
size_metrics!(M50K, R50K, 50000);

static REFS: [&[&Metric; 6]; 4] = [&R10, &R1K, &R10K, &R50K];

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Ports,
    Services,
}

macro_rules! size_workload {
    ($name:ident, $kind:expr, $i:literal, $refs:ident, $label:literal) => {
        static $name: CustomWorkload = CustomWorkload {
            label: $label,
            metrics: &$refs,
            run: |bed, client, targets, durations| {
                run_size($kind, $i, bed, client, targets, durations)
            },
        };
    };
}

size_workload!(PORTS_10, Kind::Ports, 0, R10, "N=10");
size_workload!(PORTS_1K, Kind::Ports, 1, R1K, "N=1000");
size_workload!(PORTS_10K, Kind::Ports, 2, R10K, "N=10000");
size_workload!(PORTS_50K, Kind::Ports, 3, R50K, "N=50000");
size_workload!(SERVICES_10, Kind::Services, 0, R10, "N=10");
size_workload!(SERVICES_1K, Kind::Services, 1, R1K, "N=1000");
size_workload!(SERVICES_10K, Kind::Services, 2, R10K, "N=10000");
size_workload!(SERVICES_50K, Kind::Services, 3, R50K, "N=50000");

static PORTS_WORKLOADS: [Workload; 4] = [
    Workload::Custom(&PORTS_10),
    Workload::Custom(&PORTS_1K),
    Workload::Custom(&PORTS_10K),
    Workload::Custom(&PORTS_50K),
];
static SERVICES_WORKLOADS: [Workload; 4] = [
    Workload::Custom(&SERVICES_10),
    Workload::Custom(&SERVICES_1K),
    Workload::Custom(&SERVICES_10K),
    Workload::Custom(&SERVICES_50K),
];

// ---------------------------------------------------------------------------------------------
// scale-ports

/// nginx in `srv` published on host port 8080 (the N others are added per run). The base
/// state of the agent is this file as it is.
const PORTS_SPEC: &str = r#"# Written by cargo xtask bench (scenario scale-ports).
uplink: eth0
networks:
  - {name: bench, bridge: br-bench, subnet: 172.31.0.0/24, gateway: 172.31.0.1}
endpoints:
  - name: srv
    interfaces: [{network: bench, ip: 172.31.0.2, mac: "02:42:ac:1f:00:02", host_veth: veth-srv}]
ports:
  - {endpoint: srv, protocol: tcp, host_port: 8080, container_port: 80}
"#;

/// Host ports of the N others: 10000, 10001, ... (50,000 of them end at 59999).
const FIRST_OTHER_PORT: usize = 10_000;

static PORTS_SERVERS: [Server; 1] = [Server::Nginx {
    target: "srv",
    port: 80,
}];

pub fn ports() -> Scenario {
    Scenario {
        name: "scale-ports",
        title: "outside client -> host port 8080 -> nginx in srv while N other ports are \
                published (host ports 10000.. -> srv:80), a new connection per request",
        spec: PORTS_SPEC,
        servers: &PORTS_SERVERS,
        client: "outside",
        workloads: &PORTS_WORKLOADS,
        paths: vec![
            PathDef {
                name: "iptables",
                description: "Docker 20.10's rules with N+1 published ports (per port a DNAT \
                              in nat DOCKER, a hairpin MASQUERADE in POSTROUTING and an ACCEPT \
                              in filter DOCKER), port 8080 the last; applied with \
                              iptables-restore",
                setup: ports_iptables_setup,
            },
            PathDef {
                name: "dataplane",
                description: "our agent; the N ports added to its state file (one entry each)",
                setup: ports_dataplane_setup,
            },
        ],
        subject: "dataplane",
        targets: &[],
    }
}

fn ports_targets() -> Targets {
    Targets {
        http: socket_addr(HOST_IP, 8080),
        iperf: socket_addr(HOST_IP, 15201),
    }
}

fn ports_iptables_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    iptables_restore(bed, "base.rules", &iptables_rules(Kind::Ports, 0))?;
    Ok(ports_targets())
}

fn ports_dataplane_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    bed.start_agent_with(&["--cgroup", "none"])?;
    Ok(ports_targets())
}

// ---------------------------------------------------------------------------------------------
// scale-services

/// Client container `cli`, nginx in `srv`, the service `web` (10.96.0.10:80 -> srv:80); the N
/// others are added per run.
const SERVICES_SPEC: &str = r#"# Written by cargo xtask bench (scenario scale-services).
uplink: eth0
networks:
  - {name: bench, bridge: br-bench, subnet: 172.31.0.0/24, gateway: 172.31.0.1}
endpoints:
  - name: cli
    interfaces: [{network: bench, ip: 172.31.0.2, mac: "02:42:ac:1f:00:02", host_veth: veth-cli}]
  - name: srv
    interfaces: [{network: bench, ip: 172.31.0.3, mac: "02:42:ac:1f:00:03", host_veth: veth-srv}]
services:
  - {name: web, vip: 10.96.0.10, port: 80, endpoints: [srv]}
"#;

const SERVICE_BACKEND: &str = "172.31.0.3";
const WEB_VIP: &str = "10.96.0.10";

static SERVICES_SERVERS: [Server; 1] = [Server::Nginx {
    target: "srv",
    port: 80,
}];

pub fn services() -> Scenario {
    Scenario {
        name: "scale-services",
        title: "container cli -> VIP 10.96.0.10:80 -> nginx in srv while N other services \
                exist (one backend each), a new connection per request",
        spec: SERVICES_SPEC,
        servers: &SERVICES_SERVERS,
        client: "cli",
        workloads: &SERVICES_WORKLOADS,
        paths: vec![
            PathDef {
                name: "iptables",
                description: "kube-proxy's iptables mode with N+1 services (per service a \
                              rule in KUBE-SERVICES, a KUBE-SVC and a KUBE-SEP chain), web the \
                              last; applied with iptables-restore",
                setup: services_iptables_setup,
            },
            PathDef {
                name: "dataplane",
                description: "our agent (--max-services 51200 --maglev-size 1021); the N \
                              services added to its state file",
                setup: services_dataplane_setup,
            },
        ],
        subject: "dataplane",
        targets: &[],
    }
}

fn services_targets() -> Targets {
    Targets {
        http: socket_addr(WEB_VIP, 80),
        iperf: socket_addr(WEB_VIP, 5201),
    }
}

fn services_iptables_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    iptables_restore(bed, "base.rules", &iptables_rules(Kind::Services, 0))?;
    Ok(services_targets())
}

fn services_dataplane_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    bed.start_agent_with(&[
        "--cgroup",
        "none",
        "--max-services",
        &MAX_SERVICES.to_string(),
        "--maglev-size",
        &MAGLEV_SIZE.to_string(),
    ])?;
    Ok(services_targets())
}

// ---------------------------------------------------------------------------------------------
// The N others, and one measured run.

/// The VIP of other service `i`: 10.100.0.0/16 in order.
fn other_vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + i as u32)
}

/// The agent's state file with `n` others beside the measured port or service (the lists are
/// the spec's last key, so the entries are appended to it).
fn state(kind: Kind, n: usize) -> String {
    let (mut text, line): (String, fn(&mut String, usize)) = match kind {
        Kind::Ports => (PORTS_SPEC.to_owned(), |out, i| {
            let _ = writeln!(
                out,
                "  - {{endpoint: srv, protocol: tcp, host_port: {}, container_port: 80}}",
                FIRST_OTHER_PORT + i
            );
        }),
        Kind::Services => (SERVICES_SPEC.to_owned(), |out, i| {
            let _ = writeln!(
                out,
                "  - {{name: s{i}, vip: {}, port: 80, endpoints: [srv]}}",
                other_vip(i)
            );
        }),
    };
    text.reserve(n * 80);
    for i in 0..n {
        line(&mut text, i);
    }
    text
}

/// The iptables rules with `n` others before the measured port or service.
fn iptables_rules(kind: Kind, n: usize) -> String {
    match kind {
        Kind::Ports => {
            let mut ports: Vec<(u16, u16)> = (0..n)
                .map(|i| ((FIRST_OTHER_PORT + i) as u16, 80))
                .collect();
            ports.push((8080, 80));
            docker_rules(&ports)
        }
        Kind::Services => {
            let backend = SERVICE_BACKEND.parse().expect("constant");
            let mut services: Vec<KubeService> = (0..n)
                .map(|i| KubeService {
                    name: format!("s{i}"),
                    vip: other_vip(i),
                    port: 80,
                    backends: vec![SocketAddrV4::new(backend, 80)],
                    node_port: None,
                })
                .collect();
            services.push(KubeService {
                name: "web".into(),
                vip: WEB_VIP.parse().expect("constant"),
                port: 80,
                backends: vec![SocketAddrV4::new(backend, 80)],
                node_port: None,
            });
            kube_proxy_rules(&services)
        }
    }
}

/// The map the agent fills, and how many entries it has with `n` others.
fn map_of(kind: Kind, n: usize) -> (&'static str, u64) {
    match kind {
        Kind::Ports => ("dp_ports", n as u64 + 1),
        Kind::Services => ("dp_services", n as u64 + 1),
    }
}

/// Puts the agent back to the base state and waits until it is there.
fn agent_to_base(bed: &Bed, kind: Kind) -> anyhow::Result<()> {
    write_state(bed, &state(kind, 0))?;
    let (map, want) = map_of(kind, 0);
    wait_applied(bed, APPLY_TIMEOUT, |s| Ok(map_entries(s, map)? == want))
        .context("returning to the base state")?;
    Ok(())
}

fn run_size(
    kind: Kind,
    index: usize,
    bed: &Bed,
    client: &str,
    targets: &Targets,
    durations: Durations,
) -> anyhow::Result<Vec<(&'static Metric, f64)>> {
    let n = SIZES[index];
    let m = REFS[index];
    if durations.quick && n > QUICK_MAX {
        eprint!("skipped with --quick -> ");
        return Ok(Vec::new());
    }
    let mut values = Vec::new();
    match path_of(bed) {
        "iptables" => {
            iptables_restore(bed, "base.rules", &iptables_rules(kind, 0))?;
            let rules = iptables_rules(kind, n);
            let took = iptables_restore(bed, "scaled.rules", &rules)?;
            values.push((m[3], took.as_secs_f64() * 1e3));
        }
        "dataplane" => {
            agent_to_base(bed, kind)?;
            let text = state(kind, n);
            let (map, want) = map_of(kind, n);
            let took = timed_apply(bed, &text, APPLY_TIMEOUT, |s| {
                Ok(map_entries(s, map)? == want)
            })?;
            values.push((m[3], took.as_secs_f64() * 1e3));
            if let Some(reconcile) = last_reconcile(&bed.agent_log()) {
                values.push((m[4], reconcile.as_secs_f64() * 1e3));
            }
        }
        other => anyhow::bail!("scale: no path {other:?}"),
    }
    measure_with_others(bed, client, targets, durations, m, &mut values)?;
    Ok(values)
}

/// The per-N measurement of the scale scenarios, once the N other entries are in place:
/// new connections/s (wrk, `Connection: close`), the probe's p50 and p99 (handshake
/// included), and the agent's CPU share meanwhile, pushed as metrics 0, 1, 2 and 5 of `m`.
pub(super) fn measure_with_others(
    bed: &Bed,
    client: &str,
    targets: &Targets,
    durations: Durations,
    m: &[&'static Metric; 6],
    values: &mut Vec<(&'static Metric, f64)>,
) -> anyhow::Result<()> {
    let url = format!("http://{}/", targets.http);
    let before = super::agent_drops(bed);
    // 3 s of wrk also in the full run: rates of 1-15k requests/s need no more, and the 8
    // workloads x 2 paths x 3 runs of both scale scenarios are a good part of the whole run.
    let short = Durations {
        wrk_secs: durations.wrk_secs.min(3),
        ..durations
    };
    let ((r, p), cpu) = cpu_share_during(bed.agent_pid(), || {
        let r = new_conn_wrk(bed, client, &url, short)?;
        let p = probe::probe(bed, client, targets.http, super::probe_secs(short))?;
        Ok((r, p))
    })?;
    super::note_trouble(bed, before, &p);
    values.push((m[0], r.requests_per_sec));
    values.push((m[1], p.p50_us / 1000.0));
    values.push((m[2], p.p99_us / 1000.0));
    if let Some(cpu) = cpu {
        values.push((m[5], cpu));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn others_come_before_the_measured_entry_in_iptables_and_after_it_in_the_state() {
        let rules = iptables_rules(Kind::Ports, 3);
        let others = rules.find("--dport 10002 -j DNAT").unwrap();
        assert!(others < rules.find("--dport 8080 -j DNAT").unwrap());
        let text = state(Kind::Ports, 3);
        assert!(
            text.ends_with("host_port: 10002, container_port: 80}\n"),
            "{text}"
        );
        let text = state(Kind::Services, 300);
        assert!(text.contains("{name: s299, vip: 10.100.1.43, port: 80, endpoints: [srv]}"));
        let rules = iptables_rules(Kind::Services, 2);
        assert!(rules.find("-d 10.100.0.1/32").unwrap() < rules.find("-d 10.96.0.10/32").unwrap());
        assert_eq!(other_vip(49_999), Ipv4Addr::new(10, 100, 195, 79));
    }

    #[test]
    fn every_size_has_its_own_metric_keys() {
        let mut keys: Vec<&str> = REFS.iter().flat_map(|r| r.iter().map(|m| m.key)).collect();
        let count = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), count);
    }
}
