//! Every upstream pool's process-wide state: its servers' states, its
//! balancer and its retry budget, built once per policy and shared by the
//! workers' `UpstreamPool`s. A server keeps its state (health, latency,
//! counters) across a rebuild when its pool and URL are unchanged.
//!
//! The active health checks run here too: one task per checked server
//! (and one per server for model discovery, see `models`), started on a
//! runtime the caller gives, stopped when the fleet is dropped.
//! Connections and the request path belong to `upstream`.

use std::sync::{Arc, Weak};
use std::time::Duration;

use http::StatusCode;
use tokio_util::sync::CancellationToken;

use super::balance::Balancer;
use super::conns::ServerConns;
use super::engine::{EnginePoll, EngineSnapshot, PoolEngines};
use super::models::{Discovery, PoolModels, ServerModelsSnapshot};
use super::prefix::PrefixIndex;
use super::retry::RetryBudget;
use super::server_state::{ServerSnapshot, ServerState};
use crate::policy::{
    Balance, EngineSignals, HealthPolicy, ModelRouting, Policy, UpstreamPolicy, UpstreamServer,
};

pub struct Fleet {
    pools: Vec<Arc<PoolState>>,
    epoch: tokio::time::Instant,
    /// Cancelled on drop: the health checks of this fleet stop.
    checks: CancellationToken,
}

/// One `[upstreams.NAME]`, shared by every worker.
pub struct PoolState {
    pub policy: Arc<UpstreamPolicy>,
    /// Parallel to `policy.servers`.
    pub servers: Box<[Arc<ServerState>]>,
    pub balancer: Balancer,
    pub budget: RetryBudget,
    /// Who serves which model (`model_routing`).
    pub models: Arc<PoolModels>,
    /// Which server was sent which prompt prefix (`prefix_affinity`).
    pub prefix: Option<Arc<PrefixIndex>>,
    /// What the servers' engines last said (`engine_signals`).
    pub engines: Option<Arc<PoolEngines>>,
    /// Each server's token for this pool's engine polls
    /// (`ServerState::claim_engine`).
    engine_owners: Box<[u64]>,
}

impl Fleet {
    /// The pools of `policy`; servers of `previous` with the same pool and
    /// URL keep their state.
    pub fn new(policy: &Policy, previous: Option<&Fleet>) -> Self {
        // One epoch for every fleet of the process: a pick reads the clock
        // once for all of a pool's servers, kept ones and new ones alike.
        let epoch = previous.map_or_else(crate::clock::now, |p| p.epoch);
        let pools = policy
            .upstreams
            .iter()
            .map(|u| {
                let before = previous.and_then(|p| p.pool(&u.name));
                let servers: Box<[Arc<ServerState>]> = u
                    .servers
                    .iter()
                    .map(|s| {
                        before
                            .and_then(|b| {
                                b.servers
                                    .iter()
                                    .find(|old| old.url == s.url && old.weight == s.weight)
                            })
                            .cloned()
                            .unwrap_or_else(|| {
                                Arc::new(ServerState::new(s.url.clone(), s.weight, epoch))
                            })
                    })
                    .collect();
                // A server kept from a pool that asked its engine is
                // judged by this proxy's counts until this pool asks, and
                // only this pool's polls are heeded from now on.
                let engine_owners: Box<[u64]> = servers.iter().map(|s| s.claim_engine()).collect();
                // A reload keeps what is known when the servers are the
                // same, in the same order, with the same cache size.
                let prefix = (u.balance == Balance::PrefixAffinity).then(|| {
                    before
                        .filter(|b| {
                            b.policy.prefix_cache_tokens == u.prefix_cache_tokens
                                && b.policy.servers.len() == u.servers.len()
                                && b.policy
                                    .servers
                                    .iter()
                                    .zip(&u.servers)
                                    .all(|(o, n)| o.url == n.url)
                        })
                        .and_then(|b| b.prefix.clone())
                        // Sizes an engine reported are asked again.
                        .inspect(|p| p.reset_capacities())
                        .unwrap_or_else(|| {
                            Arc::new(PrefixIndex::new(u.servers.len(), u.prefix_cache_tokens))
                        })
                });
                let engines = (u.engine_signals != EngineSignals::Off)
                    .then(|| Arc::new(PoolEngines::new(u.engine_signals, u.servers.len())));
                Arc::new(PoolState {
                    prefix,
                    engines,
                    engine_owners,
                    models: Arc::new(PoolModels::new(u, before.map(|b| &*b.models))),
                    balancer: Balancer::new(u.balance, &servers)
                        .with_parallelism(u.max_inflight_per_server),
                    servers,
                    policy: u.clone(),
                    budget: RetryBudget::new(),
                })
            })
            .collect();
        Fleet {
            pools,
            epoch,
            checks: CancellationToken::new(),
        }
    }

    pub fn pool(&self, name: &str) -> Option<&Arc<PoolState>> {
        self.pools.iter().find(|p| p.policy.name == name)
    }

    pub fn pools(&self) -> &[Arc<PoolState>] {
        &self.pools
    }

    /// Starts the active health checks and model discovery on `runtime`.
    pub fn start_checks(&self, runtime: &tokio::runtime::Handle) {
        for pool in &self.pools {
            if pool.policy.model_routing == ModelRouting::Discover {
                for (index, server) in pool.policy.servers.iter().enumerate() {
                    let discovery = Discovery {
                        server: server.clone(),
                        index,
                        models: Arc::downgrade(&pool.models),
                        interval: pool.policy.discover_interval,
                        connect_timeout: pool.policy.connect_timeout,
                    };
                    runtime.spawn(
                        self.checks
                            .clone()
                            .run_until_cancelled_owned(discovery.run()),
                    );
                }
            }
            if let Some(engines) = &pool.engines {
                for (index, server) in pool.policy.servers.iter().enumerate() {
                    let poll = EnginePoll {
                        server: server.clone(),
                        index,
                        state: Arc::downgrade(&pool.servers[index]),
                        owner: pool.engine_owners[index],
                        engines: Arc::downgrade(engines),
                        prefix: pool.prefix.as_ref().map(Arc::downgrade),
                        interval: pool.policy.engine_poll_interval,
                        connect_timeout: pool.policy.connect_timeout,
                    };
                    runtime.spawn(self.checks.clone().run_until_cancelled_owned(poll.run()));
                }
            }
            let Some(health) = &pool.policy.health else {
                continue;
            };
            for (i, state) in pool.servers.iter().enumerate() {
                let check = HealthCheck {
                    server: pool.policy.servers[i].clone(),
                    state: Arc::downgrade(state),
                    policy: health.clone(),
                    connect_timeout: pool.policy.connect_timeout,
                };
                runtime.spawn(self.checks.clone().run_until_cancelled_owned(check.run()));
            }
        }
    }
}

impl Fleet {
    /// Stops this fleet's checks and discovery (a newer fleet runs its
    /// own), though requests may still hold it.
    pub fn stop_checks(&self) {
        self.checks.cancel();
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.checks.cancel();
    }
}

impl PoolState {
    /// Each server as operators see it: its state, and what its pool
    /// learns of it (models, engine).
    pub fn snapshot(&self) -> Vec<ServerView> {
        let now = crate::clock::now();
        let by_model = self.policy.model_routing != ModelRouting::Off;
        self.servers
            .iter()
            .enumerate()
            .map(|(i, s)| ServerView {
                state: s.snapshot(now),
                models: by_model.then(|| self.models.snapshot(i)),
                engine: self.engines.as_ref().and_then(|e| e.snapshot(i)),
            })
            .collect()
    }
}

/// One server for `/admin/upstreams` and `/metrics`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerView {
    #[serde(flatten)]
    pub state: ServerSnapshot,
    /// What it serves, when its pool routes by model.
    #[serde(flatten)]
    pub models: Option<ServerModelsSnapshot>,
    /// What its engine last said, when its pool asks (`engine_signals`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineSnapshot>,
}

/// The checks of one server.
struct HealthCheck {
    server: UpstreamServer,
    state: Weak<ServerState>,
    policy: HealthPolicy,
    connect_timeout: Duration,
}

impl HealthCheck {
    async fn run(self) {
        let conns = ServerConns::new(&self.server, self.connect_timeout);
        let (mut passed, mut failed) = (0u32, 0u32);
        let mut healthy = true;
        // Spread the first checks over an interval so servers (and proxies)
        // started together do not check in step.
        tokio::time::sleep(self.policy.interval.mul_f64(fastrand::f64())).await;
        loop {
            let outcome = tokio::time::timeout(self.policy.timeout, self.probe(&conns)).await;
            let Some(state) = self.state.upgrade() else {
                return;
            };
            match outcome.unwrap_or_else(|_| {
                Err(format!(
                    "no answer within {}",
                    humantime::format_duration(self.policy.timeout)
                ))
            }) {
                Ok(()) => {
                    passed += 1;
                    failed = 0;
                    if passed >= self.policy.healthy_after {
                        if healthy {
                            state.passed_checks(crate::clock::now());
                        } else {
                            healthy = true;
                            tracing::info!(
                                server = &*self.server.url,
                                "upstream server healthy again"
                            );
                            state.set_checked(true, None);
                        }
                    }
                }
                Err(why) => {
                    failed += 1;
                    passed = 0;
                    if healthy && failed >= self.policy.unhealthy_after {
                        healthy = false;
                        tracing::warn!(
                            server = &*self.server.url,
                            "upstream server unhealthy: {why}"
                        );
                        state.set_checked(
                            false,
                            Some(format!(
                                "health check: {failed} failed in a row (last: {why})"
                            )),
                        );
                    }
                }
            }
            drop(state);
            tokio::time::sleep(self.policy.interval).await;
        }
    }

    /// One GET of the health path: any 2xx passes.
    async fn probe(&self, conns: &Arc<ServerConns>) -> Result<(), String> {
        let (status, _) = conns
            .get(
                &self.server,
                self.policy.path.as_str(),
                "hyperion-health-check",
                64 << 10,
            )
            .await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!(
                "GET {} answered {}",
                self.policy.path,
                status_text(status)
            ))
        }
    }
}

fn status_text(s: StatusCode) -> String {
    match s.canonical_reason() {
        Some(r) => format!("{} {r}", s.as_u16()),
        None => s.as_u16().to_string(),
    }
}
