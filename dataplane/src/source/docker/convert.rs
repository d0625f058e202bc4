//! What the engine reports, turned into the state file's structs ([`StateFile`]) and checked by
//! the same [`Model::from_spec`] every source goes through. Pure functions of the engine's
//! objects, the host-side veths found for each container and the VIPs handed out so far.
//!
//! - networks: bridge-driver networks with an IPv4 subnet, an IPv6 one (`EnableIPv6`, its
//!   IPAM config's IPv6 subnet and gateway) or both; the bridge is
//!   `com.docker.network.bridge.name` or `br-` + the first 12 characters of the id (docker0 for
//!   the default `bridge` network), `icc` from `com.docker.network.bridge.enable_icc`;
//! - endpoints: running containers with at least one interface on such a network, named like
//!   the container, with its labels; the network it was started on comes first (Docker
//!   publishes ports to that address);
//! - endpoints' addresses: `IPAddress` and `GlobalIPv6Address` of each network;
//! - ports: every binding of `NetworkSettings.Ports`: host IP "" = every address, 0.0.0.0
//!   every IPv4 one, "::" every IPv6 one (the pair Docker lists for a plain `-p` becomes one
//!   entry on every address), or one address of either family; consecutive ports merged
//!   back into the ranges `-p 9000-9002:7000-7002` made;
//! - services: see [`SERVICE_LABEL`].

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use super::{
    api::{ContainerInspect, NetworkInspect},
    swarm::SwarmView,
};
use crate::model::{
    Cidr, Cidr6, EndpointSpec, InterfaceSpec, Model, NetworkSpec, PortSpec, PortValue, Protocol,
    ServiceSpec, StateError, StateFile, parse_mac,
};

/// A container joins the service named by this label's value, whatever Compose says.
pub const SERVICE_LABEL: &str = "dataplane.service";
/// The service's ports on this container: "80", "53/udp" or a list "80,443"; default: the
/// container's exposed ports (`EXPOSE`, `--expose`, and every published port).
pub const SERVICE_PORT_LABEL: &str = "dataplane.service.port";
pub const COMPOSE_PROJECT_LABEL: &str = "com.docker.compose.project";
pub const COMPOSE_SERVICE_LABEL: &str = "com.docker.compose.service";
/// `docker compose run` containers carry "True": they never become backends.
pub const COMPOSE_ONEOFF_LABEL: &str = "com.docker.compose.oneoff";

const BRIDGE_NAME_OPTION: &str = "com.docker.network.bridge.name";
const ICC_OPTION: &str = "com.docker.network.bridge.enable_icc";
/// Docker 28's gateway mode of a bridge network (nat, nat-unprotected, routed, isolated).
const GATEWAY_MODE_OPTION: &str = "com.docker.network.bridge.gateway_mode_ipv4";

/// A running container: the engine's view and the host-side veth of each of its interfaces.
#[derive(Debug, Clone, Default)]
pub struct Container {
    pub inspect: ContainerInspect,
    /// Host-side veth name by the MAC of the container's end.
    pub host_veths: BTreeMap<[u8; 6], String>,
    /// Why the veths could not be found, when they could not.
    pub veth_error: Option<String>,
}

impl Container {
    pub fn name(&self) -> &str {
        self.inspect.name.trim_start_matches('/')
    }
}

/// Everything a state file is made from.
pub struct Inputs<'a> {
    pub networks: &'a [NetworkInspect],
    /// By container id.
    pub containers: &'a BTreeMap<String, Container>,
    /// Whether an interface exists in the agent's namespace now (the reconciler refuses a
    /// model that names one that does not).
    pub interface_exists: &'a dyn Fn(&str) -> bool,
    /// The Swarm view, when the node is in a swarm: its overlay networks' service VIPs.
    pub swarm: Option<&'a SwarmView>,
}

/// A state file and what was left out of it, and why (for the log).
#[derive(Debug, Default)]
pub struct Built {
    pub spec: StateFile,
    pub notes: Vec<String>,
}

pub fn build(inputs: &Inputs<'_>, vips: &mut VipAllocator) -> Built {
    let mut notes = Vec::new();
    let networks = networks(inputs, &mut notes);
    let mut endpoints = Vec::new();
    let mut ports = Vec::new();
    // (endpoint, container) of those that made it, for the services.
    let mut members = Vec::new();
    let mut containers: Vec<&Container> = inputs.containers.values().collect();
    containers.sort_by(|a, b| a.name().cmp(b.name()));
    for container in containers {
        let Some(endpoint) = endpoint(container, &networks, inputs, &mut notes) else {
            continue;
        };
        // Ports lead to the container's first interface; one on overlays alone has none of
        // ours (a Swarm task's host-mode ports are on docker_gwbridge, which its inspect
        // does not list).
        if !endpoint.interfaces.is_empty() {
            ports.extend(published_ports(container, &endpoint.name, &mut notes));
        }
        members.push((endpoint.name.clone(), container));
        endpoints.push(endpoint);
    }
    // Our VIPs stay out of the overlays' subnets too, where Swarm's VIPs and tasks are.
    let overlay_subnets = inputs
        .swarm
        .into_iter()
        .flat_map(|view| &view.networks)
        .flat_map(|overlay| &overlay.subnets);
    let subnets: Vec<Cidr> = networks
        .iter()
        .filter_map(|(n, _)| n.subnet.as_deref())
        .chain(overlay_subnets.map(String::as_str))
        .filter_map(|subnet| Cidr::parse(subnet).ok())
        .collect();
    let mut services = services(&members, vips, &subnets, &mut notes);
    if let Some(view) = inputs.swarm {
        services.extend(swarm_services(view));
    }
    Built {
        spec: StateFile {
            uplink: None,
            networks: networks.into_iter().map(|(n, _)| n).collect(),
            endpoints,
            ports: merge_ranges(ports),
            services,
            policies: Vec::new(),
        },
        notes,
    }
}

/// The bridge networks, oldest first (the reconciler numbers networks by position, so new
/// networks go last), each with its engine id.
fn networks(inputs: &Inputs<'_>, notes: &mut Vec<String>) -> Vec<(NetworkSpec, String)> {
    let mut list: Vec<&NetworkInspect> = inputs
        .networks
        .iter()
        .filter(|n| n.driver == "bridge" && !n.config_only)
        .collect();
    list.sort_by(|a, b| (&a.created, &a.name).cmp(&(&b.created, &b.name)));
    let mut out = Vec::new();
    for n in list {
        let v4 = n.ipam.iter().find_map(|c| {
            let subnet = Cidr::parse(&c.subnet).ok()?;
            let gateway = c.gateway.split('/').next().unwrap_or_default();
            Some((subnet, gateway.parse::<Ipv4Addr>().ok()))
        });
        // The IPv6 subnet only when IPv6 is on (an IPAM config alone does not give the
        // containers addresses).
        let v6 = n
            .enable_ipv6
            .then(|| {
                n.ipam.iter().find_map(|c| {
                    let subnet = Cidr6::parse(&c.subnet).ok()?;
                    let gateway = c.gateway.split('/').next().unwrap_or_default();
                    Some((subnet, gateway.parse::<Ipv6Addr>().ok()))
                })
            })
            .flatten();
        if v4.is_none() && v6.is_none() {
            notes.push(format!(
                "network {}: no IPv4 or IPv6 subnet; left out",
                n.name
            ));
            continue;
        }
        if n.enable_ipv6 && v6.is_none() {
            notes.push(format!(
                "network {}: IPv6 is enabled but its IPAM config has no IPv6 subnet; IPv4 only",
                n.name
            ));
        }
        let attached = || {
            inputs.containers.values().flat_map(|c| {
                c.inspect
                    .network_settings
                    .networks
                    .values()
                    .filter(|e| e.network_id == n.id)
            })
        };
        // The default bridge's IPAM config has no gateway: take the one its containers
        // were given, else the subnet's first address (Docker's choice); the same for IPv6.
        let v4 = v4.map(|(subnet, ipam_gateway)| {
            let gateway = ipam_gateway
                .or_else(|| attached().find_map(|e| e.gateway.parse().ok()))
                .unwrap_or_else(|| Ipv4Addr::from(u32::from(subnet.network()) + 1));
            (subnet, gateway)
        });
        let v6 = v6.map(|(subnet, ipam_gateway)| {
            let gateway = ipam_gateway
                .or_else(|| attached().find_map(|e| e.ipv6_gateway.parse().ok()))
                .unwrap_or_else(|| Ipv6Addr::from(u128::from(subnet.network()) + 1));
            (subnet, gateway)
        });
        let bridge = match n.options.get(BRIDGE_NAME_OPTION) {
            Some(name) if !name.is_empty() => name.clone(),
            _ => format!("br-{}", n.id.get(..12).unwrap_or(&n.id)),
        };
        if !(inputs.interface_exists)(&bridge) {
            notes.push(format!(
                "network {}: its bridge {bridge} is not in the agent's network namespace; \
                 left out (is the agent in dockerd's namespace?)",
                n.name
            ));
            continue;
        }
        let icc = n
            .options
            .get(ICC_OPTION)
            .is_none_or(|v| !v.eq_ignore_ascii_case("false"));
        // Docker 28's gateway modes; an engine that does not know the option keeps it as a
        // plain driver option, so it is read whatever the engine's version.
        let gateway_mode = match n.options.get(GATEWAY_MODE_OPTION).map(String::as_str) {
            None | Some("") => None,
            Some(mode) if crate::model::GatewayMode::parse(mode).is_ok() => Some(mode.to_owned()),
            Some(mode) => {
                notes.push(format!(
                    "network {}: {GATEWAY_MODE_OPTION}={mode} is not a gateway mode the agent \
                     knows; treated as nat",
                    n.name
                ));
                None
            }
        };
        out.push((
            NetworkSpec {
                name: n.name.clone(),
                bridge,
                subnet: v4.map(|(subnet, _)| subnet.to_string()),
                gateway: v4.map(|(_, gateway)| gateway.to_string()),
                subnet6: v6.map(|(subnet, _)| subnet.to_string()),
                gateway6: v6.map(|(_, gateway)| gateway.to_string()),
                internal: n.internal,
                icc,
                gateway_mode,
            },
            n.id.clone(),
        ));
    }
    out
}

fn endpoint(
    container: &Container,
    networks: &[(NetworkSpec, String)],
    inputs: &Inputs<'_>,
    notes: &mut Vec<String>,
) -> Option<EndpointSpec> {
    let name = container.name();
    let settings = &container.inspect.network_settings;
    let primary = match container.inspect.host_config.network_mode.as_str() {
        "default" | "" => "bridge",
        mode => mode,
    };
    // The network the container was started on first, then the others by name.
    let mut attached: Vec<(&String, &super::api::EndpointSettings)> =
        settings.networks.iter().collect();
    attached.sort_by_key(|(net, _)| (net.as_str() != primary, net.as_str()));
    let mut interfaces = Vec::new();
    let mut overlays = Vec::new();
    for (net_name, ep) in attached {
        // The network this attachment is on: by id, or by name where the engine gave none.
        let is_it = |id: &str, name: &str| {
            (!ep.network_id.is_empty() && id == ep.network_id) || name == net_name
        };
        let is_overlay = inputs
            .networks
            .iter()
            .any(|n| n.driver == "overlay" && is_it(&n.id, &n.name));
        if is_overlay {
            // Its interface is in the overlay's own namespace: no veth of ours, but its
            // sockets are translated for the network's service VIPs.
            overlays.push(net_name.clone());
            continue;
        }
        let Some((network, _)) = networks.iter().find(|(n, id)| is_it(id, &n.name)) else {
            continue; // host, none, another driver, or a network left out above
        };
        let problem = |what: String| format!("container {name}: network {net_name}: {what}");
        let ip = match (&network.subnet, ep.ip_address.parse::<Ipv4Addr>()) {
            (None, _) => None,
            (Some(_), Ok(_)) => Some(ep.ip_address.clone()),
            (Some(_), Err(_)) => {
                notes.push(problem(format!(
                    "no IPv4 address ({:?}); interface left out",
                    ep.ip_address
                )));
                continue;
            }
        };
        let ip6 = match (&network.subnet6, ep.global_ipv6_address.parse::<Ipv6Addr>()) {
            (Some(_), Ok(_)) => Some(ep.global_ipv6_address.clone()),
            (None, _) => None,
            (Some(_), Err(_)) if ip.is_some() => {
                notes.push(problem(format!(
                    "no IPv6 address ({:?}); the interface is IPv4 only",
                    ep.global_ipv6_address
                )));
                None
            }
            (Some(_), Err(_)) => {
                notes.push(problem(format!(
                    "no IPv6 address ({:?}) on an IPv6-only network; interface left out",
                    ep.global_ipv6_address
                )));
                continue;
            }
        };
        let Ok(mac) = parse_mac(&ep.mac_address) else {
            notes.push(problem(format!(
                "MAC {:?} unusable; interface left out",
                ep.mac_address
            )));
            continue;
        };
        let Some(host_veth) = container.host_veths.get(&mac) else {
            notes.push(problem(format!(
                "no host-side veth for MAC {}{}; interface left out",
                ep.mac_address,
                container
                    .veth_error
                    .as_ref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            )));
            continue;
        };
        if !(inputs.interface_exists)(host_veth) {
            notes.push(problem(format!(
                "host-side veth {host_veth} is gone; interface left out"
            )));
            continue;
        }
        interfaces.push(InterfaceSpec {
            network: network.name.clone(),
            ip,
            ip6,
            mac: ep.mac_address.to_ascii_lowercase(),
            host_veth: host_veth.clone(),
        });
    }
    // On overlays alone it is still one: its sockets, for the overlays' VIPs.
    if interfaces.is_empty() && overlays.is_empty() {
        return None;
    }
    Some(EndpointSpec {
        name: name.to_owned(),
        labels: container.inspect.config.labels.clone(),
        interfaces,
        // The running container's own process: the namespace its sockets live in.
        netns: Some(format!("/proc/{}/ns/net", container.inspect.state.pid)),
        overlays,
    })
}

/// The service VIPs of the swarm's overlay networks (not `ingress`, whose VIPs serve the
/// routing mesh): one service per Swarm service, network and protocol, named
/// `<service>@<network>` (`/udp` for UDP), on every port as Swarm's VIP is, over the tasks of
/// every node by name and overlay address. Every node's agent builds the same list, so the
/// same Maglev table: a connection picks the same task whichever node it starts on. Only
/// containers on the network have their sockets translated (`overlay`); its tasks are
/// reached over Docker's own VXLAN overlay.
pub(super) fn swarm_services(view: &SwarmView) -> Vec<ServiceSpec> {
    let mut out = Vec::new();
    for overlay in view.networks.iter().filter(|n| !n.ingress) {
        for service in &overlay.services {
            let Some(IpAddr::V4(vip)) = service.vip else {
                continue; // dnsrr: Docker's DNS answers the tasks' addresses themselves
            };
            let addresses: BTreeMap<String, String> = service
                .tasks
                .iter()
                .filter_map(|t| match t.ip {
                    Some(IpAddr::V4(ip)) => Some((t.name.clone(), ip.to_string())),
                    _ => None,
                })
                .collect();
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                let name = match protocol {
                    Protocol::Tcp => format!("{}@{}", service.name, overlay.name),
                    Protocol::Udp => format!("{}@{}/udp", service.name, overlay.name),
                };
                out.push(ServiceSpec {
                    name,
                    vip: Some(vip.to_string()),
                    vip6: None,
                    port: 0,
                    protocol: protocol.to_string(),
                    target_port: None,
                    selector: None,
                    endpoints: None,
                    algorithm: "maglev".into(),
                    weights: BTreeMap::new(),
                    addresses: addresses.clone(),
                    overlay: Some(overlay.name.clone()),
                });
            }
        }
    }
    out
}

/// "80/tcp" -> (80, tcp).
fn parse_port_key(key: &str) -> Option<(u16, Option<Protocol>)> {
    let (port, proto) = key.split_once('/').unwrap_or((key, "tcp"));
    let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
    let proto = match proto {
        "tcp" => Some(Protocol::Tcp),
        "udp" => Some(Protocol::Udp),
        _ => None,
    };
    Some((port, proto))
}

/// One published port before merging: (endpoint, protocol, host ip, host port, container port).
type Binding = (String, Protocol, Option<IpAddr>, u16, u16);

fn published_ports(container: &Container, endpoint: &str, notes: &mut Vec<String>) -> Vec<Binding> {
    let mut out = Vec::new();
    for (key, bindings) in &container.inspect.network_settings.ports {
        let Some(bindings) = bindings.as_ref().filter(|b| !b.is_empty()) else {
            continue; // exposed, not published
        };
        let Some((container_port, proto)) = parse_port_key(key) else {
            notes.push(format!(
                "container {endpoint}: port {key:?} unreadable; left out"
            ));
            continue;
        };
        let Some(proto) = proto else {
            notes.push(format!(
                "container {endpoint}: port {key}: only tcp and udp are published; left out"
            ));
            continue;
        };
        for binding in bindings {
            let host_ip = match binding.host_ip.as_str() {
                "" => None,
                text => match text.parse::<IpAddr>() {
                    Ok(ip) => Some(ip),
                    Err(_) => {
                        notes.push(format!(
                            "container {endpoint}: port {key}: host IP {text:?} unreadable; \
                             left out"
                        ));
                        continue;
                    }
                },
            };
            let Some(host_port) = binding.host_port.parse::<u16>().ok().filter(|p| *p != 0) else {
                continue;
            };
            out.push((
                endpoint.to_owned(),
                proto,
                host_ip,
                host_port,
                container_port,
            ));
        }
    }
    out
}

/// The two bindings Docker makes of one `-p` on every address, 0.0.0.0 and "::", are one
/// binding on every address of both families.
fn join_families(bindings: Vec<Binding>) -> Vec<Binding> {
    let every = |ip: &Option<IpAddr>| ip.is_some_and(|ip| ip.is_unspecified());
    let mut families: BTreeMap<(String, Protocol, u16, u16), u8> = BTreeMap::new();
    for (endpoint, proto, host_ip, host_port, container_port) in &bindings {
        if every(host_ip) {
            let bit = if host_ip.is_some_and(|ip| ip.is_ipv4()) {
                1
            } else {
                2
            };
            *families
                .entry((endpoint.clone(), *proto, *host_port, *container_port))
                .or_default() |= bit;
        }
    }
    bindings
        .into_iter()
        .map(|b| {
            let both = families.get(&(b.0.clone(), b.1, b.3, b.4)) == Some(&3);
            if both && every(&b.2) {
                (b.0, b.1, None, b.3, b.4)
            } else {
                b
            }
        })
        .collect()
}

/// Runs of consecutive host ports leading to consecutive container ports become one range.
fn merge_ranges(bindings: Vec<Binding>) -> Vec<PortSpec> {
    let mut bindings = join_families(bindings);
    bindings.sort();
    bindings.dedup();
    // (binding of the run's first port, run length)
    let mut runs: Vec<(Binding, u16)> = Vec::new();
    for b in bindings {
        if let Some((first, len)) = runs.last_mut()
            && first.0 == b.0
            && first.1 == b.1
            && first.2 == b.2
            && u32::from(first.3) + u32::from(*len) == u32::from(b.3)
            && u32::from(first.4) + u32::from(*len) == u32::from(b.4)
        {
            *len += 1;
            continue;
        }
        runs.push((b, 1));
    }
    runs.into_iter()
        .map(
            |((endpoint, proto, host_ip, host_port, container_port), len)| {
                let value = |first: u16| {
                    if len == 1 {
                        PortValue::Number(u32::from(first))
                    } else {
                        PortValue::Text(format!("{first}-{}", first + (len - 1)))
                    }
                };
                PortSpec {
                    endpoint: Some(endpoint),
                    service: None,
                    protocol: proto.to_string(),
                    host_ip: host_ip.map(|ip| ip.to_string()),
                    host_port: value(host_port),
                    container_port: value(container_port),
                }
            },
        )
        .collect()
}

/// "80", "53/udp", "80,443/tcp" -> ports; None when unreadable.
fn parse_port_list(text: &str) -> Option<BTreeSet<(u16, Protocol)>> {
    let mut out = BTreeSet::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (port, proto) = parse_port_key(part)?;
        out.insert((port, proto?));
    }
    (!out.is_empty()).then_some(out)
}

/// A container's place in a service.
struct Membership {
    service: String,
    ports: BTreeSet<(u16, Protocol)>,
    /// Asked for with [`SERVICE_LABEL`] (rather than implied by Compose's labels).
    explicit: bool,
}

/// The service a container belongs to, and the ports it serves for it.
fn membership(
    endpoint: &str,
    container: &Container,
    notes: &mut Vec<String>,
) -> Option<Membership> {
    let labels = &container.inspect.config.labels;
    let explicit = labels.get(SERVICE_LABEL).is_some_and(|s| !s.is_empty());
    let group = match labels.get(SERVICE_LABEL).filter(|s| !s.is_empty()) {
        Some(name) => name.clone(),
        None => {
            let project = labels.get(COMPOSE_PROJECT_LABEL)?;
            let service = labels.get(COMPOSE_SERVICE_LABEL)?;
            if labels
                .get(COMPOSE_ONEOFF_LABEL)
                .is_some_and(|v| v.eq_ignore_ascii_case("true"))
            {
                return None;
            }
            format!("{project}_{service}")
        }
    };
    let ports = match labels.get(SERVICE_PORT_LABEL) {
        Some(text) => match parse_port_list(text) {
            Some(ports) => ports,
            None => {
                notes.push(format!(
                    "container {endpoint}: label {SERVICE_PORT_LABEL}={text:?} is not like \
                     \"80\", \"53/udp\" or \"80,443\"; not a backend of {group}"
                ));
                return None;
            }
        },
        None => container
            .inspect
            .config
            .exposed_ports
            .iter()
            .filter_map(|k| match parse_port_key(k)? {
                (port, Some(proto)) => Some((port, proto)),
                _ => None,
            })
            .collect(),
    };
    Some(Membership {
        service: group,
        ports,
        explicit,
    })
}

/// One service entry per (group, port): the VIP is the group's, the backends are the members
/// that serve that port.
fn services(
    members: &[(String, &Container)],
    vips: &mut VipAllocator,
    avoid: &[Cidr],
    notes: &mut Vec<String>,
) -> Vec<ServiceSpec> {
    // group -> port -> endpoints
    let mut groups: BTreeMap<String, BTreeMap<(u16, Protocol), BTreeSet<String>>> = BTreeMap::new();
    for (endpoint, container) in members {
        let Some(Membership {
            service: group,
            ports,
            explicit,
        }) = membership(endpoint, container, notes)
        else {
            continue;
        };
        let entry = groups.entry(group.clone()).or_default();
        // A Compose service without ports (a worker, say) needs no VIP; one asked for by
        // label does.
        if ports.is_empty() && explicit {
            notes.push(format!(
                "container {endpoint}: exposes no port; not a backend of {group} (use --expose \
                 or the label {SERVICE_PORT_LABEL})"
            ));
        }
        for port in ports {
            entry.entry(port).or_default().insert(endpoint.clone());
        }
    }
    groups.retain(|_, ports| !ports.is_empty());
    let names: BTreeSet<String> = groups.keys().cloned().collect();
    let assigned = vips.assign(&names, avoid, notes);
    let mut out = Vec::new();
    for (group, ports) in groups {
        let Some(vip) = assigned.get(&group) else {
            notes.push(format!(
                "service {group}: no free VIP left in {}; left out",
                vips.in_use()
            ));
            continue;
        };
        let single = ports.len() == 1;
        for ((port, proto), endpoints) in ports {
            let name = match (single, proto) {
                (true, _) => group.clone(),
                (false, Protocol::Tcp) => format!("{group}:{port}"),
                (false, Protocol::Udp) => format!("{group}:{port}/udp"),
            };
            out.push(ServiceSpec {
                name,
                vip: Some(vip.to_string()),
                vip6: None,
                port: u32::from(port),
                protocol: proto.to_string(),
                target_port: None,
                selector: None,
                endpoints: Some(endpoints.into_iter().collect()),
                algorithm: "maglev".into(),
                weights: BTreeMap::new(),
                addresses: BTreeMap::new(),
                overlay: None,
            });
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// VIPs.

/// Hands out service VIPs from a range: a name's first choice is a hash of it (so a service
/// gets the same VIP across agent restarts unless two names collide), taken addresses are
/// skipped linearly; a name keeps its VIP for as long as it exists.
#[derive(Debug, Clone)]
pub struct VipAllocator {
    /// The range asked for (--service-vip-range).
    range: Cidr,
    /// The range VIPs come from now: `range`, or a free block of the same size when a Docker
    /// network's subnet covers it.
    in_use: Cidr,
    by_name: BTreeMap<String, Ipv4Addr>,
}

/// Private blocks a VIP range may move within when a network covers it: never out of the
/// block it was given in, so that VIPs never shadow public addresses.
const PRIVATE_BLOCKS: [(Ipv4Addr, u8); 4] = [
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    (Ipv4Addr::new(100, 64, 0, 0), 10),
];

impl VipAllocator {
    pub fn new(range: Cidr) -> VipAllocator {
        VipAllocator {
            range,
            in_use: range,
            by_name: BTreeMap::new(),
        }
    }

    /// The range VIPs are taken from now.
    pub fn in_use(&self) -> Cidr {
        self.in_use
    }

    /// First usable address of `range` and how many there are (network and broadcast
    /// addresses left out of ranges that have them).
    fn usable(range: Cidr) -> (u32, u64) {
        let base = u32::from(range.network());
        let size = 1u64 << (32 - u32::from(range.prefix_len));
        if size >= 4 {
            (base + 1, size - 2)
        } else {
            (base, size)
        }
    }

    /// Whether one of `avoid` holds every address of `range`.
    fn covered(range: Cidr, avoid: &[Cidr]) -> bool {
        avoid
            .iter()
            .any(|c| c.prefix_len <= range.prefix_len && c.contains(range.network()))
    }

    /// The range to take VIPs from given the networks' subnets: the one asked for unless a
    /// subnet covers it; then the first block of the same size after it, inside the same
    /// private block, that no subnet touches; None when there is none.
    fn choose_range(&self, avoid: &[Cidr]) -> Option<Cidr> {
        if !Self::covered(self.range, avoid) {
            return Some(self.range);
        }
        let (block, block_len) = PRIVATE_BLOCKS.into_iter().find(|(addr, len)| {
            *len <= self.range.prefix_len
                && Cidr {
                    addr: *addr,
                    prefix_len: *len,
                }
                .contains(self.range.network())
        })?;
        let size = 1u64 << (32 - u32::from(self.range.prefix_len));
        let blocks = 1u64 << (self.range.prefix_len - block_len);
        let base = u64::from(u32::from(block));
        let own = (u64::from(u32::from(self.range.network())) - base) / size;
        let touches = |candidate: Cidr| {
            let (first, last) = (
                u32::from(candidate.network()),
                u32::from(candidate.network()) + (size - 1) as u32,
            );
            avoid.iter().any(|c| {
                let (cf, cl) = (u32::from(c.network()), u32::from(c.network()) | !c.mask());
                cf <= last && first <= cl
            })
        };
        (1..blocks)
            .map(|i| Cidr {
                addr: Ipv4Addr::from((base + ((own + i) % blocks) * size) as u32),
                prefix_len: self.range.prefix_len,
            })
            .find(|candidate| !touches(*candidate))
    }

    /// VIPs for exactly `names`: kept for those that have one, new for the others; VIPs of
    /// names no longer given are released. Addresses inside `avoid` (the networks' subnets)
    /// are never handed out; when they cover the whole range asked for, VIPs come from a
    /// free block of the same size (with a note saying so). A name missing from the result
    /// found no free address.
    pub fn assign(
        &mut self,
        names: &BTreeSet<String>,
        avoid: &[Cidr],
        notes: &mut Vec<String>,
    ) -> BTreeMap<String, Ipv4Addr> {
        match self.choose_range(avoid) {
            Some(range) => {
                if range != self.range {
                    notes.push(format!(
                        "the service VIP range {} lies inside a Docker network's subnet; \
                         service VIPs come from {range} instead (set --service-vip-range)",
                        self.range
                    ));
                }
                self.in_use = range;
            }
            None => notes.push(format!(
                "the service VIP range {} lies inside a Docker network's subnet and no free \
                 block of its size was found; services have no VIP (set --service-vip-range)",
                self.range
            )),
        }
        let in_use = self.in_use;
        self.by_name.retain(|name, ip| {
            names.contains(name) && in_use.contains(*ip) && !avoid.iter().any(|c| c.contains(*ip))
        });
        let mut taken: BTreeSet<Ipv4Addr> = self.by_name.values().copied().collect();
        let (first, count) = Self::usable(in_use);
        // Probing a whole /8 for a free address is pointless; 65536 tries is plenty.
        let tries = count.min(1 << 16);
        for name in names {
            if self.by_name.contains_key(name) {
                continue;
            }
            let start = fnv1a(name.as_bytes()) % count;
            let found = (0..tries)
                .map(|i| Ipv4Addr::from(first + ((start + i) % count) as u32))
                .find(|ip| !taken.contains(ip) && !avoid.iter().any(|c| c.contains(*ip)));
            if let Some(ip) = found {
                taken.insert(ip);
                self.by_name.insert(name.clone(), ip);
            }
        }
        self.by_name.clone()
    }
}

/// 64-bit FNV-1a: a hash that stays the same across Rust versions and runs.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

// ---------------------------------------------------------------------------------------------
// Validation.

/// Validates `spec` with [`Model::from_spec`]. An entry the model refuses is left out (with a
/// note) and the rest tried again, so that one odd container or network never holds back the
/// state of every other one.
pub fn validate(mut spec: StateFile, notes: &mut Vec<String>) -> Result<Model, StateError> {
    let rounds =
        spec.networks.len() + spec.endpoints.len() + spec.ports.len() + spec.services.len();
    for _ in 0..=rounds {
        let err = match Model::from_spec(&spec) {
            Ok(model) => return Ok(model),
            Err(err) => err,
        };
        let StateError::Invalid { entry, .. } = &err else {
            return Err(err);
        };
        let Some((kind, key)) = entry.strip_suffix(']').and_then(|e| e.split_once('[')) else {
            return Err(err);
        };
        let before = (
            spec.networks.len(),
            spec.endpoints.len(),
            spec.ports.len(),
            spec.services.len(),
        );
        match kind {
            "networks" => drop_network(&mut spec, key),
            "endpoints" => drop_endpoint(&mut spec, key),
            "services" => spec.services.retain(|s| s.name != key),
            "ports" => {
                if let Ok(i) = key.parse::<usize>()
                    && i < spec.ports.len()
                {
                    spec.ports.remove(i);
                }
            }
            _ => return Err(err),
        }
        let after = (
            spec.networks.len(),
            spec.endpoints.len(),
            spec.ports.len(),
            spec.services.len(),
        );
        if before == after {
            return Err(err);
        }
        notes.push(format!("left out: {err}"));
    }
    Model::from_spec(&spec)
}

fn drop_network(spec: &mut StateFile, name: &str) {
    spec.networks.retain(|n| n.name != name);
    let mut emptied = Vec::new();
    for e in &mut spec.endpoints {
        let had = e.interfaces.len();
        e.interfaces.retain(|i| i.network != name);
        if had > 0 && e.interfaces.is_empty() {
            emptied.push(e.name.clone());
        }
    }
    for endpoint in emptied {
        drop_endpoint(spec, &endpoint);
    }
}

fn drop_endpoint(spec: &mut StateFile, name: &str) {
    spec.endpoints.retain(|e| e.name != name);
    spec.ports.retain(|p| p.endpoint.as_deref() != Some(name));
    for s in &mut spec.services {
        if let Some(list) = &mut s.endpoints {
            list.retain(|e| e != name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PortTarget;

    // Trimmed from what dockerd 20.10 answered for `GET /v1.41/networks` after
    // `docker network create net1` and
    // `docker network create -o com.docker.network.bridge.enable_icc=false --internal net2`.
    const NETWORKS: &str = r#"[
      {"Name":"net1","Id":"cfba64a4ecd571bb3bfa75af94140d90fe6ae9115b0fba1ca56e4a6be33b58a1",
       "Created":"2026-11-25T09:33:43.544068594Z","Scope":"local","Driver":"bridge",
       "EnableIPv6":false,"IPAM":{"Driver":"default","Options":{},
       "Config":[{"Subnet":"172.18.0.0/16","Gateway":"172.18.0.1"}]},"Internal":false,
       "Attachable":false,"Ingress":false,"ConfigFrom":{"Network":""},"ConfigOnly":false,
       "Containers":{},"Options":{},"Labels":{"x":"y"}},
      {"Name":"net2","Id":"371560432c173e11cd4e0e4b33025df685dc903c53a639a097a20b41d2fdf901",
       "Created":"2026-11-25T09:33:43.565023688Z","Scope":"local","Driver":"bridge",
       "IPAM":{"Driver":"default","Options":{},
       "Config":[{"Subnet":"172.19.0.0/16","Gateway":"172.19.0.1"}]},"Internal":true,
       "ConfigOnly":false,"Containers":{},
       "Options":{"com.docker.network.bridge.enable_icc":"false"},"Labels":{}},
      {"Name":"none","Id":"b181a2f82322ac7ab3ef139dba431fdf83aabde92ea521bcf3b41d5e1c94431e",
       "Created":"2026-11-25T09:33:36.560478505Z","Scope":"local","Driver":"null",
       "IPAM":{"Driver":"default","Options":null,"Config":[]},"Internal":false,
       "ConfigOnly":false,"Containers":{},"Options":{},"Labels":{}},
      {"Name":"host","Id":"3120b5b3264efd7d0d3bf98f100ec467f8bcc9888c8835535ac5edd846be4547",
       "Created":"2026-11-25T09:33:36.561540269Z","Scope":"local","Driver":"host",
       "IPAM":{"Driver":"default","Options":null,"Config":[]},"Internal":false,
       "ConfigOnly":false,"Containers":{},"Options":{},"Labels":{}},
      {"Name":"bridge","Id":"c1c8c76559f1d2697b46d3dd7fda6e27f01a7c5c71cece78d408c3892d67e241",
       "Created":"2026-11-25T09:33:36.56244628Z","Scope":"local","Driver":"bridge",
       "IPAM":{"Driver":"default","Options":null,"Config":[{"Subnet":"172.17.0.0/16"}]},
       "Internal":false,"ConfigOnly":false,"Containers":{},
       "Options":{"com.docker.network.bridge.default_bridge":"true",
         "com.docker.network.bridge.enable_icc":"true",
         "com.docker.network.bridge.enable_ip_masquerade":"false",
         "com.docker.network.bridge.host_binding_ipv4":"0.0.0.0",
         "com.docker.network.bridge.name":"docker0","com.docker.network.driver.mtu":"1500"},
       "Labels":{}}
    ]"#;

    // Trimmed from `GET /v1.41/containers/web/json` after
    // `docker run -d --name web -p 8080:80 -p 5353:53/udp -p 9000-9002:7000-7002
    //  --label app=web bb:latest httpd -f -p 80 -h /www`.
    const WEB: &str = r#"{
      "Id":"587c79dc035de862b2d6a04ab2d9b51ffa26a73811f1fa00fdaeefeb53253540",
      "Name":"/web",
      "State":{"Status":"running","Running":true,"Paused":false,"Pid":27611},
      "HostConfig":{"NetworkMode":"default",
        "PortBindings":{"80/tcp":[{"HostIp":"","HostPort":"8080"}]}},
      "Config":{"Hostname":"587c79dc035d","Env":null,
        "ExposedPorts":{"53/udp":{},"7000/tcp":{},"7001/tcp":{},"7002/tcp":{},"80/tcp":{}},
        "Labels":{"app":"web"}},
      "NetworkSettings":{"Bridge":"","SandboxID":"4a4f344e1fc0c2c04adb2bf85a3a8d55822e",
        "Ports":{"53/udp":[{"HostIp":"0.0.0.0","HostPort":"5353"}],
          "7000/tcp":[{"HostIp":"0.0.0.0","HostPort":"9000"}],
          "7001/tcp":[{"HostIp":"0.0.0.0","HostPort":"9001"}],
          "7002/tcp":[{"HostIp":"0.0.0.0","HostPort":"9002"}],
          "80/tcp":[{"HostIp":"0.0.0.0","HostPort":"8080"}]},
        "SandboxKey":"/tmp/dkx/exec/netns/4a4f344e1fc0",
        "IPAddress":"172.17.0.2","MacAddress":"02:42:ac:11:00:02",
        "Networks":{"bridge":{"IPAMConfig":null,"Links":null,"Aliases":null,
          "NetworkID":"c1c8c76559f1d2697b46d3dd7fda6e27f01a7c5c71cece78d408c3892d67e241",
          "EndpointID":"0e1b1674b8247379fef060301c0f43e53ad10cb226df89da2eb340fa752009bf",
          "Gateway":"172.17.0.1","IPAddress":"172.17.0.2","IPPrefixLen":16,
          "MacAddress":"02:42:ac:11:00:02","DriverOpts":null}}}
    }"#;

    // Trimmed from `GET /v1.41/containers/two/json` after
    // `docker run -d --name two --network net1 -l com.docker.compose.project=p
    //  -l com.docker.compose.service=s bb:latest sleep 1000; docker network connect net2 two`.
    const TWO: &str = r#"{
      "Id":"43b0b4f7da9a99b1158bef40bf16bedee18af183625d3c6aed74e75f10920264",
      "Name":"/two",
      "State":{"Status":"running","Running":true,"Pid":27686},
      "HostConfig":{"NetworkMode":"net1"},
      "Config":{"Hostname":"43b0b4f7da9a","Env":null,"Cmd":["sleep","1000"],
        "Labels":{"com.docker.compose.project":"p","com.docker.compose.service":"s"}},
      "NetworkSettings":{"Ports":{},"SandboxKey":"/tmp/dkx/exec/netns/08a3c33e80a6",
        "IPAddress":"","MacAddress":"",
        "Networks":{
          "net1":{"IPAMConfig":null,"Aliases":["43b0b4f7da9a"],
            "NetworkID":"cfba64a4ecd571bb3bfa75af94140d90fe6ae9115b0fba1ca56e4a6be33b58a1",
            "Gateway":"172.18.0.1","IPAddress":"172.18.0.2","IPPrefixLen":16,
            "MacAddress":"02:42:ac:12:00:02","DriverOpts":null},
          "net2":{"IPAMConfig":{},"Aliases":["43b0b4f7da9a"],
            "NetworkID":"371560432c173e11cd4e0e4b33025df685dc903c53a639a097a20b41d2fdf901",
            "Gateway":"172.19.0.1","IPAddress":"172.19.0.2","IPPrefixLen":16,
            "MacAddress":"02:42:ac:13:00:02","DriverOpts":{}}}}
    }"#;

    /// A container as bollard decodes the engine's JSON.
    fn inspect(json: &str) -> ContainerInspect {
        serde_json::from_str::<bollard::models::ContainerInspectResponse>(json)
            .unwrap()
            .into()
    }

    /// Networks as bollard decodes the engine's JSON.
    fn networks_of(json: &str) -> Vec<NetworkInspect> {
        serde_json::from_str::<Vec<bollard::models::Network>>(json)
            .unwrap()
            .into_iter()
            .map(NetworkInspect::from)
            .collect()
    }

    fn container(json: &str, veths: &[([u8; 6], &str)]) -> Container {
        Container {
            inspect: inspect(json),
            host_veths: veths.iter().map(|(m, n)| (*m, n.to_string())).collect(),
            veth_error: None,
        }
    }

    fn sample() -> (Vec<NetworkInspect>, BTreeMap<String, Container>) {
        let networks = networks_of(NETWORKS);
        let mut containers = BTreeMap::new();
        containers.insert(
            "587c".to_string(),
            container(WEB, &[([2, 0x42, 0xac, 0x11, 0, 2], "veth2bfa2e0")]),
        );
        containers.insert(
            "43b0".to_string(),
            container(
                TWO,
                &[
                    ([2, 0x42, 0xac, 0x12, 0, 2], "veth62fd343"),
                    ([2, 0x42, 0xac, 0x13, 0, 2], "veth9f7d20d"),
                ],
            ),
        );
        (networks, containers)
    }

    fn build_sample(
        networks: &[NetworkInspect],
        containers: &BTreeMap<String, Container>,
        vips: &mut VipAllocator,
    ) -> Built {
        let exists = |_: &str| true;
        build(
            &Inputs {
                networks,
                containers,
                interface_exists: &exists,
                swarm: None,
            },
            vips,
        )
    }

    fn vips() -> VipAllocator {
        VipAllocator::new(Cidr::parse("10.96.0.0/16").unwrap())
    }

    #[test]
    fn engine_state_becomes_a_valid_model() {
        let (networks, containers) = sample();
        let built = build_sample(&networks, &containers, &mut vips());
        assert_eq!(built.notes, Vec::<String>::new());
        let spec = &built.spec;

        // Bridge networks only, oldest first; the default bridge is docker0 with the gateway
        // its containers use; others are br-<id>.
        let nets: Vec<(&str, &str, &str, &str, bool, bool)> = spec
            .networks
            .iter()
            .map(|n| {
                (
                    n.name.as_str(),
                    n.bridge.as_str(),
                    n.subnet.as_deref().unwrap(),
                    n.gateway.as_deref().unwrap(),
                    n.internal,
                    n.icc,
                )
            })
            .collect();
        assert_eq!(
            nets,
            vec![
                (
                    "bridge",
                    "docker0",
                    "172.17.0.0/16",
                    "172.17.0.1",
                    false,
                    true
                ),
                (
                    "net1",
                    "br-cfba64a4ecd5",
                    "172.18.0.0/16",
                    "172.18.0.1",
                    false,
                    true
                ),
                (
                    "net2",
                    "br-371560432c17",
                    "172.19.0.0/16",
                    "172.19.0.1",
                    true,
                    false
                ),
            ]
        );

        let model = validate(spec.clone(), &mut Vec::new()).unwrap();
        let two = model.endpoints.iter().find(|e| e.name == "two").unwrap();
        // The network it was started on first.
        let on: Vec<(&str, String, &str)> = two
            .interfaces
            .iter()
            .map(|i| {
                (
                    i.network.as_str(),
                    i.ip.unwrap().to_string(),
                    i.host_veth.as_str(),
                )
            })
            .collect();
        assert_eq!(
            on,
            vec![
                ("net1", "172.18.0.2".into(), "veth62fd343"),
                ("net2", "172.19.0.2".into(), "veth9f7d20d"),
            ]
        );
        assert_eq!(two.labels["com.docker.compose.service"], "s");
        let web = model.endpoints.iter().find(|e| e.name == "web").unwrap();
        assert_eq!(web.interfaces[0].mac, [2, 0x42, 0xac, 0x11, 0, 2]);
        assert_eq!(web.labels["app"], "web");

        // Ports: the range came back as one entry, UDP kept.
        let ports: Vec<(String, Protocol, u16, u16, u16)> = model
            .ports
            .iter()
            .map(|p| {
                assert_eq!(p.target, PortTarget::Endpoint("web".into()));
                // dockerd listed 0.0.0.0 only (no "::" beside it): IPv4 only.
                assert_eq!(p.host_ip, Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)));
                (
                    format!("{}-{}", p.host_ports.first, p.host_ports.last),
                    p.protocol,
                    p.host_ports.first,
                    p.container_ports.first,
                    p.container_ports.last,
                )
            })
            .collect();
        assert_eq!(
            ports,
            vec![
                ("8080-8080".into(), Protocol::Tcp, 8080, 80, 80),
                ("9000-9002".into(), Protocol::Tcp, 9000, 7000, 7002),
                ("5353-5353".into(), Protocol::Udp, 5353, 53, 53),
            ]
        );
        // `two` is a Compose service member, but exposes no port: no service, and a note.
        assert!(model.services.is_empty());
    }

    #[test]
    fn stopped_or_unresolved_containers_are_left_out() {
        let (networks, mut containers) = sample();
        // No veth found for `two`'s second interface: only that interface goes.
        containers.get_mut("43b0").unwrap().host_veths.pop_last();
        let built = build_sample(&networks, &containers, &mut vips());
        let two = built
            .spec
            .endpoints
            .iter()
            .find(|e| e.name == "two")
            .unwrap();
        assert_eq!(two.interfaces.len(), 1);
        assert!(
            built
                .notes
                .iter()
                .any(|n| n.contains("container two: network net2: no host-side veth")),
            "{:?}",
            built.notes
        );
        // No veth at all for `web`: the endpoint and its ports go.
        containers.get_mut("587c").unwrap().host_veths.clear();
        let built = build_sample(&networks, &containers, &mut vips());
        assert!(built.spec.endpoints.iter().all(|e| e.name != "web"));
        assert!(built.spec.ports.is_empty());
        // A bridge missing from the agent's namespace: the network and its interfaces go.
        let exists = |name: &str| name != "br-371560432c17";
        let built = build(
            &Inputs {
                networks: &networks,
                containers: &containers,
                interface_exists: &exists,
                swarm: None,
            },
            &mut vips(),
        );
        assert!(built.spec.networks.iter().all(|n| n.name != "net2"));
        let model = validate(built.spec, &mut Vec::new()).unwrap();
        assert_eq!(model.endpoints.len(), 1);
    }

    #[test]
    fn ports_with_host_ips_and_ipv6_bindings() {
        let (networks, mut containers) = sample();
        let web = containers.get_mut("587c").unwrap();
        web.inspect.network_settings.ports = super::super::api::ports(serde_json::from_str(
            r#"{"80/tcp":[{"HostIp":"192.0.2.1","HostPort":"9090"},{"HostIp":"::","HostPort":"9090"}],
                "81/tcp":[{"HostIp":"0.0.0.0","HostPort":"9091"}],
                "83/tcp":[{"HostIp":"0.0.0.0","HostPort":"9093"},{"HostIp":"::","HostPort":"9093"}],
                "84/udp":[{"HostIp":"2001:db8::1","HostPort":"9094"}],
                "82/tcp":null,
                "132/sctp":[{"HostIp":"","HostPort":"132"}]}"#,
        )
        .unwrap());
        let built = build_sample(&networks, &containers, &mut vips());
        let ports: Vec<(Option<&str>, String)> = built
            .spec
            .ports
            .iter()
            .map(|p| (p.host_ip.as_deref(), format!("{:?}", p.host_port)))
            .collect();
        // 9090 on one address and 9091 on all are not one range; `-p 9093:83` as dockerd
        // 20.10 lists it (0.0.0.0 and ::) is one entry on every address of both families.
        assert_eq!(
            ports,
            vec![
                (None, "Number(9093)".to_string()),
                (Some("0.0.0.0"), "Number(9091)".to_string()),
                (Some("192.0.2.1"), "Number(9090)".to_string()),
                (Some("::"), "Number(9090)".to_string()),
                (Some("2001:db8::1"), "Number(9094)".to_string()),
            ]
        );
        let model = validate(built.spec.clone(), &mut Vec::new()).unwrap();
        assert_eq!(model.ports.len(), 5);
        assert!(built.notes.iter().any(|n| n.contains("132/sctp")));
    }

    // Trimmed from dockerd 20.10.24 (`GET /v1.41/networks/net6`, `GET
    // /v1.41/containers/c6/json`) after `docker network create --ipv6 --subnet 172.28.0.0/16
    // --subnet fd00:28::/64 net6; docker run -d --name c6 --network net6 -p 8080:80
    // -p 127.0.0.1:8081:81 -p '[::1]:8082:82' bb:latest sleep 1000`. The IPAM config names no
    // gateway; the container's endpoint does.
    const NET6: &str = r#"[{"Name":"net6",
      "Id":"852f102bfb3c0299700204c0e851ceb6793f830341ffe75cfbedfefcc4f2a59f",
      "Created":"2026-12-02T06:04:50.635237399Z","Scope":"local","Driver":"bridge",
      "EnableIPv6":true,"IPAM":{"Driver":"default","Options":{},
        "Config":[{"Subnet":"172.28.0.0/16"},{"Subnet":"fd00:28::/64"}]},
      "Internal":false,"Attachable":false,"Ingress":false,"ConfigFrom":{"Network":""},
      "ConfigOnly":false,
      "Containers":{"b84e591ee59d0edd634956f8e82cb6e64b9599610e680b290e1b3c565889ddd4":{
        "Name":"c6","EndpointID":"39750316ff8178f376ab824d057cc03770b480ab47ef9941e8672e612aa8d690",
        "MacAddress":"02:42:ac:1c:00:02","IPv4Address":"172.28.0.2/16",
        "IPv6Address":"fd00:28::2/64"}},
      "Options":{},"Labels":{}}]"#;

    const C6: &str = r#"{
      "Id":"b84e591ee59d0edd634956f8e82cb6e64b9599610e680b290e1b3c565889ddd4",
      "Created":"2026-12-02T06:04:50.715648238Z","Name":"/c6",
      "State":{"Status":"running","Running":true,"Paused":false,"Pid":26755},
      "HostConfig":{"NetworkMode":"net6",
        "PortBindings":{"80/tcp":[{"HostIp":"","HostPort":"8080"}],
          "81/tcp":[{"HostIp":"127.0.0.1","HostPort":"8081"}],
          "82/tcp":[{"HostIp":"::1","HostPort":"8082"}]}},
      "Config":{"Hostname":"b84e591ee59d","Env":null,"Cmd":["sleep","1000"],
        "ExposedPorts":{"80/tcp":{},"81/tcp":{},"82/tcp":{}},"Labels":{}},
      "NetworkSettings":{"Bridge":"",
        "SandboxID":"fba91349911751838365d8eda353996049eeae7bdd79670be1267b64adc5eec3",
        "HairpinMode":false,"LinkLocalIPv6Address":"","LinkLocalIPv6PrefixLen":0,
        "Ports":{"80/tcp":[{"HostIp":"0.0.0.0","HostPort":"8080"},{"HostIp":"::","HostPort":"8080"}],
          "81/tcp":[{"HostIp":"127.0.0.1","HostPort":"8081"}],
          "82/tcp":[{"HostIp":"::1","HostPort":"8082"}]},
        "SandboxKey":"/tmp/v6m-dkr/exec/netns/fba913499117",
        "SecondaryIPAddresses":null,"SecondaryIPv6Addresses":null,"EndpointID":"",
        "Gateway":"","GlobalIPv6Address":"","GlobalIPv6PrefixLen":0,"IPAddress":"",
        "IPPrefixLen":0,"IPv6Gateway":"","MacAddress":"",
        "Networks":{"net6":{"IPAMConfig":null,"Links":null,"Aliases":["b84e591ee59d"],
          "NetworkID":"852f102bfb3c0299700204c0e851ceb6793f830341ffe75cfbedfefcc4f2a59f",
          "EndpointID":"39750316ff8178f376ab824d057cc03770b480ab47ef9941e8672e612aa8d690",
          "Gateway":"172.28.0.1","IPAddress":"172.28.0.2","IPPrefixLen":16,
          "IPv6Gateway":"fd00:28::1","GlobalIPv6Address":"fd00:28::2",
          "GlobalIPv6PrefixLen":64,"MacAddress":"02:42:ac:1c:00:02","DriverOpts":null}}}
    }"#;

    #[test]
    fn an_ipv6_network_its_addresses_and_ipv6_port_bindings() {
        let networks = networks_of(NET6);
        assert!(networks[0].enable_ipv6);
        let mut containers = BTreeMap::new();
        containers.insert(
            "b84e".to_string(),
            container(C6, &[([2, 0x42, 0xac, 0x1c, 0, 2], "veth5d1a2b3")]),
        );
        let built = build_sample(&networks, &containers, &mut vips());
        assert_eq!(built.notes, Vec::<String>::new());
        let net = &built.spec.networks[0];
        assert_eq!(
            (
                net.subnet.as_deref(),
                net.gateway.as_deref(),
                net.subnet6.as_deref(),
                net.gateway6.as_deref()
            ),
            (
                Some("172.28.0.0/16"),
                Some("172.28.0.1"),
                Some("fd00:28::/64"),
                // Not in the IPAM config: the one the container was given.
                Some("fd00:28::1")
            )
        );
        let model = validate(built.spec.clone(), &mut Vec::new()).unwrap();
        let itf = &model.endpoints[0].interfaces[0];
        assert_eq!(itf.ip, Some("172.28.0.2".parse().unwrap()));
        assert_eq!(itf.ip6, Some("fd00:28::2".parse().unwrap()));
        let ports: Vec<(Option<IpAddr>, u16, u16)> = model
            .ports
            .iter()
            .map(|p| (p.host_ip, p.host_ports.first, p.container_ports.first))
            .collect();
        assert_eq!(
            ports,
            vec![
                // -p 8080:80: 0.0.0.0 and :: are every address of both families.
                (None, 8080, 80),
                (Some("127.0.0.1".parse().unwrap()), 8081, 81),
                (Some("::1".parse().unwrap()), 8082, 82),
            ]
        );

        // IPv6 off: the IPv6 subnet and addresses are not used, and the :: binding stays
        // apart from the 0.0.0.0 one as dockerd listed them.
        let mut off = networks.clone();
        off[0].enable_ipv6 = false;
        let built = build_sample(&off, &containers, &mut vips());
        assert_eq!(built.spec.networks[0].subnet6, None);
        assert_eq!(built.spec.endpoints[0].interfaces[0].ip6, None);

        // Without a gateway anywhere, Docker's choice: the subnet's first address.
        let mut bare = containers.clone();
        for c in bare.values_mut() {
            for e in c.inspect.network_settings.networks.values_mut() {
                e.ipv6_gateway.clear();
            }
        }
        let built = build_sample(&networks, &bare, &mut vips());
        assert_eq!(
            built.spec.networks[0].gateway6.as_deref(),
            Some("fd00:28::1")
        );

        // An IPv6-only network (Docker 28's `--ipv4=false`): no IPv4 subnet or address.
        let mut only6 = networks.clone();
        only6[0].ipam.retain(|c| c.subnet.contains(':'));
        let mut c6 = containers.clone();
        for c in c6.values_mut() {
            for e in c.inspect.network_settings.networks.values_mut() {
                e.ip_address.clear();
                e.gateway.clear();
            }
            // Docker lists no 0.0.0.0 binding on an IPv6-only network; the IPv4 ones here
            // would be refused by the model (no IPv4 address to lead to).
            c.inspect.network_settings.ports = super::super::api::ports(
                serde_json::from_str(r#"{"80/tcp":[{"HostIp":"::","HostPort":"8080"}]}"#).unwrap(),
            );
        }
        let built = build_sample(&only6, &c6, &mut vips());
        assert_eq!(built.notes, Vec::<String>::new());
        let model = validate(built.spec, &mut Vec::new()).unwrap();
        assert_eq!(model.networks[0].subnet, None);
        assert_eq!(model.endpoints[0].interfaces[0].ip, None);
        assert_eq!(
            model.ports[0].host_ip,
            Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED))
        );
    }

    fn with_labels(json: &str, labels: &[(&str, &str)], exposed: &[&str]) -> ContainerInspect {
        let mut inspect = inspect(json);
        inspect.config.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        inspect.config.exposed_ports = exposed.iter().map(|p| p.to_string()).collect();
        inspect
    }

    /// A container to make: name, labels, exposed ports.
    type Replica<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);

    /// Containers on the default bridge.
    fn replicas(specs: &[Replica<'_>]) -> BTreeMap<String, Container> {
        let mut containers = BTreeMap::new();
        for (i, (name, labels, exposed)) in specs.iter().enumerate() {
            let mut inspect = with_labels(WEB, labels, exposed);
            inspect.name = format!("/{name}");
            inspect.network_settings.ports.clear();
            let ip = format!("172.17.0.{}", 10 + i);
            let mac = [2, 0x42, 0xac, 0x11, 0, 10 + i as u8];
            let ep = inspect.network_settings.networks.get_mut("bridge").unwrap();
            ep.ip_address = ip;
            ep.mac_address = mac
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":");
            containers.insert(
                format!("id{i}"),
                Container {
                    inspect,
                    host_veths: [(mac, format!("veth{i}"))].into(),
                    veth_error: None,
                },
            );
        }
        containers
    }

    #[test]
    fn compose_services_and_the_service_label() {
        let compose = [
            (COMPOSE_PROJECT_LABEL, "shop"),
            (COMPOSE_SERVICE_LABEL, "web"),
            (COMPOSE_ONEOFF_LABEL, "False"),
        ];
        let oneoff = [
            (COMPOSE_PROJECT_LABEL, "shop"),
            (COMPOSE_SERVICE_LABEL, "web"),
            (COMPOSE_ONEOFF_LABEL, "True"),
        ];
        let containers = replicas(&[
            ("shop-web-1", &compose, &["80/tcp"]),
            ("shop-web-2", &compose, &["80/tcp", "443/tcp"]),
            ("shop-web-run-1", &oneoff, &["80/tcp"]),
            (
                "dns",
                &[(SERVICE_LABEL, "resolver"), (SERVICE_PORT_LABEL, "53/udp")],
                &[],
            ),
            // The label wins over Compose's.
            (
                "odd",
                &[
                    (COMPOSE_PROJECT_LABEL, "shop"),
                    (COMPOSE_SERVICE_LABEL, "web"),
                    (SERVICE_LABEL, "resolver"),
                    (SERVICE_PORT_LABEL, "53/udp"),
                ],
                &["80/tcp"],
            ),
        ]);
        let networks = networks_of(NETWORKS);
        let mut vips = vips();
        let built = build_sample(&networks, &containers, &mut vips);
        let model = validate(built.spec.clone(), &mut Vec::new()).unwrap();
        let services: Vec<(&str, u16, Protocol, Vec<&str>)> = model
            .services
            .iter()
            .map(|s| {
                (
                    s.name.as_str(),
                    s.port,
                    s.protocol,
                    s.backends.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            services,
            vec![
                ("resolver", 53, Protocol::Udp, vec!["dns", "odd"]),
                (
                    "shop_web:80",
                    80,
                    Protocol::Tcp,
                    vec!["shop-web-1", "shop-web-2"]
                ),
                ("shop_web:443", 443, Protocol::Tcp, vec!["shop-web-2"]),
            ]
        );
        // One VIP per service name, inside the range, kept across rebuilds.
        let vip_of = |m: &Model, name: &str| {
            m.services
                .iter()
                .find(|s| s.name == name)
                .unwrap()
                .vip
                .unwrap()
        };
        assert_eq!(
            vip_of(&model, "shop_web:80"),
            vip_of(&model, "shop_web:443")
        );
        assert_ne!(vip_of(&model, "shop_web:80"), vip_of(&model, "resolver"));
        let range = Cidr::parse("10.96.0.0/16").unwrap();
        assert!(range.contains(vip_of(&model, "resolver")));
        let again = validate(
            build_sample(&networks, &containers, &mut vips).spec,
            &mut Vec::new(),
        )
        .unwrap();
        assert_eq!(again.services, model.services);
    }

    #[test]
    fn vips_are_stable_distinct_and_avoid_subnets() {
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let range = Cidr::parse("10.96.0.0/16").unwrap();
        let mut a = VipAllocator::new(range);
        let first = a.assign(&names(&["x", "y", "z"]), &[], &mut Vec::new());
        assert_eq!(first.len(), 3);
        assert_eq!(first.values().collect::<BTreeSet<_>>().len(), 3);
        // Another allocator (an agent restart) hands out the same VIPs.
        let mut b = VipAllocator::new(range);
        assert_eq!(
            b.assign(&names(&["z", "y", "x"]), &[], &mut Vec::new()),
            first
        );
        // Names keep theirs while others come and go.
        let later = a.assign(&names(&["x", "z", "w"]), &[], &mut Vec::new());
        assert_eq!(later["x"], first["x"]);
        assert_eq!(later["z"], first["z"]);
        assert!(!later.contains_key("y"));

        // A /30 has two usable addresses; the third name gets none.
        let mut small = VipAllocator::new(Cidr::parse("10.96.0.0/30").unwrap());
        let got = small.assign(&names(&["a", "b", "c"]), &[], &mut Vec::new());
        assert_eq!(got.len(), 2);
        let mut got: Vec<Ipv4Addr> = got.into_values().collect();
        got.sort();
        assert_eq!(
            got,
            vec![Ipv4Addr::new(10, 96, 0, 1), Ipv4Addr::new(10, 96, 0, 2)]
        );
        // A /32 is one VIP, which a test can count on.
        let mut one = VipAllocator::new(Cidr::parse("10.96.0.10/32").unwrap());
        assert_eq!(
            one.assign(&names(&["svc"]), &[], &mut Vec::new())["svc"],
            Ipv4Addr::new(10, 96, 0, 10)
        );
        // Never inside a network's subnet.
        let overlap = Cidr::parse("10.96.0.0/24").unwrap();
        let mut c = VipAllocator::new(Cidr::parse("10.96.0.0/23").unwrap());
        let got = c.assign(&names(&["a", "b", "c", "d"]), &[overlap], &mut Vec::new());
        assert!(got.values().all(|ip| !overlap.contains(*ip)), "{got:?}");
    }

    #[test]
    fn a_vip_range_inside_a_network_moves_to_a_free_block_and_says_so() {
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let range = Cidr::parse("10.96.0.0/16").unwrap();
        let mut vips = VipAllocator::new(range);
        let before = vips.assign(&names(&["web"]), &[], &mut Vec::new());
        assert!(range.contains(before["web"]));
        // A network 10.96.0.0/12 covers 10.96-10.111: the next free /16 is 10.112.0.0/16.
        let wide = Cidr::parse("10.96.0.0/12").unwrap();
        let mut notes = Vec::new();
        let got = vips.assign(&names(&["web", "db"]), &[wide], &mut notes);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(vips.in_use(), Cidr::parse("10.112.0.0/16").unwrap());
        assert!(
            got.values().all(|ip| vips.in_use().contains(*ip)),
            "{got:?}"
        );
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("10.112.0.0/16"), "{notes:?}");
        // The network gone, VIPs come from the range asked for again.
        let mut notes = Vec::new();
        let back = vips.assign(&names(&["web", "db"]), &[], &mut notes);
        assert!(back.values().all(|ip| range.contains(*ip)), "{back:?}");
        assert!(notes.is_empty(), "{notes:?}");
        // Covered with nowhere to go (all of 10/8): no VIP, and a note says why.
        let mut notes = Vec::new();
        let none = vips.assign(
            &names(&["web"]),
            &[Cidr::parse("10.0.0.0/8").unwrap()],
            &mut notes,
        );
        assert!(none.is_empty(), "{none:?}");
        assert!(notes[0].contains("no free block"), "{notes:?}");
        // A range outside the private blocks never moves (it would shadow public addresses).
        let mut public = VipAllocator::new(Cidr::parse("198.18.0.0/24").unwrap());
        let mut notes = Vec::new();
        public.assign(
            &names(&["x"]),
            &[Cidr::parse("198.18.0.0/16").unwrap()],
            &mut notes,
        );
        assert!(notes[0].contains("no free block"), "{notes:?}");
    }

    #[test]
    fn validation_leaves_out_what_the_model_refuses() {
        let (networks, containers) = sample();
        let mut spec = build_sample(&networks, &containers, &mut vips()).spec;
        // Two containers claiming one MAC (cannot happen in one engine, but a model refusing
        // one entry must not hold back the others).
        let mut clone = spec.endpoints[0].clone();
        clone.name = "clone".into();
        clone.interfaces[0].ip = Some("172.17.0.99".into());
        clone.interfaces[0].host_veth = "vethclone".into();
        spec.endpoints.push(clone);
        spec.ports.push(PortSpec {
            endpoint: Some("clone".into()),
            service: None,
            protocol: "tcp".into(),
            host_ip: None,
            host_port: PortValue::Number(7777),
            container_port: PortValue::Number(80),
        });
        let mut notes = Vec::new();
        let model = validate(spec, &mut notes).unwrap();
        assert!(model.endpoints.iter().all(|e| e.name != "clone"));
        assert_eq!(model.endpoints.len(), 2);
        assert!(model.ports.iter().all(|p| p.host_ports.first != 7777));
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("endpoints[clone]"), "{notes:?}");
    }
}
