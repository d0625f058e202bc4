//! Address and port rewriting with incremental checksum updates (IPv4 header, and the TCP/UDP
//! pseudo-header and port, or the ICMP echo identifier).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use dataplane_common::ct_rewrite;

use crate::parse::{
    IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, IPPROTO_ICMP, IPPROTO_UDP, Ipv4Packet, L4,
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
