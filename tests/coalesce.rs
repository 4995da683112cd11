//! Coalescing seen from outside: identical requests in flight at once make
//! one upstream request; followers of a stream join it live; a client leaving
//! does not cancel what others wait for, and a fill nobody waits for stops;
//! an upstream failure is not handed to every follower.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use support::*;

fn policy(upstream: &str, extra: &str) -> String {
    cached_policy(
        upstream,
        &format!("mode = \"force\"\nbody_key = \"json\"\nstream = \"record\"\n{extra}"),
    )
}

const PROMPT: &str = r#"{"model":"llama3.2","prompt":"why is the sky blue?","stream":false}"#;

fn post(url: &str, body: &str) -> Request<TestBody> {
    Request::post(url)
        .header("content-type", "application/json")
        .body(full(body.to_owned()))
        .unwrap()
}

/// An upstream that takes `delay` to answer, numbering its answers, and
/// answers the first `failures` requests with a 500.
async fn slow_upstream(delay: Duration, failures: usize) -> Upstream {
    let n = Arc::new(AtomicUsize::new(0));
    Upstream::start(move |_req| {
        let n = n.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            tokio::time::sleep(delay).await;
            let status = if n <= failures { 500 } else { 200 };
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(full(format!(r#"{{"response":"answer {n}","done":true}}"#)))
                .unwrap()
        }
    })
    .await
}

/// Sends `n` copies of `req` at once over `conns` h2c connections (so a
/// thousand requests need no thousand sockets), and reads every response.
async fn at_once(
    n: usize,
    conns: usize,
    req: impl Fn() -> Request<TestBody>,
) -> Vec<(http::response::Parts, Bytes)> {
    let clients: Vec<_> = (0..conns).map(|_| h2c_client()).collect();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let client = clients[i % conns].clone();
        let req = req();
        tasks.push(tokio::spawn(async move {
            let resp = client.request(req).await.expect("response");
            let (parts, body) = resp.into_parts();
            (parts, body.collect().await.expect("whole body").to_bytes())
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(
            tokio::time::timeout(PATIENCE, t)
                .await
                .expect("in time")
                .unwrap(),
        );
    }
    out
}

#[tokio::test]
async fn a_thousand_identical_requests_make_one_upstream_request() {
    let up = slow_upstream(Duration::from_millis(500), 0).await;
    let proxy = TestProxy::start(&policy(&up.url(), "")).await;
    let url = proxy.url("/api/generate");
    let answers = at_once(1000, 10, || post(&url, PROMPT)).await;

    assert_eq!(up.count(), 1, "one upstream request for all of them");
    let misses = answers
        .iter()
        .filter(|(p, _)| p.headers["x-cache"] == "MISS")
        .count();
    assert_eq!(misses, 1, "one leader");
    for (p, body) in &answers {
        assert_eq!(p.status, 200);
        assert_eq!(body, r#"{"response":"answer 1","done":true}"#);
        assert_eq!(p.headers["content-length"], body.len().to_string().as_str());
        assert!(p.headers.contains_key("age"));
    }
    let (leader, _) = answers
        .iter()
        .find(|(p, _)| p.headers["x-cache"] == "MISS")
        .unwrap();
    let log = proxy
        .log_for(leader.headers["x-request-id"].to_str().unwrap())
        .await;
    assert_eq!(log["outcome"], "complete", "{log}");
}

#[tokio::test]
async fn followers_never_get_the_leaders_cookies() {
    let n = Arc::new(AtomicUsize::new(0));
    let up = Upstream::start(move |_req| {
        let n = n.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Response::builder()
                .header("set-cookie", format!("session={n}"))
                .body(full("shared answer"))
                .unwrap()
        }
    })
    .await;
    let proxy = TestProxy::start(&policy(&up.url(), "store_private = true")).await;
    let url = proxy.url("/api/generate");
    let answers = at_once(5, 1, || post(&url, PROMPT)).await;
    assert_eq!(up.count(), 1);
    for (p, body) in &answers {
        assert_eq!(body, "shared answer");
        let leader = p.headers["x-cache"] == "MISS";
        assert_eq!(p.headers.contains_key("set-cookie"), leader, "{p:?}");
    }
}

#[tokio::test]
async fn a_slow_reader_of_a_body_too_big_to_store_gets_all_of_it() {
    // 4 MB, chunked, past a 1 KB max_entry_size: not recorded, so the fill
    // must read the upstream at the reader's pace rather than cut it.
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 64;
    let up = Upstream::start(|_req| async {
        let (tx, body) = channel_body();
        tokio::spawn(async move {
            for i in 0..CHUNKS {
                tx.send(vec![b'a' + (i % 26) as u8; CHUNK]).await;
            }
        });
        Response::builder().body(body).unwrap()
    })
    .await;
    let policy = policy(&up.url(), "").replace(
        "[upstreams.up]",
        "[cache]\nmax_entry_size = \"1KB\"\n\n[upstreams.up]",
    );
    let proxy = TestProxy::start(&policy).await;
    let resp = client()
        .request(post(&proxy.url("/api/generate"), PROMPT))
        .await
        .unwrap();
    // Not reading for a while lets the upstream get far ahead if nothing
    // holds it back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = tokio::time::timeout(PATIENCE, resp.into_body().collect())
        .await
        .unwrap()
        .expect("the whole body, not a cut")
        .to_bytes();
    assert_eq!(body.len(), CHUNK * CHUNKS);
    assert!(body[CHUNK * (CHUNKS - 1)..]
        .iter()
        .all(|&b| b == b'a' + ((CHUNKS - 1) % 26) as u8));
}

#[tokio::test]
async fn followers_of_a_stream_get_what_was_sent_then_the_live_chunks() {
    let (up, mut streams) = stepped_upstream("application/x-ndjson").await;
    let proxy = TestProxy::start(&policy(&up.url(), "")).await;
    let url = proxy.url("/api/generate");

    let leader = client().request(post(&url, PROMPT)).await.unwrap();
    assert_eq!(leader.headers()["x-cache"], "MISS");
    let writer = streams.recv().await.unwrap();
    writer.send("{\"response\":\"a\",\"done\":false}\n").await;
    let mut leader = leader.into_body();
    let first = leader.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "{\"response\":\"a\",\"done\":false}\n");

    // Joins mid-stream: gets the chunk already sent at once …
    let follower = client().request(post(&url, PROMPT)).await.unwrap();
    assert_eq!(follower.headers()["x-cache"], "HIT");
    assert_eq!(follower.headers()["content-type"], "application/x-ndjson");
    let mut follower = follower.into_body();
    let caught_up = follower
        .frame()
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(caught_up, first);

    // … then the live ones, before the upstream has finished.
    writer.send("{\"response\":\"b\",\"done\":false}\n").await;
    let live = tokio::time::timeout(PATIENCE, follower.frame())
        .await
        .expect("the live chunk arrives while the upstream is still open")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(live, "{\"response\":\"b\",\"done\":false}\n");
    writer.send("{\"response\":\"\",\"done\":true}\n").await;
    drop(writer);
    let rest = follower.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "{\"response\":\"\",\"done\":true}\n");
    let rest = leader.collect().await.unwrap().to_bytes();
    assert_eq!(
        rest,
        "{\"response\":\"b\",\"done\":false}\n{\"response\":\"\",\"done\":true}\n"
    );
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn the_leader_leaving_does_not_cancel_what_a_follower_waits_for() {
    let (up, mut streams) = stepped_upstream("application/x-ndjson").await;
    let proxy = TestProxy::start(&policy(&up.url(), "")).await;
    let url = proxy.url("/api/generate");

    let leader = client().request(post(&url, PROMPT)).await.unwrap();
    let writer = streams.recv().await.unwrap();
    writer.send("{\"response\":\"a\",\"done\":false}\n").await;
    let follower = client().request(post(&url, PROMPT)).await.unwrap();
    assert_eq!(follower.headers()["x-cache"], "HIT");
    drop(leader);

    writer.send("{\"response\":\"\",\"done\":true}\n").await;
    assert!(
        !writer.closed_within(Duration::from_millis(200)).await,
        "the upstream is still being read"
    );
    drop(writer);
    let body = follower.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        body,
        "{\"response\":\"a\",\"done\":false}\n{\"response\":\"\",\"done\":true}\n"
    );
    // And it was stored for the next one.
    let (p, again) = send(post(&url, PROMPT)).await;
    assert_eq!(p.headers["x-cache"], "HIT");
    assert_eq!(again, body);
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn a_fill_nobody_waits_for_is_cancelled() {
    let (up, mut streams) = stepped_upstream("application/x-ndjson").await;
    let proxy = TestProxy::start(&policy(&up.url(), "")).await;
    let url = proxy.url("/api/generate");

    let leader = client().request(post(&url, PROMPT)).await.unwrap();
    let writer = streams.recv().await.unwrap();
    writer.send("{\"response\":\"a\",\"done\":false}\n").await;
    drop(leader);
    assert!(
        writer.closed_within(PATIENCE).await,
        "the upstream connection is closed, so the backend stops generating"
    );
    // Nothing was stored: the next request goes upstream.
    let pending = tokio::spawn(client().request(post(&url, PROMPT)));
    let writer = tokio::time::timeout(PATIENCE, streams.recv())
        .await
        .unwrap()
        .unwrap();
    writer.send("{\"response\":\"\",\"done\":true}\n").await;
    drop(writer);
    let resp = pending.await.unwrap().unwrap();
    assert_eq!(resp.headers()["x-cache"], "MISS");
    assert_eq!(up.count(), 2);
}

#[tokio::test]
async fn an_upstream_error_is_not_handed_to_every_follower() {
    let up = slow_upstream(Duration::from_millis(300), 1).await;
    let proxy = TestProxy::start(&policy(&up.url(), "")).await;
    let url = proxy.url("/api/generate");
    let answers = at_once(20, 2, || post(&url, PROMPT)).await;

    let failed = answers.iter().filter(|(p, _)| p.status == 500).count();
    assert_eq!(failed, 1, "only the leader gets the 500");
    for (p, body) in answers.iter().filter(|(p, _)| p.status == 200) {
        assert_eq!(body, r#"{"response":"answer 2","done":true}"#, "{p:?}");
    }
    assert_eq!(
        up.count(),
        2,
        "the followers collapsed again behind one retry"
    );
}

#[tokio::test]
async fn followers_go_upstream_alone_when_the_answer_cannot_be_shared() {
    // Set-Cookie: not storable, so not shareable either.
    let n = Arc::new(AtomicUsize::new(0));
    let up = Upstream::start(move |_req| {
        let n = n.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Response::builder()
                .header("set-cookie", format!("session={n}"))
                .body(full(format!("for {n}")))
                .unwrap()
        }
    })
    .await;
    let proxy = TestProxy::start(&policy(&up.url(), "")).await;
    let url = proxy.url("/api/generate");
    let answers = at_once(5, 1, || post(&url, PROMPT)).await;
    let mut bodies: Vec<_> = answers.iter().map(|(_, b)| b.clone()).collect();
    bodies.sort();
    bodies.dedup();
    assert_eq!(
        bodies.len(),
        5,
        "each got its own answer and its own cookie"
    );
    assert_eq!(up.count(), 5);
}

#[tokio::test]
async fn followers_stop_waiting_after_coalesce_timeout() {
    let up = slow_upstream(Duration::from_millis(1500), 0).await;
    let proxy = TestProxy::start(&policy(&up.url(), r#"coalesce_timeout = "100ms""#)).await;
    let url = proxy.url("/api/generate");
    let leader = tokio::spawn(send(post(&url, PROMPT)));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = std::time::Instant::now();
    let follower = tokio::spawn(send(post(&url, PROMPT)));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(up.count(), 2, "the follower went upstream after 100ms");
    let (p, _) = follower.await.unwrap();
    assert_eq!(p.headers["x-cache"], "MISS");
    assert!(started.elapsed() >= Duration::from_millis(100));
    leader.await.unwrap();
}

#[tokio::test]
async fn a_follower_differing_in_a_varied_header_goes_alone() {
    let n = Arc::new(AtomicUsize::new(0));
    let up = Upstream::start(move |req| {
        n.fetch_add(1, Ordering::SeqCst);
        let lang = req
            .headers()
            .get("accept-language")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Response::builder()
                .header("vary", "accept-language")
                .body(full(format!("in {lang}")))
                .unwrap()
        }
    })
    .await;
    let proxy = TestProxy::start(&policy(&up.url(), "")).await;
    let url = proxy.url("/api/generate");
    let with = |lang: &'static str| {
        let url = url.clone();
        tokio::spawn(async move {
            let req = Request::post(&url)
                .header("accept-language", lang)
                .body(full(PROMPT))
                .unwrap();
            send(req).await
        })
    };
    let en = with("en");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let fr = with("fr");
    let en2 = with("en");
    assert_eq!(en.await.unwrap().1, "in en");
    assert_eq!(fr.await.unwrap().1, "in fr");
    let (p, body) = en2.await.unwrap();
    assert_eq!(body, "in en");
    assert_eq!(p.headers["x-cache"], "HIT");
    assert_eq!(up.count(), 2);
}

#[tokio::test]
async fn head_requests_do_not_lead_fills() {
    let up = slow_upstream(Duration::from_millis(200), 0).await;
    let proxy = TestProxy::start(&policy(&up.url(), "")).await;
    let url = proxy.url("/x");
    let head = tokio::spawn(send(Request::head(&url).body(empty()).unwrap()));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (p, body) = send(Request::get(&url).body(empty()).unwrap()).await;
    assert_eq!(p.status, 200);
    assert!(
        !body.is_empty(),
        "the GET got a body, not the HEAD's nothing"
    );
    head.await.unwrap();
}

#[tokio::test]
async fn what_followers_saved_is_counted_in_tokens_and_upstream_time() {
    // A whole JSON answer that says it processed 12 + 30 tokens.
    let up = Upstream::start(|_req| async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Response::builder()
            .header("content-type", "application/json")
            .body(full(
                r#"{"response":"blue","done":true,"prompt_eval_count":12,"eval_count":30}"#,
            ))
            .unwrap()
    })
    .await;
    let proxy = TestProxy::start(&policy(&up.url(), "")).await;
    let url = proxy.url("/api/generate");
    let answers = at_once(50, 5, || post(&url, PROMPT)).await;
    assert_eq!(up.count(), 1);
    let report = proxy.cache.report().await;
    let served = answers
        .iter()
        .filter(|(p, _)| p.headers["x-cache"] == "HIT")
        .count() as u64;
    assert_eq!(served, 49);
    assert_eq!(report.tokens_saved, 42 * served, "{report:?}");
    // Each of them would have waited the whole 300 ms.
    assert!(
        report.upstream_seconds_saved >= 0.3 * served as f64,
        "{report:?}"
    );

    // A stream: followers that joined live count once the final chunk
    // says what it cost.
    let (up, mut streams) = stepped_upstream("application/x-ndjson").await;
    let proxy = TestProxy::start(&policy(&up.url(), "")).await;
    let url = proxy.url("/api/generate");
    let leader = client().request(post(&url, PROMPT)).await.unwrap();
    let writer = streams.recv().await.unwrap();
    writer.send("{\"response\":\"a\",\"done\":false}\n").await;
    let mut followers = Vec::new();
    for _ in 0..3 {
        let f = client().request(post(&url, PROMPT)).await.unwrap();
        assert_eq!(f.headers()["x-cache"], "HIT");
        followers.push(f);
    }
    assert_eq!(proxy.cache.report().await.tokens_saved, 0, "not known yet");
    writer
        .send("{\"response\":\"\",\"done\":true,\"prompt_eval_count\":12,\"eval_count\":30}\n")
        .await;
    drop(writer);
    leader.into_body().collect().await.unwrap();
    for f in followers {
        f.into_body().collect().await.unwrap();
    }
    let report = proxy.cache.report().await;
    assert_eq!(report.coalesced, 3, "{report:?}");
    assert_eq!(report.tokens_saved, 3 * 42, "{report:?}");
}
