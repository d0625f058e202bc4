//! The reconciler: the only writer of the kernel's maps and attachments (but conntrack, see
//! [`crate::kernel::maps`]). It turns a validated [`Model`] into desired attachments and map
//! entries ([`desired`]), diffs them against what the kernel has (including what an earlier
//! agent left pinned) and applies the difference ([`apply`]). Applying the same model twice
//! changes nothing. [`Reconciler`] owns the [`Datapath`], so nothing else can write to it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use dataplane_common::{
    Backend, BackendKey, Config, EndpointInfo, PolicyKey, PolicyMeta, PortKey, PortTarget,
    PrefixKey, ServiceInfo, ServiceKey, SockNetns, algorithm, net_flags,
};

pub mod capacity;
pub mod maglev;
pub mod policy;

use crate::{
    kernel::{
        Datapath, DatapathError, Hook,
        maps::{
            Backends, Endpoints, LocalAddrs, Policy, Ports, Reconciled, Services, SockNetnsMap,
        },
    },
    model::{Algorithm, GatewayMode, Model, PortTarget as ModelPortTarget, Protocol, StateError},
};

/// Source ports masquerade uses, kept apart from Linux's default ephemeral range
/// (32768-60999) so that a translated connection never takes a port a local socket uses.
pub const SNAT_PORTS: (u16, u16) = (20000, 32767);

/// What the reconciler needs from the kernel; [`Datapath`] is the real one, tests use a fake.
/// Map keys and values are the kernel's own types, in network byte order.
pub trait Kernel {
    /// The cookie of the network namespace the file `netns` stands for; None when it cannot
    /// be read (the container is gone).
    fn netns_cookie(&self, netns: &str) -> Option<u64>;
    /// The index of an interface in the agent's namespace.
    fn ifindex(&self, interface: &str) -> Option<u32>;
    /// IPv4 addresses of the interfaces in the agent's namespace: (interface, address).
    fn addresses(&self) -> Vec<(String, Ipv4Addr)>;
    fn attach(&mut self, interface: &str, hook: Hook) -> Result<(), DatapathError>;
    fn detach(&mut self, interface: &str, hook: Hook) -> Result<(), DatapathError>;
    fn attachments(&self) -> BTreeSet<(String, Hook)>;
    fn entries<M: Reconciled>(&self) -> Result<BTreeMap<M::Key, M::Value>, DatapathError>;
    fn set<M: Reconciled>(&mut self, key: M::Key, value: M::Value) -> Result<(), DatapathError>;
    fn remove<M: Reconciled>(&mut self, key: M::Key) -> Result<(), DatapathError>;
    fn config(&self) -> Result<Config, DatapathError>;
    fn set_config(&mut self, config: Config) -> Result<(), DatapathError>;
    /// The policy prefix trie, both halves: (half, length, address) -> CIDR class.
    fn policy_prefixes(&self) -> Result<BTreeMap<(u32, u8, u32), u32>, DatapathError>;
    fn set_policy_prefix(
        &mut self,
        prefix: (u32, u8, u32),
        class: Option<u32>,
    ) -> Result<(), DatapathError>;
    fn policy_meta(&self) -> Result<PolicyMeta, DatapathError>;
    fn set_policy_meta(&mut self, meta: PolicyMeta) -> Result<(), DatapathError>;
    fn deny_sources(&self) -> Result<BTreeSet<PrefixKey>, DatapathError>;
    fn set_deny_source(&mut self, prefix: PrefixKey, deny: bool) -> Result<(), DatapathError>;
    /// How many services the maps hold (service ids are 1..=this).
    fn max_services(&self) -> u32;
    /// Slots of each service's Maglev table (`--maglev-size`).
    fn maglev_size(&self) -> u32;
    /// The Maglev table of service `id`.
    fn maglev(&self, id: u32) -> Vec<u32>;
    fn set_maglev(&mut self, id: u32, table: &[u32]) -> Result<(), DatapathError>;
}

impl Kernel for Datapath {
    fn netns_cookie(&self, netns: &str) -> Option<u64> {
        crate::kernel::netdev::netns_cookie_of(std::path::Path::new(netns))
            .inspect_err(|e| log::warn!("reading the netns cookie of {netns}: {e}"))
            .ok()
    }
    fn ifindex(&self, interface: &str) -> Option<u32> {
        crate::kernel::netdev::ifindex(interface)
    }
    fn addresses(&self) -> Vec<(String, Ipv4Addr)> {
        crate::kernel::netdev::ipv4_addresses()
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
    fn entries<M: Reconciled>(&self) -> Result<BTreeMap<M::Key, M::Value>, DatapathError> {
        Datapath::entries::<M>(self)
    }
    fn set<M: Reconciled>(&mut self, key: M::Key, value: M::Value) -> Result<(), DatapathError> {
        Datapath::set::<M>(self, key, value)
    }
    fn remove<M: Reconciled>(&mut self, key: M::Key) -> Result<(), DatapathError> {
        Datapath::remove::<M>(self, key)
    }
    fn config(&self) -> Result<Config, DatapathError> {
        Datapath::config(self)
    }
    fn set_config(&mut self, config: Config) -> Result<(), DatapathError> {
        Datapath::set_config(self, config)
    }
    fn policy_prefixes(&self) -> Result<BTreeMap<(u32, u8, u32), u32>, DatapathError> {
        Datapath::policy_prefixes(self)
    }
    fn set_policy_prefix(
        &mut self,
        prefix: (u32, u8, u32),
        class: Option<u32>,
    ) -> Result<(), DatapathError> {
        Datapath::set_policy_prefix(self, prefix, class)
    }
    fn policy_meta(&self) -> Result<PolicyMeta, DatapathError> {
        Datapath::policy_meta(self)
    }
    fn set_policy_meta(&mut self, meta: PolicyMeta) -> Result<(), DatapathError> {
        Datapath::set_policy_meta(self, meta)
    }
    fn deny_sources(&self) -> Result<BTreeSet<PrefixKey>, DatapathError> {
        Datapath::deny_sources(self)
    }
    fn set_deny_source(&mut self, prefix: PrefixKey, deny: bool) -> Result<(), DatapathError> {
        Datapath::set_deny_source(self, prefix, deny)
    }
    fn max_services(&self) -> u32 {
        Datapath::max_services(self)
    }
    fn maglev_size(&self) -> u32 {
        Datapath::maglev_size(self)
    }
    fn maglev(&self, id: u32) -> Vec<u32> {
        Datapath::maglev(self, id)
    }
    fn set_maglev(&mut self, id: u32, table: &[u32]) -> Result<(), DatapathError> {
        Datapath::set_maglev(self, id, table)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("no uplink: give `uplink:` in the state file or --uplink (no default route either)")]
    NoUplink,
    #[error(
        "{wanted} services do not fit the maps' {max}; start the agent with a larger \
         --max-services (on a new pin directory)"
    )]
    TooManyServices { wanted: usize, max: u32 },
    #[error(transparent)]
    Capacity(#[from] capacity::CapacityError),
    #[error(transparent)]
    Kernel(#[from] DatapathError),
    #[error(transparent)]
    Policy(#[from] crate::reconcile::policy::PolicyError),
}

/// Owns the loaded datapath: every write to its maps and links goes through here. Everyone
/// else reads it through [`Reconciler::datapath`].
pub struct Reconciler {
    datapath: Datapath,
    /// The last model applied in full, and the host settings it was applied with.
    last_good: Option<(Model, HostSettings)>,
}

/// What applying a model did.
#[derive(Debug)]
pub struct Applied {
    pub changes: Changes,
    /// Addresses (network byte order) of container interfaces the previous model had and this
    /// one does not: their translated connections are to be forgotten.
    pub departed: BTreeSet<u32>,
    /// Host TCP ports this apply published or led elsewhere: connections that reached the
    /// host on them before (dockerd's placeholder socket) are to be reset.
    pub published_tcp: BTreeSet<u16>,
}

impl Reconciler {
    pub fn new(datapath: Datapath) -> Reconciler {
        Reconciler {
            datapath,
            last_good: None,
        }
    }

    pub fn datapath(&self) -> &Datapath {
        &self.datapath
    }

    /// The last model applied in full.
    pub fn applied(&self) -> Option<&Model> {
        self.last_good.as_ref().map(|(model, _)| model)
    }

    /// The host settings of the last model applied in full.
    pub fn host(&self) -> Option<&HostSettings> {
        self.last_good.as_ref().map(|(_, host)| host)
    }

    /// Applies `model`; on failure re-applies the last good state, so nothing is left half
    /// done, and returns the error.
    pub fn apply(&mut self, model: Model, host: HostSettings) -> Result<Applied, ReconcileError> {
        match self.reconcile(&model, &host) {
            Ok(changes) => {
                let departed = self
                    .applied()
                    .map(|old| departed_addresses(old, &model))
                    .unwrap_or_default();
                let published_tcp = newly_published_tcp(self.applied(), &model);
                self.last_good = Some((model, host));
                Ok(Applied {
                    changes,
                    departed,
                    published_tcp,
                })
            }
            Err(err) => {
                // (A repair of the state in force that failed has nothing better to go back to.)
                if let Some((good, good_host)) = self.last_good.take() {
                    if good != model
                        && let Err(e) = self.reconcile(&good, &good_host)
                    {
                        log::warn!("re-applying the last good state: {e}");
                    }
                    self.last_good = Some((good, good_host));
                }
                Err(err)
            }
        }
    }

    fn reconcile(&mut self, model: &Model, host: &HostSettings) -> Result<Changes, ReconcileError> {
        // Interfaces that went away (a container stopped) took their links with them.
        for gone in self.datapath.prune_vanished() {
            log::info!("{gone}: the interface is gone, and its attachment with it");
        }
        let desired = desired(model, host, &self.datapath)?;
        // Refused whole before any write, rather than failing half-way.
        capacity::check(&desired, self.datapath.capacity::<Ports>()?)?;
        apply(&desired, &mut self.datapath)
    }

    /// Detaches every program (on shutdown); the maps stay pinned.
    pub fn detach_all(&mut self) {
        self.datapath.detach_all();
    }
}

/// Addresses (network byte order, as in the maps) of container interfaces in `old` that
/// `new` no longer has.
fn departed_addresses(old: &Model, new: &Model) -> BTreeSet<u32> {
    let addresses = |m: &Model| -> BTreeSet<u32> {
        m.endpoints
            .iter()
            .flat_map(|e| e.interfaces.iter().filter_map(|i| i.ip.map(be)))
            .collect()
    };
    addresses(old)
        .difference(&addresses(new))
        .copied()
        .collect()
}

/// Host TCP ports of `new` that `old` did not publish to the same target.
fn newly_published_tcp(old: Option<&Model>, new: &Model) -> BTreeSet<u16> {
    // A drift repair (every few seconds) re-applies the model in force: nothing is new, and
    // expanding every range into sets is not worth doing.
    if old == Some(new) {
        return BTreeSet::new();
    }
    let bindings = |m: &Model| -> BTreeSet<(u16, ModelPortTarget)> {
        m.ports
            .iter()
            .filter(|p| p.protocol == Protocol::Tcp)
            .flat_map(|p| {
                (p.host_ports.first..=p.host_ports.last).map(|port| (port, p.target.clone()))
            })
            .collect()
    };
    let before = old.map(bindings).unwrap_or_default();
    bindings(new)
        .difference(&before)
        .map(|(port, _)| *port)
        .collect()
}

/// What one reconcile changed.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Changes {
    pub attached: Vec<String>,
    pub detached: Vec<String>,
    /// Map entries written (new or changed) and removed, over all maps.
    pub entries_set: usize,
    pub entries_removed: usize,
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
    /// Keyed by container address (network byte order).
    pub endpoints: BTreeMap<u32, EndpointInfo>,
    pub ports: BTreeMap<PortKey, PortTarget>,
    /// The host's own addresses (network byte order).
    pub local_addrs: BTreeMap<u32, u8>,
    pub config: Config,
    pub services: BTreeMap<ServiceKey, DesiredService>,
    /// The compiled policy (keys of half 0: `apply` writes them into the half not live).
    pub policy: crate::reconcile::policy::Tables,
    pub deny_sources: BTreeSet<PrefixKey>,
    /// Containers' network namespaces by netns cookie, for the socket hooks.
    pub sock_netns: BTreeMap<u64, SockNetns>,
}

/// A service as the kernel should have it, before it gets an id.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DesiredService {
    pub algorithm: u8,
    /// In index order.
    pub backends: Vec<Backend>,
    /// The Maglev table (backend indexes), for maglev and source_hash; empty otherwise.
    pub table: Vec<u32>,
}

/// Where the agent is: its uplink, the cgroup of the host processes whose connections to
/// published ports it translates (None: not translated), and its network namespace.
#[derive(Debug, Clone, Default)]
pub struct HostSettings {
    pub uplink: String,
    pub cgroup: Option<String>,
    /// The cgroup (Docker's cgroup parent) whose containers' connections to VIPs the socket
    /// hooks translate; None when off, or when it lies under `cgroup` (whose hooks already
    /// run for it: attached twice, every connect() would run them twice).
    pub container_cgroup: Option<String>,
    pub netns_cookie: u64,
    /// Whether the uplink gets the XDP program: always (Some(true)), never (Some(false)), or
    /// while it has work, the deny list (None). See `XdpMode` in agent.rs.
    pub xdp: Option<bool>,
}

/// Computes the desired kernel state, checking that every interface the model names exists
/// (the error names the entry and field that refers to the missing one).
pub fn desired(
    model: &Model,
    host: &HostSettings,
    kernel: &impl Kernel,
) -> Result<Desired, ReconcileError> {
    let uplink = host.uplink.as_str();
    if kernel.ifindex(uplink).is_none() {
        return Err(missing_interface("state".into(), "uplink".into(), uplink).into());
    }
    for network in &model.networks {
        if kernel.ifindex(&network.bridge).is_none() {
            return Err(missing_interface(
                format!("networks[{}]", network.name),
                "bridge".into(),
                &network.bridge,
            )
            .into());
        }
    }
    let policy = crate::reconcile::policy::compile(model)?;
    let mut desired = Desired::default();
    for hook in [Hook::UplinkIngress, Hook::UplinkEgress] {
        desired.attachments.insert((uplink.to_owned(), hook));
    }
    let has_deny_list = !policy.deny_sources.is_empty();
    let xdp_attached = host.xdp.unwrap_or(has_deny_list);
    if xdp_attached {
        desired
            .attachments
            .insert((uplink.to_owned(), Hook::UplinkXdp));
    }
    for cgroup in [&host.cgroup, &host.container_cgroup].into_iter().flatten() {
        for hook in Hook::CGROUP {
            desired.attachments.insert((cgroup.clone(), hook));
        }
    }
    add_endpoints(&mut desired, model, &policy, kernel)?;
    for service in &model.services {
        let Some(vip) = service.vip else { continue };
        desired.services.insert(
            ServiceKey {
                vip: be(vip),
                port: service.port.to_be(),
                proto: service.protocol.number(),
                _pad: 0,
            },
            desired_service(model, service, kernel.maglev_size()),
        );
    }
    for (i, port) in model.ports.iter().enumerate() {
        add_port(&mut desired, model, i, port)?;
    }
    let addresses = kernel.addresses();
    for (_, addr) in &addresses {
        desired.local_addrs.insert(be(*addr), 1);
    }
    desired.config = Config {
        // Masquerade to the uplink's first address; none yet means no masquerade yet.
        masquerade_addr: addresses
            .iter()
            .find(|(interface, _)| interface == uplink)
            .map(|(_, addr)| be(*addr))
            .unwrap_or(0),
        uplink_ifindex: kernel.ifindex(uplink).unwrap_or(0),
        snat_port_min: SNAT_PORTS.0,
        snat_port_max: SNAT_PORTS.1,
        // Set in apply(), which knows whether anything the policy depends on changed.
        policy_generation: 0,
        netns_cookie: host.netns_cookie,
        rule_count: policy.rules.len() as u32,
        // Without XDP the deny list is enforced at tc ingress of the uplink instead.
        deny_at_tc: u32::from(has_deny_list && !xdp_attached),
    };
    desired.policy = policy.tables;
    desired.deny_sources = policy.deny_sources.into_iter().collect();
    Ok(desired)
}

fn missing_interface(entry: String, field: String, name: &str) -> StateError {
    StateError::Invalid {
        entry,
        field,
        message: format!("interface {name:?} does not exist on this host"),
    }
}

/// Every container interface: its endpoint entry (where packets for its address go, and who it
/// is for policy) and the program on its host-side veth.
fn add_endpoints(
    desired: &mut Desired,
    model: &Model,
    policy: &crate::reconcile::policy::Compiled,
    kernel: &impl Kernel,
) -> Result<(), ReconcileError> {
    for (endpoint_index, endpoint) in model.endpoints.iter().enumerate() {
        let label_class = policy.endpoint_classes[endpoint_index];
        for (j, itf) in endpoint.interfaces.iter().enumerate() {
            let ifindex = kernel.ifindex(&itf.host_veth).ok_or_else(|| {
                missing_interface(
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
            let network = &model.networks[network_id as usize - 1];
            let mut flags = 0;
            if network.internal {
                flags |= net_flags::INTERNAL;
            }
            if !network.icc {
                flags |= net_flags::NO_ICC;
            }
            flags |= match network.gateway_mode {
                GatewayMode::Nat => 0,
                GatewayMode::NatUnprotected => net_flags::UNPROTECTED,
                GatewayMode::Routed => net_flags::ROUTED,
                // Docker's `isolated` is `internal` with the gateway address kept.
                GatewayMode::Isolated => net_flags::INTERNAL,
            };
            desired
                .attachments
                .insert((itf.host_veth.clone(), Hook::ContainerIngress));
            let (Some(ip), Some(gateway)) = (itf.ip, network.gateway) else {
                continue; // an IPv6-only network
            };
            desired.endpoints.insert(
                be(ip),
                EndpointInfo {
                    label_class,
                    _pad_class: 0,
                    ifindex,
                    network_id,
                    endpoint_id: endpoint_index as u32 + 1,
                    mac: itf.mac,
                    net_flags: flags,
                    _pad: 0,
                    gateway: be(gateway),
                },
            );
        }
        // Its sockets, for the cgroup hooks: they leave from its first interface's address
        // unless bound (the one Docker's default route of the container goes out of).
        if let (Some(netns), Some(first)) = (
            &endpoint.netns,
            endpoint.interfaces.first().and_then(|i| i.ip),
        ) && let Some(cookie) = kernel.netns_cookie(netns)
        {
            desired.sock_netns.insert(
                cookie,
                SockNetns {
                    addr: be(first),
                    _pad: 0,
                },
            );
        }
    }
    Ok(())
}

/// The entries of published port `ports[i]`: one per host port of its range, leading to the
/// container (on its first network, as Docker publishes) or to a service's VIP.
fn add_port(
    desired: &mut Desired,
    model: &Model,
    i: usize,
    port: &crate::model::PublishedPort,
) -> Result<(), ReconcileError> {
    let host_ip = match port.host_ip {
        None => None,
        Some(IpAddr::V4(ip)) => Some(ip),
        Some(IpAddr::V6(_)) => return Ok(()),
    };
    let key = |host_port: u16| PortKey {
        addr: host_ip.map(be).unwrap_or(0),
        port: host_port.to_be(),
        proto: port.protocol.number(),
        _pad: 0,
    };
    let name = match &port.target {
        ModelPortTarget::Endpoint(name) => name,
        ModelPortTarget::Service(name) => {
            let service = model
                .services
                .iter()
                .find(|s| &s.name == name)
                .expect("validated: the port's service exists");
            if port.host_ports.len() != 1 || service.protocol != port.protocol {
                return Err(StateError::Invalid {
                    entry: format!("ports[{i}]"),
                    field: "service".into(),
                    message: format!(
                        "a port leading to a service is one {} port (the service's protocol)",
                        service.protocol
                    ),
                }
                .into());
            }
            let Some(vip) = service.vip else {
                return Ok(());
            };
            desired.ports.insert(
                key(port.host_ports.first),
                PortTarget {
                    addr: be(vip),
                    port: service.port.to_be(),
                    is_service: 1,
                    _pad: 0,
                },
            );
            return Ok(());
        }
    };
    let endpoint = model
        .endpoints
        .iter()
        .find(|e| &e.name == name)
        .expect("validated: the port's endpoint exists");
    let Some(itf) = endpoint.interfaces.first() else {
        return Err(StateError::Invalid {
            entry: format!("ports[{i}]"),
            field: "endpoint".into(),
            message: format!("endpoint {name} has no interface to publish to"),
        }
        .into());
    };
    let Some(ip) = itf.ip else {
        return Ok(());
    };
    let routed = model
        .network(&itf.network)
        .is_some_and(|n| n.gateway_mode == GatewayMode::Routed);
    for offset in 0..port.host_ports.len() {
        let container_port = port.container_ports.first + offset as u16;
        // In routed mode Docker opens the container's own port and leaves the host port
        // unused: the entry is keyed by the container's address, so a packet routed to it
        // is published to itself (tracked like any published connection, not translated).
        let port_key = if routed {
            PortKey {
                addr: be(ip),
                port: container_port.to_be(),
                proto: port.protocol.number(),
                _pad: 0,
            }
        } else {
            key(port.host_ports.first + offset as u16)
        };
        desired.ports.insert(
            port_key,
            PortTarget {
                addr: be(ip),
                port: container_port.to_be(),
                is_service: 0,
                _pad: 0,
            },
        );
    }
    Ok(())
}

/// The kernel's view of `service`: backends at their endpoint's first address and the
/// target port, and the Maglev table over their names (so it does not depend on addresses or
/// order).
fn desired_service(
    model: &Model,
    service: &crate::model::Service,
    maglev_size: u32,
) -> DesiredService {
    let mut backends = Vec::new();
    let mut members = Vec::new();
    for (name, weight) in service.backends.iter().zip(&service.weights) {
        let Some(itf) = model
            .endpoints
            .iter()
            .find(|e| &e.name == name)
            .and_then(|e| e.interfaces.first())
        else {
            continue; // an endpoint without interfaces serves nothing
        };
        backends.push(Backend {
            // A backend with no IPv4 address (IPv6-only) keeps its index in the table; the
            // kernel finds no address there (SERVICE_BACKEND_NOT_FOUND).
            addr: itf.ip.map(be).unwrap_or(0),
            port: service.target_port.to_be(),
            _pad: [0; 2],
        });
        members.push(maglev::Member {
            identity: name.clone(),
            weight: *weight,
        });
    }
    let algorithm = match service.algorithm {
        Algorithm::Maglev => algorithm::MAGLEV,
        Algorithm::Random => algorithm::RANDOM,
        Algorithm::RoundRobin => algorithm::ROUND_ROBIN,
        Algorithm::SourceHash => algorithm::SOURCE_HASH,
    };
    let table = match service.algorithm {
        Algorithm::Maglev | Algorithm::SourceHash => maglev::table(&members, maglev_size),
        Algorithm::Random | Algorithm::RoundRobin => Vec::new(),
    };
    DesiredService {
        algorithm,
        backends,
        table,
    }
}

/// Brings the services to `desired`: a service keeps its id (and so its table and its
/// connections' backends) while it exists; a new one gets the lowest free id. Per service the
/// order is backends, then table, then the backend count, then stale backends, so a lookup in
/// between always lands on a valid backend.
fn apply_services(
    desired: &Desired,
    kernel: &mut impl Kernel,
) -> Result<(usize, usize), ReconcileError> {
    let current = kernel.entries::<Services>()?;
    let backends = kernel.entries::<Backends>()?;
    let max = kernel.max_services();
    if desired.services.len() > max as usize {
        return Err(ReconcileError::TooManyServices {
            wanted: desired.services.len(),
            max,
        });
    }
    let mut used: BTreeSet<u32> = desired
        .services
        .keys()
        .filter_map(|k| current.get(k).map(|info| info.id))
        .collect();
    let mut next_free = 1;
    let (mut set, mut removed) = (0, 0);
    for (key, service) in &desired.services {
        let id = match current.get(key) {
            Some(info) => info.id,
            None => {
                while used.contains(&next_free) {
                    next_free += 1;
                }
                used.insert(next_free);
                next_free
            }
        };
        for (index, backend) in service.backends.iter().enumerate() {
            let bkey = BackendKey {
                service_id: id,
                index: index as u32,
            };
            if backends.get(&bkey) != Some(backend) {
                kernel.set::<Backends>(bkey, *backend)?;
                set += 1;
            }
        }
        if !service.table.is_empty() && kernel.maglev(id) != service.table {
            kernel.set_maglev(id, &service.table)?;
            set += 1;
        }
        let info = ServiceInfo {
            id,
            backend_count: service.backends.len() as u32,
            algorithm: service.algorithm,
            _pad: [0; 3],
        };
        if current.get(key) != Some(&info) {
            kernel.set::<Services>(*key, info)?;
            set += 1;
        }
    }
    // Services that went, and backends past each service's count.
    for key in current.keys() {
        if !desired.services.contains_key(key) {
            kernel.remove::<Services>(*key)?;
            removed += 1;
        }
    }
    let counts: BTreeMap<u32, u32> = kernel
        .entries::<Services>()?
        .values()
        .map(|info| (info.id, info.backend_count))
        .collect();
    for bkey in backends.keys() {
        if counts
            .get(&bkey.service_id)
            .is_none_or(|count| bkey.index >= *count)
        {
            kernel.remove::<Backends>(*bkey)?;
            removed += 1;
        }
    }
    Ok((set, removed))
}

/// Brings the policy maps to `desired` without a moment of mixed rules: when the live half
/// differs, the new tables are written into the other half (whatever an interrupted apply
/// left there is corrected on the way), one write of the meta entry makes them live, and the
/// old half is emptied. Returns (entries written, entries removed, switched).
pub(crate) fn apply_policy(
    desired: &crate::reconcile::policy::Tables,
    kernel: &mut impl Kernel,
) -> Result<(usize, usize, bool), ReconcileError> {
    let meta = kernel.policy_meta()?;
    let live = meta.slot & 1;
    let entries = kernel.entries::<Policy>()?;
    let prefixes = kernel.policy_prefixes()?;
    let in_half = |slot: u32| -> (BTreeMap<PolicyKey, _>, BTreeMap<(u8, u32), u32>) {
        (
            entries
                .iter()
                .filter(|(k, _)| u32::from(k.slot) == slot)
                .map(|(k, v)| (PolicyKey { slot: 0, ..*k }, *v))
                .collect(),
            prefixes
                .iter()
                .filter(|((s, _, _), _)| *s == slot)
                .map(|((_, len, addr), class)| ((*len, *addr), *class))
                .collect(),
        )
    };
    let (live_entries, live_prefixes) = in_half(live);
    let (mut set, mut removed) = (0, 0);
    let switched = live_entries != desired.entries
        || live_prefixes != desired.prefixes
        || meta != desired.meta(live);
    // The half the next tables go to: the other one, or (nothing to switch) the live one, in
    // which case only leftovers of the other half are removed below.
    let (target, stale) = if switched {
        (1 - live, live)
    } else {
        (live, 1 - live)
    };
    if switched {
        let (old_entries, old_prefixes) = in_half(target);
        let slot = target as u8;
        for (key, verdict) in &desired.entries {
            if old_entries.get(key) != Some(verdict) {
                kernel.set::<Policy>(PolicyKey { slot, ..*key }, *verdict)?;
                set += 1;
            }
        }
        for key in old_entries.keys() {
            if !desired.entries.contains_key(key) {
                kernel.remove::<Policy>(PolicyKey { slot, ..*key })?;
                removed += 1;
            }
        }
        for (&(len, addr), &class) in &desired.prefixes {
            if old_prefixes.get(&(len, addr)) != Some(&class) {
                kernel.set_policy_prefix((target, len, addr), Some(class))?;
                set += 1;
            }
        }
        for &(len, addr) in old_prefixes.keys() {
            if !desired.prefixes.contains_key(&(len, addr)) {
                kernel.set_policy_prefix((target, len, addr), None)?;
                removed += 1;
            }
        }
        kernel.set_policy_meta(desired.meta(target))?;
        set += 1;
    }
    for key in entries.keys().filter(|k| u32::from(k.slot) == stale) {
        kernel.remove::<Policy>(*key)?;
        removed += 1;
    }
    for &(slot, len, addr) in prefixes.keys().filter(|(s, _, _)| *s == stale) {
        kernel.set_policy_prefix((slot, len, addr), None)?;
        removed += 1;
    }
    Ok((set, removed, switched))
}

/// An address as the kernel keeps it: the bytes in network order, read as a native u32.
pub fn be(addr: Ipv4Addr) -> u32 {
    u32::from(addr).to_be()
}

/// Writes the entries of `desired` that `current` lacks or has different; returns how many.
fn write_missing<M: Reconciled>(
    kernel: &mut impl Kernel,
    current: &BTreeMap<M::Key, M::Value>,
    desired: &BTreeMap<M::Key, M::Value>,
) -> Result<usize, DatapathError>
where
    M::Value: PartialEq,
{
    let mut written = 0;
    for (key, value) in desired {
        if current.get(key) != Some(value) {
            kernel.set::<M>(*key, *value)?;
            written += 1;
        }
    }
    Ok(written)
}

/// Removes the entries of `current` that `desired` lacks; returns how many.
fn remove_stale<M: Reconciled>(
    kernel: &mut impl Kernel,
    current: &BTreeMap<M::Key, M::Value>,
    desired: &BTreeMap<M::Key, M::Value>,
) -> Result<usize, DatapathError> {
    let mut removed = 0;
    for key in current.keys() {
        if !desired.contains_key(key) {
            kernel.remove::<M>(*key)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Brings the kernel to `desired`. Map entries are written before programs are attached, and
/// programs leave an interface before stale entries go, so a program never runs against a
/// half-written state. A removed published port stops matching new connections at once;
/// connections already tracked keep their translation until they end.
pub fn apply(desired: &Desired, kernel: &mut impl Kernel) -> Result<Changes, ReconcileError> {
    let mut changes = Changes::default();
    let endpoints = kernel.entries::<Endpoints>()?;
    let ports = kernel.entries::<Ports>()?;
    let local_addrs = kernel.entries::<LocalAddrs>()?;
    let sock_netns = kernel.entries::<SockNetnsMap>()?;
    let endpoints_written = write_missing::<Endpoints>(kernel, &endpoints, &desired.endpoints)?;
    changes.entries_set += endpoints_written;
    // The policy before the config; a changed policy or changed endpoints bump the policy
    // generation so tracked connections are judged again.
    let current_config = kernel.config()?;
    let (policy_set, policy_removed, policy_switched) = apply_policy(&desired.policy, kernel)?;
    changes.entries_set += policy_set;
    changes.entries_removed += policy_removed;
    let current_deny = kernel.deny_sources()?;
    for prefix in desired.deny_sources.difference(&current_deny) {
        kernel.set_deny_source(*prefix, true)?;
        changes.entries_set += 1;
    }
    let endpoints_removed = endpoints
        .keys()
        .filter(|k| !desired.endpoints.contains_key(k))
        .count();
    let policy_changed = endpoints_written > 0 || endpoints_removed > 0 || policy_switched;
    changes.entries_set += write_missing::<LocalAddrs>(kernel, &local_addrs, &desired.local_addrs)?;
    // Services before the ports that may lead to them.
    let (services_set, services_removed) = apply_services(desired, kernel)?;
    changes.entries_set += services_set;
    changes.entries_set += write_missing::<Ports>(kernel, &ports, &desired.ports)?;
    // After the services and endpoints they lead to; before the attachments that use them.
    changes.entries_set += write_missing::<SockNetnsMap>(kernel, &sock_netns, &desired.sock_netns)?;
    let config = Config {
        policy_generation: current_config.policy_generation + u32::from(policy_changed),
        ..desired.config
    };
    if current_config != config {
        kernel.set_config(config)?;
        changes.entries_set += 1;
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
    changes.entries_removed += remove_stale::<Ports>(kernel, &ports, &desired.ports)?;
    changes.entries_removed +=
        remove_stale::<LocalAddrs>(kernel, &local_addrs, &desired.local_addrs)?;
    changes.entries_removed +=
        remove_stale::<SockNetnsMap>(kernel, &sock_netns, &desired.sock_netns)?;
    changes.entries_removed += remove_stale::<Endpoints>(kernel, &endpoints, &desired.endpoints)?;
    changes.entries_removed += services_removed;
    for prefix in current_deny.difference(&desired.deny_sources) {
        kernel.set_deny_source(*prefix, false)?;
        changes.entries_removed += 1;
    }
    Ok(changes)
}

#[cfg(test)]
pub mod fake {
    //! An in-memory kernel for reconciler tests: maps as bytes, like the kernel keeps them.
    use super::*;
    use dataplane_common::MAGLEV_DEFAULT_SIZE;

    use aya::Pod;

    fn bytes<T: Pod>(value: &T) -> Vec<u8> {
        // SAFETY: Pod types are plain bytes with no padding left uninitialised.
        unsafe {
            std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()).to_vec()
        }
    }

    fn from_bytes<T: Pod>(bytes: &[u8]) -> T {
        assert_eq!(bytes.len(), size_of::<T>());
        // SAFETY: any bit pattern is a valid Pod value; the length matches.
        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
    }

    #[derive(Default)]
    pub struct FakeKernel {
        pub interfaces: BTreeMap<String, u32>,
        pub addresses: Vec<(String, Ipv4Addr)>,
        pub attached: BTreeSet<(String, Hook)>,
        pub maps: BTreeMap<&'static str, BTreeMap<Vec<u8>, Vec<u8>>>,
        pub config: Config,
        pub maglev: BTreeMap<u32, Vec<u32>>,
        pub prefixes: BTreeMap<(u32, u8, u32), u32>,
        pub meta: Option<PolicyMeta>,
        pub deny: BTreeSet<PrefixKey>,
        pub writes: usize,
    }

    impl FakeKernel {
        pub fn map<M: Reconciled>(&self) -> BTreeMap<M::Key, M::Value> {
            self.entries::<M>().unwrap()
        }
    }

    impl Kernel for FakeKernel {
        fn netns_cookie(&self, netns: &str) -> Option<u64> {
            // A cookie per path, as the kernel gives one per namespace.
            (!netns.contains("gone")).then(|| netns.bytes().map(u64::from).sum())
        }
        fn ifindex(&self, interface: &str) -> Option<u32> {
            self.interfaces.get(interface).copied()
        }
        fn addresses(&self) -> Vec<(String, Ipv4Addr)> {
            self.addresses.clone()
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
        fn entries<M: Reconciled>(&self) -> Result<BTreeMap<M::Key, M::Value>, DatapathError> {
            Ok(self
                .maps
                .get(M::NAME)
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (from_bytes(k), from_bytes(v)))
                        .collect()
                })
                .unwrap_or_default())
        }
        fn set<M: Reconciled>(
            &mut self,
            key: M::Key,
            value: M::Value,
        ) -> Result<(), DatapathError> {
            self.writes += 1;
            self.maps
                .entry(M::NAME)
                .or_default()
                .insert(bytes(&key), bytes(&value));
            Ok(())
        }
        fn remove<M: Reconciled>(&mut self, key: M::Key) -> Result<(), DatapathError> {
            self.writes += 1;
            self.maps.entry(M::NAME).or_default().remove(&bytes(&key));
            Ok(())
        }
        fn config(&self) -> Result<Config, DatapathError> {
            Ok(self.config)
        }
        fn set_config(&mut self, config: Config) -> Result<(), DatapathError> {
            self.writes += 1;
            self.config = config;
            Ok(())
        }
        fn policy_prefixes(&self) -> Result<BTreeMap<(u32, u8, u32), u32>, DatapathError> {
            Ok(self.prefixes.clone())
        }
        fn set_policy_prefix(
            &mut self,
            prefix: (u32, u8, u32),
            class: Option<u32>,
        ) -> Result<(), DatapathError> {
            self.writes += 1;
            match class {
                Some(class) => self.prefixes.insert(prefix, class),
                None => self.prefixes.remove(&prefix),
            };
            Ok(())
        }
        fn policy_meta(&self) -> Result<PolicyMeta, DatapathError> {
            Ok(self.meta.unwrap_or_default())
        }
        fn set_policy_meta(&mut self, meta: PolicyMeta) -> Result<(), DatapathError> {
            self.writes += 1;
            self.meta = Some(meta);
            Ok(())
        }
        fn deny_sources(&self) -> Result<BTreeSet<PrefixKey>, DatapathError> {
            Ok(self.deny.clone())
        }
        fn set_deny_source(&mut self, prefix: PrefixKey, deny: bool) -> Result<(), DatapathError> {
            self.writes += 1;
            if deny {
                self.deny.insert(prefix);
            } else {
                self.deny.remove(&prefix);
            }
            Ok(())
        }
        fn max_services(&self) -> u32 {
            16
        }
        fn maglev_size(&self) -> u32 {
            MAGLEV_DEFAULT_SIZE
        }
        fn maglev(&self, id: u32) -> Vec<u32> {
            self.maglev
                .get(&id)
                .cloned()
                .unwrap_or_else(|| vec![0; MAGLEV_DEFAULT_SIZE as usize])
        }
        fn set_maglev(&mut self, id: u32, table: &[u32]) -> Result<(), DatapathError> {
            self.writes += 1;
            self.maglev.insert(id, table.to_vec());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{fake::FakeKernel, *};
    use crate::model::StateFile;
    use dataplane_common::MAGLEV_DEFAULT_SIZE;

    const STATE: &str = r#"
networks:
  - {name: a, bridge: br-a, subnet: 10.1.0.0/24, gateway: 10.1.0.1}
endpoints:
  - name: one
    interfaces: [{network: a, ip: 10.1.0.2, mac: "02:00:00:00:00:02", host_veth: veth-one}]
  - name: two
    interfaces: [{network: a, ip: 10.1.0.3, mac: "02:00:00:00:00:03", host_veth: veth-two}]
"#;

    const PORTS: &str = r#"
ports:
  - {endpoint: one, protocol: tcp, host_port: 8080, container_port: 80}
  - {endpoint: two, protocol: udp, host_ip: 192.0.2.1, host_port: "9000-9002", container_port: "7000-7002"}
"#;

    fn model(text: &str) -> Model {
        Model::from_spec(&StateFile::parse(text).unwrap()).unwrap()
    }

    fn kernel() -> FakeKernel {
        let mut k = FakeKernel::default();
        for (i, name) in ["eth0", "br-a", "veth-one", "veth-two"].iter().enumerate() {
            k.interfaces.insert(name.to_string(), i as u32 + 10);
        }
        k.addresses = vec![
            ("lo".into(), Ipv4Addr::LOCALHOST),
            ("eth0".into(), "192.0.2.1".parse().unwrap()),
            ("br-a".into(), "10.1.0.1".parse().unwrap()),
        ];
        k
    }

    fn reconcile(model: &Model, kernel: &mut FakeKernel) -> Result<Changes, ReconcileError> {
        let host = HostSettings {
            uplink: "eth0".into(),
            cgroup: None,
            container_cgroup: None,
            netns_cookie: 7,
            // Auto: XDP only while the deny list has entries.
            xdp: None,
        };
        let desired = desired(model, &host, kernel)?;
        apply(&desired, kernel)
    }

    fn ip(text: &str) -> u32 {
        be(text.parse().unwrap())
    }

    #[test]
    fn first_apply_attaches_everything_and_writes_the_maps() {
        let mut k = kernel();
        let changes = reconcile(&model(STATE), &mut k).unwrap();
        // 2 uplink tc hooks (no XDP: nothing for it to do) + 2 veths.
        assert_eq!(changes.attached.len(), 4, "{changes:?}");
        let endpoints = k.map::<Endpoints>();
        assert_eq!(endpoints.len(), 2);
        let info = endpoints[&ip("10.1.0.3")];
        assert_eq!((info.ifindex, info.network_id), (13, 1));
        assert_eq!(info.mac, [2, 0, 0, 0, 0, 3]);
        assert_eq!(k.map::<LocalAddrs>().len(), 3);
        assert_eq!(k.config.masquerade_addr, ip("192.0.2.1"));
        assert_eq!(k.config.uplink_ifindex, 10);
        assert_eq!(k.config.netns_cookie, 7);
        assert_eq!((k.config.snat_port_min, k.config.snat_port_max), SNAT_PORTS);
    }

    #[test]
    fn published_ports_expand_ranges_in_network_byte_order() {
        let mut k = kernel();
        reconcile(&model(&format!("{STATE}{PORTS}")), &mut k).unwrap();
        let ports = k.map::<Ports>();
        assert_eq!(ports.len(), 4);
        let tcp = ports[&PortKey {
            addr: 0,
            port: 8080u16.to_be(),
            proto: 6,
            _pad: 0,
        }];
        assert_eq!((tcp.addr, tcp.port), (ip("10.1.0.2"), 80u16.to_be()));
        let udp = ports[&PortKey {
            addr: ip("192.0.2.1"),
            port: 9001u16.to_be(),
            proto: 17,
            _pad: 0,
        }];
        assert_eq!((udp.addr, udp.port), (ip("10.1.0.3"), 7001u16.to_be()));
        // Removing the TCP port removes just its entry.
        let fewer = format!(
            "{STATE}{}",
            PORTS.replace(
                "  - {endpoint: one, protocol: tcp, host_port: 8080, container_port: 80}\n",
                ""
            )
        );
        let changes = reconcile(&model(&fewer), &mut k).unwrap();
        assert_eq!(changes.entries_removed, 1, "{changes:?}");
        assert_eq!(k.map::<Ports>().len(), 3);
    }

    const SERVICES: &str = r#"
services:
  - {name: web, vip: 10.96.0.10, port: 80, target_port: 8080, endpoints: [one, two]}
  - {name: dns, vip: 10.96.0.53, port: 53, protocol: udp, endpoints: [two], algorithm: round_robin}
"#;

    fn services(k: &FakeKernel) -> BTreeMap<ServiceKey, ServiceInfo> {
        k.map::<Services>()
    }

    #[test]
    fn services_get_stable_ids_backends_and_tables() {
        let mut k = kernel();
        reconcile(&model(&format!("{STATE}{SERVICES}")), &mut k).unwrap();
        let svcs = services(&k);
        let web_key = ServiceKey {
            vip: ip("10.96.0.10"),
            port: 80u16.to_be(),
            proto: 6,
            _pad: 0,
        };
        let web = svcs[&web_key];
        assert_eq!((web.backend_count, web.algorithm), (2, algorithm::MAGLEV));
        let backends = k.map::<Backends>();
        assert_eq!(backends.len(), 3);
        let first = backends[&BackendKey {
            service_id: web.id,
            index: 0,
        }];
        assert_eq!((first.addr, first.port), (ip("10.1.0.2"), 8080u16.to_be()));
        let table = &k.maglev[&web.id];
        assert_eq!(table.len(), MAGLEV_DEFAULT_SIZE as usize);
        assert!(table.iter().all(|i| *i < 2));
        let dns_id = svcs
            .values()
            .find(|i| i.algorithm == algorithm::ROUND_ROBIN)
            .unwrap()
            .id;
        assert!(
            !k.maglev.contains_key(&dns_id),
            "round robin needs no table"
        );

        // A backend goes: same id, count and table follow, its entry is removed; the other
        // service is not touched.
        let writes = k.writes;
        let fewer = SERVICES.replace("endpoints: [one, two]}", "endpoints: [one]}");
        let changes = reconcile(&model(&format!("{STATE}{fewer}")), &mut k).unwrap();
        let web_after = services(&k)[&web_key];
        assert_eq!((web_after.id, web_after.backend_count), (web.id, 1));
        assert!(k.maglev[&web.id].iter().all(|i| *i == 0));
        assert_eq!(k.map::<Backends>().len(), 2);
        assert_eq!(changes.entries_removed, 1, "{changes:?}");
        // "one" keeps index 0: the table, the count and the removal; nothing else.
        assert_eq!(k.writes - writes, 3);
        // The service goes entirely.
        reconcile(&model(STATE), &mut k).unwrap();
        assert!(services(&k).is_empty());
        assert!(k.map::<Backends>().is_empty());
    }

    #[test]
    fn a_published_port_can_lead_to_a_service() {
        let mut k = kernel();
        let text = format!(
            "{STATE}{SERVICES}ports:\n  - {{service: web, protocol: tcp, host_port: 8000, container_port: 80}}\n"
        );
        reconcile(&model(&text), &mut k).unwrap();
        let ports = k.map::<Ports>();
        let target = ports[&PortKey {
            addr: 0,
            port: 8000u16.to_be(),
            proto: 6,
            _pad: 0,
        }];
        assert_eq!(
            (target.addr, target.port, target.is_service),
            (ip("10.96.0.10"), 80u16.to_be(), 1)
        );
    }

    const POLICIES: &str = r#"
policies:
  - {name: deny-one-to-two, action: deny, from: {endpoint: one}, to: {endpoint: two}, ports: ["80/tcp"]}
  - {name: blocklist, action: deny, from: {cidr: 203.0.113.0/24}}
"#;

    #[test]
    fn policies_become_rules_and_changes_bump_the_generation() {
        let mut k = kernel();
        reconcile(&model(STATE), &mut k).unwrap();
        let generation = k.config.policy_generation;
        reconcile(&model(&format!("{STATE}{POLICIES}")), &mut k).unwrap();
        assert_eq!(k.config.rule_count, 2);
        let live = k.meta.unwrap().slot as u8;
        let entries = k.map::<Policy>();
        assert_eq!(
            entries.len(),
            2,
            "one entry per rule here, all in the live half"
        );
        assert!(entries.keys().all(|key| key.slot == live));
        let port80 = entries.keys().find(|key| key.port != 0).unwrap();
        assert_eq!((port80.port, port80.proto), (80u16.to_be(), 6));
        assert_eq!(entries[port80].priority, 0);
        assert_eq!(k.prefixes.len(), 1);
        assert_eq!(k.config.policy_generation, generation + 1);
        // The deny list is not shadowed by an allow: XDP gets it.
        assert_eq!(k.deny.len(), 1);
        assert!(k.attached.contains(&("eth0".into(), Hook::UplinkXdp)));
        // The same again: nothing to judge anew, nothing written.
        let writes = k.writes;
        reconcile(&model(&format!("{STATE}{POLICIES}")), &mut k).unwrap();
        assert_eq!(k.config.policy_generation, generation + 1);
        assert_eq!(k.writes, writes);
        assert_eq!(k.meta.unwrap().slot as u8, live);
        // Another rule set goes into the other half, which becomes live; the old half empties.
        let other = POLICIES.replace("80/tcp", "81/tcp");
        reconcile(&model(&format!("{STATE}{other}")), &mut k).unwrap();
        assert_eq!(k.meta.unwrap().slot as u8, 1 - live);
        assert!(k.map::<Policy>().keys().all(|key| key.slot == 1 - live));
        assert!(
            k.prefixes
                .keys()
                .all(|(slot, _, _)| *slot as u8 == 1 - live)
        );
        assert_eq!(k.config.policy_generation, generation + 2);
        reconcile(&model(&format!("{STATE}{POLICIES}")), &mut k).unwrap();
        assert_eq!(k.config.policy_generation, generation + 3);
        // Rules gone: the count drops, the generation moves, the deny list empties.
        reconcile(&model(STATE), &mut k).unwrap();
        assert_eq!(
            (k.config.rule_count, k.config.policy_generation),
            (0, generation + 4)
        );
        assert!(k.map::<Policy>().is_empty() && k.prefixes.is_empty());
        assert!(k.deny.is_empty());
        assert!(!k.attached.contains(&("eth0".into(), Hook::UplinkXdp)));
    }

    #[test]
    fn endpoints_carry_network_flags_ids_and_label_classes() {
        let mut k = kernel();
        let text = STATE.replace(
            "gateway: 10.1.0.1}",
            "gateway: 10.1.0.1, internal: true, icc: false}",
        ) + "policies:\n  - {name: p, action: deny, from: {labels: {app: x}}}\n";
        let text = text.replace("  - name: two\n", "  - name: two\n    labels: {app: x}\n");
        reconcile(&model(&text), &mut k).unwrap();
        let endpoints = k.map::<Endpoints>();
        let two = endpoints[&ip("10.1.0.3")];
        assert_eq!((two.endpoint_id, two.label_class), (2, 1));
        assert_eq!(two.net_flags, net_flags::INTERNAL | net_flags::NO_ICC);
        assert_eq!(endpoints[&ip("10.1.0.2")].label_class, 0);
    }

    #[test]
    fn gateway_modes_set_flags_and_routed_ports_open_the_container_address() {
        let mut k = kernel();
        let routed = STATE.replace(
            "gateway: 10.1.0.1}",
            "gateway: 10.1.0.1, gateway_mode: routed}",
        );
        reconcile(&model(&format!("{routed}{PORTS}")), &mut k).unwrap();
        assert_eq!(
            k.map::<Endpoints>()[&ip("10.1.0.2")].net_flags,
            net_flags::ROUTED
        );
        let ports = k.map::<Ports>();
        // The host port is not used: the entry is keyed by the container's address and port.
        let key = PortKey {
            addr: ip("10.1.0.2"),
            port: 80u16.to_be(),
            proto: 6,
            _pad: 0,
        };
        assert_eq!(
            (ports[&key].addr, ports[&key].port),
            (ip("10.1.0.2"), 80u16.to_be())
        );
        assert!(ports.keys().all(|k| k.port != 8080u16.to_be()), "{ports:?}");
        for (mode, flags) in [
            ("nat", 0),
            ("nat-unprotected", net_flags::UNPROTECTED),
            ("isolated", net_flags::INTERNAL),
        ] {
            let text = STATE.replace(
                "gateway: 10.1.0.1}",
                &format!("gateway: 10.1.0.1, gateway_mode: {mode}}}"),
            );
            reconcile(&model(&text), &mut k).unwrap();
            assert_eq!(
                k.map::<Endpoints>()[&ip("10.1.0.3")].net_flags,
                flags,
                "{mode}"
            );
        }
        let bad = STATE.replace(
            "gateway: 10.1.0.1}",
            "gateway: 10.1.0.1, gateway_mode: bridged}",
        );
        let err = Model::from_spec(&StateFile::parse(&bad).unwrap()).unwrap_err();
        assert!(err.to_string().contains("gateway_mode"), "{err}");
    }

    #[test]
    fn second_apply_of_the_same_model_writes_nothing() {
        let mut k = kernel();
        let m = model(&format!("{STATE}{PORTS}{SERVICES}"));
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
        assert_eq!(changes.entries_removed, 1);
        assert_eq!(k.map::<Endpoints>().len(), 1);
        assert!(
            !k.attached
                .contains(&("veth-two".into(), Hook::ContainerIngress))
        );
    }

    #[test]
    fn stale_pinned_entries_of_an_earlier_agent_are_removed() {
        let mut k = kernel();
        k.set::<Endpoints>(ip("10.9.9.9"), EndpointInfo::default())
            .unwrap();
        let changes = reconcile(&model(STATE), &mut k).unwrap();
        assert_eq!(changes.entries_removed, 1);
        assert!(!k.map::<Endpoints>().contains_key(&ip("10.9.9.9")));
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
