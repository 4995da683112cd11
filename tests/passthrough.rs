//! Pass-through: what the upstream receives and what the client gets back.

mod support;

use http::{Method, Request};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn methods_bodies_queries_and_statuses_pass_through() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::to(&up.url(), "").await;

    for method in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        let body = if method == "GET" {
            empty()
        } else {
            full(format!("body of {method}"))
        };
        let req = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).unwrap())
            .uri(proxy.url("/a/b?x=1&y=two"))
            .header("x-custom", "kept")
            .body(body)
            .unwrap();
        let (parts, bytes) = send(req).await;
        assert_eq!(parts.status, 200, "{method}");
        let seen = json(&bytes);
        assert_eq!(seen["method"], method);
        assert_eq!(seen["path"], "/a/b");
        assert_eq!(seen["query"], "x=1&y=two");
        assert_eq!(seen["headers"]["x-custom"], "kept");
        if method != "GET" {
            assert_eq!(seen["body"], format!("body of {method}"));
        }
    }
    for status in [201, 204, 301, 404, 418, 500, 503] {
        let (parts, _) = get(&proxy.url(&format!("/s?status={status}"))).await;
        assert_eq!(
            parts.status, status,
            "upstream status {status} reaches the client unchanged"
        );
    }
    // HEAD: headers of the GET, no body.
    let (parts, bytes) = send(Request::head(proxy.url("/h")).body(empty()).unwrap()).await;
    assert_eq!(parts.status, 200);
    assert!(bytes.is_empty());
    assert_eq!(up.count(), 6 + 7 + 1);
}

#[tokio::test]
async fn large_bodies_stream_both_ways_intact() {
    let up = Upstream::start(|req| async move {
        // Echo the body back as it arrives.
        let body = http_body_util::BodyExt::boxed(http_body_util::BodyExt::map_err(
            req.into_body(),
            |e| -> BoxError { Box::new(e) },
        ));
        http::Response::new(body)
    })
    .await;
    let proxy = TestProxy::to(&up.url(), "").await;
    let payload: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let (parts, bytes) = send(
        Request::post(proxy.url("/upload"))
            .body(full(payload.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 200);
    assert_eq!(bytes.len(), payload.len());
    assert!(bytes == payload, "4 MiB body round-trips byte for byte");
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let up = Upstream::start(|req| async move {
        let mut resp = echo(req).await;
        let h = resp.headers_mut();
        h.insert("connection", "x-upstream-private".parse().unwrap());
        h.insert("x-upstream-private", "secret".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-upstream-public", "fine".parse().unwrap());
        resp
    })
    .await;
    let proxy = TestProxy::to(&up.url(), "").await;
    let req = Request::get(proxy.url("/hop"))
        .header("connection", "x-client-private")
        .header("x-client-private", "secret")
        .header("keep-alive", "timeout=9")
        .header("proxy-connection", "keep-alive")
        .header("te", "trailers")
        .header("upgrade", "something")
        .header("x-client-public", "fine")
        .body(empty())
        .unwrap();
    let (parts, _) = send(req).await;
    let seen = up.last().headers;
    for name in [
        "x-client-private",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
    ] {
        assert!(
            !seen.contains_key(name),
            "{name} must not reach the upstream"
        );
    }
    assert_eq!(seen["x-client-public"], "fine");
    assert!(!parts.headers.contains_key("x-upstream-private"));
    assert!(!parts.headers.contains_key("keep-alive"));
    assert_eq!(parts.headers["x-upstream-public"], "fine");
}

#[tokio::test]
async fn expect_100_continue_is_answered_here_and_not_forwarded() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::to(&up.url(), "").await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /expect HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // The client waits for the 100 before it sends the body, as curl does.
    while !String::from_utf8_lossy(&out).contains("100 Continue") {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .expect("a 100 Continue in time")
            .unwrap();
        assert!(
            n > 0,
            "closed before 100 Continue: {}",
            String::from_utf8_lossy(&out)
        );
        out.extend_from_slice(&buf[..n]);
    }
    stream.write_all(b"hello").await.unwrap();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut out))
        .await
        .expect("the answer in time")
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\"body\":\"hello\""), "{out}");
    let seen = up.last().headers;
    assert!(!seen.contains_key("expect"), "Expect is hop-by-hop here");
}

#[tokio::test]
async fn forwarding_headers_from_an_untrusted_peer_are_replaced() {
    let up = Upstream::echo().await;
    // 127.0.0.1 is not trusted here: its X-Forwarded-* claims are replaced.
    let proxy = TestProxy::to(&up.url(), "trusted_proxies = [\"10.0.0.0/8\"]").await;
    let req = Request::get(proxy.url("/fwd"))
        .header("host", "api.example.com:8080")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "evil.example")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .body(empty())
        .unwrap();
    let (parts, _) = send(req).await;
    let seen = up.last().headers;
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "api.example.com:8080");
    assert_eq!(
        seen["host"], "api.example.com:8080",
        "the upstream sees the client's Host"
    );
    assert_eq!(seen["via"], "1.1 hyperion");
    assert_eq!(
        seen["traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    let id = parts.headers["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 32, "a request id is generated");
    assert_eq!(seen["x-request-id"], id, "the upstream sees the same id");
    assert_eq!(proxy.log_for(id).await["client"], "127.0.0.1");
}

#[tokio::test]
async fn forwarding_headers_from_a_trusted_peer_are_extended() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::to(&up.url(), "trusted_proxies = [\"127.0.0.1/32\"]").await;
    let req = Request::get(proxy.url("/fwd"))
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .header("via", "1.1 edge")
        .header("x-request-id", "client-chosen-id")
        .body(empty())
        .unwrap();
    let (parts, _) = send(req).await;
    let seen = up.last().headers;
    assert_eq!(seen["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "https");
    assert_eq!(seen["via"], "1.1 edge, 1.1 hyperion");
    assert_eq!(seen["x-request-id"], "client-chosen-id");
    assert_eq!(parts.headers["x-request-id"], "client-chosen-id");
    let line = proxy.log_for("client-chosen-id").await;
    assert_eq!(
        line["client"], "203.0.113.7",
        "the log names the client behind the trusted proxy"
    );
}

#[tokio::test]
async fn preserve_host_false_sends_the_servers_authority() {
    let up = Upstream::echo().await;
    let policy = simple_policy(&up.url(), "", "preserve_host = false");
    let proxy = TestProxy::start(&policy).await;
    let req = Request::get(proxy.url("/h"))
        .header("host", "public.example")
        .body(empty())
        .unwrap();
    send(req).await;
    let seen = up.last().headers;
    assert_eq!(seen["host"], up.addr.to_string());
    assert_eq!(seen["x-forwarded-host"], "public.example");
}

#[tokio::test]
async fn routes_match_in_file_order_on_method_path_and_host() {
    let a = Upstream::echo().await;
    let b = Upstream::echo().await;
    let c = Upstream::echo().await;
    let policy = format!(
        r#"
[upstreams.a]
servers = [{{ url = "{}" }}]
[upstreams.b]
servers = [{{ url = "{}" }}]
[upstreams.c]
servers = [{{ url = "{}" }}]

[[route]]
name = "generate"
match = {{ methods = ["POST"], paths = ["/api/generate", "/api/chat"] }}
upstream = "a"

[[route]]
name = "tenant"
match = {{ host = "*.tenant.example", path_prefix = "/api/" }}
upstream = "b"

[[route]]
name = "meta"
match = {{ methods = ["GET", "HEAD"], path_prefix = "/api/" }}
upstream = "c"
"#,
        a.url(),
        b.url(),
        c.url()
    );
    let proxy = TestProxy::start(&policy).await;
    send(
        Request::post(proxy.url("/api/generate"))
            .body(full("{}"))
            .unwrap(),
    )
    .await;
    send(
        Request::post(proxy.url("/api/chat"))
            .body(full("{}"))
            .unwrap(),
    )
    .await;
    send(
        Request::get(proxy.url("/api/tags"))
            .header("host", "x.tenant.example")
            .body(empty())
            .unwrap(),
    )
    .await;
    send(Request::get(proxy.url("/api/tags")).body(empty()).unwrap()).await;
    send(
        Request::get(proxy.url("/api/generate"))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!((a.count(), b.count(), c.count()), (2, 1, 2));

    let (parts, bytes) = send(Request::post(proxy.url("/api/tags")).body(empty()).unwrap()).await;
    assert_eq!(parts.status, 404);
    let err = json(&bytes);
    assert_eq!(err["error"]["code"], "no_route");
    assert_eq!(
        err["error"]["request_id"],
        parts.headers["x-request-id"].to_str().unwrap()
    );
    assert_eq!(parts.headers["content-type"], "application/json");
}

#[tokio::test]
async fn weighted_round_robin_spreads_requests() {
    let a = Upstream::echo().await;
    let b = Upstream::echo().await;
    let policy = format!(
        "[upstreams.up]\nservers = [{{ url = \"{}\", weight = 3 }}, {{ url = \"{}\" }}]\nbalance = \"round_robin\"\n[[route]]\nname = \"all\"\nupstream = \"up\"\n",
        a.url(),
        b.url()
    );
    let proxy = TestProxy::start(&policy).await;
    for _ in 0..40 {
        get(&proxy.url("/rr")).await;
    }
    assert_eq!((a.count(), b.count()), (30, 10));
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::to(&up.url(), "").await;
    let req = Request::post(proxy.url("/h2"))
        .body(full("over h2c"))
        .unwrap();
    let resp = h2c_client().request(req).await.expect("h2c response");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let bytes = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let seen = json(&bytes);
    assert_eq!(seen["body"], "over h2c");
    assert_eq!(seen["headers"]["via"], "2 hyperion");
    assert_eq!(
        seen["headers"]["host"],
        proxy.addr.to_string(),
        ":authority becomes Host upstream"
    );
    assert_eq!(
        up.last().version,
        http::Version::HTTP_11,
        "upstreams are spoken to in HTTP/1.1"
    );
}

/// A connection's first bytes say which protocol it speaks; when they arrive
/// in pieces that could still be either, the proxy waits for more rather
/// than guessing.
#[tokio::test]
async fn a_connection_whose_first_bytes_arrive_in_pieces_is_still_told_right() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::echo().await;
    let proxy = TestProxy::to(&up.url(), "").await;
    let pause = std::time::Duration::from_millis(50);

    // HTTP/2 prior knowledge, the preface split inside "PRI * HTTP/2.0".
    let mut h2 = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    h2.write_all(b"PRI * HT").await.unwrap();
    tokio::time::sleep(pause).await;
    h2.write_all(b"TP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    // An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
    h2.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let mut frame = [0u8; 9];
    tokio::time::timeout(PATIENCE, h2.read_exact(&mut frame))
        .await
        .expect("an answer in time")
        .expect("a frame header");
    assert_eq!(frame[3], 4, "the server's first frame is its SETTINGS");

    // An HTTP/1.1 POST whose first byte is also the preface's.
    let mut h1 = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    h1.write_all(b"P").await.unwrap();
    tokio::time::sleep(pause).await;
    h1.write_all(b"OST /split HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        .await
        .unwrap();
    let head = read_head(&mut h1).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(up.count(), 1);
    assert_eq!(up.last().uri.path(), "/split");
}

#[tokio::test]
async fn access_log_has_one_line_per_request() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::to(&up.url(), "").await;
    let (parts, bytes) = send(
        Request::post(proxy.url("/logged?q=1"))
            .header("user-agent", "t/1")
            .body(full("x"))
            .unwrap(),
    )
    .await;
    let id = parts.headers["x-request-id"].to_str().unwrap();
    let line = proxy.log_for(id).await;
    assert_eq!(line["method"], "POST");
    assert_eq!(line["path"], "/logged?q=1");
    assert_eq!(line["status"], 200);
    assert_eq!(line["bytes"], bytes.len());
    assert_eq!(line["route"], "all");
    assert_eq!(line["upstream"], up.url());
    assert_eq!(line["cache"], "-");
    assert_eq!(line["outcome"], "complete");
    assert_eq!(line["user_agent"], "t/1");
    // Bodies that are empty from the start are complete too.
    for (method, path) in [("GET", "/empty?status=204"), ("HEAD", "/head")] {
        let req = Request::builder()
            .method(method)
            .uri(proxy.url(path))
            .body(empty())
            .unwrap();
        let (parts, _) = send(req).await;
        let id = parts.headers["x-request-id"].to_str().unwrap();
        assert_eq!(
            proxy.log_for(id).await["outcome"],
            "complete",
            "{method} {path}"
        );
    }
    assert!(line["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(line["ts"].as_str().unwrap().ends_with('Z'));
}
