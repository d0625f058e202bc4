//! Address and port rewriting with incremental checksum updates (IPv4 header, and the TCP/UDP
//! pseudo-header and port, or the ICMP echo identifier), and the allocation of source ports
//! for source translation (masquerade, hairpin).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use dataplane_common::{CtKeyOf, DropReason, ct_rewrite};

use crate::{
    conntrack::{self, CtError, NewConnectionOf},
    family::Family,
    parse::{
        IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
        Ipv4Packet, L4, Quoted,
    },
};

/// The rewrite failed in a kernel helper (the packet was not changed consistently).
pub struct RewriteFailed;

/// How many source ports one new connection tries before giving up.
const SNAT_PROBES: u32 = 32;
/// Distance between two probes (prime, so it is coprime with any range that is not its
/// multiple: the probes visit distinct ports).
const SNAT_PROBE_STRIDE: u32 = 7919;

#[inline(always)]
fn mix<A: Family>(key: &CtKeyOf<A>) -> u32 {
    let mut h = key.saddr.fold()
        ^ key.daddr.fold().rotate_left(11)
        ^ (u32::from(key.sport) << 16 | u32::from(key.dport));
    h ^= u32::from(key.proto).rotate_left(7);
    h ^= h >> 16;
    h = h.wrapping_mul(0x045d_9f3b);
    h ^= h >> 16;
    h
}

/// Tracks the new connection `c`, whose packets leave with the source `c.nat_addr` and the
/// destination `daddr`:`dport`, choosing its source port as Linux's nf_nat does: the
/// connection's own source port (`c.forward.sport`) when the tuple it makes is free, so that the
/// common case costs one insert and no probing; on a collision, ports of `min..=max` (host
/// order), probed from a hash of the connection with a prime stride, so that containers using
/// the same source port end up on different ports. `host`, for masquerade, is the packet's
/// context: a port the host's own sockets hold towards that destination counts as taken (see
/// [`host_holds`]). Sets `c.nat_port` and `c.reply` to what was tracked. Masquerade and hairpin
/// connections allocate this way.
///
/// A tuple a closed connection still holds (its entries live for the closing timeout) is
/// reserved for the original tuple that owned it: the far end may hold it in TIME_WAIT, and
/// takes a new SYN on it only if the SYN's sequence number or timestamp is past the old
/// connection's, which only the same client socket's next connection is (Linux's clocks for
/// both are per address pair and port). nf_nat does the same: a NATed connection's closing
/// entry makes its reply tuple taken for every other original tuple. So a different
/// connection probes on, and only the owner (a client reusing its own port, whose closing
/// entries `conntrack::lookup_packet` already removed on its SYN, or whose forward half was
/// evicted) gets the tuple back.
#[inline(always)]
pub fn allocate_source_port<A: Family>(
    c: &mut NewConnectionOf<A>,
    daddr: A,
    dport: u16,
    min: u16,
    max: u16,
    host: Option<&TcContext>,
) -> Result<(), DropReason> {
    if try_port(c, c.forward.sport, daddr, dport, host)? {
        return Ok(());
    }
    if max < min {
        return Err(DropReason::NoMappingForNatMasquerade);
    }
    let range = u32::from(max) - u32::from(min) + 1;
    if range == 0 {
        // Cannot happen (max >= min), but said so: no division by zero, and no panic path
        // for the verifier.
        return Err(DropReason::NoMappingForNatMasquerade);
    }
    let start = mix(&c.forward) % range;
    for probe in 0..SNAT_PROBES {
        // A prime stride spreads the probes over the range: linear probing would walk the
        // clusters that busy destinations build.
        let port = (u32::from(min) + (start + probe * SNAT_PROBE_STRIDE) % range) as u16;
        if try_port(c, port.to_be(), daddr, dport, host)? {
            return Ok(());
        }
    }
    Err(DropReason::NoMappingForNatMasquerade)
}

/// Tracks `c` with the source port `port` (network order) if the tuple it makes is free:
/// `Ok(false)` when it is taken (by a tracked connection, a closed one's reservation, or a
/// socket of the host's).
#[inline(always)]
fn try_port<A: Family>(
    c: &mut NewConnectionOf<A>,
    port: u16,
    daddr: A,
    dport: u16,
    host: Option<&TcContext>,
) -> Result<bool, DropReason> {
    c.nat_port = port;
    c.reply = conntrack::reply_key(c.forward.proto, c.nat_addr, port, daddr, dport);
    if let Some(ctx) = host
        && host_holds(ctx, &c.reply)
    {
        return Ok(false);
    }
    let mut created = conntrack::create(c);
    if matches!(created, Err(CtError::Exists)) && conntrack::reclaim_for(&c.reply, &c.forward) {
        created = conntrack::create(c);
    }
    match created {
        Ok(()) => Ok(true),
        Err(CtError::Exists) => Ok(false),
        Err(CtError::Full) => Err(DropReason::CtMapInsertionFailed),
    }
}

/// Whether a socket of the host's own (in the namespace of the packet's device) would take a
/// packet with the reply key `reply`: a TCP connection (established, closing or in TIME_WAIT)
/// or listener, a bound or connected UDP socket. The masquerade address is the host's, and the
/// host's connections are not tracked here, so a kept source port must not be one the host
/// uses towards that destination (the range of probed ports lies outside Linux's ephemeral
/// ports for the same reason). A host connection opened later on a tuple of ours is
/// translated itself (`translate::masquerade`).
#[inline(never)]
fn host_holds<A: Family>(ctx: &TcContext, reply: &CtKeyOf<A>) -> bool {
    use aya_ebpf::{
        EbpfContext as _,
        bindings::BPF_F_CURRENT_NETNS,
        helpers::generated::{bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
    };
    let (mut tuple, size) = A::sock_tuple(reply);
    let netns = BPF_F_CURRENT_NETNS as u64;
    // SAFETY: the context is the program's own; the tuple lives on this frame for the call;
    // a socket found is released before returning, as the helpers require.
    unsafe {
        let sk = match reply.proto {
            IPPROTO_TCP => bpf_skc_lookup_tcp(ctx.as_ptr(), &mut tuple, size, netns, 0),
            IPPROTO_UDP => bpf_sk_lookup_udp(ctx.as_ptr(), &mut tuple, size, netns, 0),
            _ => return false,
        };
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk.cast());
    }
    true
}

/// Applies the rewrite of a conntrack entry (`which` one of [`ct_rewrite`], with its address
/// and ports) to the packet, keeping every checksum valid. A hairpin entry rewrites both
/// sides: the destination becomes the packet's own source address at `hairpin_port`, the
/// source `addr`:`port`.
#[inline(always)]
pub fn rewrite_entry(
    ctx: &TcContext,
    ip: &mut Ipv4Packet,
    l4: &mut L4,
    which: u8,
    addr: u32,
    port: u16,
    hairpin_port: u16,
) -> Result<(), RewriteFailed> {
    if which == ct_rewrite::HAIRPIN {
        let own = ip.saddr;
        rewrite(ctx, ip, l4, ct_rewrite::DST, own, hairpin_port)?;
        return rewrite(ctx, ip, l4, ct_rewrite::SRC, addr, port);
    }
    rewrite(ctx, ip, l4, which, addr, port)
}

/// Rewrites the destination (`ct_rewrite::DST`) or source (`ct_rewrite::SRC`) address and port
/// of the packet to `addr`:`port` (network byte order), keeping every checksum valid. Updates
/// `ip` and `l4` to what the packet now says.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    ip: &mut Ipv4Packet,
    l4: &mut L4,
    which: u8,
    addr: u32,
    port: u16,
) -> Result<(), RewriteFailed> {
    let is_icmp = ip.protocol == IPPROTO_ICMP;
    let (addr_offset, old_addr, port_offset, old_port) = if which == ct_rewrite::DST {
        // ICMP echo has one identifier for both directions, kept in `sport`.
        let old_port = if is_icmp { l4.sport } else { l4.dport };
        (IP_DADDR_OFF, ip.daddr, l4.dport_offset, old_port)
    } else {
        (IP_SADDR_OFF, ip.saddr, l4.sport_offset, l4.sport)
    };
    // UDP may carry no checksum (0); MARK_MANGLED_0 leaves it so and never produces a 0.
    let l4_flags = if ip.protocol == IPPROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    if old_addr != addr {
        if !is_icmp {
            // The address is part of the TCP/UDP pseudo-header, not of ICMP's checksum.
            ctx.l4_csum_replace(
                l4.csum_offset,
                u64::from(old_addr),
                u64::from(addr),
                l4_flags | u64::from(BPF_F_PSEUDO_HDR) | 4,
            )
            .map_err(|_| RewriteFailed)?;
        }
        ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old_addr), u64::from(addr), 4)
            .map_err(|_| RewriteFailed)?;
        ctx.store(addr_offset, &addr, 0)
            .map_err(|_| RewriteFailed)?;
    }
    if old_port != port {
        ctx.l4_csum_replace(
            l4.csum_offset,
            u64::from(old_port),
            u64::from(port),
            l4_flags | 2,
        )
        .map_err(|_| RewriteFailed)?;
        ctx.store(port_offset, &port, 0)
            .map_err(|_| RewriteFailed)?;
    }
    if which == ct_rewrite::DST {
        ip.daddr = addr;
        if is_icmp {
            l4.sport = port;
        } else {
            l4.dport = port;
        }
    } else {
        ip.saddr = addr;
        l4.sport = port;
    }
    Ok(())
}

/// Translates an ICMP error about a tracked connection the way its connection's own packets
/// are: `which` names the field of the error's outer header to rewrite (as for a packet of the
/// connection travelling the same way); the quoted packet, which travelled the other way, gets
/// the matching change on its other side. The ICMP checksum covers the quoted bytes, so every
/// quoted change (address, port, and the quoted header's own checksum) is folded into it.
#[inline(always)]
pub fn rewrite_icmp_error(
    ctx: &TcContext,
    ip: &mut Ipv4Packet,
    quoted: &Quoted,
    which: u8,
    addr: u32,
    port: u16,
) -> Result<(), RewriteFailed> {
    let (
        outer_offset,
        old_outer,
        quoted_addr_offset,
        old_quoted_addr,
        quoted_port_offset,
        old_port,
    ) = if which == ct_rewrite::DST {
        (
            IP_DADDR_OFF,
            ip.daddr,
            quoted.ip_offset + 12,
            quoted.saddr,
            quoted.l4_offset,
            quoted.sport,
        )
    } else {
        (
            IP_SADDR_OFF,
            ip.saddr,
            quoted.ip_offset + 16,
            quoted.daddr,
            quoted.l4_offset + 2,
            quoted.dport,
        )
    };
    // Outer header: the address and the IP checksum (ICMP has no pseudo-header).
    if old_outer != addr {
        ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old_outer), u64::from(addr), 4)
            .map_err(|_| RewriteFailed)?;
        ctx.store(outer_offset, &addr, 0)
            .map_err(|_| RewriteFailed)?;
        if which == ct_rewrite::DST {
            ip.daddr = addr;
        } else {
            ip.saddr = addr;
        }
    }
    // Quoted header: the address, its checksum, and both changes in the ICMP checksum.
    if old_quoted_addr != addr {
        let quoted_csum_offset = quoted.ip_offset + 10;
        let old_csum = ctx
            .load::<u16>(quoted_csum_offset)
            .map_err(|_| RewriteFailed)?;
        ctx.l3_csum_replace(
            quoted_csum_offset,
            u64::from(old_quoted_addr),
            u64::from(addr),
            4,
        )
        .map_err(|_| RewriteFailed)?;
        let new_csum = ctx
            .load::<u16>(quoted_csum_offset)
            .map_err(|_| RewriteFailed)?;
        ctx.store(quoted_addr_offset, &addr, 0)
            .map_err(|_| RewriteFailed)?;
        ctx.l4_csum_replace(
            quoted.icmp_csum_offset,
            u64::from(old_quoted_addr),
            u64::from(addr),
            4,
        )
        .map_err(|_| RewriteFailed)?;
        ctx.l4_csum_replace(
            quoted.icmp_csum_offset,
            u64::from(old_csum),
            u64::from(new_csum),
            2,
        )
        .map_err(|_| RewriteFailed)?;
    }
    if old_port != port {
        ctx.store(quoted_port_offset, &port, 0)
            .map_err(|_| RewriteFailed)?;
        ctx.l4_csum_replace(
            quoted.icmp_csum_offset,
            u64::from(old_port),
            u64::from(port),
            2,
        )
        .map_err(|_| RewriteFailed)?;
    }
    Ok(())
}

/// Rewrites only the addresses of a later fragment as the entry says (`which` one of
/// [`ct_rewrite`]; a hairpin's destination becomes the fragment's own source address).
#[inline(always)]
pub fn rewrite_addresses(
    ctx: &TcContext,
    ip: &mut Ipv4Packet,
    which: u8,
    addr: u32,
) -> Result<(), RewriteFailed> {
    if which == ct_rewrite::HAIRPIN {
        let own = ip.saddr;
        rewrite_address(ctx, ip, ct_rewrite::DST, own)?;
        return rewrite_address(ctx, ip, ct_rewrite::SRC, addr);
    }
    rewrite_address(ctx, ip, which, addr)
}

/// Rewrites only the address of a later fragment (which has no L4 header: the datagram's
/// L4 checksum and ports are in its first fragment, rewritten there), keeping the IPv4 header
/// checksum valid.
#[inline(always)]
fn rewrite_address(
    ctx: &TcContext,
    ip: &mut Ipv4Packet,
    which: u8,
    addr: u32,
) -> Result<(), RewriteFailed> {
    let (offset, old) = if which == ct_rewrite::DST {
        (IP_DADDR_OFF, ip.daddr)
    } else {
        (IP_SADDR_OFF, ip.saddr)
    };
    if old == addr {
        return Ok(());
    }
    ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old), u64::from(addr), 4)
        .map_err(|_| RewriteFailed)?;
    ctx.store(offset, &addr, 0).map_err(|_| RewriteFailed)?;
    if which == ct_rewrite::DST {
        ip.daddr = addr;
    } else {
        ip.saddr = addr;
    }
    Ok(())
}
