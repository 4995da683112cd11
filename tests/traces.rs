//! OpenTelemetry traces (`[tracing]`) against a real OTLP/HTTP receiver
//! started here: what the exporter sends is decoded with the OpenTelemetry
//! protobuf types, and the span trees are checked for a miss (continuing
//! the client's `traceparent`, propagating it upstream, GenAI usage), a hit
//! (tokens saved, no upstream), a coalesced follower (its wait, no
//! upstream of its own), a retried attempt (two attempt spans, numbered),
//! sampling, and a collector that hangs (requests unaffected, drops
//! counted).

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use support::*;

/// An OTLP/HTTP collector: every span it was sent, with its service name.
#[derive(Clone)]
struct Collector {
    addr: std::net::SocketAddr,
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans: Arc<Mutex<Vec<(String, Span)>>> = Arc::default();
        let kept = spans.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let kept = kept.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let kept = kept.clone();
                        async move {
                            assert_eq!(req.uri().path(), "/v1/traces");
                            assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                            assert_eq!(req.headers()["x-collector-token"], "abc123");
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let export = ExportTraceServiceRequest::decode(body).unwrap();
                            let mut kept = kept.lock().unwrap();
                            for rs in export.resource_spans {
                                let service = rs
                                    .resource
                                    .as_ref()
                                    .and_then(|r| {
                                        r.attributes.iter().find(|kv| kv.key == "service.name")
                                    })
                                    .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                                        Any::StringValue(s) => Some(s.clone()),
                                        _ => None,
                                    })
                                    .unwrap_or_default();
                                for ss in rs.scope_spans {
                                    for span in ss.spans {
                                        kept.push((service.clone(), span));
                                    }
                                }
                            }
                            Ok::<_, std::convert::Infallible>(
                                Response::builder()
                                    .header("content-type", "application/x-protobuf")
                                    .body(http_body_util::Full::new(Bytes::new()))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Collector { addr, spans }
    }

    fn endpoint(&self) -> String {
        format!("http://{}/v1/traces", self.addr)
    }

    /// The spans of trace `trace_id` once `n` have arrived (bounded wait:
    /// the exporter sends every 50 ms here).
    async fn trace(&self, trace_id: &[u8], n: usize) -> Vec<Span> {
        for _ in 0..200 {
            let got: Vec<Span> = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, s)| s.trace_id == trace_id)
                .map(|(_, s)| s.clone())
                .collect();
            if got.len() >= n {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("trace {} did not reach {n} spans", hex(trace_id));
    }

    /// Every server span received.
    fn servers(&self) -> Vec<Span> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| s.kind == SpanKind::Server as i32)
            .map(|(_, s)| s.clone())
            .collect()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn attr(span: &Span, key: &str) -> Option<Any> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.clone())
}

fn text(span: &Span, key: &str) -> String {
    match attr(span, key) {
        Some(Any::StringValue(s)) => s,
        other => panic!("{key} on `{}` is {other:?}", span.name),
    }
}

fn int(span: &Span, key: &str) -> i64 {
    match attr(span, key) {
        Some(Any::IntValue(n)) => n,
        other => panic!("{key} on `{}` is {other:?}", span.name),
    }
}

fn named<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn server_of(spans: &[Span]) -> &Span {
    let servers: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Server as i32)
        .collect();
    assert_eq!(servers.len(), 1, "{spans:#?}");
    servers[0]
}

/// An Ollama-shaped backend answering with its token counts; a request
/// with `x-slow` takes 300 ms.
async fn backend() -> Upstream {
    Upstream::start(|req: Request<Incoming>| async move {
        let slow = req.uri().path() == "/api/chat" && req.headers().get("x-slow").is_some();
        if slow {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        ollama_chat_answer()
    })
    .await
}

fn policy(collector: &str, upstream: &str, extra: &str) -> String {
    format!(
        r#"[tracing]
otlp_endpoint = "{collector}"
service_name = "hyperion-test"
headers_env = "HYPERION_TEST_OTLP_HEADERS"
export_interval = "50ms"
{extra}
{routes}"#,
        routes = chat_policy(upstream, "")
    )
}

async fn proxy(collector: &Collector, up: &Upstream, extra: &str) -> TestProxy {
    std::env::set_var("HYPERION_TEST_OTLP_HEADERS", "x-collector-token=abc123");
    TestProxy::start(&policy(&collector.endpoint(), &up.url(), extra)).await
}

const PROMPT: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

async fn chat(proxy: &TestProxy, traceparent: Option<&str>, slow: bool) -> http::response::Parts {
    let mut req = Request::post(proxy.url("/api/chat")).header("content-type", "application/json");
    if let Some(tp) = traceparent {
        req = req.header("traceparent", tp);
    }
    if slow {
        req = req.header("x-slow", "1");
    }
    send(req.body(full(PROMPT)).unwrap()).await.0
}

#[tokio::test]
async fn a_miss_continues_the_clients_trace_and_propagates_it_upstream() {
    let collector = Collector::start().await;
    let up = backend().await;
    let proxy = proxy(&collector, &up, "").await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let parts = chat(
        &proxy,
        Some(&format!("00-{trace_id}-{client_span}-01")),
        false,
    )
    .await;
    assert_eq!(parts.headers["x-cache"], "MISS");
    let spans = collector.trace(&unhex(trace_id), 4).await;

    let server = server_of(&spans);
    assert_eq!(server.name, "POST chat");
    assert_eq!(
        server.parent_span_id,
        unhex(client_span),
        "continues the client's span"
    );
    assert_eq!(text(server, "http.route"), "chat");
    assert_eq!(text(server, "url.path"), "/api/chat");
    assert_eq!(int(server, "http.response.status_code"), 200);
    assert_eq!(text(server, "hyperion.cache.status"), "MISS");
    assert_eq!(text(server, "hyperion.cache.key").len(), 64);
    assert_eq!(text(server, "gen_ai.request.model"), "m");
    assert_eq!(text(server, "gen_ai.system"), "ollama");
    assert_eq!(text(server, "gen_ai.operation.name"), "chat");
    assert_eq!(int(server, "gen_ai.usage.input_tokens"), 20);
    assert_eq!(int(server, "gen_ai.usage.output_tokens"), 30);
    assert!(attr(server, "hyperion.tokens_saved").is_none());
    assert_eq!(
        text(server, "hyperion.request_id"),
        parts.headers["x-request-id"].to_str().unwrap()
    );

    // Its steps are its children.
    for s in spans.iter().filter(|s| s.span_id != server.span_id) {
        assert_eq!(
            s.parent_span_id, server.span_id,
            "{} under the server span",
            s.name
        );
    }
    let lookup = named(&spans, "cache lookup");
    assert_eq!(lookup.len(), 1);
    assert_eq!(text(lookup[0], "hyperion.cache.result"), "MISS");
    let attempts = named(&spans, "upstream attempt");
    assert_eq!(attempts.len(), 1);
    let attempt = attempts[0];
    assert_eq!(attempt.kind, SpanKind::Client as i32);
    assert_eq!(text(attempt, "server.address"), up.url());
    assert_eq!(int(attempt, "http.request.resend_count"), 0);
    assert_eq!(int(attempt, "http.response.status_code"), 200);
    let stream = named(&spans, "response stream");
    assert_eq!(stream.len(), 1);
    assert_eq!(text(stream[0], "hyperion.outcome"), "complete");
    assert!(stream[0].end_time_unix_nano >= stream[0].start_time_unix_nano);
    assert!(server.end_time_unix_nano >= stream[0].end_time_unix_nano);

    // The upstream got the attempt's context: same trace, the attempt as
    // parent, sampled.
    let sent = up.last().headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(sent, format!("00-{trace_id}-{}-01", hex(&attempt.span_id)));
    // The resource names the service; the headers from the environment
    // reached the collector (it asserts them).
    let services: Vec<String> = collector
        .spans
        .lock()
        .unwrap()
        .iter()
        .map(|(s, _)| s.clone())
        .collect();
    assert!(services.iter().all(|s| s == "hyperion-test"));
}

#[tokio::test]
async fn a_hit_says_what_it_saved_and_has_no_upstream_attempt() {
    let collector = Collector::start().await;
    let up = backend().await;
    let proxy = proxy(&collector, &up, "").await;
    assert_eq!(chat(&proxy, None, false).await.headers["x-cache"], "MISS");
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let mut hit = false;
    for i in 0..50 {
        let tp = format!("00-{trace_id}-{:016x}-01", i + 1);
        if chat(&proxy, Some(&tp), false).await.headers["x-cache"] == "HIT" {
            hit = true;
            break;
        }
    }
    assert!(hit);
    // Only the hit's trace: the misses before it (if any) share the
    // trace id but end with MISS.
    let spans = collector.trace(&unhex(trace_id), 3).await;
    let servers: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Server as i32 && text(s, "hyperion.cache.status") == "HIT")
        .collect();
    assert_eq!(servers.len(), 1);
    let server = servers[0];
    let mine: Vec<Span> = spans
        .iter()
        .filter(|s| s.span_id == server.span_id || s.parent_span_id == server.span_id)
        .cloned()
        .collect();
    assert_eq!(int(server, "hyperion.tokens_saved"), 50);
    assert!(
        matches!(attr(server, "hyperion.upstream_seconds_saved"), Some(Any::DoubleValue(s)) if s >= 0.0)
    );
    assert_eq!(int(server, "gen_ai.usage.input_tokens"), 20);
    assert_eq!(named(&mine, "cache lookup").len(), 1);
    assert_eq!(
        text(named(&mine, "cache lookup")[0], "hyperion.cache.result"),
        "HIT"
    );
    assert!(named(&mine, "upstream attempt").is_empty());
    assert_eq!(named(&mine, "response stream").len(), 1);
}

#[tokio::test]
async fn a_coalesced_follower_waits_in_its_own_span_and_sends_nothing_upstream() {
    let collector = Collector::start().await;
    let up = backend().await;
    let proxy = proxy(&collector, &up, "").await;
    let leader_tp = "00-11111111111111111111111111111111-1111111111111111-01";
    let follower_tp = "00-22222222222222222222222222222222-2222222222222222-01";
    let leader = chat(&proxy, Some(leader_tp), true);
    let follower = async {
        // After the leader has started.
        tokio::time::sleep(Duration::from_millis(100)).await;
        chat(&proxy, Some(follower_tp), true).await
    };
    let (l, f) = tokio::join!(leader, follower);
    assert_eq!(l.status, 200);
    assert_eq!(f.status, 200);
    assert_eq!(up.count(), 1, "one upstream request for both");

    let leader = collector
        .trace(&unhex("11111111111111111111111111111111"), 4)
        .await;
    assert_eq!(named(&leader, "upstream attempt").len(), 1);
    assert!(named(&leader, "coalescing wait").is_empty());

    let follower = collector
        .trace(&unhex("22222222222222222222222222222222"), 4)
        .await;
    let server = server_of(&follower);
    let wait = named(&follower, "coalescing wait");
    assert_eq!(wait.len(), 1, "{follower:#?}");
    assert_eq!(wait[0].parent_span_id, server.span_id);
    assert_eq!(
        text(named(&follower, "cache lookup")[0], "hyperion.cache.result"),
        "follow"
    );
    assert!(named(&follower, "upstream attempt").is_empty());
    // The wait lasted as long as the leader's upstream took, about.
    let waited = wait[0].end_time_unix_nano - wait[0].start_time_unix_nano;
    assert!(waited >= 100_000_000, "{waited} ns");
    assert_eq!(int(server, "hyperion.tokens_saved"), 50);
}

#[tokio::test]
async fn a_retried_request_has_one_span_per_attempt() {
    let collector = Collector::start().await;
    let up = backend().await;
    let dead = refused_addr().await;
    std::env::set_var("HYPERION_TEST_OTLP_HEADERS", "x-collector-token=abc123");
    let proxy = TestProxy::start(&format!(
        r#"[tracing]
otlp_endpoint = "{}"
export_interval = "50ms"
headers_env = "HYPERION_TEST_OTLP_HEADERS"

[upstreams.pair]
servers = [{{ url = "http://{dead}" }}, {{ url = "{}" }}]
retries = 1
balance = "round_robin"

[[route]]
name = "all"
upstream = "pair"
"#,
        collector.endpoint(),
        up.url()
    ))
    .await;
    // Round robin: one of the first two requests goes to the dead server
    // first, and is retried on the other.
    let mut retried = None;
    for i in 0..4u32 {
        let trace_id = format!("{:032x}", 0xabc0 + i);
        let (parts, _) = send(
            Request::get(proxy.url("/x"))
                .header("traceparent", format!("00-{trace_id}-00000000000000a1-01"))
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(parts.status, 200);
        let spans = collector.trace(&unhex(&trace_id), 3).await;
        if named(&spans, "upstream attempt").len() == 2 {
            retried = Some(spans);
            break;
        }
    }
    let spans = retried.expect("a request was retried");
    let server = server_of(&spans);
    let mut attempts = named(&spans, "upstream attempt");
    attempts.sort_by_key(|s| int(s, "http.request.resend_count"));
    assert_eq!(int(attempts[0], "http.request.resend_count"), 0);
    assert_eq!(
        text(attempts[0], "server.address"),
        format!("http://{dead}")
    );
    assert_eq!(text(attempts[0], "error.type"), "upstream_unavailable");
    assert_eq!(attempts[0].status.as_ref().unwrap().code, 2, "error status");
    assert_eq!(int(attempts[1], "http.request.resend_count"), 1);
    assert_eq!(text(attempts[1], "server.address"), up.url());
    assert_eq!(int(attempts[1], "http.response.status_code"), 200);
    for a in &attempts {
        assert_eq!(a.parent_span_id, server.span_id);
    }
    assert!(attempts[1].start_time_unix_nano >= attempts[0].end_time_unix_nano);
    // The upstream saw the second attempt as its parent.
    let sent = up.last().headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(sent.contains(&hex(&attempts[1].span_id)), "{sent}");
}

#[tokio::test]
async fn sampling_follows_the_ratio_and_the_clients_decision() {
    let collector = Collector::start().await;
    let up = backend().await;
    let proxy = proxy(&collector, &up, "sample_ratio = 0.0").await;
    // New traces: none kept, but the upstream still gets a traceparent
    // (not sampled) so its own spans can join if it samples.
    let (parts, _) = get(&proxy.url("/new")).await;
    assert_eq!(parts.status, 200);
    let sent = up.last().headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(sent.ends_with("-00"), "{sent}");
    // A client's sampled trace is followed whatever the ratio.
    let trace_id = "5bf92f3577b34da6a3ce929d0e0e4736";
    send(
        Request::get(proxy.url("/kept"))
            .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
            .body(empty())
            .unwrap(),
    )
    .await;
    collector.trace(&unhex(trace_id), 3).await;
    // A malformed traceparent starts no trace of the client's: with a
    // ratio of 0, nothing kept.
    send(
        Request::get(proxy.url("/bad"))
            .header("traceparent", "00-zz-not-a-trace-01")
            .body(empty())
            .unwrap(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let paths: Vec<String> = collector
        .servers()
        .iter()
        .map(|s| text(s, "url.path"))
        .collect();
    assert_eq!(paths, vec!["/kept".to_owned()]);
}

#[tokio::test]
async fn a_collector_that_hangs_costs_requests_nothing_and_drops_are_counted() {
    // Accepts, reads, never answers.
    let hanging = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = hanging.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = hanging.accept().await {
            keep.lock().unwrap().push(s);
        }
    });
    let up = backend().await;
    let proxy = TestProxy::start(&format!(
        r#"[admin]
[tracing]
otlp_endpoint = "http://{addr}/v1/traces"
export_interval = "50ms"
max_queue = 2
batch_size = 1
export_timeout = "30s"

[upstreams.up]
servers = [{{ url = "{}" }}]

[[route]]
name = "all"
upstream = "up"
"#,
        up.url()
    ))
    .await;
    let started = std::time::Instant::now();
    for _ in 0..20 {
        let (parts, _) = get(&proxy.url("/x")).await;
        assert_eq!(parts.status, 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "requests did not wait for the collector"
    );
    let (_, metrics) = get(&format!("http://{}/metrics", proxy.admin.unwrap())).await;
    let metrics = String::from_utf8_lossy(&metrics).into_owned();
    let dropped: HashMap<&str, f64> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("hyperion_trace_spans_total{outcome=\""))
        .filter_map(|l| {
            let (outcome, n) = l.split_once("\"} ")?;
            Some((outcome, n.parse().ok()?))
        })
        .collect();
    // 20 requests of 3 spans each; one export hangs with one span, two
    // wait: the rest are dropped.
    assert!(dropped["dropped"] >= 50.0, "{metrics}");
    assert_eq!(dropped["exported"], 0.0);
}

#[tokio::test]
async fn bad_tracing_policies_say_what_to_fix() {
    for (table, says) in [
        ("[tracing]\n", "tracing.otlp_endpoint: [tracing] has no collector"),
        (
            "[tracing]\notlp_endpoint = \"127.0.0.1:4318\"\n",
            "is not an http:// or https:// URL",
        ),
        (
            "[tracing]\notlp_endpoint = \"http://127.0.0.1:4318\"\n",
            "/v1/traces",
        ),
        (
            "[tracing]\notlp_endpoint = \"http://c:4318/v1/traces\"\nsample_ratio = 1.5\n",
            "tracing.sample_ratio: 1.5 is not between 0 and 1",
        ),
        (
            "[tracing]\notlp_endpoint = \"http://c:4318/v1/traces\"\nheaders_env = \"HYPERION_TEST_UNSET_OTLP\"\n",
            "the environment variable HYPERION_TEST_UNSET_OTLP is not set",
        ),
        (
            "[tracing]\notlp_endpoint = \"http://c:4318/v1/traces\"\nmax_queue = 0\n",
            "tracing.max_queue: 0 is not between 1",
        ),
        (
            "[tracing]\notlp_endpoint = \"http://c:4318/v1/traces\"\nsampel_ratio = 1\n",
            "sampel_ratio",
        ),
    ] {
        let text = format!(
            "{table}\n[upstreams.up]\nservers = [{{ url = \"http://127.0.0.1:1\" }}]\n[[route]]\nname = \"all\"\nupstream = \"up\"\n"
        );
        let err = hyperion::policy::Policy::parse("p.toml", &text)
            .err()
            .unwrap_or_else(|| panic!("accepted: {table}"))
            .to_string();
        assert!(err.contains(says), "{table}: {err}");
        assert!(err.starts_with("p.toml:"), "{err}");
    }
    // Header values never show in the policy's debug output or summary.
    std::env::set_var(
        "HYPERION_TEST_SECRET_OTLP",
        "authorization=Bearer s3cret-value",
    );
    let p = hyperion::policy::Policy::parse(
        "p.toml",
        "[tracing]\notlp_endpoint = \"http://c:4318/v1/traces\"\nheaders_env = \"HYPERION_TEST_SECRET_OTLP\"\n[upstreams.up]\nservers = [{ url = \"http://127.0.0.1:1\" }]\n[[route]]\nname = \"all\"\nupstream = \"up\"\n",
    )
    .unwrap();
    assert!(!format!("{p:?}").contains("s3cret"));
    assert!(!p.to_string().contains("s3cret"));
    assert!(p
        .to_string()
        .contains("headers from env HYPERION_TEST_SECRET_OTLP"));
}
