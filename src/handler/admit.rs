//! The first steps of a request: which route it takes, whether its head is
//! acceptable, the route's limits checked on arrival, and its body read whole
//! where a later step needs it (the cache key, the model, a token estimate).
//!
//! Owns [`Arrival`], what the later steps know of an admitted request. Does
//! not own the limiters' rules (`limits`), path normalization (`path`) or
//! what the body says (`cache::BodyDigest`, `upstream::models`,
//! `limits::tokens`): it only asks them, in order.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Version};
use hyper::body::Incoming;

use super::{Proxy, RequestState, Route};
use crate::cache::BodyDigest;
use crate::error::ProxyError;
use crate::headers::{self, RequestFields};
use crate::limits::{tokens, Admission, Counting, LineTenant, Place, RouteLimits, Stage, Subject};
use crate::policy::tenancy::TenantPlan;
use crate::policy::{AuthMode, BodyKey, Priority, RouteCachePolicy, RoutePolicy};
use crate::protect::{BodyBudget, BodyCharge};
use crate::upstream::models;
use crate::upstream::UpstreamPool;

/// A request let in: its route and what the later steps need of it.
pub(super) struct Arrival<'p> {
    pub route: &'p Route,
    /// The route's upstream, or the arm of its split the request takes.
    pub pool: &'p Arc<UpstreamPool>,
    /// That arm's upstream's name, on a split route.
    pub arm: Option<&'p Arc<str>>,
    /// `Host`, or the authority of an absolute target (HTTP/2's
    /// `:authority`), as sent.
    pub host_value: Option<HeaderValue>,
    /// The client, as the access log and the limiters see it.
    pub client: IpAddr,
    /// The name of the API key it presented (`[auth]`).
    pub tenant: Option<Arc<str>>,
    /// What its key's tier gives it (`[tiers]`, `[keys]`).
    pub plan: Option<&'p TenantPlan>,
    /// The route's limiters, with the plan's budgets when there is one.
    pub limits: &'p RouteLimits,
    /// One clock reading for every limiter checked on arrival, and for a
    /// cache hit's look at the rest; `None` on a route without limiters.
    pub arrived: Option<tokio::time::Instant>,
    /// The protocol the client asked to switch to (HTTP/1.1 `Upgrade`).
    pub upgrade: Option<HeaderValue>,
    /// The client's side of that upgrade, once the upstream agrees.
    pub client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// The request body, when a step needed it whole.
    pub body: Option<Bytes>,
    pub facts: BodyFacts,
    /// The body's charge to the process's budget for bodies held in
    /// memory: held until the request is answered.
    pub charge: BodyCharge,
}

impl Proxy {
    /// Routes the request and checks its head: a single `Host`, a path in
    /// its one spelling (`path.rs`), a route that is not `deny`, the head
    /// and the declared body within their limits.
    pub(super) fn arrive(
        &self,
        st: &mut RequestState<'_>,
        req: &mut Request<Incoming>,
        fields: &RequestFields,
    ) -> Result<Arrival<'_>, ProxyError> {
        let host_value = fields.host.clone().or_else(|| {
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
        // One spelling of the path for routing, the cache key, the limits
        // and the upstream.
        match crate::path::normalize(req.uri().path()) {
            Ok(Cow::Borrowed(_)) => {}
            Ok(Cow::Owned(path)) => {
                *req.uri_mut() = with_path(req.uri(), path)
                    .ok_or(ProxyError::BadRequest("the request target is invalid"))?;
            }
            Err(e) => return Err(ProxyError::BadRequest(e.as_str())),
        }
        let host = host_value.as_ref().and_then(host_name);
        let route = self
            .routes
            .find(
                req.method(),
                host.as_deref(),
                req.uri().path(),
                req.headers(),
            )
            .ok_or(ProxyError::NoRoute)?;
        st.rec.route = Some(route.name.clone());
        let Some(pool) = &route.pool else {
            return Err(ProxyError::Denied {
                route: route.name.to_string(),
            });
        };
        let mut plan = None;
        if route.policy.auth != AuthMode::Off {
            let tenant = self.tenant_of(req.headers(), route.policy.auth, st.rec.client)?;
            if let Some(t) = &tenant {
                plan = self.policy.tenancy.plan(&t.name, t.tier.as_deref());
                if let Some(max) = plan.and_then(|p| p.max_concurrent) {
                    st.key_slot = Some(
                        self.protect
                            .per_key
                            .enter(&t.name, max)
                            .ok_or(ProxyError::TooManyConcurrent { max })?,
                    );
                }
            }
            st.rec.key = tenant.map(|t| t.name.clone());
        }
        let limits = match plan {
            Some(p) => &route.by_plan[p.index],
            None => &route.limits,
        };
        let (pool, arm) = match route.arms.is_empty() {
            true => (pool, None),
            false => {
                let i = route
                    .policy
                    .arm_of(req.headers(), st.rec.key.as_deref(), Some(st.rec.client))
                    .unwrap_or(0);
                let (pool, name) = &route.arms[i];
                crate::telemetry::split_arm(&route.name, name);
                st.rec.arm = Some(name.clone());
                (pool, Some(name))
            }
        };
        st.rewrite.clone_from(&route.policy.headers);
        let upgrade = (fields.upgrade && req.version() == Version::HTTP_11)
            .then(|| headers::requested_upgrade(req.headers()))
            .flatten();
        let mut arrival = Arrival {
            route,
            pool,
            arm,
            host_value,
            client: st.rec.client,
            tenant: st.rec.key.clone(),
            plan: plan.map(|p| &**p),
            limits,
            arrived: (!limits.is_empty()).then(crate::clock::now),
            upgrade,
            client_upgrade: None,
            body: None,
            facts: BodyFacts::default(),
            charge: BodyCharge::none(),
        };
        arrival.check_head(self, st, req, fields)?;
        if arrival.upgrade.is_some() {
            arrival.client_upgrade = Some(hyper::upgrade::on(&mut *req));
        }
        Ok(arrival)
    }
}

impl Proxy {
    /// The tenant whose key `headers` present. A wrong key is refused on
    /// any route that takes keys; no key, only where one is required. An
    /// address refused too often is refused before its key is looked at.
    fn tenant_of(
        &self,
        headers: &HeaderMap,
        mode: AuthMode,
        client: IpAddr,
    ) -> Result<Option<Arc<crate::auth::Tenant>>, ProxyError> {
        let gate = &self.protect.failed_keys;
        if let Some(retry_after) = gate.refused(client) {
            crate::telemetry::rate_limited("auth_failures");
            return Err(ProxyError::RateLimited {
                limiter: "auth_failures".to_owned(),
                retry_after,
            });
        }
        let key = crate::auth::presented(headers);
        let keyring = self.policy.auth.as_ref().map(|a| a.keyring.load());
        let found = key.and_then(|k| keyring.as_ref().and_then(|r| r.find(k).cloned()));
        match (key, found) {
            (_, Some(tenant)) => Ok(Some(tenant)),
            (None, None) if mode != AuthMode::Required => Ok(None),
            (presented, None) => {
                gate.failed(client);
                Err(ProxyError::Unauthorized {
                    presented: presented.is_some(),
                })
            }
        }
    }
}

/// The request header a client may ask for a priority class in (up to its
/// tier's `max_priority`).
pub const PRIORITY_HEADER: http::HeaderName = http::HeaderName::from_static("x-hyperion-priority");

/// The class a request waits in: its plan's, or the one it asks for in
/// `X-Hyperion-Priority`, no higher than the plan's `max_priority` (a
/// request without a plan waits as `standard`, and may only ask lower).
fn requested_class(headers: &HeaderMap, plan: Option<&TenantPlan>) -> Priority {
    let (own, highest) = plan.map_or((Priority::Standard, Priority::Standard), |p| {
        (p.priority, p.max_priority)
    });
    match headers
        .get(&PRIORITY_HEADER)
        .and_then(|v| Priority::parse(v.as_bytes()))
    {
        Some(asked) => asked.max(highest),
        None => own,
    }
}

impl<'p> Arrival<'p> {
    /// The host the request is for, as routing saw it.
    pub fn host(&self) -> Option<Cow<'_, str>> {
        self.host_value.as_ref().and_then(host_name)
    }

    /// The route's cache rules, unless the request is an upgrade (a tunnel
    /// is never cached).
    pub fn cache_policy(&self) -> Option<&'p Arc<RouteCachePolicy>> {
        self.route
            .policy
            .cache
            .as_ref()
            .filter(|_| self.upgrade.is_none())
    }

    /// Where the request (of `headers`) waits in line for a busy upstream:
    /// as its key's tenant, or as its client address. Worked out only
    /// when it has to wait.
    pub fn place(&self, headers: &HeaderMap) -> Place {
        Place {
            tenant: match &self.tenant {
                Some(name) => LineTenant::Key(name.clone()),
                None => LineTenant::address(self.client),
            },
            class: requested_class(headers, self.plan),
            weight: self.plan.map_or(1, |p| p.weight),
            max_queued: self
                .plan
                .and_then(|p| p.max_queued)
                .unwrap_or(self.pool.policy.max_queued_per_tenant),
        }
    }

    /// The limiters' view of the request at `at`.
    pub fn who<'s>(&'s self, headers: &'s HeaderMap, at: tokio::time::Instant) -> Subject<'s> {
        Subject {
            client: self.client,
            headers,
            tenant: self.tenant.as_deref(),
            route: &self.route.name,
            at,
        }
    }

    /// Refuses the request with `e`. Refused before the limiters count it,
    /// it still tells the client where it stands.
    pub fn refuse<T>(
        &self,
        e: ProxyError,
        headers: &HeaderMap,
        admission: &mut Admission,
    ) -> Result<T, ProxyError> {
        if let Some(at) = self.arrived {
            self.limits.peek_rest(&self.who(headers, at), admission);
        }
        Err(e)
    }

    /// The head within `max_header_size`, a declared body within
    /// `max_request_body`; on caching routes that send the client's
    /// `Accept-Encoding` upstream, that header in its canonical form.
    fn check_head(
        &self,
        proxy: &Proxy,
        st: &mut RequestState<'_>,
        req: &mut Request<Incoming>,
        fields: &RequestFields,
    ) -> Result<(), ProxyError> {
        let limits = &proxy.policy.server;
        let uri_len = req.uri().path_and_query().map_or(1, |pq| pq.as_str().len());
        if headers::head_size(req.method().as_str(), uri_len, fields.size) > limits.max_header_size
        {
            let e = ProxyError::HeadersTooLarge {
                limit: limits.max_header_size,
            };
            return self.refuse(e, req.headers(), &mut st.admission);
        }
        let e = match fields.content_length {
            Some(None) => Some(ProxyError::BadRequest("Content-Length is not a number")),
            Some(Some(n)) if n > limits.max_request_body => Some(ProxyError::BodyTooLarge {
                limit: limits.max_request_body,
            }),
            _ => None,
        };
        if let Some(e) = e {
            return self.refuse(e, req.headers(), &mut st.admission);
        }
        if self.cache_policy().is_some_and(|p| p.keys_accept_encoding) {
            // The client's Accept-Encoding goes upstream on this route: in
            // its canonical form, which is what the key holds.
            match crate::cache::accept_coding::canonical(req.headers()) {
                Some(v) => req.headers_mut().insert(header::ACCEPT_ENCODING, v),
                None => req.headers_mut().remove(header::ACCEPT_ENCODING),
            };
        }
        Ok(())
    }

    /// Whether `admit` has anything to do: limiters to check, or a body to
    /// read. (Asked first so that a request with neither does not make,
    /// and copy, `admit`'s future.)
    pub fn needs_admission(&self, req: &Request<Incoming>) -> bool {
        self.arrived.is_some() || self.needs_body(req)
    }

    fn body_keyed(&self) -> bool {
        self.cache_policy()
            .is_some_and(|p| p.body_key != BodyKey::None)
    }

    /// Whether a step needs the body whole: the cache key, the model, a
    /// token estimate.
    fn needs_body(&self, req: &Request<Incoming>) -> bool {
        let wanted = self.body_keyed()
            || self.pool.state.models.routes_by_model()
            || self.pool.state.prefix.is_some()
            || self.limits.counts_tokens();
        wanted && !http_body::Body::is_end_stream(req.body())
    }

    /// The route's arrival limits: request counts first (a refused client
    /// costs no body read), then the body when a step needs it whole, then
    /// token limits (which estimate from it).
    pub async fn admit(
        &mut self,
        proxy: &Proxy,
        st: &mut RequestState<'_>,
        req: &mut Request<Incoming>,
    ) -> Result<(), ProxyError> {
        if let Some(at) = self.arrived {
            check_limits(
                self.limits,
                Stage::Arrival,
                Counting::Requests,
                &self.who(req.headers(), at),
                &None,
                &mut st.admission,
            )
            .await?;
        }
        self.read_ahead(proxy, st, req).await?;
        if let Some(estimate) = self.facts.estimate {
            st.admission.estimate = Some(estimate);
        }
        if let Some(at) = self.arrived {
            check_limits(
                self.limits,
                Stage::Arrival,
                Counting::Tokens,
                &self.who(req.headers(), at),
                &self.body,
                &mut st.admission,
            )
            .await?;
        }
        Ok(())
    }

    /// Body-keyed routes need the body for the key, token-limited ones for
    /// the request's `max_tokens`, model-routed ones for its `model`: read
    /// whole and held in memory until the request is answered, under the
    /// process's budget for such bodies. What it says is worked out once;
    /// for a big body on the blocking pool, so parsing megabytes never holds
    /// up this worker's other connections.
    async fn read_ahead(
        &mut self,
        proxy: &Proxy,
        st: &mut RequestState<'_>,
        req: &mut Request<Incoming>,
    ) -> Result<(), ProxyError> {
        let route = self.route;
        if !self.needs_body(req) {
            return Ok(());
        }
        let body_keyed = self.body_keyed();
        let by_model = self.pool.state.models.routes_by_model();
        if let Some(at) = self.arrived {
            // A client already out of its request budget would be refused
            // upstream: refuse it before reading its body.
            if let Some(r) = self
                .limits
                .exhausted(&self.who(req.headers(), at), Stage::Upstream)
            {
                return Err(super::rate_limited(r, &mut st.admission));
            }
        }
        let limits = &proxy.policy.server;
        self.charge = proxy.protect.bodies.empty();
        let read = read_body(
            req.body_mut(),
            limits.max_request_body,
            limits.body_read_timeout,
            &proxy.protect.bodies,
            &mut self.charge,
        )
        .await;
        let body = match read {
            Ok(body) => body,
            Err(e) => return self.refuse(e, req.headers(), &mut st.admission),
        };
        let wants = WantedFacts {
            keyed_by: body_keyed.then(|| route.policy.clone()),
            // A sampled trace names the model too (the body is read
            // already; it is not read for a trace alone).
            model: by_model || st.trace.as_ref().is_some_and(|t| t.sampled()),
            blocks: self.pool.state.prefix.is_some(),
            tokens: self
                .limits
                .counts_tokens()
                .then(|| self.limits.default_tokens()),
        };
        self.facts = if body.len() >= PARSE_OFF_THREAD {
            let body = body.clone();
            tokio::task::spawn_blocking(move || wants.read(&body))
                .await
                .unwrap_or_default()
        } else {
            wants.read(&body)
        };
        self.body = Some(body);
        Ok(())
    }
}

/// Spends from `limits` checked at `stage`, or refuses with a 429
/// (giving back what earlier stages spent). Token limiters reserve an
/// estimate made from the request body once, only when one is checked.
pub(super) async fn check_limits(
    limits: &RouteLimits,
    stage: Stage,
    counting: Counting,
    who: &Subject<'_>,
    body: &Option<Bytes>,
    admission: &mut Admission,
) -> Result<(), ProxyError> {
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
        .map_err(|r| super::rate_limited(r, admission))
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
) -> Result<Bytes, ProxyError> {
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
pub(super) struct BodyFacts {
    pub digest: Option<BodyDigest>,
    pub model: Option<models::ModelName>,
    pub estimate: Option<(u64, u64)>,
    /// The prompt's blocks, for `prefix_affinity`.
    pub blocks: Option<crate::upstream::prefix::PromptBlocks>,
}

/// Which of the facts a route needs.
struct WantedFacts {
    /// The route, when its cache keys bodies.
    keyed_by: Option<Arc<RoutePolicy>>,
    model: bool,
    blocks: bool,
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
            blocks: self
                .blocks
                .then(|| crate::upstream::prefix::PromptBlocks::of(body))
                .flatten(),
        }
    }
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
