//! What differs between IPv4 and IPv6 for the code both families share: each family's
//! conntrack tables and ICMP protocol number. Conntrack and the flow events of a connection
//! are written once, generic over [`Family`]; each instance is
//! the same code with the family's constants and maps (the IPv4 one is what it was before
//! IPv6 existed, instruction for instruction). The per-packet parts (headers, checksums,
//! hooks) are per family: their offsets and checksum rules differ.

use aya_ebpf::maps::{HashMap, LruHashMap};
use dataplane_common::{Address, CtEntryOf, CtKeyOf, In6Addr};

use crate::{
    maps::{CONNTRACK, CONNTRACK_NEW, CONNTRACK6, CONNTRACK6_NEW},
    parse::{IPPROTO_ICMP, IPPROTO_ICMPV6},
};

pub trait Family: Address {
    /// The protocol number of the family's ICMP (echo connections and errors).
    const ICMP: u8;
    /// Established connections, one entry per direction.
    fn conntrack() -> &'static HashMap<CtKeyOf<Self>, CtEntryOf<Self>>;
    /// Connections whose handshake has not completed.
    fn conntrack_new() -> &'static LruHashMap<CtKeyOf<Self>, CtEntryOf<Self>>;
}

impl Family for u32 {
    const ICMP: u8 = IPPROTO_ICMP;
    #[inline(always)]
    fn conntrack() -> &'static HashMap<CtKeyOf<Self>, CtEntryOf<Self>> {
        &CONNTRACK
    }
    #[inline(always)]
    fn conntrack_new() -> &'static LruHashMap<CtKeyOf<Self>, CtEntryOf<Self>> {
        &CONNTRACK_NEW
    }
}

impl Family for In6Addr {
    const ICMP: u8 = IPPROTO_ICMPV6;
    #[inline(always)]
    fn conntrack() -> &'static HashMap<CtKeyOf<Self>, CtEntryOf<Self>> {
        &CONNTRACK6
    }
    #[inline(always)]
    fn conntrack_new() -> &'static LruHashMap<CtKeyOf<Self>, CtEntryOf<Self>> {
        &CONNTRACK6_NEW
    }
}
