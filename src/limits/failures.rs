//! A gate on repeated failures from one client address: after `burst`
//! failures, one more is allowed per `per / count`, and until then the
//! address is refused before its request is looked at (API keys: a client
//! guessing keys, or one with a revoked key retrying in a loop).
//!
//! Owns the arithmetic's use for failures only (GCRA, `gcra.rs`, in
//! bounded buckets, `buckets.rs`); what counts as a failure is the caller's.

use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

use super::buckets::Buckets;
use super::gcra::Gcra;
use crate::policy::Rate;

pub struct FailureGate {
    gcra: Gcra,
    buckets: Buckets,
    epoch: Instant,
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
        }
    }

    fn now(&self) -> u64 {
        let since = crate::clock::now().saturating_duration_since(self.epoch);
        u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
    }

    /// An IPv6 client holds a whole /64: one bucket for all of it.
    fn key(client: IpAddr) -> u64 {
        let h = match client {
            IpAddr::V6(v6) => blake3::hash(&v6.octets()[..8]),
            IpAddr::V4(v4) => blake3::hash(&v4.octets()),
        };
        u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
    }

    /// When `client` may try again, if it has failed too often.
    pub fn refused(&self, client: IpAddr) -> Option<Duration> {
        let now = self.now();
        self.buckets.with(Self::key(client), now, false, |tat| {
            self.gcra.would_refuse(tat, now, 1).map(|r| r.retry_after)
        })
    }

    /// Counts one failure of `client`'s.
    pub fn failed(&self, client: IpAddr) {
        let now = self.now();
        self.buckets.with(Self::key(client), now, true, |tat| {
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
