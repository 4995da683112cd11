//! Each failure has its status and JSON body; bad requests stop at the proxy.

mod support;

use std::time::Duration;

use http::Request;
use support::*;
use tokio::io::AsyncWriteExt;

fn assert_error(parts: &http::response::Parts, bytes: &[u8], status: u16, code: &str) {
    assert_eq!(parts.status, status, "{}", String::from_utf8_lossy(bytes));
    assert_eq!(parts.headers["content-type"], "application/json");
    let v = json(bytes);
    assert_eq!(v["error"]["code"], code);
    assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    assert_eq!(
        v["error"]["request_id"],
        parts.headers["x-request-id"].to_str().unwrap()
    );
}

#[tokio::test]
async fn refused_upstream_is_502() {
    let dead = refused_addr().await;
    let proxy = TestProxy::to(&format!("http://{dead}"), "").await;
    let (parts, bytes) = get(&proxy.url("/x")).await;
    assert_error(&parts, &bytes, 502, "upstream_unavailable");
    let message = json(&bytes)["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        !message.contains(&dead.to_string()),
        "clients are not told internal addresses: {message}"
    );
}

#[tokio::test]
async fn slow_response_headers_are_504() {
    let up = Upstream::start(|_req| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        response(200, "too late")
    })
    .await;
    let policy = format!(
        "[upstreams.up]\nservers = [{{ url = \"{}\" }}]\nresponse_timeout = \"200ms\"\n[[route]]\nname = \"all\"\nupstream = \"up\"\n",
        up.url()
    );
    let proxy = TestProxy::start(&policy).await;
    let (parts, bytes) = get(&proxy.url("/slow")).await;
    assert_error(&parts, &bytes, 504, "upstream_timeout");
}

#[tokio::test]
async fn a_pooled_connection_times_out_its_next_request_and_is_not_reused() {
    // The response timer stays with the upstream connection between
    // requests: the second request, on the same connection, must still be
    // cut off, and that connection dropped (its late answer may yet come).
    let up = Upstream::start(|req| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        response(200, "ok")
    })
    .await;
    let policy = format!(
        "[upstreams.up]\nservers = [{{ url = \"{}\" }}]\nresponse_timeout = \"300ms\"\n[[route]]\nname = \"all\"\nupstream = \"up\"\n",
        up.url()
    );
    let proxy = TestProxy::start(&policy).await;
    assert_eq!(get(&proxy.url("/fast")).await.0.status, 200);
    assert_eq!(up.connections(), 1);
    let started = std::time::Instant::now();
    let (parts, bytes) = get(&proxy.url("/slow")).await;
    assert_error(&parts, &bytes, 504, "upstream_timeout");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "cut off after response_timeout, not before nor at the upstream's pace: {waited:?}"
    );
    assert_eq!(
        up.connections(),
        1,
        "the slow request went on the pooled connection"
    );
    // Later requests get their whole timeout again, on a new connection.
    for _ in 0..3 {
        assert_eq!(get(&proxy.url("/fast")).await.0.status, 200);
    }
    assert_eq!(up.connections(), 2);
}

#[tokio::test]
async fn upstream_closing_without_response_is_502() {
    // Accepts, reads the request, closes without answering.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
            let _ = s.shutdown().await;
        }
    });
    let proxy = TestProxy::to(&format!("http://{addr}"), "").await;
    let (parts, bytes) = get(&proxy.url("/hangup")).await;
    assert_error(&parts, &bytes, 502, "upstream_error");
}

#[tokio::test]
async fn declared_oversized_body_is_413_and_never_reaches_the_upstream() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::to(&up.url(), "max_request_body = \"1KB\"").await;
    let (parts, bytes) = send(
        Request::post(proxy.url("/big"))
            .body(full(vec![b'x'; 2048]))
            .unwrap(),
    )
    .await;
    assert_error(&parts, &bytes, 413, "body_too_large");
    assert_eq!(up.count(), 0);
    // At the limit is fine.
    let (parts, _) = send(
        Request::post(proxy.url("/ok"))
            .body(full(vec![b'x'; 1024]))
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 200);
}

#[tokio::test]
async fn streamed_oversized_body_is_cut_off_with_413() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::to(&up.url(), "max_request_body = \"1KB\"").await;
    let (upload, body) = channel_body();
    let pending = tokio::spawn(send(
        Request::post(proxy.url("/chunked")).body(body).unwrap(),
    ));
    for _ in 0..8 {
        upload.send(vec![b'y'; 512]).await;
    }
    drop(upload);
    let (parts, bytes) = pending.await.unwrap();
    assert_error(&parts, &bytes, 413, "body_too_large");
}

#[tokio::test]
async fn oversized_headers_are_431() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::to(&up.url(), "max_header_size = \"4KB\"").await;
    let req = Request::get(proxy.url("/h"))
        .header("x-big", "a".repeat(5000))
        .body(empty())
        .unwrap();
    let (parts, bytes) = send(req).await;
    assert_error(&parts, &bytes, 431, "headers_too_large");
    assert_eq!(up.count(), 0);
    // Far past the limit hyper refuses the head before it is buffered.
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Huge: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let out = raw(proxy.addr, huge.as_bytes(), Duration::from_secs(2)).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
}

#[tokio::test]
async fn malformed_requests_are_400() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::to(&up.url(), "").await;
    let out = raw(
        proxy.addr,
        b"GET / HTTP/1.1\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "missing Host: {out}");
    assert!(out.contains("\"code\":\"bad_request\""), "{out}");
    let out = raw(proxy.addr, b"GARBAGE\r\n\r\n", Duration::from_secs(2)).await;
    assert!(out.starts_with("HTTP/1.1 400"), "unparseable: {out}");
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn a_request_with_both_content_length_and_chunked_is_not_smuggled() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::to(&up.url(), "").await;
    let req = b"POST /te HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let out = raw(proxy.addr, req, Duration::from_secs(2)).await;
    // hyper refuses the ambiguous framing outright, or the upstream gets the
    // chunked body without the stale length: never a length that disagrees.
    if out.starts_with("HTTP/1.1 200") {
        assert!(out.contains("\"body\":\"hello\""), "{out}");
        assert!(
            !up.last().headers.contains_key("content-length")
                || up.last().headers["content-length"] == "5"
        );
    } else {
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    }
}

#[tokio::test]
async fn the_proxy_keeps_serving_after_errors() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::to(&up.url(), "max_request_body = \"1KB\"").await;
    for _ in 0..3 {
        raw(proxy.addr, b"GARBAGE\r\n\r\n", Duration::from_millis(200)).await;
        send(
            Request::post(proxy.url("/big"))
                .body(full(vec![b'x'; 4096]))
                .unwrap(),
        )
        .await;
    }
    let (parts, _) = get(&proxy.url("/fine")).await;
    assert_eq!(parts.status, 200);
}

#[tokio::test]
async fn a_client_leaving_before_the_response_is_logged_as_499() {
    let up = Upstream::start(|_req| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        response(200, "nobody is waiting")
    })
    .await;
    let proxy = TestProxy::to(&up.url(), "").await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /abandoned HTTP/1.1\r\nHost: x\r\nX-Request-Id: abandoned-1\r\n\r\n")
        .await
        .unwrap();
    while up.count() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(stream);
    let line = proxy.log_for("abandoned-1").await;
    assert_eq!(line["status"], 499);
    assert_eq!(line["outcome"], "aborted");
    assert_eq!(line["error"], "client_closed_request");
}
