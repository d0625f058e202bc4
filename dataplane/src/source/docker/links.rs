//! Network interfaces of a container's namespace and of the agent's, read with one rtnetlink
//! link dump each (through [`crate::kernel::netdev::links`], netlink-packet-route's messages),
//! to find the host-side end of a container's veth: the container's `eth0` has `IFLA_LINK` =
//! the host veth's ifindex, and the host veth's `IFLA_LINK` = the container interface's
//! ifindex.
//!
//! Netlink rather than sysfs: /sys shows the namespace that mounted it, not the caller's, so
//! `/sys/class/net/*/iflink` read after setns describes the wrong namespace. A netlink socket
//! belongs to the namespace of the thread that opened it, so a dump made on a thread that
//! entered the container's namespace describes that namespace.

use std::{
    io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

pub use crate::kernel::netdev::Link;

/// Links of the network namespace the file `netns` stands for (`/proc/PID/ns/net` or a bind
/// mount of it). Runs on a thread of its own that enters the namespace and then ends, so no
/// thread of the agent ever changes namespace.
pub fn links_in(netns: &Path) -> io::Result<Vec<Link>> {
    let netns: PathBuf = netns.to_owned();
    std::thread::Builder::new()
        .name("netns-links".into())
        .spawn(move || {
            let file = std::fs::File::open(&netns)?;
            // SAFETY: a namespace file descriptor we hold open; setns changes only this thread,
            // which ends right after the dump.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            links_here()
        })?
        .join()
        .map_err(|_| io::Error::other("the netns thread panicked"))?
}

/// Links of the calling thread's network namespace.
pub fn links_here() -> io::Result<Vec<Link>> {
    crate::kernel::netdev::links()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_namespace_has_lo() {
        let links = links_here().unwrap();
        let lo = links.iter().find(|l| l.name == "lo").expect("lo");
        assert_eq!(Some(lo.index), crate::kernel::netdev::ifindex("lo"));
        assert_eq!(lo.mac, Some([0; 6]));
    }

    #[test]
    fn own_namespace_through_proc() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return; // setns needs CAP_SYS_ADMIN; `sudo cargo xtask test` runs this one
        }
        let here = links_here().unwrap();
        let via_file = links_in(Path::new("/proc/self/ns/net")).unwrap();
        assert_eq!(here, via_file);
    }

    /// Two namespaces of our own with a veth pair between them (the agent's namespace is not
    /// touched): the dump made inside each sees only its own interfaces, and each end's
    /// IFLA_LINK names the other end.
    #[test]
    fn dumps_inside_other_namespaces() {
        let id = std::process::id();
        let (a, b) = (format!("dpl-links-a-{id}"), format!("dpl-links-b-{id}"));
        let ip = |args: &[&str]| {
            let status = std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap();
            assert!(status.success(), "ip {args:?}");
        };
        struct Cleanup(Vec<String>);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                for name in &self.0 {
                    let _ = std::process::Command::new("ip")
                        .args(["netns", "del", name])
                        .status();
                }
            }
        }
        let _cleanup = Cleanup(vec![a.clone(), b.clone()]);
        ip(&["netns", "add", &a]);
        ip(&["netns", "add", &b]);
        ip(&[
            "-n", &a, "link", "add", "dpl-a0", "type", "veth", "peer", "name", "dpl-b0", "netns",
            &b,
        ]);
        let in_a = links_in(&Path::new("/run/netns").join(&a)).unwrap();
        let in_b = links_in(&Path::new("/run/netns").join(&b)).unwrap();
        let names = |links: &[Link]| {
            let mut names: Vec<String> = links.iter().map(|l| l.name.clone()).collect();
            names.sort();
            names
        };
        assert_eq!(names(&in_a), ["dpl-a0", "lo"]);
        assert_eq!(names(&in_b), ["dpl-b0", "lo"]);
        let end_a = in_a.iter().find(|l| l.name == "dpl-a0").unwrap();
        let end_b = in_b.iter().find(|l| l.name == "dpl-b0").unwrap();
        assert_eq!(end_a.peer_index, Some(end_b.index));
        assert_eq!(end_b.peer_index, Some(end_a.index));
        assert!(end_a.mac.is_some_and(|m| m != [0; 6]) && end_a.mac != end_b.mac);
    }
}
