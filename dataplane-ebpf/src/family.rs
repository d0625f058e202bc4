//! What differs between IPv4 and IPv6 for the code both families share: each family's
//! conntrack tables, drop aggregates, service maps, ICMP protocol number and socket-lookup
//! tuple. Conntrack, the flow events of a connection, the source-port allocation and the
//! choice of a service's backend (`lb.rs`) are written once, generic over [`Family`]; each instance is
//! the same code with the family's constants and maps (the IPv4 one is what it was before
//! IPv6 existed, instruction for instruction). The per-packet parts (headers, checksums,
//! hooks) are per family: their offsets and checksum rules differ.

use aya_ebpf::{
    bindings::{
        bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
    },
    maps::{HashMap, LruHashMap},
};
use dataplane_common::{
    Address, BackendKey, BackendOf, CtEntryOf, CtKeyOf, DropAggKeyOf, DropAggValueOf, In6Addr,
    ServiceInfo, ServiceKeyOf,
};

use crate::{
    maps::{
        BACKENDS, BACKENDS6, CONNTRACK, CONNTRACK_NEW, CONNTRACK6, CONNTRACK6_NEW, DROP_AGGREGATES,
        DROP_AGGREGATES6, ENDPOINTS6, SERVICES, SERVICES6,
    },
    parse::{IPPROTO_ICMP, IPPROTO_ICMPV6},
    policy::{self, Via},
};

pub trait Family: Address {
    /// The protocol number of the family's ICMP (echo connections and errors).
    const ICMP: u8;
    /// Established connections, one entry per direction.
    fn conntrack() -> &'static HashMap<CtKeyOf<Self>, CtEntryOf<Self>>;
    /// Connections whose handshake has not completed.
    fn conntrack_new() -> &'static LruHashMap<CtKeyOf<Self>, CtEntryOf<Self>>;
    /// The family's service VIPs.
    fn services() -> &'static HashMap<ServiceKeyOf<Self>, ServiceInfo>;
    /// The family's backends of every service (a dual-stack service's share their indexes).
    fn backends() -> &'static HashMap<BackendKey, BackendOf<Self>>;
    /// Drops not yet reported, by (source, reason, hook): the flow events' aggregation.
    fn drop_aggregates() -> &'static LruHashMap<DropAggKeyOf<Self>, DropAggValueOf<Self>>;
    /// The address folded into 32 bits, for hashing (IPv4's is itself).
    fn fold(&self) -> u32;
    /// Policy's judgement of a connection from `saddr` to `daddr`:`dport` (the destination
    /// after any translation).
    fn allows(saddr: &Self, daddr: &Self, proto: u8, dport: u16, via: Via) -> bool;
    /// How a connection tracked untranslated (`ct_origin::PLAIN`) from `saddr` came: IPv4
    /// tracks only containers' (direct); IPv6 also those routed in from outside to a
    /// container's address (a source that is no container).
    fn plain_via(saddr: &Self) -> Via;
    /// The socket-lookup tuple of `key` (as a packet with that key carries it) and its size,
    /// for bpf_sk_lookup_*.
    fn sock_tuple(key: &CtKeyOf<Self>) -> (bpf_sock_tuple, u32);
}

impl Family for u32 {
    const ICMP: u8 = IPPROTO_ICMP;
    #[inline(always)]
    fn allows(saddr: &Self, daddr: &Self, proto: u8, dport: u16, via: Via) -> bool {
        policy::allows(*saddr, *daddr, proto, dport, via)
    }
    #[inline(always)]
    fn plain_via(_saddr: &Self) -> Via {
        Via::Direct
    }
    #[inline(always)]
    fn conntrack() -> &'static HashMap<CtKeyOf<Self>, CtEntryOf<Self>> {
        &CONNTRACK
    }
    #[inline(always)]
    fn conntrack_new() -> &'static LruHashMap<CtKeyOf<Self>, CtEntryOf<Self>> {
        &CONNTRACK_NEW
    }
    #[inline(always)]
    fn services() -> &'static HashMap<ServiceKeyOf<Self>, ServiceInfo> {
        &SERVICES
    }
    #[inline(always)]
    fn backends() -> &'static HashMap<BackendKey, BackendOf<Self>> {
        &BACKENDS
    }
    #[inline(always)]
    fn drop_aggregates() -> &'static LruHashMap<DropAggKeyOf<Self>, DropAggValueOf<Self>> {
        &DROP_AGGREGATES
    }
    #[inline(always)]
    fn fold(&self) -> u32 {
        *self
    }
    #[inline(always)]
    fn sock_tuple(key: &CtKeyOf<Self>) -> (bpf_sock_tuple, u32) {
        (
            bpf_sock_tuple {
                __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
                    ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                        saddr: key.saddr,
                        daddr: key.daddr,
                        sport: key.sport,
                        dport: key.dport,
                    },
                },
            },
            core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32,
        )
    }
}

impl Family for In6Addr {
    const ICMP: u8 = IPPROTO_ICMPV6;
    #[inline(always)]
    fn allows(saddr: &Self, daddr: &Self, proto: u8, dport: u16, via: Via) -> bool {
        policy::check6(saddr, daddr, proto, dport, via).is_ok()
    }
    #[inline(always)]
    fn plain_via(saddr: &Self) -> Via {
        if ENDPOINTS6.get_ptr(saddr).is_some() {
            Via::Direct
        } else {
            Via::Routed
        }
    }
    #[inline(always)]
    fn conntrack() -> &'static HashMap<CtKeyOf<Self>, CtEntryOf<Self>> {
        &CONNTRACK6
    }
    #[inline(always)]
    fn conntrack_new() -> &'static LruHashMap<CtKeyOf<Self>, CtEntryOf<Self>> {
        &CONNTRACK6_NEW
    }
    #[inline(always)]
    fn services() -> &'static HashMap<ServiceKeyOf<Self>, ServiceInfo> {
        &SERVICES6
    }
    #[inline(always)]
    fn backends() -> &'static HashMap<BackendKey, BackendOf<Self>> {
        &BACKENDS6
    }
    #[inline(always)]
    fn drop_aggregates() -> &'static LruHashMap<DropAggKeyOf<Self>, DropAggValueOf<Self>> {
        &DROP_AGGREGATES6
    }
    #[inline(always)]
    fn fold(&self) -> u32 {
        self.0[0] ^ self.0[1].rotate_left(8) ^ self.0[2].rotate_left(16) ^ self.0[3]
    }
    #[inline(always)]
    fn sock_tuple(key: &CtKeyOf<Self>) -> (bpf_sock_tuple, u32) {
        (
            bpf_sock_tuple {
                __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
                    ipv6: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
                        saddr: key.saddr.0,
                        daddr: key.daddr.0,
                        sport: key.sport,
                        dport: key.dport,
                    },
                },
            },
            core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>() as u32,
        )
    }
}
