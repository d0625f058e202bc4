//! Header parsing. Fields are read as integers at offsets; packet bytes are never cast to Rust
//! enums. IPv4 options are honoured through the header length.

use aya_ebpf::programs::TcContext;

pub const ETH_HDR_LEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// The parts of an IPv4 packet the dataplane decides on.
#[derive(Clone, Copy)]
pub struct Ipv4Packet {
    /// Offset of the L4 header (after IPv4 options).
    pub l4_offset: usize,
    pub protocol: u8,
    /// Addresses in network byte order, as they are in the packet and in the maps.
    pub saddr: u32,
    pub daddr: u32,
}

/// What the first headers of a frame are.
pub enum Frame {
    Ipv4(Ipv4Packet),
    /// Not IPv4 (ARP, IPv6, ...): not ours to decide on.
    Other,
    /// An IPv4 header that is truncated or inconsistent.
    Malformed,
}

/// Reads Ethernet and IPv4 headers of a tc packet. `bpf_skb_load_bytes` (behind `load`) does
/// the bounds checks, so no unsafe access is needed here.
#[inline(always)]
pub fn parse_tc(ctx: &TcContext) -> Frame {
    let Ok(ether_type) = ctx.load::<u16>(12) else {
        return Frame::Other; // shorter than an Ethernet header: no IPv4 to judge
    };
    if u16::from_be(ether_type) != ETH_P_IP {
        return Frame::Other;
    }
    let Ok(version_ihl) = ctx.load::<u8>(ETH_HDR_LEN) else {
        return Frame::Malformed;
    };
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || header_len < 20 {
        return Frame::Malformed;
    }
    let Ok(total_len) = ctx.load::<u16>(ETH_HDR_LEN + 2) else {
        return Frame::Malformed;
    };
    let total_len = usize::from(u16::from_be(total_len));
    if total_len < header_len || ETH_HDR_LEN + total_len > ctx.len() as usize {
        return Frame::Malformed;
    }
    let (Ok(protocol), Ok(saddr), Ok(daddr)) = (
        ctx.load::<u8>(ETH_HDR_LEN + 9),
        ctx.load::<u32>(ETH_HDR_LEN + 12),
        ctx.load::<u32>(ETH_HDR_LEN + 16),
    ) else {
        return Frame::Malformed;
    };
    Frame::Ipv4(Ipv4Packet {
        l4_offset: ETH_HDR_LEN + header_len,
        protocol,
        saddr,
        daddr,
    })
}
