//! Upstream connections: kept alive and reused once a response has been read
//! to its end, never reused after a cut one, and an upstream that closes an
//! idle connection costs the client nothing.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request};
use http_body_util::BodyExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[tokio::test]
async fn sequential_requests_share_one_upstream_connection() {
    let up = Upstream::start(|req| async move {
        match req.uri().path() {
            "/empty" => response(204, ""),
            _ => response(200, "x".repeat(100_000)),
        }
    })
    .await;
    let proxy = TestProxy::to(&up.url(), "").await;
    for (method, path) in [
        (Method::GET, "/big"),
        (Method::HEAD, "/big"),
        (Method::GET, "/empty"),
        (Method::POST, "/big"),
        (Method::GET, "/big"),
    ] {
        let req = Request::builder()
            .method(method)
            .uri(proxy.url(path))
            .body(full("payload"))
            .unwrap();
        let (parts, _) = send(req).await;
        assert!(parts.status.is_success(), "{path}: {}", parts.status);
    }
    assert_eq!(up.count(), 5);
    assert_eq!(
        up.connections(),
        1,
        "each response was read to its end, so its connection was reused"
    );
}

#[tokio::test]
async fn a_response_the_client_abandons_does_not_return_its_connection() {
    let (up, mut streams) = stepped_upstream("application/x-ndjson").await;
    let proxy = TestProxy::to(&up.url(), "").await;

    let pending = tokio::spawn(
        client().request(
            Request::post(proxy.url("/api/generate"))
                .body(full("{}"))
                .unwrap(),
        ),
    );
    let first = streams.recv().await.unwrap();
    first.send("{\"response\":\"a\"}\n").await;
    let resp = pending.await.unwrap().unwrap();
    // The client leaves mid-stream.
    drop(resp);

    let pending = tokio::spawn(
        client().request(
            Request::post(proxy.url("/api/generate"))
                .body(full("{}"))
                .unwrap(),
        ),
    );
    let second = tokio::time::timeout(PATIENCE, streams.recv())
        .await
        .expect("the second request reaches the upstream")
        .unwrap();
    second.send("{\"response\":\"b\",\"done\":true}\n").await;
    drop(second);
    let resp = pending.await.unwrap().unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "{\"response\":\"b\",\"done\":true}\n");
    assert_eq!(
        up.connections(),
        2,
        "the half-read connection was closed, not handed to the next request"
    );
    drop(first);
}

/// An upstream that answers one request per connection and then closes it
/// without saying so, as a server whose keep-alive timer just ran out does.
async fn closing_upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => head.extend_from_slice(&buf[..k]),
                    }
                }
                let body = format!("conn {n}");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(resp.as_bytes()).await;
                // Closed right after the response, with no `Connection: close`.
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn an_upstream_closing_idle_connections_costs_the_client_nothing() {
    let (addr, accepted) = closing_upstream().await;
    let proxy = TestProxy::to(&format!("http://{addr}"), "").await;
    for i in 1..=4 {
        let (parts, body) = get(&proxy.url("/")).await;
        assert_eq!(parts.status, 200, "request {i}");
        assert_eq!(body, format!("conn {i}"));
        // Let the close reach the proxy before the next request.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_post_on_a_connection_the_upstream_closed_goes_out_once_on_a_new_one() {
    // A POST is never retried once it may have reached the upstream (RFC 9110
    // §9.2.2), so this passes only if the proxy finds the pooled connection
    // closed before writing the request on it.
    let (addr, accepted) = closing_upstream().await;
    let proxy = TestProxy::to(&format!("http://{addr}"), "").await;
    for i in 1..=4 {
        let req = Request::post(proxy.url("/api/generate"))
            .body(full(r#"{"prompt":"hi"}"#))
            .unwrap();
        let (parts, body) = send(req).await;
        assert_eq!(parts.status, 200, "request {i}");
        assert_eq!(body, format!("conn {i}"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 4);
}
