//! Address and port rewriting with incremental checksum updates (IPv4 header, and the TCP/UDP
//! pseudo-header and port, or the ICMP echo identifier).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use dataplane_common::ct_rewrite;

use crate::parse::{
    IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, IPPROTO_ICMP, IPPROTO_UDP, Ipv4Packet, L4, Quoted,
};

/// The rewrite failed in a kernel helper (the packet was not changed consistently).
pub struct RewriteFailed;

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

/// Rewrites only the address of a later fragment (which has no L4 header: the datagram's
/// L4 checksum and ports are in its first fragment, rewritten there), keeping the IPv4 header
/// checksum valid.
#[inline(always)]
pub fn rewrite_address(
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
