//! Request and token rate limits, and the `RateLimit-*` headers clients see.
//!
//! `Limits` holds every `[rate_limits.NAME]` limiter and every upstream's
//! concurrency limit for the whole process (workers share them), and carries
//! their state over a policy reload when a definition did not change.
//! `RouteLimits` is one route's `rate_limit` list: it decides whether a
//! request may go on (every limiter must allow; a refusal undoes what the
//! others spent) and what the headers say.
//!
//! The GCRA arithmetic is in `gcra`, the concurrency queue in `inflight`,
//! reading token counts from requests and responses in `tokens`. Where the
//! checks sit in the request path (cache hits are free unless a limiter says
//! `count_hits`) is the handler's business.

mod buckets;
pub mod failures;
pub mod fair_line;
mod gcra;
pub mod inflight;
mod numerals;
pub mod per_key;
mod shared;
pub mod tokens;

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::time::Instant;

use buckets::Buckets;
pub use fair_line::{LineTenant, Place};
use gcra::Gcra;
pub use gcra::Level;
pub use inflight::{InflightLimit, InflightSlot, NoSlot};
pub use tokens::TokenMeter;

use crate::policy::{LimitKey, LimitUnit, Policy, RateLimitPolicy, WhenAbsent};
use crate::shared::SharedTier;
use shared::{SharedBuckets, SharedKey};

pub const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
pub const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// Every limiter of the process.
pub struct Limits {
    rate: Vec<Arc<RateLimiter>>,
    inflight: Vec<(String, Arc<InflightLimit>)>,
}

/// One `[rate_limits.NAME]` with its buckets.
pub struct RateLimiter {
    pub policy: Arc<RateLimitPolicy>,
    gcra: Gcra,
    /// Bucket TATs by hashed key, at most `max_keys` of them.
    buckets: Buckets,
    /// Keyed per limiter, so a client cannot aim for another's bucket.
    hasher: RandomState,
    epoch: Instant,
    limit_text: &'static str,
    /// The fleet's buckets, with a shared tier: decisions are made there
    /// while it answers, the local buckets mirroring them.
    shared: Option<Arc<SharedBuckets>>,
}

/// One limiter for the admin API (`/admin/limits`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct LimiterReport {
    pub name: String,
    pub key: String,
    pub unit: &'static str,
    pub rate: String,
    pub burst: u64,
    pub tracked_keys: u64,
    pub max_keys: u64,
    /// The most spent buckets, most spent first.
    pub busiest: Vec<BucketReport>,
}

/// One bucket: its key's hash, and where it stands.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BucketReport {
    pub key: String,
    pub remaining: u64,
    pub reset_seconds: f64,
}

/// Who a request is, as limiters key it.
pub struct Subject<'a> {
    pub client: IpAddr,
    pub headers: &'a HeaderMap,
    /// The name of the API key the request presented.
    pub tenant: Option<&'a str>,
    pub route: &'a str,
    /// When the check happens: read once for all of a route's limiters.
    pub at: Instant,
}

/// A route's limiters, in the order the route names them.
#[derive(Clone, Default)]
pub struct RouteLimits {
    limiters: Arc<[Arc<RateLimiter>]>,
}

/// Which of a route's limiters a check covers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Stage {
    /// Limiters that count every request, cache hits included: checked
    /// before the cache is asked.
    Arrival,
    /// The others: checked only when the request goes upstream.
    Upstream,
}

/// Which of a stage's limiters a check covers: request-count limiters are
/// checked before a request body is read (their keys never depend on it),
/// token limiters once it has been (their cost does).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Counting {
    Requests,
    Tokens,
    All,
}

impl Counting {
    fn covers(self, limiter: &RateLimiter) -> bool {
        match self {
            Counting::Requests => !limiter.counts_tokens(),
            Counting::Tokens => limiter.counts_tokens(),
            Counting::All => true,
        }
    }
}

/// What a request spent from one bucket.
pub struct Spent {
    limiter: Arc<RateLimiter>,
    key: u64,
    /// The fleet's bucket, when the spend was made there.
    shared: Option<SharedKey>,
    units: u64,
    /// The bucket's level right after the spend.
    level: LimitHeaders,
}

/// The spends of an allowed request. Dropping it keeps them; token spends
/// are settled by a `TokenMeter` once the answer's size is known.
#[derive(Default)]
pub struct Admission {
    spent: Vec<Spent>,
    /// The most constrained bucket seen, for the headers.
    pub headers: Option<LimitHeaders>,
    /// Token limiters' reservation and its prompt part, once estimated.
    pub estimate: Option<(u64, u64)>,
}

/// A refused request: which limiter, and when to come back.
#[derive(Debug)]
pub struct Refused {
    pub limiter: String,
    pub retry_after: Duration,
    pub headers: LimitHeaders,
}

/// `RateLimit-Limit`, `-Remaining` and `-Reset` (seconds) of one bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitHeaders {
    pub limit: u64,
    pub remaining: u64,
    pub reset: Duration,
    /// `limit` as text, made once per limiter.
    limit_text: &'static str,
}

// === impl Limits ===

impl Limits {
    /// The limiters `policy` names. A limiter of `previous` whose definition
    /// is unchanged is kept, buckets and all; the others start rested.
    pub fn new(policy: &Policy, previous: Option<&Limits>) -> Self {
        Limits::with_shared(policy, previous, None)
    }

    /// Like `new`; with `shared`, rate limits are the fleet's (decided in
    /// Redis while it answers).
    pub fn with_shared(
        policy: &Policy,
        previous: Option<&Limits>,
        shared: Option<&Arc<SharedTier>>,
    ) -> Self {
        let rate = policy
            .rate_limits
            .iter()
            .map(|p| {
                previous
                    .and_then(|prev| prev.rate.iter().find(|l| *l.policy == **p))
                    .cloned()
                    .unwrap_or_else(|| Arc::new(RateLimiter::with_shared(p.clone(), shared)))
            })
            .collect();
        let inflight = policy
            .upstreams
            .iter()
            .filter_map(|u| {
                let max = u.max_inflight_per_server?;
                let same = previous.and_then(|prev| {
                    prev.inflight
                        .iter()
                        .find(|(name, l)| *name == u.name && l.same_shape(u, max))
                });
                let limit = match same {
                    Some((_, l)) => l.clone(),
                    None => Arc::new(InflightLimit::new(
                        u.servers.len(),
                        max,
                        u.queue_timeout,
                        u.queue,
                    )),
                };
                Some((u.name.clone(), limit))
            })
            .collect();
        Limits { rate, inflight }
    }

    /// The limiters of a route, in its order.
    pub fn for_route(&self, names: &[Arc<RateLimitPolicy>]) -> RouteLimits {
        let limiters: Vec<Arc<RateLimiter>> = names
            .iter()
            .filter_map(|p| self.rate.iter().find(|l| l.policy.name == p.name).cloned())
            .collect();
        RouteLimits {
            limiters: limiters.into(),
        }
    }

    /// The concurrency limit of upstream `name`, if it has one.
    /// Every rate limiter for operators, each with its `n` busiest buckets.
    pub fn report(&self, n: usize) -> Vec<LimiterReport> {
        self.rate.iter().map(|l| l.report(n)).collect()
    }

    pub fn inflight(&self, name: &str) -> Option<Arc<InflightLimit>> {
        self.inflight
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, l)| l.clone())
    }

    pub fn rate_limiter(&self, name: &str) -> Option<&Arc<RateLimiter>> {
        self.rate.iter().find(|l| l.policy.name == name)
    }
}

// === impl RateLimiter ===

impl RateLimiter {
    pub fn new(policy: Arc<RateLimitPolicy>) -> Self {
        RateLimiter::with_shared(policy, None)
    }

    pub fn with_shared(policy: Arc<RateLimitPolicy>, shared: Option<&Arc<SharedTier>>) -> Self {
        let gcra = Gcra::new(policy.rate, policy.burst);
        let buckets = Buckets::new(policy.max_keys, gcra.sweep_interval());
        let limit_text = numerals::interned(gcra.burst());
        let shared = shared.map(|t| Arc::new(SharedBuckets::new(t.clone(), &policy.name, &gcra)));
        RateLimiter {
            policy,
            gcra,
            buckets,
            hasher: RandomState::new(),
            epoch: crate::clock::now(),
            limit_text,
            shared,
        }
    }

    /// This limiter as operators see it: its definition, how many keys it
    /// tracks, and the `n` most spent buckets (by hashed key: the raw
    /// values are never kept).
    pub fn report(&self, n: usize) -> LimiterReport {
        let now = self.now();
        let busiest = self
            .buckets
            .busiest(n, now)
            .into_iter()
            .map(|(key, tat)| {
                let level = self.gcra.peek(&std::sync::atomic::AtomicU64::new(tat), now);
                BucketReport {
                    key: format!("{key:016x}"),
                    remaining: level.remaining,
                    reset_seconds: level.reset.as_secs_f64(),
                }
            })
            .collect();
        let p = &self.policy;
        LimiterReport {
            name: p.name.clone(),
            key: match &p.key {
                LimitKey::ClientIp => "client_ip".to_owned(),
                LimitKey::Header(h) => format!("header:{h}"),
                LimitKey::Tenant => "tenant".to_owned(),
                LimitKey::Route => "route".to_owned(),
                LimitKey::Global => "global".to_owned(),
            },
            unit: match p.unit {
                crate::policy::LimitUnit::Requests => "requests",
                crate::policy::LimitUnit::Tokens { .. } => "tokens",
            },
            rate: p.rate.to_string(),
            burst: p.burst,
            tracked_keys: self.buckets.len(),
            max_keys: p.max_keys,
            busiest,
        }
    }

    /// The bucket key of a request: never the raw value, only its hash.
    pub fn key(&self, subject: &Subject<'_>) -> u64 {
        with_key_material(&self.policy, subject, |m| self.hasher.hash_one(m))
    }

    fn now(&self) -> u64 {
        self.nanos(crate::clock::now())
    }

    /// `at` on this limiter's clock (a request older than the limiter, from
    /// before a reload, counts as its start).
    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn headers(&self, level: Level) -> LimitHeaders {
        LimitHeaders {
            limit: self.gcra.burst(),
            remaining: level.remaining,
            reset: level.reset,
            limit_text: self.limit_text,
        }
    }

    /// Spends `units` from `key`'s bucket if they fit.
    pub fn spend(
        &self,
        key: u64,
        at: Instant,
        units: u64,
    ) -> Result<LimitHeaders, (Duration, LimitHeaders)> {
        let now = self.nanos(at);
        match self
            .buckets
            .with(key, now, true, |tat| self.gcra.spend(tat, now, units))
        {
            Ok(level) => Ok(self.headers(level)),
            Err(r) => Err((r.retry_after, self.headers(r.level))),
        }
    }

    /// Spends `units` for `subject` (local bucket `key`): in the fleet's
    /// bucket while the shared tier answers, mirrored locally; else locally.
    /// Also returns the fleet's bucket when the spend was made there.
    async fn spend_shared(
        &self,
        subject: &Subject<'_>,
        key: u64,
        units: u64,
    ) -> (
        Result<LimitHeaders, (Duration, LimitHeaders)>,
        Option<SharedKey>,
    ) {
        if let Some(shared) = self.shared.as_ref().filter(|s| s.is_up()) {
            let fleet_key =
                with_key_material(&self.policy, subject, |m| shared.key(&self.policy.name, m));
            if let Some(decided) = shared.spend(&fleet_key, units).await {
                let level = match &decided {
                    Ok(level) => *level,
                    Err(r) => r.level,
                };
                // The local bucket follows, for peeks and for an outage.
                let now = self.now();
                let tat =
                    now.saturating_add(u64::try_from(level.reset.as_nanos()).unwrap_or(u64::MAX));
                self.buckets.with(key, now, true, |t| {
                    t.store(tat, std::sync::atomic::Ordering::Release)
                });
                return match decided {
                    Ok(level) => (Ok(self.headers(level)), Some(fleet_key)),
                    Err(r) => (Err((r.retry_after, self.headers(r.level))), None),
                };
            }
        }
        (self.spend(key, subject.at, units), None)
    }

    /// `key`'s bucket without spending. A key never seen is rested, and is
    /// not stored just for being looked at.
    pub fn peek(&self, key: u64, at: Instant) -> LimitHeaders {
        let now = self.nanos(at);
        let level = self
            .buckets
            .with(key, now, false, |tat| self.gcra.peek(tat, now));
        self.headers(level)
    }

    /// Settles a spend of `reserved` units that turned out to be `actual`
    /// (in the fleet's bucket too when it was spent there).
    pub fn settle(&self, key: u64, shared: Option<&SharedKey>, reserved: u64, actual: u64) {
        if let (Some(buckets), Some(fleet_key)) = (&self.shared, shared) {
            if actual != reserved {
                buckets.adjust(
                    fleet_key.clone(),
                    reserved > actual,
                    reserved.abs_diff(actual),
                );
            }
        }
        let now = self.now();
        self.buckets.with(key, now, true, |tat| {
            if actual > reserved {
                self.gcra.charge(tat, now, actual - reserved);
            } else if reserved > actual {
                self.gcra.refund(tat, now, reserved - actual);
            }
        });
    }

    /// Gives back `units` to `key`'s bucket (and the fleet's, when spent
    /// there); its level after.
    fn refund(&self, key: u64, shared: Option<&SharedKey>, units: u64) -> LimitHeaders {
        if let (Some(buckets), Some(fleet_key)) = (&self.shared, shared) {
            buckets.adjust(fleet_key.clone(), true, units);
        }
        let now = self.now();
        let level = self.buckets.with(key, now, false, |tat| {
            self.gcra.refund(tat, now, units);
            self.gcra.peek(tat, now)
        });
        self.headers(level)
    }

    /// Buckets held now, for tests and metrics.
    pub fn tracked_keys(&self) -> u64 {
        self.buckets.len()
    }

    fn stage(&self) -> Stage {
        if self.policy.count_hits {
            Stage::Arrival
        } else {
            Stage::Upstream
        }
    }

    fn counts_tokens(&self) -> bool {
        matches!(self.policy.unit, LimitUnit::Tokens { .. })
    }
}

/// What of a request picks its bucket under the limiter's key, handed to
/// `f`: the same bytes for the local buckets' hash and the fleet's digest.
/// Each kind of material is tagged so none can read like another: header
/// values and key names hold no NUL, which the other kinds start with.
fn with_key_material<R>(
    policy: &RateLimitPolicy,
    subject: &Subject<'_>,
    f: impl FnOnce(&[u8]) -> R,
) -> R {
    let absent = |f: &mut dyn FnMut(&[u8]) -> R| match policy.when_absent {
        WhenAbsent::ClientIp => client_material(subject.client, f),
        WhenAbsent::Shared => f(b"\0absent"),
    };
    let mut f = Some(f);
    let mut call = |m: &[u8]| (f.take().expect("called once"))(m);
    match &policy.key {
        LimitKey::ClientIp => client_material(subject.client, &mut call),
        LimitKey::Header(name) => match subject.headers.get(name) {
            Some(v) => call(v.as_bytes()),
            None => absent(&mut call),
        },
        LimitKey::Tenant => match subject.tenant {
            Some(t) => call(t.as_bytes()),
            None => absent(&mut call),
        },
        LimitKey::Route => call(subject.route.as_bytes()),
        LimitKey::Global => call(b""),
    }
}

/// A client address as key material. An IPv6 client holds a whole /64:
/// one bucket for all of it, or every address would be a fresh one.
fn client_material<R>(client: IpAddr, f: &mut dyn FnMut(&[u8]) -> R) -> R {
    let mut m = [0u8; 9];
    let len = match client {
        IpAddr::V6(v6) => {
            m[1..9].copy_from_slice(&v6.octets()[..8]);
            9
        }
        IpAddr::V4(v4) => {
            m[1..5].copy_from_slice(&v4.octets());
            5
        }
    };
    f(&m[..len])
}

// === impl RouteLimits ===

impl RouteLimits {
    pub fn is_empty(&self) -> bool {
        self.limiters.is_empty()
    }

    /// Whether any limiter counts tokens (the request body is then read
    /// ahead for its `max_tokens`).
    pub fn counts_tokens(&self) -> bool {
        self.limiters.iter().any(|l| l.counts_tokens())
    }

    /// Whether a token limiter is checked at `stage` (the estimate is then
    /// needed; a cache hit on a route whose token limiters let hits through
    /// never parses the request).
    pub fn counts_tokens_at(&self, stage: Stage) -> bool {
        self.limiters
            .iter()
            .any(|l| l.stage() == stage && l.counts_tokens())
    }

    /// Whether any limiter of `counting` is checked at `stage`.
    pub fn checks(&self, stage: Stage, counting: Counting) -> bool {
        self.limiters
            .iter()
            .any(|l| l.stage() == stage && counting.covers(l))
    }

    /// Spends from every limiter of `stage` (a token limiter spends `tokens`,
    /// clamped to its burst), or from none: when one refuses, what the others
    /// spent is given back.
    pub async fn admit(
        &self,
        subject: &Subject<'_>,
        stage: Stage,
        counting: Counting,
        tokens: u64,
        into: &mut Admission,
    ) -> Result<(), Refused> {
        let first = into.spent.len();
        for limiter in self
            .limiters
            .iter()
            .filter(|l| l.stage() == stage && counting.covers(l))
        {
            let key = limiter.key(subject);
            let units = match limiter.policy.unit {
                LimitUnit::Requests => 1,
                LimitUnit::Tokens { .. } => tokens.clamp(1, limiter.gcra.burst()),
            };
            let (decided, shared) = limiter.spend_shared(subject, key, units).await;
            match decided {
                Ok(level) => {
                    into.note(level);
                    into.spent.push(Spent {
                        limiter: limiter.clone(),
                        key,
                        shared,
                        units,
                        level,
                    });
                }
                Err((retry_after, headers)) => {
                    for s in into.spent.drain(first..) {
                        s.limiter.refund(s.key, s.shared.as_ref(), s.units);
                    }
                    return Err(Refused {
                        limiter: limiter.policy.name.clone(),
                        retry_after,
                        headers,
                    });
                }
            }
        }
        Ok(())
    }

    /// A request-count limiter of `stage` whose bucket for `subject` is
    /// empty: the request would be refused when it reached it. Asked before
    /// a request body is read, so a client out of budget is turned away
    /// without costing the read (it loses only a cache hit it might have
    /// had for free). Nothing is spent.
    pub fn exhausted(&self, subject: &Subject<'_>, stage: Stage) -> Option<Refused> {
        self.limiters
            .iter()
            .filter(|l| l.stage() == stage && !l.counts_tokens())
            .find_map(|limiter| {
                let key = limiter.key(subject);
                let now = limiter.nanos(subject.at);
                let refusal = limiter.buckets.with(key, now, false, |tat| {
                    limiter.gcra.would_refuse(tat, now, 1)
                })?;
                Some(Refused {
                    limiter: limiter.policy.name.clone(),
                    retry_after: refusal.retry_after,
                    headers: limiter.headers(refusal.level),
                })
            })
    }

    /// Notes the level of the limiters `admission` did not spend from (a
    /// cache hit still tells the client where it stands).
    pub fn peek_rest(&self, subject: &Subject<'_>, admission: &mut Admission) {
        for limiter in self.limiters.iter() {
            if admission
                .spent
                .iter()
                .any(|s| Arc::ptr_eq(&s.limiter, limiter))
            {
                continue;
            }
            let headers = limiter.peek(limiter.key(subject), subject.at);
            admission.note(headers);
        }
    }

    /// The default reservation of this route's token limiters (the largest).
    pub fn default_tokens(&self) -> u64 {
        self.limiters
            .iter()
            .filter_map(|l| match l.policy.unit {
                LimitUnit::Tokens { default_tokens } => Some(default_tokens),
                LimitUnit::Requests => None,
            })
            .max()
            .unwrap_or(0)
    }
}

// === impl Admission ===

impl Admission {
    /// Gives back everything spent: the request was refused further on, or
    /// answered without the upstream (a stale fallback). Headers showing a
    /// refunded bucket show it as it is now.
    pub fn refund_all(&mut self) {
        for s in self.spent.drain(..) {
            let level = s.limiter.refund(s.key, s.shared.as_ref(), s.units);
            if self.headers == Some(s.level) {
                self.headers = Some(level);
            }
        }
    }

    /// Keeps the bucket closest to empty (by share of its limit): the one
    /// the client will run into first.
    fn note(&mut self, h: LimitHeaders) {
        let tighter = match &self.headers {
            None => true,
            Some(cur) => {
                u128::from(h.remaining) * u128::from(cur.limit)
                    < u128::from(cur.remaining) * u128::from(h.limit)
            }
        };
        if tighter {
            self.headers = Some(h);
        }
    }

    /// The token spends, taken out to be settled by a `TokenMeter`.
    pub fn take_token_spends(&mut self) -> Vec<TokenSpend> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.spent.len() {
            if self.spent[i].limiter.counts_tokens() {
                let s = self.spent.swap_remove(i);
                out.push(TokenSpend {
                    limiter: s.limiter,
                    key: s.key,
                    shared: s.shared,
                    reserved: s.units,
                });
            } else {
                i += 1;
            }
        }
        out
    }
}

impl Drop for Admission {
    /// Token reservations not handed to a meter bought nothing (the client
    /// left while waiting, say): they go back. Request units stay spent.
    fn drop(&mut self) {
        for s in self.spent.iter().filter(|s| s.limiter.counts_tokens()) {
            s.limiter.refund(s.key, s.shared.as_ref(), s.units);
        }
    }
}

/// Tokens reserved from one bucket, settled with the real count.
pub struct TokenSpend {
    limiter: Arc<RateLimiter>,
    key: u64,
    shared: Option<SharedKey>,
    reserved: u64,
}

impl TokenSpend {
    pub fn settle(&self, actual: u64) {
        self.limiter
            .settle(self.key, self.shared.as_ref(), self.reserved, actual);
    }
}

// === impl LimitHeaders ===

impl LimitHeaders {
    /// Sets the three `RateLimit-*` fields (draft-ietf-httpapi-ratelimit-headers).
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert(RATELIMIT_LIMIT, HeaderValue::from_static(self.limit_text));
        headers.insert(RATELIMIT_REMAINING, numerals::count(self.remaining));
        headers.insert(RATELIMIT_RESET, numerals::count(whole_seconds(self.reset)));
    }
}

/// Seconds, rounded up: "come back in 0 s" would be a lie for 300 ms.
pub fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Policy {
        Policy::parse("test.toml", text).unwrap_or_else(|e| panic!("{e}"))
    }

    const POLICY: &str = r#"
[upstreams.up]
servers = [{ url = "http://127.0.0.1:1" }]
max_inflight_per_server = 2

[rate_limits.per_ip]
key = "client_ip"
rate = "5/min"

[rate_limits.per_route]
key = "route"
rate = "1/min"

[rate_limits.tokens]
key = "header:authorization"
tokens = "1000/hour"

[[route]]
name = "r"
upstream = "up"
rate_limit = ["per_ip", "per_route"]
"#;

    fn who(headers: &HeaderMap) -> Subject<'_> {
        Subject {
            client: "192.0.2.1".parse().unwrap(),
            headers,
            tenant: None,
            route: "r",
            at: Instant::now(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn every_limiter_must_allow_and_a_refusal_spends_nothing() {
        let p = policy(POLICY);
        let limits = Limits::new(&p, None);
        let route = limits.for_route(&p.routes[0].rate_limits);
        let headers = HeaderMap::new();
        let mut first = Admission::default();
        route
            .admit(
                &who(&headers),
                Stage::Upstream,
                Counting::All,
                0,
                &mut first,
            )
            .await
            .unwrap();
        // per_route (1/min) is the tighter: it is the one the headers show.
        assert_eq!(first.headers.unwrap().limit, 1);
        let refused = route
            .admit(
                &who(&headers),
                Stage::Upstream,
                Counting::All,
                0,
                &mut Admission::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(refused.limiter, "per_route");
        assert_eq!(refused.retry_after, Duration::from_secs(60));
        // per_ip gave back what it spent on the refused request: 4 left, not 3.
        let per_ip = limits.rate_limiter("per_ip").unwrap();
        assert_eq!(
            per_ip
                .peek(per_ip.key(&who(&headers)), Instant::now())
                .remaining,
            4
        );
        // Time (tokio's, paused) brings per_route back.
        tokio::time::advance(Duration::from_secs(60)).await;
        route
            .admit(
                &who(&headers),
                Stage::Upstream,
                Counting::All,
                0,
                &mut Admission::default(),
            )
            .await
            .unwrap();
    }

    #[test]
    fn ten_thousand_distinct_keys_stay_within_max_keys() {
        let p = policy(&POLICY.replace(
            "tokens = \"1000/hour\"",
            "tokens = \"1000/hour\"\nmax_keys = 1000",
        ));
        let limits = Limits::new(&p, None);
        let tokens = limits.rate_limiter("tokens").unwrap();
        for i in 0..10_000 {
            let mut headers = HeaderMap::new();
            headers.insert(
                http::header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer key-{i}")).unwrap(),
            );
            let key = tokens.key(&who(&headers));
            tokens.spend(key, Instant::now(), 10).unwrap();
        }
        assert!(tokens.tracked_keys() <= 1000, "{}", tokens.tracked_keys());
    }

    #[test]
    fn a_reload_keeps_the_state_of_unchanged_limiters_only() {
        let p = policy(POLICY);
        let before = Limits::new(&p, None);
        let headers = HeaderMap::new();
        for name in ["per_ip", "per_route"] {
            let l = before.rate_limiter(name).unwrap();
            l.spend(l.key(&who(&headers)), Instant::now(), 1).unwrap();
        }
        let slots = before.inflight("up").unwrap();
        let changed = policy(&POLICY.replace("rate = \"1/min\"", "rate = \"2/min\""));
        let after = Limits::new(&changed, Some(&before));
        let per_ip = after.rate_limiter("per_ip").unwrap();
        assert!(Arc::ptr_eq(per_ip, before.rate_limiter("per_ip").unwrap()));
        assert_eq!(
            per_ip
                .peek(per_ip.key(&who(&headers)), Instant::now())
                .remaining,
            4
        );
        let per_route = after.rate_limiter("per_route").unwrap();
        assert_eq!(
            per_route
                .peek(per_route.key(&who(&headers)), Instant::now())
                .remaining,
            2
        );
        assert!(Arc::ptr_eq(&after.inflight("up").unwrap(), &slots));
    }
}
