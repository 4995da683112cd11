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
