//! Flow records in the shape `hubble observe -o json` prints (docs/DESIGN.md section 7):
//! one `{"flow": {...}, "node_name": ..., "time": ...}` object per line, with Hubble's field
//! names (cilium/cilium api/v1/flow/flow.proto through protobuf's JSON mapping), plus two
//! fields of our own: `translation` (what NAT or load balancing did) and `connection` (which
//! event of the connection this is, and its counters). Identity comes from the model.

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
};

use dataplane_common::{DropReason, tcp_flag};
use serde::{Deserialize, Serialize};

use super::{
    clock::{self, Clock},
    decode::{Event, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Kind, TranslationKind},
};
use crate::model::{Model, PortTarget};

/// Cilium's reserved identities for the host and for everything outside the cluster.
const IDENTITY_HOST: u32 = 1;
const IDENTITY_WORLD: u32 = 2;
/// Cilium's monitor message types (`event_type.type`): drop notifications and traces.
const MESSAGE_TYPE_DROP: i32 = 1;
const MESSAGE_TYPE_TRACE: i32 = 4;

/// One line of the flow stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub flow: Flow,
    pub node_name: String,
    pub time: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Verdict {
    Forwarded,
    Dropped,
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
    #[serde(rename = "IP")]
    pub ip: Ip,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l4: Option<L4>,
    pub source: Endpoint,
    pub destination: Endpoint,
    #[serde(rename = "Type")]
    pub flow_type: String,
    pub node_name: String,
    pub event_type: EventType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_service: Option<Service>,
    pub traffic_direction: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_observation_point: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason_desc: Option<String>,
    pub is_reply: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<Interface>,
    #[serde(rename = "Summary")]
    pub summary: String,
    /// Ours: the translation of a TRANSLATED flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub translation: Option<Translation>,
    /// Ours: which event of the connection this record is, and its counters.
    pub connection: Connection,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ip {
    pub source: String,
    pub destination: String,
    #[serde(rename = "ipVersion")]
    pub ip_version: String,
}

/// Layer 4, one of TCP, UDP or ICMPv4 (protobuf's `oneof` as JSON: `{"TCP": {...}}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

/// Who is at one end: a container (`pod_name` its name, `namespace` its network, its labels as
/// `key=value`), the host (`reserved:host`), a service VIP (`reserved:service`), or anything
/// else (`reserved:world`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    #[serde(default, skip_serializing_if = "is_zero")]
    pub identity: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_name: String,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

pub const LABEL_HOST: &str = "reserved:host";
pub const LABEL_WORLD: &str = "reserved:world";
pub const LABEL_SERVICE: &str = "reserved:service";

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
            Kind::Update => ConnectionEvent::Update,
            Kind::End => ConnectionEvent::End,
            Kind::Drop(_) => ConnectionEvent::Drop,
        }
    }
}

/// Cilium's numbers (flow.proto `DropReason`) for our drop reasons, for `drop_reason` and
/// `event_type.sub_type` of drops; `drop_reason_desc` keeps our names (DropReason::desc).
pub fn cilium_drop_code(reason: DropReason) -> u32 {
    match reason {
        DropReason::Malformed => 134,            // INVALID_PACKET_DROPPED
        DropReason::PolicyDenied => 133,         // POLICY_DENIED
        DropReason::CtMapInsertionFailed => 155, // CT_MAP_INSERTION_FAILED
        DropReason::NoServiceBackend => 158,     // SERVICE_BACKEND_NOT_FOUND
        DropReason::SnatNoFreePort => 167,       // NO_MAPPING_FOR_NAT_MASQUERADE
        DropReason::FragmentNotFound => 175,     // FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND
        DropReason::InvalidL4Header => 135,      // CT_TRUNCATED_OR_INVALID_HEADER
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

    fn cilium_code(self) -> i32 {
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
}

/// A published port that leads to a service, to name the service in its flows.
#[derive(Clone, Debug)]
struct PublishedService {
    host_ip: Option<Ipv4Addr>,
    first: u16,
    last: u16,
    proto: u8,
    service: String,
}

/// Who is behind an address, from the model and the host's addresses.
#[derive(Clone, Debug, Default)]
pub struct Identities {
    containers: HashMap<Ipv4Addr, Endpoint>,
    vips: HashMap<(Ipv4Addr, u16, u8), String>,
    published: Vec<PublishedService>,
    host: HashSet<Ipv4Addr>,
}

impl Identities {
    /// `host_addrs`: the host's own addresses (the uplink's and the others the agent found);
    /// the networks' gateways are the host's too.
    pub fn new(model: &Model, host_addrs: impl IntoIterator<Item = Ipv4Addr>) -> Identities {
        let mut containers = HashMap::new();
        for endpoint in &model.endpoints {
            let labels: Vec<String> = endpoint
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            for interface in &endpoint.interfaces {
                containers.insert(
                    interface.ip,
                    Endpoint {
                        identity: 0,
                        namespace: interface.network.clone(),
                        labels: labels.clone(),
                        pod_name: endpoint.name.clone(),
                    },
                );
            }
        }
        let vips = model
            .services
            .iter()
            .map(|s| ((s.vip, s.port, s.protocol.number()), s.name.clone()))
            .collect();
        let published = model
            .ports
            .iter()
            .filter_map(|p| match &p.target {
                PortTarget::Service(name) => Some(PublishedService {
                    host_ip: p.host_ip,
                    first: p.host_ports.first,
                    last: p.host_ports.last,
                    proto: p.protocol.number(),
                    service: name.clone(),
                }),
                PortTarget::Endpoint(_) => None,
            })
            .collect();
        let host = model
            .networks
            .iter()
            .map(|n| n.gateway)
            .chain(host_addrs)
            .collect();
        Identities {
            containers,
            vips,
            published,
            host,
        }
    }

    fn is_host(&self, ip: Ipv4Addr) -> bool {
        ip.is_loopback() || self.host.contains(&ip)
    }

    /// The endpoint behind `ip`.
    pub fn endpoint(&self, ip: Ipv4Addr) -> Endpoint {
        if let Some(container) = self.containers.get(&ip) {
            return container.clone();
        }
        if self.is_host(ip) {
            return Endpoint::reserved(IDENTITY_HOST, LABEL_HOST);
        }
        if self.vips.keys().any(|(vip, _, _)| *vip == ip) {
            return Endpoint::reserved(0, LABEL_SERVICE);
        }
        Endpoint::reserved(IDENTITY_WORLD, LABEL_WORLD)
    }

    /// The service a connection to `ip:port` reached: a VIP's, or the one a published port
    /// leads to.
    fn service(&self, ip: Ipv4Addr, port: u16, proto: u8) -> Option<String> {
        if let Some(name) = self.vips.get(&(ip, port, proto)) {
            return Some(name.clone());
        }
        if !self.is_host(ip) {
            return None;
        }
        self.published
            .iter()
            .find(|p| {
                p.proto == proto
                    && (p.first..=p.last).contains(&port)
                    && p.host_ip.is_none_or(|h| h == ip)
            })
            .map(|p| p.service.clone())
    }
}

/// What a record is built with besides its event.
pub struct Context<'a> {
    pub identities: &'a Identities,
    pub clock: &'a Clock,
    pub node_name: &'a str,
    /// Name of the interface the event was seen on, if known.
    pub ifname: Option<&'a str>,
}

fn protocol_summary(proto: u8, flags: u8) -> String {
    match proto {
        // A packet dropped before its TCP header was read (XDP reads addresses only).
        IPPROTO_TCP if flags == 0 => "TCP".into(),
        IPPROTO_TCP => format!(
            "TCP Flags: {}",
            TcpFlags::from_bits(flags).names().join(", ")
        ),
        IPPROTO_UDP => "UDP".into(),
        IPPROTO_ICMP => "ICMPv4 EchoRequest".into(),
        other => format!("IP protocol {other}"),
    }
}

/// Builds the record of `event`.
pub fn build(event: &Event, cx: &Context<'_>) -> Record {
    let tuple = event.tuple;
    // The connection's real ends: the container behind a published port or a VIP (after the
    // destination rewrite), the container behind a masquerade (before the source rewrite).
    let (daddr, dport) = match event.nat {
        Some(nat) if nat.destination => (nat.addr, nat.port),
        _ => (tuple.daddr, tuple.dport),
    };
    let source = cx.identities.endpoint(tuple.saddr);
    let destination = cx.identities.endpoint(daddr);
    let translated_to_service = matches!(
        event.nat.map(|n| n.kind),
        Some(TranslationKind::Service | TranslationKind::PublishedPort)
    );
    let destination_service = if translated_to_service || matches!(event.kind, Kind::Drop(_)) {
        cx.identities
            .service(tuple.daddr, tuple.dport, tuple.proto)
            .map(|name| Service {
                name,
                namespace: String::new(),
            })
    } else {
        None
    };
    let drop_reason = match event.kind {
        Kind::Drop(reason) => Some(reason),
        _ => None,
    };
    let verdict = match (drop_reason, event.nat) {
        (Some(_), _) => Verdict::Dropped,
        (None, Some(_)) => Verdict::Translated,
        (None, None) => Verdict::Forwarded,
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
    let event_type = match (drop_reason, point) {
        (Some(reason), _) => EventType {
            event_type: MESSAGE_TYPE_DROP,
            sub_type: cilium_drop_code(reason) as i32,
        },
        (None, point) => EventType {
            event_type: MESSAGE_TYPE_TRACE,
            sub_type: point.map_or(0, TracePoint::cilium_code),
        },
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
        // Only echo requests open tracked ICMP "connections".
        IPPROTO_ICMP => Some(L4::Icmpv4 {
            icmp_type: 8,
            code: 0,
        }),
        _ => None,
    };
    let translation = event.nat.map(|nat| {
        let (original, translated) = if nat.destination {
            (
                format!("{}:{}", tuple.daddr, tuple.dport),
                format!("{}:{}", nat.addr, nat.port),
            )
        } else {
            (
                format!("{}:{}", tuple.saddr, tuple.sport),
                format!("{}:{}", nat.addr, nat.port),
            )
        };
        Translation {
            original,
            translated,
            kind: nat.kind.name().to_owned(),
        }
    });
    let time = clock::rfc3339(cx.clock.unix_ns(event.time_ns));
    let flow = Flow {
        time: time.clone(),
        verdict,
        drop_reason: drop_reason.map(cilium_drop_code),
        ip: Ip {
            source: tuple.saddr.to_string(),
            destination: daddr.to_string(),
            ip_version: "IPv4".into(),
        },
        l4,
        // Relative to the container the flow belongs to: leaving one, or arriving at one.
        traffic_direction: if source.is_container() {
            "EGRESS"
        } else {
            "INGRESS"
        }
        .into(),
        source,
        destination,
        flow_type: "L3_L4".into(),
        node_name: cx.node_name.to_owned(),
        event_type,
        destination_service,
        trace_observation_point: point.map(|p| p.enum_name().to_owned()),
        drop_reason_desc: drop_reason.map(|r| r.desc().to_owned()),
        is_reply: false,
        interface: (event.ifindex != 0).then(|| Interface {
            index: event.ifindex,
            name: cx.ifname.unwrap_or_default().to_owned(),
        }),
        summary: protocol_summary(tuple.proto, event.tcp_flags),
        translation,
        connection: Connection {
            event: ConnectionEvent::of(event.kind),
            packets: event.counters.packets,
            bytes: event.counters.bytes,
            reply_packets: event.counters.reply_packets,
            reply_bytes: event.counters.reply_bytes,
        },
    };
    Record {
        flow,
        node_name: cx.node_name.to_owned(),
        time,
    }
}

impl Flow {
    /// Hubble's protocol name: TCP, UDP, ICMPv4.
    pub fn protocol(&self) -> &'static str {
        match self.l4 {
            Some(L4::Tcp { .. }) => "TCP",
            Some(L4::Udp { .. }) => "UDP",
            Some(L4::Icmpv4 { .. }) => "ICMPv4",
            None => "unknown",
        }
    }

    /// Source and destination ports (none for ICMP).
    pub fn ports(&self) -> Option<(u16, u16)> {
        match self.l4 {
            Some(L4::Tcp {
                source_port,
                destination_port,
                ..
            })
            | Some(L4::Udp {
                source_port,
                destination_port,
            }) => Some((source_port, destination_port)),
            _ => None,
        }
    }

    pub fn trace_point(&self) -> Option<TracePoint> {
        self.trace_observation_point
            .as_deref()
            .and_then(TracePoint::from_enum_name)
    }
}

/// An end as the compact output shows it: `web1:80 (front)`, `192.0.2.2:41234 (world)`.
fn compact_end(endpoint: &Endpoint, ip: &str, port: Option<u16>) -> String {
    let name = if endpoint.is_container() {
        endpoint.pod_name.as_str()
    } else {
        ip
    };
    let at = match port {
        Some(port) => format!("{name}:{port}"),
        None => name.to_owned(),
    };
    let what = if endpoint.is_container() {
        endpoint.namespace.clone()
    } else if endpoint.has_label(LABEL_HOST) {
        "host".into()
    } else if endpoint.has_label(LABEL_SERVICE) {
        "service".into()
    } else {
        "world".into()
    };
    format!("{at} ({what})")
}

/// One line like `hubble observe -o compact` prints:
/// `Nov 25 10:00:01.123: web2:41234 (front) -> web1:80 (front) to-endpoint FORWARDED (TCP Flags: SYN)`,
/// followed by the translation and, for events after the first, the connection's counters.
pub fn compact(record: &Record) -> String {
    let flow = &record.flow;
    let ports = flow.ports();
    let source = compact_end(&flow.source, &flow.ip.source, ports.map(|p| p.0));
    let destination = compact_end(&flow.destination, &flow.ip.destination, ports.map(|p| p.1));
    let point = match (&flow.drop_reason_desc, flow.trace_point()) {
        (Some(reason), _) => reason.clone(),
        (None, Some(point)) => point.short_name().to_owned(),
        (None, None) => String::new(),
    };
    let mut line = format!(
        "{}: {source} -> {destination} {point} {} ({})",
        clock::compact(&flow.time),
        flow.verdict.name(),
        flow.summary
    );
    if let Some(service) = &flow.destination_service {
        line.push_str(&format!(" service {}", service.name));
    }
    if let Some(t) = &flow.translation {
        line.push_str(&format!(" [{} {} => {}]", t.kind, t.original, t.translated));
    }
    let c = &flow.connection;
    if matches!(
        c.event,
        ConnectionEvent::Close | ConnectionEvent::Update | ConnectionEvent::End
    ) {
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

    #[test]
    fn a_published_port_connection_is_a_translated_flow_to_the_container() {
        let mut raw = raw_event(
            flow_kind::NEW,
            IPPROTO_TCP,
            ("192.0.2.2", 41234),
            ("192.0.2.1", 8080),
        );
        raw.origin = ct_origin::PUBLISHED;
        raw.rewrite = ct_rewrite::DST;
        raw.nat_addr = ip("172.30.1.2");
        raw.nat_port = 80u16.to_be();
        raw.hook = hook::UPLINK_INGRESS as u8;
        let record = record_of(&raw);
        let json: serde_json::Value = serde_json::to_value(&record).unwrap();
        let expected = serde_json::json!({
            "flow": {
                "time": "2024-11-25T10:00:01.000000000Z",
                "verdict": "TRANSLATED",
                "IP": {"source": "192.0.2.2", "destination": "172.30.1.2", "ipVersion": "IPv4"},
                "l4": {"TCP": {"source_port": 41234, "destination_port": 80, "flags": {"SYN": true}}},
                "source": {"identity": 2, "labels": ["reserved:world"]},
                "destination": {"namespace": "front", "labels": ["app=web", "tier=front"], "pod_name": "web1"},
                "Type": "L3_L4",
                "node_name": "node1",
                "event_type": {"type": 4, "sub_type": 0},
                "traffic_direction": "INGRESS",
                "trace_observation_point": "TO_ENDPOINT",
                "is_reply": false,
                "interface": {"index": 7, "name": "eth0"},
                "Summary": "TCP Flags: SYN",
                "translation": {"original": "192.0.2.1:8080", "translated": "172.30.1.2:80", "kind": "published_port"},
                "connection": {"event": "new", "packets": 1, "bytes": 60, "reply_packets": 0, "reply_bytes": 0}
            },
            "node_name": "node1",
            "time": "2024-11-25T10:00:01.000000000Z"
        });
        assert_eq!(json, expected, "{json:#}");
        // What goes out comes back (the observe client reads these lines).
        let line = serde_json::to_string(&record).unwrap();
        assert_eq!(serde_json::from_str::<Record>(&line).unwrap(), record);
        assert_eq!(
            compact(&record),
            "Nov 25 10:00:01.000: 192.0.2.2:41234 (world) -> web1:80 (front) to-endpoint \
             TRANSLATED (TCP Flags: SYN) [published_port 192.0.2.1:8080 => 172.30.1.2:80]"
        );
    }

    #[test]
    fn a_container_to_container_connection_is_forwarded_egress() {
        let mut raw = raw_event(
            flow_kind::NEW,
            IPPROTO_UDP,
            ("172.30.1.9", 5000),
            ("172.30.1.2", 53),
        );
        raw.origin = ct_origin::PLAIN;
        let record = record_of(&raw);
        let flow = &record.flow;
        assert_eq!(flow.verdict, Verdict::Forwarded);
        assert_eq!(flow.traffic_direction, "EGRESS");
        assert_eq!(flow.source.pod_name, "client");
        assert_eq!(flow.destination.pod_name, "web1");
        assert_eq!(flow.translation, None);
        assert_eq!(flow.summary, "UDP");
        assert_eq!(
            compact(&record),
            "Nov 25 10:00:01.000: client:5000 (front) -> web1:53 (front) to-endpoint FORWARDED \
             (UDP)"
        );
    }

    #[test]
    fn masquerade_keeps_the_container_as_source_and_names_the_host_port() {
        let mut raw = raw_event(
            flow_kind::CLOSE,
            IPPROTO_TCP,
            ("172.30.1.2", 41000),
            ("192.0.2.2", 9999),
        );
        raw.origin = ct_origin::MASQUERADE;
        raw.rewrite = ct_rewrite::SRC;
        raw.nat_addr = ip("192.0.2.1");
        raw.nat_port = 20001u16.to_be();
        raw.hook = hook::UPLINK_EGRESS as u8;
        raw.tcp_flags = tcp_flag::SYN | tcp_flag::ACK | tcp_flag::FIN;
        raw.packets = 6;
        raw.bytes = 400;
        raw.reply_packets = 5;
        raw.reply_bytes = 900;
        let record = record_of(&raw);
        let flow = &record.flow;
        assert_eq!(flow.verdict, Verdict::Translated);
        assert_eq!(flow.ip.source, "172.30.1.2");
        assert_eq!(flow.ip.destination, "192.0.2.2");
        assert_eq!(flow.destination.labels, vec![LABEL_WORLD]);
        assert_eq!(flow.trace_observation_point.as_deref(), Some("TO_NETWORK"));
        let t = flow.translation.as_ref().unwrap();
        assert_eq!(
            (t.original.as_str(), t.translated.as_str(), t.kind.as_str()),
            ("172.30.1.2:41000", "192.0.2.1:20001", "masquerade")
        );
        assert_eq!(flow.summary, "TCP Flags: SYN, ACK, FIN");
        assert_eq!(flow.connection.event, ConnectionEvent::Close);
        assert!(compact(&record).ends_with(" close: 6/5 packets, 400/900 bytes"));
    }

    #[test]
    fn services_are_named_for_vips_and_for_published_ports_leading_to_them() {
        let mut raw = raw_event(
            flow_kind::NEW,
            IPPROTO_TCP,
            ("172.30.1.9", 5000),
            ("10.96.0.10", 80),
        );
        raw.origin = ct_origin::SERVICE;
        raw.rewrite = ct_rewrite::DST;
        raw.nat_addr = ip("172.30.1.2");
        raw.nat_port = 80u16.to_be();
        let flow = record_of(&raw).flow;
        assert_eq!(flow.destination_service.unwrap().name, "web");
        assert_eq!(flow.destination.pod_name, "web1");
        assert_eq!(flow.translation.unwrap().kind, "service");

        let mut raw = raw_event(
            flow_kind::NEW,
            IPPROTO_TCP,
            ("192.0.2.2", 5000),
            ("192.0.2.1", 8000),
        );
        raw.origin = ct_origin::PUBLISHED;
        raw.rewrite = ct_rewrite::DST;
        raw.nat_addr = ip("172.30.1.2");
        raw.nat_port = 80u16.to_be();
        let flow = record_of(&raw).flow;
        assert_eq!(flow.destination_service.unwrap().name, "web");
        // A published port leading to a container names no service.
        raw.tuple.dport = 8080u16.to_be();
        assert_eq!(record_of(&raw).flow.destination_service, None);
    }

    #[test]
    fn a_drop_names_its_reason_the_hubble_way() {
        let mut raw = raw_event(
            flow_kind::DROP,
            IPPROTO_TCP,
            ("172.30.1.9", 5000),
            ("10.96.0.12", 80),
        );
        raw.drop_reason = DropReason::NoServiceBackend as u8;
        let record = record_of(&raw);
        let json = serde_json::to_value(&record).unwrap();
        let flow = &json["flow"];
        assert_eq!(flow["verdict"], "DROPPED");
        assert_eq!(flow["drop_reason_desc"], "NO_SERVICE_BACKEND");
        assert_eq!(flow["drop_reason"], 158);
        assert_eq!(
            flow["event_type"],
            serde_json::json!({"type": 1, "sub_type": 158})
        );
        assert_eq!(flow["destination_service"]["name"], "empty");
        assert_eq!(flow["destination"]["labels"][0], LABEL_SERVICE);
        assert!(flow.get("trace_observation_point").is_none());
        assert_eq!(flow["connection"]["event"], "drop");
        assert_eq!(
            compact(&record),
            "Nov 25 10:00:01.000: client:5000 (front) -> 10.96.0.12:80 (service) \
             NO_SERVICE_BACKEND DROPPED (TCP Flags: SYN) service empty"
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
        raw.drop_reason = DropReason::PolicyDenied as u8;
        raw.hook = hook::UPLINK_XDP as u8;
        let flow = record_of(&raw).flow;
        assert_eq!(flow.summary, "TCP");
        assert_eq!(flow.drop_reason_desc.as_deref(), Some("POLICY_DENIED"));
        assert_eq!(flow.traffic_direction, "INGRESS");
        assert_eq!(flow.destination.labels, vec![LABEL_HOST]);
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
        let flow = record_of(&raw).flow;
        assert_eq!(flow.destination.labels, vec![LABEL_HOST]);
        assert_eq!(flow.destination.identity, 1);
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
}
