//! The admin listener (`[admin]`): what operators ask with curl.
//!
//! - `GET /`: the status page (`status_page.html`), which reads the
//!   endpoints below with the token the operator enters on it;
//! - `GET /healthz`: the process answers;
//! - `GET /readyz`: a policy is loaded and every upstream pool has a usable
//!   server (503 with the reasons otherwise);
//! - `GET /metrics`: Prometheus text (`telemetry`);
//! - with `Authorization: Bearer <token>`: `GET /admin/cache`,
//!   `POST /admin/cache/purge`, `GET /admin/cache/explain`,
//!   `GET /admin/upstreams`, `GET /admin/limits`, `GET /admin/config`,
//!   `GET /admin/status` (the page's own figures: generation, last reload,
//!   the slowest recent requests), `POST /admin/reload`.
//!
//! Answers are JSON, indented for curl (or with `?pretty`). Without a
//! configured token only the open endpoints answer; the others say so.
//! The figures themselves belong to their modules (`cache::inspect`,
//! `upstream::fleet`); reloading to `generation`. This module is the HTTP
//! around them, served on the operations thread, never on the workers.

mod metrics;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cache::{CacheQuery, Purge};
use crate::conn::{ActivityIo, ConnState, ConnTimeout, ConnTimer, Timeouts};
use crate::generation::Reloader;

/// Admin connections open at once.
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// The admin listener's client timeouts: the proxy's own
/// (`header_read_timeout`, `send_timeout`), with keep-alive idle at most
/// 60 s (scrapers and operators come back rarely), read from the policy
/// of the moment each connection opens.
fn admin_timeouts(reloader: &Reloader) -> Timeouts {
    let server = &reloader.current().policy.server;
    Timeouts {
        header: server.header_read_timeout,
        idle: server.idle_timeout.min(std::time::Duration::from_secs(60)),
        send: server.send_timeout,
    }
}

/// When the admin listener started: the process's uptime, near enough.
static STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// The status page: one self-contained HTML document (no external scripts,
/// styles or fonts), the same for everyone. It holds no figures itself:
/// its script reads `/readyz` and, with the token entered on the page,
/// the admin endpoints. The headers keep it out of frames and caches and
/// let it talk only to this listener.
const STATUS_PAGE: &str = include_str!("admin/status_page.html");

fn status_page() -> AdminResponse {
    let mut resp = Response::new(Full::new(Bytes::from_static(STATUS_PAGE.as_bytes())));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// The largest body `explain` reads (the request to explain).
const MAX_EXPLAIN_BODY: usize = 8 << 20;

type AdminResponse = Response<Full<Bytes>>;

/// Serves the admin API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    reloader: Arc<Reloader>,
    shutdown: impl Future<Output = ()>,
) {
    STARTED.get_or_init(std::time::Instant::now);
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let room = Arc::new(tokio::sync::Semaphore::new(ADMIN_MAX_CONNECTIONS));
    let accept = async {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of descriptors, most likely: let some close.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            // Past the ceiling a new connection is closed at once: the
            // admin API is for a few operators and scrapers.
            let Ok(permit) = room.clone().try_acquire_owned() else {
                drop(stream);
                continue;
            };
            let reloader = reloader.clone();
            let stop = stop.clone();
            let timeouts = admin_timeouts(&reloader);
            tasks.spawn(async move {
                let _permit = permit;
                let state = Arc::new(ConnState::new());
                let svc = {
                    let state = state.clone();
                    service_fn(move |req: Request<Incoming>| {
                        let reloader = reloader.clone();
                        let inflight = state.begin(req.version());
                        async move {
                            let resp = answer(req, &reloader).await;
                            drop(inflight);
                            Ok::<_, Infallible>(resp)
                        }
                    })
                };
                // The proxy's connection timer, with the admin listener's
                // bounds (`admin_timeouts`).
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(None)
                    .serve_connection(TokioIo::new(ActivityIo::new(stream, state.clone())), svc);
                let mut timer = ConnTimer::new(state, timeouts);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    why = timer.expired() => {
                        if why == ConnTimeout::Idle {
                            conn.as_mut().graceful_shutdown();
                            let _ = tokio::time::timeout(timeouts.send, conn).await;
                        }
                    }
                    () = stop.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(timeouts.send, conn).await;
                    }
                }
            });
        }
    };
    tokio::select! {
        () = accept => {}
        () = shutdown => {}
    }
    stop.cancel();
    tasks.close();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), tasks.wait()).await;
}

/// One admin request.
/// One key as `/admin/keys` shows it: its name, tier and counts.
fn key_report(t: &crate::auth::Tenant, usage: &crate::usage::KeyUsage) -> Value {
    json!({
        "name": &*t.name,
        "tier": t.tier.as_deref(),
        "usage": usage,
    })
}

/// The keys of `tenants` with their usage: the fleet's with a shared tier
/// that answers, this process's otherwise.
async fn keys_report(
    generation: &crate::generation::Generation,
    tenants: &[Arc<crate::auth::Tenant>],
) -> (Vec<Value>, crate::usage::Scope) {
    let names: Vec<Arc<str>> = tenants.iter().map(|t| t.name.clone()).collect();
    let tier = generation.cache.shared_tier().map(|t| &**t);
    let (usage, scope) = generation.protect.usage.report(&names, tier).await;
    let keys = tenants
        .iter()
        .zip(&usage)
        .map(|(t, u)| key_report(t, u))
        .collect();
    (keys, scope)
}

async fn answer(req: Request<Incoming>, reloader: &Arc<Reloader>) -> AdminResponse {
    let pretty = wants_pretty(&req);
    let reply = |status: StatusCode, body: Value| json_response(status, &body, pretty);
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET | &Method::HEAD, "/healthz") => {
            return reply(StatusCode::OK, json!({ "status": "ok" }))
        }
        (&Method::GET | &Method::HEAD, "/readyz") => return readiness(reloader, pretty),
        (&Method::GET | &Method::HEAD, "/" | "/status") => return status_page(),
        (&Method::GET, "/metrics") => {
            return match metrics::render(reloader).await {
                Some(text) => {
                    let mut resp = Response::new(Full::new(Bytes::from(text)));
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                    );
                    resp
                }
                None => error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "metrics_unavailable",
                    "no metrics recorder is installed in this process",
                    pretty,
                ),
            }
        }
        _ if !path.starts_with("/admin/") => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such admin endpoint; see /admin/ in the README",
                pretty,
            )
        }
        _ => {}
    }
    let generation = reloader.current();
    let Some(token) = generation
        .policy
        .admin
        .as_ref()
        .and_then(|a| a.token.as_ref())
    else {
        return error(
            StatusCode::FORBIDDEN,
            "admin_token_not_configured",
            "this endpoint needs an admin token: set [admin] token_env or token_file and reload",
            pretty,
        );
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if !presented.is_some_and(|p| token.accepts(p)) {
        let mut resp = error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send Authorization: Bearer <the admin token>",
            pretty,
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"hyperion-admin\""),
        );
        return resp;
    }
    let query = req.uri().query().unwrap_or("").to_owned();
    let params = || form_urlencoded(&query);
    match (method, path.as_str()) {
        (Method::GET, "/admin/cache") => {
            let report = generation.cache.report().await;
            reply(StatusCode::OK, json!(report))
        }
        (Method::POST, "/admin/cache/purge") => match purge_of(&params(), &generation.policy) {
            Ok((what, dry_run)) => {
                let cache = &generation.cache;
                let n = if dry_run {
                    cache.count(&what).await
                } else {
                    cache.purge(&what).await
                };
                let mut body = json!({ "purged": n, "dry_run": dry_run });
                // With a shared tier the purge reaches Redis and, through
                // it, every instance's memory. A dry run counts memory only.
                if let Some(tier) = cache.shared_tier().filter(|_| !dry_run) {
                    let shared = cache.purge_shared(&what).await;
                    body["shared"] = json!({
                        "up": tier.is_up(),
                        "purged": shared,
                    });
                    if shared.is_none() {
                        tracing::warn!(?what, "admin: cache purge not applied to the shared tier (down): other instances keep their copies until they expire");
                    }
                }
                tracing::info!(?what, dry_run, purged = n, "admin: cache purge");
                reply(StatusCode::OK, body)
            }
            Err(why) => error(StatusCode::BAD_REQUEST, "bad_request", &why, pretty),
        },
        (Method::GET | Method::POST, "/admin/cache/explain") => {
            explain(req, &params(), reloader, pretty).await
        }
        (Method::GET, "/admin/upstreams") => {
            let pools: Vec<Value> = generation
                .fleet
                .pools()
                .iter()
                .map(|p| {
                    let line = generation
                        .limits
                        .inflight(&p.policy.name)
                        .map(|l| l.line_length());
                    json!({
                        "name": p.policy.name,
                        "balance": p.policy.balance.as_str(),
                        "model_routing": p.policy.model_routing.as_str(),
                        "queued": line.map(|(queued, _)| queued),
                        "queued_tenants": line.map(|(_, tenants)| tenants),
                        "servers": p.snapshot(),
                        "prefix_affinity": p.prefix.as_ref().map(|idx| prefix_report(idx, p)),
                    })
                })
                .collect();
            reply(StatusCode::OK, json!({ "upstreams": pools }))
        }
        (Method::GET, "/admin/status") => {
            let uptime = STARTED.get().map_or(0.0, |t| t.elapsed().as_secs_f64());
            reply(
                StatusCode::OK,
                json!({
                    "version": env!("CARGO_PKG_VERSION"),
                    "uptime_seconds": uptime,
                    "generation": generation.number,
                    "loaded_at": httpdate::fmt_http_date(generation.loaded_at),
                    "last_reload": reloader.last_reload(),
                    "reloads": {
                        "ok": reloader.succeeded.load(std::sync::atomic::Ordering::Relaxed),
                        "error": reloader.failed.load(std::sync::atomic::Ordering::Relaxed),
                    },
                    "slowest": crate::telemetry::slowest::recent(),
                    "slowest_window_seconds": crate::telemetry::slowest::WINDOW.as_secs(),
                }),
            )
        }
        (Method::GET, "/admin/limits") => {
            let top = params()
                .iter()
                .find(|(k, _)| k == "top")
                .and_then(|(_, v)| v.parse::<usize>().ok())
                .unwrap_or(10)
                .min(100);
            reply(
                StatusCode::OK,
                json!({ "limiters": generation.limits.report(top) }),
            )
        }
        (Method::GET, "/admin/keys") => {
            let keys = match &generation.policy.auth {
                Some(a) => a.keyring.load().tenants(),
                None => Vec::new(),
            };
            let (keys, scope) = keys_report(&generation, &keys).await;
            reply(
                StatusCode::OK,
                json!({
                    "keys": keys,
                    "counted": scope.describe(),
                    "unauthorized": generation.protect.usage.unauthorized_count(),
                }),
            )
        }
        (Method::GET, p) if p.starts_with("/admin/keys/") => {
            let name = &p["/admin/keys/".len()..];
            let found = generation.policy.auth.as_ref().and_then(|a| {
                a.keyring
                    .load()
                    .tenants()
                    .into_iter()
                    .find(|t| &*t.name == name)
            });
            match found {
                Some(t) => {
                    let (mut keys, scope) = keys_report(&generation, &[t]).await;
                    let mut report = keys.pop().unwrap_or_default();
                    report["counted"] = scope.describe().into();
                    reply(StatusCode::OK, report)
                }
                None => error(
                    StatusCode::NOT_FOUND,
                    "no_such_key",
                    "no key by that name: see GET /admin/keys",
                    pretty,
                ),
            }
        }
        (Method::GET, "/admin/config") => {
            let summary = generation.policy.to_string();
            reply(
                StatusCode::OK,
                json!({
                    "file": reloader.path().display().to_string(),
                    "generation": generation.number,
                    "loaded_at": httpdate::fmt_http_date(generation.loaded_at),
                    "last_reload": reloader.last_reload(),
                    "summary": summary.lines().collect::<Vec<_>>(),
                }),
            )
        }
        (Method::POST, "/admin/reload") => {
            // Reading the file and building the pools is blocking work.
            let r = reloader.clone();
            let outcome = match tokio::task::spawn_blocking(move || r.reload()).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    return error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "reload_failed",
                        "the reload stopped unexpectedly; the previous policy is still served",
                        pretty,
                    )
                }
            };
            match outcome {
                Ok(done) => reply(
                    StatusCode::OK,
                    json!({
                        "reloaded": true,
                        "generation": done.generation,
                        "needs_restart": done.needs_restart,
                    }),
                ),
                Err(e) => error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_policy",
                    &e.to_string(),
                    pretty,
                ),
            }
        }
        (
            _,
            "/admin/cache" | "/admin/cache/purge" | "/admin/upstreams" | "/admin/config"
            | "/admin/reload" | "/admin/status",
        ) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "see the README for each endpoint's method",
            pretty,
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such admin endpoint; see /admin/ in the README",
            pretty,
        ),
    }
}

/// `prefix_affinity`'s index for `/admin/upstreams`: blocks held per
/// server, and how requests were routed.
fn prefix_report(
    idx: &crate::upstream::prefix::PrefixIndex,
    pool: &crate::upstream::fleet::PoolState,
) -> Value {
    use crate::upstream::prefix::{BLOCK_BYTES, FELL_BACK_FOR_LOAD, PLACED, ROUTED_BY_PREFIX};
    use std::sync::atomic::Ordering::Relaxed;
    let n = |i: usize| idx.routed[i].load(Relaxed);
    let (by_prefix, for_load, placed) = (n(ROUTED_BY_PREFIX), n(FELL_BACK_FOR_LOAD), n(PLACED));
    let total = by_prefix + for_load + placed;
    let servers: Vec<Value> = pool
        .policy
        .servers
        .iter()
        .zip(idx.servers())
        .enumerate()
        .map(|(i, (s, held))| {
            let engine = pool.engines.as_ref().and_then(|e| e.snapshot(i));
            json!({
                "url": &*s.url,
                "blocks": held.blocks,
                "capacity_blocks": held.capacity_blocks,
                "predicted_hit_ratio": held.predicted_hit_ratio,
                "engine_hit_ratio": engine.and_then(|e| e.prefix_hit_ratio),
            })
        })
        .collect();
    json!({
        "block_bytes": BLOCK_BYTES,
        "cache_tokens_per_server": pool.policy.prefix_cache_tokens,
        "servers": servers,
        "routed_by_prefix": by_prefix,
        "fell_back_for_load": for_load,
        "placed": placed,
        "share_routed_by_prefix": if total > 0 { by_prefix as f64 / total as f64 } else { 0.0 },
    })
}

/// Ready: a policy is loaded and every pool has a server it may use.
fn readiness(reloader: &Reloader, pretty: bool) -> AdminResponse {
    let generation = reloader.current();
    let mut reasons = Vec::new();
    for pool in generation.fleet.pools() {
        let servers = pool.snapshot();
        if !servers.iter().any(|s| s.state.healthy) {
            let why: Vec<String> = servers
                .iter()
                .map(|s| {
                    format!(
                        "{}: {}",
                        s.state.url,
                        s.state.reason.as_deref().unwrap_or("out")
                    )
                })
                .collect();
            reasons.push(format!(
                "upstream `{}` has no healthy server ({})",
                pool.policy.name,
                why.join("; ")
            ));
        }
    }
    let (status, word) = if reasons.is_empty() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not_ready")
    };
    json_response(
        status,
        &json!({ "status": word, "generation": generation.number, "reasons": reasons }),
        pretty,
    )
}

/// What `POST /admin/cache/purge?…` asks for: exactly one of `url`,
/// `prefix`, `route`, `all=true`; and whether it is a dry run.
fn purge_of(
    params: &[(String, String)],
    policy: &crate::policy::Policy,
) -> Result<(Purge, bool), String> {
    let mut what = Vec::new();
    let mut dry_run = false;
    for (k, v) in params {
        match k.as_str() {
            "url" => what.push(match split_url(v)? {
                (Some(host), target) => Purge::Target(format!("{host}{target}")),
                (None, target) => Purge::Path(target),
            }),
            "prefix" => what.push(match split_url(v)? {
                (Some(host), prefix) => Purge::Prefix(format!("{host}{prefix}")),
                (None, prefix) => Purge::PathPrefix(prefix),
            }),
            "route" => {
                if !policy.routes.iter().any(|r| r.name == *v) {
                    let names: Vec<&str> = policy.routes.iter().map(|r| r.name.as_str()).collect();
                    return Err(format!(
                        "no route named `{v}`; routes: {}",
                        names.join(", ")
                    ));
                }
                what.push(Purge::Route(v.clone()));
            }
            "all" if v == "true" => what.push(Purge::All),
            "dry_run" => dry_run = v == "true" || v.is_empty(),
            "pretty" => {}
            other => {
                return Err(format!(
                "unknown parameter `{other}`; use url, prefix, route or all=true, and dry_run=true"
            ))
            }
        }
    }
    match what.len() {
        1 => Ok((what.remove(0), dry_run)),
        0 => Err("say what to purge: url=, prefix=, route= or all=true".to_owned()),
        _ => Err("give one of url=, prefix=, route=, all=true at a time".to_owned()),
    }
}

/// `http://host[:port]/path?q` → (host, lower-case and without port, as
/// the cache records it; path and query); `/path?q` → (None, path and query).
fn split_url(v: &str) -> Result<(Option<String>, String), String> {
    if v.starts_with('/') {
        return Ok((None, v.to_owned()));
    }
    let uri: http::Uri = v
        .parse()
        .map_err(|_| format!("`{v}` is neither a path (/…) nor a URL (http://host/…)"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("`{v}` has no host"))?
        .to_ascii_lowercase();
    let target = uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    Ok((Some(host), target))
}

/// `GET /admin/cache/explain?method=POST&url=http://host/api/generate`,
/// with the request's body as the body and its headers as the headers
/// (its `Authorization` as `X-Explain-Authorization`): the route it would
/// take, its key and the parts that went in, and what is stored under it.
async fn explain(
    req: Request<Incoming>,
    params: &[(String, String)],
    reloader: &Reloader,
    pretty: bool,
) -> AdminResponse {
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let bad = |why: &str| error(StatusCode::BAD_REQUEST, "bad_request", why, pretty);
    let Some(url) = get("url") else {
        return bad("give the request to explain: url=http://host/path (and method=, default GET)");
    };
    let Ok(method) = get("method").unwrap_or("GET").parse::<Method>() else {
        return bad("method= is not an HTTP method");
    };
    let (host, target) = match split_url(url) {
        Ok((Some(h), t)) => (h, t),
        Ok((None, _)) => {
            return bad("url= needs a host, as the client would send it: http://host/path")
        }
        Err(why) => return bad(&why),
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (target.clone(), None),
    };
    // The headers are the request's own, but Authorization is the admin's:
    // the client's, which scopes keys by default, comes as
    // X-Explain-Authorization.
    let mut headers = req.headers().clone();
    headers.remove(header::AUTHORIZATION);
    if let Some(client) = headers.remove("x-explain-authorization") {
        headers.insert(header::AUTHORIZATION, client);
    }
    let body = match Limited::new(req.into_body(), MAX_EXPLAIN_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => return bad("the body to explain is larger than 8 MB or was cut off"),
    };
    let generation = reloader.current();
    let Some(route) = generation
        .policy
        .routes
        .iter()
        .find(|r| r.matcher.accepts(&method, Some(&host), &path, &headers))
    else {
        return json_response(
            StatusCode::OK,
            &json!({ "route": null, "cached": false, "why": "no route matches" }),
            pretty,
        );
    };
    let Some(cache_policy) = &route.cache else {
        return json_response(
            StatusCode::OK,
            &json!({ "route": route.name, "cached": false, "why": "the route does not cache" }),
            pretty,
        );
    };
    let route_name: Arc<str> = Arc::from(route.name.as_str());
    // The key it presents, looked up as a request's would be.
    let tenant = match (&generation.policy.auth, route.auth) {
        (Some(auth), mode) if mode != crate::policy::AuthMode::Off => {
            crate::auth::presented(&headers)
                .and_then(|k| auth.keyring.load().find(k).map(|t| t.name.clone()))
        }
        _ => None,
    };
    // A split route keys each arm apart: the arm this request takes.
    let arm =
        if route.split.is_empty() {
            None
        } else {
            let named = get("arm").map(str::to_owned);
            let client = get("client").and_then(|c| c.parse::<std::net::IpAddr>().ok());
            match named.or_else(|| {
                route
                    .arm_of(&headers, tenant.as_deref(), client)
                    .map(|i| route.split[i].upstream.clone())
            }) {
                Some(a) if route.split.iter().any(|s| s.upstream == a) => Some(a),
                Some(a) => return bad(&format!("arm={a} is not an arm of route `{}`", route.name)),
                None => return bad(
                    "this route splits requests by client: give client=<address> or arm=<upstream>",
                ),
            }
        };
    let q = CacheQuery {
        arm: arm.as_deref(),
        route: &route_name,
        method: &method,
        host: &host,
        path: &path,
        query: query.as_deref(),
        headers: &headers,
        body: (!body.is_empty()).then_some(&body),
        body_digest: None,
        key_seen: None,
        tenant: tenant.as_deref().map(|name| crate::cache::TenantScope {
            name,
            key_headers: &crate::auth::KEY_HEADERS,
        }),
    };
    match generation.cache.explain(cache_policy, &q).await {
        Ok(e) => {
            let key: String = e.key.0.iter().map(|b| format!("{b:02x}")).collect();
            let parts: Vec<Value> = e
                .parts
                .0
                .iter()
                .map(|(name, value)| json!({ "part": name, "value": value }))
                .collect();
            json_response(
                StatusCode::OK,
                &json!({
                    "route": route.name,
                    "arm": arm,
                    "cached": true,
                    "key": key,
                    "parts": parts,
                    "stored": e.stored,
                }),
                pretty,
            )
        }
        Err(_) => json_response(
            StatusCode::OK,
            &json!({ "route": route.name, "cached": false, "why": "the route keys on the JSON body, and this body is not JSON: it would pass uncached (BYPASS)" }),
            pretty,
        ),
    }
}

/// `a=1&b=x%20y` → pairs, decoded.
fn form_urlencoded(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn wants_pretty(req: &Request<Incoming>) -> bool {
    req.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|p| p == "pretty" || p.starts_with("pretty="))
    }) || req
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ua| ua.starts_with("curl/"))
}

fn json_response(status: StatusCode, body: &Value, pretty: bool) -> AdminResponse {
    let mut bytes = if pretty {
        serde_json::to_vec_pretty(body)
    } else {
        serde_json::to_vec(body)
    }
    .expect("JSON values serialize");
    bytes.push(b'\n');
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn error(status: StatusCode, code: &str, message: &str, pretty: bool) -> AdminResponse {
    json_response(
        status,
        &json!({ "error": { "code": code, "message": message } }),
        pretty,
    )
}
