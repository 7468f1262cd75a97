//! Probe sessions (DESIGN §5): a side connection on which a client tests whether a
//! longer heartbeat interval survives its NAT, while its main connection stays at the
//! interval known to work.
//!
//! Rules:
//! - A probe session has no registry entry, no presence, is never kicked by (and never
//!   kicks) the device's main session and receives no deliveries. After WELCOME the
//!   server sends nothing on it but PONG; any other frame from the client is a protocol
//!   error.
//! - Its deadline follows the candidate interval the client asked for in HELLO
//!   (`I + m·P + grace`, clamped like any interval): the server must not be the one
//!   that ends a probe early.
//! - One per device: a newer probe of the same device ends the older one (whose
//!   client has usually lost it to the NAT already; waiting for its deadline would
//!   stall the search). Probe logins of one device are rate-limited to one per
//!   [`ProbeLimits::min_gap`]; beyond it ERROR OVERLOADED with `retry_after_ms`.

use crate::Shared;
use crate::connection::Close;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_proto::frame::{self, Frame};
use tether_proto::pb::{self, ErrorCode};
use tether_transport::Transport;
use tokio::sync::Notify;
use tracing::debug;

/// Limits on probe sessions.
#[derive(Debug, Clone, Copy)]
pub struct ProbeLimits {
    /// Least time between two probe logins of one device.
    pub min_gap: Duration,
}

impl Default for ProbeLimits {
    fn default() -> Self {
        Self {
            min_gap: Duration::from_millis(500),
        }
    }
}

/// Probe slots, one per (user, device).
#[derive(Default)]
pub struct Probes {
    slots: Mutex<HashMap<DeviceKey, Slot>>,
}

/// (user, device).
type DeviceKey = (Box<str>, Box<str>);

struct Slot {
    generation: u64,
    started: Instant,
    /// Ends the running probe when a newer one of the device arrives.
    end: Arc<Notify>,
    active: bool,
}

/// The right to run one probe session; released when dropped.
pub struct ProbeTicket {
    probes: Arc<Shared>,
    key: DeviceKey,
    generation: u64,
    end: Arc<Notify>,
    pub(crate) interval: Duration,
}

/// Slots kept for rate limiting before idle ones are pruned.
const PRUNE_ABOVE: usize = 4096;

impl Probes {
    /// Takes the device's probe slot, ending an older probe of it; refused with the
    /// time to wait if the device started one less than `min_gap` ago.
    pub(crate) fn admit(
        shared: &Arc<Shared>,
        user: &str,
        device: &str,
        interval: Duration,
    ) -> Result<ProbeTicket, Close> {
        let now = Instant::now();
        let gap = shared.config.probes.min_gap;
        let mut slots = shared.probes.slots.lock();
        if slots.len() > PRUNE_ABOVE {
            slots.retain(|_, s| s.active || now.duration_since(s.started) < gap);
        }
        let key: DeviceKey = (user.into(), device.into());
        let generation = match slots.get(&key) {
            Some(s) if now.duration_since(s.started) < gap => {
                return Err(Close::Overloaded {
                    retry_after: gap - now.duration_since(s.started),
                });
            }
            Some(s) => {
                if s.active {
                    s.end.notify_one();
                }
                s.generation + 1
            }
            None => 1,
        };
        let end = Arc::new(Notify::new());
        slots.insert(
            key.clone(),
            Slot {
                generation,
                started: now,
                end: end.clone(),
                active: true,
            },
        );
        Ok(ProbeTicket {
            probes: shared.clone(),
            key,
            generation,
            end,
            interval,
        })
    }

    /// Probe sessions running now.
    pub fn active(&self) -> usize {
        self.slots.lock().values().filter(|s| s.active).count()
    }
}

impl Drop for ProbeTicket {
    fn drop(&mut self) {
        let mut slots = self.probes.probes.slots.lock();
        if let Some(s) = slots.get_mut(&self.key)
            && s.generation == self.generation
        {
            s.active = false;
        }
    }
}

/// Runs an admitted probe session: WELCOME, then PONG for every PING until the peer
/// closes, falls silent past the deadline, sends anything else, or a newer probe of the
/// device takes over.
pub(crate) async fn run<T: Transport>(
    shared: &Arc<Shared>,
    t: &mut T,
    ticket: &ProbeTicket,
) -> Close {
    let cfg = &shared.config;
    let session_id = shared
        .session_ids
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let welcome = Frame::Welcome(pb::Welcome {
        session_id: format!("{:x}-{session_id:x}-probe", shared.boot_id),
        user_id: ticket.key.0.to_string(),
        server_time_ms: 0,
        inbox_epoch: 0,
        start_seq: 0,
        heartbeat: Some(pb::HeartbeatLimits {
            interval_ms: ticket.interval.as_millis() as u32,
            min_interval_ms: cfg.heartbeat.min_interval.as_millis() as u32,
            max_interval_ms: cfg.heartbeat.max_interval.as_millis() as u32,
            pong_timeout_ms: cfg.heartbeat.pong_timeout.as_millis() as u32,
            max_misses: cfg.heartbeat.max_misses,
        }),
        dedup_window_ms: 0,
        max_frame: tether_proto::PRE_AUTH_MAX_FRAME as u32,
        head: 0,
        probe: true,
    });
    if let Err(e) = t.send(&welcome) {
        return crate::connection::transport_close(e);
    }
    if let Err(e) = tether_transport::flush(t).await {
        return crate::connection::transport_close(e);
    }
    let deadline = cfg.heartbeat.deadline(ticket.interval);
    shared.metrics.probe_sessions.inc();
    loop {
        let received = tokio::select! {
            r = tokio::time::timeout(deadline, tether_transport::recv(t)) => r,
            () = ticket.end.notified() => {
                debug!(user = &*ticket.key.0, device = &*ticket.key.1, "probe replaced by a newer one");
                return Close::Transport("replaced by a newer probe of the device".into());
            }
        };
        let raw = match received {
            Err(_) => return Close::Transport("no PING within the probe's deadline".into()),
            Ok(Ok(Some(raw))) => raw,
            Ok(Ok(None)) => return Close::Transport("closed by peer".into()),
            Ok(Err(e)) => return crate::connection::transport_close(e),
        };
        match frame::from_raw(&raw) {
            Ok(Frame::Ping(_)) => {
                if let Err(e) = t.send(&Frame::Pong(pb::Pong::default())) {
                    return crate::connection::transport_close(e);
                }
                if let Err(e) = tether_transport::flush(t).await {
                    return crate::connection::transport_close(e);
                }
            }
            Ok(other) => {
                return Close::fatal(
                    ErrorCode::UnexpectedKind,
                    format!(
                        "{} on a probe session: only PING is allowed",
                        tether_proto::kind::name(frame::kind_of(&other))
                    ),
                );
            }
            Err(e) => {
                if let Some(close) = crate::connection::decode_close(e) {
                    return close;
                }
            }
        }
    }
}
