//! Service VIPs over IPv6 at tc, for the IPv6 programs (`translate6.rs`): a container's new
//! connection to a `vip6`:port (one whose socket the cgroup hooks do not cover), and a port
//! published on the host's IPv6 addresses that leads to a service. As IPv4's (`translate.rs`
//! `balance` and `publish`): a backend picked by `lb.rs` (the same code and Maglev tables,
//! over the IPv6 backends), the destination rewritten to it, the connection tracked so that
//! its replies get the VIP (or the published address) back as their source; a connection
//! stays on its backend whatever happens to the backend set afterwards.

use aya_ebpf::programs::TcContext;
use dataplane_common::{
    BackendKey, CtKey6, DropReason, FragKey6, In6Addr, PROGS6_BALANCE_SLOT, PortTarget6,
    ServiceInfo, ct_origin, ct_rewrite, hook,
};

use crate::{
    conntrack, lb,
    maps::{BACKENDS6, BALANCE6_PACKET, CONFIG, ENDPOINTS6, FRAGMENTS6, NEW_CONNECTION6, PROGS6},
    nat,
    parse::{IP6_DADDR_OFF, IP6_SADDR_OFF, IPPROTO_ICMPV6, Ipv6Packet, parse_ipv6},
    policy::{self, Via},
    reject,
    translate::{Hook, Verdict},
    translate6::{
        L4v6, deliver, key_of, parse_l4, published_target, remember_first_fragment, report_new,
        rewrite_packet, track_dnat,
    },
};

/// A new connection as the per-CPU scratch (`NEW_CONNECTION6`) holds it.
type Connection = conntrack::NewConnectionOf<In6Addr>;

/// What [`choose`] found.
const CHOSEN: u32 = 0;
const NOT_A_SERVICE: u32 = 1;
const NO_BACKEND: u32 = 2;
/// Denied by policy (a user rule or Docker's isolation), the reason in the bits above.
const DENIED: u32 = 3;
const DENIED_REASON_SHIFT: u32 = 8;

/// Whether a new connection (conntrack missed) at a container's veth goes to an IPv6
/// VIP:port, for the balancing program ([`to_balancer`]).
#[inline(always)]
pub fn is_vip(ip: &Ipv6Packet, l4: &L4v6) -> bool {
    // Services are TCP and UDP: an echo to a VIP is nobody's.
    ip.protocol != IPPROTO_ICMPV6
        && lb::service_at(In6Addr(ip.daddr), l4.dport, ip.protocol).is_some()
}

/// Tail-calls the balancing program for the new connection in `ctx`, seen at `hook` (passed
/// in the skb's control buffer, which a tail call keeps). Returns only when the slot is empty.
#[inline(always)]
pub fn to_balancer(ctx: &TcContext, hook: Hook) -> Verdict {
    // SAFETY: `skb` points at the context the kernel passed to this program; tc programs
    // may write cb[]. A tail call with the program's own context; on failure it returns.
    unsafe {
        (*ctx.skb.skb).cb[0] = hook.number();
        let _ = PROGS6.tail_call(ctx, PROGS6_BALANCE_SLOT);
    }
    Verdict::Pass
}

/// The packet the balancing program works on, in per-CPU scratch memory (`BALANCE6_PACKET`)
/// rather than on the stack: kept in registers, its fields are spilled around every helper
/// call, each into a stack slot of its own, which takes the main frame past what conntrack's
/// calls leave of the 512 bytes.
pub struct Packet6 {
    pub ip: Ipv6Packet,
    pub l4: L4v6,
    pub key: CtKey6,
}

/// The balancing program (`dp_balance6`): the headers read again (this program has none of
/// its caller's state but the hook), then a tracked service connection's packet to its
/// backend, or a new connection balanced; the fate of a first fragment is recorded for the
/// rest of its datagram, as the caller would have.
#[inline(always)]
pub fn handle(ctx: &TcContext) -> Verdict {
    // SAFETY: as in `to_balancer`.
    let hook = match unsafe { (*ctx.skb.skb).cb[0] } {
        hook::CONTAINER_INGRESS => Hook::ContainerIngress,
        hook::UPLINK_INGRESS => Hook::UplinkIngress,
        _ => return Verdict::Pass,
    };
    let Some(p) = BALANCE6_PACKET.get_ptr_mut(0) else {
        return Verdict::Pass;
    };
    // SAFETY: this CPU's element, used by this program run only.
    let p = unsafe { &mut *p };
    p.ip = match parse_ipv6(ctx) {
        Some(ip) => ip,
        None => return Verdict::Drop(DropReason::Malformed),
    };
    if p.ip.is_later_fragment() {
        return later_fragment(ctx, &mut p.ip);
    }
    p.l4 = match parse_l4(ctx, &p.ip) {
        Some(l4) => l4,
        None => return Verdict::Pass,
    };
    p.key = key_of(&p.ip, &p.l4);
    let verdict = decide(ctx, hook, p);
    if p.ip.is_first_fragment() {
        remember_first_fragment(&p.key, p.ip.id, &verdict);
    }
    if let Verdict::Drop(_) = verdict {
        // Its flow event by the drop reporter, as the IPv6 programs' drops (a refusal, the
        // packet rewritten into a reset, is counted only).
        crate::translate6::hand_over_drop(ctx, hook, &verdict);
    }
    verdict
}

/// A later fragment of a datagram of a connection translated at a container's veth: its
/// destination becomes the backend or container (both addresses for a hairpin), as its first
/// fragment's did (found through the fragment map; ports
/// and the checksum are in the first fragment).
#[inline(always)]
fn later_fragment(ctx: &TcContext, ip: &mut Ipv6Packet) -> Verdict {
    let fragment = FragKey6 {
        saddr: In6Addr(ip.saddr),
        daddr: In6Addr(ip.daddr),
        id: ip.id,
        proto: ip.protocol,
        _pad: [0; 3],
    };
    let Some(first) = FRAGMENTS6.get_ptr(&fragment) else {
        return Verdict::Drop(DropReason::FragmentNotFound);
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
        return Verdict::Pass;
    };
    // SAFETY: a map value from this program run's lookup.
    let (rewrite, addr) = unsafe { ((*entry).rewrite, (*entry).nat_addr) };
    if rewrite == ct_rewrite::HAIRPIN {
        // Both addresses, as its first fragment's: back to the container, from the entry's.
        if ctx.store(IP6_DADDR_OFF, &key.saddr.0, 0).is_err()
            || ctx.store(IP6_SADDR_OFF, &addr.0, 0).is_err()
        {
            return Verdict::Drop(DropReason::Malformed);
        }
        (ip.daddr, ip.saddr) = (key.saddr.0, addr.0);
        return deliver_back(ctx, ip);
    }
    if rewrite != ct_rewrite::DST {
        return Verdict::Pass;
    }
    if ctx.store(IP6_DADDR_OFF, &addr.0, 0).is_err() {
        return Verdict::Drop(DropReason::Malformed);
    }
    ip.daddr = addr.0;
    deliver(ctx, ip)
}

#[inline(always)]
fn decide(ctx: &TcContext, hook: Hook, p: &mut Packet6) -> Verdict {
    if let Some(entry) = conntrack::lookup_packet(&p.key, p.l4.tcp_flags) {
        // SAFETY: a map value from this program run's lookup, read field by field.
        let (rewrite, addr, port) =
            unsafe { ((*entry).rewrite, (*entry).nat_addr, (*entry).nat_port) };
        if hook != Hook::ContainerIngress
            || (rewrite != ct_rewrite::DST && rewrite != ct_rewrite::HAIRPIN)
        {
            return Verdict::Pass;
        }
        // SAFETY: as above.
        let hairpin_port = unsafe { (*entry).hairpin_port };
        let seen = conntrack::Seen {
            len: p.ip.len,
            tcp_flags: p.l4.tcp_flags,
            seq: p.l4.seq,
            ack_seq: p.l4.ack_seq,
            icmp_type: 0,
            icmp_code: 0,
            hook: hook.number(),
            // SAFETY: `skb` points at the context the kernel passed to this program.
            ifindex: unsafe { (*ctx.skb.skb).ifindex },
        };
        conntrack::account(&p.key, entry, &seen);
        if rewrite == ct_rewrite::HAIRPIN {
            // Both sides: the destination back to the container (the key's source) at the
            // entry's hairpin port, the source to the entry's address and port.
            let own = p.key.saddr;
            if rewrite_packet(
                ctx,
                &mut p.ip,
                &mut p.l4,
                ct_rewrite::DST,
                &own,
                hairpin_port,
            )
            .is_err()
                || rewrite_packet(ctx, &mut p.ip, &mut p.l4, ct_rewrite::SRC, &addr, port).is_err()
            {
                return Verdict::Drop(DropReason::Malformed);
            }
            return deliver_back(ctx, &p.ip);
        }
        if rewrite_packet(ctx, &mut p.ip, &mut p.l4, ct_rewrite::DST, &addr, port).is_err() {
            return Verdict::Drop(DropReason::Malformed);
        }
        return deliver(ctx, &p.ip);
    }
    if hook == Hook::ContainerIngress {
        return from_container(ctx, &mut p.ip, &mut p.l4, &p.key);
    }
    to_published(ctx, hook, &mut p.ip, &mut p.l4, &p.key)
}

/// A new connection to a published port at `hook`: from outside, one that leads to a service
/// (a container's port is `translate6`'s); from a container, either (as Docker's DNAT of what
/// its bridges send to a host address), to a container with an IPv6 address: the client
/// itself through its gateway (a hairpin), or another (its replies translated back by
/// `translate6` at that container's veth). NAT64 is for clients from outside: a container's
/// connection to an IPv4-only container's port over IPv6 passes untranslated.
#[inline(always)]
fn to_published(
    ctx: &TcContext,
    hook: Hook,
    ip: &mut Ipv6Packet,
    l4: &mut L4v6,
    forward: &CtKey6,
) -> Verdict {
    let Some(target) = published_target(ip, l4) else {
        return Verdict::Pass;
    };
    if target.is_service != 0 {
        return published(ctx, hook, ip, l4, forward, &target);
    }
    if hook != Hook::ContainerIngress || is_mapped_v4(&target.addr) {
        return Verdict::Pass;
    }
    let (addr, port) = (target.addr, target.port);
    if addr == forward.saddr {
        return hairpin(ctx, ip, l4, forward, ct_origin::PUBLISHED, port);
    }
    track_dnat(
        ctx,
        Hook::ContainerIngress,
        ip,
        l4,
        forward,
        ct_origin::PUBLISHED,
        &addr,
        port,
    )
}

/// A container's new connection (`forward`, at its veth's ingress) to an IPv6 VIP:port.
#[inline(always)]
fn from_container(
    ctx: &TcContext,
    ip: &mut Ipv6Packet,
    l4: &mut L4v6,
    forward: &CtKey6,
) -> Verdict {
    match choose(forward, &forward.daddr, forward.dport, ct_origin::SERVICE) {
        NOT_A_SERVICE => to_published(ctx, Hook::ContainerIngress, ip, l4, forward),
        outcome => go(ctx, Hook::ContainerIngress, ip, l4, forward, outcome),
    }
}

/// A new connection (from outside, or from a container) to a port published on the host's
/// IPv6 addresses that leads to the service at `target` (its IPv6 VIP and port).
#[inline(always)]
fn published(
    ctx: &TcContext,
    hook: Hook,
    ip: &mut Ipv6Packet,
    l4: &mut L4v6,
    forward: &CtKey6,
    target: &PortTarget6,
) -> Verdict {
    match choose(forward, &target.addr, target.port, ct_origin::PUBLISHED) {
        // The port was written before (or after) its service: nothing to balance over.
        NOT_A_SERVICE => Verdict::Drop(DropReason::ServiceBackendNotFound),
        outcome => go(ctx, hook, ip, l4, forward, outcome),
    }
}

/// The connection to the backend [`choose`] chose (tracked with its origin), or why not.
#[inline(always)]
fn go(
    ctx: &TcContext,
    hook: Hook,
    ip: &mut Ipv6Packet,
    l4: &mut L4v6,
    forward: &CtKey6,
    outcome: u32,
) -> Verdict {
    if outcome & 0xff == DENIED {
        return Verdict::Drop(crate::translate::recorded_drop(
            (outcome >> DENIED_REASON_SHIFT) as u8,
        ));
    }
    if outcome != CHOSEN {
        return refuse(ctx, ip, l4);
    }
    let Some(chosen) = NEW_CONNECTION6.get_ptr(0) else {
        return Verdict::Pass;
    };
    // SAFETY: this CPU's element, just written by `choose` in this program run.
    let (origin, addr, port) =
        unsafe { ((*chosen).origin, (*chosen).nat_addr, (*chosen).nat_port) };
    if hook == Hook::ContainerIngress && addr == forward.saddr {
        return hairpin(ctx, ip, l4, forward, origin, port);
    }
    track_dnat(ctx, hook, ip, l4, forward, origin, &addr, port)
}

/// A container's new connection to a VIP, or to a published port, that leads back to the
/// container itself (`origin`: SERVICE or PUBLISHED).
/// Untranslated, it would receive a packet from its own address, answered inside the
/// container and never seen here: so the source becomes its network's gateway with a source
/// port allocated as masquerade's are, and both translations are tracked (as IPv4's
/// `track_hairpin`), so the replies get the VIP back as their source and the client's own
/// port as destination. Both directions go straight back into the container.
#[inline(always)]
fn hairpin(
    ctx: &TcContext,
    ip: &mut Ipv6Packet,
    l4: &mut L4v6,
    forward: &CtKey6,
    origin: u8,
    container_port: u16,
) -> Verdict {
    // SAFETY: a map value from this program run's lookup.
    let gateway = ENDPOINTS6
        .get_ptr(&forward.saddr)
        .map_or(In6Addr::UNSPECIFIED, |e| unsafe { (*e).gateway });
    // SAFETY: array element 0 always exists; fields read one by one.
    let (port_min, port_max) = CONFIG.get_ptr(0).map_or((1, 0), |config| unsafe {
        ((*config).snat_port_min, (*config).snat_port_max)
    });
    if gateway == In6Addr::UNSPECIFIED {
        return Verdict::Drop(DropReason::NoMappingForNatMasquerade);
    }
    let Some(connection) = NEW_CONNECTION6.get_ptr_mut(0) else {
        return Verdict::Pass;
    };
    // SAFETY: this CPU's element, used by this program run only; filled field by field.
    let c = unsafe { &mut *connection };
    c.forward = *forward;
    c.origin = origin;
    c.rewrite = ct_rewrite::HAIRPIN;
    c.nat_addr = gateway;
    c.nat_port = 0;
    c.orig_addr = forward.daddr;
    c.orig_port = forward.dport;
    c.hairpin_port = container_port;
    c.reply_hairpin_port = forward.sport;
    c.len = ip.len;
    c.tcp_flags = l4.tcp_flags;
    c.icmp_type = 0;
    c.icmp_code = 0;
    if let Err(reason) =
        nat::allocate_source_port(c, forward.saddr, container_port, port_min, port_max, None)
    {
        return Verdict::Drop(reason);
    }
    let port = c.nat_port;
    let own = forward.saddr;
    if rewrite_packet(ctx, ip, l4, ct_rewrite::DST, &own, container_port).is_err()
        || rewrite_packet(ctx, ip, l4, ct_rewrite::SRC, &gateway, port).is_err()
    {
        return Verdict::Drop(DropReason::Malformed);
    }
    report_new(ctx, Hook::ContainerIngress);
    deliver_back(ctx, ip)
}

/// A hairpin packet, back into the container it came from, as if the gateway had routed it:
/// from the gateway's MAC (the frame's destination, since the container sent it to its
/// gateway) to the container's.
#[inline(always)]
fn deliver_back(ctx: &TcContext, ip: &Ipv6Packet) -> Verdict {
    if let Ok(gateway_mac) = ctx.load::<[u8; 6]>(0) {
        let _ = ctx.store(6, &gateway_mac, 0);
    }
    deliver(ctx, ip)
}

/// Picks the backend of the service at `vip`:`port` (`forward`'s protocol) for the new
/// connection `forward`, and leaves it with `origin` in `NEW_CONNECTION6` (SERVICE from a
/// container, PUBLISHED from outside, as IPv4's). Out of line, with scalars and pointers only:
/// the service, the backend and the hashes live in this frame, not in the main one, whose
/// deepest chain goes through conntrack.
#[inline(never)]
fn choose(forward: &CtKey6, vip: &In6Addr, port: u16, origin: u8) -> u32 {
    let Some(service) = lb::service_at(*vip, port, forward.proto) else {
        return NOT_A_SERVICE;
    };
    let Some(chosen) = NEW_CONNECTION6.get_ptr_mut(0) else {
        return NO_BACKEND;
    };
    if !reachable_backend(&service, forward, chosen) {
        return NO_BACKEND;
    }
    // Judged by where the connection really goes, as IPv4's: the user rules, then Docker's
    // isolation, between the client and the backend.
    let via = if origin == ct_origin::SERVICE {
        Via::Direct
    } else {
        Via::Published
    };
    // SAFETY: this CPU's element, used by this program run only.
    unsafe {
        if let Err(reason) = policy::check6(
            &forward.saddr,
            &(*chosen).nat_addr,
            forward.proto,
            (*chosen).nat_port,
            via,
        ) {
            return DENIED | (reason as u32) << DENIED_REASON_SHIFT;
        }
        (*chosen).origin = origin;
    }
    CHOSEN
}

/// How many backends on from the one picked [`reachable_backend`] looks for one with IPv6.
const FALLBACK_STEPS: u32 = 16;

/// The backend of `service` for the new connection `forward` that has an IPv6 address, into
/// `chosen` (its address and port): the one `lb.rs` picks, else the first one after it (by
/// index, wrapping) that has one, at most [`FALLBACK_STEPS`] on. A dual-stack service's
/// backend without IPv6 is in its IPv6 table v4-mapped (for the socket hooks, where the
/// kernel speaks IPv4 to it); a packet cannot reach it without translating the family
/// (NAT64), which this path does not do, so the connection goes to the next backend instead
/// of being refused: the same one for the same connection, as the pick. False when no
/// backend in reach has IPv6. Out of line: the search's keys and copies stay out of
/// `choose`'s frame, which policy's calls sit on.
#[inline(never)]
fn reachable_backend(service: &ServiceInfo, forward: &CtKey6, chosen: *mut Connection) -> bool {
    let Some(first) = lb::pick_index(service, &lb::hashes(forward)) else {
        return false;
    };
    let count = service.backend_count.max(1);
    for step in 0..FALLBACK_STEPS.min(count) {
        let key = BackendKey {
            service_id: service.id,
            index: (first + step) % count,
        };
        let Some(backend) = BACKENDS6.get_ptr(&key) else {
            return false;
        };
        // SAFETY: a map value from this program run's lookup; `chosen`, this CPU's scratch.
        unsafe {
            if !is_mapped_v4(&(*backend).addr) {
                (*chosen).nat_addr = (*backend).addr;
                (*chosen).nat_port = (*backend).port;
                return true;
            }
        }
    }
    false
}

/// Whether `addr` is an IPv4 address written as IPv6 (::ffff:a.b.c.d).
#[inline(always)]
fn is_mapped_v4(addr: &In6Addr) -> bool {
    addr.0[0] == 0 && addr.0[1] == 0 && addr.0[2] == u32::to_be(0xffff)
}

/// No backend: a TCP client gets a reset at once, sent back out of the interface it came in
/// on; anything else is dropped. Both count as SERVICE_BACKEND_NOT_FOUND. Out of line: the
/// reset is built on the stack, which the container hook's deepest chain (through conntrack)
/// has no room for in its main frame.
#[inline(never)]
fn refuse(ctx: &TcContext, ip: &Ipv6Packet, l4: &L4v6) -> Verdict {
    match reject::tcp_reset6(ctx, ip, l4) {
        // SAFETY: `skb` points at the context the kernel passed to this program.
        Ok(()) => Verdict::Refuse(DropReason::ServiceBackendNotFound, unsafe {
            (*ctx.skb.skb).ifindex
        }),
        Err(()) => Verdict::Drop(DropReason::ServiceBackendNotFound),
    }
}
