//! Header parsing. Fields are read as integers at offsets; packet bytes are never cast to Rust
//! enums. IPv4 options are honoured through the header length, IPv6 extension headers by
//! walking them (bounded). Addresses and ports stay in network byte order, as they are in the
//! packet and in the maps.

use aya_ebpf::programs::TcContext;

pub const ETH_HDR_LEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;
/// ICMP errors that quote the packet they are about: destination unreachable (including
/// "fragmentation needed"), time exceeded, parameter problem.
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;

/// Offsets of the IPv4 fields the dataplane rewrites.
pub const IP_CSUM_OFF: usize = ETH_HDR_LEN + 10;
pub const IP_SADDR_OFF: usize = ETH_HDR_LEN + 12;
pub const IP_DADDR_OFF: usize = ETH_HDR_LEN + 16;

/// The parts of an IPv4 packet the dataplane decides on.
#[derive(Clone, Copy)]
pub struct Ipv4Packet {
    /// Offset of the L4 header (after IPv4 options).
    pub l4_offset: usize,
    pub protocol: u8,
    pub saddr: u32,
    pub daddr: u32,
    /// Length of the frame (for counters).
    pub len: u32,
    /// The IP header's total length and the length of the header itself.
    pub total_len: u16,
    pub header_len: u16,
    /// Identification (network byte order) and the flags + fragment offset word (host order).
    pub id: u16,
    pub frag: u16,
}

/// The "more fragments" flag of [`Ipv4Packet::frag`].
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;

impl Ipv4Packet {
    /// A fragment after the first: it has no L4 header of its own.
    #[inline(always)]
    pub fn is_later_fragment(&self) -> bool {
        self.frag & IP_OFFSET_MASK != 0
    }

    /// The first fragment of a datagram that was split (its L4 header says what the others
    /// are).
    #[inline(always)]
    pub fn is_first_fragment(&self) -> bool {
        self.frag & IP_MF != 0 && self.frag & IP_OFFSET_MASK == 0
    }
}

/// The fixed IPv6 header's length; extension headers follow it.
pub const IPV6_HDR_LEN: usize = 40;
/// Offsets of the IPv6 fields the dataplane reads and rewrites.
pub const IP6_PAYLOAD_LEN_OFF: usize = ETH_HDR_LEN + 4;
pub const IP6_NEXT_HEADER_OFF: usize = ETH_HDR_LEN + 6;
pub const IP6_SADDR_OFF: usize = ETH_HDR_LEN + 8;
pub const IP6_DADDR_OFF: usize = ETH_HDR_LEN + 24;

/// IPv6 next-header values: the extension headers walked over, and the upper layers.
pub const IPV6_HOP_BY_HOP: u8 = 0;
pub const IPV6_ROUTING: u8 = 43;
pub const IPV6_FRAGMENT: u8 = 44;
pub const IPV6_AUTH: u8 = 51;
pub const IPV6_DEST_OPTS: u8 = 60;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Extension headers walked at most before the upper-layer header (Cilium walks 4; real
/// traffic has one or two: hop-by-hop for MLD, a fragment header). More is dropped as
/// malformed: a chain the parser gave up on must not be taken for an upper-layer header.
const IPV6_MAX_EXT_HEADERS: usize = 8;

/// An IPv6 address as on the wire: 16 bytes as four u32, each in network byte order.
pub type Addr6 = [u32; 4];

/// The parts of an IPv6 packet the dataplane decides on.
#[derive(Clone, Copy)]
pub struct Ipv6Packet {
    /// Offset of the upper-layer header (after every extension header; for a later fragment,
    /// of the fragment's data).
    pub l4_offset: usize,
    /// The upper-layer protocol (the last next-header value).
    pub protocol: u8,
    pub saddr: Addr6,
    pub daddr: Addr6,
    /// Length of the frame (for counters).
    pub len: u32,
    /// Bytes after the fixed header, as the header says (or the frame's, for a GSO packet
    /// larger than a payload length can say).
    pub payload_len: u32,
    /// The fragment header's offset and flags word (host order: offset in 8-byte units in
    /// bits 3-15, "more fragments" in bit 0), 0 without one; its identification (network byte
    /// order; 0 without one).
    pub frag: u16,
    pub id: u32,
}

/// The "more fragments" flag of [`Ipv6Packet::frag`].
const IP6_MF: u16 = 0x0001;
const IP6_OFFSET_MASK: u16 = 0xfff8;

impl Ipv6Packet {
    /// A fragment after the first: it has no upper-layer header of its own.
    #[inline(always)]
    pub fn is_later_fragment(&self) -> bool {
        self.frag & IP6_OFFSET_MASK != 0
    }

    /// The first fragment of a datagram that was split. A fragment header with offset 0 and
    /// no "more fragments" (an atomic fragment, RFC 6946) is a whole datagram.
    #[inline(always)]
    pub fn is_first_fragment(&self) -> bool {
        self.frag & IP6_MF != 0 && self.frag & IP6_OFFSET_MASK == 0
    }
}

/// The transport part of a packet that conntrack and NAT work on.
#[derive(Clone, Copy)]
pub struct L4 {
    /// Source and destination ports; for ICMP echo `sport` is the identifier, `dport` 0.
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte (0 for other protocols).
    pub tcp_flags: u8,
    /// ICMP type and code (echo request or reply; 0 for other protocols).
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// TCP sequence and acknowledgement numbers, host order (0 for other protocols).
    pub seq: u32,
    pub ack_seq: u32,
    /// Offset of the L4 checksum field.
    pub csum_offset: usize,
    /// Offset of the field that holds the source "port" (the ICMP identifier for echo).
    pub sport_offset: usize,
    /// Offset of the destination port; equal to `sport_offset` for ICMP echo, whose one
    /// identifier plays both roles.
    pub dport_offset: usize,
}

/// What the first headers of a frame are.
pub enum Frame {
    Ipv4(Ipv4Packet),
    /// An IPv6 frame: its header is read by [`parse_ipv6`], on the IPv6 path (its own
    /// program, with its own stack).
    Ipv6,
    /// Neither (ARP, ...): not ours to decide on.
    Other,
    /// An IPv4 header that is truncated or inconsistent.
    Malformed,
}

/// Whatever addresses and protocol a frame that did not parse has at their usual places
/// (zero where the frame is too short), so that the record of its drop says where it came
/// from: (saddr, daddr, protocol).
#[inline(always)]
pub fn salvage_tc(ctx: &TcContext) -> (u32, u32, u8) {
    (
        ctx.load::<u32>(IP_SADDR_OFF).unwrap_or(0),
        ctx.load::<u32>(IP_DADDR_OFF).unwrap_or(0),
        ctx.load::<u8>(ETH_HDR_LEN + 9).unwrap_or(0),
    )
}

/// The ICMP type and code of an ICMP packet whose header starts at `l4_offset` (zero where the
/// packet ends first), for the record of its drop.
#[inline(always)]
pub fn salvage_icmp(ctx: &TcContext, l4_offset: usize) -> (u8, u8) {
    (
        ctx.load::<u8>(l4_offset).unwrap_or(0),
        ctx.load::<u8>(l4_offset + 1).unwrap_or(0),
    )
}

/// Reads Ethernet and IPv4 headers of a tc packet. `bpf_skb_load_bytes` (behind `load`) does
/// the bounds checks, so no unsafe access is needed here.
#[inline(always)]
pub fn parse_tc(ctx: &TcContext) -> Frame {
    let Ok(ether_type) = ctx.load::<u16>(12) else {
        return Frame::Other; // shorter than an Ethernet header: no IPv4 to judge
    };
    match u16::from_be(ether_type) {
        ETH_P_IP => {}
        ETH_P_IPV6 => return Frame::Ipv6,
        _ => return Frame::Other,
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
    let (Ok(protocol), Ok(saddr), Ok(daddr), Ok(id), Ok(frag)) = (
        ctx.load::<u8>(ETH_HDR_LEN + 9),
        ctx.load::<u32>(IP_SADDR_OFF),
        ctx.load::<u32>(IP_DADDR_OFF),
        ctx.load::<u16>(ETH_HDR_LEN + 4),
        ctx.load::<u16>(ETH_HDR_LEN + 6),
    ) else {
        return Frame::Malformed;
    };
    Frame::Ipv4(Ipv4Packet {
        l4_offset: ETH_HDR_LEN + header_len,
        protocol,
        saddr,
        daddr,
        len: ctx.len(),
        total_len: total_len as u16,
        header_len: header_len as u16,
        id,
        frag: u16::from_be(frag),
    })
}

/// Reads the IPv6 header of a tc packet and walks its extension headers (hop-by-hop,
/// routing, destination options, authentication, fragment) to the upper-layer header, at most
/// `IPV6_MAX_EXT_HEADERS` of them (a bounded loop, which the verifier walks once per
/// iteration). None for a header that is truncated or inconsistent: a version that is not 6,
/// a payload length beyond the frame, an extension header beyond the payload, a chain too
/// long. A later fragment stops the walk at its fragment header: what follows is data.
#[inline(always)]
pub fn parse_ipv6(ctx: &TcContext) -> Option<Ipv6Packet> {
    let version = ctx.load::<u8>(ETH_HDR_LEN).ok()?;
    if version >> 4 != 6 {
        return None;
    }
    let header_payload = u32::from(u16::from_be(ctx.load::<u16>(IP6_PAYLOAD_LEN_OFF).ok()?));
    let frame_payload = ctx.len().checked_sub((ETH_HDR_LEN + IPV6_HDR_LEN) as u32)?;
    // A payload length of 0 with more bytes than 16 bits can say: a GSO packet of the host's
    // (BIG TCP), whose length is the frame's. Anything else must fit in the frame.
    let payload_len = if header_payload == 0 && frame_payload > u32::from(u16::MAX) {
        frame_payload
    } else if header_payload <= frame_payload {
        header_payload
    } else {
        return None;
    };
    let end = ETH_HDR_LEN + IPV6_HDR_LEN + payload_len as usize;
    let mut next = ctx.load::<u8>(IP6_NEXT_HEADER_OFF).ok()?;
    let mut offset = ETH_HDR_LEN + IPV6_HDR_LEN;
    let (mut frag, mut id) = (0u16, 0u32);
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        let len = match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                (usize::from(ctx.load::<u8>(offset + 1).ok()?) + 1) * 8
            }
            IPV6_AUTH => (usize::from(ctx.load::<u8>(offset + 1).ok()?) + 2) * 4,
            IPV6_FRAGMENT => 8,
            _ => break,
        };
        if offset + len > end {
            return None;
        }
        let header_next = ctx.load::<u8>(offset).ok()?;
        if next == IPV6_FRAGMENT {
            frag = u16::from_be(ctx.load::<u16>(offset + 2).ok()?);
            id = ctx.load::<u32>(offset + 4).ok()?;
        }
        next = header_next;
        offset += len;
        if frag & IP6_OFFSET_MASK != 0 {
            // A later fragment: its data is no header.
            break;
        }
    }
    let later_fragment = frag & IP6_OFFSET_MASK != 0;
    if !later_fragment && is_extension_header(next) {
        return None; // a chain longer than the walk
    }
    Some(Ipv6Packet {
        l4_offset: offset,
        protocol: next,
        saddr: ctx.load::<Addr6>(IP6_SADDR_OFF).ok()?,
        daddr: ctx.load::<Addr6>(IP6_DADDR_OFF).ok()?,
        len: ctx.len(),
        payload_len,
        frag,
        id,
    })
}

/// Whether IPv6's next-header value `next` is an extension header the walk goes over.
#[inline(always)]
fn is_extension_header(next: u8) -> bool {
    matches!(
        next,
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_FRAGMENT | IPV6_AUTH | IPV6_DEST_OPTS
    )
}

/// The packet an ICMP error quotes: its IPv4 header and the first 8 bytes of its TCP or UDP
/// header, as they were when the packet left (so its tuple is the reverse of the error's own
/// direction).
#[derive(Clone, Copy)]
pub struct Quoted {
    /// Offset of the ICMP checksum.
    pub icmp_csum_offset: usize,
    /// Offset of the quoted IPv4 header.
    pub ip_offset: usize,
    /// Offset of the quoted TCP/UDP header.
    pub l4_offset: usize,
    pub protocol: u8,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
}

/// What the transport header says, for the protocols the dataplane translates.
pub enum Transport {
    /// TCP, UDP, or ICMP echo.
    Tracked(L4),
    /// An ICMP error about a TCP or UDP packet.
    IcmpError(Quoted),
    /// Another protocol or another ICMP type: passed untranslated.
    Untracked,
    /// A fragment after the first of a TCP, UDP or ICMP datagram: no L4 header; its first
    /// fragment says what it is.
    LaterFragment,
    /// A header cut short.
    Malformed,
    /// A TCP or UDP header the receiving kernel drops anyway (see
    /// `DropReason::InvalidL4Header`): dropped here, before it can be tracked.
    Invalid,
}

/// Whether TCP `flags` are a combination no TCP stack accepts: none of the six classic flags,
/// SYN with FIN, SYN with RST (scans and floods use them; Linux's conntrack calls them
/// invalid).
#[inline(always)]
pub fn invalid_tcp_flags(flags: u8) -> bool {
    const SYN_FIN: u8 = 0x02 | 0x01;
    const SYN_RST: u8 = 0x02 | 0x04;
    flags & 0x3f == 0 || flags & SYN_FIN == SYN_FIN || flags & SYN_RST == SYN_RST
}

#[inline(always)]
pub fn parse_l4(ctx: &TcContext, ip: &Ipv4Packet) -> Transport {
    let off = ip.l4_offset;
    match ip.protocol {
        IPPROTO_TCP | IPPROTO_UDP => {
            if ip.is_later_fragment() {
                return Transport::LaterFragment;
            }
            let (Ok(sport), Ok(dport)) = (ctx.load::<u16>(off), ctx.load::<u16>(off + 2)) else {
                return Transport::Malformed;
            };
            let (tcp_flags, csum_offset, seq, ack_seq) = if ip.protocol == IPPROTO_TCP {
                let (Ok(seq), Ok(ack_seq), Ok(data_offset), Ok(flags)) = (
                    ctx.load::<u32>(off + 4),
                    ctx.load::<u32>(off + 8),
                    ctx.load::<u8>(off + 12),
                    ctx.load::<u8>(off + 13),
                ) else {
                    return Transport::Malformed;
                };
                if data_offset >> 4 < 5 || invalid_tcp_flags(flags) {
                    return Transport::Invalid;
                }
                (flags, off + 16, u32::from_be(seq), u32::from_be(ack_seq))
            } else {
                let (Ok(length), Ok(_)) = (ctx.load::<u16>(off + 4), ctx.load::<u16>(off + 6))
                else {
                    return Transport::Malformed;
                };
                // The UDP length covers the whole datagram: equal to what the IP header
                // carries, unless this is a first fragment (then at least as long).
                let length = u32::from(u16::from_be(length));
                let carried = u32::from(ip.total_len) - u32::from(ip.header_len);
                let fits = if ip.is_first_fragment() {
                    length > carried
                } else {
                    length == carried
                };
                if length < 8 || !fits {
                    return Transport::Invalid;
                }
                (0, off + 6, 0, 0)
            };
            Transport::Tracked(L4 {
                sport,
                dport,
                tcp_flags,
                icmp_type: 0,
                icmp_code: 0,
                seq,
                ack_seq,
                csum_offset,
                sport_offset: off,
                dport_offset: off + 2,
            })
        }
        IPPROTO_ICMP => {
            if ip.is_later_fragment() {
                return Transport::LaterFragment;
            }
            let (Ok(icmp_type), Ok(icmp_code), Ok(id)) = (
                ctx.load::<u8>(off),
                ctx.load::<u8>(off + 1),
                ctx.load::<u16>(off + 4),
            ) else {
                return Transport::Malformed;
            };
            if matches!(
                icmp_type,
                ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
            ) {
                return parse_quoted(ctx, off);
            }
            if icmp_type != ICMP_ECHO_REQUEST && icmp_type != ICMP_ECHO_REPLY {
                return Transport::Untracked;
            }
            Transport::Tracked(L4 {
                sport: id,
                dport: 0,
                tcp_flags: 0,
                icmp_type,
                icmp_code,
                seq: 0,
                ack_seq: 0,
                csum_offset: off + 2,
                sport_offset: off + 4,
                dport_offset: off + 4,
            })
        }
        _ => Transport::Untracked,
    }
}

/// Reads the packet quoted by the ICMP error whose header starts at `icmp_offset`.
#[inline(always)]
fn parse_quoted(ctx: &TcContext, icmp_offset: usize) -> Transport {
    let ip_offset = icmp_offset + 8;
    let Ok(version_ihl) = ctx.load::<u8>(ip_offset) else {
        return Transport::Malformed;
    };
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || header_len < 20 {
        return Transport::Malformed;
    }
    let l4_offset = ip_offset + header_len;
    let (Ok(protocol), Ok(saddr), Ok(daddr), Ok(sport), Ok(dport)) = (
        ctx.load::<u8>(ip_offset + 9),
        ctx.load::<u32>(ip_offset + 12),
        ctx.load::<u32>(ip_offset + 16),
        ctx.load::<u16>(l4_offset),
        ctx.load::<u16>(l4_offset + 2),
    ) else {
        return Transport::Malformed;
    };
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return Transport::Untracked;
    }
    Transport::IcmpError(Quoted {
        icmp_csum_offset: icmp_offset + 2,
        ip_offset,
        l4_offset,
        protocol,
        saddr,
        daddr,
        sport,
        dport,
    })
}
