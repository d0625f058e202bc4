//! Whether a desired state fits the maps, checked before anything is written: a state that
//! does not fit is refused whole, with the map, its capacity and what raises it, instead of a
//! `bpf_map_update_elem` failure half-way through the writes.

use dataplane_common::{capacity, map_names};

use super::Desired;
use crate::model::Model;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{wanted} {what} do not fit the {map} map, which holds {capacity}; {raise}")]
pub struct CapacityError {
    pub map: &'static str,
    pub what: &'static str,
    pub wanted: usize,
    pub capacity: u32,
    /// The option that raises the capacity, or why none does.
    pub raise: &'static str,
}

const RAISE_PORTS: &str = "start the agent with a larger --max-ports (a pinned map keeps its \
                           size: on a new --pin-dir, or after removing the pinned dp_ports \
                           maps)";
const PORTS_WHAT: &str = "published port numbers (per protocol and address)";
const PORTS6_WHAT: &str = "published port numbers on IPv6 (per protocol and address)";

/// The published ports' entries in each family, counted from the model without building
/// them: the same error as [`check`] gives, early. Skipped (Ok) when a network is routed,
/// where entries of several ports may share a key (the container's own address and port)
/// and only the built entries say how many there are.
pub fn check_ports(model: &Model, capacity4: u32, capacity6: u32) -> Result<(), CapacityError> {
    use crate::model::{GatewayMode, PortTarget};
    use std::net::IpAddr;
    if model
        .networks
        .iter()
        .any(|n| n.gateway_mode == GatewayMode::Routed)
    {
        return Ok(());
    }
    let endpoints = model.endpoints_by_name();
    let (mut wanted4, mut wanted6) = (0usize, 0usize);
    for port in &model.ports {
        let (host4, host6) = match port.host_ip {
            None => (true, true),
            Some(IpAddr::V4(_)) => (true, false),
            Some(IpAddr::V6(_)) => (false, true),
        };
        let (has4, has6, count) = match &port.target {
            PortTarget::Endpoint(name) => {
                let first = endpoints
                    .get(name.as_str())
                    .and_then(|e| e.interfaces.first());
                match first {
                    // Over IPv6 an IPv4-only container is reached at its mapped address.
                    Some(itf) => (
                        itf.ip.is_some(),
                        itf.ip.is_some() || itf.ip6.is_some(),
                        port.host_ports.len() as usize,
                    ),
                    None => (false, false, 0),
                }
            }
            PortTarget::Service(name) => match model.services.iter().find(|s| &s.name == name) {
                Some(s) => (s.vip.is_some(), s.vip6.is_some(), 1),
                None => (false, false, 0),
            },
        };
        wanted4 += count * usize::from(host4 && has4);
        wanted6 += count * usize::from(host6 && has6);
    }
    for (map, what, wanted, capacity) in [
        (map_names::PORTS, PORTS_WHAT, wanted4, capacity4),
        (map_names::PORTS6, PORTS6_WHAT, wanted6, capacity6),
    ] {
        if wanted > capacity as usize {
            return Err(CapacityError {
                map,
                what,
                wanted,
                capacity,
                raise: RAISE_PORTS,
            });
        }
    }
    Ok(())
}

/// Checks every map the desired state fills; `ports_capacity` and `ports6_capacity` are the
/// ports maps' own (set at load time; a pinned map keeps its size).
pub fn check(
    desired: &Desired,
    ports_capacity: u32,
    ports6_capacity: u32,
) -> Result<(), CapacityError> {
    const FIXED: &str =
        "its capacity is fixed when the agent is built (dataplane_common::capacity)";
    let backends = desired.services.values().map(|s| s.backends.len()).sum();
    let backends6 = desired.services.values().map(|s| s.backends6.len()).sum();
    let checks = [
        (
            map_names::PORTS,
            PORTS_WHAT,
            desired.ports.len(),
            ports_capacity,
            RAISE_PORTS,
        ),
        (
            map_names::PORTS6,
            PORTS6_WHAT,
            desired.ports6.len(),
            ports6_capacity,
            RAISE_PORTS,
        ),
        (
            map_names::ENDPOINTS6,
            "container interfaces with an IPv6 address",
            desired.endpoints6.len(),
            capacity::ENDPOINTS,
            FIXED,
        ),
        (
            map_names::BACKENDS6,
            "service backends of IPv6 VIPs",
            backends6,
            capacity::BACKENDS,
            FIXED,
        ),
        (
            map_names::POLICY_PREFIXES6,
            "distinct IPv6 policy CIDR prefixes",
            desired.policy.prefixes6.len(),
            capacity::POLICY_PREFIXES,
            FIXED,
        ),
        (
            map_names::DENY_SOURCES6,
            "IPv6 deny-list prefixes",
            desired.deny_sources6.len(),
            capacity::DENY_SOURCES,
            FIXED,
        ),
        (
            map_names::LOCAL_ADDRS6,
            "host IPv6 addresses",
            desired.local_addrs6.len(),
            capacity::LOCAL_ADDRS,
            FIXED,
        ),
        (
            map_names::ENDPOINTS,
            "container interfaces",
            desired.endpoints.len(),
            capacity::ENDPOINTS,
            FIXED,
        ),
        (
            map_names::BACKENDS,
            "service backends",
            backends,
            capacity::BACKENDS,
            FIXED,
        ),
        (
            map_names::POLICY,
            "compiled policy entries (per rule and port, one per network, endpoint, label \
             class or nested CIDR prefix its selectors cover)",
            desired.policy.entries.len(),
            capacity::POLICY_ENTRIES,
            FIXED,
        ),
        (
            map_names::POLICY_PREFIXES,
            "distinct policy CIDR prefixes",
            desired.policy.prefixes.len(),
            capacity::POLICY_PREFIXES,
            FIXED,
        ),
        (
            map_names::DENY_SOURCES,
            "deny-list prefixes",
            desired.deny_sources.len(),
            capacity::DENY_SOURCES,
            FIXED,
        ),
        (
            map_names::LOCAL_ADDRS,
            "host addresses",
            desired.local_addrs.len(),
            capacity::LOCAL_ADDRS,
            FIXED,
        ),
    ];
    for (map, what, wanted, capacity, raise) in checks {
        if wanted > capacity as usize {
            return Err(CapacityError {
                map,
                what,
                wanted,
                capacity,
                raise,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane_common::{PortKey, PortKey6, PortTarget, PortTarget6, PrefixKey6};

    #[test]
    fn too_many_ports_name_the_map_its_capacity_and_the_option() {
        let mut desired = Desired::default();
        for port in 0..11u16 {
            desired.ports.insert(
                PortKey {
                    port: port.to_be(),
                    ..PortKey::default()
                },
                PortTarget::default(),
            );
        }
        assert_eq!(check(&desired, 11, 11), Ok(()));
        let err = check(&desired, 10, 11).unwrap_err();
        assert_eq!((err.wanted, err.capacity), (11, 10));
        let text = err.to_string();
        assert!(
            text.contains("dp_ports") && text.contains("--max-ports"),
            "{text}"
        );
    }

    #[test]
    fn the_ipv6_maps_are_checked_by_name() {
        let mut desired = Desired::default();
        for port in 0..11u16 {
            desired.ports6.insert(
                PortKey6 {
                    port: port.to_be(),
                    ..PortKey6::default()
                },
                PortTarget6::default(),
            );
        }
        let err = check(&desired, 100, 10).unwrap_err();
        assert_eq!(
            (err.map, err.wanted, err.capacity),
            (map_names::PORTS6, 11, 10)
        );
        assert!(err.to_string().contains("--max-ports"), "{err}");
        let mut desired = Desired::default();
        for len in 0..=capacity::DENY_SOURCES {
            desired.deny_sources6.insert(PrefixKey6 {
                prefix_len: len,
                ..PrefixKey6::default()
            });
        }
        let err = check(&desired, 100, 100).unwrap_err();
        assert_eq!(err.map, map_names::DENY_SOURCES6);
    }

    #[test]
    fn the_early_port_count_is_what_the_entries_come_to() {
        use crate::model::StateFile;
        let text = r#"
networks:
  - {name: a, bridge: br-a, subnet: 10.1.0.0/24, gateway: 10.1.0.1, subnet6: "fd00:1::/64", gateway6: "fd00:1::1"}
  - {name: six, bridge: br-six, subnet6: "fd00:2::/64", gateway6: "fd00:2::1"}
endpoints:
  - {name: one, interfaces: [{network: a, ip: 10.1.0.2, mac: "02:00:00:00:00:02", host_veth: v1}]}
  - {name: three, interfaces: [{network: six, ip6: "fd00:2::3", mac: "02:00:00:00:00:04", host_veth: v3}]}
services:
  - {name: web6, vip6: "fd00:96::11", port: 443, endpoints: [three]}
ports:
  - {endpoint: one, protocol: tcp, host_port: "8000-8009", container_port: "8000-8009"}
  - {endpoint: three, protocol: tcp, host_port: 9000, container_port: 80}
  - {endpoint: one, protocol: udp, host_ip: 0.0.0.0, host_port: 53, container_port: 53}
  - {service: web6, protocol: tcp, host_port: 443, container_port: 443}
"#;
        let model = Model::from_spec(&StateFile::parse(text).unwrap()).unwrap();
        // IPv4: 10 + 1; IPv6: 10 (mapped) + 1 + 1.
        assert_eq!(check_ports(&model, 11, 12), Ok(()));
        assert_eq!(check_ports(&model, 10, 12).unwrap_err().wanted, 11);
        let err = check_ports(&model, 11, 11).unwrap_err();
        assert_eq!((err.map, err.wanted), (map_names::PORTS6, 12));
    }
}
