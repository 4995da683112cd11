//! One request's dealings with the cache: before the upstream (look up, and
//! answer from a usable entry), and after (store, revalidate, fall back to
//! stale, invalidate).
//!
//! The handler calls `Cache::before` and, when told to go upstream, hands the
//! upstream's outcome to `Exchange`. What counts as fresh, storable or
//! usable stale is RFC 9111 (`control`) in `origin` mode, and the route's
//! `ttl` in `force` mode.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};

use super::conditional::{self, Precondition};
use super::control::{self, CacheControl};
use super::fill::{Follow, Lead, Role, Sent};
use super::shared::FleetLead;
use super::{
    BodyDigest, Cache, CacheKey, CacheStatus, Cost, Entry, KeyInput, Recorder, Recording,
    StoredBody, TenantScope,
};
use crate::body::ResponseBody;
use crate::error::ProxyError;
use crate::headers::X_CACHE;
use crate::policy::{BodyKey, Freshness, RouteCachePolicy};

/// How long a background refresh holds the fleet's claim on its key at
/// least (a route may coalesce for less, or not at all).
const SHARED_REFRESH_HOLD: Duration = Duration::from_secs(30);

/// The request as the cache needs it.
pub struct CacheQuery<'a> {
    pub route: &'a Arc<str>,
    pub method: &'a Method,
    pub host: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The whole body, on body-keyed routes.
    pub body: Option<&'a Bytes>,
    /// Its part of the key, when worked out ahead (a big body's, off the
    /// worker thread).
    pub body_digest: Option<&'a BodyDigest>,
    /// The API key the request presented, when Hyperion checked it.
    pub tenant: Option<TenantScope<'a>>,
    /// The upstream of a split route's arm the request takes.
    pub arm: Option<&'a str>,
    /// Told the request's key once it is worked out (a trace names it).
    pub key_seen: Option<&'a std::sync::OnceLock<CacheKey>>,
}

impl CacheQuery<'_> {
    /// What of it goes into its key.
    pub fn key_input(&self) -> KeyInput<'_> {
        KeyInput {
            route: self.route,
            method: self.method,
            host: self.host,
            path: self.path,
            query: self.query,
            headers: self.headers,
            body: self.body.map(|b| &b[..]),
            body_digest: self.body_digest,
            tenant: self.tenant,
            arm: self.arm,
        }
    }
}

/// What to do with a request on a caching route.
// Returned once per request and matched at once: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Before {
    /// Answered from the cache; with an exchange to run in the background
    /// (`Exchange::refresh`) when the entry is stale within
    /// `stale-while-revalidate`.
    Serve(Response<ResponseBody>, CacheStatus, Option<Exchange>),
    /// Answered with an error (`only-if-cached` and nothing stored).
    Fail(ProxyError),
    /// Go upstream, and give the answer to the exchange.
    Forward(Exchange),
    /// The same request is already on its way upstream: wait for its answer.
    Follow(Follow),
}

impl Before {
    /// What the lookup decided, in a word (for traces).
    pub fn describe(&self) -> &'static str {
        match self {
            Before::Serve(_, status, None) => status.as_str(),
            Before::Serve(_, _, Some(_)) => "STALE (refreshing)",
            Before::Fail(_) => "not cached (only-if-cached)",
            Before::Forward(ex) => ex.status.as_str(),
            Before::Follow(_) => "follow",
        }
    }
}

/// What became of the upstream's answer.
// Matched at once by its one caller; boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum After {
    /// Answered from a stored entry: a 304 refreshed it, or the upstream
    /// failed and it may be served stale.
    Entry(Arc<Entry>, CacheStatus),
    /// Passed on as it is, not stored.
    Pass(Response<ResponseBody>, CacheStatus),
    /// Stored once read cleanly to its end.
    Store(Response<ResponseBody>, Recording, CacheStatus),
}

/// A request on its way upstream, with what the cache knows about it.
pub struct Exchange {
    cache: Arc<Cache>,
    policy: Arc<RouteCachePolicy>,
    pub status: CacheStatus,
    /// `None`: the response will not be stored (bypass).
    key: Option<CacheKey>,
    /// A stored entry that was not usable as is: revalidated or stale fallback.
    stale: Option<Arc<Entry>>,
    client: CacheControl,
    method: Method,
    head: bool,
    route: Arc<str>,
    target: Box<str>,
    request_time: SystemTime,
    /// When it went upstream, for what a stored answer cost.
    started: Instant,
    /// Request headers, kept for `Vary` (only when the response may be stored).
    request_headers: Option<HeaderMap>,
    /// Validators this exchange added to the upstream request.
    validating: bool,
    /// Identical requests wait for this one's answer (coalescing).
    lead: Option<Lead>,
}

impl Cache {
    /// Looks `q` up: serves a usable entry, or says how to go upstream.
    /// With `coalesce`, a miss waits for an identical request already on its
    /// way upstream, or leads the way for those that come after it.
    pub async fn before(
        self: &Arc<Self>,
        policy: &Arc<RouteCachePolicy>,
        q: CacheQuery<'_>,
        coalesce: bool,
    ) -> Before {
        let client = if policy.honour_client {
            CacheControl::parse(q.headers)
        } else {
            CacheControl::default()
        };
        let head = *q.method == Method::HEAD;
        let lookup = *q.method == Method::GET
            || head
            || (*q.method == Method::POST
                && policy.body_key != BodyKey::None
                && matches!(policy.freshness, Freshness::Force { .. }));
        let bypass = |client| Start {
            status: CacheStatus::Bypass,
            key: None,
            stale: None,
            client,
            lead: None,
        };
        if !lookup || client.no_store {
            return Before::Forward(self.exchange(policy, &q, bypass(client)));
        }
        let key = match CacheKey::build(policy, &q.key_input()) {
            Ok(k) => k,
            // Not JSON on a JSON-keyed route: not the client's problem.
            Err(_) => return Before::Forward(self.exchange(policy, &q, bypass(client))),
        };
        if let Some(seen) = q.key_seen {
            let _ = seen.set(key);
        }
        let mut stored = self.lookup(&key, q.headers).await;
        let stale = stored
            .as_ref()
            .filter(|e| !e.is_fresh(crate::clock::now_std()));
        if let Some(stale) = stale.filter(|_| self.shared.is_some()) {
            // Another instance may have refreshed it already.
            if let Some(newer) = boxed_in_place!(self.newer_shared(&key, q.headers, stale)).await {
                stored = Some(newer);
            }
        }
        if let Some(served) = self.serve_stored(stored.as_ref(), &client, &q) {
            return served;
        }
        let stale = stored.filter(|e| e.vary_matches(q.headers));
        if let Some(entry) = stale
            .as_ref()
            .filter(|e| revalidate_in_background(&client, e))
        {
            return self.stale_and_refresh(policy, &q, entry, key, client).await;
        }
        // Nothing it may be given without asking the upstream (§5.2.1.7).
        if client.only_if_cached {
            return Before::Fail(ProxyError::NotCached);
        }
        let status = if stale.is_some() {
            CacheStatus::Expired
        } else {
            CacheStatus::Miss
        };
        let start = Start {
            status,
            key: Some(key),
            stale,
            client,
            lead: None,
        };
        // HEAD is left out: its answer has no body to share, and a GET
        // waiting behind it would get nothing.
        if !coalesce || head || policy.coalesce_timeout.is_zero() {
            return Before::Forward(self.exchange(policy, &q, start));
        }
        self.follow_or_lead(policy, &q, key, start).await
    }

    /// The exchange a request going upstream carries. Everything in it that
    /// costs an allocation (the target, a copy of the request headers for
    /// Vary) is made only here, on the way upstream: a hit never pays for
    /// it.
    fn exchange(
        self: &Arc<Self>,
        policy: &Arc<RouteCachePolicy>,
        q: &CacheQuery<'_>,
        start: Start,
    ) -> Exchange {
        let head = *q.method == Method::HEAD;
        let target: Box<str> = match q.query {
            Some(query) => format!("{}{}?{query}", q.host, q.path).into(),
            None => format!("{}{}", q.host, q.path).into(),
        };
        Exchange {
            cache: self.clone(),
            policy: policy.clone(),
            status: start.status,
            key: start.key,
            stale: start.stale,
            client: start.client,
            method: q.method.clone(),
            head,
            route: q.route.clone(),
            target,
            request_time: crate::clock::wall(),
            started: crate::clock::now_std(),
            request_headers: (start.key.is_some() && !head).then(|| q.headers.clone()),
            validating: false,
            lead: start.lead,
        }
    }

    /// A stale entry served at once (`stale-while-revalidate`), with the
    /// exchange that refreshes it in the background: one refresh per key
    /// (while one is in flight, the others just serve stale), and one per
    /// fleet (an instance that finds the key claimed leaves the refresh to
    /// the claimant). A HEAD cannot refresh a GET's entry.
    async fn stale_and_refresh(
        self: &Arc<Self>,
        policy: &Arc<RouteCachePolicy>,
        q: &CacheQuery<'_>,
        entry: &Arc<Entry>,
        key: CacheKey,
        client: CacheControl,
    ) -> Before {
        let now = crate::clock::now_std();
        let resp = match respond_to(
            q.method,
            q.headers,
            entry,
            entry.age(now),
            CacheStatus::Stale,
        ) {
            Ok(resp) => resp,
            Err(e) => return Before::Fail(e),
        };
        self.stats.count(CacheStatus::Stale);
        self.stats.saved(entry);
        let head = *q.method == Method::HEAD;
        let mut lead = (!head)
            .then(|| self.fills.lead_background(self, key))
            .flatten();
        if let (Some(l), Some(shared)) = (&lead, &self.shared) {
            let hold = policy.coalesce_timeout.max(SHARED_REFRESH_HOLD);
            match boxed_in_place!(shared.claim(&key, hold)).await {
                Some(claim) => l.hold_fleet_lock(claim),
                None if shared.tier.is_up() => lead = None,
                None => {}
            }
        }
        let refresh = lead.map(|lead| {
            let start = Start {
                status: CacheStatus::Expired,
                key: Some(key),
                stale: Some(entry.clone()),
                client,
                lead: Some(lead),
            };
            self.exchange(policy, q, start)
        });
        Before::Serve(resp, CacheStatus::Stale, refresh)
    }

    /// A miss on a coalescing route: waits behind the identical request
    /// already on its way upstream, or leads the way for those after it
    /// (after one more look: a fill that stored its entry and left between
    /// the lookup and now would otherwise be fetched twice), for the whole
    /// fleet when there is a shared tier.
    async fn follow_or_lead(
        self: &Arc<Self>,
        policy: &Arc<RouteCachePolicy>,
        q: &CacheQuery<'_>,
        key: CacheKey,
        mut start: Start,
    ) -> Before {
        match self.fills.follow_or_lead(self, key) {
            Role::Follow(member) => Before::Follow(Follow::new(member, policy.coalesce_timeout)),
            Role::Lead(lead) => {
                let again = self.lookup_local(&key, q.headers).await;
                if let Some(served) = self.serve_stored(again.as_ref(), &start.client, q) {
                    return served;
                }
                if self.shared.is_some() {
                    let fleet =
                        boxed_in_place!(self.lead_fleet(&key, &lead, policy, &start.client, q));
                    if let Some(served) = fleet.await {
                        return served;
                    }
                }
                start.lead = Some(lead);
                Before::Forward(self.exchange(policy, q, start))
            }
        }
    }

    /// With a shared tier: claims the fill of `key` for the whole fleet, or
    /// waits (at most `coalesce_timeout`, local followers waiting with it)
    /// for the instance that claimed it, and serves what it stored. `None`:
    /// go upstream (this instance now holds the claim, or the other
    /// instance gave up or is too slow, or the tier is down).
    async fn lead_fleet(
        &self,
        key: &CacheKey,
        lead: &Lead,
        policy: &RouteCachePolicy,
        client: &CacheControl,
        q: &CacheQuery<'_>,
    ) -> Option<Before> {
        let shared = self.shared.as_ref()?;
        let found = match shared.lead(key, policy.coalesce_timeout).await {
            FleetLead::Took(claim) => {
                lead.hold_fleet_lock(claim);
                return None;
            }
            FleetLead::Alone => return None,
            FleetLead::Found(stored) => Some(stored),
            FleetLead::Held => {
                lead.queue(true);
                let deadline = tokio::time::Instant::now() + policy.coalesce_timeout;
                let found = shared.await_fill(key, deadline).await;
                lead.queue(false);
                found
            }
        };
        // Without an entry: a variant, or a fill stored as the wait ended.
        if let Some(found) = found {
            self.put(*key, found).await;
        }
        let entry = self.lookup(key, q.headers).await;
        self.serve_stored(entry.as_ref(), client, q)
    }

    /// A stored entry served as it is: fresh, or stale where the client
    /// allows it.
    fn serve_stored(
        &self,
        entry: Option<&Arc<Entry>>,
        client: &CacheControl,
        q: &CacheQuery<'_>,
    ) -> Option<Before> {
        let entry = entry.filter(|e| e.vary_matches(q.headers))?;
        let now = crate::clock::now_std();
        let status = if usable_fresh(client, entry, now) {
            CacheStatus::Hit
        } else if (client.only_if_cached && !entry.forbids_stale)
            || client_accepts_stale(client, entry, now)
        {
            CacheStatus::Stale
        } else {
            return None;
        };
        self.stats.count(status);
        self.stats.saved(entry);
        Some(
            match respond_to(q.method, q.headers, entry, entry.age(now), status) {
                Ok(resp) => Before::Serve(resp, status, None),
                Err(e) => Before::Fail(e),
            },
        )
    }
}

/// Fresh, and fresh enough for the client's `max-age` / `min-fresh`, and
/// not one the client wants validated.
fn usable_fresh(client: &CacheControl, e: &Entry, now: Instant) -> bool {
    let age = e.age(now);
    if !e.is_fresh(now) || client.wants_validation() {
        return false;
    }
    if client.max_age.is_some_and(|m| age > Duration::from_secs(m)) {
        return false;
    }
    if let Some(min) = client.min_fresh {
        if e.fresh_for.saturating_sub(age) < Duration::from_secs(min) {
            return false;
        }
    }
    true
}

/// Stale, but within `stale-while-revalidate` (RFC 5861 §3), and the client
/// asked for nothing fresher than that.
fn revalidate_in_background(client: &CacheControl, e: &Entry) -> bool {
    let staleness = e.staleness(crate::clock::now_std());
    !e.forbids_stale
        && !client.wants_validation()
        && client.max_age.is_none()
        && client.min_fresh.is_none()
        && !staleness.is_zero()
        && staleness <= e.stale_while_revalidate
}

/// The client's `max-stale` lets a stale entry through (RFC 9111 §5.2.1.2),
/// unless the entry forbids serving stale.
fn client_accepts_stale(client: &CacheControl, e: &Entry, now: Instant) -> bool {
    if e.forbids_stale || client.wants_validation() {
        return false;
    }
    match client.max_stale {
        Some(None) => true,
        Some(Some(s)) => e.staleness(now) <= Duration::from_secs(s),
        None => false,
    }
}

impl Exchange {
    /// Adds `If-None-Match` / `If-Modified-Since` from the stale entry, unless
    /// the client sent its own conditionals (then its answer is its own).
    pub fn add_validators(&mut self, headers: &mut HeaderMap) {
        if self.lead.is_some() {
            // A shared exchange asks for the whole answer: one client's
            // conditionals or range would make it useless to the others.
            for name in [
                header::IF_NONE_MATCH,
                header::IF_MODIFIED_SINCE,
                header::IF_RANGE,
                header::RANGE,
            ] {
                headers.remove(name);
            }
        }
        let Some(entry) = &self.stale else { return };
        if headers.contains_key(header::IF_NONE_MATCH)
            || headers.contains_key(header::IF_MODIFIED_SINCE)
        {
            return;
        }
        if let Some(etag) = entry.headers.get(header::ETAG).filter(|_| !entry.own_etag) {
            headers.insert(header::IF_NONE_MATCH, etag.clone());
            self.validating = true;
        }
        if let Some(lm) = entry.headers.get(header::LAST_MODIFIED) {
            headers.insert(header::IF_MODIFIED_SINCE, lm.clone());
            self.validating = true;
        }
    }

    /// The upstream failed: a stale entry within `stale-if-error`, if any.
    pub fn stale_on_error(&self) -> Option<Response<ResponseBody>> {
        let entry = self.stale_entry_on_error()?;
        Some(respond(
            &entry,
            entry.age(crate::clock::now_std()),
            CacheStatus::Stale,
            self.head,
        ))
    }

    /// The stale entry usable because the upstream failed, counted as served.
    pub fn stale_entry_on_error(&self) -> Option<Arc<Entry>> {
        let entry = self.stale.as_ref()?;
        let now = crate::clock::now_std();
        if entry.forbids_stale || entry.staleness(now) > entry.stale_if_error {
            return None;
        }
        self.cache.stats.count(CacheStatus::Stale);
        self.cache.stats.saved(entry);
        Some(entry.clone())
    }

    /// The request's cache key as a 64-bit hash (for `consistent_hash`).
    pub fn key_hash(&self) -> Option<u64> {
        let key = self.key.as_ref()?;
        Some(u64::from_le_bytes(key.0[..8].try_into().expect("8 bytes")))
    }

    pub fn is_head(&self) -> bool {
        self.head
    }

    /// Whether identical requests wait for this one: then it goes upstream
    /// through `lead`, in a task of its own.
    pub fn leads(&self) -> bool {
        self.lead.is_some()
    }

    /// Tells identical requests waiting behind this one that it is waiting
    /// (`true`) or done waiting for an upstream slot: meanwhile their
    /// `coalesce_timeout` does not run.
    pub fn queue(&self, waiting: bool) {
        if let Some(lead) = &self.lead {
            lead.queue(waiting);
        }
    }

    /// Sends the request (`send`) on behalf of every identical request, in a
    /// task the client leaving does not cancel while others wait.
    pub async fn lead<F>(
        mut self,
        send: F,
    ) -> Result<(Response<ResponseBody>, CacheStatus), ProxyError>
    where
        F: std::future::Future<Output = Sent> + Send + 'static,
    {
        let lead = self.lead.take().expect("leads() was checked");
        lead.run(self, send).await
    }

    /// Sends the request (`send`) in the background to refresh a stale entry
    /// that was served; its answer goes only to the store.
    pub fn refresh<F>(mut self, send: F)
    where
        F: std::future::Future<Output = Sent> + Send + 'static,
    {
        let lead = self.lead.take().expect("a refresh leads a background fill");
        lead.run_detached(self, send);
    }

    /// What the client gets, for a response that went upstream without
    /// coalescing: recorded on its way if it is to be stored.
    pub async fn respond(
        self,
        resp: Response<ResponseBody>,
    ) -> (Response<ResponseBody>, CacheStatus) {
        let head = self.head;
        match self.after(resp).await {
            After::Entry(entry, status) => (
                respond(&entry, entry.age(crate::clock::now_std()), status, head),
                status,
            ),
            After::Pass(resp, status) => (resp, status),
            After::Store(mut resp, recording, status) => {
                resp.body_mut().record(Recorder::new(recording));
                (resp, status)
            }
        }
    }

    /// Whether the request method changes state, so a success invalidates
    /// what is stored for its URI (RFC 9111 §4.4).
    fn unsafe_method(&self) -> bool {
        !matches!(
            self.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
        ) && self.key.is_none()
    }

    /// The upstream answered: store it, refresh a stale entry from a 304,
    /// or fall back to stale on a 5xx.
    pub async fn after(mut self, mut resp: Response<ResponseBody>) -> After {
        let status = resp.status();
        if self.unsafe_method() && (status.is_success() || status.is_redirection()) {
            self.cache.invalidate_target(&self.target).await;
            // And the URIs the answer names, on the same host (§4.4).
            for name in [header::LOCATION, header::CONTENT_LOCATION] {
                let named = resp.headers().get(&name).and_then(|v| v.to_str().ok());
                if let Some(target) = named.and_then(|v| same_host_target(&self.target, v)) {
                    if target != *self.target {
                        self.cache.invalidate_target(&target).await;
                    }
                }
            }
        }
        if status.is_server_error() {
            if let Some(stale) = self.stale_entry_on_error() {
                return After::Entry(stale, CacheStatus::Stale);
            }
        }
        if status == StatusCode::NOT_MODIFIED && self.validating {
            if let Some(entry) = self.revalidated(resp.headers()).await {
                return After::Entry(entry, CacheStatus::Revalidated);
            }
        }
        self.cache.stats.count(self.status);
        let headers = resp.headers_mut();
        headers.insert(X_CACHE, self.status.header_value());
        // Straight from the upstream: as old as it says, plus the way here.
        let age = control::initial_age(headers, self.request_time, crate::clock::wall());
        headers.insert(header::AGE, control::age_value(age));
        match self.storable(&resp) {
            Some(recording) => After::Store(resp, recording, self.status),
            None => After::Pass(resp, self.status),
        }
    }

    /// A 304 to our validators: the stored entry, with the 304's headers
    /// merged in (RFC 9111 §4.3.4), fresh again and stored back.
    async fn revalidated(&mut self, fresh: &HeaderMap) -> Option<Arc<Entry>> {
        let old = self.stale.take()?;
        let key = self.key?;
        let now = crate::clock::wall();
        let mut headers = merged_304(&old.headers, fresh);
        let cc = CacheControl::for_response(&headers, &self.cache.policy.targeted_cache_control);
        let (mut swr, mut sie) = (old.stale_while_revalidate, old.stale_if_error);
        if matches!(self.policy.freshness, Freshness::Origin) {
            for name in cc.unstored_fields() {
                headers.remove(name);
            }
            // The windows the new headers give, as when first stored.
            let secs = |d: Option<u64>| d.map_or(Duration::ZERO, Duration::from_secs);
            swr = secs(cc.stale_while_revalidate).max(self.policy.stale_while_revalidate);
            sie = secs(cc.stale_if_error).max(self.policy.stale_if_error);
        }
        let (fresh_for, initial_age) = match self.policy.freshness {
            Freshness::Force { .. } if control::is_negative(old.status) => {
                (self.policy.negative_ttl, Duration::ZERO)
            }
            Freshness::Force { ttl } => (ttl, Duration::ZERO),
            Freshness::Origin => (
                control::freshness_lifetime(
                    &headers,
                    &cc,
                    old.status,
                    now,
                    self.cache.policy.default_ttl,
                ),
                control::initial_age(fresh, self.request_time, now),
            ),
        };
        let entry = Entry {
            status: old.status,
            headers: compact(&headers),
            body: old.body.clone(),
            stored_at: crate::clock::now_std(),
            initial_age,
            fresh_for,
            stale_while_revalidate: swr,
            stale_if_error: sie,
            forbids_stale: cc.forbids_stale(),
            vary: old.vary.clone(),
            route: old.route.clone(),
            target: old.target.clone(),
            cost: old.cost,
            own_etag: old.own_etag && !fresh.contains_key(header::ETAG),
            key,
            recodings: old.recodings.carried(),
        };
        let entry = Arc::new(entry);
        self.cache.stats.count(CacheStatus::Revalidated);
        // The merged headers pass the rules a new response would: a 304
        // that says `no-store` or `private` now (or turns a stored answer
        // into one that may not be shared) ends the entry.
        match self.refusal(old.status, &headers, &cc) {
            None => self.cache.insert(entry.clone()).await,
            Some(why) => {
                tracing::debug!(why, "a revalidated entry is no longer storable: dropped");
                self.cache.take(&old.store_key()).await;
            }
        }
        Some(entry)
    }

    /// Why a response with `status` and `headers` may not be stored on this
    /// route; `None` when it may. Freshness and size are not judged here.
    fn refusal(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        cc: &CacheControl,
    ) -> Option<&'static str> {
        match self.policy.freshness {
            Freshness::Force { .. } => {
                // Answers, and failures only where the route keeps them
                // (`negative_ttl`): a missing model must not stay missing
                // for a whole ttl after it is pulled. 5xx never.
                let answer = matches!(status.as_u16(), 200 | 203 | 204);
                let negative = control::is_negative(status) && !self.policy.negative_ttl.is_zero();
                if !(answer || negative) {
                    return Some("status");
                }
                let private = cc.no_store
                    || cc.private
                    || !cc.private_fields.is_empty()
                    || headers.contains_key(header::SET_COOKIE);
                if private && !self.policy.store_private {
                    return Some("private");
                }
                if control::vary_star(headers) {
                    return Some("vary-star");
                }
                None
            }
            Freshness::Origin => {
                let auth = self
                    .request_headers
                    .as_ref()
                    .is_some_and(|h| h.contains_key(header::AUTHORIZATION));
                control::refuse_origin(&self.method, status, auth, Some(&self.client), headers, cc)
            }
        }
    }

    /// The recording to make of this response, if it may be stored.
    fn storable(&mut self, resp: &Response<ResponseBody>) -> Option<Recording> {
        let key = self.key?;
        if self.head {
            return None;
        }
        let headers = resp.headers();
        let status = resp.status();
        let cc = CacheControl::for_response(headers, &self.cache.policy.targeted_cache_control);
        let now = crate::clock::wall();
        let streamed = crate::headers::is_event_stream(headers);
        if streamed && !self.policy.record_streams {
            return None;
        }
        if crate::headers::content_length(headers)
            .is_some_and(|n| n > self.cache.policy.max_entry_size)
        {
            return None;
        }
        let lifetimes = self.lifetimes(status, headers, &cc, now)?;
        let request_headers = self.request_headers.take().unwrap_or_default();
        let stored = self.stored_headers(headers, &cc, streamed);
        Some(Recording {
            cache: self.cache.clone(),
            key,
            chunked: streamed,
            started: self.started,
            entry: Entry {
                status,
                vary: super::vary::values(headers, &request_headers),
                headers: stored,
                body: StoredBody::Whole(Bytes::new()),
                stored_at: crate::clock::now_std(),
                initial_age: lifetimes.initial_age,
                fresh_for: lifetimes.fresh_for,
                stale_while_revalidate: lifetimes.stale_while_revalidate,
                stale_if_error: lifetimes.stale_if_error,
                forbids_stale: cc.forbids_stale()
                    && matches!(self.policy.freshness, Freshness::Origin),
                route: self.route.clone(),
                target: self.target.clone(),
                cost: Cost::default(),
                own_etag: false,
                key,
                recodings: Default::default(),
            },
        })
    }

    /// How long a response is fresh, its age on arrival, and its stale
    /// windows; `None` when it may not be stored, or would never be usable.
    fn lifetimes(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        cc: &CacheControl,
        now: std::time::SystemTime,
    ) -> Option<Lifetimes> {
        let (fresh_for, initial_age, swr, sie) = match self.policy.freshness {
            Freshness::Force { ttl } => {
                if self.refusal(status, headers, cc).is_some() {
                    return None;
                }
                if control::is_negative(status) {
                    // Never served stale: an old "not found" is no answer
                    // to fall back on.
                    (
                        self.policy.negative_ttl,
                        Duration::ZERO,
                        Duration::ZERO,
                        Duration::ZERO,
                    )
                } else {
                    (
                        ttl,
                        Duration::ZERO,
                        self.policy.stale_while_revalidate,
                        self.policy.stale_if_error,
                    )
                }
            }
            Freshness::Origin => {
                if self.refusal(status, headers, cc).is_some() {
                    return None;
                }
                let lifetime = control::freshness_lifetime(
                    headers,
                    cc,
                    status,
                    now,
                    self.cache.policy.default_ttl,
                );
                let validators = headers.contains_key(header::ETAG)
                    || headers.contains_key(header::LAST_MODIFIED);
                let fresh_for = if cc.no_cache {
                    Duration::ZERO
                } else {
                    lifetime
                };
                let stale_windows = cc.stale_while_revalidate.is_some_and(|s| s > 0)
                    || cc.stale_if_error.is_some_and(|s| s > 0)
                    || !self.policy.stale_while_revalidate.is_zero()
                    || !self.policy.stale_if_error.is_zero();
                let stale_usable = stale_windows && !cc.no_cache && !cc.forbids_stale();
                if fresh_for.is_zero() && !validators && !stale_usable {
                    // Never usable: nothing to revalidate it with, no
                    // window to serve it stale in.
                    return None;
                }
                let secs = |d: Option<u64>| d.map_or(Duration::ZERO, Duration::from_secs);
                (
                    fresh_for,
                    control::initial_age(headers, self.request_time, now),
                    secs(cc.stale_while_revalidate).max(self.policy.stale_while_revalidate),
                    secs(cc.stale_if_error).max(self.policy.stale_if_error),
                )
            }
        };
        Some(Lifetimes {
            fresh_for,
            initial_age,
            stale_while_revalidate: swr,
            stale_if_error: sie,
        })
    }

    /// The response's headers as stored: one buffer, without what is
    /// worked out per answer (`Age`, `X-Cache`), what the response said
    /// must not be stored, another client's cookies, a stream's length.
    fn stored_headers(&self, headers: &HeaderMap, cc: &CacheControl, streamed: bool) -> HeaderMap {
        let mut stored = compact(headers);
        stored.remove(header::AGE);
        stored.remove(X_CACHE);
        if matches!(self.policy.freshness, Freshness::Origin) {
            for name in cc.unstored_fields() {
                stored.remove(name);
            }
        }
        if matches!(self.policy.freshness, Freshness::Force { .. }) && self.policy.store_private {
            // Never replay one client's cookies to another.
            stored.remove(header::SET_COOKIE);
        }
        if streamed {
            stored.remove(header::CONTENT_LENGTH);
        }
        stored
    }
}

/// A stored entry's headers updated by a 304's (RFC 9111 §3.2).
fn merged_304(stored: &HeaderMap, fresh: &HeaderMap) -> HeaderMap {
    let mut headers = stored.clone();
    for name in fresh.keys() {
        // The 304 describes no body, and its age is counted apart. The
        // stored body and its copies are in the coding stored with them
        // (RFC 9111 §3.2 lets a cache keep that field for integrity). A
        // cookie set in a 304 was set for the client that triggered the
        // revalidation: merged into the entry, every later client in the
        // scope would be given it (issue 28).
        if name == header::CONTENT_LENGTH
            || name == header::CONTENT_ENCODING
            || name == X_CACHE
            || name == header::AGE
            || name == header::SET_COOKIE
        {
            continue;
        }
        headers.remove(name);
        for v in fresh.get_all(name) {
            headers.append(name.clone(), v.clone());
        }
    }
    headers
}

/// What an exchange starts from, besides the request.
struct Start {
    status: CacheStatus,
    key: Option<CacheKey>,
    /// The entry it revalidates or replaces.
    stale: Option<Arc<Entry>>,
    client: CacheControl,
    lead: Option<Lead>,
}

/// A storable response's lifetimes (see `Entry`).
struct Lifetimes {
    fresh_for: Duration,
    initial_age: Duration,
    stale_while_revalidate: Duration,
    stale_if_error: Duration,
}

/// A copy of `headers` whose values share one exact-size buffer. Values
/// parsed by hyper are slices of its read buffer: stored as they are, each
/// entry would keep a whole read buffer alive, unseen by the store's weigher.
fn compact(headers: &HeaderMap) -> HeaderMap {
    let size: usize = headers.values().map(HeaderValue::len).sum();
    let mut buf = bytes::BytesMut::with_capacity(size);
    for v in headers.values() {
        buf.extend_from_slice(v.as_bytes());
    }
    let buf = buf.freeze();
    let mut out = HeaderMap::with_capacity(headers.len());
    let mut at = 0;
    for (name, v) in headers {
        let len = v.len();
        let mut copy = HeaderValue::from_maybe_shared(buf.slice(at..at + len))
            .expect("bytes of a valid header value");
        copy.set_sensitive(v.is_sensitive());
        out.append(name.clone(), copy);
        at += len;
    }
    out
}

/// The cache target (`host` + path and query) a `Location` or
/// `Content-Location` value names, when it is on the host of `target`
/// (another host's entries are not this response's to invalidate).
fn same_host_target(target: &str, value: &str) -> Option<String> {
    let slash = target.find('/')?;
    let (host, path) = target.split_at(slash);
    if value.starts_with("//") {
        // A network-path reference: its authority decides, as for a full URI.
        return same_host_target(target, &format!("http:{value}"));
    }
    if value.starts_with('/') {
        return Some(format!("{host}{value}"));
    }
    match value.parse::<http::Uri>() {
        Ok(uri) if uri.scheme().is_some() => {
            let named = uri.host()?.to_ascii_lowercase();
            if named != host {
                return None;
            }
            Some(format!(
                "{host}{}",
                uri.path_and_query().map_or("/", |p| p.as_str())
            ))
        }
        _ if value.is_empty() || value.contains(':') => None,
        // Relative to the request's path.
        _ => {
            let path = path.split('?').next().unwrap_or(path);
            let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
            Some(format!("{host}{dir}{value}"))
        }
    }
}

/// A stored entry's answer to a request with `method` and `req` headers:
/// the entry, a 304 when the client's validators match it, or a 412 when
/// its preconditions fail (GET and HEAD; other methods get the entry).
pub fn respond_to(
    method: &Method,
    req: &HeaderMap,
    entry: &Arc<Entry>,
    age: Duration,
    status: CacheStatus,
) -> Result<Response<ResponseBody>, ProxyError> {
    let head = *method == Method::HEAD;
    if !(head || *method == Method::GET) || !has_preconditions(req) {
        return Ok(respond(entry, age, status, head));
    }
    match conditional::evaluate(req, &entry.headers) {
        Precondition::Serve => Ok(respond(entry, age, status, head)),
        Precondition::Failed => Err(ProxyError::PreconditionFailed),
        Precondition::NotModified => {
            // The entry goes along: the validators sent depend on the
            // coding the client would have been sent (`compress`).
            let mut resp = Response::new(ResponseBody::from_entry(entry, true));
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
            let headers = resp.headers_mut();
            for name in conditional::NOT_MODIFIED_HEADERS {
                for v in entry.headers.get_all(&name) {
                    headers.append(name.clone(), v.clone());
                }
            }
            headers.insert(header::AGE, control::age_value(age));
            headers.insert(X_CACHE, status.header_value());
            Ok(resp)
        }
    }
}

fn has_preconditions(req: &HeaderMap) -> bool {
    req.contains_key(header::IF_NONE_MATCH)
        || req.contains_key(header::IF_MODIFIED_SINCE)
        || req.contains_key(header::IF_MATCH)
        || req.contains_key(header::IF_UNMODIFIED_SINCE)
}

/// A response built from a stored entry.
pub fn respond(
    entry: &Arc<Entry>,
    age: Duration,
    status: CacheStatus,
    head: bool,
) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::from_entry(entry, head));
    *resp.status_mut() = entry.status;
    // Sized for what is added on the way out (Age, X-Cache, X-Request-Id,
    // RateLimit-*, Content-Encoding and Vary): a clone would be exactly
    // full, and grow (copying every field) at the first insert.
    let mut headers = HeaderMap::with_capacity(entry.headers.len() + 8);
    for (name, value) in &entry.headers {
        headers.append(name, value.clone());
    }
    headers.insert(header::AGE, control::age_value(age));
    headers.insert(X_CACHE, status.header_value());
    *resp.headers_mut() = headers;
    resp
}

#[cfg(test)]
mod tests {
    use super::same_host_target;

    #[test]
    fn location_values_name_targets_on_the_same_host_only() {
        let t = "example.com/api/items?x=1";
        let cases = [
            ("/doc", Some("example.com/doc")),
            ("/doc?a=1", Some("example.com/doc?a=1")),
            ("http://example.com/doc", Some("example.com/doc")),
            ("https://EXAMPLE.com:8443/doc", Some("example.com/doc")),
            ("//example.com/doc", Some("example.com/doc")),
            ("item/7", Some("example.com/api/item/7")),
            ("http://other.example/doc", None),
            ("//other.example/doc", None),
            ("mailto:a@example.com", None),
            ("", None),
        ];
        for (value, want) in cases {
            assert_eq!(same_host_target(t, value).as_deref(), want, "{value}");
        }
    }
}
