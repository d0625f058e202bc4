//! `flow-logging` (issue 6): the published-port traffic with the agent's flow events on
//! against off.

use super::{
    HOST_IP,
    published_port::{
        HTTP_HOST_PORT, IPERF_HOST_PORT, PUBLISHED_PORT_SERVERS, PUBLISHED_PORT_SPEC,
    },
    socket_addr,
};
use crate::{
    bed::Bed,
    client::Targets,
    framework::{
        metric::{HTTP_RPS, TCP_1},
        scenario::{Goal, PathDef, Scenario},
        workload::Workload,
    },
};

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

pub fn scenario() -> Scenario {
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
        http: socket_addr(HOST_IP, HTTP_HOST_PORT),
        iperf: socket_addr(HOST_IP, IPERF_HOST_PORT),
    })
}

fn events_off_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    agent_with_flow_events(bed, "off")
}

fn events_on_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    agent_with_flow_events(bed, "on")
}
