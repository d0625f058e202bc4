//! Whether a desired state fits the maps, checked before anything is written: a state that
//! does not fit is refused whole, with the map, its capacity and what raises it, instead of a
//! `bpf_map_update_elem` failure half-way through the writes.

use dataplane_common::{capacity, map_names};

use super::Desired;

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

/// Checks every map the desired state fills; `ports_capacity` and `ports6_capacity` are the
/// ports maps' own (set at load time; a pinned map keeps its size).
pub fn check(
    desired: &Desired,
    ports_capacity: u32,
    ports6_capacity: u32,
) -> Result<(), CapacityError> {
    const FIXED: &str =
        "its capacity is fixed when the agent is built (dataplane_common::capacity)";
    const RAISE_PORTS: &str = "start the agent with a larger --max-ports (a pinned map keeps \
                               its size: on a new --pin-dir, or after removing the pinned \
                               dp_ports maps)";
    let backends = desired.services.values().map(|s| s.backends.len()).sum();
    let backends6 = desired.services.values().map(|s| s.backends6.len()).sum();
    let checks = [
        (
            map_names::PORTS,
            "published port numbers (per protocol and address)",
            desired.ports.len(),
            ports_capacity,
            RAISE_PORTS,
        ),
        (
            map_names::PORTS6,
            "published port numbers on IPv6 (per protocol and address)",
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
}
