//! What the proxy knows about one upstream server, shared by every worker:
//! requests in flight, a peak-EWMA of its time to the response head, its
//! counters, and whether it may be chosen (passive ejection after failures
//! in a row, with exponential back-off, and the verdict of active checks).
//!
//! Everything here is atomics: the balancers read it on every pick. The
//! checks that feed it live in `health`; choosing among servers is
//! `balance`'s business.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// How fast the latency average forgets: Finagle's peak-EWMA default.
const DECAY: Duration = Duration::from_secs(10);
/// First passive ejection; each further one in a row doubles it…
const EJECT_BASE: Duration = Duration::from_secs(1);
/// … up to this.
const EJECT_MAX: Duration = Duration::from_secs(60);

pub struct ServerState {
    pub url: Arc<str>,
    pub weight: u32,
    in_flight: AtomicU32,
    /// Requests at the server that did not come from this proxy, by its
    /// engine's last report (`engine`), and until when (nanoseconds since
    /// `epoch`) that report stands: past it, the server is judged by this
    /// proxy's own count again.
    foreign: AtomicU32,
    foreign_until: AtomicU64,
    /// Whose engine polls may write `foreign`: the newest fleet's (a
    /// reload's new pollers start before the old ones are stopped).
    engine_owner: AtomicU64,
    requests: AtomicU64,
    failures: AtomicU64,
    /// Failures in a row; a success resets it.
    streak: AtomicU32,
    /// Passive ejections in a row (the back-off's exponent).
    ejections: AtomicU32,
    /// Nanoseconds since `epoch` until which the server is out; 0: in.
    ejected_until: AtomicU64,
    /// The active checks' verdict (true without checks).
    checked_healthy: AtomicBool,
    /// Why the server was last taken out, for operators.
    reason: Mutex<Option<String>>,
    /// Peak-EWMA of the time to the response head, in nanoseconds (f64
    /// bits), and when it was last updated.
    ewma: AtomicU64,
    ewma_at: AtomicU64,
    epoch: Instant,
}

/// One server as operators see it (the admin API).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerSnapshot {
    pub url: String,
    pub weight: u32,
    pub healthy: bool,
    /// Why not, when not.
    pub reason: Option<String>,
    pub in_flight: u32,
    pub ewma_ms: f64,
    pub requests: u64,
    pub failures: u64,
}

/// Counts a request in flight to a server until dropped (when the response
/// body ends, or the attempt fails).
pub struct InFlight {
    server: Arc<ServerState>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.server.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ServerState {
    pub fn new(url: Arc<str>, weight: u32, epoch: Instant) -> Self {
        ServerState {
            url,
            weight,
            in_flight: AtomicU32::new(0),
            foreign: AtomicU32::new(0),
            foreign_until: AtomicU64::new(0),
            engine_owner: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            streak: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            checked_healthy: AtomicBool::new(true),
            reason: Mutex::new(None),
            ewma: AtomicU64::new(0f64.to_bits()),
            ewma_at: AtomicU64::new(0),
            epoch,
        }
    }

    /// `at` on this server's clock (shared by the servers of one fleet, so
    /// a pick reads it once for all of them).
    pub fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether a balancer may choose this server at `now`.
    pub fn usable(&self, now: Instant) -> bool {
        self.usable_at(self.nanos(now))
    }

    /// `usable`, at `now` as `nanos` gives it.
    pub fn usable_at(&self, now: u64) -> bool {
        self.checked_healthy.load(Ordering::Relaxed)
            && self.ejected_until.load(Ordering::Relaxed) <= now
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// What a balancer weighs at `now` (as `nanos` gives it): this proxy's
    /// requests in flight, plus the others the server's engine last said it
    /// had, while that report stands.
    pub fn load_at(&self, now: u64) -> u32 {
        let mine = self.in_flight.load(Ordering::Relaxed);
        if self.foreign_until.load(Ordering::Relaxed) > now {
            mine.saturating_add(self.foreign.load(Ordering::Relaxed))
        } else {
            mine
        }
    }

    /// The server's engine reports `others` requests beyond this proxy's,
    /// a report that stands until `until` (`None`: forget the last one).
    pub fn set_foreign(&self, others: u32, until: Option<Instant>) {
        self.foreign.store(others, Ordering::Relaxed);
        self.foreign_until
            .store(until.map_or(0, |t| self.nanos(t)), Ordering::Relaxed);
    }

    /// Makes the caller's polls (and only theirs) the ones `set_foreign_as`
    /// heeds, and forgets the last report; returns the caller's token.
    pub fn claim_engine(&self) -> u64 {
        let token = self.engine_owner.fetch_add(1, Ordering::Relaxed) + 1;
        self.set_foreign(0, None);
        token
    }

    /// `set_foreign`, from the polls of `owner` (`claim_engine`): a
    /// superseded poller's last reading is dropped.
    pub fn set_foreign_as(&self, owner: u64, others: u32, until: Option<Instant>) {
        if self.engine_owner.load(Ordering::Relaxed) == owner {
            self.set_foreign(others, until);
        }
    }

    /// Counts one more request in flight (and in all).
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlight {
            server: self.clone(),
        }
    }

    /// The response head came after `latency`: the server works.
    pub fn succeeded(&self, latency: Duration, now: Instant) {
        self.observe(latency, now);
        if self.streak.load(Ordering::Relaxed) != 0 {
            self.streak.store(0, Ordering::Relaxed);
        }
        if self.ejections.load(Ordering::Relaxed) != 0 {
            self.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// A failure (connect error, reset before the head, a 5xx). After
    /// `eject_after` in a row the server is out for a back-off that doubles
    /// with each ejection in a row; with `may_eject` false (a pool of one,
    /// which has nowhere else to go) it is only counted.
    pub fn failed(&self, why: &str, eject_after: u32, may_eject: bool, now: Instant) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let streak = self.streak.fetch_add(1, Ordering::Relaxed) + 1;
        if !may_eject || streak < eject_after {
            return;
        }
        // A server that failed while already out (requests picked before the
        // ejection) is not ejected again for the same streak.
        let now_ns = self.nanos(now);
        if self.ejected_until.load(Ordering::Relaxed) > now_ns {
            return;
        }
        let n = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let back_off = EJECT_BASE.saturating_mul(1 << n).min(EJECT_MAX);
        self.ejected_until
            .store(now_ns + back_off.as_nanos() as u64, Ordering::Relaxed);
        self.streak.store(0, Ordering::Relaxed);
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!(
            "{streak} failures in a row (last: {why}); out for {}",
            humantime::format_duration(back_off)
        ));
        tracing::warn!(
            server = &*self.url,
            "upstream server taken out of rotation for {}: {streak} failures in a row, last: {why}",
            humantime::format_duration(back_off)
        );
    }

    /// The active checks' verdict changed.
    pub fn set_checked(&self, healthy: bool, why: Option<String>) {
        self.checked_healthy.store(healthy, Ordering::Relaxed);
        if healthy {
            // A server the checks bring back starts with a clean slate.
            self.ejected_until.store(0, Ordering::Relaxed);
            self.ejections.store(0, Ordering::Relaxed);
            self.streak.store(0, Ordering::Relaxed);
        }
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    /// The active checks keep passing: a passive ejection ends early (the
    /// back-off's exponent stays until a real request succeeds).
    pub fn passed_checks(&self, now: Instant) {
        if self.ejected_until.load(Ordering::Relaxed) > self.nanos(now) {
            self.ejected_until.store(0, Ordering::Relaxed);
            tracing::info!(
                server = &*self.url,
                "upstream server back in rotation: its health checks pass"
            );
        }
    }

    /// Folds a latency sample into the peak-EWMA: a slower sample is taken
    /// at once, a faster one is averaged in by how long it has been.
    fn observe(&self, latency: Duration, now: Instant) {
        let now_ns = self.nanos(now);
        let sample = latency.as_nanos() as f64;
        let prev = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        let next = if sample > prev {
            sample
        } else {
            let elapsed = now_ns.saturating_sub(self.ewma_at.load(Ordering::Relaxed)) as f64;
            let w = (-elapsed / DECAY.as_nanos() as f64).exp();
            prev * w + sample * (1.0 - w)
        };
        // Racing updates may lose a sample: an average does not mind.
        self.ewma.store(next.to_bits(), Ordering::Relaxed);
        self.ewma_at.store(now_ns, Ordering::Relaxed);
    }

    /// The latency average at `now`, decayed since its last sample so a
    /// server that was slow once and left alone is tried again. `None`
    /// before the first sample.
    pub fn latency(&self, now: Instant) -> Option<f64> {
        self.latency_at(self.nanos(now))
    }

    /// `latency`, at `now` as `nanos` gives it.
    pub fn latency_at(&self, now: u64) -> Option<f64> {
        let ewma = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        if ewma == 0.0 {
            return None;
        }
        let elapsed = now.saturating_sub(self.ewma_at.load(Ordering::Relaxed)) as f64;
        Some(ewma * (-elapsed / DECAY.as_nanos() as f64).exp())
    }

    pub fn snapshot(&self, now: Instant) -> ServerSnapshot {
        let healthy = self.usable(now);
        ServerSnapshot {
            url: self.url.to_string(),
            weight: self.weight,
            healthy,
            reason: if healthy {
                None
            } else {
                self.reason
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
            },
            in_flight: self.in_flight(),
            ewma_ms: self.latency(now).unwrap_or(0.0) / 1e6,
            requests: self.requests.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn failures_in_a_row_eject_with_a_doubling_back_off() {
        let s = ServerState::new("http://a".into(), 1, Instant::now());
        let now = Instant::now();
        s.failed("refused", 3, true, now);
        s.failed("refused", 3, true, now);
        assert!(s.usable(now));
        s.failed("refused", 3, true, now);
        assert!(!s.usable(now));
        assert!(s
            .snapshot(now)
            .reason
            .unwrap()
            .contains("3 failures in a row"));
        let later = now + Duration::from_secs(1);
        assert!(s.usable(later));
        // Back, and failing again: out for twice as long.
        for _ in 0..3 {
            s.failed("refused", 3, true, later);
        }
        assert!(!s.usable(later + Duration::from_millis(1999)));
        assert!(s.usable(later + Duration::from_secs(2)));
        // A success resets the back-off.
        s.succeeded(Duration::from_millis(5), later + Duration::from_secs(2));
        assert_eq!(s.ejections.load(Ordering::Relaxed), 0);
        // A pool of one never ejects its server.
        let alone = ServerState::new("http://b".into(), 1, Instant::now());
        for _ in 0..10 {
            alone.failed("refused", 3, false, now);
        }
        assert!(alone.usable(now));
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_newest_pollers_write_the_others_load() {
        let s = ServerState::new("http://a".into(), 1, Instant::now());
        let later = Some(Instant::now() + Duration::from_secs(3));
        let old = s.claim_engine();
        let load = |s: &ServerState| s.load_at(s.nanos(Instant::now()));
        s.set_foreign_as(old, 5, later);
        assert_eq!(load(&s), 5);
        // A reload's pool claims it: the old reading is gone, and the old
        // poller's next one is dropped.
        let new = s.claim_engine();
        assert_eq!(load(&s), 0);
        s.set_foreign_as(old, 7, later);
        assert_eq!(load(&s), 0);
        s.set_foreign_as(new, 2, later);
        assert_eq!(load(&s), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn latency_takes_peaks_at_once_and_forgets_them_slowly() {
        let s = ServerState::new("http://a".into(), 1, Instant::now());
        let t0 = Instant::now();
        assert_eq!(s.latency(t0), None);
        s.succeeded(Duration::from_millis(10), t0);
        s.succeeded(Duration::from_millis(500), t0);
        assert!((s.latency(t0).unwrap() - 500e6).abs() < 1.0);
        // Ten seconds later the peak has decayed to ~37%.
        let later = t0 + DECAY;
        let decayed = s.latency(later).unwrap();
        assert!((decayed / 500e6 - (-1f64).exp()).abs() < 0.01, "{decayed}");
    }
}
