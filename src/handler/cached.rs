//! The cache step: the request answered from the cache (or from an identical
//! request's answer), or a plan for going upstream.
//!
//! Owns [`Plan`], the cache phase a request is in, and the loop that joins
//! identical requests. Does not own freshness, keys, storage or the fill
//! (`cache/`): it only asks the cache and acts on its answer.

use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;

use super::admit::Arrival;
use super::{Proxy, RequestState};
use crate::body::ResponseBody;
use crate::cache::{Before, CacheQuery, Exchange, Followed, TenantScope};
use crate::error::ProxyError;
use crate::otel::{Attribute, SpanKind};
use crate::policy::RouteCachePolicy;

/// What the cache made of a request.
// Matched at once by its one caller; boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub(super) enum Plan {
    /// Answered: from the cache, or from an identical request's answer.
    Answered(Response<ResponseBody>),
    /// Going upstream.
    Upstream(Upstream),
}

/// How a request goes upstream, as far as the cache is concerned.
#[derive(Default)]
pub(super) struct Upstream {
    /// The exchange that stores the answer, validates a stored one, and
    /// leads identical requests; `None` when the route does not cache.
    pub exchange: Option<Exchange>,
    /// A stale answer already chosen for the client while `exchange`
    /// refreshes the entry in the background (`stale-while-revalidate`).
    pub serve_stale: Option<Response<ResponseBody>>,
}

impl Arrival<'_> {
    /// Asks the cache, under the route's cache rules. Waiting behind an
    /// identical request may end with that request failing: then it looks
    /// again, once, before going upstream alone.
    pub async fn consult_cache(
        &self,
        proxy: &Proxy,
        st: &mut RequestState<'_>,
        req: &Request<Incoming>,
        policy: &Arc<RouteCachePolicy>,
    ) -> Result<Plan, ProxyError> {
        let host = self.host();
        let mut joins_left = 2;
        // The key, for a sampled trace to name.
        let key_seen = std::sync::OnceLock::new();
        let traced = st.trace.as_ref().filter(|t| t.sampled()).is_some();
        loop {
            let query = CacheQuery {
                arm: self.arm.map(|a| &**a),
                route: &self.route.name,
                method: req.method(),
                host: host.as_deref().unwrap_or(""),
                path: req.uri().path(),
                query: req.uri().query(),
                headers: req.headers(),
                body: self.body.as_ref(),
                tenant: self.tenant.as_deref().map(|name| TenantScope {
                    name,
                    key_headers: &crate::auth::KEY_HEADERS,
                }),
                body_digest: self.facts.digest.as_ref(),
                key_seen: traced.then_some(&key_seen),
            };
            let mut lookup = st
                .trace
                .as_ref()
                .map(|t| t.child("cache lookup", SpanKind::Internal));
            // The cache's futures are boxed where they are awaited: inline,
            // their size would be carried (and copied) by every request's
            // future, pass-through ones included.
            let before = boxed_in_place!(proxy.cache.before(policy, query, joins_left > 0)).await;
            if let Some(mut span) = lookup.take() {
                if let Some(key) = key_seen.get() {
                    let hex: String = key.0.iter().map(|b| format!("{b:02x}")).collect();
                    span.set(Attribute::new("hyperion.cache.key", hex.clone()));
                    if let Some(t) = &st.trace {
                        t.set(Attribute::new("hyperion.cache.key", hex));
                    }
                }
                span.set(Attribute::new("hyperion.cache.result", before.describe()));
                span.end();
            }
            match before {
                Before::Serve(resp, status, None) => {
                    st.rec.cache = status.as_str();
                    if let Some(at) = self.arrived {
                        self.limits
                            .peek_rest(&self.who(req.headers(), at), &mut st.admission);
                    }
                    return Ok(Plan::Answered(resp));
                }
                Before::Serve(resp, status, refresh) => {
                    st.rec.cache = status.as_str();
                    return Ok(Plan::Upstream(Upstream {
                        exchange: refresh,
                        serve_stale: Some(resp),
                    }));
                }
                Before::Fail(e) => return self.refuse(e, req.headers(), &mut st.admission),
                Before::Forward(ex) => {
                    st.rec.cache = ex.status.as_str();
                    return Ok(Plan::Upstream(Upstream {
                        exchange: Some(ex),
                        serve_stale: None,
                    }));
                }
                Before::Follow(follow) => {
                    joins_left -= 1;
                    let mut waiting = st
                        .trace
                        .as_ref()
                        .map(|t| t.child("coalescing wait", SpanKind::Internal));
                    let followed = boxed_in_place!(follow.wait(req.headers())).await;
                    if let Some(mut span) = waiting.take() {
                        span.set(Attribute::new("hyperion.coalesced", followed.describe()));
                        span.end();
                    }
                    match followed {
                        Followed::Serve(resp, status) => {
                            st.rec.cache = status.as_str();
                            if self.arrived.is_some() {
                                let now = crate::clock::now();
                                self.limits
                                    .peek_rest(&self.who(req.headers(), now), &mut st.admission);
                            }
                            return Ok(Plan::Answered(resp));
                        }
                        Followed::Retry => {}
                        Followed::Alone => joins_left = 0,
                    }
                }
            }
        }
    }
}
