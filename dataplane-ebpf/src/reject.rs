//! Refusing a connection at once: a TCP reset built from the refused packet and sent back out
//! of the interface it came in on, so a client of a service without backends fails fast
//! instead of retrying its SYN into the void.

use aya_ebpf::{helpers::bpf_skb_change_tail, programs::TcContext};
use dataplane_common::tcp_flag;

use crate::{
    parse::{ETH_HDR_LEN, IPPROTO_TCP, Ipv4Packet, Ipv6Packet, L4},
    translate6::L4v6,
};

const IP_HDR_LEN: usize = 20;
const TCP_HDR_LEN: usize = 20;
const RESET_LEN: u32 = (ETH_HDR_LEN + IP_HDR_LEN + TCP_HDR_LEN) as u32;

/// The Internet checksum of `words` plus `sum` (RFC 1071), complemented.
#[inline(always)]
fn checksum(words: &[u16], mut sum: u32) -> u16 {
    for w in words {
        sum += u32::from(*w);
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Turns the TCP packet in `ctx` into the reset that answers it (RFC 793: to a SYN, RST|ACK
/// acknowledging it; to anything with ACK, RST at the acknowledged sequence). Works on
/// packets without IP options only. Checksums are computed in full; a receiver that still
/// holds the skb as checksum-partial does not verify them.
#[inline(always)]
pub fn tcp_reset(ctx: &TcContext, ip: &Ipv4Packet, l4: &L4) -> Result<(), ()> {
    if ip.protocol != IPPROTO_TCP || ip.l4_offset != ETH_HDR_LEN + IP_HDR_LEN {
        return Err(());
    }
    let off = ip.l4_offset;
    let seq = u32::from_be(ctx.load::<u32>(off + 4).map_err(|_| ())?);
    let ack = u32::from_be(ctx.load::<u32>(off + 8).map_err(|_| ())?);
    let total_len = u32::from(u16::from_be(
        ctx.load::<u16>(ETH_HDR_LEN + 2).map_err(|_| ())?,
    ));
    let data_offset = u32::from(ctx.load::<u8>(off + 12).map_err(|_| ())? >> 4) * 4;
    let dst_mac = ctx.load::<[u8; 6]>(0).map_err(|_| ())?;
    let src_mac = ctx.load::<[u8; 6]>(6).map_err(|_| ())?;

    let payload = total_len.saturating_sub(IP_HDR_LEN as u32 + data_offset);
    let (reset_seq, reset_ack, flags) = if l4.tcp_flags & tcp_flag::ACK != 0 {
        (ack, 0, tcp_flag::RST)
    } else {
        let syn_fin = u32::from(l4.tcp_flags & (tcp_flag::SYN | tcp_flag::FIN) != 0);
        (
            0,
            seq.wrapping_add(payload + syn_fin),
            tcp_flag::RST | tcp_flag::ACK,
        )
    };

    // SAFETY: skb helper on the context of this program run.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, RESET_LEN, 0) } != 0 {
        return Err(());
    }
    // Addresses swap; the reset answers from where the client was going.
    let (saddr, daddr) = (ip.daddr, ip.saddr);
    let mut ip_words = [
        0x4500u16,
        (IP_HDR_LEN + TCP_HDR_LEN) as u16,
        0,
        0x4000, // don't fragment
        (64 << 8) | u16::from(IPPROTO_TCP),
        0,
        u16::from_be((saddr & 0xffff) as u16),
        u16::from_be((saddr >> 16) as u16),
        u16::from_be((daddr & 0xffff) as u16),
        u16::from_be((daddr >> 16) as u16),
    ];
    ip_words[5] = checksum(&ip_words, 0);
    let mut tcp_words = [
        u16::from_be(l4.dport),
        u16::from_be(l4.sport),
        (reset_seq >> 16) as u16,
        reset_seq as u16,
        (reset_ack >> 16) as u16,
        reset_ack as u16,
        (5 << 12) | u16::from(flags),
        0, // window
        0, // checksum
        0, // urgent pointer
    ];
    let pseudo = u32::from(ip_words[6])
        + u32::from(ip_words[7])
        + u32::from(ip_words[8])
        + u32::from(ip_words[9])
        + u32::from(IPPROTO_TCP)
        + TCP_HDR_LEN as u32;
    tcp_words[8] = checksum(&tcp_words, pseudo);

    // Stored as network-order words: an array the verifier sees whole, no slicing.
    let mut ip_be = [0u16; 10];
    let mut tcp_be = [0u16; 10];
    for i in 0..10 {
        ip_be[i] = ip_words[i].to_be();
        tcp_be[i] = tcp_words[i].to_be();
    }
    ctx.store(0, &src_mac, 0).map_err(|_| ())?;
    ctx.store(6, &dst_mac, 0).map_err(|_| ())?;
    ctx.store(ETH_HDR_LEN, &ip_be, 0).map_err(|_| ())?;
    ctx.store(ETH_HDR_LEN + IP_HDR_LEN, &tcp_be, 0)
        .map_err(|_| ())
}

const IP6_HDR_LEN: usize = 40;
const RESET6_LEN: u32 = (ETH_HDR_LEN + IP6_HDR_LEN + TCP_HDR_LEN) as u32;

/// [`tcp_reset`] for IPv6: the TCP packet in `ctx` becomes the reset that answers it, from
/// the address it was sent to. Works on packets without extension headers only (the others
/// are dropped instead). The words are built as they lie in memory (network order), and the
/// one's complement sum is computed on them so: the Internet checksum does not depend on the
/// byte order it is summed in (RFC 1071), so no word is swapped twice.
#[inline(always)]
pub fn tcp_reset6(ctx: &TcContext, ip: &Ipv6Packet, l4: &L4v6) -> Result<(), ()> {
    if ip.protocol != IPPROTO_TCP || ip.l4_offset != ETH_HDR_LEN + IP6_HDR_LEN {
        return Err(());
    }
    let off = ip.l4_offset;
    let data_offset = u32::from(ctx.load::<u8>(off + 12).map_err(|_| ())? >> 4) * 4;
    let dst_mac = ctx.load::<[u8; 6]>(0).map_err(|_| ())?;
    let src_mac = ctx.load::<[u8; 6]>(6).map_err(|_| ())?;
    let payload = ip.payload_len.saturating_sub(data_offset);
    let (reset_seq, reset_ack, flags) = if l4.tcp_flags & tcp_flag::ACK != 0 {
        (l4.ack_seq, 0, tcp_flag::RST)
    } else {
        let syn_fin = u32::from(l4.tcp_flags & (tcp_flag::SYN | tcp_flag::FIN) != 0);
        (
            0,
            l4.seq.wrapping_add(payload + syn_fin),
            tcp_flag::RST | tcp_flag::ACK,
        )
    };
    // Version 6, no traffic class or flow label; the TCP header alone; hop limit 64. Then the
    // addresses swapped (the reset answers from where the client was going), then TCP.
    let mut words = [0u16; (IP6_HDR_LEN + TCP_HDR_LEN) / 2];
    words[0] = 0x6000u16.to_be();
    words[2] = (TCP_HDR_LEN as u16).to_be();
    words[3] = ((u16::from(IPPROTO_TCP) << 8) | 64).to_be();
    for i in 0..4 {
        words[4 + 2 * i] = ip.daddr[i] as u16;
        words[5 + 2 * i] = (ip.daddr[i] >> 16) as u16;
        words[12 + 2 * i] = ip.saddr[i] as u16;
        words[13 + 2 * i] = (ip.saddr[i] >> 16) as u16;
    }
    words[20] = l4.dport;
    words[21] = l4.sport;
    words[22] = ((reset_seq >> 16) as u16).to_be();
    words[23] = (reset_seq as u16).to_be();
    words[24] = ((reset_ack >> 16) as u16).to_be();
    words[25] = (reset_ack as u16).to_be();
    words[26] = ((5 << 12) | u16::from(flags)).to_be();
    // The pseudo-header: both addresses (words 4-19), the upper-layer length and next header.
    let mut pseudo =
        u32::from((TCP_HDR_LEN as u16).to_be()) + u32::from(u16::from(IPPROTO_TCP).to_be());
    for w in &words[4..20] {
        pseudo += u32::from(*w);
    }
    words[28] = checksum(&words[20..], pseudo);

    // SAFETY: skb helper on the context of this program run.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, RESET6_LEN, 0) } != 0 {
        return Err(());
    }
    ctx.store(0, &src_mac, 0).map_err(|_| ())?;
    ctx.store(6, &dst_mac, 0).map_err(|_| ())?;
    ctx.store(ETH_HDR_LEN, &words, 0).map_err(|_| ())
}
