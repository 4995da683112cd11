//! The upstream step: the limiters that count only what goes upstream, the
//! servers that may take the request (its model, its hash), a slot at one of
//! them (waiting in line if need be), the request as the upstream gets it,
//! and its answer as the client gets it, through the cache's exchange when
//! the route caches.
//!
//! Does not own balancing, slots, retries or connections (`upstream`), the
//! headers' rules (`headers`) or what the exchange does with the answer
//! (`cache`).

use std::borrow::Cow;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;

use super::admit::Arrival;
use super::cached::Upstream;
use super::{Proxy, RequestState};
use crate::body::{ReadAheadLimits, RequestBody, ResponseBody};
use crate::cache::{CacheStatus, Exchange};
use crate::error::ProxyError;
use crate::headers::{self, Forwarding, RequestFields, X_REQUEST_ID};
use crate::limits::{Counting, Place, Stage};
use crate::policy::{AuthMode, Balance, HashKey, UnknownModel, UpstreamServer};
use crate::upstream::balance::PickFilter;
use crate::upstream::models::{ModelChoice, ModelName};
use crate::upstream::prefix::{self, PromptBlocks};
use crate::upstream::{Admitted, ConnLease, UpstreamPool};

/// A server for the request, and its slot there.
pub(super) struct Slot {
    pub admitted: Admitted,
    /// Where retries may go.
    pub filter: PickFilter,
    pub model: Option<ModelName>,
    /// The server the balancer chose (retries may end elsewhere).
    pub planned: usize,
    /// The prompt's blocks (`prefix_affinity`), remembered again where a
    /// retry ends.
    pub blocks: Option<PromptBlocks>,
}

// The upstream step's functions are called in turn by `forward`, not one
// from another: each async fn level around `UpstreamPool::send` would
// copy that future (kilobytes) once more on every request.
impl Proxy {
    /// A server and a slot for the request. `None` when a stale answer goes out
    /// instead (in `plan.serve_stale`): the model is served nowhere, or no
    /// slot was free for a background refresh, or none came in time and
    /// the entry may be served stale on error.
    pub(super) async fn take_server(
        &self,
        st: &mut RequestState<'_>,
        arrival: &mut Arrival<'_>,
        req: &Request<Incoming>,
        plan: &mut Upstream,
    ) -> Result<Option<Slot>, ProxyError> {
        let pool = arrival.pool;
        let model = arrival.facts.model.take();
        let blocks = arrival.facts.blocks.take();
        let found =
            arrival.servers_for(req, plan.exchange.as_ref(), model.as_ref(), blocks.as_ref());
        let filter = match found {
            Ok(filter) => filter,
            Err(e) => {
                // Nothing reached the upstream: nothing is spent.
                st.admission.refund_all();
                return if plan.serve_stale.is_some() {
                    Ok(None)
                } else {
                    Err(e)
                };
            }
        };
        // A background refresh does not queue: without a free slot the
        // stale answer goes out and a later request refreshes.
        let admitted = if plan.serve_stale.is_some() {
            match pool.try_admit(&filter) {
                Some(admitted) => admitted,
                None => return Ok(None),
            }
        } else {
            let place = || arrival.place(req.headers());
            let ex = plan.exchange.as_ref();
            match wait_for_slot(pool, &filter, place, ex, &mut st.waited).await {
                Ok(admitted) => admitted,
                Err(e) => {
                    // Nothing reached the upstream: nothing is spent.
                    st.admission.refund_all();
                    let ex = plan.exchange.as_ref();
                    plan.serve_stale = Some(ex.and_then(Exchange::stale_on_error).ok_or(e)?);
                    st.rec.cache = CacheStatus::Stale.as_str();
                    return Ok(None);
                }
            }
        };
        let planned = admitted.index;
        if let (Some(index), Some(blocks)) = (&pool.state.prefix, &blocks) {
            // Where it went, and why: counted, and remembered for the
            // conversation's next turn.
            let how = if filter.affine & (1 << planned) != 0 {
                prefix::ROUTED_BY_PREFIX
            } else if filter.affine | filter.affine_next != 0 {
                prefix::FELL_BACK_FOR_LOAD
            } else {
                prefix::PLACED
            };
            index.count(how);
            index.record(blocks, planned);
        }
        st.rec.upstream = Some(pool.pick_at(planned).server.url.clone());
        Ok(Some(Slot {
            admitted,
            filter,
            model,
            planned,
            blocks,
        }))
    }

    /// The client's answer made of the upstream's (hop-by-hop fields gone),
    /// or a stale answer when the upstream failed and the entry allows it,
    /// or a 101 with the tunnel started. The exchange, when the route
    /// caches, is left in `plan` for the answer to go through; it is taken
    /// when this answers by itself.
    pub(super) fn answer(
        &self,
        st: &mut RequestState<'_>,
        arrival: &mut Arrival<'_>,
        sent: Result<(Box<Response<Incoming>>, ConnLease, usize), ProxyError>,
        plan: &mut Upstream,
        planned: usize,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let pool = arrival.pool;
        let (resp, lease) = match sent {
            Ok((resp, lease, index)) => {
                // Another server than planned, after a retry.
                if index != planned {
                    st.rec.upstream = Some(pool.pick_at(index).server.url.clone());
                }
                (resp, lease)
            }
            Err(e) => {
                let ex = plan.exchange.take();
                let Some(stale) = ex.as_ref().and_then(Exchange::stale_on_error) else {
                    return Err(e);
                };
                st.admission.refund_all();
                let id = st.rec.request_id.to_str().unwrap_or("-");
                tracing::warn!(request_id = id, "{e}; serving stale");
                st.rec.cache = CacheStatus::Stale.as_str();
                return Ok(stale);
            }
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            plan.exchange = None;
            let server = pool.pick_at(planned).server;
            return self.tunnel(st, arrival, *resp, lease, server);
        }
        Ok(client_response(
            *resp,
            lease,
            pool.policy.idle_timeout,
            self.read_ahead.as_ref(),
        ))
    }

    /// The request as the upstream gets it: hop-by-hop fields gone, the
    /// forwarding headers, the upstream's `Host` (unless the route preserves
    /// the client's), the route's rewrite, the cache's validators, and the
    /// body: the one read ahead, or the client's stream under the body
    /// limits.
    pub(super) fn upstream_request(
        &self,
        st: &RequestState<'_>,
        arrival: &mut Arrival<'_>,
        req: Request<Incoming>,
        fields: &RequestFields,
        slot: &Slot,
        exchange: Option<&mut Exchange>,
    ) -> Box<Request<RequestBody>> {
        let server = arrival.pool.pick_at(slot.planned).server;
        let (mut parts, body) = req.into_parts();
        let h = &mut parts.headers;
        if fields.hop_by_hop {
            headers::strip_hop_by_hop(h);
        }
        if fields.transfer_encoding {
            // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length; a
            // length sent alongside it must not reach the upstream.
            h.remove(header::CONTENT_LENGTH);
        }
        if fields.expect {
            // hyper has already answered `Expect: 100-continue` by reading the body.
            h.remove(header::EXPECT);
        }
        let forwarding = Forwarding {
            peer_value: &st.conn.peer_value,
            peer_trusted: st.peer_trusted,
            proto: st.conn.proto,
            host: arrival.host_value.as_ref(),
            version: parts.version,
        };
        headers::add_forwarding(h, &forwarding);
        h.insert(X_REQUEST_ID, st.rec.request_id.clone());
        let route = arrival.route;
        if !route.policy.preserve_host {
            h.insert(header::HOST, server.host_header.clone());
        } else if let (false, Some(host)) = (h.contains_key(header::HOST), &arrival.host_value) {
            // HTTP/2 clients send :authority instead of Host.
            h.insert(header::HOST, host.clone());
        }
        if let Some(protocol) = &arrival.upgrade {
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(header::UPGRADE, protocol.clone());
        }
        if self.policy.compression.is_some()
            || arrival.limits.counts_tokens()
            || arrival.tenant.is_some()
        {
            // Hyperion compresses, or counts tokens in the answer (for a
            // token limit, or the key's usage): the upstream's bytes must
            // be readable here.
            h.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        if route.policy.auth != AuthMode::Off {
            // The key is Hyperion's: the upstream never sees it, nor the
            // priority asked for in the line.
            crate::auth::strip_key_headers(h, &super::admit::PRIORITY_HEADER);
        }
        if let Some(c) = &server.credential {
            // The pool's own credential, in place of any the client sent.
            h.insert(c.name.clone(), c.value.clone());
        }
        if let Some(rw) = &route.policy.headers {
            rw.apply_request(h);
        }
        if let Some(ex) = exchange {
            ex.add_validators(h);
        }
        parts.uri = UpstreamPool::origin_form(parts.uri);
        parts.version = Version::HTTP_11;
        let limits = &self.policy.server;
        let body = match arrival.body.take() {
            Some(bytes) => RequestBody::buffered(bytes),
            None => RequestBody::new(body, limits.max_request_body, limits.body_read_timeout),
        };
        Box::new(Request::from_parts(parts, body))
    }
}

impl Arrival<'_> {
    /// The limiters that let cache hits through count now (unless `spends`
    /// is false), and the answer carries the most constrained bucket's
    /// headers.
    pub async fn upstream_limits(
        &self,
        st: &mut RequestState<'_>,
        headers: &HeaderMap,
        spends: bool,
    ) -> Result<(), ProxyError> {
        let limits = self.limits;
        if limits.is_empty() {
            return Ok(());
        }
        let who = self.who(headers, crate::clock::now());
        if spends {
            super::admit::check_limits(
                limits,
                Stage::Upstream,
                Counting::All,
                &who,
                &self.body,
                &mut st.admission,
            )
            .await?;
        }
        limits.peek_rest(&who, &mut st.admission);
        Ok(())
    }

    /// The servers that may take the request: only those serving its model,
    /// those having it loaded first, and its place on the ring under
    /// `consistent_hash`. An error when the model is served nowhere and the
    /// route rejects unknown models.
    fn servers_for(
        &self,
        req: &Request<Incoming>,
        exchange: Option<&Exchange>,
        model: Option<&ModelName>,
        blocks: Option<&PromptBlocks>,
    ) -> Result<PickFilter, ProxyError> {
        let pool = self.pool;
        let mut filter = PickFilter {
            hash: balance_hash(pool, req, exchange, || self.host()),
            ..PickFilter::default()
        };
        if let (Some(index), Some(blocks)) = (&pool.state.prefix, blocks) {
            // Servers out of rotation are forgotten: they may come back
            // with an empty cache.
            let now = crate::clock::now();
            let in_rotation = pool
                .state
                .servers
                .iter()
                .enumerate()
                .filter(|(_, s)| s.usable(now))
                .fold(0u64, |m, (i, _)| m | (1 << i));
            let affinity = index.affinity(blocks, in_rotation);
            filter.affine = affinity.best;
            filter.affine_next = affinity.next;
            filter.room = affinity.room;
            // An unknown prompt is placed by its first block, unless the
            // pool hashes a header the request sent.
            if filter.hash.is_none() {
                filter.hash = blocks.first();
            }
        }
        match pool.state.models.choose(model) {
            ModelChoice::Any => {}
            ModelChoice::Among { serving, loaded } => {
                filter.only = serving;
                filter.prefer = loaded;
            }
            ModelChoice::Unknown { served } => {
                if self.route.policy.unknown_model == UnknownModel::Reject {
                    return Err(ProxyError::UnknownModel {
                        upstream: pool.policy.name.clone(),
                        model: model.map(|m| m.to_string()).unwrap_or_default(),
                        served,
                    });
                }
            }
        }
        Ok(filter)
    }
}

/// A slot for the request, waiting in line for one if need be (how long,
/// when it had to, goes to `waited`). Identical requests behind this one
/// wait with it, not time out.
async fn wait_for_slot(
    pool: &UpstreamPool,
    filter: &PickFilter,
    place: impl FnOnce() -> Place,
    exchange: Option<&Exchange>,
    waited: &mut Option<std::time::Duration>,
) -> Result<Admitted, ProxyError> {
    // Set once, when the wait starts (a `Cell` would make the request's
    // future not `Send`).
    let since = std::sync::OnceLock::new();
    let waiting = |queued| {
        if queued {
            crate::telemetry::queued(&pool.policy.name);
            let _ = since.set(crate::clock::now());
        }
        if let Some(ex) = exchange {
            ex.queue(queued);
        }
    };
    let admitted = pool.admit(filter, place, waiting).await;
    *waited = since.get().map(|t: &tokio::time::Instant| t.elapsed());
    admitted
}

/// Identical requests wait for this one: it runs in a task of its own,
/// which this client leaving does not cancel. With `serve_stale`, the
/// client has its answer already and the task only refreshes the entry.
pub(super) async fn lead(
    st: &mut RequestState<'_>,
    ex: Exchange,
    pool: &Arc<UpstreamPool>,
    (slot, req, preserve_host): (Slot, Box<Request<RequestBody>>, bool),
    serve_stale: Option<Response<ResponseBody>>,
) -> Result<Response<ResponseBody>, ProxyError> {
    let pool = pool.clone();
    // The leader's attempts belong to its trace, though they run in the
    // exchange's task.
    let trace = st.trace.clone();
    let send = async move {
        let Slot {
            admitted,
            filter,
            model,
            ..
        } = slot;
        let (resp, lease, index) = pool
            .send(
                admitted,
                req,
                filter,
                model.as_ref(),
                preserve_host,
                trace.as_ref(),
            )
            .await?;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            return Err(unasked_upgrade(pool.pick_at(index).server));
        }
        // Read by the exchange's own task into the followers' buffer
        // (`cache/fill.rs`): no read-ahead of its own.
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
    st.rec.cache = status.as_str();
    Ok(resp)
}

/// What `consistent_hash` places the request by: its cache key (its
/// target when the route does not cache) or the pool's header. `None`
/// for the other strategies, and for a request without the header.
fn balance_hash<'a>(
    pool: &UpstreamPool,
    req: &Request<Incoming>,
    exchange: Option<&Exchange>,
    host: impl FnOnce() -> Option<Cow<'a, str>>,
) -> Option<u64> {
    match (pool.policy.balance, &pool.policy.hash_key) {
        (Balance::ConsistentHash, _) | (Balance::PrefixAffinity, HashKey::Header(_)) => {}
        _ => return None,
    }
    // BLAKE3, not std's DefaultHasher: the ring must place a request alike
    // on every proxy, whatever Rust version built it.
    let mut h = blake3::Hasher::new();
    match &pool.policy.hash_key {
        HashKey::CacheKey => {
            if let Some(key) = exchange.and_then(Exchange::key_hash) {
                return Some(key);
            }
            // Worked out only here: it costs a scan of the Host header.
            let host = host();
            let host = host.as_deref().unwrap_or("");
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

/// The upstream's response as the client gets it: hop-by-hop headers gone,
/// the body under the upstream's idle timeout.
pub(super) fn client_response(
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

/// A 101 to a request that asked for no upgrade: the upstream is broken.
pub(super) fn unasked_upgrade(server: &UpstreamServer) -> ProxyError {
    ProxyError::UpstreamFailed {
        server: server.url.to_string(),
        reason: "101 Switching Protocols to a request that asked for no upgrade".into(),
    }
}
