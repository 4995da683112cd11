//! Never the wrong answer (issue 28): one client's cached answer never
//! reaches another who sent other credentials, a content coding the client
//! cannot read is never served from the cache, a 304 cannot plant headers,
//! and failures are not kept as answers. Real upstreams, the real proxy.

mod support;

use http::Request;
use serde_json::Value;
use support::*;

const ADMIN_TOKEN: &str = "isolation-test-admin-token-0123";

/// `[[route]] r` caching with `cache`, an admin API with a token, and
/// anything else in `extra` (top-level tables).
fn policy(upstream: &str, cache: &str, extra: &str) -> (TempFile, TempFile) {
    let token = TempFile::new("admin.token", &format!("{ADMIN_TOKEN}\n"));
    let text = format!(
        r#"
[admin]
token_file = "{token}"

{extra}

[upstreams.up]
servers = [{{ url = "{upstream}" }}]

[[route]]
name = "r"
upstream = "up"

[route.cache]
{cache}
"#,
        token = token.display()
    );
    (TempFile::new("policy.toml", &text), token)
}

async fn admin_get(proxy: &TestProxy, path: &str, headers: &[(&str, &str)]) -> Value {
    let mut req = Request::get(format!("http://{}{path}", proxy.admin.unwrap()))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"));
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let (parts, body) = send(req.body(empty()).unwrap()).await;
    assert_eq!(parts.status, 200, "{}", String::from_utf8_lossy(&body));
    json(&body)
}

async fn get_with(url: &str, headers: &[(&str, &str)]) -> (http::response::Parts, bytes::Bytes) {
    let mut req = Request::get(url);
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    send(req.body(empty()).unwrap()).await
}

/// A FastAPI-style backend that authenticates by whatever the request
/// carries and answers with the caller's own data, cacheable, without
/// `Vary` (the careless case).
async fn per_user_backend() -> Upstream {
    Upstream::start(|req| async move {
        let h = req.headers();
        let who = ["x-api-key", "api-key", "cookie", "authorization"]
            .iter()
            .find_map(|n| h.get(*n).map(|v| format!("{n}={}", v.to_str().unwrap())))
            .unwrap_or_else(|| "anonymous".into());
        let mut resp = response(200, format!("{{\"user\":\"{who}\"}}"));
        resp.headers_mut()
            .insert("cache-control", "public, max-age=300".parse().unwrap());
        resp
    })
    .await
}

#[tokio::test]
async fn every_credential_partitions_the_default_scope() {
    let up = per_user_backend().await;
    let (file, _token) = policy(&up.url(), "mode = \"force\"\nttl = \"5m\"", "");
    let proxy = TestProxy::start_file(&file.0).await;
    let url = proxy.url("/me");
    let users: [&[(&str, &str)]; 6] = [
        &[("x-api-key", "key-A")],
        &[("x-api-key", "key-B")],
        &[("api-key", "key-A")],
        &[("cookie", "session=A")],
        &[("cookie", "session=B")],
        &[],
    ];
    for (i, headers) in users.iter().enumerate() {
        let (parts, body) = get_with(&url, headers).await;
        assert_eq!(parts.headers["x-cache"], "MISS", "user {i} {headers:?}");
        let expected = headers
            .first()
            .map_or("anonymous".to_owned(), |(n, v)| format!("{n}={v}"));
        assert_eq!(json(&body)["user"], expected.as_str());
    }
    // Each user's second request is their own hit.
    for (i, headers) in users.iter().enumerate() {
        let (parts, body) = get_with(&url, headers).await;
        assert_eq!(parts.headers["x-cache"], "HIT", "user {i} {headers:?}");
        let expected = headers
            .first()
            .map_or("anonymous".to_owned(), |(n, v)| format!("{n}={v}"));
        assert_eq!(json(&body)["user"], expected.as_str(), "user {i}");
    }
    assert_eq!(up.count(), users.len(), "one upstream request per user");

    // explain shows which credentials went into the key, as digests only.
    let explain_url = format!(
        "/admin/cache/explain?url=http://127.0.0.1:{}/me",
        proxy.addr.port()
    );
    let explained = admin_get(&proxy, &explain_url, &[("x-api-key", "key-A")]).await;
    let scope = explained["parts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["part"] == "scope")
        .unwrap()["value"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(scope.starts_with("x-api-key: blake3 "), "{scope}");
    assert!(!explained.to_string().contains("key-A"), "{explained}");
    assert_eq!(explained["stored"]["status"], 200, "{explained}");
    let anonymous = admin_get(&proxy, &explain_url, &[]).await;
    assert_ne!(anonymous["key"], explained["key"]);
}

#[tokio::test]
async fn shared_scope_shares_and_says_so() {
    let up = per_user_backend().await;
    let (file, _token) = policy(
        &up.url(),
        "mode = \"force\"\nttl = \"5m\"\nscope = \"shared\"",
        "",
    );
    let proxy = TestProxy::start_file(&file.0).await;
    let url = proxy.url("/public");
    let (a, _) = get_with(&url, &[("x-api-key", "key-A")]).await;
    let (b, _) = get_with(&url, &[("x-api-key", "key-B")]).await;
    assert_eq!(a.headers["x-cache"], "MISS");
    assert_eq!(b.headers["x-cache"], "HIT");
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_hyperion"))
        .args(["check", "-c"])
        .arg(&file.0)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(
        out.contains("scope shared (no credential is keyed"),
        "{out}"
    );
}

#[tokio::test]
async fn listed_credential_headers_partition_too() {
    let up = per_user_backend().await;
    let (file, _token) = policy(
        &up.url(),
        "mode = \"force\"\nttl = \"5m\"",
        "[cache]\ncredential_headers = [\"X-Tenant-Token\"]",
    );
    let proxy = TestProxy::start_file(&file.0).await;
    let url = proxy.url("/t");
    let (a, _) = get_with(&url, &[("x-tenant-token", "t1")]).await;
    let (b, _) = get_with(&url, &[("x-tenant-token", "t2")]).await;
    let (a2, _) = get_with(&url, &[("x-tenant-token", "t1")]).await;
    assert_eq!(a.headers["x-cache"], "MISS");
    assert_eq!(b.headers["x-cache"], "MISS");
    assert_eq!(a2.headers["x-cache"], "HIT");
}

/// Gzips when the client accepts it, without saying `Vary`.
async fn careless_gzip_backend() -> Upstream {
    Upstream::start(|req| async move {
        let gzip = req
            .headers()
            .get("accept-encoding")
            .is_some_and(|v| v.to_str().unwrap().contains("gzip"));
        let text = "hello from the model ".repeat(20);
        if gzip {
            use std::io::Write;
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(text.as_bytes()).unwrap();
            let mut resp = response(200, enc.finish().unwrap());
            resp.headers_mut()
                .insert("content-encoding", "gzip".parse().unwrap());
            resp
        } else {
            response(200, text)
        }
    })
    .await
}

#[tokio::test]
async fn accept_encoding_going_upstream_is_keyed_in_one_spelling() {
    let up = careless_gzip_backend().await;
    let (file, _token) = policy(&up.url(), "mode = \"force\"\nttl = \"5m\"", "");
    let proxy = TestProxy::start_file(&file.0).await;
    let url = proxy.url("/text");
    let (gz, _) = get_with(&url, &[("accept-encoding", "gzip, deflate, br")]).await;
    assert_eq!(gz.headers["x-cache"], "MISS");
    assert_eq!(gz.headers["content-encoding"], "gzip");
    assert_eq!(
        up.last().headers["accept-encoding"],
        "br, deflate, gzip",
        "the upstream gets the canonical form, which is what is keyed"
    );
    // A client that cannot read gzip never gets the gzip entry.
    let (plain, body) = get_with(&url, &[]).await;
    assert_eq!(plain.headers["x-cache"], "MISS");
    assert!(plain.headers.get("content-encoding").is_none());
    assert!(body.starts_with(b"hello from the model"));
    assert!(!up.last().headers.contains_key("accept-encoding"));
    // Another spelling of the same set is the same entry.
    let (again, _) = get_with(&url, &[("accept-encoding", "GZIP;q=0.8, br, deflate")]).await;
    assert_eq!(again.headers["x-cache"], "HIT");
    assert_eq!(again.headers["content-encoding"], "gzip");
    let (identity, _) = get_with(&url, &[("accept-encoding", "identity")]).await;
    assert_eq!(identity.headers["x-cache"], "HIT");
    assert!(identity.headers.get("content-encoding").is_none());
    assert_eq!(up.count(), 2);
}

/// Answers `/doc` with an ETag'd 200 the first time, then with 304s
/// carrying `extra_304` headers; counts requests.
async fn revalidating_backend(extra_304: &'static [(&'static str, &'static str)]) -> Upstream {
    Upstream::start(move |req| async move {
        if req.headers().contains_key("if-none-match") {
            let mut resp = response(304, "");
            for (n, v) in extra_304 {
                resp.headers_mut().append(*n, v.parse().unwrap());
            }
            return resp;
        }
        let mut resp = response(200, "the document");
        let h = resp.headers_mut();
        h.insert("etag", "\"v1\"".parse().unwrap());
        h.insert("cache-control", "max-age=0".parse().unwrap());
        resp
    })
    .await
}

#[tokio::test]
async fn a_304_never_plants_a_cookie_in_the_stored_entry() {
    let up = revalidating_backend(&[("set-cookie", "session=attacker; Path=/")]).await;
    let (file, _token) = policy(&up.url(), "mode = \"origin\"", "");
    let proxy = TestProxy::start_file(&file.0).await;
    let url = proxy.url("/doc");
    let (first, _) = get(&url).await;
    assert_eq!(first.headers["x-cache"], "MISS");
    for _ in 0..2 {
        let (again, body) = get(&url).await;
        assert_eq!(again.headers["x-cache"], "REVALIDATED");
        assert_eq!(&body[..], b"the document");
        assert!(
            again.headers.get("set-cookie").is_none(),
            "{:?}",
            again.headers
        );
    }
    assert!(up.seen()[1].headers.contains_key("if-none-match"));
}

#[tokio::test]
async fn a_304_that_makes_the_entry_unstorable_ends_it() {
    let up = revalidating_backend(&[("cache-control", "private")]).await;
    let (file, _token) = policy(&up.url(), "mode = \"origin\"", "");
    let proxy = TestProxy::start_file(&file.0).await;
    let url = proxy.url("/doc");
    assert_eq!(get(&url).await.0.headers["x-cache"], "MISS");
    // The 304 confirms the body for this client, but says private now.
    let (revalidated, body) = get(&url).await;
    assert_eq!(revalidated.headers["x-cache"], "REVALIDATED");
    assert_eq!(&body[..], b"the document");
    // So nothing is stored: the next request is a plain miss.
    let (after, _) = get(&url).await;
    assert_eq!(after.headers["x-cache"], "MISS");
    assert!(!up.last().headers.contains_key("if-none-match"));
}

/// Ollama answering a request for a model it does not have (yet).
async fn missing_model_backend() -> Upstream {
    Upstream::start(|req| async move {
        match req.uri().path() {
            "/api/generate" => {
                let mut resp = response(
                    404,
                    r#"{"error":"model \"nope\" not found, try pulling it first"}"#,
                );
                resp.headers_mut()
                    .insert("content-type", "application/json".parse().unwrap());
                resp
            }
            "/moved" => {
                let mut resp = response(301, "");
                resp.headers_mut()
                    .insert("location", "/elsewhere".parse().unwrap());
                resp
            }
            _ => response(503, r#"{"error":"loading"}"#),
        }
    })
    .await
}

#[tokio::test]
async fn failures_are_kept_only_for_negative_ttl_and_5xx_never() {
    let up = missing_model_backend().await;
    let (file, _token) = policy(&up.url(), "mode = \"force\"\nttl = \"30m\"", "");
    let proxy = TestProxy::start_file(&file.0).await;
    let generate = proxy.url("/api/generate");
    let (first, _) = get(&generate).await;
    assert_eq!(first.status, 404);
    assert_eq!(first.headers["x-cache"], "MISS");
    let (second, body) = get(&generate).await;
    assert_eq!(second.status, 404);
    assert_eq!(
        second.headers["x-cache"], "HIT",
        "a burst for a missing model reaches it once"
    );
    assert!(json(&body)["error"].as_str().unwrap().contains("not found"));
    let explained = admin_get(
        &proxy,
        &format!(
            "/admin/cache/explain?url=http://127.0.0.1:{}/api/generate",
            proxy.addr.port()
        ),
        &[],
    )
    .await;
    assert_eq!(explained["stored"]["status"], 404);
    let fresh_for = explained["stored"]["fresh_for_seconds"].as_u64().unwrap();
    assert!(
        fresh_for <= 10,
        "kept for negative_ttl, not the 30m ttl: {explained}"
    );

    // 5xx and redirects are not answers force mode keeps.
    for path in ["/loading", "/moved"] {
        for _ in 0..2 {
            let (parts, _) = get(&proxy.url(path)).await;
            assert_eq!(parts.headers["x-cache"], "MISS", "{path}");
        }
    }
    assert_eq!(up.count(), 5);
}

#[tokio::test]
async fn negative_ttl_zero_keeps_no_failure() {
    let up = missing_model_backend().await;
    let (file, _token) = policy(
        &up.url(),
        "mode = \"force\"\nttl = \"30m\"\nnegative_ttl = \"0s\"",
        "",
    );
    let proxy = TestProxy::start_file(&file.0).await;
    for _ in 0..2 {
        let (parts, _) = get(&proxy.url("/api/generate")).await;
        assert_eq!(parts.headers["x-cache"], "MISS");
    }
    assert_eq!(up.count(), 2);
}

/// Streams whose body the test picks by path: good and failed Ollama and
/// OpenAI streams, all with a 200 status and a clean transport end.
async fn streaming_backend() -> Upstream {
    Upstream::start(|req| async move {
        let (ct, body) = match req.uri().path() {
            "/ollama/good" => (
                "application/x-ndjson",
                "{\"response\":\"hi\",\"done\":false}\n{\"response\":\"\",\"done\":true}\n",
            ),
            "/ollama/failed" => (
                "application/x-ndjson",
                "{\"response\":\"hi\",\"done\":false}\n{\"error\":\"model runner has unexpectedly stopped\"}\n",
            ),
            "/ollama/cut" => ("application/x-ndjson", "{\"response\":\"hi\",\"done\":false}\n"),
            "/openai/good" => (
                "text/event-stream",
                "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n",
            ),
            "/openai/failed" => (
                "text/event-stream",
                "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"error\":{\"message\":\"CUDA out of memory\"}}\n\ndata: [DONE]\n\n",
            ),
            _ => (
                "text/event-stream",
                "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n",
            ),
        };
        let mut resp = response(200, body);
        resp.headers_mut().insert("content-type", ct.parse().unwrap());
        resp
    })
    .await
}

#[tokio::test]
async fn only_streams_that_ended_as_good_answers_are_stored() {
    let up = streaming_backend().await;
    let (file, _token) = policy(
        &up.url(),
        "mode = \"force\"\nttl = \"30m\"\nstream = \"record\"",
        "",
    );
    let proxy = TestProxy::start_file(&file.0).await;
    for (path, stored) in [
        ("/ollama/good", true),
        ("/ollama/failed", false),
        ("/ollama/cut", false),
        ("/openai/good", true),
        ("/openai/failed", false),
        ("/openai/cut", false),
    ] {
        let (first, _) = get(&proxy.url(path)).await;
        assert_eq!(first.status, 200);
        assert_eq!(first.headers["x-cache"], "MISS", "{path}");
        // The recording is stored as the body ends: wait for it to land.
        let mut second = None;
        for _ in 0..50 {
            let (parts, _) = get(&proxy.url(path)).await;
            if !stored || parts.headers["x-cache"] == "HIT" {
                second = Some(parts);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let expected = if stored { "HIT" } else { "MISS" };
        assert_eq!(second.unwrap().headers["x-cache"], expected, "{path}");
    }
}

#[tokio::test]
async fn content_length_beside_transfer_encoding_is_dropped_and_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                // Content-Length says 100; the chunked body is 5 bytes.
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
                    .await;
                let _ = s.read(&mut buf).await;
            });
        }
    });
    let (file, _token) = policy(
        &format!("http://{addr}"),
        "mode = \"force\"\nttl = \"1m\"",
        "",
    );
    let proxy = TestProxy::start_file(&file.0).await;
    let (parts, body) = get(&proxy.url("/framed")).await;
    assert_eq!(parts.status, 200);
    assert_eq!(&body[..], b"hello");
    assert_ne!(
        parts
            .headers
            .get("content-length")
            .map(|v| v.to_str().unwrap()),
        Some("100")
    );
    let (hit, body) = get(&proxy.url("/framed")).await;
    assert_eq!(hit.headers["x-cache"], "HIT");
    assert_eq!(
        hit.headers["content-length"], "5",
        "stored by the bytes that came"
    );
    assert_eq!(&body[..], b"hello");
    let (_, metrics) = get(&format!("http://{}/metrics", proxy.admin.unwrap())).await;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("hyperion_upstream_faults_total{fault=\"te_and_content_length\"} 1"),
        "{metrics}"
    );
    server.abort();
}

#[tokio::test]
async fn the_shipped_policy_answers_model_management_with_403() {
    let up = Upstream::echo().await;
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml"))
        .unwrap()
        .replace("http://127.0.0.1:11434", &up.url());
    let proxy = TestProxy::start(&shipped).await;
    for (method, path) in [
        ("POST", "/api/pull"),
        ("POST", "/api/push"),
        ("POST", "/api/create"),
        ("POST", "/api/copy"),
        ("DELETE", "/api/delete"),
        ("POST", "/api/blobs/sha256:0123"),
        ("HEAD", "/api/blobs/sha256:0123"),
        // Other spellings are the same path.
        ("POST", "/api/%70ull"),
        ("POST", "//api/./pull"),
    ] {
        let (parts, body) = send(
            Request::builder()
                .method(method)
                .uri(proxy.url(path))
                .body(full("{\"model\":\"llama3\"}"))
                .unwrap(),
        )
        .await;
        assert_eq!(parts.status, 403, "{method} {path}");
        if method != "HEAD" {
            assert_eq!(json(&body)["error"]["code"], "denied", "{method} {path}");
        }
    }
    assert_eq!(up.count(), 0, "nothing reached Ollama");
    let (tags, _) = get(&proxy.url("/api/tags")).await;
    assert_eq!(tags.status, 200);
    assert_eq!(up.count(), 1);
}

/// Answers with the `cache-control`, `cdn-cache-control` and
/// `hyperion-cache-control` the query names (`?cc=…&cdn=…&own=…`).
async fn targeted_backend() -> Upstream {
    Upstream::start(|req| async move {
        let q = req.uri().query().unwrap_or("").to_owned();
        let mut resp = response(200, "targeted");
        for pair in q.split('&') {
            let Some((k, v)) = pair.split_once('=') else {
                continue;
            };
            let v = v
                .replace("%20", " ")
                .replace("%3D", "=")
                .replace("%22", "\"")
                .replace("%26", "&");
            let name = match k {
                "cc" => "cache-control",
                "cdn" => "cdn-cache-control",
                "own" => "hyperion-cache-control",
                _ => continue,
            };
            resp.headers_mut().append(name, v.parse().unwrap());
        }
        resp
    })
    .await
}

#[tokio::test]
async fn a_targeted_cache_control_field_overrides_cache_control() {
    let up = targeted_backend().await;
    let (file, _token) = policy(
        &up.url(),
        "mode = \"origin\"\nscope = \"shared\"",
        "[cache]\ntargeted_cache_control = [\"hyperion-cache-control\", \"cdn-cache-control\"]",
    );
    let proxy = TestProxy::start_file(&file.0).await;
    for (query, cached) in [
        // CDN-Cache-Control wins over Cache-Control, both ways.
        ("cc=no-store&cdn=max-age%3D60", true),
        ("cc=max-age%3D600&cdn=private", false),
        ("cc=max-age%3D600&cdn=no-store", false),
        // Not a valid dictionary: ignored, Cache-Control decides.
        ("cc=no-store&cdn=max-age%3D60,%20%26%26", false),
        // Valid, but max-age of the wrong type: that directive is ignored,
        // and the field (no freshness left) still overrides Cache-Control.
        ("cc=max-age%3D60&cdn=max-age%3D%2260%22", false),
        // The first listed field present wins.
        ("cc=max-age%3D600&cdn=max-age%3D600&own=no-store", false),
        ("cc=no-store&cdn=no-store&own=max-age%3D60", true),
    ] {
        let url = proxy.url(&format!("/t?{query}"));
        let (first, _) = get(&url).await;
        assert_eq!(first.headers["x-cache"], "MISS", "{query}");
        let (second, _) = get(&url).await;
        let expected = if cached { "HIT" } else { "MISS" };
        assert_eq!(second.headers["x-cache"], expected, "{query}");
    }
}
