//! `published-port6` (issue 15): published-port over IPv6. The same container, servers and
//! workloads as `published-port`, reached on the host's IPv6 address, through plain routing
//! to the container's IPv6 address, the ip6tables rules Docker 27 installs for an IPv6 network
//! (`"ip6tables": true`, a ULA subnet) and our agent (translation at the uplink's tc ingress
//! to the container's IPv6 address, the client's address kept); and those ip6tables rules,
//! which `masquerade6` loads too.

use std::time::Duration;

use super::published_port::{DockerNetwork, HTTP_HOST_PORT, IPERF_HOST_PORT, rules_of};
use super::{BRIDGE, HOST_IP6, NETWORK6, iptables_restore_family, socket_addr};
use crate::{
    bed::{Bed, Server},
    client::Targets,
    framework::{
        metric::HTTP_RPS,
        scenario::{Goal, PathDef, Scenario},
        workload::Workload,
    },
};

pub const CONTAINER_IP6: &str = "fd00:31::2";
const HTTP_PORT: u16 = 80;
const IPERF_PORT: u16 = 5201;

/// The published-port sandbox with IPv6 on its network and container (dual-stack, as Docker
/// makes an IPv6 network). The IPv4 side is there but unused: every client here speaks IPv6.
const SPEC: &str = r#"# Written by cargo xtask bench (scenario published-port6).
uplink: eth0
networks:
  - {name: bench, bridge: br-bench, subnet: 172.31.0.0/24, gateway: 172.31.0.1,
     subnet6: "fd00:31::/64", gateway6: "fd00:31::1"}
endpoints:
  - name: srv
    interfaces: [{network: bench, ip: 172.31.0.2, ip6: "fd00:31::2", mac: "02:42:ac:1f:00:02", host_veth: veth-srv}]
ports:
  - {endpoint: srv, protocol: tcp, host_port: 8080, container_port: 80}
  - {endpoint: srv, protocol: tcp, host_port: 15201, container_port: 5201}
"#;

static SERVERS: [Server; 2] = [
    Server::NginxDual {
        target: "srv",
        port: HTTP_PORT,
    },
    Server::Iperf3 {
        target: "srv",
        port: IPERF_PORT,
    },
];

/// published-port's goals (issue 3), asked of IPv6 too by issue 15.
static GOALS: [Goal; 2] = [
    Goal {
        metric: &HTTP_RPS,
        baseline: "ip6tables",
        min: 1.25,
        source: "issues 3, 15",
    },
    Goal {
        metric: &HTTP_RPS,
        baseline: "plain",
        min: 0.95,
        source: "issues 3, 15",
    },
];

/// The network as Docker's ip6tables rules name it.
pub const DOCKER_NETWORK6: DockerNetwork = DockerNetwork {
    subnet: NETWORK6,
    bridge: BRIDGE,
    container: CONTAINER_IP6,
    host_prefix: 128,
    loopback: "::1/128",
};

/// What `ip6tables-save` shows on a Docker 27 host with `"ip6tables": true` (its default
/// since 27.0) and one IPv6 bridge network with a ULA subnet, one container publishing
/// `ports` (host, container), TCP: the IPv4 rules' layout in IPv6 terms (Docker installs the
/// same chains in both families): nat DOCKER with a DNAT per port, the per-port hairpin
/// MASQUERADE, MASQUERADE of the network's outbound traffic (NAT66: a ULA subnet is not
/// routed), and filter FORWARD (policy DROP) with DOCKER-USER, the isolation stages,
/// conntrack RELATED,ESTABLISHED and the per-port ACCEPT in DOCKER.
pub fn docker_rules6(ports: &[(u16, u16)]) -> String {
    rules_of(&DOCKER_NETWORK6, ports)
}

pub fn scenario() -> Scenario {
    Scenario {
        name: "published-port6",
        title: "outside client 2001:db8::2 -> [2001:db8::1]:8080 / :15201 -> nginx / iperf3 in \
                container srv (fd00:31::2), over IPv6",
        spec: SPEC,
        servers: &SERVERS,
        client: "outside",
        workloads: &[
            Workload::Wrk,
            Workload::Iperf { streams: 1 },
            Workload::Iperf { streams: 4 },
        ],
        paths: vec![
            PathDef {
                name: "plain",
                description: "routing straight to the container's IPv6 address, no \
                              translation (upper bound)",
                setup: plain_setup,
            },
            PathDef {
                name: "ip6tables",
                description: "Docker 27's ip6tables nat and filter rules (DNAT, MASQUERADE, \
                              FORWARD chains) in the host namespace",
                setup: ip6tables_setup,
            },
            PathDef {
                name: "dataplane",
                description: "our agent publishing the ports on the host's IPv6 address",
                setup: dataplane_setup,
            },
        ],
        subject: "dataplane",
        targets: &GOALS,
    }
}

fn published() -> Targets {
    Targets {
        http: socket_addr(HOST_IP6, HTTP_HOST_PORT),
        iperf: socket_addr(HOST_IP6, IPERF_HOST_PORT),
    }
}

/// The outside client routes the container prefix via the host's uplink address.
fn plain_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    bed.run_ok(
        "outside",
        &["ip", "-6", "route", "add", NETWORK6, "via", HOST_IP6],
        Duration::from_secs(5),
    )?;
    Ok(Targets {
        http: socket_addr(CONTAINER_IP6, HTTP_PORT),
        iperf: socket_addr(CONTAINER_IP6, IPERF_PORT),
    })
}

/// Docker's ip6tables rules, loaded with ip6tables-restore in the sandbox's host namespace only.
fn ip6tables_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    let rules = docker_rules6(&[(HTTP_HOST_PORT, HTTP_PORT), (IPERF_HOST_PORT, IPERF_PORT)]);
    iptables_restore_family(bed, "ip6tables-restore", "docker6.rules", &rules)?;
    Ok(published())
}

fn dataplane_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    bed.start_agent()?;
    Ok(published())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_rules6_have_a_dnat_and_accept_per_port_in_ipv6_terms() {
        let rules = docker_rules6(&[(8080, 80), (15201, 5201)]);
        assert!(rules.contains(
            "-A DOCKER ! -i br-bench -p tcp -m tcp --dport 8080 -j DNAT --to-destination \
             [fd00:31::2]:80\n"
        ));
        assert!(rules.contains(
            "-A DOCKER -d fd00:31::2/128 ! -i br-bench -o br-bench -p tcp -m tcp --dport 5201 \
             -j ACCEPT\n"
        ));
        assert!(rules.contains(
            "-A POSTROUTING -s fd00:31::2/128 -d fd00:31::2/128 -p tcp -m tcp --dport 80 \
             -j MASQUERADE\n"
        ));
        assert!(rules.contains("-A POSTROUTING -s fd00:31::/64 ! -o br-bench -j MASQUERADE\n"));
        assert!(rules.contains("-A OUTPUT ! -d ::1/128 -m addrtype --dst-type LOCAL -j DOCKER\n"));
        assert!(rules.contains(":FORWARD DROP [0:0]\n"));
        assert_eq!(rules.matches("COMMIT\n").count(), 2);
        // Nothing of IPv4 is left in them.
        for v4 in ["172.31.", "127.0.0.0", "/32", "/24"] {
            assert!(!rules.contains(v4), "{v4}");
        }
    }
}
