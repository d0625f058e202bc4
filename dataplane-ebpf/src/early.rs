//! Early decisions at XDP on the uplink, before a socket buffer exists: outside sources on the
//! deny list are dropped here, which costs a fraction of dropping them later.

use aya_ebpf::{maps::lpm_trie::Key, programs::XdpContext};
use dataplane_common::CtKey;

use crate::maps::DENY_SOURCES;

const ETH_HDR_LEN: usize = 14;

/// The one accessor for packet memory at XDP: a pointer to a `T` at `offset`, if the packet
/// holds one. The bounds check is what the verifier needs to see before any access.
#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    // SAFETY: bounds checked just above; packet data has no alignment guarantee.
    Some(unsafe { core::ptr::read_unaligned((start + offset) as *const T) })
}

/// What the record of a packet dropped at XDP says about it.
pub struct Denied {
    pub tuple: CtKey,
    pub tcp_flags: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
}

/// The packet's addresses when its IPv4 source is on the deny list.
#[inline(always)]
pub fn denied_source(ctx: &XdpContext) -> Option<Denied> {
    let ether_type: u16 = read(ctx, 12)?;
    if u16::from_be(ether_type) != 0x0800 {
        return None;
    }
    let saddr: u32 = read(ctx, ETH_HDR_LEN + 12)?;
    DENY_SOURCES.get(Key::new(32, saddr))?;
    // What else the record can say, read only for packets being dropped.
    let proto: u8 = read(ctx, ETH_HDR_LEN + 9).unwrap_or(0);
    let version_ihl: u8 = read(ctx, ETH_HDR_LEN).unwrap_or(0);
    let frag: u16 = read(ctx, ETH_HDR_LEN + 6).unwrap_or(0);
    let l4 = ETH_HDR_LEN + usize::from(version_ihl & 0x0f) * 4;
    let first = u16::from_be(frag) & 0x1fff == 0;
    let has_ports = (proto == 6 || proto == 17) && first;
    let (sport, dport) = if has_ports {
        (read(ctx, l4).unwrap_or(0), read(ctx, l4 + 2).unwrap_or(0))
    } else {
        (0, 0)
    };
    // Two bytes at a time, as the ports: a one-byte read at a variable offset compiles to a
    // bounds check (`pointer >= end`) the verifier does not take as one.
    let tcp_flags = if proto == 6 && first {
        read::<u16>(ctx, l4 + 12).unwrap_or(0).to_ne_bytes()[1]
    } else {
        0
    };
    let [icmp_type, icmp_code] = if proto == 1 && first {
        read::<u16>(ctx, l4).unwrap_or(0).to_ne_bytes()
    } else {
        [0, 0]
    };
    Some(Denied {
        tuple: CtKey {
            saddr,
            daddr: read(ctx, ETH_HDR_LEN + 16).unwrap_or(0),
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

/// The same deny list at tc ingress of the uplink, for uplinks where XDP would cost more than
/// it saves (a veth: the socket buffer already exists when XDP runs, and any XDP program there
/// turns GRO off). Only consulted while the agent says so (`Config::deny_at_tc`).
#[inline(always)]
pub fn denied_source_tc(saddr: u32) -> bool {
    DENY_SOURCES.get(Key::new(32, saddr)).is_some()
}
