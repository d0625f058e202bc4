//! The IPv6 programs' translations (tail-called by the IPv4 programs for each IPv6 frame, so
//! they have a stack of their own). Today: published ports reached from outside over IPv6,
//! to a container's IPv6 address with the client's address kept, and masquerade (NAT66) of
//! containers' connections out (TCP, UDP, ICMPv6 echo); tracked in the IPv6 conntrack tables
//! with the IPv4 path's conntrack and port allocation code (`family.rs`).
//!
//! | hook | tracked packet (hit) | new connection (miss) |
//! |---|---|---|
//! | container veth ingress | published-port replies (source back to host:port), VIP connections both ways | a container to a VIP (`balance6.rs`) |
//! | uplink ingress | published-port requests, masquerade replies | published port from outside (to a container, or a service's backend) |
//! | uplink egress | masquerade requests | NAT66 of a container's connection |
//!
//! Fragments of a translated datagram are translated as their first fragment was (the
//! fragment map, as IPv4's). Service VIPs (a container's connection to a `vip6`, a published
//! port leading to a service) are balanced in `balance6.rs`. Not yet (README, "IPv6 today"):
//! NAT64, a container's VIP connection to itself (hairpin), ICMPv6 errors about translated
//! connections, user policies; a packet none of this concerns passes untouched.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use dataplane_common::{
    CtKey6, DropReason, FragEntry, FragKey6, In6Addr, PortKey6, PortTarget6, ct_origin, ct_rewrite,
    net_flags,
};

use crate::{
    conntrack::{self, CtError},
    flow,
    maps::{CONFIG, ENDPOINTS6, FRAGMENTS6, LOCAL_ADDRS6, NEW_CONNECTION6, PORTS6},
    nat,
    parse::{IP6_DADDR_OFF, IP6_SADDR_OFF, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Ipv6Packet},
    translate::{Hook, Verdict},
};

/// bpf_l4_csum_replace: the change is to an IPv6 pseudo-header address, which (unlike
/// IPv4's, balanced by the IP header checksum) is in the bytes a CHECKSUM_COMPLETE skb's sum
/// covers (Linux 6.16).
const BPF_F_IPV6: u64 = 1 << 7;

/// The TCP or UDP header of an IPv6 packet (the first fragment's, for a split datagram).
#[derive(Clone, Copy)]
pub struct L4v6 {
    /// For ICMPv6 echo, `sport` is the identifier and `dport` 0 (as IPv4's).
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub icmp_type: u8,
    pub seq: u32,
    pub ack_seq: u32,
    pub csum_offset: usize,
    /// Where the source and destination ports are (both the identifier's, for echo).
    pub sport_offset: usize,
    pub dport_offset: usize,
}

/// ICMPv6 echo request and reply: tracked as IPv4's echo is (the identifier as the port).
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

/// TCP, UDP or ICMPv6 echo, read; None for anything else, and for headers cut short (they
/// pass as before: the receiving stack judges them).
#[inline(always)]
pub(crate) fn parse_l4(ctx: &TcContext, ip: &Ipv6Packet) -> Option<L4v6> {
    if ip.is_later_fragment() {
        return None;
    }
    let off = ip.l4_offset;
    if ip.protocol == IPPROTO_ICMPV6 {
        let icmp_type = ctx.load::<u8>(off).ok()?;
        if icmp_type != ICMPV6_ECHO_REQUEST && icmp_type != ICMPV6_ECHO_REPLY {
            return None;
        }
        return Some(L4v6 {
            sport: ctx.load::<u16>(off + 4).ok()?,
            dport: 0,
            tcp_flags: 0,
            icmp_type,
            seq: 0,
            ack_seq: 0,
            csum_offset: off + 2,
            sport_offset: off + 4,
            dport_offset: off + 4,
        });
    }
    if ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP {
        return None;
    }
    let sport = ctx.load::<u16>(off).ok()?;
    let dport = ctx.load::<u16>(off + 2).ok()?;
    if ip.protocol == IPPROTO_UDP {
        return Some(L4v6 {
            sport,
            dport,
            tcp_flags: 0,
            icmp_type: 0,
            seq: 0,
            ack_seq: 0,
            csum_offset: off + 6,
            sport_offset: off,
            dport_offset: off + 2,
        });
    }
    Some(L4v6 {
        sport,
        dport,
        tcp_flags: ctx.load::<u8>(off + 13).ok()?,
        icmp_type: 0,
        seq: u32::from_be(ctx.load::<u32>(off + 4).ok()?),
        ack_seq: u32::from_be(ctx.load::<u32>(off + 8).ok()?),
        csum_offset: off + 16,
        sport_offset: off,
        dport_offset: off + 2,
    })
}

/// The translations of `hook` for a parsed IPv6 packet that isolation let through.
#[inline(always)]
pub fn translate(ctx: &TcContext, hook: Hook, ip: &mut Ipv6Packet) -> Verdict {
    if ip.is_later_fragment() {
        return later_fragment(ctx, hook, ip);
    }
    let Some(mut l4) = parse_l4(ctx, ip) else {
        return Verdict::Pass;
    };
    let key = CtKey6 {
        saddr: In6Addr(ip.saddr),
        daddr: In6Addr(ip.daddr),
        sport: l4.sport,
        dport: l4.dport,
        proto: ip.protocol,
        _pad: [0; 3],
    };
    let (first_fragment, id) = (ip.is_first_fragment(), ip.id);
    let verdict = decide(ctx, hook, ip, &mut l4, &key);
    if first_fragment {
        remember_first_fragment(&key, id, &verdict);
    }
    verdict
}

/// Whether `hook` translates packets of entries with this origin and rewrite (as IPv4's
/// `owns`: each hook the entries whose direction it sees).
#[inline(always)]
fn owns(hook: Hook, origin: u8, rewrite: u8) -> bool {
    match hook {
        // Replies of published ports and of services (from the VIP; the services' packets
        // the other way are translated by `balance6.rs`).
        Hook::ContainerIngress => {
            (origin == ct_origin::PUBLISHED || origin == ct_origin::SERVICE)
                && rewrite == ct_rewrite::SRC
        }
        Hook::UplinkIngress => rewrite == ct_rewrite::DST,
        Hook::UplinkEgress => origin == ct_origin::MASQUERADE && rewrite == ct_rewrite::SRC,
    }
}

/// Where a packet of a tracked connection goes once translated at `hook`.
#[inline(always)]
fn onward(ctx: &TcContext, hook: Hook, ip: &Ipv6Packet) -> Verdict {
    match hook {
        Hook::ContainerIngress => reply_to_client(ctx, ip),
        Hook::UplinkIngress => deliver(ctx, ip),
        Hook::UplinkEgress => Verdict::Pass,
    }
}

/// Records what the first fragment of a datagram was (its ports as it arrived, `key`) and
/// whether it was dropped, for the later fragments of the same datagram (the same addresses,
/// protocol and fragment identification), as IPv4's fragment map does.
#[inline(always)]
pub(crate) fn remember_first_fragment(key: &CtKey6, id: u32, verdict: &Verdict) {
    let dropped = match verdict {
        Verdict::Drop(reason) | Verdict::Refuse(reason, _) => *reason as u8,
        _ => 0,
    };
    let fragment = FragKey6 {
        saddr: key.saddr,
        daddr: key.daddr,
        id,
        proto: key.proto,
        _pad: [0; 3],
    };
    let entry = FragEntry {
        sport: key.sport,
        dport: key.dport,
        drop_reason: dropped,
        _pad: [0; 3],
    };
    // A full LRU drops the oldest datagram's entry; nothing to do on failure.
    let _ = FRAGMENTS6.insert(&fragment, &entry, 0);
}

/// A fragment after the first: it gets what its datagram's first fragment got here (found
/// through the fragment map): dropped with it, or translated by the same connection's entry
/// (addresses only: ports and the checksum are in the first fragment; IPv6 has no header
/// checksum), and delivered the same way. A TCP or UDP fragment without its first is dropped
/// and counted, never passed untranslated; other protocols' pass, as before.
#[inline(always)]
fn later_fragment(ctx: &TcContext, hook: Hook, ip: &mut Ipv6Packet) -> Verdict {
    let fragment = FragKey6 {
        saddr: In6Addr(ip.saddr),
        daddr: In6Addr(ip.daddr),
        id: ip.id,
        proto: ip.protocol,
        _pad: [0; 3],
    };
    let Some(first) = FRAGMENTS6.get_ptr(&fragment) else {
        return if ip.protocol == IPPROTO_TCP || ip.protocol == IPPROTO_UDP {
            Verdict::Drop(DropReason::FragmentNotFound)
        } else {
            Verdict::Pass
        };
    };
    // SAFETY: a map value from this program run's lookup.
    let first = unsafe { *first };
    if first.drop_reason != 0 {
        return Verdict::Drop(crate::translate::recorded_drop(first.drop_reason));
    }
    let key = CtKey6 {
        saddr: fragment.saddr,
        daddr: fragment.daddr,
        sport: first.sport,
        dport: first.dport,
        proto: ip.protocol,
        _pad: [0; 3],
    };
    let Some(entry) = conntrack::lookup(&key) else {
        // The first fragment went on untracked (to the host, routed, not ours).
        return Verdict::Pass;
    };
    // SAFETY: a map value from this program run's lookup.
    let (origin, rewrite, addr) = unsafe { ((*entry).origin, (*entry).rewrite, (*entry).nat_addr) };
    if hook == Hook::ContainerIngress && origin == ct_origin::SERVICE && rewrite == ct_rewrite::DST
    {
        // As the connection's other packets to its backend (`decide`).
        return crate::balance6::to_balancer(ctx, hook);
    }
    if !owns(hook, origin, rewrite) {
        return Verdict::Pass;
    }
    let (offset, old) = if rewrite == ct_rewrite::DST {
        (IP6_DADDR_OFF, &mut ip.daddr)
    } else {
        (IP6_SADDR_OFF, &mut ip.saddr)
    };
    if ctx.store(offset, &addr.0, 0).is_err() {
        return Verdict::Drop(DropReason::Malformed);
    }
    *old = addr.0;
    onward(ctx, hook, ip)
}

/// The translations of a TCP, UDP or ICMPv6 echo packet whose conntrack key is `key`.
#[inline(always)]
fn decide(
    ctx: &TcContext,
    hook: Hook,
    ip: &mut Ipv6Packet,
    l4: &mut L4v6,
    key: &CtKey6,
) -> Verdict {
    let key = *key;
    // SAFETY (for the reads below): map values from lookups in this program run.
    if let Some(entry) = conntrack::lookup_packet(&key, l4.tcp_flags) {
        let (origin, rewrite, addr, port) = unsafe {
            (
                (*entry).origin,
                (*entry).rewrite,
                (*entry).nat_addr,
                (*entry).nat_port,
            )
        };
        if hook == Hook::ContainerIngress
            && origin == ct_origin::SERVICE
            && rewrite == ct_rewrite::DST
        {
            // A service connection's packet to its backend: the balancing program's (stack).
            return crate::balance6::to_balancer(ctx, hook);
        }
        if !owns(hook, origin, rewrite) {
            return Verdict::Pass;
        }
        let seen = conntrack::Seen {
            len: ip.len,
            tcp_flags: l4.tcp_flags,
            seq: l4.seq,
            ack_seq: l4.ack_seq,
            icmp_type: l4.icmp_type,
            icmp_code: 0,
            hook: hook.number(),
            // SAFETY: `skb` points at the context the kernel passed to this program.
            ifindex: unsafe { (*ctx.skb.skb).ifindex },
        };
        conntrack::account(&key, entry, &seen);
        if rewrite_packet(ctx, ip, l4, rewrite, &addr, port).is_err() {
            return Verdict::Drop(DropReason::Malformed);
        }
        return onward(ctx, hook, ip);
    }
    match hook {
        Hook::UplinkEgress => return masquerade(ctx, ip, l4, &key),
        Hook::ContainerIngress => return crate::balance6::to_vip(ctx, ip, l4),
        Hook::UplinkIngress if ip.protocol == IPPROTO_ICMPV6 => return Verdict::Pass,
        Hook::UplinkIngress => {}
    }
    let Some(target) = published_target(ip, &l4) else {
        return Verdict::Pass;
    };
    if target.is_service != 0 {
        return crate::balance6::to_balancer(ctx, hook);
    }
    let (addr, port) = (target.addr, target.port);
    track_dnat(
        ctx,
        Hook::UplinkIngress,
        ip,
        l4,
        &key,
        ct_origin::PUBLISHED,
        &addr,
        port,
    )
}

/// The container a published port leads to: an exact host-address binding first, then one on
/// every host address when the destination is one of the host's own.
#[inline(always)]
pub(crate) fn published_target(ip: &Ipv6Packet, l4: &L4v6) -> Option<PortTarget6> {
    let mut key = PortKey6 {
        addr: In6Addr(ip.daddr),
        port: l4.dport,
        proto: ip.protocol,
        _pad: 0,
    };
    if let Some(target) = PORTS6.get_ptr(&key) {
        // SAFETY: a map value from this program run's lookup.
        return Some(unsafe { *target });
    }
    LOCAL_ADDRS6.get_ptr(&key.addr)?;
    key.addr = In6Addr::UNSPECIFIED;
    // SAFETY: as above.
    PORTS6.get_ptr(&key).map(|target| unsafe { *target })
}

/// A new connection whose destination becomes `addr`:`port` (from outside to a published
/// port: its container; to a service: its backend): tracked with `origin` (its replies get
/// the address and port it was sent to back as their source), its destination rewritten, and
/// delivered straight into the container.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn track_dnat(
    ctx: &TcContext,
    hook: Hook,
    ip: &mut Ipv6Packet,
    l4: &mut L4v6,
    forward: &CtKey6,
    origin: u8,
    addr: &In6Addr,
    port: u16,
) -> Verdict {
    let Some(connection) = NEW_CONNECTION6.get_ptr_mut(0) else {
        return Verdict::Pass;
    };
    // SAFETY: this CPU's element, used by this program run only; filled field by field
    // (a struct literal would be built on the stack first).
    let connection = unsafe { &mut *connection };
    connection.forward = *forward;
    connection.reply = conntrack::reply_key(ip.protocol, In6Addr(ip.saddr), l4.sport, *addr, port);
    connection.origin = origin;
    connection.rewrite = ct_rewrite::DST;
    connection.nat_addr = *addr;
    connection.nat_port = port;
    connection.orig_addr = In6Addr(ip.daddr);
    connection.orig_port = l4.dport;
    connection.hairpin_port = 0;
    connection.reply_hairpin_port = 0;
    connection.len = ip.len;
    connection.tcp_flags = l4.tcp_flags;
    connection.icmp_type = 0;
    connection.icmp_code = 0;
    let connection = &*connection;
    let created = match conntrack::create(connection) {
        Err(CtError::Exists) => {
            // The same client address:port reached the same container address:port before
            // (through another binding, or a connection whose forward entry is gone): the new
            // connection replaces the old one, as a reused TCP tuple does.
            if let Some(old) = conntrack::lookup(&connection.reply) {
                // SAFETY: a map value from this program run's lookup.
                let old_forward = unsafe { (*old).peer };
                conntrack::remove(&old_forward);
            }
            conntrack::remove(&connection.reply);
            conntrack::create(connection)
        }
        other => other,
    };
    if created.is_err() {
        return Verdict::Drop(DropReason::CtMapInsertionFailed);
    }
    if rewrite_packet(ctx, ip, l4, ct_rewrite::DST, addr, port).is_err() {
        return Verdict::Drop(DropReason::Malformed);
    }
    report_new(ctx, hook);
    deliver(ctx, ip)
}

/// A container's new connection leaving through the uplink over IPv6 (NAT66, Docker's
/// default for its IPv6 networks): its source becomes the uplink's IPv6 address
/// (`Config::masquerade_addr6`), with its own source port when that tuple is free and a
/// probed one otherwise, exactly as IPv4's masquerade (`nat::allocate_source_port`, the same
/// code); tracked, so that the replies get the container back. `routed` networks and the
/// host's own traffic keep their addresses.
#[inline(always)]
fn masquerade(ctx: &TcContext, ip: &mut Ipv6Packet, l4: &mut L4v6, forward: &CtKey6) -> Verdict {
    let Some(source) = ENDPOINTS6.get_ptr(&forward.saddr) else {
        return Verdict::Pass;
    };
    // SAFETY: a map value from this program run's lookup.
    if unsafe { (*source).net_flags } & net_flags::ROUTED != 0 {
        return Verdict::Pass;
    }
    let Some(config) = CONFIG.get_ptr(0) else {
        return Verdict::Pass;
    };
    // SAFETY: array element 0 always exists; fields read one by one.
    let (masquerade_addr, port_min, port_max) = unsafe {
        (
            (*config).masquerade_addr6,
            (*config).snat_port_min,
            (*config).snat_port_max,
        )
    };
    if masquerade_addr == In6Addr::UNSPECIFIED {
        return Verdict::Pass;
    }
    let Some(connection) = NEW_CONNECTION6.get_ptr_mut(0) else {
        return Verdict::Pass;
    };
    // SAFETY: this CPU's element, used by this program run only.
    let connection = unsafe { &mut *connection };
    connection.forward = *forward;
    connection.reply = *forward;
    connection.origin = ct_origin::MASQUERADE;
    connection.rewrite = ct_rewrite::SRC;
    connection.nat_addr = masquerade_addr;
    connection.nat_port = 0;
    connection.orig_addr = forward.saddr;
    connection.orig_port = l4.sport;
    connection.hairpin_port = 0;
    connection.reply_hairpin_port = 0;
    connection.len = ip.len;
    connection.tcp_flags = l4.tcp_flags;
    connection.icmp_type = l4.icmp_type;
    connection.icmp_code = 0;
    if let Err(reason) = nat::allocate_source_port(
        connection,
        forward.daddr,
        forward.dport,
        port_min,
        port_max,
        Some(ctx),
    ) {
        return Verdict::Drop(reason);
    }
    let port = connection.nat_port;
    if rewrite_packet(ctx, ip, l4, ct_rewrite::SRC, &masquerade_addr, port).is_err() {
        return Verdict::Drop(DropReason::Malformed);
    }
    report_new(ctx, Hook::UplinkEgress);
    Verdict::Pass
}

/// The NEW flow event of the connection just tracked (in `NEW_CONNECTION6`), except TCP's,
/// which is reported when its handshake completes (`conntrack::account`), as for IPv4.
#[inline(always)]
fn report_new(ctx: &TcContext, hook: Hook) {
    let Some(c) = NEW_CONNECTION6.get_ptr(0) else {
        return;
    };
    // SAFETY: this CPU's element, filled by this program run.
    let c = unsafe { &*c };
    if c.forward.proto == IPPROTO_TCP {
        return;
    }
    flow::new_connection(&flow::NewFlowOf {
        forward: c.forward,
        origin: c.origin,
        rewrite: c.rewrite,
        nat_addr: c.nat_addr,
        nat_port: c.nat_port,
        hairpin_port: 0,
        packets: 1,
        bytes: u64::from(c.len),
        tcp_flags: 0,
        icmp_type: c.icmp_type,
        icmp_code: 0,
        hook: hook.number(),
        // SAFETY: `skb` points at the context the kernel passed to this program.
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
    });
}

/// Rewrites the destination (`ct_rewrite::DST`) or source address and port of the packet to
/// `addr`:`port`, keeping the TCP/UDP checksum valid (IPv6 has no header checksum; the
/// 128-bit address is in the pseudo-header, changed a 32-bit word at a time).
#[inline(always)]
pub(crate) fn rewrite_packet(
    ctx: &TcContext,
    ip: &mut Ipv6Packet,
    l4: &mut L4v6,
    which: u8,
    addr: &In6Addr,
    port: u16,
) -> Result<(), ()> {
    let dst = which == ct_rewrite::DST;
    // ICMPv6 echo has one identifier for both directions, kept in `sport`.
    let is_icmp = ip.protocol == IPPROTO_ICMPV6;
    let (addr_offset, old_addr, port_offset, old_port) = if dst {
        let old_port = if is_icmp { l4.sport } else { l4.dport };
        (IP6_DADDR_OFF, ip.daddr, l4.dport_offset, old_port)
    } else {
        (IP6_SADDR_OFF, ip.saddr, l4.sport_offset, l4.sport)
    };
    // UDP may carry no checksum (0); MARK_MANGLED_0 leaves it so and never produces a 0.
    // ICMPv6's checksum covers the pseudo-header too (unlike ICMP's).
    let l4_flags = if ip.protocol == IPPROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    for word in 0..4 {
        if old_addr[word] != addr.0[word] {
            ctx.l4_csum_replace(
                l4.csum_offset,
                u64::from(old_addr[word]),
                u64::from(addr.0[word]),
                l4_flags | u64::from(BPF_F_PSEUDO_HDR) | BPF_F_IPV6 | 4,
            )
            .map_err(|_| ())?;
        }
    }
    ctx.store(addr_offset, &addr.0, 0).map_err(|_| ())?;
    if old_port != port {
        ctx.l4_csum_replace(
            l4.csum_offset,
            u64::from(old_port),
            u64::from(port),
            l4_flags | 2,
        )
        .map_err(|_| ())?;
        ctx.store(port_offset, &port, 0).map_err(|_| ())?;
    }
    if dst {
        ip.daddr = addr.0;
        if is_icmp {
            l4.sport = port;
        } else {
            l4.dport = port;
        }
    } else {
        ip.saddr = addr.0;
        l4.sport = port;
    }
    Ok(())
}

/// Towards a container: straight into its namespace (bpf_redirect_peer) with its MAC, as the
/// IPv4 path does. Anything else goes on through the host.
#[inline(always)]
pub(crate) fn deliver(ctx: &TcContext, ip: &Ipv6Packet) -> Verdict {
    let Some(endpoint) = ENDPOINTS6.get_ptr(&In6Addr(ip.daddr)) else {
        return Verdict::Pass;
    };
    // SAFETY: a map value from this program run's lookup, read in place.
    let (ifindex, mac) = unsafe { ((*endpoint).ifindex, &(*endpoint).mac) };
    if ifindex == 0 || ctx.store(0, mac, 0).is_err() {
        return Verdict::Pass;
    }
    Verdict::RedirectPeer(ifindex)
}

/// A published port's reply, its source the host's address again: it must not enter the
/// host's stack (a packet from one of the host's own addresses), so it goes straight out of
/// the uplink, the kernel resolving the next hop (bpf_redirect_neigh), or into a container.
#[inline(always)]
fn reply_to_client(ctx: &TcContext, ip: &Ipv6Packet) -> Verdict {
    if ENDPOINTS6.get_ptr(&In6Addr(ip.daddr)).is_some() {
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
