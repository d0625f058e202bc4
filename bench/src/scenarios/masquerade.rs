//! `masquerade` (issue 8): a container's connections to a server outside the host, through
//! our masquerade against Docker's iptables MASQUERADE and against plain routing (the outside
//! has a route back to the container network, nothing is translated).

use std::time::Duration;

use super::published_port::docker_rules;
use super::{
    HOST_IP, IPERF_1, NETWORK, OUTSIDE_IP, WRK, WRK_NEW_CONN, iptables_restore, socket_addr,
};
use crate::bed::Bed;
use crate::bed::Server;
use crate::client::Targets;
use crate::framework::scenario::PathDef;
use crate::framework::scenario::Scenario;
use crate::framework::workload::Workload;

/// One container `cli` (172.31.0.2, as in published-port, so Docker's rules apply as they
/// are); the servers run in the outside namespace.
const SPEC: &str = r#"# Written by cargo xtask bench (scenario masquerade).
uplink: eth0
networks:
  - {name: bench, bridge: br-bench, subnet: 172.31.0.0/24, gateway: 172.31.0.1}
endpoints:
  - name: cli
    interfaces: [{network: bench, ip: 172.31.0.2, mac: "02:42:ac:1f:00:02", host_veth: veth-cli}]
"#;

static SERVERS: [Server; 2] = [
    Server::Nginx {
        target: "outside",
        port: 80,
    },
    Server::Iperf3 {
        target: "outside",
        port: 5201,
    },
];

static WORKLOADS: [Workload; 4] = [
    Workload::Custom(&WRK),
    Workload::Custom(&WRK_NEW_CONN),
    Workload::Custom(&IPERF_1),
    // Bytes per tracked connection and per service, ours beside Linux conntrack's.
    Workload::Custom(&super::memory::MEMORY),
];

pub fn scenario() -> Scenario {
    Scenario {
        name: "masquerade",
        title: "container cli -> nginx / iperf3 on the outside client (192.0.2.2), leaving \
                through the uplink",
        spec: SPEC,
        servers: &SERVERS,
        client: "cli",
        workloads: &WORKLOADS,
        paths: vec![
            PathDef {
                name: "plain",
                description: "routing only: the outside has a route to 172.31.0.0/24 via the \
                              host, nothing is translated (upper bound)",
                setup: plain_setup,
            },
            PathDef {
                name: "iptables",
                description: "Docker 20.10's rules in the host namespace: nat POSTROUTING \
                              MASQUERADE of 172.31.0.0/24 and the filter FORWARD chains \
                              (scenario::docker_rules with no published port)",
                setup: iptables_setup,
            },
            PathDef {
                name: "dataplane",
                description: "our agent: SNAT to the uplink's address at tc egress, replies \
                              translated back at tc ingress",
                setup: dataplane_setup,
            },
        ],
        subject: "dataplane",
        targets: &[],
    }
}

fn targets() -> Targets {
    Targets {
        http: socket_addr(OUTSIDE_IP, 80),
        iperf: socket_addr(OUTSIDE_IP, 5201),
    }
}

fn plain_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    bed.run_ok(
        "outside",
        &["ip", "route", "add", NETWORK, "via", HOST_IP],
        Duration::from_secs(5),
    )?;
    Ok(targets())
}

fn iptables_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    iptables_restore(bed, "docker.rules", &docker_rules(&[]))?;
    Ok(targets())
}

fn dataplane_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    bed.start_agent_with(&["--cgroup", "none"])?;
    Ok(targets())
}
