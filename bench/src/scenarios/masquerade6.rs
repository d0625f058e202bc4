//! `masquerade6` (issue 15): masquerade over IPv6 (NAT66, what Docker does for an IPv6 network
//! with a ULA subnet). A container's connections to a server outside the host, through our
//! NAT66 against Docker's ip6tables MASQUERADE (`docker_rules6`, dockerd 20.10's layout) and
//! against plain routing (the outside has a route back to the container prefix, nothing is
//! translated). The workloads of `masquerade` but its memory one (which reads the IPv4
//! conntrack map).

use std::time::Duration;

use super::published_port6::docker_rules6;
use super::{
    HOST_IP6, IPERF_1, NETWORK6, OUTSIDE_IP6, WRK, WRK_NEW_CONN, iptables_restore_family,
    socket_addr,
};
use crate::bed::Bed;
use crate::bed::Server;
use crate::client::Targets;
use crate::framework::scenario::PathDef;
use crate::framework::scenario::Scenario;
use crate::framework::workload::Workload;

/// One dual-stack container `cli` (fd00:31::2, as in published-port6, so its ip6tables rules
/// apply as they are); the servers run in the outside namespace.
const SPEC: &str = r#"# Written by cargo xtask bench (scenario masquerade6).
uplink: eth0
networks:
  - {name: bench, bridge: br-bench, subnet: 172.31.0.0/24, gateway: 172.31.0.1,
     subnet6: "fd00:31::/64", gateway6: "fd00:31::1"}
endpoints:
  - name: cli
    interfaces: [{network: bench, ip: 172.31.0.2, ip6: "fd00:31::2", mac: "02:42:ac:1f:00:02", host_veth: veth-cli}]
"#;

static SERVERS: [Server; 2] = [
    Server::NginxDual {
        target: "outside",
        port: 80,
    },
    Server::Iperf3 {
        target: "outside",
        port: 5201,
    },
];

static WORKLOADS: [Workload; 3] = [
    Workload::Custom(&WRK),
    Workload::Custom(&WRK_NEW_CONN),
    Workload::Custom(&IPERF_1),
];

pub fn scenario() -> Scenario {
    Scenario {
        name: "masquerade6",
        title: "container cli (fd00:31::2) -> nginx / iperf3 on the outside client \
                (2001:db8::2), leaving through the uplink, over IPv6",
        spec: SPEC,
        servers: &SERVERS,
        client: "cli",
        workloads: &WORKLOADS,
        paths: vec![
            PathDef {
                name: "plain",
                description: "routing only: the outside has a route to fd00:31::/64 via the \
                              host, nothing is translated (upper bound)",
                setup: plain_setup,
            },
            PathDef {
                name: "ip6tables",
                description: "Docker 20.10's ip6tables rules in the host namespace: nat \
                              POSTROUTING MASQUERADE of fd00:31::/64 and the filter FORWARD \
                              chains (docker_rules6 with no published port)",
                setup: ip6tables_setup,
            },
            PathDef {
                name: "dataplane",
                description: "our agent: NAT66 to the uplink's IPv6 address at tc egress, \
                              replies translated back at tc ingress",
                setup: dataplane_setup,
            },
        ],
        subject: "dataplane",
        // masquerade's (none: issue 8 set no ratio for it).
        targets: &[],
    }
}

fn targets() -> Targets {
    Targets {
        http: socket_addr(OUTSIDE_IP6, 80),
        iperf: socket_addr(OUTSIDE_IP6, 5201),
    }
}

fn plain_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    bed.run_ok(
        "outside",
        &["ip", "-6", "route", "add", NETWORK6, "via", HOST_IP6],
        Duration::from_secs(5),
    )?;
    Ok(targets())
}

fn ip6tables_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    iptables_restore_family(
        bed,
        "ip6tables-restore",
        "docker6.rules",
        &docker_rules6(&[]),
    )?;
    Ok(targets())
}

fn dataplane_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    bed.start_agent_with(&["--cgroup", "none"])?;
    Ok(targets())
}
