//! The one model of desired state, and the state file that describes it (docs/DESIGN.md
//! section 5). Every source (state file, Docker, sandbox) produces a [`Model`]; the reconciler
//! is the only thing that turns it into map entries.
//!
//! Parsing is two steps: serde reads the file into `*Spec` structs (rejecting unknown fields
//! and wrong types with a line and column), then [`Model::from_spec`] checks meaning and names
//! the entry and field of the first problem, e.g. `endpoints[web1].interfaces[0].ip`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use serde::{Deserialize, Serialize};

pub mod parse;

pub use parse::ParseFailure;

/// A problem in the state file, located by entry and field.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("cannot read state file {path}: {message}")]
    Read { path: String, message: String },
    #[error("state file {path} is empty (an empty state is written `{{}}`); not applied")]
    Empty { path: String },
    #[error("state file {path}: {found}, over the limit {limit} = {max}")]
    Limit {
        path: String,
        /// The name of the cap, as in [`parse`] (e.g. `MAX_DEPTH`).
        limit: &'static str,
        max: u64,
        found: String,
    },
    #[error("state file {path} is not valid YAML/JSON for this schema: {message}")]
    Syntax { path: String, message: String },
    #[error("{entry}.{field}: {message}")]
    Invalid {
        /// The entry, e.g. `endpoints[web1]` or `networks[2]` when it has no name.
        entry: String,
        /// The field within the entry, e.g. `interfaces[0].ip`.
        field: String,
        message: String,
    },
}

fn invalid(
    entry: impl Into<String>,
    field: impl Into<String>,
    message: impl fmt::Display,
) -> StateError {
    StateError::Invalid {
        entry: entry.into(),
        field: field.into(),
        message: message.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// The file as written (serde).

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<String>,
    #[serde(default)]
    pub networks: Vec<NetworkSpec>,
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    #[serde(default)]
    pub policies: Vec<PolicySpec>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    pub name: String,
    pub bridge: String,
    /// IPv4; optional when `subnet6` is given (an IPv6-only network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// IPv6 (`docker network create --ipv6`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet6: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<String>,
    #[serde(default)]
    pub internal: bool,
    #[serde(default = "default_true")]
    pub icc: bool,
    /// Docker 28's `com.docker.network.bridge.gateway_mode_ipv4`: `nat` (the default),
    /// `nat-unprotected`, `routed` or `isolated`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_mode: Option<String>,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub interfaces: Vec<InterfaceSpec>,
    /// The container's network namespace as a file (`/proc/PID/ns/net`, or a bind mount
    /// such as `/run/netns/NAME` or Docker's SandboxKey): where the agent learns its netns
    /// cookie, so that the socket hooks translate the container's connections to VIPs at
    /// connect() (on cgroups given with `--container-cgroup`, or under `--cgroup`). Without
    /// it the container's VIP connections are translated per packet at its veth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// Docker Swarm overlay networks the container is on. Their interfaces are not the
    /// host's (they live in the overlay's own namespace), so they are no `interfaces`; a
    /// service of such a network (`overlay`) is translated for this container's sockets only
    /// when it is on that network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overlays: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InterfaceSpec {
    pub network: String,
    /// Required on a network with an IPv4 subnet, refused on an IPv6-only one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Optional on a dual-stack network, required on an IPv6-only one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<String>,
    pub mac: String,
    pub host_veth: String,
}

/// A port number or a range written as "8000-8010".
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum PortValue {
    Number(u32),
    Text(String),
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    pub protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
    pub host_port: PortValue,
    pub container_port: PortValue,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    /// IPv4; optional when `vip6` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<String>,
    /// The same service over IPv6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip6: Option<String>,
    /// 0: every port, each to the same port of the backend (as a Docker Swarm VIP forwards
    /// them all; no `target_port` then). Such a service is answered at the socket hooks only.
    pub port: u32,
    #[serde(default = "default_tcp")]
    pub protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<String>>,
    #[serde(default = "default_algorithm")]
    pub algorithm: String,
    /// Relative weights of backends by endpoint name (default 1; 0 takes a backend out of
    /// new connections). Used by maglev and source_hash.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub weights: BTreeMap<String, u32>,
    /// Backends that are not endpoints of this host, by name and IPv4 address: reached by
    /// routing, never through a veth of ours (Docker Swarm tasks on every node, which the
    /// Docker source fills in). Weight 1 each; beside or instead of `selector`/`endpoints`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub addresses: BTreeMap<String, String>,
    /// A Docker Swarm overlay network: the VIP is translated only for the sockets of
    /// containers on it (`overlays` of an endpoint), as only they can reach its tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<String>,
}

fn default_tcp() -> String {
    "tcp".into()
}

fn default_algorithm() -> String {
    "maglev".into()
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    pub name: String,
    pub action: String,
    #[serde(default)]
    pub from: SelectorSpec,
    #[serde(default)]
    pub to: SelectorSpec,
    #[serde(default)]
    pub ports: Vec<String>,
}

/// Whom a policy side matches. Empty matches everything.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SelectorSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// The validated model.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }

    fn parse(text: &str) -> Option<Protocol> {
        match text {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, len) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not a CIDR (expected a.b.c.d/len)"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
        let prefix_len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| format!("prefix length {len:?} is not 0-32"))?;
        let cidr = Cidr { addr, prefix_len };
        if cidr.network() != addr {
            return Err(format!(
                "{text} has host bits set (the network is {}/{prefix_len})",
                cidr.network()
            ));
        }
        Ok(cidr)
    }

    pub fn mask(&self) -> u32 {
        if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix_len))
        }
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// An IPv6 prefix, as [`Cidr`] is an IPv4 one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Cidr6 {
    pub addr: Ipv6Addr,
    pub prefix_len: u8,
}

impl Cidr6 {
    pub fn parse(text: &str) -> Result<Cidr6, String> {
        let (addr, len) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not a CIDR (expected an IPv6 address/len)"))?;
        let addr: Ipv6Addr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IPv6 address"))?;
        let prefix_len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= 128)
            .ok_or_else(|| format!("prefix length {len:?} is not 0-128"))?;
        let cidr = Cidr6 { addr, prefix_len };
        if cidr.network() != addr {
            return Err(format!(
                "{text} has host bits set (the network is {}/{prefix_len})",
                cidr.network()
            ));
        }
        Ok(cidr)
    }

    pub fn mask(&self) -> u128 {
        if self.prefix_len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(self.prefix_len))
        }
    }

    pub fn network(&self) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.addr) & self.mask())
    }

    pub fn contains(&self, ip: Ipv6Addr) -> bool {
        u128::from(ip) & self.mask() == u128::from(self.addr) & self.mask()
    }

    /// Whether the two prefixes share an address.
    pub fn overlaps(&self, other: &Cidr6) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }
}

impl fmt::Display for Cidr6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// A prefix of either family (a policy's `cidr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum IpCidr {
    V4(Cidr),
    V6(Cidr6),
}

impl IpCidr {
    /// An IPv6 prefix when the text has a `:`, else an IPv4 one.
    pub fn parse(text: &str) -> Result<IpCidr, String> {
        if text.contains(':') {
            Cidr6::parse(text).map(IpCidr::V6)
        } else {
            Cidr::parse(text).map(IpCidr::V4)
        }
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IpCidr::V4(c) => c.fmt(f),
            IpCidr::V6(c) => c.fmt(f),
        }
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`): how an IPv4-only container or backend is
/// written in the IPv6 maps (the kernel translates to IPv4 there), so no IPv6 network,
/// address or VIP may lie in it.
pub const IPV4_MAPPED: Cidr6 = Cidr6 {
    addr: Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0),
    prefix_len: 96,
};

/// Link-local unicast (fe80::/10): every interface has one of its own; never a container's,
/// a VIP or a network's.
pub const LINK_LOCAL6: Cidr6 = Cidr6 {
    addr: Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
    prefix_len: 10,
};

/// Why an IPv6 address cannot be a container's, a gateway or a VIP (None: it can).
fn not_unicast6(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
        Some("not a unicast address")
    } else if IPV4_MAPPED.contains(ip) {
        Some("an IPv4-mapped address (::ffff:0:0/96)")
    } else if LINK_LOCAL6.contains(ip) {
        Some("a link-local address (fe80::/10)")
    } else {
        None
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Network {
    pub name: String,
    pub bridge: String,
    /// None: an IPv6-only network (then `subnet6` is set).
    pub subnet: Option<Cidr>,
    /// Set exactly when `subnet` is.
    pub gateway: Option<Ipv4Addr>,
    pub subnet6: Option<Cidr6>,
    /// Set exactly when `subnet6` is.
    pub gateway6: Option<Ipv6Addr>,
    pub internal: bool,
    pub icc: bool,
    pub gateway_mode: GatewayMode,
}

/// How a network meets the world outside the host (Docker 28's gateway modes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GatewayMode {
    /// Outbound connections masqueraded, published ports on the host's addresses, container
    /// addresses closed to the outside (Docker 28's default).
    #[default]
    Nat,
    /// As `nat`, and every port of the container addresses open to hosts that route to them.
    NatUnprotected,
    /// No masquerade: containers keep their addresses on the way out; a published port is
    /// opened on the container's own address (the host port is not used), other ports stay
    /// closed; ICMP reaches the containers.
    Routed,
    /// No traffic between the network and outside the host (as `internal`).
    Isolated,
}

impl GatewayMode {
    pub fn parse(text: &str) -> Result<GatewayMode, String> {
        Ok(match text {
            "nat" => GatewayMode::Nat,
            "nat-unprotected" => GatewayMode::NatUnprotected,
            "routed" => GatewayMode::Routed,
            "isolated" => GatewayMode::Isolated,
            other => {
                return Err(format!(
                    "{other:?} is not nat, nat-unprotected, routed or isolated"
                ));
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Interface {
    pub network: String,
    /// Set exactly when its network has an IPv4 subnet.
    pub ip: Option<Ipv4Addr>,
    /// Always set on an IPv6-only network; optional on a dual-stack one.
    pub ip6: Option<Ipv6Addr>,
    pub mac: [u8; 6],
    pub host_veth: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub interfaces: Vec<Interface>,
    /// See [`EndpointSpec::netns`].
    pub netns: Option<String>,
    /// See [`EndpointSpec::overlays`]; sorted.
    pub overlays: Vec<String>,
}

/// Inclusive port range; a single port has `first == last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    fn parse(value: &PortValue) -> Result<PortRange, String> {
        let port = |n: u32| -> Result<u16, String> {
            u16::try_from(n)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("port {n} is not 1-65535"))
        };
        match value {
            PortValue::Number(n) => {
                let p = port(*n)?;
                Ok(PortRange { first: p, last: p })
            }
            PortValue::Text(text) => {
                let number = |s: &str| -> Result<u16, String> {
                    let n: u32 = s
                        .trim()
                        .parse()
                        .map_err(|_| format!("{text:?} is not a port or a range like 8000-8010"))?;
                    port(n)
                };
                let (first, last) = match text.split_once('-') {
                    Some((a, b)) => (number(a)?, number(b)?),
                    None => {
                        let p = number(text)?;
                        (p, p)
                    }
                };
                if first > last {
                    return Err(format!("range {text:?} ends before it starts"));
                }
                Ok(PortRange { first, last })
            }
        }
    }

    #[expect(
        clippy::len_without_is_empty,
        reason = "a range holds at least one port"
    )]
    pub fn len(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }
}

/// What a published port leads to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PortTarget {
    Endpoint(String),
    Service(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PublishedPort {
    pub target: PortTarget,
    pub protocol: Protocol,
    /// `None`: every host address of both families; `0.0.0.0` every IPv4 one, `::` every
    /// IPv6 one; else that one address.
    pub host_ip: Option<IpAddr>,
    pub host_ports: PortRange,
    pub container_ports: PortRange,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    Maglev,
    Random,
    RoundRobin,
    SourceHash,
}

impl Algorithm {
    fn parse(text: &str) -> Result<Algorithm, String> {
        Ok(match text {
            "maglev" => Algorithm::Maglev,
            "random" => Algorithm::Random,
            "round_robin" => Algorithm::RoundRobin,
            "source_hash" => Algorithm::SourceHash,
            other => {
                return Err(format!(
                    "{other:?} is not maglev, random, round_robin or source_hash"
                ));
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    pub name: String,
    /// At least one of `vip` and `vip6` is set.
    pub vip: Option<Ipv4Addr>,
    pub vip6: Option<Ipv6Addr>,
    /// 0: every port (see [`ServiceSpec::port`]).
    pub port: u16,
    pub protocol: Protocol,
    /// 0 with `port` 0: the port asked.
    pub target_port: u16,
    pub algorithm: Algorithm,
    /// Endpoint names, resolved from the selector or the list, sorted.
    pub backends: Vec<String>,
    /// Weight of each backend (same order as `backends`).
    pub weights: Vec<u32>,
    /// Backends by address (see [`ServiceSpec::addresses`]), sorted by name; after
    /// `backends` in the service's backend list.
    pub remote: Vec<RemoteBackend>,
    /// See [`ServiceSpec::overlay`].
    pub overlay: Option<String>,
}

/// A backend that is no endpoint of this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RemoteBackend {
    pub name: String,
    pub addr: Ipv4Addr,
}

impl Service {
    /// Its VIPs, IPv4 first.
    pub fn addresses(&self) -> Vec<IpAddr> {
        self.vip
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.vip6.map(IpAddr::V6))
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Selector {
    Any,
    Network(String),
    Endpoint(String),
    Labels(BTreeMap<String, String>),
    Cidr(IpCidr),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub name: String,
    pub action: Action,
    pub from: Selector,
    pub to: Selector,
    /// Empty: every port and protocol.
    pub ports: Vec<(u16, Protocol)>,
}

/// The desired state of the dataplane, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Model {
    pub uplink: Option<String>,
    pub networks: Vec<Network>,
    pub endpoints: Vec<Endpoint>,
    pub ports: Vec<PublishedPort>,
    pub services: Vec<Service>,
    pub policies: Vec<Policy>,
}

/// An interface name as Linux accepts it.
fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.len() > 15 {
        return Err(format!(
            "{name:?} is longer than 15 characters (Linux IFNAMSIZ)"
        ));
    }
    if name
        .chars()
        .any(|c| c == '/' || c.is_whitespace() || c == ':')
    {
        return Err(format!("{name:?} contains '/', ':' or whitespace"));
    }
    Ok(())
}

fn parse_ip(text: &str) -> Result<Ipv4Addr, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not an IPv4 address"))
}

fn parse_ip6(text: &str) -> Result<Ipv6Addr, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not an IPv6 address"))
}

pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = text.split(':').collect();
    let bad = || format!("{text:?} is not a MAC address like 02:42:ac:1e:01:02");
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 == 1 {
        return Err(format!("{text} is a multicast address"));
    }
    Ok(mac)
}

/// `entries[name]` when the entry has a usable name, else `entries[index]`.
fn entry_label(kind: &str, index: usize, name: &str) -> String {
    if name.is_empty() {
        format!("{kind}[{index}]")
    } else {
        format!("{kind}[{name}]")
    }
}

impl Model {
    /// The overlay networks services are scoped to (at most [`MAX_OVERLAYS`]).
    pub fn overlays(&self) -> BTreeSet<&str> {
        self.services
            .iter()
            .filter_map(|s| s.overlay.as_deref())
            .collect()
    }

    /// Every endpoint by its name (the first of a name): what looking an endpoint up for each
    /// service backend or published port goes through, so that it is not a search of the list
    /// each time (quadratic at thousands of them).
    pub fn endpoints_by_name(&self) -> HashMap<&str, &Endpoint> {
        first_by_name(&self.endpoints, |e| &e.name)
    }

    /// Every service by its name, for the published ports that lead to one.
    pub fn services_by_name(&self) -> HashMap<&str, &Service> {
        first_by_name(&self.services, |s| &s.name)
    }

    /// Reads and validates a state file (YAML or JSON). The agent reads its state file through
    /// [`crate::source::state_file`], which also waits for a file to be whole.
    pub fn load(path: &Path) -> Result<(StateFile, Model), StateError> {
        let text = std::fs::read_to_string(path).map_err(|e| StateError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Model::from_text(&path.display().to_string(), &text)
    }

    /// Parses (within the caps of [`parse`]) and validates the text of the state file `path`.
    pub fn from_text(path: &str, text: &str) -> Result<(StateFile, Model), StateError> {
        let path = path.to_owned();
        let spec = parse::parse(text).map_err(|failure| match failure {
            ParseFailure::Empty => StateError::Empty { path: path.clone() },
            ParseFailure::Limit { limit, max, found } => StateError::Limit {
                path: path.clone(),
                limit,
                max,
                found,
            },
            ParseFailure::Syntax(message) => StateError::Syntax {
                path: path.clone(),
                message,
            },
        })?;
        let model = Model::from_spec(&spec)?;
        Ok((spec, model))
    }

    pub fn from_spec(spec: &StateFile) -> Result<Model, StateError> {
        if let Some(uplink) = &spec.uplink {
            check_ifname(uplink).map_err(|m| invalid("state", "uplink", m))?;
        }
        let networks = Self::networks(spec)?;
        let endpoints = Self::endpoints(spec, &networks)?;
        let services = Self::services(spec, &networks, &endpoints)?;
        let ports = Self::ports(spec, &endpoints, &services)?;
        let policies = Self::policies(spec, &networks, &endpoints)?;
        Ok(Model {
            uplink: spec.uplink.clone(),
            networks,
            endpoints,
            ports,
            services,
            policies,
        })
    }

    fn networks(spec: &StateFile) -> Result<Vec<Network>, StateError> {
        let mut names = BTreeSet::new();
        let mut bridges = HashMap::new();
        let mut networks: Vec<Network> = Vec::new();
        for (i, n) in spec.networks.iter().enumerate() {
            let entry = entry_label("networks", i, &n.name);
            if n.name.is_empty() {
                return Err(invalid(entry, "name", "is empty"));
            }
            if !names.insert(n.name.as_str()) {
                return Err(invalid(entry, "name", "is used by an earlier network"));
            }
            check_ifname(&n.bridge).map_err(|m| invalid(&entry, "bridge", m))?;
            if let Some(other) = bridges.insert(n.bridge.as_str(), n.name.as_str()) {
                return Err(invalid(
                    entry,
                    "bridge",
                    format!("{:?} is already the bridge of network {other}", n.bridge),
                ));
            }
            if n.subnet.is_none() && n.subnet6.is_none() {
                return Err(invalid(
                    entry,
                    "subnet",
                    "give subnet, subnet6 or both (an IPv6-only network has subnet6 only)",
                ));
            }
            let (subnet, gateway) = match (&n.subnet, &n.gateway) {
                (None, None) => (None, None),
                (None, Some(_)) => {
                    return Err(invalid(entry, "gateway", "is given without a subnet"));
                }
                (Some(_), None) => {
                    return Err(invalid(entry, "gateway", "is required with subnet"));
                }
                (Some(subnet), Some(gateway)) => {
                    let subnet = Cidr::parse(subnet).map_err(|m| invalid(&entry, "subnet", m))?;
                    if let Some((other, other_subnet)) = networks.iter().find_map(|o| {
                        o.subnet
                            .filter(|os| os.contains(subnet.addr) || subnet.contains(os.addr))
                            .map(|os| (o, os))
                    }) {
                        return Err(invalid(
                            entry,
                            "subnet",
                            format!("{subnet} overlaps {other_subnet} of network {}", other.name),
                        ));
                    }
                    let gateway = parse_ip(gateway).map_err(|m| invalid(&entry, "gateway", m))?;
                    if !subnet.contains(gateway) {
                        return Err(invalid(
                            entry,
                            "gateway",
                            format!("{gateway} is outside the subnet {subnet}"),
                        ));
                    }
                    (Some(subnet), Some(gateway))
                }
            };
            let (subnet6, gateway6) = match (&n.subnet6, &n.gateway6) {
                (None, None) => (None, None),
                (None, Some(_)) => {
                    return Err(invalid(entry, "gateway6", "is given without a subnet6"));
                }
                (Some(_), None) => {
                    return Err(invalid(entry, "gateway6", "is required with subnet6"));
                }
                (Some(subnet6), Some(gateway6)) => {
                    let subnet6 =
                        Cidr6::parse(subnet6).map_err(|m| invalid(&entry, "subnet6", m))?;
                    for reserved in [IPV4_MAPPED, LINK_LOCAL6] {
                        if subnet6.overlaps(&reserved) {
                            return Err(invalid(
                                entry,
                                "subnet6",
                                format!("{subnet6} overlaps the reserved {reserved}"),
                            ));
                        }
                    }
                    if subnet6.addr.is_multicast() || subnet6.prefix_len < 8 {
                        return Err(invalid(
                            entry,
                            "subnet6",
                            format!("{subnet6} is not a unicast subnet of at most /8"),
                        ));
                    }
                    if let Some((other, other_subnet)) = networks.iter().find_map(|o| {
                        o.subnet6
                            .filter(|os| os.overlaps(&subnet6))
                            .map(|os| (o, os))
                    }) {
                        return Err(invalid(
                            entry,
                            "subnet6",
                            format!(
                                "{subnet6} overlaps {other_subnet} of network {}",
                                other.name
                            ),
                        ));
                    }
                    let gateway6 =
                        parse_ip6(gateway6).map_err(|m| invalid(&entry, "gateway6", m))?;
                    if !subnet6.contains(gateway6) {
                        return Err(invalid(
                            entry,
                            "gateway6",
                            format!("{gateway6} is outside the subnet {subnet6}"),
                        ));
                    }
                    if gateway6 == subnet6.network() {
                        return Err(invalid(
                            entry,
                            "gateway6",
                            format!("{gateway6} is the subnet-router anycast address of {subnet6}"),
                        ));
                    }
                    (Some(subnet6), Some(gateway6))
                }
            };
            networks.push(Network {
                name: n.name.clone(),
                bridge: n.bridge.clone(),
                subnet,
                gateway,
                subnet6,
                gateway6,
                internal: n.internal,
                icc: n.icc,
                gateway_mode: n
                    .gateway_mode
                    .as_deref()
                    .map(GatewayMode::parse)
                    .transpose()
                    .map_err(|m| invalid(&entry, "gateway_mode", m))?
                    .unwrap_or_default(),
            });
        }
        Ok(networks)
    }

    fn endpoints(spec: &StateFile, networks: &[Network]) -> Result<Vec<Endpoint>, StateError> {
        let mut names = BTreeSet::new();
        // Address -> (endpoint, field) of its first use, to name both sides of a duplicate.
        let mut ips: HashMap<IpAddr, String> = HashMap::new();
        let mut veths: HashMap<&str, String> = HashMap::new();
        let mut macs: HashMap<[u8; 6], String> = HashMap::new();
        let mut endpoints = Vec::new();
        for (i, e) in spec.endpoints.iter().enumerate() {
            let entry = entry_label("endpoints", i, &e.name);
            if e.name.is_empty() {
                return Err(invalid(entry, "name", "is empty"));
            }
            if !names.insert(e.name.as_str()) {
                return Err(invalid(entry, "name", "is used by an earlier endpoint"));
            }
            let mut interfaces = Vec::new();
            let mut on_networks = BTreeSet::new();
            for (j, itf) in e.interfaces.iter().enumerate() {
                let field = |f: &str| format!("interfaces[{j}].{f}");
                let network = networks
                    .iter()
                    .find(|n| n.name == itf.network)
                    .ok_or_else(|| {
                        invalid(
                            &entry,
                            field("network"),
                            format!("unknown network {:?}", itf.network),
                        )
                    })?;
                if !on_networks.insert(itf.network.as_str()) {
                    return Err(invalid(
                        &entry,
                        field("network"),
                        format!("the endpoint is already on network {}", itf.network),
                    ));
                }
                let ip = match (&itf.ip, network.subnet, network.gateway) {
                    (None, None, _) => None,
                    (None, Some(subnet), _) => {
                        return Err(invalid(
                            &entry,
                            field("ip"),
                            format!(
                                "is required: network {} has the IPv4 subnet {subnet}",
                                network.name
                            ),
                        ));
                    }
                    (Some(_), None, _) | (Some(_), _, None) => {
                        return Err(invalid(
                            &entry,
                            field("ip"),
                            format!(
                                "network {} is IPv6-only (no subnet); give ip6",
                                network.name
                            ),
                        ));
                    }
                    (Some(text), Some(subnet), Some(gateway)) => {
                        let ip = parse_ip(text).map_err(|m| invalid(&entry, field("ip"), m))?;
                        if !subnet.contains(ip) {
                            return Err(invalid(
                                &entry,
                                field("ip"),
                                format!("{ip} is outside {}'s subnet {subnet}", network.name),
                            ));
                        }
                        if ip == gateway {
                            return Err(invalid(
                                &entry,
                                field("ip"),
                                format!("{ip} is the gateway of network {}", network.name),
                            ));
                        }
                        if let Some(first) =
                            ips.insert(IpAddr::V4(ip), format!("{entry}.{}", field("ip")))
                        {
                            return Err(invalid(
                                &entry,
                                field("ip"),
                                format!("duplicate IP {ip}: already used by {first}"),
                            ));
                        }
                        Some(ip)
                    }
                };
                let ip6 = match (&itf.ip6, network.subnet6, network.gateway6) {
                    (None, _, _) if ip.is_none() => {
                        return Err(invalid(
                            &entry,
                            field("ip6"),
                            format!("is required: network {} is IPv6-only", network.name),
                        ));
                    }
                    (None, _, _) => None,
                    (Some(_), None, _) | (Some(_), _, None) => {
                        return Err(invalid(
                            &entry,
                            field("ip6"),
                            format!("network {} has no subnet6", network.name),
                        ));
                    }
                    (Some(text), Some(subnet6), Some(gateway6)) => {
                        let ip6 = parse_ip6(text).map_err(|m| invalid(&entry, field("ip6"), m))?;
                        if !subnet6.contains(ip6) {
                            return Err(invalid(
                                &entry,
                                field("ip6"),
                                format!("{ip6} is outside {}'s subnet6 {subnet6}", network.name),
                            ));
                        }
                        if ip6 == gateway6 {
                            return Err(invalid(
                                &entry,
                                field("ip6"),
                                format!("{ip6} is the gateway6 of network {}", network.name),
                            ));
                        }
                        if ip6 == subnet6.network() {
                            return Err(invalid(
                                &entry,
                                field("ip6"),
                                format!("{ip6} is the subnet-router anycast address of {subnet6}"),
                            ));
                        }
                        if let Some(why) = not_unicast6(ip6) {
                            return Err(invalid(&entry, field("ip6"), format!("{ip6} is {why}")));
                        }
                        if let Some(first) =
                            ips.insert(IpAddr::V6(ip6), format!("{entry}.{}", field("ip6")))
                        {
                            return Err(invalid(
                                &entry,
                                field("ip6"),
                                format!("duplicate IP {ip6}: already used by {first}"),
                            ));
                        }
                        Some(ip6)
                    }
                };
                let mac = parse_mac(&itf.mac).map_err(|m| invalid(&entry, field("mac"), m))?;
                if let Some(first) = macs.insert(mac, entry.clone()) {
                    return Err(invalid(
                        &entry,
                        field("mac"),
                        format!("duplicate MAC {}: already used by {first}", itf.mac),
                    ));
                }
                check_ifname(&itf.host_veth).map_err(|m| invalid(&entry, field("host_veth"), m))?;
                if networks.iter().any(|n| n.bridge == itf.host_veth) {
                    return Err(invalid(
                        &entry,
                        field("host_veth"),
                        format!("{:?} is the name of a bridge", itf.host_veth),
                    ));
                }
                if let Some(first) = veths.insert(itf.host_veth.as_str(), entry.clone()) {
                    return Err(invalid(
                        &entry,
                        field("host_veth"),
                        format!("{:?} is already used by {first}", itf.host_veth),
                    ));
                }
                interfaces.push(Interface {
                    network: itf.network.clone(),
                    ip,
                    ip6,
                    mac,
                    host_veth: itf.host_veth.clone(),
                });
            }
            endpoints.push(Endpoint {
                name: e.name.clone(),
                labels: e.labels.clone(),
                interfaces,
                netns: e.netns.clone().filter(|n| !n.is_empty()),
                overlays: {
                    let mut overlays = e.overlays.clone();
                    overlays.sort();
                    overlays.dedup();
                    overlays
                },
            });
        }
        Ok(endpoints)
    }

    fn services(
        spec: &StateFile,
        networks: &[Network],
        endpoints: &[Endpoint],
    ) -> Result<Vec<Service>, StateError> {
        let mut names = BTreeSet::new();
        let mut vips = HashMap::new();
        let mut overlays = BTreeSet::new();
        let mut services = Vec::new();
        for (i, s) in spec.services.iter().enumerate() {
            let entry = entry_label("services", i, &s.name);
            if s.name.is_empty() {
                return Err(invalid(entry, "name", "is empty"));
            }
            if !names.insert(s.name.as_str()) {
                return Err(invalid(entry, "name", "is used by an earlier service"));
            }
            let vip = s
                .vip
                .as_deref()
                .map(|text| {
                    let vip = parse_ip(text)?;
                    check_vip(vip, networks, endpoints)?;
                    Ok(vip)
                })
                .transpose()
                .map_err(|m: String| invalid(&entry, "vip", m))?;
            let vip6 = s
                .vip6
                .as_deref()
                .map(|text| {
                    let vip6 = parse_ip6(text)?;
                    check_vip6(vip6, networks, endpoints)?;
                    Ok(vip6)
                })
                .transpose()
                .map_err(|m: String| invalid(&entry, "vip6", m))?;
            if vip.is_none() && vip6.is_none() {
                return Err(invalid(entry, "vip", "give vip, vip6 or both"));
            }
            // Port 0 is every port (a Swarm VIP's), each to itself.
            let port = match s.port {
                0 => 0,
                p => single_port(p).map_err(|m| invalid(&entry, "port", m))?,
            };
            let protocol = Protocol::parse(&s.protocol).ok_or_else(|| {
                invalid(
                    &entry,
                    "protocol",
                    format!("{:?} is not tcp or udp", s.protocol),
                )
            })?;
            for (field, address) in [("vip", vip.map(IpAddr::V4)), ("vip6", vip6.map(IpAddr::V6))] {
                let Some(address) = address else { continue };
                if let Some(first) = vips.insert((address, port, protocol), entry.clone()) {
                    let shown = match address {
                        IpAddr::V4(a) => format!("{a}:{port}"),
                        IpAddr::V6(a) => format!("[{a}]:{port}"),
                    };
                    return Err(invalid(
                        &entry,
                        field,
                        format!("{shown}/{protocol} is already the address of {first}"),
                    ));
                }
            }
            let target_port = match s.target_port {
                Some(_) if port == 0 => {
                    return Err(invalid(
                        &entry,
                        "target_port",
                        "a service on every port (port 0) leads each to itself: no target_port",
                    ));
                }
                Some(p) => single_port(p).map_err(|m| invalid(&entry, "target_port", m))?,
                None => port,
            };
            let algorithm =
                Algorithm::parse(&s.algorithm).map_err(|m| invalid(&entry, "algorithm", m))?;
            let (backends, weights) = service_backends(&entry, s, endpoints)?;
            let mut remote = Vec::new();
            for (name, addr) in &s.addresses {
                if name.is_empty() || backends.contains(name) {
                    return Err(invalid(
                        &entry,
                        "addresses",
                        format!("{name:?} is empty or already the name of a backend"),
                    ));
                }
                let addr =
                    parse_ip(addr).map_err(|m| invalid(&entry, format!("addresses.{name}"), m))?;
                remote.push(RemoteBackend {
                    name: name.clone(),
                    addr,
                });
            }
            let overlay = s.overlay.clone().filter(|o| !o.is_empty());
            if let Some(o) = &overlay {
                overlays.insert(o.clone());
                if overlays.len() > MAX_OVERLAYS {
                    return Err(invalid(
                        &entry,
                        "overlay",
                        format!(
                            "{o:?} would be the services' overlay network number {}: at most {MAX_OVERLAYS}",
                            overlays.len()
                        ),
                    ));
                }
                // As Swarm's: an IPv4 VIP on every port. The socket hooks alone answer it
                // (the packet path does not know who is on an overlay).
                if vip.is_none() || vip6.is_some() || port != 0 {
                    return Err(invalid(
                        &entry,
                        "overlay",
                        "an overlay network's service has an IPv4 vip only and port 0 (every port)",
                    ));
                }
            }
            services.push(Service {
                name: s.name.clone(),
                vip,
                vip6,
                port,
                protocol,
                target_port,
                algorithm,
                backends,
                weights,
                remote,
                overlay,
            });
        }
        Ok(services)
    }

    fn ports(
        spec: &StateFile,
        endpoints: &[Endpoint],
        services: &[Service],
    ) -> Result<Vec<PublishedPort>, StateError> {
        let mut ports: Vec<PublishedPort> = Vec::new();
        let mut book = PortBook::default();
        let endpoint_names: BTreeSet<&str> = endpoints.iter().map(|e| e.name.as_str()).collect();
        let services_by_name = first_by_name(services, |s| &s.name);
        for (i, p) in spec.ports.iter().enumerate() {
            let entry = format!("ports[{i}]");
            let target = match (&p.endpoint, &p.service) {
                (Some(e), None) => {
                    if !endpoint_names.contains(e.as_str()) {
                        return Err(invalid(
                            entry,
                            "endpoint",
                            format!("unknown endpoint {e:?}"),
                        ));
                    }
                    PortTarget::Endpoint(e.clone())
                }
                (None, Some(s)) => {
                    let Some(service) = services_by_name.get(s.as_str()) else {
                        return Err(invalid(entry, "service", format!("unknown service {s:?}")));
                    };
                    if service.port == 0 {
                        return Err(invalid(
                            entry,
                            "service",
                            format!("{s:?} is on every port (port 0): publish a port of it"),
                        ));
                    }
                    PortTarget::Service(s.clone())
                }
                _ => {
                    return Err(invalid(
                        entry,
                        "endpoint",
                        "give exactly one of endpoint or service",
                    ));
                }
            };
            let protocol = Protocol::parse(&p.protocol).ok_or_else(|| {
                invalid(
                    &entry,
                    "protocol",
                    format!("{:?} is not tcp or udp", p.protocol),
                )
            })?;
            let host_ip = match p.host_ip.as_deref() {
                None => None,
                Some(text) if text.contains(':') => Some(IpAddr::V6(
                    parse_ip6(text).map_err(|m| invalid(&entry, "host_ip", m))?,
                )),
                Some(text) => Some(IpAddr::V4(
                    parse_ip(text).map_err(|m| invalid(&entry, "host_ip", m))?,
                )),
            };
            // A port of one family must lead somewhere with an address of that family (an
            // IPv4-only container is reached over IPv6 through the kernel's translation, so
            // only IPv4 needs the target's own address).
            match (&target, host_ip) {
                (PortTarget::Endpoint(name), Some(IpAddr::V4(_))) => {
                    let endpoint = endpoints.iter().find(|e| &e.name == name);
                    if let Some(first) = endpoint.and_then(|e| e.interfaces.first())
                        && first.ip.is_none()
                    {
                        return Err(invalid(
                            &entry,
                            "host_ip",
                            format!(
                                "an IPv4 host_ip, but endpoint {name} has no IPv4 address on \
                                 its first network {} (IPv6-only)",
                                first.network
                            ),
                        ));
                    }
                }
                (PortTarget::Service(name), Some(ip)) => {
                    let service = services.iter().find(|s| &s.name == name);
                    if let Some(service) = service {
                        let (has, vip_field) = match ip {
                            IpAddr::V4(_) => (service.vip.is_some(), "vip"),
                            IpAddr::V6(_) => (service.vip6.is_some(), "vip6"),
                        };
                        if !has {
                            return Err(invalid(
                                &entry,
                                "host_ip",
                                format!("{ip} leads to service {name}, which has no {vip_field}"),
                            ));
                        }
                    }
                }
                _ => {}
            }
            let host_ports =
                PortRange::parse(&p.host_port).map_err(|m| invalid(&entry, "host_port", m))?;
            let container_ports = PortRange::parse(&p.container_port)
                .map_err(|m| invalid(&entry, "container_port", m))?;
            if host_ports.len() != container_ports.len() {
                return Err(invalid(
                    &entry,
                    "container_port",
                    format!(
                        "range of {} ports does not match host_port's {}",
                        container_ports.len(),
                        host_ports.len()
                    ),
                ));
            }
            let port = PublishedPort {
                target,
                protocol,
                host_ip,
                host_ports,
                container_ports,
            };
            if let Some(first) = book.conflict(&port) {
                return Err(invalid(
                    &entry,
                    "host_port",
                    format!("overlaps the ports of ports[{first}]"),
                ));
            }
            book.insert(i, &port);
            ports.push(port);
        }
        Ok(ports)
    }

    fn policies(
        spec: &StateFile,
        networks: &[Network],
        endpoints: &[Endpoint],
    ) -> Result<Vec<Policy>, StateError> {
        let mut policies = Vec::new();
        let mut names = BTreeSet::new();
        for (i, p) in spec.policies.iter().enumerate() {
            let entry = entry_label("policies", i, &p.name);
            // Flow records and `status` name a policy by its name: it must say which one.
            if !p.name.is_empty() && !names.insert(p.name.as_str()) {
                return Err(invalid(entry, "name", "is used by an earlier policy"));
            }
            let action = match p.action.as_str() {
                "allow" => Action::Allow,
                "deny" => Action::Deny,
                other => {
                    return Err(invalid(
                        entry,
                        "action",
                        format!("{other:?} is not allow or deny"),
                    ));
                }
            };
            let from = selector(&p.from, networks, endpoints)
                .map_err(|(f, m)| invalid(&entry, format!("from.{f}"), m))?;
            let to = selector(&p.to, networks, endpoints)
                .map_err(|(f, m)| invalid(&entry, format!("to.{f}"), m))?;
            let mut ports = Vec::new();
            for (j, text) in p.ports.iter().enumerate() {
                let bad = || {
                    invalid(
                        &entry,
                        format!("ports[{j}]"),
                        format!("{text:?} is not like \"5432/tcp\""),
                    )
                };
                let (port, proto) = text.split_once('/').ok_or_else(bad)?;
                let port: u32 = port.parse().map_err(|_| bad())?;
                let port = single_port(port).map_err(|_| bad())?;
                let proto = Protocol::parse(proto).ok_or_else(bad)?;
                ports.push((port, proto));
            }
            policies.push(Policy {
                name: p.name.clone(),
                action,
                from,
                to,
                ports,
            });
        }
        Ok(policies)
    }

    /// What the model accepts but is probably not meant: a service or policy selector that
    /// matches no endpoint. Logged and shown by `status`, not refused: endpoints come and go.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        for s in &self.services {
            if s.backends.is_empty() && s.remote.is_empty() {
                warnings.push(format!(
                    "services[{}]: no endpoint matches its selector or list; connections to \
                     {} get no backend",
                    s.name,
                    s.addresses()
                        .iter()
                        .map(|a| match a {
                            IpAddr::V4(a) => format!("{a}:{}", s.port),
                            IpAddr::V6(a) => format!("[{a}]:{}", s.port),
                        })
                        .collect::<Vec<_>>()
                        .join(" and ")
                ));
            }
        }
        for (i, p) in self.policies.iter().enumerate() {
            for (side, selector) in [("from", &p.from), ("to", &p.to)] {
                if let Selector::Labels(labels) = selector
                    && !self
                        .endpoints
                        .iter()
                        .any(|e| labels_match(labels, &e.labels))
                {
                    warnings.push(format!(
                        "{}.{side}.labels: matches no endpoint",
                        entry_label("policies", i, &p.name)
                    ));
                }
            }
        }
        warnings
    }

    /// Checks the model against the host's own addresses (both families): a VIP that is one
    /// of them is refused (the host's own traffic to it would be balanced away); a `host_ip`
    /// that is none of them is a warning (the port is published on it all the same, for the
    /// day the host gets the address).
    pub fn check_host(&self, host: &[IpAddr]) -> Result<Vec<String>, StateError> {
        for s in &self.services {
            for (field, vip) in [
                ("vip", s.vip.map(IpAddr::V4)),
                ("vip6", s.vip6.map(IpAddr::V6)),
            ] {
                if let Some(vip) = vip
                    && host.contains(&vip)
                {
                    return Err(invalid(
                        format!("services[{}]", s.name),
                        field,
                        format!("{vip} is an address of this host"),
                    ));
                }
            }
        }
        Ok(self
            .ports
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let ip = p.host_ip.filter(|ip| !ip.is_unspecified())?;
                (!host.contains(&ip))
                    .then(|| format!("ports[{i}].host_ip: {ip} is not an address of this host"))
            })
            .collect())
    }

    pub fn network(&self, name: &str) -> Option<&Network> {
        self.networks.iter().find(|n| n.name == name)
    }
}

/// The first of each name in `items`.
fn first_by_name<T>(items: &[T], name: impl Fn(&T) -> &String) -> HashMap<&str, &T> {
    let mut by_name = HashMap::new();
    for item in items {
        by_name.entry(name(item).as_str()).or_insert(item);
    }
    by_name
}

/// Most overlay networks services may be scoped to: one bit each in a container
/// namespace's entry for the socket hooks (`SockNetns::overlays`).
pub const MAX_OVERLAYS: usize = 32;

fn single_port(n: u32) -> Result<u16, String> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port {n} is not 1-65535"))
}

/// Which entry first bound each port number, for the overlap check of published ports: two
/// bindings may share a port only on different, specific host addresses, or on different
/// families. Linear in the port numbers; comparing every pair of entries took 25 s for
/// 100,000 of them.
#[derive(Default)]
struct PortBook {
    /// Bound on any address of a family (4 or 6).
    any: HashMap<(u8, Protocol, u16), usize>,
    /// Bound on every address of a family (no host_ip, 0.0.0.0 or ::).
    every: HashMap<(u8, Protocol, u16), usize>,
    specific: HashMap<(Protocol, IpAddr, u16), usize>,
}

/// The families a published port binds, and its one address in each (None: every address of
/// that family).
fn port_bindings(port: &PublishedPort) -> Vec<(u8, Option<IpAddr>)> {
    match port.host_ip {
        None => vec![(4, None), (6, None)],
        Some(ip @ IpAddr::V4(v4)) => vec![(4, (!v4.is_unspecified()).then_some(ip))],
        Some(ip @ IpAddr::V6(v6)) => vec![(6, (!v6.is_unspecified()).then_some(ip))],
    }
}

impl PortBook {
    /// The earliest entry whose ports `port` overlaps.
    fn conflict(&self, port: &PublishedPort) -> Option<usize> {
        let proto = port.protocol;
        let bindings = port_bindings(port);
        (port.host_ports.first..=port.host_ports.last)
            .flat_map(|n| bindings.iter().map(move |b| (n, *b)))
            .filter_map(|(n, (family, ip))| match ip {
                None => self.any.get(&(family, proto, n)).copied(),
                Some(ip) => {
                    let every = self.every.get(&(family, proto, n)).copied();
                    let same = self.specific.get(&(proto, ip, n)).copied();
                    every.into_iter().chain(same).min()
                }
            })
            .min()
    }

    fn insert(&mut self, index: usize, port: &PublishedPort) {
        let proto = port.protocol;
        let bindings = port_bindings(port);
        for n in port.host_ports.first..=port.host_ports.last {
            for &(family, ip) in &bindings {
                self.any.entry((family, proto, n)).or_insert(index);
                match ip {
                    None => self.every.entry((family, proto, n)).or_insert(index),
                    Some(ip) => self.specific.entry((proto, ip, n)).or_insert(index),
                };
            }
        }
    }
}

/// A VIP must be an address nobody else answers on: not 0.0.0.0 (every address), not a
/// broadcast or multicast address, not a container's (half of its traffic would be balanced
/// away) and not a gateway (the host's own address on that bridge). The host's other addresses
/// are checked when the model is applied ([`Model::check_host`]).
fn check_vip(vip: Ipv4Addr, networks: &[Network], endpoints: &[Endpoint]) -> Result<(), String> {
    if vip.is_unspecified() || vip.is_broadcast() || vip.is_multicast() {
        return Err(format!("{vip} is not a unicast address"));
    }
    if let Some(n) = networks.iter().find(|n| n.gateway == Some(vip)) {
        return Err(format!(
            "{vip} is the gateway (the host's address) of network {}",
            n.name
        ));
    }
    for (i, e) in endpoints.iter().enumerate() {
        if let Some(j) = e.interfaces.iter().position(|itf| itf.ip == Some(vip)) {
            return Err(format!(
                "{vip} is the address of {}.interfaces[{j}].ip",
                entry_label("endpoints", i, &e.name)
            ));
        }
    }
    Ok(())
}

/// [`check_vip`] for IPv6: unicast, global or unique-local, nobody else's.
fn check_vip6(vip: Ipv6Addr, networks: &[Network], endpoints: &[Endpoint]) -> Result<(), String> {
    if let Some(why) = not_unicast6(vip) {
        return Err(format!("{vip} is {why}"));
    }
    if let Some(n) = networks.iter().find(|n| n.gateway6 == Some(vip)) {
        return Err(format!(
            "{vip} is the gateway6 (the host's address) of network {}",
            n.name
        ));
    }
    for (i, e) in endpoints.iter().enumerate() {
        if let Some(j) = e.interfaces.iter().position(|itf| itf.ip6 == Some(vip)) {
            return Err(format!(
                "{vip} is the address of {}.interfaces[{j}].ip6",
                entry_label("endpoints", i, &e.name)
            ));
        }
    }
    Ok(())
}

/// The backends of service `s` (by its selector or its list, sorted) and their weights.
fn service_backends(
    entry: &str,
    s: &ServiceSpec,
    endpoints: &[Endpoint],
) -> Result<(Vec<String>, Vec<u32>), StateError> {
    let mut backends: Vec<String> = match (&s.selector, &s.endpoints) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                entry,
                "selector",
                "give either selector or endpoints, not both",
            ));
        }
        // Backends by address alone, or none yet (a Swarm service without tasks).
        (None, None) if !s.addresses.is_empty() || s.overlay.is_some() => Vec::new(),
        (None, None) => {
            return Err(invalid(
                entry,
                "selector",
                "give a selector, endpoints or addresses",
            ));
        }
        (Some(selector), None) => endpoints
            .iter()
            .filter(|e| labels_match(selector, &e.labels))
            .map(|e| e.name.clone())
            .collect(),
        (None, Some(list)) => {
            let mut backends = Vec::new();
            for (j, name) in list.iter().enumerate() {
                if !endpoints.iter().any(|e| &e.name == name) {
                    return Err(invalid(
                        entry,
                        format!("endpoints[{j}]"),
                        format!("unknown endpoint {name:?}"),
                    ));
                }
                backends.push(name.clone());
            }
            backends
        }
    };
    backends.sort();
    backends.dedup();
    for name in s.weights.keys() {
        if !endpoints.iter().any(|e| &e.name == name) {
            return Err(invalid(
                entry,
                format!("weights.{name}"),
                format!("unknown endpoint {name:?}"),
            ));
        }
    }
    let weights = backends
        .iter()
        .map(|b| s.weights.get(b).copied().unwrap_or(1))
        .collect();
    Ok((backends, weights))
}

pub fn labels_match(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn selector(
    spec: &SelectorSpec,
    networks: &[Network],
    endpoints: &[Endpoint],
) -> Result<Selector, (&'static str, String)> {
    let given = [
        spec.network.is_some(),
        spec.endpoint.is_some(),
        spec.labels.is_some(),
        spec.cidr.is_some(),
    ]
    .iter()
    .filter(|g| **g)
    .count();
    if given > 1 {
        return Err((
            "network",
            "give one of network, endpoint, labels or cidr".into(),
        ));
    }
    if let Some(n) = &spec.network {
        if !networks.iter().any(|x| &x.name == n) {
            return Err(("network", format!("unknown network {n:?}")));
        }
        return Ok(Selector::Network(n.clone()));
    }
    if let Some(e) = &spec.endpoint {
        if !endpoints.iter().any(|x| &x.name == e) {
            return Err(("endpoint", format!("unknown endpoint {e:?}")));
        }
        return Ok(Selector::Endpoint(e.clone()));
    }
    if let Some(l) = &spec.labels {
        return Ok(Selector::Labels(l.clone()));
    }
    if let Some(c) = &spec.cidr {
        return Ok(Selector::Cidr(IpCidr::parse(c).map_err(|m| ("cidr", m))?));
    }
    Ok(Selector::Any)
}

impl StateFile {
    /// Parses YAML or JSON (JSON is YAML), reporting line and column of syntax errors, within
    /// the caps of [`parse`]. An empty text is refused: the empty state is `{}`.
    pub fn parse(text: &str) -> Result<StateFile, String> {
        parse::parse(text).map_err(|e| e.to_string())
    }

    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self).expect("a StateFile always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
uplink: eth0
networks:
  - name: frontend
    bridge: br-frontend
    subnet: 172.30.1.0/24
    gateway: 172.30.1.1
  - name: backend
    bridge: br-backend
    subnet: 172.30.2.0/24
    gateway: 172.30.2.1
    internal: true
    icc: false
endpoints:
  - name: web1
    labels: {app: web}
    interfaces:
      - {network: frontend, ip: 172.30.1.2, mac: "02:42:ac:1e:01:02", host_veth: veth-web1}
  - name: db
    labels: {tier: db}
    interfaces:
      - {network: backend, ip: 172.30.2.2, mac: "02:42:ac:1e:02:02", host_veth: veth-db}
ports:
  - {endpoint: web1, protocol: tcp, host_port: 8080, container_port: 80}
  - {endpoint: web1, protocol: udp, host_ip: 192.0.2.1, host_port: "9000-9002", container_port: "7000-7002"}
services:
  - {name: web, vip: 10.96.0.10, port: 80, selector: {app: web}}
policies:
  - name: no-frontend-to-db
    action: deny
    from: {network: frontend}
    to: {labels: {tier: db}}
    ports: ["5432/tcp"]
"#;

    fn good() -> StateFile {
        StateFile::parse(GOOD).unwrap()
    }

    fn error_of(spec: &StateFile) -> String {
        Model::from_spec(spec).unwrap_err().to_string()
    }

    #[test]
    fn parses_the_design_example() {
        let model = Model::from_spec(&good()).unwrap();
        assert_eq!(model.networks.len(), 2);
        assert!(!model.networks[1].icc && model.networks[1].internal);
        assert!(model.networks[0].icc && !model.networks[0].internal);
        assert_eq!(
            model.endpoints[0].interfaces[0].mac,
            [2, 0x42, 0xac, 0x1e, 1, 2]
        );
        assert_eq!(
            model.ports[1].host_ports,
            PortRange {
                first: 9000,
                last: 9002
            }
        );
        assert_eq!(
            model.ports[1].host_ip,
            Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)))
        );
        assert_eq!(model.services[0].backends, vec!["web1".to_string()]);
        assert_eq!(model.services[0].algorithm, Algorithm::Maglev);
        assert_eq!(model.policies[0].ports, vec![(5432, Protocol::Tcp)]);
    }

    #[test]
    fn json_is_accepted_too() {
        let json = serde_json::to_string(&good()).unwrap();
        assert_eq!(StateFile::parse(&json).unwrap(), good());
    }

    #[test]
    fn syntax_errors_give_a_location() {
        let err = StateFile::parse("networks:\n  - name: [unclosed\n").unwrap_err();
        assert!(err.contains("line"), "{err}");
        let err = StateFile::parse("networks:\n  - name: a\n    colour: red\n").unwrap_err();
        assert!(err.contains("unknown field `colour`"), "{err}");
    }

    #[test]
    fn unknown_network_names_the_entry_and_field() {
        let mut spec = good();
        spec.endpoints[0].interfaces[0].network = "nope".into();
        assert_eq!(
            error_of(&spec),
            "endpoints[web1].interfaces[0].network: unknown network \"nope\""
        );
    }

    #[test]
    fn duplicate_ip_names_both_entries() {
        let mut spec = good();
        spec.endpoints[1].interfaces[0].network = "frontend".into();
        spec.endpoints[1].interfaces[0].ip = Some("172.30.1.2".into());
        assert_eq!(
            error_of(&spec),
            "endpoints[db].interfaces[0].ip: duplicate IP 172.30.1.2: already used by \
             endpoints[web1].interfaces[0].ip"
        );
    }

    #[test]
    fn bad_values_are_rejected_by_field() {
        type Mutation = Box<dyn Fn(&mut StateFile)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|s| s.networks[0].subnet = Some("172.30.1.0/33".into())),
                "networks[frontend].subnet",
            ),
            (
                Box::new(|s| s.networks[0].subnet = Some("172.30.1.5/24".into())),
                "networks[frontend].subnet",
            ),
            (
                Box::new(|s| s.networks[1].subnet = Some("172.30.0.0/16".into())),
                "networks[backend].subnet",
            ),
            (
                Box::new(|s| s.networks[0].gateway = Some("10.0.0.1".into())),
                "networks[frontend].gateway",
            ),
            (
                Box::new(|s| s.networks[1].bridge = "br-frontend".into()),
                "networks[backend].bridge",
            ),
            (
                Box::new(|s| s.networks[1].name = "frontend".into()),
                "networks[frontend].name",
            ),
            (
                Box::new(|s| s.endpoints[0].interfaces[0].ip = Some("172.30.2.9".into())),
                "endpoints[web1].interfaces[0].ip",
            ),
            (
                Box::new(|s| s.endpoints[0].interfaces[0].ip = Some("172.30.1.1".into())),
                "endpoints[web1].interfaces[0].ip",
            ),
            (
                Box::new(|s| s.endpoints[0].interfaces[0].mac = "zz:42:ac:1e:01:02".into()),
                "endpoints[web1].interfaces[0].mac",
            ),
            (
                Box::new(|s| {
                    s.endpoints[0].interfaces[0].host_veth = "a-very-long-interface".into()
                }),
                "endpoints[web1].interfaces[0].host_veth",
            ),
            (
                Box::new(|s| s.endpoints[1].interfaces[0].host_veth = "veth-web1".into()),
                "endpoints[db].interfaces[0].host_veth",
            ),
            (
                Box::new(|s| s.endpoints[1].name = "web1".into()),
                "endpoints[web1].name",
            ),
            (
                Box::new(|s| s.ports[0].endpoint = Some("ghost".into())),
                "ports[0].endpoint",
            ),
            (
                Box::new(|s| s.ports[0].protocol = "sctp".into()),
                "ports[0].protocol",
            ),
            (
                Box::new(|s| s.ports[0].host_port = PortValue::Number(70000)),
                "ports[0].host_port",
            ),
            (
                Box::new(|s| s.ports[1].container_port = PortValue::Text("7000-7005".into())),
                "ports[1].container_port",
            ),
            (
                Box::new(|s| s.ports[1].host_port = PortValue::Text("9002-9000".into())),
                "ports[1].host_port",
            ),
            (
                Box::new(|s| s.ports[1].host_ip = Some("999.1.1.1".into())),
                "ports[1].host_ip",
            ),
            (
                Box::new(|s| {
                    s.ports[1].protocol = "tcp".into();
                    s.ports[1].host_port = PortValue::Text("8079-8081".into());
                }),
                "ports[1].host_port",
            ),
            (
                Box::new(|s| s.services[0].algorithm = "fastest".into()),
                "services[web].algorithm",
            ),
            (
                Box::new(|s| s.services[0].selector = None),
                "services[web].selector",
            ),
            (
                Box::new(|s| {
                    s.services[0].selector = None;
                    s.services[0].endpoints = Some(vec!["ghost".into()]);
                }),
                "services[web].endpoints[0]",
            ),
            (
                Box::new(|s| s.policies[0].action = "maybe".into()),
                "policies[no-frontend-to-db].action",
            ),
            (
                Box::new(|s| s.policies[0].from.network = Some("ghost".into())),
                "policies[no-frontend-to-db].from.network",
            ),
            (
                Box::new(|s| s.policies[0].ports = vec!["5432".into()]),
                "policies[no-frontend-to-db].ports[0]",
            ),
            (
                Box::new(|s| {
                    s.policies[0].to.labels = None;
                    s.policies[0].to.cidr = Some("10.0.0.0/99".into());
                }),
                "policies[no-frontend-to-db].to.cidr",
            ),
        ];
        for (mutate, expected_location) in cases {
            let mut spec = good();
            mutate(&mut spec);
            let err = error_of(&spec);
            assert!(
                err.starts_with(&format!("{expected_location}: ")),
                "expected an error at {expected_location}, got: {err}"
            );
        }
    }

    /// A Swarm VIP as the Docker source writes it: every port, backends by address, scoped
    /// to an overlay network, and the endpoints on that overlay.
    #[test]
    fn overlay_vips_on_every_port_with_backends_by_address() {
        let overlay = |spec: &mut StateFile| {
            spec.endpoints[0].overlays = vec!["ov".into(), "ov".into(), "front".into()];
            spec.services.push(ServiceSpec {
                name: "web@ov".into(),
                vip: Some("10.0.1.2".into()),
                vip6: None,
                port: 0,
                protocol: "tcp".into(),
                target_port: None,
                selector: None,
                endpoints: None,
                algorithm: "maglev".into(),
                weights: BTreeMap::new(),
                addresses: [("web.2.b", "10.0.1.4"), ("web.1.a", "10.0.1.3")]
                    .map(|(n, a)| (n.to_owned(), a.to_owned()))
                    .into(),
                overlay: Some("ov".into()),
            });
        };
        let mut spec = good();
        overlay(&mut spec);
        let model = Model::from_spec(&spec).unwrap();
        let web = &model.services[1];
        assert_eq!((web.port, web.target_port), (0, 0));
        assert!(web.backends.is_empty());
        let remote: Vec<(&str, Ipv4Addr)> = web
            .remote
            .iter()
            .map(|r| (r.name.as_str(), r.addr))
            .collect();
        assert_eq!(
            remote,
            [
                ("web.1.a", Ipv4Addr::new(10, 0, 1, 3)),
                ("web.2.b", Ipv4Addr::new(10, 0, 1, 4))
            ]
        );
        assert_eq!(model.endpoints[0].overlays, ["front", "ov"]);
        assert_eq!(model.overlays(), BTreeSet::from(["ov"]));
        // Backends by address are backends: no warning.
        assert!(model.warnings().is_empty(), "{:?}", model.warnings());
        // A Swarm service without tasks yet: no backend, a warning, not an error.
        let mut spec = good();
        overlay(&mut spec);
        spec.services[1].addresses.clear();
        let model = Model::from_spec(&spec).unwrap();
        assert_eq!(model.warnings().len(), 1, "{:?}", model.warnings());

        type Change = fn(&mut StateFile);
        let refused: [(Change, &str); 6] = [
            (
                |s| s.services[1].target_port = Some(80),
                "services[web@ov].target_port: a service on every port (port 0)",
            ),
            (
                |s| s.services[1].port = 80,
                "services[web@ov].overlay: an overlay network's service has an IPv4 vip only and port 0",
            ),
            (
                |s| s.services[1].vip6 = Some("fd00::2".into()),
                "services[web@ov].overlay: an overlay network's service has an IPv4 vip only",
            ),
            (
                |s| {
                    s.services[1]
                        .addresses
                        .insert("web1".into(), "10.0.1.9".into());
                    s.services[1].endpoints = Some(vec!["web1".into()]);
                },
                "services[web@ov].addresses: \"web1\" is empty or already the name of a backend",
            ),
            (
                |s| {
                    s.services[1].addresses.insert("x".into(), "10.0.1".into());
                },
                "services[web@ov].addresses.x: \"10.0.1\" is not an IPv4 address",
            ),
            (
                |s| {
                    s.ports[0] = PortSpec {
                        endpoint: None,
                        service: Some("web@ov".into()),
                        protocol: "tcp".into(),
                        host_ip: None,
                        host_port: PortValue::Number(8080),
                        container_port: PortValue::Number(80),
                    }
                },
                "ports[0].service: \"web@ov\" is on every port (port 0): publish a port of it",
            ),
        ];
        for (change, expected) in refused {
            let mut spec = good();
            overlay(&mut spec);
            change(&mut spec);
            let err = error_of(&spec);
            assert!(err.starts_with(expected), "{err}");
        }
        // At most 32 overlay networks have services.
        let mut spec = good();
        overlay(&mut spec);
        let template = spec.services[1].clone();
        for i in 0..MAX_OVERLAYS {
            let mut s = template.clone();
            s.name = format!("svc{i}");
            s.vip = Some(format!("10.0.2.{}", i + 1));
            s.overlay = Some(format!("ov{i}"));
            spec.services.push(s);
        }
        assert!(
            error_of(&spec).starts_with(
                "services[svc31].overlay: \"ov31\" would be the services' overlay network number 33"
            ),
            "{}",
            error_of(&spec)
        );
    }

    #[test]
    fn vips_that_others_answer_on_are_refused() {
        for (vip, expected) in [
            ("0.0.0.0", "not a unicast address"),
            ("255.255.255.255", "not a unicast address"),
            ("224.0.0.1", "not a unicast address"),
            (
                "172.30.1.2",
                "is the address of endpoints[web1].interfaces[0].ip",
            ),
            (
                "172.30.2.1",
                "is the gateway (the host's address) of network backend",
            ),
        ] {
            let mut spec = good();
            spec.services[0].vip = Some(vip.into());
            let err = error_of(&spec);
            assert!(
                err.starts_with("services[web].vip: ") && err.contains(expected),
                "{vip}: {err}"
            );
        }
        let model = Model::from_spec(&good()).unwrap();
        let host: [IpAddr; 1] = ["10.96.0.10".parse().unwrap()];
        assert_eq!(
            model.check_host(&host).unwrap_err().to_string(),
            "services[web].vip: 10.96.0.10 is an address of this host"
        );
    }

    #[test]
    fn host_ips_not_on_the_host_and_empty_selectors_are_warnings() {
        let mut spec = good();
        spec.services[0].selector = Some(BTreeMap::from([("app".into(), "nothing".into())]));
        spec.policies[0].to.labels = Some(BTreeMap::from([("tier".into(), "none".into())]));
        let model = Model::from_spec(&spec).unwrap();
        let warnings = model.warnings();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].starts_with("services[web]: no endpoint matches"));
        assert_eq!(
            warnings[1],
            "policies[no-frontend-to-db].to.labels: matches no endpoint"
        );
        assert!(Model::from_spec(&good()).unwrap().warnings().is_empty());
        let host: Vec<IpAddr> = vec!["192.0.2.1".parse().unwrap()];
        assert!(model.check_host(&host).unwrap().is_empty());
        assert_eq!(
            model.check_host(&[]).unwrap(),
            vec!["ports[1].host_ip: 192.0.2.1 is not an address of this host".to_string()]
        );
    }

    #[test]
    fn two_policies_with_one_name_are_refused() {
        let mut spec = good();
        let mut second = spec.policies[0].clone();
        second.action = "allow".into();
        spec.policies.push(second);
        assert_eq!(
            error_of(&spec),
            "policies[no-frontend-to-db].name: is used by an earlier policy"
        );
    }

    #[test]
    fn overlapping_ports_name_the_first_entry_quickly() {
        let mut spec = good();
        spec.ports.truncate(1);
        // 30,000 tcp and 30,000 udp ports on every address, then one on a specific address
        // inside them: linear, where comparing pairs took minutes.
        for i in 0..60_000u32 {
            spec.ports.push(PortSpec {
                endpoint: Some("web1".into()),
                service: None,
                protocol: if i % 2 == 0 { "tcp" } else { "udp" }.into(),
                host_ip: None,
                host_port: PortValue::Number(20_000 + i / 2),
                container_port: PortValue::Number(80),
            });
        }
        assert_eq!(Model::from_spec(&spec).unwrap().ports.len(), 60_001);
        let mut clash = spec.ports[1].clone();
        clash.host_ip = Some("192.0.2.7".into());
        clash.host_port = PortValue::Text("19990-20000".into());
        clash.container_port = PortValue::Text("1-11".into());
        spec.ports.push(clash);
        assert_eq!(
            error_of(&spec),
            "ports[60001].host_port: overlaps the ports of ports[1]"
        );
    }

    #[test]
    fn port_ranges_and_cidrs() {
        let r = PortRange::parse(&PortValue::Text("8000-8010".into())).unwrap();
        assert_eq!((r.first, r.last, r.len()), (8000, 8010, 11));
        assert!(PortRange::parse(&PortValue::Number(0)).is_err());
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.255.1.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("1.2.3.4".parse().unwrap())
        );
    }

    const DUAL: &str = r#"
networks:
  - {name: frontend, bridge: br-frontend, subnet: 172.30.1.0/24, gateway: 172.30.1.1,
     subnet6: "fd00:30:1::/64", gateway6: "fd00:30:1::1"}
  - {name: six, bridge: br-six, subnet6: "fd00:30:2::/64", gateway6: "fd00:30:2::1"}
endpoints:
  - name: web1
    labels: {app: web}
    interfaces:
      - {network: frontend, ip: 172.30.1.2, ip6: "fd00:30:1::2", mac: "02:42:ac:1e:01:02", host_veth: veth-web1}
  - name: only4
    labels: {app: web}
    interfaces:
      - {network: frontend, ip: 172.30.1.3, mac: "02:42:ac:1e:01:03", host_veth: veth-only4}
  - name: only6
    labels: {app: web}
    interfaces:
      - {network: six, ip6: "fd00:30:2::2", mac: "02:42:ac:1e:02:02", host_veth: veth-only6}
ports:
  - {endpoint: web1, protocol: tcp, host_port: 8080, container_port: 80}
  - {endpoint: web1, protocol: tcp, host_ip: "0.0.0.0", host_port: 8081, container_port: 81}
  - {endpoint: web1, protocol: tcp, host_ip: "::", host_port: 8081, container_port: 82}
  - {endpoint: only4, protocol: tcp, host_ip: "2001:db8::1", host_port: 8082, container_port: 80}
  - {endpoint: only6, protocol: udp, host_ip: "::", host_port: 5353, container_port: 53}
services:
  - {name: web, vip: 10.96.0.10, vip6: "fd00:96::10", port: 80, selector: {app: web}}
  - {name: web6, vip6: "fd00:96::11", port: 80, endpoints: [only6]}
policies:
  - {name: block6, action: deny, from: {cidr: "2001:db8:bad::/48"}}
  - {name: block4, action: deny, from: {cidr: 203.0.113.0/24}}
"#;

    fn dual() -> StateFile {
        StateFile::parse(DUAL).unwrap()
    }

    #[test]
    fn ipv6_and_dual_stack_parse() {
        let model = Model::from_spec(&dual()).unwrap();
        let v6 = |t: &str| -> Ipv6Addr { t.parse().unwrap() };
        let front = &model.networks[0];
        assert_eq!(front.subnet6, Some(Cidr6::parse("fd00:30:1::/64").unwrap()));
        assert_eq!(front.gateway6, Some(v6("fd00:30:1::1")));
        let six = &model.networks[1];
        assert_eq!((six.subnet, six.gateway), (None, None));
        let web1 = &model.endpoints[0].interfaces[0];
        assert_eq!(
            (web1.ip, web1.ip6),
            (
                Some("172.30.1.2".parse().unwrap()),
                Some(v6("fd00:30:1::2"))
            )
        );
        assert_eq!(model.endpoints[1].interfaces[0].ip6, None);
        assert_eq!(model.endpoints[2].interfaces[0].ip, None);
        let hosts: Vec<Option<IpAddr>> = model.ports.iter().map(|p| p.host_ip).collect();
        assert_eq!(
            hosts,
            vec![
                None,
                Some("0.0.0.0".parse().unwrap()),
                Some("::".parse().unwrap()),
                Some("2001:db8::1".parse().unwrap()),
                Some("::".parse().unwrap()),
            ]
        );
        assert_eq!(model.services[0].vip6, Some(v6("fd00:96::10")));
        assert_eq!(model.services[1].vip, None);
        assert_eq!(
            model.policies[0].from,
            Selector::Cidr(IpCidr::V6(Cidr6::parse("2001:db8:bad::/48").unwrap()))
        );
        // JSON and YAML give the same.
        let json = serde_json::to_string(&dual()).unwrap();
        assert_eq!(StateFile::parse(&json).unwrap(), dual());
        assert_eq!(StateFile::parse(&dual().to_yaml()).unwrap(), dual());
    }

    #[test]
    fn bad_ipv6_values_are_rejected_by_field() {
        type Mutation = Box<dyn Fn(&mut StateFile)>;
        let some = |t: &str| Some(t.to_string());
        let cases: Vec<(Mutation, &str, &str)> = vec![
            (
                Box::new(|s| {
                    s.networks[1].subnet6 = None;
                    s.networks[1].gateway6 = None;
                }),
                "networks[six].subnet",
                "give subnet, subnet6 or both",
            ),
            (
                Box::new(move |s| s.networks[1].subnet6 = some("fd00:30:2::/129")),
                "networks[six].subnet6",
                "not 0-128",
            ),
            (
                Box::new(move |s| s.networks[1].subnet6 = some("fd00:30:2::5/64")),
                "networks[six].subnet6",
                "host bits set",
            ),
            (
                Box::new(move |s| s.networks[1].subnet6 = some("172.30.9.0/24")),
                "networks[six].subnet6",
                "is not an IPv6 address",
            ),
            (
                Box::new(move |s| s.networks[1].subnet6 = some("fd00:30::/32")),
                "networks[six].subnet6",
                "overlaps fd00:30:1::/64 of network frontend",
            ),
            (
                Box::new(move |s| s.networks[1].subnet6 = some("::ffff:0:0/104")),
                "networks[six].subnet6",
                "overlaps the reserved ::ffff:0.0.0.0/96",
            ),
            (
                Box::new(move |s| s.networks[1].subnet6 = some("fe80::/64")),
                "networks[six].subnet6",
                "overlaps the reserved fe80::/10",
            ),
            (
                Box::new(move |s| s.networks[1].subnet6 = some("ff02::/64")),
                "networks[six].subnet6",
                "not a unicast subnet",
            ),
            (
                Box::new(|s| s.networks[1].gateway6 = None),
                "networks[six].gateway6",
                "is required with subnet6",
            ),
            (
                Box::new(move |s| s.networks[1].gateway6 = some("fd00:30:9::1")),
                "networks[six].gateway6",
                "is outside the subnet fd00:30:2::/64",
            ),
            (
                Box::new(move |s| s.networks[1].gateway6 = some("fd00:30:2::")),
                "networks[six].gateway6",
                "subnet-router anycast",
            ),
            (
                Box::new(move |s| s.networks[1].gateway = some("172.30.9.1")),
                "networks[six].gateway",
                "is given without a subnet",
            ),
            (
                Box::new(|s| s.networks[0].gateway = None),
                "networks[frontend].gateway",
                "is required with subnet",
            ),
            (
                Box::new(move |s| s.endpoints[0].interfaces[0].ip6 = some("fd00:30:2::9")),
                "endpoints[web1].interfaces[0].ip6",
                "is outside frontend's subnet6 fd00:30:1::/64",
            ),
            (
                Box::new(move |s| s.endpoints[0].interfaces[0].ip6 = some("fd00:30:1::1")),
                "endpoints[web1].interfaces[0].ip6",
                "is the gateway6 of network frontend",
            ),
            (
                Box::new(move |s| s.endpoints[0].interfaces[0].ip6 = some("fd00:30:1::")),
                "endpoints[web1].interfaces[0].ip6",
                "subnet-router anycast",
            ),
            (
                Box::new(move |s| s.endpoints[0].interfaces[0].ip6 = some("172.30.1.2")),
                "endpoints[web1].interfaces[0].ip6",
                "is not an IPv6 address",
            ),
            (
                Box::new(move |s| s.endpoints[1].interfaces[0].ip6 = some("fd00:30:1::2")),
                "endpoints[only4].interfaces[0].ip6",
                "duplicate IP fd00:30:1::2: already used by endpoints[web1].interfaces[0].ip6",
            ),
            (
                Box::new(|s| s.endpoints[2].interfaces[0].ip6 = None),
                "endpoints[only6].interfaces[0].ip6",
                "is required: network six is IPv6-only",
            ),
            (
                Box::new(move |s| s.endpoints[2].interfaces[0].ip = some("172.30.2.2")),
                "endpoints[only6].interfaces[0].ip",
                "network six is IPv6-only",
            ),
            (
                Box::new(|s| s.endpoints[1].interfaces[0].ip = None),
                "endpoints[only4].interfaces[0].ip",
                "is required: network frontend has the IPv4 subnet 172.30.1.0/24",
            ),
            (
                Box::new(|s| {
                    s.networks[0].subnet6 = None;
                    s.networks[0].gateway6 = None;
                }),
                "endpoints[web1].interfaces[0].ip6",
                "network frontend has no subnet6",
            ),
            (
                Box::new(move |s| s.ports[0].host_ip = some("fd00::zz")),
                "ports[0].host_ip",
                "is not an IPv6 address",
            ),
            (
                Box::new(move |s| s.ports[4].host_ip = some("0.0.0.0")),
                "ports[4].host_ip",
                "endpoint only6 has no IPv4 address on its first network six",
            ),
            (
                Box::new(move |s| {
                    s.ports.push(PortSpec {
                        endpoint: None,
                        service: Some("web6".into()),
                        protocol: "tcp".into(),
                        host_ip: some("192.0.2.1"),
                        host_port: PortValue::Number(7000),
                        container_port: PortValue::Number(80),
                    })
                }),
                "ports[5].host_ip",
                "192.0.2.1 leads to service web6, which has no vip",
            ),
            (
                // Every address of both families overlaps :: of the same port.
                Box::new(|s| s.ports[2].host_port = PortValue::Number(8080)),
                "ports[2].host_port",
                "overlaps the ports of ports[0]",
            ),
            (
                // One IPv6 address inside :: of the same port.
                Box::new(|s| s.ports[3].host_port = PortValue::Number(8081)),
                "ports[3].host_port",
                "overlaps the ports of ports[2]",
            ),
            (
                Box::new(|s| s.services[1].vip6 = None),
                "services[web6].vip",
                "give vip, vip6 or both",
            ),
            (
                Box::new(move |s| s.services[1].vip6 = some("fd00:96::10")),
                "services[web6].vip6",
                "[fd00:96::10]:80/tcp is already the address of services[web]",
            ),
            (
                Box::new(move |s| s.services[1].vip6 = some("fd00:30:1::2")),
                "services[web6].vip6",
                "is the address of endpoints[web1].interfaces[0].ip6",
            ),
            (
                Box::new(move |s| s.services[1].vip6 = some("fd00:30:2::1")),
                "services[web6].vip6",
                "is the gateway6 (the host's address) of network six",
            ),
            (
                Box::new(move |s| s.services[1].vip6 = some("::")),
                "services[web6].vip6",
                "not a unicast address",
            ),
            (
                Box::new(move |s| s.services[1].vip6 = some("ff05::1")),
                "services[web6].vip6",
                "not a unicast address",
            ),
            (
                Box::new(move |s| s.services[1].vip6 = some("::ffff:10.96.0.1")),
                "services[web6].vip6",
                "an IPv4-mapped address",
            ),
            (
                Box::new(move |s| s.services[1].vip6 = some("fe80::1")),
                "services[web6].vip6",
                "a link-local address",
            ),
            (
                Box::new(move |s| s.services[1].vip6 = some("10.96.0.11")),
                "services[web6].vip6",
                "is not an IPv6 address",
            ),
            (
                Box::new(move |s| s.policies[0].from.cidr = some("2001:db8:bad::1/48")),
                "policies[block6].from.cidr",
                "host bits set",
            ),
            (
                Box::new(move |s| s.policies[0].from.cidr = some("2001:db8::/200")),
                "policies[block6].from.cidr",
                "not 0-128",
            ),
        ];
        for (mutate, location, message) in cases {
            let mut spec = dual();
            mutate(&mut spec);
            let err = error_of(&spec);
            assert!(
                err.starts_with(&format!("{location}: ")) && err.contains(message),
                "expected {location}: ...{message}..., got: {err}"
            );
        }
    }

    #[test]
    fn ipv6_ports_of_different_families_or_addresses_do_not_overlap() {
        let mut spec = dual();
        // 8081 is on 0.0.0.0 and on ::; one specific IPv6 address of a third family-less
        // port on 8083 beside an IPv4 one.
        for ip in ["192.0.2.1", "2001:db8::1", "2001:db8::2"] {
            spec.ports.push(PortSpec {
                endpoint: Some("web1".into()),
                service: None,
                protocol: "tcp".into(),
                host_ip: Some(ip.into()),
                host_port: PortValue::Number(8083),
                container_port: PortValue::Number(80),
            });
        }
        assert_eq!(Model::from_spec(&spec).unwrap().ports.len(), 8);
    }

    #[test]
    fn ipv6_host_addresses_are_checked_like_ipv4_ones() {
        let model = Model::from_spec(&dual()).unwrap();
        let vip6: IpAddr = "fd00:96::10".parse().unwrap();
        assert_eq!(
            model.check_host(&[vip6]).unwrap_err().to_string(),
            "services[web].vip6: fd00:96::10 is an address of this host"
        );
        // 2001:db8::1 (ports[3]) is not the host's; :: and 0.0.0.0 are every address.
        assert_eq!(
            model.check_host(&[]).unwrap(),
            vec!["ports[3].host_ip: 2001:db8::1 is not an address of this host".to_string()]
        );
        let host: IpAddr = "2001:db8::1".parse().unwrap();
        assert!(model.check_host(&[host]).unwrap().is_empty());
        // A service whose backends are gone names both its addresses.
        let mut spec = dual();
        spec.services[0].selector = Some(BTreeMap::from([("app".into(), "none".into())]));
        let warnings = Model::from_spec(&spec).unwrap().warnings();
        assert!(
            warnings[0].contains("10.96.0.10:80 and [fd00:96::10]:80"),
            "{warnings:?}"
        );
    }

    #[test]
    fn ipv6_cidrs() {
        let c = Cidr6::parse("2001:db8::/32").unwrap();
        assert!(c.contains("2001:db8:ffff::1".parse().unwrap()));
        assert!(!c.contains("2001:db9::1".parse().unwrap()));
        assert!(
            Cidr6::parse("::/0")
                .unwrap()
                .contains("::1".parse().unwrap())
        );
        assert!(Cidr6::parse("2001:db8::1/128").is_ok());
        assert!(matches!(IpCidr::parse("10.0.0.0/8"), Ok(IpCidr::V4(_))));
        assert!(matches!(IpCidr::parse("fd00::/8"), Ok(IpCidr::V6(_))));
        assert_eq!(IpCidr::parse("fd00::/8").unwrap().to_string(), "fd00::/8");
    }

    #[test]
    fn yaml_round_trip() {
        let spec = good();
        assert_eq!(StateFile::parse(&spec.to_yaml()).unwrap(), spec);
    }
}
