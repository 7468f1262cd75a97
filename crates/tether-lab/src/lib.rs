//! A network lab of real Linux namespaces, used by tests and by `tether lab` to prove the
//! smart heartbeat against a NAT that silently forgets idle TCP mappings.
//!
//! Each [`Lab`] builds, under its own tag, a client with two uplinks (router 0 and
//! router 1: two networks, e.g. Wi-Fi and cellular), each a conntrack NAT with its own
//! idle timeout, in front of one server. Scenarios turn knobs while traffic runs: the
//! NAT timeout, packet loss, a blackhole, the client's active network. Labs with
//! different tags run side by side with the same addresses.
//!
//! What it owns: namespaces, veths, sysctls and nftables rules, applied with `ip`, `nft`
//! and `sysctl` (and read back with `conntrack`), plus the bookkeeping that removes them
//! again, even after a crash ([`cleanup_stale`]) or an interrupt
//! ([`install_interrupt_cleanup`]). What it must not do: touch the root namespace's
//! network configuration, or delete namespaces it cannot prove are a dead lab's.
//!
//! It needs root (CAP_NET_ADMIN) and the Debian packages iproute2, nftables, procps and
//! conntrack; [`Lab::create`] says which one is missing. [`chart`] draws the results.

pub mod chart;
mod error;
mod lab;
mod netns;
mod registry;
mod tools;
mod topology;

pub use error::LabError;
pub use lab::{Lab, LabSpec, RouterSpec};
pub use netns::require_root;
pub use registry::{PID_DIR, cleanup_stale, install_interrupt_cleanup, teardown_all};
