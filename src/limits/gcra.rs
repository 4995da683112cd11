//! GCRA (the generic cell rate algorithm) over one atomic per bucket.
//!
//! A bucket is one number: its theoretical arrival time (TAT), the moment it
//! will be full again. Spending `n` units moves the TAT `n` emission
//! intervals later; a spend is refused when that would put the TAT more than
//! one burst's worth of intervals ahead of now. Denials change nothing.
//!
//! Unlike the classic form, a bucket here can also be settled after the fact
//! (a token limit reserves an estimate, then charges or refunds the
//! difference), and spends can be undone (a route's second limiter refusing
//! after the first allowed). That is why this is not `governor`: its
//! limiters charge on check and have no way to give back or add units.
//!
//! Time is nanoseconds since the limiter's epoch, read from tokio's clock so
//! tests can pause it. This module owns the arithmetic only; keys and stores
//! live in `limits`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::policy::Rate;

/// A limiter's shape: how fast units come back and how many fit at once.
#[derive(Clone, Copy, Debug)]
pub struct Gcra {
    /// Nanoseconds for one unit to come back (the emission interval).
    interval: u64,
    /// Nanoseconds for an empty bucket to fill: `interval × burst`.
    window: u64,
    burst: u64,
}

/// A bucket's state after a decision, for the `RateLimit-*` headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Level {
    /// Units that could be spent right now.
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
}

/// A refused spend: when it would fit, and the bucket as it stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub retry_after: Duration,
    pub level: Level,
}

impl Gcra {
    pub fn new(rate: Rate, burst: u64) -> Self {
        let per = u64::try_from(rate.per.as_nanos()).unwrap_or(u64::MAX);
        let interval = per.div_ceil(rate.count.max(1)).max(1);
        let burst = burst.max(1);
        Gcra {
            interval,
            window: interval.saturating_mul(burst),
            burst,
        }
    }

    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// Nanoseconds for one unit to come back.
    pub fn interval_nanos(&self) -> u64 {
        self.interval
    }

    /// Nanoseconds for an empty bucket to fill.
    pub fn window_nanos(&self) -> u64 {
        self.window
    }

    /// Nanoseconds between a store's looks for rested buckets to forget:
    /// two windows, so a bucket is idle a while before it goes.
    pub fn sweep_interval(&self) -> u64 {
        self.window.saturating_mul(2)
    }

    /// Spends `n` units (at most a whole burst, so any spend can succeed
    /// once the bucket is rested) if they fit now.
    pub fn spend(&self, tat: &AtomicU64, now: u64, n: u64) -> Result<Level, Refusal> {
        let cost = n.min(self.burst).saturating_mul(self.interval);
        let mut cur = tat.load(Ordering::Acquire);
        loop {
            let next = cur.max(now).saturating_add(cost);
            let ahead = next - now;
            if ahead > self.window {
                return Err(Refusal {
                    retry_after: Duration::from_nanos(ahead - self.window),
                    level: self.level(cur, now),
                });
            }
            match tat.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(self.level(next, now)),
                Err(seen) => cur = seen,
            }
        }
    }

    /// Gives back `n` units spent earlier (never more than fills the bucket).
    pub fn refund(&self, tat: &AtomicU64, now: u64, n: u64) {
        let back = n.saturating_mul(self.interval);
        let _ = tat.fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
            (cur > now).then(|| cur.saturating_sub(back).max(now))
        });
    }

    /// Charges `n` more units without asking: the bucket may go into debt,
    /// refusing everything until time has paid it off.
    pub fn charge(&self, tat: &AtomicU64, now: u64, n: u64) {
        let cost = n.saturating_mul(self.interval);
        let _ = tat.fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
            Some(cur.max(now).saturating_add(cost))
        });
    }

    /// Whether spending `n` units now would be refused, and if so when it
    /// would fit; nothing is spent.
    pub fn would_refuse(&self, tat: &AtomicU64, now: u64, n: u64) -> Option<Refusal> {
        let cost = n.min(self.burst).saturating_mul(self.interval);
        let cur = tat.load(Ordering::Acquire);
        let ahead = cur.max(now).saturating_add(cost) - now;
        (ahead > self.window).then(|| Refusal {
            retry_after: Duration::from_nanos(ahead - self.window),
            level: self.level(cur, now),
        })
    }

    /// The bucket as it stands, without spending.
    pub fn peek(&self, tat: &AtomicU64, now: u64) -> Level {
        self.level(tat.load(Ordering::Acquire), now)
    }

    fn level(&self, tat: u64, now: u64) -> Level {
        let ahead = tat.saturating_sub(now);
        Level {
            remaining: self.window.saturating_sub(ahead) / self.interval,
            reset: Duration::from_nanos(ahead),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn per_sec(count: u64, burst: u64) -> Gcra {
        Gcra::new(
            Rate {
                count,
                per: Duration::from_secs(1),
            },
            burst,
        )
    }

    #[test]
    fn a_rested_bucket_allows_its_burst_then_refills_at_the_rate() {
        let g = per_sec(10, 3);
        let tat = AtomicU64::new(0);
        let now = 100 * SEC;
        assert_eq!(g.spend(&tat, now, 1).unwrap().remaining, 2);
        assert_eq!(g.spend(&tat, now, 1).unwrap().remaining, 1);
        let last = g.spend(&tat, now, 1).unwrap();
        assert_eq!(last.remaining, 0);
        assert_eq!(last.reset, Duration::from_millis(300));
        let refused = g.spend(&tat, now, 1).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_millis(100));
        // A refusal spends nothing: 100 ms later one unit is back.
        assert_eq!(g.spend(&tat, now + SEC / 10, 1).unwrap().remaining, 0);
        assert!(g.spend(&tat, now + SEC / 10, 1).is_err());
        // Fully rested after the window.
        assert_eq!(g.peek(&tat, now + SEC).remaining, 3);
    }

    #[test]
    fn refunds_and_charges_settle_a_reservation() {
        let g = per_sec(100, 100);
        let tat = AtomicU64::new(0);
        let now = 10 * SEC;
        g.spend(&tat, now, 80).unwrap();
        // Used 30 of the 80 reserved.
        g.refund(&tat, now, 50);
        assert_eq!(g.peek(&tat, now).remaining, 70);
        // A refund never fills past full.
        g.refund(&tat, now, 1_000);
        assert_eq!(g.peek(&tat, now).remaining, 100);
        // Used far more than reserved: in debt, refused until it recovers.
        g.spend(&tat, now, 10).unwrap();
        g.charge(&tat, now, 1_000);
        let refused = g.spend(&tat, now, 1).unwrap_err();
        // 1,010 units used: 10.1 s ahead, so 9.1 s + 10 ms until one fits.
        assert_eq!(refused.retry_after, Duration::from_millis(9_110));
        assert!(g.spend(&tat, now + 10 * SEC, 100).is_err());
        assert!(g.spend(&tat, now + 10_100_000_000, 100).is_ok());
    }

    #[test]
    fn a_spend_larger_than_the_burst_costs_the_burst() {
        let g = per_sec(1, 5);
        let tat = AtomicU64::new(0);
        assert_eq!(g.spend(&tat, SEC, 50).unwrap().remaining, 0);
    }
}
