//! What can go wrong when building or steering a lab, worded for the person running it.

use std::io;
use std::time::Duration;

/// Why a lab could not be created or changed.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The process may not create network namespaces (not root, no CAP_NET_ADMIN).
    #[error(
        "the network lab needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN): creating a network namespace failed for euid {euid}: {source}"
    )]
    NotPermitted {
        /// The effective user id that was refused.
        euid: u32,
        /// What the kernel said.
        source: io::Error,
    },

    /// A command-line tool the lab drives is not installed.
    #[error(
        "`{tool}` not found in PATH, /usr/sbin or /sbin: install the Debian package `{package}` (apt-get install -y {package})"
    )]
    MissingTool {
        /// The executable's name.
        tool: &'static str,
        /// The Debian package that installs it.
        package: &'static str,
    },

    /// The tag cannot name namespaces and interfaces.
    #[error("invalid lab tag {tag:?}: {reason}")]
    InvalidTag {
        /// The tag as given.
        tag: String,
        /// Which rule it breaks.
        reason: &'static str,
    },

    /// Another live lab (in this process or another) owns the tag.
    #[error("lab tag {tag:?} is in use by the live process {pid}")]
    TagInUse {
        /// The tag asked for.
        tag: String,
        /// The owner's pid (this process's own for a lab it still holds; 0 if unknown).
        pid: u32,
    },

    /// No free generated tag was found (many live labs, or foreign namespaces with lab names).
    #[error("no free lab tag after {attempts} attempts")]
    NoFreeTag {
        /// How many tags were tried.
        attempts: u32,
    },

    /// A router index other than 0 or 1.
    #[error("router {0} does not exist: a lab has routers 0 and 1")]
    NoSuchRouter(usize),

    /// A NAT timeout that conntrack cannot express.
    #[error("NAT timeout {0:?} is not a whole number of seconds ≥ 1")]
    InvalidTimeout(Duration),

    /// A loss rate over 100 %.
    #[error("loss of {0} % is over 100 %")]
    InvalidLoss(u8),

    /// A command could not be started.
    #[error("could not run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why it could not start.
        source: io::Error,
    },

    /// A command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// How it exited.
        status: String,
        /// Its stderr, and the input it was fed, if any.
        stderr: String,
    },

    /// Reading or writing the lab's bookkeeping files failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: io::Error,
    },
}
