//! Who owns which lab. In this process: a registry of live tags, so [`teardown_all`]
//! can clean up on an interrupt. Across processes: a pid file per tag under
//! `/run/tether-lab`, written *before* any namespace exists, so a namespace of a lab
//! whose process died can always be recognised as stale and removed.
//!
//! Whoever removes a tag from the registry deletes its namespaces; a `Lab` whose tag
//! was already taken out by [`teardown_all`] therefore never deletes a newer lab that
//! reused the tag.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, Once, PoisonError};

use crate::LabError;
use crate::netns::netns_path;
use crate::tools::{Tool, run};
use crate::topology::Names;

/// Where each lab's owner pid is kept (`<tag>.pid`).
pub const PID_DIR: &str = "/run/tether-lab";

/// Generated tags are this letter and four base-36 characters.
pub(crate) const GENERATED_PREFIX: &str = "t";

/// Attempts at finding a free generated tag before giving up.
const TAG_ATTEMPTS: u32 = 1000;

static LIVE_TAGS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static TAG_COUNTER: AtomicU32 = AtomicU32::new(0);

fn live_tags() -> MutexGuard<'static, Vec<String>> {
    // The list stays consistent whatever panicked while holding it: it is only pushed
    // to and removed from.
    LIVE_TAGS.lock().unwrap_or_else(PoisonError::into_inner)
}

fn pid_file(tag: &str) -> PathBuf {
    Path::new(PID_DIR).join(format!("{tag}.pid"))
}

fn own_pid() -> u32 {
    std::process::id()
}

/// Whether a process with this pid exists.
fn is_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists; nothing is delivered.
    let result = unsafe { libc::kill(pid, 0) };
    result == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The pid recorded for a tag; `None` if there is no pid file, `Some(0)` if it is unreadable.
fn recorded_owner(tag: &str) -> Option<u32> {
    match fs::read_to_string(pid_file(tag)) {
        Ok(text) => Some(text.trim().parse().unwrap_or(0)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(_) => Some(0),
    }
}

/// What to do with namespaces that carry a tag's names but have no pid file.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Orphans {
    /// An explicitly chosen tag: they are a stale lab; delete them.
    Delete,
    /// A generated tag: they belong to someone else; pick another tag.
    Avoid,
}

/// Outcome of trying to take a tag.
pub(crate) enum Claim {
    Taken,
    Busy { pid: u32 },
}

/// Takes `tag` for this process: registers it and writes its pid file, after deleting
/// a stale lab with the same tag (owner dead). The registry lock is held throughout, so
/// threads of this process cannot claim the same tag twice.
pub(crate) fn claim(tag: &str, orphans: Orphans) -> Result<Claim, LabError> {
    let mut live = live_tags();
    if live.iter().any(|t| t == tag) {
        return Ok(Claim::Busy { pid: own_pid() });
    }
    fs::create_dir_all(PID_DIR).map_err(|source| LabError::Io {
        what: format!("creating {PID_DIR}"),
        source,
    })?;
    match recorded_owner(tag) {
        Some(pid) if pid != own_pid() && is_alive(pid) => return Ok(Claim::Busy { pid }),
        Some(pid) => {
            tracing::info!(tag, pid, "removing a stale lab");
            delete_namespaces(tag)?;
            remove_pid_file(tag);
        }
        None => {
            let names = Names::new(tag);
            if names.namespaces().iter().any(|ns| netns_path(ns).exists()) {
                match orphans {
                    Orphans::Avoid => return Ok(Claim::Busy { pid: 0 }),
                    Orphans::Delete => delete_namespaces(tag)?,
                }
            }
        }
    }
    // `create_new` makes the claim atomic between processes: of two that race for the
    // same tag, one gets `AlreadyExists` and reports the tag busy.
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(pid_file(tag))
        .and_then(|mut file| writeln!(file, "{}", own_pid()));
    match written {
        Ok(()) => {
            live.push(tag.to_owned());
            Ok(Claim::Taken)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(Claim::Busy {
            pid: recorded_owner(tag).unwrap_or(0),
        }),
        Err(source) => Err(LabError::Io {
            what: format!("writing {}", pid_file(tag).display()),
            source,
        }),
    }
}

/// Claims a generated tag (`t` + four base-36 characters, mixed from pid and counter).
pub(crate) fn claim_generated() -> Result<String, LabError> {
    cleanup_stale(GENERATED_PREFIX);
    for _ in 0..TAG_ATTEMPTS {
        let n = TAG_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = generated_tag(own_pid(), n);
        if let Claim::Taken = claim(&tag, Orphans::Avoid)? {
            return Ok(tag);
        }
    }
    Err(LabError::NoFreeTag {
        attempts: TAG_ATTEMPTS,
    })
}

fn generated_tag(pid: u32, n: u32) -> String {
    // splitmix64: nearby pids and counters land far apart.
    let mut x = (u64::from(pid) << 32 | u64::from(n)).wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut tag = GENERATED_PREFIX.to_owned();
    for _ in 0..4 {
        tag.push(char::from(DIGITS[(x % 36) as usize]));
        x /= 36;
    }
    tag
}

/// Releases `tag` if this process still owns it, deleting its namespaces and pid file.
/// Returns whether there was anything to release.
pub(crate) fn release(tag: &str) -> bool {
    let owned = {
        let mut live = live_tags();
        let before = live.len();
        live.retain(|t| t != tag);
        live.len() != before
    };
    if owned {
        destroy(tag);
    }
    owned
}

/// Deletes a lab's namespaces and pid file, logging what could not be deleted.
fn destroy(tag: &str) {
    if let Err(e) = delete_namespaces(tag) {
        tracing::warn!(tag, error = %e, "lab teardown left namespaces behind");
    }
    remove_pid_file(tag);
}

fn remove_pid_file(tag: &str) {
    if let Err(e) = fs::remove_file(pid_file(tag))
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(tag, error = %e, "could not remove the lab's pid file");
    }
}

/// Deletes whichever of the lab's namespaces exist; deleting a namespace removes the
/// veth pairs that end in it. Tries all four before reporting the first failure.
pub(crate) fn delete_namespaces(tag: &str) -> Result<(), LabError> {
    let names = Names::new(tag);
    let mut first_error = None;
    for ns in names.namespaces() {
        if !netns_path(ns).exists() {
            continue;
        }
        let result = Tool::Ip.command().and_then(|mut command| {
            command.args(["netns", "del", ns]);
            run(command, None)
        });
        if let Err(e) = result {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Tears down every lab this process created and has not torn down yet. Safe to call
/// from any thread, including the one [`install_interrupt_cleanup`] starts.
pub fn teardown_all() {
    let tags = std::mem::take(&mut *live_tags());
    for tag in tags {
        destroy(&tag);
    }
}

/// Deletes the labs with tags starting with `prefix` whose creating process is dead
/// (per their pid files). Labs of live processes, and namespaces without a pid file,
/// are left alone.
pub fn cleanup_stale(prefix: &str) {
    let Ok(entries) = fs::read_dir(PID_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(tag) = file_name
            .to_str()
            .and_then(|name| name.strip_suffix(".pid"))
        else {
            continue;
        };
        if !tag.starts_with(prefix) {
            continue;
        }
        let dead = match recorded_owner(tag) {
            Some(pid) => pid != own_pid() && !is_alive(pid),
            None => false,
        };
        if dead {
            tracing::info!(tag, "removing a stale lab");
            destroy(tag);
        }
    }
}

/// On SIGINT or SIGTERM: [`teardown_all`], then exit with status 130. Installs once per
/// process; later calls do nothing.
pub fn install_interrupt_cleanup() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
            Ok(signals) => signals,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch SIGINT/SIGTERM; an interrupt will leave the lab's namespaces behind");
                return;
            }
        };
        let spawned = std::thread::Builder::new()
            .name("tether-lab-interrupt".to_owned())
            .spawn(move || {
                if let Some(signal) = signals.forever().next() {
                    tracing::info!(signal, "interrupted: tearing down the network labs");
                    teardown_all();
                    std::process::exit(130);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the interrupt-cleanup thread");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tags_are_short_and_differ_between_counters_and_pids() {
        let a = generated_tag(1234, 0);
        assert_eq!(a.len(), 5);
        assert!(a.starts_with(GENERATED_PREFIX));
        crate::topology::validate_tag(&a).unwrap();
        assert_ne!(a, generated_tag(1234, 1));
        assert_ne!(a, generated_tag(1235, 0));
    }

    #[test]
    fn a_dead_pid_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!is_alive(pid));
        assert!(is_alive(own_pid()));
        assert!(!is_alive(0));
    }
}
