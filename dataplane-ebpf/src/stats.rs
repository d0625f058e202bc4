//! Counters: per-interface traffic and per-reason drops.

use dataplane_common::{DropReason, IfaceStats, IfaceStatsKey};

use crate::maps::{DROPS, IFACE_STATS};

/// Counts one packet of `len` bytes on `ifindex` at `hook`.
#[inline(always)]
pub fn count_packet(ifindex: u32, hook: u32, len: u32) {
    let key = IfaceStatsKey { ifindex, hook };
    match IFACE_STATS.get_ptr_mut(&key) {
        // SAFETY: a map value from the lookup just made; per-CPU, so no other CPU writes it
        // and a plain add is race free.
        Some(stats) => unsafe {
            (*stats).packets += 1;
            (*stats).bytes += u64::from(len);
        },
        None => {
            let first = IfaceStats {
                packets: 1,
                bytes: u64::from(len),
            };
            // A full map loses this interface's counts, not the packet; nothing more to do.
            let _ = IFACE_STATS.insert(&key, &first, 0);
        }
    }
}

/// Counts a drop for `reason`.
#[inline(always)]
pub fn count_drop(reason: DropReason) {
    if let Some(counter) = DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: a map value from the lookup just made; a per-CPU slot has no concurrent
        // writer.
        unsafe { *counter += 1 };
    }
}
