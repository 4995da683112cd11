//! Rate-limit buckets kept in the shared tier, so a fleet of instances
//! enforces one limit rather than one per instance.
//!
//! Each bucket is one Redis key holding its TAT (see `gcra`) in
//! microseconds of the Redis server's clock, changed only by a Lua script:
//! one round trip decides a spend atomically for the whole fleet, whatever
//! the instances' own clocks say. A key expires once its bucket is full
//! again, so idle clients cost Redis nothing. Bucket keys are a digest of
//! the limiter's name and the client's key (never the raw value), the same
//! in every instance.
//!
//! When the tier is down the caller falls back to its local buckets, which
//! mirror what Redis last said for the keys this instance saw. Not here:
//! the connection (`shared`), the local arithmetic (`gcra`).

use std::sync::Arc;
use std::time::Duration;

use redis::Script;

use super::gcra::{Gcra, Level, Refusal};
use crate::shared::SharedTier;

/// ARGV: interval (µs), window (µs), burst, operation, units. Returns
/// allowed (0/1), units remaining, µs until full, µs until a refused spend
/// would fit.
const GCRA: &str = r"
local interval = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local op = ARGV[4]
local n = tonumber(ARGV[5])
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local function remaining(x)
  local left = window - math.max(x - now, 0)
  if left <= 0 then return 0 end
  return math.floor(left / interval)
end
local function save(x)
  if x > now then
    redis.call('SET', KEYS[1], string.format('%.0f', x), 'PX', math.ceil((x - now) / 1000) + 1)
  else
    redis.call('DEL', KEYS[1])
  end
end
if op == 'spend' then
  local next = math.max(tat, now) + math.min(n, burst) * interval
  local ahead = next - now
  if ahead > window then
    return {0, remaining(tat), math.max(tat - now, 0), ahead - window}
  end
  save(next)
  return {1, remaining(next), ahead, 0}
elseif op == 'refund' then
  if tat > now then
    tat = math.max(tat - n * interval, now)
    save(tat)
  end
elseif op == 'charge' then
  tat = math.max(tat, now) + n * interval
  save(tat)
end
return {1, remaining(tat), math.max(tat - now, 0), 0}
";

/// One limiter's buckets in Redis.
pub struct SharedBuckets {
    tier: Arc<SharedTier>,
    script: Script,
    /// `<prefix>l:<limiter>:`, each bucket's key starts with it.
    prefix: String,
    interval_us: f64,
    window_us: f64,
    burst: u64,
}

/// A bucket's key in Redis (a digest), as the spends that must be settled
/// or refunded there keep it.
pub type SharedKey = Arc<str>;

impl SharedBuckets {
    pub fn new(tier: Arc<SharedTier>, name: &str, gcra: &Gcra) -> Self {
        SharedBuckets {
            prefix: tier.key(format_args!("l:{name}:")),
            tier,
            script: Script::new(GCRA),
            interval_us: gcra.interval_nanos() as f64 / 1000.0,
            window_us: gcra.window_nanos() as f64 / 1000.0,
            burst: gcra.burst(),
        }
    }

    pub fn is_up(&self) -> bool {
        self.tier.is_up()
    }

    /// The bucket of the request whose key material (`limits`) is
    /// `material`: the same in every instance.
    pub fn key(&self, limiter: &str, material: &[u8]) -> SharedKey {
        let mut h = blake3::Hasher::new();
        h.update(limiter.as_bytes()).update(b"\0").update(material);
        format!("{}{}", self.prefix, &h.finalize().to_hex()[..32]).into()
    }

    /// Spends `units` from the bucket for the whole fleet. `None` when the
    /// tier did not answer: decide locally.
    pub async fn spend(&self, key: &SharedKey, units: u64) -> Option<Result<Level, Refusal>> {
        let (allowed, level, retry) = self.run(key, "spend", units).await?;
        Some(if allowed {
            Ok(level)
        } else {
            Err(Refusal {
                retry_after: retry,
                level,
            })
        })
    }

    /// Gives back or charges `units` later, without waiting: the request
    /// path never waits for a settlement.
    pub fn adjust(self: &Arc<Self>, key: SharedKey, refund: bool, units: u64) {
        if units == 0 || !self.is_up() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let me = self.clone();
        rt.spawn(async move {
            me.run(&key, if refund { "refund" } else { "charge" }, units)
                .await;
        });
    }

    async fn run(&self, key: &SharedKey, op: &str, units: u64) -> Option<(bool, Level, Duration)> {
        let mut inv = self.script.prepare_invoke();
        inv.key(&**key)
            .arg(self.interval_us)
            .arg(self.window_us)
            .arg(self.burst)
            .arg(op)
            .arg(units);
        let (allowed, remaining, reset, retry): (i64, i64, i64, i64) =
            self.tier.script("rate limit", &inv).await?;
        self.tier
            .stats
            .limit_checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let us = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
        Some((
            allowed == 1,
            Level {
                remaining: u64::try_from(remaining).unwrap_or(0),
                reset: us(reset),
            },
            us(retry),
        ))
    }
}
