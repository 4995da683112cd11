//! Upstream pools at run time: choosing a server (by the pool's balancer,
//! among healthy ones, within `max_inflight_per_server`), sending the
//! request there with the pool's timeouts, and trying another server when
//! an attempt fails before any response byte, under the retry budget.
//!
//! Connections themselves (connecting, reuse, driving them) live in `conns`;
//! the servers' shared state and the health checks in `fleet` and
//! `server_state`; the strategies in `balance`. This module does not read
//! or change response bodies.

pub mod balance;
mod conns;
pub mod engine;
pub mod fleet;
pub mod models;
pub mod prefix;
mod retry;
pub mod server_state;

use std::error::Error as StdError;
use std::sync::Arc;

use http::uri::{PathAndQuery, Uri};
use http::{header, Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

use balance::PickFilter;
pub use conns::{ConnLease, UpstreamConn};
use conns::{ConnectError, SendError, ServerConns};
use fleet::PoolState;
use models::ModelName;
use retry::Replay;
use server_state::InFlight;

use crate::body::{BodyStalled, BodyTooLarge, ClientBodyError, RequestBody};
use crate::error::{ProxyError, TimeoutPhase};
use crate::limits::{InflightLimit, InflightSlot, NoSlot, Place};
use crate::policy::{UpstreamPolicy, UpstreamServer};

/// One `[upstreams.NAME]` at run time, owned by one worker thread (its
/// connections); the servers' state is shared (`PoolState`).
pub struct UpstreamPool {
    pub policy: Arc<UpstreamPolicy>,
    /// Parallel to `policy.servers`.
    conns: Box<[Arc<ServerConns>]>,
    pub state: Arc<PoolState>,
    /// `max_inflight_per_server`, shared by every worker's pool.
    inflight: Option<Arc<InflightLimit>>,
    /// Time to the response head, for `/metrics`.
    latency: Arc<crate::telemetry::SecondsHistogram>,
}

/// The server chosen for one request.
pub struct Pick<'a> {
    pub server: &'a UpstreamServer,
    /// Its place in `servers`.
    pub index: usize,
}

/// A request's place at a server: counted in flight there (and holding its
/// `max_inflight_per_server` slot) until dropped with the response body.
pub struct Admitted {
    pub index: usize,
    _slot: Option<InflightSlot>,
    _in_flight: InFlight,
}

/// A failed attempt, and whether another may follow.
struct Failure {
    error: ProxyError,
    /// The request, when it never left (connect errors). Boxed: failures
    /// are rare, and inline it made every attempt's `Result` 456 bytes,
    /// copied at each layer an answer returns through.
    unsent: Option<Box<Request<RequestBody>>>,
    /// The upstream may have seen the request but sent nothing back: worth
    /// another server if the request can be sent again.
    retryable: bool,
}

// === impl UpstreamPool ===

impl UpstreamPool {
    /// The pool of `state` for one worker; servers that `previous` (the
    /// worker's pool before a reload) reached the same way keep their
    /// idle connections.
    pub fn new(
        state: Arc<PoolState>,
        inflight: Option<Arc<InflightLimit>>,
        previous: Option<&UpstreamPool>,
    ) -> Self {
        let policy = state.policy.clone();
        UpstreamPool {
            conns: policy
                .servers
                .iter()
                .map(|s| {
                    previous
                        .filter(|p| p.policy.connect_timeout == policy.connect_timeout)
                        .and_then(|p| {
                            // TLS connections are made again: the reload
                            // may have changed what the server is trusted by.
                            let i = p.policy.servers.iter().position(|old| {
                                old.url == s.url && old.tls.is_none() && s.tls.is_none()
                            })?;
                            Some(p.conns[i].clone())
                        })
                        .unwrap_or_else(|| ServerConns::new(s, policy.connect_timeout))
                })
                .collect(),
            latency: crate::telemetry::upstream_latency(&policy.name),
            policy,
            state,
            inflight,
        }
    }

    /// A server for a request, and a slot there when the pool limits
    /// requests in flight: waiting in line for one up to `queue_timeout`,
    /// then a 503. The balancer's pick is preferred; a busy pick gives way
    /// to another usable server with a free slot. The request waits as
    /// `place` says (its tenant's turn, its class: asked only when the
    /// pool limits requests in flight); `waiting` hears when the wait in
    /// line starts and ends.
    pub async fn admit(
        &self,
        filter: &PickFilter,
        place: impl FnOnce() -> Place,
        waiting: impl Fn(bool),
    ) -> Result<Admitted, ProxyError> {
        let now = crate::clock::now();
        let index = self.pick(filter, now)?;
        let slot = match &self.inflight {
            None => None,
            Some(limit) => {
                let allowed = |i| self.usable(i, filter, now);
                match limit.acquire(index, allowed, &place(), waiting).await {
                    Ok(slot) => Some(slot),
                    Err(NoSlot::TimedOut {
                        waited,
                        retry_after,
                    }) => {
                        return Err(ProxyError::UpstreamBusy {
                            upstream: self.policy.name.clone(),
                            waited,
                            retry_after,
                        })
                    }
                    Err(NoSlot::TenantFull {
                        queued,
                        retry_after,
                    }) => {
                        return Err(ProxyError::TenantQueueFull {
                            upstream: self.policy.name.clone(),
                            queued,
                            retry_after,
                        })
                    }
                }
            }
        };
        Ok(self.admitted(index, slot))
    }

    /// Like `admit`, without waiting: `None` when no usable server has a
    /// free slot.
    pub fn try_admit(&self, filter: &PickFilter) -> Option<Admitted> {
        let now = crate::clock::now();
        let index = self.pick(filter, now).ok()?;
        let slot = match &self.inflight {
            None => None,
            Some(limit) => Some(limit.try_acquire(index, |i| self.usable(i, filter, now))?),
        };
        Some(self.admitted(index, slot))
    }

    fn pick(&self, filter: &PickFilter, now: Instant) -> Result<usize, ProxyError> {
        let state = &self.state;
        state
            .balancer
            .pick(&state.servers, filter, now)
            .ok_or_else(|| ProxyError::NoHealthyServer {
                upstream: self.policy.name.clone(),
            })
    }

    fn usable(&self, i: usize, filter: &PickFilter, now: Instant) -> bool {
        filter.only & (1 << i) != 0 && self.state.servers[i].usable(now)
    }

    fn admitted(&self, planned: usize, slot: Option<InflightSlot>) -> Admitted {
        // The slot may be at another server than planned (the planned one
        // was full).
        let index = slot.as_ref().map_or(planned, |s| s.server);
        Admitted {
            index,
            _slot: slot,
            _in_flight: self.state.servers[index].begin(),
        }
    }

    /// The server at `index` of `servers`, as `admit` chose it.
    pub fn pick_at(&self, index: usize) -> Pick<'_> {
        Pick {
            server: &self.policy.servers[index],
            index,
        }
    }

    /// The request target an HTTP/1.1 origin server expects: path and query
    /// only. HTTP/2 clients (and some HTTP/1.1 ones) send an absolute URI.
    pub fn origin_form(uri: Uri) -> Uri {
        if uri.scheme().is_none() && uri.authority().is_none() {
            return uri;
        }
        let pq = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        Uri::from(pq)
    }

    /// Sends `req` to the admitted server and waits for the response head,
    /// at most `response_timeout` an attempt. An attempt that fails before
    /// any response byte (connect error, connection reset; once sent, only
    /// for an idempotent method) is tried again on another server, up to
    /// `retries` times, after a jittered back-off and
    /// only within the pool's retry budget; a timed-out one is not (the
    /// server may still be working on it). Returns the response, the lease
    /// its body arrives on (holding the request's place at its server), and
    /// that server's index. Retries respect `filter` (the request's model,
    /// its hash) but not its preference. A success for `model` tells the
    /// pool the model is loaded there.
    pub async fn send(
        &self,
        mut admitted: Admitted,
        mut req: Box<Request<RequestBody>>,
        filter: PickFilter,
        model: Option<&ModelName>,
        preserve_host: bool,
        trace: Option<&crate::otel::RequestTrace>,
    ) -> Result<(Box<Response<Incoming>>, ConnLease, usize), ProxyError> {
        self.state.budget.earn();
        // A request that reached the server and failed is sent again only
        // when its method is idempotent: RFC 9110 §9.2.2 forbids a proxy to
        // retry a POST the server may have acted on (as nginx's
        // `proxy_next_upstream` does by default). One that never left (a
        // refused connect, a pooled connection found closing) comes back
        // from the attempt and goes again whatever its method.
        let replay = if self.policy.retries > 0 && req.method().is_idempotent() {
            Replay::of(&req)
        } else {
            None
        };
        let mut tried = 0u64;
        let mut attempts = 0u32;
        loop {
            let index = admitted.index;
            let started = crate::clock::now();
            // Each attempt is a span of the request's trace, and the
            // upstream's own spans its children (`traceparent`).
            let mut span = trace.map(|t| {
                let server = &self.policy.servers[index];
                let mut span = t.child("upstream attempt", crate::otel::SpanKind::Client);
                if span.sampled() {
                    span.set(crate::otel::Attribute::new(
                        "server.address",
                        server.url.to_string(),
                    ));
                    span.set(crate::otel::Attribute::new(
                        "http.request.resend_count",
                        i64::from(attempts),
                    ));
                    span.set(crate::otel::Attribute::new(
                        "hyperion.upstream",
                        self.policy.name.clone(),
                    ));
                }
                span.propagate(req.headers_mut());
                span
            });
            let mut failure = match self.attempt(index, req, started).await {
                Ok((resp, mut lease)) => {
                    self.note_answer(index, resp.status(), started, model);
                    if let Some(mut span) = span.take() {
                        let status = resp.status().as_u16();
                        span.set(crate::otel::Attribute::new(
                            "http.response.status_code",
                            i64::from(status),
                        ));
                        if status >= 500 {
                            span.fail("server error");
                        }
                        span.end();
                    }
                    lease.hold(admitted);
                    return Ok((resp, lease, index));
                }
                Err(f) => f,
            };
            if let Some(mut span) = span.take() {
                span.set(crate::otel::Attribute::new(
                    "error.type",
                    failure.error.code(),
                ));
                span.fail(failure.error.to_string());
                span.end();
            }
            self.note_failure(index, &failure.error);
            tried |= 1 << index;
            attempts += 1;
            let Some(mut again) = self.again(&mut failure, replay.as_ref(), attempts) else {
                return Err(failure.error);
            };
            // The failed attempt's place goes back before the pause.
            drop(admitted);
            tokio::time::sleep(retry::back_off(attempts)).await;
            let Some(next) = self.retry_server(&filter, tried) else {
                return Err(failure.error);
            };
            tracing::debug!(
                from = &*self.policy.servers[index].url,
                to = &*self.policy.servers[next.index].url,
                "retrying: {}",
                failure.error
            );
            if !preserve_host {
                again.headers_mut().insert(
                    header::HOST,
                    self.policy.servers[next.index].host_header.clone(),
                );
            }
            admitted = next;
            req = again;
        }
    }

    /// What an answer from server `index` says of it: a 5xx counts as a
    /// failure, anything else as a success (its latency recorded, and for
    /// `model`, that it is loaded there).
    fn note_answer(
        &self,
        index: usize,
        status: http::StatusCode,
        started: Instant,
        model: Option<&ModelName>,
    ) {
        let server = &self.state.servers[index];
        let now = crate::clock::now();
        let (eject_after, may_eject) = (self.policy.eject_after, self.policy.servers.len() > 1);
        if status.is_server_error() {
            server.failed(&format!("answered {status}"), eject_after, may_eject, now);
        } else {
            server.succeeded(now - started, now);
            self.latency.record(now - started);
            if let (Some(model), true) = (model, status.is_success()) {
                self.state.models.note_loaded(index, model);
            }
        }
    }

    /// A failed attempt counts against server `index`, unless the client's
    /// body was at fault.
    fn note_failure(&self, index: usize, error: &ProxyError) {
        let client_side = matches!(
            error,
            ProxyError::BodyTooLarge { .. }
                | ProxyError::ClientBody(_)
                | ProxyError::BodyTimeout { .. }
        );
        if !client_side {
            let (eject_after, may_eject) = (self.policy.eject_after, self.policy.servers.len() > 1);
            let now = crate::clock::now();
            self.state.servers[index].failed(&error.to_string(), eject_after, may_eject, now);
        }
    }

    /// The request to send again after `failure`: the one that never left,
    /// or a replay of an idempotent one; `None` when retries, or the pool's
    /// retry budget, are spent.
    fn again(
        &self,
        failure: &mut Failure,
        replay: Option<&Replay>,
        attempts: u32,
    ) -> Option<Box<Request<RequestBody>>> {
        let retryable = failure.retryable;
        let again = failure.unsent.take().or_else(|| {
            retryable
                .then(|| replay.and_then(Replay::request).map(Box::new))
                .flatten()
        })?;
        if attempts > self.policy.retries || !self.state.budget.spend(crate::clock::now()) {
            return None;
        }
        Some(again)
    }

    /// Where a retry goes: a usable server not tried yet, else (every one
    /// tried: a pool of one, a server that refused while restarting) the
    /// least bad of them again. Neither the balancer's preference nor the
    /// first pick's hash binds it.
    fn retry_server(&self, filter: &PickFilter, tried: u64) -> Option<Admitted> {
        let anywhere = PickFilter {
            tried: 0,
            prefer: 0,
            ..*filter
        };
        self.try_admit(&PickFilter { tried, ..anywhere })
            .or_else(|| self.try_admit(&anywhere))
    }

    /// One attempt at server `index`, begun at `started`: its response head
    /// is due within `response_timeout` of that.
    async fn attempt(
        &self,
        index: usize,
        req: Box<Request<RequestBody>>,
        started: Instant,
    ) -> Result<(Box<Response<Incoming>>, ConnLease), Failure> {
        let server = &self.policy.servers[index];
        let conns = &self.conns[index];
        // Connecting has its own bound (`connect_timeout`); the response
        // timer runs on the connection, counted from the attempt's start.
        let deadline = started + self.policy.response_timeout;
        let mut lease = match conns.checkout(started).await {
            Ok(lease) => lease,
            Err(e) => return Err(self.connect_failure(server, e, req)),
        };
        let req = match lease.conn().send(req, deadline).await {
            Ok(resp) => return Ok((resp, lease)),
            // A pooled connection that was closing as we took it: the request
            // never left, so it goes out once more on a new connection.
            Err(SendError::Failed(_, Some(req))) => req,
            Err(e) => return Err(self.send_failure(server, &e)),
        };
        let mut lease = match conns.checkout_new().await {
            Ok(lease) => lease,
            Err(e) => return Err(self.connect_failure(server, e, req)),
        };
        match lease.conn().send(req, deadline).await {
            Ok(resp) => Ok((resp, lease)),
            Err(SendError::Failed(e, unsent)) => Err(Failure {
                unsent,
                ..sent_failure(server, &e)
            }),
            Err(e) => Err(self.send_failure(server, &e)),
        }
    }

    /// An attempt that sent its request and got no answer.
    fn send_failure(&self, server: &UpstreamServer, e: &SendError) -> Failure {
        match e {
            SendError::Failed(e, _) => sent_failure(server, e),
            SendError::TimedOut => Failure {
                error: ProxyError::UpstreamTimeout {
                    server: server.url.to_string(),
                    phase: TimeoutPhase::ResponseHead,
                    timeout: self.policy.response_timeout,
                },
                unsent: None,
                retryable: false,
            },
        }
    }

    fn connect_failure(
        &self,
        server: &UpstreamServer,
        e: ConnectError,
        req: Box<Request<RequestBody>>,
    ) -> Failure {
        let timed_out = ProxyError::UpstreamTimeout {
            server: server.url.to_string(),
            phase: TimeoutPhase::Connect,
            timeout: self.policy.connect_timeout,
        };
        let error = match e {
            ConnectError::TimedOut => timed_out,
            ConnectError::Io(e) if e.kind() == std::io::ErrorKind::TimedOut => timed_out,
            ConnectError::Io(e) => ProxyError::UpstreamUnavailable {
                server: server.url.to_string(),
                reason: format!("connecting: {e}"),
            },
            ConnectError::Tls(e) => ProxyError::UpstreamUnavailable {
                server: server.url.to_string(),
                reason: format!("TLS handshake: {}", error_chain(&e)),
            },
            ConnectError::Handshake(e) => ProxyError::UpstreamUnavailable {
                server: server.url.to_string(),
                reason: error_chain(&e),
            },
        };
        Failure {
            error,
            unsent: Some(req),
            retryable: true,
        }
    }
}

/// A request that was (at least partly) sent failed: the client's own body
/// failing is the client's fault and final; anything else the upstream's.
fn sent_failure(server: &UpstreamServer, e: &hyper::Error) -> Failure {
    let error = classify(server, e);
    let retryable = matches!(error, ProxyError::UpstreamFailed { .. });
    Failure {
        error,
        unsent: None,
        retryable,
    }
}

/// Maps a failed exchange to what the client is told: the client's own body
/// failing is the client's fault, anything else the upstream's.
fn classify(server: &UpstreamServer, e: &hyper::Error) -> ProxyError {
    let mut source: Option<&(dyn StdError + 'static)> = e.source();
    while let Some(err) = source {
        if let Some(too_large) = err.downcast_ref::<BodyTooLarge>() {
            return ProxyError::BodyTooLarge {
                limit: too_large.limit,
            };
        }
        if let Some(client) = err.downcast_ref::<ClientBodyError>() {
            return ProxyError::ClientBody(client.to_string());
        }
        if let Some(stalled) = err.downcast_ref::<BodyStalled>() {
            return ProxyError::BodyTimeout { timeout: stalled.0 };
        }
        source = err.source();
    }
    ProxyError::UpstreamFailed {
        server: server.url.to_string(),
        reason: error_chain(e),
    }
}

/// "outer: inner: innermost", for logs.
pub fn error_chain(e: &dyn StdError) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(err) = source {
        let s = err.to_string();
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        source = err.source();
    }
    out
}
