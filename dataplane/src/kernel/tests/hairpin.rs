//! Packet tests of hairpin connections: a container reaching its own published port (through
//! a host address or its gateway's) or its own service's VIP gets both translations, the
//! destination back to itself and the source to its network's gateway with an allocated port,
//! and its replies get both reversed; both directions go straight back into the container.
//! Every case checks the verdict, every rewritten field, the MACs and all checksums (IPv4
//! header, TCP/UDP with the pseudo-header).

use std::net::Ipv4Addr;

use dataplane_common::{
    Backend, BackendKey, Config, CtEntry, CtKey, EndpointInfo, PortKey, PortTarget, ServiceInfo,
    ServiceKey, algorithm, ct_origin, ct_rewrite,
};

use super::{
    packet::{
        ETH_LEN, Ipv4Spec, TCP_ACK, TCP_SYN, assert_checksums, icmp_error, ipv4_frame,
        quoted_tuple, tcp, tuple, udp,
    },
    programs::{loaded_or_skip, run_tc},
    translation::{TC_REDIRECT, be, ct, ip4},
};
use crate::{
    kernel::{Datapath, Hook},
    reconcile::maglev,
};

const HOST: [u8; 4] = [192, 0, 2, 1];
const GATEWAY: [u8; 4] = [172, 30, 1, 1];
const WEB1: [u8; 4] = [172, 30, 1, 2];
const WEB2: [u8; 4] = [172, 30, 1, 3];
const VIP: [u8; 4] = [10, 96, 0, 10];
const SNAT_RANGE: (u16, u16) = (20000, 32767);
/// The gateway's MAC: where the container sends what leaves its network.
const GATEWAY_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xfe];
const WEB1_MAC: [u8; 6] = [2, 0, 0, 0, 0, 5];
const WEB1_VETH: u32 = 5;

/// web1 and web2 on one network (gateway 172.30.1.1, one of the host's addresses with
/// 192.0.2.1); web1:80 published on every host address at 8080/tcp and web1:53 at 5353/udp;
/// the service 10.96.0.10:80/tcp has web1:80 as its one backend.
fn host(dp: &mut Datapath) {
    for (ip, ifindex) in [(WEB1, WEB1_VETH), (WEB2, 6)] {
        let info = EndpointInfo {
            ifindex,
            network_id: 1,
            mac: [2, 0, 0, 0, 0, ifindex as u8],
            endpoint_id: ifindex,
            gateway: be(GATEWAY),
            ..Default::default()
        };
        dp.set::<crate::kernel::maps::Endpoints>(be(ip), info)
            .unwrap();
    }
    for addr in [HOST, GATEWAY] {
        dp.set::<crate::kernel::maps::LocalAddrs>(be(addr), 1u8)
            .unwrap();
    }
    for (host_port, proto, container_port) in [(8080u16, 6u8, 80u16), (5353, 17, 53)] {
        let key = PortKey {
            addr: 0,
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
    }
    let backend = Backend {
        addr: be(WEB1),
        port: 80u16.to_be(),
        _pad: [0; 2],
    };
    let bkey = BackendKey {
        service_id: 1,
        index: 0,
    };
    dp.set::<crate::kernel::maps::Backends>(bkey, backend)
        .unwrap();
    let members = [maglev::Member {
        identity: "web1".into(),
        weight: 1,
    }];
    dp.set_maglev(1, &maglev::table(&members, dp.maglev_size()))
        .unwrap();
    let service = ServiceKey {
        vip: be(VIP),
        port: 80u16.to_be(),
        proto: 6,
        _pad: 0,
    };
    let info = ServiceInfo {
        id: 1,
        backend_count: 1,
        algorithm: algorithm::MAGLEV,
        overlay: 0,
        _pad: [0; 2],
    };
    dp.set::<crate::kernel::maps::Services>(service, info)
        .unwrap();
    dp.set_config(Config {
        masquerade_addr: be(HOST),
        uplink_ifindex: 1,
        snat_port_min: SNAT_RANGE.0,
        snat_port_max: SNAT_RANGE.1,
        netns_cookie: crate::kernel::netdev::netns_cookie().unwrap(),
        ..Config::default()
    })
    .unwrap();
}

/// A frame from web1 as its kernel sends it: to the gateway's MAC.
fn from_web1(ip: &Ipv4Spec, l4: &[u8]) -> Vec<u8> {
    let mut frame = ipv4_frame(ip, l4);
    frame[..6].copy_from_slice(&GATEWAY_MAC);
    frame[6..12].copy_from_slice(&WEB1_MAC);
    frame
}

/// Runs web1's veth ingress on `frame`: expects it sent straight back into web1, addressed
/// from the gateway's MAC to web1's, payload untouched, every checksum valid; returns the
/// output's tuple.
fn back_into_web1(dp: &mut Datapath, frame: &[u8]) -> (Ipv4Addr, Ipv4Addr, u16, u16) {
    let (verdict, out) = run_tc(dp, Hook::ContainerIngress, frame);
    assert_eq!(verdict, TC_REDIRECT, "redirected into the container");
    assert_eq!(out.len(), frame.len());
    assert_eq!(&out[..6], &WEB1_MAC, "to the container's MAC");
    assert_eq!(&out[6..12], &GATEWAY_MAC, "from the gateway's MAC");
    assert_checksums(&out);
    let l4 = ETH_LEN + 20 + if frame[ETH_LEN + 9] == 6 { 20 } else { 8 };
    assert_eq!(&out[l4..], &frame[l4..], "payload untouched");
    tuple(&out)
}

fn key(proto: u8, (saddr, sport): ([u8; 4], u16), (daddr, dport): ([u8; 4], u16)) -> CtKey {
    CtKey {
        saddr: be(saddr),
        daddr: be(daddr),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        _pad: [0; 3],
    }
}

/// The hairpin connection's two entries: forward under `forward`, and its reply's (found
/// through `peer`); checks what each rewrites to.
fn hairpin_entries(
    dp: &Datapath,
    forward: &CtKey,
    origin: u8,
    original: ([u8; 4], u16),
    container_port: u16,
) -> (CtEntry, CtEntry) {
    let entries = ct(dp);
    let f = entries.get(forward).expect("the forward entry").to_owned();
    let r = entries.get(&f.peer).expect("the reply entry").to_owned();
    assert_eq!(entries.len(), 2, "one entry per direction");
    assert_eq!((f.origin, f.rewrite), (origin, ct_rewrite::HAIRPIN));
    assert_eq!(
        (f.nat_addr, f.hairpin_port),
        (be(GATEWAY), container_port.to_be())
    );
    let port = u16::from_be(f.nat_port);
    assert_eq!(
        f.nat_port, forward.sport,
        "web1's own source port is kept (its tuple is free), as nf_nat keeps it"
    );
    assert_eq!(
        f.peer,
        key(forward.proto, (WEB1, container_port), (GATEWAY, port)),
        "the reply comes from web1's port to the gateway's allocated port"
    );
    assert_eq!(
        (r.origin, r.rewrite, r.is_reply),
        (origin, ct_rewrite::HAIRPIN, 1)
    );
    assert_eq!(
        (r.nat_addr, r.nat_port, r.hairpin_port),
        (be(original.0), original.1.to_be(), forward.sport),
        "the reply's source back to what web1 connected to, its destination to web1's port"
    );
    (f, r)
}

#[test]
fn tcp_to_its_own_published_port_through_a_host_address() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    let syn = from_web1(
        &Ipv4Spec::new(WEB1, HOST, 6),
        &tcp(45000, 8080, TCP_SYN, b""),
    );
    let (src, dst, sport, dport) = back_into_web1(dp, &syn);
    assert_eq!((src, dst, dport), (ip4(GATEWAY), ip4(WEB1), 80));
    let forward = key(6, (WEB1, 45000), (HOST, 8080));
    let (f, _) = hairpin_entries(dp, &forward, ct_origin::PUBLISHED, (HOST, 8080), 80);
    assert_eq!(sport, u16::from_be(f.nat_port));
    // web1's server answers the gateway: back to web1's client, from host:8080.
    let synack = from_web1(
        &Ipv4Spec::new(WEB1, GATEWAY, 6),
        &tcp(80, sport, TCP_SYN | TCP_ACK, b""),
    );
    assert_eq!(
        back_into_web1(dp, &synack),
        (ip4(HOST), ip4(WEB1), 8080, 45000)
    );
    // The connection's next packets follow its entries, payload and all.
    let mut ack = tcp(45000, 8080, TCP_ACK, b"GET / HTTP/1.1\r\n\r\n");
    ack[8..12].copy_from_slice(&1001u32.to_be_bytes());
    let data = from_web1(&Ipv4Spec::new(WEB1, HOST, 6), &ack);
    assert_eq!(
        back_into_web1(dp, &data),
        (ip4(GATEWAY), ip4(WEB1), sport, 80)
    );
    let answer = from_web1(
        &Ipv4Spec::new(WEB1, GATEWAY, 6),
        &tcp(80, sport, TCP_ACK, b"HTTP/1.1 200 OK\r\n\r\n"),
    );
    assert_eq!(
        back_into_web1(dp, &answer),
        (ip4(HOST), ip4(WEB1), 8080, 45000)
    );
    let entries = ct(dp);
    assert_eq!(entries.len(), 2, "still one connection");
    assert_eq!(entries.values().map(|e| e.packets).sum::<u64>(), 4);
}

#[test]
fn udp_to_its_own_published_port_through_the_gateway() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    let query = from_web1(
        &Ipv4Spec::new(WEB1, GATEWAY, 17),
        &udp(33333, 5353, b"query"),
    );
    let (src, dst, sport, dport) = back_into_web1(dp, &query);
    assert_eq!((src, dst, dport), (ip4(GATEWAY), ip4(WEB1), 53));
    let forward = key(17, (WEB1, 33333), (GATEWAY, 5353));
    hairpin_entries(dp, &forward, ct_origin::PUBLISHED, (GATEWAY, 5353), 53);
    let answer = from_web1(
        &Ipv4Spec::new(WEB1, GATEWAY, 17),
        &udp(53, sport, b"answer"),
    );
    assert_eq!(
        back_into_web1(dp, &answer),
        (ip4(GATEWAY), ip4(WEB1), 5353, 33333)
    );
}

#[test]
fn a_vip_whose_pick_is_the_client_itself() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    let syn = from_web1(&Ipv4Spec::new(WEB1, VIP, 6), &tcp(46000, 80, TCP_SYN, b""));
    let (src, dst, sport, dport) = back_into_web1(dp, &syn);
    assert_eq!((src, dst, dport), (ip4(GATEWAY), ip4(WEB1), 80));
    let forward = key(6, (WEB1, 46000), (VIP, 80));
    hairpin_entries(dp, &forward, ct_origin::SERVICE, (VIP, 80), 80);
    let synack = from_web1(
        &Ipv4Spec::new(WEB1, GATEWAY, 6),
        &tcp(80, sport, TCP_SYN | TCP_ACK, b""),
    );
    assert_eq!(
        back_into_web1(dp, &synack),
        (ip4(VIP), ip4(WEB1), 80, 46000)
    );
    // Another container reaching the same VIP is not a hairpin: plain DNAT, its own address
    // kept.
    let other = ipv4_frame(&Ipv4Spec::new(WEB2, VIP, 6), &tcp(46001, 80, TCP_SYN, b""));
    let (verdict, out) = run_tc(dp, Hook::ContainerIngress, &other);
    assert_eq!(verdict, TC_REDIRECT);
    assert_checksums(&out);
    assert_eq!(tuple(&out), (ip4(WEB2), ip4(WEB1), 46001, 80));
}

#[test]
fn hairpin_connections_of_one_client_port_get_distinct_source_ports() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    // The same client port through both of the host's addresses: two connections to web1:80,
    // which the gateway's source port keeps apart.
    let mut ports = Vec::new();
    for to in [HOST, GATEWAY] {
        let syn = from_web1(&Ipv4Spec::new(WEB1, to, 6), &tcp(47000, 8080, TCP_SYN, b""));
        let (src, dst, sport, dport) = back_into_web1(dp, &syn);
        assert_eq!((src, dst, dport), (ip4(GATEWAY), ip4(WEB1), 80));
        ports.push(sport);
    }
    assert_ne!(ports[0], ports[1]);
    assert_eq!(ct(dp).len(), 4);
    for (to, port) in [(HOST, ports[0]), (GATEWAY, ports[1])] {
        let synack = from_web1(
            &Ipv4Spec::new(WEB1, GATEWAY, 6),
            &tcp(80, port, TCP_SYN | TCP_ACK, b""),
        );
        assert_eq!(
            back_into_web1(dp, &synack),
            (ip4(to), ip4(WEB1), 8080, 47000)
        );
    }
}

#[test]
fn a_port_unreachable_about_a_hairpin_reaches_the_client_as_from_what_it_called() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    let query = from_web1(&Ipv4Spec::new(WEB1, HOST, 17), &udp(33334, 5353, b"query"));
    let (verdict, arrived) = run_tc(dp, Hook::ContainerIngress, &query);
    assert_eq!(verdict, TC_REDIRECT);
    // Nothing listens on web1:53: its kernel answers the gateway with "port unreachable",
    // quoting the datagram as it arrived.
    let refused = from_web1(
        &Ipv4Spec::new(WEB1, GATEWAY, 1),
        &icmp_error(3, 3, &arrived),
    );
    let (verdict, out) = run_tc(dp, Hook::ContainerIngress, &refused);
    assert_eq!(verdict, TC_REDIRECT, "back into web1");
    assert_eq!(&out[..6], &WEB1_MAC);
    assert_checksums(&out);
    assert_eq!(
        (tuple(&out).0, tuple(&out).1),
        (ip4(HOST), ip4(WEB1)),
        "from the address the client called"
    );
    assert_eq!(
        quoted_tuple(&out),
        (ip4(WEB1), ip4(HOST), 33334, 5353),
        "quoting what the client sent"
    );
}
