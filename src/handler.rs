//! The request path, in order: request id → route → request limits → body
//! → cache → upstream limits → a server and a slot → upstream → response
//! headers → streamed body, with one access-log record carried to the end
//! of the response body.
//!
//! This is the one place that knows the order of the steps (`handle` and
//! `forward` below); each step is a function in its own file:
//! `handler/admit.rs` (route, request limits, the body), `handler/cached.rs`
//! (the cache's plan), `handler/dispatch.rs` (a server, the upstream request,
//! the answer), `handler/upgrade.rs` (tunnels), `handler/respond.rs` (what
//! every answer gets on its way out) and `handler/log.rs` (the access-log
//! record). The steps share one [`RequestState`] instead of out-parameters.
//! Each step's rules live in their own modules (`route`, `headers`, `body`,
//! `cache`, `upstream`); connection handling lives in `server`.

mod admit;
mod cached;
mod dispatch;
mod log;
mod respond;
mod upgrade;

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use http::header::HeaderValue;
use http::{Method, Request, Response, Version};
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::{AccessLog, AccessRecord};
use crate::body::{ReadAheadLimits, ResponseBody};
use crate::cache::Cache;
use crate::conn::ConnState;
use crate::error::ProxyError;
use crate::headers::{self, RequestFields};
use crate::limits::{Admission, Limits, RouteLimits};
use crate::policy::{HeaderRewrite, Policy, RoutePolicy};
use crate::protect::Protect;
use crate::route::RouteTable;
use crate::upstream::fleet::Fleet;
use crate::upstream::UpstreamPool;

use self::cached::{Plan, Upstream};

/// A running policy: routes resolved to their upstream pools.
pub struct Proxy {
    policy: Arc<Policy>,
    routes: RouteTable<Route>,
    log: Arc<AccessLog>,
    /// One per process, shared by the workers.
    cache: Arc<Cache>,
    /// This worker's side of each pool (its connections).
    pools: Vec<Arc<UpstreamPool>>,
    /// One per process: the buffered-body budget, connection counts.
    protect: Arc<Protect>,
    /// How far upstream answers are read ahead of slow clients.
    read_ahead: Option<ReadAheadLimits>,
    /// The tracer, when `[tracing]` is set.
    traces: Option<Arc<crate::otel::Traces>>,
}

/// A route with its upstream pool resolved.
struct Route {
    policy: Arc<RoutePolicy>,
    name: Arc<str>,
    /// `None` on a `deny` route; the first arm's on a split route.
    pool: Option<Arc<UpstreamPool>>,
    /// A split route's arms, in `policy.split`'s order (with each arm's
    /// upstream's name, for the cache key, the log and the metrics).
    arms: Box<[(Arc<UpstreamPool>, Arc<str>)]>,
    limits: RouteLimits,
    /// The route's limiters with each tenant plan's budgets, by the plan's
    /// index (`policy.tenancy`).
    by_plan: Box<[RouteLimits]>,
}

/// What a request knows about the connection it came on.
pub struct ConnInfo {
    /// The TCP peer, IPv4-mapped addresses as IPv4.
    pub peer: IpAddr,
    /// `peer` as forwarding headers write it.
    pub peer_value: HeaderValue,
    /// `http` or `https`.
    pub proto: &'static str,
    pub state: Arc<ConnState>,
    /// Where tunnels (upgraded connections) are spawned, so shutdown can wait
    /// for them and cut them at the end of the grace period.
    pub tasks: TaskTracker,
    pub force_close: CancellationToken,
}

/// What a worker's proxy shares with the other workers' (a generation's).
pub struct Shared {
    pub log: Arc<AccessLog>,
    pub cache: Arc<Cache>,
    pub limits: Arc<Limits>,
    pub fleet: Arc<Fleet>,
    pub protect: Arc<Protect>,
    pub traces: Option<Arc<crate::otel::Traces>>,
}

// === impl Proxy ===

impl Proxy {
    /// A proxy sharing the access log and the cache with other workers: one
    /// per worker runtime, each with its own upstream connection pools
    /// (those of `previous`, the worker's proxy before a reload, kept where
    /// the servers are the same).
    pub fn worker(policy: Arc<Policy>, shared: Shared, previous: Option<&Proxy>) -> Self {
        let Shared {
            log,
            cache,
            limits,
            fleet,
            protect,
            traces,
        } = shared;
        let pools: Vec<Arc<UpstreamPool>> = fleet
            .pools()
            .iter()
            .map(|p| {
                let inflight = limits.inflight(&p.policy.name);
                let before = previous.and_then(|prev| {
                    prev.pools
                        .iter()
                        .find(|old| old.policy.name == p.policy.name)
                });
                Arc::new(UpstreamPool::new(p.clone(), inflight, before.map(|b| &**b)))
            })
            .collect();
        let routes = policy
            .routes
            .iter()
            .map(|r| {
                let pool = (!r.deny).then(|| {
                    pools
                        .iter()
                        .find(|p| p.policy.name == r.upstream)
                        .expect("validation resolved every route's upstream")
                        .clone()
                });
                let arms = r
                    .split
                    .iter()
                    .map(|arm| {
                        let pool = pools
                            .iter()
                            .find(|p| p.policy.name == arm.upstream)
                            .expect("validation resolved every arm's upstream")
                            .clone();
                        (pool, Arc::from(arm.upstream.as_str()))
                    })
                    .collect();
                let route = Route {
                    policy: r.clone(),
                    name: Arc::from(r.name.as_str()),
                    pool,
                    arms,
                    limits: limits.for_route(&r.rate_limits),
                    by_plan: policy
                        .tenancy
                        .plans
                        .iter()
                        .map(|plan| {
                            let mut names = r.rate_limits.clone();
                            names.extend(plan.limiters.iter().cloned());
                            limits.for_route(&names)
                        })
                        .collect(),
                };
                (r.matcher.clone(), Arc::new(route))
            })
            .collect();
        Proxy {
            routes: RouteTable::new(routes),
            pools,
            log,
            read_ahead: (policy.server.read_ahead > 0).then(|| ReadAheadLimits {
                per_response: usize::try_from(policy.server.read_ahead).unwrap_or(usize::MAX),
                budget: protect.read_ahead.clone(),
            }),
            policy,
            cache,
            protect,
            traces,
        }
    }

    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    pub fn protect(&self) -> &Arc<Protect> {
        &self.protect
    }

    /// Answers one request. Never fails: errors become JSON responses.
    ///
    /// An async block, not an `async fn`: an `async fn` copies its arguments
    /// into its body's locals on the first poll, and this one's request is
    /// 264 bytes.
    #[allow(clippy::manual_async_fn)]
    pub fn handle<'a>(
        &'a self,
        req: Request<Incoming>,
        conn: &'a ConnInfo,
    ) -> impl Future<Output = Response<ResponseBody>> + Send + 'a {
        async move {
            let inflight = conn.state.begin(req.version());
            let h2 = req.version() == Version::HTTP_2;
            let fields = RequestFields::of(req.headers());
            let request_id = headers::request_id(fields.request_id.as_ref());
            // Per request, not per connection: a reload may change the list.
            let peer_trusted = headers::is_trusted(conn.peer, &self.policy.server.trusted_proxies);
            // If the client leaves before a response exists, hyper drops this
            // future: the guard still logs the request, as 499 (nginx's code).
            let mut pending = self.pending_log(&req, conn, peer_trusted, &request_id, inflight);
            // What compression needs of the request, kept before it is consumed.
            let accept = self.kept_accept_encoding(&req);
            let head_only = req.method() == Method::HEAD;
            let trace = self.traces.as_ref().map(|t| {
                let trace = t.request(req.headers(), req.method(), req.uri().path());
                if trace.sampled() {
                    trace.set_all(otel_request_attributes(&request_id, req.uri().path()));
                }
                trace
            });
            let mut st = RequestState {
                conn,
                peer_trusted,
                rec: pending.record(),
                admission: Admission::default(),
                rewrite: None,
                key_slot: None,
                waited: None,
                upstream_head: None,
                trace,
            };
            let forwarded = self.forward(&mut st, req, fields).await;
            let spends = respond::spends_left(&mut st.admission, &forwarded);
            // The answer is moved as little as it can be: it is a few hundred
            // bytes, and every move of it is a copy.
            let mut resp = match forwarded {
                Ok(mut resp) => {
                    let shaped = self
                        .shape(&mut st, &mut resp, &accept, head_only, spends)
                        .await;
                    match shaped {
                        Ok(()) => resp,
                        Err(e) => self.failed(&mut st, e),
                    }
                }
                Err(e) => self.failed(&mut st, e),
            };
            self.finish(&mut st, &mut resp, request_id, h2);
            let key_slot = st.key_slot.take();
            let trace = st.trace.take();
            let log = pending.take().holding(key_slot);
            let log = match trace {
                // The answer's body is a step of its own, to its end.
                Some(trace) => log.traced(trace),
                None => log,
            };
            resp.body_mut().on_end(log);
            resp
        }
    }

    /// The steps from a request to an answer, in order; an error is
    /// answered by `handle`. An async block for the reason `handle` is one.
    #[allow(clippy::manual_async_fn)]
    fn forward<'a, 's>(
        &'a self,
        st: &'a mut RequestState<'s>,
        mut req: Request<Incoming>,
        fields: RequestFields,
    ) -> impl Future<Output = Result<Response<ResponseBody>, ProxyError>> + Send + use<'a, 's> {
        async move {
            // Which route, and whether the request's head is acceptable.
            let mut arrival = self.arrive(st, &mut req, &fields)?;
            if let Some(t) = &st.trace {
                t.route(req.method(), &arrival.route.name);
            }
            // Request-count limits, then the body (when a step needs it),
            // then token limits.
            if arrival.needs_admission(&req) {
                arrival.admit(self, st, &mut req).await?;
            }
            if let Some(t) = st.trace.as_ref().filter(|t| t.sampled()) {
                if let Some(model) = &arrival.facts.model {
                    // Model names are kept with Ollama's default tag; the
                    // request asked for the name without it, and OpenAI
                    // names have none.
                    let asked = model.as_str();
                    let asked = asked.strip_suffix(":latest").unwrap_or(asked);
                    t.set(crate::otel::Attribute::new(
                        "gen_ai.request.model",
                        asked.to_owned(),
                    ));
                }
            }
            // The cache: answer from it, or learn how to treat the
            // upstream's answer.
            let mut plan = Upstream::default();
            if let Some(policy) = arrival.cache_policy() {
                match arrival.consult_cache(self, st, &req, policy).await? {
                    Plan::Answered(resp) => return Ok(resp),
                    Plan::Upstream(upstream) => plan = upstream,
                }
            }
            // The limiters that count only what goes upstream. A background
            // refresh behind a stale answer is the proxy's own errand and
            // spends nothing.
            if arrival.arrived.is_some() {
                let spends = plan.serve_stale.is_none();
                arrival.upstream_limits(st, req.headers(), spends).await?;
            }
            // A server and a slot there.
            let taken = self.take_server(st, &mut arrival, &req, &mut plan).await;
            if let (Some(t), Some(waited)) = (&st.trace, st.waited) {
                // A wait known once it is over: its span begins back then.
                let began = std::time::SystemTime::now() - waited;
                let mut span = t.child_since("queue", crate::otel::SpanKind::Internal, began);
                span.set(crate::otel::Attribute::new(
                    "hyperion.upstream",
                    arrival.pool.policy.name.clone(),
                ));
                span.end();
            }
            let Some(slot) = taken? else {
                return Ok(plan
                    .serve_stale
                    .take()
                    .expect("take_server leaves the answer"));
            };
            // The request as the upstream gets it.
            let exchange = plan.exchange.as_mut();
            let req = self.upstream_request(st, &mut arrival, req, &fields, &slot, exchange);
            let preserve_host = arrival.route.policy.preserve_host;
            let pool = arrival.pool;
            let timed = self.policy.server.server_timing.then(crate::clock::now);
            if let Some(ex) = plan.exchange.take_if(|ex| ex.leads()) {
                let stale = plan.serve_stale.take();
                let led = dispatch::lead(st, ex, pool, (slot, req, preserve_host), stale).await;
                st.upstream_head = timed.map(|t| t.elapsed());
                return led;
            }
            // Sent here, not in a step's function: see `dispatch.rs`.
            let model = slot.model.as_ref();
            let trace = st.trace.as_ref();
            let sent = pool
                .send(slot.admitted, req, slot.filter, model, preserve_host, trace)
                .await;
            st.upstream_head = timed.map(|t| t.elapsed());
            if let (Ok((_, _, index)), Some(blocks), Some(prefix)) =
                (&sent, &slot.blocks, &pool.state.prefix)
            {
                // A retry answered elsewhere: that server has the prompt now.
                if *index != slot.planned {
                    prefix.record(blocks, *index);
                }
            }
            let resp = self.answer(st, &mut arrival, sent, &mut plan, slot.planned)?;
            // On a caching route, the answer goes through the exchange:
            // stored, revalidated, shared with identical requests.
            let Some(ex) = plan.exchange.take() else {
                return Ok(resp);
            };
            let (resp, status) = boxed_in_place!(ex.respond(resp)).await;
            st.rec.cache = status.as_str();
            Ok(resp)
        }
    }
}

/// What one request carries from step to step, until its answer leaves.
struct RequestState<'a> {
    conn: &'a ConnInfo,
    /// The peer is one of `trusted_proxies`: its forwarding headers stand.
    peer_trusted: bool,
    /// The access-log record, finished when the response body ends.
    rec: &'a mut AccessRecord,
    /// What the limiters spent, their headers, the token estimate.
    admission: Admission,
    /// The route's header rewrite, applied to the answer too.
    rewrite: Option<Arc<HeaderRewrite>>,
    /// The request's place under its key's `max_concurrent`: held until
    /// the answer's body ends.
    key_slot: Option<crate::limits::per_key::KeySlot>,
    /// How long it waited in line for a busy upstream, if it had to.
    waited: Option<std::time::Duration>,
    /// How long the upstream took to the answer's head (measured only for
    /// `server_timing`).
    upstream_head: Option<std::time::Duration>,
    /// The request's trace (`[tracing]`), handed to the access-log record
    /// at the end to be ended with the body.
    trace: Option<crate::otel::RequestTrace>,
}

/// What a sampled request's server span says from the start: its id, and
/// the GenAI system and operation its path names.
fn otel_request_attributes(request_id: &HeaderValue, path: &str) -> Vec<crate::otel::Attribute> {
    use crate::otel::Attribute;
    let mut out = vec![Attribute::new(
        "hyperion.request_id",
        request_id.to_str().unwrap_or("-").to_owned(),
    )];
    let system = if path.starts_with("/api/") {
        Some("ollama")
    } else if path.starts_with("/v1/") {
        Some("openai")
    } else {
        None
    };
    let ends = |tails: &[&str]| tails.iter().any(|t| path.ends_with(t));
    let operation = if ends(&["/chat", "/chat/completions"]) {
        Some("chat")
    } else if ends(&["/generate", "/completions"]) {
        Some("text_completion")
    } else if ends(&["/embed", "/embeddings"]) {
        Some("embeddings")
    } else {
        None
    };
    if let (Some(system), Some(operation)) = (system, operation) {
        out.push(Attribute::new("gen_ai.system", system));
        out.push(Attribute::new("gen_ai.operation.name", operation));
    }
    out
}

/// A 429 from limiter `r`: counted, what earlier limiters spent given back,
/// and the refusing bucket's headers kept for the answer.
fn rate_limited(r: crate::limits::Refused, admission: &mut Admission) -> ProxyError {
    crate::telemetry::rate_limited(&r.limiter);
    admission.refund_all();
    admission.headers = Some(r.headers);
    ProxyError::RateLimited {
        limiter: r.limiter,
        retry_after: r.retry_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn genai_system_and_operation_follow_the_path() {
        let id = HeaderValue::from_static("r1");
        let named = |path: &str| {
            let attrs = otel_request_attributes(&id, path);
            let get = |k: &str| {
                attrs
                    .iter()
                    .find(|a| a.key.as_str() == k)
                    .map(|a| a.value.to_string())
            };
            (get("gen_ai.system"), get("gen_ai.operation.name"))
        };
        let s = |v: &str| Some(v.to_owned());
        assert_eq!(named("/api/chat"), (s("ollama"), s("chat")));
        assert_eq!(named("/api/generate"), (s("ollama"), s("text_completion")));
        assert_eq!(named("/api/embed"), (s("ollama"), s("embeddings")));
        assert_eq!(named("/v1/chat/completions"), (s("openai"), s("chat")));
        assert_eq!(
            named("/v1/completions"),
            (s("openai"), s("text_completion"))
        );
        assert_eq!(named("/v1/embeddings"), (s("openai"), s("embeddings")));
        assert_eq!(named("/api/tags"), (None, None));
        assert_eq!(named("/health"), (None, None));
    }
}
