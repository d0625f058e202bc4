//! Refusing a connection at once: a TCP reset built from the refused packet and sent back out
//! of the interface it came in on, so a client of a service without backends fails fast
//! instead of retrying its SYN into the void.

use aya_ebpf::{helpers::bpf_skb_change_tail, programs::TcContext};
use dataplane_common::tcp_flag;

use crate::parse::{ETH_HDR_LEN, IPPROTO_TCP, Ipv4Packet, L4};

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
