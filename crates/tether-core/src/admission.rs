//! Admission control: a token bucket for logins (DESIGN §4). Sans-IO: time is passed in.
//!
//! The bucket holds at most `burst` tokens and refills at `rate` per second. A login
//! takes one; when none is left the caller answers ERROR{OVERLOADED, retry_after_ms}
//! with [`TokenBucket::try_take`]'s wait, which clients use as a floor for their
//! backoff, so a reconnect storm is admitted at the configured rate.
//!
//! The waits form a queue: each refusal is given its own slot, `1/rate` after the one
//! before, instead of all being told "one token from now". A herd of N refused clients
//! is thus spread over `N/rate` and comes back about when there are tokens for it;
//! telling everyone the same short wait brings the herd back at once, refuses most of
//! it again, and leaves the rest to their growing backoff (seen: 300 clients at
//! 150 logins/s took 11 s to be back instead of 2).

use std::time::{Duration, Instant};

/// A token bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    /// The slot the next refused caller is given (the end of the virtual queue).
    queue_until: Instant,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens refilling at `rate_per_sec`.
    pub fn new(now: Instant, rate_per_sec: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            // Not finite or not positive: a bucket that never refills (no panic, no NaN).
            rate: if rate_per_sec.is_finite() && rate_per_sec > 0.0 {
                rate_per_sec
            } else {
                f64::MIN_POSITIVE
            },
            burst,
            tokens: burst,
            last: now,
            queue_until: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now.max(self.last);
    }

    /// Takes a token at `now`, or says how long until one is available.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let next_token =
            Duration::try_from_secs_f64((1.0 - self.tokens) / self.rate).unwrap_or(Duration::MAX);
        let slot = now
            .checked_add(next_token)
            .unwrap_or(now)
            .max(self.queue_until);
        let spacing = Duration::try_from_secs_f64(1.0 / self.rate).unwrap_or(Duration::MAX);
        self.queue_until = slot.checked_add(spacing).unwrap_or(slot);
        if next_token == Duration::MAX {
            return Err(Duration::MAX);
        }
        Err(slot - now)
    }

    /// Takes up to `want` tokens at `now`; returns how many it took (0 if none is left).
    pub fn take_up_to(&mut self, now: Instant, want: u64) -> u64 {
        self.refill(now);
        let took = (self.tokens.floor() as u64).min(want);
        self.tokens -= took as f64;
        took
    }

    /// How long after `now` until `n` tokens (at most the burst) are available; zero if
    /// they already are. Takes nothing.
    pub fn wait_for(&mut self, now: Instant, n: u64) -> Duration {
        self.refill(now);
        let want = (n as f64).min(self.burst);
        if self.tokens >= want {
            return Duration::ZERO;
        }
        Duration::try_from_secs_f64((want - self.tokens) / self.rate).unwrap_or(Duration::MAX)
    }

    /// Tokens available at `now` (for metrics and tests).
    pub fn available(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_admits_its_burst_then_refuses_with_the_wait_for_one_token() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(t0, 10.0, 5);
        for _ in 0..5 {
            assert!(b.try_take(t0).is_ok());
        }
        assert_eq!(b.try_take(t0), Err(Duration::from_millis(100)));
    }

    #[test]
    fn refused_callers_are_given_slots_one_token_apart() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(t0, 100.0, 10);
        for _ in 0..10 {
            b.try_take(t0).unwrap();
        }
        // 300 refused at once: waits 10 ms, 20 ms, … 3 s, so they come back at the rate.
        let waits: Vec<Duration> = (0..300).map(|_| b.try_take(t0).unwrap_err()).collect();
        for (i, w) in waits.iter().enumerate() {
            let want = Duration::from_millis(10 * (i as u64 + 1));
            assert!(w.abs_diff(want) < Duration::from_micros(10), "{i}: {w:?}");
        }
        // Each one that comes back in its slot finds a token.
        let mut admitted = 0;
        for w in &waits {
            if b.try_take(t0 + *w).is_ok() {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 300);
        // Once the queue has drained, a refusal waits for one token again.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..10 {
            b.try_take(later).unwrap();
        }
        assert_eq!(b.try_take(later), Err(Duration::from_millis(10)));
    }

    #[test]
    fn tokens_refill_at_the_rate_and_never_beyond_the_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(t0, 10.0, 5);
        for _ in 0..5 {
            b.try_take(t0).unwrap();
        }
        let t1 = t0 + Duration::from_millis(250);
        assert!((b.available(t1) - 2.5).abs() < 1e-9);
        assert!(b.try_take(t1).is_ok());
        assert!(b.try_take(t1).is_ok());
        assert!(b.try_take(t1).is_err());
        assert!((b.available(t0 + Duration::from_secs(60)) - 5.0).abs() < 1e-9);
    }

    #[test]
    fn take_up_to_takes_what_is_there_and_no_more() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(t0, 100.0, 50);
        assert_eq!(b.take_up_to(t0, 30), 30);
        assert_eq!(b.take_up_to(t0, 30), 20);
        assert_eq!(b.take_up_to(t0, 30), 0);
        assert_eq!(b.take_up_to(t0 + Duration::from_millis(100), 30), 10);
    }

    #[test]
    fn wait_for_says_when_tokens_will_be_there_without_taking_any() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(t0, 100.0, 50);
        assert_eq!(b.wait_for(t0, 50), Duration::ZERO);
        assert_eq!(b.take_up_to(t0, 50), 50);
        assert_eq!(b.wait_for(t0, 1), Duration::from_millis(10));
        assert_eq!(b.wait_for(t0, 5), Duration::from_millis(50));
        // Never more than the burst: asking for more waits for a full bucket only.
        assert_eq!(b.wait_for(t0, 1_000), Duration::from_millis(500));
        assert_eq!(b.take_up_to(t0 + Duration::from_millis(10), 5), 1);
    }

    #[test]
    fn a_zero_or_nan_rate_never_refills_and_never_panics() {
        let t0 = Instant::now();
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let mut b = TokenBucket::new(t0, rate, 1);
            assert!(b.try_take(t0).is_ok());
            assert!(
                b.try_take(t0 + Duration::from_secs(3600)).is_err(),
                "{rate}"
            );
        }
    }

    #[test]
    fn over_a_long_storm_admissions_follow_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(t0, 100.0, 10);
        let mut admitted = 0;
        // Someone tries every millisecond for 10 s.
        for ms in 0..10_000u64 {
            if b.try_take(t0 + Duration::from_millis(ms)).is_ok() {
                admitted += 1;
            }
        }
        // Burst + rate × time, give or take one.
        assert!((1009..=1011).contains(&admitted), "{admitted}");
    }
}
