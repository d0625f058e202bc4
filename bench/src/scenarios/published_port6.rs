//! `published-port6` (issue 15): published-port over IPv6. The same container, servers and
//! workloads as `published-port`, reached on the host's IPv6 address, through plain routing
//! to the container's IPv6 address, the ip6tables rules Docker installs for an IPv6 network
//! (`"ip6tables": true`, a ULA subnet, `--userland-proxy=false`; read from dockerd 20.10.24)
//! and our agent (translation at the uplink's tc ingress to the container's IPv6 address, the
//! client's address kept); and those ip6tables rules, which `masquerade6` loads too.

use std::{fmt::Write as _, time::Duration};

use super::published_port::{HTTP_HOST_PORT, IPERF_HOST_PORT};
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

/// The ports the scenario publishes, (host, container) as `docker run -p 8080:80 -p
/// 15201:5201`.
pub const PUBLISHED: [(u16, u16); 2] = [(HTTP_HOST_PORT, HTTP_PORT), (IPERF_HOST_PORT, IPERF_PORT)];

/// What `ip6tables-save` shows on a Docker host with `--userland-proxy=false` and ip6tables
/// on, its default bridge (no IPv6 on it) and one IPv6 bridge network `br-bench` with a ULA
/// subnet, one container publishing `ports` (host, container), TCP.
///
/// Read from Debian's dockerd 20.10.24 (`"experimental": true, "ip6tables": true`, the only
/// engine this machine has), and checked against it by the Docker test
/// `the_ip6tables_baseline_is_what_dockerd_installs` (tests/tests/docker.rs):
/// - nat: PREROUTING and OUTPUT jump to DOCKER for local destinations (OUTPUT with loopback
///   too, without docker-proxy); POSTROUTING masquerades local sources leaving to the bridge
///   (hairpin from the host), the network's outbound traffic (NAT66: a ULA subnet is not
///   routed) and per port a container reaching its own port; DOCKER has a DNAT per port, no
///   `! -i BRIDGE` and no `-i BRIDGE -j RETURN` without docker-proxy;
/// - filter: FORWARD (policy DROP) through the isolation stages (which have the default
///   bridge's rules although it has no IPv6), conntrack RELATED,ESTABLISHED, DOCKER with the
///   per-port ACCEPT; no DOCKER-USER, which 20.10 makes for IPv4 only;
/// - the ports in Docker's order, the highest host port first (go-connections' SortPortMap);
///   no raw or mangle rule.
///
/// Newer Docker differs (read from moby's source and its generated iptables docs, not run
/// here): from 23.0 ip6tables has DOCKER-USER too (`FORWARD -j DOCKER-USER` first and
/// `DOCKER-USER -j RETURN`, two rules more for every forwarded packet); 28.0 moves FORWARD's
/// rules into DOCKER-FORWARD, DOCKER-CT and DOCKER-BRIDGE, adds a DROP per bridge to DOCKER
/// and a raw PREROUTING DROP of direct access per published container address. None of that
/// is here, since none of it can be checked against an engine on this machine.
pub fn docker_rules6(ports: &[(u16, u16)]) -> String {
    let (net, br, ip) = (NETWORK6, BRIDGE, CONTAINER_IP6);
    let mut ports = ports.to_vec();
    ports.sort_by_key(|&(host_port, _)| std::cmp::Reverse(host_port));
    let mut hairpin = String::new();
    let mut dnat = String::new();
    let mut accept = String::new();
    for (host_port, port) in ports {
        let _ = writeln!(
            hairpin,
            "-A POSTROUTING -s {ip}/128 -d {ip}/128 -p tcp -m tcp --dport {port} -j MASQUERADE"
        );
        let _ = writeln!(
            dnat,
            "-A DOCKER -p tcp -m tcp --dport {host_port} -j DNAT --to-destination [{ip}]:{port}"
        );
        let _ = writeln!(
            accept,
            "-A DOCKER -d {ip}/128 ! -i {br} -o {br} -p tcp -m tcp --dport {port} -j ACCEPT"
        );
    }
    format!(
        "*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-ISOLATION-STAGE-2 - [0:0]
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o {br} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o {br} -j DOCKER
-A FORWARD -i {br} ! -o {br} -j ACCEPT
-A FORWARD -i {br} -o {br} -j ACCEPT
{accept}-A DOCKER-ISOLATION-STAGE-1 -i {br} ! -o {br} -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-ISOLATION-STAGE-2 -o {br} -j DROP
-A DOCKER-ISOLATION-STAGE-2 -o docker0 -j DROP
-A DOCKER-ISOLATION-STAGE-2 -j RETURN
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -o {br} -m addrtype --src-type LOCAL -j MASQUERADE
-A POSTROUTING -s {net} ! -o {br} -j MASQUERADE
{hairpin}{dnat}COMMIT
"
    )
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
                description: "Docker 20.10's ip6tables nat and filter rules with \
                              userland-proxy off (DNAT, MASQUERADE, FORWARD chains) in the host \
                              namespace",
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
    let rules = docker_rules6(&PUBLISHED);
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
    fn docker_rules6_have_a_dnat_and_accept_per_port_highest_host_port_first() {
        let rules = docker_rules6(&PUBLISHED);
        let dnat15201 = "-A DOCKER -p tcp -m tcp --dport 15201 -j DNAT --to-destination \
                         [fd00:31::2]:5201\n";
        let dnat8080 = "-A DOCKER -p tcp -m tcp --dport 8080 -j DNAT --to-destination \
                        [fd00:31::2]:80\n";
        let (a, b) = (
            rules.find(dnat15201).unwrap(),
            rules.find(dnat8080).unwrap(),
        );
        assert!(a < b, "{rules}");
        assert!(rules.contains(
            "-A DOCKER -d fd00:31::2/128 ! -i br-bench -o br-bench -p tcp -m tcp --dport 5201 \
             -j ACCEPT\n"
        ));
        assert!(rules.contains(
            "-A POSTROUTING -s fd00:31::2/128 -d fd00:31::2/128 -p tcp -m tcp --dport 80 \
             -j MASQUERADE\n"
        ));
        assert!(rules.contains("-A POSTROUTING -s fd00:31::/64 ! -o br-bench -j MASQUERADE\n"));
        assert!(rules.contains(":FORWARD DROP [0:0]\n"));
        assert_eq!(rules.matches("COMMIT\n").count(), 2);
        // Nothing of IPv4 is left in them.
        for v4 in ["172.31.", "127.0.0.0", "/32", "/24"] {
            assert!(!rules.contains(v4), "{v4}");
        }
    }

    #[test]
    fn docker_rules6_without_ports_have_no_per_port_rule() {
        let rules = docker_rules6(&[]);
        assert!(!rules.contains("--dport"), "{rules}");
        assert!(rules.contains("-A POSTROUTING -s fd00:31::/64 ! -o br-bench -j MASQUERADE\n"));
    }
}
