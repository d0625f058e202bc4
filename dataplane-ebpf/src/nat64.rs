//! NAT64 of published ports: a client reaching over IPv6 a port published on the host's IPv6
//! addresses whose container has only IPv4. Its own program (`dp_nat64`, with its own
//! 512-byte stack), tail-called by the IPv6 uplink ingress program for the requests (a
//! published port whose target is an IPv4-mapped address, or a tracked NAT64 connection) and
//! by the IPv4 container ingress program for the replies (a container's packet to one of the
//! host's addresses whose mapped key is a tracked NAT64 reply).
//!
//! The request becomes IPv4 (bpf_skb_change_proto) from the container network's gateway at a
//! port allocated as masquerade and hairpin allocate theirs, to the container's address and
//! port; the reply becomes IPv6 again, from the published address and port to the client.
//! The container sees its gateway as the client, as with docker-proxy (which connects from
//! the gateway too): an IPv4-only container has no way to answer an IPv6 address, and the
//! gateway is the one address it reaches without a route of its own, on the host, where
//! the reply is caught. Unlike docker-proxy, the flow records name the real IPv6 client.
//!
//! Conntrack: both entries in the IPv6 tables (one table family, so the handshake, the
//! timeouts and the flow events are the shared code's, unchanged), the container's side
//! keyed by IPv4-mapped addresses: ::ffff:container:port -> ::ffff:gateway:allocated. Each
//! entry's translation is its peer key reversed (`ct_rewrite::NAT64`).
//!
//! Limits (README, "IPv6 today"): no IPv6 extension headers and no IPv4 options (such packets
//! pass as before); fragments are not translated (they pass, IPv4 ones to the host as
//! before; TCP sets DF); a UDP reply without a checksum is dropped (IPv6 requires one),
//! `InvalidL4Header`, and so is a request without one (never valid in IPv6). MTU: the
//! requests get 20 bytes shorter; the replies 20 bytes longer, which TCP fits by itself (the
//! container's segments are sized by the client's MSS, which the client computed for IPv6's
//! 40-byte header, so they grow back to the client's own MTU); a UDP reply within 20 bytes
//! of the uplink's MTU is dropped by the device. ICMP errors about these connections are not
//! translated between the families.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use dataplane_common::{CtKey, CtKey6, DropReason, In6Addr, ct_origin, ct_rewrite};

use crate::{
    conntrack, flow,
    maps::{CONFIG, ENDPOINTS, NEW_CONNECTION6},
    nat,
    parse::{
        ETH_HDR_LEN, ETH_P_IP, ETH_P_IPV6, Frame, IPPROTO_TCP, IPPROTO_UDP, IPV6_HDR_LEN,
        Transport, parse_ipv6, parse_tc,
    },
    translate::{Hook, Verdict},
    translate6,
};

const IPV4_HDR_LEN: usize = 20;
/// Where the upper-layer header is in the packets translated: right after a plain header.
const L4_OFF6: usize = ETH_HDR_LEN + IPV6_HDR_LEN;
const L4_OFF4: usize = ETH_HDR_LEN + IPV4_HDR_LEN;
const ETHERTYPE_OFF: usize = 12;
/// IPv4's "don't fragment": IPv6 routers never fragment, and neither will an IPv4 one.
const IP_DF: u16 = 0x4000;

/// The NAT64 program: an IPv6 frame is a request from the uplink, an IPv4 one a reply from a
/// container (each caller tail-calls only those).
#[inline(always)]
pub fn handle(ctx: &TcContext) -> Verdict {
    match ctx.load::<u16>(ETHERTYPE_OFF) {
        Ok(t) if t == ETH_P_IPV6.to_be() => inward(ctx),
        Ok(t) if t == ETH_P_IP.to_be() => outward(ctx),
        _ => Verdict::Pass,
    }
}

/// Whether a container's IPv4 packet (`key`) to one of the host's addresses is the reply of a
/// NAT64 connection: its key, mapped, is tracked in the IPv6 tables (only NAT64 keeps IPv4
/// keys there). Called by the IPv4 container ingress program for its untracked packets to the
/// host only; a frame of its own so that the key does not sit on that program's main frame.
#[inline(never)]
pub fn is_reply(key: &CtKey) -> bool {
    let mapped = CtKey6 {
        saddr: In6Addr::mapped_v4(key.saddr),
        daddr: In6Addr::mapped_v4(key.daddr),
        sport: key.sport,
        dport: key.dport,
        proto: key.proto,
        _pad: [0; 3],
    };
    conntrack::lookup(&mapped).is_some()
}

/// A request from an IPv6 client: of a tracked NAT64 connection, or a new connection to a
/// published port whose container has only IPv4.
#[inline(always)]
fn inward(ctx: &TcContext) -> Verdict {
    let Some(ip) = parse_ipv6(ctx) else {
        return Verdict::Drop(DropReason::Malformed);
    };
    if ip.frag != 0 || ip.l4_offset != L4_OFF6 {
        return Verdict::Pass;
    }
    if ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP {
        return Verdict::Pass;
    }
    let Some(l4) = translate6::parse_l4(ctx, &ip) else {
        return Verdict::Pass;
    };
    if ip.protocol == IPPROTO_UDP && ctx.load::<u16>(l4.csum_offset).is_ok_and(|c| c == 0) {
        // IPv6 has no checksum-less UDP (its receiver would drop it); as IPv4 it would pass
        // unchecked.
        return Verdict::Drop(DropReason::InvalidL4Header);
    }
    let key = CtKey6 {
        saddr: In6Addr(ip.saddr),
        daddr: In6Addr(ip.daddr),
        sport: l4.sport,
        dport: l4.dport,
        proto: ip.protocol,
        _pad: [0; 3],
    };
    let seen = seen(ctx, ip.len, &l4, Hook::UplinkIngress);
    let reply = if let Some(entry) = conntrack::lookup_packet(&key, l4.tcp_flags) {
        // SAFETY: a map value from this program run's lookup.
        let (rewrite, is_reply, peer) =
            unsafe { ((*entry).rewrite, (*entry).is_reply, (*entry).peer) };
        if rewrite != ct_rewrite::NAT64 || is_reply != 0 {
            return Verdict::Pass;
        }
        conntrack::account(&key, entry, &seen);
        peer
    } else {
        match track(ctx, &ip, &l4, &key) {
            Ok(Some(reply)) => reply,
            Ok(None) => return Verdict::Pass,
            Err(reason) => return Verdict::Drop(reason),
        }
    };
    // To the container (the reply key's source) from the gateway at the allocated port (its
    // destination).
    let (Some(saddr), Some(daddr)) = (reply.daddr.as_mapped_v4(), reply.saddr.as_mapped_v4())
    else {
        return Verdict::Pass;
    };
    if to_ipv4(ctx, &ip, &l4, saddr, reply.dport, daddr, reply.sport).is_err() {
        return Verdict::Drop(DropReason::Malformed);
    }
    deliver4(ctx, daddr)
}

/// A new connection to a published port (`key`, its first packet) that leads to an IPv4-only
/// container: tracked, with a source port of the container network's gateway allocated as
/// masquerade's are. Its reply key, or None when the port is not one of those (or the
/// container's gateway is unknown): the packet then passes untouched, as before.
#[inline(always)]
fn track(
    ctx: &TcContext,
    ip: &crate::parse::Ipv6Packet,
    l4: &translate6::L4v6,
    key: &CtKey6,
) -> Result<Option<CtKey6>, DropReason> {
    let Some(target) = translate6::published_target(ip, l4) else {
        return Ok(None);
    };
    let Some(container) = target.addr.as_mapped_v4() else {
        return Ok(None);
    };
    if target.is_service != 0 {
        return Ok(None);
    }
    let Some(endpoint) = ENDPOINTS.get_ptr(&container) else {
        return Ok(None);
    };
    // SAFETY: a map value from this program run's lookup.
    let gateway = unsafe { (*endpoint).gateway };
    if gateway == 0 {
        return Ok(None);
    }
    let Some(config) = CONFIG.get_ptr(0) else {
        return Ok(None);
    };
    // SAFETY: array element 0 always exists.
    let (port_min, port_max) = unsafe { ((*config).snat_port_min, (*config).snat_port_max) };
    let Some(connection) = NEW_CONNECTION6.get_ptr_mut(0) else {
        return Ok(None);
    };
    // SAFETY: this CPU's element, used by this program run only; filled field by field.
    let connection = unsafe { &mut *connection };
    connection.forward = *key;
    connection.reply = *key;
    connection.origin = ct_origin::PUBLISHED;
    connection.rewrite = ct_rewrite::NAT64;
    connection.nat_addr = In6Addr::mapped_v4(gateway);
    connection.nat_port = 0;
    // The reply entry's translation source (for `ct_rewrite::NAT64` it is also its peer's).
    connection.orig_addr = key.daddr;
    connection.orig_port = key.dport;
    connection.hairpin_port = 0;
    connection.reply_hairpin_port = 0;
    connection.len = ip.len;
    connection.tcp_flags = l4.tcp_flags;
    connection.icmp_type = 0;
    connection.icmp_code = 0;
    // The client's own port when that tuple towards the container is free, else a probed
    // one (no host socket check: the gateway's sockets towards a container are the host's
    // own connections to it, from Linux's ephemeral range, which the probed range avoids).
    nat::allocate_source_port(
        connection,
        In6Addr::mapped_v4(container),
        target.port,
        port_min,
        port_max,
        None,
    )?;
    let reply = connection.reply;
    let source_port = connection.nat_port;
    // The forward entry names the container for the records (the translation itself is
    // the peer key's), the reply entry is NAT64's too (the shared code makes it NONE).
    if let Some(forward) = conntrack::lookup(key) {
        // SAFETY: a map value from this program run's lookup.
        unsafe {
            (*forward).nat_addr = target.addr;
            (*forward).nat_port = target.port;
            (*forward).hairpin_port = source_port;
        }
    }
    if let Some(back) = conntrack::lookup(&reply) {
        // SAFETY: as above.
        unsafe { (*back).rewrite = ct_rewrite::NAT64 };
    }
    if key.proto != IPPROTO_TCP {
        // TCP's is reported when its handshake completes (conntrack::account).
        flow::new_connection(&flow::NewFlowOf {
            forward: *key,
            origin: ct_origin::PUBLISHED,
            rewrite: ct_rewrite::NAT64,
            nat_addr: target.addr,
            nat_port: target.port,
            hairpin_port: source_port,
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
    Ok(Some(reply))
}

#[inline(always)]
fn seen(ctx: &TcContext, len: u32, l4: &translate6::L4v6, hook: Hook) -> conntrack::Seen {
    conntrack::Seen {
        len,
        tcp_flags: l4.tcp_flags,
        seq: l4.seq,
        ack_seq: l4.ack_seq,
        icmp_type: 0,
        icmp_code: 0,
        hook: hook.number(),
        // SAFETY: `skb` points at the context the kernel passed to this program.
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
    }
}

/// A container's reply, tracked by a NAT64 connection: back to IPv6, from the published
/// address and port to the client, out of the uplink.
#[inline(always)]
fn outward(ctx: &TcContext) -> Verdict {
    let Frame::Ipv4(ip) = parse_tc(ctx) else {
        return Verdict::Pass;
    };
    if ip.l4_offset != L4_OFF4 || ip.frag & 0x3fff != 0 {
        return Verdict::Pass;
    }
    let l4 = match crate::parse::parse_l4(ctx, &ip) {
        Transport::Tracked(l4) => l4,
        _ => return Verdict::Pass,
    };
    if ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP {
        return Verdict::Pass;
    }
    let key = CtKey6 {
        saddr: In6Addr::mapped_v4(ip.saddr),
        daddr: In6Addr::mapped_v4(ip.daddr),
        sport: l4.sport,
        dport: l4.dport,
        proto: ip.protocol,
        _pad: [0; 3],
    };
    let Some(entry) = conntrack::lookup_packet(&key, l4.tcp_flags) else {
        return Verdict::Pass;
    };
    // SAFETY: a map value from this program run's lookup.
    let (rewrite, is_reply, forward) =
        unsafe { ((*entry).rewrite, (*entry).is_reply, (*entry).peer) };
    if rewrite != ct_rewrite::NAT64 || is_reply != 1 {
        return Verdict::Pass;
    }
    let is_udp = ip.protocol == IPPROTO_UDP;
    if is_udp && ctx.load::<u16>(l4.csum_offset).is_ok_and(|c| c == 0) {
        // No checksum: IPv6 requires one, and computing it would mean summing the payload.
        return Verdict::Drop(DropReason::InvalidL4Header);
    }
    conntrack::account(
        &key,
        entry,
        &conntrack::Seen {
            len: ip.len,
            tcp_flags: l4.tcp_flags,
            seq: l4.seq,
            ack_seq: l4.ack_seq,
            icmp_type: 0,
            icmp_code: 0,
            hook: Hook::ContainerIngress.number(),
            // SAFETY: `skb` points at the context the kernel passed to this program.
            ifindex: unsafe { (*ctx.skb.skb).ifindex },
        },
    );
    let csum_offset = L4_OFF4 + if is_udp { 6 } else { 16 };
    let flags = if is_udp {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    // Ports: from the published port, to the client's.
    if set_port(ctx, csum_offset, flags, L4_OFF4, l4.sport, forward.dport).is_err()
        || set_port(
            ctx,
            csum_offset,
            flags,
            L4_OFF4 + 2,
            l4.dport,
            forward.sport,
        )
        .is_err()
    {
        return Verdict::Drop(DropReason::Malformed);
    }
    // The pseudo-header: 32-bit addresses out, 128-bit ones in (its length and protocol are
    // the same sum in both families).
    let mut old = [ip.saddr, ip.daddr];
    let mut new = [
        forward.daddr.0[0],
        forward.daddr.0[1],
        forward.daddr.0[2],
        forward.daddr.0[3],
        forward.saddr.0[0],
        forward.saddr.0[1],
        forward.saddr.0[2],
        forward.saddr.0[3],
    ];
    if pseudo_header(ctx, csum_offset, flags, &mut old, 8, &mut new, 32).is_err() {
        return Verdict::Drop(DropReason::Malformed);
    }
    // Read what the IPv6 header keeps before the IPv4 one moves.
    let (Ok(tos_word), Ok(ttl)) = (
        ctx.load::<u16>(ETH_HDR_LEN),
        ctx.load::<u8>(ETH_HDR_LEN + 8),
    ) else {
        return Verdict::Drop(DropReason::Malformed);
    };
    let tos = u32::from(u16::from_be(tos_word) & 0xff);
    let payload_len = u32::from(ip.total_len) - IPV4_HDR_LEN as u32;
    if ctx.change_proto(ETH_P_IPV6.to_be(), 0).is_err() {
        return Verdict::Drop(DropReason::Malformed);
    }
    let header: [u32; 10] = [
        (6u32 << 28 | tos << 20).to_be(),
        (payload_len << 16 | u32::from(ip.protocol) << 8 | u32::from(ttl)).to_be(),
        new[0],
        new[1],
        new[2],
        new[3],
        new[4],
        new[5],
        new[6],
        new[7],
    ];
    // RECOMPUTE_CSUM keeps a CHECKSUM_COMPLETE packet's sum right (the bytes the kernel
    // inserted are zeros, which it left out of the sum).
    if ctx
        .store(ETH_HDR_LEN, &header, u64::from(BPF_F_RECOMPUTE_CSUM))
        .is_err()
        || ctx.store(ETHERTYPE_OFF, &ETH_P_IPV6.to_be(), 0).is_err()
    {
        return Verdict::Drop(DropReason::Malformed);
    }
    // The reply of a published port from the host's address: never into the host's stack
    // (see translate6's reply_to_client), straight out of the uplink.
    match CONFIG.get_ptr(0) {
        // SAFETY: array element 0 always exists.
        Some(config) if unsafe { (*config).uplink_ifindex } != 0 => {
            // SAFETY: as just above.
            Verdict::RedirectNeigh(unsafe { (*config).uplink_ifindex })
        }
        _ => Verdict::Drop(DropReason::Malformed),
    }
}

/// The IPv6 request `ip` as an IPv4 packet from `saddr`:`sport` to `daddr`:`dport` (ports
/// network order): ports and pseudo-header in the TCP/UDP checksum first (where the header
/// still is), then the header itself, 20 bytes shorter, with its own checksum.
#[inline(always)]
fn to_ipv4(
    ctx: &TcContext,
    ip: &crate::parse::Ipv6Packet,
    l4: &translate6::L4v6,
    saddr: u32,
    sport: u16,
    daddr: u32,
    dport: u16,
) -> Result<(), ()> {
    let is_udp = ip.protocol == IPPROTO_UDP;
    // An IPv6 UDP checksum is never 0, so MARK_MANGLED_0 only keeps a result of 0 as 0xffff.
    let flags = if is_udp {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let csum_offset = l4.csum_offset;
    set_port(ctx, csum_offset, flags, L4_OFF6, l4.sport, sport)?;
    set_port(ctx, csum_offset, flags, L4_OFF6 + 2, l4.dport, dport)?;
    let mut old = [
        ip.saddr[0],
        ip.saddr[1],
        ip.saddr[2],
        ip.saddr[3],
        ip.daddr[0],
        ip.daddr[1],
        ip.daddr[2],
        ip.daddr[3],
    ];
    let mut new = [saddr, daddr];
    pseudo_header(ctx, csum_offset, flags, &mut old, 32, &mut new, 8)?;
    let word = u32::from_be(ctx.load::<u32>(ETH_HDR_LEN).map_err(|_| ())?);
    let tos = (word >> 20) & 0xff;
    let ttl = u32::from(ctx.load::<u8>(ETH_HDR_LEN + 7).map_err(|_| ())?);
    let total_len = ip.payload_len + IPV4_HDR_LEN as u32;
    if total_len > 0xffff {
        return Err(());
    }
    let mut header: [u32; 5] = [
        0x4500_0000 | tos << 16 | total_len,
        u32::from(IP_DF),
        ttl << 24 | u32::from(ip.protocol) << 16,
        u32::from_be(saddr),
        u32::from_be(daddr),
    ];
    header[2] |= u32::from(ipv4_checksum(&header));
    for w in header.iter_mut() {
        *w = w.to_be();
    }
    ctx.change_proto(ETH_P_IP.to_be(), 0).map_err(|_| ())?;
    // RECOMPUTE_CSUM keeps a CHECKSUM_COMPLETE packet's sum right (the kernel took the bytes
    // it removed out of it).
    ctx.store(ETH_HDR_LEN, &header, u64::from(BPF_F_RECOMPUTE_CSUM))
        .map_err(|_| ())?;
    ctx.store(ETHERTYPE_OFF, &ETH_P_IP.to_be(), 0)
        .map_err(|_| ())
}

/// The IPv4 header checksum of `header` (host-order words, checksum field 0).
#[inline(always)]
fn ipv4_checksum(header: &[u32; 5]) -> u16 {
    let mut sum = 0u32;
    for w in header {
        sum += (w >> 16) + (w & 0xffff);
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Rewrites the port at `offset` from `old` to `new` (network order), with its checksum.
#[inline(always)]
fn set_port(
    ctx: &TcContext,
    csum_offset: usize,
    flags: u64,
    offset: usize,
    old: u16,
    new: u16,
) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(csum_offset, u64::from(old), u64::from(new), flags | 2)
        .map_err(|_| ())?;
    ctx.store(offset, &new, 0).map_err(|_| ())
}

/// Folds the change of the pseudo-header's addresses (`old` to `new`, sizes in bytes) into the
/// TCP/UDP checksum. Without BPF_F_IPV6: the checksum field's change is the only change of the
/// bytes a CHECKSUM_COMPLETE sum covers that the header store (RECOMPUTE_CSUM) does not
/// account for, so the kernel must fold it into that sum too.
#[inline(always)]
fn pseudo_header<const N: usize, const M: usize>(
    ctx: &TcContext,
    csum_offset: usize,
    flags: u64,
    old: &mut [u32; N],
    old_size: u32,
    new: &mut [u32; M],
    new_size: u32,
) -> Result<(), ()> {
    // SAFETY: both buffers are on this frame, of the sizes given.
    let diff = unsafe { bpf_csum_diff(old.as_mut_ptr(), old_size, new.as_mut_ptr(), new_size, 0) };
    if diff < 0 {
        return Err(());
    }
    ctx.l4_csum_replace(
        csum_offset,
        0,
        diff as u64,
        flags | u64::from(BPF_F_PSEUDO_HDR),
    )
    .map_err(|_| ())
}

/// Into the container's namespace (bpf_redirect_peer) with its MAC, as translate.rs delivers.
#[inline(always)]
fn deliver4(ctx: &TcContext, daddr: u32) -> Verdict {
    let Some(endpoint) = ENDPOINTS.get_ptr(&daddr) else {
        return Verdict::Pass;
    };
    // SAFETY: a map value from this program run's lookup, read in place.
    let (ifindex, mac) = unsafe { ((*endpoint).ifindex, &(*endpoint).mac) };
    if ifindex == 0 || ctx.store(0, mac, 0).is_err() {
        return Verdict::Pass;
    }
    Verdict::RedirectPeer(ifindex)
}
