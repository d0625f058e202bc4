//! The Swarm view: what this node's own engine says of the swarm it is in (docs/DESIGN.md
//! "Docker Swarm (issue 18)"). No control plane of ours: every node's agent reads its own
//! engine, manager or worker.
//!
//! - every overlay network the node has (`ingress` included), through `GET
//!   /networks/{id}?verbose=true`, which a worker answers as well as a manager: each service's
//!   VIP on that network, its published ports (on `ingress` only) and its tasks on *every* node
//!   (name, overlay address, `Info["Host IP"]`: the task's node address);
//! - on a manager also `/nodes` (names, states, availability) and `/services` (names, modes,
//!   ports with their protocol); a worker answers those with 503, and the view has none.
//!
//! Tasks are kept sorted by their address on the network: an order every node computes alike
//! from its own engine, which a table shared by all nodes (Maglev's) needs.

use std::{collections::BTreeMap, net::IpAddr};

use super::api::{OverlayInspect, SwarmMembership, SwarmNodeInfo, SwarmServiceInfo};

/// The swarm as this node's engine reports it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SwarmView {
    pub node: SwarmMembership,
    /// Overlay networks, by name.
    pub networks: Vec<Overlay>,
    /// A manager's `/nodes`; None on a worker.
    pub nodes: Option<Vec<SwarmNodeInfo>>,
    /// A manager's `/services`; None on a worker.
    pub services: Option<Vec<SwarmServiceInfo>>,
    /// Seconds since the Unix epoch of the last read that succeeded (this view's).
    pub read_unix: u64,
    /// Why the reads since then failed: the view is the last good one.
    pub error: Option<String>,
}

/// An overlay network of this node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overlay {
    pub name: String,
    pub id: String,
    pub ingress: bool,
    pub subnets: Vec<String>,
    /// Its VXLAN id (`com.docker.network.driver.overlay.vxlanid_list`).
    pub vni: Option<u32>,
    /// Services of the network, by name (what is no service's left out).
    pub services: Vec<OverlayServiceView>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct OverlayServiceView {
    pub name: String,
    /// None for a dnsrr service (the engine says `<nil>`).
    pub vip: Option<IpAddr>,
    /// The routing mesh's ports (listed on `ingress` only).
    pub ports: Vec<MeshPort>,
    /// Sorted by address.
    pub tasks: Vec<TaskView>,
}

/// A published port of the routing mesh as a network listing gives it (no protocol there:
/// a manager's `/services` has it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct MeshPort {
    pub published: u16,
    pub target: u16,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskView {
    pub name: String,
    pub ip: Option<IpAddr>,
    /// The address of the task's node.
    pub node_addr: String,
    /// Its node's name where known: from a manager's `/nodes`, or this node's own.
    pub node: Option<String>,
}

const VNI_OPTION: &str = "com.docker.network.driver.overlay.vxlanid_list";

/// "Target: 80, Publish: 8080" (libnetwork's format for an ingress port).
fn mesh_port(text: &str) -> Option<MeshPort> {
    let mut target = None;
    let mut published = None;
    for part in text.split(',') {
        let (key, value) = part.split_once(':')?;
        let value: u16 = value.trim().parse().ok()?;
        match key.trim() {
            "Target" => target = Some(value),
            "Publish" => published = Some(value),
            _ => {}
        }
    }
    Some(MeshPort {
        published: published?,
        target: target?,
    })
}

/// The view from what the engine answered; `read_unix` is when.
pub fn build(
    node: SwarmMembership,
    overlays: Vec<OverlayInspect>,
    nodes: Option<Vec<SwarmNodeInfo>>,
    services: Option<Vec<SwarmServiceInfo>>,
    read_unix: u64,
) -> SwarmView {
    // Node names by address: a manager knows every node's, a worker its own.
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for n in nodes.iter().flatten() {
        names.insert(n.addr.clone(), n.hostname.clone());
    }
    names
        .entry(node.node_addr.clone())
        .or_insert_with(|| node.node_name.clone());
    let mut networks: Vec<Overlay> = overlays
        .into_iter()
        .map(|n| {
            let mut services: Vec<OverlayServiceView> = n
                .services
                .into_iter()
                .filter(|(name, _)| !name.is_empty())
                .map(|(name, s)| {
                    let mut ports: Vec<MeshPort> =
                        s.ports.iter().filter_map(|p| mesh_port(p)).collect();
                    ports.sort();
                    let mut tasks: Vec<TaskView> = s
                        .tasks
                        .into_iter()
                        .map(|t| TaskView {
                            node: names.get(&t.host_ip).cloned(),
                            ip: t.endpoint_ip.parse().ok(),
                            name: t.name,
                            node_addr: t.host_ip,
                        })
                        .collect();
                    tasks.sort_by(|a, b| (a.ip, &a.name).cmp(&(b.ip, &b.name)));
                    OverlayServiceView {
                        name,
                        vip: s.vip.parse().ok(),
                        ports,
                        tasks,
                    }
                })
                .collect();
            services.sort_by(|a, b| a.name.cmp(&b.name));
            Overlay {
                vni: n
                    .options
                    .get(VNI_OPTION)
                    .and_then(|list| list.split(',').next()?.trim().parse().ok()),
                name: n.name,
                id: n.id,
                ingress: n.ingress,
                subnets: n.subnets,
                services,
            }
        })
        .collect();
    networks.sort_by(|a, b| a.name.cmp(&b.name));
    let nodes = nodes.map(|mut list| {
        list.sort_by(|a, b| a.hostname.cmp(&b.hostname));
        list
    });
    let services = services.map(|mut list| {
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    });
    SwarmView {
        node,
        networks,
        nodes,
        services,
        read_unix,
        error: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::docker::api::ServicePort;
    use bollard::models;

    /// The saved answers of a real dockerd 20.10 (tests/testbed/fixtures/swarm/README.md).
    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../tests/testbed/fixtures/swarm/",
                $name
            ))
        };
    }

    fn overlay(json: &str) -> OverlayInspect {
        let network: models::NetworkInspect = serde_json::from_str(json).unwrap();
        OverlayInspect::from(network)
    }

    fn manager() -> SwarmMembership {
        SwarmMembership {
            node_id: "05tneqd3sx06lnf3rbdmx5dtd".into(),
            node_name: "node1".into(),
            node_addr: "10.99.0.1".into(),
            manager: true,
        }
    }

    fn worker() -> SwarmMembership {
        SwarmMembership {
            node_id: "mj8e61l0d8rqv469plyr62ar7".into(),
            node_name: "node2".into(),
            node_addr: "10.99.0.2".into(),
            manager: false,
        }
    }

    fn task(name: &str, ip: &str, node_addr: &str, node: Option<&str>) -> TaskView {
        TaskView {
            name: name.into(),
            ip: Some(ip.parse().unwrap()),
            node_addr: node_addr.into(),
            node: node.map(str::to_owned),
        }
    }

    /// The VIP services a manager's agent and a worker's build from their own engines'
    /// answers are the same, so every node has the same Maglev table: a connection picks
    /// the same task whichever node it starts on.
    #[test]
    fn every_node_builds_the_same_vip_services_from_its_own_engine() {
        let on_manager = build(
            manager(),
            vec![
                overlay(fixture!("manager-network-ov1-verbose.json")),
                overlay(fixture!("manager-network-ingress-verbose.json")),
            ],
            None,
            None,
            7,
        );
        let on_worker = build(
            worker(),
            vec![overlay(fixture!("worker-network-ov1-verbose.json"))],
            None,
            None,
            9,
        );
        let services = super::super::convert::swarm_services(&on_manager);
        assert_eq!(services, super::super::convert::swarm_services(&on_worker));
        // One per protocol on ov1 (ingress's VIPs are the routing mesh's, not these).
        let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["web@ov1", "web@ov1/udp"]);
        let web = &services[0];
        assert_eq!((web.port, web.overlay.as_deref()), (0, Some("ov1")));
        let tasks: Vec<(&str, &str)> = web
            .addresses
            .iter()
            .map(|(n, a)| (n.as_str(), a.as_str()))
            .collect();
        assert_eq!(
            tasks,
            [
                ("web.1.jss2iafjpu4m4a10thkmbb5v0", "10.0.1.3"),
                ("web.2.p72pvqs86zefbp6w18191ffnq", "10.0.1.4"),
                ("web.3.cgpsvgheip8cm0gicq4gy3qx6", "10.0.1.5"),
            ]
        );
        let spec = crate::model::StateFile {
            services,
            ..Default::default()
        };
        let model = crate::model::Model::from_spec(&spec).unwrap();
        assert_eq!(model.services[0].remote.len(), 3);
    }

    #[test]
    fn a_managers_view_has_every_task_with_its_node_name_and_the_cluster_lists() {
        let nodes: Vec<models::Node> =
            serde_json::from_str(fixture!("manager-nodes.json")).unwrap();
        let services: Vec<models::Service> =
            serde_json::from_str(fixture!("manager-services.json")).unwrap();
        let view = build(
            manager(),
            vec![
                overlay(fixture!("manager-network-ov1-verbose.json")),
                overlay(fixture!("manager-network-ingress-verbose.json")),
            ],
            Some(nodes.into_iter().map(Into::into).collect()),
            Some(services.into_iter().map(Into::into).collect()),
            7,
        );
        assert_eq!(
            view.networks
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>(),
            ["ingress", "ov1"]
        );
        let ingress = &view.networks[0];
        assert!(ingress.ingress);
        assert_eq!(ingress.vni, Some(4096));
        assert_eq!(ingress.subnets, ["10.0.0.0/24"]);
        // The nodes' ingress-endpoints are under service "": no service.
        assert_eq!(ingress.services.len(), 1);
        let web = &ingress.services[0];
        assert_eq!(web.name, "web");
        assert_eq!(web.vip, Some("10.0.0.5".parse().unwrap()));
        assert_eq!(
            web.ports,
            [MeshPort {
                published: 8080,
                target: 80
            }]
        );
        let ov1 = &view.networks[1];
        assert!(!ov1.ingress);
        assert_eq!(ov1.vni, Some(4097));
        assert_eq!(
            ov1.services
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>(),
            ["rr", "web"]
        );
        // dnsrr: no VIP.
        assert_eq!(ov1.services[0].vip, None);
        let web = &ov1.services[1];
        assert_eq!(web.vip, Some("10.0.1.2".parse().unwrap()));
        assert!(web.ports.is_empty());
        // Every node's task, by address, named after its node.
        assert_eq!(
            web.tasks,
            [
                task(
                    "web.1.jss2iafjpu4m4a10thkmbb5v0",
                    "10.0.1.3",
                    "10.99.0.2",
                    Some("node2")
                ),
                task(
                    "web.2.p72pvqs86zefbp6w18191ffnq",
                    "10.0.1.4",
                    "10.99.0.3",
                    Some("node3")
                ),
                task(
                    "web.3.cgpsvgheip8cm0gicq4gy3qx6",
                    "10.0.1.5",
                    "10.99.0.1",
                    Some("node1")
                ),
            ]
        );
        let nodes = view.nodes.as_ref().unwrap();
        assert_eq!(
            nodes
                .iter()
                .map(|n| (
                    n.hostname.as_str(),
                    n.addr.as_str(),
                    n.role.as_str(),
                    n.state.as_str(),
                    n.availability.as_str(),
                    n.leader
                ))
                .collect::<Vec<_>>(),
            [
                ("node1", "10.99.0.1", "manager", "ready", "active", true),
                ("node2", "10.99.0.2", "worker", "ready", "active", false),
                ("node3", "10.99.0.3", "worker", "ready", "active", false),
            ]
        );
        let services = view.services.as_ref().unwrap();
        assert_eq!(services.len(), 2);
        let (rr, web) = (&services[0], &services[1]);
        assert_eq!(
            (rr.name.as_str(), rr.endpoint_mode.as_str()),
            ("rr", "dnsrr")
        );
        assert!(rr.ports.is_empty() && rr.vips.is_empty());
        assert_eq!(
            (web.name.as_str(), web.endpoint_mode.as_str(), web.replicas),
            ("web", "vip", Some(3))
        );
        assert_eq!(
            web.ports,
            [ServicePort {
                protocol: "tcp".into(),
                target: 80,
                published: 8080,
                publish_mode: "ingress".into()
            }]
        );
        assert_eq!(
            web.vips,
            [
                ("tif5732hj7o2jypwozbks1fxt".into(), "10.0.0.5/24".into()),
                ("rmk5bmv6i3bncne0aqdc29tkm".into(), "10.0.1.2/24".into())
            ]
        );
        assert_eq!((view.read_unix, &view.error), (7, &None));
    }

    #[test]
    fn a_workers_view_has_every_nodes_tasks_from_its_own_listing() {
        let view = build(
            worker(),
            vec![overlay(fixture!("worker-network-ov1-verbose.json"))],
            None,
            None,
            0,
        );
        let web = &view.networks[0].services[0];
        // The same tasks in the same order as on the manager (its listing differs in order);
        // only the worker's own node has a name.
        assert_eq!(
            web.tasks,
            [
                task(
                    "web.1.jss2iafjpu4m4a10thkmbb5v0",
                    "10.0.1.3",
                    "10.99.0.2",
                    Some("node2")
                ),
                task(
                    "web.2.p72pvqs86zefbp6w18191ffnq",
                    "10.0.1.4",
                    "10.99.0.3",
                    None
                ),
                task(
                    "web.3.cgpsvgheip8cm0gicq4gy3qx6",
                    "10.0.1.5",
                    "10.99.0.1",
                    None
                ),
            ]
        );
        assert!(view.nodes.is_none() && view.services.is_none());
    }

    #[test]
    fn a_workers_503_is_what_is_not_a_manager() {
        let e = super::super::api::DockerError::Api {
            what: "listing the swarm's services".into(),
            source: bollard::errors::Error::DockerResponseServerError {
                status_code: 503,
                message: serde_json::from_str::<serde_json::Value>(fixture!(
                    "worker-services.json"
                ))
                .unwrap()["message"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            },
        };
        assert!(e.is_not_a_manager() && !e.is_not_found());
    }

    #[test]
    fn ingress_ports_parse() {
        assert_eq!(
            mesh_port("Target: 80, Publish: 8080"),
            Some(MeshPort {
                published: 8080,
                target: 80
            })
        );
        assert_eq!(mesh_port("Target: 80"), None);
        assert_eq!(mesh_port("garbage"), None);
    }
}
