//! The translations of each hook, built on conntrack and NAT:
//!
//! | hook | tracked packet (hit) | new connection (miss) |
//! |---|---|---|
//! | container veth ingress | published-port replies (source back to host:port) and hairpin requests | hairpin: a container to its host's published port |
//! | uplink ingress | published-port requests, masquerade replies | published port from outside |
//! | uplink egress | masquerade requests | masquerade of a container's connection |
//!
//! Each hook acts only on the entries whose origin it owns, so one connection is translated
//! exactly once per packet.

use dataplane_common::{
    Config, CtKey, DropReason, PortKey, PortTarget, ServiceInfo, ServiceKey, ct_origin, ct_rewrite,
};

use crate::{
    conntrack::{self, CtError},
    lb,
    maps::{CONFIG, CONNTRACK, ENDPOINTS, LOCAL_ADDRS, PORTS, SERVICES},
    nat,
    parse::{Frame, IPPROTO_ICMP, Ipv4Packet, L4, Quoted, Transport, parse_l4, parse_tc},
    reject,
};
use aya_ebpf::programs::TcContext;

/// What a hook decided.
pub enum Verdict {
    Pass,
    Drop(DropReason),
    /// Count a drop for the reason, and send the packet (rewritten into a refusal) out of
    /// this interface.
    Refuse(DropReason, u32),
    /// Send out of this interface, with the neighbour (next hop MAC) resolved by the kernel.
    RedirectNeigh(u32),
}

/// How many source ports masquerade tries for one new connection before giving up.
const SNAT_PROBES: u32 = 32;

/// Where the hook runs, which decides the entries it acts on and what a miss means.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    ContainerIngress,
    UplinkIngress,
    UplinkEgress,
}

#[inline(always)]
pub fn handle(ctx: &TcContext, hook: Hook) -> Verdict {
    let mut ip = match parse_tc(ctx) {
        Frame::Ipv4(ip) => ip,
        Frame::Other => return Verdict::Pass,
        Frame::Malformed => return Verdict::Drop(DropReason::Malformed),
    };
    let mut l4 = match parse_l4(ctx, &ip) {
        Transport::Tracked(l4) => l4,
        Transport::IcmpError(quoted) => return icmp_error(ctx, hook, &mut ip, &quoted),
        Transport::Untracked => return Verdict::Pass,
        Transport::Malformed => return Verdict::Drop(DropReason::Malformed),
    };
    let key = conntrack::key_of(&ip, &l4);
    if let Some(entry) = conntrack::lookup(&key) {
        // SAFETY: a map value from this program run's lookup.
        let (origin, rewrite, addr, port) = unsafe {
            (
                (*entry).origin,
                (*entry).rewrite,
                (*entry).nat_addr,
                (*entry).nat_port,
            )
        };
        if !owns(hook, origin, rewrite) {
            return Verdict::Pass;
        }
        conntrack::account(entry, ip.len, l4.tcp_flags);
        if nat::rewrite(ctx, &mut ip, &mut l4, rewrite, addr, port).is_err() {
            return Verdict::Drop(DropReason::Malformed);
        }
        if hook == Hook::ContainerIngress && rewrite == ct_rewrite::SRC {
            return reply_to_client(&ip);
        }
        return Verdict::Pass;
    }
    match hook {
        Hook::ContainerIngress => match lb::service_of(&ip, &l4) {
            Some(service) => balance(ctx, &mut ip, &mut l4, &key, &service),
            None => publish(ctx, &mut ip, &mut l4, &key),
        },
        Hook::UplinkIngress => publish(ctx, &mut ip, &mut l4, &key),
        Hook::UplinkEgress => masquerade(ctx, &mut ip, &mut l4, &key),
    }
}

/// Whether `hook` translates packets of entries with this origin and rewrite.
#[inline(always)]
fn owns(hook: Hook, origin: u8, rewrite: u8) -> bool {
    match hook {
        Hook::ContainerIngress => origin == ct_origin::PUBLISHED || origin == ct_origin::SERVICE,
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
        return Verdict::Pass;
    };
    // SAFETY: a map value from this program run's lookup.
    let (origin, rewrite, addr, port) = unsafe {
        (
            (*entry).origin,
            (*entry).rewrite,
            (*entry).nat_addr,
            (*entry).nat_port,
        )
    };
    if !owns(hook, origin, rewrite) {
        return Verdict::Pass;
    }
    if nat::rewrite_icmp_error(ctx, ip, quoted, rewrite, addr, port).is_err() {
        return Verdict::Drop(DropReason::Malformed);
    }
    if hook == Hook::ContainerIngress && rewrite == ct_rewrite::SRC {
        return reply_to_client(ip);
    }
    Verdict::Pass
}

/// Where a published port's reply goes once its source is the host's address again. Towards
/// a container (hairpin) the bridge delivers it at layer 2. Towards anything else it must not
/// enter the host's IP stack: a packet arriving with one of the host's own addresses as source
/// is a martian and dropped (accept_local=0), so it goes straight out of the uplink, the
/// kernel resolving the next hop (bpf_redirect_neigh), as Cilium does.
#[inline(always)]
fn reply_to_client(ip: &Ipv4Packet) -> Verdict {
    if ENDPOINTS.get_ptr(&ip.daddr).is_some() {
        return Verdict::Pass;
    }
    match CONFIG.get_ptr(0) {
        // SAFETY: array element 0 always exists.
        Some(config) if unsafe { (*config).uplink_ifindex } != 0 => {
            Verdict::RedirectNeigh(unsafe { (*config).uplink_ifindex })
        }
        _ => Verdict::Pass,
    }
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
fn publish(ctx: &TcContext, ip: &mut Ipv4Packet, l4: &mut L4, forward: &CtKey) -> Verdict {
    if ip.protocol == IPPROTO_ICMP {
        return Verdict::Pass;
    }
    let Some(target) = published_target(ip, l4) else {
        return Verdict::Pass;
    };
    if target.is_service == 0 {
        return track_dnat(
            ctx,
            ip,
            l4,
            forward,
            ct_origin::PUBLISHED,
            target.addr,
            target.port,
        );
    }
    let key = ServiceKey {
        vip: target.addr,
        port: target.port,
        proto: ip.protocol,
        _pad: 0,
    };
    let Some(service) = SERVICES.get_ptr(&key) else {
        return Verdict::Drop(DropReason::NoServiceBackend);
    };
    // SAFETY: a map value from this program run's lookup.
    let service = unsafe { *service };
    match lb::pick(&service, forward) {
        Some(b) => track_dnat(ctx, ip, l4, forward, ct_origin::PUBLISHED, b.addr, b.port),
        None => refuse(ctx, ip, l4),
    }
}

/// A new connection to a service VIP from a container: pick a backend, track, rewrite.
#[inline(always)]
fn balance(
    ctx: &TcContext,
    ip: &mut Ipv4Packet,
    l4: &mut L4,
    forward: &CtKey,
    service: &ServiceInfo,
) -> Verdict {
    match lb::pick(service, forward) {
        Some(b) => track_dnat(ctx, ip, l4, forward, ct_origin::SERVICE, b.addr, b.port),
        None => refuse(ctx, ip, l4),
    }
}

/// No backend: a TCP client gets a reset at once (sent back out of the interface it came
/// in on); anything else is dropped. Both count as NO_SERVICE_BACKEND.
#[inline(always)]
fn refuse(ctx: &TcContext, ip: &Ipv4Packet, l4: &L4) -> Verdict {
    // SAFETY: `skb` points at the context the kernel passed to this program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    match reject::tcp_reset(ctx, ip, l4) {
        Ok(()) => Verdict::Refuse(DropReason::NoServiceBackend, ifindex),
        Err(()) => Verdict::Drop(DropReason::NoServiceBackend),
    }
}

/// Tracks a new connection whose destination becomes `addr`:`port` and whose replies get the
/// original destination back as their source, then rewrites the packet.
#[inline(always)]
fn track_dnat(
    ctx: &TcContext,
    ip: &mut Ipv4Packet,
    l4: &mut L4,
    forward: &CtKey,
    origin: u8,
    addr: u32,
    port: u16,
) -> Verdict {
    let reply = conntrack::reply_key(ip.protocol, ip.saddr, l4.sport, addr, port);
    let create = || {
        conntrack::create(
            forward,
            &reply,
            origin,
            ct_rewrite::DST,
            addr,
            port,
            ip.daddr,
            l4.dport,
            ip.len,
            l4.tcp_flags,
        )
    };
    let created = match create() {
        Err(CtError::Exists) => {
            // The same client address:port reached the same backend address:port before
            // (through another binding, or a connection whose forward entry is gone): the new
            // connection replaces the old one, as a reused TCP tuple does.
            if let Some(old) = conntrack::lookup(&reply) {
                // SAFETY: a map value from this program run's lookup.
                let old_forward = unsafe { (*old).peer };
                let _ = CONNTRACK.remove(&old_forward);
            }
            let _ = CONNTRACK.remove(&reply);
            create()
        }
        other => other,
    };
    match created {
        Ok(()) => match nat::rewrite(ctx, ip, l4, ct_rewrite::DST, addr, port) {
            Ok(()) => Verdict::Pass,
            Err(_) => Verdict::Drop(DropReason::Malformed),
        },
        Err(_) => Verdict::Drop(DropReason::CtMapInsertionFailed),
    }
}

#[inline(always)]
fn mix(key: &CtKey) -> u32 {
    let mut h =
        key.saddr ^ key.daddr.rotate_left(11) ^ (u32::from(key.sport) << 16 | u32::from(key.dport));
    h ^= u32::from(key.proto).rotate_left(7);
    h ^= h >> 16;
    h = h.wrapping_mul(0x45d9_f3b);
    h ^= h >> 16;
    h
}

/// A container's new connection leaving through the uplink: pick a free source port on the
/// host's address (probing from a hash of the connection, so collisions between containers
/// using the same source port resolve to different ports), track it, rewrite the source.
#[inline(always)]
fn masquerade(ctx: &TcContext, ip: &mut Ipv4Packet, l4: &mut L4, forward: &CtKey) -> Verdict {
    if ENDPOINTS.get_ptr(&ip.saddr).is_none() {
        return Verdict::Pass; // not a container: the host's own traffic keeps its address
    }
    let Some(config) = CONFIG.get_ptr(0) else {
        return Verdict::Pass;
    };
    // SAFETY: array element 0 always exists.
    let Config {
        masquerade_addr,
        snat_port_min,
        snat_port_max,
        ..
    } = unsafe { *config };
    if masquerade_addr == 0 || snat_port_max < snat_port_min {
        return Verdict::Pass;
    }
    let range = u32::from(snat_port_max) - u32::from(snat_port_min) + 1;
    let start = mix(forward) % range;
    for probe in 0..SNAT_PROBES {
        let port = (u32::from(snat_port_min) + (start + probe) % range) as u16;
        let port = port.to_be();
        let reply = conntrack::reply_key(ip.protocol, masquerade_addr, port, ip.daddr, l4.dport);
        match conntrack::create(
            forward,
            &reply,
            ct_origin::MASQUERADE,
            ct_rewrite::SRC,
            masquerade_addr,
            port,
            ip.saddr,
            l4.sport,
            ip.len,
            l4.tcp_flags,
        ) {
            Ok(()) => {
                return match nat::rewrite(ctx, ip, l4, ct_rewrite::SRC, masquerade_addr, port) {
                    Ok(()) => Verdict::Pass,
                    Err(_) => Verdict::Drop(DropReason::Malformed),
                };
            }
            Err(CtError::Exists) => continue,
            Err(CtError::Full) => return Verdict::Drop(DropReason::CtMapInsertionFailed),
        }
    }
    Verdict::Drop(DropReason::SnatNoFreePort)
}
