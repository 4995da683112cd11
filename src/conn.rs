//! Per-connection state: requests in flight, and the two client timeouts that
//! depend on it — `header_read_timeout` (a request head must arrive in time
//! once it has started, or once the connection opened) and `idle_timeout`
//! (keep-alive connections with nothing in flight are closed).
//!
//! hyper's own header timer starts as soon as a keep-alive connection waits for
//! its next request, which would close idle connections after the header
//! timeout instead of `idle_timeout`; so both are tracked here, from the bytes
//! the connection reads and the requests it has in flight. Serving the
//! connection is `server.rs`'s job.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Version;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

const NONE: u64 = u64::MAX;

/// Shared by a connection's task, its IO and its requests' response bodies.
pub struct ConnState {
    epoch: Instant,
    inflight: AtomicUsize,
    /// Milliseconds since `epoch` when the last request finished.
    idle_since: AtomicU64,
    /// Milliseconds since `epoch` when bytes of a not-yet-parsed request head
    /// first arrived; `NONE` while no head is pending.
    head_started: AtomicU64,
    /// HTTP/2 carries frames between requests (PING, SETTINGS); they are not
    /// the start of a request head.
    h2: AtomicBool,
}

/// Why a connection's timer fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnTimeout {
    /// A request head did not arrive within `header_read_timeout`.
    HeaderRead,
    /// Nothing in flight for `idle_timeout`.
    Idle,
}

// === impl ConnState ===

impl ConnState {
    /// A new connection: its first request head is expected from now on.
    pub fn new() -> Self {
        ConnState {
            epoch: Instant::now(),
            inflight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            h2: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// A request's head has been parsed; the guard ends it when dropped (with
    /// the response body, so a streaming response counts until its last byte).
    pub fn begin(self: &Arc<Self>, version: Version) -> InflightGuard {
        if version == Version::HTTP_2 {
            self.h2.store(true, Ordering::Relaxed);
        }
        self.inflight.fetch_add(1, Ordering::AcqRel);
        self.head_started.store(NONE, Ordering::Relaxed);
        InflightGuard(self.clone())
    }

    /// No request in flight: the only time a timeout can run.
    pub fn is_idle(&self) -> bool {
        self.inflight.load(Ordering::Acquire) == 0
    }

    fn on_read(&self) {
        if self.inflight.load(Ordering::Acquire) == 0
            && !self.h2.load(Ordering::Relaxed)
            && self.head_started.load(Ordering::Relaxed) == NONE
        {
            self.head_started.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// The next moment a timeout could fire, and which; `None` while busy.
    fn deadline(&self, header: Duration, idle: Duration) -> Option<(Instant, ConnTimeout)> {
        if self.inflight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let ms = |v: u64| self.epoch + Duration::from_millis(v);
        match self.head_started.load(Ordering::Relaxed) {
            NONE => Some((
                ms(self.idle_since.load(Ordering::Relaxed)) + idle,
                ConnTimeout::Idle,
            )),
            started => Some((ms(started) + header, ConnTimeout::HeaderRead)),
        }
    }

    /// Resolves when the connection should be closed for a timeout.
    pub async fn timeout(&self, header: Duration, idle: Duration) -> ConnTimeout {
        loop {
            match self.deadline(header, idle) {
                Some((at, why)) if at <= Instant::now() => return why,
                Some((at, _)) => tokio::time::sleep_until(at).await,
                // Busy: look again later; a request ending records the time.
                None => tokio::time::sleep(header.min(idle).max(Duration::from_millis(100))).await,
            }
        }
    }
}

impl Default for ConnState {
    fn default() -> Self {
        Self::new()
    }
}

/// One request in flight on a connection.
pub struct InflightGuard(Arc<ConnState>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        let s = &self.0;
        s.idle_since.store(s.now_ms(), Ordering::Relaxed);
        s.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection's socket, noting when a new request's bytes arrive.
pub struct ActivityIo<T> {
    inner: T,
    state: Arc<ConnState>,
}

impl<T> ActivityIo<T> {
    pub fn new(inner: T, state: Arc<ConnState>) -> Self {
        ActivityIo { inner, state }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.state.on_read();
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn header_then_idle_timeouts() {
        let header = Duration::from_secs(10);
        let idle = Duration::from_secs(75);
        let state = Arc::new(ConnState::new());
        // A fresh connection must send a head within the header timeout.
        let started = Instant::now();
        assert_eq!(state.timeout(header, idle).await, ConnTimeout::HeaderRead);
        assert_eq!(started.elapsed(), header);

        // After a request, an idle connection lasts idle_timeout.
        drop(state.begin(Version::HTTP_11));
        let started = Instant::now();
        assert_eq!(state.timeout(header, idle).await, ConnTimeout::Idle);
        assert_eq!(started.elapsed(), idle);

        // Bytes of a new head restart the header clock.
        drop(state.begin(Version::HTTP_11));
        tokio::time::advance(Duration::from_secs(30)).await;
        state.on_read();
        let started = Instant::now();
        assert_eq!(state.timeout(header, idle).await, ConnTimeout::HeaderRead);
        assert_eq!(started.elapsed(), header);
    }

    #[tokio::test(start_paused = true)]
    async fn busy_connections_do_not_time_out() {
        let state = Arc::new(ConnState::new());
        let guard = state.begin(Version::HTTP_11);
        let t = tokio::time::timeout(
            Duration::from_secs(600),
            state.timeout(Duration::from_secs(10), Duration::from_secs(75)),
        );
        assert!(
            t.await.is_err(),
            "a request in flight keeps the connection open"
        );
        drop(guard);
    }
}
