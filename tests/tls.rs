//! TLS termination (`[server.tls]`) with a real TLS client: HTTP/1.1 and h2
//! by ALPN, `X-Forwarded-Proto: https` upstream, garbage in place of a
//! handshake refused while the proxy keeps serving, a renewed certificate
//! taken up by a reload, and bad files refused by `check` with their line.

mod support;

use bytes::Bytes;
use http::{Request, Version};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Certs {
    ca: TestCa,
    cert: TempFile,
    key: TempFile,
}

fn certs(tag: &str) -> Certs {
    let ca = TestCa::new(tag);
    let (cert, key) = ca.issue_pem();
    Certs {
        cert: TempFile::new("cert.pem", &cert),
        key: TempFile::new("key.pem", &key),
        ca,
    }
}

fn policy(upstream: &str, c: &Certs) -> String {
    format!(
        "[server.tls]\nlisten = [\"127.0.0.1:8443\"]\ncert = \"{}\"\nkey = \"{}\"\n[upstreams.up]\nservers = [{{ url = \"{upstream}\" }}]\n[[route]]\nname = \"all\"\nupstream = \"up\"\n",
        c.cert.display(),
        c.key.display()
    )
}

/// One GET over TLS, offering `alpn`; the response's version and body, and
/// the certificate the proxy showed.
async fn get_tls(
    proxy: &TestProxy,
    ca: &TestCa,
    alpn: &[u8],
) -> (Version, serde_json::Value, Vec<u8>) {
    let tcp = TcpStream::connect(proxy.tls.unwrap()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = ca.connector(&[alpn]).connect(name, tcp).await.unwrap();
    let shown = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let req = Request::get("/hello")
        .header("host", "localhost")
        .body(empty())
        .unwrap();
    let resp = if alpn == b"h2" {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::get("https://localhost/hello")
            .body(empty())
            .unwrap();
        send.send_request(req).await.unwrap()
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        send.send_request(req).await.unwrap()
    };
    let version = resp.version();
    let body: Bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (version, json(&body), shown)
}

#[tokio::test]
async fn http1_and_h2_over_tls_reach_the_upstream_as_https() {
    let up = Upstream::echo().await;
    let c = certs("tls-ca");
    let proxy = TestProxy::start(&policy(&up.url(), &c)).await;
    let (version, echoed, _) = get_tls(&proxy, &c.ca, b"http/1.1").await;
    assert_eq!(version, Version::HTTP_11);
    assert_eq!(echoed["path"], "/hello");
    assert_eq!(echoed["headers"]["x-forwarded-proto"], "https");
    let (version, echoed, _) = get_tls(&proxy, &c.ca, b"h2").await;
    assert_eq!(version, Version::HTTP_2);
    assert_eq!(echoed["headers"]["x-forwarded-proto"], "https");
    // The plain listener still speaks plain HTTP.
    assert_eq!(get(&proxy.url("/x")).await.0.status, 200);
}

#[tokio::test]
async fn garbage_instead_of_a_handshake_is_dropped_and_serving_goes_on() {
    let up = Upstream::echo().await;
    let c = certs("tls-garbage");
    let proxy = TestProxy::start(&policy(&up.url(), &c)).await;
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0][..],
    ] {
        let mut tcp = TcpStream::connect(proxy.tls.unwrap()).await.unwrap();
        tcp.write_all(garbage).await.unwrap();
        let mut buf = [0u8; 512];
        let read = tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .expect("the proxy closes, it does not hang");
        // A TLS alert at most, never an HTTP answer.
        if let Ok(n) = read {
            assert!(!String::from_utf8_lossy(&buf[..n]).contains("HTTP/1.1"));
        }
    }
    let (_, echoed, _) = get_tls(&proxy, &c.ca, b"http/1.1").await;
    assert_eq!(echoed["path"], "/hello");
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn a_reload_takes_up_renewed_certificate_files() {
    let up = Upstream::echo().await;
    let c = certs("tls-renew");
    let file = TempFile::new("policy.toml", &policy(&up.url(), &c));
    let proxy = TestProxy::start_file(&file.0).await;
    let (_, _, before) = get_tls(&proxy, &c.ca, b"http/1.1").await;
    let (cert, key) = c.ca.issue_pem();
    c.cert.write(&cert);
    c.key.write(&key);
    proxy.reload().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let (_, _, after) = get_tls(&proxy, &c.ca, b"http/1.1").await;
    assert_ne!(before, after, "the renewed certificate is shown");
}

#[test]
fn tls_file_mistakes_name_their_line_and_fix() {
    let c = certs("tls-check");
    let other = certs("tls-other");
    let up = "http://127.0.0.1:1";
    let base = policy(up, &c);
    let cases = [
        (
            base.replace(&c.cert.display(), "/nonexistent/cert.pem"),
            "server.tls.cert: cannot read /nonexistent/cert.pem",
        ),
        (
            base.replace(&c.key.display(), &c.cert.display()),
            "server.tls.key:",
        ),
        (
            base.replace(&c.key.display(), &other.key.display()),
            "the certificate and key cannot be used together",
        ),
        (
            format!("[server]\nlisten = [\"127.0.0.1:8443\"]\n{base}"),
            "127.0.0.1:8443 is also in server.listen",
        ),
    ];
    for (text, says) in cases {
        let err = hyperion::Policy::parse("proxy.toml", &text)
            .err()
            .unwrap_or_else(|| panic!("accepted: {text}"))
            .to_string();
        assert!(
            err.starts_with("proxy.toml:") && err.contains(says),
            "{err}"
        );
    }
    // TLS alone is a valid server.
    let tls_only = format!("[server]\nlisten = []\n{base}");
    let p = hyperion::Policy::parse("proxy.toml", &tls_only).unwrap();
    assert!(p.server.listen.is_empty());
    assert!(p.to_string().contains("tls:       https://127.0.0.1:8443"));
}
