//! `syn-flood` (issue 12): legitimate new connections through a published port while a
//! spoofed SYN flood (hping3 --flood --rand-source from the outside namespace) hits the same
//! port, against the same without the flood, in one run. With the flood the conntrack table of
//! unestablished connections is full all the time; what this measures is whether new clients
//! still get in and what the flood costs them. The flood and the client share the machine's
//! two cores, so part of the slowdown is CPU taken by the generator, whatever the path.

use std::{
    process::{Child, Stdio},
    time::Duration,
};

use super::{HOST_IP, NEWCONN_P50, NEWCONN_P99, NEWCONN_RPS, new_conn_wrk, path_of, socket_addr};
use crate::bed::{Bed, Server};
use crate::client::Targets;
use crate::framework::Durations;
use crate::framework::metric::Metric;
use crate::framework::scenario::{PathDef, Scenario};
use crate::framework::workload::{CustomWorkload, Workload};

/// One container `srv` running nginx, published on the host's port 8080.
const SPEC: &str = r#"# Written by cargo xtask bench (scenario syn-flood).
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

static NEW_CONNS: CustomWorkload = CustomWorkload {
    label: "wrk new conns",
    metrics: &[&NEWCONN_RPS, &NEWCONN_P50, &NEWCONN_P99],
    run,
};

static WORKLOADS: [Workload; 1] = [Workload::Custom(&NEW_CONNS)];

/// The flood's hard bound, whatever happens to this process: a workload run takes the wrk
/// run (at most `MAX_SECS`) and the probe (2 s) after a 1 s head start of the flood.
const FLOOD_LIMIT_SECS: &str = "12";

pub fn scenario() -> Scenario {
    Scenario {
        name: "syn-flood",
        title: "new connections from the outside client to a published port (nginx in srv) \
                while a spoofed SYN flood hits the same port",
        spec: SPEC,
        servers: &SERVERS,
        client: "outside",
        workloads: &WORKLOADS,
        paths: vec![
            PathDef {
                name: "dataplane",
                description: "our agent, no flood",
                setup: dataplane_setup,
            },
            PathDef {
                name: "dataplane-flood",
                description: "our agent while hping3 -S --flood --rand-source runs from the \
                              outside namespace at the same port (--ct-max-entries 65536: the \
                              table of handshakes, 16,384 entries, stays full)",
                setup: dataplane_setup,
            },
        ],
        subject: "dataplane-flood",
        targets: &[],
    }
}

fn targets() -> Targets {
    Targets {
        http: socket_addr(HOST_IP, 8080),
        iperf: socket_addr(HOST_IP, 5201),
    }
}

fn dataplane_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    bed.start_agent_with(&["--cgroup", "none", "--ct-max-entries", "65536"])?;
    Ok(targets())
}

/// Starts the flood (bounded by `timeout`) in the outside namespace.
fn start_flood(bed: &Bed) -> anyhow::Result<Child> {
    let child = bed
        .sandbox()
        .command_in(
            "outside",
            &[
                "timeout",
                FLOOD_LIMIT_SECS,
                "hping3",
                "-q",
                "-S",
                "--flood",
                "--rand-source",
                "-p",
                "8080",
                HOST_IP,
            ],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    // Let the table of handshakes fill before measuring.
    std::thread::sleep(Duration::from_secs(1));
    Ok(child)
}

fn run(
    bed: &Bed,
    client: &str,
    targets: &Targets,
    durations: Durations,
) -> anyhow::Result<Vec<(&'static Metric, f64)>> {
    let flood = if path_of(bed).ends_with("flood") {
        Some(start_flood(bed)?)
    } else {
        None
    };
    let url = format!("http://{}/", targets.http);
    let measured = new_conn_wrk(bed, client, &url, durations).and_then(|r| {
        let p = super::probe::probe(bed, client, targets.http, super::probe_secs(durations))?;
        Ok((r, p))
    });
    if let Some(mut flood) = flood {
        // The child is `timeout` (nsenter execs it): SIGTERM, which it passes on to hping3
        // (SIGKILL would orphan hping3 until the time limit).
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &flood.id().to_string()])
            .status();
        let _ = flood.wait();
    }
    let (r, p) = measured?;
    Ok(vec![
        (&NEWCONN_RPS, r.requests_per_sec),
        (&NEWCONN_P50, p.p50_us / 1000.0),
        (&NEWCONN_P99, p.p99_us / 1000.0),
    ])
}
