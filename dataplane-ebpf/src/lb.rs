//! Service load balancing: the VIP lookup and the choice of a backend for a new connection.
//! The choice is made once per connection; conntrack keeps the connection on its backend
//! whatever happens to the backend set afterwards. Generic over the address family
//! (`family.rs`): an IPv6 VIP is looked up and balanced by the same code with the family's
//! maps (SERVICES6, BACKENDS6) and the same Maglev tables (a dual-stack service has one id);
//! the IPv4 instance is the code it was before.

use aya_ebpf::{Global, helpers::bpf_get_prandom_u32};
use dataplane_common::{
    BackendKey, BackendOf, CtKeyOf, MAGLEV_DEFAULT_SIZE, ServiceInfo, ServiceKeyOf, algorithm,
    maglev_stride,
};

use crate::{
    family::Family,
    maps::{MAGLEV, RR_POSITION},
    parse::{Ipv4Packet, L4},
};

/// Slots of each service's Maglev table: a load-time setting (`--maglev-size`, a prime the
/// agent checked; the map was sized for it at the same load).
#[unsafe(no_mangle)]
static MAGLEV_SIZE: Global<u32> = Global::new(MAGLEV_DEFAULT_SIZE);

/// The service whose VIP:port the packet is addressed to.
#[inline(always)]
pub fn service_of(ip: &Ipv4Packet, l4: &L4) -> Option<ServiceInfo> {
    service_at(ip.daddr, l4.dport, ip.protocol)
}

/// The service at `vip`:`port` (network byte order) of `proto`, in the VIP's family.
#[inline(always)]
pub fn service_at<A: Family>(vip: A, port: u16, proto: u8) -> Option<ServiceInfo> {
    let key = ServiceKeyOf {
        vip,
        port,
        proto,
        _pad: 0,
    };
    // SAFETY: a map value from this program run's lookup.
    A::services().get_ptr(&key).map(|info| unsafe { *info })
}

/// Jenkins-style mixing: spreads nearby tuples (consecutive ports) over the table.
#[inline(always)]
pub fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^= h >> 16;
    h
}

/// The hash of a connection's tuple; an IPv6 address folded into 32 bits first (IPv4's is
/// itself: the same hash as before IPv6).
#[inline(always)]
fn flow_hash<A: Family>(flow: &CtKeyOf<A>) -> u32 {
    mix(flow.saddr.fold()
        ^ mix(flow.daddr.fold())
        ^ mix(u32::from(flow.sport) << 16 | u32::from(flow.dport))
        ^ u32::from(flow.proto))
}

/// What the consistent-hashing algorithms hash for one new connection: the whole connection
/// (Maglev) and its client (source hash).
pub struct Hashes {
    pub flow: u32,
    pub source: u32,
}

/// What the consistent-hashing algorithms hash for the new connection `flow`.
#[inline(always)]
pub fn hashes<A: Family>(flow: &CtKeyOf<A>) -> Hashes {
    Hashes {
        flow: flow_hash(flow),
        source: mix(flow.saddr.fold()),
    }
}

/// Picks the backend of `service` for the new connection `flow`; None when it has none.
#[inline(always)]
pub fn pick<A: Family>(service: &ServiceInfo, flow: &CtKeyOf<A>) -> Option<BackendOf<A>> {
    pick_hashed(service, &hashes(flow))
}

/// Picks the backend of `service` for a new connection known by its hashes (the socket hooks
/// know no 5-tuple yet); None when it has none.
#[inline(always)]
pub fn pick_hashed<A: Family>(service: &ServiceInfo, hashes: &Hashes) -> Option<BackendOf<A>> {
    let key = BackendKey {
        service_id: service.id,
        index: pick_index(service, hashes)?,
    };
    // SAFETY: a map value from this program run's lookup.
    A::backends()
        .get_ptr(&key)
        .map(|backend| unsafe { *backend })
}

/// The index of the backend [`pick_hashed`] picks: a dual-stack service's IPv4 and IPv6
/// backends share their indexes (BACKENDS and BACKENDS6), so either family's is found at it.
#[inline(always)]
pub fn pick_index(service: &ServiceInfo, hashes: &Hashes) -> Option<u32> {
    let count = service.backend_count;
    if count == 0 {
        return None;
    }
    let index = match service.algorithm {
        // SAFETY: a helper without arguments.
        algorithm::RANDOM => (unsafe { bpf_get_prandom_u32() }) % count,
        algorithm::ROUND_ROBIN => {
            let position = RR_POSITION.get_ptr_mut(service.id)?;
            // SAFETY: a per-CPU array element: no other CPU writes it.
            unsafe {
                let index = *position % count;
                *position = index + 1;
                index
            }
        }
        // Maglev and source hash: consistent hashing through the service's table.
        _ => {
            let hash = if service.algorithm == algorithm::SOURCE_HASH {
                hashes.source
            } else {
                hashes.flow
            };
            let size = MAGLEV_SIZE.load();
            // For the verifier (and a zero a broken loader might set): no division by 0.
            if size == 0 {
                return None;
            }
            let slot = service.id * maglev_stride(size) + hash % size;
            let pair = MAGLEV.get(slot / 2)?;
            pair[(slot & 1) as usize]
        }
    };
    Some(index)
}
