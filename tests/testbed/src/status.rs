//! Reading the agent's typed status the way tests and the bench ask about it.

use std::collections::BTreeSet;

use dataplane::control::status::Status;

pub trait StatusExt {
    /// Entries in the map `name`, or in `name` plus a layout suffix (see
    /// [`StatusExt::map_entries`]); None when there is no such map.
    fn find_map_entries(&self, name: &str) -> Option<u32>;
    /// Entries in the map `name`, or in `name` plus a layout suffix (`dp_ports` finds
    /// `dp_ports_v2`, so a layout bump elsewhere does not break its readers). Panics when
    /// there is no such map.
    fn map_entries(&self, name: &str) -> u32;
    /// Drops counted for `reason` (its Hubble name).
    fn drops(&self, reason: &str) -> u64;
    /// The names of the endpoints in force.
    fn endpoint_names(&self) -> BTreeSet<String>;
    /// (network, ip, host veth) of each interface of endpoint `name`.
    fn interfaces_of(&self, name: &str) -> Vec<(String, String, String)>;
    /// (interface, program) of every attachment.
    fn attached(&self) -> Vec<(String, String)>;
    /// Packets counted at `hook` of `interface`.
    fn packets(&self, interface: &str, hook: &str) -> u64;
}

/// Whether map `actual` is the map asked for as `name` (itself, or `name_vN`).
fn is_map(actual: &str, name: &str) -> bool {
    actual == name
        || actual
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix("_v"))
            .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
}

impl StatusExt for Status {
    fn find_map_entries(&self, name: &str) -> Option<u32> {
        self.maps
            .iter()
            .find(|m| is_map(&m.name, name))
            .map(|m| m.entries)
    }

    fn map_entries(&self, name: &str) -> u32 {
        self.find_map_entries(name)
            .unwrap_or_else(|| panic!("no map {name} in the status: {:?}", self.maps))
    }

    fn drops(&self, reason: &str) -> u64 {
        self.drops.get(reason).copied().unwrap_or(0)
    }

    fn endpoint_names(&self) -> BTreeSet<String> {
        self.endpoints.iter().map(|e| e.name.clone()).collect()
    }

    fn interfaces_of(&self, name: &str) -> Vec<(String, String, String)> {
        self.endpoints
            .iter()
            .filter(|e| e.name == name)
            .map(|e| (e.network.clone(), e.ip.clone(), e.host_veth.clone()))
            .collect()
    }

    fn attached(&self) -> Vec<(String, String)> {
        self.attachments
            .iter()
            .map(|a| (a.interface.clone(), a.program.clone()))
            .collect()
    }

    fn packets(&self, interface: &str, hook: &str) -> u64 {
        self.interfaces
            .iter()
            .filter(|c| c.interface == interface && c.hook == hook)
            .map(|c| c.packets)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_are_found_with_or_without_their_layout_suffix() {
        assert!(is_map("dp_ports_v2", "dp_ports"));
        assert!(is_map("dp_ports_v2", "dp_ports_v2"));
        assert!(!is_map("dp_ports_extra_v1", "dp_ports"));
        assert!(!is_map("dp_ports_v", "dp_ports"));
        assert!(!is_map("dp_port", "dp_ports"));
    }
}
