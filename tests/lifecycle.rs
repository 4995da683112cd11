//! Connection life: client timeouts, keep-alive, and the graceful drain.

mod support;

use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GET: &[u8] = b"GET /ka HTTP/1.1\r\nHost: x\r\n\r\n";

/// Reads one response head and its Content-Length body from a kept-alive connection.
async fn read_response(stream: &mut TcpStream) -> String {
    let head = read_head(stream).await;
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.unwrap();
    head
}

#[tokio::test]
async fn a_slow_request_head_is_cut_off() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::to(&up.url(), "header_read_timeout = \"300ms\"").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    a_head_that_never_ends_is_cut_off(&mut stream).await;
    assert_eq!(up.count(), 0);
}

/// Sends the start of a request head and no more: the proxy closes the
/// connection (perhaps with a 408) by the header timeout, well before the
/// test's patience runs out.
async fn a_head_that_never_ends_is_cut_off(stream: &mut TcpStream) {
    stream
        .write_all(b"GET /slowloris HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let out = read_until_close(stream, PATIENCE).await;
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed after {:?}: by the header timeout, not by the test's patience",
        started.elapsed()
    );
}

#[tokio::test]
async fn idle_keep_alive_outlives_the_header_timeout_then_closes() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::to(
        &up.url(),
        "header_read_timeout = \"200ms\"\nidle_timeout = \"1s\"",
    )
    .await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(GET).await.unwrap();
    assert!(read_response(&mut stream).await.starts_with("HTTP/1.1 200"));
    // Idle for longer than the header timeout but less than idle_timeout: still open.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stream.write_all(GET).await.unwrap();
    assert!(read_response(&mut stream).await.starts_with("HTTP/1.1 200"));
    // Then idle past idle_timeout: the proxy closes it.
    let started = std::time::Instant::now();
    let rest = read_until_close(&mut stream, PATIENCE).await;
    assert!(rest.is_empty(), "{rest}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_slow_head_on_a_keep_alive_connection_is_cut_off_by_the_header_timeout() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::to(
        &up.url(),
        "header_read_timeout = \"300ms\"\nidle_timeout = \"20s\"",
    )
    .await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(GET).await.unwrap();
    assert!(read_response(&mut stream).await.starts_with("HTTP/1.1 200"));
    // Idle a while (the connection's timer now waits for idle_timeout)...
    tokio::time::sleep(Duration::from_millis(500)).await;
    // ...then the next head starts and never ends: it gets
    // header_read_timeout, not what is left of idle_timeout.
    a_head_that_never_ends_is_cut_off(&mut stream).await;
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn a_long_wait_for_the_upstream_is_not_an_idle_connection() {
    let up = Upstream::start(|_req| async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        response(200, "worth the wait")
    })
    .await;
    let proxy = TestProxy::to(
        &up.url(),
        "header_read_timeout = \"200ms\"\nidle_timeout = \"300ms\"",
    )
    .await;
    let (parts, bytes) = get(&proxy.url("/generate")).await;
    assert_eq!(parts.status, 200);
    assert_eq!(bytes, "worth the wait");
}

#[tokio::test]
async fn shutdown_drains_an_in_flight_stream_and_refuses_new_connections() {
    let (up, mut senders) = stepped_upstream("application/x-ndjson").await;
    let mut proxy = TestProxy::to(&up.url(), "shutdown_grace = \"10s\"").await;
    let pending =
        tokio::spawn(client().request(Request::get(proxy.url("/stream")).body(empty()).unwrap()));
    let upstream_body = senders.recv().await.unwrap();
    upstream_body.send("one\n").await;
    let mut body = pending.await.unwrap().unwrap().into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "one\n");

    proxy.shutdown();
    // New connections are refused once the listener is closed.
    let mut refused = false;
    for _ in 0..100 {
        if TcpStream::connect(proxy.addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "the listener closes on shutdown");

    // The in-flight stream still completes.
    upstream_body.send("two\n").await;
    upstream_body.send("three\n").await;
    drop(upstream_body);
    let rest = tokio::time::timeout(PATIENCE, body.collect())
        .await
        .unwrap()
        .expect("clean end")
        .to_bytes();
    assert_eq!(rest, "two\nthree\n");
    let done = proxy.done.take().unwrap();
    tokio::time::timeout(PATIENCE, done)
        .await
        .expect("serve() returns once drained")
        .unwrap();
}

#[tokio::test]
async fn shutdown_grace_bounds_the_drain() {
    let (up, mut senders) = stepped_upstream("application/x-ndjson").await;
    let mut proxy = TestProxy::to(&up.url(), "shutdown_grace = \"300ms\"").await;
    let pending =
        tokio::spawn(client().request(Request::get(proxy.url("/forever")).body(empty()).unwrap()));
    let _upstream_body = senders.recv().await.unwrap();
    let resp = pending.await.unwrap().unwrap();
    proxy.shutdown();
    let started = std::time::Instant::now();
    let done = proxy.done.take().unwrap();
    tokio::time::timeout(PATIENCE, done)
        .await
        .expect("serve() returns after the grace period")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250));
    let end = tokio::time::timeout(PATIENCE, resp.into_body().collect())
        .await
        .unwrap();
    assert!(
        end.is_err(),
        "a stream cut by the grace period is not a clean end"
    );
}
