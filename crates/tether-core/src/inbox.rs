//! The receive-side QoS rule, without I/O: hand every inbox entry to the app exactly
//! once and in order.
//!
//! [`InboxCursor`] tracks three positions of one inbox epoch:
//! - `acked`: the app has processed everything up to here (persisted; the resume point);
//! - `handed`: everything up to here has been handed to the app (in memory only);
//! - the epoch itself: a cursor is meaningless in another epoch.
//!
//! After a reconnect the server replays from the resume point, so entries up to
//! `handed` arrive again and are dropped. An entry beyond `handed + 1` means something
//! was skipped: that is never papered over; the connection is restarted from the
//! resume point instead.

use tether_proto::pb;

/// What to do with a delivered entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handoff {
    /// The next entry in order: hand it to the app.
    Hand,
    /// Already handed (a replay after a reconnect): drop it silently.
    Duplicate,
    /// Entries between were skipped: a protocol error; reconnect from the resume point.
    Gap {
        /// The seq that should have come.
        expected: u64,
        /// The seq that came.
        got: u64,
    },
}

/// How a WELCOME relates to the cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WelcomeCheck {
    /// Same epoch: delivery continues after what was already handed.
    Continue,
    /// A fresh start (no cursor yet, or another epoch): the cursor now starts at
    /// `start_seq`; whatever belonged to `old_epoch` is void.
    Reset {
        /// The epoch the cursor had before; 0 when it had none.
        old_epoch: u64,
    },
    /// Same epoch, but the server resumes after the cursor: entries `from..=to` were
    /// removed by retention before this device fetched them (the server says so with
    /// a non-fatal RESUME_COMPACTED). The cursor moves past them.
    Expired {
        /// First entry lost.
        from: u64,
        /// Last entry lost.
        to: u64,
    },
}

/// In-order, exactly-once hand-off filter for one device's inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxCursor {
    epoch: u64,
    acked: u64,
    handed: u64,
}

impl InboxCursor {
    /// A cursor restored from the state file (`epoch` 0 = none yet).
    pub fn new(epoch: u64, last_seq: u64) -> Self {
        let last_seq = if epoch == 0 { 0 } else { last_seq };
        Self {
            epoch,
            acked: last_seq,
            handed: last_seq,
        }
    }

    /// The inbox epoch the cursor belongs to (0 = none).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Everything up to here was processed by the app.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Everything up to here was handed to the app.
    pub fn handed(&self) -> u64 {
        self.handed
    }

    /// The resume point HELLO carries: only when the cursor has an epoch.
    pub fn resume_point(&self) -> Option<pb::ResumePoint> {
        (self.epoch != 0).then_some(pb::ResumePoint {
            inbox_epoch: self.epoch,
            last_seq: self.acked,
        })
    }

    /// Applies WELCOME: in another epoch (or with no cursor) the cursor restarts just
    /// before `start_seq`.
    pub fn on_welcome(&mut self, inbox_epoch: u64, start_seq: u64) -> WelcomeCheck {
        if inbox_epoch == self.epoch && self.epoch != 0 {
            if start_seq > self.handed + 1 {
                let from = self.handed + 1;
                self.acked = start_seq - 1;
                self.handed = self.acked;
                return WelcomeCheck::Expired {
                    from,
                    to: start_seq - 1,
                };
            }
            return WelcomeCheck::Continue;
        }
        let old_epoch = self.epoch;
        self.epoch = inbox_epoch;
        self.acked = start_seq.saturating_sub(1);
        self.handed = self.acked;
        WelcomeCheck::Reset { old_epoch }
    }

    /// Classifies a delivered seq; on [`Handoff::Hand`] it counts as handed.
    pub fn on_deliver(&mut self, seq: u64) -> Handoff {
        if seq <= self.handed {
            return Handoff::Duplicate;
        }
        let expected = self.handed + 1;
        if seq != expected {
            return Handoff::Gap { expected, got: seq };
        }
        self.handed = seq;
        Handoff::Hand
    }

    /// The app processed everything up to `seq` (clamped to what was handed).
    /// Returns the new `acked` if it moved.
    pub fn ack(&mut self, seq: u64) -> Option<u64> {
        let seq = seq.min(self.handed);
        if seq <= self.acked {
            return None;
        }
        self.acked = seq;
        Some(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_welcome_past_the_cursor_in_the_same_epoch_reports_expired_entries_and_moves_on() {
        let mut c = InboxCursor::new(4, 10);
        assert_eq!(
            c.on_welcome(4, 31),
            WelcomeCheck::Expired { from: 11, to: 30 }
        );
        assert_eq!(c.acked(), 30);
        assert_eq!(c.on_deliver(31), Handoff::Hand);
    }

    #[test]
    fn no_resume_point_without_an_epoch() {
        assert_eq!(InboxCursor::new(0, 5).resume_point(), None);
        assert_eq!(
            InboxCursor::new(3, 5).resume_point(),
            Some(pb::ResumePoint {
                inbox_epoch: 3,
                last_seq: 5
            })
        );
    }

    #[test]
    fn fresh_start_begins_at_welcome_start_seq() {
        let mut c = InboxCursor::new(0, 0);
        assert_eq!(c.on_welcome(9, 101), WelcomeCheck::Reset { old_epoch: 0 });
        assert_eq!((c.acked(), c.handed()), (100, 100));
        assert_eq!(c.on_deliver(101), Handoff::Hand);
    }

    #[test]
    fn entries_are_handed_once_in_order_and_replays_are_dropped() {
        let mut c = InboxCursor::new(1, 10);
        assert_eq!(c.on_welcome(1, 11), WelcomeCheck::Continue);
        assert_eq!(c.on_deliver(11), Handoff::Hand);
        assert_eq!(c.on_deliver(12), Handoff::Hand);
        assert_eq!(c.on_deliver(12), Handoff::Duplicate);
        assert_eq!(c.on_deliver(3), Handoff::Duplicate);
        // Reconnect: the server replays from the resume point (10), all dropped.
        assert_eq!(c.on_welcome(1, 11), WelcomeCheck::Continue);
        assert_eq!(c.on_deliver(11), Handoff::Duplicate);
        assert_eq!(c.on_deliver(12), Handoff::Duplicate);
        assert_eq!(c.on_deliver(13), Handoff::Hand);
    }

    #[test]
    fn a_skipped_seq_is_a_gap_never_a_silent_skip() {
        let mut c = InboxCursor::new(1, 10);
        assert_eq!(
            c.on_deliver(12),
            Handoff::Gap {
                expected: 11,
                got: 12
            }
        );
        // Nothing moved: the resume point still says 10.
        assert_eq!(c.handed(), 10);
        assert_eq!(c.resume_point().unwrap().last_seq, 10);
    }

    #[test]
    fn another_inbox_epoch_restarts_the_cursor_at_start_seq() {
        let mut c = InboxCursor::new(1, 500);
        assert_eq!(c.on_welcome(2, 1), WelcomeCheck::Reset { old_epoch: 1 });
        assert_eq!((c.epoch(), c.acked(), c.handed()), (2, 0, 0));
        assert_eq!(c.on_deliver(1), Handoff::Hand);
    }

    #[test]
    fn ack_is_cumulative_monotonic_and_clamped_to_what_was_handed() {
        let mut c = InboxCursor::new(1, 10);
        c.on_deliver(11);
        c.on_deliver(12);
        assert_eq!(c.ack(11), Some(11));
        assert_eq!(c.ack(11), None);
        assert_eq!(c.ack(5), None);
        assert_eq!(c.ack(99), Some(12));
        assert_eq!(c.resume_point().unwrap().last_seq, 12);
    }
}
