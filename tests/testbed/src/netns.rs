//! Running code of our own inside a network namespace.

/// Runs `f` on a thread inside network namespace `netns` (a name under /run/netns) and returns
/// its result. Sockets made there keep their namespace when handed back, so a test can hold a
/// connection of the outside client open while it restarts the agent.
pub fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    use std::os::fd::AsRawFd as _;

    let netns_path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let netns_file = std::fs::File::open(&netns_path).expect("namespace file");
        // SAFETY: a valid namespace fd; setns affects only this thread.
        let rc = unsafe { libc::setns(netns_file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns into {netns_path}");
        f()
    })
    .join()
    .expect("thread in namespace")
}
