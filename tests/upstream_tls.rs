//! `https://` upstream servers: a real TLS server on loopback with a
//! certificate from a test CA. Trusted through `ca_file`, it is proxied to
//! like any server (SNI and the certificate's name from the URL's host, and
//! health checks over TLS too); not trusted (the platform's CAs, or another
//! CA), the request gets 502 and nothing reaches the server.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::net::TcpListener;

/// A TLS server answering every request with `echo`, its certificate for
/// `localhost` and 127.0.0.1 issued by `ca`. Records the SNI it was sent.
struct TlsUpstream {
    addr: SocketAddr,
    sni: Arc<Mutex<Vec<Option<String>>>>,
    requests: Arc<std::sync::atomic::AtomicUsize>,
    checks: Arc<std::sync::atomic::AtomicUsize>,
}

impl TlsUpstream {
    async fn start(ca: &TestCa) -> TlsUpstream {
        let (cert, key) = ca.issue();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sni = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let checks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (seen_sni, counter, checked) = (sni.clone(), requests.clone(), checks.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, seen_sni, counter, checked) = (
                    acceptor.clone(),
                    seen_sni.clone(),
                    counter.clone(),
                    checked.clone(),
                );
                tokio::spawn(async move {
                    // A client that does not trust us gives up here.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    seen_sni
                        .lock()
                        .unwrap()
                        .push(tls.get_ref().1.server_name().map(str::to_owned));
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (counter, checked) = (counter.clone(), checked.clone());
                        async move {
                            let which = if req.uri().path() == "/health" {
                                checked
                            } else {
                                counter
                            };
                            which.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            Ok::<_, Infallible>(echo(req).await)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        TlsUpstream {
            addr,
            sni,
            requests,
            checks,
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }
}

fn tls_policy(url: &str, upstream_extra: &str) -> String {
    format!(
        "[upstreams.up]\nservers = [{{ url = \"{url}\" }}]\n{upstream_extra}\n\n[[route]]\nname = \"all\"\nupstream = \"up\"\npreserve_host = false\n"
    )
}

#[tokio::test]
async fn a_trusted_https_server_is_proxied_to_with_sni_from_its_url() {
    let ca = TestCa::new("ca");
    let up = TlsUpstream::start(&ca).await;
    let url = format!("https://localhost:{}", up.addr.port());
    let policy = tls_policy(
        &url,
        &format!(
            "ca_file = \"{}\"\n[upstreams.up.health]\npath = \"/health\"\ninterval = \"100ms\"\n",
            ca.file.display()
        ),
    );
    let proxy = TestProxy::start(&policy).await;
    for i in 0..3 {
        let (parts, body) = get(&proxy.url(&format!("/api/tags?n={i}"))).await;
        assert_eq!(parts.status, 200, "{}", String::from_utf8_lossy(&body));
        let echoed = json(&body);
        assert_eq!(echoed["path"], "/api/tags");
        assert_eq!(
            echoed["headers"]["host"],
            format!("localhost:{}", up.addr.port())
        );
    }
    assert_eq!(up.requests(), 3);
    // Kept-alive: one handshake for the requests (plus the checks').
    let sni = up.sni.lock().unwrap().clone();
    assert!(
        sni.iter().all(|s| s.as_deref() == Some("localhost")),
        "{sni:?}"
    );
    // The health checks reach it over TLS, and pass.
    for _ in 0..250 {
        if up.checks.load(std::sync::atomic::Ordering::SeqCst) >= 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(up.checks.load(std::sync::atomic::Ordering::SeqCst) >= 3);
    let snapshot = proxy.fleet.pool("up").unwrap().snapshot();
    assert!(snapshot[0].state.healthy, "{snapshot:?}");
}

#[tokio::test]
async fn an_ip_address_url_is_checked_against_the_certificate_without_sni() {
    let ca = TestCa::new("ca-ip");
    let up = TlsUpstream::start(&ca).await;
    let policy = tls_policy(
        &format!("https://{}", up.addr),
        &format!("ca_file = \"{}\"\n", ca.file.display()),
    );
    let proxy = TestProxy::start(&policy).await;
    let (parts, _) = get(&proxy.url("/x")).await;
    assert_eq!(parts.status, 200);
    assert_eq!(up.sni.lock().unwrap().clone(), vec![None]);
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_502_and_reaches_nothing() {
    let ca = TestCa::new("ca-real");
    let other = TestCa::new("ca-other");
    let up = TlsUpstream::start(&ca).await;
    let url = format!("https://localhost:{}", up.addr.port());
    for extra in [
        // Another CA.
        format!("ca_file = \"{}\"\n", other.file.display()),
        // The platform's CAs, which know nothing of the test CA (or, on
        // a machine without any, the policy is refused: see below).
        String::new(),
    ] {
        let Ok(policy) = hyperion::policy::Policy::parse("t.toml", &tls_policy(&url, &extra))
        else {
            assert!(extra.is_empty(), "the ca_file policy is valid");
            continue;
        };
        drop(policy);
        let proxy = TestProxy::start(&tls_policy(&url, &extra)).await;
        let (parts, body) = get(&proxy.url("/x")).await;
        assert_eq!(parts.status, 502, "{}", String::from_utf8_lossy(&body));
        assert_eq!(json(&body)["error"]["code"], "upstream_unavailable");
        let log = proxy.log_lines();
        assert!(log.iter().any(|l| l["status"] == 502), "{log:?}");
    }
    assert_eq!(up.requests(), 0);
}

#[test]
fn tls_mistakes_name_their_line_and_fix() {
    let ca = TestCa::new("ca-check");
    let garbage = TempFile::new("garbage.pem", "not a certificate\n");
    let cases = [
        (
            tls_policy(
                "http://127.0.0.1:1",
                &format!("ca_file = \"{}\"", ca.file.display()),
            ),
            "proxy.toml:3:",
            "only read for https:// servers",
        ),
        (
            tls_policy("https://127.0.0.1:1", "ca_file = \"/nonexistent/ca.pem\""),
            "proxy.toml:3:",
            "cannot read /nonexistent/ca.pem",
        ),
        (
            tls_policy(
                "https://127.0.0.1:1",
                &format!("ca_file = \"{}\"", garbage.display()),
            ),
            "proxy.toml:3:",
            "holds no PEM certificate",
        ),
        (
            tls_policy("ftp://127.0.0.1:1", ""),
            "proxy.toml:2:",
            "has no http:// or https:// scheme",
        ),
    ];
    for (policy, at, says) in cases {
        let err = hyperion::policy::Policy::parse("proxy.toml", &policy)
            .err()
            .unwrap_or_else(|| panic!("accepted: {policy}"))
            .to_string();
        assert!(err.starts_with(at) && err.contains(says), "{err}");
    }
    // A relative ca_file is relative to the policy file.
    let dir = ca.file.0.parent().unwrap();
    let name = ca.file.0.file_name().unwrap().to_str().unwrap();
    let policy = tls_policy("https://127.0.0.1:1", &format!("ca_file = \"{name}\""));
    hyperion::policy::Policy::parse(dir.join("proxy.toml").to_str().unwrap(), &policy).unwrap();
}
