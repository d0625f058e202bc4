//! What the bench measures: scenarios, the paths each compares, the workloads and metrics.
//!
//! To add a scenario (masquerade, VIP load balancing, scale, XDP drop): write a
//! function returning a `Scenario` with its sandbox spec, servers, client namespace, paths
//! (each a setup function that puts one translation in place and says where clients connect)
//! and workloads, and list it in `all()`. Running, interleaving, statistics, the table, JSON
//! and chart come for free.

use std::{fmt::Write as _, net::SocketAddrV4, time::Duration};

use anyhow::Context as _;

use super::{Durations, bed::Bed, client};

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

/// Where a path's clients connect for each server.
#[derive(Clone, Copy, Debug)]
pub struct Targets {
    pub http: SocketAddrV4,
    pub iperf: SocketAddrV4,
}

pub enum Server {
    /// nginx answering `ok` (bed.rs writes its config).
    Nginx { target: &'static str, port: u16 },
    /// `iperf3 -s`.
    Iperf3 { target: &'static str, port: u16 },
}

impl Server {
    pub fn target(&self) -> &'static str {
        match self {
            Server::Nginx { target, .. } | Server::Iperf3 { target, .. } => target,
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            Server::Nginx { port, .. } | Server::Iperf3 { port, .. } => *port,
        }
    }
}

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
    let status = bed.agent_status()?;
    let field = |name: &str| {
        status["flows"][name]
            .as_u64()
            .with_context(|| format!("the agent's status has no flows.{name}"))
    };
    Ok(FlowCounts {
        lost: field("lost")?,
        records: field("records")?,
    })
}

/// `52.1k req/s, p50 0.41 ms, p99 1.20 ms`
pub fn describe_values(values: &[(&'static Metric, f64)]) -> String {
    let mut out = String::new();
    for (i, (metric, value)) in values.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        if !metric.short.is_empty() {
            let _ = write!(out, "{} ", metric.short);
        }
        out.push_str(&metric.format(*value));
    }
    out
}

#[derive(Debug, PartialEq)]
pub enum Better {
    Higher,
    Lower,
}

#[derive(Debug)]
pub struct Metric {
    /// Key in the JSON (`http_rps`).
    pub key: &'static str,
    /// Row label in the table and chart.
    pub label: &'static str,
    /// Prefix in progress lines.
    pub short: &'static str,
    pub unit: &'static str,
    pub better: Better,
}

impl Metric {
    /// The value with its unit, for progress lines.
    pub fn format(&self, value: f64) -> String {
        match self.unit {
            "req/s" | "conn/s" => self.format_bare(value),
            unit => format!("{} {unit}", self.format_bare(value)),
        }
    }

    /// The value alone, for table cells whose row names the unit.
    pub fn format_bare(&self, value: f64) -> String {
        match self.unit {
            "req/s" | "conn/s" if value >= 1000.0 => format!("{:.1}k", value / 1000.0),
            "req/s" | "conn/s" => format!("{value:.0}"),
            "ms" => format!("{value:.3}"),
            _ => format!("{value:.2}"),
        }
    }
}

pub static HTTP_RPS: Metric = Metric {
    key: "http_requests_per_sec",
    label: "HTTP requests/s",
    short: "req/s",
    unit: "req/s",
    better: Better::Higher,
};
pub static HTTP_P50: Metric = Metric {
    key: "http_latency_p50_ms",
    label: "HTTP latency p50",
    short: "p50",
    unit: "ms",
    better: Better::Lower,
};
pub static HTTP_P99: Metric = Metric {
    key: "http_latency_p99_ms",
    label: "HTTP latency p99",
    short: "p99",
    unit: "ms",
    better: Better::Lower,
};
pub static TCP_1: Metric = Metric {
    key: "tcp_1_stream_gbps",
    label: "TCP 1 stream",
    short: "",
    unit: "Gbit/s",
    better: Better::Higher,
};
pub static TCP_4: Metric = Metric {
    key: "tcp_4_streams_gbps",
    label: "TCP 4 streams",
    short: "",
    unit: "Gbit/s",
    better: Better::Higher,
};

pub static NEW_CONNS: Metric = Metric {
    key: "new_connections_per_sec_no_loss",
    label: "New conns/s, none lost",
    short: "conn/s",
    unit: "conn/s",
    better: Better::Higher,
};

/// A goal: subject/baseline for `metric` (inverted for lower-is-better metrics) at least `min`.
pub struct Goal {
    pub metric: &'static Metric,
    pub baseline: &'static str,
    pub min: f64,
    /// Where the goal comes from.
    pub source: &'static str,
}

pub fn all() -> Vec<Scenario> {
    let mut all = vec![published_port(), flow_logging()];
    all.extend(super::scenarios::all());
    all
}

// ---------------------------------------------------------------------------------------------
// published-port: `docker run -p 8080:80` seen from outside the host.

const NETWORK: &str = "172.31.0.0/24";
const BRIDGE: &str = "br-bench";
const CONTAINER_IP: &str = "172.31.0.2";
const HOST_IP: &str = "192.0.2.1";
const HTTP_PORT: u16 = 80;
const HTTP_HOST_PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;
const IPERF_HOST_PORT: u16 = 15201;

/// One network, one container `srv`, both ports published (the agent reads `ports`; the other
/// paths ignore them, so every path's sandbox is the same).
const PUBLISHED_PORT_SPEC: &str = r#"# Written by cargo xtask bench (scenario published-port).
networks:
  - {name: bench, bridge: br-bench, subnet: 172.31.0.0/24, gateway: 172.31.0.1}
endpoints:
  - name: srv
    interfaces: [{network: bench, ip: 172.31.0.2, mac: "02:42:ac:1f:00:02", host_veth: veth-srv}]
ports:
  - {endpoint: srv, protocol: tcp, host_port: 8080, container_port: 80}
  - {endpoint: srv, protocol: tcp, host_port: 15201, container_port: 5201}
"#;

/// nginx and iperf3 in the container `srv`.
const PUBLISHED_PORT_SERVERS: &[Server] = &[
    Server::Nginx {
        target: "srv",
        port: HTTP_PORT,
    },
    Server::Iperf3 {
        target: "srv",
        port: IPERF_PORT,
    },
];

static PUBLISHED_PORT_GOALS: [Goal; 2] = [
    Goal {
        metric: &HTTP_RPS,
        baseline: "iptables",
        min: 1.25,
        source: "issue 3",
    },
    Goal {
        metric: &HTTP_RPS,
        baseline: "plain",
        min: 0.95,
        source: "issue 3",
    },
];

fn published_port() -> Scenario {
    Scenario {
        name: "published-port",
        title: "outside client -> host port -> nginx / iperf3 in container srv \
                (docker run -p 8080:80 -p 15201:5201)",
        spec: PUBLISHED_PORT_SPEC,
        servers: PUBLISHED_PORT_SERVERS,
        client: "outside",
        workloads: &[
            Workload::Wrk,
            Workload::Iperf { streams: 1 },
            Workload::Iperf { streams: 4 },
        ],
        paths: vec![
            PathDef {
                name: "plain",
                description: "routing straight to the container's address, no translation \
                              (upper bound)",
                setup: plain_setup,
            },
            PathDef {
                name: "iptables",
                description: "Docker 20.10's nat and filter rules (DNAT, MASQUERADE, FORWARD \
                              chains) in the host namespace",
                setup: iptables_setup,
            },
            PathDef {
                name: "dataplane",
                description: "our agent publishing the ports from the state file",
                setup: dataplane_setup,
            },
        ],
        subject: "dataplane",
        targets: &PUBLISHED_PORT_GOALS,
    }
}

fn addr(ip: &str, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip.parse().expect("constant IPv4 address"), port)
}

/// The outside client routes the container network via the host and talks to the container
/// directly: what every translating path costs is measured against this.
fn plain_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    bed.run_ok(
        "outside",
        &["ip", "route", "add", NETWORK, "via", HOST_IP],
        Duration::from_secs(5),
    )?;
    Ok(Targets {
        http: addr(CONTAINER_IP, HTTP_PORT),
        iperf: addr(CONTAINER_IP, IPERF_PORT),
    })
}

/// Docker's rules, loaded at once with iptables-restore in the sandbox's host namespace only.
fn iptables_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    let rules = docker_rules(&[(HTTP_HOST_PORT, HTTP_PORT), (IPERF_HOST_PORT, IPERF_PORT)]);
    let path = bed.work_file("iptables.rules");
    std::fs::write(&path, &rules)?;
    bed.run_ok(
        "host",
        &["iptables-restore", &path.to_string_lossy()],
        Duration::from_secs(10),
    )
    .context("loading Docker's rules with iptables-restore")?;
    Ok(Targets {
        http: addr(HOST_IP, HTTP_HOST_PORT),
        iperf: addr(HOST_IP, IPERF_HOST_PORT),
    })
}

/// The agent on the sandbox's state file, which publishes both ports.
fn dataplane_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    bed.start_agent()?;
    Ok(Targets {
        http: addr(HOST_IP, HTTP_HOST_PORT),
        iperf: addr(HOST_IP, IPERF_HOST_PORT),
    })
}

// ---------------------------------------------------------------------------------------------
// flow-logging: the published-port traffic with the agent's flow events on against off.

static FLOW_LOGGING_GOALS: [Goal; 2] = [
    Goal {
        metric: &HTTP_RPS,
        baseline: "events-off",
        min: 0.95,
        source: "issue 6",
    },
    Goal {
        metric: &TCP_1,
        baseline: "events-off",
        min: 0.95,
        source: "issue 6",
    },
];

/// Concurrencies of the new-connections workload: from below what saturates a core to well
/// above it.
const NEW_CONNECTION_LEVELS: &[u32] = &[4, 16, 64];

fn flow_logging() -> Scenario {
    Scenario {
        name: "flow-logging",
        title: "flow events on vs off: outside client -> host port 8080 -> nginx / iperf3 in srv",
        spec: PUBLISHED_PORT_SPEC,
        servers: PUBLISHED_PORT_SERVERS,
        client: "outside",
        workloads: &[
            Workload::Wrk,
            Workload::Iperf { streams: 1 },
            Workload::NewConnections {
                levels: NEW_CONNECTION_LEVELS,
            },
        ],
        paths: vec![
            PathDef {
                name: "events-off",
                description: "our agent with --flow-events off: the programs send no flow \
                              events (conntrack and translation as usual)",
                setup: events_off_setup,
            },
            PathDef {
                name: "events-on",
                description: "our agent with --flow-events on (the default): an event per new \
                              and closed connection, read, enriched and kept by the agent",
                setup: events_on_setup,
            },
        ],
        subject: "events-on",
        targets: &FLOW_LOGGING_GOALS,
    }
}

/// The agent with flow events `on` or `off`; no socket-level hook (nothing here connects
/// from the host), so that nothing outside the sandbox is touched.
fn agent_with_flow_events(bed: &mut Bed, on_off: &str) -> anyhow::Result<Targets> {
    bed.start_agent_with(&["--flow-events", on_off, "--cgroup", "none"])?;
    Ok(Targets {
        http: addr(HOST_IP, HTTP_HOST_PORT),
        iperf: addr(HOST_IP, IPERF_HOST_PORT),
    })
}

fn events_off_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    agent_with_flow_events(bed, "off")
}

fn events_on_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    agent_with_flow_events(bed, "on")
}

/// What `iptables-save` shows on a Docker 20.10 host with one bridge network and one container
/// publishing `ports` (host, container), TCP: the nat DOCKER chain with a DNAT per port and a
/// hairpin MASQUERADE per port, MASQUERADE of the network's outbound traffic, and the filter
/// FORWARD chain with DOCKER-USER, the two isolation stages and the per-port ACCEPT in DOCKER.
/// FORWARD's policy is DROP, as Docker sets it.
pub fn docker_rules(ports: &[(u16, u16)]) -> String {
    let (net, br, ip) = (NETWORK, BRIDGE, CONTAINER_IP);
    let mut nat = String::new();
    let mut dnat = String::new();
    let mut accept = String::new();
    for (host_port, container_port) in ports {
        let _ = writeln!(
            nat,
            "-A POSTROUTING -s {ip}/32 -d {ip}/32 -p tcp -m tcp --dport {container_port} \
             -j MASQUERADE"
        );
        let _ = writeln!(
            dnat,
            "-A DOCKER ! -i {br} -p tcp -m tcp --dport {host_port} -j DNAT --to-destination \
             {ip}:{container_port}"
        );
        let _ = writeln!(
            accept,
            "-A DOCKER -d {ip}/32 ! -i {br} -o {br} -p tcp -m tcp --dport {container_port} \
             -j ACCEPT"
        );
    }
    format!(
        "*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s {net} ! -o {br} -j MASQUERADE
{nat}-A DOCKER -i {br} -j RETURN
{dnat}COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-ISOLATION-STAGE-2 - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o {br} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o {br} -j DOCKER
-A FORWARD -i {br} ! -o {br} -j ACCEPT
-A FORWARD -i {br} -o {br} -j ACCEPT
{accept}-A DOCKER-ISOLATION-STAGE-1 -i {br} ! -o {br} -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-ISOLATION-STAGE-2 -o {br} -j DROP
-A DOCKER-ISOLATION-STAGE-2 -j RETURN
-A DOCKER-USER -j RETURN
COMMIT
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_rules_have_a_dnat_and_accept_per_port() {
        let rules = docker_rules(&[(8080, 80), (15201, 5201)]);
        assert!(rules.contains(
            "-A DOCKER ! -i br-bench -p tcp -m tcp --dport 8080 -j DNAT --to-destination \
             172.31.0.2:80\n"
        ));
        assert!(rules.contains(
            "-A DOCKER -d 172.31.0.2/32 ! -i br-bench -o br-bench -p tcp -m tcp --dport 5201 \
             -j ACCEPT\n"
        ));
        assert!(rules.contains("-A POSTROUTING -s 172.31.0.0/24 ! -o br-bench -j MASQUERADE\n"));
        assert!(rules.contains(":FORWARD DROP [0:0]\n"));
        assert_eq!(rules.matches("COMMIT\n").count(), 2);
    }

    #[test]
    fn every_goal_names_a_path_and_a_metric_of_its_scenario() {
        for scenario in all() {
            let names: Vec<&str> = scenario.paths.iter().map(|p| p.name).collect();
            assert!(names.contains(&scenario.subject), "{}", scenario.name);
            let metrics = scenario.metrics();
            for goal in scenario.targets {
                assert!(names.contains(&goal.baseline), "{}", goal.baseline);
                assert!(metrics.iter().any(|m| m.key == goal.metric.key));
            }
        }
    }

    #[test]
    fn values_are_described_with_units() {
        let text = describe_values(&[(&HTTP_RPS, 52_130.0), (&HTTP_P99, 1.2)]);
        assert_eq!(text, "req/s 52.1k, p99 1.200 ms");
        assert_eq!(describe_values(&[(&TCP_1, 13.456)]), "13.46 Gbit/s");
        assert_eq!(describe_values(&[(&NEW_CONNS, 8_300.0)]), "conn/s 8.3k");
    }
}
