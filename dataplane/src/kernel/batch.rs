//! Reading a whole hash map in a few syscalls (BPF_MAP_LOOKUP_BATCH, Linux 5.6) instead of
//! two per entry (get-next-key, then lookup), which is what aya's iterators do. The
//! collector reads both conntrack tables every GC round and `status` counts them: at 100,000
//! entries that was 200,000 syscalls a round, most of the agent's CPU under load.
//!
//! A map or kernel that refuses batches (EINVAL, ENOTSUPP) is read entry by entry as before,
//! by the caller.

use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd};

use aya::Pod;

use super::DatapathError;

/// Entries asked for per syscall: 4,096 conntrack entries are about 400 KiB of buffers.
const BATCH: u32 = 4096;
/// bpf(2) commands (include/uapi/linux/bpf.h, enum bpf_cmd).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// `union bpf_attr`'s batch part.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Why a batch read failed.
#[derive(Debug)]
pub enum BatchError {
    /// The map type or the kernel has no batch lookup: read it entry by entry.
    Unsupported,
    Io(std::io::Error),
}

/// Every entry of the hash map behind `fd`, whose keys are `K` and values `V` (not a per-CPU
/// map: their values are per CPU), handed to `f` in the kernel's order. An entry added or
/// removed while the map is read may or may not be seen, as with an iterator.
pub fn for_each<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    mut f: impl FnMut(&K, &V),
) -> Result<(), BatchError> {
    let mut count_max = BATCH;
    let mut keys: Vec<K> = Vec::new();
    let mut values: Vec<V> = Vec::new();
    // The batch token: a bucket index (u32) for hash maps; room for a key for other kinds.
    let token_len = std::mem::size_of::<K>().max(8).div_ceil(8);
    let mut in_token = vec![0u64; token_len];
    let mut out_token = vec![0u64; token_len];
    let mut first = true;
    loop {
        keys.resize_with(count_max as usize, K::zeroed);
        values.resize_with(count_max as usize, V::zeroed);
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { in_token.as_ptr() as u64 },
            out_batch: out_token.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: count_max,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: attr is a valid bpf_attr prefix for this command, and every pointer in it
        // points at a buffer of `count` keys, `count` values or a token, writable and alive
        // for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>() as u32,
            )
        };
        let error = (rc < 0).then(std::io::Error::last_os_error);
        let errno = error.as_ref().and_then(std::io::Error::raw_os_error);
        match errno {
            // ENOSPC: a bucket holds more entries than `count`; nothing was read.
            Some(libc::ENOSPC) if count_max < 1 << 20 => {
                count_max *= 2;
                continue;
            }
            Some(libc::EINVAL | libc::EOPNOTSUPP | 524) if first => {
                // 524: the kernel's ENOTSUPP.
                return Err(BatchError::Unsupported);
            }
            None | Some(libc::ENOENT) => {}
            Some(_) => return Err(BatchError::Io(error.expect("an errno has an error"))),
        }
        for (key, value) in keys.iter().zip(&values).take(attr.count as usize) {
            f(key, value);
        }
        // ENOENT: that was the last batch.
        if errno == Some(libc::ENOENT) {
            return Ok(());
        }
        std::mem::swap(&mut in_token, &mut out_token);
        first = false;
    }
}

/// Removes `keys` from the hash map behind `fd` in as few syscalls as the kernel allows;
/// keys already gone are skipped. Returns how many it removed.
pub fn delete<K: Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> Result<usize, BatchError> {
    let mut removed = 0;
    let mut at = 0;
    while at < keys.len() {
        let rest = &keys[at..];
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            count: rest.len().min(u32::MAX as usize) as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: as in for_each(); the kernel only reads the `count` keys.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_DELETE_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>() as u32,
            )
        };
        // The kernel stops at the first key it could not remove and says how many it did.
        let done = (attr.count as usize).min(rest.len());
        removed += done;
        at += done;
        if rc < 0 {
            let error = std::io::Error::last_os_error();
            match error.raw_os_error() {
                // Gone already (the kernel's LRU evicted it, or a reply's entry went with
                // its pair): skip it.
                Some(libc::ENOENT) => at += 1,
                Some(libc::EINVAL | libc::EOPNOTSUPP | 524) if removed == 0 && at == 0 => {
                    return Err(BatchError::Unsupported);
                }
                _ => return Err(BatchError::Io(error)),
            }
        }
    }
    Ok(removed)
}

/// Every entry of a hash map into a collection of the caller's choice (ordered for the
/// reconciler's diffs, hashed for the conntrack walk's lookups), batched where the kernel
/// can, else entry by entry through aya's iterator (`fallback`).
pub fn entries<K: Pod, V: Pod, C: Default + Extend<(K, V)>>(
    name: &'static str,
    map: &aya::maps::MapData,
    fallback: impl FnOnce() -> Result<C, DatapathError>,
) -> Result<C, DatapathError> {
    let mut entries = C::default();
    match for_each::<K, V>(map.fd().as_fd(), |k, v| {
        entries.extend([(*k, *v)]);
    }) {
        Ok(()) => Ok(entries),
        Err(BatchError::Unsupported) => fallback(),
        Err(BatchError::Io(io_error)) => Err(map_error(name, io_error)),
    }
}

/// How many entries a hash map holds, batched where the kernel can, else by walking its keys
/// (`fallback`).
pub fn count<K: Pod, V: Pod>(
    name: &'static str,
    map: &aya::maps::MapData,
    fallback: impl FnOnce() -> Result<u32, DatapathError>,
) -> Result<u32, DatapathError> {
    let mut count = 0u32;
    match for_each::<K, V>(map.fd().as_fd(), |_, _| count += 1) {
        Ok(()) => Ok(count),
        Err(BatchError::Unsupported) => fallback(),
        Err(BatchError::Io(io_error)) => Err(map_error(name, io_error)),
    }
}

fn map_error(map: &'static str, io_error: std::io::Error) -> DatapathError {
    DatapathError::Map {
        map,
        source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_lookup_batch",
            io_error,
        }),
    }
}

/// What implements [`Pod`] has all-zero bytes as a valid value.
trait Zeroed {
    fn zeroed() -> Self;
}

impl<T: Pod> Zeroed for T {
    fn zeroed() -> T {
        // SAFETY: Pod types are plain data, valid for any bytes, all-zero included.
        unsafe { std::mem::zeroed() }
    }
}
