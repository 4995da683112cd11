//! Another spelling of a path does not walk around the policy: routes, the
//! cache key and the upstream all see one normalized path (issue 28), and a
//! path that cannot be normalized safely gets 400.

mod support;

use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn policy(upstream: &str) -> String {
    format!(
        r#"
[upstreams.up]
servers = [{{ url = "{upstream}" }}]

[[route]]
name = "generate"
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

/// Sends a raw request (the client library would normalize some targets
/// itself) and returns the response head.
async fn raw(proxy: &TestProxy, target: &str, body: &str) -> String {
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let req = format!(
        "POST {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    read_head(&mut s).await
}

#[tokio::test]
async fn other_spellings_of_a_path_reach_the_same_route_cache_entry_and_upstream_path() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::start(&policy(&up.url())).await;
    let body = r#"{"model":"m","prompt":"hi","stream":false}"#;
    let first = raw(&proxy, "/api/generate", body).await;
    assert!(first.contains("x-cache: MISS"), "{first}");
    for target in [
        "/api/gener%61te",
        "//api/generate",
        "/api/./generate",
        "/api/x/../generate",
        "/api/x/%2e%2e/generate?",
    ] {
        let head = raw(&proxy, target, body).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{target}: {head}");
        // The generate route's cache answered: same route, same key.
        assert!(head.contains("x-cache: HIT"), "{target}: {head}");
    }
    assert_eq!(up.count(), 1, "one upstream request for every spelling");
    // An uncached spelling goes upstream in its normal form.
    let head = raw(&proxy, "/api//x/./y/../tags%2fz?b=1", "{}").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(up.last().uri.to_string(), "/api/x/tags%2Fz?b=1");
}

#[tokio::test]
async fn a_path_that_cannot_be_normalized_safely_gets_400() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::start(&policy(&up.url())).await;
    for target in [
        "/api/%00generate",
        "/api/%zz",
        "/../api/generate",
        "/api/%2e%2e/%2e%2e/x",
    ] {
        let head = raw(&proxy, target, "{}").await;
        assert!(head.starts_with("HTTP/1.1 400"), "{target}: {head}");
    }
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn hosts_compare_without_case_or_trailing_dot_and_two_hosts_get_400() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::start(&format!(
        "[upstreams.up]\nservers = [{{ url = \"{}\" }}]\n\n[[route]]\nname = \"api\"\nmatch = {{ host = \"api.example.com\" }}\nupstream = \"up\"\n",
        up.url()
    ))
    .await;
    for host in [
        "api.example.com",
        "API.Example.COM.",
        "api.example.com.:8080",
    ] {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        let req = format!("GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{host}: {head}");
    }
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: api.example.com\r\nHost: other.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert_eq!(up.count(), 3);
}
