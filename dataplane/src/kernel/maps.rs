//! The hash maps the agent reads and writes, one type each, and who may write them.
//!
//! A map is named by its type, never by a string: `datapath.entries::<Ports>()`. Writing is
//! limited by two things the compiler checks:
//! - [`Datapath::set`](super::Datapath::set) and [`Datapath::remove`](super::Datapath::remove)
//!   accept only maps that implement [`Reconciled`], and they take `&mut Datapath`, which only
//!   its owner has: the agent hands the loaded `Datapath` to the reconciler
//!   ([`crate::reconcile::Reconciler`]) and everyone else gets `&Datapath`;
//! - the maps the kernel programs fill (the two conntrack tables, the drop aggregates) are not
//!   [`Reconciled`]: their one agent-side writer is the collector
//!   ([`Collector`](super::conntrack::Collector)), through [`KernelFilled`] handles that only
//!   `Datapath::load` makes and hands over beside the datapath (the same arrangement as
//!   Cilium's ctmap GC).

use std::path::Path;

use aya::{
    Pod,
    maps::{HashMap, Map, MapData},
};
use dataplane_common::{
    Backend, Backend6, BackendKey, CtEntry, CtEntry6, CtKey, CtKey6, DropAggKey, DropAggKey6,
    DropAggValue, DropAggValue6, EndpointInfo, EndpointInfo6, In6Addr, PolicyKey, PolicyVerdict,
    PortKey, PortKey6, PortTarget, PortTarget6, ServiceInfo, ServiceKey, ServiceKey6, SockLb,
    SockLb6, SockLbKey, SockLbKey6, SockNetns, SockRevNat, SockRevNat6, SockRevNatKey,
    SockRevNatKey6, map_names,
};

use super::DatapathError;

/// A BPF hash map of the kernel object: its pinned name and its key and value types (the
/// kernel's own, in network byte order).
pub trait HashMapSpec {
    const NAME: &'static str;
    type Key: Pod + Ord;
    type Value: Pod;
}

/// A hash map whose entries the reconciler owns: it writes the whole desired content and
/// removes what is not desired.
pub trait Reconciled: HashMapSpec {}

macro_rules! hash_map {
    ($(#[$doc:meta])* $name:ident, $map:expr, $key:ty => $value:ty, reconciled) => {
        hash_map!($(#[$doc])* $name, $map, $key => $value);
        impl Reconciled for $name {}
    };
    ($(#[$doc:meta])* $name:ident, $map:expr, $key:ty => $value:ty) => {
        $(#[$doc])*
        pub enum $name {}
        impl HashMapSpec for $name {
            const NAME: &'static str = $map;
            type Key = $key;
            type Value = $value;
        }
    };
}

hash_map!(
    /// Container endpoints by IPv4 address (written by the reconciler).
    Endpoints, map_names::ENDPOINTS, u32 => EndpointInfo, reconciled
);
hash_map!(
    /// Published ports (written by the reconciler).
    Ports, map_names::PORTS, PortKey => PortTarget, reconciled
);
hash_map!(
    /// Service VIPs (written by the reconciler).
    Services, map_names::SERVICES, ServiceKey => ServiceInfo, reconciled
);
hash_map!(
    /// Backends of services (written by the reconciler).
    Backends, map_names::BACKENDS, BackendKey => Backend, reconciled
);
hash_map!(
    /// The host's own IPv4 addresses (written by the reconciler).
    LocalAddrs, map_names::LOCAL_ADDRS, u32 => u8, reconciled
);
hash_map!(
    /// The compiled policy, both halves (written by the reconciler, see
    /// `reconcile::policy`).
    Policy, map_names::POLICY, PolicyKey => PolicyVerdict, reconciled
);
hash_map!(
    /// Connection tracking, established connections: created by the kernel programs, removed
    /// by the garbage collector (`kernel::conntrack`); readable by everyone.
    Conntrack, map_names::CONNTRACK, CtKey => CtEntry
);
hash_map!(
    /// Connection tracking, handshakes under way (an LRU map, so a flood of them evicts its
    /// own kind): written like [`Conntrack`].
    ConntrackNew, map_names::CONNTRACK_NEW, CtKey => CtEntry
);
hash_map!(
    /// Drop events the kernel aggregated per (source, reason, hook) and has not reported yet
    /// (an LRU map): the collector reports what is left pending and removes the key.
    DropAggregates, map_names::DROP_AGGREGATES, DropAggKey => DropAggValue
);

hash_map!(
    /// Socket-level translations of host processes (an LRU map the socket hooks write and
    /// read; the agent only counts it).
    SockRevNats, map_names::SOCK_REV_NAT, SockRevNatKey => SockRevNat
);
hash_map!(
    /// Containers' network namespaces whose sockets the cgroup hooks translate, by netns
    /// cookie (written by the reconciler).
    SockNetnsMap, map_names::SOCK_NETNS, u64 => SockNetns, reconciled
);
hash_map!(
    /// Containers' connections translated at their socket, until their first packet (an LRU
    /// map the socket hooks write and the container hook reads; the agent only counts it).
    SockLbs, map_names::SOCK_LB, SockLbKey => SockLb
);

// IPv6: each map holds what its IPv4 namesake above holds, with the same writer.
hash_map!(
    /// Container endpoints by IPv6 address (written by the reconciler).
    Endpoints6, map_names::ENDPOINTS6, In6Addr => EndpointInfo6, reconciled
);
hash_map!(
    /// Published ports on IPv6 host addresses (written by the reconciler).
    Ports6, map_names::PORTS6, PortKey6 => PortTarget6, reconciled
);
hash_map!(
    /// IPv6 service VIPs (written by the reconciler).
    Services6, map_names::SERVICES6, ServiceKey6 => ServiceInfo, reconciled
);
hash_map!(
    /// IPv6 addresses of services' backends (written by the reconciler).
    Backends6, map_names::BACKENDS6, BackendKey => Backend6, reconciled
);
hash_map!(
    /// The host's own IPv6 addresses (written by the reconciler).
    LocalAddrs6, map_names::LOCAL_ADDRS6, In6Addr => u8, reconciled
);
hash_map!(
    /// IPv6 connection tracking, established connections (as [`Conntrack`]).
    Conntrack6, map_names::CONNTRACK6, CtKey6 => CtEntry6
);
hash_map!(
    /// IPv6 connection tracking, handshakes under way (as [`ConntrackNew`]).
    Conntrack6New, map_names::CONNTRACK6_NEW, CtKey6 => CtEntry6
);
hash_map!(
    /// IPv6 drop aggregates (as [`DropAggregates`]).
    DropAggregates6, map_names::DROP_AGGREGATES6, DropAggKey6 => DropAggValue6
);
hash_map!(
    /// Socket-level translations to IPv6 peers (as [`SockRevNats`]).
    SockRevNats6, map_names::SOCK_REV_NAT6, SockRevNatKey6 => SockRevNat6
);
hash_map!(
    /// Containers' IPv6 connections translated at their socket (as [`SockLbs`]).
    SockLbs6, map_names::SOCK_LB6, SockLbKey6 => SockLb6
);

/// The agent's writable handle on a map the kernel programs fill: its own file descriptor,
/// opened from the pin, apart from the [`super::Datapath`]'s.
pub struct KernelFilled<M: HashMapSpec> {
    map: HashMap<MapData, M::Key, M::Value>,
    capacity: u32,
}

impl<M: HashMapSpec> KernelFilled<M> {
    /// Opens the pinned map; `kind` says how the kernel made it (hash or LRU hash).
    pub(super) fn open(pin_dir: &Path, kind: fn(MapData) -> Map) -> Result<Self, DatapathError> {
        let err = |source| DatapathError::Map {
            map: M::NAME,
            source,
        };
        let data = MapData::from_pin(pin_dir.join(M::NAME)).map_err(err)?;
        let capacity = data.info().map_err(err)?.max_entries();
        let map = HashMap::try_from(kind(data)).map_err(err)?;
        Ok(KernelFilled { map, capacity })
    }

    pub fn name(&self) -> &'static str {
        M::NAME
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Every entry of the map, into the collection the caller names.
    pub fn entries<C>(&self) -> Result<C, DatapathError>
    where
        C: Default + Extend<(M::Key, M::Value)> + FromIterator<(M::Key, M::Value)>,
    {
        use aya::maps::IterableMap as _;
        super::batch::entries(M::NAME, self.map.map(), || {
            self.map
                .iter()
                .map(|entry| {
                    entry.map_err(|source| DatapathError::Map {
                        map: M::NAME,
                        source,
                    })
                })
                .collect()
        })
    }

    /// Removes `keys`; keys already gone are not errors. Returns how many it removed.
    pub(super) fn remove_all<'a>(&mut self, keys: impl IntoIterator<Item = &'a M::Key>) -> usize
    where
        M::Key: 'a,
    {
        use aya::maps::IterableMap as _;
        use std::os::fd::AsFd as _;
        let keys: Vec<M::Key> = keys.into_iter().copied().collect();
        match super::batch::delete(self.map.map().fd().as_fd(), &keys) {
            Ok(removed) => return removed,
            Err(super::batch::BatchError::Unsupported) => {}
            Err(super::batch::BatchError::Io(e)) => {
                log::warn!("{}: removing entries: {e}", M::NAME);
                return 0;
            }
        }
        let mut removed = 0;
        for key in &keys {
            match super::removed(M::NAME, self.map.remove(key)) {
                Ok(()) => removed += 1,
                Err(e) => log::warn!("{}: {e}", M::NAME),
            }
        }
        removed
    }
}
