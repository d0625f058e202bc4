//! Flow events as the agent works with them: the kernel's [`FlowEvent`] decoded into addresses,
//! host-order ports and enums, and the same shape built from conntrack entries for the
//! records the agent adds itself (periodic counters, the end of a connection that expired).
//! Both families decode to the same [`Event`]: addresses are [`IpAddr`], so that nothing after
//! this module cares which family a connection is.

use std::net::{IpAddr, Ipv4Addr};

use dataplane_common::{
    Address, CtEntryOf, CtKeyOf, DropReason, FlowEvent, In6Addr, ct_origin, ct_rewrite, flow_kind,
};

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// An IP family, named as Hubble names it (`IP.ipVersion`, the metrics' `family`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub const ALL: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

    pub fn of(ip: IpAddr) -> IpFamily {
        if ip.is_ipv4() {
            IpFamily::V4
        } else {
            IpFamily::V6
        }
    }

    pub fn hubble_name(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }
}

/// An address as the kernel's maps hold it (network byte order), of either family.
pub trait WireAddr: Address {
    fn ip(self) -> IpAddr;
}

impl WireAddr for u32 {
    fn ip(self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(u32::from_be(self)))
    }
}

impl WireAddr for In6Addr {
    /// As it is: an IPv6 table's address is IPv6, IPv4-mapped or not.
    fn ip(self) -> IpAddr {
        IpAddr::V6(self.to_ipv6())
    }
}

/// An address of a flow event of `family`: IPv4 events carry theirs mapped (::ffff:a.b.c.d),
/// IPv6 events theirs as they are.
fn event_addr(addr: In6Addr, family: u8) -> Result<IpAddr, DecodeError> {
    match family {
        4 => addr
            .as_mapped_v4()
            .map(WireAddr::ip)
            .ok_or(DecodeError::Unmapped),
        6 => Ok(addr.ip()),
        other => Err(DecodeError::Family(other)),
    }
}

/// An event the kernel wrote that this agent cannot read. The layout is shared through
/// dataplane-common, so these mean a kernel object of another version is running.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("flow event of {size} bytes, expected {expected}")]
    Size { size: usize, expected: usize },
    #[error("flow event of unknown kind {0}")]
    Kind(u8),
    #[error("drop event with unknown reason {0}")]
    DropReason(u8),
    #[error("flow event of address family {0}, which this agent does not decode")]
    Family(u8),
    #[error("IPv4 flow event with an address that is not IPv4-mapped")]
    Unmapped,
}

/// What a record says about its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The connection's first packet passed (kernel).
    New,
    /// A TCP connection's first FIN or RST (kernel), with both directions' counters.
    Close,
    /// An ICMP echo connection's first answer (kernel), as that answer was: its tuple is the
    /// answer's, its counters the answering direction's.
    Reply,
    /// Counters of a connection still open, reported by the agent every
    /// `--flow-report-interval` (30 s).
    Update,
    /// A connection without a close event (UDP, ICMP, TCP that never saw FIN/RST) expired and
    /// was removed by the agent's garbage collector: its final counters.
    End,
    /// A packet was dropped (kernel).
    Drop(DropReason),
}

/// Which translation a connection went through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TranslationKind {
    PublishedPort,
    Masquerade,
    Service,
}

impl TranslationKind {
    pub fn name(self) -> &'static str {
        match self {
            TranslationKind::PublishedPort => "published_port",
            TranslationKind::Masquerade => "masquerade",
            TranslationKind::Service => "service",
        }
    }
}

/// A translation: which side was rewritten and to what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nat {
    pub kind: TranslationKind,
    /// The destination was rewritten (published port, service); else the source (masquerade).
    pub destination: bool,
    pub addr: IpAddr,
    pub port: u16,
    /// A hairpin connection (a container's connection translated back to itself): its source
    /// was rewritten too, to this address and port (the network's gateway); `addr`:`port`
    /// is then the container's own address and the port it was reached on.
    pub source: Option<(IpAddr, u16)>,
}

/// A connection's 5-tuple as its first packet (or the dropped packet) had it, ports in host
/// byte order. For ICMP echo `sport` is the identifier and `dport` 0. Both addresses are of
/// one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub proto: u8,
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
}

impl Tuple {
    pub fn family(&self) -> IpFamily {
        IpFamily::of(self.saddr)
    }
}

impl<A: WireAddr> From<&CtKeyOf<A>> for Tuple {
    fn from(key: &CtKeyOf<A>) -> Tuple {
        Tuple {
            proto: key.proto,
            saddr: key.saddr.ip(),
            sport: u16::from_be(key.sport),
            daddr: key.daddr.ip(),
            dport: u16::from_be(key.dport),
        }
    }
}

/// An ICMP message's type and code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Icmp {
    pub icmp_type: u8,
    pub code: u8,
}

/// Packets and bytes of the connection's first direction and of its replies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
}

/// One event, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// CLOCK_MONOTONIC nanoseconds (the kernel's bpf_ktime_get_ns).
    pub time_ns: u64,
    pub kind: Kind,
    pub tuple: Tuple,
    /// None for untranslated connections and for drops.
    pub nat: Option<Nat>,
    /// TCP header flags seen (see [`FlowEvent::tcp_flags`]).
    pub tcp_flags: u8,
    /// ICMP type and code of the packet the event is about (0 for other protocols).
    pub icmp: Icmp,
    pub counters: Counters,
    /// One of `dataplane_common::hook`, 0 when the agent made the record.
    pub hook: u32,
    /// The interface the kernel saw it on, 0 when the agent made the record.
    pub ifindex: u32,
}

/// What the kernel says of a connection's translation, in host byte order: how it was
/// rewritten (`ct_rewrite`), to which address and port, and a hairpin's port.
#[derive(Clone, Copy, Debug)]
struct Rewrite {
    origin: u8,
    rewrite: u8,
    addr: IpAddr,
    port: u16,
    hairpin_port: u16,
}

/// A connection translated at its socket (`ct_rewrite::SOCKET`: the key goes to the backend,
/// `addr`:`port` is the service address the socket asked for) as the packet path's record of
/// the same connection is: to the service address, its destination translated to the
/// backend. Anything else as it is.
fn presented(tuple: Tuple, rw: Rewrite) -> (Tuple, Rewrite) {
    if rw.rewrite != ct_rewrite::SOCKET {
        return (tuple, rw);
    }
    let asked = Tuple {
        daddr: rw.addr,
        dport: rw.port,
        ..tuple
    };
    let to_backend = Rewrite {
        rewrite: ct_rewrite::DST,
        addr: tuple.daddr,
        port: tuple.dport,
        ..rw
    };
    (asked, to_backend)
}

/// The translation an event or a forward conntrack entry of the connection `tuple` says.
fn nat(tuple: &Tuple, rw: Rewrite) -> Option<Nat> {
    let kind = match rw.origin {
        ct_origin::PUBLISHED => TranslationKind::PublishedPort,
        ct_origin::MASQUERADE => TranslationKind::Masquerade,
        ct_origin::SERVICE => TranslationKind::Service,
        // PLAIN, and 0 for drops.
        _ => return None,
    };
    if rw.rewrite == ct_rewrite::HAIRPIN {
        // Back to the client itself, from the gateway.
        return Some(Nat {
            kind,
            destination: true,
            addr: tuple.saddr,
            port: rw.hairpin_port,
            source: Some((rw.addr, rw.port)),
        });
    }
    Some(Nat {
        kind,
        // NAT64's source change (to the container's gateway) is not in the record: the
        // translation it names is the destination's, to the container's IPv4 address.
        destination: rw.rewrite == ct_rewrite::DST || rw.rewrite == ct_rewrite::NAT64,
        addr: rw.addr,
        port: rw.port,
        source: None,
    })
}

/// The tuple and translation as records present them.
fn translated(tuple: Tuple, rw: Rewrite) -> (Tuple, Option<Nat>) {
    let (tuple, rw) = presented(tuple, rw);
    (tuple, nat(&tuple, rw))
}

/// Copies one ring-buffer record out of the ring (the reader task does this much only, so
/// that the ring is freed at once; [`from_raw`] does the rest in the main loop).
pub fn copy_event(bytes: &[u8]) -> Result<FlowEvent, DecodeError> {
    let expected = std::mem::size_of::<FlowEvent>();
    if bytes.len() < expected {
        return Err(DecodeError::Size {
            size: bytes.len(),
            expected,
        });
    }
    // SAFETY: FlowEvent is plain #[repr(C)] integers (every bit pattern is valid) and the
    // slice holds at least its size; read_unaligned because the ring guarantees only 8-byte
    // alignment of records, whatever the type asks for.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) })
}

/// Decodes a kernel event already copied out of the ring.
pub fn from_raw(raw: &FlowEvent) -> Result<Event, DecodeError> {
    let kind = match raw.kind {
        flow_kind::NEW => Kind::New,
        flow_kind::CLOSE => Kind::Close,
        flow_kind::REPLY => Kind::Reply,
        flow_kind::DROP => Kind::Drop(
            DropReason::from_u32(u32::from(raw.drop_reason))
                .ok_or(DecodeError::DropReason(raw.drop_reason))?,
        ),
        other => return Err(DecodeError::Kind(other)),
    };
    let addr = |a: In6Addr| event_addr(a, raw.family);
    let tuple = Tuple {
        proto: raw.tuple.proto,
        saddr: addr(raw.tuple.saddr)?,
        sport: u16::from_be(raw.tuple.sport),
        daddr: addr(raw.tuple.daddr)?,
        dport: u16::from_be(raw.tuple.dport),
    };
    let (tuple, nat) = translated(
        tuple,
        Rewrite {
            origin: raw.origin,
            rewrite: raw.rewrite,
            // Of the family it was translated to (IPv4 mapped).
            addr: raw.nat_addr.to_ip(),
            port: u16::from_be(raw.nat_port),
            hairpin_port: u16::from_be(raw.hairpin_port),
        },
    );
    Ok(Event {
        time_ns: raw.time_ns,
        kind,
        tuple,
        nat,
        tcp_flags: raw.tcp_flags,
        icmp: Icmp {
            icmp_type: raw.icmp_type,
            code: raw.icmp_code,
        },
        counters: Counters {
            packets: raw.packets,
            bytes: raw.bytes,
            reply_packets: raw.reply_packets,
            reply_bytes: raw.reply_bytes,
        },
        hook: u32::from(raw.hook),
        ifindex: raw.ifindex,
    })
}

/// A record the agent makes from a connection's conntrack entries (`key`/`forward` its first
/// direction, `reply` the other when present), at `now_ns`.
pub fn from_conntrack<A: WireAddr>(
    key: &CtKeyOf<A>,
    forward: &CtEntryOf<A>,
    reply: Option<&CtEntryOf<A>>,
    kind: Kind,
    now_ns: u64,
) -> Event {
    let (tuple, nat) = translated(
        Tuple::from(key),
        Rewrite {
            origin: forward.origin,
            rewrite: forward.rewrite,
            addr: forward.nat_addr.ip(),
            port: u16::from_be(forward.nat_port),
            hairpin_port: u16::from_be(forward.hairpin_port),
        },
    );
    Event {
        time_ns: now_ns,
        kind,
        tuple,
        nat,
        tcp_flags: forward.tcp_flags | reply.map_or(0, |r| r.tcp_flags),
        // The first direction's type; tracked ICMP is echo, whose code is 0.
        icmp: Icmp {
            icmp_type: forward.icmp_type,
            code: 0,
        },
        counters: Counters {
            packets: forward.packets,
            bytes: forward.bytes,
            reply_packets: reply.map_or(0, |r| r.packets),
            reply_bytes: reply.map_or(0, |r| r.bytes),
        },
        hook: 0,
        ifindex: 0,
    }
}

#[cfg(test)]
pub mod tests {
    use dataplane_common::{CtEntry, CtEntry6, CtKey6, hook};

    use super::*;

    /// A kernel event as the programs write it, of either family: addresses in IPv6 form
    /// (IPv4 mapped, `family` 4) and ports in network byte order.
    pub fn raw_event(
        kind: u8,
        proto: u8,
        (saddr, sport): (&str, u16),
        (daddr, dport): (&str, u16),
    ) -> FlowEvent {
        let (saddr, daddr): (IpAddr, IpAddr) = (saddr.parse().unwrap(), daddr.parse().unwrap());
        FlowEvent {
            time_ns: 5_000_000_000,
            packets: 1,
            bytes: 60,
            tuple: CtKey6 {
                saddr: In6Addr::from_ip(saddr),
                daddr: In6Addr::from_ip(daddr),
                sport: sport.to_be(),
                dport: dport.to_be(),
                proto,
                _pad: [0; 3],
            },
            family: if saddr.is_ipv4() { 4 } else { 6 },
            kind,
            tcp_flags: if proto == IPPROTO_TCP { 0x02 } else { 0 },
            hook: hook::CONTAINER_INGRESS as u8,
            ifindex: 7,
            ..FlowEvent::default()
        }
    }

    /// `addr` (either family) as an event's `nat_addr`.
    pub fn nat_addr(addr: &str) -> In6Addr {
        In6Addr::from_ip(addr.parse().unwrap())
    }

    /// An event as [`from_raw`] gives it, of either family (ports in host order): a new
    /// connection's, untranslated, seen at a container's ingress.
    pub fn event(
        kind: Kind,
        proto: u8,
        (saddr, sport): (&str, u16),
        (daddr, dport): (&str, u16),
    ) -> Event {
        Event {
            time_ns: 5_000_000_000,
            kind,
            tuple: Tuple {
                proto,
                saddr: saddr.parse().unwrap(),
                sport,
                daddr: daddr.parse().unwrap(),
                dport,
            },
            nat: None,
            tcp_flags: if proto == IPPROTO_TCP { 0x02 } else { 0 },
            icmp: Icmp::default(),
            counters: Counters {
                packets: 1,
                bytes: 60,
                ..Counters::default()
            },
            hook: hook::CONTAINER_INGRESS,
            ifindex: 7,
        }
    }

    fn as_bytes(event: &FlowEvent) -> Vec<u8> {
        // SAFETY: a plain #[repr(C)] value viewed as its bytes.
        unsafe {
            std::slice::from_raw_parts(
                (event as *const FlowEvent).cast::<u8>(),
                std::mem::size_of::<FlowEvent>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn a_published_port_event_decodes_to_host_order_with_its_translation() {
        let mut raw = raw_event(
            flow_kind::NEW,
            IPPROTO_TCP,
            ("192.0.2.2", 41234),
            ("192.0.2.1", 8080),
        );
        raw.origin = ct_origin::PUBLISHED;
        raw.rewrite = ct_rewrite::DST;
        raw.nat_addr = In6Addr::mapped_v4(u32::from(Ipv4Addr::new(172, 30, 1, 2)).to_be());
        raw.nat_port = 80u16.to_be();
        let event = from_raw(&copy_event(&as_bytes(&raw)).unwrap()).unwrap();
        assert_eq!(event.kind, Kind::New);
        assert_eq!(
            event.tuple,
            Tuple {
                proto: IPPROTO_TCP,
                saddr: Ipv4Addr::new(192, 0, 2, 2).into(),
                sport: 41234,
                daddr: Ipv4Addr::new(192, 0, 2, 1).into(),
                dport: 8080,
            }
        );
        assert_eq!(
            event.nat,
            Some(Nat {
                kind: TranslationKind::PublishedPort,
                destination: true,
                addr: Ipv4Addr::new(172, 30, 1, 2).into(),
                port: 80,
                source: None,
            })
        );
        assert_eq!(event.ifindex, 7);
        assert_eq!(event.hook, hook::CONTAINER_INGRESS);
    }

    #[test]
    fn a_hairpin_event_decodes_to_both_translations() {
        // web1 to its own published port 8080: back to web1:80, from the gateway's port 20077.
        let mut raw = raw_event(
            flow_kind::NEW,
            IPPROTO_UDP,
            ("172.30.1.2", 41234),
            ("192.0.2.1", 8080),
        );
        raw.origin = ct_origin::PUBLISHED;
        raw.rewrite = ct_rewrite::HAIRPIN;
        raw.nat_addr = In6Addr::mapped_v4(u32::from(Ipv4Addr::new(172, 30, 1, 1)).to_be());
        raw.nat_port = 20077u16.to_be();
        raw.hairpin_port = 80u16.to_be();
        let event = from_raw(&copy_event(&as_bytes(&raw)).unwrap()).unwrap();
        assert_eq!(
            event.nat,
            Some(Nat {
                kind: TranslationKind::PublishedPort,
                destination: true,
                addr: Ipv4Addr::new(172, 30, 1, 2).into(),
                port: 80,
                source: Some((Ipv4Addr::new(172, 30, 1, 1).into(), 20077)),
            })
        );
    }

    #[test]
    fn drops_carry_their_reason_and_plain_connections_no_translation() {
        let mut raw = raw_event(
            flow_kind::DROP,
            IPPROTO_TCP,
            ("172.30.1.9", 5000),
            ("10.96.0.12", 80),
        );
        raw.drop_reason = DropReason::ServiceBackendNotFound as u8;
        let event = from_raw(&copy_event(&as_bytes(&raw)).unwrap()).unwrap();
        assert_eq!(event.kind, Kind::Drop(DropReason::ServiceBackendNotFound));
        assert_eq!(event.nat, None);
        let mut plain = raw_event(
            flow_kind::NEW,
            IPPROTO_UDP,
            ("172.30.1.9", 5000),
            ("172.30.1.2", 53),
        );
        plain.origin = ct_origin::PLAIN;
        assert_eq!(from_raw(&plain).unwrap().nat, None);
    }

    #[test]
    fn unreadable_events_are_refused_with_what_is_wrong() {
        let raw = raw_event(flow_kind::NEW, IPPROTO_TCP, ("1.1.1.1", 1), ("2.2.2.2", 2));
        let bytes = as_bytes(&raw);
        assert_eq!(copy_event(&bytes), Ok(raw));
        assert_eq!(
            copy_event(&bytes[..40]),
            Err(DecodeError::Size {
                size: 40,
                expected: 120
            })
        );
        let mut odd = raw;
        odd.kind = 9;
        assert_eq!(from_raw(&odd), Err(DecodeError::Kind(9)));
        let mut odd = raw;
        odd.kind = flow_kind::DROP;
        odd.drop_reason = 15;
        assert_eq!(from_raw(&odd), Err(DecodeError::DropReason(15)));
    }

    #[test]
    fn a_connection_translated_at_its_socket_reads_as_the_packet_paths() {
        // Tracked as it went (container -> backend), the VIP it asked for in nat_*: the
        // record is the one the packet path's translation would give.
        let mut raw = raw_event(
            flow_kind::NEW,
            IPPROTO_TCP,
            ("172.30.1.9", 40000),
            ("172.30.1.3", 8080),
        );
        raw.origin = ct_origin::SERVICE;
        raw.rewrite = ct_rewrite::SOCKET;
        raw.nat_addr = In6Addr::mapped_v4(u32::from(Ipv4Addr::new(10, 96, 0, 10)).to_be());
        raw.nat_port = 80u16.to_be();
        let event = from_raw(&raw).unwrap();
        assert_eq!(event.tuple.daddr, Ipv4Addr::new(10, 96, 0, 10));
        assert_eq!(event.tuple.dport, 80);
        assert_eq!(event.tuple.saddr, Ipv4Addr::new(172, 30, 1, 9));
        assert_eq!(event.tuple.sport, 40000);
        let expected = Nat {
            kind: TranslationKind::Service,
            destination: true,
            addr: Ipv4Addr::new(172, 30, 1, 3).into(),
            port: 8080,
            source: None,
        };
        assert_eq!(event.nat, Some(expected));
        // The same from its conntrack entry (periodic and end records).
        let forward = CtEntry {
            origin: ct_origin::SERVICE,
            rewrite: ct_rewrite::SOCKET,
            nat_addr: raw.nat_addr.as_mapped_v4().unwrap(),
            nat_port: raw.nat_port,
            ..CtEntry::default()
        };
        let event = from_conntrack(&raw.tuple.as_v4().unwrap(), &forward, None, Kind::End, 42);
        assert_eq!(event.tuple.daddr, Ipv4Addr::new(10, 96, 0, 10));
        assert_eq!(event.nat, Some(expected));
    }

    #[test]
    fn conntrack_entries_give_both_directions_counters() {
        let key = raw_event(
            flow_kind::NEW,
            IPPROTO_UDP,
            ("172.30.1.2", 5000),
            ("192.0.2.2", 53),
        )
        .tuple
        .as_v4()
        .unwrap();
        let forward = CtEntry {
            origin: ct_origin::MASQUERADE,
            rewrite: ct_rewrite::SRC,
            nat_addr: u32::from(Ipv4Addr::new(192, 0, 2, 1)).to_be(),
            nat_port: 20001u16.to_be(),
            packets: 3,
            bytes: 300,
            ..CtEntry::default()
        };
        let reply = CtEntry {
            packets: 2,
            bytes: 500,
            is_reply: 1,
            ..CtEntry::default()
        };
        let event = from_conntrack(&key, &forward, Some(&reply), Kind::End, 42);
        assert_eq!(
            event.counters,
            Counters {
                packets: 3,
                bytes: 300,
                reply_packets: 2,
                reply_bytes: 500
            }
        );
        let nat = event.nat.unwrap();
        assert_eq!(nat.kind, TranslationKind::Masquerade);
        assert!(!nat.destination);
        assert_eq!(
            (nat.addr, nat.port),
            (Ipv4Addr::new(192, 0, 2, 1).into(), 20001)
        );
        assert_eq!(event.time_ns, 42);
    }

    #[test]
    fn ipv6_events_decode_to_ipv6_tuples_and_translations() {
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        // A published port over IPv6.
        let mut raw = raw_event(
            flow_kind::NEW,
            IPPROTO_TCP,
            ("2001:db8::2", 41234),
            ("2001:db8::1", 8080),
        );
        raw.origin = ct_origin::PUBLISHED;
        raw.rewrite = ct_rewrite::DST;
        raw.nat_addr = nat_addr("fd00:30:1::2");
        raw.nat_port = 80u16.to_be();
        let event = from_raw(&copy_event(&as_bytes(&raw)).unwrap()).unwrap();
        assert_eq!(
            event.tuple,
            Tuple {
                proto: IPPROTO_TCP,
                saddr: v6("2001:db8::2"),
                sport: 41234,
                daddr: v6("2001:db8::1"),
                dport: 8080,
            }
        );
        assert_eq!(event.tuple.family(), IpFamily::V6);
        assert_eq!(
            event.nat,
            Some(Nat {
                kind: TranslationKind::PublishedPort,
                destination: true,
                addr: v6("fd00:30:1::2"),
                port: 80,
                source: None,
            })
        );
        // NAT64: the same IPv6 connection, translated to an IPv4-only container (its address
        // IPv4 again, not the mapped IPv6 form the event carries).
        raw.rewrite = ct_rewrite::NAT64;
        raw.nat_addr = In6Addr::mapped_v4(u32::from(Ipv4Addr::new(172, 30, 1, 2)).to_be());
        raw.hairpin_port = 41234u16.to_be();
        let event = from_raw(&copy_event(&as_bytes(&raw)).unwrap()).unwrap();
        assert_eq!(event.tuple.family(), IpFamily::V6);
        assert_eq!(event.tuple.saddr, v6("2001:db8::2"));
        assert_eq!(
            event.nat,
            Some(Nat {
                kind: TranslationKind::PublishedPort,
                destination: true,
                addr: v6("172.30.1.2"),
                port: 80,
                source: None,
            })
        );
        raw.rewrite = ct_rewrite::DST;
        raw.hairpin_port = 0;
        // A hairpin: back to the container from its gateway.
        raw.tuple.saddr = nat_addr("fd00:30:1::2");
        raw.rewrite = ct_rewrite::HAIRPIN;
        raw.nat_addr = nat_addr("fd00:30:1::1");
        raw.nat_port = 20077u16.to_be();
        raw.hairpin_port = 80u16.to_be();
        assert_eq!(
            from_raw(&raw).unwrap().nat,
            Some(Nat {
                kind: TranslationKind::PublishedPort,
                destination: true,
                addr: v6("fd00:30:1::2"),
                port: 80,
                source: Some((v6("fd00:30:1::1"), 20077)),
            })
        );
        // An ICMPv6 echo's answer, and a drop: their types and reasons as IPv4's.
        let mut reply = raw_event(
            flow_kind::REPLY,
            IPPROTO_ICMPV6,
            ("fd00:30:1::1", 77),
            ("fd00:30:1::9", 0),
        );
        reply.icmp_type = 129;
        let event = from_raw(&reply).unwrap();
        assert_eq!((event.kind, event.icmp.icmp_type), (Kind::Reply, 129));
        assert_eq!(event.tuple.saddr, v6("fd00:30:1::1"));
        let mut drop = raw_event(
            flow_kind::DROP,
            IPPROTO_UDP,
            ("2001:db8:ffff::7", 5000),
            ("fd00:30:1::2", 53),
        );
        drop.drop_reason = DropReason::PolicyDeny as u8;
        let event = from_raw(&drop).unwrap();
        assert_eq!(event.kind, Kind::Drop(DropReason::PolicyDeny));
        assert_eq!(event.nat, None);
        // An IPv6 event's IPv4-mapped address stays IPv6 (an IPv6 packet had it); an IPv4
        // event's address must be mapped; an unknown family is refused.
        let mapped = raw_event(
            flow_kind::NEW,
            IPPROTO_UDP,
            ("fd00:30:1::9", 5000),
            ("2001:db8::1", 53),
        );
        let mut odd = mapped;
        odd.tuple.daddr = nat_addr("192.0.2.1");
        assert_eq!(from_raw(&odd).unwrap().tuple.daddr, v6("::ffff:192.0.2.1"));
        odd.family = 4;
        assert_eq!(from_raw(&odd), Err(DecodeError::Unmapped));
        odd.family = 0;
        assert_eq!(from_raw(&odd), Err(DecodeError::Family(0)));
        // A connection of an IPv6 socket translated to an IPv4 backend: the translation in
        // the backend's family.
        let mut across = mapped;
        across.origin = ct_origin::SERVICE;
        across.rewrite = ct_rewrite::DST;
        across.nat_addr = nat_addr("172.30.1.2");
        across.nat_port = 80u16.to_be();
        assert_eq!(
            from_raw(&across).unwrap().nat.map(|n| n.addr),
            Some("172.30.1.2".parse().unwrap())
        );
    }

    #[test]
    fn ipv6_conntrack_entries_give_the_same_events_as_ipv4_ones() {
        let key = raw_event(
            flow_kind::NEW,
            IPPROTO_UDP,
            ("fd00:30:1::2", 5000),
            ("2001:db8:ffff::7", 53),
        )
        .tuple;
        let forward = CtEntry6 {
            origin: ct_origin::MASQUERADE,
            rewrite: ct_rewrite::SRC,
            nat_addr: nat_addr("2001:db8::1"),
            nat_port: 20001u16.to_be(),
            packets: 3,
            bytes: 300,
            ..CtEntry6::default()
        };
        let reply = CtEntry6 {
            packets: 2,
            bytes: 500,
            is_reply: 1,
            ..CtEntry6::default()
        };
        let event = from_conntrack(&key, &forward, Some(&reply), Kind::End, 42);
        assert_eq!(event.tuple.saddr, "fd00:30:1::2".parse::<IpAddr>().unwrap());
        assert_eq!(event.tuple.dport, 53);
        let nat = event.nat.unwrap();
        assert_eq!(nat.kind, TranslationKind::Masquerade);
        assert_eq!(
            (nat.addr, nat.port),
            ("2001:db8::1".parse().unwrap(), 20001)
        );
        assert_eq!(
            (event.counters.packets, event.counters.reply_bytes),
            (3, 500)
        );
    }
}
