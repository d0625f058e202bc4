//! The IPv6 programs' translations (tail-called by the IPv4 programs for each IPv6 frame, so
//! they have a stack of their own). Today: published ports reached from outside over IPv6,
//! to a container's IPv6 address with the client's address kept, and masquerade (NAT66) of
//! containers' connections out (TCP, UDP, ICMPv6 echo); tracked in the IPv6 conntrack tables
//! with the IPv4 path's conntrack and port allocation code (`family.rs`).
//!
//! | hook | tracked packet (hit) | new connection (miss) |
//! |---|---|---|
//! | container veth ingress | published-port replies (source back to host:port), connections translated here both ways (`balance6.rs`) | a container to a VIP or to a port published on the host (`balance6.rs`) |
//! | uplink ingress | published-port requests, masquerade replies | published port from outside (to a container, or a service's backend) |
//! | uplink egress | masquerade requests | NAT66 of a container's connection |
//!
//! Fragments of a translated datagram are translated as their first fragment was (the
//! fragment map, as IPv4's); ICMPv6 errors about a translated connection as that connection's
//! packets travelling their way (`icmp_error`). A published port of an IPv4-only container
//! (its target an IPv4-mapped address) and its tracked connections go on to the NAT64
//! program (`nat64.rs`). Service VIPs (a container's connection to a `vip6`, a published
//! port leading to a service) are balanced in `balance6.rs`, which judges their policy by
//! the backend chosen. Every other new connection is judged by policy before any
//! translation (`policy6`); a packet none of this concerns passes untouched.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use dataplane_common::{
    CtKey6, CtKeyOf, DropReason, FragEntry, FragKey6, In6Addr, PROGS6_DROP_SLOT, PROGS6_NAT64_SLOT,
    PortKey6, PortTarget6, ct_origin, ct_rewrite, net_flags,
};

use crate::{
    conntrack::{self, CtError},
    family::Family,
    flow,
    maps::{
        CONFIG, DROP6_NEXT, ENDPOINTS6, FRAGMENTS6, LOCAL_ADDRS6, NEW_CONNECTION6, PORTS6, PROGS6,
    },
    nat,
    parse::{
        ETH_HDR_LEN, Frame, IP6_DADDR_OFF, IP6_SADDR_OFF, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
        IPV6_HDR_LEN, Ipv6Packet, invalid_tcp_flags, parse_ipv6, parse_tc,
    },
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

/// ICMPv6 errors (RFC 4443): destination unreachable, packet too big, time exceeded,
/// parameter problem. Each quotes as much of the packet it is about as fits.
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PARAMETER_PROBLEM: u8 = 4;

/// The packet an ICMPv6 error quotes: its IPv6 header (without extension headers: a quoted
/// packet with one is not looked into) and the first bytes of its TCP or UDP header, as they
/// were when it left, so its tuple is the reverse of the error's own direction.
#[derive(Clone, Copy)]
pub(crate) struct Quoted6 {
    pub icmp_csum_offset: usize,
    /// Offset of the quoted IPv6 header.
    pub ip_offset: usize,
    /// Offset of the quoted TCP/UDP header.
    pub l4_offset: usize,
    pub protocol: u8,
    pub saddr: In6Addr,
    pub daddr: In6Addr,
    pub sport: u16,
    pub dport: u16,
}

/// The quoted packet of an ICMPv6 error about a TCP or UDP packet; None for any other ICMPv6
/// message, and for an error cut short (it passes untouched, as before).
#[inline(always)]
pub(crate) fn parse_icmp_error(ctx: &TcContext, ip: &Ipv6Packet) -> Option<Quoted6> {
    let off = ip.l4_offset;
    let icmp_type = ctx.load::<u8>(off).ok()?;
    if !(ICMPV6_DEST_UNREACH..=ICMPV6_PARAMETER_PROBLEM).contains(&icmp_type) {
        return None;
    }
    let ip_offset = off + 8;
    let version = ctx.load::<u8>(ip_offset).ok()? >> 4;
    let protocol = ctx.load::<u8>(ip_offset + 6).ok()?;
    if version != 6 || (protocol != IPPROTO_TCP && protocol != IPPROTO_UDP) {
        return None;
    }
    let l4_offset = ip_offset + 40;
    Some(Quoted6 {
        icmp_csum_offset: off + 2,
        ip_offset,
        l4_offset,
        protocol,
        saddr: In6Addr(ctx.load::<[u32; 4]>(ip_offset + 8).ok()?),
        daddr: In6Addr(ctx.load::<[u32; 4]>(ip_offset + 24).ok()?),
        sport: ctx.load::<u16>(l4_offset).ok()?,
        dport: ctx.load::<u16>(l4_offset + 2).ok()?,
    })
}

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

/// The conntrack key of a packet as it is on the wire (IPv4's `conntrack::key_of`).
#[inline(always)]
pub(crate) fn key_of(ip: &Ipv6Packet, l4: &L4v6) -> CtKey6 {
    CtKey6 {
        saddr: In6Addr(ip.saddr),
        daddr: In6Addr(ip.daddr),
        sport: l4.sport,
        dport: l4.dport,
        proto: ip.protocol,
        _pad: [0; 3],
    }
}

/// The translations of `hook` for a parsed IPv6 packet that isolation let through.
#[inline(always)]
pub fn translate(ctx: &TcContext, hook: Hook, ip: &mut Ipv6Packet) -> Verdict {
    if ip.is_later_fragment() {
        return later_fragment(ctx, hook, ip);
    }
    let Some(mut l4) = parse_l4(ctx, ip) else {
        if ip.protocol == IPPROTO_ICMPV6 {
            if let Some(quoted) = parse_icmp_error(ctx, ip) {
                return icmp_error(ctx, hook, ip, &quoted);
            }
        }
        return crate::policy6::untracked(
            ctx,
            hook,
            ip.protocol,
            ip.l4_offset as u32,
            ip.frag != 0,
        );
    };
    let key = key_of(ip, &l4);
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
    if rewrite == ct_rewrite::NAT64 {
        // The client's side of a NAT64 connection: its fragments become IPv4 ones there.
        return if hook == Hook::UplinkIngress {
            nat64(ctx)
        } else {
            Verdict::Pass
        };
    }
    if hook == Hook::ContainerIngress
        && (rewrite == ct_rewrite::DST || rewrite == ct_rewrite::HAIRPIN)
    {
        // As the connection's other packets to its backend or container (`decide`).
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

/// An ICMPv6 error about a translated connection (packet too big above all: path MTU
/// discovery through the translation depends on it): found by the quoted packet's reversed
/// tuple, the key a packet of the connection travelling the error's way carries, and
/// translated and sent on like one. About no connection we track: it passes untouched.
#[inline(always)]
fn icmp_error(ctx: &TcContext, hook: Hook, ip: &mut Ipv6Packet, quoted: &Quoted6) -> Verdict {
    let key = CtKey6 {
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
    if rewrite == ct_rewrite::NAT64 {
        // About a NAT64 connection's reply, from the way to its client: translated to ICMPv4
        // for its IPv4-only container by the NAT64 program.
        return if hook == Hook::UplinkIngress {
            nat64(ctx)
        } else {
            Verdict::Pass
        };
    }
    if !owns(hook, origin, rewrite) {
        return Verdict::Pass;
    }
    if rewrite_icmp_error(ctx, ip, quoted, rewrite, &addr, port).is_err() {
        return Verdict::Drop(DropReason::Malformed);
    }
    onward(ctx, hook, ip)
}

/// Translates an ICMPv6 error the way its connection's packets travelling the same way are:
/// the outer header's field `which` (destination or source) becomes `addr`; the quoted packet,
/// which travelled the other way, gets the same change on its other side (source address and
/// port for `DST`, destination for `SRC`). The ICMPv6 checksum covers the pseudo-header (the
/// outer addresses) and the quoted bytes: every change is folded into it. The quoted TCP/UDP
/// checksum is left alone, as Linux's NAT leaves a quote cut short: receivers match the quote's
/// addresses and ports, not its checksum.
#[inline(always)]
fn rewrite_icmp_error(
    ctx: &TcContext,
    ip: &mut Ipv6Packet,
    quoted: &Quoted6,
    which: u8,
    addr: &In6Addr,
    port: u16,
) -> Result<(), ()> {
    let (outer_offset, old_outer, quoted_offset, old_quoted, port_offset, old_port) =
        if which == ct_rewrite::DST {
            (
                IP6_DADDR_OFF,
                ip.daddr,
                quoted.ip_offset + 8,
                quoted.saddr.0,
                quoted.l4_offset,
                quoted.sport,
            )
        } else {
            (
                IP6_SADDR_OFF,
                ip.saddr,
                quoted.ip_offset + 24,
                quoted.daddr.0,
                quoted.l4_offset + 2,
                quoted.dport,
            )
        };
    let csum = quoted.icmp_csum_offset;
    for word in 0..4 {
        if old_outer[word] != addr.0[word] {
            ctx.l4_csum_replace(
                csum,
                u64::from(old_outer[word]),
                u64::from(addr.0[word]),
                u64::from(BPF_F_PSEUDO_HDR) | BPF_F_IPV6 | 4,
            )
            .map_err(|_| ())?;
        }
        if old_quoted[word] != addr.0[word] {
            ctx.l4_csum_replace(
                csum,
                u64::from(old_quoted[word]),
                u64::from(addr.0[word]),
                4,
            )
            .map_err(|_| ())?;
        }
    }
    ctx.store(outer_offset, &addr.0, 0).map_err(|_| ())?;
    ctx.store(quoted_offset, &addr.0, 0).map_err(|_| ())?;
    if old_port != port {
        ctx.l4_csum_replace(csum, u64::from(old_port), u64::from(port), 2)
            .map_err(|_| ())?;
        ctx.store(port_offset, &port, 0).map_err(|_| ())?;
    }
    if which == ct_rewrite::DST {
        ip.daddr = addr.0;
    } else {
        ip.saddr = addr.0;
    }
    Ok(())
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
    if invalid_header(ctx, ip, l4) {
        return Verdict::Drop(DropReason::InvalidL4Header);
    }
    let key = *key;
    // SAFETY (for the reads below): map values from lookups in this program run.
    if let Some(entry) = conntrack::lookup_packet(&key, l4.tcp_flags) {
        // A policy change reaches the connections already open (at whichever hook sees a
        // packet of theirs first), as IPv4's; the balancing and NAT64 programs' tracked
        // packets come through here first. Judged in a program of its own, which runs this
        // one again when the connection may go on: the judgement's calls have no room here
        // (stack and the verifier's instructions alike).
        if crate::policy6::judged_before_the_change(entry) {
            crate::policy6::to_rejudge(ctx, hook);
        }
        let (origin, rewrite, addr, port) = unsafe {
            (
                (*entry).origin,
                (*entry).rewrite,
                (*entry).nat_addr,
                (*entry).nat_port,
            )
        };
        if hook == Hook::ContainerIngress
            && (rewrite == ct_rewrite::DST || rewrite == ct_rewrite::HAIRPIN)
        {
            // A connection translated at a container's veth (to a VIP, or to a port published
            // on the host): its packet to the backend or container (or either way of one to
            // the client itself), the balancing program's (stack).
            return crate::balance6::to_balancer(ctx, hook);
        }
        if rewrite == ct_rewrite::NAT64 {
            // Its IPv6 side: the client's requests, at the uplink (its replies are IPv4).
            return if hook == Hook::UplinkIngress {
                nat64(ctx)
            } else {
                Verdict::Pass
            };
        }
        if origin == ct_origin::PLAIN {
            let (what, seq_ack) = crate::policy6::packed_seen(hook, l4);
            return crate::policy6::tracked(ctx, what, seq_ack, &key, entry);
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
    if hook == Hook::ContainerIngress && crate::balance6::is_vip(ip, l4) {
        // Judged by the backend the balancing program chooses, as IPv4's VIPs are.
        return crate::balance6::to_balancer(ctx, hook);
    }
    // Policy first: judged once per new connection (`policy6`); a published port that
    // leads to a service is left to the balancing program, as a VIP is.
    let what = crate::policy6::packed(ip.protocol, l4);
    if let Some(verdict) = crate::policy6::new_connection(ctx, hook, what) {
        return verdict;
    }
    match hook {
        Hook::UplinkEgress => return masquerade(ctx, ip, l4, &key),
        Hook::ContainerIngress => return published_from_container(ctx, ip, l4),
        Hook::UplinkIngress if ip.protocol == IPPROTO_ICMPV6 => return Verdict::Pass,
        Hook::UplinkIngress => {}
    }
    let Some(target) = published_target(ip, &l4) else {
        return Verdict::Pass;
    };
    if target.is_service != 0 {
        return crate::balance6::to_balancer(ctx, hook);
    }
    if target.addr.as_mapped_v4().is_some() {
        // An IPv4-only container (reached at its IPv4-mapped address).
        return nat64(ctx);
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

/// A container's new connection to a port published on one of the host's IPv6 addresses (as
/// Docker's DNAT of what its bridges send to a host address, with `--userland-proxy=false`):
/// translated in the balancing program (`balance6`), which has the stack for it, to the
/// container the port leads to (the client itself through its gateway, a hairpin) or to a
/// backend of its service. Judged already (`policy6`). Anything else passes.
#[inline(always)]
fn published_from_container(ctx: &TcContext, ip: &Ipv6Packet, l4: &L4v6) -> Verdict {
    if ip.protocol != IPPROTO_ICMPV6
        && ENDPOINTS6.get_ptr(&In6Addr(ip.daddr)).is_none()
        && published_target(ip, l4).is_some()
    {
        return crate::balance6::to_balancer(ctx, Hook::ContainerIngress);
    }
    Verdict::Pass
}

/// On to the NAT64 program (`nat64.rs`), which returns the verdict; an empty slot leaves the
/// packet passing untouched.
#[inline(always)]
fn nat64(ctx: &TcContext) -> Verdict {
    // SAFETY: a tail call with the program's own context; on failure it returns.
    unsafe { PROGS6.tail_call(ctx, PROGS6_NAT64_SLOT) };
    Verdict::Pass
}

/// A TCP or UDP header the receiving kernel would drop anyway, as IPv4's parse judges them
/// (`DropReason::InvalidL4Header`): TCP flags no stack accepts (SYN+FIN, none, ...) or a data
/// offset inside the fixed header; a UDP length under the UDP header's or beyond the datagram.
/// Dropped before they can be tracked, so a scan of them fills nothing.
#[inline(always)]
fn invalid_header(ctx: &TcContext, ip: &Ipv6Packet, l4: &L4v6) -> bool {
    let off = ip.l4_offset;
    if ip.protocol == IPPROTO_TCP {
        let Ok(data_offset) = ctx.load::<u8>(off + 12) else {
            return true;
        };
        return data_offset >> 4 < 5 || invalid_tcp_flags(l4.tcp_flags);
    }
    if ip.protocol != IPPROTO_UDP {
        return false;
    }
    let Ok(length) = ctx.load::<u16>(off + 4) else {
        return true;
    };
    // As Linux's UDP receive judges it: shorter than its header, or longer than what came
    // (a first fragment's length covers the whole datagram). A shorter length is trimmed to,
    // not dropped, by the receiver.
    let length = u32::from(u16::from_be(length));
    let carried = (ETH_HDR_LEN + IPV6_HDR_LEN) as u32 + ip.payload_len - off as u32;
    length < 8 || (!ip.is_first_fragment() && length > carried)
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
pub(crate) fn report_new(ctx: &TcContext, hook: Hook) {
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
        hairpin_port: c.hairpin_port,
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

/// What an IPv6 program decided for a packet it drops, handed to the drop reporter.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct PendingDrop {
    pub hook: u32,
    /// For a refusal (a reset built in place of the packet), where it is sent; 0 for a drop.
    pub refuse_ifindex: u32,
    /// A `DropReason`.
    pub reason: u8,
    pub _pad: [u8; 3],
}

/// Hands a dropped packet to the drop reporter (`dp_drop6`), which counts it, sends its flow
/// event and returns the verdict; the IPv6 programs' own stack has no room for the event's
/// frames beside their deepest chain. Returns only if the reporter is not there (an older
/// loader, or the hand-over slot missing): the verdict then stands without an event.
#[inline(always)]
pub fn hand_over_drop(ctx: &TcContext, hook: Hook, verdict: &Verdict) {
    let (reason, refuse_ifindex) = match *verdict {
        Verdict::Drop(reason) => (reason, 0),
        Verdict::Refuse(reason, ifindex) => (reason, ifindex),
        _ => return,
    };
    let Some(pending) = DROP6_NEXT.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's element, used by this program run and the one it tail-calls only.
    unsafe {
        (*pending).hook = hook.number();
        (*pending).refuse_ifindex = refuse_ifindex;
        (*pending).reason = reason as u8;
        // SAFETY: a tail call with the program's own context; on failure it returns.
        let _ = PROGS6.tail_call(ctx, PROGS6_DROP_SLOT);
    }
}

/// The drop reporter's work (`dp_drop6`): the verdict handed over, the flow event of the
/// packet (IPv6, or IPv4 for what NAT64 drops of a container's packets), and the verdict
/// again for the hook to act on.
#[inline(always)]
pub fn report_handed_over(ctx: &TcContext) -> Verdict {
    let Some(pending) = DROP6_NEXT.get_ptr(0) else {
        return Verdict::Drop(DropReason::Malformed);
    };
    // SAFETY: this CPU's element, written by the program that tail-called this one.
    let pending = unsafe { *pending };
    let reason = crate::translate::recorded_drop(pending.reason);
    match parse_tc(ctx) {
        Frame::Ipv6 => {
            if let Some(ip) = parse_ipv6(ctx) {
                let later = ip.is_later_fragment();
                let (saddr, daddr) = (In6Addr(ip.saddr), In6Addr(ip.daddr));
                report_drop(
                    ctx,
                    pending.hook,
                    saddr,
                    daddr,
                    ip.protocol,
                    ip.l4_offset,
                    later,
                    reason,
                );
            }
        }
        Frame::Ipv4(ip) => {
            let later = ip.is_later_fragment();
            report_drop(
                ctx,
                pending.hook,
                ip.saddr,
                ip.daddr,
                ip.protocol,
                ip.l4_offset,
                later,
                reason,
            );
        }
        Frame::Other | Frame::Malformed => {}
    }
    if pending.refuse_ifindex != 0 {
        Verdict::Refuse(reason, pending.refuse_ifindex)
    } else {
        Verdict::Drop(reason)
    }
}

/// The flow event of a packet dropped at `hook` for `reason` (aggregated and bounded as
/// IPv4's: `flow::dropped`), with its ports and TCP flags read back from the packet (0 for a
/// later fragment). The addresses are the packet's as it arrived: every drop happens before
/// a rewrite, but for a rewrite that failed halfway (`Malformed`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn report_drop<A: Family>(
    ctx: &TcContext,
    hook: u32,
    saddr: A,
    daddr: A,
    protocol: u8,
    l4_offset: usize,
    later_fragment: bool,
    reason: DropReason,
) {
    let skb = ctx.skb.skb;
    let off = l4_offset;
    let mut drop = flow::DroppedOf::<A> {
        tuple: CtKeyOf {
            saddr,
            daddr,
            sport: 0,
            dport: 0,
            proto: protocol,
            _pad: [0; 3],
        },
        tcp_flags: 0,
        icmp_type: 0,
        icmp_code: 0,
        len: ctx.len(),
        reason,
        hook,
        // SAFETY: `skb` points at the context the kernel passed to this program.
        ifindex: unsafe { (*skb).ifindex },
    };
    if !later_fragment {
        if protocol == IPPROTO_TCP || protocol == IPPROTO_UDP {
            drop.tuple.sport = ctx.load::<u16>(off).unwrap_or(0);
            drop.tuple.dport = ctx.load::<u16>(off + 2).unwrap_or(0);
            if protocol == IPPROTO_TCP {
                drop.tcp_flags = ctx.load::<u8>(off + 13).unwrap_or(0);
            }
        } else if protocol == A::ICMP {
            drop.icmp_type = ctx.load::<u8>(off).unwrap_or(0);
            drop.icmp_code = ctx.load::<u8>(off + 1).unwrap_or(0);
        }
    }
    flow::dropped(&drop);
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
