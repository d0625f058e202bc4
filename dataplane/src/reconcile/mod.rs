//! The reconciler: the only writer of the kernel's maps and attachments (but conntrack, see
//! [`crate::kernel::maps`]). It turns a validated [`Model`] into desired attachments and map
//! entries ([`desired`]), diffs them against what the kernel has (including what an earlier
//! agent left pinned) and applies the difference ([`apply`]). Applying the same model twice
//! changes nothing. [`Reconciler`] owns the [`Datapath`], so nothing else can write to it.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use dataplane_common::{
    Backend, Backend6, BackendKey, Config, EndpointInfo, EndpointInfo6, In6Addr, PolicyKey,
    PolicyMeta, PortKey, PortKey6, PortTarget, PortTarget6, PrefixKey, PrefixKey6, ServiceInfo,
    ServiceKey, ServiceKey6, SockNetns, algorithm, net_flags,
};

pub mod capacity;
pub mod maglev;
pub mod policy;

use crate::{
    kernel::{
        Datapath, DatapathError, Hook,
        maps::{
            Backends, Backends6, Endpoints, Endpoints6, LocalAddrs, LocalAddrs6, Policy, Ports,
            Ports6, Reconciled, Services, Services6, SockNetnsMap,
        },
    },
    model::{
        Algorithm, GatewayMode, MAX_OVERLAYS, Model, PortTarget as ModelPortTarget, Protocol,
        StateError,
    },
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
    /// Their IPv6 addresses but link-local ones: (interface, address).
    fn addresses6(&self) -> Vec<(String, Ipv6Addr)>;
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
    /// The IPv6 policy prefix trie, both halves: (half, length, address) -> CIDR class.
    fn policy_prefixes6(&self) -> Result<BTreeMap<(u32, u8, In6Addr), u32>, DatapathError>;
    fn set_policy_prefix6(
        &mut self,
        prefix: (u32, u8, In6Addr),
        class: Option<u32>,
    ) -> Result<(), DatapathError>;
    fn deny_sources(&self) -> Result<BTreeSet<PrefixKey>, DatapathError>;
    fn set_deny_source(&mut self, prefix: PrefixKey, deny: bool) -> Result<(), DatapathError>;
    fn deny_sources6(&self) -> Result<BTreeSet<PrefixKey6>, DatapathError>;
    fn set_deny_source6(&mut self, prefix: PrefixKey6, deny: bool) -> Result<(), DatapathError>;
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
    fn addresses6(&self) -> Vec<(String, Ipv6Addr)> {
        crate::kernel::netdev::ipv6_addresses()
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
    fn policy_prefixes6(&self) -> Result<BTreeMap<(u32, u8, In6Addr), u32>, DatapathError> {
        Datapath::policy_prefixes6(self)
    }
    fn set_policy_prefix6(
        &mut self,
        prefix: (u32, u8, In6Addr),
        class: Option<u32>,
    ) -> Result<(), DatapathError> {
        Datapath::set_policy_prefix6(self, prefix, class)
    }
    fn deny_sources(&self) -> Result<BTreeSet<PrefixKey>, DatapathError> {
        Datapath::deny_sources(self)
    }
    fn set_deny_source(&mut self, prefix: PrefixKey, deny: bool) -> Result<(), DatapathError> {
        Datapath::set_deny_source(self, prefix, deny)
    }
    fn deny_sources6(&self) -> Result<BTreeSet<PrefixKey6>, DatapathError> {
        Datapath::deny_sources6(self)
    }
    fn set_deny_source6(&mut self, prefix: PrefixKey6, deny: bool) -> Result<(), DatapathError> {
        Datapath::set_deny_source6(self, prefix, deny)
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
    /// The Maglev tables of the last pass, so a drift check does not compute them again.
    maglev: maglev::Memo,
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
    /// The same for their IPv6 addresses.
    pub departed6: BTreeSet<In6Addr>,
    /// Host TCP ports this apply published or led elsewhere: connections that reached the
    /// host on them before (dockerd's placeholder socket) are to be reset.
    pub published_tcp: BTreeSet<u16>,
}

impl Reconciler {
    pub fn new(datapath: Datapath) -> Reconciler {
        Reconciler {
            datapath,
            maglev: maglev::Memo::default(),
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
                let (departed, departed6) = self
                    .applied()
                    .map(|old| departed_addresses(old, &model))
                    .unwrap_or_default();
                let published_tcp = newly_published_tcp(self.applied(), &model);
                self.last_good = Some((model, host));
                Ok(Applied {
                    changes,
                    departed,
                    departed6,
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
        self.prune_vanished();
        let result = self.reconcile_pruned(model, host);
        if result.is_err() {
            // An interface can vanish during the pass (a container dying now), after the
            // prune above and before the lookup that failed on it: its attachment goes too,
            // not at the next pass.
            self.prune_vanished();
        }
        result
    }

    /// Interfaces that went away (a container stopped) took their links with them.
    fn prune_vanished(&mut self) {
        for gone in self.datapath.prune_vanished() {
            log::info!("{gone}: the interface is gone, and its attachment with it");
        }
    }

    fn reconcile_pruned(
        &mut self,
        model: &Model,
        host: &HostSettings,
    ) -> Result<Changes, ReconcileError> {
        let ports_capacity = (
            self.datapath.capacity::<Ports>()?,
            self.datapath.capacity::<Ports6>()?,
        );
        // Published ports that cannot fit are refused before their entries are built: a
        // port on every address is an entry in each family, and building 200,000 of them
        // only to refuse them would hold the main loop (and `status`) for a second or more.
        capacity::check_ports(model, ports_capacity.0, ports_capacity.1)?;
        let desired = desired(model, host, &self.datapath, &mut self.maglev)?;
        // Refused whole before any write, rather than failing half-way.
        capacity::check(&desired, ports_capacity.0, ports_capacity.1)?;
        apply(&desired, &mut self.datapath)
    }

    /// Detaches every program (on shutdown); the maps stay pinned.
    pub fn detach_all(&mut self) {
        self.datapath.detach_all();
    }
}

/// Addresses (as in the maps) of container interfaces in `old` that `new` no longer has:
/// IPv4 and IPv6.
fn departed_addresses(old: &Model, new: &Model) -> (BTreeSet<u32>, BTreeSet<In6Addr>) {
    let addresses = |m: &Model| -> BTreeSet<u32> {
        m.endpoints
            .iter()
            .flat_map(|e| e.interfaces.iter().filter_map(|i| i.ip.map(be)))
            .collect()
    };
    let addresses6 = |m: &Model| -> BTreeSet<In6Addr> {
        m.endpoints
            .iter()
            .flat_map(|e| e.interfaces.iter().filter_map(|i| i.ip6.map(be6)))
            .collect()
    };
    (
        addresses(old)
            .difference(&addresses(new))
            .copied()
            .collect(),
        addresses6(old)
            .difference(&addresses6(new))
            .copied()
            .collect(),
    )
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
    /// Keyed by container IPv6 address: the same ids as the IPv4 entry of the interface.
    pub endpoints6: BTreeMap<In6Addr, EndpointInfo6>,
    pub ports: BTreeMap<PortKey, PortTarget>,
    pub ports6: BTreeMap<PortKey6, PortTarget6>,
    /// The host's own addresses (network byte order).
    pub local_addrs: BTreeMap<u32, u8>,
    pub local_addrs6: BTreeMap<In6Addr, u8>,
    pub config: Config,
    /// By service name.
    pub services: BTreeMap<String, DesiredService>,
    /// The compiled policy (keys of half 0: `apply` writes them into the half not live).
    pub policy: crate::reconcile::policy::Tables,
    pub deny_sources: BTreeSet<PrefixKey>,
    pub deny_sources6: BTreeSet<PrefixKey6>,
    /// Containers' network namespaces by netns cookie, for the socket hooks.
    pub sock_netns: BTreeMap<u64, SockNetns>,
}

/// A service as the kernel should have it, before it gets an id: one id, one table and one
/// backend count for both of its families.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DesiredService {
    /// Its IPv4 VIP's key, its IPv6 VIP's (at least one).
    pub key: Option<ServiceKey>,
    pub key6: Option<ServiceKey6>,
    pub algorithm: u8,
    /// In index order (for a service with an IPv4 VIP).
    pub backends: Vec<Backend>,
    /// The same backends' IPv6 addresses at the same indexes (for a service with an IPv6
    /// VIP).
    pub backends6: Vec<Backend6>,
    /// The Maglev table (backend indexes), for maglev and source_hash; empty otherwise.
    pub table: Arc<[u32]>,
    /// Its overlay network's number, 0 for none (`ServiceInfo::overlay`).
    pub overlay: u8,
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
    maglev: &mut maglev::Memo,
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
    let has_deny_list = !policy.deny_sources.is_empty() || !policy.deny_sources6.is_empty();
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
    let overlays = overlay_numbers(model, kernel)?;
    add_endpoints(&mut desired, model, &policy, &overlays, kernel)?;
    let endpoints = model.endpoints_by_name();
    for service in &model.services {
        let overlay = service
            .overlay
            .as_deref()
            .and_then(|o| overlays.get(o).copied())
            .unwrap_or(0);
        let wanted = desired_service(&endpoints, service, overlay, kernel.maglev_size(), maglev);
        desired.services.insert(service.name.clone(), wanted);
    }
    maglev.pass_done();
    let services = model.services_by_name();
    for (i, port) in model.ports.iter().enumerate() {
        add_port(&mut desired, model, &endpoints, &services, i, port)?;
    }
    let addresses = kernel.addresses();
    for (_, addr) in &addresses {
        desired.local_addrs.insert(be(*addr), 1);
    }
    let addresses6 = kernel.addresses6();
    for (_, addr) in &addresses6 {
        desired.local_addrs6.insert(be6(*addr), 1);
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
        // NAT66 to the uplink's first IPv6 address (link-local ones are not listed).
        masquerade_addr6: addresses6
            .iter()
            .find(|(interface, _)| interface == uplink)
            .map(|(_, addr)| be6(*addr))
            .unwrap_or_default(),
    };
    desired.policy = policy.tables;
    desired.deny_sources = policy.deny_sources.into_iter().collect();
    desired.deny_sources6 = policy
        .deny_sources6
        .into_iter()
        .map(|(len, addr)| PrefixKey6 {
            prefix_len: u32::from(len),
            addr: be6(addr),
        })
        .collect();
    Ok(desired)
}

/// The number (1-32) of each overlay network services are scoped to, what the socket hooks
/// know it by (`ServiceInfo::overlay`, a bit of `SockNetns::overlays`). An overlay keeps the
/// number its services have in the kernel (across passes and agent restarts): renumbering
/// would rewrite the services and the namespaces' bits in two steps of a pass, between which
/// a connect() could find the two disagree and go untranslated. A new one takes the lowest
/// free number.
fn overlay_numbers<'m>(
    model: &'m Model,
    kernel: &impl Kernel,
) -> Result<BTreeMap<&'m str, u8>, ReconcileError> {
    let overlays = model.overlays();
    let mut numbers = BTreeMap::new();
    if overlays.is_empty() {
        return Ok(numbers);
    }
    let current = kernel.entries::<Services>()?;
    let mut used = BTreeSet::new();
    for service in &model.services {
        let (Some(overlay), Some(key)) = (service.overlay.as_deref(), service_key(service)) else {
            continue;
        };
        if let Some(info) = current.get(&key)
            && (1..=MAX_OVERLAYS as u8).contains(&info.overlay)
            && !numbers.contains_key(overlay)
            && used.insert(info.overlay)
        {
            numbers.insert(overlay, info.overlay);
        }
    }
    let mut free = (1..=MAX_OVERLAYS as u8).filter(|n| !used.contains(n));
    for overlay in overlays {
        if !numbers.contains_key(overlay) {
            // Validation keeps the overlays within MAX_OVERLAYS: a number is always free.
            let n = free.next().expect("at most MAX_OVERLAYS overlays");
            numbers.insert(overlay, n);
        }
    }
    Ok(numbers)
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
    overlays: &BTreeMap<&str, u8>,
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
            // One endpoint whatever its families: the same ids in both maps.
            if let (Some(ip6), Some(gateway6)) = (itf.ip6, network.gateway6) {
                desired.endpoints6.insert(
                    be6(ip6),
                    EndpointInfo6 {
                        label_class,
                        _pad_class: 0,
                        ifindex,
                        network_id,
                        endpoint_id: endpoint_index as u32 + 1,
                        mac: itf.mac,
                        net_flags: flags,
                        _pad: 0,
                        gateway: be6(gateway6),
                    },
                );
            }
            if let (Some(ip), Some(gateway)) = (itf.ip, network.gateway) {
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
        }
        // Its sockets, for the cgroup hooks: they leave from its first interface's address
        // unless bound (the one Docker's default route of the container goes out of). One on
        // Swarm overlays alone has no address of ours (0: no identity, never a hairpin).
        let first = endpoint.interfaces.first().and_then(|i| i.ip);
        let first = first.or((!endpoint.overlays.is_empty()).then_some(Ipv4Addr::UNSPECIFIED));
        if let (Some(netns), Some(first)) = (&endpoint.netns, first)
            && let Some(cookie) = kernel.netns_cookie(netns)
        {
            let on_overlays = endpoint
                .overlays
                .iter()
                .filter_map(|o| overlays.get(o.as_str()))
                .fold(0u32, |mask, n| mask | 1 << (n - 1));
            desired.sock_netns.insert(
                cookie,
                SockNetns {
                    addr: be(first),
                    overlays: on_overlays,
                },
            );
        }
    }
    Ok(())
}

/// The entries of published port `ports[i]`: one per host port of its range and family,
/// leading to the container (on its first network, as Docker publishes) or to a service's
/// VIP. A port on every address (no `host_ip`) has entries in both families' maps; 0.0.0.0
/// and :: are the all-zero address of their family's map. Over IPv6, a container without an
/// IPv6 address is reached at its IPv4-mapped address (::ffff:a.b.c.d: the kernel translates
/// to IPv4, as docker-proxy serves such containers on [::]); over IPv4 an IPv6-only container
/// has no entry.
fn add_port(
    desired: &mut Desired,
    model: &Model,
    endpoints: &HashMap<&str, &crate::model::Endpoint>,
    services: &HashMap<&str, &crate::model::Service>,
    i: usize,
    port: &crate::model::PublishedPort,
) -> Result<(), ReconcileError> {
    // The key address of each family the port binds (0 / :: = every address of it).
    let (host4, host6) = match port.host_ip {
        None => (Some(0), Some(In6Addr::UNSPECIFIED)),
        Some(IpAddr::V4(ip)) => (Some(be(ip)), None),
        Some(IpAddr::V6(ip)) => (None, Some(be6(ip))),
    };
    let proto = port.protocol.number();
    let key = |addr: u32, host_port: u16| PortKey {
        addr,
        port: host_port.to_be(),
        proto,
        _pad: 0,
    };
    let key6 = |addr: In6Addr, host_port: u16| PortKey6 {
        addr,
        port: host_port.to_be(),
        proto,
        _pad: 0,
    };
    let name = match &port.target {
        ModelPortTarget::Endpoint(name) => name,
        ModelPortTarget::Service(name) => {
            let service = services
                .get(name.as_str())
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
            // Each family to the service's VIP of that family (the model refuses a host_ip
            // of a family the service has no VIP of).
            if let (Some(addr), Some(vip)) = (host4, service.vip) {
                desired.ports.insert(
                    key(addr, port.host_ports.first),
                    PortTarget {
                        addr: be(vip),
                        port: service.port.to_be(),
                        is_service: 1,
                        _pad: 0,
                    },
                );
            }
            if let (Some(addr), Some(vip6)) = (host6, service.vip6) {
                desired.ports6.insert(
                    key6(addr, port.host_ports.first),
                    PortTarget6 {
                        addr: be6(vip6),
                        port: service.port.to_be(),
                        is_service: 1,
                        _pad: 0,
                    },
                );
            }
            return Ok(());
        }
    };
    let endpoint = endpoints
        .get(name.as_str())
        .expect("validated: the port's endpoint exists");
    let Some(itf) = endpoint.interfaces.first() else {
        return Err(StateError::Invalid {
            entry: format!("ports[{i}]"),
            field: "endpoint".into(),
            message: format!("endpoint {name} has no interface to publish to"),
        }
        .into());
    };
    let routed = model
        .network(&itf.network)
        .is_some_and(|n| n.gateway_mode == GatewayMode::Routed);
    let target6 = address6_of(itf);
    for offset in 0..port.host_ports.len() {
        let container_port = port.container_ports.first + offset as u16;
        let host_port = port.host_ports.first + offset as u16;
        // In routed mode Docker opens the container's own port and leaves the host port
        // unused: the entry is keyed by the container's address, so a packet routed to it
        // is published to itself (tracked like any published connection, not translated).
        if let (Some(host), Some(ip)) = (host4, itf.ip) {
            let port_key = if routed {
                key(be(ip), container_port)
            } else {
                key(host, host_port)
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
        if let (Some(host), Some(target)) = (host6, target6) {
            let port_key = match (routed, itf.ip6) {
                (false, _) => key6(host, host_port),
                (true, Some(ip6)) => key6(be6(ip6), container_port),
                // Routed to an IPv4-only container: nothing is routed to it over IPv6.
                (true, None) => continue,
            };
            desired.ports6.insert(
                port_key,
                PortTarget6 {
                    addr: target,
                    port: container_port.to_be(),
                    is_service: 0,
                    _pad: 0,
                },
            );
        }
    }
    Ok(())
}

/// Where an interface is reached over IPv6: its own IPv6 address, else its IPv4 address
/// mapped (::ffff:a.b.c.d), which the kernel translates to IPv4.
fn address6_of(itf: &crate::model::Interface) -> Option<In6Addr> {
    itf.ip6
        .map(be6)
        .or_else(|| itf.ip.map(|ip| In6Addr::mapped_v4(be(ip))))
}

/// The kernel's view of `service`: backends at their endpoint's first interface's address of
/// each family and the target port, and the Maglev table over their names (so it does not
/// depend on addresses or order). A dual-stack service has one table: its backends by index,
/// the IPv4 addresses in BACKENDS and the IPv6 ones in BACKENDS6 at the same index. A backend
/// without an address of a family keeps its index: over IPv6 an IPv4-only backend is its
/// IPv4-mapped address (the kernel translates to IPv4, as for published ports); over IPv4 an
/// IPv6-only backend is address 0, which the kernel treats as no backend
/// (SERVICE_BACKEND_NOT_FOUND).
fn desired_service(
    endpoints: &HashMap<&str, &crate::model::Endpoint>,
    service: &crate::model::Service,
    // Its overlay network's number, 0 for none.
    overlay: u8,
    maglev_size: u32,
    maglev: &mut maglev::Memo,
) -> DesiredService {
    let mut backends = Vec::new();
    let mut backends6 = Vec::new();
    let mut members = Vec::new();
    for (name, weight) in service.backends.iter().zip(&service.weights) {
        let Some(itf) = endpoints
            .get(name.as_str())
            .and_then(|e| e.interfaces.first())
        else {
            continue; // an endpoint without interfaces serves nothing
        };
        backends.push(Backend {
            addr: itf.ip.map(be).unwrap_or(0),
            port: service.target_port.to_be(),
            _pad: [0; 2],
        });
        backends6.push(Backend6 {
            addr: address6_of(itf).unwrap_or_default(),
            port: service.target_port.to_be(),
            _pad: [0; 2],
        });
        members.push(maglev::Member {
            identity: name.clone(),
            weight: *weight,
        });
    }
    // Backends by address: IPv4 only; port 0 (a service on every port) keeps the port asked.
    for remote in &service.remote {
        backends.push(Backend {
            addr: be(remote.addr),
            port: service.target_port.to_be(),
            _pad: [0; 2],
        });
        backends6.push(Backend6::default());
        members.push(maglev::Member {
            identity: remote.name.clone(),
            weight: 1,
        });
    }
    let algorithm = match service.algorithm {
        Algorithm::Maglev => algorithm::MAGLEV,
        Algorithm::Random => algorithm::RANDOM,
        Algorithm::RoundRobin => algorithm::ROUND_ROBIN,
        Algorithm::SourceHash => algorithm::SOURCE_HASH,
    };
    let table = match service.algorithm {
        Algorithm::Maglev | Algorithm::SourceHash => maglev.table(&members, maglev_size),
        Algorithm::Random | Algorithm::RoundRobin => Arc::from([]),
    };
    let key = service_key(service);
    let key6 = service.vip6.map(|vip6| ServiceKey6 {
        vip: be6(vip6),
        port: service.port.to_be(),
        proto: service.protocol.number(),
        _pad: 0,
    });
    DesiredService {
        backends: if key.is_some() { backends } else { Vec::new() },
        backends6: if key6.is_some() {
            backends6
        } else {
            Vec::new()
        },
        key,
        key6,
        algorithm,
        table,
        overlay,
    }
}

/// The key of `service`'s IPv4 VIP in the services map, if it has one.
fn service_key(service: &crate::model::Service) -> Option<ServiceKey> {
    service.vip.map(|vip| ServiceKey {
        vip: be(vip),
        port: service.port.to_be(),
        proto: service.protocol.number(),
        _pad: 0,
    })
}

/// Brings the services to `desired`: a service keeps its id (and so its table and its
/// connections' backends) while it exists in either family; a new one gets the lowest free id.
/// Per service the order is backends (both families), then table, then the backend count (in
/// both families' VIP entries), then stale backends, so a lookup in between always lands on a
/// valid backend.
fn apply_services(
    desired: &Desired,
    kernel: &mut impl Kernel,
) -> Result<(usize, usize), ReconcileError> {
    let current = kernel.entries::<Services>()?;
    let current6 = kernel.entries::<Services6>()?;
    let backends = kernel.entries::<Backends>()?;
    let backends6 = kernel.entries::<Backends6>()?;
    let max = kernel.max_services();
    if desired.services.len() > max as usize {
        return Err(ReconcileError::TooManyServices {
            wanted: desired.services.len(),
            max,
        });
    }
    // The id a service has now: its IPv4 VIP's, else its IPv6 VIP's.
    let id_now = |service: &DesiredService| {
        service
            .key
            .and_then(|k| current.get(&k))
            .or_else(|| service.key6.and_then(|k| current6.get(&k)))
            .map(|info| info.id)
    };
    let mut used: BTreeSet<u32> = desired.services.values().filter_map(id_now).collect();
    // Ids taken in this pass: a dual-stack service split in two finds its id under both
    // VIPs, and only the first of the two keeps it.
    let mut claimed = BTreeSet::new();
    let mut next_free = 1;
    let (mut set, mut removed) = (0, 0);
    for service in desired.services.values() {
        let id = match id_now(service).filter(|id| !claimed.contains(id)) {
            Some(id) => id,
            None => {
                while used.contains(&next_free) {
                    next_free += 1;
                }
                used.insert(next_free);
                next_free
            }
        };
        claimed.insert(id);
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
        for (index, backend) in service.backends6.iter().enumerate() {
            let bkey = BackendKey {
                service_id: id,
                index: index as u32,
            };
            if backends6.get(&bkey) != Some(backend) {
                kernel.set::<Backends6>(bkey, *backend)?;
                set += 1;
            }
        }
        if !service.table.is_empty() && kernel.maglev(id)[..] != service.table[..] {
            kernel.set_maglev(id, &service.table)?;
            set += 1;
        }
        let info = ServiceInfo {
            id,
            backend_count: service.backends.len().max(service.backends6.len()) as u32,
            algorithm: service.algorithm,
            overlay: service.overlay,
            _pad: [0; 2],
        };
        if let Some(key) = service.key
            && current.get(&key) != Some(&info)
        {
            kernel.set::<Services>(key, info)?;
            set += 1;
        }
        if let Some(key6) = service.key6
            && current6.get(&key6) != Some(&info)
        {
            kernel.set::<Services6>(key6, info)?;
            set += 1;
        }
    }
    // Services that went, and backends past each service's count in each family.
    let keys: BTreeSet<ServiceKey> = desired.services.values().filter_map(|s| s.key).collect();
    let keys6: BTreeSet<ServiceKey6> = desired.services.values().filter_map(|s| s.key6).collect();
    for key in current.keys().filter(|k| !keys.contains(k)) {
        kernel.remove::<Services>(*key)?;
        removed += 1;
    }
    for key in current6.keys().filter(|k| !keys6.contains(k)) {
        kernel.remove::<Services6>(*key)?;
        removed += 1;
    }
    fn counts<K>(entries: BTreeMap<K, ServiceInfo>) -> BTreeMap<u32, u32> {
        entries
            .values()
            .map(|info| (info.id, info.backend_count))
            .collect()
    }
    let stale = |counts: &BTreeMap<u32, u32>, bkey: &BackendKey| {
        counts
            .get(&bkey.service_id)
            .is_none_or(|count| bkey.index >= *count)
    };
    let counts4 = counts(kernel.entries::<Services>()?);
    for bkey in backends.keys().filter(|k| stale(&counts4, k)) {
        kernel.remove::<Backends>(*bkey)?;
        removed += 1;
    }
    let counts6 = counts(kernel.entries::<Services6>()?);
    for bkey in backends6.keys().filter(|k| stale(&counts6, k)) {
        kernel.remove::<Backends6>(*bkey)?;
        removed += 1;
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
    let prefixes6 = kernel.policy_prefixes6()?;
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
    let in_half6 = |slot: u32| -> BTreeMap<(u8, In6Addr), u32> {
        prefixes6
            .iter()
            .filter(|((s, _, _), _)| *s == slot)
            .map(|((_, len, addr), class)| ((*len, *addr), *class))
            .collect()
    };
    let desired6: BTreeMap<(u8, In6Addr), u32> = desired
        .prefixes6
        .iter()
        .map(|(&(len, addr), &class)| ((len, be6(addr)), class))
        .collect();
    let (live_entries, live_prefixes) = in_half(live);
    let (mut set, mut removed) = (0, 0);
    let switched = live_entries != desired.entries
        || live_prefixes != desired.prefixes
        || in_half6(live) != desired6
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
        let old_prefixes6 = in_half6(target);
        for (&(len, addr), &class) in &desired6 {
            if old_prefixes6.get(&(len, addr)) != Some(&class) {
                kernel.set_policy_prefix6((target, len, addr), Some(class))?;
                set += 1;
            }
        }
        for &(len, addr) in old_prefixes6.keys() {
            if !desired6.contains_key(&(len, addr)) {
                kernel.set_policy_prefix6((target, len, addr), None)?;
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
    for &(slot, len, addr) in prefixes6.keys().filter(|(s, _, _)| *s == stale) {
        kernel.set_policy_prefix6((slot, len, addr), None)?;
        removed += 1;
    }
    Ok((set, removed, switched))
}

/// An address as the kernel keeps it: the bytes in network order, read as a native u32.
pub fn be(addr: Ipv4Addr) -> u32 {
    u32::from(addr).to_be()
}

/// An IPv6 address as the kernel keeps it: its bytes in network order.
pub fn be6(addr: Ipv6Addr) -> In6Addr {
    In6Addr::from_ipv6(addr)
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
    let endpoints6 = kernel.entries::<Endpoints6>()?;
    let ports = kernel.entries::<Ports>()?;
    let ports6 = kernel.entries::<Ports6>()?;
    let local_addrs = kernel.entries::<LocalAddrs>()?;
    let local_addrs6 = kernel.entries::<LocalAddrs6>()?;
    let sock_netns = kernel.entries::<SockNetnsMap>()?;
    let endpoints_written = write_missing::<Endpoints>(kernel, &endpoints, &desired.endpoints)?
        + write_missing::<Endpoints6>(kernel, &endpoints6, &desired.endpoints6)?;
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
    let current_deny6 = kernel.deny_sources6()?;
    for prefix in desired.deny_sources6.difference(&current_deny6) {
        kernel.set_deny_source6(*prefix, true)?;
        changes.entries_set += 1;
    }
    let endpoints_removed = endpoints
        .keys()
        .filter(|k| !desired.endpoints.contains_key(k))
        .count()
        + endpoints6
            .keys()
            .filter(|k| !desired.endpoints6.contains_key(k))
            .count();
    let policy_changed = endpoints_written > 0 || endpoints_removed > 0 || policy_switched;
    changes.entries_set += write_missing::<LocalAddrs>(kernel, &local_addrs, &desired.local_addrs)?;
    changes.entries_set +=
        write_missing::<LocalAddrs6>(kernel, &local_addrs6, &desired.local_addrs6)?;
    // Services before the ports that may lead to them.
    let (services_set, services_removed) = apply_services(desired, kernel)?;
    changes.entries_set += services_set;
    changes.entries_set += write_missing::<Ports>(kernel, &ports, &desired.ports)?;
    changes.entries_set += write_missing::<Ports6>(kernel, &ports6, &desired.ports6)?;
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
    changes.entries_removed += remove_stale::<Ports6>(kernel, &ports6, &desired.ports6)?;
    changes.entries_removed +=
        remove_stale::<LocalAddrs>(kernel, &local_addrs, &desired.local_addrs)?;
    changes.entries_removed +=
        remove_stale::<LocalAddrs6>(kernel, &local_addrs6, &desired.local_addrs6)?;
    changes.entries_removed +=
        remove_stale::<SockNetnsMap>(kernel, &sock_netns, &desired.sock_netns)?;
    changes.entries_removed += remove_stale::<Endpoints>(kernel, &endpoints, &desired.endpoints)?;
    changes.entries_removed +=
        remove_stale::<Endpoints6>(kernel, &endpoints6, &desired.endpoints6)?;
    changes.entries_removed += services_removed;
    for prefix in current_deny.difference(&desired.deny_sources) {
        kernel.set_deny_source(*prefix, false)?;
        changes.entries_removed += 1;
    }
    for prefix in current_deny6.difference(&desired.deny_sources6) {
        kernel.set_deny_source6(*prefix, false)?;
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

    /// The fake's prefix tables, either family: a class sets the entry, `None` removes it.
    fn set_class<K: Ord>(map: &mut BTreeMap<K, u32>, key: K, class: Option<u32>) {
        match class {
            Some(class) => map.insert(key, class),
            None => map.remove(&key),
        };
    }

    /// The fake's deny lists, either family: present or not.
    fn set_member<K: Ord>(set: &mut BTreeSet<K>, key: K, member: bool) {
        if member {
            set.insert(key);
        } else {
            set.remove(&key);
        }
    }

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
        pub addresses6: Vec<(String, Ipv6Addr)>,
        pub attached: BTreeSet<(String, Hook)>,
        pub maps: BTreeMap<&'static str, BTreeMap<Vec<u8>, Vec<u8>>>,
        pub config: Config,
        pub maglev: BTreeMap<u32, Vec<u32>>,
        pub prefixes: BTreeMap<(u32, u8, u32), u32>,
        pub prefixes6: BTreeMap<(u32, u8, In6Addr), u32>,
        pub meta: Option<PolicyMeta>,
        pub deny: BTreeSet<PrefixKey>,
        pub deny6: BTreeSet<PrefixKey6>,
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
        fn addresses6(&self) -> Vec<(String, Ipv6Addr)> {
            self.addresses6.clone()
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
            set_class(&mut self.prefixes, prefix, class);
            Ok(())
        }
        fn policy_prefixes6(&self) -> Result<BTreeMap<(u32, u8, In6Addr), u32>, DatapathError> {
            Ok(self.prefixes6.clone())
        }
        fn set_policy_prefix6(
            &mut self,
            prefix: (u32, u8, In6Addr),
            class: Option<u32>,
        ) -> Result<(), DatapathError> {
            self.writes += 1;
            set_class(&mut self.prefixes6, prefix, class);
            Ok(())
        }
        fn deny_sources6(&self) -> Result<BTreeSet<PrefixKey6>, DatapathError> {
            Ok(self.deny6.clone())
        }
        fn set_deny_source6(
            &mut self,
            prefix: PrefixKey6,
            deny: bool,
        ) -> Result<(), DatapathError> {
            self.writes += 1;
            set_member(&mut self.deny6, prefix, deny);
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
            set_member(&mut self.deny, prefix, deny);
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
        let desired = desired(model, &host, kernel, &mut maglev::Memo::default())?;
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
        // On every address: on IPv6 too, to the container's IPv4-mapped address (it has no
        // IPv6 address; the kernel translates).
        let v6 = k.map::<Ports6>();
        assert_eq!(v6.len(), 1, "{v6:?}");
        assert_eq!(
            v6[&PortKey6 {
                addr: In6Addr::UNSPECIFIED,
                port: 8080u16.to_be(),
                proto: 6,
                _pad: 0
            }]
                .addr,
            In6Addr::mapped_v4(ip("10.1.0.2"))
        );
        // Removing the TCP port removes just its entry in each family.
        let fewer = format!(
            "{STATE}{}",
            PORTS.replace(
                "  - {endpoint: one, protocol: tcp, host_port: 8080, container_port: 80}\n",
                ""
            )
        );
        let changes = reconcile(&model(&fewer), &mut k).unwrap();
        assert_eq!(changes.entries_removed, 2, "{changes:?}");
        assert_eq!(k.map::<Ports>().len(), 3);
        assert!(k.map::<Ports6>().is_empty());
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

    /// A Swarm VIP: every port (key port 0), backends by address after the endpoints' with
    /// port 0 (the port asked), its overlay's number; the namespaces of containers on that
    /// overlay carry its bit, one on overlays alone with no address of ours.
    #[test]
    fn an_overlay_vip_has_its_number_and_the_namespaces_on_it_its_bit() {
        let state = format!(
            "{}\n  - name: far\n    netns: /run/netns/far\n    overlays: [ov2]\n{}",
            STATE
                .replacen(
                    "  - name: one\n",
                    "  - name: one\n    netns: /run/netns/one\n    overlays: [ov1, ov2, none]\n",
                    1
                )
                .replacen(
                    "  - name: two\n",
                    "  - name: two\n    netns: /run/netns/two\n",
                    1
                )
                .trim_end(),
            r#"services:
  - {name: a, vip: 10.0.1.2, port: 0, overlay: ov1, addresses: {t1: 10.0.1.3, t2: 10.0.1.4}}
  - {name: b, vip: 10.0.2.2, port: 0, protocol: udp, overlay: ov2, endpoints: [two], addresses: {t3: 10.0.2.3}}
"#
        );
        let mut k = kernel();
        reconcile(&model(&state), &mut k).unwrap();
        let svcs = services(&k);
        let key = |vip: &str, proto: u8| ServiceKey {
            vip: ip(vip),
            port: 0,
            proto,
            _pad: 0,
        };
        let (a, b) = (svcs[&key("10.0.1.2", 6)], svcs[&key("10.0.2.2", 17)]);
        assert_eq!((a.overlay, a.backend_count), (1, 2));
        assert_eq!((b.overlay, b.backend_count), (2, 2));
        let backends = k.map::<Backends>();
        let at = |service_id: u32, index: u32| {
            let b = backends[&BackendKey { service_id, index }];
            (b.addr, b.port)
        };
        assert_eq!(at(a.id, 0), (ip("10.0.1.3"), 0));
        assert_eq!(at(a.id, 1), (ip("10.0.1.4"), 0));
        // The endpoint first, then the address.
        assert_eq!(at(b.id, 0), (ip("10.1.0.3"), 0));
        assert_eq!(at(b.id, 1), (ip("10.0.2.3"), 0));
        assert!(k.maglev[&a.id].iter().all(|i| *i < 2));
        let netns = k.map::<SockNetnsMap>();
        let fake = FakeKernel::default();
        let of = |path: &str| netns[&fake.netns_cookie(path).unwrap()];
        assert_eq!(
            of("/run/netns/one"),
            SockNetns {
                addr: ip("10.1.0.2"),
                overlays: 0b11
            }
        );
        assert_eq!(
            of("/run/netns/two"),
            SockNetns {
                addr: ip("10.1.0.3"),
                overlays: 0
            }
        );
        assert_eq!(
            of("/run/netns/far"),
            SockNetns {
                addr: 0,
                overlays: 0b10
            }
        );

        // A service on a new overlay that sorts first: the others keep their numbers (and
        // the namespaces their bits); it takes the lowest free one.
        let state = state.replacen("overlays: [ov1, ov2, none]", "overlays: [ov1, ov2, aaa]", 1)
            + "  - {name: c, vip: 10.0.3.2, port: 0, overlay: aaa, addresses: {t4: 10.0.3.3}}\n";
        reconcile(&model(&state), &mut k).unwrap();
        let svcs = services(&k);
        let numbers: Vec<u8> = ["10.0.1.2", "10.0.2.2", "10.0.3.2"]
            .iter()
            .zip([6, 17, 6])
            .map(|(vip, proto)| svcs[&key(vip, proto)].overlay)
            .collect();
        assert_eq!(numbers, [1, 2, 3]);
        let netns = k.map::<SockNetnsMap>();
        assert_eq!(
            netns[&fake.netns_cookie("/run/netns/one").unwrap()].overlays,
            0b111
        );
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

    const STATE6: &str = r#"
networks:
  - {name: a, bridge: br-a, subnet: 10.1.0.0/24, gateway: 10.1.0.1, subnet6: "fd00:1::/64", gateway6: "fd00:1::1"}
  - {name: six, bridge: br-six, subnet6: "fd00:2::/64", gateway6: "fd00:2::1", icc: false}
endpoints:
  - name: one
    labels: {app: web}
    interfaces: [{network: a, ip: 10.1.0.2, ip6: "fd00:1::2", mac: "02:00:00:00:00:02", host_veth: veth-one}]
  - name: two
    interfaces: [{network: a, ip: 10.1.0.3, mac: "02:00:00:00:00:03", host_veth: veth-two}]
  - name: three
    labels: {app: web}
    interfaces: [{network: six, ip6: "fd00:2::3", mac: "02:00:00:00:00:04", host_veth: veth-three}]
"#;

    fn kernel6() -> FakeKernel {
        let mut k = kernel();
        for (i, name) in ["br-six", "veth-three"].iter().enumerate() {
            k.interfaces.insert(name.to_string(), i as u32 + 20);
        }
        k.addresses6 = vec![
            ("lo".into(), Ipv6Addr::LOCALHOST),
            ("eth0".into(), "2001:db8::1".parse().unwrap()),
            ("br-a".into(), "fd00:1::1".parse().unwrap()),
        ];
        k
    }

    fn ip6(text: &str) -> In6Addr {
        be6(text.parse().unwrap())
    }

    #[test]
    fn ipv6_endpoints_have_the_ids_of_their_ipv4_entry_and_the_gateway6() {
        let mut k = kernel6();
        let text = format!(
            "{STATE6}policies:\n  - {{name: p, action: deny, from: {{labels: {{app: web}}}}}}\n"
        );
        reconcile(&model(&text), &mut k).unwrap();
        let v4 = k.map::<Endpoints>();
        let v6 = k.map::<Endpoints6>();
        assert_eq!(v4.len(), 2, "one and two: three is IPv6-only");
        assert_eq!(v6.len(), 2, "one and three: two is IPv4-only");
        let (one4, one6) = (v4[&ip("10.1.0.2")], v6[&ip6("fd00:1::2")]);
        assert_eq!(
            (
                one6.endpoint_id,
                one6.network_id,
                one6.label_class,
                one6.ifindex,
                one6.mac,
                one6.net_flags
            ),
            (
                one4.endpoint_id,
                one4.network_id,
                one4.label_class,
                one4.ifindex,
                one4.mac,
                one4.net_flags
            )
        );
        assert_eq!((one6.endpoint_id, one6.label_class), (1, 1));
        assert_eq!(one6.gateway, ip6("fd00:1::1"));
        assert_eq!(one4.gateway, ip("10.1.0.1"));
        // NAT66 leaves with the uplink's IPv6 address (not the bridge's, not ::1).
        assert_eq!(k.config.masquerade_addr6, ip6("2001:db8::1"));
        let three = v6[&ip6("fd00:2::3")];
        assert_eq!(
            (three.endpoint_id, three.network_id, three.label_class),
            (3, 2, 1)
        );
        assert_eq!(three.net_flags, net_flags::NO_ICC);
        assert_eq!(three.gateway, ip6("fd00:2::1"));
        // An IPv6-only container's veth gets its program too.
        assert!(
            k.attached
                .contains(&("veth-three".into(), Hook::ContainerIngress))
        );
        // The host's IPv6 addresses (link-local ones are never listed).
        let local6 = k.map::<LocalAddrs6>();
        assert_eq!(
            local6.keys().copied().collect::<BTreeSet<_>>(),
            BTreeSet::from([ip6("::1"), ip6("2001:db8::1"), ip6("fd00:1::1")])
        );
        assert!(local6.values().all(|v| *v == 1));
        // Three goes: its IPv6 entry goes, the others stay.
        let smaller = format!(
            "{}policies:\n  - {{name: p, action: deny, from: {{labels: {{app: web}}}}}}\n",
            STATE6.split("  - name: three").next().unwrap()
        );
        let applied = reconcile(&model(&smaller), &mut k).unwrap();
        assert_eq!(applied.entries_removed, 1, "{applied:?}");
        assert_eq!(k.map::<Endpoints6>().len(), 1);
        assert_eq!(k.map::<Endpoints>().len(), 2);
    }

    const PORTS6: &str = r#"
ports:
  - {endpoint: one, protocol: tcp, host_port: 8080, container_port: 80}
  - {endpoint: two, protocol: tcp, host_ip: "::", host_port: 8081, container_port: 81}
  - {endpoint: three, protocol: udp, host_port: 5353, container_port: 53}
  - {endpoint: one, protocol: tcp, host_ip: "2001:db8::1", host_port: "9090-9091", container_port: "90-91"}
  - {endpoint: one, protocol: tcp, host_ip: 0.0.0.0, host_port: 9092, container_port: 92}
"#;

    fn key6(addr: &str, port: u16, proto: u8) -> PortKey6 {
        PortKey6 {
            addr: ip6(addr),
            port: port.to_be(),
            proto,
            _pad: 0,
        }
    }

    fn key4(addr: &str, port: u16, proto: u8) -> PortKey {
        PortKey {
            addr: ip(addr),
            port: port.to_be(),
            proto,
            _pad: 0,
        }
    }

    #[test]
    fn published_ports_fill_the_map_of_each_family_they_bind() {
        let mut k = kernel6();
        reconcile(&model(&format!("{STATE6}{PORTS6}")), &mut k).unwrap();
        let v4 = k.map::<Ports>();
        let v6 = k.map::<Ports6>();
        let target = |addr: In6Addr, port: u16| PortTarget6 {
            addr,
            port: port.to_be(),
            is_service: 0,
            _pad: 0,
        };
        // No host_ip: both families, each to the container's address of that family.
        assert_eq!(
            (
                v4[&key4("0.0.0.0", 8080, 6)].addr,
                v4[&key4("0.0.0.0", 8080, 6)].port
            ),
            (ip("10.1.0.2"), 80u16.to_be())
        );
        assert_eq!(v6[&key6("::", 8080, 6)], target(ip6("fd00:1::2"), 80));
        // `::` to an IPv4-only container: its IPv4-mapped address, nothing over IPv4.
        assert_eq!(v6[&key6("::", 8081, 6)], target(ip6("::ffff:10.1.0.3"), 81));
        assert!(!v4.contains_key(&key4("0.0.0.0", 8081, 6)));
        // No host_ip to an IPv6-only container: IPv6 only.
        assert_eq!(v6[&key6("::", 5353, 17)], target(ip6("fd00:2::3"), 53));
        assert!(!v4.contains_key(&key4("0.0.0.0", 5353, 17)));
        // One IPv6 host address, a range.
        assert_eq!(
            v6[&key6("2001:db8::1", 9091, 6)],
            target(ip6("fd00:1::2"), 91)
        );
        // 0.0.0.0: IPv4 only.
        assert!(v4.contains_key(&key4("0.0.0.0", 9092, 6)));
        assert!(!v6.contains_key(&key6("::", 9092, 6)));
        assert_eq!((v4.len(), v6.len()), (2, 5), "{v4:?} {v6:?}");
        // The first port goes: its entry in each family goes, nothing else.
        let fewer = PORTS6.replace(
            "  - {endpoint: one, protocol: tcp, host_port: 8080, container_port: 80}\n",
            "",
        );
        let changes = reconcile(&model(&format!("{STATE6}{fewer}")), &mut k).unwrap();
        assert_eq!(changes.entries_removed, 2, "{changes:?}");
        assert_eq!((k.map::<Ports>().len(), k.map::<Ports6>().len()), (1, 4));
    }

    #[test]
    fn routed_ipv6_ports_open_the_container_ipv6_address() {
        let mut k = kernel6();
        let routed = STATE6.replace(
            "gateway6: \"fd00:1::1\"}",
            "gateway6: \"fd00:1::1\", gateway_mode: routed}",
        );
        reconcile(&model(&format!("{routed}{PORTS6}")), &mut k).unwrap();
        let v6 = k.map::<Ports6>();
        assert_eq!(v6[&key6("fd00:1::2", 80, 6)].addr, ip6("fd00:1::2"));
        // Routed to an IPv4-only container: nothing over IPv6.
        assert!(v6.keys().all(|key| key.addr != ip6("::ffff:10.1.0.3")));
        assert!(!v6.contains_key(&key6("::", 8080, 6)));
    }

    const SERVICES6: &str = r#"
services:
  - {name: web, vip: 10.96.0.10, vip6: "fd00:96::10", port: 80, target_port: 8080, endpoints: [one, two, three]}
  - {name: web6, vip6: "fd00:96::11", port: 443, endpoints: [three]}
"#;

    #[test]
    fn a_dual_stack_service_has_one_id_one_table_and_backends_by_index_in_both_maps() {
        let mut k = kernel6();
        reconcile(&model(&format!("{STATE6}{SERVICES6}")), &mut k).unwrap();
        let key = ServiceKey {
            vip: ip("10.96.0.10"),
            port: 80u16.to_be(),
            proto: 6,
            _pad: 0,
        };
        let key6 = ServiceKey6 {
            vip: ip6("fd00:96::10"),
            port: 80u16.to_be(),
            proto: 6,
            _pad: 0,
        };
        let web = k.map::<Services>()[&key];
        assert_eq!(k.map::<Services6>()[&key6], web, "one id, count, algorithm");
        assert_eq!(web.backend_count, 3);
        let (b4, b6) = (k.map::<Backends>(), k.map::<Backends6>());
        let at = |index| BackendKey {
            service_id: web.id,
            index,
        };
        // Backends by name: one, three, two.
        assert_eq!(
            (b4[&at(0)].addr, b6[&at(0)].addr),
            (ip("10.1.0.2"), ip6("fd00:1::2"))
        );
        assert_eq!(
            (b4[&at(1)].addr, b6[&at(1)].addr),
            (0, ip6("fd00:2::3")),
            "IPv6-only: no IPv4 address"
        );
        assert_eq!(
            (b4[&at(2)].addr, b6[&at(2)].addr),
            (ip("10.1.0.3"), ip6("::ffff:10.1.0.3")),
            "IPv4-only: its mapped address"
        );
        assert!(
            b6.iter()
                .filter(|(k, _)| k.service_id == web.id)
                .all(|(_, b)| b.port == 8080u16.to_be())
        );
        let table = &k.maglev[&web.id];
        assert!(table.iter().all(|i| *i < 3));
        // The IPv6-only service: SERVICES6 only, and no IPv4 backends.
        let web6 = k
            .map::<Services6>()
            .into_iter()
            .find(|(k6, _)| k6.vip == ip6("fd00:96::11"))
            .unwrap()
            .1;
        assert_ne!(web6.id, web.id);
        assert_eq!(k.map::<Services>().len(), 1);
        assert!(b4.keys().all(|b| b.service_id != web6.id));
        assert_eq!(
            b6[&BackendKey {
                service_id: web6.id,
                index: 0
            }]
                .addr,
            ip6("fd00:2::3")
        );
        assert_eq!((b4.len(), b6.len()), (3, 4));

        // web loses its IPv4 VIP: same id (found by its IPv6 VIP), the IPv4 entry and
        // backends go, the IPv6 ones stay untouched.
        let no_v4 = SERVICES6.replace("vip: 10.96.0.10, ", "");
        reconcile(&model(&format!("{STATE6}{no_v4}")), &mut k).unwrap();
        assert_eq!(k.map::<Services6>()[&key6].id, web.id);
        assert!(k.map::<Services>().is_empty());
        assert!(k.map::<Backends>().is_empty());
        assert_eq!(k.map::<Backends6>().len(), 4);
        // ... and gets it back: still the same id.
        reconcile(&model(&format!("{STATE6}{SERVICES6}")), &mut k).unwrap();
        assert_eq!(k.map::<Services>()[&key].id, web.id);
        // A backend goes: both families' count and entries follow.
        let fewer = SERVICES6.replace("endpoints: [one, two, three]", "endpoints: [one]");
        reconcile(&model(&format!("{STATE6}{fewer}")), &mut k).unwrap();
        assert_eq!(k.map::<Services6>()[&key6].backend_count, 1);
        assert_eq!(
            (k.map::<Backends>().len(), k.map::<Backends6>().len()),
            (1, 2)
        );
        // Split in two (one VIP each): each half finds the old id, one keeps it, the other
        // gets a new one.
        let split = "services:\n  - {name: a4, vip: 10.96.0.10, port: 80, endpoints: [one]}\n  - {name: b6, vip6: \"fd00:96::10\", port: 80, endpoints: [one]}\n";
        reconcile(&model(&format!("{STATE6}{split}")), &mut k).unwrap();
        let (id4, id6) = (k.map::<Services>()[&key].id, k.map::<Services6>()[&key6].id);
        assert_ne!(id4, id6);
        assert!(id4 == web.id || id6 == web.id);
        // Every service goes.
        reconcile(&model(STATE6), &mut k).unwrap();
        assert!(k.map::<Services6>().is_empty() && k.map::<Backends6>().is_empty());
    }

    #[test]
    fn a_published_port_leads_to_a_services_vip_of_each_family() {
        let mut k = kernel6();
        let text = format!(
            "{STATE6}{SERVICES6}ports:\n  - {{service: web, protocol: tcp, host_port: 8000, container_port: 80}}\n  - {{service: web6, protocol: tcp, host_port: 8443, container_port: 443}}\n"
        );
        reconcile(&model(&text), &mut k).unwrap();
        let v6 = k.map::<Ports6>();
        assert_eq!(
            v6[&key6("::", 8000, 6)],
            PortTarget6 {
                addr: ip6("fd00:96::10"),
                port: 80u16.to_be(),
                is_service: 1,
                _pad: 0
            }
        );
        assert_eq!(v6[&key6("::", 8443, 6)].addr, ip6("fd00:96::11"));
        let v4 = k.map::<Ports>();
        assert_eq!(v4[&key4("0.0.0.0", 8000, 6)].addr, ip("10.96.0.10"));
        assert!(
            !v4.contains_key(&key4("0.0.0.0", 8443, 6)),
            "web6 has no IPv4 VIP"
        );
    }

    #[test]
    fn ipv6_cidr_policies_fill_the_ipv6_trie_and_deny_list() {
        let mut k = kernel6();
        let policies = r#"
policies:
  - {name: b6, action: deny, from: {cidr: "2001:db8:bad::/48"}}
  - {name: only6, action: allow, from: {cidr: "2001:db8::/32"}, to: {endpoint: three}}
"#;
        reconcile(&model(&format!("{STATE6}{policies}")), &mut k).unwrap();
        let live = k.meta.unwrap().slot;
        // Classes: /32 = 1, /48 = 2 (IPv6 only here, so from 1).
        assert_eq!(
            k.prefixes6,
            BTreeMap::from([
                ((live, 32, ip6("2001:db8::")), 1),
                ((live, 48, ip6("2001:db8:bad::")), 2)
            ])
        );
        assert!(k.prefixes.is_empty());
        assert_eq!(k.config.rule_count, 2);
        assert_eq!(
            k.deny6,
            BTreeSet::from([PrefixKey6 {
                prefix_len: 48,
                addr: ip6("2001:db8:bad::")
            }])
        );
        assert!(k.deny.is_empty());
        // The IPv6 deny list alone attaches XDP, as the IPv4 one does.
        assert!(k.attached.contains(&("eth0".into(), Hook::UplinkXdp)));
        // The same again: nothing written.
        let writes = k.writes;
        reconcile(&model(&format!("{STATE6}{policies}")), &mut k).unwrap();
        assert_eq!(k.writes, writes);
        // Another IPv6 prefix: the other half becomes live, the old half empties.
        let other = policies.replace("2001:db8:bad::/48", "2001:db8:bad::/64");
        reconcile(&model(&format!("{STATE6}{other}")), &mut k).unwrap();
        assert_eq!(k.meta.unwrap().slot, 1 - live);
        assert!(k.prefixes6.keys().all(|(slot, _, _)| *slot == 1 - live));
        assert_eq!(k.deny6.len(), 1);
        reconcile(&model(STATE6), &mut k).unwrap();
        assert!(k.prefixes6.is_empty() && k.deny6.is_empty());
        assert!(!k.attached.contains(&("eth0".into(), Hook::UplinkXdp)));
    }

    #[test]
    fn ipv6_maps_are_idempotent_and_drift_is_repaired() {
        let mut k = kernel6();
        let m = model(&format!("{STATE6}{PORTS6}{SERVICES6}"));
        reconcile(&m, &mut k).unwrap();
        let writes = k.writes;
        assert!(reconcile(&m, &mut k).unwrap().is_empty());
        assert_eq!(k.writes, writes);
        // Entries an earlier agent left, and one changed behind the agent's back.
        k.set::<Endpoints6>(ip6("fd00:9::9"), EndpointInfo6::default())
            .unwrap();
        k.set::<Ports6>(key6("::", 1, 6), PortTarget6::default())
            .unwrap();
        k.set::<LocalAddrs6>(ip6("2001:db8::99"), 1).unwrap();
        k.set::<Ports6>(key6("::", 8080, 6), PortTarget6::default())
            .unwrap();
        let changes = reconcile(&m, &mut k).unwrap();
        // (The gone endpoint also moves the policy generation: the config is written too.)
        assert_eq!(changes.entries_removed, 3, "{changes:?}");
        assert!(changes.entries_set >= 1, "{changes:?}");
        assert_eq!(
            k.map::<Ports6>()[&key6("::", 8080, 6)].addr,
            ip6("fd00:1::2")
        );
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
