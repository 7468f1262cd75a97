//! Reconnect backoff: capped exponential with full jitter, without I/O.
//!
//! The n-th consecutive failure waits a uniformly random time in
//! `[0, min(cap, base · 2^n)]` ("full jitter"), so a crowd of clients that lost the
//! same server spreads out instead of stampeding it. A connection resets the count
//! only once it has stayed up for [`STABLE_AFTER`]: a server that accepts and drops
//! at once must not pull its clients back into a tight loop.

use rand::Rng;
use std::time::Duration;

/// Default first ceiling.
pub const DEFAULT_BASE: Duration = Duration::from_millis(200);
/// Default largest ceiling.
pub const DEFAULT_CAP: Duration = Duration::from_secs(30);
/// A connection up this long counts as stable and resets the backoff.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);

/// Capped exponential backoff with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
    connected_at: Option<std::time::Instant>,
}

impl Backoff {
    /// A backoff with ceiling `base · 2^n`, capped at `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            failures: 0,
            connected_at: None,
        }
    }

    /// The upper bound of the next delay: `min(cap, base · 2^failures)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// Draws the delay before the next attempt and counts one more failure.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=nanos))
    }

    /// A connection succeeded: the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// A session came up at `now` (WELCOME).
    pub fn on_connected(&mut self, now: std::time::Instant) {
        self.connected_at = Some(now);
    }

    /// The session ended at `now`: if it was up for [`STABLE_AFTER`], the count resets.
    pub fn on_disconnected(&mut self, now: std::time::Instant) {
        if let Some(at) = self.connected_at.take()
            && now.saturating_duration_since(at) >= STABLE_AFTER
        {
            self.failures = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn full_jitter_delay_stays_within_zero_and_the_capped_exponential_ceiling() {
        let base = Duration::from_millis(200);
        let cap = Duration::from_secs(30);
        let mut rng = StdRng::seed_from_u64(1);
        for n in 0..40u32 {
            let mut b = Backoff::new(base, cap);
            for _ in 0..n {
                b.next_delay(&mut rng);
            }
            let ceiling = base.saturating_mul(2u32.saturating_pow(n)).min(cap);
            assert_eq!(b.ceiling(), ceiling, "after {n} failures");
            for _ in 0..200 {
                let mut probe = b.clone();
                assert!(probe.next_delay(&mut rng) <= ceiling);
            }
        }
    }

    #[test]
    fn only_a_stable_connection_resets_the_backoff() {
        let t0 = std::time::Instant::now();
        let mut rng = StdRng::seed_from_u64(1);
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        for _ in 0..4 {
            b.next_delay(&mut rng);
        }
        assert_eq!(b.ceiling(), Duration::from_millis(1600));
        // Up for a second, then dropped: still backing off.
        b.on_connected(t0);
        b.on_disconnected(t0 + Duration::from_secs(1));
        assert_eq!(b.ceiling(), Duration::from_millis(1600));
        // Up for STABLE_AFTER: back to the base.
        b.on_connected(t0 + Duration::from_secs(2));
        b.on_disconnected(t0 + Duration::from_secs(2) + STABLE_AFTER);
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn full_jitter_uses_the_whole_range() {
        let mut rng = StdRng::seed_from_u64(2);
        let b = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let draws: Vec<_> = (0..1000).map(|_| b.clone().next_delay(&mut rng)).collect();
        assert!(draws.iter().any(|d| *d < Duration::from_millis(20)));
        assert!(draws.iter().any(|d| *d > Duration::from_millis(180)));
    }

    #[test]
    fn ceiling_doubles_until_the_cap_and_reset_starts_over() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            ceilings.push(b.ceiling().as_millis());
            b.next_delay(&mut rng);
        }
        assert_eq!(
            ceilings,
            vec![200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]
        );
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(200));
    }
}
