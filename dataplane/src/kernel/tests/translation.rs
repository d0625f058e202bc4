//! Packet tests of the translations: published ports (DNAT and its reverse), hairpin,
//! masquerade (SNAT with port allocation and its reverse, ICMP echo too), and a full conntrack
//! table. Each case checks the verdict, every rewritten field, and all checksums.

use std::net::Ipv4Addr;

use dataplane_common::{Config, CtEntry, CtKey, DropReason, EndpointInfo, PortKey, PortTarget};

use super::{
    packet::{
        Ipv4Spec, TCP_ACK, TCP_SYN, assert_checksums, icmp_echo, icmp_error, ipv4_frame,
        quoted_tuple, tcp, tuple, udp,
    },
    programs::{TC_PASS, loaded_or_skip, run_tc},
};
use crate::kernel::{
    Datapath, Hook,
    maps::{Conntrack, ConntrackNew},
};

pub(super) const HOST: [u8; 4] = [192, 0, 2, 1];
pub(super) const CLIENT: [u8; 4] = [192, 0, 2, 2];
pub(super) const WEB1: [u8; 4] = [172, 30, 1, 2];
pub(super) const WEB2: [u8; 4] = [172, 30, 1, 3];
pub(super) const SERVER: [u8; 4] = [198, 51, 100, 7];
const SNAT_RANGE: (u16, u16) = (20000, 32767);
/// BPF_PROG_TEST_RUN runs on the namespace's loopback, so redirects are aimed at it.
const UPLINK_IFINDEX: u32 = 1;
pub(super) const TC_REDIRECT: u32 = 7;

pub(super) fn be(ip: [u8; 4]) -> u32 {
    u32::from_be_bytes(ip).to_be()
}

/// A host: web1 and web2 are containers, 192.0.2.1 is the host's uplink address, web1:80 is
/// published on every host address at 8080/tcp and 5353/udp, and on 192.0.2.1 only at 9090.
pub(super) fn host(dp: &mut Datapath) {
    for (ip, ifindex) in [(WEB1, 5), (WEB2, 6)] {
        let info = EndpointInfo {
            ifindex,
            network_id: 1,
            mac: [2, 0, 0, 0, 0, ifindex as u8],
            endpoint_id: ifindex,
            ..Default::default()
        };
        dp.set::<crate::kernel::maps::Endpoints>(be(ip), info)
            .unwrap();
    }
    dp.set::<crate::kernel::maps::LocalAddrs>(be(HOST), 1u8)
        .unwrap();
    let publish = |dp: &mut Datapath, addr: u32, host_port: u16, proto: u8, container_port: u16| {
        let key = PortKey {
            addr,
            port: host_port.to_be(),
            proto,
            _pad: 0,
        };
        let target = PortTarget {
            addr: be(WEB1),
            port: container_port.to_be(),
            is_service: 0,
            _pad: 0,
        };
        dp.set::<crate::kernel::maps::Ports>(key, target).unwrap();
    };
    publish(dp, 0, 8080, 6, 80);
    publish(dp, 0, 5353, 17, 53);
    publish(dp, be(HOST), 9090, 6, 90);
    dp.set_config(Config {
        masquerade_addr: be(HOST),
        uplink_ifindex: UPLINK_IFINDEX,
        snat_port_min: SNAT_RANGE.0,
        snat_port_max: SNAT_RANGE.1,
        netns_cookie: crate::kernel::netdev::netns_cookie().unwrap(),
        ..Config::default()
    })
    .unwrap();
}

pub(super) fn ip4(a: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

/// Runs `hook` on `frame`, expects a pass with valid checksums, returns the output's tuple.
pub(super) fn pass(dp: &mut Datapath, hook: Hook, frame: &[u8]) -> (Ipv4Addr, Ipv4Addr, u16, u16) {
    let (verdict, out) = run_tc(dp, hook, frame);
    assert_eq!(verdict, TC_PASS, "{hook:?} verdict");
    assert_eq!(out.len(), frame.len());
    assert_checksums(&out);
    tuple(&out)
}

/// Like [`pass`], for a packet from outside translated to a container: delivered straight into
/// the container's namespace, addressed to its MAC.
pub(super) fn delivered(
    dp: &mut Datapath,
    hook: Hook,
    frame: &[u8],
) -> (Ipv4Addr, Ipv4Addr, u16, u16) {
    let (verdict, out) = run_tc(dp, hook, frame);
    assert_eq!(
        verdict, TC_REDIRECT,
        "{hook:?} verdict: redirect into the container"
    );
    assert_eq!(out.len(), frame.len());
    assert_checksums(&out);
    let to = tuple(&out).1.octets();
    let ifindex = if to == WEB1 { 5 } else { 6 };
    assert_eq!(&out[..6], &[2, 0, 0, 0, 0, ifindex], "the container's MAC");
    tuple(&out)
}

/// Like [`pass`], for a published port's reply sent straight out of the uplink.
pub(super) fn redirected(
    dp: &mut Datapath,
    hook: Hook,
    frame: &[u8],
) -> (Ipv4Addr, Ipv4Addr, u16, u16) {
    let (verdict, out) = run_tc(dp, hook, frame);
    assert_eq!(
        verdict, TC_REDIRECT,
        "{hook:?} verdict: redirect to the uplink"
    );
    assert_checksums(&out);
    tuple(&out)
}

/// Every tracked entry, established (main table) or not (the LRU table of handshakes).
pub(super) fn ct(dp: &Datapath) -> std::collections::BTreeMap<CtKey, CtEntry> {
    let mut all = dp.entries::<Conntrack>().unwrap();
    all.extend(dp.entries::<ConntrackNew>().unwrap());
    all
}

pub(super) fn drops(dp: &Datapath, reason: DropReason) -> u64 {
    dp.drops()
        .unwrap()
        .into_iter()
        .find(|(r, _)| *r == reason)
        .unwrap()
        .1
}

#[test]
fn published_tcp_port_and_its_replies() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    // Outside client -> host:8080 becomes client -> web1:80, client address kept.
    let syn = ipv4_frame(
        &Ipv4Spec::new(CLIENT, HOST, 6),
        &tcp(40000, 8080, TCP_SYN, b""),
    );
    assert_eq!(
        delivered(dp, Hook::UplinkIngress, &syn),
        (ip4(CLIENT), ip4(WEB1), 40000, 80)
    );
    assert_eq!(ct(dp).len(), 2, "one entry per direction");
    // web1's answer leaves its veth as host:8080 -> client.
    let synack = ipv4_frame(
        &Ipv4Spec::new(WEB1, CLIENT, 6),
        &tcp(80, 40000, TCP_SYN | TCP_ACK, b""),
    );
    assert_eq!(
        redirected(dp, Hook::ContainerIngress, &synack),
        (ip4(HOST), ip4(CLIENT), 8080, 40000)
    );
    // Sent out of the uplink (bpf_redirect_neigh passes its tc egress), the answer is not
    // taken for a host connection on a tuple the published connection holds: unchanged.
    let (_, answered) = run_tc(dp, Hook::ContainerIngress, &synack);
    let (verdict, out) = run_tc(dp, Hook::UplinkEgress, &answered);
    assert_eq!(verdict, TC_PASS);
    assert_eq!(out, answered);
    assert_eq!(ct(dp).len(), 2, "no entry of its own");
    // Later packets of the connection follow the entry, payload untouched.
    let data = ipv4_frame(
        &Ipv4Spec::new(CLIENT, HOST, 6),
        &tcp(40000, 8080, TCP_ACK, b"GET / HTTP/1.1\r\n\r\n"),
    );
    let (verdict, out) = run_tc(dp, Hook::UplinkIngress, &data);
    assert_eq!(verdict, TC_REDIRECT);
    assert_checksums(&out);
    assert_eq!(tuple(&out), (ip4(CLIENT), ip4(WEB1), 40000, 80));
    assert!(out.ends_with(b"GET / HTTP/1.1\r\n\r\n"));
    let entries = ct(dp);
    let forward = entries.values().find(|e| e.is_reply == 0).unwrap();
    assert_eq!(
        (forward.packets, forward.tcp_flags & (TCP_SYN | TCP_ACK)),
        (2, TCP_SYN | TCP_ACK)
    );
    let reply = entries.values().find(|e| e.is_reply == 1).unwrap();
    assert_eq!(reply.packets, 2, "the SYN-ACK, run twice above");
}

#[test]
fn published_udp_port_and_host_ip_bindings() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    let query = ipv4_frame(
        &Ipv4Spec::new(CLIENT, HOST, 17),
        &udp(33333, 5353, b"query"),
    );
    assert_eq!(
        delivered(dp, Hook::UplinkIngress, &query),
        (ip4(CLIENT), ip4(WEB1), 33333, 53)
    );
    let answer = ipv4_frame(&Ipv4Spec::new(WEB1, CLIENT, 17), &udp(53, 33333, b"answer"));
    assert_eq!(
        redirected(dp, Hook::ContainerIngress, &answer),
        (ip4(HOST), ip4(CLIENT), 5353, 33333)
    );
    // 9090 is bound to 192.0.2.1 only: another local address does not match it.
    dp.set::<crate::kernel::maps::LocalAddrs>(be([192, 0, 2, 3]), 1u8)
        .unwrap();
    let other_addr = ipv4_frame(
        &Ipv4Spec::new(CLIENT, [192, 0, 2, 3], 6),
        &tcp(40001, 9090, TCP_SYN, b""),
    );
    let (verdict, out) = run_tc(dp, Hook::UplinkIngress, &other_addr);
    assert_eq!((verdict, &out), (TC_PASS, &other_addr), "unchanged");
    let bound_addr = ipv4_frame(
        &Ipv4Spec::new(CLIENT, HOST, 6),
        &tcp(40001, 9090, TCP_SYN, b""),
    );
    assert_eq!(
        delivered(dp, Hook::UplinkIngress, &bound_addr),
        (ip4(CLIENT), ip4(WEB1), 40001, 90)
    );
    // An address that is not the host's is routed traffic, not a published port.
    let transit = ipv4_frame(
        &Ipv4Spec::new(CLIENT, [203, 0, 113, 9], 6),
        &tcp(40002, 8080, TCP_SYN, b""),
    );
    let (verdict, out) = run_tc(dp, Hook::UplinkIngress, &transit);
    assert_eq!((verdict, &out), (TC_PASS, &transit), "unchanged");
}

#[test]
fn hairpin_a_container_reaches_its_hosts_published_port() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    let syn = ipv4_frame(
        &Ipv4Spec::new(WEB2, HOST, 6),
        &tcp(45000, 8080, TCP_SYN, b""),
    );
    assert_eq!(
        delivered(dp, Hook::ContainerIngress, &syn),
        (ip4(WEB2), ip4(WEB1), 45000, 80)
    );
    let synack = ipv4_frame(
        &Ipv4Spec::new(WEB1, WEB2, 6),
        &tcp(80, 45000, TCP_SYN | TCP_ACK, b""),
    );
    assert_eq!(
        delivered(dp, Hook::ContainerIngress, &synack),
        (ip4(HOST), ip4(WEB2), 8080, 45000)
    );
}

#[test]
fn masquerade_allocates_distinct_ports_and_restores_replies() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    // Two containers, same source port, same server: two different host ports.
    let from_web1 = ipv4_frame(
        &Ipv4Spec::new(WEB1, SERVER, 6),
        &tcp(50000, 443, TCP_SYN, b""),
    );
    let from_web2 = ipv4_frame(
        &Ipv4Spec::new(WEB2, SERVER, 6),
        &tcp(50000, 443, TCP_SYN, b""),
    );
    let (src1, dst1, port1, dport1) = pass(dp, Hook::UplinkEgress, &from_web1);
    let (src2, _, port2, _) = pass(dp, Hook::UplinkEgress, &from_web2);
    assert_eq!(
        (src1, src2, dst1, dport1),
        (ip4(HOST), ip4(HOST), ip4(SERVER), 443)
    );
    assert_eq!(
        port1, 50000,
        "the first keeps its own port (its tuple is free)"
    );
    assert!(
        (SNAT_RANGE.0..=SNAT_RANGE.1).contains(&port2),
        "{port2}: the colliding one probed in the masquerade range"
    );
    // Replies go back to the right container and port.
    for (port, container) in [(port1, WEB1), (port2, WEB2)] {
        let reply = ipv4_frame(
            &Ipv4Spec::new(SERVER, HOST, 6),
            &tcp(443, port, TCP_SYN | TCP_ACK, b""),
        );
        assert_eq!(
            delivered(dp, Hook::UplinkIngress, &reply),
            (ip4(SERVER), ip4(container), 443, 50000)
        );
    }
    // The same connection keeps its port.
    let again = ipv4_frame(
        &Ipv4Spec::new(WEB1, SERVER, 6),
        &tcp(50000, 443, TCP_ACK, b"hello"),
    );
    assert_eq!(pass(dp, Hook::UplinkEgress, &again).2, port1);
    // The host's own traffic keeps its address; so does traffic of containers to the host.
    let own = ipv4_frame(
        &Ipv4Spec::new(HOST, SERVER, 6),
        &tcp(38000, 443, TCP_SYN, b""),
    );
    let (verdict, out) = run_tc(dp, Hook::UplinkEgress, &own);
    assert_eq!((verdict, &out), (TC_PASS, &own));
    // A reply for no connection is left alone (the host's stack answers it).
    let stray = ipv4_frame(
        &Ipv4Spec::new(SERVER, HOST, 6),
        &tcp(443, 21000, TCP_ACK, b""),
    );
    let (verdict, out) = run_tc(dp, Hook::UplinkIngress, &stray);
    assert_eq!((verdict, &out), (TC_PASS, &stray));
}

#[test]
fn masquerade_of_udp_and_icmp_echo() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    let dns = ipv4_frame(&Ipv4Spec::new(WEB1, SERVER, 17), &udp(41000, 53, b"q"));
    let (src, _, port, _) = pass(dp, Hook::UplinkEgress, &dns);
    assert_eq!(src, ip4(HOST));
    let answer = ipv4_frame(&Ipv4Spec::new(SERVER, HOST, 17), &udp(53, port, b"a"));
    assert_eq!(
        delivered(dp, Hook::UplinkIngress, &answer),
        (ip4(SERVER), ip4(WEB1), 53, 41000)
    );

    let ping = ipv4_frame(&Ipv4Spec::new(WEB2, SERVER, 1), &icmp_echo(8, 0x1234, 1));
    let (src, dst, id, _) = pass(dp, Hook::UplinkEgress, &ping);
    assert_eq!((src, dst), (ip4(HOST), ip4(SERVER)));
    let pong = ipv4_frame(&Ipv4Spec::new(SERVER, HOST, 1), &icmp_echo(0, id, 1));
    assert_eq!(
        delivered(dp, Hook::UplinkIngress, &pong),
        (ip4(SERVER), ip4(WEB2), 0x1234, 0x1234)
    );
}

#[test]
fn icmp_errors_about_translated_connections_are_translated_back() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    // Masquerade: a server answers web1's datagram with "port unreachable", addressed to the
    // host and quoting the datagram as it left (host:port -> server:53).
    let datagram = ipv4_frame(&Ipv4Spec::new(WEB1, SERVER, 17), &udp(41000, 53, b"q"));
    let (verdict, left) = run_tc(dp, Hook::UplinkEgress, &datagram);
    assert_eq!(verdict, TC_PASS);
    let unreachable = ipv4_frame(&Ipv4Spec::new(SERVER, HOST, 1), &icmp_error(3, 3, &left));
    let (verdict, out) = run_tc(dp, Hook::UplinkIngress, &unreachable);
    assert_eq!(
        verdict, TC_REDIRECT,
        "delivered into the container like its connection"
    );
    assert_checksums(&out);
    assert_eq!(tuple(&out).1, ip4(WEB1), "the error goes to the container");
    assert_eq!(
        quoted_tuple(&out),
        (ip4(WEB1), ip4(SERVER), 41000, 53),
        "quoting what it sent"
    );

    // Published port: web1 answers a datagram to a closed port with "port unreachable"; the
    // client must see it come from the address and port it used.
    let query = ipv4_frame(
        &Ipv4Spec::new(CLIENT, HOST, 17),
        &udp(33333, 5353, b"query"),
    );
    let (_, arrived) = run_tc(dp, Hook::UplinkIngress, &query);
    let refused = ipv4_frame(&Ipv4Spec::new(WEB1, CLIENT, 1), &icmp_error(3, 3, &arrived));
    let (verdict, out) = run_tc(dp, Hook::ContainerIngress, &refused);
    assert_eq!(verdict, TC_REDIRECT);
    assert_checksums(&out);
    assert_eq!(tuple(&out).0, ip4(HOST));
    assert_eq!(quoted_tuple(&out), (ip4(CLIENT), ip4(HOST), 33333, 5353));

    // An error about no connection of ours passes untouched.
    let stray = ipv4_frame(&Ipv4Spec::new(SERVER, HOST, 17), &udp(53, 29999, b"x"));
    let unrelated = ipv4_frame(&Ipv4Spec::new(SERVER, HOST, 1), &icmp_error(3, 3, &stray));
    let (verdict, out) = run_tc(dp, Hook::UplinkIngress, &unrelated);
    assert_eq!((verdict, &out), (TC_PASS, &unrelated));
}

#[test]
fn connections_between_containers_are_tracked_untranslated() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    let syn = ipv4_frame(&Ipv4Spec::new(WEB2, WEB1, 6), &tcp(46000, 80, TCP_SYN, b""));
    // Addresses and ports unchanged; delivered straight into the other container.
    let (verdict, out) = run_tc(dp, Hook::ContainerIngress, &syn);
    assert_eq!(
        (verdict, &out[12..]),
        (TC_REDIRECT, &syn[12..]),
        "unchanged but the MAC"
    );
    assert_eq!(&out[..6], &[2, 0, 0, 0, 0, 5], "web1's MAC");
    let synack = ipv4_frame(
        &Ipv4Spec::new(WEB1, WEB2, 6),
        &tcp(80, 46000, TCP_SYN | TCP_ACK, b""),
    );
    let (verdict, out) = run_tc(dp, Hook::ContainerIngress, &synack);
    assert_eq!(
        (verdict, &out[12..]),
        (TC_REDIRECT, &synack[12..]),
        "the reply too"
    );
    assert_eq!(&out[..6], &[2, 0, 0, 0, 0, 6], "web2's MAC");
    let entries = ct(dp);
    assert_eq!(entries.len(), 2);
    assert!(
        entries
            .values()
            .all(|e| e.origin == dataplane_common::ct_origin::PLAIN
                && e.rewrite == dataplane_common::ct_rewrite::NONE
                && e.packets == 1)
    );
    // Traffic to somewhere that is not a container is not tracked here.
    let out_bound = ipv4_frame(
        &Ipv4Spec::new(WEB2, SERVER, 6),
        &tcp(46001, 443, TCP_SYN, b""),
    );
    run_tc(dp, Hook::ContainerIngress, &out_bound);
    assert_eq!(ct(dp).len(), 2);
}

/// CLOCK_MONOTONIC in ns, the clock of bpf_ktime_get_ns.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What a container's connect4 hook leaves behind for the packet path: `client`'s socket
/// to VIP:80 was pointed at `backend`:80, `age_ns` ago.
fn socket_translated(dp: &mut Datapath, client: [u8; 4], backend: [u8; 4], age_ns: u64) {
    use dataplane_common::{SockLb, SockLbKey, map_names};
    let key = SockLbKey {
        saddr: be(client),
        daddr: be(backend),
        dport: 80u16.to_be(),
        proto: 6,
        _pad: 0,
    };
    let value = SockLb {
        time_ns: monotonic_ns() - age_ns,
        vip: be(VIP),
        vip_port: 80u16.to_be(),
        _pad: 0,
        _pad_family: (),
    };
    dp.hash_mut::<SockLbKey, SockLb>(map_names::SOCK_LB)
        .unwrap()
        .insert(key, value, 0)
        .unwrap();
}

const VIP: [u8; 4] = [10, 96, 0, 10];

#[test]
fn a_connection_translated_at_its_socket_is_the_services_and_never_rewritten() {
    use dataplane_common::{ct_origin, ct_rewrite};
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    socket_translated(dp, WEB2, WEB1, 0);
    // Already to the backend: delivered as it is, both ways (no reverse NAT for the reply,
    // whose source the socket expects to be the backend it is connected to).
    let syn = ipv4_frame(&Ipv4Spec::new(WEB2, WEB1, 6), &tcp(46000, 80, TCP_SYN, b""));
    let (verdict, out) = run_tc(dp, Hook::ContainerIngress, &syn);
    assert_eq!((verdict, &out[12..]), (TC_REDIRECT, &syn[12..]));
    let synack = ipv4_frame(
        &Ipv4Spec::new(WEB1, WEB2, 6),
        &tcp(80, 46000, TCP_SYN | TCP_ACK, b""),
    );
    let (verdict, out) = run_tc(dp, Hook::ContainerIngress, &synack);
    assert_eq!((verdict, &out[12..]), (TC_REDIRECT, &synack[12..]));
    assert_checksums(&out);
    // Tracked as the service's: the forward entry keeps the VIP for the flow records.
    let entries = ct(dp);
    assert_eq!(entries.len(), 2, "{entries:?}");
    let (_, forward) = entries
        .iter()
        .find(|(k, _)| k.saddr == be(WEB2))
        .expect("the forward entry");
    assert_eq!(
        (
            forward.origin,
            forward.rewrite,
            forward.nat_addr,
            forward.nat_port
        ),
        (
            ct_origin::SERVICE,
            ct_rewrite::SOCKET,
            be(VIP),
            80u16.to_be()
        )
    );
    let (_, reply) = entries
        .iter()
        .find(|(k, _)| k.saddr == be(WEB1))
        .expect("the reply entry");
    assert_eq!(
        (reply.origin, reply.rewrite),
        (ct_origin::SERVICE, ct_rewrite::NONE)
    );
    // A pair the hook wrote long ago says nothing about a new connection: plain.
    socket_translated(dp, WEB2, WEB1, 60_000_000_000);
    let later = ipv4_frame(&Ipv4Spec::new(WEB2, WEB1, 6), &tcp(46001, 80, TCP_SYN, b""));
    let (verdict, out) = run_tc(dp, Hook::ContainerIngress, &later);
    assert_eq!((verdict, &out[12..]), (TC_REDIRECT, &later[12..]));
    let plain = ct(dp)
        .into_iter()
        .find(|(k, _)| k.sport == 46001u16.to_be())
        .expect("tracked")
        .1;
    assert_eq!(
        (plain.origin, plain.rewrite),
        (ct_origin::PLAIN, ct_rewrite::NONE)
    );
}

#[test]
fn a_syn_reusing_the_tuple_of_a_closed_connection_is_a_new_connection() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    let syn = ipv4_frame(
        &Ipv4Spec::new(CLIENT, HOST, 6),
        &tcp(40000, 8080, TCP_SYN, b""),
    );
    delivered(dp, Hook::UplinkIngress, &syn);
    let fin = ipv4_frame(
        &Ipv4Spec::new(CLIENT, HOST, 6),
        &tcp(40000, 8080, TCP_ACK | 0x01, b""),
    );
    delivered(dp, Hook::UplinkIngress, &fin);
    let before = ct(dp);
    assert!(
        before.values().any(|e| e.tcp_flags & 0x01 != 0),
        "the close was seen"
    );
    // The client reuses its port within the closing timeout: a fresh connection, fresh entries.
    delivered(dp, Hook::UplinkIngress, &syn);
    let after = ct(dp);
    assert_eq!(after.len(), 2);
    assert!(
        after.values().all(|e| e.tcp_flags & 0x01 == 0),
        "no FIN on the new connection"
    );
    let forward = after.values().find(|e| e.is_reply == 0).unwrap();
    assert_eq!(forward.packets, 1, "counted from the new SYN on");
}
