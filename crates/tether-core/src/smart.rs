//! The smart heartbeat (DESIGN §5): learns, per network, the longest idle a NAT keeps a
//! TCP mapping for, so the main connection can PING as rarely as that network allows.
//! Sans-IO: the caller runs the probes (normally on a side connection), reports what
//! happened with the instant it happened, and reads decisions back as events. Nothing
//! here reads a clock or touches a socket.
//!
//! Symbols: `g` known_good (an idle the NAT survived), `b` known_bad (an idle it did
//! not), `x` the idle that actually passed in an outcome (never the scheduled one: timers
//! fire late, and a late success proves more than was asked).
//!
//! - **Run.** The main connection PINGs every `max(min, g·(1 − margin))`
//!   ([`SmartHeartbeat::run_interval`]); a new network starts from `g = start`, assumed
//!   safe. Every change of it is an [`SmartEventKind::IntervalChanged`].
//! - **Search, not crawl.** Mars walks +60 s / −80 s and needs hours; here the candidate
//!   is `min(max, g·growth)` while no failure is known, then the midpoint of `g` and `b`,
//!   so a 20-fold range takes about ten probes. Success at `x`: `g = max(g, x)`, and a
//!   `b ≤ g` is forgotten (the NAT grew, or the failure was stale). Failure at `x`:
//!   `b = min(b, x)`; if that leaves `b ≤ g`, `g` is stepped down to `b·(1 − step_down)`.
//! - **Converged** ([`Phase::Stable`]) when `b − g ≤ max(precision·g, 1 ms)` (1 ms is the
//!   resolution of the persisted state) or `g ≥ max`. `probes` counts successes and
//!   failures since the network was created or last stepped down by the main link.
//! - **Discarded outcomes teach nothing.** DESIGN counts a probe as failed only if the
//!   main link answered in the same period; loss, outages and server trouble are the
//!   caller's [`ProbeOutcome::Discarded`], and the same candidate is offered again.
//! - **The main link died** ([`SmartHeartbeat::on_main_failure`]) on its first PING after
//!   a full idle `x`: the mapping is shorter than believed, so do not wait for a second
//!   lost connection. At once `b = min(b, x)`, `g = max(min, min(g, x·(1 − step_down)))`,
//!   phase [`Phase::Verifying`]. The stepped value is unverified: the next probe tests `g`
//!   itself; success resumes bisecting, failure at `x` steps down again from
//!   `min(g, x)`. At `min` it cannot go lower: `g` stays `min` and is verified again.
//! - **Re-probe.** A NAT may grow. `reprobe_after` past convergence (or past the last
//!   failed re-probe), `b` is tested (`g·growth` if none); success resumes learning
//!   upward, failure keeps the interval and waits another `reprobe_after`.
//! - **Networks.** State is per [`NetworkKey`] (app network id + transport), kept for the
//!   `max_networks` most recently used ones; switching restores a learned interval at
//!   once. [`SmartHeartbeat::snapshot`] / [`SmartHeartbeat::restore`] let the client
//!   SDK persist it. A probe in flight when the network changes or the main link dies is
//!   cancelled: its result, if reported, is ignored.
//!
//! No arithmetic here panics, whatever the configuration: [`SmartHeartbeat::new`] clamps
//! it into sane ranges and durations saturate.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

/// Tuning of the search; [`Default`] suits real carrier NATs (1-5 minute timeouts).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SmartConfig {
    /// Initial known_good of a new network, assumed safe.
    pub start: Duration,
    /// Never run or step below this (at least 1 ms).
    pub min: Duration,
    /// Never probe above this.
    pub max: Duration,
    /// Geometric factor while no failure is known; clamped into [1.1, 100].
    pub growth: f64,
    /// Converged when `known_bad − known_good ≤ precision × known_good`; [0.0001, 0.99].
    pub precision: f64,
    /// Run interval = `known_good × (1 − margin)`, at least `min`; [0, 0.49].
    pub margin: f64,
    /// After a failure at idle `x`, the unverified known_good is `x × (1 − step_down)`;
    /// [0.01, 0.9].
    pub step_down: f64,
    /// In the stable state, probe upward again after this long.
    pub reprobe_after: Duration,
    /// How many networks are remembered (least recently used forgotten first); at least 1.
    pub max_networks: usize,
}

impl Default for SmartConfig {
    fn default() -> Self {
        Self {
            start: Duration::from_secs(45),
            min: Duration::from_secs(20),
            max: Duration::from_secs(15 * 60),
            growth: 2.0,
            precision: 0.04,
            margin: 0.04,
            step_down: 0.2,
            reprobe_after: Duration::from_secs(60 * 60),
            max_networks: 20,
        }
    }
}

impl SmartConfig {
    /// The same search on a time scale `factor` (all durations multiplied, saturating);
    /// the lab uses 0.2.
    pub fn scaled(self, factor: f64) -> Self {
        let scale = |d: Duration| {
            let secs = d.as_secs_f64() * factor;
            Duration::try_from_secs_f64(secs).unwrap_or(if secs > 0.0 {
                Duration::MAX
            } else {
                Duration::ZERO
            })
        };
        Self {
            start: scale(self.start),
            min: scale(self.min),
            max: scale(self.max),
            reprobe_after: scale(self.reprobe_after),
            ..self
        }
    }

    /// Clamps every field into its documented range (NaN takes the default).
    fn sanitized(self) -> Self {
        let d = Self::default();
        let clamp = |v: f64, lo: f64, hi: f64, default: f64| {
            if v.is_nan() { default } else { v.clamp(lo, hi) }
        };
        // Whole milliseconds, like the state, so that comparisons agree.
        let whole = |d: Duration| Duration::from_millis(to_ms(d));
        let min = whole(self.min).max(Duration::from_millis(1));
        let max = whole(self.max).max(min);
        Self {
            start: whole(self.start).clamp(min, max),
            min,
            max,
            growth: clamp(self.growth, 1.1, 100.0, d.growth),
            precision: clamp(self.precision, 0.0001, 0.99, d.precision),
            margin: clamp(self.margin, 0.0, 0.49, d.margin),
            step_down: clamp(self.step_down, 0.01, 0.9, d.step_down),
            reprobe_after: self.reprobe_after,
            max_networks: self.max_networks.max(1),
        }
    }
}

/// Which network the learned values belong to: the app's network id and the transport.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NetworkKey {
    /// App-supplied network id (Wi-Fi SSID hash, carrier + radio, ...).
    pub id: String,
    /// Transport name (`tcp`, `ws`, ...): each crosses the NAT differently.
    pub transport: String,
}

impl NetworkKey {
    /// A key from its two parts.
    pub fn new(id: impl Into<String>, transport: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            transport: transport.into(),
        }
    }
}

impl fmt::Display for NetworkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.id, self.transport)
    }
}

/// Where a network's search stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Raising geometrically, or bisecting between known_good and known_bad.
    Learning,
    /// known_good was stepped down and is not verified yet: the next probe tests it.
    Verifying,
    /// Converged; only the periodic re-probe tests upward.
    Stable,
}

/// What is remembered per network, as the client SDK persists it (milliseconds).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkState {
    /// The longest idle the NAT is known (or, while verifying, believed) to survive.
    pub known_good_ms: u64,
    /// The shortest idle the NAT is known to have dropped, if any.
    pub known_bad_ms: Option<u64>,
    /// Where the search stands.
    pub phase: Phase,
    /// Successes and failures since the network was created or last stepped down.
    pub probes: u32,
}

/// How a probe ended, as the caller observed it.
#[derive(Clone, Debug, PartialEq)]
pub enum ProbeOutcome {
    /// The PING after `idle` of silence (the time that actually passed) was answered.
    Success { idle: Duration },
    /// The PING after `idle` was never acknowledged while the main link answered.
    Failure { idle: Duration },
    /// Anything else (loss, outage, server trouble): nothing is learned.
    Discarded { reason: String },
}

/// One decision, for the app's log and the lab's plots.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event")]
pub enum SmartEventKind {
    /// A network became current; `remembered` = its state was known.
    Switched {
        interval_ms: u64,
        known_good_ms: u64,
        known_bad_ms: Option<u64>,
        phase: Phase,
        remembered: bool,
    },
    /// A probe of `candidate_ms` was handed to the caller.
    ProbeStarted { candidate_ms: u64 },
    /// The probe survived `idle_ms`.
    ProbeSucceeded { candidate_ms: u64, idle_ms: u64 },
    /// The NAT forgot the probe's mapping within `idle_ms`.
    ProbeFailed { candidate_ms: u64, idle_ms: u64 },
    /// The probe taught nothing; its candidate will be offered again.
    ProbeDiscarded { candidate_ms: u64, reason: String },
    /// The run interval changed.
    IntervalChanged {
        interval_ms: u64,
        known_good_ms: u64,
        known_bad_ms: Option<u64>,
    },
    /// The search converged after `probes` probes.
    Converged {
        interval_ms: u64,
        known_good_ms: u64,
        known_bad_ms: Option<u64>,
        probes: u32,
    },
    /// The main link died after `failed_idle_ms`; now running at `interval_ms`.
    SteppedDown {
        failed_idle_ms: u64,
        interval_ms: u64,
    },
    /// A stable network is tested upward again.
    Reprobe { candidate_ms: u64 },
}

/// A decision and the network it concerns.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SmartEvent {
    /// The network the decision concerns.
    pub network: NetworkKey,
    /// The decision.
    #[serde(flatten)]
    pub kind: SmartEventKind,
}

/// A network's state plus what is only kept in memory.
#[derive(Clone, Debug)]
struct Remembered {
    key: NetworkKey,
    state: NetworkState,
    /// When it converged or a re-probe last failed; a re-probe is due `reprobe_after` later.
    converged_at: Option<Instant>,
    /// Discarded outcomes, counted apart from `probes` and reset with them.
    discards: u32,
}

impl Remembered {
    fn new(key: NetworkKey, state: NetworkState) -> Self {
        Self {
            key,
            state,
            converged_at: None,
            discards: 0,
        }
    }
}

/// The per-network interval search; see the module doc for the rules.
#[derive(Clone, Debug)]
pub struct SmartHeartbeat {
    config: SmartConfig,
    /// Least recently used first; the last one is current when `has_current`.
    networks: Vec<Remembered>,
    has_current: bool,
    /// The candidate being probed, in milliseconds.
    probe: Option<u64>,
    /// When the current network's state last changed (switch, outcome, main failure).
    changed_at: Option<Instant>,
    events: VecDeque<SmartEvent>,
}

/// Whole milliseconds, saturating.
fn to_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `ms × factor`, saturating (`as` clamps, and maps NaN to 0).
fn scale(ms: u64, factor: f64) -> u64 {
    (ms as f64 * factor) as u64
}

/// `known_bad − known_good ≤ max(precision × known_good, 1 ms)`, or known_good at max.
fn converged(config: &SmartConfig, st: &NetworkState) -> bool {
    let good = st.known_good_ms;
    let tolerance = scale(good, config.precision).max(1);
    good >= to_ms(config.max)
        || st
            .known_bad_ms
            .is_some_and(|b| b.saturating_sub(good) <= tolerance)
}

/// The next idle above known_good worth testing: the midpoint up to known_bad (a re-probe
/// tests known_bad itself), or a geometric step; at most `max`, `None` once there.
fn upward_candidate(config: &SmartConfig, st: &NetworkState) -> Option<u64> {
    let (good, max) = (st.known_good_ms, to_ms(config.max));
    let candidate = match st.known_bad_ms {
        _ if good >= max => return None,
        Some(bad) if st.phase == Phase::Stable => bad,
        Some(bad) => good + bad.saturating_sub(good) / 2,
        None => scale(good, config.growth).max(good.saturating_add(1)),
    };
    Some(candidate.min(max))
}

impl SmartHeartbeat {
    /// A search with `config` (clamped into range), no current network yet.
    pub fn new(config: SmartConfig) -> Self {
        Self {
            config: config.sanitized(),
            networks: Vec::new(),
            has_current: false,
            probe: None,
            changed_at: None,
            events: VecDeque::new(),
        }
    }

    /// The configuration in use, after clamping.
    pub fn config(&self) -> &SmartConfig {
        &self.config
    }

    /// Adds persisted networks (oldest first) as less recently used than any known one,
    /// which keeps its live state. Values are clamped into [min, max], a known_bad ≤
    /// known_good is dropped, and a Stable that is not converged learns again. Beyond
    /// `max_networks` the oldest are forgotten.
    pub fn restore(&mut self, saved: Vec<(NetworkKey, NetworkState)>) {
        let (min, max) = (to_ms(self.config.min), to_ms(self.config.max));
        let mut restored: Vec<Remembered> = Vec::new();
        for (key, mut st) in saved {
            if self.networks.iter().any(|r| r.key == key) {
                continue;
            }
            st.known_good_ms = st.known_good_ms.clamp(min, max);
            st.known_bad_ms = st.known_bad_ms.map(|b| b.clamp(min, max));
            st.known_bad_ms = st.known_bad_ms.filter(|&b| b > st.known_good_ms);
            if st.phase == Phase::Stable && !converged(&self.config, &st) {
                st.phase = Phase::Learning;
            }
            restored.retain(|r| r.key != key);
            restored.push(Remembered::new(key, st));
        }
        restored.append(&mut self.networks);
        self.networks = restored;
        self.evict();
    }

    /// Every remembered network, least recently used first (the current one last).
    pub fn snapshot(&self) -> Vec<(NetworkKey, NetworkState)> {
        let pair = |r: &Remembered| (r.key.clone(), r.state.clone());
        self.networks.iter().map(pair).collect()
    }

    /// Makes `key` current at `now`, from its remembered state or from `start`, and
    /// returns the run interval. Cancels the previous network's probe in flight. A no-op
    /// (no event) if `key` is already current.
    pub fn switch_network(&mut self, key: NetworkKey, now: Instant) -> Duration {
        if self.network() == Some(&key) {
            return self.run_interval();
        }
        let position = self.networks.iter().position(|r| r.key == key);
        let entry = match position {
            Some(i) => self.networks.remove(i),
            None => Remembered::new(
                key,
                NetworkState {
                    known_good_ms: to_ms(self.config.start),
                    known_bad_ms: None,
                    phase: Phase::Learning,
                    probes: 0,
                },
            ),
        };
        self.networks.push(entry);
        self.has_current = true;
        self.evict();
        self.probe = None;
        self.changed_at = Some(now);
        let interval_ms = to_ms(self.run_interval());
        if let Some(entry) = self.current_mut() {
            if entry.state.phase == Phase::Stable && entry.converged_at.is_none() {
                entry.converged_at = Some(now); // Restored: no clock of its own.
            }
            let st = entry.state.clone();
            self.emit(SmartEventKind::Switched {
                interval_ms,
                known_good_ms: st.known_good_ms,
                known_bad_ms: st.known_bad_ms,
                phase: st.phase,
                remembered: position.is_some(),
            });
        }
        self.settle(now);
        self.run_interval()
    }

    /// The current network, if any.
    pub fn network(&self) -> Option<&NetworkKey> {
        self.current().map(|r| &r.key)
    }

    /// The current network's state, if any.
    pub fn state(&self) -> Option<&NetworkState> {
        self.current().map(|r| &r.state)
    }

    /// Discarded outcomes of the current network since it was created or stepped down.
    pub fn discards(&self) -> u32 {
        self.current().map_or(0, |r| r.discards)
    }

    /// The main connection's PING interval, `max(min, known_good × (1 − margin))`, with
    /// `start` before any network. Every change of it is an `IntervalChanged` event
    /// (except on `switch_network`, whose `Switched` carries it).
    pub fn run_interval(&self) -> Duration {
        let good = self
            .state()
            .map_or(to_ms(self.config.start), |st| st.known_good_ms);
        let ms = scale(good, 1.0 - self.config.margin).max(to_ms(self.config.min));
        Duration::from_millis(ms)
    }

    /// The idle to probe now, or `None` (no network, a probe in flight, converged and no
    /// re-probe due). The candidate is in flight until `on_probe_result`; emits
    /// `ProbeStarted`, after `Reprobe` for a re-probe.
    pub fn next_probe(&mut self, now: Instant) -> Option<Duration> {
        if self.probe.is_some() {
            return None;
        }
        let entry = self.current()?;
        let st = &entry.state;
        let candidate = match st.phase {
            Phase::Learning => upward_candidate(&self.config, st)?,
            Phase::Verifying => st.known_good_ms,
            Phase::Stable => {
                if now < self.reprobe_due(entry)? {
                    return None;
                }
                let candidate_ms = upward_candidate(&self.config, st)?;
                self.emit(SmartEventKind::Reprobe { candidate_ms });
                candidate_ms
            }
        };
        self.probe = Some(candidate);
        self.emit(SmartEventKind::ProbeStarted {
            candidate_ms: candidate,
        });
        Some(Duration::from_millis(candidate))
    }

    /// The candidate being probed, if any.
    pub fn probe_in_flight(&self) -> Option<Duration> {
        self.probe.map(Duration::from_millis)
    }

    /// From when `next_probe` offers a candidate: the last state change while learning
    /// or verifying (already passed), `reprobe_after` past convergence when stable. `None`
    /// with no network, a probe in flight, or nothing left to test. Changes only with
    /// `switch_network`, `next_probe`, `on_probe_result` and `on_main_failure`.
    pub fn next_probe_at(&self) -> Option<Instant> {
        if self.probe.is_some() {
            return None;
        }
        let entry = self.current()?;
        let upward = upward_candidate(&self.config, &entry.state);
        match entry.state.phase {
            Phase::Verifying => self.changed_at,
            Phase::Learning => upward.and(self.changed_at),
            Phase::Stable => upward.and(self.reprobe_due(entry)),
        }
    }

    /// The probe in flight ended at `now` with `outcome`; learns from it as the module doc
    /// says. Ignored if no probe is in flight (none was offered, or it was cancelled).
    pub fn on_probe_result(&mut self, now: Instant, outcome: ProbeOutcome) {
        let Some(candidate_ms) = self.probe.take() else {
            return;
        };
        let before = self.run_interval();
        let config = self.config;
        let Some(entry) = self.current_mut() else {
            return;
        };
        let st = &mut entry.state;
        let kind = match outcome {
            ProbeOutcome::Discarded { reason } => {
                entry.discards = entry.discards.saturating_add(1);
                SmartEventKind::ProbeDiscarded {
                    candidate_ms,
                    reason,
                }
            }
            ProbeOutcome::Success { idle } => {
                let idle_ms = to_ms(idle);
                st.probes = st.probes.saturating_add(1);
                st.known_good_ms = st.known_good_ms.max(idle_ms.min(to_ms(config.max)));
                if st.known_bad_ms.is_some_and(|b| b <= st.known_good_ms) {
                    st.known_bad_ms = None;
                }
                // Verified, or a re-probe found more room: search upward (settle may stop).
                st.phase = Phase::Learning;
                SmartEventKind::ProbeSucceeded {
                    candidate_ms,
                    idle_ms,
                }
            }
            ProbeOutcome::Failure { idle } => {
                let idle_ms = to_ms(idle);
                st.probes = st.probes.saturating_add(1);
                let bad = st.known_bad_ms.map_or(idle_ms, |b| b.min(idle_ms));
                st.known_bad_ms = Some(bad);
                let step = |from: u64| scale(from, 1.0 - config.step_down).max(to_ms(config.min));
                if st.phase == Phase::Verifying {
                    st.known_good_ms = step(st.known_good_ms.min(idle_ms));
                } else if st.known_good_ms >= bad {
                    st.known_good_ms = step(bad);
                    st.phase = Phase::Verifying;
                } else if st.phase == Phase::Stable {
                    entry.converged_at = Some(now);
                }
                SmartEventKind::ProbeFailed {
                    candidate_ms,
                    idle_ms,
                }
            }
        };
        self.changed_at = Some(now);
        self.emit(kind);
        self.interval_changed(before);
        self.settle(now);
    }

    /// The main link died at `now` on its first PING after a full idle of `idle`: steps
    /// down at once, cancels any probe, and verifies the new value with the next probe.
    pub fn on_main_failure(&mut self, now: Instant, idle: Duration) {
        let before = self.run_interval();
        let (config, failed_idle_ms) = (self.config, to_ms(idle));
        let Some(entry) = self.current_mut() else {
            return;
        };
        let st = &mut entry.state;
        st.known_bad_ms = Some(
            st.known_bad_ms
                .map_or(failed_idle_ms, |b| b.min(failed_idle_ms)),
        );
        let stepped = scale(failed_idle_ms, 1.0 - config.step_down);
        st.known_good_ms = st.known_good_ms.min(stepped).max(to_ms(config.min));
        st.phase = Phase::Verifying;
        st.probes = 0;
        entry.discards = 0;
        entry.converged_at = None;
        self.probe = None;
        self.changed_at = Some(now);
        let interval_ms = to_ms(self.run_interval());
        self.emit(SmartEventKind::SteppedDown {
            failed_idle_ms,
            interval_ms,
        });
        self.interval_changed(before);
    }

    /// The next decision, oldest first.
    pub fn poll_event(&mut self) -> Option<SmartEvent> {
        self.events.pop_front()
    }

    fn current(&self) -> Option<&Remembered> {
        self.networks.last().filter(|_| self.has_current)
    }

    fn current_mut(&mut self) -> Option<&mut Remembered> {
        self.networks.last_mut().filter(|_| self.has_current)
    }

    fn emit(&mut self, kind: SmartEventKind) {
        if let Some(network) = self.network().cloned() {
            self.events.push_back(SmartEvent { network, kind });
        }
    }

    /// Emits `IntervalChanged` if the run interval is no longer `before`.
    fn interval_changed(&mut self, before: Duration) {
        let interval = self.run_interval();
        if let Some(st) = self.state().cloned().filter(|_| interval != before) {
            self.emit(SmartEventKind::IntervalChanged {
                interval_ms: to_ms(interval),
                known_good_ms: st.known_good_ms,
                known_bad_ms: st.known_bad_ms,
            });
        }
    }

    /// Moves a converged Learning network to Stable at `now`, with its event.
    fn settle(&mut self, now: Instant) {
        let (config, interval_ms) = (self.config, to_ms(self.run_interval()));
        let learning_done =
            |e: &&mut Remembered| e.state.phase == Phase::Learning && converged(&config, &e.state);
        let Some(entry) = self.current_mut().filter(learning_done) else {
            return;
        };
        entry.state.phase = Phase::Stable;
        entry.converged_at = Some(now);
        let st = entry.state.clone();
        self.emit(SmartEventKind::Converged {
            interval_ms,
            known_good_ms: st.known_good_ms,
            known_bad_ms: st.known_bad_ms,
            probes: st.probes,
        });
    }

    fn reprobe_due(&self, entry: &Remembered) -> Option<Instant> {
        entry.converged_at?.checked_add(self.config.reprobe_after)
    }

    /// Forgets the least recently used networks beyond `max_networks`.
    fn evict(&mut self) {
        let excess = self.networks.len().saturating_sub(self.config.max_networks);
        self.networks.drain(..excess);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Start 9 s, min 4 s, max 180 s, re-probe after 12 min.
    fn lab() -> SmartHeartbeat {
        SmartHeartbeat::new(SmartConfig::default().scaled(0.2))
    }

    fn wifi() -> NetworkKey {
        NetworkKey::new("wifi-1", "tcp")
    }

    fn key(n: u32) -> NetworkKey {
        NetworkKey::new(format!("n{n}"), "tcp")
    }

    /// A NAT that forgets a mapping idle for `timeout` or longer.
    fn nat(timeout: Duration, candidate: Duration) -> ProbeOutcome {
        if candidate < timeout {
            ProbeOutcome::Success { idle: candidate }
        } else {
            ProbeOutcome::Failure { idle: candidate }
        }
    }

    /// Probes against the NAT until nothing is offered, each probe taking its candidate's
    /// time on the fake clock `t`; returns the candidates in milliseconds.
    fn drive(sh: &mut SmartHeartbeat, t: &mut Instant, timeout: Duration) -> Vec<u64> {
        let mut candidates = Vec::new();
        while let Some(c) = sh.next_probe(*t) {
            assert!(candidates.len() < 50, "no convergence: {candidates:?}");
            candidates.push(to_ms(c));
            *t += c;
            sh.on_probe_result(*t, nat(timeout, c));
        }
        candidates
    }

    /// A new network on the lab config, learned against a NAT of `timeout`.
    fn learned(timeout: Duration) -> (SmartHeartbeat, Instant, Vec<u64>) {
        let (mut sh, mut t) = (lab(), Instant::now());
        sh.switch_network(wifi(), t);
        let candidates = drive(&mut sh, &mut t, timeout);
        (sh, t, candidates)
    }

    fn assert_stable_in_90_to_100_percent(sh: &SmartHeartbeat, timeout: Duration) {
        let run = sh.run_interval();
        assert_eq!(sh.state().map(|st| st.phase), Some(Phase::Stable));
        assert!(
            run < timeout && run >= timeout.mul_f64(0.9),
            "{run:?} for {timeout:?}"
        );
    }

    fn probes(sh: &SmartHeartbeat) -> u32 {
        sh.state().map_or(0, |st| st.probes)
    }

    fn event_names(sh: &mut SmartHeartbeat) -> Vec<String> {
        let name = |e| {
            serde_json::to_value(e)
                .ok()?
                .get("event")?
                .as_str()
                .map(String::from)
        };
        std::iter::from_fn(|| sh.poll_event())
            .filter_map(name)
            .collect()
    }

    #[test]
    fn lab_config_is_the_default_scaled_by_a_fifth() {
        let c = *lab().config();
        assert_eq!(
            (c.start, c.min, c.max, c.reprobe_after),
            (s(9), s(4), s(180), s(720))
        );
        assert_eq!(lab().run_interval(), ms(8640));
    }

    #[test]
    fn search_converges_within_ten_probes_to_90_to_100_percent_of_the_nat_timeout() {
        let expected: [(u64, &[u64]); 3] = [
            (12, &[18000, 13500, 11250, 12375, 11812, 12093]),
            (25, &[18000, 36000, 27000, 22500, 24750, 25875, 25312]),
            (
                50,
                &[18000, 36000, 72000, 54000, 45000, 49500, 51750, 50625],
            ),
        ];
        for (timeout, sequence) in expected {
            let (sh, _, candidates) = learned(s(timeout));
            assert_eq!(candidates, sequence, "T = {timeout} s");
            assert_eq!(probes(&sh), sequence.len() as u32);
        }
        let (sh, ..) = learned(s(25));
        assert_eq!(sh.run_interval(), ms(23760)); // 24.75 s × 0.96.
        for timeout in (10..=170).map(s) {
            let (sh, ..) = learned(timeout);
            assert_stable_in_90_to_100_percent(&sh, timeout);
            assert!(probes(&sh) <= 10, "{timeout:?}: {:?}", sh.state());
        }
    }

    #[test]
    fn a_late_timer_records_the_idle_that_actually_passed() {
        let (mut sh, t) = (lab(), Instant::now());
        sh.switch_network(wifi(), t);
        assert_eq!(sh.next_probe(t), Some(s(18)));
        sh.on_probe_result(t + s(21), ProbeOutcome::Success { idle: s(21) });
        assert_eq!(sh.state().map(|st| st.known_good_ms), Some(21000));
        assert_eq!(sh.run_interval(), ms(20160));
        assert_eq!(sh.next_probe(t + s(21)), Some(s(42)));
    }

    #[test]
    fn a_discarded_probe_teaches_nothing_and_its_candidate_is_offered_again() {
        let (mut sh, t) = (lab(), Instant::now());
        sh.switch_network(wifi(), t);
        let before = sh.state().cloned();
        assert_eq!(sh.next_probe(t), Some(s(18)));
        let reason = "main link silent too".to_string();
        sh.on_probe_result(t + s(18), ProbeOutcome::Discarded { reason });
        assert_eq!(sh.state().cloned(), before);
        assert_eq!((sh.discards(), sh.run_interval()), (1, ms(8640)));
        assert_eq!(sh.next_probe(t + s(18)), Some(s(18)));
    }

    #[test]
    fn random_discards_in_the_sweep_still_converge_with_the_same_probe_budget() {
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut one_in_three = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33).is_multiple_of(3)
        };
        let mut total_discards = 0;
        for timeout in (10..=170).map(s) {
            let (mut sh, mut t) = (lab(), Instant::now());
            sh.switch_network(wifi(), t);
            while let Some(c) = sh.next_probe(t) {
                assert!(sh.discards() < 50);
                t += c;
                let lost = ProbeOutcome::Discarded {
                    reason: "lost".into(),
                };
                sh.on_probe_result(
                    t,
                    if one_in_three() {
                        lost
                    } else {
                        nat(timeout, c)
                    },
                );
            }
            assert_stable_in_90_to_100_percent(&sh, timeout);
            assert_eq!(probes(&sh), probes(&learned(timeout).0));
            total_discards += sh.discards();
        }
        assert!(total_discards > 200, "{total_discards}");
    }

    #[test]
    fn a_main_link_failure_steps_down_at_once_verifies_and_relearns_a_shrunk_nat() {
        let (mut sh, mut t, _) = learned(s(50));
        assert_eq!(sh.run_interval(), ms(47520));
        while sh.poll_event().is_some() {}
        // The NAT now forgets after 30 s: the main link dies on its next PING.
        t += ms(47520);
        sh.on_main_failure(t, ms(47520));
        let stepped = NetworkState {
            known_good_ms: 38016, // 47.52 s × 0.8.
            known_bad_ms: Some(47520),
            phase: Phase::Verifying,
            probes: 0,
        };
        assert_eq!(sh.state(), Some(&stepped));
        assert_eq!(event_names(&mut sh), ["SteppedDown", "IntervalChanged"]);
        assert_eq!(
            (sh.run_interval(), sh.next_probe_at()),
            (ms(36495), Some(t))
        );
        let candidates = drive(&mut sh, &mut t, s(30));
        // Two verifications fail (stepping down each time), the third holds; then bisect.
        assert_eq!(candidates, [38016, 30412, 24329, 27370, 28891, 29651]);
        assert_stable_in_90_to_100_percent(&sh, s(30));
    }

    #[test]
    fn a_main_link_failure_cancels_the_probe_in_flight() {
        let (mut sh, t) = (lab(), Instant::now());
        sh.switch_network(wifi(), t);
        assert_eq!(sh.next_probe(t), Some(s(18)));
        sh.on_main_failure(t + s(9), s(9));
        assert_eq!(sh.probe_in_flight(), None);
        sh.on_probe_result(t + s(18), ProbeOutcome::Success { idle: s(18) }); // Stale.
        assert_eq!(sh.state().map(|st| st.known_good_ms), Some(7200));
        assert_eq!(sh.next_probe(t + s(18)), Some(ms(7200)));
    }

    #[test]
    fn reprobe_tests_known_bad_after_reprobe_after_and_follows_a_grown_nat() {
        let (mut sh, converged, _) = learned(s(25));
        assert_eq!(sh.next_probe_at(), Some(converged + s(720)));
        assert_eq!(sh.next_probe(converged + s(720) - ms(1)), None);
        let mut grown = sh.clone();
        while sh.poll_event().is_some() {}

        // The NAT did not change: stays Stable, the next re-probe 12 min after this one.
        let mut t = converged + s(720);
        assert_eq!(sh.next_probe(t), Some(ms(25312)));
        assert_eq!(event_names(&mut sh), ["Reprobe", "ProbeStarted"]);
        t += ms(25312);
        sh.on_probe_result(t, nat(s(25), ms(25312)));
        assert_eq!(sh.state().map(|st| st.phase), Some(Phase::Stable));
        assert_eq!(sh.run_interval(), ms(23760));
        assert_eq!(sh.next_probe_at(), Some(t + s(720)));

        // The NAT grew to 60 s: learning resumes upward and converges on it.
        let mut t = converged + s(720);
        let candidates = drive(&mut grown, &mut t, s(60));
        assert_eq!(
            candidates,
            [25312, 50624, 101248, 75936, 63280, 56952, 60116, 58534]
        );
        assert_stable_in_90_to_100_percent(&grown, s(60));
    }

    #[test]
    fn a_remembered_network_runs_its_learned_interval_at_once_without_probing() {
        let (mut sh, t, _) = learned(s(25));
        let lte = NetworkKey::new("lte-46001", "tcp");
        assert_eq!(sh.switch_network(lte.clone(), t), ms(8640));
        assert_eq!(sh.next_probe(t), Some(s(18)));
        assert_eq!(sh.switch_network(wifi(), t), ms(23760));
        assert_eq!(sh.probe_in_flight(), None, "the lte probe was cancelled");
        sh.on_probe_result(t, ProbeOutcome::Failure { idle: s(18) }); // Stale: ignored.
        assert_eq!(sh.next_probe(t), None);
        assert_eq!(sh.switch_network(wifi(), t), ms(23760)); // Already current: no event.
        let switches: Vec<_> = std::iter::from_fn(|| sh.poll_event())
            .filter_map(|e| match e.kind {
                SmartEventKind::Switched { remembered, .. } => Some((e.network, remembered)),
                _ => None,
            })
            .collect();
        assert_eq!(switches, [(wifi(), false), (lte, false), (wifi(), true)]);
        assert_eq!(sh.state().map(|st| st.known_bad_ms), Some(Some(25312)));
    }

    #[test]
    fn the_least_recently_used_network_is_forgotten_beyond_max_networks() {
        let config = SmartConfig {
            max_networks: 3,
            ..SmartConfig::default()
        };
        let (mut sh, t) = (SmartHeartbeat::new(config), Instant::now());
        for n in [0, 1, 2, 0, 3] {
            sh.switch_network(key(n), t);
        }
        let kept: Vec<_> = sh
            .snapshot()
            .into_iter()
            .map(|(k, _)| k.to_string())
            .collect();
        assert_eq!(kept, ["n2/tcp", "n0/tcp", "n3/tcp"]);
    }

    #[test]
    fn snapshot_round_trips_through_json_and_restore_sanitizes() {
        let (mut sh, t, _) = learned(s(25));
        sh.switch_network(NetworkKey::new("lte", "ws"), t);
        sh.switch_network(wifi(), t);
        let json = serde_json::to_string(&sh.snapshot()).unwrap_or_default();
        let stored = r#""known_good_ms":24750,"known_bad_ms":25312,"phase":"Stable","probes":7"#;
        assert!(json.contains(stored), "{json}");
        let saved: Vec<(NetworkKey, NetworkState)> =
            serde_json::from_str(&json).unwrap_or_default();
        let mut fresh = lab();
        fresh.restore(saved);
        assert_eq!(fresh.snapshot(), sh.snapshot());
        assert_eq!(fresh.switch_network(wifi(), t), ms(23760));
        assert_eq!(fresh.next_probe(t), None);
        assert_eq!(fresh.next_probe_at(), Some(t + s(720)));

        let state = |good, bad, phase| NetworkState {
            known_good_ms: good,
            known_bad_ms: bad,
            phase,
            probes: 3,
        };
        let config = SmartConfig {
            max_networks: 3,
            ..SmartConfig::default().scaled(0.2)
        };
        let mut sh = SmartHeartbeat::new(config);
        sh.restore(vec![
            (key(9), state(10_000, None, Phase::Learning)), // Beyond max_networks.
            (key(0), state(0, Some(0), Phase::Learning)),
            (key(1), state(u64::MAX, None, Phase::Learning)),
            (key(2), state(30_000, Some(20_000), Phase::Stable)),
            (key(2), state(30_000, Some(31_000), Phase::Stable)), // The later one wins.
        ]);
        let restored: Vec<_> = sh.snapshot().into_iter().map(|(_, st)| st).collect();
        let sane = [
            state(4_000, None, Phase::Learning),
            state(180_000, None, Phase::Learning),
            state(30_000, Some(31_000), Phase::Stable),
        ];
        assert_eq!(restored, sane);
        // Restored at max: nothing left to learn, it converges on switching.
        sh.switch_network(key(1), t);
        assert_eq!(sh.state().map(|st| st.phase), Some(Phase::Stable));
        assert_eq!(sh.next_probe_at(), None);
    }

    #[test]
    fn every_decision_is_an_event_in_order() {
        let (mut sh, ..) = learned(s(12));
        let switched = SmartEventKind::Switched {
            interval_ms: 8640,
            known_good_ms: 9000,
            known_bad_ms: None,
            phase: Phase::Learning,
            remembered: false,
        };
        assert_eq!(sh.poll_event().map(|e| e.kind), Some(switched));
        let expected = [
            ["ProbeStarted", "ProbeFailed"].as_slice(), // 18 s
            &["ProbeStarted", "ProbeFailed"],           // 13.5 s
            &["ProbeStarted", "ProbeSucceeded", "IntervalChanged"], // 11.25 s
            &["ProbeStarted", "ProbeFailed"],           // 12.375 s
            &["ProbeStarted", "ProbeSucceeded", "IntervalChanged"], // 11.812 s
            &["ProbeStarted", "ProbeFailed", "Converged"], // 12.093 s
        ];
        assert_eq!(event_names(&mut sh), expected.concat());
        let failed = SmartEventKind::ProbeFailed {
            candidate_ms: 18000,
            idle_ms: 18010,
        };
        let event = SmartEvent {
            network: wifi(),
            kind: failed,
        };
        let json = serde_json::to_string(&event).unwrap_or_default();
        let expected = r#"{"network":{"id":"wifi-1","transport":"tcp"},"event":"ProbeFailed","candidate_ms":18000,"idle_ms":18010}"#;
        assert_eq!(json, expected);
    }

    #[test]
    fn odd_configs_and_stray_results_never_panic() {
        let t = Instant::now();
        let zero = SmartConfig {
            start: Duration::ZERO,
            min: Duration::ZERO,
            max: Duration::ZERO,
            growth: f64::NAN,
            precision: f64::NAN,
            margin: f64::INFINITY,
            step_down: -1.0,
            reprobe_after: Duration::ZERO,
            max_networks: 0,
        };
        let huge = SmartConfig {
            max: Duration::MAX,
            reprobe_after: Duration::MAX,
            growth: f64::INFINITY,
            precision: 0.0,
            ..SmartConfig::default()
        };
        let scaled = [f64::NAN, -1.0, 0.0, f64::INFINITY].map(|f| SmartConfig::default().scaled(f));
        for config in [zero, huge].into_iter().chain(scaled) {
            let mut sh = SmartHeartbeat::new(config);
            assert_eq!(sh.next_probe(t), None);
            sh.on_probe_result(
                t,
                ProbeOutcome::Success {
                    idle: Duration::MAX,
                },
            );
            sh.on_main_failure(t, Duration::MAX);
            sh.switch_network(wifi(), t);
            sh.on_probe_result(
                t,
                ProbeOutcome::Failure {
                    idle: Duration::ZERO,
                },
            );
            for idle in [Duration::ZERO, ms(1), Duration::MAX] {
                for outcome in [
                    ProbeOutcome::Failure { idle },
                    ProbeOutcome::Success { idle },
                ] {
                    if sh.next_probe(t).is_some() {
                        sh.on_probe_result(t, outcome);
                    }
                }
                sh.on_main_failure(t, idle);
                let _ = (sh.next_probe_at(), sh.snapshot());
            }
            let c = sh.config();
            assert!(sh.run_interval() >= c.min && c.min <= c.start && c.start <= c.max);
        }
    }
}
