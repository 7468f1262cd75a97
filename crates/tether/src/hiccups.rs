//! `tether bench hiccups`: how long this machine takes the CPU away from a thread that
//! never sleeps. On a virtual machine the host preempts vCPUs (steal time) in chunks of
//! milliseconds; any latency percentile that lands in such a gap inherits it, whatever
//! the server does. This measures that floor, so a benchmark's tail can be read against
//! it (SCALE.md).

use std::time::{Duration, Instant};

/// Gaps shorter than this are the loop's own jitter (cache misses, interrupts).
const GAP: Duration = Duration::from_micros(200);

/// What one spinning thread saw.
#[derive(Debug, Default, Clone)]
struct Gaps {
    over_1ms: u64,
    over_5ms: u64,
    max: Duration,
    total: Duration,
}

fn spin(window: Duration) -> Gaps {
    spin_on(window, Instant::now)
}

/// The loop, over any clock (a fake one in tests).
fn spin_on(window: Duration, mut clock: impl FnMut() -> Instant) -> Gaps {
    let mut gaps = Gaps::default();
    let start = clock();
    let mut last = start;
    loop {
        let now = clock();
        let gap = now - last;
        last = now;
        if gap >= GAP {
            gaps.total += gap;
            gaps.max = gaps.max.max(gap);
            gaps.over_1ms += u64::from(gap >= Duration::from_millis(1));
            gaps.over_5ms += u64::from(gap >= Duration::from_millis(5));
        }
        if now - start >= window {
            return gaps;
        }
    }
}

/// The `steal` column of /proc/stat's first line, in ms (0 if there is none).
pub(crate) fn steal_ms() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: u64 = stat
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(8))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // USER_HZ is 100 on Linux for /proc/stat.
    ticks * 10
}

/// Spins `threads` threads for `seconds` and reports the gaps each saw.
pub(crate) fn run(seconds: u64, threads: usize) -> crate::bench::BenchResult {
    let window = Duration::from_secs(seconds.max(1));
    let threads = threads.max(1);
    let steal_before = steal_ms();
    let handles: Vec<_> = (0..threads)
        .map(|_| std::thread::spawn(move || spin(window)))
        .collect();
    let per_thread: Vec<Gaps> = handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| "a spinning thread panicked".to_string())
        })
        .collect::<Result<_, _>>()?;
    let steal = steal_ms().saturating_sub(steal_before);
    let ms = |d: Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
    Ok(serde_json::json!({
        "bench": "hiccups",
        "seconds": window.as_secs(),
        "threads": threads,
        "method": "one thread per CPU reads the monotonic clock in a loop; a gap between two reads of ≥ 0.2 ms is time the thread did not run",
        "steal_ms_all_cpus": steal,
        "per_thread": per_thread.iter().map(|g| serde_json::json!({
            "gaps_over_1ms": g.over_1ms,
            "gaps_over_5ms": g.over_5ms,
            "max_gap_ms": ms(g.max),
            "lost_ms": ms(g.total),
            "lost_percent": (g.total.as_secs_f64() / window.as_secs_f64() * 1e4).round() / 100.0,
        })).collect::<Vec<_>>(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_counted_by_size_and_jitter_is_not() {
        // A fake clock: 10 µs per read, with a 7 ms and a 2 ms jump.
        let origin = Instant::now();
        let mut reads = 0u64;
        let clock = || {
            reads += 1;
            let jumps = match reads {
                0..=100 => 0,
                101..=200 => 7_000,
                _ => 9_000,
            };
            origin + Duration::from_micros(reads * 10 + jumps)
        };
        let g = spin_on(Duration::from_millis(20), clock);
        assert_eq!((g.over_1ms, g.over_5ms), (2, 1));
        assert_eq!(g.max, Duration::from_micros(7_010));
        assert_eq!(g.total, Duration::from_micros(7_010 + 2_010));
    }
}
