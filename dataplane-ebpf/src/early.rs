//! Early decisions on the uplink, before the full parse: outside sources on the deny list are
//! dropped first thing, at XDP where the driver runs it before a socket buffer exists, else at
//! tc ingress. Both read the frame's bytes directly (no helper call per field): on a flood
//! from a denied source this is all the work a packet gets besides its counters.

use aya_ebpf::{
    maps::lpm_trie::Key,
    programs::{TcContext, XdpContext},
};
use dataplane_common::{CtKey, In6Addr};

use crate::maps::{DENY_SOURCES, DENY_SOURCES6};

const ETH_HDR_LEN: usize = 14;
const IPV4_MIN_LEN: usize = 20;
const IPV6_HDR_LEN: usize = 40;
/// Where the source address is in an IPv6 header.
const IPV6_SADDR_OFF: usize = 8;

/// What the early check made of a frame.
pub enum Early {
    /// The IPv4 source is on the deny list: what the drop's record can say (addresses, ports,
    /// protocol, TCP flags, ICMP type and code).
    Denied(Denied),
    /// The IPv4 source was read and is not on the list.
    Allowed,
    /// Not IPv4, or its header is not whole in the linear bytes, or not a valid header: the
    /// full parse decides (at tc, with the deny list checked there).
    Unread,
}

/// A `T` at `offset` of the frame [start, end), if the frame holds one. The bounds check is
/// what the verifier needs to see before the access.
#[inline(always)]
fn read<T: Copy>(start: usize, end: usize, offset: usize) -> Option<T> {
    if start + offset + size_of::<T>() > end {
        return None;
    }
    // SAFETY: bounds checked just above; packet data has no alignment guarantee.
    Some(unsafe { core::ptr::read_unaligned((start + offset) as *const T) })
}

/// What the record of a packet dropped by the deny list says about it.
pub struct Denied {
    pub tuple: CtKey,
    pub tcp_flags: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
}

/// The deny-list check on the linear bytes [start, end) of a frame.
#[inline(always)]
fn check(start: usize, end: usize) -> Early {
    // The whole minimal IPv4 header in the linear bytes, checked once.
    if start + ETH_HDR_LEN + IPV4_MIN_LEN > end {
        return Early::Unread;
    }
    let Some(ether_type) = read::<u16>(start, end, 12) else {
        return Early::Unread;
    };
    let Some(version_ihl) = read::<u8>(start, end, ETH_HDR_LEN) else {
        return Early::Unread;
    };
    if u16::from_be(ether_type) != 0x0800 || version_ihl >> 4 != 4 || version_ihl & 0x0f < 5 {
        return Early::Unread;
    }
    let Some(saddr) = read::<u32>(start, end, ETH_HDR_LEN + 12) else {
        return Early::Unread;
    };
    if DENY_SOURCES.get(Key::new(32, saddr)).is_none() {
        return Early::Allowed;
    }
    // What else the record can say, read only for packets being dropped.
    let proto: u8 = read(start, end, ETH_HDR_LEN + 9).unwrap_or(0);
    let frag: u16 = read(start, end, ETH_HDR_LEN + 6).unwrap_or(0);
    let l4 = ETH_HDR_LEN + usize::from(version_ihl & 0x0f) * 4;
    let first = u16::from_be(frag) & 0x1fff == 0;
    let has_ports = (proto == 6 || proto == 17) && first;
    let (sport, dport) = if has_ports {
        (
            read(start, end, l4).unwrap_or(0),
            read(start, end, l4 + 2).unwrap_or(0),
        )
    } else {
        (0, 0)
    };
    // Two bytes at a time, as the ports: a one-byte read at a variable offset compiles to a
    // bounds check (`pointer >= end`) the verifier does not take as one.
    let tcp_flags = if proto == 6 && first {
        read::<u16>(start, end, l4 + 12).unwrap_or(0).to_ne_bytes()[1]
    } else {
        0
    };
    let [icmp_type, icmp_code] = if proto == 1 && first {
        read::<u16>(start, end, l4).unwrap_or(0).to_ne_bytes()
    } else {
        [0, 0]
    };
    Early::Denied(Denied {
        tuple: CtKey {
            saddr,
            daddr: read(start, end, ETH_HDR_LEN + 16).unwrap_or(0),
            sport,
            dport,
            proto,
            _pad: [0; 3],
        },
        tcp_flags,
        icmp_type,
        icmp_code,
    })
}

/// The deny list at XDP.
#[inline(always)]
pub fn at_xdp(ctx: &XdpContext) -> Early {
    check(ctx.data(), ctx.data_end())
}

/// The same deny list at tc ingress of the uplink, for uplinks where XDP would cost more
/// than it saves (a veth: the socket buffer already exists when XDP runs, and any XDP program
/// there turns GRO off). Only consulted while the agent says so (`Config::deny_at_tc`).
#[inline(always)]
pub fn at_tc(ctx: &TcContext) -> Early {
    check(ctx.data(), ctx.data_end())
}

/// The deny list for a source the full parse read (frames whose header is not in the linear
/// bytes).
#[inline(always)]
pub fn denied_source_tc(saddr: u32) -> bool {
    DENY_SOURCES.get(Key::new(32, saddr)).is_some()
}

/// Whether the IPv6 source of the frame [start, end) is on the IPv6 deny list; false for
/// anything else, and for a header not whole in the linear bytes.
#[inline(always)]
fn denied6(start: usize, end: usize) -> bool {
    if start + ETH_HDR_LEN + IPV6_HDR_LEN > end {
        return false;
    }
    let (Some(ether_type), Some(version)) = (
        read::<u16>(start, end, 12),
        read::<u8>(start, end, ETH_HDR_LEN),
    ) else {
        return false;
    };
    if u16::from_be(ether_type) != 0x86dd || version >> 4 != 6 {
        return false;
    }
    let Some(saddr) = read::<[u32; 4]>(start, end, ETH_HDR_LEN + IPV6_SADDR_OFF) else {
        return false;
    };
    DENY_SOURCES6.get(Key::new(128, In6Addr(saddr))).is_some()
}

/// The IPv6 deny list at XDP (for frames the IPv4 check left unread).
#[inline(always)]
pub fn denied6_at_xdp(ctx: &XdpContext) -> bool {
    denied6(ctx.data(), ctx.data_end())
}

/// The IPv6 deny list at tc ingress of the uplink (the IPv6 program, first thing): the
/// source read straight from the fixed header, before its extension headers are walked, so
/// a denied source costs no more than this whatever it sends. A header too short to hold a
/// source is left to the parse (dropped as malformed). Out of line: the trie's key stays out
/// of the IPv6 program's main frame.
#[inline(never)]
pub fn denied_source6_tc(ctx: &TcContext) -> bool {
    let Ok(saddr) = ctx.load::<[u32; 4]>(ETH_HDR_LEN + IPV6_SADDR_OFF) else {
        return false;
    };
    DENY_SOURCES6.get(Key::new(128, In6Addr(saddr))).is_some()
}
