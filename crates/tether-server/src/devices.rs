//! The device cap (DESIGN §6: devices per user are capped).
//!
//! A user's devices are those with a live server cursor (of the store's epoch, seen
//! within the device expiry) plus those connected right now, whose cursor may not be
//! written yet. A login only has to fit when its device is new: neither connected nor
//! known by a live cursor. Then, at [`ServerConfig::max_devices`], the least recently
//! seen device that is not connected is evicted (its cursor is removed, so it no longer
//! holds messages back; should it come back, it resumes from its own resume point like
//! any device, or by the start policy). If every device is connected, nothing can make
//! room and the login is refused with the fatal `DEVICE_LIMIT`.
//!
//! [`ServerConfig::max_devices`]: crate::ServerConfig::max_devices

use crate::Shared;
use crate::connection::Close;
use crate::registry::Session;
use tether_proto::pb::ErrorCode;
use tether_store::DeviceCursor;
use tracing::info;

/// Makes room for `session`'s device, new to its user, evicting offline devices as
/// needed; refuses it with `DEVICE_LIMIT` if connected devices fill the cap. `epoch` is
/// the store's, `live_since_ms` the device expiry's cut (ms since the Unix epoch).
pub(crate) fn make_room(
    shared: &Shared,
    session: &Session,
    epoch: u64,
    live_since_ms: u64,
) -> Result<(), Close> {
    let user = &*session.user;
    let max = shared.config.max_devices.max(1) as usize;
    // The session itself is registered already (so that two new devices logging in at
    // once see each other); it is the one asking for room, so it does not count.
    let connected: Vec<Box<str>> = shared
        .registry
        .connected_devices(user)
        .into_iter()
        .filter(|d| *d != session.device)
        .collect();
    let mut offline: Vec<(String, DeviceCursor)> = shared
        .store
        .devices(user)?
        .into_iter()
        .filter(|(device, cursor)| {
            cursor.is_live(epoch, live_since_ms)
                && **device != *session.device
                && !connected.iter().any(|c| **c == **device)
        })
        .collect();
    let devices = connected.len() + offline.len();
    let excess = (devices + 1).saturating_sub(max);
    if excess == 0 {
        return Ok(());
    }
    if offline.len() < excess {
        return Err(Close::fatal(
            ErrorCode::DeviceLimit,
            format!(
                "device limit reached: at most {max} devices per user, and the {} other \
                 connected devices of this user cannot be evicted; log one out and retry",
                connected.len()
            ),
        ));
    }
    offline.sort_by(|(a, ca), (b, cb)| (ca.last_seen_ms, a).cmp(&(cb.last_seen_ms, b)));
    for (device, cursor) in offline.into_iter().take(excess) {
        // A cursor move still queued for it must not bring it back.
        shared.commit.forget_cursor(&session.user, &device);
        shared.store.remove_device(user, &device)?;
        shared.metrics.devices_evicted.inc();
        info!(
            user,
            evicted = device,
            last_seen_ms = cursor.last_seen_ms,
            new_device = &*session.device,
            max_devices = max,
            "device cap reached: evicted the least recently seen offline device"
        );
    }
    Ok(())
}
