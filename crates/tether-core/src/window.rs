//! The server's delivery window for one connection (DESIGN §6, streaming by position),
//! without I/O: where the stream stands, how much may go now, and which ACKs count.
//!
//! [`DeliveryWindow`] holds three seqs of one inbox: `next` (the next seq to DELIVER),
//! `acked` (the device's cumulative ACK) and `head` (the newest seq known to exist).
//! The connection streams `next..=head`; nothing is queued per connection, so a device
//! that stops reading or ACKing just stops its own stream.
//!
//! - **Credit.** At most `credit` DELIVERs are un-ACKed (`next − 1 − acked`). A full
//!   window stops the stream; an ACK reopens exactly as many as it acknowledges.
//! - **Pacing.** An entry more than one window behind the head (`head − seq ≥ credit`)
//!   is a *backlog* entry: replaying it takes a token from a bucket shared by every
//!   connection, so a reconnect storm is replayed at a fixed rate. Entries within one
//!   window of the head are *live* and never paced; a batch never mixes the two.
//! - **ACKs.** An ACK at or below the current one changes nothing (reordered or
//!   repeated); an ACK of a seq never sent is the peer's error, reported to the caller.
//! - **Compaction.** Seqs removed by retention are skipped, never counted as in flight.
//!
//! The struct is three integers (it lives as long as the session, DESIGN §10); the
//! credit and batch limits come with each call from the server's configuration.

use crate::admission::TokenBucket;
use std::fmt;
use std::ops::DerefMut;
use std::time::Instant;

/// Limits of one streaming step, from the server's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowLimits {
    /// Most un-ACKed DELIVERs (at least 1 is used).
    pub credit: u64,
    /// Most entries granted at once, i.e. read from the store per step (at least 1).
    pub batch: u64,
}

/// What the stream may do now; see [`DeliveryWindow::grant`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Send up to this many entries from `next` on (at least 1, never past `head`).
    Send(u64),
    /// Nothing to send: `next` is past `head`. A new head changes this.
    CaughtUp,
    /// The credit window is full. Only an ACK changes this.
    WindowFull,
    /// The next entry is backlog and the shared replay bucket is empty; a token is
    /// there again at `retry_at` (others may take it first).
    Paced {
        /// When to ask again.
        retry_at: Instant,
    },
}

/// An ACK of a seq that was never delivered on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckBeyondSent {
    /// The seq the peer acknowledged.
    pub ack: u64,
    /// The last seq delivered (0 if none).
    pub last_sent: u64,
}

impl fmt::Display for AckBeyondSent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ACK {} beyond the last DELIVER {}",
            self.ack, self.last_sent
        )
    }
}

impl std::error::Error for AckBeyondSent {}

/// One connection's position in its inbox and its credit window of un-ACKed DELIVERs.
///
/// Invariant: `acked < next`, so `in_flight = next − 1 − acked` never underflows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryWindow {
    next: u64,
    acked: u64,
    head: u64,
}

impl DeliveryWindow {
    /// A window starting delivery at `start` (seqs begin at 1) with the inbox head
    /// `head`; everything before `start` counts as acknowledged.
    pub fn new(start: u64, head: u64) -> Self {
        let next = start.max(1);
        Self {
            next,
            acked: next - 1,
            head,
        }
    }

    /// The next seq to deliver.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// The device's cumulative ACK (or where delivery started, or the last skip).
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The newest head known.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// DELIVERs sent and not yet acknowledged.
    pub fn in_flight(&self) -> u64 {
        self.next.saturating_sub(1).saturating_sub(self.acked)
    }

    /// True while entries up to the head are still to be delivered.
    pub fn is_behind(&self) -> bool {
        self.next <= self.head
    }

    /// A head seen (from a commit notification or read back): heads only grow, so an
    /// older value changes nothing.
    pub fn on_head(&mut self, head: u64) {
        self.head = self.head.max(head);
    }

    /// How many entries may go now, at `now`. Only a backlog batch asks `replays` (the
    /// bucket shared by every connection, e.g. a lock guard) for tokens, so live
    /// traffic never touches it. Tokens granted are taken: send them, or they are lost.
    ///
    /// The answer changes with [`on_head`](Self::on_head), [`on_sent`](Self::on_sent),
    /// [`on_ack`](Self::on_ack), [`skip_to`](Self::skip_to) and, when paced, with time.
    pub fn grant<B>(&self, now: Instant, limits: WindowLimits, replays: impl FnOnce() -> B) -> Grant
    where
        B: DerefMut<Target = TokenBucket>,
    {
        if self.next > self.head {
            return Grant::CaughtUp;
        }
        let credit = limits.credit.max(1);
        let in_flight = self.in_flight();
        if in_flight >= credit {
            return Grant::WindowFull;
        }
        let room = (credit - in_flight)
            .min(limits.batch.max(1))
            .min(self.head - self.next + 1);
        if self.head - self.next < credit {
            return Grant::Send(room);
        }
        // Backlog: seqs next..=head−credit. The batch stops where live entries begin.
        let backlog = self.head - credit - self.next + 1;
        let mut bucket = replays();
        match bucket.take_up_to(now, room.min(backlog)) {
            0 => Grant::Paced {
                retry_at: now + bucket.wait_for(now, 1),
            },
            n => Grant::Send(n),
        }
    }

    /// The entry `seq` was delivered. Seqs between `next` and `seq` were not stored any
    /// more (compacted): they are skipped, not in flight. A seq below `next` (already
    /// delivered) changes nothing.
    pub fn on_sent(&mut self, seq: u64) {
        if seq < self.next {
            return;
        }
        self.skip_to(seq);
        self.next = seq + 1;
        self.head = self.head.max(seq);
    }

    /// The device acknowledged everything up to `seq`. Returns how many DELIVERs that
    /// released: 0 for an ACK at or below the current one (ignored); then the caller
    /// persists [`acked`](Self::acked). An ACK of a seq not yet delivered is an error
    /// and changes nothing.
    pub fn on_ack(&mut self, seq: u64) -> Result<u64, AckBeyondSent> {
        if seq >= self.next {
            return Err(AckBeyondSent {
                ack: seq,
                last_sent: self.next - 1,
            });
        }
        let released = seq.saturating_sub(self.acked);
        self.acked = self.acked.max(seq);
        Ok(released)
    }

    /// Seqs below `low` are gone (retention): continue at `low`. Entries skipped were
    /// never delivered, so they leave the window as if acknowledged.
    pub fn skip_to(&mut self, low: u64) {
        if low > self.next {
            self.next = low;
            self.acked = self.acked.max(low - 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const LIMITS: WindowLimits = WindowLimits {
        credit: 8,
        batch: 64,
    };

    /// A bucket nobody should need: live tests fail if it is asked.
    fn untouchable() -> &'static mut TokenBucket {
        panic!("the replay bucket was asked for a live entry")
    }

    /// Delivers what is granted (as the server would), returning how many.
    fn send_granted(w: &mut DeliveryWindow, g: Grant) -> u64 {
        match g {
            Grant::Send(n) => {
                for seq in w.next()..w.next() + n {
                    w.on_sent(seq);
                }
                n
            }
            _ => 0,
        }
    }

    /// One streaming step that must not need the replay bucket.
    fn live_step(w: &mut DeliveryWindow, now: Instant, limits: WindowLimits) -> u64 {
        let g = w.grant(now, limits, untouchable);
        send_granted(w, g)
    }

    #[test]
    fn a_full_window_stops_the_stream_until_an_ack_reopens_exactly_that_much() {
        let t0 = Instant::now();
        let mut w = DeliveryWindow::new(1, 5);
        // Live (within one window of the head): five go at once.
        assert_eq!(live_step(&mut w, t0, LIMITS), 5);
        w.on_head(100);
        // 100 − 6 ≥ 8 is backlog now; a bucket with room for everything.
        let mut bucket = TokenBucket::new(t0, 1e6, 1_000_000);
        assert_eq!(w.grant(t0, LIMITS, || &mut bucket), Grant::Send(3));
        send_granted(&mut w, Grant::Send(3));
        assert_eq!(w.in_flight(), 8);
        assert_eq!(w.grant(t0, LIMITS, untouchable), Grant::WindowFull);
        assert_eq!(w.on_ack(3), Ok(3));
        assert_eq!(w.grant(t0, LIMITS, || &mut bucket), Grant::Send(3));
        assert_eq!(w.on_ack(8), Ok(5));
        assert_eq!(w.grant(t0, LIMITS, || &mut bucket), Grant::Send(8));
    }

    #[test]
    fn the_batch_limits_one_grant_and_the_head_ends_the_stream() {
        let t0 = Instant::now();
        let small = WindowLimits {
            credit: 256,
            batch: 4,
        };
        let mut w = DeliveryWindow::new(1, 10);
        assert_eq!(w.grant(t0, small, untouchable), Grant::Send(4));
        for _ in 0..3 {
            live_step(&mut w, t0, small);
        }
        assert_eq!(w.next(), 11);
        assert!(!w.is_behind());
        assert_eq!(w.grant(t0, small, untouchable), Grant::CaughtUp);
        w.on_head(7); // an older head changes nothing
        assert_eq!(w.head(), 10);
        w.on_head(11);
        assert_eq!(w.grant(t0, small, untouchable), Grant::Send(1));
    }

    #[test]
    fn live_entries_are_never_paced_even_with_an_empty_bucket() {
        let t0 = Instant::now();
        let mut w = DeliveryWindow::new(1, 0);
        // A long live conversation: the head moves a little ahead each time, the
        // device ACKs; the bucket is never even asked.
        for head in 1..=1_000u64 {
            w.on_head(head);
            let n = live_step(&mut w, t0, LIMITS);
            assert_eq!(n, 1, "head {head}");
            w.on_ack(head).unwrap();
        }
        // A burst of exactly one window is still live.
        w.on_head(1_008);
        assert_eq!(w.grant(t0, LIMITS, untouchable), Grant::Send(8));
    }

    #[test]
    fn a_backlog_batch_stops_where_live_entries_begin() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(t0, 1.0, 1_000);
        // head 20, credit 8: seqs 1..=12 are backlog, 13..=20 live.
        let mut w = DeliveryWindow::new(1, 20);
        let limits = WindowLimits {
            credit: 8,
            batch: 64,
        };
        // Credit caps the first batch at 8 (all backlog, 8 tokens).
        assert_eq!(w.grant(t0, limits, || &mut bucket), Grant::Send(8));
        send_granted(&mut w, Grant::Send(8));
        w.on_ack(8).unwrap();
        // 9..=12 are backlog: 4 tokens, not 8.
        assert_eq!(w.grant(t0, limits, || &mut bucket), Grant::Send(4));
        send_granted(&mut w, Grant::Send(4));
        assert!((bucket.available(t0) - 988.0).abs() < 1e-9);
        // 13.. are live: no tokens, only credit (4 left).
        assert_eq!(w.grant(t0, limits, untouchable), Grant::Send(4));
    }

    #[test]
    fn a_backlog_is_paced_at_the_buckets_rate_across_two_windows_sharing_it() {
        let t0 = Instant::now();
        // 1,000 entries/s, burst 100, shared by two devices each 10,000 behind.
        let mut bucket = TokenBucket::new(t0, 1_000.0, 100);
        let limits = WindowLimits {
            credit: 256,
            batch: 64,
        };
        let mut a = DeliveryWindow::new(1, 10_000);
        let mut b = DeliveryWindow::new(1, 10_000);
        let (mut sent_a, mut sent_b) = (0, 0);
        // Both ask every millisecond for 2 s and ACK at once.
        for ms in 0..2_000u64 {
            let now = t0 + Duration::from_millis(ms);
            // Who asks first alternates, as wake-ups do on a real server.
            let mut both = [(&mut a, &mut sent_a), (&mut b, &mut sent_b)];
            if ms % 2 == 1 {
                both.reverse();
            }
            for (w, sent) in both {
                let g = w.grant(now, limits, || &mut bucket);
                *sent += send_granted(w, g);
                let last = w.next() - 1;
                w.on_ack(last).unwrap();
            }
        }
        // Burst + rate × 2 s between them, give or take a token; both progressed.
        let total = sent_a + sent_b;
        assert!((2_098..=2_100).contains(&total), "{total}");
        assert!(sent_a >= 500 && sent_b >= 500, "{sent_a} / {sent_b}");
    }

    #[test]
    fn a_paced_window_says_when_a_token_is_back_and_is_granted_then() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(t0, 100.0, 10);
        let mut w = DeliveryWindow::new(1, 1_000);
        assert_eq!(w.grant(t0, LIMITS, || &mut bucket), Grant::Send(8));
        send_granted(&mut w, Grant::Send(8));
        w.on_ack(8).unwrap();
        assert_eq!(w.grant(t0, LIMITS, || &mut bucket), Grant::Send(2));
        send_granted(&mut w, Grant::Send(2));
        w.on_ack(10).unwrap();
        let Grant::Paced { retry_at } = w.grant(t0, LIMITS, || &mut bucket) else {
            panic!("an empty bucket must pace the backlog");
        };
        assert_eq!(retry_at, t0 + Duration::from_millis(10));
        let mut probe = bucket.clone();
        let just_before = retry_at - Duration::from_micros(100);
        assert!(matches!(
            w.grant(just_before, LIMITS, || &mut probe),
            Grant::Paced { .. }
        ));
        assert_eq!(w.grant(retry_at, LIMITS, || &mut bucket), Grant::Send(1));
    }

    #[test]
    fn an_ack_beyond_what_was_sent_is_rejected_and_changes_nothing() {
        let t0 = Instant::now();
        let mut w = DeliveryWindow::new(41, 48);
        live_step(&mut w, t0, LIMITS);
        assert_eq!(w.next(), 49);
        let before = w;
        assert_eq!(
            w.on_ack(49),
            Err(AckBeyondSent {
                ack: 49,
                last_sent: 48
            })
        );
        assert_eq!(
            w.on_ack(u64::MAX).unwrap_err().to_string(),
            format!("ACK {} beyond the last DELIVER 48", u64::MAX)
        );
        assert_eq!(w, before);
        w.on_head(60);
        assert_eq!(w.grant(t0, LIMITS, untouchable), Grant::WindowFull);
    }

    #[test]
    fn an_ack_below_the_current_one_is_ignored() {
        let t0 = Instant::now();
        let mut w = DeliveryWindow::new(1, 8);
        live_step(&mut w, t0, LIMITS);
        assert_eq!(w.on_ack(6), Ok(6));
        assert_eq!(w.on_ack(3), Ok(0));
        assert_eq!(w.on_ack(6), Ok(0));
        assert_eq!(w.acked(), 6);
        assert_eq!(w.in_flight(), 2);
        // Before anything was delivered, an ACK of what preceded the start is stale.
        let mut fresh = DeliveryWindow::new(10, 20);
        assert_eq!(fresh.on_ack(9), Ok(0));
        assert_eq!(fresh.on_ack(0), Ok(0));
        assert!(fresh.on_ack(10).is_err());
    }

    #[test]
    fn compacted_entries_are_skipped_and_never_count_as_in_flight() {
        let t0 = Instant::now();
        let mut w = DeliveryWindow::new(1, 6);
        send_granted(&mut w, Grant::Send(2)); // 1, 2 in flight
        // Retention removed everything below 40 (the store said so).
        w.on_head(50);
        w.skip_to(40);
        assert_eq!((w.next(), w.acked(), w.in_flight()), (40, 39, 0));
        w.skip_to(10); // an older low changes nothing
        assert_eq!(w.next(), 40);
        // A late ACK of what was delivered before the skip is stale, not an error.
        assert_eq!(w.on_ack(2), Ok(0));
        // The store returned 45 where 40 was asked: 40..=44 are gone too.
        w.on_sent(45);
        assert_eq!((w.next(), w.in_flight()), (46, 1));
        assert_eq!(w.grant(t0, LIMITS, untouchable), Grant::Send(5));
    }

    #[test]
    fn no_start_below_seq_one() {
        let w = DeliveryWindow::new(0, 0);
        assert_eq!((w.next(), w.acked(), w.in_flight()), (1, 0, 0));
    }

    #[test]
    fn the_window_is_three_integers() {
        assert_eq!(std::mem::size_of::<DeliveryWindow>(), 24);
    }
}
