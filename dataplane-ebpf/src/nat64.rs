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
//! Fragments: a client's IPv6 fragments become IPv4 fragments (RFC 7915: the fragment
//! header's offset and "more fragments" in IPv4's fields, DF clear, the identification's low
//! 16 bits), the first one's fragment header taken out before its translation
//! (`strip_fragment_header`), the later ones following it through the fragment map
//! (`later_fragment_to_ipv4`). A container's IPv4 fragments are not translated (they would
//! grow by 28 bytes past the uplink's MTU; they pass to the host as before).
//!
//! Limits (README, "IPv6"): no other IPv6 extension header and no IPv4 options (such
//! packets pass as before); a UDP reply without a checksum is dropped (IPv6 requires one),
//! `InvalidL4Header`, and so is a request without one (never valid in IPv6). MTU: the
//! requests get 20 bytes shorter; the replies 20 bytes longer, which TCP fits by itself (the
//! container's segments are sized by the client's MSS, which the client computed for IPv6's
//! 40-byte header, so they grow back to the client's own MTU); a UDP reply within 20 bytes
//! of the uplink's MTU is dropped by the device.
//!
//! ICMP errors about these connections are translated between the families (RFC 7915), so
//! path MTU discovery works through NAT64: an ICMPv6 error from the client's side about a
//! reply (packet too big, unreachable, time exceeded) reaches the container as the ICMPv4
//! error about its own packet, from its gateway; an ICMPv4 error of the container about a
//! request (its port unreachable, ...) reaches the client as the ICMPv6 one, from the
//! published address. What RFC 7915 does not translate (parameter problems but an unknown
//! next header, ...) passes untouched, as before. Drops get their flow records from the drop
//! reporter, of the family the packet had.

use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM,
        bpf_adj_room_mode::BPF_ADJ_ROOM_NET,
    },
    cty::c_void,
    helpers::{bpf_csum_diff, bpf_skb_load_bytes},
    programs::TcContext,
};
use dataplane_common::{CtKey, CtKey6, DropReason, FragKey6, In6Addr, ct_origin, ct_rewrite};

use crate::{
    conntrack, flow,
    maps::{CONFIG, ENDPOINTS, FRAGMENTS6, NAT64_ICMP, NEW_CONNECTION6},
    nat,
    parse::{
        ETH_HDR_LEN, ETH_P_IP, ETH_P_IPV6, Frame, IP6_SADDR_OFF, IPPROTO_ICMP, IPPROTO_ICMPV6,
        IPPROTO_TCP, IPPROTO_UDP, IPV6_FRAGMENT, IPV6_HDR_LEN, Transport, parse_ipv6, parse_tc,
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
    let (verdict, hook) = match ctx.load::<u16>(ETHERTYPE_OFF) {
        Ok(t) if t == ETH_P_IPV6.to_be() => (from_client(ctx), Hook::UplinkIngress),
        Ok(t) if t == ETH_P_IP.to_be() => (outward(ctx), Hook::ContainerIngress),
        _ => return Verdict::Pass,
    };
    // A drop's flow event, by the drop reporter (which returns only if it is missing).
    translate6::hand_over_drop(ctx, hook, &verdict);
    verdict
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

/// A frame of an IPv6 client (checked by the IPv6 program that tail-called this one): an
/// ICMPv6 error, a later fragment, or a request (a first fragment's without its fragment
/// header, which becomes IPv4's fragment fields).
#[inline(always)]
fn from_client(ctx: &TcContext) -> Verdict {
    // SAFETY: `skb` points at the context the kernel passed to this program; tc programs may
    // write cb[]. No fragment until one is seen.
    unsafe { (*ctx.skb.skb).cb[1] = 0 };
    match ctx.load::<u8>(ETH_HDR_LEN + 6) {
        Ok(IPPROTO_ICMPV6) => return icmp_error_to_ipv4(ctx),
        Ok(IPV6_FRAGMENT) => match ctx.load::<u16>(L4_OFF6 + 2) {
            Ok(word) if u16::from_be(word) & IP6_OFFSET_MASK != 0 => {
                return later_fragment_to_ipv4(ctx);
            }
            Ok(_) => {
                if strip_fragment_header(ctx).is_err() {
                    return Verdict::Pass;
                }
            }
            Err(_) => return Verdict::Pass,
        },
        _ => {}
    }
    inward(ctx)
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
    let key = translate6::key_of(&ip, &l4);
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
    // SAFETY: as in `from_client`.
    if unsafe { (*ctx.skb.skb).cb[1] } != 0 {
        remember_first_fragment(ctx, &key);
    }
    deliver4(ctx, daddr)
}

/// IPv6's fragment header: its length, and the offset and "more fragments" bits of its
/// second 16-bit word; IPv4's "more fragments".
const FRAG_HDR_LEN: usize = 8;
const IP6_OFFSET_MASK: u16 = 0xfff8;
const IP_MF: u32 = 0x2000;

/// The IPv4 identification and fragment word (RFC 7915: the identification's low 16 bits,
/// the offset in the same 8-byte units, "more fragments" kept, DF clear) of an IPv6 fragment
/// header's second word `frag` (host order) and identification `id` (network order).
#[inline(always)]
fn ipv4_fragment_word(frag: u16, id: u32) -> u32 {
    let more = if frag & 1 != 0 { IP_MF } else { 0 };
    (u32::from_be(id) & 0xffff) << 16 | more | u32::from(frag >> 3)
}

/// A first fragment of a TCP or UDP datagram: its fragment header (the only extension
/// header) taken out, the IPv6 header's next header and payload length set as if it had had
/// none, so that the request's translation treats it as any packet; the IPv4 fragment word
/// it is to get is left in cb[1] for `to_ipv4` (never 0: a first fragment has "more
/// fragments"; an atomic one, offset 0 and no more, is a datagram and gets DF), the
/// identification in cb[2] for the later fragments' record. Out of line: its loads stay out
/// of the program's main frame.
#[inline(never)]
fn strip_fragment_header(ctx: &TcContext) -> Result<(), ()> {
    let (Ok(next), Ok(frag), Ok(id), Ok(payload_len)) = (
        ctx.load::<u8>(L4_OFF6),
        ctx.load::<u16>(L4_OFF6 + 2),
        ctx.load::<u32>(L4_OFF6 + 4),
        ctx.load::<u16>(ETH_HDR_LEN + 4),
    ) else {
        return Err(());
    };
    let payload_len = u16::from_be(payload_len);
    if (next != IPPROTO_TCP && next != IPPROTO_UDP) || usize::from(payload_len) < FRAG_HDR_LEN {
        return Err(());
    }
    // RECOMPUTE_CSUM: a CHECKSUM_COMPLETE sum covers the header too.
    let recompute = u64::from(BPF_F_RECOMPUTE_CSUM);
    let shorter = (payload_len - FRAG_HDR_LEN as u16).to_be();
    if ctx.store(ETH_HDR_LEN + 4, &shorter, recompute).is_err()
        || ctx.store(ETH_HDR_LEN + 6, &next, recompute).is_err()
        || ctx
            .adjust_room(-(FRAG_HDR_LEN as i32), BPF_ADJ_ROOM_NET, 0)
            .is_err()
    {
        return Err(());
    }
    let word = ipv4_fragment_word(u16::from_be(frag), id);
    // SAFETY: as in `from_client`.
    unsafe {
        (*ctx.skb.skb).cb[1] = if word == 0 { u32::from(IP_DF) } else { word };
        (*ctx.skb.skb).cb[2] = id;
    }
    Ok(())
}

/// A first fragment translated: the rest of its datagram follows it (its identification in
/// cb[2]; `later_fragment_to_ipv4`). Out of line: the fragment map's key and value are built
/// on a frame of their own, not on the program's main one.
#[inline(never)]
fn remember_first_fragment(ctx: &TcContext, key: &CtKey6) {
    // SAFETY: as in `from_client`.
    let id = unsafe { (*ctx.skb.skb).cb[2] };
    translate6::remember_first_fragment(key, id, &Verdict::Pass);
}

/// A later fragment of a datagram whose first fragment NAT64 translated (found through the
/// fragment map, as the IPv6 programs' later fragments are): the same translation of its
/// addresses (no ports: they are in the first fragment, and so is the checksum), its
/// fragment header made IPv4's fields, 28 bytes shorter, into the container. A fragment
/// whose first was not seen is dropped (`FRAGMENT_NOT_FOUND`), as the IPv6 programs drop
/// theirs. Out of line, its keys in the per-CPU scratch: the program's main frame leaves 144
/// bytes for its calls.
#[inline(never)]
fn later_fragment_to_ipv4(ctx: &TcContext) -> Verdict {
    let Some(scratch) = NAT64_ICMP.get_ptr_mut(0) else {
        return Verdict::Pass;
    };
    // SAFETY: this CPU's element, used by this program run only.
    let s = unsafe { &mut *scratch };
    let skb = ctx.skb.skb.cast::<c_void>();
    // SAFETY: the helper writes both addresses (32 bytes) from the fragment key's first
    // field, the two being next to each other (repr(C)).
    let loaded = unsafe {
        bpf_skb_load_bytes(
            skb,
            IP6_SADDR_OFF as u32,
            core::ptr::addr_of_mut!(s.fragment.saddr).cast(),
            32,
        ) == 0
    };
    let (Ok(protocol), Ok(frag), Ok(id), Ok(payload_len), Ok(word0), Ok(hop_limit)) = (
        ctx.load::<u8>(L4_OFF6),
        ctx.load::<u16>(L4_OFF6 + 2),
        ctx.load::<u32>(L4_OFF6 + 4),
        ctx.load::<u16>(ETH_HDR_LEN + 4),
        ctx.load::<u32>(ETH_HDR_LEN),
        ctx.load::<u8>(ETH_HDR_LEN + 7),
    ) else {
        return Verdict::Pass;
    };
    if !loaded {
        return Verdict::Pass;
    }
    s.fragment.id = id;
    s.fragment.proto = protocol;
    s.fragment._pad = [0; 3];
    let Some(first) = FRAGMENTS6.get_ptr(&s.fragment) else {
        return Verdict::Drop(DropReason::FragmentNotFound);
    };
    // SAFETY: a map value from this program run's lookup, read field by field.
    let (sport, dport, dropped) = unsafe { ((*first).sport, (*first).dport, (*first).drop_reason) };
    if dropped != 0 {
        return Verdict::Drop(crate::translate::recorded_drop(dropped));
    }
    s.key.saddr = s.fragment.saddr;
    s.key.daddr = s.fragment.daddr;
    s.key.sport = sport;
    s.key.dport = dport;
    s.key.proto = protocol;
    s.key._pad = [0; 3];
    match nat64_peer(s, 0) {
        None => return Verdict::Drop(DropReason::FragmentNotFound),
        Some(false) => return Verdict::Pass,
        Some(true) => {}
    }
    // From the gateway (the reply key's destination) to the container (its source).
    let (Some(gateway), Some(container)) =
        (s.peer.daddr.as_mapped_v4(), s.peer.saddr.as_mapped_v4())
    else {
        return Verdict::Pass;
    };
    let payload_len = u32::from(u16::from_be(payload_len));
    if payload_len < FRAG_HDR_LEN as u32 {
        return Verdict::Drop(DropReason::Malformed);
    }
    let total_len = payload_len - FRAG_HDR_LEN as u32 + IPV4_HDR_LEN as u32;
    write_ipv4_header(
        &mut s.to,
        u32::from_be(word0) >> 20,
        total_len,
        ipv4_fragment_word(u16::from_be(frag), id),
        u32::from(hop_limit),
        protocol,
        gateway,
        container,
    );
    // 20 bytes off the front of the header (the family), then the fragment header after the
    // new IPv4 header's room.
    if s.to
        .first_chunk::<5>()
        .is_none_or(|header| change_family(ctx, ETH_P_IP, -(FRAG_HDR_LEN as i32), header).is_err())
    {
        return Verdict::Drop(DropReason::Malformed);
    }
    deliver4(ctx, container)
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
    if ip.l4_offset != L4_OFF4 || ip.frag & 0x3fff != 0 || !ipv4_header_sound(ctx) {
        return Verdict::Pass;
    }
    if ip.protocol == IPPROTO_ICMP {
        return icmp_error_to_ipv6(ctx);
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
    to_uplink()
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
    // A first fragment's fragment word (`strip_fragment_header`), else DF.
    // SAFETY: as in `from_client`.
    let fragment = unsafe { (*ctx.skb.skb).cb[1] };
    let mut header = [0u32; 5];
    write_ipv4_header(
        &mut header,
        tos,
        total_len,
        if fragment == 0 {
            u32::from(IP_DF)
        } else {
            fragment
        },
        ttl,
        ip.protocol,
        saddr,
        daddr,
    );
    ctx.change_proto(ETH_P_IP.to_be(), 0).map_err(|_| ())?;
    // RECOMPUTE_CSUM keeps a CHECKSUM_COMPLETE packet's sum right (the kernel took the bytes
    // it removed out of it).
    ctx.store(ETH_HDR_LEN, &header, u64::from(BPF_F_RECOMPUTE_CSUM))
        .map_err(|_| ())?;
    ctx.store(ETHERTYPE_OFF, &ETH_P_IP.to_be(), 0)
        .map_err(|_| ())
}

/// ICMPv6 error types (RFC 4443) and the ICMPv4 ones RFC 7915 translates them to.
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
const ICMPV6_PARAMETER_PROBLEM: u8 = 4;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// ICMPv4's destination unreachable codes.
const ICMP_HOST_UNREACH: u8 = 1;
const ICMP_PROT_UNREACH: u8 = 2;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_HOST_ANO: u8 = 10;

/// The ICMPv4 type and code RFC 7915 (section 5.2) gives an ICMPv6 error; None for those it
/// drops (parameter problems other than an unknown next header, whose pointer into the header
/// does not carry over, and unreachable codes beyond port unreachable).
#[inline(always)]
fn icmp_type_to_ipv4(icmp_type: u8, code: u8) -> Option<(u8, u8)> {
    match (icmp_type, code) {
        (ICMPV6_DEST_UNREACH, 0 | 2 | 3) => Some((ICMP_DEST_UNREACH, ICMP_HOST_UNREACH)),
        (ICMPV6_DEST_UNREACH, 1) => Some((ICMP_DEST_UNREACH, ICMP_HOST_ANO)),
        (ICMPV6_DEST_UNREACH, 4) => Some((ICMP_DEST_UNREACH, ICMP_PORT_UNREACH)),
        (ICMPV6_PACKET_TOO_BIG, _) => Some((ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED)),
        (ICMPV6_TIME_EXCEEDED, _) => Some((ICMP_TIME_EXCEEDED, code)),
        (ICMPV6_PARAMETER_PROBLEM, 1) => Some((ICMP_DEST_UNREACH, ICMP_PROT_UNREACH)),
        _ => None,
    }
}

/// The buffers of the ICMP error translations ([`icmp_error_to_ipv4`],
/// [`icmp_error_to_ipv6`]; in `NAT64_ICMP`, per CPU), too big for the stack beside the
/// program's main frame. Words in network order, as in the packet.
#[repr(C)]
pub struct IcmpScratch {
    /// What leaves the ICMP checksum. To IPv4: the IPv6 pseudo-header (10 words: the
    /// addresses loaded straight from the header, length, next header), the ICMPv6 header
    /// with its checksum zeroed (2), the quoted IPv6 header (10), the quoted ports (1). To
    /// IPv6: the ICMPv4 header with its checksum zeroed (2), the quoted IPv4 header (5), the
    /// quoted ports (1).
    from: [u32; 23],
    /// The headers the packet gets, up to the quoted ports included. To IPv4: the IPv4 header
    /// (5 words), the ICMPv4 header (2), the quoted IPv4 header (5), the ports (1). To IPv6:
    /// the IPv6 header (10), the ICMPv6 header (2), the quoted IPv6 header (10), the ports (1).
    to: [u32; 23],
    /// The connection's key (the quote's tuple reversed; a later fragment's, with its first's
    /// ports), and its other key.
    key: CtKey6,
    peer: CtKey6,
    /// A later fragment's datagram, as the fragment map knows it.
    fragment: FragKey6,
}

/// Where an ICMPv6 error's parts are in a packet without extension headers (the caller's
/// check): its header, the quoted IPv6 header, the quoted ports.
const ICMP6_OFF: usize = L4_OFF6;
const QUOTED6_OFF: usize = ICMP6_OFF + 8;
const QUOTED6_PORTS_OFF: usize = QUOTED6_OFF + IPV6_HDR_LEN;

/// An ICMPv6 error from the way to a NAT64 connection's client (packet too big above all: path
/// MTU discovery through NAT64 depends on it), quoting the connection's reply as it left:
/// translated into the ICMPv4 error the container would get were the whole path IPv4 (RFC
/// 7915), from its gateway (which the container sees as the client) and quoting the reply as
/// the container sent it (to the gateway at the allocated port), then delivered into the
/// container. The message loses 40 bytes (20 of each header); the rest of the quote is left
/// as it was, its TCP/UDP checksum too (as the IPv6 path leaves a quote's: receivers match a
/// quote by its addresses and ports). The ICMPv4 checksum (no pseudo-header) is the ICMPv6
/// one with every change folded in. Anything else ICMPv6 passes untouched, as before.
///
/// Out of line, with everything of size in the per-CPU scratch and the packet read again at
/// fixed offsets: the program's main frame leaves 144 bytes for its calls.
#[inline(never)]
fn icmp_error_to_ipv4(ctx: &TcContext) -> Verdict {
    let Some(scratch) = NAT64_ICMP.get_ptr_mut(0) else {
        return Verdict::Pass;
    };
    // SAFETY: this CPU's element, used by this program run only.
    let s = unsafe { &mut *scratch };
    let skb = ctx.skb.skb.cast::<c_void>();
    // SAFETY: the helper writes 32 bytes from word 0 (both addresses), 40 from word 12 and 4
    // at word 22, all inside `from`; constant lengths, as the verifier needs them.
    let loaded = unsafe {
        let from = s.from.as_mut_ptr();
        bpf_skb_load_bytes(skb, IP6_SADDR_OFF as u32, from.cast(), 32) == 0
            && bpf_skb_load_bytes(skb, QUOTED6_OFF as u32, from.add(12).cast(), 40) == 0
            && bpf_skb_load_bytes(skb, QUOTED6_PORTS_OFF as u32, from.add(22).cast(), 4) == 0
    };
    let (Ok(first), Ok(second), Ok(payload_len), Ok(word0), Ok(hop_limit)) = (
        ctx.load::<u32>(ICMP6_OFF),
        ctx.load::<u32>(ICMP6_OFF + 4),
        ctx.load::<u16>(ETH_HDR_LEN + 4),
        ctx.load::<u32>(ETH_HDR_LEN),
        ctx.load::<u8>(ETH_HDR_LEN + 7),
    ) else {
        return Verdict::Pass;
    };
    let head = u32::from_be(first);
    let Some((icmp_type, code)) = icmp_type_to_ipv4((head >> 24) as u8, (head >> 16) as u8) else {
        return Verdict::Pass;
    };
    // An error about an IPv6 TCP or UDP packet (no extension header in the quote), within
    // the length the header gives the message: the bytes past it may be in the frame
    // (loaded), but the checksum covers none of them, nor would the IPv4 header's length.
    let (q0, q1) = (u32::from_be(s.from[12]), u32::from_be(s.from[13]));
    let protocol = (q1 >> 8) as u8;
    if !loaded
        || usize::from(u16::from_be(payload_len)) < QUOTED6_PORTS_OFF + 4 - ICMP6_OFF
        || q0 >> 28 != 6
        || (protocol != IPPROTO_TCP && protocol != IPPROTO_UDP)
    {
        return Verdict::Pass;
    }
    // The quote is the connection's reply as it left: its tuple reversed is the forward key.
    s.key.saddr = In6Addr([s.from[18], s.from[19], s.from[20], s.from[21]]);
    s.key.daddr = In6Addr([s.from[14], s.from[15], s.from[16], s.from[17]]);
    // The ports word as in memory: the source port's bytes first.
    s.key.sport = (s.from[22] >> 16) as u16;
    s.key.dport = s.from[22] as u16;
    s.key.proto = protocol;
    s.key._pad = [0; 3];
    if nat64_peer(s, 0) != Some(true) {
        return Verdict::Pass;
    }
    // The reply key is the container's packet as it left: container -> gateway.
    let (Some(container), Some(gateway)) =
        (s.peer.saddr.as_mapped_v4(), s.peer.daddr.as_mapped_v4())
    else {
        return Verdict::Pass;
    };
    let payload_len = u32::from(u16::from_be(payload_len));
    s.from[8] = payload_len.to_be();
    s.from[9] = u32::from(IPPROTO_ICMPV6).to_be();
    s.from[10] = (head & 0xffff_0000).to_be();
    s.from[11] = second;
    // The outer header: from the gateway to the container, as long as the IPv6 payload was
    // (20 + 8 + 20 + the rest, where it was 8 + 40 + the rest), traffic class and hop limit
    // kept.
    write_ipv4_header(
        &mut s.to,
        u32::from_be(word0) >> 20,
        payload_len,
        0,
        u32::from(hop_limit),
        IPPROTO_ICMP,
        gateway,
        container,
    );
    // Packet too big: IPv4's next-hop MTU is 20 bytes less (its header is), in the low half of
    // the second word (RFC 1191); the other errors' second word is unused. Never under what
    // IPv6's minimum gives: the path past the translator is IPv6, whose links carry 1280
    // bytes, and whose hosts ignore a smaller MTU (RFC 8201), as an IPv6 server would
    // ignore one forged by anyone who knows the connection's tuple (translated as it came,
    // 0 or 1 would shrink the container's segments to its stack's minimum).
    let mtu = if icmp_type == ICMP_DEST_UNREACH && code == ICMP_FRAG_NEEDED {
        (u32::from_be(second).max(IPV6_MIN_MTU) - 20).min(0xffff)
    } else {
        0
    };
    s.to[5] = (u32::from(icmp_type) << 24 | u32::from(code) << 16).to_be();
    s.to[6] = mtu.to_be();
    // The quoted packet's IPv4 header, its traffic class, length and hop limit kept.
    write_ipv4_header(
        &mut s.to[7..],
        q0 >> 20,
        (q1 >> 16) + IPV4_HDR_LEN as u32,
        u32::from(IP_DF),
        q1 & 0xff,
        protocol,
        container,
        gateway,
    );
    s.to[12] = ports_word(s.peer.sport, s.peer.dport);
    // The ICMPv4 checksum: the ICMPv6 one, less what leaves, plus what comes.
    let Ok(old_csum) = ctx.load::<u16>(ICMP6_OFF + 2) else {
        return Verdict::Pass;
    };
    // SAFETY: both buffers are this CPU's map value, of the sizes given.
    let sum = unsafe {
        bpf_csum_diff(
            s.from.as_mut_ptr(),
            23 * 4,
            s.to.as_mut_ptr().add(5),
            8 * 4,
            u32::from(!old_csum),
        )
    };
    if sum < 0 {
        return Verdict::Drop(DropReason::Malformed);
    }
    // The checksum's bytes are the word's third and fourth.
    s.to[5] |= u32::from(fold(sum)) << 16;
    // 20 bytes off the front of the header (the family), then 20 after the new IPv4 header
    // (the quoted header's difference); the 48 bytes before the quoted ports are rewritten.
    if s.to.first_chunk::<13>().is_none_or(|headers| {
        change_family(ctx, ETH_P_IP, -(IPV4_HDR_LEN as i32), headers).is_err()
    }) {
        return Verdict::Drop(DropReason::Malformed);
    }
    deliver4(ctx, container)
}

/// The ICMPv4 error types RFC 7915 (section 4.2) translates, and ICMPv6's for them; the
/// pointer of a parameter problem at the IPv6 header's next-header field.
const ICMP_PARAMETERPROB: u8 = 12;
const ICMPV6_NEXT_HEADER_POINTER: u32 = 6;

/// The ICMPv6 type and code RFC 7915 gives an ICMPv4 error, and the second word's value
/// (the MTU, or the pointer) from the ICMPv4 one's; None for those it drops (parameter
/// problems, whose pointer into the header does not carry over, source quench, redirects).
#[inline(always)]
fn icmp_type_to_ipv6(icmp_type: u8, code: u8, second: u32) -> Option<(u8, u8, u32)> {
    match (icmp_type, code) {
        (ICMP_DEST_UNREACH, ICMP_PORT_UNREACH) => Some((ICMPV6_DEST_UNREACH, 4, 0)),
        (ICMP_DEST_UNREACH, ICMP_PROT_UNREACH) => {
            Some((ICMPV6_PARAMETER_PROBLEM, 1, ICMPV6_NEXT_HEADER_POINTER))
        }
        // IPv6's MTU is 20 bytes more (its header is), and never under IPv6's minimum.
        (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED) => Some((
            ICMPV6_PACKET_TOO_BIG,
            0,
            ((second & 0xffff) + 20).max(IPV6_MIN_MTU),
        )),
        // Administratively prohibited (network, host, communication).
        (ICMP_DEST_UNREACH, 9 | 10 | 13) => Some((ICMPV6_DEST_UNREACH, 1, 0)),
        (ICMP_DEST_UNREACH, 0..=15) => Some((ICMPV6_DEST_UNREACH, 0, 0)),
        (ICMP_TIME_EXCEEDED, _) => Some((ICMPV6_TIME_EXCEEDED, code, 0)),
        (ICMP_PARAMETERPROB, _) => None,
        _ => None,
    }
}

/// The smallest MTU of an IPv6 link (RFC 8200).
const IPV6_MIN_MTU: u32 = 1280;

/// Where an ICMPv4 error's parts are in a packet without IP options (the caller's check): its
/// header, the quoted IPv4 header, the quoted ports.
const ICMP4_OFF: usize = L4_OFF4;
const QUOTED4_OFF: usize = ICMP4_OFF + 8;
const QUOTED4_PORTS_OFF: usize = QUOTED4_OFF + IPV4_HDR_LEN;

/// An ICMPv4 error of an IPv4-only container about a NAT64 connection's request (its port
/// unreachable above all, or a router of its own network's "fragmentation needed"): translated
/// into the ICMPv6 error the client would get were the whole path IPv6 (RFC 7915), from the
/// published address and quoting the request as the client sent it (to the published
/// address and port), then sent out of the uplink as the connection's replies are. The message
/// gains 40 bytes; the rest of the quote is left as it was (as `icmp_error_to_ipv4`). The
/// ICMPv6 checksum (its pseudo-header included) is the ICMPv4 one with every change folded
/// in. Anything else passes untouched, as before. Out of line, as `icmp_error_to_ipv4`.
#[inline(never)]
fn icmp_error_to_ipv6(ctx: &TcContext) -> Verdict {
    let Some(scratch) = NAT64_ICMP.get_ptr_mut(0) else {
        return Verdict::Pass;
    };
    // SAFETY: this CPU's element, used by this program run only.
    let s = unsafe { &mut *scratch };
    let skb = ctx.skb.skb.cast::<c_void>();
    // SAFETY: the helper writes 8 bytes (the ICMPv4 header), 20 from word 2 and 4 at word 7,
    // all inside `from`; constant lengths, as the verifier needs them.
    let loaded = unsafe {
        let from = s.from.as_mut_ptr();
        bpf_skb_load_bytes(skb, ICMP4_OFF as u32, from.cast(), 8) == 0
            && bpf_skb_load_bytes(skb, QUOTED4_OFF as u32, from.add(2).cast(), 20) == 0
            && bpf_skb_load_bytes(skb, QUOTED4_PORTS_OFF as u32, from.add(7).cast(), 4) == 0
    };
    let (Ok(tos), Ok(total_len), Ok(ttl)) = (
        ctx.load::<u8>(ETH_HDR_LEN + 1),
        ctx.load::<u16>(ETH_HDR_LEN + 2),
        ctx.load::<u8>(ETH_HDR_LEN + 8),
    ) else {
        return Verdict::Pass;
    };
    let (head, second) = (u32::from_be(s.from[0]), u32::from_be(s.from[1]));
    // The quote: an IPv4 TCP or UDP packet without options, within the header's total
    // length (as `icmp_error_to_ipv4`: what the frame holds past it is no part of the message).
    let (q0, q2) = (u32::from_be(s.from[2]), u32::from_be(s.from[4]));
    let protocol = (q2 >> 16) as u8;
    if !loaded
        || usize::from(u16::from_be(total_len)) < QUOTED4_PORTS_OFF + 4 - ETH_HDR_LEN
        || q0 >> 24 != 0x45
        || (protocol != IPPROTO_TCP && protocol != IPPROTO_UDP)
    {
        return Verdict::Pass;
    }
    let Some((icmp_type, code, second6)) =
        icmp_type_to_ipv6((head >> 24) as u8, (head >> 16) as u8, second)
    else {
        return Verdict::Pass;
    };
    // The quote is the connection's request as the container got it (gateway -> container):
    // its tuple reversed, mapped, is the reply key.
    s.key.saddr = In6Addr::mapped_v4(s.from[6]);
    s.key.daddr = In6Addr::mapped_v4(s.from[5]);
    s.key.sport = (s.from[7] >> 16) as u16;
    s.key.dport = s.from[7] as u16;
    s.key.proto = protocol;
    s.key._pad = [0; 3];
    if nat64_peer(s, 1) != Some(true) {
        return Verdict::Pass;
    }
    // The peer is the client's request as it arrived: client -> published address.
    let payload_len = u32::from(u16::from_be(total_len)); // 8 + 40 + the rest
    s.to[0] = (6u32 << 28 | u32::from(tos) << 20).to_be();
    s.to[1] = (payload_len << 16 | u32::from(IPPROTO_ICMPV6) << 8 | u32::from(ttl)).to_be();
    s.to[2..6].copy_from_slice(&s.peer.daddr.0);
    s.to[6..10].copy_from_slice(&s.peer.saddr.0);
    s.to[10] = (u32::from(icmp_type) << 24 | u32::from(code) << 16).to_be();
    s.to[11] = second6.to_be();
    // The quoted packet's IPv6 header: its type of service, length and TTL kept.
    let (q1_tos, q_len, q_ttl) = ((q0 >> 16) & 0xff, q0 & 0xffff, q2 >> 24);
    s.to[12] = (6u32 << 28 | q1_tos << 20).to_be();
    s.to[13] = (q_len.saturating_sub(IPV4_HDR_LEN as u32) << 16 | u32::from(protocol) << 8 | q_ttl)
        .to_be();
    s.to[14..18].copy_from_slice(&s.peer.saddr.0);
    s.to[18..22].copy_from_slice(&s.peer.daddr.0);
    s.to[22] = ports_word(s.peer.sport, s.peer.dport);
    // The ICMPv6 checksum: the ICMPv4 one, less what leaves, plus what comes: the ICMPv6
    // header, the quote, the ports, and the pseudo-header (the addresses, then the length
    // and next header).
    s.from[0] &= u32::to_be(0xffff_0000);
    let Ok(old_csum) = ctx.load::<u16>(ICMP4_OFF + 2) else {
        return Verdict::Pass;
    };
    let mut pseudo_tail = [payload_len.to_be(), u32::from(IPPROTO_ICMPV6).to_be()];
    // SAFETY: the buffers are this CPU's map value and this frame's array, of the sizes
    // given (a zero size reads nothing).
    let sum = unsafe {
        let to = s.to.as_mut_ptr();
        let sum = bpf_csum_diff(
            s.from.as_mut_ptr(),
            8 * 4,
            to.add(10),
            13 * 4,
            u32::from(!old_csum),
        );
        let sum = bpf_csum_diff(core::ptr::null_mut(), 0, to.add(2), 8 * 4, sum as u32);
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            pseudo_tail.as_mut_ptr(),
            2 * 4,
            sum as u32,
        )
    };
    if sum < 0 {
        return Verdict::Drop(DropReason::Malformed);
    }
    s.to[10] |= u32::from(fold(sum)) << 16;
    // 20 bytes before the header (the family), then 20 after the new IPv6 header (the
    // quoted header's difference); the 92 bytes up to the quoted ports are rewritten.
    if change_family(ctx, ETH_P_IPV6, IPV4_HDR_LEN as i32, &s.to).is_err() {
        return Verdict::Drop(DropReason::Malformed);
    }
    to_uplink()
}

/// The packet made `ethertype`'s family (bpf_skb_change_proto: 20 bytes of header room off
/// or on at the front), `adjust` bytes more or fewer right after the new network header
/// (bpf_skb_adjust_room: a fragment header, or a quoted header's difference), and `headers`
/// written from the network header on, with the Ethernet type. RECOMPUTE_CSUM keeps a
/// CHECKSUM_COMPLETE packet's sum right (the kernel took what it removed out of it; what it
/// inserts is zeros).
#[inline(always)]
fn change_family<const N: usize>(
    ctx: &TcContext,
    ethertype: u16,
    adjust: i32,
    headers: &[u32; N],
) -> Result<(), ()> {
    ctx.change_proto(ethertype.to_be(), 0).map_err(|_| ())?;
    ctx.adjust_room(adjust, BPF_ADJ_ROOM_NET, 0)
        .map_err(|_| ())?;
    ctx.store(ETH_HDR_LEN, headers, u64::from(BPF_F_RECOMPUTE_CSUM))
        .map_err(|_| ())?;
    ctx.store(ETHERTYPE_OFF, &ethertype.to_be(), 0)
        .map_err(|_| ())
}

/// Whether the IPv4 header (without options: the caller's check) has a right checksum. One
/// that is wrong passes untouched, for the host's stack to drop: the IPv6 packet has no header
/// checksum, so translated it would arrive as sound (neither the TCP/UDP nor the ICMP
/// checksum covers the IPv4 header). Out of line, its 20 bytes in the per-CPU scratch (words
/// 0-4 of `to`, written afresh by whatever translation follows).
#[inline(never)]
fn ipv4_header_sound(ctx: &TcContext) -> bool {
    let Some(scratch) = NAT64_ICMP.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's element, used by this program run only; the helper writes 20 bytes
    // inside `to`.
    unsafe {
        let header = (*scratch).to.as_mut_ptr();
        bpf_skb_load_bytes(ctx.skb.skb.cast(), ETH_HDR_LEN as u32, header.cast(), 20) == 0
            && fold(bpf_csum_diff(core::ptr::null_mut(), 0, header, 20, 0)) == 0
    }
}

/// A port pair as the word that holds them in a TCP or UDP header (network order ports in,
/// the source's bytes first in memory).
#[inline(always)]
fn ports_word(sport: u16, dport: u16) -> u32 {
    (u32::from(u16::from_be(sport)) << 16 | u32::from(u16::from_be(dport))).to_be()
}

/// A 32-bit checksum sum from bpf_csum_diff folded and complemented: the 16-bit checksum, in
/// the byte order of the words summed (as they are in memory).
#[inline(always)]
fn fold(sum: i64) -> u16 {
    let mut folded = sum as u64;
    for _ in 0..3 {
        folded = (folded & 0xffff) + (folded >> 16);
    }
    !(folded as u16)
}

/// Out of the uplink, the kernel resolving the next hop: a NAT64 connection's packets to
/// its client, from one of the host's addresses (never into the host's own stack).
#[inline(always)]
fn to_uplink() -> Verdict {
    match CONFIG.get_ptr(0) {
        // SAFETY: array element 0 always exists.
        Some(config) if unsafe { (*config).uplink_ifindex } != 0 => {
            // SAFETY: as just above.
            Verdict::RedirectNeigh(unsafe { (*config).uplink_ifindex })
        }
        _ => Verdict::Drop(DropReason::Malformed),
    }
}

/// An IPv4 header without options into `out` (its first 5 words, network order, checksum
/// computed): `fragment` is its identification and fragment word (host order), the addresses
/// are in network order.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn write_ipv4_header(
    out: &mut [u32],
    tos: u32,
    total_len: u32,
    fragment: u32,
    ttl: u32,
    protocol: u8,
    saddr: u32,
    daddr: u32,
) {
    out[0] = 0x4500_0000 | (tos & 0xff) << 16 | total_len & 0xffff;
    out[1] = fragment;
    out[2] = ttl << 24 | u32::from(protocol) << 16;
    out[3] = u32::from_be(saddr);
    out[4] = u32::from_be(daddr);
    out[2] |= u32::from(ipv4_checksum(&out[..5]));
    for word in out[..5].iter_mut() {
        *word = word.to_be();
    }
}

/// The peer key (into `s.peer`) of the entry at `s.key` when it is a NAT64 connection's on
/// that side (`is_reply`: 0 the client's, 1 the container's): Some(true); Some(false) for
/// another entry; None for no entry.
#[inline(always)]
fn nat64_peer(s: &mut IcmpScratch, is_reply: u8) -> Option<bool> {
    let entry = conntrack::lookup(&s.key)?;
    // SAFETY: a map value from this program run's lookup, read field by field.
    unsafe {
        if (*entry).rewrite != ct_rewrite::NAT64 || (*entry).is_reply != is_reply {
            return Some(false);
        }
        s.peer = (*entry).peer;
    }
    Some(true)
}

/// The IPv4 header checksum of `header` (its 5 host-order words, checksum field 0).
#[inline(always)]
fn ipv4_checksum(header: &[u32]) -> u16 {
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
