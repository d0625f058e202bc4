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

/// Checks every map the desired state fills; `ports_capacity` is the ports map's own (it is
/// set at load time and a pinned map keeps its size).
pub fn check(desired: &Desired, ports_capacity: u32) -> Result<(), CapacityError> {
    const FIXED: &str =
        "its capacity is fixed when the agent is built (dataplane_common::capacity)";
    let backends = desired.services.values().map(|s| s.backends.len()).sum();
    let checks = [
        (
            map_names::PORTS,
            "published port numbers (per protocol and address)",
            desired.ports.len(),
            ports_capacity,
            "start the agent with a larger --max-ports (a pinned map keeps its size: on a new \
             --pin-dir, or after removing the pinned dp_ports map)",
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
    use dataplane_common::{PortKey, PortTarget};

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
        assert_eq!(check(&desired, 11), Ok(()));
        let err = check(&desired, 10).unwrap_err();
        assert_eq!((err.wanted, err.capacity), (11, 10));
        let text = err.to_string();
        assert!(
            text.contains("dp_ports") && text.contains("--max-ports"),
            "{text}"
        );
    }
}
