//! `localhost` (issue 8): a host process connecting to 127.0.0.1:8080, a port published by
//! a container, through our cgroup connect4 hook against docker-proxy (what Docker does by
//! default), against Docker's rules with `userland-proxy: false` (DNAT in nat OUTPUT with
//! route_localnet) and against connecting to the container's address directly.
//!
//! The client runs in the sandbox host's cgroup (`host-cgroup`, bed.rs), which is where the
//! agent's socket hook is attached (`--cgroup`), as `dataplane sandbox exec NAME host` does.

use std::time::Duration;

use anyhow::{Context as _, bail};

use super::published_port::docker_rules;
use super::{BRIDGE, WRK, WRK_NEW_CONN, iptables_restore, socket_addr};
use crate::bed::Bed;
use crate::bed::Server;
use crate::client::Targets;
use crate::framework::metric::HTTP_RPS;
use crate::framework::scenario::Goal;
use crate::framework::scenario::PathDef;
use crate::framework::scenario::Scenario;
use crate::framework::workload::Workload;

const SPEC: &str = r#"# Written by cargo xtask bench (scenario localhost).
uplink: eth0
networks:
  - {name: bench, bridge: br-bench, subnet: 172.31.0.0/24, gateway: 172.31.0.1}
endpoints:
  - name: srv
    interfaces: [{network: bench, ip: 172.31.0.2, mac: "02:42:ac:1f:00:02", host_veth: veth-srv}]
ports:
  - {endpoint: srv, protocol: tcp, host_port: 8080, container_port: 80}
"#;

const CONTAINER_IP: &str = "172.31.0.2";

static SERVERS: [Server; 1] = [Server::Nginx {
    target: "srv",
    port: 80,
}];

static WORKLOADS: [Workload; 2] = [Workload::Custom(&WRK), Workload::Custom(&WRK_NEW_CONN)];

static GOALS: [Goal; 1] = [Goal {
    metric: &HTTP_RPS,
    baseline: "docker-proxy",
    min: 3.0,
    source: "issue 8: several times docker-proxy",
}];

pub fn scenario() -> Scenario {
    Scenario {
        name: "localhost",
        title: "host process -> 127.0.0.1:8080 -> nginx in container srv (docker run -p \
                8080:80)",
        spec: SPEC,
        servers: &SERVERS,
        client: "host-cgroup",
        workloads: &WORKLOADS,
        paths: vec![
            PathDef {
                name: "plain",
                description: "the host process connects to the container's address \
                              172.31.0.2:80 directly (upper bound)",
                setup: plain_setup,
            },
            PathDef {
                name: "docker-proxy",
                description: "Debian's docker-proxy (docker.io 20.10) in the host namespace, \
                              listening on 127.0.0.1:8080, copying to 172.31.0.2:80",
                setup: docker_proxy_setup,
            },
            PathDef {
                name: "iptables",
                description: "Docker's rules with userland-proxy false: DNAT in nat OUTPUT \
                              (127.0.0.0/8 included), MASQUERADE of local sources to the \
                              bridge, route_localnet on the bridge",
                setup: iptables_setup,
            },
            PathDef {
                name: "dataplane",
                description: "our agent's cgroup connect4 hook on the sandbox host's cgroup: \
                              the socket connects to 172.31.0.2:80 from the start",
                setup: dataplane_setup,
            },
        ],
        subject: "dataplane",
        targets: &GOALS,
    }
}

fn targets(ip: &str, port: u16) -> Targets {
    Targets {
        http: socket_addr(ip, port),
        iperf: socket_addr(ip, 5201),
    }
}

fn plain_setup(_bed: &mut Bed) -> anyhow::Result<Targets> {
    Ok(targets(CONTAINER_IP, 80))
}

/// Where Debian's docker.io puts docker-proxy (it is not on PATH everywhere).
fn docker_proxy_binary() -> anyhow::Result<String> {
    for path in [
        "/usr/sbin/docker-proxy",
        "/usr/bin/docker-proxy",
        "/usr/libexec/docker/docker-proxy",
    ] {
        if std::path::Path::new(path).exists() {
            return Ok(path.to_owned());
        }
    }
    bail!("no docker-proxy (apt-get install docker.io; `cargo xtask setup` does)")
}

fn docker_proxy_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    let proxy = docker_proxy_binary()?;
    // Docker starts one per published port and host address, with these arguments, and
    // reads "0" from its fd 3 once it listens; without an fd 3 the proxy's listening socket
    // gets that number and the proxy closes it itself. /dev/null stands in for dockerd.
    bed.spawn(
        "docker-proxy",
        "host",
        &[
            "sh",
            "-c",
            &format!(
                "exec {proxy} -proto tcp -host-ip 127.0.0.1 -host-port 8080 -container-ip \
                 {CONTAINER_IP} -container-port 80 3>/dev/null"
            ),
        ],
    )?;
    Ok(targets("127.0.0.1", 8080))
}

/// Docker's rules as `userland-proxy: false` writes them: the OUTPUT jump without
/// `! -d 127.0.0.0/8` and a MASQUERADE of local sources leaving to the bridge.
fn hairpin_rules() -> anyhow::Result<String> {
    let rules = docker_rules(&[(8080, 80)]);
    let output = "-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER\n";
    let masquerade = format!(
        "-A POSTROUTING -s {} ! -o {BRIDGE} -j MASQUERADE\n",
        super::NETWORK
    );
    if !rules.contains(output) || !rules.contains(&masquerade) {
        bail!("scenario::docker_rules changed: cannot derive the userland-proxy=false rules");
    }
    Ok(rules
        .replace(output, "-A OUTPUT -m addrtype --dst-type LOCAL -j DOCKER\n")
        .replace(
            &masquerade,
            &format!(
                "{masquerade}-A POSTROUTING -o {BRIDGE} -m addrtype --src-type LOCAL -j \
                 MASQUERADE\n"
            ),
        ))
}

fn iptables_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    iptables_restore(bed, "docker-hairpin.rules", &hairpin_rules()?)?;
    bed.run_ok(
        "host",
        &[
            "sysctl",
            "-q",
            "-w",
            &format!("net.ipv4.conf.{BRIDGE}.route_localnet=1"),
        ],
        Duration::from_secs(5),
    )?;
    Ok(targets("127.0.0.1", 8080))
}

fn dataplane_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    // The socket hook must be on the sandbox host's cgroup here: that is what is measured.
    let cgroup = bed
        .sandbox()
        .host_cgroup()
        .context("the sandbox made no host cgroup (no cgroup2?)")?;
    bed.start_agent_with(&["--cgroup", &cgroup])?;
    Ok(targets("127.0.0.1", 8080))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hairpin_rules_dnat_localhost_and_masquerade_local_sources() {
        let rules = hairpin_rules().unwrap();
        assert!(rules.contains("-A OUTPUT -m addrtype --dst-type LOCAL -j DOCKER\n"));
        assert!(!rules.contains("! -d 127.0.0.0/8"));
        assert!(
            rules.contains(
                "-A POSTROUTING -o br-bench -m addrtype --src-type LOCAL -j MASQUERADE\n"
            )
        );
    }
}
