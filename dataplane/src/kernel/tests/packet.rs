//! Crafting and checking packets for the packet tests: Ethernet + IPv4 (+ options) + TCP/UDP,
//! with correct checksums, and checksum verification of what the programs return.

use std::net::Ipv4Addr;

pub const ETH_LEN: usize = 14;

#[derive(Clone, Debug)]
pub struct Ipv4Spec {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    /// Extra option bytes (multiple of 4) after the 20-byte header.
    pub options: Vec<u8>,
    pub ttl: u8,
}

impl Ipv4Spec {
    pub fn new(src: [u8; 4], dst: [u8; 4], protocol: u8) -> Ipv4Spec {
        Ipv4Spec {
            src: Ipv4Addr::from(src),
            dst: Ipv4Addr::from(dst),
            protocol,
            options: Vec::new(),
            ttl: 64,
        }
    }
}

/// RFC 1071 one's-complement sum folded to 16 bits.
pub fn csum_fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub fn sum_words(data: &[u8]) -> u32 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    sum
}

pub fn l4_pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4_len: usize) -> u32 {
    sum_words(&src.octets()) + sum_words(&dst.octets()) + u32::from(protocol) + l4_len as u32
}

/// An Ethernet frame carrying IPv4 and `l4` (a TCP or UDP header plus payload, checksum field
/// zero); fills in both checksums.
pub fn ipv4_frame(ip: &Ipv4Spec, l4: &[u8]) -> Vec<u8> {
    let header_len = 20 + ip.options.len();
    assert_eq!(header_len % 4, 0, "IPv4 options must pad to 4 bytes");
    let total_len = header_len + l4.len();
    let mut frame = Vec::with_capacity(ETH_LEN + total_len);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // dst MAC
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // src MAC
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.push(0x40 | (header_len / 4) as u8);
    frame.push(0);
    frame.extend_from_slice(&(total_len as u16).to_be_bytes());
    frame.extend_from_slice(&[0x12, 0x34, 0x40, 0x00]); // id, DF
    frame.push(ip.ttl);
    frame.push(ip.protocol);
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(&ip.src.octets());
    frame.extend_from_slice(&ip.dst.octets());
    frame.extend_from_slice(&ip.options);
    let ip_csum = csum_fold(sum_words(&frame[ETH_LEN..ETH_LEN + header_len]));
    frame[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&ip_csum.to_be_bytes());
    frame.extend_from_slice(l4);
    let l4_start = ETH_LEN + header_len;
    if ip.protocol == 1 {
        let csum = csum_fold(sum_words(&frame[l4_start..]));
        frame[l4_start + 2..l4_start + 4].copy_from_slice(&csum.to_be_bytes());
    }
    let csum_offset = match ip.protocol {
        6 => Some(16),
        17 => Some(6),
        _ => None,
    };
    if let Some(off) = csum_offset {
        let sum =
            l4_pseudo_sum(ip.src, ip.dst, ip.protocol, l4.len()) + sum_words(&frame[l4_start..]);
        let mut csum = csum_fold(sum);
        if ip.protocol == 17 && csum == 0 {
            csum = 0xffff;
        }
        frame[l4_start + off..l4_start + off + 2].copy_from_slice(&csum.to_be_bytes());
    }
    frame
}

/// A TCP header (20 bytes, checksum zero) with `payload`.
pub fn tcp(src_port: u16, dst_port: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(20 + payload.len());
    h.extend_from_slice(&src_port.to_be_bytes());
    h.extend_from_slice(&dst_port.to_be_bytes());
    h.extend_from_slice(&1000u32.to_be_bytes()); // seq
    h.extend_from_slice(&0u32.to_be_bytes()); // ack
    h.push(5 << 4);
    h.push(flags);
    h.extend_from_slice(&64240u16.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
    h.extend_from_slice(payload);
    h
}

/// A UDP header (checksum zero) with `payload`.
pub fn udp(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(8 + payload.len());
    h.extend_from_slice(&src_port.to_be_bytes());
    h.extend_from_slice(&dst_port.to_be_bytes());
    h.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(payload);
    h
}

/// An ICMP echo request (type 8) or reply (type 0), checksum zero.
pub fn icmp_echo(icmp_type: u8, id: u16, seq: u16) -> Vec<u8> {
    let mut h = vec![icmp_type, 0, 0, 0];
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&seq.to_be_bytes());
    h.extend_from_slice(b"pingpong");
    h
}

/// An ICMP error (e.g. type 3 code 3, port unreachable) quoting `frame` (an Ethernet frame as
/// it left): its IPv4 header and the first 8 bytes of its L4 header, checksum zero.
pub fn icmp_error(icmp_type: u8, code: u8, frame: &[u8]) -> Vec<u8> {
    let ihl = usize::from(frame[ETH_LEN] & 0x0f) * 4;
    let mut h = vec![icmp_type, code, 0, 0, 0, 0, 0, 0];
    h.extend_from_slice(&frame[ETH_LEN..ETH_LEN + ihl + 8]);
    h
}

/// The tuple of the packet an ICMP error in `frame` quotes, in host order.
pub fn quoted_tuple(frame: &[u8]) -> (Ipv4Addr, Ipv4Addr, u16, u16) {
    let ihl = usize::from(frame[ETH_LEN] & 0x0f) * 4;
    // Present the quoted header as a frame of its own (a fake Ethernet header in front).
    let mut inner = vec![0u8; ETH_LEN];
    inner.extend_from_slice(&frame[ETH_LEN + ihl + 8..]);
    tuple(&inner)
}

/// The addresses and ports (ICMP: identifier as both) of an IPv4 frame, in host order.
pub fn tuple(frame: &[u8]) -> (Ipv4Addr, Ipv4Addr, u16, u16) {
    let ihl = usize::from(frame[ETH_LEN] & 0x0f) * 4;
    let l4 = ETH_LEN + ihl;
    let src = Ipv4Addr::new(
        frame[ETH_LEN + 12],
        frame[ETH_LEN + 13],
        frame[ETH_LEN + 14],
        frame[ETH_LEN + 15],
    );
    let dst = Ipv4Addr::new(
        frame[ETH_LEN + 16],
        frame[ETH_LEN + 17],
        frame[ETH_LEN + 18],
        frame[ETH_LEN + 19],
    );
    let word = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    if frame[ETH_LEN + 9] == 1 {
        (src, dst, word(l4 + 4), word(l4 + 4))
    } else {
        (src, dst, word(l4), word(l4 + 2))
    }
}

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// Checks the IPv4 header checksum and the TCP/UDP checksum of `frame`; panics with what is
/// wrong.
pub fn assert_checksums(frame: &[u8]) {
    let ihl = usize::from(frame[ETH_LEN] & 0x0f) * 4;
    let header = &frame[ETH_LEN..ETH_LEN + ihl];
    assert_eq!(
        csum_fold(sum_words(header)),
        0,
        "IPv4 header checksum is wrong"
    );
    let total_len = usize::from(u16::from_be_bytes([frame[ETH_LEN + 2], frame[ETH_LEN + 3]]));
    let l4 = &frame[ETH_LEN + ihl..ETH_LEN + total_len];
    let protocol = frame[ETH_LEN + 9];
    let src = Ipv4Addr::new(header[12], header[13], header[14], header[15]);
    let dst = Ipv4Addr::new(header[16], header[17], header[18], header[19]);
    if protocol == 6 || protocol == 17 {
        let sum = l4_pseudo_sum(src, dst, protocol, l4.len()) + sum_words(l4);
        assert_eq!(
            csum_fold(sum),
            0,
            "L4 checksum (protocol {protocol}) is wrong"
        );
    }
    if protocol == 1 {
        // ICMP's checksum covers the whole message, without a pseudo-header.
        assert_eq!(csum_fold(sum_words(l4)), 0, "ICMP checksum is wrong");
        if ICMP_ERRORS.contains(&l4[0]) {
            // An error quotes the offending packet's IP header (and the start of its L4
            // header): a translated quote must still carry a valid header checksum.
            let quoted = &l4[8..];
            let quoted_ihl = usize::from(quoted[0] & 0x0f) * 4;
            assert_eq!(
                csum_fold(sum_words(&quoted[..quoted_ihl])),
                0,
                "quoted IPv4 header checksum is wrong"
            );
        }
    }
}

/// ICMP types that quote the packet they are about: unreachable, source quench, redirect,
/// time exceeded, parameter problem.
const ICMP_ERRORS: [u8; 5] = [3, 4, 5, 11, 12];

#[test]
fn crafted_frames_have_valid_checksums() {
    let mut ip = Ipv4Spec::new([10, 0, 0, 1], [10, 0, 0, 2], 6);
    assert_checksums(&ipv4_frame(&ip, &tcp(1234, 80, TCP_SYN, b"hello")));
    ip.options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL
    ip.protocol = 17;
    assert_checksums(&ipv4_frame(&ip, &udp(53, 5353, b"abc")));
    ip.protocol = 1;
    assert_checksums(&ipv4_frame(&ip, &icmp_echo(8, 77, 1)));
}

/// A TCP header like [`tcp`], with the given sequence and acknowledgement numbers.
pub fn tcp_seq(src_port: u16, dst_port: u16, flags: u8, seq: u32, ack: u32) -> Vec<u8> {
    let mut h = tcp(src_port, dst_port, flags, b"");
    h[4..8].copy_from_slice(&seq.to_be_bytes());
    h[8..12].copy_from_slice(&ack.to_be_bytes());
    h
}

/// Recomputes the IPv4 header checksum of `frame` after its header was edited.
pub fn fix_ip_checksum(frame: &mut [u8]) {
    let ihl = usize::from(frame[ETH_LEN] & 0x0f) * 4;
    frame[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&[0, 0]);
    let csum = csum_fold(sum_words(&frame[ETH_LEN..ETH_LEN + ihl]));
    frame[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&csum.to_be_bytes());
}

/// Splits the IPv4 datagram in `frame` into two fragments at `at` bytes of its payload (a
/// multiple of 8), as a router would: the first with "more fragments", the second with the
/// offset; both with valid header checksums and the datagram's L4 checksum untouched.
pub fn fragments(frame: &[u8], at: usize) -> (Vec<u8>, Vec<u8>) {
    assert_eq!(at % 8, 0);
    let ihl = usize::from(frame[ETH_LEN] & 0x0f) * 4;
    let header = &frame[..ETH_LEN + ihl];
    let payload = &frame[ETH_LEN + ihl..];
    let part = |bytes: &[u8], frag: u16| {
        let mut f = header.to_vec();
        f.extend_from_slice(bytes);
        let total = (ihl + bytes.len()) as u16;
        f[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&total.to_be_bytes());
        f[ETH_LEN + 6..ETH_LEN + 8].copy_from_slice(&frag.to_be_bytes());
        fix_ip_checksum(&mut f);
        f
    };
    (
        part(&payload[..at], 0x2000),
        part(&payload[at..], (at / 8) as u16),
    )
}

/// Reassembles two fragments (as [`fragments`] made them, possibly rewritten) into one frame
/// and checks every checksum of the whole datagram.
pub fn assert_reassembles(first: &[u8], later: &[u8]) -> Vec<u8> {
    let ihl = usize::from(first[ETH_LEN] & 0x0f) * 4;
    let later_ihl = usize::from(later[ETH_LEN] & 0x0f) * 4;
    assert_eq!(
        first[ETH_LEN + 12..ETH_LEN + 20],
        later[ETH_LEN + 12..ETH_LEN + 20],
        "both fragments carry the same addresses"
    );
    let mut whole = first.to_vec();
    whole.extend_from_slice(&later[ETH_LEN + later_ihl..]);
    let total = (whole.len() - ETH_LEN) as u16;
    whole[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&total.to_be_bytes());
    whole[ETH_LEN + 6..ETH_LEN + 8].copy_from_slice(&[0, 0]);
    fix_ip_checksum(&mut whole);
    assert_checksums(first_header_ok(first, ihl, &whole));
    whole
}

fn first_header_ok<'a>(first: &[u8], ihl: usize, whole: &'a [u8]) -> &'a [u8] {
    assert_eq!(
        csum_fold(sum_words(&first[ETH_LEN..ETH_LEN + ihl])),
        0,
        "first fragment's IPv4 header checksum is wrong"
    );
    whole
}
