//! OpenTelemetry traces (`[tracing]`): one server span per request, with
//! child spans for what the request waited on, exported over OTLP/HTTP.
//!
//! Owns the tracer (sampling, the W3C `traceparent` read from clients and
//! written to upstreams), the request's span handle ([`RequestTrace`]) the
//! steps add to, and the exporter's bounded queue (`otel/export.rs`) and
//! transport (`otel/transport.rs`). Does not own what a span says about a
//! step: the handler, the cache's caller and the upstream pool name their
//! own spans and attributes. A bottom module: it imports nothing of the
//! request path, so the upstream pool may take a [`RequestTrace`] without
//! a cycle.
//!
//! Off (no `[tracing]`), no request pays more than a `None` check. On, a
//! request not sampled carries a non-recording span (its ids still reach
//! the upstream in `traceparent`, flagged not sampled, as W3C asks). The
//! exporter never slows a request: finished spans go to a bounded queue,
//! dropped and counted when it is full.

mod export;
mod transport;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Span as _, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

use crate::policy::TracingPolicy;

pub use export::ExportStats;
pub use opentelemetry::trace::SpanKind;
pub use opentelemetry::KeyValue as Attribute;

/// The process's tracer, when `[tracing]` is set.
pub struct Traces {
    tracer: SdkTracer,
    provider: SdkTracerProvider,
    pub stats: Arc<ExportStats>,
    /// Told when the exporter's thread has sent what was queued and ended.
    exported: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl std::fmt::Debug for Traces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Traces").finish_non_exhaustive()
    }
}

impl Traces {
    /// The tracer for `policy`. Exports run on a thread of their own
    /// (`hyperion-otel`), which outlives the drain: the spans of the last
    /// requests are sent too.
    pub fn start(policy: &TracingPolicy) -> Result<Arc<Traces>, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the exporter's runtime: {e}"))?;
        let exporter = transport::exporter(policy, runtime.handle())?;
        let stats = Arc::new(ExportStats::default());
        let (processor, task) = export::Queue::start(exporter, policy, stats.clone());
        let (done, exported) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("hyperion-otel".into())
            .spawn(move || {
                runtime.block_on(task);
                let _ = done.send(());
            })
            .map_err(|e| format!("cannot start the exporter's thread: {e}"))?;
        let resource = Resource::builder()
            .with_service_name(policy.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                policy.sample_ratio,
            ))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("hyperion");
        Ok(Arc::new(Traces {
            tracer,
            provider,
            stats,
            exported: std::sync::Mutex::new(exported),
        }))
    }

    /// A request's server span, begun now: continuing the client's
    /// `traceparent` when it sent a valid one, a new trace otherwise.
    pub fn request(&self, headers: &HeaderMap, method: &http::Method, path: &str) -> RequestTrace {
        let parent = TraceContextPropagator::new()
            .extract_with_context(&Context::new(), &HeaderExtractor(headers));
        let span = self
            .tracer
            .span_builder(method_name(method))
            .with_kind(SpanKind::Server)
            .start_with_context(&self.tracer, &parent);
        let sampled = span.span_context().is_sampled();
        let trace = RequestTrace(Arc::new(TraceInner {
            cx: parent.with_span(span),
            tracer: self.tracer.clone(),
            sampled,
        }));
        if sampled {
            trace.set_all([
                KeyValue::new("http.request.method", method.as_str().to_owned()),
                // The path, never the query: queries carry keys and tokens.
                KeyValue::new("url.path", truncate(path, 256)),
            ]);
        }
        trace
    }

    /// Ends the exporter: what is queued is sent, waiting at most `wait`
    /// (blocking: called once the workers have drained). Later spans are
    /// dropped.
    pub fn shutdown(&self, wait: Duration) {
        let _ = self.provider.shutdown_with_timeout(wait);
        let exported = self.exported.lock().unwrap_or_else(|e| e.into_inner());
        let _ = exported.recv_timeout(wait);
    }
}

fn method_name(m: &http::Method) -> Cow<'static, str> {
    match m.as_str() {
        "GET" => Cow::Borrowed("GET"),
        "POST" => Cow::Borrowed("POST"),
        "HEAD" => Cow::Borrowed("HEAD"),
        "PUT" => Cow::Borrowed("PUT"),
        "DELETE" => Cow::Borrowed("DELETE"),
        "OPTIONS" => Cow::Borrowed("OPTIONS"),
        "PATCH" => Cow::Borrowed("PATCH"),
        // A client's own method is not a bounded name.
        _ => Cow::Borrowed("HTTP"),
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// One request's server span, and the spans of its steps under it. One
/// pointer: it rides in every request's future (as `None` when tracing is
/// off, where a wider field would be copied on each move of the future),
/// and is cheap to clone (a coalescing leader's task carries one).
#[derive(Clone)]
pub struct RequestTrace(Arc<TraceInner>);

struct TraceInner {
    /// Holds the server span.
    cx: Context,
    tracer: SdkTracer,
    sampled: bool,
}

impl RequestTrace {
    /// Whether the request's spans are kept: attributes are worth working
    /// out only then.
    pub fn sampled(&self) -> bool {
        self.0.sampled
    }

    /// Names the server span `METHOD route`, once the route is known.
    pub fn route(&self, method: &http::Method, route: &str) {
        if self.0.sampled {
            let span = self.0.cx.span();
            span.update_name(format!("{} {route}", method_name(method)));
            span.set_attribute(KeyValue::new("http.route", route.to_owned()));
        }
    }

    pub fn set(&self, attribute: KeyValue) {
        if self.0.sampled {
            self.0.cx.span().set_attribute(attribute);
        }
    }

    pub fn set_all(&self, attributes: impl IntoIterator<Item = KeyValue>) {
        if self.0.sampled {
            self.0.cx.span().set_attributes(attributes);
        }
    }

    /// The answer's status: a 5xx marks the span as failed (OpenTelemetry's
    /// HTTP conventions: a 4xx is the client's, not the server's).
    pub fn status(&self, status: u16, error: Option<&'static str>) {
        if !self.0.sampled {
            return;
        }
        let span = self.0.cx.span();
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if let Some(code) = error {
            span.set_attribute(KeyValue::new("error.type", code));
        }
        if status >= 500 {
            span.set_status(Status::error(error.unwrap_or("server error")));
        }
    }

    /// A step's span under the server span, begun now.
    pub fn child(&self, name: &'static str, kind: SpanKind) -> StepSpan {
        self.child_since(name, kind, SystemTime::now())
    }

    /// A step's span under the server span, begun at `start` (a wait
    /// known only once it is over).
    pub fn child_since(&self, name: &'static str, kind: SpanKind, start: SystemTime) -> StepSpan {
        let inner = &self.0;
        let span = inner
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_start_time(start)
            .start_with_context(&inner.tracer, &inner.cx);
        StepSpan {
            span: Box::new(span),
            sampled: inner.sampled,
        }
    }

    /// Ends the server span.
    pub fn end(&self) {
        self.0.cx.span().end();
    }
}

/// A step's span: ended when dropped, or by [`StepSpan::end`]. Boxed: an
/// upstream attempt's future holds an `Option` of one.
pub struct StepSpan {
    span: Box<opentelemetry_sdk::trace::Span>,
    sampled: bool,
}

impl StepSpan {
    pub fn sampled(&self) -> bool {
        self.sampled
    }

    pub fn set(&mut self, attribute: KeyValue) {
        if self.sampled {
            self.span.set_attribute(attribute);
        }
    }

    /// Marks the step failed, with why.
    pub fn fail(&mut self, why: impl Into<Cow<'static, str>>) {
        if self.sampled {
            self.span.set_status(Status::error(why));
        }
    }

    /// Writes this span's context as `traceparent` (and `tracestate`) into
    /// `headers`, in place of the client's: the upstream's spans become
    /// this step's children.
    pub fn propagate(&self, headers: &mut HeaderMap) {
        let cx = Context::new().with_remote_span_context(self.span.span_context().clone());
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
        // An empty `tracestate` says nothing: not sent.
        if headers
            .get("tracestate")
            .is_some_and(|v| v.as_bytes().is_empty())
        {
            headers.remove("tracestate");
        }
    }

    pub fn end(mut self) {
        self.span.end();
    }
}
