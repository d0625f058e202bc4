//! `scale-policy` (issue 17): what a new connection costs while N policy rules that do not
//! match it come before what decides it (N = 10, 1,000, 10,000), against the same rules in
//! iptables' DOCKER-USER chain, and how long putting the N rules in place takes.
//!
//! The traffic is scale-ports' (an outside client to host port 8080, published to nginx in
//! `srv`), a new connection per request. The N rules drop TCP from sources that never send
//! (10.200.0.0/16, one /32 each) to one port each, half of them towards any destination and
//! half towards `srv` only: in iptables `-s S/32 [-d SRV/32] -p tcp --dport P -j DROP` in
//! DOCKER-USER, before its `-j RETURN`; in the state file `deny` policies `from: {cidr: S/32}`,
//! `to: {}` or `{endpoint: srv}`, `ports: ["P/tcp"]`, before nothing (the connection is then
//! decided by Docker's own rules, or our isolation). DOCKER-USER is the first jump of
//! Docker's FORWARD chain, before its ESTABLISHED shortcut, so iptables walks the N rules for
//! every forwarded packet, not only a connection's first: that is how Docker installs it.
//! The agent compiles the rules into lookups (one per key shape in use) and judges a
//! connection once.
//!
//! Apply time as in scale-ports: `iptables-restore` of the whole rule set, and for the agent
//! from writing the state file until `dataplane status` shows the compiled entries (which
//! includes the agent's polling of the file and the parsing), plus its own reconcile time.

use std::{fmt::Write as _, net::Ipv4Addr, time::Duration};

use anyhow::Context as _;

use super::published_port::docker_rules;
use super::scale::{measure_with_others, size_metrics};
use super::{
    HOST_IP, iptables_restore, last_reconcile, map_entries, path_of, socket_addr, timed_apply,
    wait_applied, write_state,
};
use crate::bed::{Bed, Server};
use crate::client::Targets;
use crate::framework::Durations;
use crate::framework::metric::{Better, Metric};
use crate::framework::scenario::{PathDef, Scenario};
use crate::framework::workload::{CustomWorkload, Workload};

/// How many rules each workload puts before the connection's decision.
const SIZES: [usize; 3] = [10, 1_000, 10_000];
/// How long one apply (or the return to the base state) may take.
const APPLY_TIMEOUT: Duration = Duration::from_secs(180);
/// The container the measured port leads to (a rule towards it names it).
const SRV_IP: &str = "172.31.0.2";

size_metrics!(M10, R10, 10);
size_metrics!(M1K, R1K, 1000);
size_metrics!(M10K, R10K, 10000);

static REFS: [&[&Metric; 6]; 3] = [&R10, &R1K, &R10K];

macro_rules! size_workload {
    ($name:ident, $i:literal, $refs:ident, $label:literal) => {
        static $name: CustomWorkload = CustomWorkload {
            label: $label,
            metrics: &$refs,
            run: |bed, client, targets, durations| run_size($i, bed, client, targets, durations),
        };
    };
}

size_workload!(RULES_10, 0, R10, "N=10");
size_workload!(RULES_1K, 1, R1K, "N=1000");
size_workload!(RULES_10K, 2, R10K, "N=10000");

static WORKLOADS: [Workload; 3] = [
    Workload::Custom(&RULES_10),
    Workload::Custom(&RULES_1K),
    Workload::Custom(&RULES_10K),
];

/// nginx in `srv` published on host port 8080; the N rules are added per run. The base state
/// of the agent is this file as it is (no policies).
const SPEC: &str = r#"# Written by cargo xtask bench (scenario scale-policy).
uplink: eth0
networks:
  - {name: bench, bridge: br-bench, subnet: 172.31.0.0/24, gateway: 172.31.0.1}
endpoints:
  - name: srv
    interfaces: [{network: bench, ip: 172.31.0.2, mac: "02:42:ac:1f:00:02", host_veth: veth-srv}]
ports:
  - {endpoint: srv, protocol: tcp, host_port: 8080, container_port: 80}
"#;

static SERVERS: [Server; 1] = [Server::Nginx {
    target: "srv",
    port: 80,
}];

pub fn scenario() -> Scenario {
    Scenario {
        name: "scale-policy",
        title: "outside client -> host port 8080 -> nginx in srv while N deny rules that do \
                not match it come first, a new connection per request",
        spec: SPEC,
        servers: &SERVERS,
        client: "outside",
        workloads: &WORKLOADS,
        paths: vec![
            PathDef {
                name: "iptables",
                description: "Docker 20.10's rules for port 8080 with the N rules in \
                              DOCKER-USER before its RETURN (walked by every forwarded \
                              packet); applied with iptables-restore",
                setup: iptables_setup,
            },
            PathDef {
                name: "dataplane",
                description: "our agent; the N rules as deny policies in its state file, \
                              compiled into lookups",
                setup: dataplane_setup,
            },
        ],
        subject: "dataplane",
        targets: &[],
    }
}

fn targets() -> Targets {
    Targets {
        http: socket_addr(HOST_IP, 8080),
        iperf: socket_addr(HOST_IP, 15201),
    }
}

fn iptables_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    iptables_restore(bed, "base.rules", &iptables_rules(0))?;
    Ok(targets())
}

fn dataplane_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    bed.start_agent_with(&["--cgroup", "none"])?;
    Ok(targets())
}

/// Rule `i`: its source (10.200.0.0/16 in order), its port, and whether it names `srv` as the
/// destination (every other rule).
fn other(i: usize) -> (Ipv4Addr, u16, bool) {
    let source = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + i as u32);
    (source, 1000 + (i % 50_000) as u16, i % 2 == 1)
}

/// The agent's state file with `n` rules (policies are the spec's last key).
fn state(n: usize) -> String {
    let mut text = SPEC.to_owned();
    if n == 0 {
        return text;
    }
    text.reserve(n * 100);
    text.push_str("policies:\n");
    for i in 0..n {
        let (source, port, to_srv) = other(i);
        let to = if to_srv { "{endpoint: srv}" } else { "{}" };
        let _ = writeln!(
            text,
            "  - {{name: r{i}, action: deny, from: {{cidr: {source}/32}}, to: {to}, ports: [\"{port}/tcp\"]}}"
        );
    }
    text
}

/// Docker's rules with `n` rules in DOCKER-USER before its RETURN.
fn iptables_rules(n: usize) -> String {
    let mut user = String::new();
    for i in 0..n {
        let (source, port, to_srv) = other(i);
        let to = if to_srv {
            format!(" -d {SRV_IP}/32")
        } else {
            String::new()
        };
        let _ = writeln!(
            user,
            "-A DOCKER-USER -s {source}/32{to} -p tcp -m tcp --dport {port} -j DROP"
        );
    }
    docker_rules(&[(8080, 80)]).replace(
        "-A DOCKER-USER -j RETURN\n",
        &format!("{user}-A DOCKER-USER -j RETURN\n"),
    )
}

/// Compiled entries the agent has for `n` rules: one each (distinct /32 sources, one port,
/// any or one endpoint as the destination).
fn entries_of(n: usize) -> u64 {
    n as u64
}

fn agent_to_base(bed: &Bed) -> anyhow::Result<()> {
    write_state(bed, &state(0))?;
    wait_applied(bed, APPLY_TIMEOUT, |s| {
        Ok(map_entries(s, "dp_policy")? == entries_of(0))
    })
    .context("returning to the base state")?;
    Ok(())
}

fn run_size(
    index: usize,
    bed: &Bed,
    client: &str,
    targets: &Targets,
    durations: Durations,
) -> anyhow::Result<Vec<(&'static Metric, f64)>> {
    let n = SIZES[index];
    let m = REFS[index];
    let mut values = Vec::new();
    match path_of(bed) {
        "iptables" => {
            iptables_restore(bed, "base.rules", &iptables_rules(0))?;
            let took = iptables_restore(bed, "scaled.rules", &iptables_rules(n))?;
            values.push((m[3], took.as_secs_f64() * 1e3));
        }
        "dataplane" => {
            agent_to_base(bed)?;
            let text = state(n);
            let took = timed_apply(bed, &text, APPLY_TIMEOUT, |s| {
                Ok(map_entries(s, "dp_policy")? == entries_of(n))
            })?;
            values.push((m[3], took.as_secs_f64() * 1e3));
            if let Some(reconcile) = last_reconcile(&bed.agent_log()) {
                values.push((m[4], reconcile.as_secs_f64() * 1e3));
            }
        }
        other => anyhow::bail!("scale-policy: no path {other:?}"),
    }
    measure_with_others(bed, client, targets, durations, m, &mut values)?;
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_come_before_docker_user_returns_and_match_in_both_forms() {
        let rules = iptables_rules(3);
        let first = rules
            .find("-A DOCKER-USER -s 10.200.0.0/32 -p tcp -m tcp --dport 1000 -j DROP")
            .unwrap();
        let second = rules
            .find("-A DOCKER-USER -s 10.200.0.1/32 -d 172.31.0.2/32 -p tcp -m tcp --dport 1001")
            .unwrap();
        let ret = rules.find("-A DOCKER-USER -j RETURN").unwrap();
        assert!(first < second && second < ret);
        let text = state(2);
        assert!(text.contains(
            "  - {name: r1, action: deny, from: {cidr: 10.200.0.1/32}, to: {endpoint: srv}, ports: [\"1001/tcp\"]}"
        ));
        assert_eq!(state(0), SPEC);
        assert_eq!(other(9_999).0, Ipv4Addr::new(10, 200, 39, 15));
    }

    #[test]
    fn the_state_with_ten_thousand_rules_compiles_to_one_entry_each() {
        let model = dataplane::model::Model::from_spec(
            &dataplane::model::StateFile::parse(&state(10_000)).unwrap(),
        )
        .unwrap();
        let compiled = dataplane::reconcile::policy::compile(&model).unwrap();
        assert_eq!(compiled.tables.entries.len() as u64, entries_of(10_000));
    }
}
