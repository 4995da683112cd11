//! When a failed attempt may be tried again: the pool's retry budget, the
//! jittered exponential back-off between tries, and the copy of a request
//! that lets it be sent again.
//!
//! The budget (Finagle's idea) keeps retries to about a fifth of requests,
//! plus a floor of ten a second so a quiet pool can still fail over: an
//! outage then adds at most ~20% load instead of multiplying it. Which
//! failures are retryable, and on which server, is `upstream`'s business.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Uri, Version};
use tokio::time::Instant;

use crate::body::RequestBody;

/// Each request earns this much of a retry (in thousandths).
const EARNED_PER_REQUEST: i64 = 200;
/// One retry, in thousandths.
const RETRY: i64 = 1000;
/// Retries that can be banked, in thousandths: a long quiet spell does not
/// save up for a storm.
const BANK_CAP: i64 = 100 * RETRY;
/// Retries allowed whatever the traffic: ten a second, in bursts of ten.
const FLOOR_INTERVAL: u64 = 100_000_000;
const FLOOR_BURST: u64 = 1_000_000_000;

pub struct RetryBudget {
    bank: AtomicI64,
    /// GCRA theoretical arrival time of the floor's allowance (ns since epoch).
    floor_tat: AtomicU64,
    epoch: Instant,
}

impl RetryBudget {
    pub fn new() -> Self {
        RetryBudget {
            bank: AtomicI64::new(0),
            floor_tat: AtomicU64::new(0),
            epoch: crate::clock::now(),
        }
    }

    /// A request was sent: it earns a share of a retry.
    pub fn earn(&self) {
        if self.bank.load(Ordering::Relaxed) < BANK_CAP {
            self.bank.fetch_add(EARNED_PER_REQUEST, Ordering::Relaxed);
        }
    }

    /// Takes one retry from the budget, if there is one.
    pub fn spend(&self, now: Instant) -> bool {
        let taken = self
            .bank
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b >= RETRY).then_some(b - RETRY)
            });
        if taken.is_ok() {
            return true;
        }
        let now =
            u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        self.floor_tat
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tat| {
                let next = tat.max(now) + FLOOR_INTERVAL;
                (next <= now + FLOOR_BURST).then_some(next)
            })
            .is_ok()
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget::new()
    }
}

/// The pause before retry number `n` (1-based): 25 ms doubling, at most
/// 1 s, drawn between half and all of it so clients that failed together
/// do not come back together.
pub fn back_off(n: u32) -> Duration {
    let full = Duration::from_millis(25)
        .saturating_mul(1 << n.saturating_sub(1).min(6))
        .min(Duration::from_secs(1));
    let half = full / 2;
    half + half.mul_f64(fastrand::f64())
}

/// What a request needs to be sent again after its first copy was used up:
/// kept for idempotent requests whose body is in hand, and almost never used.
///
/// The head is copied out as bytes rather than cloned field by field. A
/// clone of a parsed field shares hyper's read buffer (an atomic count up,
/// and one down), and a replay, dropped when the answer arrives, was that
/// buffer's last owner: it freed 8 KB gone cold, ~1.5 last-level cache
/// misses per request under callgrind's cache simulation. A retry parses
/// the bytes back into a request.
pub struct Replay {
    method: Method,
    /// The request target, then each field's name and value, in order, each
    /// piece behind its length (4 bytes, little-endian).
    head: Box<[u8]>,
    body: Bytes,
}

impl Replay {
    /// `None` while the body still streams from the client.
    pub fn of(req: &Request<RequestBody>) -> Option<Replay> {
        let body = req.body().replayable()?;
        let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        let mut head = Vec::with_capacity(512);
        let mut put = |piece: &[u8]| {
            head.extend_from_slice(&(piece.len() as u32).to_le_bytes());
            head.extend_from_slice(piece);
        };
        put(target.as_bytes());
        for (name, value) in req.headers() {
            put(name.as_str().as_bytes());
            put(value.as_bytes());
        }
        Some(Replay {
            method: req.method().clone(),
            head: head.into_boxed_slice(),
            body,
        })
    }

    /// The request again, as an HTTP/1.1 request. `None` only if the copy
    /// no longer parses, which would be a bug: the request is then not
    /// retried.
    pub fn request(&self) -> Option<Request<RequestBody>> {
        let mut rest = &self.head[..];
        let mut next = || {
            let (len, tail) = rest.split_first_chunk::<4>()?;
            let (piece, tail) = tail.split_at_checked(u32::from_le_bytes(*len) as usize)?;
            rest = tail;
            Some(piece)
        };
        let mut req = Request::new(RequestBody::buffered(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = Uri::try_from(next()?).ok()?;
        *req.version_mut() = Version::HTTP_11;
        while let Some(name) = next() {
            let name = HeaderName::from_bytes(name).ok()?;
            let value = HeaderValue::from_bytes(next()?).ok()?;
            req.headers_mut().append(name, value);
        }
        Some(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_is_the_same_request_again() {
        let mut req = Request::get("/v1/models?x=1%20y")
            .header("host", "api.example")
            .header("x-forwarded-for", "10.0.0.1")
            .header("accept", "text/plain")
            .header("accept", "application/json")
            .header("x-odd", "caf\u{e9} \tbar".as_bytes())
            .body(RequestBody::buffered(Bytes::from_static(b"{}")))
            .unwrap();
        *req.version_mut() = Version::HTTP_11;
        let replay = Replay::of(&req).expect("the body is in hand");
        for _ in 0..2 {
            let again = replay.request().expect("parses back");
            assert_eq!(again.method(), Method::GET);
            assert_eq!(again.uri(), "/v1/models?x=1%20y");
            assert_eq!(again.version(), Version::HTTP_11);
            assert_eq!(
                again.headers(),
                req.headers(),
                "every field, repeated ones in order"
            );
            assert_eq!(again.body().replayable().unwrap(), "{}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stay_near_a_fifth_of_requests_above_a_floor() {
        let b = RetryBudget::new();
        let now = Instant::now();
        // The floor: ten at once, then one every 100 ms.
        assert_eq!((0..20).filter(|_| b.spend(now)).count(), 10);
        assert!(!b.spend(now + Duration::from_millis(50)));
        assert!(b.spend(now + Duration::from_millis(100)));
        // 400 requests earn 80 retries (and the floor is spent)…
        for _ in 0..400 {
            b.earn();
        }
        let t = now + Duration::from_millis(100);
        assert_eq!((0..1000).filter(|_| b.spend(t)).count(), 80);
        // … and no more than 100 are ever banked.
        for _ in 0..10_000 {
            b.earn();
        }
        assert_eq!((0..1000).filter(|_| b.spend(t)).count(), 100);
    }

    #[test]
    fn back_off_doubles_with_jitter_and_is_capped() {
        for n in 1..10 {
            let d = back_off(n);
            let full = Duration::from_millis(25 << (n - 1).min(6)).min(Duration::from_secs(1));
            assert!(d >= full / 2 && d <= full, "{n}: {d:?}");
        }
    }
}
