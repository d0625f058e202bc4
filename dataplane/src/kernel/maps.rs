//! The hash maps the agent reads and writes, one type each, and who may write them.
//!
//! A map is named by its type, never by a string: `datapath.entries::<Ports>()`. Writing is
//! limited by two things the compiler checks:
//! - [`Datapath::set`](super::Datapath::set) and [`Datapath::remove`](super::Datapath::remove)
//!   accept only maps that implement [`Reconciled`], and they take `&mut Datapath`, which only
//!   its owner has: the agent hands the loaded `Datapath` to the reconciler
//!   ([`crate::reconcile::Reconciler`]) and everyone else gets `&Datapath`;
//! - the conntrack map is not [`Reconciled`]: the kernel programs create its entries and the
//!   one agent-side writer is the garbage collector, through the
//!   [`ConntrackTable`](super::conntrack::ConntrackTable) handle that `Datapath::load` returns
//!   beside the datapath (the same arrangement as Cilium's ctmap GC).

use aya::Pod;
use dataplane_common::{
    Backend, BackendKey, CtEntry, CtKey, EndpointInfo, PortKey, PortTarget, ServiceInfo,
    ServiceKey, map_names,
};

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
    /// Connection tracking, established connections: created by the kernel programs, removed
    /// by the garbage collector (`kernel::conntrack`); readable by everyone.
    Conntrack, map_names::CONNTRACK, CtKey => CtEntry
);
hash_map!(
    /// Connection tracking, handshakes under way (an LRU map, so a flood of them evicts its
    /// own kind): written like [`Conntrack`].
    ConntrackNew, map_names::CONNTRACK_NEW, CtKey => CtEntry
);
