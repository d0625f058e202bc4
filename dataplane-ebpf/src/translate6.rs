//! The IPv6 programs' translations (tail-called by the IPv4 programs for each IPv6 frame, so
//! they have a stack of their own). Today: published ports reached from outside over IPv6,
//! to a container's IPv6 address with the client's address kept, and their replies; tracked
//! in the IPv6 conntrack tables with the IPv4 path's conntrack code (`family.rs`).
//!
//! | hook | tracked packet (hit) | new connection (miss) |
//! |---|---|---|
//! | container veth ingress | published-port replies (source back to host:port) | - |
//! | uplink ingress | published-port requests | published port from outside |
//!
//! Not yet (README, "IPv6 today"): NAT66, NAT64, VIPs at tc, ICMPv6 errors and fragments of
//! translated connections, user policies; a packet none of this concerns passes untouched.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use dataplane_common::{CtKey6, In6Addr, PortKey6, PortTarget6, ct_origin, ct_rewrite};

use crate::{
    conntrack::{self, CtError},
    flow,
    maps::{CONFIG, ENDPOINTS6, LOCAL_ADDRS6, NEW_CONNECTION6, PORTS6},
    parse::{IP6_DADDR_OFF, IP6_SADDR_OFF, IPPROTO_TCP, IPPROTO_UDP, Ipv6Packet},
    translate::{Hook, Verdict},
};

/// bpf_l4_csum_replace: the change is to an IPv6 pseudo-header address, which (unlike
/// IPv4's, balanced by the IP header checksum) is in the bytes a CHECKSUM_COMPLETE skb's sum
/// covers (Linux 6.16).
const BPF_F_IPV6: u64 = 1 << 7;

/// The TCP or UDP header of an IPv6 packet (the first fragment's, for a split datagram).
#[derive(Clone, Copy)]
pub struct L4v6 {
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack_seq: u32,
    pub csum_offset: usize,
}

/// TCP or UDP, read; None for anything else, and for headers cut short (they pass as before:
/// the receiving stack judges them).
#[inline(always)]
fn parse_l4(ctx: &TcContext, ip: &Ipv6Packet) -> Option<L4v6> {
    if ip.is_later_fragment() || (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP) {
        return None;
    }
    let off = ip.l4_offset;
    let sport = ctx.load::<u16>(off).ok()?;
    let dport = ctx.load::<u16>(off + 2).ok()?;
    if ip.protocol == IPPROTO_UDP {
        return Some(L4v6 {
            sport,
            dport,
            tcp_flags: 0,
            seq: 0,
            ack_seq: 0,
            csum_offset: off + 6,
        });
    }
    Some(L4v6 {
        sport,
        dport,
        tcp_flags: ctx.load::<u8>(off + 13).ok()?,
        seq: u32::from_be(ctx.load::<u32>(off + 4).ok()?),
        ack_seq: u32::from_be(ctx.load::<u32>(off + 8).ok()?),
        csum_offset: off + 16,
    })
}

/// The translations of `hook` for a parsed IPv6 packet that isolation let through.
#[inline(always)]
pub fn translate(ctx: &TcContext, hook: Hook, ip: &mut Ipv6Packet) -> Verdict {
    if hook == Hook::UplinkEgress {
        return Verdict::Pass;
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
        let ours = match hook {
            Hook::ContainerIngress => origin == ct_origin::PUBLISHED && rewrite == ct_rewrite::SRC,
            _ => origin == ct_origin::PUBLISHED && rewrite == ct_rewrite::DST,
        };
        if !ours {
            return Verdict::Pass;
        }
        let seen = conntrack::Seen {
            len: ip.len,
            tcp_flags: l4.tcp_flags,
            seq: l4.seq,
            ack_seq: l4.ack_seq,
            icmp_type: 0,
            icmp_code: 0,
            hook: hook.number(),
            // SAFETY: `skb` points at the context the kernel passed to this program.
            ifindex: unsafe { (*ctx.skb.skb).ifindex },
        };
        conntrack::account(&key, entry, &seen);
        if rewrite_packet(ctx, ip, &mut l4, rewrite, &addr, port).is_err() {
            return Verdict::Drop(dataplane_common::DropReason::Malformed);
        }
        return if hook == Hook::ContainerIngress {
            reply_to_client(ctx, ip)
        } else {
            deliver(ctx, ip)
        };
    }
    if hook != Hook::UplinkIngress {
        return Verdict::Pass;
    }
    let Some(target) = published_target(ip, &l4) else {
        return Verdict::Pass;
    };
    if target.is_service != 0 {
        // A port that leads to a service: its IPv6 VIPs are balanced at the socket hooks only
        // (not at tc yet); left to the host as before.
        return Verdict::Pass;
    }
    publish(ctx, ip, &mut l4, &key, &target)
}

/// The container a published port leads to: an exact host-address binding first, then one on
/// every host address when the destination is one of the host's own.
#[inline(always)]
fn published_target(ip: &Ipv6Packet, l4: &L4v6) -> Option<PortTarget6> {
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

/// A new connection from outside to a published port: tracked (its replies get the host's
/// address and port back as their source), its destination rewritten to the container, and
/// delivered straight into the container.
#[inline(always)]
fn publish(
    ctx: &TcContext,
    ip: &mut Ipv6Packet,
    l4: &mut L4v6,
    forward: &CtKey6,
    target: &PortTarget6,
) -> Verdict {
    let Some(connection) = NEW_CONNECTION6.get_ptr_mut(0) else {
        return Verdict::Pass;
    };
    // SAFETY: this CPU's element, used by this program run only; filled field by field
    // (a struct literal would be built on the stack first).
    let connection = unsafe { &mut *connection };
    connection.forward = *forward;
    connection.reply = conntrack::reply_key(
        ip.protocol,
        In6Addr(ip.saddr),
        l4.sport,
        target.addr,
        target.port,
    );
    connection.origin = ct_origin::PUBLISHED;
    connection.rewrite = ct_rewrite::DST;
    connection.nat_addr = target.addr;
    connection.nat_port = target.port;
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
        return Verdict::Drop(dataplane_common::DropReason::CtMapInsertionFailed);
    }
    if rewrite_packet(ctx, ip, l4, ct_rewrite::DST, &target.addr, target.port).is_err() {
        return Verdict::Drop(dataplane_common::DropReason::Malformed);
    }
    // TCP is reported when its handshake completes (conntrack::account), as for IPv4.
    if forward.proto != IPPROTO_TCP {
        flow::new_connection(&flow::NewFlowOf {
            forward: *forward,
            origin: connection.origin,
            rewrite: connection.rewrite,
            nat_addr: connection.nat_addr,
            nat_port: connection.nat_port,
            hairpin_port: 0,
            packets: 1,
            bytes: u64::from(ip.len),
            tcp_flags: 0,
            icmp_type: 0,
            icmp_code: 0,
            hook: Hook::UplinkIngress.number(),
            // SAFETY: `skb` points at the context the kernel passed to this program.
            ifindex: unsafe { (*ctx.skb.skb).ifindex },
        });
    }
    deliver(ctx, ip)
}

/// Rewrites the destination (`ct_rewrite::DST`) or source address and port of the packet to
/// `addr`:`port`, keeping the TCP/UDP checksum valid (IPv6 has no header checksum; the
/// 128-bit address is in the pseudo-header, changed a 32-bit word at a time).
#[inline(always)]
fn rewrite_packet(
    ctx: &TcContext,
    ip: &mut Ipv6Packet,
    l4: &mut L4v6,
    which: u8,
    addr: &In6Addr,
    port: u16,
) -> Result<(), ()> {
    let dst = which == ct_rewrite::DST;
    let (addr_offset, old_addr, port_offset, old_port) = if dst {
        (IP6_DADDR_OFF, ip.daddr, ip.l4_offset + 2, l4.dport)
    } else {
        (IP6_SADDR_OFF, ip.saddr, ip.l4_offset, l4.sport)
    };
    // UDP may carry no checksum (0); MARK_MANGLED_0 leaves it so and never produces a 0.
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
        l4.dport = port;
    } else {
        ip.saddr = addr.0;
        l4.sport = port;
    }
    Ok(())
}

/// Towards a container: straight into its namespace (bpf_redirect_peer) with its MAC, as the
/// IPv4 path does. Anything else goes on through the host.
#[inline(always)]
fn deliver(ctx: &TcContext, ip: &Ipv6Packet) -> Verdict {
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
