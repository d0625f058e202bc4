//! What the agent answers to `dataplane status`: the kernel side as the datapath reports it,
//! the state in force, and the flow pipeline.

use dataplane_common::hook;

use super::Agent;
use crate::{
    control::status::{self, Status},
    kernel::netdev,
    model::{Model, PortRange, PortTarget},
    source::docker::SwarmView,
};

/// The Swarm view as `status` shows it.
fn swarm_rows(view: SwarmView) -> status::SwarmStatus {
    let networks = view
        .networks
        .into_iter()
        .map(|n| status::SwarmNetworkRow {
            name: n.name,
            id: n.id,
            ingress: n.ingress,
            subnets: n.subnets,
            vni: n.vni,
            services: n
                .services
                .into_iter()
                .map(|s| status::SwarmVipRow {
                    name: s.name,
                    vip: s.vip.map(|v| v.to_string()),
                    ports: s
                        .ports
                        .iter()
                        .map(|p| format!("{}->{}", p.published, p.target))
                        .collect(),
                    tasks: s
                        .tasks
                        .into_iter()
                        .map(|t| status::SwarmTaskRow {
                            name: t.name,
                            ip: t.ip.map(|ip| ip.to_string()),
                            node_addr: t.node_addr,
                            node: t.node,
                        })
                        .collect(),
                })
                .collect(),
        })
        .collect();
    let nodes = view.nodes.map(|list| {
        list.into_iter()
            .map(|n| status::SwarmNodeRow {
                name: n.hostname,
                id: n.id,
                addr: n.addr,
                role: n.role,
                state: n.state,
                availability: n.availability,
                leader: n.leader,
            })
            .collect()
    });
    let services = view.services.map(|list| {
        list.into_iter()
            .map(|s| status::SwarmServiceRow {
                ports: s
                    .ports
                    .iter()
                    .map(|p| {
                        format!(
                            "{}->{}/{} ({})",
                            p.published, p.target, p.protocol, p.publish_mode
                        )
                    })
                    .collect(),
                name: s.name,
                id: s.id,
                mode: s.endpoint_mode,
                replicas: s.replicas,
            })
            .collect()
    });
    status::SwarmStatus {
        node: view.node.node_name,
        node_id: view.node.node_id,
        node_addr: view.node.node_addr,
        role: if view.node.manager {
            "manager"
        } else {
            "worker"
        }
        .to_owned(),
        read_unix: view.read_unix,
        error: view.error,
        networks,
        nodes,
        services,
    }
}

/// The networks, services and published ports of `model`, as `status` shows them.
fn model_rows(
    model: &Model,
) -> (
    Vec<status::NetworkRow>,
    Vec<status::ServiceRow>,
    Vec<status::PortRow>,
) {
    let networks = model
        .networks
        .iter()
        .map(|n| status::NetworkRow {
            name: n.name.clone(),
            bridge: n.bridge.clone(),
            subnet: n.subnet.map(|c| c.to_string()),
            gateway: n.gateway.map(|g| g.to_string()),
            subnet6: n.subnet6.map(|c| c.to_string()),
            gateway6: n.gateway6.map(|g| g.to_string()),
        })
        .collect();
    let services = model
        .services
        .iter()
        .map(|s| status::ServiceRow {
            name: s.name.clone(),
            vip: s.vip.map(|v| v.to_string()),
            vip6: s.vip6.map(|v| v.to_string()),
            port: s.port,
            protocol: s.protocol.to_string(),
            // Backends by address (Swarm tasks) as "name (address)".
            backends: s
                .backends
                .iter()
                .cloned()
                .chain(s.remote.iter().map(|r| format!("{} ({})", r.name, r.addr)))
                .collect(),
        })
        .collect();
    let range = |r: &PortRange| {
        if r.first == r.last {
            r.first.to_string()
        } else {
            format!("{}-{}", r.first, r.last)
        }
    };
    let ports = model
        .ports
        .iter()
        .map(|p| status::PortRow {
            target: match &p.target {
                PortTarget::Endpoint(name) => format!("endpoint {name}"),
                PortTarget::Service(name) => format!("service {name}"),
            },
            protocol: p.protocol.to_string(),
            host_ip: p.host_ip.map(|ip| ip.to_string()),
            host_port: range(&p.host_ports),
            container_port: range(&p.container_ports),
        })
        .collect();
    (networks, services, ports)
}

impl Agent {
    pub(super) fn status(&self) -> anyhow::Result<Status> {
        let datapath = self.reconciler.datapath();
        let attachments = datapath
            .attachments()
            .into_iter()
            .map(|(interface, hook, ifindex)| status::Attachment {
                interface,
                ifindex,
                hook: hook::name(hook.number()).to_owned(),
                program: hook.program().to_owned(),
            })
            .collect();
        let maps = datapath
            .map_fill()?
            .into_iter()
            .map(|m| status::MapFill {
                name: m.name.to_owned(),
                entries: m.entries,
                capacity: m.capacity,
            })
            .collect();
        let interfaces = datapath
            .iface_stats()?
            .into_iter()
            .filter_map(|(key, stats)| {
                // The counters of an interface that went away (a stopped container's veth)
                // stay in the kernel's map; they are no interface's any more. Index 0 is the
                // cgroup hook's, which has none.
                let interface = match netdev::ifname(key.ifindex) {
                    Some(name) => name,
                    None if key.ifindex == 0 => "-".to_owned(),
                    None => return None,
                };
                Some(status::InterfaceCounters {
                    interface,
                    ifindex: key.ifindex,
                    hook: hook::name(key.hook).to_owned(),
                    packets: stats.packets,
                    bytes: stats.bytes,
                })
            })
            .collect();
        let endpoints = self
            .reconciler
            .applied()
            .iter()
            .flat_map(|model| model.endpoints.iter())
            .flat_map(|e| {
                e.interfaces.iter().map(|i| status::EndpointRow {
                    name: e.name.clone(),
                    network: i.network.clone(),
                    ip: i.ip.map(|ip| ip.to_string()).unwrap_or_default(),
                    ip6: i.ip6.map(|ip| ip.to_string()),
                    host_veth: i.host_veth.clone(),
                })
            })
            .collect();
        let (networks, services, ports) = self
            .reconciler
            .applied()
            .map(model_rows)
            .unwrap_or_default();
        let drops = datapath
            .drops()?
            .into_iter()
            .map(|(reason, count)| (reason.desc().to_owned(), count))
            .collect();
        Ok(Status {
            pin_dir: datapath.pin_dir().display().to_string(),
            state_file: self.args.state.as_ref().map(|p| p.display().to_string()),
            uplink: self
                .reconciler
                .host()
                .map(|host| host.uplink.clone())
                .unwrap_or_default(),
            attachments,
            maps,
            interfaces,
            endpoints,
            networks,
            services,
            ports,
            drops,
            reconciles: self.reconciles,
            ct_collected: self.collector.collected,
            last_applied_unix: self.last_applied_unix,
            state: self.state.clone(),
            // A refused newer state first; else why the state in force is not whole.
            last_error: self
                .last_error
                .clone()
                .or_else(|| self.repair_error.clone()),
            flows: self.flow_status(),
            swarm: self.swarm.current().map(swarm_rows),
        })
    }

    fn flow_status(&self) -> status::FlowStatus {
        let stats = self.flows.stats();
        status::FlowStatus {
            events: self.args.flows.events_on(),
            lost: self.reconciler.datapath().flow_events_lost().unwrap_or(0),
            records: stats.records,
            history: stats.history,
            followers: stats.followers,
        }
    }
}
