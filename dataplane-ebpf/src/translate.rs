//! The translations of each hook, built on conntrack and NAT:
//!
//! | hook | tracked packet (hit) | new connection (miss) |
//! |---|---|---|
//! | container veth ingress | published-port replies (source back to host:port), VIP and hairpin connections | a container to a VIP or to its host's published port (hairpin: to itself, source-translated too) |
//! | uplink ingress | published-port requests, masquerade replies | published port from outside |
//! | uplink egress | masquerade requests | masquerade of a container's connection |
//!
//! Each hook acts only on the entries whose origin it owns, so one connection is translated
//! exactly once per packet.

use dataplane_common::{
    CtKey, DropReason, PortKey, PortTarget, ServiceInfo, ServiceKey, ct_origin, ct_rewrite, hook,
    net_flags,
};

use crate::{
    conntrack::{self, CtError, NewConnection},
    early, flow, lb,
    maps::{CONFIG, ENDPOINTS, FRAGMENTS, LOCAL_ADDRS, PORTS, PROGS6, SERVICES, SOCK_LB},
    nat,
    parse::{
        Frame, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Ipv4Packet, L4, Quoted, Transport,
        parse_ipv6, parse_l4, parse_tc, salvage_icmp, salvage_tc,
    },
    policy::{self, Via},
    reject, stats,
};
use aya_ebpf::programs::TcContext;
use dataplane_common::{FragEntry, FragKey};

/// What a hook decided.
pub enum Verdict {
    Pass,
    Drop(DropReason),
    /// Count a drop for the reason, and send the packet (rewritten into a refusal) out of
    /// this interface.
    Refuse(DropReason, u32),
    /// Send out of this interface, with the neighbour (next hop MAC) resolved by the kernel.
    RedirectNeigh(u32),
    /// Deliver straight into the namespace of this veth's peer (the container's eth).
    RedirectPeer(u32),
}

/// Where the hook runs, which decides the entries it acts on and what a miss means.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    ContainerIngress,
    UplinkIngress,
    UplinkEgress,
}

impl Hook {
    /// The hook's number in counters and flow events.
    pub fn number(self) -> u32 {
        match self {
            Hook::ContainerIngress => hook::CONTAINER_INGRESS,
            Hook::UplinkIngress => hook::UPLINK_INGRESS,
            Hook::UplinkEgress => hook::UPLINK_EGRESS,
        }
    }
}

/// Where a packet is being handled: for flow events and for sending refusals back.
#[derive(Clone, Copy)]
struct Site {
    hook: Hook,
    ifindex: u32,
}

/// What a packet was when it arrived (before any rewrite), for the flow event of a drop and
/// for the fragment map.
struct Arrived {
    /// The drop's event, if it comes to that (tuple and flags as the packet arrived).
    drop: flow::Dropped,
    /// Set for the first fragment of a split datagram: its fate is recorded for the others.
    first_fragment: bool,
    ip_id: u16,
}

/// Runs the hook's translations on the packet in `ctx`; a drop also becomes a flow event.
#[inline(always)]
pub fn handle(ctx: &TcContext, hook: Hook) -> Verdict {
    let site = Site {
        hook,
        // SAFETY: `skb` points at the context the kernel passed to this program.
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
    };
    let mut arrived = Arrived {
        drop: flow::Dropped {
            tuple: CtKey::default(),
            tcp_flags: 0,
            icmp_type: 0,
            icmp_code: 0,
            len: ctx.len(),
            reason: DropReason::Malformed,
            hook: hook.number(),
            ifindex: site.ifindex,
        },
        first_fragment: false,
        ip_id: 0,
    };
    let verdict = decide(ctx, site, &mut arrived);
    let dropped = match verdict {
        Verdict::Drop(reason) | Verdict::Refuse(reason, _) => Some(reason),
        _ => None,
    };
    if arrived.first_fragment {
        remember_first_fragment(&arrived, dropped);
    }
    match dropped {
        Some(reason) => {
            arrived.drop.reason = reason;
            flow::dropped(&arrived.drop);
        }
        // Hubble counts the flags of forwarded packets only.
        None if arrived.drop.tuple.proto == IPPROTO_TCP => {
            stats::count_tcp_flags(ctx.skb.skb, hook.number(), arrived.drop.tcp_flags);
        }
        None => {}
    }
    verdict
}

/// The IPv6 program of `hook` (tail-called by the IPv4 one for each IPv6 frame): the deny
/// list first at the uplink (as IPv4's at tc, while XDP is not attached); then the IPv6
/// header and its extension headers are read; one that is truncated or inconsistent is
/// dropped as malformed.
#[inline(always)]
pub fn handle6(ctx: &TcContext, hook: Hook) -> Verdict {
    if hook == Hook::UplinkIngress && deny_list_at_tc() && early::denied_source6_tc(ctx) {
        // The deny list is user rules, as at XDP; its drops are recorded, as IPv4's at tc.
        let verdict = Verdict::Drop(DropReason::PolicyDeny);
        crate::translate6::hand_over_drop(ctx, hook, &verdict);
        return verdict;
    }
    let Some(mut ip) = parse_ipv6(ctx) else {
        return Verdict::Drop(DropReason::Malformed);
    };
    let verdict = crate::translate6::translate(ctx, hook, &mut ip);
    match verdict {
        // A drop's flow event: by the drop reporter, which this returns from only if it is
        // missing.
        Verdict::Drop(_) | Verdict::Refuse(..) => {
            crate::translate6::hand_over_drop(ctx, hook, &verdict)
        }
        // Hubble counts the flags of forwarded packets only.
        _ if ip.protocol == IPPROTO_TCP && !ip.is_later_fragment() => {
            if let Ok(flags) = ctx.load::<u8>(ip.l4_offset + 13) {
                stats::count_tcp_flags6(ctx.skb.skb, hook.number(), flags);
            }
        }
        _ => {}
    }
    verdict
}

/// Records what the first fragment of a datagram was (its ports as it arrived) and whether it
/// was dropped, for the later fragments of the same datagram (keyed as they arrive here: the
/// same addresses, protocol and IP id).
#[inline(always)]
fn remember_first_fragment(arrived: &Arrived, dropped: Option<DropReason>) {
    let key = FragKey {
        saddr: arrived.drop.tuple.saddr,
        daddr: arrived.drop.tuple.daddr,
        id: arrived.ip_id,
        proto: arrived.drop.tuple.proto,
        _pad: 0,
    };
    let entry = FragEntry {
        sport: arrived.drop.tuple.sport,
        dport: arrived.drop.tuple.dport,
        drop_reason: dropped.map_or(0, |r| r as u8),
        _pad: [0; 3],
    };
    // A full LRU drops the oldest datagram's entry; nothing to do on failure.
    let _ = FRAGMENTS.insert(&key, &entry, 0);
}

/// The drop reason a fragment entry recorded (its numbers are `DropReason`'s).
#[inline(always)]
pub(crate) fn recorded_drop(reason: u8) -> DropReason {
    const POLICY_DENIED: u8 = DropReason::PolicyDenied as u8;
    const INVALID_L4_HEADER: u8 = DropReason::InvalidL4Header as u8;
    const CT_MAP_INSERTION_FAILED: u8 = DropReason::CtMapInsertionFailed as u8;
    const SERVICE_BACKEND_NOT_FOUND: u8 = DropReason::ServiceBackendNotFound as u8;
    const NO_MAPPING_FOR_NAT_MASQUERADE: u8 = DropReason::NoMappingForNatMasquerade as u8;
    const FRAGMENT_NOT_FOUND: u8 = DropReason::FragmentNotFound as u8;
    const POLICY_DENY: u8 = DropReason::PolicyDeny as u8;
    match reason {
        POLICY_DENIED => DropReason::PolicyDenied,
        INVALID_L4_HEADER => DropReason::InvalidL4Header,
        CT_MAP_INSERTION_FAILED => DropReason::CtMapInsertionFailed,
        SERVICE_BACKEND_NOT_FOUND => DropReason::ServiceBackendNotFound,
        NO_MAPPING_FOR_NAT_MASQUERADE => DropReason::NoMappingForNatMasquerade,
        FRAGMENT_NOT_FOUND => DropReason::FragmentNotFound,
        POLICY_DENY => DropReason::PolicyDeny,
        _ => DropReason::Malformed,
    }
}

/// A fragment after the first: it gets what its datagram's first fragment got here (found
/// through the fragment map): dropped with it, or translated by the same connection's entry
/// (addresses only: ports and the L4 checksum are in the first fragment), and delivered the
/// same way. Without a first fragment it is dropped and counted, never passed untranslated.
#[inline(always)]
fn later_fragment(
    ctx: &TcContext,
    site: &Site,
    ip: &mut Ipv4Packet,
    arrived: &mut Arrived,
) -> Verdict {
    let site = *site;
    let frag_key = FragKey {
        saddr: ip.saddr,
        daddr: ip.daddr,
        id: ip.id,
        proto: ip.protocol,
        _pad: 0,
    };
    let Some(first) = FRAGMENTS.get_ptr(&frag_key) else {
        return Verdict::Drop(DropReason::FragmentNotFound);
    };
    // SAFETY: a map value from this program run's lookup.
    let first = unsafe { *first };
    arrived.drop.tuple.sport = first.sport;
    arrived.drop.tuple.dport = first.dport;
    if first.drop_reason != 0 {
        return Verdict::Drop(recorded_drop(first.drop_reason));
    }
    let key = arrived.drop.tuple;
    let Some(entry) = conntrack::lookup(&key) else {
        // The first fragment went on untracked (to the host, routed, not ours).
        return Verdict::Pass;
    };
    let (origin, rewrite, addr, _, _) = translation_of(entry);
    if !owns(site.hook, origin, rewrite) {
        return Verdict::Pass;
    }
    if !conntrack::still_allowed(&key, entry) {
        return Verdict::Drop(DropReason::PolicyDenied);
    }
    conntrack::account(&key, entry, &packet_seen(site, ip.len, None));
    if rewrites(rewrite) && nat::rewrite_addresses(ctx, ip, rewrite, addr).is_err() {
        return Verdict::Drop(DropReason::Malformed);
    }
    onward(ctx, site.hook, ip, rewrite)
}

/// Fills in what the record of a packet dropped before its L4 header was parsed can say:
/// TCP/UDP ports and TCP flags, read where they would be (zero where the packet ends first,
/// and for later fragments, which have no L4 header).
#[inline(always)]
fn salvage_ports(ctx: &TcContext, ip: &Ipv4Packet, arrived: &mut Arrived) {
    if ip.is_later_fragment() || (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP) {
        return;
    }
    arrived.drop.tuple.sport = ctx.load::<u16>(ip.l4_offset).unwrap_or(0);
    arrived.drop.tuple.dport = ctx.load::<u16>(ip.l4_offset + 2).unwrap_or(0);
    if ip.protocol == IPPROTO_TCP {
        arrived.drop.tcp_flags = ctx.load::<u8>(ip.l4_offset + 13).unwrap_or(0);
    }
}

/// Whether the uplink's tc ingress enforces the deny list (XDP is not attached).
#[inline(always)]
fn deny_list_at_tc() -> bool {
    // SAFETY: array element 0 always exists.
    CONFIG
        .get_ptr(0)
        .is_some_and(|c| unsafe { (*c).deny_at_tc } != 0)
}

/// A packet as conntrack accounts it.
#[inline(always)]
fn packet_seen(site: Site, len: u32, l4: Option<&L4>) -> conntrack::Seen {
    conntrack::Seen {
        len,
        tcp_flags: l4.map_or(0, |l| l.tcp_flags),
        seq: l4.map_or(0, |l| l.seq),
        ack_seq: l4.map_or(0, |l| l.ack_seq),
        icmp_type: l4.map_or(0, |l| l.icmp_type),
        icmp_code: l4.map_or(0, |l| l.icmp_code),
        hook: site.hook.number(),
        ifindex: site.ifindex,
    }
}

#[inline(always)]
fn decide(ctx: &TcContext, site: Site, arrived: &mut Arrived) -> Verdict {
    let hook = site.hook;
    // The deny list first, on the frame's bytes as they are: a flood from a denied source
    // costs no more than this (and the counters).
    let deny_at_tc = hook == Hook::UplinkIngress && deny_list_at_tc();
    let mut deny_checked = false;
    if deny_at_tc {
        match early::at_tc(ctx) {
            early::Early::Denied(denied) => {
                arrived.drop.tuple = denied.tuple;
                arrived.drop.tcp_flags = denied.tcp_flags;
                arrived.drop.icmp_type = denied.icmp_type;
                arrived.drop.icmp_code = denied.icmp_code;
                // The deny list is user rules, as at XDP.
                return Verdict::Drop(DropReason::PolicyDeny);
            }
            early::Early::Allowed => deny_checked = true,
            early::Early::Unread => {}
        }
    }
    let mut ip = match parse_tc(ctx) {
        Frame::Ipv4(ip) => ip,
        Frame::Ipv6 => {
            // On to this hook's IPv6 program (which returns the verdict); an empty slot
            // leaves the frame passing untouched.
            // SAFETY: a tail call with the program's own context; on failure it returns.
            unsafe { PROGS6.tail_call(ctx, hook.number()) };
            return Verdict::Pass;
        }
        Frame::Other => return Verdict::Pass,
        Frame::Malformed => {
            // The record says where it came from, as far as the frame tells.
            let (saddr, daddr, proto) = salvage_tc(ctx);
            arrived.drop.tuple.saddr = saddr;
            arrived.drop.tuple.daddr = daddr;
            arrived.drop.tuple.proto = proto;
            return Verdict::Drop(DropReason::Malformed);
        }
    };
    arrived.drop.tuple.saddr = ip.saddr;
    arrived.drop.tuple.daddr = ip.daddr;
    arrived.drop.tuple.proto = ip.protocol;
    if ip.protocol == IPPROTO_ICMP && !ip.is_later_fragment() {
        // For the record of a drop, whatever the ICMP message is (echo, error, other).
        (arrived.drop.icmp_type, arrived.drop.icmp_code) = salvage_icmp(ctx, ip.l4_offset);
    }
    // A header the early check could not read in the linear bytes: the list, once parsed.
    if deny_at_tc && !deny_checked && early::denied_source_tc(ip.saddr) {
        salvage_ports(ctx, &ip, arrived);
        return Verdict::Drop(DropReason::PolicyDeny);
    }
    arrived.ip_id = ip.id;
    arrived.first_fragment = ip.is_first_fragment();
    let mut l4 = match parse_l4(ctx, &ip) {
        Transport::Tracked(l4) => l4,
        Transport::IcmpError(quoted) => return icmp_error(ctx, hook, &mut ip, &quoted),
        Transport::Untracked => return untracked(hook, &ip),
        Transport::LaterFragment => return later_fragment(ctx, &site, &mut ip, arrived),
        Transport::Malformed => return Verdict::Drop(DropReason::Malformed),
        Transport::Invalid => {
            salvage_ports(ctx, &ip, arrived);
            return Verdict::Drop(DropReason::InvalidL4Header);
        }
    };
    let key = conntrack::key_of(&ip, &l4);
    arrived.drop.tuple = key;
    arrived.drop.tcp_flags = l4.tcp_flags;
    if let Some(entry) = conntrack::lookup_packet(&key, l4.tcp_flags) {
        let (origin, rewrite, addr, port, hairpin_port) = translation_of(entry);
        if !owns(hook, origin, rewrite) {
            return Verdict::Pass;
        }
        if !conntrack::still_allowed(&key, entry) {
            return Verdict::Drop(DropReason::PolicyDenied);
        }
        conntrack::account(&key, entry, &packet_seen(site, ip.len, Some(&l4)));
        if rewrites(rewrite)
            && nat::rewrite_entry(ctx, &mut ip, &mut l4, rewrite, addr, port, hairpin_port).is_err()
        {
            return Verdict::Drop(DropReason::Malformed);
        }
        return onward(ctx, hook, &ip, rewrite);
    }
    match hook {
        Hook::ContainerIngress => {
            if let Some(service) = lb::service_of(&ip, &l4) {
                return balance(ctx, site, &mut ip, &mut l4, &key, &service);
            }
            if let Some(verdict) = publish(ctx, site, &mut ip, &mut l4, &key) {
                return verdict;
            }
            track_plain(ctx, site, &ip, &l4, &key, Via::Direct)
        }
        Hook::UplinkIngress => match publish(ctx, site, &mut ip, &mut l4, &key) {
            Some(Verdict::Pass) => deliver(ctx, &ip),
            Some(verdict) => verdict,
            // Routed from outside straight to a container's address: judged per packet
            // (Docker drops it unless a user rule lets it in).
            // Tracked when let in (a user rule, `nat-unprotected`, ICMP in `routed` mode), so
            // that the container's replies are known as replies and never masqueraded.
            None if ENDPOINTS.get_ptr(&ip.daddr).is_some() => {
                track_plain(ctx, site, &ip, &l4, &key, Via::Routed)
            }
            None => Verdict::Pass,
        },
        Hook::UplinkEgress => masquerade(ctx, site, &mut ip, &mut l4, &key),
    }
}

/// A new connection to a container (from another one, `via` Direct, or routed from outside):
/// tracked without translation, for its flow record and (with policy) so that its replies
/// are known as replies. Connections to the host are not tracked: their replies never cross
/// a hook of ours.
#[inline(always)]
fn track_plain(
    ctx: &TcContext,
    site: Site,
    ip: &Ipv4Packet,
    l4: &L4,
    forward: &CtKey,
    via: Via,
) -> Verdict {
    if ENDPOINTS.get_ptr(&ip.daddr).is_none() {
        // To the host: judged per packet (nothing tracks it). Out of the host: judged once,
        // where masquerade tracks it.
        if LOCAL_ADDRS.get_ptr(&ip.daddr).is_some() {
            // A container's reply to its gateway at a port NAT64 allocated: on to the NAT64
            // program (which returns the verdict). A reply, so not judged as new.
            if site.hook == Hook::ContainerIngress && crate::nat64::is_reply(forward) {
                // SAFETY: a tail call with the program's own context; on failure it returns.
                unsafe { PROGS6.tail_call(ctx, dataplane_common::PROGS6_NAT64_SLOT) };
            }
            if let Err(reason) =
                policy::check(ip.saddr, ip.daddr, ip.protocol, l4.dport, Via::Direct)
            {
                return Verdict::Drop(reason);
            }
        }
        return Verdict::Pass;
    }
    if let Err(reason) = policy::check(ip.saddr, ip.daddr, ip.protocol, l4.dport, via) {
        return Verdict::Drop(reason);
    }
    // A container's connection its socket hook already pointed at this backend: tracked as
    // the service's, still untranslated (the same verdict: the hook judged it against the
    // same backend, Via::Direct, as `balance` does).
    let service = if site.hook == Hook::ContainerIngress {
        socket_service(forward)
    } else {
        0
    };
    track_untranslated(site, ip, forward, l4, service);
    // Untranslated traffic does not depend on its entry: a full table costs the flow record,
    // not the connection.
    deliver(ctx, ip)
}

/// Tracks a connection that is let through as it is (no translation): its entry makes its
/// replies known as replies (not masqueraded, not judged as new) and gives its flow record.
/// A full table costs the record, not the connection.
#[inline(always)]
fn track_untranslated(site: Site, ip: &Ipv4Packet, forward: &CtKey, l4: &L4, service: u64) {
    let (origin, rewrite) = if service == 0 {
        (ct_origin::PLAIN, ct_rewrite::NONE)
    } else {
        (ct_origin::SERVICE, ct_rewrite::SOCKET)
    };
    let connection = NewConnection {
        forward: *forward,
        reply: conntrack::reply_key(ip.protocol, ip.saddr, l4.sport, ip.daddr, l4.dport),
        origin,
        rewrite,
        // For the flow records only (see `ct_rewrite::SOCKET`).
        nat_addr: (service >> 16) as u32,
        nat_port: service as u16,
        orig_addr: 0,
        orig_port: 0,
        hairpin_port: 0,
        reply_hairpin_port: 0,
        len: ip.len,
        tcp_flags: l4.tcp_flags,
        icmp_type: l4.icmp_type,
        icmp_code: l4.icmp_code,
    };
    if conntrack::create(&connection).is_ok() {
        report_new(&connection, site);
    }
}

/// How long after a socket hook's translation its `SOCK_LB` entry is believed: the first
/// packet follows connect()/sendmsg() within microseconds; a connected UDP socket that waits
/// longer before its first datagram is reported as a plain connection to the backend.
const SOCK_LB_FRESH_NS: u64 = 10_000_000_000;

/// The service address (VIP << 16 | port, network byte order; 0: none) a container's socket
/// asked for when its cgroup hook pointed it at `forward`'s destination just now. Out of
/// line: the container hook's stack is spent.
#[inline(never)]
fn socket_service(forward: &CtKey) -> u64 {
    let key = dataplane_common::SockLbKey {
        saddr: forward.saddr,
        daddr: forward.daddr,
        dport: forward.dport,
        proto: forward.proto,
        _pad: 0,
    };
    let Some(entry) = SOCK_LB.get_ptr(&key) else {
        return 0;
    };
    // SAFETY: a map value from this program run's lookup, read in place; a helper without
    // arguments.
    unsafe {
        let now = aya_ebpf::helpers::bpf_ktime_get_ns();
        if now.wrapping_sub((*entry).time_ns) > SOCK_LB_FRESH_NS {
            return 0;
        }
        (u64::from((*entry).vip) << 16) | u64::from((*entry).vip_port)
    }
}

/// The NEW flow event of a connection just tracked, except TCP's: a TCP connection is
/// reported when its handshake completes (`conntrack::account`), so SYNs that are never
/// acknowledged make no records.
#[inline(always)]
fn report_new(c: &NewConnection, site: Site) {
    if c.forward.proto == IPPROTO_TCP {
        return;
    }
    flow::new_connection(&flow::NewFlow {
        forward: c.forward,
        origin: c.origin,
        rewrite: c.rewrite,
        nat_addr: c.nat_addr,
        nat_port: c.nat_port,
        hairpin_port: c.hairpin_port,
        packets: 1,
        bytes: u64::from(c.len),
        tcp_flags: c.tcp_flags,
        icmp_type: c.icmp_type,
        icmp_code: c.icmp_code,
        hook: site.hook.number(),
        ifindex: site.ifindex,
    });
}

/// Whether packets of an entry with this rewrite are rewritten at all (a connection
/// translated at its socket is not: it already goes to its backend).
#[inline(always)]
fn rewrites(rewrite: u8) -> bool {
    rewrite != ct_rewrite::NONE && rewrite != ct_rewrite::SOCKET
}

/// Whether `hook` translates packets of entries with this origin and rewrite.
#[inline(always)]
fn owns(hook: Hook, origin: u8, rewrite: u8) -> bool {
    match hook {
        Hook::ContainerIngress => {
            origin == ct_origin::PUBLISHED
                || origin == ct_origin::SERVICE
                || origin == ct_origin::PLAIN
        }
        Hook::UplinkIngress => rewrite == ct_rewrite::DST,
        Hook::UplinkEgress => origin == ct_origin::MASQUERADE && rewrite == ct_rewrite::SRC,
    }
}

/// An ICMP error (unreachable, time exceeded, ...) about a translated connection: found by
/// the quoted packet's reversed tuple, which is the key a packet of the connection travelling
/// the error's way carries, and translated like one.
#[inline(always)]
fn icmp_error(ctx: &TcContext, hook: Hook, ip: &mut Ipv4Packet, quoted: &Quoted) -> Verdict {
    let key = CtKey {
        saddr: quoted.daddr,
        daddr: quoted.saddr,
        sport: quoted.dport,
        dport: quoted.sport,
        proto: quoted.protocol,
        _pad: [0; 3],
    };
    let Some(entry) = conntrack::lookup(&key) else {
        if hook == Hook::ContainerIngress && crate::nat64::is_reply(&key) {
            // An IPv4-only container's error about a NAT64 connection's request (its port
            // unreachable, ...): translated for the IPv6 client by the NAT64 program, which
            // returns the verdict. Its key is in the IPv6 tables, IPv4-mapped.
            // SAFETY: a tail call with the program's own context; on failure it returns.
            unsafe { PROGS6.tail_call(ctx, dataplane_common::PROGS6_NAT64_SLOT) };
        }
        // About no connection we know: a packet like any other untracked one.
        return untracked(hook, ip);
    };
    let (origin, rewrite, addr, port, hairpin_port) = translation_of(entry);
    if !owns(hook, origin, rewrite) {
        return Verdict::Pass;
    }
    if !rewrites(rewrite) {
        return onward(ctx, hook, ip, rewrite);
    }
    let translated = if rewrite == ct_rewrite::HAIRPIN {
        // Both sides, as for the connection's own packets: the destination back to the
        // connection's other end (the key's source, the container), the source to the
        // address it connected to.
        nat::rewrite_icmp_error(ctx, ip, quoted, ct_rewrite::DST, key.saddr, hairpin_port)
            .and_then(|()| nat::rewrite_icmp_error(ctx, ip, quoted, ct_rewrite::SRC, addr, port))
    } else {
        nat::rewrite_icmp_error(ctx, ip, quoted, rewrite, addr, port)
    };
    if translated.is_err() {
        return Verdict::Drop(DropReason::Malformed);
    }
    onward(ctx, hook, ip, rewrite)
}

/// A packet conntrack does not follow (another IP protocol, an ICMP message that is neither
/// echo nor an error about a known connection): judged on its own, per packet, by the policy a
/// new connection would meet, since Docker's isolation and FORWARD chain hold for every
/// protocol. From a container: networks apart, icc, internal networks. From outside: only what
/// is routed to a container's address (`nat` closes it, `nat-unprotected` opens it, `routed`
/// opens it to ICMP); what is for the host itself is the host firewall's business, as with
/// Docker. Not tracked, so nothing an attacker sends of these fills a table.
#[inline(always)]
fn untracked(hook: Hook, ip: &Ipv4Packet) -> Verdict {
    let via = match hook {
        Hook::ContainerIngress => Via::Direct,
        Hook::UplinkIngress if ENDPOINTS.get_ptr(&ip.daddr).is_some() => Via::Routed,
        Hook::UplinkIngress | Hook::UplinkEgress => return Verdict::Pass,
    };
    match policy::check(ip.saddr, ip.daddr, ip.protocol, 0, via) {
        Ok(()) => Verdict::Pass,
        Err(reason) => Verdict::Drop(reason),
    }
}

/// What a tracked entry says to do: (origin, rewrite, address, port, hairpin port).
#[inline(always)]
fn translation_of(entry: *const dataplane_common::CtEntry) -> (u8, u8, u32, u16, u16) {
    // SAFETY: a map value from this program run's lookup.
    unsafe {
        (
            (*entry).origin,
            (*entry).rewrite,
            (*entry).nat_addr,
            (*entry).nat_port,
            (*entry).hairpin_port,
        )
    }
}

/// Where a packet of a tracked connection goes once rewritten (by `rewrite`) at `hook`.
#[inline(always)]
fn onward(ctx: &TcContext, hook: Hook, ip: &Ipv4Packet, rewrite: u8) -> Verdict {
    match hook {
        Hook::ContainerIngress if rewrite == ct_rewrite::SRC => reply_to_client(ctx, ip),
        Hook::ContainerIngress if rewrite == ct_rewrite::HAIRPIN => deliver_back(ctx, ip),
        // Towards a container: straight in, skipping the bridge and the host's routing.
        Hook::ContainerIngress | Hook::UplinkIngress => deliver(ctx, ip),
        Hook::UplinkEgress => Verdict::Pass,
    }
}

/// Where a reply goes once its source is the published address (or VIP) again. It must not
/// enter the host's IP stack: a packet arriving with one of the host's own addresses as source
/// is a martian and dropped (accept_local=0). Towards a container (hairpin, a VIP's client)
/// it goes straight into that container (bpf_redirect_peer; also across networks, where the
/// bridge alone would hand it to the stack); anything else goes straight out of the uplink,
/// the kernel resolving the next hop (bpf_redirect_neigh), as Cilium does.
#[inline(always)]
fn reply_to_client(ctx: &TcContext, ip: &Ipv4Packet) -> Verdict {
    if ENDPOINTS.get_ptr(&ip.daddr).is_some() {
        return deliver(ctx, ip);
    }
    match CONFIG.get_ptr(0) {
        // SAFETY: array element 0 always exists.
        Some(config) if unsafe { (*config).uplink_ifindex } != 0 => {
            // SAFETY: as just above.
            Verdict::RedirectNeigh(unsafe { (*config).uplink_ifindex })
        }
        _ => Verdict::Pass,
    }
}

/// A packet from the uplink, translated towards a container: straight into the container's
/// namespace (bpf_redirect_peer), with the container's MAC, skipping the host's routing and
/// bridge on the way in, as Cilium does. Anything else goes on through the host.
#[inline(always)]
fn deliver(ctx: &TcContext, ip: &Ipv4Packet) -> Verdict {
    let Some(endpoint) = ENDPOINTS.get_ptr(&ip.daddr) else {
        return Verdict::Pass;
    };
    // SAFETY: a map value from this program run's lookup, read in place.
    let (ifindex, mac) = unsafe { ((*endpoint).ifindex, &(*endpoint).mac) };
    if ifindex == 0 || ctx.store(0, mac, 0).is_err() {
        return Verdict::Pass;
    }
    Verdict::RedirectPeer(ifindex)
}

/// A hairpin packet, back into the container it came from (bpf_redirect_peer), as if the
/// gateway had routed it: from the gateway's MAC (the frame's destination, since the container
/// sent it to its gateway) to the container's.
#[inline(always)]
fn deliver_back(ctx: &TcContext, ip: &Ipv4Packet) -> Verdict {
    if let Ok(gateway_mac) = ctx.load::<[u8; 6]>(0) {
        let _ = ctx.store(6, &gateway_mac, 0);
    }
    deliver(ctx, ip)
}

/// The container a published port leads to, if the destination is one: an exact host
/// address binding first, then a binding on every host address when the destination is one of
/// the host's own (Docker's `--dst-type LOCAL`).
#[inline(always)]
fn published_target(ip: &Ipv4Packet, l4: &L4) -> Option<PortTarget> {
    let mut key = PortKey {
        addr: ip.daddr,
        port: l4.dport,
        proto: ip.protocol,
        _pad: 0,
    };
    if let Some(target) = PORTS.get_ptr(&key) {
        // SAFETY: a map value from this program run's lookup.
        return Some(unsafe { *target });
    }
    LOCAL_ADDRS.get_ptr(&ip.daddr)?;
    key.addr = 0;
    // SAFETY: as above.
    PORTS.get_ptr(&key).map(|target| unsafe { *target })
}

/// A new connection to a published port: track it and rewrite its destination (to the
/// container, or to a backend of the service the port leads to).
#[inline(always)]
fn publish(
    ctx: &TcContext,
    site: Site,
    ip: &mut Ipv4Packet,
    l4: &mut L4,
    forward: &CtKey,
) -> Option<Verdict> {
    if ip.protocol == IPPROTO_ICMP {
        return None;
    }
    // Ports opened on a container's own address (`routed` networks) are for traffic routed
    // from outside; between containers the address is reached as it is, under isolation.
    if site.hook == Hook::ContainerIngress && ENDPOINTS.get_ptr(&ip.daddr).is_some() {
        return None;
    }
    let target = published_target(ip, l4)?;
    if target.is_service == 0 {
        let (addr, port) = (target.addr, target.port);
        return Some(track_dnat(
            ctx,
            site,
            ip,
            l4,
            forward,
            ct_origin::PUBLISHED,
            addr,
            port,
        ));
    }
    let key = ServiceKey {
        vip: target.addr,
        port: target.port,
        proto: ip.protocol,
        _pad: 0,
    };
    let Some(service) = SERVICES.get_ptr(&key) else {
        return Some(Verdict::Drop(DropReason::ServiceBackendNotFound));
    };
    // SAFETY: a map value from this program run's lookup.
    let service = unsafe { *service };
    Some(match lb::pick(&service, forward) {
        Some(b) => track_dnat(
            ctx,
            site,
            ip,
            l4,
            forward,
            ct_origin::PUBLISHED,
            b.addr,
            b.port,
        ),
        None => refuse(ctx, site, ip, l4),
    })
}

/// A new connection to a service VIP from a container: pick a backend, track, rewrite.
#[inline(always)]
fn balance(
    ctx: &TcContext,
    site: Site,
    ip: &mut Ipv4Packet,
    l4: &mut L4,
    forward: &CtKey,
    service: &ServiceInfo,
) -> Verdict {
    match lb::pick(service, forward) {
        Some(b) => track_dnat(
            ctx,
            site,
            ip,
            l4,
            forward,
            ct_origin::SERVICE,
            b.addr,
            b.port,
        ),
        None => refuse(ctx, site, ip, l4),
    }
}

/// No backend: a TCP client gets a reset at once (sent back out of the interface it came
/// in on); anything else is dropped. Both count as SERVICE_BACKEND_NOT_FOUND.
#[inline(always)]
fn refuse(ctx: &TcContext, site: Site, ip: &Ipv4Packet, l4: &L4) -> Verdict {
    match reject::tcp_reset(ctx, ip, l4) {
        Ok(()) => Verdict::Refuse(DropReason::ServiceBackendNotFound, site.ifindex),
        Err(()) => Verdict::Drop(DropReason::ServiceBackendNotFound),
    }
}

/// Tracks a new connection whose destination becomes `addr`:`port` and whose replies get the
/// original destination back as their source, then rewrites the packet; unless policy denies
/// it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn track_dnat(
    ctx: &TcContext,
    site: Site,
    ip: &mut Ipv4Packet,
    l4: &mut L4,
    forward: &CtKey,
    origin: u8,
    addr: u32,
    port: u16,
) -> Verdict {
    // Policy judges the connection by where it really goes: the translated destination.
    let via = if origin == ct_origin::PUBLISHED {
        Via::Published
    } else {
        Via::Direct
    };
    if let Err(reason) = policy::check(ip.saddr, addr, ip.protocol, port, via) {
        return Verdict::Drop(reason);
    }
    let mut connection = NewConnection {
        forward: *forward,
        reply: conntrack::reply_key(ip.protocol, ip.saddr, l4.sport, addr, port),
        origin,
        rewrite: ct_rewrite::DST,
        nat_addr: addr,
        nat_port: port,
        orig_addr: ip.daddr,
        orig_port: l4.dport,
        hairpin_port: 0,
        reply_hairpin_port: 0,
        len: ip.len,
        tcp_flags: l4.tcp_flags,
        icmp_type: l4.icmp_type,
        icmp_code: l4.icmp_code,
    };
    if addr == ip.saddr && site.hook == Hook::ContainerIngress {
        return track_hairpin(ctx, site, ip, l4, &mut connection);
    }
    let created = match conntrack::create(&connection) {
        Err(CtError::Exists) => {
            // The same client address:port reached the same backend address:port before
            // (through another binding, or a connection whose forward entry is gone): the new
            // connection replaces the old one, as a reused TCP tuple does.
            if let Some(old) = conntrack::lookup(&connection.reply) {
                // SAFETY: a map value from this program run's lookup.
                let old_forward = unsafe { (*old).peer };
                conntrack::remove(&old_forward);
            }
            conntrack::remove(&connection.reply);
            conntrack::create(&connection)
        }
        other => other,
    };
    if created.is_err() {
        return Verdict::Drop(DropReason::CtMapInsertionFailed);
    }
    if nat::rewrite(ctx, ip, l4, ct_rewrite::DST, addr, port).is_err() {
        return Verdict::Drop(DropReason::Malformed);
    }
    // Reported once the packet really goes on: a failed rewrite is a drop, not a connection.
    report_new(&connection, site);
    onward(ctx, site.hook, ip, ct_rewrite::DST)
}

/// A container's new connection that its destination translation (`c`: to a published port
/// or a VIP) sends back to the container itself. Untranslated, the container would receive a
/// packet from its own address and drop it as a martian; so the source becomes the gateway of
/// its network with a source port allocated as masquerade's are (Docker's MASQUERADE for
/// `-s C -d C`), and both translations are tracked, so the replies get the published address
/// (or VIP) back as source and the client's own port as destination. Both directions go
/// straight back into the container.
#[inline(always)]
fn track_hairpin(
    ctx: &TcContext,
    site: Site,
    ip: &mut Ipv4Packet,
    l4: &mut L4,
    c: &mut NewConnection,
) -> Verdict {
    // SAFETY: a map value from this program run's lookup, read in place.
    let gateway = ENDPOINTS
        .get_ptr(&ip.saddr)
        .map_or(0, |e| unsafe { (*e).gateway });
    // SAFETY: array element 0 always exists; fields read one by one.
    let (port_min, port_max) = CONFIG.get_ptr(0).map_or((1, 0), |config| unsafe {
        ((*config).snat_port_min, (*config).snat_port_max)
    });
    if gateway == 0 {
        // An agent that has not written gateways yet: nothing to translate the source to.
        return Verdict::Drop(DropReason::NoMappingForNatMasquerade);
    }
    let (container_port, client_port) = (c.nat_port, l4.sport);
    c.rewrite = ct_rewrite::HAIRPIN;
    c.nat_addr = gateway;
    c.hairpin_port = container_port;
    c.reply_hairpin_port = client_port;
    let own = ip.saddr;
    if let Err(reason) = nat::allocate_source_port(c, own, container_port, port_min, port_max, None)
    {
        return Verdict::Drop(reason);
    }
    if nat::rewrite_entry(
        ctx,
        ip,
        l4,
        ct_rewrite::HAIRPIN,
        gateway,
        c.nat_port,
        container_port,
    )
    .is_err()
    {
        return Verdict::Drop(DropReason::Malformed);
    }
    report_new(c, site);
    deliver_back(ctx, ip)
}

/// A container's new connection leaving through the uplink: keep its source port on the
/// host's address when that tuple is free, else pick a free one (probing from a hash of the
/// connection, so collisions between containers using the same source port resolve to
/// different ports), track it, rewrite the source (`nat::allocate_source_port`).
#[inline(always)]
fn masquerade(
    ctx: &TcContext,
    site: Site,
    ip: &mut Ipv4Packet,
    l4: &mut L4,
    forward: &CtKey,
) -> Verdict {
    let Some(config) = CONFIG.get_ptr(0) else {
        return Verdict::Pass;
    };
    // SAFETY: array element 0 always exists; fields read one by one (no copy of the whole
    // settings on the stack).
    let (masquerade_addr, snat_port_min, snat_port_max) = unsafe {
        (
            (*config).masquerade_addr,
            (*config).snat_port_min,
            (*config).snat_port_max,
        )
    };
    let Some(source) = ENDPOINTS.get_ptr(&ip.saddr) else {
        // Not a container: the host's own traffic keeps its address, untracked, unless it
        // opens a connection on a tuple one of ours holds as a masqueraded connection's reply
        // (a port a container kept, which the host's connect() could not know about): then it
        // is translated itself, to a probed port, so that neither loses its replies (Cilium's
        // SNAT does the same with the host's connections). Only a reply entry counts: the
        // answers of a published port leave here with the host's address too, and the
        // reversed tuple they find is their own connection's forward entry.
        if masquerade_addr == 0
            || ip.saddr != masquerade_addr
            || !conntrack::lookup(&conntrack::reply_key(
                ip.protocol,
                ip.saddr,
                l4.sport,
                ip.daddr,
                l4.dport,
            ))
            // SAFETY: a map value from this program run's lookup.
            .is_some_and(|held| unsafe { (*held).is_reply } == 1)
        {
            return Verdict::Pass;
        }
        return translate_source(ctx, site, ip, l4, forward, snat_port_min, snat_port_max);
    };
    // SAFETY: a map value from this program run's lookup.
    if unsafe { (*source).net_flags } & net_flags::ROUTED != 0 {
        // `routed` networks keep their addresses on the way out; tracked, so that the
        // replies routed back to the container are known as replies.
        if let Err(reason) = policy::check(ip.saddr, ip.daddr, ip.protocol, l4.dport, Via::Direct) {
            return Verdict::Drop(reason);
        }
        track_untranslated(site, ip, forward, l4, 0);
        return Verdict::Pass;
    }
    if masquerade_addr == 0 {
        return Verdict::Pass;
    }
    if let Err(reason) = policy::check(ip.saddr, ip.daddr, ip.protocol, l4.dport, Via::Direct) {
        return Verdict::Drop(reason);
    }
    translate_source(ctx, site, ip, l4, forward, snat_port_min, snat_port_max)
}

/// Tracks the new connection `forward` with its source translated to the masquerade address
/// (in `CONFIG`, checked non-zero by the caller) and a port `nat::allocate_source_port` finds,
/// and rewrites the packet so.
#[inline(always)]
fn translate_source(
    ctx: &TcContext,
    site: Site,
    ip: &mut Ipv4Packet,
    l4: &mut L4,
    forward: &CtKey,
    snat_port_min: u16,
    snat_port_max: u16,
) -> Verdict {
    // SAFETY: array element 0 always exists (the caller read it).
    let Some(masquerade_addr) = CONFIG.get_ptr(0).map(|c| unsafe { (*c).masquerade_addr }) else {
        return Verdict::Pass;
    };
    let mut connection = NewConnection {
        forward: *forward,
        reply: *forward,
        origin: ct_origin::MASQUERADE,
        rewrite: ct_rewrite::SRC,
        nat_addr: masquerade_addr,
        nat_port: 0,
        orig_addr: ip.saddr,
        orig_port: l4.sport,
        hairpin_port: 0,
        reply_hairpin_port: 0,
        len: ip.len,
        tcp_flags: l4.tcp_flags,
        icmp_type: l4.icmp_type,
        icmp_code: l4.icmp_code,
    };
    if let Err(reason) = nat::allocate_source_port(
        &mut connection,
        ip.daddr,
        l4.dport,
        snat_port_min,
        snat_port_max,
        Some(ctx),
    ) {
        return Verdict::Drop(reason);
    }
    let port = connection.nat_port;
    if nat::rewrite(ctx, ip, l4, ct_rewrite::SRC, masquerade_addr, port).is_err() {
        return Verdict::Drop(DropReason::Malformed);
    }
    report_new(&connection, site);
    Verdict::Pass
}
