//! `vip` and `vip-outside` (issue 4): one service VIP load-balanced over three nginx backends,
//! reached from a container (east-west) and from outside through a published port (north-south),
//! against kube-proxy's iptables rules and against talking to the three backends directly.

use std::net::SocketAddr;
use std::time::Duration;

use super::{
    HOST_IP, HTTP_P50, HTTP_P99, HTTP_RPS, KubeService, NEWCONN_P50, NEWCONN_P99, NEWCONN_RPS,
    addr, iptables_restore, kube_proxy_rules, socket_addr, wrk_keep_alive, wrk_new_conn,
};
use crate::bed::Bed;
use crate::bed::Server;
use crate::client::Targets;
use crate::framework::scenario::PathDef;
use crate::framework::scenario::Scenario;
use crate::framework::workload::CustomWorkload;
use crate::framework::workload::Workload;

/// Client container `cli`, backends b1-b3 labelled app=web, the service `web` (Maglev) over
/// them, and host port 8080 leading to it. Every path's sandbox is this one; only the agent
/// reads `services` and `ports`.
const SPEC: &str = r#"# Written by cargo xtask bench (scenarios vip, vip-outside).
uplink: eth0
networks:
  - {name: bench, bridge: br-bench, subnet: 172.31.0.0/24, gateway: 172.31.0.1}
endpoints:
  - name: cli
    interfaces: [{network: bench, ip: 172.31.0.2, mac: "02:42:ac:1f:00:02", host_veth: veth-cli}]
  - name: b1
    labels: {app: web}
    interfaces: [{network: bench, ip: 172.31.0.3, mac: "02:42:ac:1f:00:03", host_veth: veth-b1}]
  - name: b2
    labels: {app: web}
    interfaces: [{network: bench, ip: 172.31.0.4, mac: "02:42:ac:1f:00:04", host_veth: veth-b2}]
  - name: b3
    labels: {app: web}
    interfaces: [{network: bench, ip: 172.31.0.5, mac: "02:42:ac:1f:00:05", host_veth: veth-b3}]
services:
  - {name: web, vip: 10.96.0.10, port: 80, target_port: 80, selector: {app: web}, algorithm: maglev}
ports:
  - {service: web, protocol: tcp, host_port: 8080, container_port: 80}
"#;

const VIP: &str = "10.96.0.10";
const NODE_PORT: u16 = 8080;
const BACKENDS: [&str; 3] = ["172.31.0.3", "172.31.0.4", "172.31.0.5"];

static SERVERS: [Server; 3] = [
    Server::Nginx {
        target: "b1",
        port: 80,
    },
    Server::Nginx {
        target: "b2",
        port: 80,
    },
    Server::Nginx {
        target: "b3",
        port: 80,
    },
];

/// The scenario's own wrk workloads: as everywhere else (`WRK`, `WRK_NEW_CONN`), but with one
/// wrk thread per backend, so that `plain` can be a true upper bound: its threads talk to the
/// three backends directly, the load spread as the VIP spreads it, while every thread of the
/// other paths talks to the VIP or the node port. Only the address differs between paths.
static WORKLOADS: [Workload; 2] = [
    Workload::Custom(&WRK_SPREAD),
    Workload::Custom(&WRK_NEW_CONN_SPREAD),
];

static WRK_SPREAD: CustomWorkload = CustomWorkload {
    label: "wrk, a thread per backend",
    metrics: &[&HTTP_RPS, &HTTP_P50, &HTTP_P99],
    run: |bed, client, targets, durations| {
        wrk_keep_alive(bed, client, targets, &spread(targets), durations)
    },
};

static WRK_NEW_CONN_SPREAD: CustomWorkload = CustomWorkload {
    label: "wrk new conns, a thread per backend",
    metrics: &[&NEWCONN_RPS, &NEWCONN_P50, &NEWCONN_P99],
    run: |bed, client, targets, durations| {
        wrk_new_conn(bed, client, targets, &spread(targets), durations)
    },
};

/// The wrk threads' addresses: `plain`'s target is backend b1, and its threads go to each
/// backend directly; a VIP or a node port gets every thread.
fn spread(targets: &Targets) -> Vec<SocketAddr> {
    let backends: Vec<SocketAddr> = BACKENDS
        .iter()
        .map(|ip| SocketAddr::V4(addr(ip, targets.http.port())))
        .collect();
    if backends.contains(&targets.http) {
        backends
    } else {
        vec![targets.http; BACKENDS.len()]
    }
}

pub fn vip() -> Scenario {
    Scenario {
        name: "vip",
        title: "container cli -> service VIP 10.96.0.10:80 -> 3 nginx backends (Maglev), \
                east-west",
        spec: SPEC,
        servers: &SERVERS,
        client: "cli",
        workloads: &WORKLOADS,
        paths: vec![
            PathDef {
                name: "plain",
                description: "the client talks to the three backends' addresses directly \
                              over the bridge, one wrk thread to each: no VIP, no load \
                              balancing, the same three nginx (upper bound)",
                setup: plain_setup,
            },
            PathDef {
                name: "iptables",
                description: "kube-proxy's iptables mode in the host namespace: KUBE-SERVICES \
                              -> KUBE-SVC (-m statistic --mode random) -> KUBE-SEP DNAT per \
                              backend; replies cross the bridge through br_netfilter, on by \
                              default in a new namespace",
                setup: iptables_setup,
            },
            PathDef {
                name: "dataplane",
                description: "our agent: the client container's processes in a cgroup its \
                              container hooks are on (--container-cgroup), so the VIP is \
                              translated at connect() (socket-level, Maglev over the socket \
                              cookie) and the packets go straight to the backend, tracked \
                              untranslated at the client's veth and delivered with \
                              bpf_redirect_peer",
                setup: dataplane_setup,
            },
        ],
        subject: "dataplane",
        targets: &[],
    }
}

pub fn vip_outside() -> Scenario {
    Scenario {
        name: "vip-outside",
        title: "outside client -> host port 8080 -> service web -> 3 nginx backends (Maglev), \
                north-south",
        spec: SPEC,
        servers: &SERVERS,
        client: "outside",
        workloads: &WORKLOADS,
        paths: vec![
            PathDef {
                name: "plain",
                description: "the client routes to the three backends' addresses through the \
                              host, one wrk thread to each: no translation, no load \
                              balancing, the same three nginx (upper bound)",
                setup: plain_outside_setup,
            },
            PathDef {
                name: "iptables",
                description: "kube-proxy's iptables mode with a NodePort 8080: KUBE-NODEPORTS \
                              -> KUBE-EXT (mark for masquerade, externalTrafficPolicy Cluster) \
                              -> KUBE-SVC -> KUBE-SEP DNAT",
                setup: iptables_outside_setup,
            },
            PathDef {
                name: "dataplane",
                description: "our agent: the published port leads to the service; translated \
                              at tc on the uplink, client address kept",
                setup: dataplane_outside_setup,
            },
        ],
        subject: "dataplane",
        targets: &[],
    }
}

fn targets(ip: &str, port: u16) -> Targets {
    Targets {
        http: socket_addr(ip, port),
        iperf: socket_addr(ip, 5201),
    }
}

fn plain_setup(_bed: &mut Bed) -> anyhow::Result<Targets> {
    Ok(targets(BACKENDS[0], 80))
}

fn plain_outside_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    bed.run_ok(
        "outside",
        &["ip", "route", "add", super::NETWORK, "via", HOST_IP],
        Duration::from_secs(5),
    )?;
    Ok(targets(BACKENDS[0], 80))
}

/// The service with its NodePort, the way kube-proxy writes it; the same rules serve both
/// scenarios (a container client uses the VIP, an outside one the NodePort).
pub fn web_service() -> KubeService {
    KubeService {
        name: "web".into(),
        vip: VIP.parse().expect("constant"),
        port: 80,
        backends: BACKENDS.iter().map(|ip| addr(ip, 80)).collect(),
        node_port: Some(NODE_PORT),
    }
}

fn install_kube_proxy(bed: &mut Bed) -> anyhow::Result<()> {
    iptables_restore(bed, "kube-proxy.rules", &kube_proxy_rules(&[web_service()]))?;
    Ok(())
}

fn iptables_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    install_kube_proxy(bed)?;
    Ok(targets(VIP, 80))
}

fn iptables_outside_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    install_kube_proxy(bed)?;
    Ok(targets(HOST_IP, NODE_PORT))
}

fn dataplane_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    // A cgroup of the bench's own for the client container's processes (wrk, curl, the
    // probe), never the machine's root: the agent's container hooks go there.
    let cgroup = testbed::cgroup::TestCgroup::create(&format!("{}-cli", bed.name))?;
    bed.sandbox().join_cgroup("cli", &cgroup.path);
    bed.start_agent_with(&["--cgroup", "none", "--container-cgroup", cgroup.path_str()])?;
    bed.keep(cgroup);
    Ok(targets(VIP, 80))
}

fn dataplane_outside_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    bed.start_agent_with(&["--cgroup", "none"])?;
    Ok(targets(HOST_IP, NODE_PORT))
}
