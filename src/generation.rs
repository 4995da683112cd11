//! The live policy and its reloads.
//!
//! A `Generation` is everything built from one policy that the workers
//! share: the policy, the access log, the limiters, the upstream fleet, and
//! the cache (which outlives every generation). A reload (SIGHUP,
//! `POST /admin/reload`) reads and validates the file again; if it is good,
//! the next generation is built from it and the previous one (limiters and
//! server states carried over where unchanged) and published. Each worker
//! follows the publications and swaps in a new `Proxy` of its own
//! (`follow`): a request runs start to end on the proxy it began with, so
//! in-flight requests finish on the old policy. If the file is bad, nothing
//! changes and the error says why.
//!
//! Listening addresses and the cache's size are fixed at start: a reload
//! that changes them says so and keeps the running ones. Serving requests
//! is `handler`'s business; this module only decides what they are served
//! with.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::access_log::{AccessLog, LogSink};
use crate::cache::Cache;
use crate::handler::Proxy;
use crate::limits::Limits;
use crate::policy::{Policy, PolicyError};
use crate::protect::Protect;
use crate::upstream::fleet::Fleet;

/// What the workers share, built from one policy.
pub struct Generation {
    /// 1 for the policy the process started with, +1 per reload.
    pub number: u64,
    pub policy: Arc<Policy>,
    pub log: Arc<AccessLog>,
    pub cache: Arc<Cache>,
    pub limits: Arc<Limits>,
    pub fleet: Arc<Fleet>,
    /// Connection counts and the buffered-body budget: like the cache, one
    /// for the life of the process.
    pub protect: Arc<Protect>,
    pub loaded_at: SystemTime,
    /// The tracer (`[tracing]`), one for the life of the process: started
    /// by the `Reloader` (its exports need a runtime), carried over by
    /// reloads.
    pub traces: Option<Arc<crate::otel::Traces>>,
    /// Where access-log lines go, for the generations after this one.
    sink: LogSink,
}

/// One worker's current proxy, swapped whole on reload.
pub type LiveProxy = ArcSwap<Proxy>;

impl Generation {
    /// The first generation. Health checks start once the caller has a
    /// runtime for them (`Fleet::start_checks`).
    pub fn first(policy: Policy, sink: LogSink) -> Generation {
        let policy = Arc::new(policy);
        let cache = Cache::new(policy.cache.clone());
        Generation {
            number: 1,
            log: Arc::new(AccessLog::new(
                policy.server.access_log,
                policy.server.slow_request,
                sink.clone(),
            )),
            limits: Arc::new(Limits::with_shared(&policy, None, cache.shared_tier())),
            cache,
            fleet: Arc::new(Fleet::new(&policy, None)),
            protect: Arc::new(Protect::new(
                policy.server.max_connections,
                policy.server.max_connections_per_ip,
                policy.server.max_buffered_bodies,
                policy.server.max_read_ahead,
            )),
            loaded_at: SystemTime::now(),
            traces: None,
            sink,
            policy,
        }
    }

    /// The keys `policy` changes that only a restart applies, by their
    /// path in `policy::keys` (where each is marked `Restart`): what the
    /// listeners read once at start, the process-wide budgets, the store
    /// (carried over with the `[cache]` it was made for; the routes' own
    /// `[route.cache]` apply at once) and the admin listener.
    fn needs_restart(&self, policy: &Policy) -> Vec<String> {
        let mut deferred = Vec::new();
        let mut restart_if = |changed: bool, path: &'static str| {
            debug_assert_eq!(
                crate::policy::keys::find(path).map(|k| k.reload),
                Some(crate::policy::keys::Reload::Restart),
                "{path} is not marked Restart in policy/keys.rs"
            );
            if changed {
                deferred.push(path.to_owned());
            }
        };
        let (old, new) = (&self.policy.server, &policy.server);
        restart_if(old.listen != new.listen, "server.listen");
        let tls_listen = |s: &crate::policy::ServerPolicy| s.tls.as_ref().map(|t| t.listen.clone());
        restart_if(tls_listen(old) != tls_listen(new), "server.tls.listen");
        restart_if(
            old.max_header_size != new.max_header_size,
            "server.max_header_size",
        );
        restart_if(
            old.header_read_timeout != new.header_read_timeout,
            "server.header_read_timeout",
        );
        restart_if(old.idle_timeout != new.idle_timeout, "server.idle_timeout");
        restart_if(
            old.shutdown_grace != new.shutdown_grace,
            "server.shutdown_grace",
        );
        restart_if(old.send_timeout != new.send_timeout, "server.send_timeout");
        restart_if(
            old.max_read_ahead != new.max_read_ahead,
            "server.max_read_ahead",
        );
        restart_if(
            old.max_buffered_bodies != new.max_buffered_bodies,
            "server.max_buffered_bodies",
        );
        restart_if(
            old.http2_max_concurrent_streams != new.http2_max_concurrent_streams,
            "server.http2_max_concurrent_streams",
        );
        restart_if(
            old.http2_max_pending_resets != new.http2_max_pending_resets,
            "server.http2_max_pending_resets",
        );
        restart_if(
            old.http2_keepalive_interval != new.http2_keepalive_interval,
            "server.http2_keepalive_interval",
        );
        restart_if(
            old.http2_keepalive_timeout != new.http2_keepalive_timeout,
            "server.http2_keepalive_timeout",
        );
        let (old_admin, new_admin) = (&self.policy.admin, &policy.admin);
        restart_if(old_admin.is_some() != new_admin.is_some(), "admin");
        restart_if(
            matches!((old_admin, new_admin), (Some(o), Some(n)) if o.listen != n.listen),
            "admin.listen",
        );
        let (old, new) = (&self.policy.cache, &policy.cache);
        restart_if(old.max_size != new.max_size, "cache.max_size");
        restart_if(old.max_entries != new.max_entries, "cache.max_entries");
        restart_if(
            old.max_entry_size != new.max_entry_size,
            "cache.max_entry_size",
        );
        restart_if(old.default_ttl != new.default_ttl, "cache.default_ttl");
        restart_if(
            old.targeted_cache_control != new.targeted_cache_control,
            "cache.targeted_cache_control",
        );
        restart_if(old.redis != new.redis, "cache.redis");
        let (old, new) = (&self.policy.tracing, &policy.tracing);
        restart_if(old.is_some() != new.is_some(), "tracing");
        if let (Some(old), Some(new)) = (old, new) {
            restart_if(
                old.otlp_endpoint != new.otlp_endpoint,
                "tracing.otlp_endpoint",
            );
            restart_if(old.sample_ratio != new.sample_ratio, "tracing.sample_ratio");
            restart_if(old.service_name != new.service_name, "tracing.service_name");
            restart_if(
                old.headers_env != new.headers_env || old.headers != new.headers,
                "tracing.headers_env",
            );
            restart_if(old.max_queue != new.max_queue, "tracing.max_queue");
            restart_if(old.batch_size != new.batch_size, "tracing.batch_size");
            restart_if(
                old.export_interval != new.export_interval,
                "tracing.export_interval",
            );
            restart_if(
                old.export_timeout != new.export_timeout,
                "tracing.export_timeout",
            );
        }
        deferred
    }

    /// The generation after this one, for `policy`; and what of the new
    /// policy waits for a restart.
    fn next(&self, policy: Policy) -> (Generation, Vec<String>) {
        let deferred = self.needs_restart(&policy);
        let (old, new) = (&self.policy.server, &policy.server);
        // Connection ceilings apply at once (open connections stay open).
        self.protect
            .connections
            .set_limits(new.max_connections, new.max_connections_per_ip);
        let log = if (old.access_log, old.slow_request) == (new.access_log, new.slow_request) {
            self.log.clone()
        } else {
            Arc::new(AccessLog::new(
                new.access_log,
                new.slow_request,
                self.sink.clone(),
            ))
        };
        let next = Generation {
            number: self.number + 1,
            log,
            cache: self.cache.clone(),
            limits: Arc::new(Limits::with_shared(
                &policy,
                Some(&self.limits),
                self.cache.shared_tier(),
            )),
            fleet: Arc::new(Fleet::new(&policy, Some(&self.fleet))),
            protect: self.protect.clone(),
            loaded_at: SystemTime::now(),
            traces: self.traces.clone(),
            sink: self.sink.clone(),
            policy: Arc::new(policy),
        };
        (next, deferred)
    }

    /// Follows `[auth] keys_file` on `runtime` while this generation's
    /// policy lives: keys added or revoked count without a reload.
    fn watch_keys(&self, runtime: &tokio::runtime::Handle) {
        if let Some(auth) = &self.policy.auth {
            let keyring = Arc::downgrade(&auth.keyring);
            runtime.spawn(crate::auth::watch(auth.keys_file.clone(), keyring));
        }
    }

    /// A worker's proxy for this generation; `previous` lends it the
    /// upstream connections it can keep.
    pub fn proxy(&self, previous: Option<&Proxy>) -> Proxy {
        let shared = crate::handler::Shared {
            log: self.log.clone(),
            cache: self.cache.clone(),
            limits: self.limits.clone(),
            fleet: self.fleet.clone(),
            protect: self.protect.clone(),
            traces: self.traces.clone(),
        };
        Proxy::worker(self.policy.clone(), shared, previous)
    }
}

/// A reload that did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file does not read or validate: the message is the `check` line.
    #[error("{0}")]
    Policy(#[from] PolicyError),
}

/// What a reload did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Reloaded {
    pub generation: u64,
    /// Changed settings that only a restart applies.
    pub needs_restart: Vec<String>,
}

/// How the last reload went, for the status page and `/admin/config`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LastReload {
    /// When it was tried: seconds since the Unix epoch.
    pub at_unix: f64,
    pub ok: bool,
    /// The generation served after it (the new one, or the one kept).
    pub generation: u64,
    /// Why it was refused.
    pub error: Option<String>,
    pub needs_restart: Vec<String>,
}

/// Re-reads the policy file and publishes new generations. One per process.
pub struct Reloader {
    path: PathBuf,
    /// Held for a whole reload: two at once would race to publish.
    current: Mutex<Arc<Generation>>,
    publish: watch::Sender<Arc<Generation>>,
    /// Where the new fleet's health checks run.
    checks: tokio::runtime::Handle,
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    last: Mutex<Option<LastReload>>,
}

impl Reloader {
    /// Starts from `first`, whose health checks run on `checks`.
    pub fn new(
        path: &Path,
        mut first: Generation,
        checks: tokio::runtime::Handle,
    ) -> Arc<Reloader> {
        if let Some(t) = &first.policy.tracing {
            match crate::otel::Traces::start(t) {
                Ok(traces) => first.traces = Some(traces),
                Err(e) => tracing::error!("tracing is off: {e}"),
            }
        }
        first.fleet.start_checks(&checks);
        first.cache.start_shared(&checks);
        first.watch_keys(&checks);
        if let Some(tier) = first.cache.shared_tier() {
            // Each key's usage, summed over the fleet (`usage.rs`).
            first.protect.usage.share(tier.clone(), &checks);
        }
        let first = Arc::new(first);
        let (publish, _) = watch::channel(first.clone());
        Arc::new(Reloader {
            path: path.to_owned(),
            current: Mutex::new(first),
            publish,
            checks,
            succeeded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            last: Mutex::new(None),
        })
    }

    /// The policy file it reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The generation requests are served with now.
    pub fn current(&self) -> Arc<Generation> {
        self.publish.borrow().clone()
    }

    /// What the workers follow.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Generation>> {
        self.publish.subscribe()
    }

    /// Reads, validates and applies the policy file. On error nothing
    /// changes.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        // Under systemd (Type=notify), `systemctl reload` waits for READY.
        notify_service_manager(&[
            sd_notify::NotifyState::Reloading,
            sd_notify::NotifyState::monotonic_usec_now()
                .unwrap_or(sd_notify::NotifyState::MonotonicUsec(0)),
        ]);
        let policy = match Policy::load(&self.path) {
            Ok(p) => p,
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                self.remember(LastReload {
                    at_unix: unix_now(),
                    ok: false,
                    generation: current.number,
                    error: Some(e.to_string()),
                    needs_restart: Vec::new(),
                });
                tracing::error!("reload refused, still serving the previous policy: {e}");
                let status = format!("reload refused: {e}");
                notify_service_manager(&[
                    sd_notify::NotifyState::Ready,
                    sd_notify::NotifyState::Status(&status),
                ]);
                return Err(e.into());
            }
        };
        let (next, needs_restart) = current.next(policy);
        next.fleet.start_checks(&self.checks);
        next.watch_keys(&self.checks);
        let next = Arc::new(next);
        // The old fleet's checks stop now, though requests in flight still
        // hold it.
        current.fleet.stop_checks();
        *current = next.clone();
        self.publish.send_replace(next.clone());
        self.succeeded.fetch_add(1, Ordering::Relaxed);
        for what in &needs_restart {
            tracing::warn!("reload: {what} changed; the running value stays until a restart");
        }
        tracing::info!(generation = next.number, "policy reloaded");
        let status = format!("serving policy generation {}", next.number);
        notify_service_manager(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status),
        ]);
        self.remember(LastReload {
            at_unix: unix_now(),
            ok: true,
            generation: next.number,
            error: None,
            needs_restart: needs_restart.clone(),
        });
        Ok(Reloaded {
            generation: next.number,
            needs_restart,
        })
    }

    /// How the last reload went; `None` before the first.
    pub fn last_reload(&self) -> Option<LastReload> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn remember(&self, outcome: LastReload) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Keeps a worker's `live` proxy on the newest generation until the
/// publisher goes away, telling `adopted` each generation's number once
/// the worker serves it. Runs on the worker's runtime: the new proxy's
/// connections belong to it.
pub async fn follow(
    live: Arc<LiveProxy>,
    mut generations: watch::Receiver<Arc<Generation>>,
    adopted: impl Fn(u64),
) {
    while generations.changed().await.is_ok() {
        let generation = generations.borrow_and_update().clone();
        let next = generation.proxy(Some(&live.load()));
        live.store(Arc::new(next));
        adopted(generation.number);
    }
}

/// Tells systemd (when it started us with `Type=notify`) where the process
/// stands; nothing happens elsewhere.
pub fn notify_service_manager(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify the service manager: {e}");
    }
}
