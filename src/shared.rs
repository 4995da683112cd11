//! The shared tier: the one Redis that several Hyperion instances use
//! together (`[cache.redis]`). This module owns the connection to it,
//! whether it is usable right now, and the messages instances send each
//! other through it.
//!
//! Every operation is bounded by the policy's `timeout`. A failure or a
//! slow answer marks the tier down: from then on nothing waits on Redis
//! (each instance serves from its memory with local rate limits) until the
//! keeper, which tries once a second, has connected and had a `PING`
//! answered. Each change of state is logged once and counted; no request
//! fails because Redis did.
//!
//! Instances talk on one pub/sub channel: `fill <key>` when an entry another
//! instance may be waiting for was stored or given up, `purge <instance>
//! <what>` when an operator purged. The listener reconnects on its own.
//!
//! Not here: what the cache keeps in Redis (`cache::shared`) and the shared
//! rate-limit buckets (`limits::shared`).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, FromRedisValue};
use tokio::sync::Notify;

use crate::policy::RedisPolicy;

mod seal;
pub use seal::{glob_escape, Seal, MAC_LEN};

/// How often the keeper tries to reconnect, or checks a live link.
const KEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Fill notices waited for at once beyond which dead waiters are swept.
const WAITERS_SWEEP: usize = 1024;

/// A message from another instance that this one must act on.
pub type OnPurge = Box<dyn Fn(&str) + Send + Sync>;

/// The Redis shared by a fleet of instances. One per process.
pub struct SharedTier {
    pub policy: RedisPolicy,
    client: redis::Client,
    /// `Some` while usable: requests take a clone, never wait for one.
    link: ArcSwapOption<MultiplexedConnection>,
    /// Random per process: marks this instance's locks and broadcasts.
    instance: String,
    pub stats: SharedStats,
    /// Keys other instances are filling, with the requests here waiting.
    fill_waiters: Mutex<HashMap<[u8; 32], Weak<Notify>>>,
    /// Whether the listener is subscribed (only its state changes are logged).
    listening: std::sync::atomic::AtomicBool,
    started: std::time::Instant,
    /// Seconds after `started` when a refusal was last logged (0: never).
    refusal_logged: AtomicU64,
    /// Signs and checks what is written to and read from Redis.
    seal: Seal,
    /// Seconds after `started` when a rejected value or message was last
    /// logged (0: never).
    rejection_logged: AtomicU64,
}

/// Counters for metrics and the admin API.
#[derive(Debug, Default)]
pub struct SharedStats {
    /// Memory misses answered from Redis.
    pub hits: AtomicU64,
    /// Memory misses Redis had nothing for either.
    pub misses: AtomicU64,
    /// Entries written to Redis.
    pub writes: AtomicU64,
    /// Operations that failed or took longer than `timeout`.
    pub errors: AtomicU64,
    /// Times the tier went from usable to down.
    pub outages: AtomicU64,
    /// Misses that waited for another instance's fill…
    pub fill_waits: AtomicU64,
    /// … and were answered by it.
    pub fill_waits_served: AtomicU64,
    /// Rate-limit decisions made in Redis.
    pub limit_checks: AtomicU64,
    /// Purges received from other instances.
    pub purges_received: AtomicU64,
    /// Values read from Redis that were not signed with the fleet's secret
    /// (or not for the key they were under), or larger than any entry.
    pub rejected_values: AtomicU64,
    /// Messages on the fleet's channel that were not signed with its
    /// secret, or signed too long ago.
    pub rejected_messages: AtomicU64,
}

/// The tier as `/admin/cache` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SharedReport {
    /// The URL, password masked.
    pub url: String,
    pub up: bool,
    pub hits: u64,
    pub misses: u64,
    pub writes: u64,
    pub errors: u64,
    pub outages: u64,
    pub fill_waits: u64,
    pub fill_waits_served: u64,
    pub limit_checks: u64,
    pub purges_received: u64,
    pub rejected_values: u64,
    pub rejected_messages: u64,
}

/// Why an operation on the tier gave no answer.
#[derive(Debug)]
enum Failure {
    Redis(redis::RedisError),
    Slow(Duration),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Redis(e) => write!(f, "{e}"),
            Failure::Slow(t) => write!(
                f,
                "no answer within {t:?} (cache.redis.timeout, plus the time to send a large entry)"
            ),
        }
    }
}

impl SharedTier {
    /// The tier for `policy`; it connects once `start` runs its keeper.
    pub fn new(policy: RedisPolicy) -> Arc<SharedTier> {
        // Validation checked the URL parses. rediss:// checks the server
        // against the platform's CAs, or `ca_file`'s instead.
        let client = match &policy.ca_pem {
            Some(pem) => redis::Client::build_with_tls(
                policy.url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.to_vec()),
                },
            ),
            None => redis::Client::open(policy.url.as_str()),
        }
        .expect("validated Redis URL");
        let seal = Seal::new(&policy.secret);
        Arc::new(SharedTier {
            policy,
            client,
            link: ArcSwapOption::empty(),
            instance: format!("{:016x}", fastrand::u64(..)),
            stats: SharedStats::default(),
            fill_waiters: Mutex::new(HashMap::new()),
            listening: std::sync::atomic::AtomicBool::new(false),
            started: std::time::Instant::now(),
            refusal_logged: AtomicU64::new(0),
            seal,
            rejection_logged: AtomicU64::new(0),
        })
    }

    /// Starts the keeper (connects, reconnects) and the listener on
    /// `runtime`; `on_purge` gets the purges other instances broadcast.
    /// Both stop once the tier is dropped.
    pub fn start(self: &Arc<Self>, runtime: &tokio::runtime::Handle, on_purge: OnPurge) {
        runtime.spawn(keep(Arc::downgrade(self)));
        runtime.spawn(listen(Arc::downgrade(self), on_purge));
    }

    pub fn report(&self) -> SharedReport {
        let s = &self.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SharedReport {
            url: self.policy.display_url(),
            up: self.is_up(),
            hits: get(&s.hits),
            misses: get(&s.misses),
            writes: get(&s.writes),
            errors: get(&s.errors),
            outages: get(&s.outages),
            fill_waits: get(&s.fill_waits),
            fill_waits_served: get(&s.fill_waits_served),
            limit_checks: get(&s.limit_checks),
            purges_received: get(&s.purges_received),
            rejected_values: get(&s.rejected_values),
            rejected_messages: get(&s.rejected_messages),
        }
    }

    /// Whether requests use Redis right now.
    pub fn is_up(&self) -> bool {
        self.link.load().is_some()
    }

    /// This process's mark on locks and broadcasts.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// `name` under this fleet's prefix.
    pub fn key(&self, name: fmt::Arguments<'_>) -> String {
        format!("{}{name}", self.policy.key_prefix)
    }

    /// A `SCAN MATCH` pattern: `glob` under this fleet's prefix, the
    /// prefix matching only itself.
    pub fn key_pattern(&self, glob: &str) -> String {
        format!("{}{glob}", glob_escape(&self.policy.key_prefix))
    }

    fn channel(&self) -> String {
        self.key(format_args!("events"))
    }

    /// `value` signed for the Redis key `name`, as it is written.
    pub fn seal_value(&self, name: &str, value: &[u8]) -> Vec<u8> {
        self.seal.seal_value(name, value)
    }

    /// The value `sealed`, read from the Redis key `name`, if the fleet
    /// wrote it there; anything else is counted and logged (at most once
    /// a minute) and `None`.
    pub fn open_value<'a>(&self, name: &str, sealed: &'a [u8]) -> Option<&'a [u8]> {
        let opened = self.seal.open_value(name, sealed);
        if opened.is_none() {
            self.rejected(&self.stats.rejected_values, "a value", name);
        }
        opened
    }

    /// Notes a value that was too large to be an entry of this fleet.
    pub fn reject_oversized(&self, name: &str) {
        self.rejected(&self.stats.rejected_values, "an oversized value", name);
    }

    /// `text` as the fleet's channel carries it: signed, with the time.
    pub fn signed_message(&self, text: &str) -> String {
        self.seal
            .seal_message(&self.channel(), text, seal::unix_millis())
    }

    fn rejected(&self, counter: &AtomicU64, what: &str, at: &str) {
        counter.fetch_add(1, Ordering::Relaxed);
        let now = self.started.elapsed().as_secs();
        let last = self.rejection_logged.load(Ordering::Relaxed);
        if last == 0 || now >= last + 60 {
            self.rejection_logged.store(now.max(1), Ordering::Relaxed);
            tracing::warn!(
                "shared tier {}: ignored {what} at {at} not signed with this fleet's secret (another fleet's, a different secret, or written by someone else); further ones are counted in hyperion_shared_tier_rejected_total, logged once a minute",
                self.policy.display_url()
            );
        }
    }

    /// Runs `cmd`; `None` when the tier is down, or it failed (which marks
    /// the tier down).
    pub async fn query<T: FromRedisValue>(&self, what: &str, cmd: &redis::Cmd) -> Option<T> {
        let mut conn = self.conn()?;
        let answer = tokio::time::timeout(self.policy.timeout, cmd.query_async::<T>(&mut conn));
        self.settle(what, answer.await, self.policy.timeout)
    }

    /// Runs a script invocation, as `query` does.
    pub async fn script<T: FromRedisValue>(
        &self,
        what: &str,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Option<T> {
        self.script_sending(what, inv, 0).await
    }

    /// Like `script`, for one that carries `bytes` to Redis: the timeout
    /// grows by the time they take at 50 MB/s, so a large entry written over
    /// a real network is not mistaken for an outage.
    pub async fn script_sending<T: FromRedisValue>(
        &self,
        what: &str,
        inv: &redis::ScriptInvocation<'_>,
        bytes: usize,
    ) -> Option<T> {
        let mut conn = self.conn()?;
        let timeout = self.policy.timeout + Duration::from_micros(bytes as u64 / 50);
        let answer = tokio::time::timeout(timeout, inv.invoke_async::<T>(&mut conn));
        self.settle(what, answer.await, timeout)
    }

    /// Runs a pipeline, as `query` does.
    pub async fn pipe<T: FromRedisValue>(&self, what: &str, pipe: &redis::Pipeline) -> Option<T> {
        let mut conn = self.conn()?;
        let answer = tokio::time::timeout(self.policy.timeout, pipe.query_async::<T>(&mut conn));
        self.settle(what, answer.await, self.policy.timeout)
    }

    fn conn(&self) -> Option<MultiplexedConnection> {
        self.link.load().as_deref().cloned()
    }

    /// The answer, if it came within `timeout`; else the failure is noted.
    fn settle<T>(
        &self,
        what: &str,
        answer: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
        timeout: Duration,
    ) -> Option<T> {
        match answer {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.fail(what, Failure::Redis(e));
                None
            }
            Err(_) => {
                self.fail(what, Failure::Slow(timeout));
                None
            }
        }
    }

    /// Marks the tier down after `what` failed; logged once per outage. A
    /// refusal from a Redis that is up (out of memory, say) only counts,
    /// logged at most once a minute: taking the tier down for it would only
    /// make it flap.
    fn fail(&self, what: &str, why: Failure) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        if let Failure::Redis(e) = &why {
            let unreachable = e.is_io_error()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.is_timeout()
                || e.is_unrecoverable_error()
                || matches!(
                    e.code(),
                    Some("LOADING" | "BUSY" | "MASTERDOWN" | "TRYAGAIN")
                );
            if !unreachable {
                let now = self.started.elapsed().as_secs();
                let last = self.refusal_logged.load(Ordering::Relaxed);
                if last == 0 || now >= last + 60 {
                    self.refusal_logged.store(now.max(1), Ordering::Relaxed);
                    tracing::warn!(
                        "shared tier {} refused a {what}: {e} (this request used memory only; further refusals are counted, logged once a minute)",
                        self.policy.display_url()
                    );
                }
                return;
            }
        }
        if self.link.swap(None).is_some() {
            self.stats.outages.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "shared tier {} unavailable ({what}: {why}): serving from memory with local rate limits until it answers again",
                self.policy.display_url()
            );
        }
    }

    /// Tells every instance (this one included) about `message`.
    pub async fn publish(&self, message: &str) -> bool {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(self.channel()).arg(self.signed_message(message));
        self.query::<i64>("publish", &cmd).await.is_some()
    }

    /// Broadcasts a purge to the other instances (`what` as
    /// `cache::shared` writes it).
    pub async fn broadcast_purge(&self, what: &str) -> bool {
        self.publish(&format!("purge {} {what}", self.instance))
            .await
    }

    /// A handle woken when another instance announces `key` filled or given
    /// up (`announce_fill`).
    pub fn fill_notice(&self, key: &[u8; 32]) -> Arc<Notify> {
        let mut waiters = self.fill_waiters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = waiters.get(key).and_then(Weak::upgrade) {
            return n;
        }
        if waiters.len() >= WAITERS_SWEEP {
            waiters.retain(|_, w| w.strong_count() > 0);
        }
        let n = Arc::new(Notify::new());
        waiters.insert(*key, Arc::downgrade(&n));
        n
    }

    /// Tells waiting instances `key`'s fill ended (stored or not).
    pub async fn announce_fill(&self, key_hex: &str) {
        self.publish(&format!("fill {key_hex}")).await;
    }

    fn on_message(&self, message: &str, on_purge: &OnPurge) {
        let channel = self.channel();
        let Some(text) = self
            .seal
            .open_message(&channel, message, seal::unix_millis())
        else {
            self.rejected(&self.stats.rejected_messages, "a message", &channel);
            return;
        };
        if let Some(hex) = text.strip_prefix("fill ") {
            let Some(key) = parse_hex32(hex) else { return };
            let waiters = self.fill_waiters.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = waiters.get(&key).and_then(Weak::upgrade) {
                n.notify_waiters();
            }
        } else if let Some(rest) = text.strip_prefix("purge ") {
            let Some((from, what)) = rest.split_once(' ') else {
                return;
            };
            if from != self.instance {
                self.stats.purges_received.fetch_add(1, Ordering::Relaxed);
                on_purge(what);
            }
        }
    }

    async fn connect(&self) -> Result<MultiplexedConnection, Failure> {
        let connect_timeout = self.policy.timeout.max(Duration::from_millis(500));
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            // Calls are bounded by `timeout` (more for large entries) where
            // they are made; this only clears what a hung server never
            // answers.
            .set_response_timeout(Some(Duration::from_secs(30)));
        let connecting = self
            .client
            .get_multiplexed_async_connection_with_config(&config);
        let mut conn = match tokio::time::timeout(connect_timeout, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(Failure::Redis(e)),
            Err(_) => return Err(Failure::Slow(connect_timeout)),
        };
        ping(&mut conn, self.policy.timeout).await?;
        Ok(conn)
    }
}

async fn ping(conn: &mut MultiplexedConnection, timeout: Duration) -> Result<(), Failure> {
    match tokio::time::timeout(timeout, redis::cmd("PING").query_async::<String>(conn)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(Failure::Redis(e)),
        Err(_) => Err(Failure::Slow(timeout)),
    }
}

/// Connects, and reconnects after an outage; checks a live link once a
/// second so an idle instance notices an outage before a request does.
async fn keep(tier: Weak<SharedTier>) {
    let mut first = true;
    let mut last_error = String::new();
    loop {
        let Some(t) = tier.upgrade() else { return };
        match t.conn() {
            Some(mut conn) => {
                if let Err(e) = ping(&mut conn, t.policy.timeout).await {
                    t.fail("ping", e);
                }
            }
            None => match t.connect().await {
                Ok(conn) => {
                    t.link.store(Some(Arc::new(conn)));
                    last_error.clear();
                    tracing::info!(
                        "shared tier {} available: cache, rate limits and fill locks shared with the fleet",
                        t.policy.display_url()
                    );
                }
                Err(e) => {
                    let e = e.to_string();
                    if first || e != last_error {
                        tracing::warn!(
                            "shared tier {} not reachable ({e}): serving from memory with local rate limits, retrying every second",
                            t.policy.display_url()
                        );
                    }
                    last_error = e;
                }
            },
        }
        first = false;
        drop(t);
        tokio::time::sleep(KEEP_INTERVAL).await;
    }
}

/// Listens to the fleet's channel, resubscribing after any disconnection.
async fn listen(tier: Weak<SharedTier>, on_purge: OnPurge) {
    loop {
        let Some(t) = tier.upgrade() else { return };
        let channel = t.channel();
        let connect_timeout = t.policy.timeout.max(Duration::from_millis(500));
        let subscribed = tokio::time::timeout(connect_timeout, async {
            let mut pubsub = t.client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        let pubsub = match subscribed {
            Ok(Ok(p)) => p,
            Ok(Err(_)) | Err(_) => {
                // The keeper logs the outage; this only retries.
                drop(t);
                tokio::time::sleep(KEEP_INTERVAL).await;
                continue;
            }
        };
        if !t.listening.swap(true, Ordering::Relaxed) {
            tracing::debug!("listening for the fleet's purges and fills on {channel}");
        }
        drop(t);
        let mut messages = pubsub.into_on_message();
        while let Some(msg) = messages.next().await {
            let Some(t) = tier.upgrade() else { return };
            if let Ok(text) = msg.get_payload::<String>() {
                t.on_message(&text, &on_purge);
            }
        }
        if let Some(t) = tier.upgrade() {
            if t.listening.swap(false, Ordering::Relaxed) {
                tracing::warn!(
                    "lost the subscription to the fleet's purges on {}: purges made elsewhere meanwhile reach this instance's memory only when its copies expire",
                    t.policy.display_url()
                );
            }
        }
        tokio::time::sleep(KEEP_INTERVAL).await;
    }
}

/// 64 hex digits as 32 bytes.
pub fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

/// 32 bytes as 64 lower-case hex digits.
pub fn hex32(bytes: &[u8; 32]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(64);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_hex() {
        let key = [0xa5; 32];
        assert_eq!(parse_hex32(&hex32(&key)), Some(key));
        assert_eq!(parse_hex32("zz"), None);
        assert_eq!(parse_hex32(&"g".repeat(64)), None);
    }

    #[test]
    fn passwords_are_masked_for_display() {
        let p = |url: &str| RedisPolicy {
            url: url.into(),
            key_prefix: "h:".into(),
            timeout: Duration::from_millis(50),
            secret: crate::policy::FleetSecret::from_text("a test secret of at least 32 bytes"),
            secret_source: "test".into(),
            ca_pem: None,
        };
        assert_eq!(
            p("redis://app:s3cret@10.0.0.5:6379/0").display_url(),
            "redis://app:***@10.0.0.5:6379/0"
        );
        assert_eq!(p("redis://:s3cret@h/0").display_url(), "redis://:***@h/0");
        assert_eq!(
            p("redis://127.0.0.1/0").display_url(),
            "redis://127.0.0.1/0"
        );
    }
}
