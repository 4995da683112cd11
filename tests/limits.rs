//! Limits seen from outside: 429s with `Retry-After` and `RateLimit-*`,
//! buckets keyed by the real client, an API key or nothing at all, cache hits
//! that cost nothing, token budgets settled from the answer's usage (streams
//! cut short included), and `max_inflight_per_server` with its queue and 503.
//! Refused requests never reach the upstream.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use support::*;

/// An upstream whose `/hold` answers at once with a body that streams only
/// what is sent through the returned sender (holding its request in flight
/// until the sender is dropped); every other path answers `other()`.
async fn holding_upstream(other: fn() -> Response<TestBody>) -> (ChunkSender, Upstream) {
    let (tx, body) = channel_body();
    let body = Arc::new(std::sync::Mutex::new(Some(body)));
    let up = Upstream::start(move |req| {
        let body = body.clone();
        async move {
            match req.uri().path() {
                "/hold" => Response::new(body.lock().unwrap().take().expect("held once")),
                _ => other(),
            }
        }
    })
    .await;
    (tx, up)
}

fn limited(upstream: &str, server: &str, limits: &str, route: &str) -> String {
    format!(
        "[server]\n{server}\n\n[upstreams.up]\nservers = [{{ url = \"{upstream}\" }}]\n\n{limits}\n\n[[route]]\nname = \"all\"\nupstream = \"up\"\n{route}\n"
    )
}

fn header<'a>(parts: &'a http::response::Parts, name: &str) -> &'a str {
    parts
        .headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

async fn get_with(url: &str, headers: &[(&str, &str)]) -> (http::response::Parts, Bytes) {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(req.body(empty()).unwrap()).await
}

#[tokio::test]
async fn past_the_burst_a_client_gets_429_with_retry_after_and_ratelimit_headers() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::start(&limited(
        &up.url(),
        "",
        "[rate_limits.per_ip]\nkey = \"client_ip\"\nrate = \"3/min\"",
        "rate_limit = [\"per_ip\"]",
    ))
    .await;
    for remaining in ["2", "1", "0"] {
        let (parts, _) = get(&proxy.url("/a")).await;
        assert_eq!(parts.status, 200);
        assert_eq!(header(&parts, "ratelimit-limit"), "3");
        assert_eq!(header(&parts, "ratelimit-remaining"), remaining);
    }
    let (parts, body) = get(&proxy.url("/a")).await;
    assert_eq!(parts.status, 429);
    let err = json(&body);
    assert_eq!(err["error"]["code"], "rate_limited");
    assert!(err["error"]["request_id"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    // One request comes back every 20 s.
    let retry: u64 = header(&parts, "retry-after").parse().unwrap();
    assert!((19..=20).contains(&retry), "{retry}");
    assert_eq!(header(&parts, "ratelimit-remaining"), "0");
    let reset: u64 = header(&parts, "ratelimit-reset").parse().unwrap();
    assert!((59..=60).contains(&reset), "{reset}");
    assert_eq!(up.count(), 3, "the refused request never left");
}

#[tokio::test]
async fn x_forwarded_for_counts_only_from_a_trusted_proxy() {
    let up = Upstream::echo().await;
    let limits = "[rate_limits.per_ip]\nkey = \"client_ip\"\nrate = \"1/min\"";
    let route = "rate_limit = [\"per_ip\"]";
    // Untrusted peer: a made-up X-Forwarded-For does not buy a new bucket.
    let proxy = TestProxy::start(&limited(&up.url(), "", limits, route)).await;
    let (a, _) = get_with(&proxy.url("/"), &[("x-forwarded-for", "10.0.0.1")]).await;
    let (b, _) = get_with(&proxy.url("/"), &[("x-forwarded-for", "10.0.0.2")]).await;
    assert_eq!((a.status.as_u16(), b.status.as_u16()), (200, 429));

    // Behind a trusted proxy, each forwarded client has its own bucket.
    let proxy = TestProxy::start(&limited(
        &up.url(),
        "trusted_proxies = [\"127.0.0.1/32\"]",
        limits,
        route,
    ))
    .await;
    let (a, _) = get_with(&proxy.url("/"), &[("x-forwarded-for", "10.0.0.1")]).await;
    let (b, _) = get_with(&proxy.url("/"), &[("x-forwarded-for", "10.0.0.2")]).await;
    let (c, _) = get_with(&proxy.url("/"), &[("x-forwarded-for", "10.0.0.1")]).await;
    assert_eq!(
        (a.status.as_u16(), b.status.as_u16(), c.status.as_u16()),
        (200, 200, 429)
    );
}

#[tokio::test]
async fn ipv6_clients_share_a_bucket_per_slash_64() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::start(&limited(
        &up.url(),
        "trusted_proxies = [\"127.0.0.1/32\"]",
        "[rate_limits.per_ip]\nkey = \"client_ip\"\nrate = \"1/min\"",
        "rate_limit = [\"per_ip\"]",
    ))
    .await;
    let from = |ip: &'static str| get_with_owned(proxy.url("/"), ip);
    // One /64 is one client: a second address in it is refused.
    assert_eq!(from("2001:db8:1:2::1").await, 200);
    assert_eq!(from("2001:db8:1:2::ffff").await, 429);
    // The next /64 over is somebody else.
    assert_eq!(from("2001:db8:1:3::1").await, 200);
}

async fn get_with_owned(url: String, forwarded_for: &'static str) -> u16 {
    get_with(&url, &[("x-forwarded-for", forwarded_for)])
        .await
        .0
        .status
        .as_u16()
}

#[tokio::test]
async fn api_keys_have_their_own_buckets_and_keyless_requests_share_one() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::start(&limited(
        &up.url(),
        "",
        "[rate_limits.per_key]\nkey = \"header:authorization\"\nrate = \"1/hour\"",
        "rate_limit = [\"per_key\"]",
    ))
    .await;
    let status = |p: http::response::Parts| p.status.as_u16();
    let alice = [("authorization", "Bearer alice")];
    let bob = [("authorization", "Bearer bob")];
    assert_eq!(status(get_with(&proxy.url("/"), &alice).await.0), 200);
    assert_eq!(status(get_with(&proxy.url("/"), &bob).await.0), 200);
    assert_eq!(status(get_with(&proxy.url("/"), &alice).await.0), 429);
    assert_eq!(status(get_with(&proxy.url("/"), &[]).await.0), 200);
    assert_eq!(status(get_with(&proxy.url("/"), &[]).await.0), 429);
    assert_eq!(up.count(), 3);
}

#[tokio::test]
async fn cache_hits_are_free_unless_the_limiter_counts_them() {
    let up = Upstream::echo().await;
    let policy = |count_hits: bool| {
        format!(
            "[upstreams.up]\nservers = [{{ url = \"{}\" }}]\n\n[rate_limits.per_ip]\nkey = \"client_ip\"\nrate = \"1/hour\"\ncount_hits = {count_hits}\n\n[[route]]\nname = \"r\"\nupstream = \"up\"\nrate_limit = [\"per_ip\"]\n\n[route.cache]\nmode = \"force\"\nttl = \"1h\"\n",
            up.url()
        )
    };
    let proxy = TestProxy::start(&policy(false)).await;
    let (first, _) = get(&proxy.url("/cached")).await;
    assert_eq!(first.status, 200);
    assert_eq!(header(&first, "ratelimit-remaining"), "0");
    for _ in 0..5 {
        let (hit, _) = get(&proxy.url("/cached")).await;
        assert_eq!(hit.status, 200);
        assert_eq!(header(&hit, "x-cache"), "HIT");
        // A hit still says where the client stands.
        assert_eq!(header(&hit, "ratelimit-remaining"), "0");
    }
    let (miss, _) = get(&proxy.url("/other")).await;
    assert_eq!(miss.status, 429);
    assert_eq!(up.count(), 1);

    let proxy = TestProxy::start(&policy(true)).await;
    assert_eq!(get(&proxy.url("/counted")).await.0.status, 200);
    assert_eq!(get(&proxy.url("/counted")).await.0.status, 429);
}

fn generate(url: &str, body: &'static str) -> Request<TestBody> {
    Request::post(url)
        .header("content-type", "application/json")
        .body(full(body))
        .unwrap()
}

#[tokio::test]
async fn token_budgets_reserve_the_request_estimate_and_settle_with_the_usage() {
    let up = ollama_json().await;
    let proxy = TestProxy::start(&limited(
        &up.url(),
        "",
        "[rate_limits.tokens]\nkey = \"global\"\ntokens = \"200/hour\"\ndefault_tokens = 10",
        "rate_limit = [\"tokens\"]",
    ))
    .await;
    // 56 bytes: num_predict 20 plus a prompt of ~14 tokens reserves 34.
    let body = r#"{"model":"m","prompt":"hi","options":{"num_predict":20}}"#;
    assert_eq!(body.len(), 56);
    // Each answer used 80 (its usage), settled after the reservation showed.
    for remaining in ["166", "86", "6"] {
        let (parts, _) = send(generate(&proxy.url("/api/generate"), body)).await;
        assert_eq!(parts.status, 200);
        assert_eq!(header(&parts, "ratelimit-limit"), "200");
        assert_eq!(header(&parts, "ratelimit-remaining"), remaining);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // 240 used of 200 an hour: in debt, so the next reservation waits.
    let (refused, body4) = send(generate(&proxy.url("/api/generate"), body)).await;
    assert_eq!(refused.status, 429);
    assert_eq!(json(&body4)["error"]["code"], "rate_limited");
    // 240 + 34 - 200 = 74 tokens over, at 18 s a token.
    let retry: u64 = header(&refused, "retry-after").parse().unwrap();
    assert!((1331..=1332).contains(&retry), "{retry}");
    assert_eq!(up.count(), 3);
    // Token-limited routes ask for identity, so the usage is readable.
    assert_eq!(
        up.last().headers.get("accept-encoding").unwrap(),
        "identity"
    );
}

#[tokio::test]
async fn a_stream_the_client_abandons_is_settled_with_what_was_generated() {
    let up = Upstream::start(|_req| async {
        let lines: Vec<Bytes> = (0..100)
            .map(|i| Bytes::from(format!("{{\"response\":\"t{i}\",\"done\":false}}\n")))
            .collect();
        Response::builder()
            .header("content-type", "application/x-ndjson")
            .body(chunked_body(lines, Duration::from_millis(20)))
            .unwrap()
    })
    .await;
    let proxy = TestProxy::start(&limited(
        &up.url(),
        "",
        "[rate_limits.tokens]\nkey = \"global\"\ntokens = \"1000/hour\"\ndefault_tokens = 100",
        "rate_limit = [\"tokens\"]",
    ))
    .await;
    let resp = client()
        .request(generate(&proxy.url("/api/generate"), r#"{"prompt":"hi"}"#))
        .await
        .unwrap();
    // The default 100 plus a 15-byte body's ~3 prompt tokens.
    assert_eq!(resp.headers()["ratelimit-remaining"], "897");
    let mut body = resp.into_body();
    let mut lines = 0;
    while lines < 3 {
        let frame = body.frame().await.unwrap().unwrap();
        lines += frame
            .data_ref()
            .map_or(0, |d| d.iter().filter(|&&b| b == b'\n').count());
    }
    drop(body);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // About three tokens were generated (plus the prompt's 3), not the 103
    // reserved: the next reservation of 103 leaves ~891.
    let (next, _) = send(generate(&proxy.url("/api/generate"), r#"{"prompt":"hi"}"#)).await;
    let remaining: u64 = header(&next, "ratelimit-remaining").parse().unwrap();
    assert!((888..=892).contains(&remaining), "{remaining}");
}

#[tokio::test]
async fn requests_past_max_inflight_wait_in_line_until_a_body_ends() {
    // Headers at once, then the body over ~300 ms: the slot is held until
    // the body ends, not when the headers arrive.
    let up = Upstream::start(|_req| async {
        let lines: Vec<Bytes> = (0..6).map(|i| Bytes::from(format!("{i}\n"))).collect();
        Response::new(chunked_body(lines, Duration::from_millis(50)))
    })
    .await;
    let proxy = TestProxy::start(&format!(
        "[upstreams.up]\nservers = [{{ url = \"{}\" }}]\nmax_inflight_per_server = 1\nqueue_timeout = \"5s\"\n\n[[route]]\nname = \"all\"\nupstream = \"up\"\n",
        up.url()
    ))
    .await;
    let first = client()
        .request(Request::get(proxy.url("/1")).body(empty()).unwrap())
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let second = tokio::spawn({
        let url = proxy.url("/2");
        async move { get(&url).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        up.count(),
        1,
        "the second request waits while the first body streams"
    );
    let first_body = first.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(first_body.len(), 12);
    let (parts, _) = second.await.unwrap();
    assert_eq!(parts.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(up.count(), 2);
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after_and_an_abandoned_stream_frees_its_slot() {
    let (tx, body) = channel_body();
    let body = Arc::new(std::sync::Mutex::new(Some(body)));
    let calls = Arc::new(AtomicUsize::new(0));
    let up = Upstream::start({
        let calls = calls.clone();
        move |_req| {
            let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
            let body = body.clone();
            async move {
                match body.lock().unwrap().take().filter(|_| first) {
                    Some(b) => Response::new(b),
                    None => Response::new(full("ok")),
                }
            }
        }
    })
    .await;
    let proxy = TestProxy::start(&format!(
        "[upstreams.up]\nservers = [{{ url = \"{}\" }}]\nmax_inflight_per_server = 1\nqueue_timeout = \"200ms\"\n\n[[route]]\nname = \"all\"\nupstream = \"up\"\n",
        up.url()
    ))
    .await;
    let stream = client()
        .request(Request::get(proxy.url("/stream")).body(empty()).unwrap())
        .await
        .unwrap();
    tx.send("first chunk\n").await;
    let (parts, body) = get(&proxy.url("/busy")).await;
    assert_eq!(parts.status, 503);
    assert_eq!(json(&body)["error"]["code"], "upstream_busy");
    let retry: u64 = header(&parts, "retry-after").parse().unwrap();
    assert!(retry >= 1);
    assert_eq!(up.count(), 1, "a request that timed out in line never left");

    // The client walks away from the stream: its slot comes free.
    drop(stream);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (parts, body) = get(&proxy.url("/after")).await;
    assert_eq!(parts.status, 200);
    assert_eq!(&body[..], b"ok");
    drop(tx);
}

#[tokio::test]
async fn identical_requests_wait_with_a_queued_leader_instead_of_timing_out() {
    // `/hold` keeps the only slot until its body is released; `/shared` is
    // cacheable and answered at once.
    let (tx, up) = holding_upstream(|| {
        Response::builder()
            .header("cache-control", "max-age=60")
            .body(full("shared"))
            .unwrap()
    })
    .await;
    let proxy = TestProxy::start(&format!(
        "[upstreams.up]\nservers = [{{ url = \"{}\" }}]\nmax_inflight_per_server = 1\nqueue_timeout = \"5s\"\n\n[[route]]\nname = \"all\"\nupstream = \"up\"\n[route.cache]\nmode = \"origin\"\ncoalesce_timeout = \"100ms\"\n",
        up.url()
    ))
    .await;
    let hold = client()
        .request(Request::get(proxy.url("/hold")).body(empty()).unwrap())
        .await
        .unwrap();
    let shared: Vec<_> = (0..3)
        .map(|_| {
            let url = proxy.url("/shared");
            tokio::spawn(async move { get(&url).await })
        })
        .collect();
    // Well past coalesce_timeout: the followers still wait with the leader,
    // which waits in line; nothing more went upstream.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(up.count(), 1);
    tx.send("done\n").await;
    drop(tx);
    hold.into_body().collect().await.unwrap();
    let mut caches = Vec::new();
    for s in shared {
        let (parts, body) = s.await.unwrap();
        assert_eq!(parts.status, 200);
        assert_eq!(&body[..], b"shared");
        caches.push(header(&parts, "x-cache").to_owned());
    }
    caches.sort();
    assert_eq!(
        caches,
        ["HIT", "HIT", "MISS"],
        "one went upstream for all three"
    );
    assert_eq!(up.count(), 2);
}

#[tokio::test]
async fn refused_and_busy_requests_spend_nothing_and_still_show_the_level() {
    let (tx, up) = holding_upstream(|| Response::new(full("ok"))).await;
    let proxy = TestProxy::start(&format!(
        "[server]\nmax_request_body = \"1KB\"\n\n[upstreams.up]\nservers = [{{ url = \"{}\" }}]\nmax_inflight_per_server = 1\nqueue_timeout = \"100ms\"\n\n[rate_limits.per_ip]\nkey = \"client_ip\"\nrate = \"3/min\"\n\n[[route]]\nname = \"all\"\nupstream = \"up\"\nrate_limit = [\"per_ip\"]\n",
        up.url()
    ))
    .await;
    let level = |parts: &http::response::Parts| {
        (
            header(parts, "ratelimit-limit").to_owned(),
            header(parts, "ratelimit-remaining").to_owned(),
        )
    };
    // Too large: refused before any limiter counts it, and told the level.
    let (parts, _) = send(
        Request::post(proxy.url("/big"))
            .body(full(vec![b'x'; 2048]))
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 413);
    assert_eq!(level(&parts), ("3".into(), "3".into()));

    // One request holds the only slot; the next times out in line: a 503
    // that gives back what it spent.
    let hold = client()
        .request(Request::get(proxy.url("/hold")).body(empty()).unwrap())
        .await
        .unwrap();
    let (hold_parts, hold_body) = hold.into_parts();
    assert_eq!(level(&hold_parts).1, "2");
    let (parts, _) = get(&proxy.url("/busy")).await;
    assert_eq!(parts.status, 503);
    assert_eq!(level(&parts).1, "2", "the 503 spent nothing");
    tx.send("done\n").await;
    drop(tx);
    hold_body.collect().await.unwrap();
    let (parts, _) = get(&proxy.url("/after")).await;
    assert_eq!(parts.status, 200);
    assert_eq!(level(&parts).1, "1");
    assert_eq!(
        up.count(),
        2,
        "neither refused request reached the upstream"
    );
}
