//! Streams: responses and uploads flow chunk by chunk, upgrades are tunnelled,
//! and a stream that breaks upstream breaks visibly for the client.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

async fn next_frame(body: &mut hyper::body::Incoming) -> Bytes {
    let frame = tokio::time::timeout(PATIENCE, body.frame())
        .await
        .expect("the chunk arrives while the upstream is still streaming")
        .expect("a frame")
        .expect("no error");
    frame.into_data().expect("data frame")
}

#[tokio::test]
async fn ndjson_chunks_reach_the_client_before_the_upstream_finishes() {
    let (up, mut streams) = stepped_upstream("application/x-ndjson").await;
    let proxy = TestProxy::to(&up.url(), "").await;
    let req = Request::post(proxy.url("/api/generate"))
        .body(full(r#"{"model":"m","prompt":"p"}"#))
        .unwrap();
    let pending = tokio::spawn(client().request(req));
    let upstream_body = streams.recv().await.unwrap();
    upstream_body
        .send(r#"{"response":"Hel","done":false}"#.to_owned() + "\n")
        .await;
    let resp = pending.await.unwrap().unwrap();
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let mut body = resp.into_body();
    // The client holds the first line while the upstream has not written the last.
    assert_eq!(
        next_frame(&mut body).await,
        "{\"response\":\"Hel\",\"done\":false}\n"
    );
    upstream_body
        .send("{\"response\":\"lo\",\"done\":false}\n")
        .await;
    assert_eq!(
        next_frame(&mut body).await,
        "{\"response\":\"lo\",\"done\":false}\n"
    );
    upstream_body
        .send("{\"response\":\"\",\"done\":true}\n")
        .await;
    assert_eq!(
        next_frame(&mut body).await,
        "{\"response\":\"\",\"done\":true}\n"
    );
    drop(upstream_body);
    let rest = tokio::time::timeout(PATIENCE, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert!(rest.is_empty());
}

#[tokio::test]
async fn sse_events_are_passed_on_one_by_one() {
    let (up, mut streams) = stepped_upstream("text/event-stream").await;
    let proxy = TestProxy::to(&up.url(), "").await;
    let req = Request::post(proxy.url("/v1/chat/completions"))
        .body(full("{}"))
        .unwrap();
    let pending = tokio::spawn(client().request(req));
    let upstream_body = streams.recv().await.unwrap();
    upstream_body.send("data: {\"delta\":\"a\"}\n\n").await;
    let mut body = pending.await.unwrap().unwrap().into_body();
    for event in [
        "data: {\"delta\":\"a\"}\n\n",
        "data: {\"delta\":\"b\"}\n\n",
        "data: [DONE]\n\n",
    ] {
        if event != "data: {\"delta\":\"a\"}\n\n" {
            upstream_body.send(event).await;
        }
        assert_eq!(next_frame(&mut body).await, event);
    }
}

#[tokio::test]
async fn uploads_stream_to_the_upstream_before_the_client_finishes() {
    let first_arrived = Arc::new(Notify::new());
    let arrived = first_arrived.clone();
    let up = Upstream::start(move |req| {
        let arrived = arrived.clone();
        async move {
            let mut body = req.into_body();
            let mut got = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(d) = frame.data_ref() {
                    if got.is_empty() {
                        arrived.notify_one();
                    }
                    got.extend_from_slice(d);
                }
            }
            response(200, got)
        }
    })
    .await;
    let proxy = TestProxy::to(&up.url(), "").await;
    let (upload, body) = channel_body();
    let pending = tokio::spawn(send(
        Request::post(proxy.url("/upload")).body(body).unwrap(),
    ));
    upload.send("first part, ").await;
    // The upstream sees the first part while the client still holds the rest.
    tokio::time::timeout(PATIENCE, first_arrived.notified())
        .await
        .expect("first part forwarded before the upload ended");
    upload.send("second part").await;
    drop(upload);
    let (parts, bytes) = pending.await.unwrap();
    assert_eq!(parts.status, 200);
    assert_eq!(bytes, "first part, second part");
}

#[tokio::test]
async fn an_upstream_dying_mid_stream_truncates_the_client_response() {
    let (up, mut streams) = stepped_upstream("application/x-ndjson").await;
    let proxy = TestProxy::to(&up.url(), "").await;
    let pending =
        tokio::spawn(client().request(Request::get(proxy.url("/dies")).body(empty()).unwrap()));
    let upstream_body = streams.recv().await.unwrap();
    upstream_body.send("{\"response\":\"partial\"}\n").await;
    let resp = pending.await.unwrap().unwrap();
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let mut body = resp.into_body();
    assert_eq!(next_frame(&mut body).await, "{\"response\":\"partial\"}\n");
    upstream_body.fail().await;
    let end = tokio::time::timeout(PATIENCE, body.collect())
        .await
        .expect("the stream ends");
    assert!(
        end.is_err(),
        "a broken upstream stream must not look like a clean end"
    );
    let line = proxy.log_for(&id).await;
    assert_eq!(line["outcome"], "upstream_error");
}

#[tokio::test]
async fn an_upstream_silent_past_idle_timeout_truncates_the_client_response() {
    let (up, mut streams) = stepped_upstream("application/x-ndjson").await;
    let policy = format!(
        "[upstreams.up]\nservers = [{{ url = \"{}\" }}]\nidle_timeout = \"200ms\"\n[[route]]\nname = \"all\"\nupstream = \"up\"\n",
        up.url()
    );
    let proxy = TestProxy::start(&policy).await;
    let pending =
        tokio::spawn(client().request(Request::get(proxy.url("/quiet")).body(empty()).unwrap()));
    let upstream_body = streams.recv().await.unwrap();
    upstream_body.send("first\n").await;
    let mut body = pending.await.unwrap().unwrap().into_body();
    assert_eq!(next_frame(&mut body).await, "first\n");
    // The upstream now says nothing; the proxy gives up after 200ms.
    let end = tokio::time::timeout(PATIENCE, body.collect())
        .await
        .expect("the proxy ends the stream");
    assert!(end.is_err());
    drop(upstream_body);
}

#[tokio::test]
async fn websocket_upgrades_are_tunnelled() {
    let up = upgrading_upstream(b"echo:").await;
    let proxy = TestProxy::to(&up.url(), "").await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut stream).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    let seen = up.last().headers;
    assert_eq!(
        seen["upgrade"], "websocket",
        "the upgrade request reaches the upstream"
    );
    assert_eq!(seen["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");

    for msg in ["hello", "again"] {
        stream.write_all(msg.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 5 + msg.len()];
        tokio::time::timeout(PATIENCE, stream.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(buf, format!("echo:{msg}").as_bytes());
    }
}

#[tokio::test]
async fn h2c_upgrade_requests_are_not_tunnelled() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::to(&up.url(), "").await;
    let out = raw(
        proxy.addr,
        b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        Duration::from_millis(500),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(!up.last().headers.contains_key("upgrade"));
}
