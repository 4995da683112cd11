//! Hyperion under attack: one test per way a client it does not trust can
//! try to take it down (slow bodies, slow readers, too many connections,
//! bodies that cost memory, tunnels and HTTP/2 connections that never
//! end). Each asserts what the attacker gets, that other clients are still
//! served meanwhile, that upstream slots come back, and what the counters
//! say. Deadlines are short so the suite stays fast; every wait is bounded.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use hyperion::protect::Deadline;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the peer closes (or `wait` passes): what was read, and
/// whether it closed.
async fn read_to_close(stream: &mut TcpStream, wait: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let closed = tokio::time::timeout(wait, async {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

fn protect(proxy: &TestProxy) -> Arc<hyperion::protect::Protect> {
    proxy.reloader.current().protect.clone()
}

/// Another client, meanwhile: answered at once.
async fn others_are_served(proxy: &TestProxy) {
    let started = Instant::now();
    let (parts, _) = get(&proxy.url("/other")).await;
    assert_eq!(parts.status, 200);
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// One route to `upstream`, whose one server takes one request at a time
/// (the slot a stalled client must not keep); `server`: `[server]` keys.
fn one_slot_policy(upstream: &Upstream, server: &str) -> String {
    format!(
        "[server]\n{server}\n\n[upstreams.up]\nservers = [{{ url = \"{}\" }}]\nmax_inflight_per_server = 1\nqueue_timeout = \"20s\"\nidle_timeout = \"30s\"\n\n[[route]]\nname = \"all\"\nupstream = \"up\"\n",
        upstream.url()
    )
}

fn body_keyed_policy(upstream: &str, server: &str) -> String {
    format!(
        r#"
[server]
{server}

[upstreams.up]
servers = [{{ url = "{upstream}" }}]

[[route]]
name = "gen"
match = {{ methods = ["POST"], paths = ["/api/generate"] }}
upstream = "up"

[route.cache]
mode = "force"
ttl = "1m"
body_key = "json"

[[route]]
name = "all"
upstream = "up"
"#
    )
}

#[tokio::test]
async fn a_body_that_stops_arriving_gets_408_before_anything_goes_upstream() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::start(&body_keyed_policy(
        &up.url(),
        r#"body_read_timeout = "300ms""#,
    ))
    .await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{\"mo")
        .await
        .unwrap();
    let started = Instant::now();
    others_are_served(&proxy).await;
    let (out, closed) = read_to_close(&mut stream, PATIENCE).await;
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(out.contains("\"code\":\"body_timeout\""), "{out}");
    assert!(closed, "the connection is closed after a 408");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        up.count(),
        1,
        "only the other client's request went upstream"
    );
    assert_eq!(protect(&proxy).cut.get(Deadline::BodyRead), 1);
    assert_eq!(protect(&proxy).bodies.held(), 0, "its budget came back");
}

#[tokio::test]
async fn a_streamed_upload_that_stops_is_cut_and_the_upstream_slot_freed() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::start(&one_slot_policy(&up, r#"body_read_timeout = "300ms""#)).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"PUT /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nfirst bytes")
        .await
        .unwrap();
    let (out, closed) = read_to_close(&mut stream, PATIENCE).await;
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(closed);
    // The one slot is free again: the next request is not queued.
    let started = Instant::now();
    let (parts, _) = get(&proxy.url("/next")).await;
    assert_eq!(parts.status, 200);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(protect(&proxy).cut.get(Deadline::BodyRead), 1);
}

#[tokio::test]
async fn buffered_bodies_share_a_budget_and_the_overflow_gets_503_overloaded() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::start(&body_keyed_policy(
        &up.url(),
        "max_request_body = \"1MB\"\nmax_buffered_bodies = \"1MB\"\nbody_read_timeout = \"10s\"",
    ))
    .await;
    // The first upload declares 800 KB and sends part of it: its share is
    // taken up front.
    let mut first = TcpStream::connect(proxy.addr).await.unwrap();
    let mut doc = br#"{"model":"m","pad":""#.to_vec();
    doc.resize(800 * 1024 - 2, b'a');
    doc.extend_from_slice(b"\"}");
    let head = format!(
        "POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        doc.len()
    );
    first.write_all(head.as_bytes()).await.unwrap();
    first.write_all(&doc[..1000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(protect(&proxy).bodies.held(), doc.len() as u64);

    // The second does not fit: it waits a second, then is refused.
    let started = Instant::now();
    let second = send(
        Request::post(proxy.url("/api/generate"))
            .header("content-type", "application/json")
            .body(full(Bytes::from(doc.clone())))
            .unwrap(),
    )
    .await;
    assert_eq!(second.0.status, 503);
    assert_eq!(second.0.headers["retry-after"], "1");
    assert_eq!(json(&second.1)["error"]["code"], "overloaded");
    assert!(started.elapsed() >= Duration::from_millis(900));
    others_are_served(&proxy).await;

    // The first finishes and is answered; the budget is whole again.
    first.write_all(&doc[1000..]).await.unwrap();
    let head = read_head(&mut first).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    drop(first);
    for _ in 0..50 {
        if protect(&proxy).bodies.held() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(protect(&proxy).bodies.held(), 0);
    assert_eq!(protect(&proxy).bodies.refused(), 1);
}

#[tokio::test]
async fn a_rate_limited_client_is_refused_before_its_body_is_read() {
    let up = Upstream::echo().await;
    let policy = body_keyed_policy(&up.url(), "").replace(
        "[[route]]\nname = \"gen\"",
        "[rate_limits.per_ip]\nkey = \"client_ip\"\nrate = \"1/min\"\nburst = 1\n\n[[route]]\nname = \"gen\"\nrate_limit = [\"per_ip\"]",
    );
    let proxy = TestProxy::start(&policy).await;
    let (parts, _) = send(
        Request::post(proxy.url("/api/generate"))
            .header("content-type", "application/json")
            .body(full(r#"{"model":"m"}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 200);
    // 10 MB declared, not a byte sent: the 429 comes anyway.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n")
        .await
        .unwrap();
    let head = tokio::time::timeout(Duration::from_secs(2), read_head(&mut stream))
        .await
        .expect("refused without waiting for the body");
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn a_huge_or_deeply_nested_json_body_is_keyed_without_a_value_tree() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::start(&body_keyed_policy(&up.url(), "")).await;
    let post = |body: Vec<u8>| {
        send(
            Request::post(proxy.url("/api/generate"))
                .header("content-type", "application/json")
                .body(full(Bytes::from(body)))
                .unwrap(),
        )
    };
    // 4 MB of zeros: keyed (a miss, then a hit), not 30 times its size.
    let mut zeros = br#"{"model":"m","a":["#.to_vec();
    for _ in 0..2 * 1024 * 1024 - 1 {
        zeros.extend_from_slice(b"0,");
    }
    zeros.extend_from_slice(b"0]}");
    let (miss, _) = post(zeros.clone()).await;
    assert_eq!(miss.headers["x-cache"], "MISS");
    let (hit, _) = post(zeros).await;
    assert_eq!(hit.headers["x-cache"], "HIT");
    // Deeper than the nesting bound: passed through, never keyed.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let (parts, _) = post(deep.into_bytes()).await;
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["x-cache"], "BYPASS");
}

#[tokio::test]
async fn connections_past_the_per_address_ceiling_are_closed_at_once() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::to(
        &up.url(),
        "max_connections_per_ip = 2\n[admin]\nlisten = \"127.0.0.1:0\"",
    )
    .await;
    let a = TcpStream::connect(proxy.addr).await.unwrap();
    let _b = TcpStream::connect(proxy.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(proxy.addr).await.unwrap();
    let _ = third.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (out, closed) = read_to_close(&mut third, PATIENCE).await;
    assert!(closed && out.is_empty(), "closed without an answer: {out}");
    assert_eq!(protect(&proxy).connections.refused_per_ip(), 1);
    // What an operator's Prometheus sees.
    let admin = proxy.admin.expect("admin listener");
    let (_, metrics) = get(&format!("http://{admin}/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("hyperion_connections_refused_total{reason=\"max_connections_per_ip\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("hyperion_connections_open 2"), "{metrics}");
    // One closes: room again.
    drop(a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (parts, _) = get(&proxy.url("/again")).await;
    assert_eq!(parts.status, 200);
}

#[tokio::test]
async fn past_max_connections_accepting_waits_until_one_closes() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::to(&up.url(), "max_connections = 2\nmax_connections_per_ip = 2").await;
    let a = TcpStream::connect(proxy.addr).await.unwrap();
    let _b = TcpStream::connect(proxy.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(protect(&proxy).connections.open_count(), 2);
    // The kernel completes the handshake; the proxy does not take it yet.
    let mut third = TcpStream::connect(proxy.addr).await.unwrap();
    third
        .write_all(b"GET /waiting HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), third.read(&mut byte)).await;
    assert!(early.is_err(), "not answered while two are open");
    drop(a);
    let head = read_head(&mut third).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(protect(&proxy).connections.accept_paused() >= 1);
}

/// An upstream streaming 64 KB chunks until nobody reads them (at most
/// 256 MB).
async fn endless_upstream() -> Upstream {
    Upstream::start(move |_req| async move {
        let (tx, body) = channel_body();
        tokio::spawn(async move {
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            for _ in 0..4096 {
                if tx.closed_within(Duration::ZERO).await {
                    break;
                }
                let sent = tokio::time::timeout(Duration::from_secs(10), tx.send(chunk.clone()));
                if sent.await.is_err() {
                    break;
                }
            }
        });
        http::Response::builder()
            .header("content-type", "application/octet-stream")
            .body(body)
            .unwrap()
    })
    .await
}

#[tokio::test]
async fn a_client_that_never_reads_is_cut_after_send_timeout_and_frees_the_upstream() {
    let up = endless_upstream().await;
    let proxy = TestProxy::start(&one_slot_policy(&up, r#"send_timeout = "500ms""#)).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /stream HTTP/1.1\r\nHost: x\r\nCache-Control: no-store\r\n\r\n")
        .await
        .unwrap();
    // Never read. The proxy cuts it once its writes stall for 500 ms...
    let started = Instant::now();
    while protect(&proxy).cut.get(Deadline::Send) == 0 {
        assert!(started.elapsed() < PATIENCE, "never cut");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...the upstream's stream is dropped, and its one slot serves the next.
    let (parts, body) = tokio::time::timeout(PATIENCE, async {
        let resp = client()
            .request(Request::get(proxy.url("/next")).body(empty()).unwrap())
            .await
            .unwrap();
        let parts = resp.status();
        let mut body = resp.into_body();
        use http_body_util::BodyExt;
        let first = body.frame().await.unwrap().unwrap();
        (parts, first.into_data().unwrap())
    })
    .await
    .expect("the slot came back");
    assert_eq!(parts, 200);
    assert!(!body.is_empty());
    drop(stream);
}

#[tokio::test]
async fn a_silent_tunnel_is_closed_after_tunnel_idle_timeout() {
    let up = upgrading_upstream(b"").await;
    let proxy = TestProxy::to(&up.url(), "tunnel_idle_timeout = \"400ms\"").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // Traffic keeps it open past the timeout...
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        stream.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        tokio::time::timeout(PATIENCE, stream.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
    }
    // ...silence closes it.
    let started = Instant::now();
    let (_, closed) = read_to_close(&mut stream, PATIENCE).await;
    assert!(closed);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(protect(&proxy).cut.get(Deadline::TunnelIdle), 1);
}

#[tokio::test]
async fn http2_connections_advertise_the_stream_limit() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::to(&up.url(), "http2_max_concurrent_streams = 7").await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut send, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(async move {
        let mut conn = conn;
        // Driven until the server's SETTINGS arrive.
        std::future::poll_fn(|cx| {
            let _ = std::future::Future::poll(std::pin::Pin::new(&mut conn), cx);
            if conn.max_concurrent_send_streams() == 7 {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
        conn.max_concurrent_send_streams()
    });
    // A request makes the server's SETTINGS arrive.
    let (resp, _) = send
        .send_request(Request::get(proxy.url("/h2")).body(()).unwrap(), true)
        .unwrap();
    let advertised = tokio::time::timeout(PATIENCE, conn).await.unwrap().unwrap();
    assert_eq!(advertised, 7);
    drop(resp);
}

#[tokio::test]
async fn an_idle_http2_client_that_ignores_goaway_is_cut() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::to(
        &up.url(),
        "idle_timeout = \"300ms\"\nhttp2_keepalive_timeout = \"300ms\"",
    )
    .await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (send, mut conn) = h2::client::handshake(tcp).await.unwrap();
    // One request, the connection driven until its answer...
    let mut send = send.ready().await.unwrap();
    let (resp, _) = send
        .send_request(Request::get(proxy.url("/h2")).body(()).unwrap(), true)
        .unwrap();
    let resp = tokio::select! {
        r = resp => r.unwrap(),
        _ = &mut conn => panic!("connection ended first"),
    };
    assert_eq!(resp.status(), 200);
    drop(resp);
    // ...then never again: the GOAWAY's PING is never answered.
    let started = Instant::now();
    while protect(&proxy).connections.open_count() > 0 {
        assert!(started.elapsed() < PATIENCE, "the connection was never cut");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(protect(&proxy).cut.get(Deadline::Http2Keepalive), 1);
    others_are_served(&proxy).await;
    drop(conn);
}

#[tokio::test]
async fn an_answer_that_fits_the_buffers_frees_the_upstream_before_a_slow_client_reads_it() {
    // 256 KB in 32 KB pieces, 10 ms apart: the upstream's generation.
    let up = Upstream::start(|_req| async move {
        let (tx, body) = channel_body();
        tokio::spawn(async move {
            for _ in 0..8 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                tx.send(Bytes::from(vec![b'x'; 32 * 1024])).await;
            }
        });
        http::Response::builder()
            .header("content-type", "application/octet-stream")
            .body(body)
            .unwrap()
    })
    .await;
    let proxy = TestProxy::start(&one_slot_policy(&up, r#"send_timeout = "60s""#)).await;
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The slow client has not read a byte; the backend is not held for it.
    let started = Instant::now();
    let (parts, body) = get(&proxy.url("/next")).await;
    assert_eq!(parts.status, 200);
    assert_eq!(body.len(), 256 * 1024);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "queued behind the slow client for {:?}",
        started.elapsed()
    );
    // And the slow client still gets all of it when it reads.
    let head = read_head(&mut slow).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut rest = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    while rest.len() < 256 * 1024 {
        let n = tokio::time::timeout(PATIENCE, slow.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        rest.extend_from_slice(&buf[..n]);
    }
    assert!(rest.len() >= 256 * 1024);
}

#[tokio::test]
async fn admin_connections_are_held_to_the_same_deadlines() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::to(
        &up.url(),
        "idle_timeout = \"300ms\"\nheader_read_timeout = \"300ms\"\n[admin]\nlisten = \"127.0.0.1:0\"",
    )
    .await;
    let admin = proxy.admin.expect("admin listener");
    // A kept-alive connection after a request: closed once idle.
    let mut idle = TcpStream::connect(admin).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut idle).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let started = Instant::now();
    let (_, closed) = read_to_close(&mut idle, PATIENCE).await;
    assert!(closed && started.elapsed() < Duration::from_secs(3));
    // A head that never ends: closed too.
    let mut slow = TcpStream::connect(admin).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost:")
        .await
        .unwrap();
    let (out, closed) = read_to_close(&mut slow, PATIENCE).await;
    assert!(closed, "{out}");
    // And it still answers.
    let (parts, _) = get(&format!("http://{admin}/healthz")).await;
    assert_eq!(parts.status, 200);
}

#[tokio::test]
async fn an_http2_client_that_shuts_its_window_is_cut_after_send_timeout() {
    let up = endless_upstream().await;
    let proxy = TestProxy::start(&one_slot_policy(&up, r#"send_timeout = "500ms""#)).await;
    // A window of 0 bytes per stream, never opened: no write ever blocks.
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut send = send.ready().await.unwrap();
    let (resp, _) = send
        .send_request(Request::get(proxy.url("/stream")).body(()).unwrap(), true)
        .unwrap();
    let resp = tokio::time::timeout(PATIENCE, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let started = Instant::now();
    while protect(&proxy).cut.get(Deadline::Send) == 0 {
        assert!(started.elapsed() < PATIENCE, "never cut");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The upstream's one slot serves the next client.
    let next = tokio::time::timeout(PATIENCE, async {
        let resp = client()
            .request(Request::get(proxy.url("/next")).body(empty()).unwrap())
            .await
            .unwrap();
        resp.status()
    })
    .await
    .expect("the slot came back");
    assert_eq!(next, 200);
    driver.abort();
}

#[tokio::test]
async fn an_http2_stream_waiting_on_a_slow_upstream_is_not_cut() {
    // The first token after 1.5 s (a model loading), send_timeout 500 ms:
    // the client is not the one waiting.
    let up = Upstream::start(|_req| async move {
        let (tx, body) = channel_body();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            tx.send("late token").await;
        });
        http::Response::builder().body(body).unwrap()
    })
    .await;
    let proxy = TestProxy::to(&up.url(), "send_timeout = \"500ms\"").await;
    let resp = tokio::time::timeout(
        PATIENCE,
        h2c_client().request(Request::get(proxy.url("/slow")).body(empty()).unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    use http_body_util::BodyExt;
    let body = tokio::time::timeout(PATIENCE, resp.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert_eq!(body, "late token");
    assert_eq!(protect(&proxy).cut.get(Deadline::Send), 0);
}

/// An upstream answering 24 MB in 64 KB pieces (the first after a short
/// wait, as a generation's): more than the socket buffers hold.
async fn big_answer_upstream() -> Upstream {
    Upstream::start(|_req| async move {
        let (tx, body) = channel_body();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let piece = Bytes::from(vec![b'x'; 64 * 1024]);
            for _ in 0..384 {
                if tx.closed_within(Duration::ZERO).await {
                    return;
                }
                tx.send(piece.clone()).await;
            }
        });
        http::Response::builder()
            .header("content-type", "application/octet-stream")
            .body(body)
            .unwrap()
    })
    .await
}

/// Whether a request finds the upstream's one slot free within `wait`
/// while a client that reads nothing holds a 24 MB answer.
async fn slot_free_behind_a_slow_client(read_ahead: &str, wait: Duration) -> bool {
    let up = big_answer_upstream().await;
    let proxy = TestProxy::start(&one_slot_policy(
        &up,
        &format!("read_ahead = \"{read_ahead}\"\nmax_read_ahead = \"64MB\""),
    ))
    .await;
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let next = tokio::time::timeout(wait, async {
        client()
            .request(Request::get(proxy.url("/next")).body(empty()).unwrap())
            .await
            .unwrap()
            .status()
    })
    .await;
    if next.is_ok() {
        // The slow client still gets every byte when it reads.
        let (out, _) = read_to_close_counting(&mut slow, PATIENCE).await;
        assert!(out >= 24 * 1024 * 1024, "{out} bytes");
        assert_eq!(
            protect(&proxy).read_ahead.held(),
            0,
            "read-ahead given back"
        );
    }
    next.is_ok()
}

/// Reads (at most `wait`) until 24 MB and the chunked end arrived or the
/// peer closed: the bytes read.
async fn read_to_close_counting(stream: &mut TcpStream, wait: Duration) -> (usize, bool) {
    let mut total = 0;
    let mut tail = Vec::new();
    let done = tokio::time::timeout(wait, async {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    total += n;
                    tail.extend_from_slice(&buf[..n]);
                    if tail.len() > 16 {
                        tail.drain(..tail.len() - 16);
                    }
                    if tail.ends_with(b"\r\n0\r\n\r\n") {
                        return;
                    }
                }
            }
        }
    })
    .await
    .is_ok();
    (total, done)
}

#[tokio::test]
async fn a_long_answer_is_read_ahead_of_a_slow_client_within_read_ahead() {
    // Read ahead: the backend finishes and its slot is free at once.
    assert!(slot_free_behind_a_slow_client("32MB", Duration::from_secs(3)).await);
    // Without it, the backend is paced by the client: the slot stays taken.
    assert!(!slot_free_behind_a_slow_client("0B", Duration::from_millis(1500)).await);
}
