//! The client heartbeat, minimal and sans-IO (time is passed in), so it can later be
//! replaced by tether-core's full state machine (smart intervals, TCP_INFO diagnosis).
//!
//! Rules (DESIGN §4, idle mode, `I` interval, `P` pong timeout, `m` = 2 misses):
//! - a PING is due at `last_tx + I`: any frame the client sends restarts the clock;
//!   received frames never delay it;
//! - but a PING also goes out once nothing was received for `I`, so the link is always
//!   probed before it is declared dead;
//! - while a PING is unanswered, re-PING every `P`;
//! - the link is dead at `last_rx + I + m·P`; any received frame resets the misses.

use std::time::{Duration, Instant};

/// Unanswered pong timeouts after the interval before the link is declared dead.
pub const MAX_MISSES: u32 = 2;

/// Default time to wait for a PONG.
pub const DEFAULT_PONG_TIMEOUT: Duration = Duration::from_secs(10);

/// What the heartbeat wants when its timeout fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatAction {
    /// Nothing yet.
    Idle,
    /// Send a PING now.
    Ping,
    /// Nothing received for too long: the link is dead.
    Dead,
}

/// Idle-mode heartbeat of one connection.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    interval: Duration,
    pong_timeout: Duration,
    last_tx: Instant,
    last_rx: Instant,
    /// When the last PING left, if nothing was received since.
    unanswered_ping: Option<Instant>,
}

impl Heartbeat {
    /// A heartbeat for a connection that just exchanged frames at `now`.
    pub fn new(now: Instant, interval: Duration, pong_timeout: Duration) -> Self {
        Self {
            interval,
            pong_timeout,
            last_tx: now,
            last_rx: now,
            unanswered_ping: None,
        }
    }

    /// The interval in force.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// A frame (any kind) was sent at `now`.
    pub fn on_sent(&mut self, now: Instant) {
        self.last_tx = now;
    }

    /// A frame (any kind) was received at `now`.
    pub fn on_received(&mut self, now: Instant) {
        self.last_rx = now;
        self.unanswered_ping = None;
    }

    /// When the link is declared dead if nothing arrives.
    pub fn dead_at(&self) -> Instant {
        self.last_rx + self.interval + self.pong_timeout * MAX_MISSES
    }

    /// When the next PING is due.
    pub fn ping_at(&self) -> Instant {
        match self.unanswered_ping {
            Some(sent) => sent + self.pong_timeout,
            None => (self.last_tx + self.interval).min(self.last_rx + self.interval),
        }
    }

    /// The next instant [`Heartbeat::handle_timeout`] has something to do.
    /// Changes after `on_sent`, `on_received` and `handle_timeout`.
    pub fn poll_timeout(&self) -> Instant {
        self.ping_at().min(self.dead_at())
    }

    /// Decides at `now`. After [`HeartbeatAction::Ping`] the caller sends a PING (and
    /// reports it with `on_sent`).
    pub fn handle_timeout(&mut self, now: Instant) -> HeartbeatAction {
        if now >= self.dead_at() {
            return HeartbeatAction::Dead;
        }
        if now >= self.ping_at() {
            self.unanswered_ping = Some(now);
            return HeartbeatAction::Ping;
        }
        HeartbeatAction::Idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: Duration = Duration::from_secs(30);
    const P: Duration = Duration::from_secs(10);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn ping_is_due_one_interval_after_the_last_sent_frame() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t0, I, P);
        assert_eq!(hb.handle_timeout(t0 + I - ms(1)), HeartbeatAction::Idle);
        assert_eq!(hb.poll_timeout(), t0 + I);
        assert_eq!(hb.handle_timeout(t0 + I), HeartbeatAction::Ping);
    }

    #[test]
    fn any_sent_frame_restarts_the_ping_clock_but_received_frames_do_not_delay_it() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t0, I, P);
        hb.on_sent(t0 + ms(10_000));
        hb.on_received(t0 + ms(5_000));
        assert_eq!(hb.ping_at(), t0 + ms(35_000));
        hb.on_received(t0 + ms(20_000));
        assert_eq!(hb.ping_at(), t0 + ms(40_000));
    }

    #[test]
    fn a_stale_receive_side_triggers_a_ping_before_the_link_is_declared_dead() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t0, I, P);
        // The client keeps sending (e.g. ACKs) but hears nothing.
        hb.on_sent(t0 + ms(29_000));
        assert_eq!(hb.handle_timeout(t0 + I), HeartbeatAction::Ping);
    }

    #[test]
    fn unanswered_ping_is_repeated_every_pong_timeout_then_the_link_is_dead() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t0, I, P);
        assert_eq!(hb.handle_timeout(t0 + I), HeartbeatAction::Ping);
        hb.on_sent(t0 + I);
        assert_eq!(hb.poll_timeout(), t0 + I + P);
        assert_eq!(hb.handle_timeout(t0 + I + P), HeartbeatAction::Ping);
        hb.on_sent(t0 + I + P);
        assert_eq!(hb.poll_timeout(), t0 + I + P * 2);
        assert_eq!(
            hb.handle_timeout(t0 + I + P * 2 - ms(1)),
            HeartbeatAction::Idle
        );
        assert_eq!(hb.handle_timeout(t0 + I + P * 2), HeartbeatAction::Dead);
    }

    #[test]
    fn any_received_frame_resets_the_misses() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t0, I, P);
        assert_eq!(hb.handle_timeout(t0 + I), HeartbeatAction::Ping);
        hb.on_sent(t0 + I);
        hb.on_received(t0 + I + ms(50));
        assert_eq!(hb.dead_at(), t0 + I + ms(50) + I + P * 2);
        assert_eq!(hb.ping_at(), t0 + I + I);
    }
}
