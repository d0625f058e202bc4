//! Flow records in the shape `hubble observe -o json` prints (docs/DESIGN.md section 7):
//! one `{"flow": {...}, "node_name": ..., "time": ...}` object per line, Hubble's
//! `observer.GetFlowsResponse` through protobuf's JSON mapping with the .proto field names.
//! The default form is a valid Hubble flow (Cilium's api/v1 flow.proto, strict: no field or
//! enum value that is not there; the tests decode it with the generated types of
//! dataplane/proto). Translations are in Hubble's own fields (`IP.source_xlated` for
//! masquerade, `destination_service`, the observation point). Two fields of our own,
//! `translation` (what NAT or load balancing did) and `connection` (which event of the
//! connection this is, and its counters), are only in the extended form, which a Hubble
//! reader is never given unless asked (`observe -o json-extended`, `--flow-log-format
//! extended`). Identity comes from the model.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::LazyLock,
};

use dataplane_common::{DropReason, tcp_flag};
use serde::{Deserialize, Serialize};

use super::{
    clock::{self, Clock},
    decode::{
        Event, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Icmp, Kind, Nat,
        TranslationKind,
    },
};
use crate::model::{self, Model, PortTarget};

/// Cilium's reserved identities for the host and for everything outside the cluster.
pub const IDENTITY_HOST: u32 = 1;
pub const IDENTITY_WORLD: u32 = 2;
/// Cilium's numeric identities for label sets of a cluster (cluster 0) are 256..=65535; below
/// 256 are the reserved ones, from 1 << 24 the node-local (CIDR) ones.
const IDENTITY_FIRST: u32 = 256;
const IDENTITY_LAST: u32 = 65_535;
/// Cilium's endpoint IDs are 1..=4095.
const ENDPOINT_ID_LAST: u32 = 4095;
/// Cilium's monitor message types (`event_type.type`): drop notifications and traces.
pub const MESSAGE_TYPE_DROP: i32 = 1;
pub const MESSAGE_TYPE_TRACE: i32 = 4;
/// Docker Compose's labels: a project is a namespace, a service a workload.
const COMPOSE_PROJECT: &str = "com.docker.compose.project";
const COMPOSE_SERVICE: &str = "com.docker.compose.service";
/// Cilium's label source for labels of Docker containers.
const LABEL_SOURCE: &str = "container";

/// One line of the flow stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub flow: Flow,
    pub node_name: String,
    pub time: String,
}

impl Record {
    /// The line Hubble's readers get: without our extensions.
    pub fn hubble_json(&mut self) -> String {
        let translation = self.flow.translation.take();
        let connection = self.flow.connection.take();
        let json = serde_json::to_string(self).expect("flow records serialise");
        self.flow.translation = translation;
        self.flow.connection = connection;
        json
    }

    /// The line with our extensions (`translation`, `connection`).
    pub fn extended_json(&self) -> String {
        serde_json::to_string(self).expect("flow records serialise")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Verdict {
    /// A trace: the packet or connection went on (whether or not NAT rewrote it).
    Forwarded,
    Dropped,
    /// Cilium's verdict of socket-translation events (the agent sends none today; kept so
    /// that filters and readers know it).
    Translated,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Forwarded => "FORWARDED",
            Verdict::Dropped => "DROPPED",
            Verdict::Translated => "TRANSLATED",
        }
    }
}

/// Hubble's Flow message, the fields this dataplane can fill, in flow.proto's order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Flow {
    pub time: String,
    pub verdict: Verdict,
    /// Cilium's number for the drop reason (deprecated in Hubble, kept for old consumers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason: Option<u32>,
    /// None for a packet dropped before its addresses were read.
    #[serde(rename = "IP", default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ip>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l4: Option<L4>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Endpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<Endpoint>,
    #[serde(rename = "Type")]
    pub flow_type: String,
    pub node_name: String,
    pub event_type: EventType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_service: Option<Service>,
    pub traffic_direction: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_observation_point: Option<String>,
    /// NEW for a connection's first record, ESTABLISHED for the later ones (traces only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason_desc: Option<String>,
    pub is_reply: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<Interface>,
    #[serde(rename = "Summary")]
    pub summary: String,
    /// Ours (extended form only): what NAT or load balancing did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub translation: Option<Translation>,
    /// Ours (extended form only): which event of the connection this record is, and its
    /// counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<Connection>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ip {
    pub source: String,
    /// The source after masquerade (SNAT) or a hairpin's source translation; `source` is the
    /// container's own address.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source_xlated: String,
    pub destination: String,
    #[serde(rename = "ipVersion")]
    pub ip_version: String,
}

/// Layer 4, one of TCP, UDP, ICMPv4 or ICMPv6 (protobuf's `oneof` as JSON: `{"TCP": {...}}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum L4 {
    #[serde(rename = "TCP")]
    Tcp {
        source_port: u16,
        destination_port: u16,
        flags: TcpFlags,
    },
    #[serde(rename = "UDP")]
    Udp {
        source_port: u16,
        destination_port: u16,
    },
    #[serde(rename = "ICMPv4")]
    Icmpv4 {
        #[serde(rename = "type")]
        icmp_type: u32,
        code: u32,
    },
    #[serde(rename = "ICMPv6")]
    Icmpv6 {
        #[serde(rename = "type")]
        icmp_type: u32,
        code: u32,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// TCP flags seen; protobuf's JSON mapping leaves out the false ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub struct TcpFlags {
    #[serde(default, skip_serializing_if = "is_false")]
    pub fin: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub syn: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub rst: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub psh: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub ack: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub urg: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub ece: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub cwr: bool,
}

const PSH: u8 = 0x08;
const URG: u8 = 0x20;
const ECE: u8 = 0x40;
const CWR: u8 = 0x80;

impl TcpFlags {
    pub fn from_bits(bits: u8) -> TcpFlags {
        TcpFlags {
            fin: bits & tcp_flag::FIN != 0,
            syn: bits & tcp_flag::SYN != 0,
            rst: bits & tcp_flag::RST != 0,
            psh: bits & PSH != 0,
            ack: bits & tcp_flag::ACK != 0,
            urg: bits & URG != 0,
            ece: bits & ECE != 0,
            cwr: bits & CWR != 0,
        }
    }

    /// The flags set, in the order Hubble's summaries name them.
    pub fn names(&self) -> Vec<&'static str> {
        [
            (self.syn, "SYN"),
            (self.ack, "ACK"),
            (self.fin, "FIN"),
            (self.rst, "RST"),
            (self.psh, "PSH"),
            (self.urg, "URG"),
            (self.ece, "ECE"),
            (self.cwr, "CWR"),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect()
    }
}

/// Who is at one end: a container (`pod_name` its name, `namespace` its Compose project or
/// else its network, its labels as `container:key=value`, its Compose service as workload),
/// the host (`reserved:host`) or anything else (`reserved:world`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Cilium's endpoint ID (containers only).
    #[serde(rename = "ID", default, skip_serializing_if = "is_zero")]
    pub id: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub identity: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<Workload>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    pub name: String,
    pub kind: String,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

pub const LABEL_HOST: &str = "reserved:host";
pub const LABEL_WORLD: &str = "reserved:world";

impl Endpoint {
    fn reserved(identity: u32, label: &str) -> Endpoint {
        Endpoint {
            identity,
            labels: vec![label.to_owned()],
            ..Endpoint::default()
        }
    }

    pub fn is_container(&self) -> bool {
        !self.pod_name.is_empty()
    }

    pub fn has_label(&self, label: &str) -> bool {
        self.labels.iter().any(|l| l == label)
    }

    /// The first workload's name (Hubble's metrics context `workload-name`).
    pub fn workload(&self) -> &str {
        self.workloads.first().map_or("", |w| w.name.as_str())
    }
}

/// FNV-1a: stable across builds and restarts (std's hasher is randomly seeded).
fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u32 {
    bytes.into_iter().fold(0x811c_9dc5, |hash, b| {
        (hash ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The numeric identity of a label set: the same labels give the same number on every host and
/// after every restart (as Cilium's allocator does for a cluster, without a shared store).
/// Two label sets may share a number (one in about 65,000 per pair); Cilium's tools then see
/// them as one identity.
pub fn identity_of(labels: &[String]) -> u32 {
    let mut sorted: Vec<&str> = labels.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    let hash = fnv1a(sorted.join("\0").into_bytes());
    IDENTITY_FIRST + hash % (IDENTITY_LAST - IDENTITY_FIRST + 1)
}

/// A container's endpoint ID, from its name (stable while the name is).
fn endpoint_id_of(name: &str) -> u32 {
    1 + fnv1a(name.bytes()) % ENDPOINT_ID_LAST
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventType {
    #[serde(rename = "type")]
    pub event_type: i32,
    #[serde(default)]
    pub sub_type: i32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub index: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
}

/// Ours: the address and port before and after the translation. For a published port or a
/// service the destination was rewritten (`original` is what the client connected to); for
/// masquerade the source (`original` is the container's own address and port).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Translation {
    pub original: String,
    pub translated: String,
    pub kind: String,
    /// A hairpin connection (a container to its own published port or VIP): the source it
    /// was given (the network's gateway and an allocated port) besides the destination.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source_translated: String,
}

/// Ours: the connection event (`new`, `close`, `update`, `end`, `drop`) and the counters the
/// connection had then (`reply_*`: the direction of its answers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    pub event: ConnectionEvent,
    pub packets: u64,
    pub bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionEvent {
    #[default]
    New,
    /// An ICMP echo connection's first answer.
    Reply,
    Close,
    Update,
    End,
    Drop,
}

impl ConnectionEvent {
    fn of(kind: Kind) -> ConnectionEvent {
        match kind {
            Kind::New => ConnectionEvent::New,
            Kind::Close => ConnectionEvent::Close,
            Kind::Reply => ConnectionEvent::Reply,
            Kind::Update => ConnectionEvent::Update,
            Kind::End => ConnectionEvent::End,
            Kind::Drop(_) => ConnectionEvent::Drop,
        }
    }
}

/// Where a forwarded connection was seen going (Cilium's trace observation points): the
/// enum name for `trace_observation_point`, the name metrics and the compact output use, and
/// Cilium's number for `event_type.sub_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TracePoint {
    /// Delivered to a container.
    ToEndpoint,
    /// Leaving the host (masquerade).
    ToNetwork,
    /// Handed to the host's own stack.
    ToStack,
}

impl TracePoint {
    pub fn enum_name(self) -> &'static str {
        match self {
            TracePoint::ToEndpoint => "TO_ENDPOINT",
            TracePoint::ToNetwork => "TO_NETWORK",
            TracePoint::ToStack => "TO_STACK",
        }
    }

    pub fn short_name(self) -> &'static str {
        match self {
            TracePoint::ToEndpoint => "to-endpoint",
            TracePoint::ToNetwork => "to-network",
            TracePoint::ToStack => "to-stack",
        }
    }

    /// Cilium's monitor numbers (TraceToLxc 0, TraceToStack 3, TraceToNetwork 11).
    pub fn cilium_code(self) -> i32 {
        match self {
            TracePoint::ToEndpoint => 0,
            TracePoint::ToNetwork => 11,
            TracePoint::ToStack => 3,
        }
    }

    pub fn from_enum_name(name: &str) -> Option<TracePoint> {
        [
            TracePoint::ToEndpoint,
            TracePoint::ToNetwork,
            TracePoint::ToStack,
        ]
        .into_iter()
        .find(|p| p.enum_name() == name)
    }

    fn from_code(code: i32) -> Option<TracePoint> {
        [
            TracePoint::ToEndpoint,
            TracePoint::ToNetwork,
            TracePoint::ToStack,
        ]
        .into_iter()
        .find(|p| p.cilium_code() == code)
    }
}

/// A published port that leads to a service, to name the service in its flows.
#[derive(Clone, Debug)]
struct PublishedService {
    host_ip: Option<IpAddr>,
    first: u16,
    last: u16,
    proto: u8,
    service: Service,
}

/// Who is behind an address, from the model and the host's addresses.
#[derive(Clone, Debug, Default)]
pub struct Identities {
    containers: HashMap<IpAddr, Endpoint>,
    vips: HashMap<(IpAddr, u16, u8), Service>,
    published: Vec<PublishedService>,
    host: HashSet<IpAddr>,
}

/// Every address of a container's interface, of both families: the one place that knows which
/// fields of the model hold them.
fn interface_addrs(interface: &model::Interface) -> impl Iterator<Item = IpAddr> {
    let v4 = interface.ip.map(IpAddr::V4);
    v4.into_iter().chain(interface.ip6.map(IpAddr::V6))
}

/// Every gateway address of a network (the host's own, on the network's bridge).
fn gateway_addrs(network: &model::Network) -> impl Iterator<Item = IpAddr> {
    let v4 = network.gateway.map(IpAddr::V4);
    v4.into_iter().chain(network.gateway6.map(IpAddr::V6))
}

/// Every VIP of a service.
fn vip_addrs(service: &model::Service) -> impl Iterator<Item = IpAddr> {
    service.addresses().into_iter()
}

impl Identities {
    /// `host_addrs`: the host's own addresses (the uplink's and the others the agent found);
    /// the networks' gateways are the host's too.
    pub fn new(model: &Model, host_addrs: impl IntoIterator<Item = IpAddr>) -> Identities {
        let mut containers = HashMap::new();
        let mut namespaces: HashMap<&str, String> = HashMap::new();
        for endpoint in &model.endpoints {
            let project = endpoint.labels.get(COMPOSE_PROJECT);
            let workloads: Vec<Workload> = endpoint
                .labels
                .get(COMPOSE_SERVICE)
                .map(|service| Workload {
                    name: service.clone(),
                    kind: "Service".into(),
                })
                .into_iter()
                .collect();
            for interface in &endpoint.interfaces {
                let namespace = project.unwrap_or(&interface.network).clone();
                namespaces
                    .entry(endpoint.name.as_str())
                    .or_insert_with(|| namespace.clone());
                // Cilium's labels of an endpoint include its namespace's, so the same labels in
                // two namespaces are two identities.
                let mut labels: Vec<String> = endpoint
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{LABEL_SOURCE}:{k}={v}"))
                    .collect();
                let identity = identity_of(
                    &labels
                        .iter()
                        .cloned()
                        .chain([format!("namespace={namespace}")])
                        .collect::<Vec<_>>(),
                );
                labels.sort();
                let container = Endpoint {
                    id: endpoint_id_of(&endpoint.name),
                    identity,
                    namespace,
                    labels,
                    pod_name: endpoint.name.clone(),
                    workloads: workloads.clone(),
                };
                for ip in interface_addrs(interface) {
                    containers.insert(ip, container.clone());
                }
            }
        }
        // A service's namespace: its backends' (the first one's).
        let service_of = |name: &str| -> Service {
            let namespace = model
                .services
                .iter()
                .find(|s| s.name == name)
                .and_then(|s| s.backends.first())
                .and_then(|b| namespaces.get(b.as_str()).cloned())
                .unwrap_or_default();
            Service {
                name: name.to_owned(),
                namespace,
            }
        };
        let vips = model
            .services
            .iter()
            .flat_map(|s| {
                let service = service_of(&s.name);
                vip_addrs(s).map(move |vip| ((vip, s.port, s.protocol.number()), service.clone()))
            })
            .collect();
        let published = model
            .ports
            .iter()
            .filter_map(|p| match &p.target {
                PortTarget::Service(name) => Some(PublishedService {
                    // 0.0.0.0 / ::: every host address of that family.
                    host_ip: p.host_ip,
                    first: p.host_ports.first,
                    last: p.host_ports.last,
                    proto: p.protocol.number(),
                    service: service_of(name),
                }),
                PortTarget::Endpoint(_) => None,
            })
            .collect();
        let host = model
            .networks
            .iter()
            .flat_map(gateway_addrs)
            .chain(host_addrs)
            .collect();
        Identities {
            containers,
            vips,
            published,
            host,
        }
    }

    fn is_host(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_loopback() || self.host.contains(&ip)
    }

    /// The endpoint behind `ip`. A service VIP that was not translated (no backend) is
    /// `reserved:world` as in Cilium; its flow names the service in `destination_service`.
    /// An IPv4-mapped IPv6 address (`::ffff:172.30.1.2`, what an IPv6 socket reaches an IPv4
    /// container through) is its IPv4 address's.
    pub fn endpoint(&self, ip: IpAddr) -> &Endpoint {
        let ip = ip.to_canonical();
        if let Some(container) = self.containers.get(&ip) {
            return container;
        }
        if self.is_host(ip) {
            return &HOST;
        }
        &WORLD
    }

    /// The service a connection to `ip:port` reached: a VIP's, or the one a published port
    /// leads to.
    fn service(&self, ip: IpAddr, port: u16, proto: u8) -> Option<&Service> {
        let ip = ip.to_canonical();
        // The VIP's service on that port, else one on every port (a Swarm VIP's).
        if let Some(service) = self
            .vips
            .get(&(ip, port, proto))
            .or_else(|| self.vips.get(&(ip, 0, proto)))
        {
            return Some(service);
        }
        if !self.is_host(ip) {
            return None;
        }
        self.published
            .iter()
            .find(|p| {
                p.proto == proto
                    && (p.first..=p.last).contains(&port)
                    && p.host_ip.is_none_or(|h| {
                        h == ip || (h.is_unspecified() && h.is_ipv4() == ip.is_ipv4())
                    })
            })
            .map(|p| &p.service)
    }
}

/// The reserved endpoints every record without a container at that end names.
static HOST: LazyLock<Endpoint> = LazyLock::new(|| Endpoint::reserved(IDENTITY_HOST, LABEL_HOST));
static WORLD: LazyLock<Endpoint> =
    LazyLock::new(|| Endpoint::reserved(IDENTITY_WORLD, LABEL_WORLD));

/// What a record is built with besides its event.
pub struct Context<'a> {
    pub identities: &'a Identities,
    pub clock: &'a Clock,
    pub node_name: &'a str,
    /// Name of the interface the event was seen on, if known.
    pub ifname: Option<&'a str>,
}

/// An ICMPv4 type and code as Hubble writes them (gopacket's `ICMPv4TypeCode` text, which
/// Hubble puts in a flow's `Summary` after `ICMPv4 ` and in `hubble_icmp_total{type}`):
/// `EchoRequest`, `DestinationUnreachable(Port)`, `TimeExceeded(TTLExceeded)`, a type
/// without codes with a code anyway `EchoRequest(Code: 3)`, an unknown type `42(0)`.
pub fn icmpv4_type_code(icmp_type: u8, code: u8) -> String {
    let (name, codes): (&str, &[&str]) = match icmp_type {
        0 => ("EchoReply", &[]),
        3 => (
            "DestinationUnreachable",
            &[
                "Net",
                "Host",
                "Protocol",
                "Port",
                "FragmentationNeeded",
                "SourceRoutingFailed",
                "NetUnknown",
                "HostUnknown",
                "SourceIsolated",
                "NetAdminProhibited",
                "HostAdminProhibited",
                "NetTOS",
                "HostTOS",
                "CommAdminProhibited",
                "HostPrecedence",
                "PrecedenceCutoff",
            ],
        ),
        4 => ("SourceQuench", &[]),
        5 => ("Redirect", &["Net", "Host", "TOS+Net", "TOS+Host"]),
        8 => ("EchoRequest", &[]),
        9 => ("RouterAdvertisement", &[]),
        10 => ("RouterSolicitation", &[]),
        11 => (
            "TimeExceeded",
            &["TTLExceeded", "FragmentReassemblyTimeExceeded"],
        ),
        12 => (
            "ParameterProblem",
            &["PointerIndicatesError", "MissingOption", "BadLength"],
        ),
        13 => ("TimestampRequest", &[]),
        14 => ("TimestampReply", &[]),
        15 => ("InfoRequest", &[]),
        16 => ("InfoReply", &[]),
        17 => ("AddressMaskRequest", &[]),
        18 => ("AddressMaskReply", &[]),
        _ => return format!("{icmp_type}({code})"),
    };
    type_code_text(name, codes, code)
}

/// An ICMPv6 type and code as Hubble writes them (gopacket's `ICMPv6TypeCode` text, in a
/// flow's `Summary` after `ICMPv6 ` and in `hubble_icmp_total{family="IPv6",type}`):
/// `EchoRequest`, `DestinationUnreachable(PortUnreachable)`, `TimeExceeded(HopLimitExceeded)`,
/// a code the type does not have `PacketTooBig(Code: 1)`, an unknown type `200(0)`. (The
/// multicast listener messages 130..=132 and 143 have no name there: numbers, as in Hubble.)
pub fn icmpv6_type_code(icmp_type: u8, code: u8) -> String {
    let (name, codes): (&str, &[&str]) = match icmp_type {
        1 => (
            "DestinationUnreachable",
            &[
                "NoRouteToDst",
                "AdminProhibited",
                "BeyondScopeOfSrc",
                "AddressUnreachable",
                "PortUnreachable",
                "SrcAddressFailedPolicy",
                "RejectRouteToDst",
            ],
        ),
        2 => ("PacketTooBig", &[]),
        3 => (
            "TimeExceeded",
            &["HopLimitExceeded", "FragmentReassemblyTimeExceeded"],
        ),
        4 => (
            "ParameterProblem",
            &[
                "ErroneousHeaderField",
                "UnrecognizedNextHeader",
                "UnrecognizedIPv6Option",
            ],
        ),
        128 => ("EchoRequest", &[]),
        129 => ("EchoReply", &[]),
        133 => ("RouterSolicitation", &[]),
        134 => ("RouterAdvertisement", &[]),
        135 => ("NeighborSolicitation", &[]),
        136 => ("NeighborAdvertisement", &[]),
        137 => ("Redirect", &[]),
        _ => return format!("{icmp_type}({code})"),
    };
    type_code_text(name, codes, code)
}

/// gopacket's text for a named ICMP type and its code, shared by both families: the bare
/// name for a type without codes and code 0, `Name(CodeName)` for a known code, and
/// `Name(Code: n)` for a code the type does not have.
fn type_code_text(name: &str, codes: &[&str], code: u8) -> String {
    match codes.get(usize::from(code)) {
        _ if codes.is_empty() && code == 0 => name.to_owned(),
        Some(code_name) => format!("{name}({code_name})"),
        None => format!("{name}(Code: {code})"),
    }
}

fn protocol_summary(proto: u8, flags: u8, icmp: Icmp) -> String {
    match proto {
        // A packet dropped before its TCP header was read (XDP reads addresses only).
        IPPROTO_TCP if flags == 0 => "TCP".into(),
        IPPROTO_TCP => format!(
            "TCP Flags: {}",
            TcpFlags::from_bits(flags).names().join(", ")
        ),
        IPPROTO_UDP => "UDP".into(),
        IPPROTO_ICMP => format!("ICMPv4 {}", icmpv4_type_code(icmp.icmp_type, icmp.code)),
        IPPROTO_ICMPV6 => format!("ICMPv6 {}", icmpv6_type_code(icmp.icmp_type, icmp.code)),
        0 => "unknown".into(),
        other => format!("IP protocol {other}"),
    }
}

/// Whether `hook` is one of the cgroup socket hooks (their events come from a system call,
/// not from a packet).
fn is_socket_hook(hook: u32) -> bool {
    use dataplane_common::hook::{SOCK_CONNECT4, SOCK_CONNECT6, SOCK_SENDMSG4, SOCK_SENDMSG6};
    matches!(
        hook,
        SOCK_CONNECT4 | SOCK_SENDMSG4 | SOCK_CONNECT6 | SOCK_SENDMSG6
    )
}

/// What an event says once its ends are known, before anything is written out: the part of
/// a record every event needs (the metrics count it), borrowed from the identities. The
/// record itself ([`build`]) is written from it only when someone reads it.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    /// No addresses were read (a packet dropped that early): the record has no ends.
    pub unparsed: bool,
    pub source: &'a Endpoint,
    pub destination: &'a Endpoint,
    /// The connection's real destination (after a destination rewrite).
    pub daddr: IpAddr,
    pub destination_service: Option<&'a Service>,
    pub drop_reason: Option<DropReason>,
    pub verdict: Verdict,
    pub point: Option<TracePoint>,
    pub reply: bool,
    pub l4: Option<L4>,
    pub event: ConnectionEvent,
}

impl Facts<'_> {
    /// As [`Flow::protocol`] says it of the record.
    pub fn protocol(&self) -> &'static str {
        protocol_name(self.l4.as_ref())
    }

    /// The ends as the record has them (none when unparsed).
    pub fn ends(&self) -> (&Endpoint, &Endpoint) {
        if self.unparsed {
            (&NO_ENDPOINT, &NO_ENDPOINT)
        } else {
            (self.source, self.destination)
        }
    }
}

/// The facts of `event`, its ends from `identities`.
pub fn classify<'a>(event: &Event, identities: &'a Identities) -> Facts<'a> {
    let tuple = event.tuple;
    // A packet dropped before its addresses were read has none to report.
    let unparsed = tuple.saddr.is_unspecified() && tuple.daddr.is_unspecified();
    // The connection's real ends: the container behind a published port or a VIP (after the
    // destination rewrite), the container behind a masquerade (before the source rewrite).
    let (daddr, dport) = match event.nat {
        Some(nat) if nat.destination => (nat.addr, nat.port),
        _ => (tuple.daddr, tuple.dport),
    };
    // A host process's socket not bound yet has no source address when the socket hooks
    // translate it (the kernel picks it afterwards): the host all the same.
    let source = if tuple.saddr.is_unspecified() && is_socket_hook(event.hook) {
        &HOST
    } else {
        identities.endpoint(tuple.saddr)
    };
    let destination = identities.endpoint(daddr);
    let translated_to_service = matches!(
        event.nat.map(|n| n.kind),
        Some(TranslationKind::Service | TranslationKind::PublishedPort)
    );
    let destination_service = if translated_to_service || matches!(event.kind, Kind::Drop(_)) {
        identities.service(tuple.daddr, tuple.dport, tuple.proto)
    } else {
        None
    };
    let drop_reason = match event.kind {
        Kind::Drop(reason) => Some(reason),
        _ => None,
    };
    // Cilium's meaning: traces are FORWARDED whether or not NAT rewrote them (TRANSLATED is
    // for socket-translation events).
    let verdict = if drop_reason.is_some() {
        Verdict::Dropped
    } else {
        Verdict::Forwarded
    };
    // Where the connection goes, the same for all its records whichever hook saw the event.
    let point = if drop_reason.is_some() {
        None
    } else if destination.is_container() {
        Some(TracePoint::ToEndpoint)
    } else if destination.has_label(LABEL_HOST) {
        Some(TracePoint::ToStack)
    } else {
        Some(TracePoint::ToNetwork)
    };
    let l4 = match tuple.proto {
        IPPROTO_TCP => Some(L4::Tcp {
            source_port: tuple.sport,
            destination_port: dport,
            flags: TcpFlags::from_bits(event.tcp_flags),
        }),
        IPPROTO_UDP => Some(L4::Udp {
            source_port: tuple.sport,
            destination_port: dport,
        }),
        // The packet the event is about: a connection's first (echo request), its answer
        // (echo reply), a dropped one (any type).
        IPPROTO_ICMP => Some(L4::Icmpv4 {
            icmp_type: u32::from(event.icmp.icmp_type),
            code: u32::from(event.icmp.code),
        }),
        IPPROTO_ICMPV6 => Some(L4::Icmpv6 {
            icmp_type: u32::from(event.icmp.icmp_type),
            code: u32::from(event.icmp.code),
        }),
        _ => None,
    };
    Facts {
        unparsed,
        source,
        destination,
        daddr,
        destination_service,
        drop_reason,
        verdict,
        point,
        reply: event.kind == Kind::Reply,
        l4: if unparsed { None } else { l4 },
        event: ConnectionEvent::of(event.kind),
    }
}

/// Builds the record of `event`.
pub fn build(event: &Event, cx: &Context<'_>) -> Record {
    let facts = classify(event, cx.identities);
    let Facts {
        unparsed,
        source,
        destination,
        daddr,
        drop_reason,
        verdict,
        point,
        reply,
        l4,
        event: connection_event,
        destination_service,
    } = facts;
    let tuple = event.tuple;
    let event_type = match (drop_reason, point) {
        (Some(reason), _) => EventType {
            event_type: MESSAGE_TYPE_DROP,
            sub_type: reason as i32,
        },
        (None, point) => EventType {
            event_type: MESSAGE_TYPE_TRACE,
            sub_type: point.map_or(0, TracePoint::cilium_code),
        },
    };
    let source_xlated = match event.nat {
        Some(nat) if !nat.destination => nat.addr.to_string(),
        Some(Nat {
            source: Some((addr, _)),
            ..
        }) => addr.to_string(),
        _ => String::new(),
    };
    // An ICMP echo's one identifier is in `sport` both ways (`dport` is 0).
    let original_dport = if matches!(tuple.proto, IPPROTO_ICMP | IPPROTO_ICMPV6) {
        tuple.sport
    } else {
        tuple.dport
    };
    let translation = event.nat.map(|nat| {
        // `[2001:db8::1]:80` for IPv6, as everywhere an address and port are written.
        let at = |addr: IpAddr, port: u16| SocketAddr::new(addr, port).to_string();
        let original = if nat.destination {
            at(tuple.daddr, original_dport)
        } else {
            at(tuple.saddr, tuple.sport)
        };
        Translation {
            original,
            translated: at(nat.addr, nat.port),
            kind: nat.kind.name().to_owned(),
            source_translated: nat
                .source
                .map(|(addr, port)| at(addr, port))
                .unwrap_or_default(),
        }
    });
    // Cilium's direction is the one of the endpoint whose policy applies: arriving at a
    // container is INGRESS (also from another container), leaving one for the host or the
    // outside is EGRESS. It is the connection's: a reply has the direction of the packet it
    // answers (Hubble flips the observed direction of replies).
    let (opener, answerer) = if reply {
        (destination, source)
    } else {
        (source, destination)
    };
    let traffic_direction = if answerer.is_container() || !opener.is_container() {
        "INGRESS"
    } else {
        "EGRESS"
    };
    let time = clock::rfc3339(cx.clock.unix_ns(event.time_ns));
    let flow = Flow {
        time: time.clone(),
        verdict,
        drop_reason: drop_reason.map(|r| r as u32),
        ip: (!unparsed).then(|| Ip {
            source: tuple.saddr.to_string(),
            source_xlated,
            destination: daddr.to_string(),
            ip_version: tuple.family().hubble_name().into(),
        }),
        l4,
        traffic_direction: traffic_direction.into(),
        source: (!unparsed).then(|| source.clone()),
        destination: (!unparsed).then(|| destination.clone()),
        flow_type: "L3_L4".into(),
        node_name: cx.node_name.to_owned(),
        event_type,
        destination_service: destination_service.cloned(),
        trace_observation_point: point.map(|p| p.enum_name().to_owned()),
        trace_reason: point.map(|_| {
            match event.kind {
                Kind::New => "NEW",
                Kind::Reply => "REPLY",
                _ => "ESTABLISHED",
            }
            .to_owned()
        }),
        drop_reason_desc: drop_reason.map(|r| r.desc().to_owned()),
        is_reply: reply,
        interface: (event.ifindex != 0).then(|| Interface {
            index: event.ifindex,
            name: cx.ifname.unwrap_or_default().to_owned(),
        }),
        summary: protocol_summary(
            if unparsed { 0 } else { tuple.proto },
            event.tcp_flags,
            event.icmp,
        ),
        translation,
        connection: Some(Connection {
            event: connection_event,
            packets: event.counters.packets,
            bytes: event.counters.bytes,
            reply_packets: event.counters.reply_packets,
            reply_bytes: event.counters.reply_bytes,
        }),
    };
    Record {
        flow,
        node_name: cx.node_name.to_owned(),
        time,
    }
}

impl L4 {
    /// Source and destination ports (none for ICMP).
    pub fn ports(&self) -> Option<(u16, u16)> {
        match *self {
            L4::Tcp {
                source_port,
                destination_port,
                ..
            }
            | L4::Udp {
                source_port,
                destination_port,
            } => Some((source_port, destination_port)),
            L4::Icmpv4 { .. } | L4::Icmpv6 { .. } => None,
        }
    }
}

fn protocol_name(l4: Option<&L4>) -> &'static str {
    match l4 {
        Some(L4::Tcp { .. }) => "TCP",
        Some(L4::Udp { .. }) => "UDP",
        Some(L4::Icmpv4 { .. }) => "ICMPv4",
        Some(L4::Icmpv6 { .. }) => "ICMPv6",
        None => "Unknown L4",
    }
}

static NO_ENDPOINT: Endpoint = Endpoint {
    id: 0,
    identity: 0,
    namespace: String::new(),
    labels: Vec::new(),
    pod_name: String::new(),
    workloads: Vec::new(),
};

impl Flow {
    /// Hubble's protocol name: TCP, UDP, ICMPv4, ICMPv6; `Unknown L4` (as Hubble's metrics
    /// say) for anything else.
    pub fn protocol(&self) -> &'static str {
        protocol_name(self.l4.as_ref())
    }

    /// The IP family's name, `IPv4` or `IPv6` (Hubble's `IP.ipVersion`); empty without IP.
    pub fn ip_version(&self) -> &str {
        self.ip.as_ref().map_or("", |ip| ip.ip_version.as_str())
    }

    /// Source and destination ports (none for ICMP).
    pub fn ports(&self) -> Option<(u16, u16)> {
        self.l4.and_then(|l4| l4.ports())
    }

    pub fn trace_point(&self) -> Option<TracePoint> {
        self.trace_observation_point
            .as_deref()
            .and_then(TracePoint::from_enum_name)
            .or_else(|| {
                (self.event_type.event_type == MESSAGE_TYPE_TRACE)
                    .then(|| TracePoint::from_code(self.event_type.sub_type))
                    .flatten()
            })
    }

    pub fn source(&self) -> &Endpoint {
        self.source.as_ref().unwrap_or(&NO_ENDPOINT)
    }

    pub fn destination(&self) -> &Endpoint {
        self.destination.as_ref().unwrap_or(&NO_ENDPOINT)
    }

    pub fn source_ip(&self) -> &str {
        self.ip.as_ref().map_or("", |ip| ip.source.as_str())
    }

    pub fn destination_ip(&self) -> &str {
        self.ip.as_ref().map_or("", |ip| ip.destination.as_str())
    }

    pub fn drop_reason(&self) -> Option<DropReason> {
        self.drop_reason_desc
            .as_deref()
            .and_then(|d| DropReason::ALL.into_iter().find(|r| r.desc() == d))
    }
}

/// Cilium's names of its reserved identities, as Hubble prints them.
fn reserved_identity_name(identity: u32) -> Option<&'static str> {
    Some(match identity {
        0 => "unknown",
        1 => "host",
        2 => "world",
        3 => "unmanaged",
        4 => "health",
        5 => "init",
        6 => "remote-node",
        7 => "kube-apiserver",
        8 => "ingress",
        9 => "world-ipv4",
        10 => "world-ipv6",
        _ => return None,
    })
}

/// An end as `hubble observe -o compact` shows it: `ns/pod:port`, else the address.
fn compact_host(
    endpoint: &Endpoint,
    service: Option<&Service>,
    ip: &str,
    port: Option<u16>,
) -> String {
    let host = if endpoint.is_container() {
        if endpoint.namespace.is_empty() {
            endpoint.pod_name.clone()
        } else {
            format!("{}/{}", endpoint.namespace, endpoint.pod_name)
        }
    } else if let Some(service) = service {
        if service.namespace.is_empty() {
            service.name.clone()
        } else {
            format!("{}/{}", service.namespace, service.name)
        }
    } else {
        ip.to_owned()
    };
    match port {
        // An IPv6 address with a port in brackets (Go's net.JoinHostPort, as hubble prints).
        Some(port) if port != 0 && host.contains(':') => format!("[{host}]:{port}"),
        Some(port) if port != 0 => format!("{host}:{port}"),
        _ => host,
    }
}

fn compact_identity(identity: u32) -> String {
    match reserved_identity_name(identity) {
        Some(name) => format!("({name})"),
        None => format!("(ID:{identity})"),
    }
}

/// One line like `hubble observe -o compact` prints:
/// `Nov 25 10:00:01.123: front/web2:41234 (ID:12345) -> front/web1:80 (ID:23456) to-endpoint FORWARDED (TCP Flags: SYN)`,
/// drops with Cilium's text of the reason (`Policy denied DROPPED`); records in the extended
/// form add the translation and, for events after the first, the connection's counters.
pub fn compact(record: &Record) -> String {
    let flow = &record.flow;
    let ports = flow.ports();
    let source = compact_host(flow.source(), None, flow.source_ip(), ports.map(|p| p.0));
    let destination = compact_host(
        flow.destination(),
        flow.destination_service.as_ref(),
        flow.destination_ip(),
        ports.map(|p| p.1),
    );
    let kind = match (flow.drop_reason(), flow.trace_point()) {
        (Some(reason), _) => reason.text().to_owned(),
        (None, Some(point)) => point.short_name().to_owned(),
        (None, None) => "UNKNOWN".into(),
    };
    let mut ends = [
        (source, compact_identity(flow.source().identity)),
        (destination, compact_identity(flow.destination().identity)),
    ];
    // As hubble prints a reply: the connection's way round, with the arrow reversed.
    let arrow = if flow.is_reply {
        ends.swap(0, 1);
        "<-"
    } else {
        "->"
    };
    let [(first, first_id), (second, second_id)] = ends;
    let mut line = format!(
        "{}: {first} {first_id} {arrow} {second} {second_id} {kind} {} ({})",
        clock::compact(&flow.time),
        flow.verdict.name(),
        flow.summary
    );
    if let Some(t) = &flow.translation {
        line.push_str(&format!(" [{} {} => {}", t.kind, t.original, t.translated));
        if !t.source_translated.is_empty() {
            line.push_str(&format!(", from {}", t.source_translated));
        }
        line.push(']');
    }
    if let Some(c) = &flow.connection
        && matches!(
            c.event,
            ConnectionEvent::Close | ConnectionEvent::Update | ConnectionEvent::End
        )
    {
        line.push_str(&format!(
            " {}: {}/{} packets, {}/{} bytes",
            match c.event {
                ConnectionEvent::Close => "close",
                ConnectionEvent::Update => "update",
                _ => "end",
            },
            c.packets,
            c.reply_packets,
            c.bytes,
            c.reply_bytes
        ));
    }
    line
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use dataplane_common::{ct_origin, ct_rewrite, flow_kind, hook};

    use super::*;
    use crate::{
        flows::decode::{self, tests::raw_event},
        model::{Model, StateFile},
    };

    const SPEC: &str = r#"
networks:
  - {name: front, bridge: br-front, subnet: 172.30.1.0/24, gateway: 172.30.1.1}
endpoints:
  - name: client
    interfaces: [{network: front, ip: 172.30.1.9, mac: "02:42:ac:1e:01:09", host_veth: veth-client}]
  - name: web1
    labels: {app: web, tier: front}
    interfaces: [{network: front, ip: 172.30.1.2, mac: "02:42:ac:1e:01:02", host_veth: veth-web1}]
services:
  - {name: web, vip: 10.96.0.10, port: 80, selector: {app: web}}
  - {name: empty, vip: 10.96.0.12, port: 80, selector: {app: nothing}}
ports:
  - {endpoint: web1, protocol: tcp, host_port: 8080, container_port: 80}
  - {service: web, protocol: tcp, host_port: 8000, container_port: 80}
"#;

    fn identities() -> Identities {
        let spec = StateFile::parse(SPEC).unwrap();
        let model = Model::from_spec(&spec).unwrap();
        Identities::new(&model, ["192.0.2.1".parse().unwrap()])
    }

    fn record_of(raw: &dataplane_common::FlowEvent) -> Record {
        let ids = identities();
        let clock = Clock::with_offset(1_732_528_801_000_000_000 - 5_000_000_000);
        let cx = Context {
            identities: &ids,
            clock: &clock,
            node_name: "node1",
            ifname: Some("eth0"),
        };
        build(&decode::from_raw(raw).unwrap(), &cx)
    }

    fn ip(s: &str) -> u32 {
        u32::from(s.parse::<Ipv4Addr>().unwrap()).to_be()
    }

    /// Decodes a default JSON line with the types generated from dataplane/proto, whose
    /// pbjson deserialisers refuse unknown fields and enum values: the schema test.
    fn strict(line: &str) -> crate::hubble::api::observer::GetFlowsResponse {
        serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a valid Hubble flow: {e}: {line}"))
    }

    /// The metrics count from `classify` without the record; they must say what the record
    /// says, for every kind of event.
    #[test]
    fn the_facts_the_metrics_count_are_what_the_record_says() {
        let ids = identities();
        let clock = Clock::with_offset(0);
        let cx = Context {
            identities: &ids,
            clock: &clock,
            node_name: "n",
            ifname: None,
        };
        let published = published_port_event();
        let mut dropped = raw_event(
            flow_kind::DROP,
            IPPROTO_UDP,
            ("203.0.113.9", 53),
            ("172.30.1.2", 53),
        );
        dropped.drop_reason = DropReason::PolicyDeny as u8;
        let mut unparsed = raw_event(flow_kind::DROP, IPPROTO_TCP, ("0.0.0.0", 0), ("0.0.0.0", 0));
        unparsed.drop_reason = DropReason::Malformed as u8;
        let events = [
            published,
            raw_event(
                flow_kind::REPLY,
                IPPROTO_ICMP,
                ("172.30.1.2", 7),
                ("172.30.1.9", 0),
            ),
            raw_event(
                flow_kind::CLOSE,
                IPPROTO_TCP,
                ("172.30.1.9", 5000),
                ("10.96.0.12", 80),
            ),
            raw_event(
                flow_kind::NEW,
                IPPROTO_UDP,
                ("172.30.1.9", 5000),
                ("198.51.100.7", 53),
            ),
            dropped,
            unparsed,
        ];
        for raw in &events {
            let event = decode::from_raw(raw).unwrap();
            let facts = classify(&event, &ids);
            let flow = build(&event, &cx).flow;
            assert_eq!(facts.protocol(), flow.protocol(), "{flow:?}");
            assert_eq!(facts.point, flow.trace_point(), "{flow:?}");
            assert_eq!(
                facts.ends(),
                (flow.source(), flow.destination()),
                "{flow:?}"
            );
            assert_eq!(facts.drop_reason, flow.drop_reason(), "{flow:?}");
            assert_eq!(facts.verdict, flow.verdict, "{flow:?}");
            assert_eq!(facts.l4, flow.l4, "{flow:?}");
            assert_eq!(
                Some(facts.event),
                flow.connection.map(|c| c.event),
                "{flow:?}"
            );
        }
    }

    /// A new connection from 192.0.2.2 to the host's published port 8080, translated to web1.
    fn published_port_event() -> dataplane_common::FlowEvent {
        let mut raw = raw_event(
            flow_kind::NEW,
            IPPROTO_TCP,
            ("192.0.2.2", 41234),
            ("192.0.2.1", 8080),
        );
        raw.origin = ct_origin::PUBLISHED;
        raw.rewrite = ct_rewrite::DST;
        raw.nat_addr = dataplane_common::In6Addr::mapped_v4(ip("172.30.1.2"));
        raw.nat_port = 80u16.to_be();
        raw
    }

    #[test]
    fn a_published_port_connection_is_a_forwarded_flow_to_the_container() {
        let mut raw = published_port_event();
        raw.hook = hook::UPLINK_INGRESS as u8;
        let mut record = record_of(&raw);
        let web1 = identity_of(&[
            "container:app=web".into(),
            "container:tier=front".into(),
            "namespace=front".into(),
        ]);
        let line = record.hubble_json();
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        let expected = serde_json::json!({
            "flow": {
                "time": "2024-11-25T10:00:01.000000000Z",
                "verdict": "FORWARDED",
                "IP": {"source": "192.0.2.2", "destination": "172.30.1.2", "ipVersion": "IPv4"},
                "l4": {"TCP": {"source_port": 41234, "destination_port": 80, "flags": {"SYN": true}}},
                "source": {"identity": 2, "labels": ["reserved:world"]},
                "destination": {
                    "ID": endpoint_id_of("web1"),
                    "identity": web1,
                    "namespace": "front",
                    "labels": ["container:app=web", "container:tier=front"],
                    "pod_name": "web1"
                },
                "Type": "L3_L4",
                "node_name": "node1",
                "event_type": {"type": 4, "sub_type": 0},
                "traffic_direction": "INGRESS",
                "trace_observation_point": "TO_ENDPOINT",
                "trace_reason": "NEW",
                "is_reply": false,
                "interface": {"index": 7, "name": "eth0"},
                "Summary": "TCP Flags: SYN"
            },
            "node_name": "node1",
            "time": "2024-11-25T10:00:01.000000000Z"
        });
        assert_eq!(json, expected, "{json:#}");
        strict(&line);
        // The extended form adds ours, and reads back (the observe client reads these lines).
        let extended = record.extended_json();
        let back: Record = serde_json::from_str(&extended).unwrap();
        assert_eq!(back, record);
        let t = back.flow.translation.as_ref().unwrap();
        assert_eq!(
            (t.original.as_str(), t.translated.as_str(), t.kind.as_str()),
            ("192.0.2.1:8080", "172.30.1.2:80", "published_port")
        );
        assert_eq!(
            compact(&record),
            format!(
                "Nov 25 10:00:01.000: 192.0.2.2:41234 (world) -> front/web1:80 (ID:{web1}) \
                 to-endpoint FORWARDED (TCP Flags: SYN) [published_port 192.0.2.1:8080 => \
                 172.30.1.2:80]"
            )
        );
        // A Hubble reader's line has no extension, so its compact form is hubble's own.
        let plain: Record = serde_json::from_str(&line).unwrap();
        assert!(!compact(&plain).contains("published_port"));
    }

    #[test]
    fn a_container_to_container_connection_is_forwarded_ingress_to_the_destination() {
        let mut raw = raw_event(
            flow_kind::NEW,
            IPPROTO_UDP,
            ("172.30.1.9", 5000),
            ("172.30.1.2", 53),
        );
        raw.origin = ct_origin::PLAIN;
        let mut record = record_of(&raw);
        strict(&record.hubble_json());
        let flow = &record.flow;
        assert_eq!(flow.verdict, Verdict::Forwarded);
        assert_eq!(flow.traffic_direction, "INGRESS");
        assert_eq!(flow.source().pod_name, "client");
        assert_eq!(flow.destination().pod_name, "web1");
        assert_eq!(flow.translation, None);
        assert_eq!(flow.summary, "UDP");
        let client = flow.source().identity;
        assert!((256..=65535).contains(&client), "{client}");
        assert_ne!(client, flow.destination().identity);
        assert!(compact(&record).starts_with(&format!(
            "Nov 25 10:00:01.000: front/client:5000 (ID:{client}) -> front/web1:53 (ID:"
        )));
    }

    #[test]
    fn masquerade_keeps_the_container_as_source_and_names_the_host_address() {
        let mut raw = raw_event(
            flow_kind::CLOSE,
            IPPROTO_TCP,
            ("172.30.1.2", 41000),
            ("192.0.2.2", 9999),
        );
        raw.origin = ct_origin::MASQUERADE;
        raw.rewrite = ct_rewrite::SRC;
        raw.nat_addr = dataplane_common::In6Addr::mapped_v4(ip("192.0.2.1"));
        raw.nat_port = 20001u16.to_be();
        raw.hook = hook::UPLINK_EGRESS as u8;
        raw.tcp_flags = tcp_flag::SYN | tcp_flag::ACK | tcp_flag::FIN;
        raw.packets = 6;
        raw.bytes = 400;
        raw.reply_packets = 5;
        raw.reply_bytes = 900;
        let mut record = record_of(&raw);
        strict(&record.hubble_json());
        let flow = &record.flow;
        assert_eq!(flow.verdict, Verdict::Forwarded);
        let ip = flow.ip.as_ref().unwrap();
        assert_eq!(
            (
                ip.source.as_str(),
                ip.source_xlated.as_str(),
                ip.destination.as_str()
            ),
            ("172.30.1.2", "192.0.2.1", "192.0.2.2")
        );
        assert_eq!(flow.traffic_direction, "EGRESS");
        assert_eq!(flow.destination().labels, vec![LABEL_WORLD]);
        assert_eq!(flow.trace_observation_point.as_deref(), Some("TO_NETWORK"));
        assert_eq!(flow.trace_reason.as_deref(), Some("ESTABLISHED"));
        let t = flow.translation.as_ref().unwrap();
        assert_eq!(
            (t.original.as_str(), t.translated.as_str(), t.kind.as_str()),
            ("172.30.1.2:41000", "192.0.2.1:20001", "masquerade")
        );
        assert_eq!(flow.summary, "TCP Flags: SYN, ACK, FIN");
        assert_eq!(flow.connection.unwrap().event, ConnectionEvent::Close);
        assert!(compact(&record).ends_with(" close: 6/5 packets, 400/900 bytes"));
    }

    #[test]
    fn a_hairpin_names_the_gateway_as_translated_source_and_the_container_at_both_ends() {
        // web1 calls its own service's VIP and is picked: back to web1:80 from the gateway.
        let mut raw = raw_event(
            flow_kind::NEW,
            IPPROTO_TCP,
            ("172.30.1.2", 41000),
            ("10.96.0.10", 80),
        );
        raw.origin = ct_origin::SERVICE;
        raw.rewrite = ct_rewrite::HAIRPIN;
        raw.nat_addr = dataplane_common::In6Addr::mapped_v4(ip("172.30.1.1"));
        raw.nat_port = 20077u16.to_be();
        raw.hairpin_port = 80u16.to_be();
        let mut record = record_of(&raw);
        strict(&record.hubble_json());
        let flow = &record.flow;
        assert_eq!(flow.verdict, Verdict::Forwarded);
        let ip = flow.ip.as_ref().unwrap();
        assert_eq!(
            (
                ip.source.as_str(),
                ip.source_xlated.as_str(),
                ip.destination.as_str()
            ),
            ("172.30.1.2", "172.30.1.1", "172.30.1.2")
        );
        assert_eq!(flow.source().pod_name, "web1");
        assert_eq!(flow.destination().pod_name, "web1");
        assert_eq!(flow.destination_service.as_ref().unwrap().name, "web");
        assert_eq!(flow.trace_observation_point.as_deref(), Some("TO_ENDPOINT"));
        let t = flow.translation.as_ref().unwrap();
        assert_eq!(
            (
                t.original.as_str(),
                t.translated.as_str(),
                t.kind.as_str(),
                t.source_translated.as_str()
            ),
            (
                "10.96.0.10:80",
                "172.30.1.2:80",
                "service",
                "172.30.1.1:20077"
            )
        );
        assert!(
            compact(&record)
                .contains("[service 10.96.0.10:80 => 172.30.1.2:80, from 172.30.1.1:20077]"),
            "{}",
            compact(&record)
        );
    }

    #[test]
    fn services_are_named_with_their_namespace_for_vips_and_published_ports() {
        let mut raw = raw_event(
            flow_kind::NEW,
            IPPROTO_TCP,
            ("172.30.1.9", 5000),
            ("10.96.0.10", 80),
        );
        raw.origin = ct_origin::SERVICE;
        raw.rewrite = ct_rewrite::DST;
        raw.nat_addr = dataplane_common::In6Addr::mapped_v4(ip("172.30.1.2"));
        raw.nat_port = 80u16.to_be();
        let mut record = record_of(&raw);
        strict(&record.hubble_json());
        let flow = record.flow;
        assert_eq!(
            flow.destination_service,
            Some(Service {
                name: "web".into(),
                namespace: "front".into()
            })
        );
        assert_eq!(flow.destination().pod_name, "web1");
        assert_eq!(flow.translation.unwrap().kind, "service");

        let mut raw = raw_event(
            flow_kind::NEW,
            IPPROTO_TCP,
            ("192.0.2.2", 5000),
            ("192.0.2.1", 8000),
        );
        raw.origin = ct_origin::PUBLISHED;
        raw.rewrite = ct_rewrite::DST;
        raw.nat_addr = dataplane_common::In6Addr::mapped_v4(ip("172.30.1.2"));
        raw.nat_port = 80u16.to_be();
        let flow = record_of(&raw).flow;
        assert_eq!(flow.destination_service.unwrap().name, "web");
        // A published port leading to a container names no service.
        raw.tuple.dport = 8080u16.to_be();
        assert_eq!(record_of(&raw).flow.destination_service, None);
    }

    #[test]
    fn a_host_socket_translated_before_it_had_a_source_is_the_host() {
        // What the connect4 hook reports for an unbound socket: no source address or port.
        let mut raw = raw_event(
            flow_kind::NEW,
            IPPROTO_TCP,
            ("0.0.0.0", 0),
            ("10.96.0.10", 80),
        );
        raw.origin = ct_origin::SERVICE;
        raw.rewrite = ct_rewrite::DST;
        raw.nat_addr = dataplane_common::In6Addr::mapped_v4(ip("172.30.1.2"));
        raw.nat_port = 80u16.to_be();
        raw.hook = dataplane_common::hook::SOCK_CONNECT4 as u8;
        let mut record = record_of(&raw);
        strict(&record.hubble_json());
        let flow = record.flow;
        assert_eq!(flow.source().labels, vec![LABEL_HOST]);
        assert_eq!(flow.destination().pod_name, "web1");
        assert_eq!(flow.destination_service.unwrap().name, "web");
        // The same tuple from a packet hook is nobody's (a packet without a source).
        raw.hook = dataplane_common::hook::CONTAINER_INGRESS as u8;
        assert_eq!(record_of(&raw).flow.source().labels, vec![LABEL_WORLD]);
    }

    #[test]
    fn every_drop_reason_is_cilium_s_name_and_number() {
        let cases = [
            (
                DropReason::PolicyDenied,
                "POLICY_DENIED",
                133,
                "Policy denied",
            ),
            (
                DropReason::Malformed,
                "INVALID_PACKET_DROPPED",
                134,
                "Invalid packet",
            ),
            (
                DropReason::CtMapInsertionFailed,
                "CT_MAP_INSERTION_FAILED",
                155,
                "CT: Map insertion failed",
            ),
            (
                DropReason::ServiceBackendNotFound,
                "SERVICE_BACKEND_NOT_FOUND",
                158,
                "Service backend not found",
            ),
            (
                DropReason::NoMappingForNatMasquerade,
                "NO_MAPPING_FOR_NAT_MASQUERADE",
                167,
                "No mapping for NAT masquerade",
            ),
            (
                DropReason::FragmentNotFound,
                "FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND",
                175,
                "First logical datagram fragment not found",
            ),
            (
                DropReason::InvalidL4Header,
                "CT_TRUNCATED_OR_INVALID_HEADER",
                135,
                "CT: Truncated or invalid header",
            ),
            (
                DropReason::PolicyDeny,
                "POLICY_DENY",
                181,
                "Policy denied by denylist",
            ),
        ];
        assert_eq!(cases.len(), DropReason::ALL.len());
        for (reason, name, number, text) in cases {
            let mut raw = raw_event(
                flow_kind::DROP,
                IPPROTO_TCP,
                ("172.30.1.9", 5000),
                ("10.96.0.12", 80),
            );
            raw.drop_reason = reason as u8;
            let mut record = record_of(&raw);
            let line = record.hubble_json();
            let proto = strict(&line);
            let json: serde_json::Value = serde_json::from_str(&line).unwrap();
            let flow = &json["flow"];
            assert_eq!(flow["verdict"], "DROPPED");
            assert_eq!(flow["drop_reason_desc"], name);
            assert_eq!(flow["drop_reason"], number);
            assert_eq!(
                flow["event_type"],
                serde_json::json!({"type": 1, "sub_type": number})
            );
            assert!(flow.get("trace_observation_point").is_none());
            assert!(flow.get("connection").is_none());
            let Some(crate::hubble::api::observer::get_flows_response::ResponseTypes::Flow(f)) =
                proto.response_types
            else {
                panic!("no flow in {line}");
            };
            assert_eq!(f.drop_reason_desc().as_str_name(), name);
            assert!(
                compact(&record).contains(&format!(" {text} DROPPED ")),
                "{}",
                compact(&record)
            );
        }
    }

    #[test]
    fn a_drop_to_a_service_without_backends_names_the_service() {
        let mut raw = raw_event(
            flow_kind::DROP,
            IPPROTO_TCP,
            ("172.30.1.9", 5000),
            ("10.96.0.12", 80),
        );
        raw.drop_reason = DropReason::ServiceBackendNotFound as u8;
        let record = record_of(&raw);
        let flow = &record.flow;
        assert_eq!(flow.destination_service.as_ref().unwrap().name, "empty");
        assert_eq!(flow.destination().labels, vec![LABEL_WORLD]);
        assert_eq!(flow.destination().identity, IDENTITY_WORLD);
        assert!(
            compact(&record).contains(" -> empty:80 (world) Service backend not found DROPPED"),
            "{}",
            compact(&record)
        );
    }

    #[test]
    fn a_drop_at_xdp_without_ports_or_flags_still_reads() {
        // XDP's deny list reads addresses only.
        let mut raw = raw_event(
            flow_kind::DROP,
            IPPROTO_TCP,
            ("198.51.100.7", 0),
            ("192.0.2.1", 0),
        );
        raw.tcp_flags = 0;
        raw.drop_reason = DropReason::PolicyDeny as u8;
        raw.hook = hook::UPLINK_XDP as u8;
        let mut record = record_of(&raw);
        strict(&record.hubble_json());
        let flow = record.flow;
        assert_eq!(flow.summary, "TCP");
        assert_eq!(flow.drop_reason_desc.as_deref(), Some("POLICY_DENY"));
        assert_eq!(flow.traffic_direction, "INGRESS");
        assert_eq!(flow.destination().labels, vec![LABEL_HOST]);
    }

    #[test]
    fn a_packet_dropped_before_its_addresses_were_read_claims_none() {
        let mut raw = raw_event(flow_kind::DROP, 0, ("0.0.0.0", 0), ("0.0.0.0", 0));
        raw.drop_reason = DropReason::Malformed as u8;
        let mut record = record_of(&raw);
        let line = record.hubble_json();
        strict(&line);
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert!(json["flow"].get("IP").is_none(), "{line}");
        assert!(json["flow"].get("source").is_none(), "{line}");
        assert_eq!(record.flow.protocol(), "Unknown L4");
    }

    #[test]
    fn the_host_is_reserved_host_and_icmp_is_an_echo_request() {
        let mut raw = raw_event(
            flow_kind::NEW,
            IPPROTO_ICMP,
            ("172.30.1.9", 77),
            ("172.30.1.1", 0),
        );
        raw.origin = ct_origin::PLAIN;
        raw.icmp_type = 8;
        let mut record = record_of(&raw);
        strict(&record.hubble_json());
        let flow = record.flow;
        assert_eq!(flow.destination().labels, vec![LABEL_HOST]);
        assert_eq!(flow.destination().identity, IDENTITY_HOST);
        assert_eq!(flow.traffic_direction, "EGRESS");
        assert_eq!(
            flow.l4,
            Some(L4::Icmpv4 {
                icmp_type: 8,
                code: 0
            })
        );
        assert_eq!(flow.summary, "ICMPv4 EchoRequest");
        assert_eq!(flow.trace_observation_point.as_deref(), Some("TO_STACK"));
    }

    #[test]
    fn an_echo_reply_is_a_reply_of_the_connection_it_answers() {
        // web1 pinged the outside (masquerade); the answer came back to the host's address
        // and was translated back to web1.
        let mut raw = raw_event(
            flow_kind::REPLY,
            IPPROTO_ICMP,
            ("198.51.100.7", 20001),
            ("192.0.2.1", 0),
        );
        raw.origin = ct_origin::MASQUERADE;
        raw.rewrite = ct_rewrite::DST;
        raw.nat_addr =
            dataplane_common::In6Addr::mapped_v4(u32::from(Ipv4Addr::new(172, 30, 1, 2)).to_be());
        raw.nat_port = 77u16.to_be();
        raw.hook = hook::UPLINK_INGRESS as u8;
        let mut record = record_of(&raw);
        strict(&record.hubble_json());
        let flow = record.flow;
        assert_eq!(
            flow.l4,
            Some(L4::Icmpv4 {
                icmp_type: 0,
                code: 0
            })
        );
        assert_eq!(flow.summary, "ICMPv4 EchoReply");
        assert!(flow.is_reply);
        assert_eq!(flow.trace_reason.as_deref(), Some("REPLY"));
        assert_eq!(flow.source().labels, vec![LABEL_WORLD]);
        assert_eq!(flow.destination().pod_name, "web1");
        assert_eq!(flow.trace_observation_point.as_deref(), Some("TO_ENDPOINT"));
        // The connection went out of web1: its answer too is EGRESS traffic (Hubble flips
        // the direction it observes for replies).
        assert_eq!(flow.traffic_direction, "EGRESS");
        assert_eq!(
            flow.connection.map(|c| c.event),
            Some(ConnectionEvent::Reply)
        );
        // The way back: the host's address and the echo identifier it used, to web1's.
        let translation = flow.translation.clone().unwrap();
        assert_eq!(
            (
                translation.original.as_str(),
                translation.translated.as_str()
            ),
            ("192.0.2.1:20001", "172.30.1.2:77")
        );
        // hubble's compact line of a reply: the connection's way round, arrow reversed.
        let line = compact(&record_of(&raw));
        assert!(
            line.contains(": front/web1 (ID:")
                && line
                    .contains(") <- 198.51.100.7 (world) to-endpoint FORWARDED (ICMPv4 EchoReply)"),
            "{line}"
        );
    }

    #[test]
    fn dropped_icmp_says_what_message_it_was() {
        for (icmp_type, code, summary) in [
            (3, 3, "ICMPv4 DestinationUnreachable(Port)"),
            (11, 0, "ICMPv4 TimeExceeded(TTLExceeded)"),
            (8, 0, "ICMPv4 EchoRequest"),
            (13, 0, "ICMPv4 TimestampRequest"),
        ] {
            let mut raw = raw_event(
                flow_kind::DROP,
                IPPROTO_ICMP,
                ("203.0.113.9", 0),
                ("192.0.2.1", 0),
            );
            raw.drop_reason = DropReason::PolicyDeny as u8;
            raw.icmp_type = icmp_type;
            raw.icmp_code = code;
            let mut record = record_of(&raw);
            strict(&record.hubble_json());
            assert_eq!(
                record.flow.l4,
                Some(L4::Icmpv4 {
                    icmp_type: u32::from(icmp_type),
                    code: u32::from(code)
                })
            );
            assert_eq!(record.flow.summary, summary);
        }
    }

    #[test]
    fn icmp_types_and_codes_are_named_as_hubble_names_them() {
        for (icmp_type, code, name) in [
            (0, 0, "EchoReply"),
            (8, 0, "EchoRequest"),
            (8, 1, "EchoRequest(Code: 1)"),
            (3, 0, "DestinationUnreachable(Net)"),
            (3, 4, "DestinationUnreachable(FragmentationNeeded)"),
            (3, 13, "DestinationUnreachable(CommAdminProhibited)"),
            (3, 16, "DestinationUnreachable(Code: 16)"),
            (5, 2, "Redirect(TOS+Net)"),
            (11, 1, "TimeExceeded(FragmentReassemblyTimeExceeded)"),
            (12, 2, "ParameterProblem(BadLength)"),
            (18, 0, "AddressMaskReply"),
            (42, 7, "42(7)"),
        ] {
            assert_eq!(icmpv4_type_code(icmp_type, code), name);
        }
    }

    #[test]
    fn identities_are_stable_per_label_set_and_compose_projects_are_namespaces() {
        // The same labels, in any order, are the same identity; others differ.
        let a = identity_of(&["container:app=web".into(), "namespace=front".into()]);
        let b = identity_of(&["namespace=front".into(), "container:app=web".into()]);
        let c = identity_of(&["container:app=db".into(), "namespace=front".into()]);
        assert_eq!(a, b);
        assert_ne!(a, c);
        // Fixed by the hash, not by the run: the value a restarted agent computes.
        assert_eq!(
            a,
            identity_of(&["container:app=web".into(), "namespace=front".into()])
        );
        let spec = StateFile::parse(
            r#"
networks:
  - {name: front, bridge: br-front, subnet: 172.30.1.0/24, gateway: 172.30.1.1}
endpoints:
  - name: shop-web-1
    labels: {com.docker.compose.project: shop, com.docker.compose.service: web}
    interfaces: [{network: front, ip: 172.30.1.2, mac: "02:42:ac:1e:01:02", host_veth: veth-w}]
"#,
        )
        .unwrap();
        let ids = Identities::new(&Model::from_spec(&spec).unwrap(), []);
        let web = ids.endpoint("172.30.1.2".parse().unwrap());
        assert_eq!(web.namespace, "shop");
        assert_eq!(
            web.workloads,
            vec![Workload {
                name: "web".into(),
                kind: "Service".into()
            }]
        );
        assert!((1..=4095).contains(&web.id));
    }

    /// The spec's containers, gateway, host and VIP with an IPv6 address each besides their
    /// IPv4 one (client fd00:30:1::9, web1 fd00:30:1::2, gateway fd00:30:1::1, host
    /// 2001:db8::1, VIP of `web` fd00:96::10).
    fn dual_stack() -> Identities {
        let mut ids = identities();
        for (v4, v6) in [
            ("172.30.1.9", "fd00:30:1::9"),
            ("172.30.1.2", "fd00:30:1::2"),
        ] {
            let container = ids.endpoint(v4.parse().unwrap());
            ids.containers
                .insert(v6.parse().unwrap(), container.clone());
        }
        ids.host.insert("2001:db8::1".parse().unwrap());
        ids.host.insert("fd00:30:1::1".parse().unwrap());
        let web = ids.vips[&("10.96.0.10".parse().unwrap(), 80, IPPROTO_TCP)].clone();
        ids.vips
            .insert(("fd00:96::10".parse().unwrap(), 80, IPPROTO_TCP), web);
        ids
    }

    fn record_of_event(event: &Event) -> Record {
        let ids = dual_stack();
        let clock = Clock::with_offset(1_732_528_801_000_000_000 - 5_000_000_000);
        build(
            event,
            &Context {
                identities: &ids,
                clock: &clock,
                node_name: "node1",
                ifname: Some("eth0"),
            },
        )
    }

    fn v6(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_ipv6_published_port_connection_is_an_ipv6_flow_to_the_container() {
        // As the kernel writes it (family 6), decoded.
        let mut raw = raw_event(
            flow_kind::NEW,
            IPPROTO_TCP,
            ("2001:db8::2", 41234),
            ("2001:db8::1", 8080),
        );
        raw.origin = ct_origin::PUBLISHED;
        raw.rewrite = ct_rewrite::DST;
        raw.nat_addr = decode::tests::nat_addr("fd00:30:1::2");
        raw.nat_port = 80u16.to_be();
        raw.hook = hook::UPLINK_INGRESS as u8;
        let mut record = record_of_event(&decode::from_raw(&raw).unwrap());
        let web1 = identity_of(&[
            "container:app=web".into(),
            "container:tier=front".into(),
            "namespace=front".into(),
        ]);
        let line = record.hubble_json();
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            json["flow"]["IP"],
            serde_json::json!({
                "source": "2001:db8::2",
                "destination": "fd00:30:1::2",
                "ipVersion": "IPv6"
            })
        );
        assert_eq!(
            json["flow"]["l4"],
            serde_json::json!({"TCP": {"source_port": 41234, "destination_port": 80, "flags": {"SYN": true}}})
        );
        assert_eq!(json["flow"]["destination"]["pod_name"], "web1");
        assert_eq!(json["flow"]["traffic_direction"], "INGRESS");
        assert_eq!(json["flow"]["trace_observation_point"], "TO_ENDPOINT");
        let proto = strict(&line);
        let Some(crate::hubble::api::observer::get_flows_response::ResponseTypes::Flow(f)) =
            proto.response_types
        else {
            panic!("no flow in {line}");
        };
        assert_eq!(
            f.ip.unwrap().ip_version(),
            crate::hubble::api::flow::IpVersion::IPv6
        );
        let t = record.flow.translation.as_ref().unwrap();
        assert_eq!(
            (t.original.as_str(), t.translated.as_str()),
            ("[2001:db8::1]:8080", "[fd00:30:1::2]:80")
        );
        assert_eq!(
            compact(&record),
            format!(
                "Nov 25 10:00:01.000: [2001:db8::2]:41234 (world) -> front/web1:80 (ID:{web1}) \
                 to-endpoint FORWARDED (TCP Flags: SYN) [published_port [2001:db8::1]:8080 => \
                 [fd00:30:1::2]:80]"
            )
        );
    }

    #[test]
    fn ipv6_between_containers_masquerade_and_vips_read_as_over_ipv4() {
        // Container to container (UDP).
        let event = decode::tests::event(
            Kind::New,
            IPPROTO_UDP,
            ("fd00:30:1::9", 5000),
            ("fd00:30:1::2", 53),
        );
        let mut record = record_of_event(&event);
        strict(&record.hubble_json());
        let flow = &record.flow;
        assert_eq!(flow.ip_version(), "IPv6");
        assert_eq!(
            (
                flow.source().pod_name.as_str(),
                flow.destination().pod_name.as_str()
            ),
            ("client", "web1")
        );
        assert_eq!(flow.traffic_direction, "INGRESS");
        assert_eq!(flow.summary, "UDP");
        // The same container has the same identity over both families.
        let over_v4 = record_of(&raw_event(
            flow_kind::NEW,
            IPPROTO_UDP,
            ("172.30.1.9", 5000),
            ("172.30.1.2", 53),
        ));
        assert_eq!(flow.source, over_v4.flow.source);
        assert_eq!(flow.destination, over_v4.flow.destination);

        // Masquerade (NAT66): the container stays the source, the host's address is the
        // translated one.
        let mut event = decode::tests::event(
            Kind::Close,
            IPPROTO_TCP,
            ("fd00:30:1::2", 41000),
            ("2001:db8:ffff::7", 443),
        );
        event.nat = Some(Nat {
            kind: TranslationKind::Masquerade,
            destination: false,
            addr: v6("2001:db8::1"),
            port: 20001,
            source: None,
        });
        event.tcp_flags = tcp_flag::SYN | tcp_flag::ACK | tcp_flag::FIN;
        event.hook = hook::UPLINK_EGRESS;
        let mut record = record_of_event(&event);
        strict(&record.hubble_json());
        let flow = &record.flow;
        let ip = flow.ip.as_ref().unwrap();
        assert_eq!(
            (
                ip.source.as_str(),
                ip.source_xlated.as_str(),
                ip.destination.as_str(),
                ip.ip_version.as_str()
            ),
            ("fd00:30:1::2", "2001:db8::1", "2001:db8:ffff::7", "IPv6")
        );
        assert_eq!(flow.traffic_direction, "EGRESS");
        assert_eq!(flow.trace_observation_point.as_deref(), Some("TO_NETWORK"));
        assert_eq!(
            flow.translation.as_ref().unwrap().original,
            "[fd00:30:1::2]:41000"
        );

        // A service's IPv6 VIP, translated to its backend's IPv6 address.
        let mut event = decode::tests::event(
            Kind::New,
            IPPROTO_TCP,
            ("fd00:30:1::9", 40000),
            ("fd00:96::10", 80),
        );
        event.nat = Some(Nat {
            kind: TranslationKind::Service,
            destination: true,
            addr: v6("fd00:30:1::2"),
            port: 80,
            source: None,
        });
        let mut record = record_of_event(&event);
        strict(&record.hubble_json());
        assert_eq!(
            record
                .flow
                .destination_service
                .as_ref()
                .map(|s| s.name.as_str()),
            Some("web")
        );
        assert_eq!(record.flow.destination().pod_name, "web1");
        assert!(
            compact(&record).contains("front/client:40000 (ID:"),
            "{}",
            compact(&record)
        );
    }

    #[test]
    fn icmpv6_echo_is_an_icmpv6_flow_with_hubbles_names() {
        let mut raw = raw_event(
            flow_kind::NEW,
            IPPROTO_ICMPV6,
            ("fd00:30:1::9", 77),
            ("fd00:30:1::1", 0),
        );
        raw.origin = ct_origin::PLAIN;
        raw.icmp_type = 128;
        let mut record = record_of_event(&decode::from_raw(&raw).unwrap());
        let line = record.hubble_json();
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            json["flow"]["l4"],
            serde_json::json!({"ICMPv6": {"type": 128, "code": 0}})
        );
        let proto = strict(&line);
        let Some(crate::hubble::api::observer::get_flows_response::ResponseTypes::Flow(f)) =
            proto.response_types
        else {
            panic!("no flow in {line}");
        };
        assert!(matches!(
            f.l4.and_then(|l| l.protocol),
            Some(crate::hubble::api::flow::layer4::Protocol::IcmPv6(
                crate::hubble::api::flow::IcmPv6 {
                    r#type: 128,
                    code: 0
                }
            ))
        ));
        let flow = &record.flow;
        assert_eq!(flow.summary, "ICMPv6 EchoRequest");
        assert_eq!(flow.protocol(), "ICMPv6");
        assert_eq!(flow.destination().labels, vec![LABEL_HOST]);
        assert_eq!(flow.trace_observation_point.as_deref(), Some("TO_STACK"));

        // Its answer.
        let mut reply = decode::tests::event(
            Kind::Reply,
            IPPROTO_ICMPV6,
            ("fd00:30:1::1", 77),
            ("fd00:30:1::9", 0),
        );
        reply.icmp = Icmp {
            icmp_type: 129,
            code: 0,
        };
        let mut record = record_of_event(&reply);
        strict(&record.hubble_json());
        assert_eq!(record.flow.summary, "ICMPv6 EchoReply");
        assert!(record.flow.is_reply);
        assert!(
            compact(&record).contains(": front/client (ID:")
                && compact(&record).contains("<- fd00:30:1::1 (host) to-endpoint FORWARDED"),
            "{}",
            compact(&record)
        );
    }

    #[test]
    fn dropped_ipv6_packets_carry_their_reason_and_message() {
        let mut event = decode::tests::event(
            Kind::Drop(DropReason::PolicyDenied),
            IPPROTO_TCP,
            ("fd00:30:1::9", 5000),
            ("fd00:30:1::2", 80),
        );
        event.counters = decode::Counters::default();
        let mut record = record_of_event(&event);
        let line = record.hubble_json();
        strict(&line);
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(json["flow"]["verdict"], "DROPPED");
        assert_eq!(json["flow"]["drop_reason_desc"], "POLICY_DENIED");
        assert_eq!(json["flow"]["IP"]["ipVersion"], "IPv6");
        assert!(
            compact(&record).contains("front/client:5000 (ID:")
                && compact(&record).contains("front/web1:80 (ID:")
                && compact(&record).contains(" Policy denied DROPPED (TCP Flags: SYN)"),
            "{}",
            compact(&record)
        );
        for (icmp_type, code, summary) in [
            (1, 4, "ICMPv6 DestinationUnreachable(PortUnreachable)"),
            (3, 0, "ICMPv6 TimeExceeded(HopLimitExceeded)"),
            (2, 0, "ICMPv6 PacketTooBig"),
            (128, 0, "ICMPv6 EchoRequest"),
        ] {
            let mut event = decode::tests::event(
                Kind::Drop(DropReason::PolicyDeny),
                IPPROTO_ICMPV6,
                ("2001:db8:ffff::7", 0),
                ("2001:db8::1", 0),
            );
            event.icmp = Icmp { icmp_type, code };
            event.hook = hook::UPLINK_INGRESS;
            let mut record = record_of_event(&event);
            strict(&record.hubble_json());
            assert_eq!(
                record.flow.l4,
                Some(L4::Icmpv6 {
                    icmp_type: u32::from(icmp_type),
                    code: u32::from(code)
                })
            );
            assert_eq!(record.flow.summary, summary);
            assert_eq!(record.flow.destination().labels, vec![LABEL_HOST]);
        }
        // Dropped before its addresses were read: no IP, whichever family.
        let event =
            decode::tests::event(Kind::Drop(DropReason::Malformed), 0, ("::", 0), ("::", 0));
        let mut record = record_of_event(&event);
        let line = record.hubble_json();
        strict(&line);
        assert!(record.flow.ip.is_none(), "{line}");
    }

    #[test]
    fn an_ipv4_mapped_address_is_its_ipv4_address_s_endpoint() {
        let ids = dual_stack();
        assert_eq!(ids.endpoint(v6("::ffff:172.30.1.2")).pod_name, "web1");
        assert_eq!(
            ids.endpoint(v6("::ffff:192.0.2.1")).labels,
            vec![LABEL_HOST]
        );
        assert_eq!(ids.endpoint(v6("::1")).labels, vec![LABEL_HOST]);
        assert_eq!(
            ids.service(v6("::ffff:10.96.0.10"), 80, IPPROTO_TCP)
                .map(|s| s.name.clone()),
            Some("web".into())
        );
        assert_eq!(ids.endpoint(v6("fd00:30:1::3")).labels, vec![LABEL_WORLD]);
    }

    #[test]
    fn icmpv6_types_and_codes_are_named_as_hubble_names_them() {
        for (icmp_type, code, name) in [
            (128, 0, "EchoRequest"),
            (129, 0, "EchoReply"),
            (128, 1, "EchoRequest(Code: 1)"),
            (1, 0, "DestinationUnreachable(NoRouteToDst)"),
            (1, 1, "DestinationUnreachable(AdminProhibited)"),
            (1, 6, "DestinationUnreachable(RejectRouteToDst)"),
            (1, 7, "DestinationUnreachable(Code: 7)"),
            (2, 0, "PacketTooBig"),
            (3, 1, "TimeExceeded(FragmentReassemblyTimeExceeded)"),
            (4, 2, "ParameterProblem(UnrecognizedIPv6Option)"),
            (133, 0, "RouterSolicitation"),
            (134, 0, "RouterAdvertisement"),
            (135, 0, "NeighborSolicitation"),
            (136, 0, "NeighborAdvertisement"),
            (137, 0, "Redirect"),
            (143, 0, "143(0)"),
            (200, 3, "200(3)"),
        ] {
            assert_eq!(icmpv6_type_code(icmp_type, code), name);
        }
    }
}
