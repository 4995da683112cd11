//! Upstream HTTP/1.1 connections, driven by the task that uses them.
//!
//! hyper-util's pooled client runs each upstream connection in a task of its
//! own and passes requests, response heads and body chunks to it over
//! channels, so one proxied request wakes several tasks. Here the downstream
//! connection's task polls the upstream connection itself: while it waits for
//! the response head (`UpstreamConn::send`) and while the body streams out
//! (`ConnLease::drive`, called by the response body). Between requests a
//! connection waits in its server's idle stack (`ServerConns`), one per
//! server per worker thread, so taking one locks nothing shared across cores.
//!
//! This module owns connecting (TCP, and TLS for `https://` servers), reuse
//! and retirement. Choosing the server and
//! mapping errors to statuses belong to `upstream`.

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::body::{RequestBody, ResponseBody};
use crate::policy::UpstreamServer;

/// How long an unused upstream connection is kept. Below the 5 s keep-alive
/// of uvicorn (FastAPI's server), so the proxy never reuses a connection the
/// upstream is closing at the same moment.
pub const POOL_IDLE: Duration = Duration::from_secs(4);

/// Longest pause in the answer to one of the proxy's own GETs.
const ERRAND_IDLE: Duration = Duration::from_secs(30);

/// Idle connections kept per server and worker; more are closed on release.
const MAX_IDLE: usize = 256;

type Io = TokioIo<UpstreamStream>;

/// The byte stream under an upstream connection: plain TCP, or TLS over it
/// for an `https://` server.
pub enum UpstreamStream {
    Plain(TcpStream),
    /// Boxed: rustls' connection state is large, and most pools are plain.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Why no connection could be had.
#[derive(Debug)]
pub enum ConnectError {
    Io(std::io::Error),
    TimedOut,
    /// The TLS handshake failed (certificate not trusted, wrong name, …).
    Tls(std::io::Error),
    Handshake(hyper::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Io(e) => write!(f, "{e}"),
            ConnectError::TimedOut => f.write_str("timed out"),
            ConnectError::Tls(e) => write!(f, "TLS handshake: {}", super::error_chain(e)),
            ConnectError::Handshake(e) => f.write_str(&super::error_chain(e)),
        }
    }
}

/// One upstream connection: the handle requests go in by, and the protocol
/// state machine that somebody has to poll.
pub struct UpstreamConn {
    sender: SendRequest<RequestBody>,
    driver: Driver,
    /// The response timer of the request in flight, kept with the
    /// connection from one request to the next. Each request moves it
    /// later, which tokio does with an atomic store; a timer made per
    /// request was put into tokio's timer wheel and taken out again (a lock
    /// each way) on every request, and its future, wrapped around the whole
    /// exchange, was copied at each layer. Left armed while the connection
    /// waits in its pool: firing then only wakes the task that used it last,
    /// once, for a poll that finds nothing to do.
    timer: Option<Pin<Box<Sleep>>>,
}

/// Why `UpstreamConn::send` got no response head.
pub enum SendError {
    /// The connection failed; the request comes back when it never left
    /// (the connection was closing), so it can go out on another.
    Failed(hyper::Error, Option<Box<Request<RequestBody>>>),
    /// None by the deadline. The upstream may still be working on it.
    TimedOut,
}

/// The polled half of a connection.
struct Driver {
    /// Kept after the end so an upgraded connection can be taken apart;
    /// `None` once dropped to give back a request it never took.
    conn: Option<Connection<Io, RequestBody>>,
    done: bool,
    /// Why it ended, when it failed.
    error: Option<hyper::Error>,
}

impl Driver {
    /// Moves the connection forward: writes the request (and its streaming
    /// body), reads the response. True once it has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.done {
            let Some(conn) = &mut self.conn else {
                self.done = true;
                return true;
            };
            match conn.poll_without_shutdown(cx) {
                Poll::Pending => {}
                Poll::Ready(res) => {
                    self.done = true;
                    self.error = res.err();
                }
            }
        }
        self.done
    }
}

impl UpstreamConn {
    /// Sends `req` and drives the connection until the response head
    /// arrives, or `deadline` passes (sending a streamed body included). A
    /// connection that timed out must not be reused: its answer may still
    /// come.
    pub async fn send(
        &mut self,
        req: Box<Request<RequestBody>>,
        deadline: Instant,
    ) -> Result<Box<Response<Incoming>>, SendError> {
        let timer = match &mut self.timer {
            Some(timer) => {
                timer.as_mut().reset(deadline);
                timer
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        let mut response = pin!(self.sender.try_send_request(*req));
        let driver = &mut self.driver;
        let answered = std::future::poll_fn(|cx| {
            // An end with the response in hand (an upgrade, or the upstream
            // closing right after it) leaves the response future to report.
            let ended = driver.drive(cx);
            match response.as_mut().poll(cx) {
                // Ended cleanly with the request still queued: the upstream
                // closed this idle connection before it took the request
                // (`take_idle` no longer polls for that). hyper hands a
                // queued request back only when the connection is dropped.
                Poll::Pending if ended => {
                    driver.conn = None;
                    response.as_mut().poll(cx).map(Some)
                }
                Poll::Pending => timer.as_mut().poll(cx).map(|()| None),
                polled => polled.map(Some),
            }
        })
        .await;
        match answered {
            // Boxed here, as the request was: it goes up as many layers.
            Some(Ok(resp)) => Ok(Box::new(resp)),
            Some(Err(mut e)) => {
                let req = e.take_message().map(Box::new);
                Err(SendError::Failed(e.into_error(), req))
            }
            None => Err(SendError::TimedOut),
        }
    }

    /// After a 101, the raw connection and any bytes the upstream sent past
    /// the response head, for the tunnel. hyper ends the exchange once the
    /// head is read; this drives it there.
    pub async fn into_upgraded(mut self) -> Result<(UpstreamStream, Bytes), hyper::Error> {
        std::future::poll_fn(|cx| {
            if self.driver.drive(cx) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        if let Some(e) = self.driver.error.take() {
            return Err(e);
        }
        // Only `send` drops the connection, and only while no response has
        // come: an upgrade has one.
        let conn = self
            .driver
            .conn
            .take()
            .expect("connection kept after a 101");
        let parts = conn.into_parts();
        Ok((parts.io.into_inner(), parts.read_buf))
    }

    /// Whether it may carry another request. One that already asks for the
    /// next request is taken as it is: polling it here to notice an
    /// upstream close would cost a pass through hyper's state machine on
    /// every request, and `send` notices that close as well, before the
    /// request leaves, and hands the request back for a new connection.
    /// Otherwise it is polled once so it can get there.
    fn reusable(&mut self) -> bool {
        if self.driver.done {
            return false;
        }
        if self.sender.is_ready() {
            return true;
        }
        let mut cx = Context::from_waker(Waker::noop());
        !self.driver.drive(&mut cx) && self.sender.is_ready()
    }
}

/// The connections to one server, owned by one worker.
pub struct ServerConns {
    /// `host:port` to connect to.
    addr: Box<str>,
    /// For an `https://` server.
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    connect_timeout: Duration,
    /// Most recently released on top; released times only grow upwards.
    idle: Mutex<Vec<(Instant, Box<UpstreamConn>)>>,
    sweeping: std::sync::atomic::AtomicBool,
}

impl ServerConns {
    pub fn new(server: &UpstreamServer, connect_timeout: Duration) -> Arc<Self> {
        let default_port = if server.tls.is_some() { 443 } else { 80 };
        let port = server.authority.port_u16().unwrap_or(default_port);
        Arc::new(ServerConns {
            addr: format!("{}:{port}", server.authority.host()).into(),
            tls: server.tls.as_ref().map(|t| {
                (
                    tokio_rustls::TlsConnector::from(t.config.clone()),
                    t.name.clone(),
                )
            }),
            connect_timeout,
            idle: Mutex::new(Vec::new()),
            sweeping: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// A connection to this server at `now`: the most recently used idle
    /// one that is still good, or a new one.
    pub async fn checkout(self: &Arc<Self>, now: Instant) -> Result<ConnLease, ConnectError> {
        if let Some(conn) = self.take_idle(now) {
            return Ok(self.lease(conn));
        }
        self.checkout_new().await
    }

    /// A new connection, bypassing the idle ones (after a pooled connection
    /// turned out to be closing).
    pub async fn checkout_new(self: &Arc<Self>) -> Result<ConnLease, ConnectError> {
        // Boxed: connecting (TCP, TLS, the HTTP handshake) is a large future
        // that every request's future would otherwise carry, and copy, for
        // the rare request that needs a new connection.
        Ok(self.lease(boxed_in_place!(self.connect()).await?))
    }

    /// One GET of `path` on this server, its answer read whole (at most
    /// `limit` bytes): the proxy's own errands (health checks, model
    /// discovery). The caller bounds the time it may take.
    pub async fn get(
        self: &Arc<Self>,
        server: &UpstreamServer,
        path: &str,
        agent: &'static str,
        limit: usize,
    ) -> Result<(StatusCode, Bytes), String> {
        let mut lease = self
            .checkout(crate::clock::now())
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        let mut req = Request::get(path)
            .header(header::HOST, server.host_header.clone())
            .header(header::USER_AGENT, agent);
        if let Some(c) = &server.credential {
            // A server that wants the pool's key for its model list.
            req = req.header(c.name.clone(), c.value.clone());
        }
        let req = req
            .body(RequestBody::buffered(Bytes::new()))
            .map_err(|e| format!("GET {path}: {e}"))?;
        let req = Box::new(req);
        let resp = match lease
            .conn()
            .send(req, crate::clock::now() + ERRAND_IDLE)
            .await
        {
            Ok(resp) => resp,
            Err(SendError::Failed(e, _)) => return Err(super::error_chain(&e)),
            Err(SendError::TimedOut) => return Err(format!("GET {path}: no answer")),
        };
        let status = resp.status();
        // Read to the end (driving the connection), so it can be used again.
        let body = ResponseBody::upstream(resp.into_body(), Box::new(lease), ERRAND_IDLE, None);
        let body = http_body_util::Limited::new(body, limit)
            .collect()
            .await
            .map_err(|e| format!("GET {path}: reading the answer: {e}"))?;
        Ok((status, body.to_bytes()))
    }

    fn lease(self: &Arc<Self>, conn: Box<UpstreamConn>) -> ConnLease {
        ConnLease {
            conn,
            home: self.clone(),
            held: None,
        }
    }

    fn take_idle(&self, now: Instant) -> Option<Box<UpstreamConn>> {
        loop {
            let (since, mut conn) = self.idle.lock().expect("idle stack lock").pop()?;
            if now.saturating_duration_since(since) >= POOL_IDLE {
                // Everything below is older still.
                self.idle.lock().expect("idle stack lock").clear();
                return None;
            }
            if conn.reusable() {
                return Some(conn);
            }
        }
    }

    /// Boxed once here: a connection is large (hyper's buffers and state) and
    /// moves between the idle stack, the request and the response body.
    async fn connect(self: &Arc<Self>) -> Result<Box<UpstreamConn>, ConnectError> {
        self.start_sweeper();
        // `connect_timeout` covers the TLS handshake too: both are the
        // server accepting the connection.
        let stream = tokio::time::timeout(self.connect_timeout, self.open())
            .await
            .map_err(|_| ConnectError::TimedOut)??;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(ConnectError::Handshake)?;
        Ok(Box::new(UpstreamConn {
            sender,
            driver: Driver {
                conn: Some(conn),
                done: false,
                error: None,
            },
            timer: None,
        }))
    }

    async fn open(&self) -> Result<UpstreamStream, ConnectError> {
        let stream = TcpStream::connect(&*self.addr)
            .await
            .map_err(ConnectError::Io)?;
        stream.set_nodelay(true).map_err(ConnectError::Io)?;
        Ok(match &self.tls {
            None => UpstreamStream::Plain(stream),
            Some((connector, name)) => UpstreamStream::Tls(Box::new(
                connector
                    .connect(name.clone(), stream)
                    .await
                    .map_err(ConnectError::Tls)?,
            )),
        })
    }

    fn release(&self, conn: Box<UpstreamConn>) {
        if conn.driver.done {
            return;
        }
        let mut idle = self.idle.lock().expect("idle stack lock");
        if idle.len() < MAX_IDLE {
            idle.push((crate::clock::now(), conn));
        }
    }

    /// Closes connections idle past `POOL_IDLE` even when no request comes to
    /// notice them, so an upstream's closed sockets don't linger half-open.
    /// One task per server per worker, ending with the pool.
    fn start_sweeper(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POOL_IDLE / 2);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(conns) = weak.upgrade() else { return };
                let expired: Vec<_> = {
                    let mut idle = conns.idle.lock().expect("idle stack lock");
                    let fresh = idle.partition_point(|(since, _)| since.elapsed() >= POOL_IDLE);
                    idle.drain(..fresh).collect()
                };
                // Closed outside the lock.
                drop(expired);
            }
        });
    }
}

/// A connection checked out for one request. Dropped, it closes the
/// connection; `release` puts it back for the next request instead, which
/// is only right once the response has been read to its end.
pub struct ConnLease {
    conn: Box<UpstreamConn>,
    home: Arc<ServerConns>,
    /// The request's place at its server (in flight, and its slot under
    /// `max_inflight_per_server`): held while the response body is read,
    /// freed with the lease.
    held: Option<super::Admitted>,
}

impl ConnLease {
    pub fn conn(&mut self) -> &mut UpstreamConn {
        &mut self.conn
    }

    /// The connection, for a tunnel: a tunnel is not a request in flight,
    /// so any concurrency slot is freed here.
    pub fn into_conn(self) -> Box<UpstreamConn> {
        self.conn
    }

    pub fn hold(&mut self, admitted: super::Admitted) {
        self.held = Some(admitted);
    }

    /// Polls the connection so the response body keeps arriving.
    pub fn drive(&mut self, cx: &mut Context<'_>) {
        self.conn.driver.drive(cx);
    }

    pub fn release(self) {
        self.home.release(self.conn);
    }
}

impl crate::body::BodyConn for ConnLease {
    fn drive(&mut self, cx: &mut Context<'_>) {
        ConnLease::drive(self, cx);
    }

    fn release(self: Box<Self>) {
        ConnLease::release(*self);
    }
}
