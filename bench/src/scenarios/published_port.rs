//! `published-port` (issue 3): `docker run -p 8080:80` seen from outside the host, through
//! plain routing, Docker's iptables rules and our agent; and Docker's rules themselves, which
//! other scenarios load as their iptables baseline.

use std::{fmt::Write as _, time::Duration};

use anyhow::Context as _;

use crate::{
    bed::{Bed, Server},
    client::Targets,
    framework::{
        metric::HTTP_RPS,
        scenario::{Goal, PathDef, Scenario},
        workload::Workload,
    },
};

use super::{BRIDGE, HOST_IP, NETWORK, socket_addr};

const CONTAINER_IP: &str = "172.31.0.2";
const HTTP_PORT: u16 = 80;
pub const HTTP_HOST_PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;
pub const IPERF_HOST_PORT: u16 = 15201;

/// One network, one container `srv`, both ports published (the agent reads `ports`; the other
/// paths ignore them, so every path's sandbox is the same).
pub const PUBLISHED_PORT_SPEC: &str = r#"# Written by cargo xtask bench (scenario published-port).
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
pub const PUBLISHED_PORT_SERVERS: &[Server] = &[
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

pub fn scenario() -> Scenario {
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

/// The outside client routes the container network via the host and talks to the container
/// directly: what every translating path costs is measured against this.
fn plain_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    bed.run_ok(
        "outside",
        &["ip", "route", "add", NETWORK, "via", HOST_IP],
        Duration::from_secs(5),
    )?;
    Ok(Targets {
        http: socket_addr(CONTAINER_IP, HTTP_PORT),
        iperf: socket_addr(CONTAINER_IP, IPERF_PORT),
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
        http: socket_addr(HOST_IP, HTTP_HOST_PORT),
        iperf: socket_addr(HOST_IP, IPERF_HOST_PORT),
    })
}

/// The agent on the sandbox's state file, which publishes both ports.
fn dataplane_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    bed.start_agent()?;
    Ok(Targets {
        http: socket_addr(HOST_IP, HTTP_HOST_PORT),
        iperf: socket_addr(HOST_IP, IPERF_HOST_PORT),
    })
}

/// What `iptables-save` shows on a Docker 20.10 host with one bridge network and one container
/// publishing `ports` (host, container), TCP, with docker-proxy on (Docker's default): the nat
/// DOCKER chain with a DNAT per port and a hairpin MASQUERADE per port, MASQUERADE of the
/// network's outbound traffic, and the filter FORWARD chain with DOCKER-USER, the two
/// isolation stages and the per-port ACCEPT in DOCKER. FORWARD's policy is DROP, as Docker
/// sets it. The default bridge's rules and Docker's order of the ports are left out (the IPv6
/// twin, `published_port6::docker_rules6`, has them).
pub fn docker_rules(ports: &[(u16, u16)]) -> String {
    let (net, br, ip) = (NETWORK, BRIDGE, CONTAINER_IP);
    let mut nat = String::new();
    let mut dnat = String::new();
    let mut accept = String::new();
    for &(host_port, container_port) in ports {
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
}
