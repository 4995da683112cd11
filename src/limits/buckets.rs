//! The buckets of one limiter: a TAT per hashed key, in shards.
//!
//! A check touches one shard under its own mutex for a hash lookup and an
//! add, so checks on different keys rarely meet and nothing is locked
//! process-wide. Keys arrive already hashed with a per-limiter random key,
//! so the maps use them as they are.
//!
//! Memory is bounded by `max_keys`: a shard that fills up first drops its
//! rested buckets (TAT in the past: a fresh bucket says the same), then, if
//! that is not enough, the quarter closest to rested, which loses the least.
//! A shard also drops its rested buckets when it has not looked for a while.
//! Time in, decisions out: the arithmetic is `gcra`'s.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

pub struct Buckets {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    /// Nanoseconds after which a shard sweeps out rested buckets anyway.
    sweep_every: u64,
}

struct Shard {
    tats: HashMap<u64, AtomicU64, BuildHasherDefault<KeyHasher>>,
    swept_at: u64,
}

/// Keys are already random 64-bit hashes: used as their own hash.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl Buckets {
    pub fn new(max_keys: u64, sweep_every: u64) -> Self {
        let max_keys = usize::try_from(max_keys).unwrap_or(usize::MAX).max(1);
        let shards = (max_keys / 1024).clamp(1, 64).next_power_of_two().min(64);
        Buckets {
            shards: (0..shards)
                .map(|_| {
                    Mutex::new(Shard {
                        tats: HashMap::default(),
                        swept_at: 0,
                    })
                })
                .collect(),
            per_shard: (max_keys / shards).max(1),
            sweep_every,
        }
    }

    /// Runs `f` on `key`'s bucket, made rested if new. With `create` false a
    /// missing bucket is not stored (looking must not cost memory).
    pub fn with<R>(&self, key: u64, now: u64, create: bool, f: impl FnOnce(&AtomicU64) -> R) -> R {
        // The high bits pick the shard; the map uses all of them.
        let shard = &self.shards[(key >> 58) as usize % self.shards.len()];
        let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tat) = shard.tats.get(&key) {
            return f(tat);
        }
        if !create {
            return f(&AtomicU64::new(0));
        }
        if shard.tats.len() >= self.per_shard
            || now.saturating_sub(shard.swept_at) >= self.sweep_every
        {
            shard.sweep(now, self.per_shard);
        }
        f(shard.tats.entry(key).or_insert_with(|| AtomicU64::new(0)))
    }

    /// The `n` buckets furthest from rested (the most spent) at `now`,
    /// as (key, TAT), most spent first: for operators. Each shard is locked
    /// once, briefly.
    pub fn busiest(&self, n: usize, now: u64) -> Vec<(u64, u64)> {
        let mut found: Vec<(u64, u64)> = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            found.extend(
                shard
                    .tats
                    .iter()
                    .map(|(k, t)| (*k, t.load(Ordering::Acquire)))
                    .filter(|&(_, tat)| tat > now),
            );
            if found.len() > n * 4 {
                found.sort_unstable_by_key(|&(_, tat)| std::cmp::Reverse(tat));
                found.truncate(n);
            }
        }
        found.sort_unstable_by_key(|&(_, tat)| std::cmp::Reverse(tat));
        found.truncate(n);
        found
    }

    /// Buckets held now.
    pub fn len(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).tats.len() as u64)
            .sum()
    }
}

impl Shard {
    /// Makes room for one more bucket within `cap`.
    fn sweep(&mut self, now: u64, cap: usize) {
        self.swept_at = now;
        self.tats.retain(|_, tat| tat.load(Ordering::Relaxed) > now);
        if self.tats.len() < cap {
            return;
        }
        // Still full of busy buckets: drop the quarter nearest to rested.
        let mut tats: Vec<u64> = self
            .tats
            .values()
            .map(|t| t.load(Ordering::Relaxed))
            .collect();
        let cut = (tats.len() / 4).max(1);
        let (_, &mut threshold, _) = tats.select_nth_unstable(cut - 1);
        let mut dropped = 0;
        self.tats.retain(|_, tat| {
            let keep = dropped >= cut || tat.load(Ordering::Relaxed) > threshold;
            dropped += usize::from(!keep);
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_limiter_drops_rested_buckets_then_the_least_busy() {
        let b = Buckets::new(100, 5_000);
        // 100 busy buckets (TAT ahead of now = 0), then 100 more keys.
        for key in 0..200u64 {
            b.with(key, 0, true, |t| t.store(1_000 + key, Ordering::Relaxed));
        }
        assert!(b.len() <= 100, "{}", b.len());
        // The newest (busiest) survived.
        assert!(b.with(199, 0, false, |t| t.load(Ordering::Relaxed)) == 1_199);
        // Later, a new key finds the shard overdue for a sweep: every bucket
        // is rested by then, and goes.
        b.with(7, 10_000, true, |_| ());
        assert!(b.len() <= 2, "{}", b.len());
        // Looking does not store.
        b.with(8, 10_000, false, |_| ());
        assert!(b.len() <= 2);
    }
}
