//! What the agent answers to `status` on its control socket: the kernel side, the state in
//! force and the flow pipeline. Typed, so that the CLI, the tests and the bench read the same
//! fields.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub pin_dir: String,
    pub state_file: Option<String>,
    pub uplink: String,
    pub attachments: Vec<Attachment>,
    pub maps: Vec<MapFill>,
    pub interfaces: Vec<InterfaceCounters>,
    pub endpoints: Vec<EndpointRow>,
    /// The networks, services and published ports of the state in force.
    #[serde(default)]
    pub networks: Vec<NetworkRow>,
    #[serde(default)]
    pub services: Vec<ServiceRow>,
    #[serde(default)]
    pub ports: Vec<PortRow>,
    /// Drops by Hubble reason name.
    pub drops: BTreeMap<String, u64>,
    pub reconciles: u64,
    /// Conntrack entries removed as expired since the agent started.
    pub ct_collected: u64,
    /// Seconds since the Unix epoch of the last successful apply.
    pub last_applied_unix: Option<u64>,
    /// Why the latest state could not be applied (the last good state stays in force).
    pub last_error: Option<String>,
    /// Which state is in force and why a newer one is not.
    #[serde(default)]
    pub state: StateStatus,
    #[serde(default)]
    pub flows: FlowStatus,
    /// The swarm this node is in, as its engine says (`--docker` only; None outside a swarm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swarm: Option<SwarmStatus>,
}

/// The Swarm view: this node, its overlay networks with their services and tasks on every
/// node, and on a manager the swarm's nodes and services.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SwarmStatus {
    /// This node's name (its hostname), id and address in the swarm.
    pub node: String,
    pub node_id: String,
    pub node_addr: String,
    /// "manager" or "worker".
    pub role: String,
    /// Seconds since the Unix epoch of the last read of the engine that succeeded.
    pub read_unix: u64,
    /// Why reading the engine failed since: the view shown is the last good one.
    pub error: Option<String>,
    pub networks: Vec<SwarmNetworkRow>,
    /// A manager's `/nodes`; None on a worker (which is not told).
    pub nodes: Option<Vec<SwarmNodeRow>>,
    /// A manager's `/services`; None on a worker.
    pub services: Option<Vec<SwarmServiceRow>>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SwarmNetworkRow {
    pub name: String,
    pub id: String,
    /// The routing mesh's network.
    pub ingress: bool,
    pub subnets: Vec<String>,
    pub vni: Option<u32>,
    pub services: Vec<SwarmVipRow>,
}

/// A service on one overlay network.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SwarmVipRow {
    pub name: String,
    /// None for a dnsrr service.
    pub vip: Option<String>,
    /// The routing mesh's ports, "8080->80" (on `ingress`).
    pub ports: Vec<String>,
    /// Sorted by address.
    pub tasks: Vec<SwarmTaskRow>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SwarmTaskRow {
    pub name: String,
    pub ip: Option<String>,
    /// The address of its node.
    pub node_addr: String,
    /// Its node's name where known (a manager knows all, a worker its own).
    pub node: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SwarmNodeRow {
    pub name: String,
    pub id: String,
    pub addr: String,
    pub role: String,
    pub state: String,
    pub availability: String,
    pub leader: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SwarmServiceRow {
    pub name: String,
    pub id: String,
    /// "vip" or "dnsrr".
    pub mode: String,
    /// None for a global service.
    pub replicas: Option<u64>,
    /// "8080->80/tcp (ingress)".
    pub ports: Vec<String>,
}

/// The state in force, a newer one that is not, and what the agent warns of in it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StateStatus {
    pub in_force: Option<StateVersion>,
    pub newer: Option<NewerState>,
    /// Accepted but probably not meant (a selector that matches nothing, a host_ip that is
    /// not the host's).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StateVersion {
    /// `file` or `docker`.
    pub source: String,
    /// SHA-256 of the state file's bytes (what `sha256sum` prints); None for Docker.
    pub sha256: Option<String>,
    /// The file's modification time, seconds since the Unix epoch.
    pub modified_unix: Option<u64>,
    pub applied_unix: u64,
    /// When its maps were written, microseconds since the Unix epoch: what a tool that wrote
    /// the file compares with its own clock to time an apply (the bench's scale scenarios).
    #[serde(default)]
    pub applied_unix_micros: u64,
}

/// A version of the state file seen after the one in force and not applied.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NewerState {
    /// None while it is not read yet.
    pub sha256: Option<String>,
    pub since_unix: u64,
    /// Why it is not in force: still settling, being parsed, or the error that refused it.
    pub reason: String,
}

/// Flow logging: events from the kernel and the records made of them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FlowStatus {
    /// Whether the kernel programs send flow events (`--flow-events`).
    pub events: bool,
    /// Events the kernel could not write because the ring buffer was full, since the ring
    /// was created (it is pinned: agent restarts keep counting).
    pub lost: u64,
    /// Records made since the agent started, records in its history, `observe --follow`
    /// clients.
    pub records: u64,
    pub history: usize,
    pub followers: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attachment {
    pub interface: String,
    pub ifindex: u32,
    pub hook: String,
    pub program: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MapFill {
    pub name: String,
    pub entries: u32,
    pub capacity: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InterfaceCounters {
    /// Name now, or `ifindex N` when the interface is gone.
    pub interface: String,
    pub ifindex: u32,
    pub hook: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointRow {
    pub name: String,
    pub network: String,
    /// Its IPv4 address; empty on an IPv6-only network.
    pub ip: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<String>,
    pub host_veth: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkRow {
    pub name: String,
    pub bridge: String,
    /// IPv4 subnet and gateway (None: an IPv6-only network).
    pub subnet: Option<String>,
    pub gateway: Option<String>,
    pub subnet6: Option<String>,
    pub gateway6: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceRow {
    pub name: String,
    pub vip: Option<String>,
    pub vip6: Option<String>,
    /// 0: every port (a Swarm VIP's).
    pub port: u16,
    pub protocol: String,
    /// Endpoint names, then backends by address as "name (address)".
    pub backends: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PortRow {
    /// `endpoint NAME` or `service NAME`.
    pub target: String,
    pub protocol: String,
    /// The host address as given: None = every address of both families, 0.0.0.0 = every
    /// IPv4 one, :: = every IPv6 one.
    pub host_ip: Option<String>,
    /// "8080" or "8000-8010".
    pub host_port: String,
    pub container_port: String,
}
