//! Packet tests of service load balancing: a VIP spreads new connections over its backends
//! and keeps each connection on its backend, replies come from the VIP, a published port can
//! lead to a service, and a service without backends refuses with a TCP reset at once.

use std::{collections::BTreeMap, net::Ipv4Addr};

use dataplane_common::{
    Backend, BackendKey, DropReason, EndpointInfo, PortKey, PortTarget, ServiceInfo, ServiceKey,
    algorithm,
};

use super::{
    packet::{Ipv4Spec, TCP_ACK, TCP_SYN, assert_checksums, ipv4_frame, tcp, tuple},
    programs::{TC_PASS, loaded_or_skip, run_tc},
};
use crate::{
    kernel::{Datapath, Hook},
    reconcile::maglev,
};

const CLIENT: [u8; 4] = [172, 30, 1, 9];
const VIP: [u8; 4] = [10, 96, 0, 10];
const BACKENDS: [[u8; 4]; 3] = [[172, 30, 1, 2], [172, 30, 1, 3], [172, 30, 1, 4]];
const TC_REDIRECT: u32 = 7;

fn be(ip: [u8; 4]) -> u32 {
    u32::from_be_bytes(ip).to_be()
}

/// A service 10.96.0.10:80/tcp over `backends` (target port 8080) with `algo`, as id 1.
fn service(dp: &mut Datapath, backends: &[[u8; 4]], algo: u8) {
    let key = ServiceKey {
        vip: be(VIP),
        port: 80u16.to_be(),
        proto: 6,
        _pad: 0,
    };
    let members: Vec<maglev::Member> = backends
        .iter()
        .map(|b| maglev::Member {
            identity: format!("{b:?}"),
            weight: 1,
        })
        .collect();
    for (index, addr) in backends.iter().enumerate() {
        let bkey = BackendKey {
            service_id: 1,
            index: index as u32,
        };
        let backend = Backend {
            addr: be(*addr),
            port: 8080u16.to_be(),
            _pad: [0; 2],
        };
        dp.set::<crate::kernel::maps::Backends>(bkey, backend)
            .unwrap();
    }
    if !backends.is_empty() {
        dp.set_maglev(1, &maglev::table(&members, dp.maglev_size()))
            .unwrap();
    }
    let info = ServiceInfo {
        id: 1,
        backend_count: backends.len() as u32,
        algorithm: algo,
        overlay: 0,
        _pad: [0; 2],
    };
    dp.set::<crate::kernel::maps::Services>(key, info).unwrap();
    let endpoint = EndpointInfo {
        ifindex: 9,
        network_id: 1,
        mac: [2, 0, 0, 0, 0, 9],
        endpoint_id: 1,
        ..Default::default()
    };
    dp.set::<crate::kernel::maps::Endpoints>(be(CLIENT), endpoint)
        .unwrap();
}

fn syn(sport: u16) -> Vec<u8> {
    ipv4_frame(
        &Ipv4Spec::new(CLIENT, VIP, 6),
        &tcp(sport, 80, TCP_SYN, b""),
    )
}

/// The backend a new connection from `sport` lands on.
fn land(dp: &mut Datapath, sport: u16) -> Ipv4Addr {
    let (verdict, out) = run_tc(dp, Hook::ContainerIngress, &syn(sport));
    assert_eq!(verdict, TC_PASS);
    assert_checksums(&out);
    let (src, dst, sp, dp_) = tuple(&out);
    assert_eq!((src, sp, dp_), (Ipv4Addr::from(CLIENT), sport, 8080));
    dst
}

fn spread(dp: &mut Datapath, connections: u16) -> BTreeMap<Ipv4Addr, u32> {
    let mut counts = BTreeMap::new();
    for sport in 0..connections {
        *counts.entry(land(dp, 20000 + sport)).or_default() += 1;
    }
    counts
}

#[test]
fn maglev_spreads_connections_evenly_and_replies_come_from_the_vip() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    service(dp, &BACKENDS, algorithm::MAGLEV);
    let counts = spread(dp, 3000);
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (backend, n) in &counts {
        assert!(
            (900..=1100).contains(n),
            "{backend}: {n} of 3000 ({counts:?})"
        );
    }
    // The backend's reply goes back as VIP:80.
    let first = land(dp, 20000);
    let reply = ipv4_frame(
        &Ipv4Spec::new(first.octets(), CLIENT, 6),
        &tcp(8080, 20000, TCP_SYN | TCP_ACK, b""),
    );
    let (verdict, out) = run_tc(dp, Hook::ContainerIngress, &reply);
    assert_eq!(verdict, TC_REDIRECT, "straight into the client container");
    assert_eq!(
        &out[..6],
        &[2, 0, 0, 0, 0, 9],
        "addressed to the client's MAC"
    );
    assert_checksums(&out);
    assert_eq!(
        tuple(&out),
        (Ipv4Addr::from(VIP), Ipv4Addr::from(CLIENT), 80, 20000)
    );
}

/// `--maglev-size`: the programs index tables of the size given at load (a stride the
/// default would get wrong: a table at the wrong offset would send every connection of
/// service 1 to whatever slots of id 0's spare table or of the next table hold).
#[test]
fn a_maglev_table_of_a_size_set_at_load_balances_evenly() {
    let options = crate::kernel::LoadOptions {
        maglev_size: 4093,
        max_services: 64,
        ..Default::default()
    };
    let mut t = loaded_or_skip!(&options);
    let dp = t.get();
    assert_eq!(dp.maglev_size(), 4093);
    assert_eq!(dp.maglev(1).len(), 4093);
    service(dp, &BACKENDS, algorithm::MAGLEV);
    let counts = spread(dp, 3000);
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (backend, n) in &counts {
        assert!(
            (900..=1100).contains(n),
            "{backend}: {n} of 3000 ({counts:?})"
        );
    }
    assert!(dp.maglev(1).iter().all(|&i| i < 3));
}

#[test]
fn a_size_that_is_not_prime_or_does_not_fit_is_refused() {
    use crate::kernel::check_maglev_size;
    assert!(check_maglev_size(16381, 1024).is_ok());
    assert!(check_maglev_size(1021, 51_200).is_ok());
    for (size, services) in [(16383, 10), (250, 10), (131_101, 10), (131_071, 40_000)] {
        let refused = check_maglev_size(size, services);
        assert!(refused.is_err(), "{size} x {services}");
    }
}

#[test]
fn a_connection_keeps_its_backend_when_the_backend_set_changes() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    service(dp, &BACKENDS, algorithm::MAGLEV);
    let before: Vec<Ipv4Addr> = (0..200).map(|p| land(dp, 30000 + p)).collect();
    // A fourth backend arrives: tracked connections stay where they are...
    service(
        dp,
        &[BACKENDS[0], BACKENDS[1], BACKENDS[2], [172, 30, 1, 5]],
        algorithm::MAGLEV,
    );
    let ack = |sport: u16| {
        ipv4_frame(
            &Ipv4Spec::new(CLIENT, VIP, 6),
            &tcp(sport, 80, TCP_ACK, b"x"),
        )
    };
    for (i, backend) in before.iter().enumerate() {
        let (_, out) = run_tc(dp, Hook::ContainerIngress, &ack(30000 + i as u16));
        assert_eq!(tuple(&out).1, *backend, "connection {i} moved");
    }
    // ...and new ones reach the newcomer too.
    let counts = spread(dp, 400);
    assert!(
        counts.contains_key(&Ipv4Addr::new(172, 30, 1, 5)),
        "{counts:?}"
    );
}

#[test]
fn source_hash_keeps_a_client_on_one_backend() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    service(dp, &BACKENDS, algorithm::SOURCE_HASH);
    let counts = spread(dp, 100);
    assert_eq!(counts.len(), 1, "one client, one backend: {counts:?}");
}

#[test]
fn random_and_round_robin_use_every_backend() {
    for algo in [algorithm::RANDOM, algorithm::ROUND_ROBIN] {
        let mut t = loaded_or_skip!();
        let dp = t.get();
        service(dp, &BACKENDS, algo);
        let counts = spread(dp, 300);
        assert_eq!(counts.len(), 3, "algorithm {algo}: {counts:?}");
        if algo == algorithm::ROUND_ROBIN {
            // One CPU runs the test: a strict rotation.
            assert!(counts.values().all(|n| *n == 100), "{counts:?}");
        }
    }
}

#[test]
fn no_backend_refuses_with_a_reset_at_once() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    service(dp, &[], algorithm::MAGLEV);
    let request = syn(40000);
    let (verdict, out) = run_tc(dp, Hook::ContainerIngress, &request);
    assert_eq!(verdict, TC_REDIRECT, "sent back where it came from");
    assert_eq!(out.len(), 54, "a bare reset");
    assert_checksums(&out);
    assert_eq!(
        tuple(&out),
        (Ipv4Addr::from(VIP), Ipv4Addr::from(CLIENT), 80, 40000)
    );
    let flags = out[14 + 20 + 13];
    assert_eq!(flags, 0x14, "RST|ACK");
    let ack = u32::from_be_bytes(out[14 + 20 + 8..14 + 20 + 12].try_into().unwrap());
    assert_eq!(ack, 1001, "acknowledges the SYN (seq 1000)");
    assert_eq!(&out[0..6], &request[6..12], "back to the sender's MAC");
    let drops = dp.drops().unwrap();
    assert_eq!(
        drops
            .iter()
            .find(|(r, _)| *r == DropReason::ServiceBackendNotFound)
            .unwrap()
            .1,
        1
    );
}

#[test]
fn a_published_port_can_lead_to_a_service() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    service(dp, &BACKENDS, algorithm::MAGLEV);
    let host = [192, 0, 2, 1];
    dp.set::<crate::kernel::maps::LocalAddrs>(be(host), 1u8)
        .unwrap();
    let key = PortKey {
        addr: 0,
        port: 8000u16.to_be(),
        proto: 6,
        _pad: 0,
    };
    let target = PortTarget {
        addr: be(VIP),
        port: 80u16.to_be(),
        is_service: 1,
        _pad: 0,
    };
    dp.set::<crate::kernel::maps::Ports>(key, target).unwrap();
    let mut seen = BTreeMap::new();
    for sport in 0..60u16 {
        let frame = ipv4_frame(
            &Ipv4Spec::new([192, 0, 2, 2], host, 6),
            &tcp(50000 + sport, 8000, TCP_SYN, b""),
        );
        let (verdict, out) = run_tc(dp, Hook::UplinkIngress, &frame);
        assert_eq!(verdict, TC_PASS);
        assert_checksums(&out);
        let (src, dst, _, dport) = tuple(&out);
        assert_eq!((src, dport), (Ipv4Addr::new(192, 0, 2, 2), 8080));
        *seen.entry(dst).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
}
