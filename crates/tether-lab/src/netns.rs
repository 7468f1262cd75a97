//! Entering a named network namespace from a thread, and probing whether this process
//! may create namespaces at all.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::thread::{self, JoinHandle};

use crate::LabError;

/// Where `ip netns` keeps its named namespaces.
const NETNS_DIR: &str = "/var/run/netns";

/// The file that names namespace `ns`.
pub(crate) fn netns_path(ns: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(ns)
}

/// Moves the calling thread (only it) into the named network namespace.
fn enter(ns: &str) -> io::Result<()> {
    let file = File::open(netns_path(ns))?;
    // SAFETY: `file` is an open namespace file for the duration of the call; setns only
    // changes the calling thread's network namespace.
    let result = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Runs `f` on a new thread inside namespace `ns`. Panics (in the caller for a spawn
/// failure, in the thread for a setns failure) with a message naming the namespace.
pub(crate) fn spawn_thread_in<F, R>(ns: &str, name: &str, f: F) -> JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let ns = ns.to_owned();
    thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            if let Err(e) = enter(&ns) {
                panic!(
                    "cannot enter network namespace {ns} ({}): {e}",
                    netns_path(&ns).display()
                );
            }
            f()
        })
        .unwrap_or_else(|e| panic!("cannot spawn thread {name} for namespace: {e}"))
}

/// Checks that this process may create network namespaces, by creating a throwaway one
/// on a short-lived thread (the namespace dies with the thread).
pub fn require_root() -> Result<(), LabError> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let probe = thread::Builder::new()
        .name("tether-lab-probe".to_owned())
        .spawn(|| {
            // SAFETY: unshare(CLONE_NEWNET) only affects the calling thread, which ends
            // right after.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        })
        .map_err(|source| LabError::NotPermitted { euid, source })?;
    let result = probe
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the probe thread panicked")));
    result.map_err(|source| LabError::NotPermitted { euid, source })
}
