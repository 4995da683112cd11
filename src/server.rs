//! Listening and connections: the accept loops (under `max_connections` and
//! `max_connections_per_ip`), which protocol a connection speaks (HTTP/1.1,
//! h2c, or HTTP/2 by ALPN, its streams, resets and keep-alive pings
//! bounded), client timeouts, and the graceful drain on shutdown.
//!
//! Owns the life of a connection, not what happens to a request on it
//! (`handler.rs`). Shutdown: stop accepting, ask every connection to finish its
//! in-flight requests (HTTP/1.1 closes after the current response, HTTP/2 sends
//! GOAWAY), wait up to `shutdown_grace`, then cut whatever is left.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::BoxError;
use crate::conn::{ActivityIo, ConnState, ConnTimeout, ConnTimer, Timeouts};
use crate::generation::LiveProxy;
use crate::handler::ConnInfo;
use crate::policy::ServerPolicy;
use crate::protect::{ConnectionPermit, Deadline, Protect};

/// What every connection task shares.
struct Shared {
    /// Read once per request: a reload swaps it.
    proxy: Arc<LiveProxy>,
    builders: Builders,
    /// `timeouts.header` bounds the TLS handshake and the first bytes too.
    timeouts: Timeouts,
    /// How long an idle HTTP/2 client has to close after GOAWAY.
    drain_deadline: Duration,
    protect: Arc<Protect>,
    stop_accepting: CancellationToken,
    force_close: CancellationToken,
    /// Set before either token is cancelled. A connection looks at its
    /// tokens' futures again only once this is set: polling them takes a
    /// lock each time, and a connection's task is polled several times per
    /// request.
    stopping: AtomicBool,
    tasks: TaskTracker,
}

/// Serves the `proxy` of the moment on already-bound `listeners` until
/// `shutdown` resolves, then drains for at most the policy's
/// `shutdown_grace` (as it was at start, like the connection settings).
///
/// Listeners are passed in bound, so tests bind `127.0.0.1:0` without racing
/// for ports, and the binary can report bind errors before serving.
pub async fn serve(
    listeners: Vec<TcpListener>,
    proxy: Arc<LiveProxy>,
    shutdown: impl Future<Output = ()>,
) {
    let plain = listeners
        .into_iter()
        .map(|l| (l, Transport::Plain))
        .collect();
    serve_on(plain, proxy, shutdown).await;
}

/// How a listener's connections begin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Plain,
    /// A TLS handshake first, with `[server.tls]` of the policy of the
    /// moment (so renewed certificates apply after a reload).
    Tls,
}

/// Like `serve`, for listeners of either transport.
pub async fn serve_on(
    listeners: Vec<(TcpListener, Transport)>,
    proxy: Arc<LiveProxy>,
    shutdown: impl Future<Output = ()>,
) {
    let policy: ServerPolicy = proxy.load().policy().server.clone();
    let shared = Arc::new(Shared {
        builders: Builders::new(&policy),
        timeouts: Timeouts {
            header: policy.header_read_timeout,
            idle: policy.idle_timeout,
            send: policy.send_timeout,
        },
        drain_deadline: policy.http2_keepalive_timeout,
        protect: proxy.load().protect().clone(),
        stop_accepting: CancellationToken::new(),
        force_close: CancellationToken::new(),
        stopping: AtomicBool::new(false),
        tasks: TaskTracker::new(),
        proxy,
    });
    let mut accept_loops = Vec::with_capacity(listeners.len());
    for (listener, transport) in listeners {
        accept_loops.push(tokio::spawn(accept_loop(
            listener,
            transport,
            shared.clone(),
        )));
    }

    shutdown.await;
    let open = shared.tasks.len();
    tracing::debug!(
        connections = open,
        grace_s = policy.shutdown_grace.as_secs_f64(),
        "shutting down: no new connections, draining in-flight requests"
    );
    shared.stopping.store(true, Ordering::Release);
    shared.stop_accepting.cancel();
    for l in accept_loops {
        let _ = l.await;
    }
    shared.tasks.close();
    if tokio::time::timeout(policy.shutdown_grace, shared.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = shared.tasks.len(),
            "shutdown_grace elapsed: closing the connections still open"
        );
        shared.force_close.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), shared.tasks.wait()).await;
    }
    tracing::debug!("worker drained");
}

/// How connections are served, one builder per way of telling the protocol.
struct Builders {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    /// For a connection whose first bytes could not tell (a client sending
    /// the start of the HTTP/2 preface in pieces): hyper-util reads them
    /// and replays them to the protocol it picks. Not the usual way: its
    /// replaying wrapper sits under every later read of the connection.
    auto: auto::Builder<TokioExecutor>,
}

impl Builders {
    fn new(policy: &ServerPolicy) -> Self {
        // Heads up to twice the limit are read so `handler` can answer an
        // oversized head with a JSON 431; beyond that hyper refuses it (bare
        // 431) before buffering more. hyper's own header timer is off: see
        // `conn.rs`.
        let head_buffer = (policy.max_header_size * 2).max(8192);
        let mut http1 = http1::Builder::new();
        http1
            .keep_alive(true)
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size(head_buffer);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        h2_settings!(http2, head_buffer, policy);
        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1()
            .keep_alive(true)
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size(head_buffer);
        h2_settings!(auto.http2(), head_buffer, policy);
        Builders { http1, http2, auto }
    }
}

/// Streams a client may make the server reset (for their errors) before
/// the connection is closed: hyper's default, kept explicitly (the "rapid
/// reset" kind of flood, CVE-2023-44487, is bounded by this and by
/// `http2_max_pending_resets`).
const H2_MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// The HTTP/2 settings of a builder (hyper's own, or hyper-util's for
/// connections told by their first bytes: the two share no trait): the
/// header list bound, concurrent streams, pending resets, keep-alive
/// pings. Flow-control windows stay hyper's (1 MB per connection, so a
/// connection never holds more than that of unread request bodies).
macro_rules! h2_settings {
    ($builder:expr, $head_buffer:expr, $policy:expr) => {
        $builder
            .timer(TokioTimer::new())
            .max_header_list_size($head_buffer as u32)
            .max_concurrent_streams($policy.http2_max_concurrent_streams)
            .max_pending_accept_reset_streams($policy.http2_max_pending_resets)
            .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESETS)
            .keep_alive_interval($policy.http2_keepalive_interval)
            .keep_alive_timeout($policy.http2_keepalive_timeout)
    };
}
use h2_settings;

/// The protocol a connection speaks, as far as its start tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
    /// Not told: the bytes so far are a part of the HTTP/2 preface, or a
    /// TLS client agreed on no protocol by ALPN. hyper-util's auto builder
    /// reads on until it can tell.
    Unsure,
}

/// RFC 9113 §3.4: what an h2c client with prior knowledge sends first.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a cleartext connection speaks, from a peek at its first bytes
/// (left in the socket for hyper). `None` when it closed without a byte.
/// An HTTP/1 request differs from the preface by its second byte at the
/// latest, so one peek almost always tells.
async fn sniff(stream: &TcpStream) -> std::io::Result<Option<Protocol>> {
    let mut first = [0u8; H2_PREFACE.len()];
    let n = stream.peek(&mut first).await?;
    Ok(match n {
        0 => None,
        n if first[..n] != H2_PREFACE[..n] => Some(Protocol::Http1),
        n if n == H2_PREFACE.len() => Some(Protocol::Http2),
        _ => Some(Protocol::Unsure),
    })
}

/// A connection being served, whichever way it was told. Boxed once per
/// connection so the task can hold any of them.
enum Serving<A, B, C> {
    Http1(Pin<Box<A>>),
    Http2(Pin<Box<B>>),
    Auto(Pin<Box<C>>),
}

async fn accept_loop(listener: TcpListener, transport: Transport, shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(5);
    let connections = &shared.protect.connections;
    loop {
        // Past `max_connections` nothing is accepted until one closes: the
        // kernel's backlog holds the next clients meanwhile.
        let accepted = tokio::select! {
            _ = shared.stop_accepting.cancelled() => return,
            res = async { connections.room().await; listener.accept().await } => res,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                // A load balancer in `trusted_proxies` carries many clients:
                // only the total holds it.
                let exempt = {
                    let proxy = shared.proxy.load();
                    crate::headers::is_trusted(
                        peer.ip().to_canonical(),
                        &proxy.policy().server.trusted_proxies,
                    )
                };
                let permit = match connections.open(peer.ip(), exempt) {
                    Ok(permit) => permit,
                    Err(_) => {
                        tracing::debug!(%peer, "connection closed: server.max_connections_per_ip reached for its address");
                        drop(stream);
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                match transport {
                    Transport::Plain => {
                        shared
                            .tasks
                            .spawn(serve_plain(stream, peer, shared.clone(), permit))
                    }
                    Transport::Tls => {
                        shared
                            .tasks
                            .spawn(serve_tls(stream, peer, shared.clone(), permit))
                    }
                };
            }
            Err(e) if is_per_connection(&e) => {}
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS: the process is out of something; wait
                // for connections to close instead of spinning or exiting.
                tracing::error!("accept failed: {e}; retrying in {backoff:?}");
                tokio::select! {
                    _ = shared.stop_accepting.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Errors about one half-open connection, not about the listener.
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock
    )
}

/// The TLS handshake, bounded by `header_read_timeout` like a request
/// head, then the connection as any other.
async fn serve_tls(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    permit: ConnectionPermit,
) {
    let config = shared
        .proxy
        .load()
        .policy()
        .server
        .tls
        .as_ref()
        .map(|t| t.config.clone());
    let Some(config) = config else {
        // A reload removed [server.tls]; its listeners go at the restart.
        return;
    };
    let handshake = tokio_rustls::TlsAcceptor::from(config).accept(stream);
    let tls = tokio::select! {
        res = tokio::time::timeout(shared.timeouts.header, handshake) => match res {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(%peer, "TLS handshake failed: {e}");
                return;
            }
            Err(_) => {
                shared.protect.cut.count(Deadline::HeaderRead);
                tracing::debug!(%peer, "TLS handshake not done within header_read_timeout");
                return;
            }
        },
        _ = shared.stop_accepting.cancelled() => return,
    };
    // RFC 9113 §3.3: HTTP/2 over TLS is agreed by ALPN. Without ALPN the
    // first bytes tell, as in cleartext.
    let protocol = match tls.get_ref().1.alpn_protocol() {
        Some(b"h2") => Protocol::Http2,
        Some(_) => Protocol::Http1,
        None => Protocol::Unsure,
    };
    let state = Arc::new(ConnState::new());
    serve_connection(tls, peer, "https", protocol, state, shared).await;
    drop(permit);
}

/// A cleartext connection: its first bytes say whether it is h2c, within
/// `header_read_timeout` like a request head.
async fn serve_plain(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    permit: ConnectionPermit,
) {
    // Made before the peek: the header timeout counts from the connection's
    // start, whatever the peek took.
    let state = Arc::new(ConnState::new());
    let sniffed = tokio::select! {
        res = tokio::time::timeout(shared.timeouts.header, sniff(&stream)) => res,
        _ = shared.stop_accepting.cancelled() => return,
    };
    let protocol = match sniffed {
        Ok(Ok(Some(p))) => p,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::debug!(%peer, "connection ended: {e}");
            return;
        }
        Err(_) => {
            shared.protect.cut.count(Deadline::HeaderRead);
            tracing::debug!(%peer, "closing connection: no request within header_read_timeout");
            return;
        }
    };
    serve_connection(stream, peer, "http", protocol, state, shared).await;
    drop(permit);
}

async fn serve_connection<S>(
    stream: S,
    peer: SocketAddr,
    proto: &'static str,
    protocol: Protocol,
    state: Arc<ConnState>,
    shared: Arc<Shared>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(ActivityIo::new(stream, state.clone()));
    let peer_ip = peer.ip().to_canonical();
    let info = Arc::new(ConnInfo {
        peer: peer_ip,
        peer_value: crate::headers::peer_value(peer_ip),
        proto,
        state: state.clone(),
        tasks: shared.tasks.clone(),
        force_close: shared.force_close.clone(),
    });
    let live = shared.proxy.clone();
    let service = service_fn(move |req| {
        // This request runs to its end on the proxy of this moment.
        let proxy = live.load_full();
        let info = info.clone();
        // The request's future is large (kilobytes) and hyper moves what this
        // returns into place: boxed on its first poll, only a pointer moves
        // (and built in its box, not copied there).
        async move { Ok::<_, Infallible>(boxed_in_place!(proxy.handle(req, &info)).await) }
    });
    let builders = &shared.builders;
    let mut conn = match protocol {
        Protocol::Http1 => Serving::Http1(Box::pin(
            builders.http1.serve_connection(io, service).with_upgrades(),
        )),
        Protocol::Http2 => Serving::Http2(Box::pin(builders.http2.serve_connection(io, service))),
        Protocol::Unsure => Serving::Auto(Box::pin(
            builders.auto.serve_connection_with_upgrades(io, service),
        )),
    };
    let stop = pin!(shared.stop_accepting.cancelled());
    let force = pin!(shared.force_close.cancelled());
    let mut watch = Watch {
        stop,
        force,
        timer: ConnTimer::new(state.clone(), shared.timeouts),
        drain_cut: None,
        draining: false,
        registered: false,
    };
    std::future::poll_fn(|cx| {
        // Clock readings in this poll are shared (clock.rs).
        let _pass = crate::clock::Pass::begin();
        loop {
            let ended = match &mut conn {
                Serving::Http1(c) => c.as_mut().poll(cx).map_err(BoxError::from),
                Serving::Http2(c) => c.as_mut().poll(cx).map_err(BoxError::from),
                Serving::Auto(c) => c.as_mut().poll(cx),
            };
            if let Poll::Ready(res) = ended {
                if let Err(e) = res {
                    tracing::debug!(%peer, "connection ended: {e}");
                }
                return Poll::Ready(());
            }
            match watch.poll(cx, &shared, peer) {
                Turn::Wait => return Poll::Pending,
                Turn::Close => return Poll::Ready(()),
                // hyper's connection types share no trait for this.
                Turn::Drain => match &mut conn {
                    Serving::Http1(c) => c.as_mut().graceful_shutdown(),
                    Serving::Http2(c) => c.as_mut().graceful_shutdown(),
                    Serving::Auto(c) => c.as_mut().graceful_shutdown(),
                },
            }
        }
    })
    .await;
}

/// What a connection's task watches beside the connection: the worker
/// stopping, the grace period's end, its deadlines (`conn.rs`), and once it
/// was asked to close while idle, how long an HTTP/2 client may take to go.
struct Watch<'p, 't> {
    stop: Pin<&'p mut tokio_util::sync::WaitForCancellationFuture<'t>>,
    force: Pin<&'p mut tokio_util::sync::WaitForCancellationFuture<'t>>,
    timer: ConnTimer,
    /// Set when an idle connection was asked to close: an HTTP/2 client
    /// that never answers the GOAWAY's PING must not hold it forever.
    drain_cut: Option<Pin<Box<tokio::time::Sleep>>>,
    draining: bool,
    /// The first poll registers this task with the tokens; after that they
    /// are looked at again only once the worker is stopping.
    registered: bool,
}

/// What the connection's task does next.
enum Turn {
    /// Nothing is due: wait to be woken.
    Wait,
    /// Close the connection now.
    Close,
    /// Ask the connection to finish gracefully, then poll it again.
    Drain,
}

impl Watch<'_, '_> {
    #[inline]
    fn poll(&mut self, cx: &mut std::task::Context<'_>, shared: &Shared, peer: SocketAddr) -> Turn {
        let stopping = !self.registered || shared.stopping.load(Ordering::Acquire);
        if stopping && self.force.as_mut().poll(cx).is_ready() {
            return Turn::Close;
        }
        if let Some(cut) = &mut self.drain_cut {
            if cut.as_mut().poll(cx).is_ready() {
                shared.protect.cut.count(Deadline::Http2Keepalive);
                tracing::debug!(%peer, "closing connection: still open http2_keepalive_timeout after GOAWAY");
                return Turn::Close;
            }
        }
        if !self.draining && stopping && self.stop.as_mut().poll(cx).is_ready() {
            self.draining = true;
            return Turn::Drain;
        }
        // Polled while draining too: a client that takes no bytes must not
        // hold a closing connection either. The timer answers at once while
        // a request is in flight.
        match self.timer.poll_expired(cx) {
            Poll::Pending => {}
            Poll::Ready(ConnTimeout::Send) => {
                shared.protect.cut.count(Deadline::Send);
                tracing::debug!(%peer, "closing connection: the client took no bytes within send_timeout");
                return Turn::Close;
            }
            Poll::Ready(_) if self.draining => {}
            Poll::Ready(ConnTimeout::Idle) => {
                self.draining = true;
                self.drain_cut = Some(Box::pin(tokio::time::sleep(shared.drain_deadline)));
                return Turn::Drain;
            }
            Poll::Ready(ConnTimeout::HeaderRead) => {
                shared.protect.cut.count(Deadline::HeaderRead);
                tracing::debug!(%peer, "closing connection: no complete request head within header_read_timeout");
                return Turn::Close;
            }
        }
        self.registered = true;
        Turn::Wait
    }
}
