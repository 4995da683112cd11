//! The slowest recent requests, for the status page and
//! `GET /admin/status`: the few slowest requests finished in the last two
//! minutes, with what an operator needs to find them in the access log
//! (route, method, status, cache result, upstream, request id). Never a
//! path, a query, a body or a credential: paths can carry secrets, and the
//! route says which endpoint it was.
//!
//! Owns the list and its bound. What a request is, and when it ends, belong
//! to the access log, which offers each finished request here.
//!
//! The request path pays one atomic load and a compare: a request no slower
//! than the slowest list's shortest entry goes no further. Only a request
//! that enters the list takes the lock. Entries older than the window are
//! dropped when the list is read (the page reads it every 2 s) or when a
//! new entry arrives, and the entry bar is lowered then, so a burst of slow
//! requests does not keep later ones out for longer than the window.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::time::Instant;

/// How many requests the list keeps.
pub const KEEP: usize = 10;

/// How long a request stays in the list.
pub const WINDOW: Duration = Duration::from_secs(120);

/// One slow request, as the status page lists it.
#[derive(Clone, Debug, Serialize)]
pub struct SlowRequest {
    /// When it ended: seconds since the Unix epoch.
    pub ended_unix: f64,
    pub method: String,
    pub route: Option<String>,
    pub status: u16,
    pub duration_ms: f64,
    pub cache: &'static str,
    pub upstream: Option<String>,
    pub request_id: String,
    /// The proxy's error code, when it answered with one.
    pub error: Option<&'static str>,
    #[serde(skip)]
    ended: Instant,
}

/// The list; one per process.
pub struct Slowest {
    /// The duration, in microseconds, a request must exceed to enter the
    /// list: the shortest listed when it is full, else 0.
    bar_us: AtomicU64,
    list: Mutex<Vec<SlowRequest>>,
}

static SLOWEST: Slowest = Slowest {
    bar_us: AtomicU64::new(0),
    list: Mutex::new(Vec::new()),
};

/// What a finished request offers the list.
pub struct Finished<'a> {
    pub method: &'a http::Method,
    pub route: Option<&'a Arc<str>>,
    pub status: u16,
    pub took: Duration,
    pub cache: &'static str,
    pub upstream: Option<&'a Arc<str>>,
    pub request_id: &'a http::HeaderValue,
    pub error: Option<&'static str>,
}

/// Offers a finished request: kept when it is among the slowest recent.
#[inline]
pub fn offer(f: Finished<'_>) {
    let us = u64::try_from(f.took.as_micros()).unwrap_or(u64::MAX);
    if us <= SLOWEST.bar_us.load(Ordering::Relaxed) {
        return;
    }
    SLOWEST.enter(f, us);
}

/// The list, slowest first, after dropping what is older than the window.
pub fn recent() -> Vec<SlowRequest> {
    SLOWEST.recent(Instant::now())
}

impl Slowest {
    #[cold]
    fn enter(&self, f: Finished<'_>, us: u64) {
        let now = Instant::now();
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        expire(&mut list, now);
        if list.len() >= KEEP {
            // Sorted slowest first: the last is the shortest.
            if list
                .last()
                .is_some_and(|s| s.duration_ms * 1e3 >= us as f64)
            {
                self.set_bar(&list);
                return;
            }
            list.pop();
        }
        let ended_unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let entry = SlowRequest {
            ended_unix,
            method: f.method.as_str().chars().take(16).collect(),
            route: f.route.map(|r| r.to_string()),
            status: f.status,
            duration_ms: us as f64 / 1e3,
            cache: f.cache,
            upstream: f.upstream.map(|u| u.to_string()),
            request_id: f
                .request_id
                .to_str()
                .unwrap_or("-")
                .chars()
                .take(64)
                .collect(),
            error: f.error,
            ended: now,
        };
        let at = list.partition_point(|s| s.duration_ms >= entry.duration_ms);
        list.insert(at, entry);
        self.set_bar(&list);
    }

    fn recent(&self, now: Instant) -> Vec<SlowRequest> {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        expire(&mut list, now);
        self.set_bar(&list);
        list.clone()
    }

    fn set_bar(&self, list: &[SlowRequest]) {
        let bar = if list.len() >= KEEP {
            list.last().map_or(0, |s| (s.duration_ms * 1e3) as u64)
        } else {
            0
        };
        self.bar_us.store(bar, Ordering::Relaxed);
    }
}

fn expire(list: &mut Vec<SlowRequest>, now: Instant) {
    list.retain(|s| now.saturating_duration_since(s.ended) < WINDOW);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer_to(list: &Slowest, ms: u64, id: &str) {
        let method = http::Method::POST;
        let rid = http::HeaderValue::from_str(id).unwrap();
        let f = Finished {
            method: &method,
            route: None,
            status: 200,
            took: Duration::from_millis(ms),
            cache: "MISS",
            upstream: None,
            request_id: &rid,
            error: None,
        };
        let us = ms * 1000;
        if us > list.bar_us.load(Ordering::Relaxed) {
            list.enter(f, us);
        }
    }

    #[test]
    fn keeps_the_slowest_few_slowest_first_and_raises_its_bar() {
        let list = Slowest {
            bar_us: AtomicU64::new(0),
            list: Mutex::new(Vec::new()),
        };
        for ms in 1..=30u64 {
            offer_to(&list, (ms * 7) % 31 + 1, &format!("r{ms}"));
        }
        let got = list.recent(Instant::now());
        assert_eq!(got.len(), KEEP);
        let ms: Vec<f64> = got.iter().map(|s| s.duration_ms).collect();
        assert_eq!(ms[0], 31.0);
        assert!(ms.windows(2).all(|w| w[0] >= w[1]), "{ms:?}");
        assert_eq!(list.bar_us.load(Ordering::Relaxed), 22_000);
    }

    #[test]
    fn old_entries_leave_and_the_bar_falls() {
        let list = Slowest {
            bar_us: AtomicU64::new(0),
            list: Mutex::new(Vec::new()),
        };
        for ms in 100..100 + KEEP as u64 {
            offer_to(&list, ms, "slow");
        }
        assert!(list.bar_us.load(Ordering::Relaxed) > 0);
        let later = Instant::now() + WINDOW + Duration::from_secs(1);
        assert!(list.recent(later).is_empty());
        assert_eq!(list.bar_us.load(Ordering::Relaxed), 0);
    }
}
