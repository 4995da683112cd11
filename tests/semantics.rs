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
    tokio::time::timeout(PATIENCE, async {
        loop {
            let got = call(url, Method::GET, &[]).await;
            if got.0.headers["x-cache"] == "HIT" {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("a hit in time")
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
    format!(
        r#"
[server]
listen = ["127.0.0.1:0"]

[upstreams.up]
servers = [{{ url = "{upstream}" }}]

[[route]]
name = "r"
upstream = "up"

[route.cache]
{cache}

[route.headers]
response_set = {{ "Cache-Control" = "public, max-age=300", "X-Edge" = "hyperion" }}
response_remove = ["Server"]
request_set = {{ "X-Served-By" = "hyperion" }}
request_remove = ["Cookie"]
"#
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
