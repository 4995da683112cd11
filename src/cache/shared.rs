//! What the cache keeps in the shared tier, and how a fleet fills a key
//! once.
//!
//! Keys, under the fleet's `key_prefix`:
//! - `e:<key>`: an entry (or a `Varies` record) in the `wire` form, expiring
//!   with the entry's whole lifetime (fresh, stale windows, and the linger
//!   that lets a 304 refresh it);
//! - `t:<target>`: a sorted set of the keys stored for one URL (scored by
//!   their expiry, pruned as it is written), so an unsafe method or a purge
//!   removes them in one step;
//! - `r:<route>`: the URLs a route stored, for purges by route;
//! - `f:<key>`: the fill lock: the instance that misses first holds it
//!   while it asks the upstream; the others wait for its entry.
//!
//! Every value is signed (`SharedTier::seal_value`: a MAC over the key's
//! name and the value) and read back only if it verifies and is no larger
//! than an entry can be (`GETRANGE` bounds what Redis sends); whatever else
//! is in Redis is ignored and counted. Fill locks and the indexes are not
//! signed: a forged lock only makes instances wait (at most the coalescing
//! timeout) and a forged index member only names keys to delete.
//!
//! Memory stays the first tier: a Redis hit is promoted into memory, a fill
//! is written to both. Redis is standalone (no cluster: the scripts touch
//! keys they compute). Not here: the connection and its health (`shared`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::Script;

use super::wire::{self, Decoded};
use super::{CacheKey, Purge, Stored};
use crate::shared::{hex32, parse_hex32, SharedTier};

/// SET the entry; add it to its URL's and route's indexes, pruning what
/// expired and keeping each index as long as its longest-lived member.
const STORE: &str = r"
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local function index(k, member)
  redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
  redis.call('ZADD', k, 'GT', now + ttl, member)
  if redis.call('PTTL', k) < ttl then redis.call('PEXPIRE', k, ttl) end
end
index(KEYS[2], ARGV[3])
index(KEYS[3], ARGV[4])
return 1
";

/// Removes every entry one URL's index names, and the index; tells the
/// fleet (ARGV[2], ARGV[3]) so other instances drop their memory copies.
const INVALIDATE: &str = r"
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local n = 0
for i = 1, #members, 500 do
  local batch = {}
  for j = i, math.min(i + 499, #members) do batch[#batch + 1] = ARGV[1] .. members[j] end
  n = n + redis.call('UNLINK', unpack(batch))
end
redis.call('UNLINK', KEYS[1])
if ARGV[2] ~= '' then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return n
";

/// Gives the fill lock back if it is still ours, and tells the waiters.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
";

/// How often a wait for another instance's fill looks again, should its
/// notice be missed.
const FILL_POLL: Duration = Duration::from_millis(100);

/// The cache's side of the shared tier.
pub(super) struct SharedCache {
    pub tier: Arc<SharedTier>,
    /// The most bytes a value of this fleet can hold (an entry of
    /// `max_entry_size` with its recoded copies and head, and its MAC):
    /// Redis is asked for no more than one byte past it.
    value_limit: u64,
    store: Script,
    invalidate: Script,
    release: Script,
}

/// What trying to lead a fill for the whole fleet gave.
pub(super) enum FleetLead {
    /// This instance fills the key; others wait until the lock goes.
    Took(FleetLock),
    /// Another instance is filling it.
    Held,
    /// Another instance stored it meanwhile.
    Found(Stored),
    /// The tier is down: fill alone.
    Alone,
}

/// This instance's claim to fill a key for the fleet. Dropped, it is given
/// back and the waiting instances are told, whatever became of the fill.
pub struct FleetLock {
    tier: Arc<SharedTier>,
    release: Script,
    key: CacheKey,
    token: String,
}

impl Drop for FleetLock {
    fn drop(&mut self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // It expires on its own after the coalescing timeout.
            return;
        };
        let (tier, release) = (self.tier.clone(), self.release.clone());
        let (hex, token) = (hex32(&self.key.0), std::mem::take(&mut self.token));
        rt.spawn(async move {
            let mut inv = release.prepare_invoke();
            inv.key(tier.key(format_args!("f:{hex}")))
                .arg(token)
                .arg(tier.key(format_args!("events")))
                .arg(tier.signed_message(&format!("fill {hex}")));
            tier.script::<i64>("fill lock release", &inv).await;
        });
    }
}

impl SharedCache {
    pub fn new(tier: Arc<SharedTier>, max_entry_size: u64) -> Self {
        SharedCache {
            tier,
            value_limit: (crate::shared::MAC_LEN as u64)
                .saturating_add(max_entry_size.saturating_mul(3))
                .saturating_add(1 << 20),
            store: Script::new(STORE),
            invalidate: Script::new(INVALIDATE),
            release: Script::new(RELEASE),
        }
    }

    fn entry_key(&self, key: &CacheKey) -> String {
        self.tier.key(format_args!("e:{}", hex32(&key.0)))
    }

    fn target_key(&self, target: &str) -> String {
        self.tier.key(format_args!("t:{target}"))
    }

    /// What Redis holds under `key`: `None` when nothing usable (absent, of
    /// another format version, or the tier down). Counted as a lookup.
    pub async fn fetch(&self, key: &CacheKey) -> Option<Stored> {
        if !self.tier.is_up() {
            return None;
        }
        let mut cmd = redis::cmd("GETRANGE");
        self.bounded_get(&mut cmd, key);
        let bytes: Vec<u8> = self.tier.query("get", &cmd).await?;
        let stored = self.opened(key, bytes);
        self.count(stored.is_some());
        stored
    }

    /// The arguments of a `GETRANGE` that reads `key`'s value, at most one
    /// byte more than any value of this fleet (so a larger one is seen to
    /// be, without being sent whole). A missing key reads as empty.
    fn bounded_get(&self, cmd: &mut redis::Cmd, key: &CacheKey) {
        cmd.arg(self.entry_key(key)).arg(0).arg(self.value_limit);
    }

    /// What the sealed `bytes`, read from `key`'s entry, hold: `None` when
    /// absent, not signed by this fleet for this key, too large, of
    /// another format version, or an entry stored under another key.
    fn opened(&self, key: &CacheKey, bytes: Vec<u8>) -> Option<Stored> {
        if bytes.is_empty() {
            return None;
        }
        let name = self.entry_key(key);
        if bytes.len() as u64 > self.value_limit {
            self.tier.reject_oversized(&name);
            return None;
        }
        self.tier.open_value(&name, &bytes)?;
        // The value after its MAC, without a copy.
        decoded(key, Bytes::from(bytes).slice(crate::shared::MAC_LEN..))
    }

    /// The entry `bytes` hold for `key`, counted as a hit; `None` (and not
    /// counted) for a `Varies` record or what does not decode.
    fn entry_in(&self, key: &CacheKey, bytes: Vec<u8>) -> Option<Stored> {
        let entry = self.opened(key, bytes).filter(|s| s.entry().is_some())?;
        self.count(true);
        Some(entry)
    }

    fn count(&self, hit: bool) {
        let stats = &self.tier.stats;
        let counter = if hit { &stats.hits } else { &stats.misses };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Writes what memory now holds under `key` to Redis, with its indexes.
    pub async fn store(&self, key: CacheKey, stored: &Stored) {
        if !self.tier.is_up() {
            return;
        }
        let name = self.entry_key(&key);
        let bytes = self.tier.seal_value(
            &name,
            &match stored {
                Stored::Entry(e) => wire::encode(e),
                Stored::Varies(v) => wire::encode_varies(v),
            },
        );
        let keep = stored.keep_left();
        let ttl = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX);
        if ttl == 0 {
            return;
        }
        let size = bytes.len();
        let mut inv = self.store.prepare_invoke();
        inv.key(name)
            .key(self.target_key(stored.target()))
            .key(self.tier.key(format_args!("r:{}", stored.route())))
            .arg(&bytes[..])
            .arg(ttl)
            .arg(hex32(&key.0))
            .arg(stored.target());
        if self
            .tier
            .script_sending::<i64>("store", &inv, size)
            .await
            .is_some()
        {
            self.tier
                .stats
                .writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Removes every entry stored in Redis for `target`; tells the fleet
    /// when `announce` says what to tell it. Returns how many went.
    async fn invalidate(&self, target: &str, announce: Option<&str>) -> Option<u64> {
        let mut inv = self.invalidate.prepare_invoke();
        inv.key(self.target_key(target))
            .arg(self.tier.key(format_args!("e:")));
        match announce {
            Some(what) => inv.arg(self.tier.key(format_args!("events"))).arg(
                self.tier
                    .signed_message(&format!("purge {} {what}", self.tier.instance())),
            ),
            None => inv.arg("").arg(""),
        };
        self.tier.script::<u64>("invalidate", &inv).await
    }

    /// An unsafe method succeeded on `target`: its entries go from Redis
    /// and from every instance's memory.
    pub async fn invalidate_target(&self, target: &str) {
        if self.tier.is_up() {
            let what = encode_purge(&Purge::Target(target.to_owned()));
            self.invalidate(target, Some(&what)).await;
        }
    }

    /// Removes what `what` names from Redis and tells the other instances
    /// to drop it from memory. `None` when the tier is down. Purges by
    /// route remove whole URLs: other routes' entries for the same URL go
    /// too.
    pub async fn purge(&self, what: &Purge) -> Option<u64> {
        if !self.tier.is_up() {
            return None;
        }
        let removed = match what {
            Purge::Key(key) => {
                // A key whose responses vary is found with its variants
                // through its URL: that URL goes whole.
                let mut get = redis::cmd("GETRANGE");
                self.bounded_get(&mut get, key);
                let bytes: Vec<u8> = self.tier.query("purge", &get).await?;
                // Read without counting: a purge is not a lookup.
                match self.opened(key, bytes) {
                    Some(Stored::Varies(v)) => self.invalidate(&v.target, None).await?,
                    Some(Stored::Entry(e)) if !e.vary.is_empty() => {
                        self.invalidate(&e.target, None).await?
                    }
                    _ => {
                        let mut cmd = redis::cmd("UNLINK");
                        cmd.arg(self.entry_key(key));
                        self.tier.query::<u64>("purge", &cmd).await?
                    }
                }
            }
            Purge::Target(t) => self.invalidate(t, None).await?,
            Purge::Route(r) => {
                let mut cmd = redis::cmd("ZRANGE");
                cmd.arg(self.tier.key(format_args!("r:{r}"))).arg(0).arg(-1);
                let targets: Vec<String> = self.tier.query("purge", &cmd).await?;
                let mut n = 0;
                for t in targets {
                    n += self.invalidate(&t, None).await?;
                }
                let mut cmd = redis::cmd("UNLINK");
                cmd.arg(self.tier.key(format_args!("r:{r}")));
                self.tier.query::<u64>("purge", &cmd).await?;
                n
            }
            Purge::All => {
                let mut n = 0;
                for kind in ["e", "t", "r"] {
                    let pattern = self.tier.key_pattern(&format!("{kind}:*"));
                    let deleted = self.scan_delete(&pattern).await?;
                    if kind == "e" {
                        n = deleted;
                    }
                }
                n
            }
            Purge::Prefix(_) | Purge::Path(_) | Purge::PathPrefix(_) => {
                let pattern = self.tier.key_pattern("t:*");
                let skip = self.tier.key(format_args!("t:")).len();
                let mut n = 0;
                for name in self.scan(&pattern).await? {
                    let target = &name[skip.min(name.len())..];
                    if what.selects_target(target) {
                        n += self.invalidate(target, None).await?;
                    }
                }
                n
            }
        };
        self.tier.broadcast_purge(&encode_purge(what)).await;
        Some(removed)
    }

    async fn scan(&self, pattern: &str) -> Option<Vec<String>> {
        let mut cursor = 0u64;
        let mut names = Vec::new();
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000);
            let (next, batch): (u64, Vec<String>) = self.tier.query("purge scan", &cmd).await?;
            names.extend(batch);
            if next == 0 {
                return Some(names);
            }
            cursor = next;
        }
    }

    async fn scan_delete(&self, pattern: &str) -> Option<u64> {
        let names = self.scan(pattern).await?;
        let mut n = 0;
        for batch in names.chunks(500) {
            let mut cmd = redis::cmd("UNLINK");
            for name in batch {
                cmd.arg(name);
            }
            n += self.tier.query::<u64>("purge", &cmd).await?;
        }
        Some(n)
    }

    /// Claims the fill of `key` for `hold` (the coalescing timeout: nobody
    /// waits longer), or finds it stored or claimed already; one round trip.
    pub async fn lead(&self, key: &CacheKey, hold: Duration) -> FleetLead {
        if !self.tier.is_up() {
            return FleetLead::Alone;
        }
        let token = format!("{}:{:016x}", self.tier.instance(), fastrand::u64(..));
        let hex = hex32(&key.0);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.tier.key(format_args!("f:{hex}")))
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(u64::try_from(hold.as_millis()).unwrap_or(u64::MAX).max(1))
            .cmd("GETRANGE")
            .arg(self.entry_key(key))
            .arg(0)
            .arg(self.value_limit);
        let answer: Option<(Option<String>, Vec<u8>)> = self.tier.pipe("fill lock", &pipe).await;
        let Some((took, found)) = answer else {
            return FleetLead::Alone;
        };
        let lock = took.map(|_| FleetLock {
            tier: self.tier.clone(),
            release: self.release.clone(),
            key: *key,
            token,
        });
        // Only a whole entry: the names a key varies on say nothing of
        // whether this request's variant is stored.
        if let Some(entry) = self.entry_in(key, found) {
            // Dropping the lock gives it back at once.
            drop(lock);
            return FleetLead::Found(entry);
        }
        match lock {
            Some(lock) => FleetLead::Took(lock),
            None => FleetLead::Held,
        }
    }

    /// Claims the fill of `key` for `hold` without looking for its entry (a
    /// background refresh, which has one already). `None`: claimed by
    /// another instance, or the tier is down (`tier.is_up()` tells which).
    pub async fn claim(&self, key: &CacheKey, hold: Duration) -> Option<FleetLock> {
        if !self.tier.is_up() {
            return None;
        }
        let token = format!("{}:{:016x}", self.tier.instance(), fastrand::u64(..));
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.tier.key(format_args!("f:{}", hex32(&key.0))))
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(u64::try_from(hold.as_millis()).unwrap_or(u64::MAX).max(1));
        let took: Option<String> = self.tier.query("refresh claim", &cmd).await?;
        took.map(|_| FleetLock {
            tier: self.tier.clone(),
            release: self.release.clone(),
            key: *key,
            token,
        })
    }

    /// Waits until the instance filling `key` stored its entry (then it is
    /// returned) or gave up, or `deadline`. A key whose responses vary
    /// waits for the lock to go: the caller looks its variant up then.
    pub async fn await_fill(
        &self,
        key: &CacheKey,
        deadline: tokio::time::Instant,
    ) -> Option<Stored> {
        let stats = &self.tier.stats;
        stats
            .fill_waits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let hex = hex32(&key.0);
        let notice = self.tier.fill_notice(&key.0);
        loop {
            let notified = notice.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let mut pipe = redis::pipe();
            pipe.cmd("GETRANGE")
                .arg(self.entry_key(key))
                .arg(0)
                .arg(self.value_limit)
                .cmd("EXISTS")
                .arg(self.tier.key(format_args!("f:{hex}")));
            let (found, locked): (Vec<u8>, bool) = self.tier.pipe("fill wait", &pipe).await?;
            if let Some(entry) = self.entry_in(key, found) {
                stats
                    .fill_waits_served
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Some(entry);
            }
            if !locked {
                return None;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return None;
            }
            let wake = deadline.min(now + FILL_POLL);
            let _ = tokio::time::timeout_at(wake, notified).await;
        }
    }
}

/// What `bytes`, stored under `key`, hold: `None` for another version's
/// value, or an entry stored under another key.
fn decoded(key: &CacheKey, bytes: Bytes) -> Option<Stored> {
    match wire::decode_any(&bytes) {
        Ok(Decoded::Entry(e)) if e.store_key() == *key => Some(Stored::Entry(Arc::new(e))),
        Ok(Decoded::Varies(v)) => Some(Stored::Varies(Arc::new(v))),
        Ok(Decoded::Entry(_)) => {
            tracing::debug!(
                ?key,
                "shared tier: an entry stored under another key, ignored"
            );
            None
        }
        Err(e) => {
            // Another version's entry (a rolling upgrade), or not ours.
            tracing::debug!(?key, "shared tier: entry not read: {e}");
            None
        }
    }
}

/// A purge as instances tell each other of it.
pub(super) fn encode_purge(what: &Purge) -> String {
    match what {
        Purge::Key(k) => format!("key {}", hex32(&k.0)),
        Purge::Target(t) => format!("target {t}"),
        Purge::Prefix(p) => format!("prefix {p}"),
        Purge::Path(p) => format!("path {p}"),
        Purge::PathPrefix(p) => format!("path_prefix {p}"),
        Purge::Route(r) => format!("route {r}"),
        Purge::All => "all".to_owned(),
    }
}

/// The purge another instance told of; `None` for what this build does
/// not know (a newer instance's message).
pub(super) fn decode_purge(text: &str) -> Option<Purge> {
    let (kind, value) = text.split_once(' ').unwrap_or((text, ""));
    let value = value.to_owned();
    Some(match kind {
        "key" => Purge::Key(CacheKey(parse_hex32(&value)?)),
        "target" => Purge::Target(value),
        "prefix" => Purge::Prefix(value),
        "path" => Purge::Path(value),
        "path_prefix" => Purge::PathPrefix(value),
        "route" => Purge::Route(value),
        "all" => Purge::All,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purges_round_trip_as_text() {
        for p in [
            Purge::Key(CacheKey([9; 32])),
            Purge::Target("h/a b?c".into()),
            Purge::Prefix("h/api/".into()),
            Purge::Path("/x".into()),
            Purge::PathPrefix("/v1/".into()),
            Purge::Route("chat route".into()),
            Purge::All,
        ] {
            assert_eq!(decode_purge(&encode_purge(&p)), Some(p));
        }
        assert_eq!(decode_purge("shred everything"), None);
        assert_eq!(decode_purge("key nothex"), None);
    }
}
