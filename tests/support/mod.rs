//! Test support: real upstream servers on `127.0.0.1:0`, the real proxy
//! started in-process from a policy string, and a real HTTP client.
//!
//! Upstreams record every request head they receive (so tests can assert what
//! reached them and how often); handlers decide the response, including
//! streams driven step by step from the test and bodies that fail mid-way.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyperion::generation::Reloader;
use hyperion::{LogSink, Policy};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestBody = BoxBody<Bytes, BoxError>;

/// Long enough never to fire on a healthy run; short enough that a proxy that
/// buffers a stream fails the test instead of hanging it.
pub const PATIENCE: Duration = Duration::from_secs(10);

// === upstreams ===

/// A request head as the upstream received it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
}

/// A real HTTP server standing in for Ollama or a FastAPI app.
pub struct Upstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    task: JoinHandle<()>,
}

impl Upstream {
    /// Serves every request with `handler`, recording each request head first.
    pub async fn start<F, Fut>(handler: F) -> Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler = Arc::new(handler);
        let recorded = seen.clone();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let handler = handler.clone();
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        recorded.lock().unwrap().push(Seen {
                            method: req.method().clone(),
                            uri: req.uri().clone(),
                            version: req.version(),
                            headers: req.headers().clone(),
                        });
                        let fut = handler(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            seen,
            accepted,
            task,
        }
    }

    /// An upstream answering every request with `echo`.
    pub async fn echo() -> Upstream {
        Upstream::start(echo).await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received so far.
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the upstream received a request")
    }

    /// Stops accepting; open connections keep being served.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An address nothing listens on: connections are refused.
pub async fn refused_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// Answers with a JSON description of the request: method, path, query,
/// headers (lower-case names, values joined with ", "), body as text.
/// `?status=N` sets the status.
pub async fn echo(req: Request<Incoming>) -> Response<TestBody> {
    let status = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("status=")))
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(200);
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut headers = serde_json::Map::new();
    for name in parts.headers.keys() {
        let values: Vec<&str> = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or("?"))
            .collect();
        headers.insert(name.as_str().to_owned(), json!(values.join(", ")));
    }
    let value = json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
        "body_len": body.len(),
    });
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(full(value.to_string()))
        .unwrap()
}

/// A body the test writes chunk by chunk, and can fail mid-way.
pub struct ChunkSender(mpsc::Sender<Result<Frame<Bytes>, BoxError>>);

impl ChunkSender {
    pub async fn send(&self, chunk: impl Into<Bytes>) {
        self.0
            .send(Ok(Frame::data(chunk.into())))
            .await
            .expect("body receiver alive");
    }

    /// Waits (at most `wait`) until nobody reads this body any more;
    /// whether that happened.
    pub async fn closed_within(&self, wait: Duration) -> bool {
        tokio::time::timeout(wait, self.0.closed()).await.is_ok()
    }

    /// Ends the body with an error: the connection carrying it is aborted.
    pub async fn fail(self) {
        let _ = self.0.send(Err("failing on purpose".into())).await;
    }
}

/// An upstream whose responses the test writes chunk by chunk: each request's
/// body sender arrives on the returned channel, with `content_type` set.
pub async fn stepped_upstream(
    content_type: &'static str,
) -> (Upstream, mpsc::Receiver<ChunkSender>) {
    let (tx, rx) = mpsc::channel::<ChunkSender>(4);
    let up = Upstream::start(move |_req| {
        let tx = tx.clone();
        async move {
            let (sender, body) = channel_body();
            tx.send(sender).await.unwrap();
            Response::builder()
                .header("content-type", content_type)
                .body(body)
                .unwrap()
        }
    })
    .await;
    (up, rx)
}

/// An upstream that upgrades every request to WebSocket (101) and then
/// echoes what it reads on the tunnel, each piece behind `prefix`.
pub async fn upgrading_upstream(prefix: &'static [u8]) -> Upstream {
    Upstream::start(move |mut req| async move {
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let upgraded = on_upgrade.await.expect("upstream side upgraded");
            let mut io = TokioIo::new(upgraded);
            let mut buf = [0u8; 64];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&[prefix, &buf[..n]].concat()).await.is_err() {
                    break;
                }
            }
        });
        Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
            .body(empty())
            .unwrap()
    })
    .await
}

pub fn channel_body() -> (ChunkSender, TestBody) {
    let (tx, rx) = mpsc::channel(16);
    (
        ChunkSender(tx),
        StreamBody::new(ReceiverStream::new(rx)).boxed(),
    )
}

/// A body of `chunks`, sent `gap` apart (no Content-Length).
pub fn chunked_body(chunks: Vec<Bytes>, gap: Duration) -> TestBody {
    let (tx, body) = channel_body();
    tokio::spawn(async move {
        for chunk in chunks {
            if tx.0.send(Ok(Frame::data(chunk))).await.is_err() {
                return;
            }
            tokio::time::sleep(gap).await;
        }
    });
    body
}

pub fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into())
        .map_err(|e: Infallible| match e {})
        .boxed()
}

pub fn empty() -> TestBody {
    Empty::new().map_err(|e: Infallible| match e {}).boxed()
}

pub fn response(status: u16, body: impl Into<Bytes>) -> Response<TestBody> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .body(full(body))
        .unwrap()
}

// === the proxy ===

/// Hyperion running in-process on a listener bound to port 0.
pub struct TestProxy {
    pub addr: SocketAddr,
    /// The first generation's: a reload keeps the cache, builds a new fleet.
    pub cache: Arc<hyperion::cache::Cache>,
    pub fleet: Arc<hyperion::upstream::fleet::Fleet>,
    pub reloader: Arc<Reloader>,
    /// The admin API's address, when the policy has `[admin]` (its
    /// `listen` is ignored, like the server's).
    pub admin: Option<SocketAddr>,
    /// The TLS listener's address, when the policy has `[server.tls]`.
    pub tls: Option<SocketAddr>,
    logs: std::sync::mpsc::Receiver<String>,
    server: Arc<hyperion::Server>,
    /// Resolves when the drain is over.
    pub done: Option<JoinHandle<()>>,
}

impl TestProxy {
    /// Starts the proxy from policy text. `[server] listen` is ignored: the
    /// proxy serves on a fresh loopback port.
    pub async fn start(policy: &str) -> TestProxy {
        let policy = Policy::parse("test.toml", policy)
            .unwrap_or_else(|e| panic!("test policy invalid: {e}"));
        TestProxy::serve(policy, std::path::Path::new("test.toml")).await
    }

    /// Starts the proxy from a policy file, which `reloader` reads again.
    pub async fn start_file(path: &std::path::Path) -> TestProxy {
        let policy = Policy::load(path).unwrap_or_else(|e| panic!("test policy invalid: {e}"));
        TestProxy::serve(policy, path).await
    }

    /// The proxy as `hyperion` runs it (`hyperion::Server`: worker
    /// threads, the operations thread, the admin API), with one worker so
    /// that connection counts are the pool's, on fresh loopback ports.
    async fn serve(policy: Policy, path: &std::path::Path) -> TestProxy {
        let (log_tx, logs) = std::sync::mpsc::sync_channel(10_000);
        let server = hyperion::Server::builder(policy, path)
            .log(LogSink::Channel(log_tx))
            .workers(1)
            .loopback()
            .start()
            .unwrap_or_else(|e| panic!("the proxy did not start: {e}"));
        let server = Arc::new(server);
        let first = server.reloader().current();
        let drained = server.clone();
        TestProxy {
            addr: server
                .addr(hyperion::Transport::Plain)
                .expect("a plain listener"),
            cache: first.cache.clone(),
            fleet: first.fleet.clone(),
            reloader: server.reloader().clone(),
            admin: server.admin_addr(),
            tls: server.addr(hyperion::Transport::Tls),
            logs,
            done: Some(tokio::spawn(async move { drained.drained().await })),
            server,
        }
    }

    /// A one-route policy sending everything to `upstream`, plus `extra` TOML
    /// (extra `[server]` keys go in `server`).
    pub async fn to(upstream: &str, server: &str) -> TestProxy {
        TestProxy::start(&simple_policy(upstream, server, "")).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Reloads the policy file, and waits until the worker serves the new
    /// generation (it switches on its own thread).
    pub async fn reload(
        &self,
    ) -> Result<hyperion::generation::Reloaded, hyperion::generation::ReloadError> {
        let reloaded = self.reloader.reload()?;
        tokio::time::timeout(PATIENCE, self.server.serving(reloaded.generation))
            .await
            .expect("the worker takes the new generation");
        Ok(reloaded)
    }

    /// Moves the proxy's clock forward by `by`: entries age, buckets refill
    /// and ejected servers come back as if that much time had passed.
    /// Timers (timeouts, the drain) do not move.
    pub fn advance(&self, by: Duration) {
        self.server.clock().advance(by);
    }

    /// Starts the graceful shutdown (like SIGTERM).
    pub fn shutdown(&mut self) {
        self.server.shutdown();
    }

    /// Access-log lines written so far, parsed.
    pub fn log_lines(&self) -> Vec<Value> {
        self.logs
            .try_iter()
            .map(|l| serde_json::from_str(&l).expect("JSON log line"))
            .collect()
    }

    /// Waits for the access-log line of the request with this id.
    pub async fn log_for(&self, request_id: &str) -> Value {
        let mut seen = Vec::new();
        for _ in 0..200 {
            seen.extend(self.log_lines());
            if let Some(line) = seen.iter().find(|l| l["request_id"] == request_id) {
                return line.clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no access-log line for {request_id}; lines: {seen:?}");
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        // The drain goes on, on the proxy's threads, after the test.
        self.server.shutdown();
        if let Some(done) = self.done.take() {
            done.abort();
        }
    }
}

/// The policy text of one upstream `up` and one catch-all route `all`.
pub fn simple_policy(upstream: &str, server: &str, route: &str) -> String {
    format!(
        "[server]\n{server}\n\n[upstreams.up]\nservers = [{{ url = \"{upstream}\" }}]\n\n[[route]]\nname = \"all\"\nupstream = \"up\"\n{route}\n"
    )
}

/// A policy with one route `r` to `upstream`, caching with `cache` (the
/// body of its `[route.cache]` table).
pub fn cached_policy(upstream: &str, cache: &str) -> String {
    format!(
        r#"
[server]
listen = ["127.0.0.1:0"]

[upstreams.up]
servers = [{{ url = "{upstream}" }}]

[[route]]
name = "r"
upstream = "up"

[route.cache]
{cache}
"#
    )
}

/// An Ollama `/api/chat` answer (not streamed) saying "hello", with its
/// token counts: 20 read, 30 generated.
pub fn ollama_chat_answer() -> Response<TestBody> {
    Response::builder()
        .header("content-type", "application/json")
        .body(full(
            r#"{"model":"m","message":{"role":"assistant","content":"hello"},"done":true,"prompt_eval_count":20,"eval_count":30}"#,
        ))
        .unwrap()
}

/// An Ollama pool `ollama` at `upstream`, a route `chat` caching
/// `POST /api/chat` by its JSON body (force, 10 minutes), and a route
/// `other` for the rest, followed by `other_extra` (its further keys).
pub fn chat_policy(upstream: &str, other_extra: &str) -> String {
    format!(
        r#"
[upstreams.ollama]
servers = [{{ url = "{upstream}" }}]

[[route]]
name = "chat"
match = {{ methods = ["POST"], paths = ["/api/chat"] }}
upstream = "ollama"
[route.cache]
mode = "force"
ttl = "10m"
body_key = "json"

[[route]]
name = "other"
upstream = "ollama"
{other_extra}
"#
    )
}

// === the client ===

pub fn client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A prior-knowledge h2c client.
pub fn h2c_client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// Sends a request and reads the whole response.
pub async fn send(req: Request<TestBody>) -> (http::response::Parts, Bytes) {
    let resp = tokio::time::timeout(PATIENCE, client().request(req))
        .await
        .expect("response in time")
        .expect("response");
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(PATIENCE, body.collect())
        .await
        .expect("body in time")
        .expect("complete body")
        .to_bytes();
    (parts, body)
}

pub async fn get(url: &str) -> (http::response::Parts, Bytes) {
    send(Request::get(url).body(empty()).unwrap()).await
}

pub fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(bytes)))
}

/// Writes raw bytes on a new connection and reads until the server closes it
/// or `wait` passes; returns what was read.
pub async fn raw(addr: SocketAddr, request: &[u8], wait: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_until_close(&mut stream, wait).await
}

/// Reads a response head (through the blank line) from a raw connection.
pub async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(PATIENCE, stream.read_exact(&mut byte))
            .await
            .expect("head in time")
            .expect("head bytes");
        head.push(byte[0]);
    }
    String::from_utf8(head).expect("ASCII head")
}

pub async fn read_until_close(stream: &mut TcpStream, wait: Duration) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A file in the temp directory, removed when dropped (policy files, CA
/// bundles).
pub struct TempFile(pub std::path::PathBuf);

impl TempFile {
    pub fn new(name: &str, contents: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!(
            "hyperion-test-{}-{}-{name}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }

    pub fn write(&self, contents: &str) {
        std::fs::write(&self.0, contents).unwrap();
    }

    pub fn display(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A certificate authority for tests, its certificate written as PEM to a
/// file of its own.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    pub file: TempFile,
}

impl TestCa {
    pub fn new(tag: &str) -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let file = TempFile::new(&format!("{tag}.pem"), &issuer.pem());
        TestCa { issuer, file }
    }

    /// A certificate for `localhost` and 127.0.0.1, and its key.
    pub fn issue(
        &self,
    ) -> (
        rustls::pki_types::CertificateDer<'static>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ) {
        let (cert, key) = self.issue_pem();
        use rustls::pki_types::pem::PemObject;
        (
            rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap(),
            rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
        )
    }

    /// The same, as PEM text (certificate, key).
    pub fn issue_pem(&self) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A TLS client trusting only this CA, offering `alpn`.
    pub fn connector(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(&self.file.0).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
    }
}

// === a real Redis for the shared tier ===

/// A `redis-server` of the test's own on a free loopback port, without
/// persistence; stopped when dropped.
pub struct RedisServer {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        let port = free_port();
        let mut server = RedisServer { port, child: None };
        server.resume().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// A Redis serving TLS only, with a certificate `ca` issued for
    /// localhost and 127.0.0.1; the files live as long as the server.
    pub async fn start_tls(ca: &TestCa) -> (RedisServer, [TempFile; 2]) {
        let port = free_port();
        let (cert, key) = ca.issue_pem();
        let files = [
            TempFile::new("redis-cert.pem", &cert),
            TempFile::new("redis-key.pem", &key),
        ];
        let mut server = RedisServer { port, child: None };
        let child = std::process::Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--tls-cert-file", &files[0].display()])
            .args(["--tls-key-file", &files[1].display()])
            .args(["--tls-auth-clients", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (see RedisServer::resume)");
        // Held by the server from here: killed and waited for when dropped.
        server.child = Some(child);
        for _ in 0..200 {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return (server, files);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server with TLS did not listen on port {port}");
    }

    /// Starts it (again) on its port.
    pub async fn resume(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            // DEBUG SLEEP stands in for a Redis that is slow, not down.
            .args(["--enable-debug-command", "local"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}): the shared-tier tests need a real Redis. \
                     Install it with `apt-get install -y redis-server` (Debian/Ubuntu) or \
                     `brew install redis` (macOS), then run the tests again"
                )
            });
        self.child = Some(child);
        for _ in 0..200 {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)).await {
                let _ = s.write_all(b"PING\r\n").await;
                let mut buf = [0u8; 16];
                if let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await
                {
                    if buf[..n].starts_with(b"+PONG") {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server did not answer on port {}", self.port);
    }

    /// Kills it (as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A connection for looking at what it holds.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until the proxy's shared tier is `up` (or not).
pub async fn shared_tier_up(proxy: &TestProxy, up: bool) {
    let tier = proxy
        .cache
        .shared_tier()
        .expect("a policy with [cache.redis]");
    for _ in 0..400 {
        if tier.is_up() == up {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "the shared tier did not become {}",
        if up { "available" } else { "unavailable" }
    );
}

// === the binary ===

/// A loopback port free a moment ago, for a process that binds it itself.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The `hyperion` binary, started on a policy file; stopped (SIGTERM) when
/// dropped.
pub struct Running(pub std::process::Child);

impl Running {
    pub fn start(policy: &TempFile) -> Running {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_hyperion"))
            .args(["--config", policy.0.to_str().unwrap()])
            .env_remove("HYPERION_CONFIG")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Running(child)
    }

    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.signal("TERM");
        let _ = self.0.wait();
    }
}

/// An upstream answering each request once the test releases a permit.
pub async fn held_upstream() -> (Upstream, Arc<tokio::sync::Semaphore>) {
    held_upstream_with("{\"done\":true}").await
}

/// Like `held_upstream`, answering `body` as JSON.
pub async fn held_upstream_with(body: &'static str) -> (Upstream, Arc<tokio::sync::Semaphore>) {
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let up = Upstream::start({
        let release = release.clone();
        move |_req| {
            let release = release.clone();
            async move {
                release.acquire().await.unwrap().forget();
                Response::builder()
                    .header("content-type", "application/json")
                    .body(full(body))
                    .unwrap()
            }
        }
    })
    .await;
    (up, release)
}

/// An upstream answering Ollama-style JSON with `prompt_eval_count` 30 and
/// `eval_count` 50 (80 tokens).
pub async fn ollama_json() -> Upstream {
    Upstream::start(|_req| async {
        Response::builder()
            .header("content-type", "application/json")
            .body(full(OLLAMA_ANSWER))
            .unwrap()
    })
    .await
}

/// An Ollama answer that used 30 prompt tokens and generated 50.
pub const OLLAMA_ANSWER: &str =
    r#"{"response":"hi","done":true,"prompt_eval_count":30,"eval_count":50}"#;

/// `hyperion_upstream_queued` for `upstream`, as `/metrics` says.
pub async fn queued(proxy: &TestProxy, upstream: &str) -> u64 {
    let (_, body) = get(&format!("http://{}/metrics", proxy.admin.unwrap())).await;
    let prefix = format!("hyperion_upstream_queued{{upstream=\"{upstream}\"}} ");
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).map(|v| v.trim().parse().unwrap()))
        .unwrap_or(0)
}

/// Waits (at most 10 s, polling) until `check` holds.
pub async fn until<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..1000 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never: {what}");
}

/// The admin token of `keyed_proxy`'s proxies.
pub const KEYED_ADMIN_TOKEN: &str = "0123456789abcdef-keyed-token";

/// A proxy that takes Hyperion's API keys, with the keys it was made with.
pub struct Keyed {
    pub proxy: TestProxy,
    /// The keys, in the order asked for.
    pub keys: Vec<String>,
    _files: [TempFile; 2],
}

/// A proxy with `[auth]` over a new keys file holding `keys` (name, tier)
/// and an admin listener (token `KEYED_ADMIN_TOKEN`); `rest` is the rest of
/// its policy (tiers, upstreams, routes).
pub async fn keyed_proxy(keys: &[(&str, Option<&str>)], rest: &str) -> Keyed {
    let file = TempFile::new("keys.toml", "");
    std::fs::remove_file(&file.0).unwrap();
    let at = hyperion::auth::KeysFileAt(file.0.clone());
    let made = keys
        .iter()
        .map(|(name, tier)| at.add(name, *tier).unwrap())
        .collect();
    let token = TempFile::new("admin.token", &format!("{KEYED_ADMIN_TOKEN}\n"));
    let policy = format!(
        "[auth]\nkeys_file = \"{}\"\n\n[admin]\nlisten = \"127.0.0.1:9\"\ntoken_file = \"{}\"\n\n{rest}",
        file.display(),
        token.display(),
    );
    Keyed {
        proxy: TestProxy::start(&policy).await,
        keys: made,
        _files: [file, token],
    }
}

/// An admin GET with the admin token `token`: its head and body.
pub async fn admin_get(
    proxy: &TestProxy,
    token: &str,
    path: &str,
) -> (http::response::Parts, Bytes) {
    let req = Request::get(format!("http://{}{path}", proxy.admin.unwrap()))
        .header("authorization", format!("Bearer {token}"))
        .body(empty())
        .unwrap();
    send(req).await
}

/// An admin GET with `keyed_proxy`'s token, as JSON.
pub async fn keyed_admin(proxy: &TestProxy, path: &str) -> Value {
    json(&admin_get(proxy, KEYED_ADMIN_TOKEN, path).await.1)
}
