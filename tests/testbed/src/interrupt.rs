//! Ctrl-C as a flag. The bench installs the handlers: SIGINT/SIGTERM then only set a flag, which
//! every wait of the test bed checks ([`check`]), so `?` unwinds to the guards whose Drop stops
//! the processes and removes the sandboxes in order. Tests never install them.

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// From now on SIGINT and SIGTERM set the flag instead of ending the process.
pub fn install_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

pub fn requested() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails with [`crate::Error::Interrupted`] once a signal came.
pub fn check() -> crate::Result<()> {
    if requested() {
        return Err(crate::Error::Interrupted);
    }
    Ok(())
}
