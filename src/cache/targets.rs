//! Which keys are stored for each URL, so that a successful unsafe method
//! drops them (RFC 9111 §4.4) without looking through the whole store.
//!
//! `Cache::insert` adds a key before it stores the value. Nothing removes a
//! key when the store evicts its value: an eviction listener would make
//! every lookup in moka twice as slow (measured: `benches/cache.rs`,
//! `moka_alone`, 362 → 670 ns over 100k entries). Instead a shard that has
//! doubled since it was last swept is swept by the insert that doubled it:
//! keys no longer in the store go. So the index holds at most about twice
//! the stored keys, and a key it still holds after its value left costs an
//! invalidation one no-op removal. This module does not touch the store.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard};

use super::{CacheKey, DigestHash};

const SHARDS: usize = 64;

/// Keys are spread over shards by the key, not the URL: one URL
/// (`/api/generate`) may hold millions of body-keyed entries.
pub struct TargetIndex {
    shards: Box<[Mutex<Shard>]>,
    /// Hashes URLs with a per-process key: a collision only makes another
    /// URL's entries go with these (a spurious miss), and nobody outside can
    /// aim for one.
    hasher: RandomState,
}

#[derive(Default)]
struct Shard {
    /// URL hash → its keys, each with the number of the `add` that put it
    /// there (a sweep removes a key only if nobody added it again since).
    targets: HashMap<u64, HashMap<CacheKey, u64, DigestHash>>,
    keys: usize,
    /// Keys left after the last sweep.
    swept: usize,
    adds: u64,
}

/// Below this many keys a shard is never swept.
const SWEEP_FLOOR: usize = 256;

impl TargetIndex {
    pub fn new() -> Self {
        TargetIndex {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: RandomState::new(),
        }
    }

    fn lock(&self, i: usize) -> MutexGuard<'_, Shard> {
        // A poisoned lock only means a panic elsewhere; the map stays usable.
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn shard_of(key: &CacheKey) -> usize {
        key.0[31] as usize % SHARDS
    }

    /// `key` is about to be stored for `target`. `is_stored` says whether a
    /// key still is, for the sweep this add may start.
    pub fn add(&self, target: &str, key: CacheKey, is_stored: impl Fn(&CacheKey) -> bool) {
        let h = self.hasher.hash_one(target);
        let i = Self::shard_of(&key);
        let sweep = {
            let mut shard = self.lock(i);
            shard.adds += 1;
            let n = shard.adds;
            if shard.targets.entry(h).or_default().insert(key, n).is_none() {
                shard.keys += 1;
            }
            let due = shard.keys > SWEEP_FLOOR.max(2 * shard.swept);
            if due {
                // Counted as swept now, so the adds racing this sweep do not
                // start another.
                shard.swept = shard.keys;
            }
            due
        };
        if sweep {
            self.sweep(i, is_stored);
        }
    }

    /// Forgets the keys of shard `i` that are no longer stored. The shard is
    /// locked to copy its keys and to remove the dead ones, not while the
    /// store is asked.
    fn sweep(&self, i: usize, is_stored: impl Fn(&CacheKey) -> bool) {
        let held: Vec<(u64, CacheKey, u64)> = {
            let shard = self.lock(i);
            shard
                .targets
                .iter()
                .flat_map(|(h, keys)| keys.iter().map(|(k, n)| (*h, *k, *n)))
                .collect()
        };
        let dead: Vec<_> = held.into_iter().filter(|(_, k, _)| !is_stored(k)).collect();
        let mut shard = self.lock(i);
        for (h, key, n) in dead {
            let Some(keys) = shard.targets.get_mut(&h) else {
                continue;
            };
            if keys.get(&key) == Some(&n) {
                keys.remove(&key);
                if keys.is_empty() {
                    shard.targets.remove(&h);
                }
                shard.keys -= 1;
            }
        }
        shard.swept = shard.keys;
    }

    /// The keys stored for `target` (and perhaps some since evicted),
    /// forgotten here.
    pub fn take(&self, target: &str) -> Vec<CacheKey> {
        let h = self.hasher.hash_one(target);
        let mut out = Vec::new();
        for i in 0..SHARDS {
            let mut shard = self.lock(i);
            if let Some(keys) = shard.targets.remove(&h) {
                shard.keys -= keys.len();
                out.extend(keys.into_keys());
            }
        }
        out
    }

    /// Forgets every key (the store was emptied).
    pub fn clear(&self) {
        for i in 0..SHARDS {
            *self.lock(i) = Shard::default();
        }
    }

    /// Keys held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        (0..SHARDS).map(|i| self.lock(i).keys).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> CacheKey {
        CacheKey(*blake3::hash(&i.to_le_bytes()).as_bytes())
    }

    #[test]
    fn each_target_keeps_its_own_keys() {
        let idx = TargetIndex::new();
        let all = |_: &CacheKey| true;
        idx.add("h/x", key(1), all);
        idx.add("h/x", key(2), all);
        idx.add("h/x", key(2), all);
        idx.add("h/y", key(3), all);
        assert_eq!(idx.len(), 3);
        let mut x = idx.take("h/x");
        x.sort_by_key(|k| k.0);
        let mut want = vec![key(1), key(2)];
        want.sort_by_key(|k| k.0);
        assert_eq!(x, want);
        assert_eq!(idx.take("h/y"), [key(3)]);
        assert!(idx.take("h/y").is_empty());
        assert_eq!(idx.len(), 0);
    }

    #[test]
    fn keys_no_longer_stored_are_swept_and_the_index_stays_bounded() {
        const N: u32 = 50_000;
        let keys: Vec<CacheKey> = (0..N).map(key).collect();
        let number: HashMap<CacheKey, u32> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (*k, i as u32))
            .collect();
        let idx = TargetIndex::new();
        for (i, k) in keys.iter().enumerate() {
            // Only the newest 1,000 keys are still stored.
            idx.add("h/api/generate", *k, |k| number[k] + 1000 > i as u32);
            if i % 5_000 == 0 {
                assert!(idx.len() < 2 * 1000 + SHARDS * SWEEP_FLOOR, "{}", idx.len());
            }
        }
        let left = idx.take("h/api/generate");
        assert!(left.len() >= 1000, "never forgets a stored key");
        assert!(left.len() < 2 * 1000 + SHARDS * SWEEP_FLOOR);
    }
}
