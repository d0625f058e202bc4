//! The test bed: what the whole-host tests (tests/), the bench (bench/) and the demo
//! (`cargo xtask demo`) build their hosts from.
//!
//! - [`sandbox::Sandbox`]: a host with containers and an outside client as network namespaces
//!   (`dataplane sandbox up`), with commands and processes run in them;
//! - [`agent::Agent`]: `dataplane agent` started in a namespace with a pin directory and control
//!   socket of its own, its typed [`dataplane::control::status::Status`] read over that socket;
//! - [`dockerd::Engine`]: a real dockerd in a namespace, with everything it leaves behind
//!   (containers, shims, cgroups, mounts) found and removed;
//! - [`swarm::Swarm`]: a Docker Swarm of such engines, one node per namespace, on one test
//!   network;
//! - [`process`]: processes killed on drop, commands with a time limit, and the /proc and
//!   mount helpers the others share; [`interrupt`]: Ctrl-C as a flag the waits check.
//!
//! Everything is removed on drop, also when a test panics or the bench is interrupted. Nothing
//! here touches the root network namespace. Calls return [`Result`]; the few conveniences that
//! panic instead (named as the tests use them: `Sandbox::up`, `Agent::start`, `exec_ok`,
//! `wait_for`) say so.

pub mod agent;
pub mod cgroup;
pub mod dockerd;
pub mod interrupt;
pub mod netns;
pub mod process;
pub mod sandbox;
pub mod status;
pub mod swarm;

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

pub use agent::Agent;
pub use netns::in_netns;
pub use process::{Captured, Process};
pub use sandbox::Sandbox;
pub use status::StatusExt;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call or a file operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A command, process or check did not do what it should; the text says which and why.
    #[error("{0}")]
    Failed(String),
    /// SIGINT or SIGTERM arrived (see [`interrupt`]).
    #[error("interrupted")]
    Interrupted,
}

pub type Result<T> = std::result::Result<T, Error>;

/// `map_err` for io results: `.map_err(io("creating the work dir"))`.
pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// What the whole-host tests say when they cannot run.
pub const NEEDS_ROOT: &str =
    "needs root (network namespaces, BPF programs): run `sudo cargo xtask test`";

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Panics with [`NEEDS_ROOT`] unless root: a test that cannot build its host says why.
#[track_caller]
pub fn require_root() {
    assert!(is_root(), "{NEEDS_ROOT}");
}

/// The `dataplane` binary under test: $DATAPLANE_BIN, or the one cargo built beside the running
/// executable (target/debug/deps/<test> or target/debug/<bin> -> target/debug/dataplane).
pub fn dataplane_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("DATAPLANE_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let found = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("dataplane"))
        .find(|bin| bin.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "no dataplane binary beside {}: run `cargo build` first (cargo xtask test does)",
            exe.parent().map_or(Path::new("?"), |p| p).display()
        )
    })
}

/// A name no other test (in this or a parallel process) uses. Short, because namespace names
/// show up in interface names of some tools.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ_and_keep_the_prefix() {
        let (a, b) = (unique_name("dpt"), unique_name("dpt"));
        assert_ne!(a, b);
        assert!(a.starts_with("dpt") && b.starts_with("dpt"));
    }
}
