//! The response cache: stored entries, their freshness, and the store.
//!
//! `Cache` is one per process, shared by every worker: a moka cache weighted
//! by stored bytes, each entry expiring when it is no longer fresh nor usable
//! stale (its own deadline through moka's `Expiry`). Keys come from `key`,
//! the RFC 9111 rules from `control`, recording a response on its way to the
//! client from `record`. The request flow that uses them lives in `handler`.

pub mod accept_coding;
mod canonical_json;
mod conditional;
mod control;
mod date;
mod exchange;
mod fill;
mod inspect;
mod key;
mod recoded;
mod record;
mod shared;
mod stream_end;
mod targets;
mod vary;
pub mod wire;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use moka::ops::compute::Op;

pub use control::CacheControl;
pub use exchange::{After, Before, CacheQuery, Exchange};
pub use fill::{FillError, FillReader, Follow, Followed, Sent};
pub use inspect::{CacheReport, Explained, Purge, StoredSummary};
pub use key::{BodyDigest, CacheKey, DigestHash, KeyInput, KeyParts, NotJson, TenantScope};
pub use recoded::{Form, Recoded, Recodings};
pub use record::{Recorder, Recording};
pub use shared::FleetLock;

/// The cache's readers of bytes from outside, reachable by the fuzz
/// targets (`fuzz/`); not an API for anything else.
#[doc(hidden)]
pub mod fuzzing {
    pub use super::canonical_json::digest as canonical_json_digest;
    pub use super::date::parse as http_date;
    pub use super::stream_end::ended_well as stream_ended_well;
    pub use super::vary::{names as vary_names, values as vary_values};

    /// Decodes a value as the shared tier would after its MAC verified:
    /// an entry or a `Varies` record; true when it decoded.
    pub fn decode_shared_value(bytes: &bytes::Bytes) -> bool {
        super::wire::decode_any(bytes).is_ok()
    }
}

use crate::policy::CachePolicy;
use crate::shared::SharedTier;

/// What the cache did for a response; sent as `X-Cache` and logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served from a fresh entry.
    Hit,
    /// Nothing usable stored; fetched from the upstream.
    Miss,
    /// Served from a stale entry (while revalidating, or because the upstream failed).
    Stale,
    /// The cache was not used (method, client `no-store`, unkeyable body).
    Bypass,
    /// A stale entry was there, and the upstream sent a new response.
    Expired,
    /// A stale entry was confirmed by the upstream (304) and served.
    Revalidated,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Stale => "STALE",
            CacheStatus::Bypass => "BYPASS",
            CacheStatus::Expired => "EXPIRED",
            CacheStatus::Revalidated => "REVALIDATED",
        }
    }

    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(self.as_str())
    }
}

/// A stored body: whole, or the chunks of a recorded stream, replayed one by one.
#[derive(Debug, Clone)]
pub enum StoredBody {
    Whole(Bytes),
    Chunks(Arc<[Bytes]>),
}

impl StoredBody {
    /// Chunks that are slices of one buffer, `all`, ending at `ends`: one
    /// exact-size allocation, whatever the number of chunks.
    pub fn split(all: &Bytes, ends: impl IntoIterator<Item = usize>) -> StoredBody {
        let mut start = 0;
        let chunks: Vec<Bytes> = ends
            .into_iter()
            .map(|end| {
                let part = all.slice(start..end);
                start = end;
                part
            })
            .collect();
        StoredBody::Chunks(chunks.into())
    }

    pub fn len(&self) -> usize {
        match self {
            StoredBody::Whole(b) => b.len(),
            StoredBody::Chunks(c) => c.iter().map(Bytes::len).sum(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One stored response.
#[derive(Debug)]
pub struct Entry {
    pub status: StatusCode,
    /// End-to-end headers as they will be sent (no `Age`, no `X-Cache`).
    pub headers: HeaderMap,
    pub body: StoredBody,
    /// When it was stored; its age grows from `initial_age` from here.
    pub stored_at: Instant,
    /// Its age when it arrived (RFC 9111 §4.2.3).
    pub initial_age: Duration,
    pub fresh_for: Duration,
    /// Extra time it may be served stale while one refresh runs.
    pub stale_while_revalidate: Duration,
    /// Extra time it may be served stale when the upstream fails.
    pub stale_if_error: Duration,
    /// `must-revalidate` and kin: never served stale without validation.
    pub forbids_stale: bool,
    /// The request headers it varies on, with the values they had on the
    /// request that filled it.
    pub vary: vary::VaryValues,
    /// Route name, for purges.
    pub route: Arc<str>,
    /// `host` + path and query, for invalidation and purges.
    pub target: Box<str>,
    /// What the answer cost the upstream: what each hit saves.
    pub cost: Cost,
    /// Its `ETag` is Hyperion's (a body digest), not the upstream's: good for
    /// clients' conditionals, never sent upstream.
    pub own_etag: bool,
    /// The key of the request that filled it (before any Vary variant).
    pub key: CacheKey,
    /// Its body in the other codings clients asked for.
    pub recodings: Recodings,
}

/// What producing an answer cost the upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cost {
    /// LLM tokens processed (prompt and answer), from the usage fields of an
    /// Ollama or OpenAI-style answer; 0 for anything else.
    pub tokens: u64,
    /// From sending the request to the last byte of the answer.
    pub upstream: Duration,
}

impl Entry {
    pub fn age(&self, now: Instant) -> Duration {
        self.initial_age + now.saturating_duration_since(self.stored_at)
    }

    /// How long past fresh it is (zero while fresh).
    pub fn staleness(&self, now: Instant) -> Duration {
        self.age(now).saturating_sub(self.fresh_for)
    }

    pub fn is_fresh(&self, now: Instant) -> bool {
        self.age(now) < self.fresh_for
    }

    /// Whether it has something to revalidate with.
    pub fn has_validators(&self) -> bool {
        (self.headers.contains_key(http::header::ETAG) && !self.own_etag)
            || self.headers.contains_key(http::header::LAST_MODIFIED)
    }

    /// The key it is stored under: the request's, or its Vary variant's.
    pub fn store_key(&self) -> CacheKey {
        if self.vary.is_empty() {
            self.key
        } else {
            vary::stored_key(&self.key, &self.vary)
        }
    }

    /// Whether this request carries the header values the entry was stored for.
    pub fn vary_matches(&self, req: &HeaderMap) -> bool {
        vary::matches(&self.vary, req)
    }

    /// Bytes it costs in the store: body and its copies, headers, the entry
    /// itself, and bookkeeping (the store's own, ~250 bytes, and its key in
    /// the URL index, up to ~100).
    fn weight(&self) -> u32 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum();
        let total = self.body.len()
            + self.recodings.weight()
            + headers
            + self.target.len()
            + std::mem::size_of::<Entry>()
            + 350;
        u32::try_from(total).unwrap_or(u32::MAX)
    }

    /// How long the store keeps it: fresh, then usable stale, then a while
    /// longer (as long as it was fresh, from a minute to a day) so that a
    /// 304 can refresh it or a client's `max-stale` can still take it.
    fn keep_for(&self) -> Duration {
        let fresh_left = self.fresh_for.saturating_sub(self.initial_age);
        let stale = if self.forbids_stale {
            Duration::ZERO
        } else {
            self.stale_while_revalidate.max(self.stale_if_error)
        };
        let linger = if self.has_validators() || !self.forbids_stale {
            self.fresh_for
                .clamp(Duration::from_secs(60), Duration::from_secs(86_400))
        } else {
            Duration::ZERO
        };
        fresh_left + stale.max(linger)
    }
}

/// What the store holds under one key.
#[derive(Clone)]
enum Stored {
    /// The response to the requests with this key; when its `vary` is not
    /// empty, one variant of the responses of another key.
    Entry(Arc<Entry>),
    /// This key's responses vary on these request headers: each is stored
    /// under its own variant key (`vary`).
    Varies(Arc<Varies>),
}

/// The request headers a key's responses vary on.
#[derive(Debug, PartialEq, Eq)]
struct Varies {
    names: Box<[HeaderName]>,
    route: Arc<str>,
    target: Box<str>,
    /// How long the newest variant is kept: the names stay at least as long.
    keep: Duration,
}

impl Stored {
    fn entry(&self) -> Option<&Arc<Entry>> {
        match self {
            Stored::Entry(e) => Some(e),
            Stored::Varies(_) => None,
        }
    }

    fn route(&self) -> &str {
        match self {
            Stored::Entry(e) => &e.route,
            Stored::Varies(v) => &v.route,
        }
    }

    fn target(&self) -> &str {
        match self {
            Stored::Entry(e) => &e.target,
            Stored::Varies(v) => &v.target,
        }
    }

    fn weight(&self) -> u32 {
        match self {
            Stored::Entry(e) => e.weight(),
            Stored::Varies(v) => {
                let names: usize = v.names.iter().map(|n| n.as_str().len() + 32).sum();
                u32::try_from(names + v.target.len() + 220).unwrap_or(u32::MAX)
            }
        }
    }

    /// How much longer the store keeps it: an entry promoted from the
    /// shared tier has aged there.
    fn keep_left(&self) -> Duration {
        match self {
            Stored::Entry(e) => e.keep_for().saturating_sub(e.stored_at.elapsed()),
            Stored::Varies(v) => v.keep,
        }
    }
}

/// Per-entry deadlines for moka.
struct EntryExpiry;

impl moka::Expiry<CacheKey, Stored> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        stored: &Stored,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(stored.keep_left())
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        stored: &Stored,
        _updated_at: std::time::Instant,
        left: Option<Duration>,
    ) -> Option<Duration> {
        match stored {
            // Older variants may outlive the newest: their names must too.
            Stored::Varies(v) => Some(left.map_or(v.keep, |l| l.max(v.keep))),
            // Counted from when it was stored: putting the same entry back
            // (to weigh its new copies) does not make it live longer.
            Stored::Entry(e) => Some(e.keep_for().saturating_sub(e.stored_at.elapsed())),
        }
    }
}

/// Counters for the admin API and metrics.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub stale: AtomicU64,
    pub bypasses: AtomicU64,
    pub revalidated: AtomicU64,
    pub stored: AtomicU64,
    /// Requests answered by waiting for an identical one's upstream exchange.
    pub coalesced: AtomicU64,
    pub tokens_saved: AtomicU64,
    pub upstream_micros_saved: AtomicU64,
}

impl CacheStats {
    pub fn count(&self, status: CacheStatus) {
        let c = match status {
            CacheStatus::Hit => &self.hits,
            CacheStatus::Miss | CacheStatus::Expired => &self.misses,
            CacheStatus::Stale => &self.stale,
            CacheStatus::Bypass => &self.bypasses,
            CacheStatus::Revalidated => &self.revalidated,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// An answer served from `entry` instead of the upstream.
    pub fn saved(&self, entry: &Entry) {
        self.saved_times(&entry.cost, 1);
    }

    /// `times` answers that cost the upstream nothing where each would have
    /// cost `cost`.
    pub fn saved_times(&self, cost: &Cost, times: u64) {
        if times == 0 {
            return;
        }
        if cost.tokens > 0 {
            self.tokens_saved
                .fetch_add(cost.tokens.saturating_mul(times), Ordering::Relaxed);
        }
        let micros = u64::try_from(cost.upstream.as_micros()).unwrap_or(u64::MAX);
        self.upstream_micros_saved
            .fetch_add(micros.saturating_mul(times), Ordering::Relaxed);
    }
}

/// The process-wide store.
pub struct Cache {
    store: moka::future::Cache<CacheKey, Stored, DigestHash>,
    pub policy: CachePolicy,
    pub stats: CacheStats,
    /// Upstream exchanges in flight that identical requests may wait for.
    fills: fill::Fills,
    /// The keys stored for each URL, for invalidation.
    targets: targets::TargetIndex,
    /// The tier shared with other instances (`[cache.redis]`).
    shared: Option<shared::SharedCache>,
}

impl Cache {
    pub fn new(policy: CachePolicy) -> Arc<Cache> {
        // `max_entries` beside `max_size`: every entry weighs at least its
        // share of the bytes, so no more than `max_entries` fit in them
        // (and the bytes stored stay within `max_size`, the least share
        // being at most what they weigh).
        let least = policy.max_entries.map_or(0, |n| {
            u32::try_from(policy.max_size.div_ceil(n.max(1))).unwrap_or(u32::MAX)
        });
        let store = moka::future::Cache::builder()
            .max_capacity(policy.max_size)
            .weigher(move |_k: &CacheKey, s: &Stored| s.weight().max(least))
            .expire_after(EntryExpiry)
            .build_with_hasher(DigestHash);
        Arc::new(Cache {
            store,
            stats: CacheStats::default(),
            fills: fill::Fills::new(),
            targets: targets::TargetIndex::new(),
            shared: policy.redis.clone().map(|r| {
                if !key::share_keys_with_fleet(&r.secret.0, &r.key_prefix) {
                    tracing::warn!("cache keys were made before the shared tier was set up: this process's entries are named its own way and are not shared");
                }
                shared::SharedCache::new(SharedTier::new(r), policy.max_entry_size)
            }),
            policy,
        })
    }

    /// The Redis shared with other instances, if the policy names one.
    pub fn shared_tier(&self) -> Option<&Arc<SharedTier>> {
        self.shared.as_ref().map(|s| &s.tier)
    }

    /// Connects the shared tier (if any) from `runtime`, and applies the
    /// purges other instances broadcast to this store.
    pub fn start_shared(self: &Arc<Self>, runtime: &tokio::runtime::Handle) {
        let Some(shared) = &self.shared else { return };
        let cache = Arc::downgrade(self);
        shared.tier.start(
            runtime,
            Box::new(move |text| {
                let Some(what) = shared::decode_purge(text) else {
                    tracing::debug!("shared tier: a purge this build does not know: {text}");
                    return;
                };
                if let Some(cache) = cache.upgrade() {
                    tokio::spawn(async move {
                        cache.purge(&what).await;
                    });
                }
            }),
        );
    }

    /// The response stored for a request with `key` and headers `req`: the
    /// one under the key, or the variant `req` selects. The caller still
    /// checks `Entry::vary_matches` (a variant stored under other names
    /// than the key's newest).
    /// Memory first; then the shared tier, whose finds are promoted into
    /// memory.
    pub async fn lookup(&self, key: &CacheKey, req: &HeaderMap) -> Option<Arc<Entry>> {
        self.find(key, req, self.shared.is_some()).await
    }

    /// Like `lookup`, in memory only.
    pub async fn lookup_local(&self, key: &CacheKey, req: &HeaderMap) -> Option<Arc<Entry>> {
        self.find(key, req, false).await
    }

    async fn find(&self, key: &CacheKey, req: &HeaderMap, shared: bool) -> Option<Arc<Entry>> {
        let stored = self.get(key, shared).await?;
        match stored {
            Stored::Entry(e) => Some(e),
            Stored::Varies(v) => {
                let variant = vary::request_key(key, &v.names, req);
                self.get(&variant, shared).await?.entry().cloned()
            }
        }
    }

    /// What memory holds under `key`, or with `shared` what the shared tier
    /// does (put in memory too).
    async fn get(&self, key: &CacheKey, shared: bool) -> Option<Stored> {
        match self.store.get(key).await {
            Some(s) => Some(s),
            // Boxed: inline, every lookup's future would carry (and copy)
            // the shared tier's, hits included.
            None if shared => boxed_in_place!(self.promote(key)).await,
            None => None,
        }
    }

    /// What the shared tier holds for this request when it is fresh where
    /// `than`, the memory copy, is stale (another instance refreshed it):
    /// put in memory, and returned.
    async fn newer_shared(
        &self,
        key: &CacheKey,
        req: &HeaderMap,
        than: &Entry,
    ) -> Option<Arc<Entry>> {
        let shared = self.shared.as_ref().filter(|s| s.tier.is_up())?;
        let (at, stored) = match shared.fetch(key).await? {
            Stored::Varies(v) => {
                let variant = vary::request_key(key, &v.names, req);
                (variant, shared.fetch(&variant).await?)
            }
            entry => (*key, entry),
        };
        let entry = stored.entry()?.clone();
        // Only a fresh one is worth taking: an equally stale copy (the same
        // entry, read back) changes nothing.
        if !entry.is_fresh(crate::clock::now_std())
            || entry.stored_at <= than.stored_at
            || !entry.vary_matches(req)
        {
            return None;
        }
        self.put(at, stored).await;
        Some(entry)
    }

    /// What the shared tier holds under `key`, put in memory too.
    async fn promote(&self, key: &CacheKey) -> Option<Stored> {
        let stored = self.shared.as_ref()?.fetch(key).await?;
        self.put(*key, stored.clone()).await;
        Some(stored)
    }

    /// Stores `entry` as the response to requests with its key: under the
    /// key itself, or as the variant its `vary` values select.
    pub async fn insert(&self, entry: Arc<Entry>) {
        let key = entry.key;
        if entry.body.len() as u64 > self.policy.max_entry_size {
            return;
        }
        self.stats.stored.fetch_add(1, Ordering::Relaxed);
        if entry.vary.is_empty() {
            let stored = Stored::Entry(entry);
            self.put(key, stored.clone()).await;
            self.share(key, &stored).await;
            return;
        }
        let varies = Stored::Varies(Arc::new(Varies {
            names: entry.vary.iter().map(|(n, _)| n.clone()).collect(),
            route: entry.route.clone(),
            target: entry.target.clone(),
            keep: entry.keep_for(),
        }));
        let variant = entry.store_key();
        let entry = Stored::Entry(entry);
        // The variant first: a lookup that finds the names finds it too.
        self.put(variant, entry.clone()).await;
        self.put(key, varies.clone()).await;
        self.share(variant, &entry).await;
        self.share(key, &varies).await;
    }

    /// Writes `stored` to the shared tier, if there is one.
    async fn share(&self, key: CacheKey, stored: &Stored) {
        if let Some(shared) = &self.shared {
            shared.store(key, stored).await;
        }
    }

    // Every write to the store goes through moka's compute, which takes the
    // key's lock: a copy's re-weighing (`recoded`) checks and puts under
    // that lock, so it can never put back what a write in between removed
    // or replaced.
    async fn put(&self, key: CacheKey, value: Stored) {
        // Indexed before it can be found, so no invalidation misses it.
        self.targets
            .add(value.target(), key, |k| self.store.contains_key(k));
        self.store
            .entry(key)
            .and_compute_with(|_| std::future::ready(Op::Put(value)))
            .await;
    }

    /// Removes what `key` holds; returns it.
    async fn take(&self, key: &CacheKey) -> Option<Stored> {
        let removed = self
            .store
            .entry_by_ref(key)
            .and_compute_with(|_| std::future::ready(Op::Remove))
            .await;
        match removed {
            moka::ops::compute::CompResult::Removed(e) => Some(e.into_value()),
            _ => None,
        }
    }

    /// Drops every entry stored for `target` (host + path and query), in any
    /// scope and variant: what an unsafe method on that URI does (RFC 9111
    /// §4.4).
    pub async fn invalidate_target(&self, target: &str) {
        for key in self.targets.take(target) {
            self.take(&key).await;
        }
        if let Some(shared) = &self.shared {
            shared.invalidate_target(target).await;
        }
    }

    /// Entries and bytes held now (approximate until pending work runs).
    pub fn size(&self) -> (u64, u64) {
        (self.store.entry_count(), self.store.weighted_size())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: CacheKey, target: &str, vary: vary::VaryValues) -> Arc<Entry> {
        Arc::new(Entry {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: StoredBody::Whole(Bytes::from_static(b"answer")),
            stored_at: Instant::now(),
            initial_age: Duration::ZERO,
            fresh_for: Duration::from_secs(60),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            forbids_stale: false,
            vary,
            route: "r".into(),
            target: target.into(),
            cost: Cost::default(),
            own_etag: false,
            key,
            recodings: Recodings::default(),
        })
    }

    #[tokio::test]
    async fn invalidating_a_url_drops_its_entries_and_variants_only() {
        let cache = Cache::new(CachePolicy::default());
        let (a, b) = (CacheKey([1; 32]), CacheKey([2; 32]));
        cache.insert(entry(a, "h/a", Vec::new())).await;
        cache.insert(entry(a, "h/a", Vec::new())).await;
        let lang = |v: &'static str| {
            vec![(
                HeaderName::from_static("accept-language"),
                Some(HeaderValue::from_static(v)),
            )]
        };
        cache.insert(entry(b, "h/b", lang("fr"))).await;
        cache.insert(entry(b, "h/b", lang("de"))).await;
        cache.store.run_pending_tasks().await;
        // a; b's names; b's two variants.
        assert_eq!(cache.targets.len(), 4);
        assert_eq!(cache.store.entry_count(), 4);
        cache.invalidate_target("h/b").await;
        cache.store.run_pending_tasks().await;
        assert_eq!(cache.targets.len(), 1);
        assert_eq!(cache.store.entry_count(), 1);
        cache.purge(&Purge::All).await;
        assert_eq!(cache.targets.len(), 0, "an emptied store empties the index");
    }
}
