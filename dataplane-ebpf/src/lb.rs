//! Service load balancing: the VIP lookup and the choice of a backend for a new connection.
//! The choice is made once per connection; conntrack keeps the connection on its backend
//! whatever happens to the backend set afterwards.

use aya_ebpf::{Global, helpers::bpf_get_prandom_u32};
use dataplane_common::{
    Backend, BackendKey, CtKey, MAGLEV_DEFAULT_SIZE, ServiceInfo, ServiceKey, algorithm,
    maglev_stride,
};

use crate::{
    maps::{BACKENDS, MAGLEV, RR_POSITION, SERVICES},
    parse::{Ipv4Packet, L4},
};

/// Slots of each service's Maglev table: a load-time setting (`--maglev-size`, a prime the
/// agent checked; the map was sized for it at the same load).
#[unsafe(no_mangle)]
static MAGLEV_SIZE: Global<u32> = Global::new(MAGLEV_DEFAULT_SIZE);

/// The service whose VIP:port the packet is addressed to.
#[inline(always)]
pub fn service_of(ip: &Ipv4Packet, l4: &L4) -> Option<ServiceInfo> {
    let key = ServiceKey {
        vip: ip.daddr,
        port: l4.dport,
        proto: ip.protocol,
        _pad: 0,
    };
    // SAFETY: a map value from this program run's lookup.
    SERVICES.get_ptr(&key).map(|info| unsafe { *info })
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

#[inline(always)]
fn flow_hash(flow: &CtKey) -> u32 {
    mix(flow.saddr
        ^ mix(flow.daddr)
        ^ mix(u32::from(flow.sport) << 16 | u32::from(flow.dport))
        ^ u32::from(flow.proto))
}

/// What the consistent-hashing algorithms hash for one new connection: the whole connection
/// (Maglev) and its client (source hash).
pub struct Hashes {
    pub flow: u32,
    pub source: u32,
}

/// Picks the backend of `service` for the new connection `flow`; None when it has none.
#[inline(always)]
pub fn pick(service: &ServiceInfo, flow: &CtKey) -> Option<Backend> {
    pick_hashed(
        service,
        &Hashes {
            flow: flow_hash(flow),
            source: mix(flow.saddr),
        },
    )
}

/// Picks the backend of `service` for a new connection known by its hashes (the socket hooks
/// know no 5-tuple yet); None when it has none.
#[inline(always)]
pub fn pick_hashed(service: &ServiceInfo, hashes: &Hashes) -> Option<Backend> {
    let key = BackendKey {
        service_id: service.id,
        index: pick_index(service, hashes)?,
    };
    // SAFETY: a map value from this program run's lookup.
    BACKENDS.get_ptr(&key).map(|backend| unsafe { *backend })
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
