//! The reconciler: the only writer of the kernel's maps and attachments. It turns a validated
//! [`Model`] into desired attachments and map entries, diffs them against what the kernel has
//! (including what an earlier agent left pinned) and applies the difference. Applying the same
//! model twice changes nothing.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use dataplane_common::EndpointInfo;

use crate::{
    ebpf::{Datapath, DatapathError, Hook},
    model::{Model, StateError},
};

/// What the reconciler needs from the kernel; [`Datapath`] is the real one, tests use a fake.
pub trait Kernel {
    /// The index of an interface in the agent's namespace.
    fn ifindex(&self, interface: &str) -> Option<u32>;
    fn attach(&mut self, interface: &str, hook: Hook) -> Result<(), DatapathError>;
    fn detach(&mut self, interface: &str, hook: Hook) -> Result<(), DatapathError>;
    fn attachments(&self) -> BTreeSet<(String, Hook)>;
    fn endpoints(&self) -> Result<BTreeMap<Ipv4Addr, EndpointInfo>, DatapathError>;
    fn set_endpoint(&mut self, ip: Ipv4Addr, info: EndpointInfo) -> Result<(), DatapathError>;
    fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError>;
}

impl Kernel for Datapath {
    fn ifindex(&self, interface: &str) -> Option<u32> {
        crate::netdev::ifindex(interface)
    }
    fn attach(&mut self, interface: &str, hook: Hook) -> Result<(), DatapathError> {
        Datapath::attach(self, interface, hook)
    }
    fn detach(&mut self, interface: &str, hook: Hook) -> Result<(), DatapathError> {
        Datapath::detach(self, interface, hook)
    }
    fn attachments(&self) -> BTreeSet<(String, Hook)> {
        Datapath::attachments(self)
            .into_iter()
            .map(|(interface, hook, _)| (interface, hook))
            .collect()
    }
    fn endpoints(&self) -> Result<BTreeMap<Ipv4Addr, EndpointInfo>, DatapathError> {
        Datapath::endpoints(self)
    }
    fn set_endpoint(&mut self, ip: Ipv4Addr, info: EndpointInfo) -> Result<(), DatapathError> {
        Datapath::set_endpoint(self, ip, info)
    }
    fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        Datapath::remove_endpoint(self, ip)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("no uplink: give `uplink:` in the state file or --uplink (no default route either)")]
    NoUplink,
    #[error(transparent)]
    Kernel(#[from] DatapathError),
}

/// What one reconcile changed.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Changes {
    pub attached: Vec<String>,
    pub detached: Vec<String>,
    pub endpoints_set: usize,
    pub endpoints_removed: usize,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

/// The attachments and map entries a model asks for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub attachments: BTreeSet<(String, Hook)>,
    pub endpoints: BTreeMap<Ipv4Addr, EndpointInfo>,
}

/// Computes the desired kernel state, checking that every interface the model names exists
/// (the error names the entry and field that refers to the missing one).
pub fn desired(
    model: &Model,
    uplink: &str,
    kernel: &impl Kernel,
) -> Result<Desired, ReconcileError> {
    let missing = |entry: String, field: String, name: &str| StateError::Invalid {
        entry,
        field,
        message: format!("interface {name:?} does not exist on this host"),
    };
    if kernel.ifindex(uplink).is_none() {
        return Err(missing("state".into(), "uplink".into(), uplink).into());
    }
    let mut desired = Desired::default();
    for hook in [Hook::UplinkIngress, Hook::UplinkEgress, Hook::UplinkXdp] {
        desired.attachments.insert((uplink.to_owned(), hook));
    }
    for network in &model.networks {
        if kernel.ifindex(&network.bridge).is_none() {
            return Err(missing(
                format!("networks[{}]", network.name),
                "bridge".into(),
                &network.bridge,
            )
            .into());
        }
    }
    for endpoint in &model.endpoints {
        for (j, itf) in endpoint.interfaces.iter().enumerate() {
            let ifindex = kernel.ifindex(&itf.host_veth).ok_or_else(|| {
                missing(
                    format!("endpoints[{}]", endpoint.name),
                    format!("interfaces[{j}].host_veth"),
                    &itf.host_veth,
                )
            })?;
            let network_id = model
                .networks
                .iter()
                .position(|n| n.name == itf.network)
                .expect("validated: the interface's network exists")
                as u32
                + 1;
            desired.endpoints.insert(
                itf.ip,
                EndpointInfo {
                    ifindex,
                    network_id,
                    mac: itf.mac,
                    _pad: [0; 2],
                },
            );
            desired
                .attachments
                .insert((itf.host_veth.clone(), Hook::ContainerIngress));
        }
    }
    Ok(desired)
}

/// Brings the kernel to `desired`. Map entries for new endpoints are written before their
/// interfaces get programs, and programs leave an interface before its entries go, so a program
/// never runs against a half-written state.
pub fn apply(desired: &Desired, kernel: &mut impl Kernel) -> Result<Changes, ReconcileError> {
    let mut changes = Changes::default();
    let current_endpoints = kernel.endpoints()?;
    for (ip, info) in &desired.endpoints {
        if current_endpoints.get(ip) != Some(info) {
            kernel.set_endpoint(*ip, *info)?;
            changes.endpoints_set += 1;
        }
    }
    let current_attachments = kernel.attachments();
    for (interface, hook) in desired.attachments.difference(&current_attachments) {
        kernel.attach(interface, *hook)?;
        changes
            .attached
            .push(format!("{}@{interface}", hook.program()));
    }
    for (interface, hook) in current_attachments.difference(&desired.attachments) {
        kernel.detach(interface, *hook)?;
        changes
            .detached
            .push(format!("{}@{interface}", hook.program()));
    }
    for ip in current_endpoints.keys() {
        if !desired.endpoints.contains_key(ip) {
            kernel.remove_endpoint(*ip)?;
            changes.endpoints_removed += 1;
        }
    }
    Ok(changes)
}

#[cfg(test)]
pub mod fake {
    //! An in-memory kernel for reconciler tests.
    use super::*;

    #[derive(Default)]
    pub struct FakeKernel {
        pub interfaces: BTreeMap<String, u32>,
        pub attached: BTreeSet<(String, Hook)>,
        pub endpoints: BTreeMap<Ipv4Addr, EndpointInfo>,
        pub writes: usize,
    }

    impl Kernel for FakeKernel {
        fn ifindex(&self, interface: &str) -> Option<u32> {
            self.interfaces.get(interface).copied()
        }
        fn attach(&mut self, interface: &str, hook: Hook) -> Result<(), DatapathError> {
            self.writes += 1;
            self.attached.insert((interface.to_owned(), hook));
            Ok(())
        }
        fn detach(&mut self, interface: &str, hook: Hook) -> Result<(), DatapathError> {
            self.writes += 1;
            self.attached.remove(&(interface.to_owned(), hook));
            Ok(())
        }
        fn attachments(&self) -> BTreeSet<(String, Hook)> {
            self.attached.clone()
        }
        fn endpoints(&self) -> Result<BTreeMap<Ipv4Addr, EndpointInfo>, DatapathError> {
            Ok(self.endpoints.clone())
        }
        fn set_endpoint(&mut self, ip: Ipv4Addr, info: EndpointInfo) -> Result<(), DatapathError> {
            self.writes += 1;
            self.endpoints.insert(ip, info);
            Ok(())
        }
        fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
            self.writes += 1;
            self.endpoints.remove(&ip);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{fake::FakeKernel, *};
    use crate::model::StateFile;

    const STATE: &str = r#"
networks:
  - {name: a, bridge: br-a, subnet: 10.1.0.0/24, gateway: 10.1.0.1}
endpoints:
  - name: one
    interfaces: [{network: a, ip: 10.1.0.2, mac: "02:00:00:00:00:02", host_veth: veth-one}]
  - name: two
    interfaces: [{network: a, ip: 10.1.0.3, mac: "02:00:00:00:00:03", host_veth: veth-two}]
"#;

    fn model(text: &str) -> Model {
        Model::from_spec(&StateFile::parse(text).unwrap()).unwrap()
    }

    fn kernel() -> FakeKernel {
        let mut k = FakeKernel::default();
        for (i, name) in ["eth0", "br-a", "veth-one", "veth-two"].iter().enumerate() {
            k.interfaces.insert(name.to_string(), i as u32 + 10);
        }
        k
    }

    fn reconcile(model: &Model, kernel: &mut FakeKernel) -> Result<Changes, ReconcileError> {
        let desired = desired(model, "eth0", kernel)?;
        apply(&desired, kernel)
    }

    #[test]
    fn first_apply_attaches_everything_and_writes_endpoints() {
        let mut k = kernel();
        let changes = reconcile(&model(STATE), &mut k).unwrap();
        assert_eq!(changes.attached.len(), 5, "{changes:?}"); // 3 uplink hooks + 2 veths
        assert_eq!(changes.endpoints_set, 2);
        let info = k.endpoints[&"10.1.0.3".parse::<Ipv4Addr>().unwrap()];
        assert_eq!((info.ifindex, info.network_id), (13, 1));
        assert_eq!(info.mac, [2, 0, 0, 0, 0, 3]);
    }

    #[test]
    fn second_apply_of_the_same_model_writes_nothing() {
        let mut k = kernel();
        let m = model(STATE);
        reconcile(&m, &mut k).unwrap();
        let writes = k.writes;
        assert!(reconcile(&m, &mut k).unwrap().is_empty());
        assert_eq!(k.writes, writes);
    }

    #[test]
    fn removing_an_endpoint_detaches_and_deletes_only_it() {
        let mut k = kernel();
        reconcile(&model(STATE), &mut k).unwrap();
        let smaller = STATE.split("  - name: two").next().unwrap();
        let changes = reconcile(&model(smaller), &mut k).unwrap();
        assert_eq!(
            changes.detached,
            vec!["dp_container_ingress@veth-two".to_string()]
        );
        assert_eq!(changes.endpoints_removed, 1);
        assert_eq!(k.endpoints.len(), 1);
        assert!(
            !k.attached
                .contains(&("veth-two".into(), Hook::ContainerIngress))
        );
    }

    #[test]
    fn stale_pinned_entries_of_an_earlier_agent_are_removed() {
        let mut k = kernel();
        k.endpoints
            .insert("10.9.9.9".parse().unwrap(), EndpointInfo::default());
        let changes = reconcile(&model(STATE), &mut k).unwrap();
        assert_eq!(changes.endpoints_removed, 1);
        assert!(!k.endpoints.contains_key(&"10.9.9.9".parse().unwrap()));
    }

    #[test]
    fn a_missing_interface_names_entry_and_field_and_changes_nothing() {
        let mut k = kernel();
        k.interfaces.remove("veth-two");
        let err = reconcile(&model(STATE), &mut k).unwrap_err();
        assert_eq!(
            err.to_string(),
            "endpoints[two].interfaces[0].host_veth: interface \"veth-two\" does not exist on this host"
        );
        assert_eq!(k.writes, 0);
        k.interfaces.remove("eth0");
        let err = reconcile(&model(STATE), &mut k).unwrap_err();
        assert!(err.to_string().starts_with("state.uplink: "), "{err}");
    }
}
