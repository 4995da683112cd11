//! HTTP semantics on the way out, seen from outside: validators Hyperion
//! adds to stored answers, conditional requests answered from the cache,
//! and conditionals passed through on routes that do not cache.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use support::*;

async fn call(
    url: &str,
    method: Method,
    headers: &[(&str, &str)],
) -> (http::response::Parts, Bytes) {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(req.body(full("")).unwrap()).await
}

async fn until_hit(url: &str) -> (http::response::Parts, Bytes) {
    hit_with(url, &[]).await
}

const LM: &str = "Sun, 06 Nov 1994 08:49:37 GMT";

/// Answers like Ollama (no validators) except on `/tagged` (an ETag) and
/// `/dated` (a Last-Modified); remembers the last If-None-Match it saw.
async fn upstream(seen: Arc<Mutex<Option<String>>>) -> Upstream {
    Upstream::start(move |req| {
        let seen = seen.clone();
        async move {
            *seen.lock().unwrap() = req
                .headers()
                .get("if-none-match")
                .map(|v| v.to_str().unwrap().to_owned());
            let mut resp = Response::builder()
                .header("content-type", "application/json")
                .header("cache-control", "max-age=60");
            match req.uri().path() {
                "/tagged" => resp = resp.header("etag", "\"up-1\""),
                "/dated" => resp = resp.header("last-modified", LM),
                _ => {}
            }
            resp.body(full(r#"{"response":"blue"}"#)).unwrap()
        }
    })
    .await
}

#[tokio::test]
async fn stored_answers_get_a_strong_etag_and_conditionals_are_answered_from_the_cache() {
    let seen = Arc::new(Mutex::new(None));
    let up = upstream(seen.clone()).await;
    let proxy = TestProxy::start(&cached_policy(
        &up.url(),
        "mode = \"force\"\nscope = \"shared\"",
    ))
    .await;
    let url = proxy.url("/api/generate");
    let (p, _) = until_hit(&url).await;
    let etag = p.headers["etag"].to_str().unwrap().to_owned();
    assert!(
        etag.starts_with('"') && etag.len() == 34,
        "a strong digest tag: {etag}"
    );
    let fetched = up.count();

    let weak = format!("W/{etag}");
    let listed = format!("\"other\", {etag}");
    for inm in [etag.as_str(), &weak, &listed, "*"] {
        for method in [Method::GET, Method::HEAD] {
            let (p, body) = call(&url, method.clone(), &[("if-none-match", inm)]).await;
            assert_eq!(p.status, 304, "{method} {inm}");
            assert!(body.is_empty());
            assert_eq!(p.headers["etag"], etag.as_str());
            assert_eq!(p.headers["x-cache"], "HIT");
            assert!(p.headers.contains_key("age"));
            assert!(p.headers.contains_key("cache-control"));
            assert!(!p.headers.contains_key("transfer-encoding"));
            assert!(
                !p.headers.contains_key("content-type"),
                "no representation metadata"
            );
        }
    }
    // No match, or a header that is not an entity-tag list: the whole answer.
    for inm in ["\"other\"", "garbage", "\"unterminated", "W/"] {
        let (p, body) = call(&url, Method::GET, &[("if-none-match", inm)]).await;
        assert_eq!(p.status, 200, "{inm}");
        assert_eq!(body, r#"{"response":"blue"}"#);
    }
    // If-Match is compared strongly; failing it is a 412 with a JSON error.
    let (p, _) = call(&url, Method::GET, &[("if-match", &etag)]).await;
    assert_eq!(p.status, 200);
    let (p, body) = call(&url, Method::GET, &[("if-match", "\"other\"")]).await;
    assert_eq!(p.status, 412);
    assert_eq!(json(&body)["error"]["code"], "precondition_failed");
    assert_eq!(up.count(), fetched, "every answer came from the cache");
}

#[tokio::test]
async fn upstream_validators_are_kept_and_never_replaced() {
    let seen = Arc::new(Mutex::new(None));
    let up = upstream(seen.clone()).await;
    let proxy = TestProxy::start(&cached_policy(
        &up.url(),
        "mode = \"force\"\nscope = \"shared\"",
    ))
    .await;
    let (p, _) = until_hit(&proxy.url("/tagged")).await;
    assert_eq!(p.headers["etag"], "\"up-1\"");
    let (p, _) = call(
        &proxy.url("/tagged"),
        Method::GET,
        &[("if-none-match", "\"up-1\"")],
    )
    .await;
    assert_eq!(p.status, 304);

    let (p, _) = until_hit(&proxy.url("/dated")).await;
    assert_eq!(p.headers["last-modified"], LM);
    let later = "Mon, 07 Nov 1994 08:49:37 GMT";
    let earlier = "Sat, 05 Nov 1994 08:49:37 GMT";
    let (p, _) = call(
        &proxy.url("/dated"),
        Method::GET,
        &[("if-modified-since", later)],
    )
    .await;
    assert_eq!(p.status, 304);
    assert_eq!(p.headers["last-modified"], LM);
    let (p, _) = call(
        &proxy.url("/dated"),
        Method::GET,
        &[("if-modified-since", earlier)],
    )
    .await;
    assert_eq!(p.status, 200);
    let (p, _) = call(
        &proxy.url("/dated"),
        Method::GET,
        &[("if-modified-since", "not a date")],
    )
    .await;
    assert_eq!(p.status, 200);
}

#[tokio::test]
async fn conditionals_pass_through_untouched_where_nothing_is_cached() {
    let seen = Arc::new(Mutex::new(None));
    let up = upstream(seen.clone()).await;
    let proxy = TestProxy::start(&cached_policy(&up.url(), "mode = \"off\"")).await;
    let (p, _) = call(
        &proxy.url("/a"),
        Method::GET,
        &[("if-none-match", "\"x\", W/\"y\"")],
    )
    .await;
    assert_eq!(p.status, 200);
    assert!(
        !p.headers.contains_key("etag"),
        "no validators invented where nothing is stored"
    );
    assert_eq!(seen.lock().unwrap().as_deref(), Some("\"x\", W/\"y\""));
}

fn rewrite_policy(upstream: &str, cache: &str) -> String {
    cached_policy(
        upstream,
        &format!(
            r#"{cache}

[route.headers]
response_set = {{ "Cache-Control" = "public, max-age=300", "X-Edge" = "hyperion" }}
response_remove = ["Server"]
request_set = {{ "X-Served-By" = "hyperion" }}
request_remove = ["Cookie"]
"#
        ),
    )
}

#[tokio::test]
async fn route_headers_rewrite_both_ways_without_changing_what_is_stored() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let up = Upstream::start(move |req| {
        let log = log.clone();
        async move {
            let h = req.headers();
            log.lock().unwrap().push((
                h.get("x-served-by").map(|v| v.to_str().unwrap().to_owned()),
                h.contains_key("cookie"),
            ));
            let cc = if req.uri().path() == "/secret" {
                "no-store"
            } else {
                "max-age=60"
            };
            Response::builder()
                .header("server", "uvicorn")
                .header("cache-control", cc)
                .body(full("answer"))
                .unwrap()
        }
    })
    .await;
    let proxy = TestProxy::start(&rewrite_policy(
        &up.url(),
        "mode = \"origin\"\nscope = \"shared\"",
    ))
    .await;

    let (p, _) = call(&proxy.url("/page"), Method::GET, &[("cookie", "session=1")]).await;
    assert_eq!(p.headers["cache-control"], "public, max-age=300");
    assert_eq!(p.headers["x-edge"], "hyperion");
    assert!(!p.headers.contains_key("server"));
    assert_eq!(
        seen.lock().unwrap()[0],
        (Some("hyperion".to_owned()), false)
    );
    // Hits are rewritten the same way; the entry keeps the upstream's max-age.
    let (p, _) = until_hit(&proxy.url("/page")).await;
    assert_eq!(p.headers["cache-control"], "public, max-age=300");
    assert!(!p.headers.contains_key("server"));

    // The upstream said no-store: clients are told otherwise, the cache
    // still stores nothing.
    for _ in 0..3 {
        let (p, _) = call(&proxy.url("/secret"), Method::GET, &[]).await;
        assert_eq!(p.headers["cache-control"], "public, max-age=300");
        assert_eq!(p.headers["x-cache"], "MISS");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Hyperion's own errors are not dressed up as cacheable answers.
    let (p, _) = call(
        &proxy.url("/page"),
        Method::GET,
        &[("if-match", "\"nope\"")],
    )
    .await;
    assert_eq!(p.status, 412);
    assert_ne!(p.headers["cache-control"], "public, max-age=300");
}

// === compression ===

fn compressed_policy(upstream: &str) -> String {
    // A top-level table after the route's: the route itself caches nothing.
    cached_policy(
        upstream,
        r#"mode = "off"

[compression]
algorithms = ["br", "gzip"]
min_size = "1KB"
"#,
    )
}

fn decode(coding: &str, bytes: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    match coding {
        "gzip" => flate2::read::GzDecoder::new(bytes).read_to_end(&mut out),
        "br" => brotli::Decompressor::new(bytes, 4096).read_to_end(&mut out),
        other => panic!("unexpected coding {other}"),
    }
    .expect("decodes");
    out
}

fn answer_json() -> String {
    let mut s = String::from("[");
    for i in 0..100 {
        s.push_str(&format!(
            r#"{{"model":"llama3.2","response":"token {i}","done":false}},"#
        ));
    }
    s.push_str("{}]");
    s
}

#[tokio::test]
async fn answers_are_compressed_as_the_client_asks_and_left_alone_otherwise() {
    let asked = Arc::new(Mutex::new(Vec::new()));
    let log = asked.clone();
    let up = Upstream::start(move |req| {
        log.lock().unwrap().push(
            req.headers()
                .get("accept-encoding")
                .map(|v| v.to_str().unwrap().to_owned()),
        );
        async move {
            let (ct, extra): (&str, Option<(&str, &str)>) = match req.uri().path() {
                "/png" => ("image/png", None),
                "/small" => ("application/json", None),
                "/already" => ("application/json", Some(("content-encoding", "gzip"))),
                "/no-transform" => ("application/json", Some(("cache-control", "no-transform"))),
                _ => ("application/json; charset=utf-8", Some(("etag", "\"e1\""))),
            };
            let body: Bytes = match req.uri().path() {
                "/small" => "{}".into(),
                "/already" => gzip_bytes(answer_json().as_bytes()).into(),
                _ => answer_json().into(),
            };
            let mut resp = Response::builder().header("content-type", ct);
            if let Some((k, v)) = extra {
                resp = resp.header(k, v);
            }
            resp.body(full(body)).unwrap()
        }
    })
    .await;
    let proxy = TestProxy::start(&compressed_policy(&up.url())).await;
    let url = proxy.url("/api/generate");
    for coding in ["gzip", "br"] {
        let (p, body) = call(&url, Method::GET, &[("accept-encoding", coding)]).await;
        assert_eq!(p.status, 200);
        assert_eq!(p.headers["content-encoding"], coding);
        assert_eq!(p.headers["vary"], "accept-encoding");
        assert_eq!(
            p.headers["etag"], "W/\"e1\"",
            "an encoded body's tag is weak"
        );
        assert!(
            !p.headers.contains_key("content-length")
                || p.headers["content-length"] == body.len().to_string().as_str()
        );
        assert!(
            body.len() < answer_json().len() / 4,
            "{coding}: {} bytes",
            body.len()
        );
        assert_eq!(decode(coding, &body), answer_json().as_bytes());
    }
    // Both accepted: q-values first, then the policy's order.
    let (p, _) = call(&url, Method::GET, &[("accept-encoding", "gzip, br")]).await;
    assert_eq!(p.headers["content-encoding"], "br");
    let (p, _) = call(&url, Method::GET, &[("accept-encoding", "gzip, br;q=0.5")]).await;
    assert_eq!(p.headers["content-encoding"], "gzip");
    // No Accept-Encoding, or nothing offered: identity, still varying.
    for accept in [
        None,
        Some("deflate"),
        Some("gzip;q=0, br;q=0"),
        Some("g@rbage;;q=x"),
    ] {
        let headers: Vec<(&str, &str)> =
            accept.map(|a| ("accept-encoding", a)).into_iter().collect();
        let (p, body) = call(&url, Method::GET, &headers).await;
        assert!(!p.headers.contains_key("content-encoding"), "{accept:?}");
        assert_eq!(p.headers["vary"], "accept-encoding");
        assert_eq!(body, answer_json().as_bytes());
    }
    // Identity refused and nothing else accepted: 406 JSON.
    let (p, body) = call(&url, Method::GET, &[("accept-encoding", "identity;q=0")]).await;
    assert_eq!(p.status, 406);
    assert_eq!(json(&body)["error"]["code"], "not_acceptable");
    // HEAD: the headers a GET gets, no body.
    let (p, body) = call(&url, Method::HEAD, &[("accept-encoding", "gzip")]).await;
    assert_eq!(p.headers["content-encoding"], "gzip");
    assert!(body.is_empty());
    // Not ours to touch: images, tiny bodies, encoded or no-transform answers.
    for path in ["/png", "/small", "/already", "/no-transform"] {
        let (p, _) = call(&proxy.url(path), Method::GET, &[("accept-encoding", "br")]).await;
        assert_ne!(
            p.headers
                .get("content-encoding")
                .map(|v| v.to_str().unwrap()),
            Some("br"),
            "{path}"
        );
    }
    assert!(
        asked
            .lock()
            .unwrap()
            .iter()
            .all(|a| a.as_deref() == Some("identity")),
        "the upstream is asked for identity: {:?}",
        asked.lock().unwrap()
    );
}

#[tokio::test]
async fn a_compressed_stream_decodes_event_by_event_as_the_upstream_sends() {
    use http_body_util::BodyExt;
    let (up, mut streams) = stepped_upstream("application/x-ndjson").await;
    let proxy = TestProxy::start(&compressed_policy(&up.url())).await;
    for coding in ["gzip", "br"] {
        let req = Request::get(proxy.url("/api/generate"))
            .header("accept-encoding", coding)
            .body(full(""))
            .unwrap();
        let resp = client().request(req).await.unwrap();
        assert_eq!(resp.headers()["content-encoding"], coding);
        let writer = streams.recv().await.unwrap();
        let mut body = resp.into_body();
        let mut sent = Vec::new();
        let mut events = String::new();
        for i in 0..3 {
            let event = format!("{{\"response\":\"token {i}\",\"done\":false}}\n");
            writer.send(event.clone()).await;
            events.push_str(&event);
            // This event is readable before the upstream sends the next one.
            let frame = tokio::time::timeout(PATIENCE, body.frame())
                .await
                .expect("a frame per upstream chunk")
                .unwrap()
                .unwrap();
            sent.extend_from_slice(frame.data_ref().unwrap());
            let so_far = partial_decode(coding, &sent);
            assert_eq!(
                String::from_utf8(so_far).unwrap(),
                events,
                "{coding} event {i}"
            );
        }
        drop(writer);
        let rest = body.collect().await.unwrap().to_bytes();
        sent.extend_from_slice(&rest);
        assert_eq!(decode(coding, &sent), events.as_bytes());
    }
}

/// As much of an unfinished compressed stream as can be decoded.
fn partial_decode(coding: &str, bytes: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let mut reader: Box<dyn Read + '_> = match coding {
        "gzip" => Box::new(flate2::read::GzDecoder::new(bytes)),
        _ => Box::new(brotli::Decompressor::new(bytes, 4096)),
    };
    while let Ok(n) = reader.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

fn gzip_bytes(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn brotli_bytes(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = brotli::CompressorWriter::new(Vec::new(), 4096, 5, 22);
    e.write_all(data).unwrap();
    e.into_inner()
}

/// A route that stores for a minute and compresses.
fn stored_compressed_policy(upstream: &str) -> String {
    cached_policy(
        upstream,
        r#"mode = "force"
ttl = "60s"
scope = "shared"
stream = "record"

[compression]
algorithms = ["br", "gzip"]
min_size = "1KB"
"#,
    )
}

/// Asks with `accept` until the answer comes from the store.
async fn hit_with(url: &str, accept: &[(&str, &str)]) -> (http::response::Parts, Bytes) {
    tokio::time::timeout(PATIENCE, async {
        loop {
            let got = call(url, Method::GET, accept).await;
            if got.0.headers["x-cache"] == "HIT" {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("a hit in time")
}

#[tokio::test]
async fn a_stored_answer_is_compressed_once_per_coding_and_kept() {
    let up = Upstream::start(|_req| async {
        Response::builder()
            .header("content-type", "application/json")
            .header("etag", "\"e1\"")
            .body(full(answer_json()))
            .unwrap()
    })
    .await;
    let proxy = TestProxy::start(&stored_compressed_policy(&up.url())).await;
    let url = proxy.url("/api/generate");
    let (p, _) = hit_with(&url, &[]).await;
    assert_eq!(p.headers["vary"], "accept-encoding");
    assert_eq!(p.headers["etag"], "\"e1\"");
    assert_eq!(
        p.headers["content-length"],
        answer_json().len().to_string().as_str()
    );
    for coding in ["gzip", "br"] {
        let before = proxy.cache.report().await.bytes;
        let accept = [("accept-encoding", coding)];
        let (first, body) = hit_with(&url, &accept).await;
        let grown = proxy.cache.report().await.bytes;
        let (again, same) = hit_with(&url, &accept).await;
        assert_eq!(first.headers["content-encoding"], coding);
        assert_eq!(first.headers["vary"], "accept-encoding");
        assert_eq!(first.headers["etag"], "W/\"e1\"");
        assert_eq!(
            first.headers["content-length"],
            body.len().to_string().as_str(),
            "a stored copy has its exact length"
        );
        assert_eq!(decode(coding, &body), answer_json().as_bytes());
        assert_eq!(body, same, "{coding}: the same kept bytes");
        assert_eq!(
            again.headers["content-length"],
            first.headers["content-length"]
        );
        assert!(
            grown >= before + body.len() as u64,
            "{coding}: the copy is weighed by the store ({before} -> {grown})"
        );
        assert_eq!(
            proxy.cache.report().await.bytes,
            grown,
            "{coding}: made once"
        );
        // HEAD: the GET's headers, no body.
        let (head, nothing) = call(&url, Method::HEAD, &accept).await;
        assert_eq!(head.headers["content-encoding"], coding);
        assert_eq!(
            head.headers["content-length"],
            first.headers["content-length"]
        );
        assert!(nothing.is_empty());
        // A client revalidating its compressed copy gets a 304 with the
        // validator it holds.
        let (p, nothing) = call(
            &url,
            Method::GET,
            &[("accept-encoding", coding), ("if-none-match", "W/\"e1\"")],
        )
        .await;
        assert_eq!(p.status, 304);
        assert_eq!(p.headers["etag"], "W/\"e1\"");
        assert_eq!(p.headers["vary"], "accept-encoding");
        assert!(nothing.is_empty());
    }
    // Identity refused, a coding taken: still from the store.
    let (p, body) = call(
        &url,
        Method::GET,
        &[("accept-encoding", "identity;q=0, gzip")],
    )
    .await;
    assert_eq!(p.headers["x-cache"], "HIT");
    assert_eq!(p.headers["content-encoding"], "gzip");
    assert_eq!(decode("gzip", &body), answer_json().as_bytes());
    assert_eq!(up.count(), 1, "one upstream exchange for every coding");
}

#[tokio::test]
async fn a_stored_stream_is_replayed_compressed_chunk_by_chunk() {
    use http_body_util::BodyExt;
    let up = Upstream::start(|_req| async {
        let events: Vec<Bytes> = (0..40)
            .map(|i| {
                Bytes::from(format!(
                    "{{\"model\":\"llama3.2\",\"response\":\"token {i}\",\"done\":{}}}\n",
                    i == 39
                ))
            })
            .collect();
        Response::builder()
            .header("content-type", "application/x-ndjson")
            .body(chunked_body(events, Duration::from_millis(1)))
            .unwrap()
    })
    .await;
    let proxy = TestProxy::start(&stored_compressed_policy(&up.url())).await;
    let url = proxy.url("/api/generate");
    let (_, identity) = hit_with(&url, &[]).await;
    for coding in ["gzip", "br"] {
        hit_with(&url, &[("accept-encoding", coding)]).await;
        let req = Request::get(&url)
            .header("accept-encoding", coding)
            .body(full(""))
            .unwrap();
        let resp = client().request(req).await.unwrap();
        assert_eq!(resp.headers()["x-cache"], "HIT");
        assert_eq!(resp.headers()["content-encoding"], coding);
        let mut body = resp.into_body();
        let (mut frames, mut sent) = (0, Vec::new());
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                frames += 1;
                sent.extend_from_slice(&data);
                // Every replayed chunk ends on a whole event.
                let so_far = partial_decode(coding, &sent);
                assert!(so_far.ends_with(b"\n"), "{coding}: frame {frames}");
            }
        }
        assert!(frames > 1, "{coding}: replayed as a stream");
        assert_eq!(decode(coding, &sent), identity);
    }
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn an_upstream_encoding_the_client_does_not_take_is_decoded() {
    let up = Upstream::start(|req| async move {
        // Ignores the `identity` it is asked for.
        let (coding, body) = match req.uri().path() {
            "/gzip" => ("gzip", gzip_bytes(answer_json().as_bytes())),
            _ => ("br", brotli_bytes(answer_json().as_bytes())),
        };
        Response::builder()
            .header("content-type", "application/json")
            .header("content-encoding", coding)
            .body(full(body))
            .unwrap()
    })
    .await;
    let proxy = TestProxy::start(&stored_compressed_policy(&up.url())).await;
    for (path, coding) in [("/gzip", "gzip"), ("/br", "br")] {
        let url = proxy.url(path);
        // Straight from the upstream, then from the store's decoded copy.
        let (p, body) = call(&url, Method::GET, &[]).await;
        assert_eq!(p.headers["x-cache"], "MISS");
        assert!(!p.headers.contains_key("content-encoding"), "{path}");
        assert_eq!(body, answer_json().as_bytes());
        let (p, body) = hit_with(&url, &[("accept-encoding", "deflate")]).await;
        assert!(!p.headers.contains_key("content-encoding"), "{path}");
        assert_eq!(
            p.headers["content-length"],
            answer_json().len().to_string().as_str()
        );
        assert_eq!(p.headers["vary"], "accept-encoding");
        assert_eq!(body, answer_json().as_bytes());
        // A client that takes the upstream's coding gets its bytes.
        let (p, body) = call(&url, Method::GET, &[("accept-encoding", coding)]).await;
        assert_eq!(p.headers["content-encoding"], coding);
        assert_eq!(decode(coding, &body), answer_json().as_bytes());
    }
}

#[tokio::test]
async fn an_upstream_lying_about_its_coding_is_never_passed_on_as_readable() {
    // Says gzip, sends plain JSON.
    let up = Upstream::start(|_req| async {
        Response::builder()
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(full(answer_json()))
            .unwrap()
    })
    .await;
    let proxy = TestProxy::start(&stored_compressed_policy(&up.url())).await;
    let url = proxy.url("/api/generate");
    // A client taking gzip gets what the upstream sent; it is stored.
    let (p, body) = hit_with(&url, &[("accept-encoding", "gzip")]).await;
    assert_eq!(p.headers["content-encoding"], "gzip");
    assert_eq!(body, answer_json().as_bytes());
    let asked = up.count();
    // One that does not: the stored body does not decode, so a 502 JSON
    // error, and the entry is dropped.
    let (p, body) = call(&url, Method::GET, &[]).await;
    assert_eq!(p.status, 502);
    assert_eq!(json(&body)["error"]["code"], "upstream_bad_encoding");
    // Next time the upstream is asked again; decoding its answer on the way
    // fails, and the client sees a broken body, never garbage as JSON.
    let req = Request::get(&url).body(full("")).unwrap();
    // Cut before or after the head, depending on when hyper writes it.
    if let Ok(resp) = client().request(req).await {
        assert!(!resp.headers().contains_key("content-encoding"));
        let read = http_body_util::BodyExt::collect(resp.into_body()).await;
        assert!(read.is_err(), "the body is cut, not passed on");
    }
    assert_eq!(up.count(), asked + 1);
    // And the proxy keeps serving.
    let (p, _) = call(&url, Method::GET, &[("accept-encoding", "gzip")]).await;
    assert_eq!(p.status, 200);
}

#[tokio::test]
async fn an_answer_past_the_largest_entry_streams_compressed_and_is_not_stored() {
    let up = Upstream::start(|_req| async {
        // ~30 KB in 10 chunks, no Content-Length.
        let chunks: Vec<Bytes> = (0..10)
            .map(|_| Bytes::from(answer_json()[..3000].to_owned()))
            .collect();
        Response::builder()
            .header("content-type", "application/json")
            .body(chunked_body(chunks, Duration::from_millis(1)))
            .unwrap()
    })
    .await;
    let policy = stored_compressed_policy(&up.url())
        .replace("[server]", "[cache]\nmax_entry_size = \"16KB\"\n\n[server]");
    let proxy = TestProxy::start(&policy).await;
    let url = proxy.url("/api/generate");
    for _ in 0..2 {
        let (p, body) = call(&url, Method::GET, &[("accept-encoding", "br")]).await;
        assert_eq!(p.headers["x-cache"], "MISS");
        assert_eq!(p.headers["content-encoding"], "br");
        assert_eq!(decode("br", &body).len(), 30_000);
    }
    assert_eq!(up.count(), 2, "never stored");
    assert_eq!(proxy.cache.report().await.entries, 0);
}

#[tokio::test]
async fn a_route_saying_no_transform_is_obeyed_on_hits_too() {
    let up = Upstream::start(|_req| async {
        Response::builder()
            .header("content-type", "application/json")
            .body(full(answer_json()))
            .unwrap()
    })
    .await;
    let policy = stored_compressed_policy(&up.url()).replace(
        "[compression]",
        "[route.headers]\nresponse_set = { \"Cache-Control\" = \"public, no-transform\" }\n\n[compression]",
    );
    let proxy = TestProxy::start(&policy).await;
    let url = proxy.url("/api/generate");
    let (p, body) = call(&url, Method::GET, &[("accept-encoding", "gzip")]).await;
    assert_eq!(p.headers["x-cache"], "MISS");
    assert!(!p.headers.contains_key("content-encoding"));
    assert_eq!(body, answer_json().as_bytes());
    let (p, body) = hit_with(&url, &[("accept-encoding", "gzip")]).await;
    assert!(!p.headers.contains_key("content-encoding"));
    assert_eq!(body, answer_json().as_bytes());
}

#[tokio::test]
async fn a_stored_answer_too_large_once_decoded_is_decoded_as_it_is_sent() {
    // 4 MB of JSON-ish zeros, gzipped to a few KB: stored as sent, but its
    // decoded copy would be past the largest entry (1 MB).
    let big = [b"[".as_slice(), &vec![b'0'; 4 << 20], b"]"].concat();
    let packed = Bytes::from(gzip_bytes(&big));
    let up = Upstream::start(move |_req| {
        let packed = packed.clone();
        async move {
            Response::builder()
                .header("content-type", "application/json")
                .header("content-encoding", "gzip")
                .body(full(packed))
                .unwrap()
        }
    })
    .await;
    let policy = stored_compressed_policy(&up.url())
        .replace("[server]", "[cache]\nmax_entry_size = \"1MB\"\n\n[server]");
    let proxy = TestProxy::start(&policy).await;
    let url = proxy.url("/api/generate");
    hit_with(&url, &[("accept-encoding", "gzip")]).await;
    for _ in 0..2 {
        let (p, body) = call(&url, Method::GET, &[]).await;
        assert_eq!(p.status, 200);
        assert_eq!(p.headers["x-cache"], "HIT");
        assert!(!p.headers.contains_key("content-encoding"));
        assert!(!p.headers.contains_key("content-length"));
        assert_eq!(body.len(), big.len());
    }
    assert_eq!(up.count(), 1);
}
