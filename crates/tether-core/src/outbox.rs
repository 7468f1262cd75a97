//! The send side of QoS, without I/O: which unconfirmed send leaves next, when one is
//! sent again, and when the SDK stops trying and tells the app *unconfirmed*
//! (DESIGN §6, "Uplink").
//!
//! Every send keeps its client message id across every retry, so the server's dedup
//! makes retries safe, but only while the server still remembers the id: its dedup
//! window, announced in WELCOME. The rules:
//!
//! - **Order.** Sends leave in the order they were queued. After every reconnect all
//!   unconfirmed sends go again, oldest first, before anything newer.
//! - **Durable first.** A send may leave only once the caller persisted it (the state
//!   file), so a crash after it left cannot forget it.
//! - **Retransmit while connected.** A send unanswered for `ack_timeout` on a live
//!   connection goes again on that connection; after `max_tries` such timeouts it is
//!   *unconfirmed*. A connection that ends while a send waits does not count as a try:
//!   the reconnect resends it anyway.
//! - **Offline window.** While there is no session a send stays queued; every
//!   `check_every` the outbox looks for sends waiting longer than `offline_window`
//!   (counted from the later of the disconnect and the queueing) and gives them up as
//!   *unconfirmed*.
//! - **Dedup window.** A send queued longer ago than the server's dedup window (less a
//!   margin) is never sent again: the server may have forgotten its id and would commit
//!   it twice. It is given up as *unconfirmed* instead. The age counts from queueing,
//!   which is no later than any transmission, so the rule is conservative.
//! - **Bounded.** At most `capacity` sends are queued; [`Outbox::push`] refuses more
//!   and hands the send back (the SDK makes `send` wait for room).
//!
//! *Unconfirmed* means "maybe committed, maybe not": the server delivers it at most once.
//! An app that wants to try again re-queues it with the same client message id, which is
//! safe within the dedup window.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Client message id: 16 bytes, unique per sender device.
pub type MsgId = [u8; 16];

/// Outbox timing and bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxConfig {
    /// How long a send may stay unanswered on a live connection before it goes again.
    pub ack_timeout: Duration,
    /// Unanswered timeouts on live connections before a send is unconfirmed.
    pub max_tries: u32,
    /// How long a send may wait without a session before it is unconfirmed.
    pub offline_window: Duration,
    /// How often the offline window is checked while there is no session.
    pub check_every: Duration,
    /// Most sends queued.
    pub capacity: usize,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            ack_timeout: Duration::from_secs(15),
            max_tries: 3,
            offline_window: Duration::from_secs(120),
            check_every: Duration::from_secs(2),
            capacity: 10_000,
        }
    }
}

/// Why a send was given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// `max_tries` transmissions on live connections went unanswered.
    NoAck {
        /// Transmissions that timed out.
        tries: u32,
    },
    /// No session for longer than the offline window.
    Offline {
        /// How long it waited without a session.
        waited: Duration,
    },
    /// Queued longer ago than the server's dedup window allows resending.
    DedupWindow {
        /// Age of the send.
        age: Duration,
        /// The window the server announced.
        window: Duration,
    },
}

/// A send the outbox gave up on: the app learns it is *unconfirmed*.
#[derive(Debug)]
pub struct Unconfirmed<T> {
    /// Its client message id.
    pub id: MsgId,
    /// What was queued.
    pub value: T,
    /// Why.
    pub reason: GiveUp,
}

#[derive(Debug)]
struct Item<T> {
    id: MsgId,
    value: T,
    queued_at: Instant,
    /// Age when restored from persistent state (zero for sends queued by this process).
    prior_age: Duration,
    /// Last transmission on the current connection, while unanswered.
    sent_at: Option<Instant>,
    /// Its ack timeout passed on a live connection: send it again.
    due: bool,
    /// Transmissions that went unanswered for `ack_timeout` on a live connection.
    timeouts: u32,
}

#[derive(Debug, Clone, Copy)]
enum Link {
    Up {
        /// Zero: not announced, no limit.
        dedup_window: Duration,
    },
    Down {
        since: Instant,
        next_check: Instant,
    },
}

/// Unconfirmed sends in their original order, with their timers.
///
/// The queue is three prefixes (sends leave in order, and become durable in order):
///
/// ```text
/// [ sent on this connection | durable, waiting | not yet persisted ]
///   0 .. sent                 sent .. durable    durable .. len
/// ```
#[derive(Debug)]
pub struct Outbox<T> {
    config: OutboxConfig,
    items: VecDeque<Item<T>>,
    sent: usize,
    durable: usize,
    link: Link,
    given_up: VecDeque<Unconfirmed<T>>,
}

impl<T> Outbox<T> {
    /// An empty outbox without a session since `now`.
    pub fn new(config: OutboxConfig, now: Instant) -> Self {
        Self {
            config,
            items: VecDeque::new(),
            sent: 0,
            durable: 0,
            link: Link::Down {
                since: now,
                next_check: now + config.check_every,
            },
            given_up: VecDeque::new(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &OutboxConfig {
        &self.config
    }

    /// Adds sends restored from persistent state at `now`, oldest first, each with its
    /// age (how long ago it was first queued, possibly by an earlier process); they are
    /// already durable.
    pub fn restore(&mut self, sends: impl IntoIterator<Item = (MsgId, T, Duration)>, now: Instant) {
        for (id, value, age) in sends {
            let mut item = Item::new(id, value, now);
            item.prior_age = age;
            self.items.insert(self.durable, item);
            self.durable += 1;
        }
    }

    /// Number of queued sends.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// True while another send fits.
    pub fn has_room(&self) -> bool {
        self.items.len() < self.config.capacity
    }

    /// Sent on this connection and not answered yet.
    pub fn in_flight(&self) -> usize {
        self.sent
    }

    /// Whether a send with this id is queued.
    pub fn contains(&self, id: &MsgId) -> bool {
        self.items.iter().any(|i| i.id == *id)
    }

    /// True when some sends are not persisted yet.
    pub fn has_non_durable(&self) -> bool {
        self.durable < self.items.len()
    }

    /// Every queued send with its id, oldest first (to persist).
    pub fn iter(&self) -> impl Iterator<Item = (&MsgId, &T)> {
        self.items.iter().map(|i| (&i.id, &i.value))
    }

    /// Queues a new send (not durable yet). When the outbox is full the send is
    /// handed back.
    pub fn push(&mut self, id: MsgId, value: T, now: Instant) -> Result<(), T> {
        if !self.has_room() {
            return Err(value);
        }
        self.items.push_back(Item::new(id, value, now));
        Ok(())
    }

    /// Every queued send is persisted: all may leave.
    pub fn mark_all_durable(&mut self) {
        self.durable = self.items.len();
    }

    /// Persisting failed: removes the sends never persisted (they must not leave).
    pub fn take_non_durable(&mut self) -> Vec<(MsgId, T)> {
        self.items
            .drain(self.durable..)
            .map(|i| (i.id, i.value))
            .collect()
    }

    /// A session is up; `dedup_window` is what its WELCOME announced (zero: none
    /// announced, no limit). Every queued send goes again from the oldest.
    pub fn connected(&mut self, dedup_window: Duration) {
        self.link = Link::Up { dedup_window };
        self.restart_all();
    }

    /// The session ended at `now` (or a connection attempt failed).
    pub fn disconnected(&mut self, now: Instant) {
        if matches!(self.link, Link::Up { .. }) {
            self.link = Link::Down {
                since: now,
                next_check: now + self.config.check_every,
            };
        }
        self.restart_all();
    }

    fn restart_all(&mut self) {
        self.sent = 0;
        for item in &mut self.items {
            item.sent_at = None;
            item.due = false;
        }
    }

    /// The next send to transmit now, if any: first a send whose ack timeout passed,
    /// then the oldest not yet sent on this connection, provided it is durable and
    /// fewer than `max_in_flight` are unanswered. Sends past the dedup window are given
    /// up on the way (see [`Outbox::pop_unconfirmed`]).
    pub fn next_to_send(&mut self, now: Instant, max_in_flight: usize) -> Option<(&MsgId, &T)> {
        let Link::Up { dedup_window } = self.link else {
            return None;
        };
        let index = loop {
            let candidate = match self.items.iter().take(self.sent).position(|i| i.due) {
                Some(due) => due,
                None if self.sent < self.durable && self.sent < max_in_flight => {
                    self.sent += 1;
                    self.sent - 1
                }
                None => return None,
            };
            let age = self.items[candidate].age(now);
            if past_dedup_window(age, dedup_window) {
                self.give_up(
                    candidate,
                    GiveUp::DedupWindow {
                        age,
                        window: dedup_window,
                    },
                );
                continue;
            }
            break candidate;
        };
        let item = &mut self.items[index];
        item.due = false;
        item.sent_at = Some(now);
        Some((&item.id, &item.value))
    }

    /// The server answered this send (SEND_ACK, or a rejection): removes it.
    pub fn remove(&mut self, id: &MsgId) -> Option<T> {
        let index = self.items.iter().position(|i| i.id == *id)?;
        Some(self.take(index).value)
    }

    /// Runs the timers due at `now`: ack timeouts while connected, the offline window
    /// while not.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.link {
            Link::Up { .. } => {
                let mut index = 0;
                while index < self.sent {
                    let item = &mut self.items[index];
                    let expired = item
                        .sent_at
                        .is_some_and(|at| at + self.config.ack_timeout <= now);
                    if !expired {
                        index += 1;
                        continue;
                    }
                    item.sent_at = None;
                    item.timeouts += 1;
                    if item.timeouts >= self.config.max_tries {
                        let tries = item.timeouts;
                        self.give_up(index, GiveUp::NoAck { tries });
                    } else {
                        item.due = true;
                        index += 1;
                    }
                }
            }
            Link::Down { since, next_check } => {
                if now < next_check {
                    return;
                }
                self.link = Link::Down {
                    since,
                    next_check: now + self.config.check_every,
                };
                let mut index = 0;
                while index < self.items.len() {
                    let waited =
                        now.saturating_duration_since(self.items[index].queued_at.max(since));
                    if waited >= self.config.offline_window {
                        self.give_up(index, GiveUp::Offline { waited });
                    } else {
                        index += 1;
                    }
                }
            }
        }
    }

    /// When [`Outbox::handle_timeout`] next has work, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.items.is_empty() {
            return None;
        }
        match self.link {
            Link::Up { .. } => self
                .items
                .iter()
                .take(self.sent)
                .filter_map(|i| i.sent_at)
                .min()
                .map(|at| at + self.config.ack_timeout),
            Link::Down { next_check, .. } => Some(next_check),
        }
    }

    /// The next send given up, oldest decision first.
    pub fn pop_unconfirmed(&mut self) -> Option<Unconfirmed<T>> {
        self.given_up.pop_front()
    }

    /// Empties the outbox (the client stops), returning every queued send.
    pub fn drain(&mut self) -> Vec<(MsgId, T)> {
        self.sent = 0;
        self.durable = 0;
        self.items.drain(..).map(|i| (i.id, i.value)).collect()
    }

    fn give_up(&mut self, index: usize, reason: GiveUp) {
        let item = self.take(index);
        self.given_up.push_back(Unconfirmed {
            id: item.id,
            value: item.value,
            reason,
        });
    }

    fn take(&mut self, index: usize) -> Item<T> {
        if index < self.sent {
            self.sent -= 1;
        }
        if index < self.durable {
            self.durable -= 1;
        }
        self.items.remove(index).expect("index in range")
    }
}

impl<T> Item<T> {
    fn new(id: MsgId, value: T, queued_at: Instant) -> Self {
        Self {
            id,
            value,
            queued_at,
            prior_age: Duration::ZERO,
            sent_at: None,
            due: false,
            timeouts: 0,
        }
    }

    /// How long ago it was first queued.
    fn age(&self, now: Instant) -> Duration {
        self.prior_age + now.saturating_duration_since(self.queued_at)
    }
}

/// The margin kept below the server's dedup window: a tenth, at most an hour.
pub fn dedup_margin(window: Duration) -> Duration {
    (window / 10).min(Duration::from_secs(3600))
}

/// True when a send of this age may no longer be resent under `window` (zero: no limit).
pub fn past_dedup_window(age: Duration, window: Duration) -> bool {
    !window.is_zero() && age >= window - dedup_margin(window)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn id(n: u8) -> MsgId {
        [n; 16]
    }

    fn outbox(t0: Instant) -> Outbox<u8> {
        Outbox::new(OutboxConfig::default(), t0)
    }

    fn queue(o: &mut Outbox<u8>, ns: &[u8], at: Instant) {
        for &n in ns {
            o.push(id(n), n, at).unwrap();
        }
        o.mark_all_durable();
    }

    fn sendable(o: &mut Outbox<u8>, now: Instant, cap: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some((_, v)) = o.next_to_send(now, cap) {
            out.push(*v);
        }
        out
    }

    fn given_up(o: &mut Outbox<u8>) -> Vec<(u8, GiveUp)> {
        std::iter::from_fn(|| o.pop_unconfirmed())
            .map(|u| (u.value, u.reason))
            .collect()
    }

    /// Runs every timer up to `until`, as a driver that sleeps to `poll_timeout` would.
    fn run_until(o: &mut Outbox<u8>, until: Instant) {
        while let Some(at) = o.poll_timeout().filter(|at| *at <= until) {
            o.handle_timeout(at);
        }
    }

    #[test]
    fn nothing_leaves_before_it_is_durable_or_without_a_session() {
        let t0 = Instant::now();
        let mut o = outbox(t0);
        o.push(id(1), 1, t0).unwrap();
        o.connected(Duration::ZERO);
        assert_eq!(sendable(&mut o, t0, 10), Vec::<u8>::new());
        o.mark_all_durable();
        o.disconnected(t0);
        assert_eq!(sendable(&mut o, t0, 10), Vec::<u8>::new());
        o.connected(Duration::ZERO);
        assert_eq!(sendable(&mut o, t0, 10), vec![1]);
    }

    #[test]
    fn after_each_reconnect_all_unconfirmed_go_again_in_original_order_before_new_ones() {
        let t0 = Instant::now();
        let mut o = outbox(t0);
        o.restore([(id(1), 1, Duration::ZERO), (id(2), 2, Duration::ZERO)], t0);
        queue(&mut o, &[3, 4], t0);
        o.connected(Duration::ZERO);
        assert_eq!(sendable(&mut o, t0, 10), vec![1, 2, 3, 4]);
        assert_eq!(o.remove(&id(2)), Some(2));
        queue(&mut o, &[5], t0);
        o.disconnected(t0 + S);
        o.connected(Duration::ZERO);
        assert_eq!(sendable(&mut o, t0 + S, 10), vec![1, 3, 4, 5]);
    }

    #[test]
    fn in_flight_is_capped_and_answers_reopen_it_in_order() {
        let t0 = Instant::now();
        let mut o = outbox(t0);
        queue(&mut o, &[1, 2, 3, 4, 5], t0);
        o.connected(Duration::ZERO);
        assert_eq!(sendable(&mut o, t0, 2), vec![1, 2]);
        o.remove(&id(1));
        assert_eq!(sendable(&mut o, t0, 2), vec![3]);
        o.remove(&id(3));
        o.remove(&id(2));
        assert_eq!(sendable(&mut o, t0, 2), vec![4, 5]);
    }

    #[test]
    fn unanswered_send_goes_again_after_each_ack_timeout_then_is_unconfirmed_after_max_tries() {
        let t0 = Instant::now();
        let mut o = outbox(t0);
        queue(&mut o, &[1, 2], t0);
        o.connected(Duration::ZERO);
        assert_eq!(sendable(&mut o, t0, 10), vec![1, 2]);
        // 2 is answered at once; 1 never is.
        o.remove(&id(2));
        assert_eq!(o.poll_timeout(), Some(t0 + 15 * S));
        o.handle_timeout(t0 + 15 * S - Duration::from_millis(1));
        assert_eq!(sendable(&mut o, t0 + 14 * S, 10), Vec::<u8>::new());
        o.handle_timeout(t0 + 15 * S);
        assert_eq!(sendable(&mut o, t0 + 15 * S, 10), vec![1], "second try");
        assert_eq!(o.poll_timeout(), Some(t0 + 30 * S));
        o.handle_timeout(t0 + 30 * S);
        assert_eq!(sendable(&mut o, t0 + 30 * S, 10), vec![1], "third try");
        o.handle_timeout(t0 + 45 * S - Duration::from_millis(1));
        assert!(given_up(&mut o).is_empty());
        o.handle_timeout(t0 + 45 * S);
        assert_eq!(given_up(&mut o), vec![(1, GiveUp::NoAck { tries: 3 })]);
        assert!(o.is_empty());
        assert_eq!(o.poll_timeout(), None);
    }

    #[test]
    fn a_retransmission_goes_before_new_sends_and_keeps_the_in_flight_count() {
        let t0 = Instant::now();
        let mut o = outbox(t0);
        queue(&mut o, &[1, 2, 3], t0);
        o.connected(Duration::ZERO);
        assert_eq!(sendable(&mut o, t0, 2), vec![1, 2]);
        o.remove(&id(2));
        o.handle_timeout(t0 + 15 * S);
        assert_eq!(o.in_flight(), 1);
        assert_eq!(sendable(&mut o, t0 + 15 * S, 2), vec![1, 3]);
        assert_eq!(o.in_flight(), 2);
    }

    #[test]
    fn a_connection_that_ends_does_not_count_as_a_try() {
        let t0 = Instant::now();
        let mut o = outbox(t0);
        queue(&mut o, &[1], t0);
        for round in 0..10u32 {
            let at = t0 + round * 10 * S;
            o.connected(Duration::ZERO);
            assert_eq!(sendable(&mut o, at, 10), vec![1]);
            o.handle_timeout(at + 14 * S);
            o.disconnected(at + 14 * S);
        }
        assert!(given_up(&mut o).is_empty());
        assert_eq!(o.len(), 1);
    }

    #[test]
    fn offline_sends_wait_the_offline_window_checked_every_two_seconds() {
        let t0 = Instant::now();
        let mut o = outbox(t0);
        queue(&mut o, &[1], t0);
        o.connected(Duration::ZERO);
        assert_eq!(sendable(&mut o, t0, 10), vec![1]);
        let down = t0 + 5 * S;
        o.disconnected(down);
        // Queued while offline, 30 s later: its own window starts then.
        queue(&mut o, &[2], down + 30 * S);
        run_until(&mut o, down + 120 * S - Duration::from_millis(1));
        assert!(given_up(&mut o).is_empty(), "not before the window");
        run_until(&mut o, down + 122 * S);
        let first = given_up(&mut o);
        assert_eq!(first.len(), 1);
        let (n, GiveUp::Offline { waited }) = first[0] else {
            panic!("{first:?}");
        };
        assert_eq!(n, 1);
        assert!(waited >= 120 * S && waited <= 122 * S, "{waited:?}");
        run_until(&mut o, down + 152 * S);
        let second = given_up(&mut o);
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].0, 2);
        let GiveUp::Offline { waited } = second[0].1 else {
            panic!();
        };
        assert!(waited >= 120 * S && waited <= 122 * S, "{waited:?}");
    }

    #[test]
    fn the_offline_window_restarts_with_every_session() {
        let t0 = Instant::now();
        let mut o = outbox(t0);
        queue(&mut o, &[1], t0);
        run_until(&mut o, t0 + 100 * S);
        o.connected(Duration::ZERO);
        assert_eq!(sendable(&mut o, t0 + 100 * S, 10), vec![1]);
        o.disconnected(t0 + 101 * S);
        run_until(&mut o, t0 + 220 * S);
        assert!(given_up(&mut o).is_empty());
        run_until(&mut o, t0 + 223 * S);
        assert_eq!(given_up(&mut o).len(), 1);
    }

    #[test]
    fn no_check_runs_while_connected_and_none_is_due_when_empty() {
        let t0 = Instant::now();
        let mut o = outbox(t0);
        assert_eq!(o.poll_timeout(), None);
        queue(&mut o, &[1], t0);
        assert_eq!(o.poll_timeout(), Some(t0 + 2 * S));
        o.connected(Duration::ZERO);
        assert_eq!(o.poll_timeout(), None, "nothing sent yet");
        o.handle_timeout(t0 + 1000 * S);
        assert!(given_up(&mut o).is_empty());
    }

    #[test]
    fn never_resends_past_the_dedup_window() {
        let t0 = Instant::now();
        let window = 100 * S; // margin: 10 s
        let mut o = outbox(t0);
        // Queued 10 s before this process restored it at t0 + 10 s.
        o.restore([(id(1), 1, 10 * S)], t0 + 10 * S);
        queue(&mut o, &[2], t0 + 20 * S);
        o.connected(window);
        assert_eq!(sendable(&mut o, t0 + 20 * S, 10), vec![1, 2]);
        o.disconnected(t0 + 60 * S);
        o.connected(window);
        // At 85 s, 1 is 85 s old: within 100 - 10.
        assert_eq!(sendable(&mut o, t0 + 85 * S, 10), vec![1, 2]);
        o.disconnected(t0 + 89 * S);
        o.connected(window);
        // At 90 s, 1 reached the window less the margin; 2 is 70 s old.
        assert_eq!(sendable(&mut o, t0 + 90 * S, 10), vec![2]);
        assert_eq!(
            given_up(&mut o),
            vec![(
                1,
                GiveUp::DedupWindow {
                    age: 90 * S,
                    window
                }
            )]
        );
    }

    #[test]
    fn a_retransmission_past_the_dedup_window_is_given_up_too() {
        let t0 = Instant::now();
        let window = 20 * S; // margin: 2 s
        let mut o = outbox(t0);
        queue(&mut o, &[1], t0);
        o.connected(window);
        assert_eq!(sendable(&mut o, t0 + 3 * S, 10), vec![1]);
        o.handle_timeout(t0 + 18 * S);
        assert_eq!(sendable(&mut o, t0 + 18 * S, 10), Vec::<u8>::new());
        assert!(matches!(
            given_up(&mut o)[..],
            [(1, GiveUp::DedupWindow { .. })]
        ));
    }

    #[test]
    fn an_unannounced_window_sets_no_limit() {
        assert!(!past_dedup_window(
            Duration::from_secs(1 << 40),
            Duration::ZERO
        ));
        assert!(!past_dedup_window(
            Duration::from_secs(27 * 86_400),
            Duration::from_secs(30 * 86_400)
        ));
        // 30 days: the margin is capped at an hour.
        let window = Duration::from_secs(30 * 86_400);
        assert!(!past_dedup_window(window - 3601 * S, window));
        assert!(past_dedup_window(window - 3600 * S, window));
    }

    #[test]
    fn the_bound_hands_a_send_back_and_an_answer_makes_room() {
        let t0 = Instant::now();
        let config = OutboxConfig {
            capacity: 2,
            ..OutboxConfig::default()
        };
        let mut o = Outbox::new(config, t0);
        o.push(id(1), 1, t0).unwrap();
        o.push(id(2), 2, t0).unwrap();
        assert!(!o.has_room());
        assert_eq!(o.push(id(3), 3, t0), Err(3));
        o.remove(&id(1));
        assert!(o.push(id(3), 3, t0).is_ok());
    }

    #[test]
    fn a_failed_persist_removes_only_what_was_never_persisted() {
        let t0 = Instant::now();
        let mut o = outbox(t0);
        o.restore([(id(1), 1, Duration::ZERO)], t0);
        o.push(id(2), 2, t0).unwrap();
        assert!(o.has_non_durable());
        assert_eq!(o.take_non_durable(), vec![(id(2), 2)]);
        o.connected(Duration::ZERO);
        assert_eq!(sendable(&mut o, t0, 10), vec![1]);
    }

    #[test]
    fn an_unknown_answer_changes_nothing() {
        let t0 = Instant::now();
        let mut o = outbox(t0);
        o.restore([(id(1), 1, Duration::ZERO)], t0);
        assert_eq!(o.remove(&id(9)), None);
        assert_eq!(o.len(), 1);
    }
}
