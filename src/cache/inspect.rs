//! What an operator can ask of the store and do to it: its figures, purges,
//! and how a request's key is made. The admin endpoints serve these; this
//! module owns the answers, not the HTTP around them.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{vary, Cache, CacheKey, CacheQuery, KeyParts, NotJson, Stored};
use crate::policy::RouteCachePolicy;

/// The store's figures at one moment.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CacheReport {
    /// Stored responses, plus one record per URL whose responses vary
    /// (the request headers they vary on).
    pub entries: u64,
    /// Bytes the store weighs its entries at (bodies, headers, bookkeeping).
    pub bytes: u64,
    pub max_bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub stale: u64,
    pub bypasses: u64,
    pub revalidated: u64,
    /// Requests answered by waiting for an identical one's upstream exchange.
    pub coalesced: u64,
    /// Responses stored.
    pub stored: u64,
    /// (hits + stale + revalidated + coalesced) / all cacheable lookups.
    pub hit_ratio: f64,
    /// Upstream exchanges identical requests may join right now.
    pub fills_in_flight: usize,
    /// LLM tokens the upstream did not have to process again, from the usage
    /// fields of stored Ollama and OpenAI-style answers.
    pub tokens_saved: u64,
    /// Upstream time hits did not cost: each stored answer's fetch time, once per hit.
    pub upstream_seconds_saved: f64,
    /// The tier shared with other instances, when `[cache.redis]` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared: Option<crate::shared::SharedReport>,
}

/// Which entries a purge removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purge {
    /// One key (as `explain` shows it).
    Key(CacheKey),
    /// Every entry for one URL, in any scope: `host` + path and query, as
    /// the client sent them (the host without port, lower-case).
    Target(String),
    /// Every entry whose `host` + path starts with this.
    Prefix(String),
    /// Every entry for one path and query, on any host.
    Path(String),
    /// Every entry whose path starts with this, on any host.
    PathPrefix(String),
    /// Every entry one route stored.
    Route(String),
    All,
}

/// A request's key, the parts that went into it, and what is stored under it.
#[derive(Debug)]
pub struct Explained {
    pub key: CacheKey,
    pub parts: KeyParts,
    pub stored: Option<StoredSummary>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StoredSummary {
    pub status: u16,
    pub age_seconds: u64,
    pub fresh_for_seconds: u64,
    pub fresh: bool,
    pub body_bytes: usize,
    pub tokens: u64,
    pub route: String,
    pub target: String,
}

impl Cache {
    pub async fn report(&self) -> CacheReport {
        // Counts are exact only once the store has applied what is pending.
        self.store.run_pending_tasks().await;
        let s = &self.stats;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let (hits, misses, stale) = (get(&s.hits), get(&s.misses), get(&s.stale));
        let (revalidated, coalesced) = (get(&s.revalidated), get(&s.coalesced));
        let served = hits + stale + revalidated + coalesced;
        let (entries, bytes) = self.size();
        CacheReport {
            entries,
            bytes,
            max_bytes: self.policy.max_size,
            hits,
            misses,
            stale,
            bypasses: get(&s.bypasses),
            revalidated,
            coalesced,
            stored: get(&s.stored),
            hit_ratio: if served + misses == 0 {
                0.0
            } else {
                served as f64 / (served + misses) as f64
            },
            fills_in_flight: self.fills.len(),
            tokens_saved: get(&s.tokens_saved),
            upstream_seconds_saved: Duration::from_micros(get(&s.upstream_micros_saved))
                .as_secs_f64(),
            shared: self.shared_tier().map(|t| t.report()),
        }
    }

    /// Removes what `what` names; returns how many stored responses went.
    pub async fn purge(&self, what: &Purge) -> u64 {
        if let Purge::Key(key) = what {
            match self.take(key).await {
                // Its variants are found only by looking through the store.
                Some(Stored::Varies(_)) => {}
                Some(_) => return 1,
                None => return 0,
            }
        }
        if *what == Purge::All {
            self.store.run_pending_tasks().await;
            let n = self
                .store
                .iter()
                .filter(|(_, s)| s.entry().is_some())
                .count();
            self.store.invalidate_all();
            self.targets.clear();
            self.store.run_pending_tasks().await;
            return n as u64;
        }
        // Collected first: the store's iterator must not see its own removals.
        let keys: Vec<Arc<CacheKey>> = self
            .store
            .iter()
            .filter(|(k, s)| what.selects(k, s))
            .map(|(k, _)| k)
            .collect();
        let mut n = 0;
        for k in keys {
            if let Some(slot) = self.take(&k).await {
                n += u64::from(slot.entry().is_some());
            }
        }
        n
    }

    /// Removes what `what` names from the shared tier and has every other
    /// instance drop it from memory: how many entries Redis held, `None`
    /// when there is no shared tier or it is down. This instance's memory
    /// is `purge`'s.
    pub async fn purge_shared(&self, what: &Purge) -> Option<u64> {
        self.shared.as_ref()?.purge(what).await
    }

    /// How many stored responses `purge(what)` would remove, removing
    /// nothing (a purge's dry run).
    pub async fn count(&self, what: &Purge) -> u64 {
        self.store.run_pending_tasks().await;
        self.store
            .iter()
            .filter(|(k, s)| s.entry().is_some() && (what.selects(k, s) || *what == Purge::All))
            .count() as u64
    }

    /// How `q` is keyed on a route with `policy`, and what is stored for it.
    pub async fn explain(
        &self,
        policy: &RouteCachePolicy,
        q: &CacheQuery<'_>,
    ) -> Result<Explained, NotJson> {
        let (key, parts) = CacheKey::explain(policy, &q.key_input())?;
        let now = crate::clock::now_std();
        let stored = self.lookup(&key, q.headers).await.map(|e| StoredSummary {
            status: e.status.as_u16(),
            age_seconds: e.age(now).as_secs(),
            fresh_for_seconds: e.fresh_for.as_secs(),
            fresh: e.is_fresh(now),
            body_bytes: e.body.len(),
            tokens: e.cost.tokens,
            route: e.route.to_string(),
            target: e.target.to_string(),
        });
        Ok(Explained { key, parts, stored })
    }
}

impl Purge {
    /// Whether the slot `k` holding `s` goes (`All` is handled whole).
    fn selects(&self, k: &CacheKey, s: &Stored) -> bool {
        match self {
            // The key itself, and a variant of it: where `key` and the
            // variant's values place it.
            Purge::Key(key) => {
                k == key
                    || s.entry()
                        .is_some_and(|e| !e.vary.is_empty() && vary::stored_key(key, &e.vary) == *k)
            }
            Purge::Route(r) => s.route() == r,
            _ => self.selects_target(s.target()),
        }
    }

    /// Whether the entries of URL `target` (host + path and query) go;
    /// false for purges that do not select by URL.
    pub fn selects_target(&self, target: &str) -> bool {
        let path = &target[target.find('/').unwrap_or(target.len())..];
        match self {
            Purge::Target(t) => target == t,
            Purge::Prefix(p) => target.starts_with(p.as_str()),
            Purge::Path(p) => path == p,
            Purge::PathPrefix(p) => path.starts_with(p.as_str()),
            Purge::Key(_) | Purge::Route(_) | Purge::All => false,
        }
    }
}
