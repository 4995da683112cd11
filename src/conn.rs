//! Per-connection state: requests in flight, and the client timeouts that
//! depend on it — `header_read_timeout` (a request head must arrive in time
//! once it has started, or once the connection opened), `idle_timeout`
//! (keep-alive connections with nothing in flight are closed) and
//! `send_timeout` (a client that takes no response bytes for that long is
//! cut, in flight or not: the socket's writes tell).
//!
//! hyper's own header timer starts as soon as a keep-alive connection waits for
//! its next request, which would close idle connections after the header
//! timeout instead of `idle_timeout`; so both are tracked here, from the bytes
//! the connection reads and the requests it has in flight. Serving the
//! connection is `server.rs`'s job.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use http::Version;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::progress::StallWatch;

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
    /// Milliseconds since `epoch` when a write to the client first could
    /// not go on (the client is not reading); `NONE` while writes flow.
    write_blocked: AtomicU64,
    /// An HTTP/2 stream's watchdog found its client taking nothing for
    /// `send_timeout` (`watch_stream`); the connection's task is woken.
    stalled: AtomicBool,
    /// The connection's task, registered on HTTP/2 connections only.
    task: AtomicWaker,
}

/// Why a connection's timer fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnTimeout {
    /// A request head did not arrive within `header_read_timeout`.
    HeaderRead,
    /// Nothing in flight for `idle_timeout`.
    Idle,
    /// The client took no bytes for `send_timeout`.
    Send,
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
            write_blocked: AtomicU64::new(NONE),
            stalled: AtomicBool::new(false),
            task: AtomicWaker::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        crate::clock::now()
            .saturating_duration_since(self.epoch)
            .as_millis() as u64
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

    fn on_read(&self) {
        if self.inflight.load(Ordering::Acquire) == 0
            && !self.h2.load(Ordering::Relaxed)
            && self.head_started.load(Ordering::Relaxed) == NONE
        {
            self.head_started.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    fn on_write(&self, blocked: bool) {
        let since = self.write_blocked.load(Ordering::Relaxed);
        if blocked && since == NONE {
            self.write_blocked.store(self.now_ms(), Ordering::Relaxed);
        } else if !blocked && since != NONE {
            self.write_blocked.store(NONE, Ordering::Relaxed);
        }
    }

    /// The next moment a timeout could fire, and which; `None` while busy
    /// with writes flowing.
    fn deadline(&self, t: &Timeouts) -> Option<(Instant, ConnTimeout)> {
        let ms = |v: u64| self.epoch + Duration::from_millis(v);
        match self.write_blocked.load(Ordering::Relaxed) {
            NONE => {}
            since => return Some((ms(since) + t.send, ConnTimeout::Send)),
        }
        if self.inflight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let (header, idle) = (t.header, t.idle);
        match self.head_started.load(Ordering::Relaxed) {
            NONE => Some((
                ms(self.idle_since.load(Ordering::Relaxed)) + idle,
                ConnTimeout::Idle,
            )),
            started => Some((ms(started) + header, ConnTimeout::HeaderRead)),
        }
    }
}

/// A connection's timer: fires when `header_read_timeout` or `idle_timeout`
/// runs out, whichever applies at the moment.
///
/// Polled by the connection's task on each wake-up: while a request is in
/// flight it answers at once, touching no timer. The deadline is worked out
/// afresh on each poll (no clock reading: `ConnState` keeps the moments),
/// and the sleep is moved earlier when a request head starts
/// arriving, so a head trickling in on a keep-alive connection is cut off
/// after `header_read_timeout`, not after what was left of `idle_timeout`.
/// A deadline that moved later is taken up when the sleep wakes.
pub struct ConnTimer {
    state: Arc<ConnState>,
    timeouts: Timeouts,
    sleep: Pin<Box<Sleep>>,
    /// The waker the sleep was last polled with, since it was last set: the
    /// timer will wake it, so until the sleep fires, a poll with the same
    /// waker only asks whether it has. Polling the sleep again re-registers
    /// the waker, a visible cost on every wake-up of a keep-alive connection.
    armed: Option<Waker>,
}

/// The client timeouts a connection is held to.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub header: Duration,
    pub idle: Duration,
    pub send: Duration,
}

impl ConnTimer {
    pub fn new(state: Arc<ConnState>, timeouts: Timeouts) -> Self {
        let at = state.deadline(&timeouts).map_or_else(
            || Instant::now() + timeouts.header.min(timeouts.idle),
            |(at, _)| at,
        );
        ConnTimer {
            state,
            timeouts,
            sleep: Box::pin(tokio::time::sleep_until(at)),
            armed: None,
        }
    }

    /// Ready with the reason once the connection should be closed. Pending
    /// while a request is in flight: its end polls the connection again.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<ConnTimeout> {
        if self.state.h2.load(Ordering::Relaxed) {
            // A stream's watchdog may need to wake this task.
            self.state.task.register(cx.waker());
            if self.state.stalled.load(Ordering::Acquire) {
                return Poll::Ready(ConnTimeout::Send);
            }
        }
        loop {
            let Some((at, why)) = self.state.deadline(&self.timeouts) else {
                return Poll::Pending;
            };
            if at < self.sleep.deadline() {
                self.sleep.as_mut().reset(at);
                self.armed = None;
            }
            let armed = self.armed.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
            if armed && !self.sleep.is_elapsed() {
                return Poll::Pending;
            }
            match self.sleep.as_mut().poll(cx) {
                Poll::Pending => {
                    if !armed {
                        self.armed = Some(cx.waker().clone());
                    }
                    return Poll::Pending;
                }
                // The armed moment (not later than the deadline) has passed.
                Poll::Ready(()) if at <= self.sleep.deadline() => return Poll::Ready(why),
                // The deadline moved later since the sleep was armed.
                Poll::Ready(()) => {
                    self.sleep.as_mut().reset(at);
                    self.armed = None;
                }
            }
        }
    }

    /// Resolves when the connection should be closed for a timeout.
    pub async fn expired(&mut self) -> ConnTimeout {
        std::future::poll_fn(|cx| self.poll_expired(cx)).await
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

/// Watches one HTTP/2 response until it ends: when a chunk it handed over
/// has waited `send_timeout` without the next being asked for (the client
/// keeps the stream's window shut), the connection is cut like one whose
/// writes stall, and with it the upstream requests it holds. A task per
/// such response, asleep but for one wake-up per `send_timeout`.
pub fn watch_stream(state: Arc<ConnState>, watch: Arc<StallWatch>, send_timeout: Duration) {
    tokio::spawn(async move {
        loop {
            let due = watch.waiting_since().map_or_else(
                || Instant::now() + send_timeout,
                |since| since + send_timeout,
            );
            tokio::select! {
                () = watch.finished() => return,
                () = tokio::time::sleep_until(due) => {}
            }
            if watch.is_done() {
                return;
            }
            if watch
                .waiting_since()
                .is_some_and(|since| since + send_timeout <= Instant::now())
            {
                state.stalled.store(true, Ordering::Release);
                state.task.wake();
                return;
            }
        }
    });
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
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.state.on_write(res.is_pending());
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.state.on_write(res.is_pending());
        res
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

    fn timeouts(header: Duration, idle: Duration) -> Timeouts {
        Timeouts {
            header,
            idle,
            send: Duration::from_secs(60),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn header_then_idle_timeouts() {
        let header = Duration::from_secs(10);
        let idle = Duration::from_secs(75);
        let state = Arc::new(ConnState::new());
        // A fresh connection must send a head within the header timeout.
        let started = Instant::now();
        let mut timer = ConnTimer::new(state.clone(), timeouts(header, idle));
        assert_eq!(timer.expired().await, ConnTimeout::HeaderRead);
        assert_eq!(started.elapsed(), header);

        // After a request, an idle connection lasts idle_timeout.
        drop(state.begin(Version::HTTP_11));
        let started = Instant::now();
        assert_eq!(timer.expired().await, ConnTimeout::Idle);
        assert_eq!(started.elapsed(), idle);

        // Bytes of a new head restart the header clock.
        drop(state.begin(Version::HTTP_11));
        tokio::time::advance(Duration::from_secs(30)).await;
        state.on_read();
        let started = Instant::now();
        assert_eq!(timer.expired().await, ConnTimeout::HeaderRead);
        assert_eq!(started.elapsed(), header);
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_starting_on_an_idle_connection_moves_the_timer_earlier() {
        let header = Duration::from_secs(10);
        let idle = Duration::from_secs(75);
        let state = Arc::new(ConnState::new());
        drop(state.begin(Version::HTTP_11));
        let mut timer = ConnTimer::new(state.clone(), timeouts(header, idle));
        // Armed for the idle deadline, 75 s away...
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(timer.poll_expired(&mut cx).is_pending());
        tokio::time::advance(Duration::from_secs(5)).await;
        // ...until the next head starts: then it has 10 s, not 70.
        state.on_read();
        let started = Instant::now();
        assert_eq!(timer.expired().await, ConnTimeout::HeaderRead);
        assert_eq!(started.elapsed(), header);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_polled_again_before_its_deadline_still_fires() {
        let header = Duration::from_secs(10);
        let state = Arc::new(ConnState::new());
        let mut timer = ConnTimer::new(state.clone(), timeouts(header, Duration::from_secs(75)));
        let started = Instant::now();
        // Polled before it is due: once with another waker (which must not
        // stay the one the timer wakes), then by this task, several times.
        let mut other = Context::from_waker(std::task::Waker::noop());
        assert!(timer.poll_expired(&mut other).is_pending());
        for _ in 0..3 {
            let polled = std::future::poll_fn(|cx| Poll::Ready(timer.poll_expired(cx))).await;
            assert!(polled.is_pending());
        }
        // Bounded: a timer that kept the wrong waker would never wake this.
        let fired = tokio::time::timeout(header * 2, timer.expired()).await;
        assert_eq!(fired, Ok(ConnTimeout::HeaderRead));
        assert_eq!(started.elapsed(), header);
    }

    #[tokio::test(start_paused = true)]
    async fn busy_connections_do_not_time_out() {
        let state = Arc::new(ConnState::new());
        let guard = state.begin(Version::HTTP_11);
        let mut timer = ConnTimer::new(
            state.clone(),
            timeouts(Duration::from_secs(10), Duration::from_secs(75)),
        );
        let t = tokio::time::timeout(Duration::from_secs(600), timer.expired());
        assert!(
            t.await.is_err(),
            "a request in flight keeps the connection open"
        );
        drop(guard);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_takes_no_bytes_is_cut_after_send_timeout() {
        let state = Arc::new(ConnState::new());
        let guard = state.begin(Version::HTTP_11);
        let t = timeouts(Duration::from_secs(10), Duration::from_secs(75));
        let mut timer = ConnTimer::new(state.clone(), t);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(timer.poll_expired(&mut cx).is_pending());
        tokio::time::advance(Duration::from_secs(5)).await;
        // A write that could not go on starts the clock; one that went on
        // stops it.
        state.on_write(true);
        tokio::time::advance(Duration::from_secs(30)).await;
        state.on_write(false);
        let quiet = tokio::time::timeout(Duration::from_secs(600), timer.expired());
        assert!(quiet.await.is_err(), "writes flowed again: busy, not stuck");
        state.on_write(true);
        let started = Instant::now();
        assert_eq!(timer.expired().await, ConnTimeout::Send);
        assert_eq!(started.elapsed(), t.send);
        // Also with nothing in flight (a response buffered, never read).
        drop(guard);
        assert_eq!(timer.expired().await, ConnTimeout::Send);
    }
}
