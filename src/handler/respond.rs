//! What every answer gets on its way out: the route's response rewrite,
//! compression, the token meter that settles the request's reservation,
//! errors as JSON, the request id, the limiters' headers, the HTTP/2
//! stall watchdog.
//!
//! Does not own how any of these work (`headers`, `compress`,
//! `limits::TokenMeter`, `error`, `conn`): only that each answer gets them,
//! in this order.

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::{Proxy, RequestState};
use crate::access_log::AccessRecord;
use crate::body::ResponseBody;
use crate::compress;
use crate::error::{ProxyError, TimeoutPhase};
use crate::headers::{X_CACHE, X_REQUEST_ID};
use crate::limits::tokens::{TokenCount, TokenSink};
use crate::limits::{Admission, TokenMeter, TokenSpend};
use crate::progress::StallWatch;
use crate::protect::Deadline;
use crate::usage::{Served, Usage};

/// The token reservations still open once the answer (or the error) is
/// known: `None` when there are none, or when they are settled here. An
/// error settles them at zero, except a timeout waiting for the answer's
/// head: the backend may have worked all along, so the reservation stands.
/// Other failures (connect timeouts included) generated nothing.
pub(super) fn spends_left(
    admission: &mut Admission,
    forwarded: &Result<Response<ResponseBody>, ProxyError>,
) -> Option<Vec<TokenSpend>> {
    let spends = admission.take_token_spends();
    if spends.is_empty() {
        return None;
    }
    match forwarded {
        Ok(_) => Some(spends),
        Err(ProxyError::UpstreamTimeout {
            phase: TimeoutPhase::ResponseHead,
            ..
        }) => None,
        Err(_) => {
            spends.iter().for_each(|s| s.settle(0));
            None
        }
    }
}

/// `Server-Timing` (W3C): the proxy's own time to the answer's head, the
/// upstream's (when it was asked), and what the cache did; milliseconds.
fn server_timing(st: &RequestState<'_>, headers: &mut HeaderMap) {
    let total = st.rec.started.elapsed();
    let upstream = st.upstream_head.unwrap_or_default();
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let mut value = format!("proxy;dur={:.1}", ms(total.saturating_sub(upstream)));
    if let Some(up) = st.upstream_head {
        value.push_str(&format!(", upstream;dur={:.1}", ms(up)));
    }
    if st.rec.cache != "-" {
        value.push_str(&format!(", cache;desc={}", st.rec.cache));
    }
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(SERVER_TIMING, v);
    }
}

const SERVER_TIMING: http::header::HeaderName =
    http::header::HeaderName::from_static("server-timing");

/// An answer's tokens, counted for the key whose request it answers.
struct KeyTokens {
    usage: Arc<Usage>,
    key: Arc<str>,
    served: Served,
    /// How long the upstream took to make a stored answer.
    made_in: Option<std::time::Duration>,
    started: tokio::time::Instant,
}

impl KeyTokens {
    fn counted(self, tokens: TokenCount) {
        // An answer shared while it streamed has no stored cost: this
        // request's own time is the least its making took.
        let made_in = self.made_in.unwrap_or_else(|| self.started.elapsed());
        self.usage.tokens(&self.key, tokens, self.served, made_in);
    }
}

/// An answer's tokens on its trace, as OpenTelemetry's GenAI conventions
/// name them, and what serving it from the cache saved.
struct TraceTokens {
    trace: crate::otel::RequestTrace,
    served: Served,
    made_in: Option<std::time::Duration>,
}

impl TraceTokens {
    fn counted(self, tokens: TokenCount) {
        use crate::otel::Attribute;
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.trace.set_all([
            Attribute::new("gen_ai.usage.input_tokens", n(tokens.prompt)),
            Attribute::new("gen_ai.usage.output_tokens", n(tokens.completion)),
        ]);
        if let Served::Shared = self.served {
            self.trace
                .set(Attribute::new("hyperion.tokens_saved", n(tokens.total())));
            if let Some(made_in) = self.made_in {
                self.trace.set(Attribute::new(
                    "hyperion.upstream_seconds_saved",
                    made_in.as_secs_f64(),
                ));
            }
        }
    }
}

/// Who is told an answer's tokens: the key's usage, the trace, or both.
struct AnswerTokens {
    key: Option<KeyTokens>,
    trace: Option<TraceTokens>,
}

impl TokenSink for AnswerTokens {
    fn counted(self: Box<Self>, tokens: TokenCount) {
        if let Some(k) = self.key {
            k.counted(tokens);
        }
        if let Some(t) = self.trace {
            t.counted(tokens);
        }
    }
}

impl Proxy {
    /// The client's `Accept-Encoding`, kept for compression before the
    /// request is consumed (empty when the policy does not compress).
    pub(super) fn kept_accept_encoding(&self, req: &Request<Incoming>) -> HeaderMap {
        let mut accept = HeaderMap::new();
        if self.policy.compression.is_some() {
            for v in req.headers().get_all(header::ACCEPT_ENCODING) {
                accept.append(header::ACCEPT_ENCODING, v.clone());
            }
        }
        accept
    }

    /// What the upstream or the cache answered, as the route wants clients
    /// to see it (Hyperion's own errors are left alone): rewritten,
    /// compressed, and metered for the tokens it reports (the meter reads
    /// the body before any coding).
    pub(super) async fn shape(
        &self,
        st: &mut RequestState<'_>,
        resp: &mut Response<ResponseBody>,
        accept: &HeaderMap,
        head_only: bool,
        spends: Option<Vec<TokenSpend>>,
    ) -> Result<(), ProxyError> {
        let upgraded = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        let mut rewritten = false;
        if let Some(rw) = st.rewrite.take().filter(|_| !upgraded) {
            rewritten = rw.rewrites_responses();
            rw.apply_response(resp.headers_mut());
        }
        if let Some(cp) = self.policy.compression.as_ref().filter(|_| !upgraded) {
            // Boxed where awaited: inline, its size would be carried (and
            // copied) by every request's future, uncompressed ones included.
            let encode =
                compress::encode_response(cp, accept, head_only, rewritten, &self.cache, resp);
            boxed_in_place!(encode).await?;
        }
        // Settled with the answer's usage when its body ends, and counted
        // for the key that asked.
        // A key's usage is read only from answers that can carry it; a
        // token limit's reservation is settled whatever the answer.
        let ct = || resp.headers().get(header::CONTENT_TYPE);
        let key = st
            .rec
            .key
            .as_ref()
            .filter(|_| !upgraded && TokenMeter::reads(ct().map(|v| v.as_bytes())));
        let trace = st
            .trace
            .as_ref()
            .filter(|t| t.sampled() && !upgraded && TokenMeter::reads(ct().map(|v| v.as_bytes())));
        if spends.is_some() || key.is_some() || trace.is_some() {
            let ct = ct();
            let mut meter = TokenMeter::new(
                spends.unwrap_or_default(),
                ct.map(|v| v.as_bytes()),
                resp.status().is_success(),
                st.admission.estimate.map_or(0, |(_, prompt)| prompt),
            );
            let served = Served::by_cache_status(st.rec.cache);
            let made_in = resp.body().entry().map(|e| e.cost.upstream);
            let key = key.map(|key| KeyTokens {
                usage: self.protect.usage.clone(),
                key: key.clone(),
                served,
                made_in,
                started: st.rec.started,
            });
            let trace = trace.map(|t| TraceTokens {
                trace: t.clone(),
                served,
                made_in,
            });
            if key.is_some() || trace.is_some() {
                meter.report_to(Box::new(AnswerTokens { key, trace }));
            }
            resp.body_mut().meter(meter);
        }
        Ok(())
    }

    /// An error as the client gets it: JSON, with the cache's status when
    /// the cache had a say.
    pub(super) fn failed(
        &self,
        st: &mut RequestState<'_>,
        e: ProxyError,
    ) -> Response<ResponseBody> {
        if let ProxyError::BodyTimeout { .. } = e {
            self.protect.cut.count(Deadline::BodyRead);
        }
        let rec: &mut AccessRecord = st.rec;
        let id = rec.request_id.to_str().unwrap_or("-");
        if e.status().is_server_error() {
            tracing::warn!(request_id = id, "{e}");
        } else {
            tracing::debug!(request_id = id, "{e}");
        }
        rec.error = Some(e.code());
        if let ProxyError::Unauthorized { .. } = e {
            self.protect.usage.unauthorized();
        }
        let mut resp = e.to_response(&rec.request_id).map(ResponseBody::full);
        if rec.cache != "-" {
            resp.headers_mut()
                .insert(X_CACHE, HeaderValue::from_static(rec.cache));
        }
        resp
    }

    /// What every answer carries, errors included: the request id and the
    /// limiters' headers; on HTTP/2, a watchdog holding a stream the client
    /// stalls to `send_timeout`.
    pub(super) fn finish(
        &self,
        st: &mut RequestState<'_>,
        resp: &mut Response<ResponseBody>,
        request_id: HeaderValue,
        h2: bool,
    ) {
        st.rec.status = resp.status().as_u16();
        if let Some(key) = &st.rec.key {
            let usage = &self.protect.usage;
            usage.record(key, st.rec.status, st.rec.cache, st.waited);
        }
        resp.headers_mut().insert(X_REQUEST_ID, request_id);
        if self.policy.server.server_timing {
            server_timing(st, resp.headers_mut());
        }
        if let Some(limit) = &st.admission.headers {
            limit.apply(resp.headers_mut());
        }
        if h2 && resp.body().holds_upstream() {
            // HTTP/2 clients can stall a stream without blocking a write.
            let watch = Arc::new(StallWatch::new());
            resp.body_mut().watch_progress(watch.clone());
            crate::conn::watch_stream(
                st.conn.state.clone(),
                watch,
                self.policy.server.send_timeout,
            );
        }
    }
}
