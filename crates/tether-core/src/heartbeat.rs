//! The client heartbeat (DESIGN §4): when to PING, when the link is dead, and how the
//! interval changes at run time. Sans-IO like quinn-proto: every input carries the
//! instant it happened, [`Heartbeat::poll_timeout`] says when to call
//! [`Heartbeat::handle_timeout`], and nothing here reads a clock or touches a socket.
//!
//! Symbols: `I` the interval in force, `P` the pong timeout, `m` the max misses.
//!
//! - **When a PING is due.** [`HeartbeatMode::Idle`]: at `last_tx + I`, so any frame the
//!   client sends restarts the clock. [`HeartbeatMode::Fixed`]: at `last_ping + I`,
//!   whatever else is sent. Received frames never move a PING, neither later nor earlier:
//!   the server's deadline watches what the client sends. (An earlier version also pinged
//!   once nothing had been received for `I`; DESIGN does not ask for it, so it is gone.)
//! - **Misses and death.** A PING followed by no received frame within `P` is a miss, and
//!   the PING is repeated every `P`. The link is dead at `last_rx + I + m·P` (see also
//!   *No verdict without a probe*). Any received frame resets the misses. The verdict is
//!   final: after [`HeartbeatAction::Dead`] the connection is over.
//! - **Changing `I`** ([`Heartbeat::set_interval`]). Every change becomes a request that
//!   each PING carries ([`Heartbeat::pending_next_interval`], `Ping.next_interval_ms`)
//!   until a PONG echoes the accepted value ([`Heartbeat::on_pong`]). The echoed value,
//!   which the server may have clamped, then takes over. Until the echo, the interval in
//!   force is the shorter of the old and the requested one. Shortening therefore applies
//!   at once: the next PING is due at `last_tx + I'`, at once if that has passed, and the
//!   link gets `m·P` from the change before any verdict. Lengthening keeps the old `I`
//!   and asks for a PING at once. PONGs come back in PING order, so an echo that answers
//!   a PING sent before the latest request is stale and ignored.
//! - **No verdict without a probe.** The link is declared dead only after a PING sent
//!   since the last received frame, while the process was running, stayed unanswered for
//!   `P`. In the normal run that is exactly `last_rx + I + m·P`. In two cases there is
//!   no such PING, so the heartbeat sends one at once and gives no verdict before
//!   `now + P`:
//!   1. In idle mode, frames the server does not answer (an ACK the app sent late) kept
//!      pushing the PING past the death line. Received frames still never move a PING;
//!      this only stops unanswered sends from hiding a dead receive side with no probe.
//!   2. The timer fired late. Timers fire late on phones and in hidden tabs (a hidden
//!      Chromium tab wakes about once a minute). [`Heartbeat::handle_timeout`] records
//!      how late it ran ([`Heartbeat::last_wake_lateness`]). A wake-up more than `P`
//!      past its deadline means the process was not running. What it finds overdue, an
//!      unsent PING or a PONG that may be waiting unread in the socket, then says
//!      nothing about the link. This grace is given once per silence (until a frame is
//!      received), so a timer that is always late delays the verdict by one wake-up,
//!      never forever.

use std::time::{Duration, Instant};

/// Default `m`: unanswered pong timeouts after the interval before the link is dead.
pub const MAX_MISSES: u32 = 2;

/// Default time to wait for a PONG (`P`).
pub const DEFAULT_PONG_TIMEOUT: Duration = Duration::from_secs(10);

/// Default interval (`I`) of [`HeartbeatConfig::default`].
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);

/// What the heartbeat wants when its timeout fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatAction {
    /// Nothing yet.
    Idle,
    /// Send a PING now, carrying [`Heartbeat::pending_next_interval`] if any.
    Ping,
    /// Nothing received for too long: the link is dead.
    Dead,
}

/// What restarts the PING clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeartbeatMode {
    /// A PING is due at `last_tx + I`: any frame the client sends restarts the clock.
    #[default]
    Idle,
    /// A PING every `I` (at `last_ping + I`) regardless of traffic.
    Fixed,
}

/// Settings of one connection's heartbeat; [`Default`] is idle mode, 30 s, 10 s, 2 misses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatConfig {
    /// What restarts the PING clock.
    pub mode: HeartbeatMode,
    /// `I` at start, as accepted by the server (WELCOME). Must be positive.
    pub interval: Duration,
    /// `P`: how long a PING may stay unanswered before it is repeated.
    pub pong_timeout: Duration,
    /// `m`: pong timeouts after `I` before the link is dead; 0 counts as 1.
    pub max_misses: u32,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        Self {
            mode: HeartbeatMode::Idle,
            interval: DEFAULT_INTERVAL,
            pong_timeout: DEFAULT_PONG_TIMEOUT,
            max_misses: MAX_MISSES,
        }
    }
}

/// An interval change asked of the server and not yet echoed.
#[derive(Debug, Clone, Copy)]
struct IntervalRequest {
    /// The interval asked for.
    value: Duration,
    /// How many request-carrying PINGs had left before this request: echoes to those
    /// answer older requests.
    first_ping: u64,
}

/// The heartbeat of one connection.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    mode: HeartbeatMode,
    /// `I` in force.
    interval: Duration,
    pong_timeout: Duration,
    max_misses: u32,
    last_tx: Instant,
    last_rx: Instant,
    /// When the last PING left (fixed mode's clock).
    last_ping: Instant,
    /// When the last PING left, if nothing was received since and its `P` has not run out.
    awaiting_pong: Option<Instant>,
    /// Pong timeouts that ran out since the last received frame.
    misses: u32,
    /// The interval change that PINGs carry until a PONG echoes it.
    request: Option<IntervalRequest>,
    /// A PING is wanted at this instant (a lengthening request), whatever the schedule.
    ping_asap: Option<Instant>,
    /// PINGs sent carrying a request, and echoes received for them (PONGs keep PING order).
    request_pings: u64,
    echoes: u64,
    /// The interval last changed here: no deadline is due before it.
    rescheduled_at: Instant,
    /// No death verdict before this (after a shortening or a probe-before-verdict grace).
    dead_floor: Option<Instant>,
    /// The probe-before-verdict grace was given since the last received frame.
    grace_used: bool,
    last_wake_lateness: Duration,
    /// [`HeartbeatAction::Dead`] was returned: final.
    dead: bool,
}

impl Heartbeat {
    /// An idle-mode heartbeat with `m` = [`MAX_MISSES`], for a connection that just
    /// exchanged frames at `now`.
    pub fn new(now: Instant, interval: Duration, pong_timeout: Duration) -> Self {
        Self::with_config(
            now,
            HeartbeatConfig {
                interval,
                pong_timeout,
                ..HeartbeatConfig::default()
            },
        )
    }

    /// A heartbeat with explicit settings, for a connection that just exchanged frames at
    /// `now`.
    pub fn with_config(now: Instant, config: HeartbeatConfig) -> Self {
        Self {
            mode: config.mode,
            interval: config.interval,
            pong_timeout: config.pong_timeout,
            max_misses: config.max_misses.max(1),
            last_tx: now,
            last_rx: now,
            last_ping: now,
            awaiting_pong: None,
            misses: 0,
            request: None,
            ping_asap: None,
            request_pings: 0,
            echoes: 0,
            rescheduled_at: now,
            dead_floor: None,
            grace_used: false,
            last_wake_lateness: Duration::ZERO,
            dead: false,
        }
    }

    /// The interval in force (`I`): changes on a shortening `set_interval` and on an
    /// applied `on_pong` echo.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// What restarts the PING clock.
    pub fn mode(&self) -> HeartbeatMode {
        self.mode
    }

    /// Pong timeouts that ran out since the last received frame, as of the last
    /// `handle_timeout`.
    pub fn misses(&self) -> u32 {
        self.misses
    }

    /// How late the last `handle_timeout` that had work ran: `now` minus the
    /// `poll_timeout` it was due at. Zero until then.
    pub fn last_wake_lateness(&self) -> Duration {
        self.last_wake_lateness
    }

    /// The interval the PING being sent asks for (`Ping.next_interval_ms`), while a change
    /// awaits the server's echo; `None` = unchanged. Read it when building each PING.
    pub fn pending_next_interval(&self) -> Option<Duration> {
        self.request.map(|r| r.value)
    }

    /// A frame (any kind, PINGs included) was sent at `now`.
    pub fn on_sent(&mut self, now: Instant) {
        self.last_tx = now;
    }

    /// A frame (any kind) was received at `now`: resets the misses.
    pub fn on_received(&mut self, now: Instant) {
        self.last_rx = now;
        self.awaiting_pong = None;
        self.misses = 0;
        self.dead_floor = None;
        self.grace_used = false;
    }

    /// A PONG was received at `now` (in addition to `on_received`), echoing the interval
    /// the server accepted (`Pong.interval_ms`; `None` or zero = no echo).
    pub fn on_pong(&mut self, now: Instant, echoed_interval: Option<Duration>) {
        let Some(echo) = echoed_interval.filter(|e| !e.is_zero()) else {
            return;
        };
        if self.echoes >= self.request_pings {
            return; // Nothing was asked: unsolicited.
        }
        let answers = self.echoes; // Index of the request-carrying PING this answers.
        self.echoes += 1;
        match self.request {
            Some(request) if answers >= request.first_ping => {
                self.request = None;
                self.ping_asap = None;
                self.switch_interval(now, echo);
            }
            _ => {} // Answers a PING sent before the latest request.
        }
    }

    /// Asks for a new interval at `now` (foreground/background profiles). Shortening
    /// applies at once; lengthening waits for the PONG echo. Zero is ignored.
    pub fn set_interval(&mut self, now: Instant, new_interval: Duration) {
        if new_interval.is_zero() || (self.request.is_none() && new_interval == self.interval) {
            return;
        }
        self.request = Some(IntervalRequest {
            value: new_interval,
            first_ping: self.request_pings,
        });
        if new_interval > self.interval {
            self.ping_asap = Some(now);
        } else {
            self.ping_asap = None;
            self.switch_interval(now, new_interval);
        }
    }

    /// When the link is declared dead if nothing arrives: `last_rx + I + m·P`, or later
    /// after a shortening or a probe-before-verdict grace.
    pub fn dead_at(&self) -> Instant {
        let dead = self.last_rx + self.interval + self.pong_timeout * self.max_misses;
        self.dead_floor.map_or(dead, |floor| dead.max(floor))
    }

    /// When the next PING is due.
    pub fn ping_at(&self) -> Instant {
        let regular = match self.mode {
            HeartbeatMode::Idle => self.last_tx,
            HeartbeatMode::Fixed => self.last_ping,
        } + self.interval;
        let repeat = self.awaiting_pong.map(|sent| sent + self.pong_timeout);
        [Some(regular), repeat, self.ping_asap]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(regular)
            .max(self.rescheduled_at)
    }

    /// The earliest instant at which [`Heartbeat::handle_timeout`] has work: the next PING
    /// or the death verdict. May change after `on_sent`, `on_received`, `on_pong` (an
    /// applied echo), `set_interval` and `handle_timeout`; nothing else changes it.
    pub fn poll_timeout(&self) -> Instant {
        self.ping_at().min(self.dead_at())
    }

    /// Decides at `now`. After [`HeartbeatAction::Ping`] the caller sends a PING at once,
    /// carrying [`Heartbeat::pending_next_interval`]. Before `poll_timeout` it does nothing;
    /// once it has returned [`HeartbeatAction::Dead`] it always does.
    pub fn handle_timeout(&mut self, now: Instant) -> HeartbeatAction {
        if self.dead {
            return HeartbeatAction::Dead;
        }
        let due = self.poll_timeout();
        if now < due {
            return HeartbeatAction::Idle;
        }
        self.last_wake_lateness = now - due;
        let ping_due = now >= self.ping_at();
        if let Some(sent) = self.awaiting_pong
            && now >= sent + self.pong_timeout
        {
            self.awaiting_pong = None;
            self.misses += 1;
        }
        let probed = self.awaiting_pong.is_some() || self.misses > 0;
        let late = self.last_wake_lateness > self.pong_timeout;
        if !self.grace_used && (late || (now >= self.dead_at() && !probed)) {
            // No PING had its P while we ran: probe, then judge.
            self.grace_used = true;
            self.dead_floor = Some(self.dead_at().max(now + self.pong_timeout));
            return self.ping(now);
        }
        if now >= self.dead_at() {
            self.dead = true;
            return HeartbeatAction::Dead;
        }
        if ping_due {
            return self.ping(now);
        }
        HeartbeatAction::Idle
    }

    /// Records a PING leaving at `now`.
    fn ping(&mut self, now: Instant) -> HeartbeatAction {
        self.last_tx = now;
        self.last_ping = now;
        self.awaiting_pong = Some(now);
        self.ping_asap = None;
        if self.request.is_some() {
            self.request_pings += 1;
        }
        HeartbeatAction::Ping
    }

    /// Puts `new_interval` in force at `now`. A shorter one may make the schedule overdue:
    /// the PING is then due at once and the link gets `m·P` from now before a verdict.
    fn switch_interval(&mut self, now: Instant, new_interval: Duration) {
        if new_interval < self.interval {
            let floor = now + self.pong_timeout * self.max_misses;
            self.dead_floor = Some(self.dead_floor.map_or(floor, |f| f.max(floor)));
        }
        self.interval = new_interval;
        self.rescheduled_at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: Duration = Duration::from_secs(30);
    const P: Duration = Duration::from_secs(10);

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn fixed(t0: Instant) -> Heartbeat {
        Heartbeat::with_config(
            t0,
            HeartbeatConfig {
                mode: HeartbeatMode::Fixed,
                interval: I,
                pong_timeout: P,
                max_misses: MAX_MISSES,
            },
        )
    }

    /// Pings at `at` as the driver would: `handle_timeout` says Ping, the frame leaves.
    fn ping_at(hb: &mut Heartbeat, at: Instant) {
        assert_eq!(hb.handle_timeout(at), HeartbeatAction::Ping);
        hb.on_sent(at);
    }

    #[test]
    fn new_is_idle_mode_with_the_default_misses() {
        let t0 = Instant::now();
        let hb = Heartbeat::new(t0, I, P);
        assert_eq!(hb.mode(), HeartbeatMode::Idle);
        assert_eq!(hb.interval(), I);
        assert_eq!(hb.dead_at(), t0 + I + P * MAX_MISSES);
    }

    #[test]
    fn fixed_vs_idle_a_sent_frame_moves_the_idle_ping_but_not_the_fixed_one() {
        let t0 = Instant::now();
        let mut idle = Heartbeat::new(t0, I, P);
        let mut fixed = fixed(t0);
        for hb in [&mut idle, &mut fixed] {
            hb.on_received(t0 + s(20));
            hb.on_sent(t0 + s(20));
        }
        assert_eq!(idle.poll_timeout(), t0 + s(50));
        assert_eq!(idle.handle_timeout(t0 + s(30)), HeartbeatAction::Idle);
        ping_at(&mut idle, t0 + s(50));
        assert_eq!(fixed.poll_timeout(), t0 + s(30));
        ping_at(&mut fixed, t0 + s(30));
        fixed.on_received(t0 + s(30) + ms(80));
        // Fixed: the next one is I after the last PING, traffic or not.
        fixed.on_sent(t0 + s(45));
        assert_eq!(fixed.poll_timeout(), t0 + s(60));
    }

    #[test]
    fn received_frames_never_delay_a_ping() {
        let t0 = Instant::now();
        for mut hb in [Heartbeat::new(t0, I, P), fixed(t0)] {
            hb.on_received(t0 + s(25));
            hb.on_received(t0 + s(29));
            assert_eq!(hb.ping_at(), t0 + I, "{:?}", hb.mode());
            ping_at(&mut hb, t0 + I);
        }
    }

    #[test]
    fn unanswered_sent_frames_cannot_skip_the_probe_before_the_verdict() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t0, I, P);
        // The app ACKs late and the server has nothing to say: the PING moves to 59 s,
        // past the death line at 50 s. Silence alone brings no early PING...
        hb.on_sent(t0 + s(29));
        assert_eq!(hb.handle_timeout(t0 + I), HeartbeatAction::Idle);
        assert_eq!(hb.poll_timeout(), t0 + s(50));
        // ...but the verdict waits for one probe and its P.
        ping_at(&mut hb, t0 + s(50));
        assert_eq!(hb.last_wake_lateness(), Duration::ZERO);
        assert_eq!(hb.handle_timeout(t0 + s(60) - ms(1)), HeartbeatAction::Idle);
        assert_eq!(hb.handle_timeout(t0 + s(60)), HeartbeatAction::Dead);
    }

    #[test]
    fn misses_count_and_reset_on_any_received_frame() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t0, I, P);
        ping_at(&mut hb, t0 + I);
        assert_eq!(hb.misses(), 0);
        ping_at(&mut hb, t0 + I + P);
        assert_eq!(hb.misses(), 1);
        // Any frame, not only a PONG, resets them and the death line.
        hb.on_received(t0 + I + P + ms(300));
        assert_eq!(hb.misses(), 0);
        assert_eq!(hb.dead_at(), t0 + I + P + ms(300) + I + P * 2);
        assert_eq!(hb.ping_at(), t0 + I + P + I);
    }

    #[test]
    fn dead_exactly_at_last_rx_plus_i_plus_m_p() {
        let t0 = Instant::now();
        let m = 3;
        let mut hb = Heartbeat::with_config(
            t0,
            HeartbeatConfig {
                max_misses: m,
                interval: I,
                pong_timeout: P,
                ..HeartbeatConfig::default()
            },
        );
        let last_rx = t0 + s(5);
        hb.on_received(last_rx);
        hb.on_sent(last_rx);
        let dead = last_rx + I + P * m;
        let mut t = last_rx + I;
        while t < dead {
            ping_at(&mut hb, t);
            assert_eq!(hb.handle_timeout(t + P - ms(1)), HeartbeatAction::Idle);
            t += P;
        }
        assert_eq!(hb.poll_timeout(), dead);
        assert_eq!(hb.handle_timeout(dead - ms(1)), HeartbeatAction::Idle);
        assert_eq!(hb.handle_timeout(dead), HeartbeatAction::Dead);
        assert_eq!(hb.misses(), m);
        // Final, even for a later call that looks like a late wake-up.
        hb.on_received(dead + s(1));
        assert_eq!(hb.handle_timeout(dead + s(60)), HeartbeatAction::Dead);
    }

    #[test]
    fn repings_every_p_after_a_miss() {
        let t0 = Instant::now();
        let p = s(4); // Not a divisor of I, so a re-ping cannot coincide with it.
        let mut hb = Heartbeat::with_config(
            t0,
            HeartbeatConfig {
                mode: HeartbeatMode::Fixed,
                interval: I,
                pong_timeout: p,
                max_misses: 5,
            },
        );
        ping_at(&mut hb, t0 + I);
        for k in 1..5 {
            assert_eq!(hb.poll_timeout(), t0 + I + p * k);
            assert_eq!(
                hb.handle_timeout(t0 + I + p * k - ms(1)),
                HeartbeatAction::Idle
            );
            ping_at(&mut hb, t0 + I + p * k);
        }
        assert_eq!(hb.handle_timeout(t0 + I + p * 5), HeartbeatAction::Dead);
    }

    #[test]
    fn an_answered_ping_stops_the_repings() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t0, I, P);
        ping_at(&mut hb, t0 + I);
        hb.on_received(t0 + I + ms(40));
        hb.on_pong(t0 + I + ms(40), None);
        assert_eq!(hb.handle_timeout(t0 + I + P), HeartbeatAction::Idle);
        assert_eq!(hb.poll_timeout(), t0 + I + I);
    }

    #[test]
    fn shortening_applies_at_once() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t0, I, P);
        hb.on_sent(t0 + s(5));
        hb.set_interval(t0 + s(10), s(20));
        assert_eq!(hb.interval(), s(20));
        assert_eq!(hb.poll_timeout(), t0 + s(25));
        // The server hears of it on the next PING anyway, so its deadline tightens too.
        ping_at(&mut hb, t0 + s(25));
        assert_eq!(hb.pending_next_interval(), Some(s(20)));
    }

    #[test]
    fn shortening_past_the_due_time_pings_at_once_and_gives_the_link_m_p() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t0, s(300), P);
        let now = t0 + s(200);
        hb.set_interval(now, I); // last_tx + 30 s passed long ago.
        assert_eq!(hb.poll_timeout(), now);
        ping_at(&mut hb, now);
        assert_eq!(
            hb.last_wake_lateness(),
            Duration::ZERO,
            "not a late wake-up"
        );
        assert_eq!(hb.dead_at(), now + P * 2);
        ping_at(&mut hb, now + P);
        assert_eq!(hb.handle_timeout(now + P * 2), HeartbeatAction::Dead);
    }

    #[test]
    fn lengthening_waits_for_the_pong_echo() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t0, I, P);
        let now = t0 + s(12);
        hb.set_interval(now, s(300));
        // PING{300 s} at once; the old interval stays in force.
        assert_eq!(hb.poll_timeout(), now);
        assert_eq!(hb.pending_next_interval(), Some(s(300)));
        ping_at(&mut hb, now);
        assert_eq!(hb.interval(), I);
        hb.on_received(now + ms(50));
        hb.on_pong(now + ms(50), None); // A plain PONG is no echo.
        assert_eq!(hb.interval(), I);
        assert_eq!(hb.ping_at(), now + I);
        hb.on_received(now + ms(60));
        hb.on_pong(now + ms(60), Some(s(300)));
        assert_eq!(hb.interval(), s(300));
        assert_eq!(hb.pending_next_interval(), None);
        assert_eq!(hb.ping_at(), now + s(300));
        assert_eq!(hb.dead_at(), now + ms(60) + s(300) + P * 2);
    }

    #[test]
    fn every_ping_carries_the_request_until_it_is_echoed() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t0, I, P);
        hb.set_interval(t0, s(300));
        ping_at(&mut hb, t0);
        // First PING lost: the re-ping asks again.
        ping_at(&mut hb, t0 + P);
        assert_eq!(hb.pending_next_interval(), Some(s(300)));
        hb.on_received(t0 + P + ms(30));
        hb.on_pong(t0 + P + ms(30), Some(s(300)));
        assert_eq!(hb.interval(), s(300));
    }

    #[test]
    fn clamped_echo_wins() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t0, I, P);
        hb.set_interval(t0, s(900));
        ping_at(&mut hb, t0);
        hb.on_received(t0 + ms(40));
        hb.on_pong(t0 + ms(40), Some(s(600))); // The server's maximum.
        assert_eq!(hb.interval(), s(600));
        assert_eq!(hb.pending_next_interval(), None);
        // A shortening clamped up to the server's minimum ends at the minimum too.
        hb.set_interval(t0 + s(1), s(5));
        assert_eq!(hb.interval(), s(5));
        ping_at(&mut hb, t0 + s(6));
        hb.on_received(t0 + s(6));
        hb.on_pong(t0 + s(6), Some(s(15)));
        assert_eq!(hb.interval(), s(15));
    }

    #[test]
    fn an_echo_for_a_superseded_request_is_ignored() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t0, I, P);
        hb.set_interval(t0, s(300)); // Background...
        ping_at(&mut hb, t0);
        hb.set_interval(t0 + ms(10), s(20)); // ...and foreground again before the PONG.
        hb.on_received(t0 + ms(50));
        hb.on_pong(t0 + ms(50), Some(s(300)));
        assert_eq!(hb.interval(), s(20));
        assert_eq!(hb.pending_next_interval(), Some(s(20)));
        ping_at(&mut hb, t0 + s(20));
        hb.on_received(t0 + s(20));
        hb.on_pong(t0 + s(20), Some(s(20)));
        assert_eq!(hb.pending_next_interval(), None);
        // An echo nobody asked for changes nothing.
        hb.on_pong(t0 + s(21), Some(s(300)));
        assert_eq!(hb.interval(), s(20));
    }

    #[test]
    fn a_late_wakeup_pings_before_declaring_dead() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t0, I, P);
        // Suspended from 5 s to 200 s: the PING due at 30 s never left.
        let woke = t0 + s(200);
        assert_eq!(hb.handle_timeout(woke), HeartbeatAction::Ping);
        hb.on_sent(woke);
        assert_eq!(hb.last_wake_lateness(), s(170));
        assert_eq!(hb.dead_at(), woke + P);
        assert_eq!(hb.handle_timeout(woke + P - ms(1)), HeartbeatAction::Idle);
        hb.on_received(woke + ms(90));
        assert_eq!(hb.handle_timeout(woke + P), HeartbeatAction::Idle);
    }

    #[test]
    fn a_late_wakeup_after_an_unanswered_ping_gets_a_fresh_p_too() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t0, I, P);
        ping_at(&mut hb, t0 + I);
        // Suspended right after: a PONG may be waiting unread in the socket.
        let woke = t0 + s(400);
        assert_eq!(hb.handle_timeout(woke), HeartbeatAction::Ping);
        assert_eq!(hb.last_wake_lateness(), s(400) - I - P);
        assert_eq!(hb.handle_timeout(woke + P), HeartbeatAction::Dead);
    }

    #[test]
    fn a_wakeup_late_by_at_most_p_is_judged_normally() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t0, I, P);
        ping_at(&mut hb, t0 + I);
        // The re-ping was due at 40 s; the timer fires 10 s late, at the death line.
        assert_eq!(hb.handle_timeout(t0 + I + P * 2), HeartbeatAction::Dead);
        assert_eq!(hb.last_wake_lateness(), P);
    }

    #[test]
    fn an_always_late_timer_cannot_postpone_the_verdict_forever() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t0, I, P);
        let minute = s(60);
        assert_eq!(hb.handle_timeout(t0 + minute), HeartbeatAction::Ping);
        assert_eq!(hb.handle_timeout(t0 + minute * 2), HeartbeatAction::Dead);
    }

    #[test]
    fn poll_timeout_is_the_earliest_deadline() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t0, I, P);
        assert_eq!(hb.poll_timeout(), t0 + I); // The PING, before death at 50 s.
        // Sending keeps moving the PING; death becomes the earliest deadline.
        hb.on_sent(t0 + s(29));
        assert_eq!(hb.poll_timeout(), t0 + s(50));
        assert_eq!(hb.poll_timeout(), hb.ping_at().min(hb.dead_at()));
        // After a PING its re-ping is the earliest.
        let mut hb = Heartbeat::new(t0, I, P);
        ping_at(&mut hb, t0 + I);
        assert_eq!(hb.poll_timeout(), t0 + I + P);
        // A lengthening request wants its PING now.
        hb.on_received(t0 + s(31));
        hb.set_interval(t0 + s(32), s(120));
        assert_eq!(hb.poll_timeout(), t0 + s(32));
        // Nothing to do before it: no state changes, no lateness recorded.
        assert_eq!(hb.handle_timeout(t0 + s(31)), HeartbeatAction::Idle);
        assert_eq!(hb.last_wake_lateness(), Duration::ZERO);
    }
}
