//! The response cache seen from outside: X-Cache and Age, what reaches the
//! upstream, per-user isolation, body-keyed AI routes, streams recorded and
//! replayed, RFC 9111 rules in `origin` mode.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use support::*;

/// An upstream that answers with a counter in the body and the given headers.
async fn counting_upstream(headers: &'static [(&'static str, &'static str)]) -> Upstream {
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    Upstream::start(move |req| {
        let n = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        async move {
            let mut resp = Response::builder().status(200);
            for (k, v) in headers {
                resp = resp.header(*k, *v);
            }
            let body = format!("answer {n} to {} {}", req.method(), req.uri());
            resp.body(full(body)).unwrap()
        }
    })
    .await
}

async fn call(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (http::response::Parts, Bytes) {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(req.body(full(body.to_owned())).unwrap()).await
}

#[tokio::test]
async fn force_mode_serves_hits_with_age_and_x_cache() {
    let up = counting_upstream(&[("content-type", "text/plain")]).await;
    let proxy = TestProxy::start(&cached_policy(
        &up.url(),
        r#"mode = "force"
ttl = "1m""#,
    ))
    .await;
    let (p1, b1) = get(&proxy.url("/api/tags")).await;
    assert_eq!(p1.headers["x-cache"], "MISS");
    let (p2, b2) = until_hit(Method::GET, &proxy.url("/api/tags"), &[], "").await;
    assert_eq!(b1, b2);
    assert_eq!(p2.headers["age"], "0");
    assert_eq!(p2.headers["content-length"], b2.len().to_string().as_str());
    assert_eq!(up.count(), 1, "the hit did not reach the upstream");
    let log = proxy
        .log_for(p2.headers["x-request-id"].to_str().unwrap())
        .await;
    assert_eq!(log["cache"], "HIT");

    // HEAD is answered from the GET entry, without a body.
    let (ph, bh) = call(Method::HEAD, &proxy.url("/api/tags"), &[], "").await;
    assert_eq!(ph.headers["x-cache"], "HIT");
    assert!(bh.is_empty());
    assert_eq!(ph.headers["content-length"], b2.len().to_string().as_str());
    assert_eq!(up.count(), 1);
}

/// Repeats a request until the cache answers `want` (storing is
/// asynchronous), at most PATIENCE.
async fn until_status(
    want: &str,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (http::response::Parts, Bytes) {
    tokio::time::timeout(PATIENCE, async {
        loop {
            let got = call(method.clone(), url, headers, body).await;
            if got.0.headers.get("x-cache").is_some_and(|v| v == want) {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{method} {url} never answered X-Cache: {want}"))
}

async fn until_hit(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (http::response::Parts, Bytes) {
    until_status("HIT", method, url, headers, body).await
}

#[tokio::test]
async fn users_never_share_entries_by_default() {
    let up = counting_upstream(&[]).await;
    let proxy = TestProxy::start(&cached_policy(&up.url(), r#"mode = "force""#)).await;
    let a = [("authorization", "Bearer A")];
    let b = [("authorization", "Bearer B")];
    let (_, body_a) = until_hit(Method::GET, &proxy.url("/x"), &a, "").await;
    let (pb, body_b) = call(Method::GET, &proxy.url("/x"), &b, "").await;
    assert_eq!(pb.headers["x-cache"], "MISS");
    assert_ne!(body_a, body_b);
}

#[tokio::test]
async fn json_bodies_key_canonically_and_invalid_json_bypasses() {
    let up = counting_upstream(&[("content-type", "application/json")]).await;
    let proxy = TestProxy::start(&cached_policy(
        &up.url(),
        r#"mode = "force"
body_key = "json"
ignore_fields = ["keep_alive"]"#,
    ))
    .await;
    let url = proxy.url("/api/generate");
    let first = r#"{"model":"m","prompt":"hi","stream":false}"#;
    let (_, b1) = until_hit(Method::POST, &url, &[], first).await;
    let same = r#"{ "stream": false, "prompt": "hi", "model": "m", "keep_alive": "5m" }"#;
    let (p2, b2) = call(Method::POST, &url, &[], same).await;
    assert_eq!(p2.headers["x-cache"], "HIT");
    assert_eq!(b1, b2);
    let (p3, _) = call(
        Method::POST,
        &url,
        &[],
        r#"{"model":"m","prompt":"other","stream":false}"#,
    )
    .await;
    assert_eq!(p3.headers["x-cache"], "MISS");

    let before = up.count();
    let (p4, b4) = call(Method::POST, &url, &[], "{not json").await;
    assert_eq!(p4.status, 200, "the upstream decides what to do with it");
    assert_eq!(p4.headers["x-cache"], "BYPASS");
    assert!(String::from_utf8_lossy(&b4).starts_with("answer"));
    let (p5, _) = call(Method::POST, &url, &[], "{not json").await;
    assert_eq!(p5.headers["x-cache"], "BYPASS");
    assert_eq!(up.count(), before + 2);
}

#[tokio::test]
async fn set_cookie_and_private_responses_are_not_stored_in_force_mode() {
    let up = counting_upstream(&[("set-cookie", "session=1")]).await;
    let proxy = TestProxy::start(&cached_policy(&up.url(), r#"mode = "force""#)).await;
    three_misses(&proxy, "/c").await;
    assert_eq!(up.count(), 3);
}

#[tokio::test]
async fn a_stream_cut_by_the_upstream_is_not_stored() {
    let (up, mut streams) = stepped_upstream("application/x-ndjson").await;
    let proxy = TestProxy::start(&cached_policy(
        &up.url(),
        r#"mode = "force"
stream = "record""#,
    ))
    .await;
    let pending = tokio::spawn(
        client().request(
            Request::get(proxy.url("/api/generate"))
                .body(empty())
                .unwrap(),
        ),
    );
    let writer = streams.recv().await.unwrap();
    writer.send("{\"response\":\"a\",\"done\":false}\n").await;
    // Cut once the client has the head: cut before hyper flushed it, the
    // client would see the connection close instead (as it would from any
    // server).
    let resp = pending.await.unwrap().unwrap();
    writer.fail().await;
    assert!(
        resp.into_body().collect().await.is_err(),
        "the client sees the cut"
    );

    // The next request goes upstream again, and a clean stream is recorded.
    let pending = tokio::spawn(
        client().request(
            Request::get(proxy.url("/api/generate"))
                .body(empty())
                .unwrap(),
        ),
    );
    let writer = tokio::time::timeout(PATIENCE, streams.recv())
        .await
        .unwrap()
        .unwrap();
    writer.send("{\"response\":\"a\",\"done\":false}\n").await;
    writer.send("{\"response\":\"\",\"done\":true}\n").await;
    drop(writer);
    let resp = pending.await.unwrap().unwrap();
    assert_eq!(resp.headers()["x-cache"], "MISS");
    resp.into_body().collect().await.unwrap();

    let (p, body) = until_hit(Method::GET, &proxy.url("/api/generate"), &[], "").await;
    assert_eq!(p.headers["content-type"], "application/x-ndjson");
    assert_eq!(
        body,
        "{\"response\":\"a\",\"done\":false}\n{\"response\":\"\",\"done\":true}\n"
    );
}

#[tokio::test]
async fn origin_mode_follows_cache_control() {
    let up = Upstream::start(|req| async move {
        let cc = match req.uri().path() {
            "/fresh" => "max-age=60",
            "/nostore" => "no-store",
            "/private" => "private, max-age=60",
            _ => "",
        };
        let mut resp = Response::builder().status(200);
        if !cc.is_empty() {
            resp = resp.header("cache-control", cc);
        }
        resp.body(full("body")).unwrap()
    })
    .await;
    let proxy = TestProxy::start(&cached_policy(&up.url(), r#"mode = "origin""#)).await;
    until_hit(Method::GET, &proxy.url("/fresh"), &[], "").await;
    for path in ["/nostore", "/private", "/plain"] {
        for _ in 0..2 {
            let (p, _) = get(&proxy.url(path)).await;
            assert_eq!(p.headers["x-cache"], "MISS", "{path}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // The client's no-store bypasses; its no-cache goes upstream.
    let (p, _) = call(
        Method::GET,
        &proxy.url("/fresh"),
        &[("cache-control", "no-store")],
        "",
    )
    .await;
    assert_eq!(p.headers["x-cache"], "BYPASS");
    let before = up.count();
    let (p, _) = call(
        Method::GET,
        &proxy.url("/fresh"),
        &[("cache-control", "no-cache")],
        "",
    )
    .await;
    assert_ne!(p.headers["x-cache"], "HIT");
    assert_eq!(up.count(), before + 1);
}

#[tokio::test]
async fn an_unsafe_method_invalidates_the_stored_get() {
    let up = counting_upstream(&[("cache-control", "max-age=60")]).await;
    let proxy = TestProxy::start(&cached_policy(&up.url(), r#"mode = "origin""#)).await;
    until_hit(Method::GET, &proxy.url("/doc"), &[], "").await;
    let (p, _) = call(Method::DELETE, &proxy.url("/doc"), &[], "").await;
    assert_eq!(p.headers["x-cache"], "BYPASS");
    // The DELETE invalidated the stored GET.
    until_status("MISS", Method::GET, &proxy.url("/doc"), &[], "").await;
}

#[tokio::test]
async fn a_stale_entry_is_revalidated_with_its_etag() {
    let up = Upstream::start(|req| async move {
        if req
            .headers()
            .get("if-none-match")
            .is_some_and(|v| v == "\"v1\"")
        {
            return Response::builder()
                .status(304)
                .header("etag", "\"v1\"")
                .header("cache-control", "max-age=0")
                .header("x-refreshed", "yes")
                .body(empty())
                .unwrap();
        }
        Response::builder()
            .status(200)
            .header("etag", "\"v1\"")
            .header("cache-control", "max-age=0")
            .body(full("the body"))
            .unwrap()
    })
    .await;
    let proxy = TestProxy::start(&cached_policy(&up.url(), r#"mode = "origin""#)).await;
    let (p, _) = get(&proxy.url("/e")).await;
    assert_eq!(p.headers["x-cache"], "MISS");
    let (p, body) = until_status("REVALIDATED", Method::GET, &proxy.url("/e"), &[], "").await;
    assert_eq!(p.status, 200);
    assert_eq!(body, "the body");
    assert_eq!(
        p.headers["x-refreshed"], "yes",
        "headers updated from the 304"
    );
}

#[tokio::test]
async fn stale_if_error_serves_the_old_answer_when_the_upstream_fails() {
    let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = fail.clone();
    let up = Upstream::start(move |_| {
        let failing = flag.load(std::sync::atomic::Ordering::SeqCst);
        async move {
            if failing {
                response(503, "down")
            } else {
                response(200, "good")
            }
        }
    })
    .await;
    let proxy = TestProxy::start(&cached_policy(
        &up.url(),
        r#"mode = "force"
ttl = "1s"
stale_if_error = "1h""#,
    ))
    .await;
    until_hit(Method::GET, &proxy.url("/s"), &[], "").await;
    fail.store(true, std::sync::atomic::Ordering::SeqCst);
    proxy.advance(Duration::from_millis(1100));
    let (p, body) = get(&proxy.url("/s")).await;
    assert_eq!(p.status, 200);
    assert_eq!(p.headers["x-cache"], "STALE");
    assert_eq!(body, "good");
}

#[tokio::test]
async fn stale_while_revalidate_serves_stale_and_refreshes_once_in_the_background() {
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // The refresh answers only when the test says so: stale answers given
    // before that cannot have waited for it.
    let release = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let gate = release.clone();
    let up = Upstream::start(move |_| {
        let n = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let gate = gate.clone();
        async move {
            if n > 1 {
                let _ = gate.acquire().await.unwrap();
            }
            response(200, format!("version {n}"))
        }
    })
    .await;
    let proxy = TestProxy::start(&cached_policy(
        &up.url(),
        r#"mode = "force"
ttl = "1s"
stale_while_revalidate = "1h""#,
    ))
    .await;
    until_hit(Method::GET, &proxy.url("/s"), &[], "").await;
    proxy.advance(Duration::from_millis(1100));
    for _ in 0..5 {
        let (p, body) = get(&proxy.url("/s")).await;
        assert_eq!(p.headers["x-cache"], "STALE");
        assert_eq!(body, "version 1");
        assert!(p.headers["age"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    }
    tokio::time::timeout(PATIENCE, async {
        while up.count() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the refresh reached the upstream");
    release.add_permits(1);
    let (_, body) = until_hit(Method::GET, &proxy.url("/s"), &[], "").await;
    assert_eq!(body, "version 2");
    assert_eq!(up.count(), 2, "one refresh for all the stale answers");
}

#[tokio::test]
async fn only_if_cached_with_nothing_stored_is_a_504_json_error() {
    let up = counting_upstream(&[]).await;
    let proxy = TestProxy::start(&cached_policy(&up.url(), r#"mode = "force""#)).await;
    let (p, body) = call(
        Method::GET,
        &proxy.url("/none"),
        &[("cache-control", "only-if-cached")],
        "",
    )
    .await;
    assert_eq!(p.status, 504);
    assert_eq!(json(&body)["error"]["code"], "not_cached");
    assert_eq!(up.count(), 0, "only-if-cached never goes upstream");
}

#[tokio::test]
async fn responses_over_max_entry_size_stream_through_uncached() {
    let up = Upstream::start(|_| async { response(200, "x".repeat(4096)) }).await;
    let policy = cached_policy(&up.url(), r#"mode = "force""#).replace(
        "[upstreams.up]",
        "[cache]\nmax_entry_size = \"1KB\"\n\n[upstreams.up]",
    );
    let proxy = TestProxy::start(&policy).await;
    for _ in 0..3 {
        let (p, body) = get(&proxy.url("/big")).await;
        assert_eq!(p.headers["x-cache"], "MISS");
        assert_eq!(body.len(), 4096, "the client still gets all of it");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(up.count(), 3);
}

#[tokio::test]
async fn each_vary_value_keeps_its_own_stored_variant() {
    let up =
        counting_upstream(&[("cache-control", "max-age=60"), ("vary", "Accept-Language")]).await;
    let proxy = TestProxy::start(&cached_policy(&up.url(), r#"mode = "origin""#)).await;
    let url = proxy.url("/v");
    let fr: &[(&str, &str)] = &[("accept-language", "fr,de")];
    let de: &[(&str, &str)] = &[("accept-language", "de")];
    let none: &[(&str, &str)] = &[];
    let (_, body_fr) = until_hit(Method::GET, &url, fr, "").await;
    let (p, body_de) = call(Method::GET, &url, de, "").await;
    assert_eq!(p.headers["x-cache"], "MISS");
    assert_ne!(body_fr, body_de);
    until_hit(Method::GET, &url, de, "").await;
    let (_, body_none) = until_hit(Method::GET, &url, none, "").await;
    let fetched = up.count();
    // Every variant is still there, each for its own requests; the same
    // list written another way (spaces, two field lines) is the same value.
    for (headers, body) in [
        (fr, &body_fr),
        (&[("accept-language", "fr, de")][..], &body_fr),
        (
            &[("accept-language", "fr"), ("accept-language", "de")][..],
            &body_fr,
        ),
        (de, &body_de),
        (none, &body_none),
    ] {
        let (p, got) = call(Method::GET, &url, headers, "").await;
        assert_eq!(p.headers["x-cache"], "HIT", "{headers:?}");
        assert_eq!(&got, body, "{headers:?}");
    }
    assert_eq!(up.count(), fetched, "hits reach no upstream");
    let (p, _) = call(Method::GET, &url, &[("accept-language", "de, fr")], "").await;
    assert_eq!(
        p.headers["x-cache"], "MISS",
        "another order is another value"
    );
    // An unsafe method on the URL drops every variant.
    call(Method::POST, &url, &[], "").await;
    for headers in [fr, de, none] {
        let (p, _) = call(Method::GET, &url, headers, "").await;
        assert_eq!(p.headers["x-cache"], "MISS", "{headers:?}");
    }
    // A purge by key takes the variants with it (the three just fetched again).
    until_hit(Method::GET, &url, fr, "").await;
    until_hit(Method::GET, &url, de, "").await;
    until_hit(Method::GET, &url, none, "").await;
    let policy =
        hyperion::policy::Policy::parse("t.toml", &cached_policy(&up.url(), r#"mode = "origin""#))
            .unwrap();
    let policy = policy.routes[0].cache.clone().unwrap();
    let q = hyperion::cache::CacheQuery {
        arm: None,
        route: &std::sync::Arc::from("r"),
        method: &Method::GET,
        host: "127.0.0.1",
        path: "/v",
        query: None,
        headers: &http::HeaderMap::new(),
        body: None,
        body_digest: None,
        key_seen: None,
        tenant: None,
    };
    let key = proxy.cache.explain(&policy, &q).await.unwrap().key;
    use hyperion::cache::Purge;
    assert_eq!(proxy.cache.purge(&Purge::Key(key)).await, 3);
    let (p, _) = call(Method::GET, &url, fr, "").await;
    assert_eq!(p.headers["x-cache"], "MISS");
}

#[tokio::test]
async fn the_report_counts_hits_and_what_they_saved() {
    // An Ollama answer: 12 prompt tokens, 30 generated.
    let up = Upstream::start(|_| async {
        Response::builder()
            .header("content-type", "application/json")
            .body(full(
                r#"{"model":"llama3.2","response":"blue","done":true,"prompt_eval_count":12,"eval_count":30}"#,
            ))
            .unwrap()
    })
    .await;
    let proxy = TestProxy::start(&cached_policy(&up.url(), r#"mode = "force""#)).await;
    get(&proxy.url("/a")).await;
    until_hit(Method::GET, &proxy.url("/a"), &[], "").await;
    get(&proxy.url("/a")).await;
    let report = proxy.cache.report().await;
    assert_eq!(report.entries, 1);
    assert!(report.bytes > 0);
    assert_eq!(report.misses, 1);
    assert!(report.hits >= 2, "{report:?}");
    assert_eq!(report.tokens_saved, 42 * report.hits, "{report:?}");
    assert!(report.upstream_seconds_saved > 0.0);
    assert!(report.hit_ratio > 0.5);
}

#[tokio::test]
async fn purges_remove_what_they_name_and_say_how_many() {
    let up = counting_upstream(&[]).await;
    let proxy = TestProxy::start(&cached_policy(&up.url(), r#"mode = "force""#)).await;
    for path in ["/docs/a", "/docs/b", "/other", "/other?x=1"] {
        until_hit(Method::GET, &proxy.url(path), &[], "").await;
    }
    use hyperion::cache::Purge;
    let c = &proxy.cache;
    assert_eq!(c.purge(&Purge::Target("127.0.0.1/other".into())).await, 1);
    assert_eq!(c.purge(&Purge::Prefix("127.0.0.1/docs/".into())).await, 2);
    assert_eq!(c.purge(&Purge::Prefix("127.0.0.1/docs/".into())).await, 0);
    let (p, _) = get(&proxy.url("/docs/a")).await;
    assert_eq!(p.headers["x-cache"], "MISS", "purged entries are gone");
    until_hit(Method::GET, &proxy.url("/docs/a"), &[], "").await;
    assert_eq!(c.purge(&Purge::Route("r".into())).await, 2);
    until_hit(Method::GET, &proxy.url("/docs/a"), &[], "").await;
    assert_eq!(c.purge(&Purge::All).await, 1);
    assert_eq!(c.report().await.entries, 0);
}

#[tokio::test]
async fn explain_shows_the_key_parts_without_the_credential() {
    let up = counting_upstream(&[]).await;
    let proxy = TestProxy::start(&cached_policy(
        &up.url(),
        r#"mode = "force"
body_key = "json"
ignore_fields = ["keep_alive"]"#,
    ))
    .await;
    let body = r#"{"model":"m","prompt":"p","keep_alive":"5m"}"#;
    let auth = [("authorization", "Bearer secret-token")];
    until_hit(Method::POST, &proxy.url("/api/generate"), &auth, body).await;

    let policy = hyperion::policy::Policy::parse(
        "t.toml",
        &cached_policy(
            &up.url(),
            r#"mode = "force"
body_key = "json"
ignore_fields = ["keep_alive"]"#,
        ),
    )
    .unwrap();
    let route_policy = policy.routes[0].cache.clone().unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert("authorization", "Bearer secret-token".parse().unwrap());
    let body = Bytes::from(r#"{"prompt":"p","model":"m"}"#);
    let route: std::sync::Arc<str> = "r".into();
    let explained = proxy
        .cache
        .explain(
            &route_policy,
            &hyperion::cache::CacheQuery {
                arm: None,
                route: &route,
                method: &Method::POST,
                host: "127.0.0.1",
                path: "/api/generate",
                query: None,
                headers: &headers,
                body: Some(&body),
                body_digest: None,
                key_seen: None,
                tenant: None,
            },
        )
        .await
        .unwrap();
    let shown = format!("{:?}", explained.parts);
    assert!(shown.contains("canonical json"), "{shown}");
    assert!(shown.contains("keep_alive"), "{shown}");
    assert!(
        !shown.contains("secret-token"),
        "never the credential: {shown}"
    );
    let stored = explained
        .stored
        .expect("the same key as the request that was stored");
    assert_eq!(stored.status, 200);
    assert!(stored.fresh);
}

#[tokio::test]
async fn vary_star_is_never_stored() {
    let up = counting_upstream(&[("cache-control", "max-age=60"), ("vary", "*")]).await;
    let proxy = TestProxy::start(&cached_policy(&up.url(), r#"mode = "origin""#)).await;
    three_misses(&proxy, "/v").await;
    assert_eq!(up.count(), 3);
}

#[tokio::test]
async fn a_huge_body_on_a_body_keyed_route_is_a_413_and_reaches_nobody() {
    let up = counting_upstream(&[]).await;
    let policy = cached_policy(&up.url(), "mode = \"force\"\nbody_key = \"json\"")
        .replace("[server]\n", "[server]\nmax_request_body = \"1KB\"\n");
    let proxy = TestProxy::start(&policy).await;
    // Chunked, so only reading it finds out how big it is.
    let (tx, body) = channel_body();
    let pending = tokio::spawn(send(
        Request::post(proxy.url("/api/generate"))
            .header("content-type", "application/json")
            .body(body)
            .unwrap(),
    ));
    tx.send(format!(r#"{{"prompt":"{}"}}"#, "x".repeat(4096)))
        .await;
    drop(tx);
    let (p, body) = pending.await.unwrap();
    assert_eq!(p.status, 413);
    assert_eq!(json(&body)["error"]["code"], "body_too_large");
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn origin_mode_details_of_rfc_9111() {
    let past = httpdate::fmt_http_date(std::time::SystemTime::now() - Duration::from_secs(100));
    let far = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(3600));
    let up = Upstream::start(move |req| {
        let (past, far) = (past.clone(), far.clone());
        async move {
            let mut resp = Response::builder().status(200);
            match req.uri().path() {
                "/fields" => {
                    resp = resp
                        .header("cache-control", "max-age=60, no-cache=\"X-Secret\"")
                        .header("x-secret", "s")
                        .header("x-other", "o")
                }
                "/cookie" => {
                    resp = resp
                        .header("cache-control", "max-age=60")
                        .header("set-cookie", "theme=dark")
                }
                // Day and month names in the wrong case are still a date.
                "/expires" => resp = resp.header("expires", far.to_uppercase()),
                "/strict" => {
                    resp = resp
                        .header("cache-control", "max-age=0, must-revalidate")
                        .header("etag", "\"v1\"")
                }
                "/old" => {
                    resp = resp
                        .header("cache-control", "max-age=600")
                        .header("date", past)
                }
                "/make" => resp = resp.status(201).header("location", "/loc"),
                _ => resp = resp.header("cache-control", "max-age=60"),
            }
            resp.body(full("body")).unwrap()
        }
    })
    .await;
    let proxy = TestProxy::start(&cached_policy(
        &up.url(),
        "mode = \"origin\"\nscope = \"shared\"",
    ))
    .await;
    // Fields named by no-cache are stored without; the rest is a hit.
    let (p, _) = until_hit(Method::GET, &proxy.url("/fields"), &[], "").await;
    assert!(!p.headers.contains_key("x-secret"));
    assert_eq!(p.headers["x-other"], "o");
    // Set-Cookie does not keep a response out (RFC 9111 §7.3 and 6265).
    let (p, _) = until_hit(Method::GET, &proxy.url("/cookie"), &[], "").await;
    assert_eq!(p.headers["set-cookie"], "theme=dark");
    until_hit(Method::GET, &proxy.url("/expires"), &[], "").await;
    // A response that arrived 100 s old says so, stored or not.
    let (p, _) = get(&proxy.url("/old")).await;
    assert_eq!(p.headers["x-cache"], "MISS");
    let age: u64 = p.headers["age"].to_str().unwrap().parse().unwrap();
    assert!((100..110).contains(&age), "{age}");
    // must-revalidate: only-if-cached gets a 504, never the stale entry.
    get(&proxy.url("/strict")).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (p, _) = call(
        Method::GET,
        &proxy.url("/strict"),
        &[("cache-control", "only-if-cached")],
        "",
    )
    .await;
    assert_eq!(p.status, 504);
    // A successful POST invalidates the URI its Location names.
    until_hit(Method::GET, &proxy.url("/loc"), &[], "").await;
    let (p, _) = call(Method::POST, &proxy.url("/make"), &[], "").await;
    assert_eq!(p.status, 201);
    let (p, _) = get(&proxy.url("/loc")).await;
    assert_eq!(p.headers["x-cache"], "MISS");
}

/// Asks for `path` three times, 20 ms apart: each answer must be a MISS
/// (nothing was stored).
async fn three_misses(proxy: &TestProxy, path: &str) {
    for _ in 0..3 {
        let (p, _) = get(&proxy.url(path)).await;
        assert_eq!(p.headers["x-cache"], "MISS");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn server_timing_says_where_the_time_went_and_what_the_cache_did() {
    let up = Upstream::echo().await;
    let policy = cached_policy(&up.url(), "mode = \"force\"\nttl = \"1h\"").replace(
        "listen = [\"127.0.0.1:0\"]",
        "listen = [\"127.0.0.1:0\"]\nserver_timing = true",
    );
    let proxy = TestProxy::start(&policy).await;
    let timing =
        |parts: &http::response::Parts| parts.headers["server-timing"].to_str().unwrap().to_owned();
    let (miss, _) = get(&proxy.url("/t")).await;
    let miss = timing(&miss);
    assert!(miss.starts_with("proxy;dur="), "{miss}");
    assert!(miss.contains(", upstream;dur="), "{miss}");
    assert!(miss.ends_with(", cache;desc=MISS"), "{miss}");
    let (hit, _) = get(&proxy.url("/t")).await;
    let hit = timing(&hit);
    assert!(!hit.contains("upstream"), "a hit asks no upstream: {hit}");
    assert!(hit.ends_with("cache;desc=HIT"), "{hit}");
    let dur: f64 = hit["proxy;dur=".len()..hit.find(',').unwrap()]
        .parse()
        .unwrap();
    assert!(dur >= 0.0);
    // Off by default.
    let plain = TestProxy::start(&cached_policy(&up.url(), "mode = \"force\"\nttl = \"1h\"")).await;
    let (parts, _) = get(&plain.url("/t")).await;
    assert!(!parts.headers.contains_key("server-timing"));
}

#[tokio::test]
async fn max_entries_bounds_the_store_beside_its_bytes() {
    let up = Upstream::echo().await;
    let policy = cached_policy(&up.url(), "mode = \"force\"\nttl = \"1h\"").replace(
        "[upstreams.up]",
        "[cache]\nmax_size = \"16MB\"\nmax_entries = 10\n\n[upstreams.up]",
    );
    let proxy = TestProxy::start(&policy).await;
    for i in 0..50 {
        let (parts, _) = get(&proxy.url(&format!("/e{i}"))).await;
        assert_eq!(parts.status, 200);
    }
    let entries = proxy.cache.report().await.entries;
    assert!(
        (1..=10).contains(&entries),
        "{entries} entries stored, for max_entries 10 in 16MB"
    );
}
