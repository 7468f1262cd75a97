//! Liveness deadlines for every session without a timer per session (DESIGN §10).
//!
//! A lazy timing wheel: each session is filed under the slot of the deadline it had
//! when filed. A received frame only moves the session's atomic deadline; nothing is
//! re-filed then. When the sweeper reaches a slot it looks at each session once: past
//! its deadline → signalled (and filed again one slot later, in case a frame raced in);
//! deadline moved on → filed under the new slot; session gone → dropped. So a session
//! costs one visit per deadline period (~45 s by default), not one per sweep.

use crate::registry::{SIG_DEADLINE, SIG_HEAD, Session};
use parking_lot::Mutex;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Slots in the wheel; with 250 ms slots it spans 64 s, longer deadlines are re-filed at
/// the horizon until they come within reach.
const SLOTS: u64 = 256;

/// The wheel, plus sessions whose backlog replay waits for budget.
#[derive(Debug)]
pub struct DeadlineWheel {
    slot_ms: u64,
    slots: Box<[Mutex<Vec<Weak<Session>>>]>,
    /// The last slot (absolute number) processed.
    done: Mutex<u64>,
    replay_waiters: Mutex<Vec<Weak<Session>>>,
}

impl DeadlineWheel {
    /// A wheel of `slot`-wide slots (the sweep period); `now_ms` on the server clock.
    pub fn new(slot: Duration, now_ms: u64) -> Self {
        let slot_ms = (slot.as_millis() as u64).max(1);
        Self {
            slot_ms,
            slots: (0..SLOTS).map(|_| Mutex::new(Vec::new())).collect(),
            done: Mutex::new(now_ms / slot_ms),
            replay_waiters: Mutex::new(Vec::new()),
        }
    }

    /// Files `session` under its current deadline (call once it has one).
    pub fn schedule(&self, session: &Arc<Session>) {
        // Under the lock, so `advance` cannot pass the slot while we file into it.
        let done = self.done.lock();
        self.file(Arc::downgrade(session), session.deadline(), *done);
    }

    fn file(&self, session: Weak<Session>, deadline_ms: u64, after: u64) {
        // Strictly after slot `after` (already processed), and within the horizon.
        let slot = (deadline_ms / self.slot_ms).clamp(after + 1, after + SLOTS - 1);
        self.slots[(slot % SLOTS) as usize].lock().push(session);
    }

    /// Remembers a session whose replay waits for budget; [`DeadlineWheel::advance`]
    /// wakes it.
    pub fn wake_later(&self, session: &Arc<Session>) {
        if session.mark_replay_waiting() {
            self.replay_waiters.lock().push(Arc::downgrade(session));
        }
    }

    /// Processes every slot up to `now_ms`; returns how many sessions were signalled.
    pub fn advance(&self, now_ms: u64) -> usize {
        for s in std::mem::take(&mut *self.replay_waiters.lock()) {
            if let Some(s) = s.upgrade() {
                s.clear_replay_waiting();
                s.signal(SIG_HEAD);
            }
        }
        let mut done = self.done.lock();
        let target = now_ms / self.slot_ms;
        let mut signalled = 0;
        while *done < target {
            *done += 1;
            let due = std::mem::take(&mut *self.slots[(*done % SLOTS) as usize].lock());
            for weak in due {
                let Some(session) = weak.upgrade() else {
                    continue; // closed: its connection is gone
                };
                let deadline = session.deadline();
                // Re-filed after `target`, never into a slot this pass still visits.
                if deadline <= now_ms {
                    session.signal(SIG_DEADLINE);
                    signalled += 1;
                    // Looked at again next slot: a frame may have arrived just now.
                    self.file(weak, 0, target);
                } else {
                    self.file(weak, deadline, target);
                }
            }
        }
        signalled
    }

    /// Sessions filed (for tests and metrics; walks every slot).
    pub fn len(&self) -> usize {
        self.slots.iter().map(|s| s.lock().len()).sum()
    }

    /// True when no session is filed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(deadline: u64) -> Arc<Session> {
        let s = Arc::new(Session::new("u".into(), "d".into(), 1));
        s.set_deadline(deadline);
        s
    }

    fn signalled(s: &Session) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        s.poll_signals(&mut cx) & SIG_DEADLINE != 0
    }

    #[test]
    fn a_session_is_signalled_once_its_slot_passes_not_before() {
        let w = DeadlineWheel::new(Duration::from_millis(100), 0);
        let s = session(1_050);
        w.schedule(&s);
        assert_eq!(w.advance(1_000), 0);
        assert!(!signalled(&s));
        assert_eq!(w.advance(1_100), 1);
        assert!(signalled(&s));
    }

    #[test]
    fn a_moved_deadline_is_refiled_not_signalled() {
        let w = DeadlineWheel::new(Duration::from_millis(100), 0);
        let s = session(500);
        w.schedule(&s);
        s.set_deadline(5_000); // a frame arrived
        assert_eq!(w.advance(1_000), 0);
        assert_eq!(w.len(), 1, "filed again under its new deadline");
        assert_eq!(w.advance(5_000), 1);
    }

    #[test]
    fn deadlines_beyond_the_horizon_wait_and_dropped_sessions_leave() {
        let w = DeadlineWheel::new(Duration::from_millis(100), 0);
        let far = session(100_000); // past the 25.6 s horizon
        w.schedule(&far);
        assert_eq!(w.advance(50_000), 0);
        assert_eq!(w.advance(100_000), 1);
        let gone = session(200);
        w.schedule(&gone);
        drop(gone);
        w.advance(120_000);
        assert_eq!(w.len(), 1, "only `far`, re-filed after its signal");
        drop(far);
        w.advance(130_000);
        assert!(w.is_empty());
    }

    #[test]
    fn a_signalled_session_whose_frame_raced_in_is_checked_again() {
        let w = DeadlineWheel::new(Duration::from_millis(100), 0);
        let s = session(300);
        w.schedule(&s);
        assert_eq!(w.advance(400), 1);
        let _ = signalled(&s);
        s.set_deadline(2_000); // the connection found it alive after all
        assert_eq!(w.advance(1_000), 0);
        assert_eq!(w.advance(2_000), 1);
    }
}
