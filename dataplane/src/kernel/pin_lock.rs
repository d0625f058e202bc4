//! One agent per pin directory, and a start that fails leaves nothing behind.
//!
//! The lock is an exclusive `flock` on the pin directory itself, held through an open fd for
//! the agent's life: bpffs holds no regular files to lock, but any inode can be flocked, and
//! the kernel drops the lock when the holder dies however it dies (kill -9 included), so there
//! is never a stale lock to clean up. The holder's PID is what the kernel records in
//! /proc/locks for that inode; a second agent reads it there to name the first one.

use std::{
    collections::BTreeSet,
    fs::File,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum PinLockError {
    #[error(
        "the pin directory {path} is in use by another agent{}; one agent per pin directory \
         (give this one its own --pin-dir)",
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    InUse { path: PathBuf, holder: Option<u32> },
    #[error("locking the pin directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Held for the agent's life; dropping it (or the process dying) releases the lock.
pub struct PinLock {
    _dir: File,
}

impl PinLock {
    pub fn acquire(pin_dir: &Path) -> Result<PinLock, PinLockError> {
        let io = |source| PinLockError::Io {
            path: pin_dir.to_owned(),
            source,
        };
        let dir = File::open(pin_dir).map_err(io)?;
        // SAFETY: flock on an fd this function owns.
        let rc = unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let holder = dir.metadata().ok().and_then(|m| lock_holder(&m));
                return Err(PinLockError::InUse {
                    path: pin_dir.to_owned(),
                    holder,
                });
            }
            return Err(io(err));
        }
        Ok(PinLock { _dir: dir })
    }
}

/// The PID /proc/locks gives for a FLOCK on the inode of `meta`.
fn lock_holder(meta: &std::fs::Metadata) -> Option<u32> {
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    holder_in(&locks, meta.dev(), meta.ino())
}

/// Parses /proc/locks lines like `1: FLOCK  ADVISORY  WRITE 1234 00:1f:5678 0 EOF`.
fn holder_in(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    // The device as the kernel prints it: major:minor in hex.
    let major = libc::major(dev);
    let minor = libc::minor(dev);
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let kind = fields.iter().position(|f| *f == "FLOCK")?;
        let pid: u32 = fields.get(kind + 3)?.parse().ok()?;
        let mut id = fields.get(kind + 4)?.rsplitn(2, ':');
        let inode: u64 = id.next()?.parse().ok()?;
        let (maj, min) = id.next()?.split_once(':')?;
        let same_dev = u32::from_str_radix(maj, 16).ok()? == major
            && u32::from_str_radix(min, 16).ok()? == minor;
        (same_dev && inode == ino).then_some(pid)
    })
}

/// What the pin directory held before this agent started, so that a start that fails can
/// remove what it pinned itself (and nothing an earlier agent left).
pub struct StartRecord {
    pin_dir: PathBuf,
    before: BTreeSet<PathBuf>,
}

fn pins(pin_dir: &Path) -> BTreeSet<PathBuf> {
    let list = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default()
    };
    let mut all = BTreeSet::new();
    for path in list(pin_dir) {
        if path.is_dir() {
            all.extend(list(&path));
        }
        all.insert(path);
    }
    all
}

impl StartRecord {
    pub fn take(pin_dir: &Path) -> StartRecord {
        StartRecord {
            pin_dir: pin_dir.to_owned(),
            before: pins(pin_dir),
        }
    }

    /// Unpins everything pinned since [`StartRecord::take`]: links (which then detach when
    /// their last fd closes) and maps. Returns what went.
    pub fn undo(&self) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        // Files before their directories: reverse order puts `links/x` before `links`.
        let new: Vec<PathBuf> = pins(&self.pin_dir)
            .difference(&self.before)
            .cloned()
            .collect();
        for path in new.iter().rev() {
            let gone = if path.is_dir() {
                std::fs::remove_dir(path)
            } else {
                std::fs::remove_file(path)
            };
            if gone.is_ok() {
                removed.push(path.clone());
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_is_read_from_proc_locks() {
        let locks = "1: POSIX  ADVISORY  WRITE 99 08:01:12 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 4242 00:1f:5678 0 EOF\n";
        let dev = libc::makedev(0, 0x1f);
        assert_eq!(holder_in(locks, dev, 5678), Some(4242));
        assert_eq!(holder_in(locks, dev, 5679), None);
        assert_eq!(holder_in(locks, libc::makedev(8, 1), 12), None);
    }

    #[test]
    fn a_second_lock_is_refused_naming_this_process() {
        let dir = std::env::temp_dir().join(format!("pinlock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = PinLock::acquire(&dir).unwrap();
        match PinLock::acquire(&dir) {
            Err(PinLockError::InUse { holder, .. }) => {
                assert_eq!(holder, Some(std::process::id()))
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a second lock was granted"),
        }
        drop(first);
        PinLock::acquire(&dir).unwrap();
        let record = StartRecord::take(&dir);
        std::fs::create_dir_all(dir.join("links")).unwrap();
        std::fs::write(dir.join("links/x"), "").unwrap();
        assert_eq!(record.undo().len(), 2);
        assert!(!dir.join("links").exists());
        std::fs::remove_dir(&dir).unwrap();
    }
}
