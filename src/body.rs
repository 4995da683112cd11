//! The bodies that flow through the proxy, and their limits while streaming.
//!
//! `RequestBody` forwards the client's body chunk by chunk and fails once it
//! passes `max_request_body` (never buffering it whole). `ResponseBody` is what
//! the client receives: an upstream body under an idle timer, or a small fixed
//! body; when it ends or is dropped it reports how much was sent and how it
//! ended (the access log and connection accounting ride on that).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

use crate::cache::{Entry, FillReader, Recorder, StoredBody};
use crate::coding::Coder;
use crate::limits::TokenMeter;
use crate::progress::StallWatch;

mod read_ahead;
use read_ahead::ReadAhead;
pub use read_ahead::ReadAheadLimits;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The client sent more than `max_request_body`.
#[derive(Debug)]
pub struct BodyTooLarge {
    pub limit: u64,
}

impl fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request body exceeds {} bytes", self.limit)
    }
}

impl std::error::Error for BodyTooLarge {}

/// Reading the client's body failed (the client went away mid-upload, or sent
/// a malformed chunked body).
#[derive(Debug)]
pub struct ClientBodyError(pub hyper::Error);

impl fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "reading the client's body: {}", self.0)
    }
}

impl std::error::Error for ClientBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// The upstream went quiet for longer than its `idle_timeout` mid-body.
#[derive(Debug)]
pub struct UpstreamIdle(pub Duration);

impl fmt::Display for UpstreamIdle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "upstream sent nothing for {:?} mid-body", self.0)
    }
}

impl std::error::Error for UpstreamIdle {}

/// The client's body sent nothing for longer than `body_read_timeout`.
#[derive(Debug)]
pub struct BodyStalled(pub Duration);

impl fmt::Display for BodyStalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the client's body sent nothing for {:?}", self.0)
    }
}

impl std::error::Error for BodyStalled {}

// === impl RequestBody ===

/// The client's body on its way upstream: streamed and cut off past `limit`
/// bytes, or already read whole (body-keyed cache routes need it for the key).
pub struct RequestBody {
    source: Source,
    seen: u64,
    limit: u64,
    /// `body_read_timeout`: the longest silence between two frames.
    stall: Duration,
    /// Allocated the first time the client makes us wait, then reused.
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

type FirstFrame = Result<Frame<Bytes>, hyper::Error>;

enum Source {
    /// `first` is a frame that had already arrived when the request was
    /// forwarded (see `RequestBody::new`), sent before the rest. Boxed: only
    /// a body still streaming has one, and inline it made every request
    /// (moved several times on its way through hyper) ~100 bytes larger.
    Client {
        first: Option<Box<FirstFrame>>,
        inner: Incoming,
    },
    Buffered(Option<Bytes>),
}

impl RequestBody {
    /// Streams `inner`. A small body usually arrives with the request head,
    /// so its one frame is taken now, without waiting: a body that is then
    /// complete goes upstream as bytes in hand, and the upstream connection
    /// never polls the client connection's body channel (a cross-task wake
    /// and the channel's bookkeeping on every POST).
    pub fn new(mut inner: Incoming, limit: u64, stall: Duration) -> Self {
        let first = if inner.is_end_stream() {
            None
        } else {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            match Pin::new(&mut inner).poll_frame(&mut cx) {
                Poll::Ready(frame) => frame,
                Poll::Pending => None,
            }
        };
        let source = match first {
            Some(Ok(frame)) if inner.is_end_stream() && frame.is_data() => {
                let data = frame.into_data().unwrap_or_default();
                if data.len() as u64 > limit {
                    // Sent as a stream so the limit fails it as usual.
                    Source::Client {
                        first: Some(Box::new(Ok(Frame::data(data)))),
                        inner,
                    }
                } else {
                    Source::Buffered((!data.is_empty()).then_some(data))
                }
            }
            first => Source::Client {
                first: first.map(Box::new),
                inner,
            },
        };
        RequestBody {
            source,
            seen: 0,
            limit,
            stall,
            timer: None,
            armed: false,
        }
    }

    /// The whole body, when it is in hand (so the request can be sent
    /// again): `None` while it still streams from the client.
    pub fn replayable(&self) -> Option<Bytes> {
        match &self.source {
            Source::Buffered(b) => Some(b.clone().unwrap_or_default()),
            // No body at all (a GET): nothing to lose by sending it again.
            Source::Client { first: None, inner } if inner.is_end_stream() => Some(Bytes::new()),
            Source::Client { .. } => None,
        }
    }

    /// A body read ahead of time (within the limit already).
    pub fn buffered(bytes: Bytes) -> Self {
        RequestBody {
            source: Source::Buffered((!bytes.is_empty()).then_some(bytes)),
            seen: 0,
            limit: u64::MAX,
            stall: Duration::MAX,
            timer: None,
            armed: false,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = match &mut this.source {
            Source::Buffered(b) => return Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Source::Client { first, inner } => match first.take() {
                Some(frame) => Some(*frame),
                None => match Pin::new(inner).poll_frame(cx) {
                    Poll::Ready(frame) => frame,
                    Poll::Pending => {
                        // Only a client that makes us wait touches a timer.
                        if !this.armed {
                            this.armed = true;
                            let deadline = crate::clock::now() + this.stall;
                            match &mut this.timer {
                                Some(t) => t.as_mut().reset(deadline),
                                None => {
                                    this.timer = Some(Box::pin(tokio::time::sleep_until(deadline)))
                                }
                            }
                        }
                        let timer = this.timer.as_mut().expect("armed above");
                        ready!(timer.as_mut().poll(cx));
                        return Poll::Ready(Some(Err(Box::new(BodyStalled(this.stall)))));
                    }
                },
            },
        };
        this.armed = false;
        match polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.seen > this.limit {
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge {
                            limit: this.limit,
                        }))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(Box::new(ClientBodyError(e))))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Client { first, inner } => first.is_none() && inner.is_end_stream(),
            Source::Buffered(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Client { first, inner } => {
                let held = match first.as_deref() {
                    Some(Ok(frame)) => frame.data_ref().map_or(0, |d| d.len() as u64),
                    _ => 0,
                };
                let rest = inner.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + held);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + held);
                }
                hint
            }
            Source::Buffered(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

// === impl ResponseBody ===

/// How a response body ended, for the access log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyOutcome {
    /// Every byte was handed to the connection.
    Complete,
    /// The client went away (or the connection was closed) before the end.
    Aborted,
    /// The upstream failed or went idle mid-body; the client's response was cut.
    UpstreamError,
}

impl BodyOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            BodyOutcome::Complete => "complete",
            BodyOutcome::Aborted => "aborted",
            BodyOutcome::UpstreamError => "upstream_error",
        }
    }
}

/// What runs once when a response body ends or is dropped, with the bytes
/// sent and how it ended. A trait rather than a boxed closure: a value the
/// request already keeps on the heap (its access-log record) becomes the
/// hook as it is, instead of being copied into a closure's new box.
/// What an upstream body needs of the connection it arrives on
/// (`upstream::ConnLease` implements it): polled while the body waits for
/// bytes, and handed back for the next request once the body has been read
/// to its end. Dropped instead, it closes the connection.
pub trait BodyConn: Send {
    /// Polls the connection so the body keeps arriving.
    fn drive(&mut self, cx: &mut Context<'_>);
    /// The body ended cleanly: the connection may carry another request.
    fn release(self: Box<Self>);
}

pub trait BodyEnd: Send {
    fn end(self: Box<Self>, bytes: u64, outcome: BodyOutcome);
}

/// The end hook of a response body.
pub type OnEnd = Box<dyn BodyEnd>;

/// Answers of at most this length (by `Content-Length`) are never read
/// ahead: hyper's write buffer alone holds them.
const SMALL_ANSWER: u64 = 64 * 1024;

/// The body the client receives.
pub struct ResponseBody {
    kind: Kind,
    sent: u64,
    on_end: Option<OnEnd>,
    /// Compresses or decompresses what `kind` yields; taken when the
    /// stream is finished.
    coder: Option<Box<Coder>>,
    /// The stored entry this response was built from: `compress` sends
    /// the entry's copy in the client's coding instead.
    entry: Option<Arc<Entry>>,
    /// Reads the token usage for token rate limits; settles them when dropped.
    meter: Option<Box<TokenMeter>>,
    /// Marks when a chunk is handed over and when the next is asked for
    /// (HTTP/2 responses: see `progress.rs`).
    stall: Option<Arc<StallWatch>>,
}

enum Kind {
    Full(Option<Bytes>),
    /// A recorded stream from the cache, replayed chunk by chunk.
    Chunks(Arc<[Bytes]>, usize),
    /// Boxed: inline it made every response ~140 bytes larger, copied at
    /// each step an answer takes to hyper; one allocation costs less.
    Upstream(Box<UpstreamBody>),
    /// A share of an upstream body several requests wait for (coalescing).
    Fill(FillReader),
    /// An upstream body read ahead of its client by a task of its own
    /// (`read_ahead.rs`), once it made the client wait.
    ReadAhead(ReadAhead),
}

struct UpstreamBody {
    inner: Incoming,
    /// The connection the body arrives on, polled by this body; back to the
    /// pool once the body has been read to its end, closed otherwise.
    lease: Option<Box<dyn BodyConn>>,
    /// Keeps the chunks for the cache when the response is being stored.
    recorder: Option<Box<Recorder>>,
    idle: Duration,
    /// Allocated the first time the upstream makes us wait, then reused.
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
    /// How far it may be read ahead of a slow client, once it makes the
    /// client wait; `None`: not at all.
    read_ahead: Option<ReadAheadLimits>,
}

impl ResponseBody {
    pub fn empty() -> Self {
        Self::with(Kind::Full(None))
    }

    pub fn full(bytes: Bytes) -> Self {
        Self::with(Kind::Full((!bytes.is_empty()).then_some(bytes)))
    }

    /// An upstream body, failed if the upstream sends nothing for `idle`,
    /// read ahead of a slow client within `read_ahead`.
    pub fn upstream(
        inner: Incoming,
        lease: Box<dyn BodyConn>,
        idle: Duration,
        read_ahead: Option<&ReadAheadLimits>,
    ) -> Self {
        // An answer of a known small length fits the socket buffers whole:
        // reading it ahead would only cost a task.
        let small = inner.size_hint().upper().is_some_and(|n| n <= SMALL_ANSWER);
        Self::with(Kind::Upstream(Box::new(UpstreamBody {
            inner,
            lease: Some(lease),
            recorder: None,
            idle,
            timer: None,
            armed: false,
            // Cloned (an atomic count on a shared line) only when it may
            // be used.
            read_ahead: read_ahead.filter(|_| !small).cloned(),
        })))
    }

    /// A stored body from the cache.
    pub fn stored(body: &StoredBody) -> Self {
        match body {
            StoredBody::Whole(b) => Self::full(b.clone()),
            StoredBody::Chunks(c) => Self::with(Kind::Chunks(c.clone(), 0)),
        }
    }

    /// The body of a coalesced upstream exchange, read at this client's pace.
    pub fn fill(reader: FillReader) -> Self {
        Self::with(Kind::Fill(reader))
    }

    /// Records the upstream body as it passes, for the cache.
    pub fn record(&mut self, recorder: Recorder) {
        if let Kind::Upstream(up) = &mut self.kind {
            up.recorder = Some(Box::new(recorder));
        }
    }

    fn with(kind: Kind) -> Self {
        ResponseBody {
            kind,
            sent: 0,
            on_end: None,
            coder: None,
            entry: None,
            meter: None,
            stall: None,
        }
    }

    /// A stored entry's body (none for HEAD), remembering the entry.
    pub fn from_entry(entry: &Arc<Entry>, head: bool) -> Self {
        let mut body = if head {
            Self::empty()
        } else {
            Self::stored(&entry.body)
        };
        body.entry = Some(entry.clone());
        body
    }

    /// The stored entry this body was built from.
    pub fn entry(&self) -> Option<&Arc<Entry>> {
        self.entry.as_ref()
    }

    /// Shows the body (before any coding) to `meter` as it passes.
    pub fn meter(&mut self, meter: TokenMeter) {
        self.meter = Some(Box::new(meter));
    }

    /// Sends the body through `coder` (the headers say which coding).
    pub fn transcode(&mut self, coder: Coder) {
        self.coder = Some(Box::new(coder));
    }

    /// The next frame of `kind` through the coder: each data frame, then
    /// what the coder still holds back from it, and the coder's last bytes
    /// with the last frame.
    fn poll_encoded(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            let Some(coder) = self.coder.as_mut() else {
                return Poll::Ready(None);
            };
            let (stepped, kind_done) = if coder.has_pending() {
                (coder.resume(), false)
            } else {
                match self.kind.poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                    // Trailers are not compressed.
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) => {
                            if let Some(m) = &mut self.meter {
                                m.observe(&data);
                            }
                            (coder.push(data), false)
                        }
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    },
                    Poll::Ready(None) => (Ok(Bytes::new()), true),
                }
            };
            let mut out = match stepped {
                Ok(out) => out,
                Err(e) => return Poll::Ready(Some(Err(Box::new(e)))),
            };
            if !coder.has_pending() && (kind_done || self.kind.is_end_stream()) {
                let coder = self.coder.take().expect("checked above");
                match coder.finish() {
                    Ok(tail) if out.is_empty() => out = tail,
                    Ok(tail) => {
                        let mut both = Vec::with_capacity(out.len() + tail.len());
                        both.extend_from_slice(&out);
                        both.extend_from_slice(&tail);
                        out = both.into();
                    }
                    Err(e) => return Poll::Ready(Some(Err(Box::new(e)))),
                }
            }
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
            if self.coder.is_none() {
                return Poll::Ready(None);
            }
        }
    }

    /// Whether the body still comes from an upstream exchange (its own, or
    /// one it follows): what a stalled client would hold.
    pub fn holds_upstream(&self) -> bool {
        matches!(
            self.kind,
            Kind::Upstream(_) | Kind::Fill(_) | Kind::ReadAhead(_)
        ) && !self.is_end_stream()
    }

    /// Reports this body's progress to `watch` (see `progress.rs`).
    pub fn watch_progress(&mut self, watch: Arc<StallWatch>) {
        self.stall = Some(watch);
    }

    /// Registers the end hook; it runs exactly once.
    pub fn on_end(&mut self, f: OnEnd) {
        self.on_end = Some(f);
    }

    fn finish(&mut self, outcome: BodyOutcome) {
        if let Kind::Upstream(up) = &mut self.kind {
            if outcome == BodyOutcome::Complete {
                up.complete();
            } else {
                up.abandon();
            }
        }
        if let Some(watch) = self.stall.take() {
            watch.finish();
        }
        // The meter reports the answer's tokens before the end hook runs:
        // a trace ended by the hook carries them.
        drop(self.meter.take());
        if let Some(hook) = self.on_end.take() {
            hook.end(self.sent, outcome);
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // hyper never polls a body that is empty from the start (204, 101,
        // Content-Length: 0, HEAD): dropped at its end, it was delivered.
        let outcome = if self.is_end_stream() {
            BodyOutcome::Complete
        } else {
            BodyOutcome::Aborted
        };
        self.finish(outcome);
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(watch) = &this.stall {
            watch.asked();
        }
        let polled = if this.coder.is_some() {
            this.poll_encoded(cx)
        } else {
            let polled = this.kind.poll(cx);
            if let (Some(m), Poll::Ready(Some(Ok(frame)))) = (&mut this.meter, &polled) {
                if let Some(data) = frame.data_ref() {
                    m.observe(data);
                }
            }
            polled
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.sent += data.len() as u64;
                    if let Some(watch) = &this.stall {
                        watch.handed();
                    }
                }
                // hyper stops polling once the body says it has ended, so the
                // end is recorded here rather than on a final `None`.
                if this.is_end_stream() {
                    this.finish(BodyOutcome::Complete);
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish(BodyOutcome::UpstreamError),
            Poll::Ready(None) => this.finish(BodyOutcome::Complete),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.coder.is_none() && self.kind.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.coder.is_some() {
            return SizeHint::default();
        }
        match &self.kind {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Chunks(..) | Kind::Fill(_) | Kind::ReadAhead(_) => SizeHint::default(),
            Kind::Upstream(up) => up.inner.size_hint(),
        }
    }
}

impl Kind {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Chunks(chunks, next) => {
                let chunk = chunks.get(*next).cloned();
                *next += 1;
                Poll::Ready(chunk.map(|b| Ok(Frame::data(b))))
            }
            Kind::Upstream(up) => {
                let polled = up.poll(cx);
                if polled.is_pending() {
                    if let Some(limits) = up.read_ahead.take() {
                        // The upstream made the client wait: from now on a
                        // task reads it ahead of the client.
                        let Kind::Upstream(up) = std::mem::replace(self, Kind::Full(None)) else {
                            unreachable!("matched above")
                        };
                        *self = Kind::ReadAhead(ReadAhead::start(up, limits));
                        return self.poll(cx);
                    }
                }
                polled
            }
            Kind::Fill(reader) => reader.poll_chunk(cx).map(|c| c.map(|c| c.map(Frame::data))),
            Kind::ReadAhead(r) => r.poll(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Chunks(chunks, next) => *next >= chunks.len(),
            Kind::Upstream(up) => up.inner.is_end_stream(),
            Kind::Fill(reader) => reader.is_done(),
            Kind::ReadAhead(r) => r.is_end_stream(),
        }
    }
}

impl UpstreamBody {
    /// Read to its end: the connection goes back to the pool and a
    /// recording may be stored.
    fn complete(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.release();
        }
        if let Some(mut rec) = self.recorder.take() {
            rec.finish(true);
        }
    }

    /// Left unfinished: the connection is closed, nothing is stored.
    fn abandon(&mut self) {
        self.lease.take();
        if let Some(mut rec) = self.recorder.take() {
            rec.finish(false);
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // What the connection has already read is taken first: the
        // connection is polled (a pass of hyper's client state machine,
        // and a waker registered on its request queue) only when the body
        // has nothing to give, which is also the only time progress
        // depends on it. A body that arrived with its head costs no poll.
        let mut polled = Pin::new(&mut self.inner).poll_frame(cx);
        if polled.is_pending() {
            if let Some(lease) = &mut self.lease {
                lease.drive(cx);
                polled = Pin::new(&mut self.inner).poll_frame(cx);
            }
        }
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                self.armed = false;
                if let (Some(rec), Some(data)) = (&mut self.recorder, frame.data_ref()) {
                    rec.push(data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                // The timer is only touched when the upstream makes us wait, so a
                // body that arrives in one read costs no timer work at all.
                let deadline = crate::clock::now() + self.idle;
                if !self.armed {
                    self.armed = true;
                    match &mut self.timer {
                        Some(t) => t.as_mut().reset(deadline),
                        None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                }
                let timer = self.timer.as_mut().expect("armed above");
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(Box::new(UpstreamIdle(self.idle)))));
                }
                Poll::Pending
            }
        }
    }
}
