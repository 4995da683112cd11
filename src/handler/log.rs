//! A request's access-log record: made when the request arrives, carried by
//! the steps, written when the response body ends (or is dropped), with the
//! connection's in-flight count held until then.
//!
//! Does not own the record's format or where it goes (`access_log`).

use http::header::{self, HeaderValue};
use http::Request;
use hyper::body::Incoming;

use super::{ConnInfo, Proxy};
use crate::access_log::AccessRecord;
use crate::body::{BodyEnd, BodyOutcome};
use crate::conn::InflightGuard;
use crate::headers;
use crate::limits::per_key::KeySlot;
use crate::otel::{Attribute, RequestTrace, SpanKind, StepSpan};

/// The record and what it needs to be written.
pub(super) struct RequestLog {
    rec: AccessRecord,
    log: std::sync::Arc<crate::access_log::AccessLog>,
    _inflight: InflightGuard,
    /// The request's place under its key's `max_concurrent`.
    _key_slot: Option<KeySlot>,
    /// The request's trace and its answer's span, ended with the body.
    trace: Option<(RequestTrace, StepSpan)>,
}

impl RequestLog {
    /// Also holds `slot` until the body ends.
    pub fn holding(mut self: Box<Self>, slot: Option<KeySlot>) -> Box<Self> {
        self._key_slot = slot;
        self
    }

    /// Ends `trace` with the body: the answer's span begins now.
    pub fn traced(mut self: Box<Self>, trace: RequestTrace) -> Box<Self> {
        let stream = trace.child("response stream", SpanKind::Internal);
        self.trace = Some((trace, stream));
        self
    }
}

impl BodyEnd for RequestLog {
    fn end(mut self: Box<Self>, bytes: u64, outcome: BodyOutcome) {
        if let Some((trace, mut stream)) = self.trace.take() {
            if stream.sampled() {
                stream.set(Attribute::new("http.response.body.size", bytes as i64));
                stream.set(Attribute::new("hyperion.outcome", outcome.as_str()));
                if outcome != BodyOutcome::Complete {
                    stream.fail(outcome.as_str());
                }
            }
            stream.end();
            if trace.sampled() {
                trace.status(self.rec.status, self.rec.error);
                trace.set(Attribute::new("hyperion.cache.status", self.rec.cache));
                if let Some(up) = &self.rec.upstream {
                    trace.set(Attribute::new("hyperion.upstream.server", up.to_string()));
                }
            }
            trace.end();
        }
        self.log.finish(&self.rec, bytes, outcome);
    }
}

/// The record until a response exists: dropped with it still inside, the
/// request is logged as 499 (nginx's code for a client that left).
pub(super) struct PendingLog(Option<Box<RequestLog>>);

impl PendingLog {
    /// The record, for the steps to fill in.
    pub fn record(&mut self) -> &mut AccessRecord {
        &mut self.0.as_mut().expect("taken only at the end").rec
    }

    /// The record as the response body's end hook.
    pub fn take(&mut self) -> Box<RequestLog> {
        self.0.take().expect("taken once")
    }
}

impl Drop for PendingLog {
    fn drop(&mut self) {
        if let Some(mut pending) = self.0.take() {
            pending.rec.status = 499;
            pending.rec.error = Some("client_closed_request");
            pending.end(0, BodyOutcome::Aborted);
        }
    }
}

impl Proxy {
    /// A new request's record, boxed once, here: the box becomes the
    /// response body's end hook.
    pub(super) fn pending_log(
        &self,
        req: &Request<Incoming>,
        conn: &ConnInfo,
        peer_trusted: bool,
        request_id: &HeaderValue,
        inflight: InflightGuard,
    ) -> PendingLog {
        let lines = self.log.writes_lines();
        let line_field = |name| lines.then(|| req.headers().get(name).cloned()).flatten();
        let trusted = &self.policy.server.trusted_proxies;
        let rec = AccessRecord {
            started: crate::clock::now(),
            client: headers::client_ip(conn.peer, peer_trusted, req.headers(), trusted),
            method: req.method().clone(),
            target: req.uri().path_and_query().cloned(),
            version: req.version(),
            status: 0,
            route: None,
            key: None,
            upstream: None,
            arm: None,
            request_id: request_id.clone(),
            cache: "-",
            user_agent: line_field(header::USER_AGENT),
            referer: line_field(header::REFERER),
            error: None,
        };
        PendingLog(Some(Box::write(
            Box::new_uninit(),
            RequestLog {
                rec,
                log: self.log.clone(),
                _inflight: inflight,
                _key_slot: None,
                trace: None,
            },
        )))
    }
}
