//! Packet tests of the IPv6 path: the IPv4 tc programs tail-call their IPv6 halves for each
//! IPv6 frame. Header parsing (extension headers, the fragment header, malformed headers).
//! IPv6 has no header checksum: every TCP, UDP and ICMPv6 checksum is verified over the
//! pseudo-header with the 128-bit addresses.

use std::net::Ipv6Addr;

use dataplane_common::DropReason;

use super::{
    packet::{ETH_LEN, TCP_SYN, csum_fold, sum_words, tcp, udp},
    programs::{TC_PASS, TC_SHOT, loaded_or_skip, run_tc},
    translation::drops,
};
use crate::kernel::Hook;

pub(super) const IPPROTO_ICMPV6: u8 = 58;
const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const DEST_OPTS: u8 = 60;
const IPV6_HDR_LEN: usize = 40;

/// An IPv6 packet to craft: addresses, the upper-layer protocol and the extension headers
/// before it (each as its type and its whole bytes; the builder fills in each one's next
/// header).
#[derive(Clone, Debug)]
pub(super) struct Ipv6Spec {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub protocol: u8,
    pub ext: Vec<(u8, Vec<u8>)>,
}

impl Ipv6Spec {
    pub fn new(src: Ipv6Addr, dst: Ipv6Addr, protocol: u8) -> Ipv6Spec {
        Ipv6Spec {
            src,
            dst,
            protocol,
            ext: Vec::new(),
        }
    }

    /// With an extension header of `kind` (8 bytes: options padding, or an empty routing
    /// header) before the upper layer.
    pub fn with(mut self, kind: u8) -> Ipv6Spec {
        let bytes = match kind {
            // Next header, length 0, then PadN of 4 bytes of padding.
            HOP_BY_HOP | DEST_OPTS => vec![0, 0, 1, 4, 0, 0, 0, 0],
            // Routing type 4 (segment routing) with no segments left: ignored on the way.
            ROUTING => vec![0, 0, 4, 0, 0, 0, 0, 0],
            _ => panic!("no 8-byte header of type {kind}"),
        };
        self.ext.push((kind, bytes));
        self
    }
}

/// The sum of the upper-layer pseudo-header: addresses, upper-layer length, next header.
pub(super) fn pseudo_sum(src: Ipv6Addr, dst: Ipv6Addr, protocol: u8, l4_len: usize) -> u32 {
    sum_words(&src.octets())
        + sum_words(&dst.octets())
        + sum_words(&(l4_len as u32).to_be_bytes())
        + u32::from(protocol)
}

/// Where the checksum of `protocol` sits in its header.
fn csum_offset(protocol: u8) -> Option<usize> {
    match protocol {
        6 => Some(16),
        17 => Some(6),
        IPPROTO_ICMPV6 => Some(2),
        _ => None,
    }
}

/// An Ethernet frame carrying IPv6, its extension headers and `l4` (a TCP, UDP or ICMPv6
/// message with its checksum field zero); fills in the L4 checksum.
pub(super) fn ipv6_frame(ip: &Ipv6Spec, l4: &[u8]) -> Vec<u8> {
    let mut ext = Vec::new();
    for (i, (_, bytes)) in ip.ext.iter().enumerate() {
        let next = ip.ext.get(i + 1).map_or(ip.protocol, |(kind, _)| *kind);
        let mut header = bytes.clone();
        header[0] = next;
        ext.extend_from_slice(&header);
    }
    let first = ip.ext.first().map_or(ip.protocol, |(kind, _)| *kind);
    let mut frame = Vec::with_capacity(ETH_LEN + IPV6_HDR_LEN + ext.len() + l4.len());
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // dst MAC
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // src MAC
    frame.extend_from_slice(&0x86ddu16.to_be_bytes());
    frame.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, no traffic class, no flow label
    frame.extend_from_slice(&((ext.len() + l4.len()) as u16).to_be_bytes());
    frame.push(first);
    frame.push(64); // hop limit
    frame.extend_from_slice(&ip.src.octets());
    frame.extend_from_slice(&ip.dst.octets());
    frame.extend_from_slice(&ext);
    let l4_start = frame.len();
    frame.extend_from_slice(l4);
    if let Some(off) = csum_offset(ip.protocol) {
        let sum = pseudo_sum(ip.src, ip.dst, ip.protocol, l4.len()) + sum_words(&frame[l4_start..]);
        let mut csum = csum_fold(sum);
        if ip.protocol == 17 && csum == 0 {
            csum = 0xffff;
        }
        frame[l4_start + off..l4_start + off + 2].copy_from_slice(&csum.to_be_bytes());
    }
    frame
}

/// An IPv6 frame's addresses, upper-layer protocol and the offset of its upper-layer header
/// (after the extension headers); None for a later fragment.
pub(super) fn upper_layer(frame: &[u8]) -> (Ipv6Addr, Ipv6Addr, u8, Option<usize>) {
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&frame[ETH_LEN + 8..ETH_LEN + 24]).unwrap());
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&frame[ETH_LEN + 24..ETH_LEN + 40]).unwrap());
    let mut next = frame[ETH_LEN + 6];
    let mut at = ETH_LEN + IPV6_HDR_LEN;
    loop {
        match next {
            HOP_BY_HOP | ROUTING | DEST_OPTS => {
                next = frame[at];
                at += (usize::from(frame[at + 1]) + 1) * 8;
            }
            FRAGMENT => {
                let offset = u16::from_be_bytes([frame[at + 2], frame[at + 3]]) & 0xfff8;
                next = frame[at];
                at += 8;
                if offset != 0 {
                    return (src, dst, next, None);
                }
            }
            _ => return (src, dst, next, Some(at)),
        }
    }
}

/// Checks the TCP, UDP or ICMPv6 checksum of `frame` over the IPv6 pseudo-header, and that the
/// payload length is the frame's; panics with what is wrong.
pub(super) fn assert_checksums6(frame: &[u8]) {
    let payload_len = usize::from(u16::from_be_bytes([frame[ETH_LEN + 4], frame[ETH_LEN + 5]]));
    assert_eq!(
        ETH_LEN + IPV6_HDR_LEN + payload_len,
        frame.len(),
        "IPv6 payload length is the frame's"
    );
    let (src, dst, protocol, l4) = upper_layer(frame);
    let Some(l4) = l4 else {
        return; // a later fragment: the datagram's checksum is in its first fragment
    };
    if csum_offset(protocol).is_some() {
        let sum = pseudo_sum(src, dst, protocol, frame.len() - l4) + sum_words(&frame[l4..]);
        assert_eq!(
            csum_fold(sum),
            0,
            "L4 checksum (protocol {protocol}) over the IPv6 pseudo-header is wrong"
        );
    }
}

pub(super) fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

#[test]
fn crafted_ipv6_frames_have_valid_checksums() {
    let ip = Ipv6Spec::new(v6("2001:db8::2"), v6("2001:db8::1"), 6).with(HOP_BY_HOP);
    assert_checksums6(&ipv6_frame(&ip, &tcp(1234, 80, TCP_SYN, b"hello")));
    let ip = Ipv6Spec::new(v6("2001:db8::2"), v6("fd00::2"), 17).with(DEST_OPTS);
    assert_checksums6(&ipv6_frame(&ip, &udp(53, 5353, b"abc")));
}

/// A fragment header (first fragment when `offset` is 0 with "more fragments").
pub(super) fn fragment_header(offset: u16, more: bool, id: u32) -> (u8, Vec<u8>) {
    let word = (offset << 3) | u16::from(more);
    let mut h = vec![0, 0];
    h.extend_from_slice(&word.to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    (FRAGMENT, h)
}

#[test]
fn ipv6_headers_are_walked_and_malformed_ones_dropped() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    let (client, server) = (v6("2001:db8::2"), v6("2001:db8:1::7"));
    let syn = || tcp(40000, 80, TCP_SYN, b"");
    let plain = ipv6_frame(&Ipv6Spec::new(client, server, 6), &syn());
    let chained = ipv6_frame(
        &Ipv6Spec::new(client, server, 17)
            .with(HOP_BY_HOP)
            .with(ROUTING)
            .with(DEST_OPTS),
        &udp(5353, 53, b"q"),
    );
    let mut first_fragment = Ipv6Spec::new(client, server, 17);
    first_fragment
        .ext
        .push(fragment_header(0, true, 0xdead_beef));
    let first_fragment = ipv6_frame(&first_fragment, &udp(5353, 53, b"0123456789abcdef"));
    let mut later_fragment = Ipv6Spec::new(client, server, 17);
    later_fragment
        .ext
        .push(fragment_header(3, false, 0xdead_beef));
    let later_fragment = ipv6_frame(&later_fragment, b"01234567");
    // Broken ones: an IPv4 version nibble, a payload length beyond the frame, an extension
    // header running past the payload, a chain longer than the walk.
    let mut wrong_version = plain.clone();
    wrong_version[ETH_LEN] = 0x45;
    let mut payload_beyond_frame = plain.clone();
    payload_beyond_frame[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&1400u16.to_be_bytes());
    let mut ext_beyond_payload = chained.clone();
    ext_beyond_payload[ETH_LEN + IPV6_HDR_LEN + 1] = 200; // hop-by-hop of 1608 bytes
    let mut long_chain = Ipv6Spec::new(client, server, 6);
    for _ in 0..9 {
        long_chain = long_chain.with(DEST_OPTS);
    }
    let long_chain = ipv6_frame(&long_chain, &syn());
    let cases: [(&str, &Vec<u8>, u32); 8] = [
        ("TCP SYN without extension headers", &plain, TC_PASS),
        (
            "UDP after hop-by-hop, routing, destination options",
            &chained,
            TC_PASS,
        ),
        ("a first fragment", &first_fragment, TC_PASS),
        ("a later fragment", &later_fragment, TC_PASS),
        ("version 4 in an IPv6 frame", &wrong_version, TC_SHOT),
        (
            "payload length beyond the frame",
            &payload_beyond_frame,
            TC_SHOT,
        ),
        (
            "extension header beyond the payload",
            &ext_beyond_payload,
            TC_SHOT,
        ),
        ("nine extension headers", &long_chain, TC_SHOT),
    ];
    let mut dropped = 0;
    for hook in [
        Hook::ContainerIngress,
        Hook::UplinkIngress,
        Hook::UplinkEgress,
    ] {
        for (description, input, verdict) in &cases {
            let (got, output) = run_tc(dp, hook, input);
            assert_eq!(got, *verdict, "{hook:?}, {description}: verdict");
            assert_eq!(&output, *input, "{hook:?}, {description}: unchanged");
            if got == TC_SHOT {
                dropped += 1;
            } else {
                assert_checksums6(&output);
            }
        }
    }
    assert_eq!(drops(dp, DropReason::Malformed), dropped);
}

#[test]
fn ipv6_between_containers_keeps_dockers_network_isolation() {
    use dataplane_common::{EndpointInfo6, In6Addr, net_flags};

    let mut t = loaded_or_skip!();
    let dp = t.get();
    // Two containers on network 1, one on network 2, two on network 3 (icc: false), two on
    // network 4 (internal).
    let (a1, a2, b1) = (v6("fd00:1::2"), v6("fd00:1::3"), v6("fd00:2::2"));
    let (c1, c2) = (v6("fd00:3::2"), v6("fd00:3::3"));
    let (i1, i2) = (v6("fd00:4::2"), v6("fd00:4::3"));
    let host = v6("2001:db8::1");
    dp.set::<crate::kernel::maps::LocalAddrs6>(In6Addr::from_ipv6(host), 1u8)
        .unwrap();
    for (i, (addr, network, flags)) in [
        (a1, 1, 0),
        (a2, 1, 0),
        (b1, 2, 0),
        (c1, 3, net_flags::NO_ICC),
        (c2, 3, net_flags::NO_ICC),
        (i1, 4, net_flags::INTERNAL),
        (i2, 4, net_flags::INTERNAL),
    ]
    .into_iter()
    .enumerate()
    {
        let info = EndpointInfo6 {
            ifindex: 100 + i as u32,
            network_id: network,
            endpoint_id: 1 + i as u32,
            net_flags: flags,
            ..EndpointInfo6::default()
        };
        dp.set::<crate::kernel::maps::Endpoints6>(In6Addr::from_ipv6(addr), info)
            .unwrap();
    }
    let syn = |from, to| ipv6_frame(&Ipv6Spec::new(from, to, 6), &tcp(40000, 80, TCP_SYN, b""));
    let icmp6 = |from, to, kind: u8| {
        // Type, code, checksum (filled in by the builder), 4 bytes, and the target address of
        // a neighbour solicitation (the echo's identifier and sequence for an echo).
        let mut message = vec![kind, 0, 0, 0, 0, 0, 0, 0];
        message.extend_from_slice(&Ipv6Addr::octets(&to));
        ipv6_frame(&Ipv6Spec::new(from, to, IPPROTO_ICMPV6), &message)
    };
    const ECHO_REQUEST6: u8 = 128;
    const NEIGHBOUR_SOLICITATION: u8 = 135;
    let cases = [
        ("same network", syn(a1, a2), TC_PASS),
        ("to another network", syn(a1, b1), TC_SHOT),
        ("from the other network back", syn(b1, a1), TC_SHOT),
        (
            "a ping to another network",
            icmp6(a1, b1, ECHO_REQUEST6),
            TC_SHOT,
        ),
        ("icc: false between two containers", syn(c1, c2), TC_SHOT),
        ("icc: false, a container to itself", syn(c1, c1), TC_PASS),
        ("to the host", syn(a1, host), TC_PASS),
        ("to outside", syn(b1, v6("2001:db8:9::9")), TC_PASS),
        ("internal, within its network", syn(i1, i2), TC_PASS),
        ("internal, to the host", syn(i1, host), TC_PASS),
        (
            "internal, to outside",
            syn(i1, v6("2001:db8:9::9")),
            TC_SHOT,
        ),
        (
            "internal, a ping to outside",
            icmp6(i1, v6("2001:db8:9::9"), ECHO_REQUEST6),
            TC_SHOT,
        ),
        (
            "neighbour discovery across icc: false",
            icmp6(c1, c2, NEIGHBOUR_SOLICITATION),
            TC_PASS,
        ),
    ];
    let mut denied = 0;
    for (description, input, verdict) in &cases {
        let (got, output) = run_tc(dp, Hook::ContainerIngress, input);
        assert_eq!(got, *verdict, "{description}: verdict");
        assert_eq!(&output, input, "{description}: untouched");
        assert_checksums6(&output);
        denied += u64::from(got == TC_SHOT);
    }
    assert_eq!(drops(dp, DropReason::PolicyDenied), denied);
    // From outside (the uplink), straight to a `nat` network's container address: Docker's
    // isolation from outside closes it.
    let (got, _) = run_tc(dp, Hook::UplinkIngress, &syn(v6("2001:db8::2"), a1));
    assert_eq!(
        got, TC_SHOT,
        "routed from outside to a nat network's container"
    );
    assert_eq!(drops(dp, DropReason::PolicyDenied), denied + 1);
}

/// `frame`'s source and destination ports (TCP or UDP right after the fixed header; the
/// identifier twice for ICMPv6 echo).
pub(super) fn ports6(frame: &[u8]) -> (u16, u16) {
    let at = ETH_LEN + IPV6_HDR_LEN;
    let word = |o: usize| u16::from_be_bytes([frame[at + o], frame[at + o + 1]]);
    if frame[ETH_LEN + 6] == IPPROTO_ICMPV6 {
        return (word(4), word(4));
    }
    (word(0), word(2))
}

const TC_REDIRECT: u32 = 7;
/// The MAC of the translation tests' container.
pub(super) const CONTAINER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

/// Gives a loaded datapath one container (`fd00:1::2`, behind the test run's loopback), the
/// host address `2001:db8::1` (also the IPv6 masquerade address) and an uplink.
pub(super) fn with_container6(dp: &mut crate::kernel::Datapath) {
    use dataplane_common::{Config, EndpointInfo6, In6Addr};

    dp.set::<crate::kernel::maps::LocalAddrs6>(In6Addr::from_ipv6(v6("2001:db8::1")), 1u8)
        .unwrap();
    dp.set::<crate::kernel::maps::Endpoints6>(
        In6Addr::from_ipv6(v6("fd00:1::2")),
        EndpointInfo6 {
            ifindex: 1,
            network_id: 1,
            endpoint_id: 1,
            mac: CONTAINER_MAC,
            ..EndpointInfo6::default()
        },
    )
    .unwrap();
    dp.set_config(Config {
        masquerade_addr6: In6Addr::from_ipv6(v6("2001:db8::1")),
        uplink_ifindex: 1,
        snat_port_min: 61000,
        snat_port_max: 65000,
        ..Config::default()
    })
    .unwrap();
}

/// Publishes `port` of `proto` on `addr` (`::`: every host address) to the container's `to`.
pub(super) fn publish6(
    dp: &mut crate::kernel::Datapath,
    addr: Ipv6Addr,
    port: u16,
    proto: u8,
    to: u16,
) {
    use dataplane_common::{In6Addr, PortKey6, PortTarget6};

    dp.set::<crate::kernel::maps::Ports6>(
        PortKey6 {
            addr: In6Addr::from_ipv6(addr),
            port: port.to_be(),
            proto,
            _pad: 0,
        },
        PortTarget6 {
            addr: In6Addr::from_ipv6(v6("fd00:1::2")),
            port: to.to_be(),
            is_service: 0,
            _pad: 0,
        },
    )
    .unwrap();
}

/// Runs `input` through `hook` and checks the verdict, the addresses it leaves with and every
/// checksum; returns the packet.
pub(super) fn translated(
    dp: &mut crate::kernel::Datapath,
    hook: Hook,
    input: &[u8],
    verdict: u32,
    addresses: (Ipv6Addr, Ipv6Addr),
    what: &str,
) -> Vec<u8> {
    let (got, out) = run_tc(dp, hook, input);
    assert_eq!(got, verdict, "{what}: verdict");
    let (src, dst, _, _) = upper_layer(&out);
    assert_eq!((src, dst), addresses, "{what}: addresses");
    assert_checksums6(&out);
    out
}

pub(super) fn frame6(from: Ipv6Addr, to: Ipv6Addr, protocol: u8, l4: &[u8]) -> Vec<u8> {
    ipv6_frame(&Ipv6Spec::new(from, to, protocol), l4)
}

#[test]
fn ipv6_published_port_from_outside_keeps_the_client_and_replies_from_the_host() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    let (host, client, container) = (v6("2001:db8::1"), v6("2001:db8::2"), v6("fd00:1::2"));
    with_container6(dp);
    // TCP 8080 on the host's address, UDP 5353 on every host address (::).
    publish6(dp, host, 8080, 6, 80);
    publish6(dp, Ipv6Addr::UNSPECIFIED, 5353, 17, 53);
    let syn_ack = TCP_SYN | super::packet::TCP_ACK;
    for (what, protocol, request, reply, published, inner) in [
        (
            "TCP on the host's address",
            6u8,
            tcp(40000, 8080, TCP_SYN, b"hello"),
            tcp(80, 40000, syn_ack, b"hi"),
            8080u16,
            80u16,
        ),
        (
            "UDP on every host address",
            17,
            udp(40001, 5353, b"query"),
            udp(53, 40001, b"answer"),
            5353,
            53,
        ),
    ] {
        let input = frame6(client, host, protocol, &request);
        let what_in = format!("{what}: into the container, the client's address kept");
        let out = translated(
            dp,
            Hook::UplinkIngress,
            &input,
            TC_REDIRECT,
            (client, container),
            &what_in,
        );
        assert_eq!(ports6(&out).1, inner, "{what}: to the container's port");
        assert_eq!(&out[..6], &CONTAINER_MAC, "{what}: to the container's MAC");
        let input = frame6(container, client, protocol, &reply);
        let what_out = format!("{what}: the reply out of the uplink, from the host");
        let out = translated(
            dp,
            Hook::ContainerIngress,
            &input,
            TC_REDIRECT,
            (host, client),
            &what_out,
        );
        assert_eq!(ports6(&out).0, published, "{what}: from the published port");
    }
    // A port nobody published, and the container's own traffic to outside: untouched.
    let other = frame6(client, host, 6, &tcp(40002, 9999, TCP_SYN, b""));
    assert_eq!(
        run_tc(dp, Hook::UplinkIngress, &other),
        (TC_PASS, other.clone())
    );
    let out = frame6(container, client, 6, &tcp(40003, 443, TCP_SYN, b""));
    assert_eq!(
        run_tc(dp, Hook::ContainerIngress, &out),
        (TC_PASS, out.clone())
    );
}

#[test]
fn ipv6_masquerade_leaves_with_the_uplinks_address_and_replies_come_back() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    let (host, server, container) = (v6("2001:db8::1"), v6("2001:db8:9::9"), v6("fd00:1::2"));
    with_container6(dp);
    let echo = |kind: u8, id: u16| {
        let mut m = vec![kind, 0, 0, 0];
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&[0, 1, b'p', b'i', b'n', b'g']);
        m
    };
    let syn_ack = TCP_SYN | super::packet::TCP_ACK;
    for (what, protocol, request, reply, port) in [
        (
            "TCP",
            6u8,
            tcp(40010, 443, TCP_SYN, b""),
            tcp(443, 40010, syn_ack, b""),
            40010u16,
        ),
        (
            "UDP",
            17,
            udp(40011, 53, b"query"),
            udp(53, 40011, b"answer"),
            40011,
        ),
        (
            "ICMPv6 echo",
            IPPROTO_ICMPV6,
            echo(128, 77),
            echo(129, 77),
            77,
        ),
    ] {
        let input = frame6(container, server, protocol, &request);
        let what_out = format!("{what}: out of the uplink from its address");
        let out = translated(
            dp,
            Hook::UplinkEgress,
            &input,
            TC_PASS,
            (host, server),
            &what_out,
        );
        assert_eq!(
            ports6(&out).0,
            port,
            "{what}: its own port (identifier) kept: the tuple is free"
        );
        let input = frame6(server, host, protocol, &reply);
        let what_in = format!("{what}: the reply straight back into the container");
        let out = translated(
            dp,
            Hook::UplinkIngress,
            &input,
            TC_REDIRECT,
            (server, container),
            &what_in,
        );
        assert_eq!(&out[..6], &CONTAINER_MAC, "{what}: to the container's MAC");
    }
    // The host's own traffic keeps its address.
    let own = frame6(host, server, 6, &tcp(40020, 443, TCP_SYN, b""));
    assert_eq!(run_tc(dp, Hook::UplinkEgress, &own), (TC_PASS, own.clone()));
}

#[test]
fn ipv6_fragments_of_a_translated_datagram_are_translated_as_its_first() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    let (host, client, container) = (v6("2001:db8::1"), v6("2001:db8::2"), v6("fd00:1::2"));
    let server = v6("2001:db8:9::9");
    with_container6(dp);
    publish6(dp, Ipv6Addr::UNSPECIFIED, 5353, 17, 53);
    let fragment = |from, to, offset: u16, more: bool, id: u32, l4: &[u8]| {
        let mut spec = Ipv6Spec::new(from, to, 17);
        spec.ext.push(fragment_header(offset, more, id));
        ipv6_frame(&spec, l4)
    };
    // A UDP datagram of 8 + 16 + 16 bytes in two fragments: the first carries the UDP header
    // (its length is the whole datagram's) and 16 bytes, the second the last 16.
    let mut first_l4 = udp(40030, 5353, &[7u8; 16]);
    first_l4[4..6].copy_from_slice(&40u16.to_be_bytes());
    for (what, hook, from, to, port, verdict, want) in [
        (
            "published port, from outside",
            Hook::UplinkIngress,
            client,
            host,
            5353u16,
            TC_REDIRECT,
            (client, container),
        ),
        (
            "masquerade, from a container",
            Hook::UplinkEgress,
            container,
            server,
            53,
            TC_PASS,
            (host, server),
        ),
    ] {
        let mut l4 = first_l4.clone();
        l4[2..4].copy_from_slice(&port.to_be_bytes());
        let id = 0x1234 + u32::from(port);
        let first = fragment(from, to, 0, true, id, &l4);
        translated(
            dp,
            hook,
            &first,
            verdict,
            want,
            &format!("{what}: first fragment"),
        );
        let later = fragment(from, to, 3, false, id, &[9u8; 16]);
        let out = translated(
            dp,
            hook,
            &later,
            verdict,
            want,
            &format!("{what}: later fragment, as its first"),
        );
        assert_eq!(
            &out[out.len() - 16..],
            &later[later.len() - 16..],
            "{what}: its data untouched"
        );
    }
    // A later fragment whose first never came: dropped and counted, never passed untranslated.
    let before = drops(dp, DropReason::FragmentNotFound);
    let (got, _) = run_tc(
        dp,
        Hook::UplinkIngress,
        &fragment(client, host, 3, false, 0x9999, &[9u8; 16]),
    );
    assert_eq!(got, TC_SHOT);
    assert_eq!(drops(dp, DropReason::FragmentNotFound), before + 1);
}

/// The IPv6 VIP of the service tests, and its backends (containers on the client's network,
/// target port 8080).
const VIP6: &str = "fd00::10";
const BACKENDS6: [&str; 2] = ["fd00:1::3", "fd00:1::4"];

/// [`with_container6`] and a service `VIP6`:80/tcp and :53/udp over `backends` (Maglev, id 1), each
/// backend a container of the client's network (ifindex 10 + i, MAC 02:..:10+i).
fn with_service6(dp: &mut crate::kernel::Datapath, backends: &[&str]) {
    use dataplane_common::{
        Backend6, BackendKey, EndpointInfo6, In6Addr, ServiceInfo, ServiceKey6, algorithm,
    };

    with_container6(dp);
    let members: Vec<crate::reconcile::maglev::Member> = backends
        .iter()
        .map(|b| crate::reconcile::maglev::Member {
            identity: (*b).to_owned(),
            weight: 1,
        })
        .collect();
    for (i, backend) in backends.iter().enumerate() {
        dp.set::<crate::kernel::maps::Backends6>(
            BackendKey {
                service_id: 1,
                index: i as u32,
            },
            Backend6 {
                addr: In6Addr::from_ipv6(v6(backend)),
                port: 8080u16.to_be(),
                _pad: [0; 2],
            },
        )
        .unwrap();
        dp.set::<crate::kernel::maps::Endpoints6>(
            In6Addr::from_ipv6(v6(backend)),
            EndpointInfo6 {
                ifindex: 10 + i as u32,
                network_id: 1,
                endpoint_id: 10 + i as u32,
                mac: [2, 0, 0, 0, 0, 0x10 + i as u8],
                ..EndpointInfo6::default()
            },
        )
        .unwrap();
    }
    if !backends.is_empty() {
        let table = crate::reconcile::maglev::table(&members, dp.maglev_size());
        dp.set_maglev(1, &table).unwrap();
    }
    // TCP 80 and UDP 53 on the VIP, the same backends.
    for (port, proto) in [(80u16, 6u8), (53, 17)] {
        dp.set::<crate::kernel::maps::Services6>(
            ServiceKey6 {
                vip: In6Addr::from_ipv6(v6(VIP6)),
                port: port.to_be(),
                proto,
                _pad: 0,
            },
            ServiceInfo {
                id: 1,
                backend_count: backends.len() as u32,
                algorithm: algorithm::MAGLEV,
                overlay: 0,
                _pad: [0; 2],
            },
        )
        .unwrap();
    }
}

#[test]
fn ipv6_vip_from_a_container_is_balanced_and_replies_come_from_the_vip() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    with_service6(dp, &BACKENDS6);
    let (client, vip) = (v6("fd00:1::2"), v6(VIP6));
    let syn_ack = TCP_SYN | super::packet::TCP_ACK;
    let mut landed = std::collections::BTreeMap::new();
    for sport in 40000..40200u16 {
        let syn = frame6(client, vip, 6, &tcp(sport, 80, TCP_SYN, b""));
        let (verdict, out) = run_tc(dp, Hook::ContainerIngress, &syn);
        assert_eq!(verdict, TC_REDIRECT, "{sport}: straight into the backend");
        assert_checksums6(&out);
        let (src, backend, _, _) = upper_layer(&out);
        assert_eq!(src, client, "{sport}: the client's address kept");
        assert_eq!(ports6(&out), (sport, 8080), "{sport}: to the target port");
        let index = BACKENDS6
            .iter()
            .position(|b| v6(b) == backend)
            .unwrap_or_else(|| panic!("{sport}: to {backend}, not a backend"));
        assert_eq!(
            &out[..6],
            &[2, 0, 0, 0, 0, 0x10 + index as u8],
            "{sport}: to the backend's MAC"
        );
        *landed.entry(backend).or_insert(0u32) += 1;
        if sport % 50 != 0 {
            continue;
        }
        // The reply comes back from the VIP, straight into the client; the connection's
        // next packet goes to the same backend.
        let reply = frame6(backend, client, 6, &tcp(8080, sport, syn_ack, b""));
        let out = translated(
            dp,
            Hook::ContainerIngress,
            &reply,
            TC_REDIRECT,
            (vip, client),
            "the reply from the VIP",
        );
        assert_eq!(ports6(&out), (80, sport), "from the VIP's port");
        assert_eq!(&out[..6], &CONTAINER_MAC, "to the client's MAC");
        let ack = frame6(
            client,
            vip,
            6,
            &tcp(sport, 80, super::packet::TCP_ACK, b"GET"),
        );
        let out = translated(
            dp,
            Hook::ContainerIngress,
            &ack,
            TC_REDIRECT,
            (client, backend),
            "the connection's next packet",
        );
        assert_eq!(ports6(&out), (sport, 8080));
    }
    assert_eq!(landed.len(), 2, "both backends: {landed:?}");
    assert!(
        landed.values().all(|n| (70..=130).contains(n)),
        "Maglev spreads 200 connections: {landed:?}"
    );
    // Not a VIP (another port): untouched.
    let other = frame6(client, vip, 6, &tcp(41000, 81, TCP_SYN, b""));
    assert_eq!(
        run_tc(dp, Hook::ContainerIngress, &other),
        (TC_PASS, other.clone())
    );
}

#[test]
fn ipv6_published_port_leading_to_a_service_is_balanced_from_outside() {
    use dataplane_common::{In6Addr, PortKey6, PortTarget6};

    let mut t = loaded_or_skip!();
    let dp = t.get();
    with_service6(dp, &BACKENDS6);
    let (host, outside) = (v6("2001:db8::1"), v6("2001:db8::2"));
    dp.set::<crate::kernel::maps::Ports6>(
        PortKey6 {
            addr: In6Addr::UNSPECIFIED,
            port: 8000u16.to_be(),
            proto: 6,
            _pad: 0,
        },
        PortTarget6 {
            addr: In6Addr::from_ipv6(v6(VIP6)),
            port: 80u16.to_be(),
            is_service: 1,
            _pad: 0,
        },
    )
    .unwrap();
    let syn_ack = TCP_SYN | super::packet::TCP_ACK;
    let mut landed = std::collections::BTreeSet::new();
    for sport in 50000..50060u16 {
        let syn = frame6(outside, host, 6, &tcp(sport, 8000, TCP_SYN, b""));
        let (verdict, out) = run_tc(dp, Hook::UplinkIngress, &syn);
        assert_eq!(verdict, TC_REDIRECT, "{sport}: straight into the backend");
        assert_checksums6(&out);
        let (src, backend, _, _) = upper_layer(&out);
        assert_eq!(src, outside, "the client's address kept");
        assert_eq!(ports6(&out), (sport, 8080));
        assert!(BACKENDS6.iter().any(|b| v6(b) == backend), "{backend}");
        landed.insert(backend);
        let reply = frame6(backend, outside, 6, &tcp(8080, sport, syn_ack, b""));
        let out = translated(
            dp,
            Hook::ContainerIngress,
            &reply,
            TC_REDIRECT,
            (host, outside),
            "the reply out of the uplink, from the host",
        );
        assert_eq!(ports6(&out), (8000, sport), "from the published port");
    }
    assert_eq!(landed.len(), 2, "both backends: {landed:?}");
}

#[test]
fn ipv6_vip_without_backends_refuses_with_a_reset_and_counts_it() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    with_service6(dp, &[]);
    let (client, vip) = (v6("fd00:1::2"), v6(VIP6));
    let syn = frame6(client, vip, 6, &tcp(40000, 80, TCP_SYN, b""));
    let (verdict, out) = run_tc(dp, Hook::ContainerIngress, &syn);
    assert_eq!(verdict, TC_REDIRECT, "sent back where it came from");
    assert_eq!(out.len(), ETH_LEN + IPV6_HDR_LEN + 20, "a bare reset");
    assert_checksums6(&out);
    let (src, dst, protocol, _) = upper_layer(&out);
    assert_eq!((src, dst, protocol), (vip, client, 6), "from the VIP");
    assert_eq!(ports6(&out), (80, 40000));
    let l4 = ETH_LEN + IPV6_HDR_LEN;
    assert_eq!(out[l4 + 13], 0x14, "RST|ACK");
    let ack = u32::from_be_bytes(out[l4 + 8..l4 + 12].try_into().unwrap());
    assert_eq!(ack, 1001, "acknowledges the SYN (seq 1000)");
    assert_eq!(&out[0..6], &syn[6..12], "back to the sender's MAC");
    assert_eq!(drops(dp, DropReason::ServiceBackendNotFound), 1);
}

#[test]
fn ipv6_udp_to_a_vip_and_the_fragments_of_a_datagram_go_to_one_backend() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    with_service6(dp, &BACKENDS6);
    let (client, vip) = (v6("fd00:1::2"), v6(VIP6));
    // One datagram, then its reply from the VIP.
    let query = frame6(client, vip, 17, &udp(40100, 53, b"query"));
    let (verdict, out) = run_tc(dp, Hook::ContainerIngress, &query);
    assert_eq!(verdict, TC_REDIRECT);
    assert_checksums6(&out);
    let (_, backend, _, _) = upper_layer(&out);
    assert!(BACKENDS6.iter().any(|b| v6(b) == backend), "{backend}");
    assert_eq!(ports6(&out), (40100, 8080));
    let answer = frame6(backend, client, 17, &udp(8080, 40100, b"answer"));
    let out = translated(
        dp,
        Hook::ContainerIngress,
        &answer,
        TC_REDIRECT,
        (vip, client),
        "the UDP answer from the VIP",
    );
    assert_eq!(ports6(&out), (53, 40100));
    // A datagram in two fragments (UDP header and 16 bytes, then 16 more): both to the
    // backend the first went to.
    let fragment = |offset: u16, more: bool, l4: &[u8]| {
        let mut spec = Ipv6Spec::new(client, vip, 17);
        spec.ext.push(fragment_header(offset, more, 0x4242));
        ipv6_frame(&spec, l4)
    };
    let mut first_l4 = udp(40101, 53, &[7u8; 16]);
    first_l4[4..6].copy_from_slice(&40u16.to_be_bytes());
    let (verdict, out) = run_tc(dp, Hook::ContainerIngress, &fragment(0, true, &first_l4));
    assert_eq!(verdict, TC_REDIRECT, "first fragment");
    let (_, backend, _, _) = upper_layer(&out);
    assert!(BACKENDS6.iter().any(|b| v6(b) == backend), "{backend}");
    let later = fragment(3, false, &[9u8; 16]);
    let out = translated(
        dp,
        Hook::ContainerIngress,
        &later,
        TC_REDIRECT,
        (client, backend),
        "the later fragment, as its first",
    );
    assert_eq!(
        &out[out.len() - 16..],
        &later[later.len() - 16..],
        "its data untouched"
    );
}

/// An ICMPv6 error of `kind` (and `code`; for packet too big, `mtu` in its 4 bytes) quoting
/// `frame`'s IPv6 packet, its checksum left for the builder.
pub(super) fn icmp6_error(kind: u8, code: u8, mtu: u32, frame: &[u8]) -> Vec<u8> {
    let mut message = vec![kind, code, 0, 0];
    message.extend_from_slice(&mtu.to_be_bytes());
    message.extend_from_slice(&frame[ETH_LEN..]);
    message
}

/// The addresses and ports of the packet an ICMPv6 error frame quotes.
fn quoted6(frame: &[u8]) -> (Ipv6Addr, Ipv6Addr, u16, u16) {
    let at = ETH_LEN + IPV6_HDR_LEN + 8;
    let addr =
        |o: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&frame[at + o..at + o + 16]).unwrap());
    let port = |o: usize| u16::from_be_bytes([frame[at + o], frame[at + o + 1]]);
    (addr(8), addr(24), port(40), port(42))
}

const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_PORT_UNREACH: u8 = 4;

/// Path MTU discovery through the translations: a router's "packet too big" about a reply
/// of a published port (sent from the host's address) reaches the container about its own
/// packet, and one about a masqueraded connection too; a container's "port unreachable"
/// about a published port's request or a masqueraded reply leaves about the translated
/// packet. Every ICMPv6 checksum (pseudo-header and quoted bytes) verified.
#[test]
fn ipv6_icmp_errors_about_translated_connections_are_translated_back() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    let (host, client, container) = (v6("2001:db8::1"), v6("2001:db8::2"), v6("fd00:1::2"));
    let (router, server) = (v6("2001:db8::fe"), v6("2001:db8:9::9"));
    with_container6(dp);
    publish6(dp, host, 8080, 6, 80);
    publish6(dp, Ipv6Addr::UNSPECIFIED, 5353, 17, 53);
    let syn_ack = TCP_SYN | super::packet::TCP_ACK;

    // A published TCP port: the client's SYN in, the container's SYN-ACK out from host:8080.
    let syn = frame6(client, host, 6, &tcp(40000, 8080, TCP_SYN, b""));
    translated(
        dp,
        Hook::UplinkIngress,
        &syn,
        TC_REDIRECT,
        (client, container),
        "SYN",
    );
    let reply = frame6(container, client, 6, &tcp(80, 40000, syn_ack, &[0u8; 64]));
    let sent = translated(
        dp,
        Hook::ContainerIngress,
        &reply,
        TC_REDIRECT,
        (host, client),
        "reply",
    );
    let too_big = frame6(
        router,
        host,
        IPPROTO_ICMPV6,
        &icmp6_error(ICMPV6_PACKET_TOO_BIG, 0, 1280, &sent),
    );
    let out = translated(
        dp,
        Hook::UplinkIngress,
        &too_big,
        TC_REDIRECT,
        (router, container),
        "packet too big about a published port's reply",
    );
    assert_eq!(
        quoted6(&out),
        (container, client, 80, 40000),
        "the quote is the container's own packet"
    );
    assert_eq!(&out[..6], &CONTAINER_MAC);

    // Masquerade: the container's UDP out leaves from the host's address; the far end's
    // "port unreachable" comes back to the container about its own datagram.
    let request = frame6(container, server, 17, &udp(40011, 53, b"query"));
    let left = translated(
        dp,
        Hook::UplinkEgress,
        &request,
        TC_PASS,
        (host, server),
        "out",
    );
    let unreachable = frame6(
        server,
        host,
        IPPROTO_ICMPV6,
        &icmp6_error(ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, 0, &left),
    );
    let out = translated(
        dp,
        Hook::UplinkIngress,
        &unreachable,
        TC_REDIRECT,
        (server, container),
        "unreachable about a masqueraded datagram",
    );
    assert_eq!(quoted6(&out), (container, server, 40011, 53));

    // The container's own errors: about a published port's request (it saw the client send
    // to its port 53) and about a masqueraded connection's reply.
    let query = frame6(client, host, 17, &udp(40001, 5353, b"query"));
    let arrived = translated(
        dp,
        Hook::UplinkIngress,
        &query,
        TC_REDIRECT,
        (client, container),
        "query",
    );
    let refused = frame6(
        container,
        client,
        IPPROTO_ICMPV6,
        &icmp6_error(ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, 0, &arrived),
    );
    let out = translated(
        dp,
        Hook::ContainerIngress,
        &refused,
        TC_REDIRECT,
        (host, client),
        "the container's unreachable about a published port's request",
    );
    assert_eq!(
        quoted6(&out),
        (client, host, 40001, 5353),
        "about what the client sent"
    );
    let answer = frame6(server, host, 17, &udp(53, 40011, b"answer"));
    let delivered = translated(
        dp,
        Hook::UplinkIngress,
        &answer,
        TC_REDIRECT,
        (server, container),
        "answer",
    );
    let refused = frame6(
        container,
        server,
        IPPROTO_ICMPV6,
        &icmp6_error(ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, 0, &delivered),
    );
    let out = translated(
        dp,
        Hook::UplinkEgress,
        &refused,
        TC_PASS,
        (host, server),
        "the container's unreachable about a masqueraded reply",
    );
    assert_eq!(quoted6(&out), (server, host, 53, 40011));

    // About no connection we track: untouched.
    let stray = frame6(
        router,
        host,
        IPPROTO_ICMPV6,
        &icmp6_error(
            ICMPV6_PACKET_TOO_BIG,
            0,
            1280,
            &frame6(host, client, 6, &tcp(22, 40999, syn_ack, b"")),
        ),
    );
    assert_eq!(
        run_tc(dp, Hook::UplinkIngress, &stray),
        (TC_PASS, stray.clone())
    );
}

/// TCP and UDP headers no receiving kernel accepts are dropped before anything is tracked,
/// counted as `CT_TRUNCATED_OR_INVALID_HEADER`, at every hook, as IPv4's are: a scan with
/// SYN+FIN or no flags, a data offset inside the fixed header, a UDP length that is not the
/// datagram's. Their valid neighbours pass.
#[test]
fn ipv6_tcp_and_udp_headers_no_kernel_accepts_are_dropped() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    let (host, client) = (v6("2001:db8::1"), v6("2001:db8::2"));
    with_container6(dp);
    publish6(dp, host, 8080, 6, 80);
    publish6(dp, host, 5353, 17, 53);
    let tcp_with = |flags: u8| frame6(client, host, 6, &tcp(40000, 8080, flags, b""));
    let mut short_offset = tcp_with(TCP_SYN);
    short_offset[ETH_LEN + IPV6_HDR_LEN + 12] = 4 << 4;
    let mut udp_long = udp(40001, 5353, b"query");
    udp_long[4..6].copy_from_slice(&100u16.to_be_bytes());
    let mut udp_short = udp(40001, 5353, b"query");
    udp_short[4..6].copy_from_slice(&6u16.to_be_bytes());
    let invalid = [
        ("SYN+FIN", tcp_with(TCP_SYN | 0x01)),
        ("no flags", tcp_with(0)),
        ("SYN+RST", tcp_with(TCP_SYN | 0x04)),
        ("a data offset of 4 words", short_offset),
        (
            "a UDP length beyond the datagram",
            frame6(client, host, 17, &udp_long),
        ),
        (
            "a UDP length under its header",
            frame6(client, host, 17, &udp_short),
        ),
    ];
    let mut dropped = 0;
    for hook in [
        Hook::UplinkIngress,
        Hook::ContainerIngress,
        Hook::UplinkEgress,
    ] {
        for (what, input) in &invalid {
            let (got, _) = run_tc(dp, hook, input);
            assert_eq!(got, TC_SHOT, "{hook:?}, {what}");
            dropped += 1;
        }
    }
    assert_eq!(drops(dp, DropReason::InvalidL4Header), dropped);
    // Nothing of them was tracked: a valid SYN after them is a new connection, translated.
    let syn = tcp_with(TCP_SYN);
    translated(
        dp,
        Hook::UplinkIngress,
        &syn,
        TC_REDIRECT,
        (client, v6("fd00:1::2")),
        "a valid SYN",
    );
    let query = frame6(client, host, 17, &udp(40002, 5353, b"query"));
    translated(
        dp,
        Hook::UplinkIngress,
        &query,
        TC_REDIRECT,
        (client, v6("fd00:1::2")),
        "a valid datagram",
    );
}

#[test]
fn ipv6_vip_whose_backend_is_the_client_itself_goes_back_through_the_gateway() {
    use dataplane_common::{EndpointInfo6, In6Addr};

    let mut t = loaded_or_skip!();
    let dp = t.get();
    let (client, vip, gateway) = (v6("fd00:1::2"), v6(VIP6), v6("fd00:1::1"));
    with_service6(dp, &["fd00:1::2"]);
    // The client is the backend: its endpoint as `with_container6` has it, with its gateway.
    dp.set::<crate::kernel::maps::Endpoints6>(
        In6Addr::from_ipv6(client),
        EndpointInfo6 {
            ifindex: 1,
            network_id: 1,
            endpoint_id: 1,
            mac: CONTAINER_MAC,
            gateway: In6Addr::from_ipv6(gateway),
            ..EndpointInfo6::default()
        },
    )
    .unwrap();
    let syn = frame6(client, vip, 6, &tcp(40300, 80, TCP_SYN, b""));
    let out = translated(
        dp,
        Hook::ContainerIngress,
        &syn,
        TC_REDIRECT,
        (gateway, client),
        "back into the client, from its gateway",
    );
    let (port, to) = ports6(&out);
    assert_eq!(to, 8080, "to the target port");
    assert_eq!(&out[..6], &CONTAINER_MAC, "to the client's MAC");
    assert_eq!(&out[6..12], &syn[..6], "from the gateway's MAC");
    let syn_ack = TCP_SYN | super::packet::TCP_ACK;
    let reply = frame6(client, gateway, 6, &tcp(8080, port, syn_ack, b""));
    let out = translated(
        dp,
        Hook::ContainerIngress,
        &reply,
        TC_REDIRECT,
        (vip, client),
        "the answer, from the VIP to the client",
    );
    assert_eq!(
        ports6(&out),
        (80, 40300),
        "from the VIP's port to the client's own"
    );
    let ack = frame6(client, vip, 6, &tcp(40300, 80, super::packet::TCP_ACK, b""));
    let out = translated(
        dp,
        Hook::ContainerIngress,
        &ack,
        TC_REDIRECT,
        (gateway, client),
        "the connection's next packet, the same way",
    );
    assert_eq!(ports6(&out), (port, 8080));
}

#[test]
fn ipv6_vip_keeps_dockers_isolation_between_the_client_and_its_backend() {
    use dataplane_common::{EndpointInfo6, In6Addr};

    let mut t = loaded_or_skip!();
    let dp = t.get();
    with_service6(dp, &BACKENDS6);
    // The client on another network than the backends: the VIP does not open a way across.
    let client = v6("fd00:2::2");
    dp.set::<crate::kernel::maps::Endpoints6>(
        In6Addr::from_ipv6(client),
        EndpointInfo6 {
            ifindex: 20,
            network_id: 2,
            endpoint_id: 20,
            mac: [2, 0, 0, 0, 0, 0x20],
            ..EndpointInfo6::default()
        },
    )
    .unwrap();
    let syn = frame6(client, v6(VIP6), 6, &tcp(40400, 80, TCP_SYN, b""));
    let (verdict, out) = run_tc(dp, Hook::ContainerIngress, &syn);
    assert_eq!((verdict, out), (TC_SHOT, syn.clone()));
    assert_eq!(drops(dp, DropReason::PolicyDenied), 1);
}

/// Every IPv6 drop gives a flow event (the drop reporter the IPv6 programs tail-call) with
/// the packet's tuple as it arrived, its reason and hook, as IPv4's drops do; the counters
/// count each drop once.
#[test]
fn ipv6_drops_give_flow_events_with_their_tuple_and_reason() {
    use crate::flows::decode::{self, Kind};

    let mut t = loaded_or_skip!();
    let dp = t.get();
    let (host, client) = (v6("2001:db8::1"), v6("2001:db8::2"));
    with_container6(dp);
    publish6(dp, host, 8080, 6, 80);
    // Another network's container: isolation drops a SYN to it.
    dp.set::<crate::kernel::maps::Endpoints6>(
        dataplane_common::In6Addr::from_ipv6(v6("fd00:2::2")),
        dataplane_common::EndpointInfo6 {
            ifindex: 2,
            network_id: 2,
            endpoint_id: 2,
            ..dataplane_common::EndpointInfo6::default()
        },
    )
    .unwrap();
    let across = frame6(
        v6("fd00:1::2"),
        v6("fd00:2::2"),
        6,
        &tcp(40000, 80, TCP_SYN, b""),
    );
    let scan = frame6(client, host, 6, &tcp(40001, 8080, TCP_SYN | 0x01, b""));
    for (hook, input) in [
        (Hook::ContainerIngress, &across),
        (Hook::UplinkIngress, &scan),
    ] {
        assert_eq!(run_tc(dp, hook, input).0, TC_SHOT);
    }
    assert_eq!(drops(dp, DropReason::PolicyDenied), 1);
    assert_eq!(drops(dp, DropReason::InvalidL4Header), 1);
    let seen: Vec<_> = super::flows::events(dp)
        .iter()
        .map(|e| {
            let e = decode::from_raw(e).unwrap();
            (
                e.kind,
                e.tuple.saddr,
                e.tuple.sport,
                e.tuple.daddr,
                e.tuple.dport,
                e.hook,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (
                Kind::Drop(DropReason::PolicyDenied),
                v6("fd00:1::2").into(),
                40000,
                v6("fd00:2::2").into(),
                80,
                dataplane_common::hook::CONTAINER_INGRESS,
            ),
            (
                Kind::Drop(DropReason::InvalidL4Header),
                client.into(),
                40001,
                host.into(),
                8080,
                dataplane_common::hook::UPLINK_INGRESS,
            ),
        ]
    );
}

/// A small deterministic generator (xorshift64*): the same packets on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// Thousands of IPv6 packets of every kind the programs look at (TCP with any flags, UDP,
/// ICMPv6 echo and errors quoting earlier packets, extension and fragment headers, cut
/// short), between the host, outside addresses and the container, at every hook, against a
/// datapath with published ports and NAT66: whatever the verdict, a packet that goes on
/// changed has every checksum right and its payload length the frame's, and a packet cut
/// short never goes on changed.
#[test]
fn random_ipv6_packets_never_leave_with_a_wrong_checksum() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    let (host, client, container) = (v6("2001:db8::1"), v6("2001:db8::2"), v6("fd00:1::2"));
    with_container6(dp);
    publish6(dp, host, 8080, 6, 80);
    publish6(dp, Ipv6Addr::UNSPECIFIED, 5353, 17, 53);
    let addrs = [
        host,
        client,
        container,
        v6("2001:db8:9::9"),
        v6("fd00:1::7"),
    ];
    let ports = [8080u16, 80, 5353, 53, 40000, 40001, 61000];
    let hooks = [
        Hook::ContainerIngress,
        Hook::UplinkIngress,
        Hook::UplinkEgress,
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut earlier: Vec<Vec<u8>> = Vec::new();
    let (mut changed, mut dropped) = (0, 0);
    for _ in 0..3000 {
        let (src, dst) = (rng.pick(&addrs), rng.pick(&addrs));
        let protocol = rng.pick(&[6u8, 6, 17, IPPROTO_ICMPV6]);
        let l4 = match protocol {
            6 => tcp(
                rng.pick(&ports),
                rng.pick(&ports),
                rng.next() as u8 & 0x3f,
                b"data",
            ),
            17 => udp(rng.pick(&ports), rng.pick(&ports), b"datagram"),
            _ if rng.below(2) == 0 || earlier.is_empty() => {
                let mut echo = vec![rng.pick(&[128u8, 129]), 0, 0, 0];
                echo.extend_from_slice(&rng.pick(&ports).to_be_bytes());
                echo.extend_from_slice(&[0, 1, b'p']);
                echo
            }
            _ => {
                let quoted = earlier[rng.below(earlier.len())].clone();
                icmp6_error(rng.pick(&[1u8, 2, 3, 4]), 0, 1280, &quoted)
            }
        };
        let mut spec = Ipv6Spec::new(src, dst, protocol);
        if rng.below(4) == 0 {
            spec = spec.with(rng.pick(&[HOP_BY_HOP, DEST_OPTS]));
        }
        if rng.below(5) == 0 {
            let offset = rng.pick(&[0u16, 0, 3, 100]);
            spec.ext.push(fragment_header(
                offset,
                rng.below(2) == 0,
                rng.next() as u32 & 7,
            ));
        }
        let mut input = ipv6_frame(&spec, &l4);
        let cut = rng.below(6) == 0;
        if cut {
            // Within the upper layers: BPF_PROG_TEST_RUN refuses an IPv6 frame shorter than
            // the fixed header.
            let fixed = ETH_LEN + IPV6_HDR_LEN;
            input.truncate(fixed + rng.below(input.len() - fixed));
        }
        let hook = rng.pick(&hooks);
        let (verdict, out) = run_tc(dp, hook, &input);
        assert!(
            [TC_PASS, TC_SHOT, TC_REDIRECT].contains(&verdict),
            "{hook:?}: verdict {verdict} for {input:02x?}"
        );
        if verdict == TC_SHOT {
            dropped += 1;
            continue;
        }
        if out != input {
            assert!(
                !cut,
                "{hook:?}: a packet cut short went on changed: {input:02x?}"
            );
            // A redirect towards a container also rewrites the MAC: compare from the IP header.
            if out[ETH_LEN..] != input[ETH_LEN..] {
                assert_checksums6(&out);
                changed += 1;
            }
        }
        if !cut && out.len() < 600 {
            earlier.push(out);
        }
    }
    eprintln!("3000 random IPv6 packets: {changed} translated, {dropped} dropped");
    assert!(
        changed > 50,
        "{changed} packets translated: the test must exercise the rewrites"
    );
    assert!(dropped > 50, "{dropped} packets dropped");
}

/// An IPv6 prefix for the deny list.
fn prefix6(addr: &str, len: u32) -> dataplane_common::PrefixKey6 {
    dataplane_common::PrefixKey6 {
        prefix_len: len,
        addr: dataplane_common::In6Addr::from_ipv6(v6(addr)),
    }
}

#[test]
fn ipv6_deny_list_drops_denied_sources_first_thing_at_tc_and_xdp() {
    use dataplane_common::{Config, In6Addr};

    let mut t = loaded_or_skip!();
    let dp = t.get();
    let (host, container) = (v6("2001:db8::1"), v6("fd00:1::2"));
    with_container6(dp);
    publish6(dp, host, 8080, 6, 80);
    dp.set_deny_source6(prefix6("2001:db8:bad::", 48), true)
        .unwrap();
    let (denied, neighbour) = (v6("2001:db8:bad:1::7"), v6("2001:db8:bae::7"));
    let syn = |from, sport| frame6(from, host, 6, &tcp(sport, 8080, TCP_SYN, b""));
    // Without XDP the uplink's tc ingress enforces the list.
    let config = |deny_at_tc| Config {
        masquerade_addr6: In6Addr::from_ipv6(host),
        uplink_ifindex: 1,
        snat_port_min: 61000,
        snat_port_max: 65000,
        deny_at_tc,
        ..Config::default()
    };
    dp.set_config(config(1)).unwrap();
    let (got, _) = run_tc(dp, Hook::UplinkIngress, &syn(denied, 40000));
    assert_eq!(got, TC_SHOT, "a denied source, at tc");
    // Even a header the parse would refuse: the list comes first.
    let mut broken = syn(denied, 40001);
    broken.truncate(ETH_LEN + IPV6_HDR_LEN + 4);
    let (got, _) = run_tc(dp, Hook::UplinkIngress, &broken);
    assert_eq!(got, TC_SHOT, "a denied source's broken packet, at tc");
    assert_eq!(drops(dp, DropReason::PolicyDeny), 2);
    assert_eq!(
        drops(dp, DropReason::Malformed),
        0,
        "dropped as denied, first"
    );
    translated(
        dp,
        Hook::UplinkIngress,
        &syn(neighbour, 40002),
        TC_REDIRECT,
        (neighbour, container),
        "the neighbouring prefix reaches the published port",
    );
    // With XDP attached, tc leaves the list to it.
    dp.set_config(config(0)).unwrap();
    let (got, _) = run_tc(dp, Hook::UplinkIngress, &syn(denied, 40003));
    assert_eq!(got, TC_REDIRECT, "tc leaves the list to XDP");
    let run_xdp = |dp: &mut crate::kernel::Datapath, frame: &[u8]| {
        use aya::programs::{TestRun, TestRunOptions};
        let mut out = vec![0u8; frame.len() + 64];
        dp.xdp()
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .unwrap()
            .return_value
    };
    const XDP_DROP: u32 = 1;
    const XDP_PASS: u32 = 2;
    assert_eq!(run_xdp(dp, &syn(denied, 40004)), XDP_DROP, "at XDP");
    assert_eq!(run_xdp(dp, &syn(neighbour, 40005)), XDP_PASS);
    assert_eq!(drops(dp, DropReason::PolicyDeny), 3);
}

#[test]
fn ipv6_policy_rules_judge_new_connections_and_their_replies_pass() {
    use crate::reconcile::policy::{Rule, Side, tables};
    use dataplane_common::{EndpointInfo6, In6Addr, policy_action};

    let mut t = loaded_or_skip!();
    let dp = t.get();
    let (host, a, b) = (v6("2001:db8::1"), v6("fd00:1::2"), v6("fd00:1::3"));
    with_container6(dp);
    // A second container on A's network (endpoint 2).
    dp.set::<crate::kernel::maps::Endpoints6>(
        In6Addr::from_ipv6(b),
        EndpointInfo6 {
            ifindex: 2,
            network_id: 1,
            endpoint_id: 2,
            ..EndpointInfo6::default()
        },
    )
    .unwrap();
    publish6(dp, host, 8080, 6, 80);
    let cidr6 = |addr: &str, len| Side::Cidr6(u128::from(v6(addr)), len);
    let rule = |action, from, to, port: u16| Rule {
        action,
        from,
        to,
        port: (port != 0).then_some((6, port)),
    };
    let rules = [
        // Outside clients of one prefix kept off the container's port 80.
        rule(
            policy_action::DENY,
            cidr6("2001:db8:bad::", 48),
            Side::Any,
            80,
        ),
        // B may not open connections to A (A to B is fine).
        rule(policy_action::DENY, Side::Endpoint(2), Side::Endpoint(1), 0),
        // Containers kept off one outside prefix's HTTPS.
        rule(
            policy_action::DENY,
            Side::Any,
            cidr6("2001:db8:9::", 48),
            443,
        ),
    ];
    crate::reconcile::apply_policy(&tables(&rules, &[]), dp).unwrap();
    let syn_ack = TCP_SYN | super::packet::TCP_ACK;
    let check = |dp: &mut crate::kernel::Datapath, hook, frame: Vec<u8>, verdict, what: &str| {
        let (got, _) = run_tc(dp, hook, &frame);
        assert_eq!(got, verdict, "{what}");
    };
    // A published port: the denied prefix's client is dropped, its neighbour's passes, and
    // the reply of the allowed connection goes back out.
    let (bad, good) = (v6("2001:db8:bad::7"), v6("2001:db8:bae::7"));
    let request = |from| frame6(from, host, 6, &tcp(40000, 8080, TCP_SYN, b""));
    check(
        dp,
        Hook::UplinkIngress,
        request(bad),
        TC_SHOT,
        "denied CIDR to the published port",
    );
    assert_eq!(drops(dp, DropReason::PolicyDeny), 1);
    translated(
        dp,
        Hook::UplinkIngress,
        &request(good),
        TC_REDIRECT,
        (good, a),
        "the neighbouring prefix to the published port",
    );
    translated(
        dp,
        Hook::ContainerIngress,
        &frame6(a, good, 6, &tcp(80, 40000, syn_ack, b"")),
        TC_REDIRECT,
        (host, good),
        "the allowed connection's reply",
    );
    // Container to container: A opens to B; B's reply passes (it is no new connection from
    // B, which the rule denies); a connection B opens to A is dropped.
    check(
        dp,
        Hook::ContainerIngress,
        frame6(a, b, 6, &tcp(40100, 5432, TCP_SYN, b"")),
        TC_PASS,
        "A to B",
    );
    check(
        dp,
        Hook::ContainerIngress,
        frame6(b, a, 6, &tcp(5432, 40100, syn_ack, b"")),
        TC_PASS,
        "B's reply to A",
    );
    check(
        dp,
        Hook::ContainerIngress,
        frame6(a, b, 6, &tcp(40100, 5432, super::packet::TCP_ACK, b"")),
        TC_PASS,
        "A's ACK",
    );
    check(
        dp,
        Hook::ContainerIngress,
        frame6(b, a, 6, &tcp(5432, 40100, super::packet::TCP_ACK, b"data")),
        TC_PASS,
        "B's data on the established connection",
    );
    check(
        dp,
        Hook::ContainerIngress,
        frame6(b, a, 6, &tcp(40200, 22, TCP_SYN, b"")),
        TC_SHOT,
        "B opening to A",
    );
    check(
        dp,
        Hook::ContainerIngress,
        frame6(b, a, 17, &udp(40201, 53, b"q")),
        TC_SHOT,
        "B opening UDP to A",
    );
    assert_eq!(drops(dp, DropReason::PolicyDeny), 3);
    // Container to outside: the denied prefix's 443 dropped, another port and the
    // neighbouring prefix pass.
    let out = |to, port| frame6(a, v6(to), 6, &tcp(40300, port, TCP_SYN, b""));
    check(
        dp,
        Hook::ContainerIngress,
        out("2001:db8:9::9", 443),
        TC_SHOT,
        "to the denied prefix's 443",
    );
    check(
        dp,
        Hook::ContainerIngress,
        out("2001:db8:9::9", 80),
        TC_PASS,
        "its port 80",
    );
    check(
        dp,
        Hook::ContainerIngress,
        out("2001:db8:a::9", 443),
        TC_PASS,
        "the neighbour's 443",
    );
    assert_eq!(drops(dp, DropReason::PolicyDeny), 4);
    assert_eq!(
        drops(dp, DropReason::PolicyDenied),
        0,
        "isolation decided nothing"
    );
}

#[test]
fn ipv6_from_outside_to_container_addresses_by_gateway_mode() {
    use dataplane_common::{EndpointInfo6, In6Addr, net_flags};

    let mut t = loaded_or_skip!();
    let dp = t.get();
    with_container6(dp);
    let (nat, routed, open) = (v6("fd00:1::2"), v6("2001:db8:2::2"), v6("2001:db8:3::2"));
    for (i, (addr, flags)) in [(routed, net_flags::ROUTED), (open, net_flags::UNPROTECTED)]
        .into_iter()
        .enumerate()
    {
        dp.set::<crate::kernel::maps::Endpoints6>(
            In6Addr::from_ipv6(addr),
            EndpointInfo6 {
                ifindex: 10 + i as u32,
                network_id: 2 + i as u32,
                endpoint_id: 2 + i as u32,
                net_flags: flags,
                ..EndpointInfo6::default()
            },
        )
        .unwrap();
    }
    let client = v6("2001:db8:9::9");
    let syn = |to, sport| frame6(client, to, 6, &tcp(sport, 80, TCP_SYN, b""));
    let ping = |to| {
        let mut m = vec![128, 0, 0, 0, 0, 9, 0, 1];
        m.extend_from_slice(b"ping");
        frame6(client, to, IPPROTO_ICMPV6, &m)
    };
    for (what, frame, verdict) in [
        ("TCP to a nat network's container", syn(nat, 40000), TC_SHOT),
        ("a ping to a nat network's container", ping(nat), TC_SHOT),
        (
            "TCP to a routed network's container",
            syn(routed, 40001),
            TC_SHOT,
        ),
        (
            "a ping to a routed network's container",
            ping(routed),
            TC_PASS,
        ),
        ("TCP to a nat-unprotected one", syn(open, 40002), TC_PASS),
    ] {
        let (got, _) = run_tc(dp, Hook::UplinkIngress, &frame);
        assert_eq!(got, verdict, "{what}");
    }
    assert_eq!(drops(dp, DropReason::PolicyDenied), 3);
    // A routed network's container's own connection out keeps its address and is tracked:
    // its reply from outside comes in.
    let out = frame6(routed, client, 6, &tcp(40500, 443, TCP_SYN, b""));
    assert_eq!(run_tc(dp, Hook::UplinkEgress, &out), (TC_PASS, out.clone()));
    let reply = frame6(
        client,
        routed,
        6,
        &tcp(443, 40500, TCP_SYN | super::packet::TCP_ACK, b""),
    );
    let (got, _) = run_tc(dp, Hook::UplinkIngress, &reply);
    assert_eq!(got, TC_PASS, "the reply of a routed container's connection");
    assert_eq!(drops(dp, DropReason::PolicyDenied), 3);
}

/// A container's connection to a VIP is judged by the user rules against the backend it is
/// balanced to (as IPv4's): a rule keeping the client off one backend's port drops the SYN
/// to the VIP, counted as the rule's (`POLICY_DENY`); another client of the same VIP passes.
#[test]
fn ipv6_vip_connections_are_judged_by_the_user_rules_against_their_backend() {
    use crate::reconcile::policy::{Rule, Side, tables};
    use dataplane_common::{EndpointInfo6, In6Addr, policy_action};

    let mut t = loaded_or_skip!();
    let dp = t.get();
    with_service6(dp, &BACKENDS6[..1]);
    // A second client on the same network (endpoint 3).
    let other = v6("fd00:1::9");
    dp.set::<crate::kernel::maps::Endpoints6>(
        In6Addr::from_ipv6(other),
        EndpointInfo6 {
            ifindex: 3,
            network_id: 1,
            endpoint_id: 3,
            ..EndpointInfo6::default()
        },
    )
    .unwrap();
    let rules = [Rule {
        action: policy_action::DENY,
        from: Side::Endpoint(1),
        to: Side::Endpoint(10),
        port: Some((6, 8080)),
    }];
    crate::reconcile::apply_policy(&tables(&rules, &[]), dp).unwrap();
    let syn = frame6(v6("fd00:1::2"), v6(VIP6), 6, &tcp(40500, 80, TCP_SYN, b""));
    let (verdict, out) = run_tc(dp, Hook::ContainerIngress, &syn);
    assert_eq!(
        (verdict, out),
        (TC_SHOT, syn.clone()),
        "denied to its backend"
    );
    assert_eq!(drops(dp, DropReason::PolicyDeny), 1);
    translated(
        dp,
        Hook::ContainerIngress,
        &frame6(other, v6(VIP6), 6, &tcp(40501, 80, TCP_SYN, b"")),
        TC_REDIRECT,
        (other, v6(BACKENDS6[0])),
        "another client of the VIP",
    );
}

/// A policy change reaches the IPv6 connections already open, as IPv4's: each is judged again
/// by the new rules at its next packet (the destination as policy first saw it: the
/// container behind a published port, the outside peer of a masqueraded one), and one they
/// deny loses its entries and is dropped from then on; one they still allow goes on. A
/// connection routed in from outside is judged again as routed (Docker's isolation from
/// outside), not as one of the host's own.
#[test]
fn ipv6_a_rule_change_reaches_the_connections_already_open() {
    use crate::reconcile::policy::{Rule, Side, tables};
    use dataplane_common::{Config, EndpointInfo6, In6Addr, net_flags, policy_action};

    let mut t = loaded_or_skip!();
    let dp = t.get();
    let (host, a, b) = (v6("2001:db8::1"), v6("fd00:1::2"), v6("fd00:1::3"));
    let open = v6("2001:db8:3::2");
    with_container6(dp);
    let endpoint = |dp: &mut crate::kernel::Datapath, addr, network_id, endpoint_id, flags| {
        dp.set::<crate::kernel::maps::Endpoints6>(
            In6Addr::from_ipv6(addr),
            EndpointInfo6 {
                ifindex: 10 + endpoint_id,
                network_id,
                endpoint_id,
                net_flags: flags,
                ..EndpointInfo6::default()
            },
        )
        .unwrap();
    };
    endpoint(dp, b, 1, 2, 0);
    endpoint(dp, open, 2, 3, net_flags::UNPROTECTED);
    publish6(dp, host, 8080, 6, 80);
    let (bad, good, far) = (
        v6("2001:db8:bad::7"),
        v6("2001:db8:bae::7"),
        v6("2001:db8:9::9"),
    );
    let syn_ack = TCP_SYN | super::packet::TCP_ACK;
    let ack = super::packet::TCP_ACK;
    // Five connections open under no rule at all.
    for client in [bad, good] {
        let syn = frame6(client, host, 6, &tcp(40000, 8080, TCP_SYN, b""));
        translated(
            dp,
            Hook::UplinkIngress,
            &syn,
            TC_REDIRECT,
            (client, a),
            "published",
        );
    }
    let a_to_b = frame6(a, b, 6, &tcp(40100, 5432, TCP_SYN, b""));
    assert_eq!(run_tc(dp, Hook::ContainerIngress, &a_to_b).0, TC_PASS);
    let out = frame6(a, far, 6, &tcp(40300, 443, TCP_SYN, b""));
    assert_eq!(run_tc(dp, Hook::ContainerIngress, &out).0, TC_PASS);
    translated(
        dp,
        Hook::UplinkEgress,
        &out,
        TC_PASS,
        (host, far),
        "masquerade",
    );
    let routed = frame6(far, open, 6, &tcp(40400, 22, TCP_SYN, b""));
    assert_eq!(run_tc(dp, Hook::UplinkIngress, &routed).0, TC_PASS);
    let tracked = |dp: &crate::kernel::Datapath| {
        dp.entries::<crate::kernel::maps::Conntrack6New>()
            .unwrap()
            .len()
            + dp.entries::<crate::kernel::maps::Conntrack6>()
                .unwrap()
                .len()
    };
    assert_eq!(tracked(dp), 10, "five connections, two entries each");
    // The new policy: the bad prefix off the container's port 80, A off B, containers off
    // the far prefix's HTTPS; and the open network's container closed to outside (its
    // network now `nat`: Docker's isolation, no rule).
    let cidr6 = |addr: &str, len| Side::Cidr6(u128::from(v6(addr)), len);
    let rule = |from, to, port: u16| Rule {
        action: policy_action::DENY,
        from,
        to,
        port: (port != 0).then_some((6, port)),
    };
    let rules = [
        rule(cidr6("2001:db8:bad::", 48), Side::Any, 80),
        rule(Side::Endpoint(1), Side::Endpoint(2), 0),
        rule(Side::Any, cidr6("2001:db8:9::", 48), 443),
    ];
    crate::reconcile::apply_policy(&tables(&rules, &[]), dp).unwrap();
    endpoint(dp, open, 2, 3, 0);
    dp.set_config(Config {
        masquerade_addr6: In6Addr::from_ipv6(host),
        uplink_ifindex: 1,
        snat_port_min: 61000,
        snat_port_max: 65000,
        policy_generation: 1,
        ..Config::default()
    })
    .unwrap();
    let shot = |dp: &mut crate::kernel::Datapath, hook, frame: Vec<u8>, what: &str| {
        assert_eq!(run_tc(dp, hook, &frame).0, TC_SHOT, "{what}");
    };
    shot(
        dp,
        Hook::UplinkIngress,
        frame6(bad, host, 6, &tcp(40000, 8080, ack, b"GET")),
        "the bad prefix's open connection to the published port",
    );
    translated(
        dp,
        Hook::UplinkIngress,
        &frame6(good, host, 6, &tcp(40000, 8080, ack, b"GET")),
        TC_REDIRECT,
        (good, a),
        "the good prefix's goes on",
    );
    translated(
        dp,
        Hook::ContainerIngress,
        &frame6(a, good, 6, &tcp(80, 40000, syn_ack, b"")),
        TC_REDIRECT,
        (host, good),
        "and so do its replies",
    );
    // A connection's reply is judged as its connection (by the forward direction).
    shot(
        dp,
        Hook::ContainerIngress,
        frame6(b, a, 6, &tcp(5432, 40100, syn_ack, b"")),
        "B's reply to A, whose connection the rule now denies",
    );
    shot(
        dp,
        Hook::ContainerIngress,
        frame6(a, far, 6, &tcp(40300, 443, ack, b"")),
        "the masqueraded connection to the far prefix's 443",
    );
    shot(
        dp,
        Hook::UplinkIngress,
        frame6(far, open, 6, &tcp(40400, 22, ack, b"")),
        "the routed connection into a network closed to outside",
    );
    assert_eq!(tracked(dp), 2, "only the good client's connection is left");
    assert_eq!(drops(dp, DropReason::PolicyDenied), 4);
}

/// A container's connection to a port published on the host's IPv6 address (as Docker's DNAT
/// of what its bridges send to a host address, `--userland-proxy=false`): to another
/// container, its destination becomes that container and the replies come back from the
/// published address; to the container itself (a hairpin), from its gateway, both ways
/// straight back into it. Judged by the container the port leads to (published), as from
/// outside. Every checksum verified.
#[test]
fn ipv6_containers_reach_ports_published_on_the_host_and_their_own() {
    use crate::reconcile::policy::{Rule, Side, tables};
    use dataplane_common::{EndpointInfo6, In6Addr, PortKey6, PortTarget6, policy_action};

    let mut t = loaded_or_skip!();
    let dp = t.get();
    let (host, a, b, gateway) = (
        v6("2001:db8::1"),
        v6("fd00:1::2"),
        v6("fd00:1::3"),
        v6("fd00:1::1"),
    );
    with_container6(dp);
    const B_MAC: [u8; 6] = [2, 0, 0, 0, 0, 3];
    for (addr, endpoint_id, mac) in [(a, 1, CONTAINER_MAC), (b, 2, B_MAC)] {
        dp.set::<crate::kernel::maps::Endpoints6>(
            In6Addr::from_ipv6(addr),
            EndpointInfo6 {
                ifindex: endpoint_id,
                network_id: 1,
                endpoint_id,
                mac,
                gateway: In6Addr::from_ipv6(gateway),
                ..EndpointInfo6::default()
            },
        )
        .unwrap();
    }
    // A's port 80 on every host address at 8080.
    dp.set::<crate::kernel::maps::Ports6>(
        PortKey6 {
            addr: In6Addr::UNSPECIFIED,
            port: 8080u16.to_be(),
            proto: 6,
            _pad: 0,
        },
        PortTarget6 {
            addr: In6Addr::from_ipv6(a),
            port: 80u16.to_be(),
            is_service: 0,
            _pad: 0,
        },
    )
    .unwrap();
    let syn_ack = TCP_SYN | super::packet::TCP_ACK;
    let ack = super::packet::TCP_ACK;
    // B to the published port: into A, from B itself.
    let syn = frame6(b, host, 6, &tcp(40000, 8080, TCP_SYN, b""));
    let out = translated(
        dp,
        Hook::ContainerIngress,
        &syn,
        TC_REDIRECT,
        (b, a),
        "B to the published port",
    );
    assert_eq!(ports6(&out), (40000, 80));
    assert_eq!(&out[..6], &CONTAINER_MAC, "to A's MAC");
    let out = translated(
        dp,
        Hook::ContainerIngress,
        &frame6(a, b, 6, &tcp(80, 40000, syn_ack, b"")),
        TC_REDIRECT,
        (host, b),
        "A's answer, from the published address",
    );
    assert_eq!(ports6(&out), (8080, 40000));
    assert_eq!(&out[..6], &B_MAC, "straight into B");
    let out = translated(
        dp,
        Hook::ContainerIngress,
        &frame6(b, host, 6, &tcp(40000, 8080, ack, b"GET")),
        TC_REDIRECT,
        (b, a),
        "B's next packet",
    );
    assert_eq!(ports6(&out), (40000, 80));
    // A to its own published port: back into A from its gateway.
    let syn = frame6(a, host, 6, &tcp(40300, 8080, TCP_SYN, b""));
    let out = translated(
        dp,
        Hook::ContainerIngress,
        &syn,
        TC_REDIRECT,
        (gateway, a),
        "A to its own published port",
    );
    let (port, to) = ports6(&out);
    assert_eq!(to, 80);
    assert_eq!(&out[..6], &CONTAINER_MAC);
    let out = translated(
        dp,
        Hook::ContainerIngress,
        &frame6(a, gateway, 6, &tcp(80, port, syn_ack, b"")),
        TC_REDIRECT,
        (host, a),
        "its answer, from the published address to its own port",
    );
    assert_eq!(ports6(&out), (8080, 40300));
    let out = translated(
        dp,
        Hook::ContainerIngress,
        &frame6(a, host, 6, &tcp(40300, 8080, ack, b"GET")),
        TC_REDIRECT,
        (gateway, a),
        "the hairpin's next packet",
    );
    assert_eq!(ports6(&out), (port, 80));
    // Judged by where the port leads: B kept off A's port 80 by a rule.
    let rules = [Rule {
        action: policy_action::DENY,
        from: Side::Endpoint(2),
        to: Side::Endpoint(1),
        port: Some((6, 80)),
    }];
    crate::reconcile::apply_policy(&tables(&rules, &[]), dp).unwrap();
    let syn = frame6(b, host, 6, &tcp(40001, 8080, TCP_SYN, b""));
    assert_eq!(run_tc(dp, Hook::ContainerIngress, &syn).0, TC_SHOT);
    assert_eq!(drops(dp, DropReason::PolicyDeny), 1);
}

/// A dual-stack service whose backends are not all dual-stack: an IPv6 connection the pick
/// sends to a backend without IPv6 (in the IPv6 table v4-mapped, for the socket hooks) goes
/// to the next backend that has IPv6 instead of being refused, the same one for the same
/// connection; with no backend of IPv6 at all it is refused as before.
#[test]
fn ipv6_vip_connections_skip_backends_without_ipv6() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    let (client, vip) = (v6("fd00:1::2"), v6(VIP6));
    let reachable = ["fd00:1::3", "fd00:1::4"];
    with_service6(
        dp,
        &[
            "fd00:1::3",
            "::ffff:172.30.1.9",
            "fd00:1::4",
            "::ffff:172.30.1.10",
        ],
    );
    let mut seen = std::collections::BTreeMap::new();
    for sport in 41000..41064u16 {
        let syn = frame6(client, vip, 6, &tcp(sport, 80, TCP_SYN, b""));
        let (verdict, out) = run_tc(dp, Hook::ContainerIngress, &syn);
        assert_eq!(verdict, TC_REDIRECT, "port {sport}: to a backend");
        assert_checksums6(&out);
        let (_, to, _, _) = upper_layer(&out);
        assert!(reachable.contains(&to.to_string().as_str()), "{to}");
        *seen.entry(to).or_insert(0) += 1;
        // The connection's next packet: the same backend.
        let ack = frame6(client, vip, 6, &tcp(sport, 80, super::packet::TCP_ACK, b""));
        let (_, out) = run_tc(dp, Hook::ContainerIngress, &ack);
        assert_eq!(upper_layer(&out).1, to, "port {sport}: kept on its backend");
    }
    assert_eq!(
        seen.len(),
        2,
        "both backends with IPv6 get connections: {seen:?}"
    );
    assert_eq!(drops(dp, DropReason::ServiceBackendNotFound), 0);
    // None with IPv6: refused (a reset), counted.
    let mut t = loaded_or_skip!();
    let dp = t.get();
    with_service6(dp, &["::ffff:172.30.1.9", "::ffff:172.30.1.10"]);
    let syn = frame6(client, vip, 6, &tcp(42000, 80, TCP_SYN, b""));
    let (verdict, _) = run_tc(dp, Hook::ContainerIngress, &syn);
    assert_ne!(verdict, TC_PASS, "refused");
    assert_eq!(drops(dp, DropReason::ServiceBackendNotFound), 1);
}
