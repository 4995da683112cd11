//! A gate on repeated failures from one client address: after `burst`
//! failures, one more is allowed per `per / count`, and until then the
//! address is refused before its request is looked at (API keys: a client
//! guessing keys, or one with a revoked key retrying in a loop).
//!
//! Owns the arithmetic's use for failures only (GCRA, `gcra.rs`, in
//! bounded buckets, `buckets.rs`); what counts as a failure is the caller's.

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::buckets::Buckets;
use super::gcra::Gcra;
use crate::policy::Rate;

pub struct FailureGate {
    gcra: Gcra,
    buckets: Buckets,
    epoch: Instant,
    /// Keyed per process, so a client cannot aim for another's bucket.
    hasher: RandomState,
    /// When the last failure was counted (`now()`, 0: never): while none
    /// is recent enough to have left a bucket refusing, nothing is looked
    /// up (most traffic, every request, presents a good key).
    last_failure: AtomicU64,
    /// How long a full bucket takes to drain.
    drains_in: u64,
}

/// Addresses remembered at most (the most rested go first).
const MAX_ADDRESSES: u64 = 100_000;

impl FailureGate {
    /// `count` failures per `per` per address, `count` of them at once.
    pub fn new(count: u64, per: Duration) -> FailureGate {
        let gcra = Gcra::new(Rate { count, per }, count);
        FailureGate {
            buckets: Buckets::new(MAX_ADDRESSES, gcra.sweep_interval()),
            gcra,
            epoch: crate::clock::now(),
            hasher: RandomState::new(),
            last_failure: AtomicU64::new(0),
            drains_in: u64::try_from(per.as_nanos()).unwrap_or(u64::MAX),
        }
    }

    fn now(&self) -> u64 {
        let since = crate::clock::now().saturating_duration_since(self.epoch);
        u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
    }

    /// An IPv6 client holds a whole /64: one bucket for all of it.
    fn key(&self, client: IpAddr) -> u64 {
        match client {
            IpAddr::V6(v6) => self.hasher.hash_one(&v6.octets()[..8]),
            IpAddr::V4(v4) => self.hasher.hash_one(v4.octets()),
        }
    }

    /// When `client` may try again, if it has failed too often.
    pub fn refused(&self, client: IpAddr) -> Option<Duration> {
        let now = self.now();
        let last = self.last_failure.load(Ordering::Relaxed);
        if last == 0 || now.saturating_sub(last) > self.drains_in {
            return None;
        }
        self.buckets.with(self.key(client), now, false, |tat| {
            self.gcra.would_refuse(tat, now, 1).map(|r| r.retry_after)
        })
    }

    /// Counts one failure of `client`'s.
    pub fn failed(&self, client: IpAddr) {
        let now = self.now();
        // 0 stands for never.
        self.last_failure.store(now.max(1), Ordering::Relaxed);
        self.buckets.with(self.key(client), now, true, |tat| {
            self.gcra.charge(tat, now, 1)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_address_is_refused_after_its_burst_and_let_in_again_later() {
        let gate = FailureGate::new(3, Duration::from_secs(60));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..3 {
            assert_eq!(gate.refused(a), None);
            gate.failed(a);
        }
        let wait = gate.refused(a).expect("refused after 3 failures");
        assert!(wait <= Duration::from_secs(20), "{wait:?}");
        assert_eq!(gate.refused(b), None, "another address is not");
        let v6a: IpAddr = "2001:db8::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8::2".parse().unwrap();
        for _ in 0..3 {
            gate.failed(v6a);
        }
        assert!(gate.refused(v6b).is_some(), "one /64, one bucket");
        tokio::time::advance(Duration::from_secs(21)).await;
        assert_eq!(gate.refused(a), None, "one failure came back");
    }
}
