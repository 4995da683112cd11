//! The request path, in order: request id → route → request limits → forward
//! headers → upstream → response headers → streamed body, with one access-log
//! record carried to the end of the response body.
//!
//! This is the one place that knows the order of the steps. Each step's rules
//! live in its own module (`route`, `headers`, `body`, `upstream`); connection
//! handling lives in `server`.

use std::borrow::Cow;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::{AccessLog, AccessRecord};
use crate::body::{BodyEnd, BodyOutcome, BoxError, ReadAheadLimits, RequestBody, ResponseBody};
use crate::cache::{Before, BodyDigest, Cache, CacheQuery, CacheStatus, Exchange, Followed};
use crate::compress;
use crate::conn::{ConnState, InflightGuard};
use crate::error::{ProxyError, TimeoutPhase};
use crate::headers::{self, Forwarding, X_CACHE, X_REQUEST_ID};
use crate::limits::{tokens, Admission, Counting, Limits, RouteLimits, Stage, Subject, TokenMeter};
use crate::policy::UpstreamServer;
use crate::policy::{Balance, BodyKey, HashKey, HeaderRewrite, Policy, RoutePolicy, UnknownModel};
use crate::progress::StallWatch;
use crate::protect::{BodyBudget, BodyCharge, Deadline, Protect};
use crate::route::RouteTable;
use crate::tunnel::TunnelEnd;
use crate::upstream::balance::PickFilter;
use crate::upstream::fleet::Fleet;
use crate::upstream::models::{self, ModelChoice};
use crate::upstream::{error_chain, ConnLease, UpstreamConn, UpstreamPool};

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
}

/// A route with its upstream pool resolved.
struct Route {
    policy: Arc<RoutePolicy>,
    name: Arc<str>,
    /// `None` on a `deny` route.
    pool: Option<Arc<UpstreamPool>>,
    limits: RouteLimits,
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

// === impl Proxy ===

impl Proxy {
    /// A proxy sharing the access log and the cache with other workers: one
    /// per worker runtime, each with its own upstream connection pools
    /// (those of `previous`, the worker's proxy before a reload, kept where
    /// the servers are the same).
    pub fn worker(
        policy: Arc<Policy>,
        log: Arc<AccessLog>,
        cache: Arc<Cache>,
        limits: Arc<Limits>,
        fleet: Arc<Fleet>,
        protect: Arc<Protect>,
        previous: Option<&Proxy>,
    ) -> Self {
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
                let route = Route {
                    policy: r.clone(),
                    name: Arc::from(r.name.as_str()),
                    pool,
                    limits: limits.for_route(&r.rate_limits),
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
            let fields = headers::RequestFields::of(req.headers());
            let request_id = headers::request_id(fields.request_id.as_ref());
            let trusted = &self.policy.server.trusted_proxies;
            // Per request, not per connection: a reload may change the list.
            let peer_trusted = headers::is_trusted(conn.peer, trusted);
            let lines = self.log.writes_lines();
            let line_field = |name| lines.then(|| req.headers().get(name).cloned()).flatten();
            let rec = AccessRecord {
                started: crate::clock::now(),
                client: headers::client_ip(conn.peer, peer_trusted, req.headers(), trusted),
                method: req.method().clone(),
                target: req.uri().path_and_query().cloned(),
                version: req.version(),
                status: 0,
                route: None,
                upstream: None,
                request_id: request_id.clone(),
                cache: "-",
                user_agent: line_field(header::USER_AGENT),
                referer: line_field(header::REFERER),
                error: None,
            };
            // If the client leaves before a response exists, hyper drops this
            // future: the guard still logs the request, as 499 (nginx's code).
            // Boxed once, here: the box becomes the response body's end hook.
            let mut pending = PendingLog(Some(Box::write(
                Box::new_uninit(),
                RequestLog {
                    rec,
                    log: self.log.clone(),
                    _inflight: inflight,
                },
            )));
            let rec = &mut pending.0.as_mut().expect("just set").rec;
            let mut rewrite = None;
            // What compression needs of the request, kept before it is consumed.
            let mut accept = HeaderMap::new();
            if self.policy.compression.is_some() {
                for v in req.headers().get_all(header::ACCEPT_ENCODING) {
                    accept.append(header::ACCEPT_ENCODING, v.clone());
                }
            }
            let head_only = req.method() == Method::HEAD;
            let mut admission = Admission::default();
            let forwarded = self
                .forward(
                    (req, fields),
                    (conn, peer_trusted),
                    rec,
                    &request_id,
                    &mut rewrite,
                    &mut admission,
                )
                .await;
            let spends = admission.take_token_spends();
            let mut spends = (!spends.is_empty()).then_some(spends);
            if let (Some(s), Err(e)) = (&spends, &forwarded) {
                match e {
                    // Cut off waiting for the answer, the backend may have worked
                    // all along: the reservation stands. Other failures (connect
                    // timeouts included) generated nothing.
                    ProxyError::UpstreamTimeout {
                        phase: TimeoutPhase::ResponseHead,
                        ..
                    } => {}
                    _ => s.iter().for_each(|s| s.settle(0)),
                }
            }
            // The answer is moved as little as it can be: it is a few hundred
            // bytes, and every move of it is a copy.
            let failed = |e: ProxyError, rec: &mut AccessRecord| {
                if let ProxyError::BodyTimeout { .. } = e {
                    self.protect.cut.count(Deadline::BodyRead);
                }
                if e.status().is_server_error() {
                    tracing::warn!(request_id = request_id.to_str().unwrap_or("-"), "{e}");
                } else {
                    tracing::debug!(request_id = request_id.to_str().unwrap_or("-"), "{e}");
                }
                rec.error = Some(e.code());
                let mut resp = e.into_response(&request_id).map(ResponseBody::full);
                if rec.cache != "-" {
                    resp.headers_mut()
                        .insert(X_CACHE, HeaderValue::from_static(rec.cache));
                }
                resp
            };
            let mut resp = match forwarded {
                Ok(mut resp) => {
                    // What the upstream or the cache answered, as the route wants
                    // clients to see it (Hyperion's own errors are left alone).
                    let upgraded = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
                    let mut rewritten = false;
                    if let Some(rw) = rewrite.filter(|_| !upgraded) {
                        rewritten = rw.rewrites_responses();
                        rw.apply_response(resp.headers_mut());
                    }
                    let coded = match &self.policy.compression {
                        Some(cp) if !upgraded => {
                            compress::encode_response(
                                cp,
                                &accept,
                                head_only,
                                rewritten,
                                &self.cache,
                                &mut resp,
                            )
                            .await
                        }
                        _ => Ok(()),
                    };
                    match coded {
                        Ok(()) => {
                            // Settled with the answer's usage when its body ends
                            // (the meter reads the body before any coding).
                            if let Some(spends) = spends.take() {
                                let ct = resp.headers().get(header::CONTENT_TYPE);
                                let meter = TokenMeter::new(
                                    spends,
                                    ct.map(|v| v.as_bytes()),
                                    resp.status().is_success(),
                                    admission.estimate.map_or(0, |(_, prompt)| prompt),
                                );
                                resp.body_mut().meter(meter);
                            }
                            resp
                        }
                        Err(e) => failed(e, rec),
                    }
                }
                Err(e) => failed(e, rec),
            };
            rec.status = resp.status().as_u16();
            resp.headers_mut().insert(X_REQUEST_ID, request_id);
            if let Some(limit) = &admission.headers {
                limit.apply(resp.headers_mut());
            }
            if h2 && resp.body().holds_upstream() {
                // HTTP/2 clients can stall a stream without blocking a
                // write: a watchdog holds them to `send_timeout` too.
                let watch = Arc::new(StallWatch::new());
                resp.body_mut().watch_progress(watch.clone());
                crate::conn::watch_stream(
                    conn.state.clone(),
                    watch,
                    self.policy.server.send_timeout,
                );
            }
            resp.body_mut()
                .on_end(pending.0.take().expect("taken once"));
            resp
        }
    }

    /// An async block for the reason `handle` is one.
    #[allow(clippy::manual_async_fn)]
    fn forward<'a>(
        &'a self,
        (mut req, fields): (Request<Incoming>, headers::RequestFields),
        (conn, peer_trusted): (&'a ConnInfo, bool),
        rec: &'a mut AccessRecord,
        request_id: &'a HeaderValue,
        rewrite: &'a mut Option<Arc<HeaderRewrite>>,
        admission: &'a mut Admission,
    ) -> impl Future<Output = Result<Response<ResponseBody>, ProxyError>> + Send + 'a {
        async move {
            let limits = &self.policy.server;
            let host_value = fields.host.or_else(|| {
                req.uri()
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            });
            if fields.hosts_repeated {
                // RFC 9112 §3.2: more than one Host field line is a 400; two
                // hosts would let routing and the upstream disagree.
                return Err(ProxyError::BadRequest(
                    "a request may carry one Host header, not several",
                ));
            }
            if host_value.is_none() && req.version() == Version::HTTP_11 {
                // RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without Host.
                return Err(ProxyError::BadRequest(
                    "HTTP/1.1 requests need a Host header",
                ));
            }
            // One spelling of the path for routing, the cache key, the
            // limits and the upstream (`path.rs`).
            let normal = match crate::path::normalize(req.uri().path()) {
                Ok(Cow::Borrowed(_)) => None,
                Ok(Cow::Owned(p)) => Some(p),
                Err(e) => return Err(ProxyError::BadRequest(e.as_str())),
            };
            if let Some(path) = normal {
                *req.uri_mut() = with_path(req.uri(), path)
                    .ok_or(ProxyError::BadRequest("the request target is invalid"))?;
            }
            let host = host_value.as_ref().and_then(host_name);
            let route = self
                .routes
                .find(req.method(), host.as_deref(), req.uri().path())
                .ok_or(ProxyError::NoRoute)?;
            rec.route = Some(route.name.clone());
            let Some(route_pool) = &route.pool else {
                return Err(ProxyError::Denied {
                    route: route.name.to_string(),
                });
            };
            rewrite.clone_from(&route.policy.headers);
            let client = rec.client;
            let who = |headers, at| subject(client, headers, &route.name, at);
            // One clock reading for every limiter checked on arrival, and for a
            // cache hit's look at the rest.
            let arrived = (!route.limits.is_empty()).then(crate::clock::now);
            // A request refused before the limiters count it still tells the
            // client where it stands.
            let refuse = |e: ProxyError, headers: &HeaderMap, admission: &mut Admission| {
                if let Some(at) = arrived {
                    route
                        .limits
                        .peek_rest(&subject(client, headers, &route.name, at), admission);
                }
                Err(e)
            };

            let uri_len = req.uri().path_and_query().map_or(1, |pq| pq.as_str().len());
            if headers::head_size(req.method().as_str(), uri_len, fields.size)
                > limits.max_header_size
            {
                let e = ProxyError::HeadersTooLarge {
                    limit: limits.max_header_size,
                };
                return refuse(e, req.headers(), admission);
            }
            let e = match fields.content_length {
                Some(None) => Some(ProxyError::BadRequest("Content-Length is not a number")),
                Some(Some(n)) if n > limits.max_request_body => Some(ProxyError::BodyTooLarge {
                    limit: limits.max_request_body,
                }),
                _ => None,
            };
            if let Some(e) = e {
                return refuse(e, req.headers(), admission);
            }

            let upgrade = (fields.upgrade && req.version() == Version::HTTP_11)
                .then(|| headers::requested_upgrade(req.headers()))
                .flatten();
            let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));

            // The cache: answer from it, or learn how to treat the upstream's answer.
            let mut exchange = None;
            let mut read_ahead = None;
            // Served stale while `exchange` refreshes the entry in the background.
            let mut serve_stale = None;
            let cache_policy = route.policy.cache.as_ref().filter(|_| upgrade.is_none());
            let body_keyed = cache_policy.is_some_and(|p| p.body_key != BodyKey::None);
            if cache_policy.is_some_and(|p| p.keys_accept_encoding) {
                // The client's Accept-Encoding goes upstream on this route:
                // in its canonical form, which is what the key holds.
                match crate::cache::accept_coding::canonical(req.headers()) {
                    Some(v) => req.headers_mut().insert(header::ACCEPT_ENCODING, v),
                    None => req.headers_mut().remove(header::ACCEPT_ENCODING),
                };
            }
            let by_model = route_pool.state.models.routes_by_model();
            // Request-count limits first: a refused client costs no body read.
            if let Some(at) = arrived {
                route
                    .check_limits(
                        Stage::Arrival,
                        Counting::Requests,
                        // Not `who`: its one lifetime would hold `req`
                        // borrowed across the body read below.
                        &subject(client, req.headers(), &route.name, at),
                        &None,
                        admission,
                    )
                    .await?;
            }
            // Body-keyed routes need the body for the key, token-limited ones for
            // the request's `max_tokens`, model-routed ones for its `model`.
            // Held in memory until this request is answered, under the
            // process's budget for such bodies.
            let reads_body = (body_keyed || by_model || route.limits.counts_tokens())
                && !http_body::Body::is_end_stream(req.body());
            if let (true, Some(at)) = (reads_body, arrived) {
                // A client already out of its request budget would be
                // refused upstream: refuse it before reading its body.
                let who = subject(client, req.headers(), &route.name, at);
                if let Some(r) = route.limits.exhausted(&who, Stage::Upstream) {
                    crate::telemetry::rate_limited(&r.limiter);
                    admission.refund_all();
                    admission.headers = Some(r.headers);
                    return Err(ProxyError::RateLimited {
                        limiter: r.limiter,
                        retry_after: r.retry_after,
                    });
                }
            }
            let mut body_charge = if reads_body {
                self.protect.bodies.empty()
            } else {
                BodyCharge::none()
            };
            if reads_body {
                let read = read_body(
                    req.body_mut(),
                    limits.max_request_body,
                    limits.body_read_timeout,
                    &self.protect.bodies,
                    &mut body_charge,
                )
                .await;
                match read {
                    Ok(body) => read_ahead = Some(body),
                    Err(e) => return refuse(e, req.headers(), admission),
                }
            }
            // What the body says (its key digest, model, token estimate),
            // worked out once; for a big body on the blocking pool, so
            // parsing megabytes never holds up this worker's other
            // connections.
            let facts = match &read_ahead {
                Some(body) => {
                    let wants = WantedFacts {
                        keyed_by: body_keyed.then(|| route.policy.clone()),
                        model: by_model,
                        tokens: route
                            .limits
                            .counts_tokens()
                            .then(|| route.limits.default_tokens()),
                    };
                    if body.len() >= PARSE_OFF_THREAD {
                        let (body, wants) = (body.clone(), wants.clone());
                        tokio::task::spawn_blocking(move || wants.read(&body))
                            .await
                            .unwrap_or_default()
                    } else {
                        wants.read(body)
                    }
                }
                None => BodyFacts::default(),
            };
            if facts.estimate.is_some() {
                admission.estimate = facts.estimate;
            }
            if let Some(at) = arrived {
                route
                    .check_limits(
                        Stage::Arrival,
                        Counting::Tokens,
                        &who(req.headers(), at),
                        &read_ahead,
                        admission,
                    )
                    .await?;
            }
            if let Some(policy) = cache_policy {
                // Waiting behind an identical request may end with it failing:
                // then look again, once, before going upstream alone.
                let mut joins_left = 2;
                loop {
                    let query = CacheQuery {
                        route: &route.name,
                        method: req.method(),
                        host: host.as_deref().unwrap_or(""),
                        path: req.uri().path(),
                        query: req.uri().query(),
                        headers: req.headers(),
                        body: read_ahead.as_ref(),
                        body_digest: facts.digest.as_ref(),
                    };
                    // The cache's futures are boxed where they are awaited: inline,
                    // their size would be carried (and copied) by every request's
                    // future, pass-through ones included.
                    match boxed_in_place!(self.cache.before(policy, query, joins_left > 0)).await {
                        Before::Serve(resp, status, None) => {
                            rec.cache = status.as_str();
                            if let Some(at) = arrived {
                                route.limits.peek_rest(&who(req.headers(), at), admission);
                            }
                            return Ok(resp);
                        }
                        Before::Serve(resp, status, refresh) => {
                            rec.cache = status.as_str();
                            serve_stale = Some(resp);
                            exchange = refresh;
                            break;
                        }
                        Before::Fail(e) => return refuse(e, req.headers(), admission),
                        Before::Forward(ex) => {
                            rec.cache = ex.status.as_str();
                            exchange = Some(ex);
                            break;
                        }
                        Before::Follow(follow) => {
                            joins_left -= 1;
                            match boxed_in_place!(follow.wait(req.headers())).await {
                                Followed::Serve(resp, status) => {
                                    rec.cache = status.as_str();
                                    if arrived.is_some() {
                                        let now = crate::clock::now();
                                        route.limits.peek_rest(&who(req.headers(), now), admission);
                                    }
                                    return Ok(resp);
                                }
                                Followed::Retry => {}
                                Followed::Alone => joins_left = 0,
                            }
                        }
                    }
                }
            }

            // Going upstream: the limiters that let cache hits through count now.
            // A background refresh behind a stale answer is the proxy's own
            // errand and spends nothing.
            if !route.limits.is_empty() {
                let who = who(req.headers(), crate::clock::now());
                if serve_stale.is_none() {
                    route
                        .check_limits(Stage::Upstream, Counting::All, &who, &read_ahead, admission)
                        .await?;
                }
                route.limits.peek_rest(&who, admission);
            }
            // A server, and a slot under `max_inflight_per_server`, waiting in
            // line for one if need be. A background refresh does not queue:
            // without a free slot the stale answer goes out and a later request
            // refreshes.
            let pool = route_pool;
            let mut filter = PickFilter {
                hash: balance_hash(pool, &req, exchange.as_ref(), host.as_deref()),
                ..PickFilter::default()
            };
            // Only servers serving the request's model, those having it loaded
            // first.
            let model = facts.model;
            match pool.state.models.choose(model.as_ref()) {
                ModelChoice::Any => {}
                ModelChoice::Among { serving, loaded } => {
                    filter.only = serving;
                    filter.prefer = loaded;
                }
                ModelChoice::Unknown { served } => {
                    if route.policy.unknown_model == UnknownModel::Reject {
                        // Nothing reached the upstream: nothing is spent.
                        admission.refund_all();
                        if let Some(stale) = serve_stale.take() {
                            return Ok(stale);
                        }
                        return Err(ProxyError::UnknownModel {
                            upstream: pool.policy.name.clone(),
                            model: model.map(|m| m.to_string()).unwrap_or_default(),
                            served,
                        });
                    }
                }
            }
            let admitted = if let Some(stale) = serve_stale.take() {
                match pool.try_admit(&filter) {
                    Some(admitted) => {
                        serve_stale = Some(stale);
                        admitted
                    }
                    None => return Ok(stale),
                }
            } else {
                // Identical requests behind this one wait with it, not time out.
                let waiting = |queued| {
                    if queued {
                        crate::telemetry::queued(&pool.policy.name);
                    }
                    if let Some(ex) = &exchange {
                        ex.queue(queued);
                    }
                };
                match pool.admit(&filter, waiting).await {
                    Ok(admitted) => admitted,
                    Err(e) => {
                        // Nothing reached the upstream: nothing is spent.
                        admission.refund_all();
                        if let Some(stale) = exchange.as_ref().and_then(|ex| ex.stale_on_error()) {
                            rec.cache = CacheStatus::Stale.as_str();
                            return Ok(stale);
                        }
                        return Err(e);
                    }
                }
            };

            let (mut parts, body) = req.into_parts();
            if fields.hop_by_hop {
                headers::strip_hop_by_hop(&mut parts.headers);
            }
            if fields.transfer_encoding {
                // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length; a length
                // sent alongside it must not reach the upstream.
                parts.headers.remove(header::CONTENT_LENGTH);
            }
            if fields.expect {
                // hyper has already answered `Expect: 100-continue` by reading the body.
                parts.headers.remove(header::EXPECT);
            }
            headers::add_forwarding(
                &mut parts.headers,
                &Forwarding {
                    peer_value: &conn.peer_value,
                    peer_trusted,
                    proto: conn.proto,
                    host: host_value.as_ref(),
                    version: parts.version,
                },
            );
            parts.headers.insert(X_REQUEST_ID, request_id.clone());

            let pick = pool.pick_at(admitted.index);
            let server = pick.server;
            rec.upstream = Some(server.url.clone());
            if !route.policy.preserve_host {
                parts
                    .headers
                    .insert(header::HOST, server.host_header.clone());
            } else if let (false, Some(h)) = (parts.headers.contains_key(header::HOST), &host_value)
            {
                // HTTP/2 clients send :authority instead of Host.
                parts.headers.insert(header::HOST, h.clone());
            }
            if let Some(protocol) = &upgrade {
                parts
                    .headers
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                parts.headers.insert(header::UPGRADE, protocol.clone());
            }
            if self.policy.compression.is_some() || route.limits.counts_tokens() {
                // Hyperion compresses, or counts tokens in the answer: the
                // upstream's bytes must be readable here.
                parts.headers.insert(
                    header::ACCEPT_ENCODING,
                    HeaderValue::from_static("identity"),
                );
            }
            if let Some(rw) = &route.policy.headers {
                rw.apply_request(&mut parts.headers);
            }
            parts.uri = UpstreamPool::origin_form(parts.uri);
            parts.version = Version::HTTP_11;
            if let Some(ex) = &mut exchange {
                ex.add_validators(&mut parts.headers);
            }

            let body = match read_ahead {
                Some(bytes) => RequestBody::buffered(bytes),
                None => RequestBody::new(body, limits.max_request_body, limits.body_read_timeout),
            };
            // Boxed once here: it passes down four layers (send, attempt,
            // exchange, the connection), each of which would otherwise copy it.
            let req = Box::new(Request::from_parts(parts, body));
            if let Some(ex) = exchange.take_if(|ex| ex.leads()) {
                // Identical requests wait for this one: it runs in a task of its
                // own, which this client leaving does not cancel.
                let pool = pool.clone();
                let preserve_host = route.policy.preserve_host;
                let send = async move {
                    let (resp, lease, index) = pool
                        .send(admitted, req, filter, model.as_ref(), preserve_host)
                        .await?;
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                        return Err(unasked_upgrade(pool.pick_at(index).server));
                    }
                    // Read by the exchange's own task into the followers'
                    // buffer (`cache/fill.rs`): no read-ahead of its own.
                    Ok(client_response(
                        *resp,
                        lease,
                        pool.policy.idle_timeout,
                        None,
                    ))
                };
                if let Some(stale) = serve_stale {
                    ex.refresh(send);
                    return Ok(stale);
                }
                let (resp, status) = boxed_in_place!(ex.lead(send)).await?;
                rec.cache = status.as_str();
                return Ok(resp);
            }
            let sent = pool
                .send(
                    admitted,
                    req,
                    filter,
                    model.as_ref(),
                    route.policy.preserve_host,
                )
                .await;
            let (resp, lease) = match sent {
                Ok((resp, lease, index)) => {
                    // Another server than planned, after a retry.
                    if index != pick.index {
                        rec.upstream = Some(pool.pick_at(index).server.url.clone());
                    }
                    (resp, lease)
                }
                Err(e) => {
                    if let Some(stale) = exchange.as_ref().and_then(|ex| ex.stale_on_error()) {
                        admission.refund_all();
                        tracing::warn!(
                            request_id = request_id.to_str().unwrap_or("-"),
                            "{e}; serving stale"
                        );
                        rec.cache = CacheStatus::Stale.as_str();
                        return Ok(stale);
                    }
                    return Err(e);
                }
            };

            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                let Some(client_upgrade) = client_upgrade else {
                    return Err(unasked_upgrade(server));
                };
                spawn_tunnel(
                    conn,
                    client_upgrade,
                    lease.into_conn(),
                    rec.request_id.clone(),
                    limits.tunnel_idle_timeout,
                    self.protect.clone(),
                );
                let (mut parts, _) = resp.into_parts();
                let protocol = parts.headers.get(header::UPGRADE).cloned();
                headers::strip_hop_by_hop(&mut parts.headers);
                parts
                    .headers
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                if let Some(p) = protocol.or(upgrade) {
                    parts.headers.insert(header::UPGRADE, p);
                }
                return Ok(Response::from_parts(parts, ResponseBody::empty()));
            }

            let resp = client_response(
                *resp,
                lease,
                pool.policy.idle_timeout,
                self.read_ahead.as_ref(),
            );
            match exchange {
                Some(ex) => {
                    let (resp, status) = boxed_in_place!(ex.respond(resp)).await;
                    rec.cache = status.as_str();
                    Ok(resp)
                }
                None => Ok(resp),
            }
        }
    }
}

/// What `consistent_hash` places the request by: its cache key (its
/// target when the route does not cache) or the pool's header. `None`
/// for the other strategies, and for a request without the header.
fn balance_hash(
    pool: &UpstreamPool,
    req: &Request<Incoming>,
    exchange: Option<&Exchange>,
    host: Option<&str>,
) -> Option<u64> {
    if pool.policy.balance != Balance::ConsistentHash {
        return None;
    }
    // BLAKE3, not std's DefaultHasher: the ring must place a request alike
    // on every proxy, whatever Rust version built it.
    let mut h = blake3::Hasher::new();
    match &pool.policy.hash_key {
        HashKey::CacheKey => {
            if let Some(key) = exchange.and_then(Exchange::key_hash) {
                return Some(key);
            }
            let host = host.unwrap_or("");
            h.update(&(host.len() as u64).to_le_bytes());
            h.update(host.as_bytes());
            h.update(
                req.uri()
                    .path_and_query()
                    .map_or("", |pq| pq.as_str())
                    .as_bytes(),
            );
        }
        HashKey::Header(name) => {
            h.update(req.headers().get(name)?.as_bytes());
        }
    }
    let digest = h.finalize();
    Some(u64::from_le_bytes(
        digest.as_bytes()[..8].try_into().expect("8 bytes"),
    ))
}

fn subject<'a>(
    client: IpAddr,
    headers: &'a HeaderMap,
    route: &'a str,
    at: tokio::time::Instant,
) -> Subject<'a> {
    Subject {
        client,
        headers,
        route,
        at,
    }
}

impl Route {
    /// Spends from the route's limiters checked at `stage`, or refuses with
    /// a 429 (giving back what earlier stages spent). Token limiters reserve
    /// an estimate made from the request body once, only when one is checked.
    async fn check_limits(
        &self,
        stage: Stage,
        counting: Counting,
        who: &Subject<'_>,
        body: &Option<bytes::Bytes>,
        admission: &mut Admission,
    ) -> Result<(), ProxyError> {
        let limits = &self.limits;
        if !limits.checks(stage, counting) {
            return Ok(());
        }
        let tokens = if counting != Counting::Requests && limits.counts_tokens_at(stage) {
            admission
                .estimate
                .get_or_insert_with(|| tokens::estimate(body.as_deref(), limits.default_tokens()))
                .0
        } else {
            0
        };
        limits
            .admit(who, stage, counting, tokens, admission)
            .await
            .map_err(|r| {
                crate::telemetry::rate_limited(&r.limiter);
                admission.refund_all();
                admission.headers = Some(r.headers);
                ProxyError::RateLimited {
                    limiter: r.limiter,
                    retry_after: r.retry_after,
                }
            })
    }
}

/// The upstream's response as the client gets it: hop-by-hop headers gone,
/// the body under the upstream's idle timeout.
fn client_response(
    resp: Response<Incoming>,
    lease: ConnLease,
    idle: std::time::Duration,
    read_ahead: Option<&ReadAheadLimits>,
) -> Response<ResponseBody> {
    let (mut parts, body) = resp.into_parts();
    if parts.headers.contains_key(header::TRANSFER_ENCODING)
        && parts.headers.remove(header::CONTENT_LENGTH).is_some()
    {
        // RFC 9112 §6.3: Transfer-Encoding wins and Content-Length must go,
        // or the client (and the cache) would frame the body by a length
        // the upstream did not use.
        crate::telemetry::upstream_fault("te_and_content_length");
    }
    headers::strip_hop_by_hop(&mut parts.headers);
    // The client's connection has its own version; an HTTP/1.0 upstream
    // must not turn the client's response into HTTP/1.0.
    parts.version = Version::HTTP_11;
    Response::from_parts(
        parts,
        ResponseBody::upstream(body, Box::new(lease), idle, read_ahead),
    )
}

fn unasked_upgrade(server: &UpstreamServer) -> ProxyError {
    ProxyError::UpstreamFailed {
        server: server.url.to_string(),
        reason: "101 Switching Protocols to a request that asked for no upgrade".into(),
    }
}

/// Reads a whole request body (for a cache key, a model or a token
/// estimate): at most `limit` bytes, each frame within `stall` of the last,
/// and no more at once, over the whole process, than the body budget
/// allows (charged to `charge`, which the caller holds while it holds the
/// bytes).
async fn read_body(
    body: &mut Incoming,
    limit: u64,
    stall: std::time::Duration,
    budget: &BodyBudget,
    charge: &mut BodyCharge,
) -> Result<bytes::Bytes, ProxyError> {
    use http_body_util::BodyExt;
    let deadline = crate::clock::now() + BodyBudget::WAIT;
    // A declared length is charged (and allocated) once, up front.
    let declared = http_body::Body::size_hint(body).exact();
    let mut buf = match declared {
        Some(n) if n > limit => return Err(ProxyError::BodyTooLarge { limit }),
        Some(n) => {
            budget
                .grow(charge, n, deadline)
                .await
                .map_err(|_| ProxyError::Overloaded)?;
            bytes::BytesMut::with_capacity(n as usize)
        }
        None => bytes::BytesMut::new(),
    };
    loop {
        let frame = match tokio::time::timeout(stall, body.frame()).await {
            Ok(Some(frame)) => frame.map_err(|e| ProxyError::ClientBody(e.to_string()))?,
            Ok(None) => break,
            Err(_) => return Err(ProxyError::BodyTimeout { timeout: stall }),
        };
        if let Ok(data) = frame.into_data() {
            let len = (buf.len() + data.len()) as u64;
            if len > limit {
                return Err(ProxyError::BodyTooLarge { limit });
            }
            if len as usize > buf.capacity() {
                // Chunked: charged for what the buffer will hold once grown.
                let grown = (len as usize).max(buf.capacity() * 2).min(limit as usize) as u64;
                budget
                    .grow(charge, grown, deadline)
                    .await
                    .map_err(|_| ProxyError::Overloaded)?;
                buf.reserve(grown as usize - buf.len());
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// Bodies at least this long are parsed on the blocking pool.
const PARSE_OFF_THREAD: usize = 64 * 1024;

/// What a request body read whole says, for the steps that need it.
#[derive(Default)]
struct BodyFacts {
    digest: Option<BodyDigest>,
    model: Option<models::ModelName>,
    estimate: Option<(u64, u64)>,
}

/// Which of the facts a route needs.
#[derive(Clone)]
struct WantedFacts {
    /// The route, when its cache keys bodies.
    keyed_by: Option<Arc<RoutePolicy>>,
    model: bool,
    /// The default reservation of the route's token limiters.
    tokens: Option<u64>,
}

impl WantedFacts {
    fn read(&self, body: &[u8]) -> BodyFacts {
        BodyFacts {
            digest: self
                .keyed_by
                .as_deref()
                .and_then(|r| r.cache.as_ref())
                .and_then(|c| BodyDigest::of(c, body)),
            model: self.model.then(|| models::requested_model(body)).flatten(),
            estimate: self.tokens.map(|d| tokens::estimate(Some(body), d)),
        }
    }
}

/// A request's access-log record, written when its response body ends (or
/// is dropped), with the connection's in-flight count held until then.
struct RequestLog {
    rec: AccessRecord,
    log: Arc<AccessLog>,
    _inflight: InflightGuard,
}

impl BodyEnd for RequestLog {
    fn end(self: Box<Self>, bytes: u64, outcome: BodyOutcome) {
        self.log.finish(&self.rec, bytes, outcome);
    }
}

/// The record until a response exists: dropped with it still inside, the
/// request is logged as 499.
struct PendingLog(Option<Box<RequestLog>>);

impl Drop for PendingLog {
    fn drop(&mut self) {
        if let Some(mut pending) = self.0.take() {
            pending.rec.status = 499;
            pending.rec.error = Some("client_closed_request");
            pending.end(0, BodyOutcome::Aborted);
        }
    }
}

/// Copies bytes both ways between an upgraded client connection and the
/// upstream's, until either side closes, nothing passes for
/// `tunnel_idle_timeout`, or the shutdown grace runs out.
fn spawn_tunnel(
    conn: &ConnInfo,
    client: hyper::upgrade::OnUpgrade,
    upstream: Box<UpstreamConn>,
    request_id: HeaderValue,
    idle: std::time::Duration,
    protect: Arc<Protect>,
) {
    let force_close = conn.force_close.clone();
    conn.tasks.spawn(async move {
        let run = async {
            let (client, (upstream, early)) =
                tokio::try_join!(client, upstream.into_upgraded()).map_err(BoxError::from)?;
            let mut client = TokioIo::new(client);
            // Bytes the upstream sent right behind its 101 head.
            client.write_all(&early).await.map_err(BoxError::from)?;
            Ok::<_, BoxError>(crate::tunnel::splice(client, upstream, idle).await)
        };
        let id = request_id.to_str().unwrap_or("-");
        tokio::select! {
            res = run => match res {
                Ok(TunnelEnd::Closed { up, down }) => tracing::debug!(request_id = id, up, down, "tunnel closed"),
                Ok(TunnelEnd::Idle) => {
                    protect.cut.count(Deadline::TunnelIdle);
                    tracing::debug!(request_id = id, "tunnel closed: nothing passed for tunnel_idle_timeout");
                }
                Ok(TunnelEnd::Failed(e)) => tracing::debug!(request_id = id, "tunnel ended: {e}"),
                Err(e) => tracing::debug!(request_id = id, "tunnel ended: {}", error_chain(e.as_ref())),
            },
            _ = force_close.cancelled() => {}
        }
    });
}

/// `uri` with its path replaced by `path` (its query kept).
fn with_path(uri: &http::Uri, path: String) -> Option<http::Uri> {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(http::uri::PathAndQuery::try_from(pq).ok()?);
    http::Uri::from_parts(parts).ok()
}

/// The host a request is for, lower-case and without port: `Api.X.com:8080` → `api.x.com`.
fn host_name(value: &HeaderValue) -> Option<Cow<'_, str>> {
    let s = value.to_str().ok()?;
    let name = if let Some(rest) = s.strip_prefix('[') {
        // [v6]:port
        &s[..rest.find(']')? + 2]
    } else {
        s.rsplit_once(':').map_or(s, |(h, _)| h)
    };
    // A fully qualified name's trailing dot names the same host.
    let name = match name.strip_suffix('.') {
        Some(n) if !n.is_empty() && !n.ends_with(']') => n,
        _ => name,
    };
    Some(if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        let h = |s: &'static str| {
            host_name(&HeaderValue::from_static(s))
                .unwrap()
                .into_owned()
        };
        assert_eq!(h("Api.Example.com:8080"), "api.example.com");
        assert_eq!(h("example.com"), "example.com");
        assert_eq!(h("[::1]:8080"), "[::1]");
        assert_eq!(h("API.Example.com.:8080"), "api.example.com");
        assert_eq!(h("example.com."), "example.com");
    }
}
