//! Reading an upstream's answer ahead of a slow client, so the backend is
//! paced by the client only once a bounded buffer is full.
//!
//! A body that arrives whole never comes here (nothing to read ahead). Once
//! an upstream body makes its client wait for the first time (a streamed
//! generation, a slow backend), it moves to a task of its own, which reads
//! it into a buffer of at most `read_ahead` bytes for this response, and
//! at most `max_read_ahead` for the whole process (a shared semaphore): past
//! either, the task stops reading and the backend waits, as it did before.
//! When the upstream's answer has ended the task gives its connection (and
//! its `max_inflight_per_server` slot) back and lets a recording be stored,
//! however far behind the client is. When the client leaves, the task stops
//! and the upstream connection is closed.
//!
//! Owns the buffer and the task; the body's framing, coding and accounting
//! stay in `body.rs`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::Frame;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use super::{BoxError, UpstreamBody};
use crate::protect::ReadAheadBudget;

/// How much may be read ahead: per response, and for the process.
#[derive(Clone)]
pub struct ReadAheadLimits {
    pub per_response: usize,
    pub budget: Arc<ReadAheadBudget>,
}

type Item = Result<Frame<Bytes>, BoxError>;

/// What the task has read and the client not yet taken.
struct Buffered {
    items: VecDeque<(Item, Option<OwnedSemaphorePermit>)>,
    bytes: usize,
    ended: bool,
    /// The client's side, waiting for the next item.
    reader: Option<Waker>,
}

struct Shared {
    buffered: Mutex<Buffered>,
    /// The client took something: there may be room again.
    room: Notify,
    /// The client's side was dropped.
    gone: CancellationToken,
}

/// The client's side of a body being read ahead.
pub struct ReadAhead {
    shared: Arc<Shared>,
}

impl ReadAhead {
    /// Moves `up` to a task of its own that reads it ahead within `limits`.
    pub fn start(up: Box<UpstreamBody>, limits: ReadAheadLimits) -> ReadAhead {
        let shared = Arc::new(Shared {
            buffered: Mutex::new(Buffered {
                items: VecDeque::new(),
                bytes: 0,
                ended: false,
                reader: None,
            }),
            room: Notify::new(),
            gone: CancellationToken::new(),
        });
        tokio::spawn(pump(up, shared.clone(), limits));
        ReadAhead { shared }
    }

    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        let mut b = lock(&self.shared);
        if let Some((item, permit)) = b.items.pop_front() {
            if let Ok(frame) = &item {
                b.bytes -= frame.data_ref().map_or(0, Bytes::len);
            }
            drop(b);
            drop(permit);
            self.shared.room.notify_one();
            return Poll::Ready(Some(item));
        }
        if b.ended {
            return Poll::Ready(None);
        }
        match &b.reader {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => b.reader = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    pub fn is_end_stream(&self) -> bool {
        let b = lock(&self.shared);
        b.ended && b.items.is_empty()
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.shared.gone.cancel();
    }
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Buffered> {
    shared.buffered.lock().unwrap_or_else(|e| e.into_inner())
}

/// Hands `item` (if any) to the client's side; `last` when nothing
/// follows.
fn push(shared: &Shared, item: Option<(Item, Option<OwnedSemaphorePermit>)>, last: bool) {
    let mut b = lock(shared);
    if let Some((item, permit)) = item {
        if let Ok(frame) = &item {
            b.bytes += frame.data_ref().map_or(0, Bytes::len);
        }
        b.items.push_back((item, permit));
    }
    b.ended |= last;
    let reader = b.reader.take();
    drop(b);
    if let Some(w) = reader {
        w.wake();
    }
}

/// Reads `up` to its end, or until the client leaves.
async fn pump(mut up: Box<UpstreamBody>, shared: Arc<Shared>, limits: ReadAheadLimits) {
    loop {
        // Room in this response's share first.
        loop {
            let room = shared.room.notified();
            if lock(&shared).bytes < limits.per_response {
                break;
            }
            tokio::select! {
                () = room => {}
                () = shared.gone.cancelled() => return up.abandon(),
            }
        }
        let next = tokio::select! {
            next = std::future::poll_fn(|cx| up.poll(cx)) => next,
            () = shared.gone.cancelled() => return up.abandon(),
        };
        match next {
            Some(Ok(frame)) => {
                let len = frame.data_ref().map_or(0, Bytes::len);
                // The process's share: waiting for it paces the backend.
                let permit = if len == 0 {
                    None
                } else {
                    tokio::select! {
                        p = limits.budget.take(len) => p,
                        () = shared.gone.cancelled() => return up.abandon(),
                    }
                };
                let last = http_body::Body::is_end_stream(&up.inner);
                if last {
                    up.complete();
                }
                push(&shared, Some((Ok(frame), permit)), last);
                if last {
                    return;
                }
            }
            Some(Err(e)) => {
                up.abandon();
                push(&shared, Some((Err(e), None)), true);
                return;
            }
            None => {
                up.complete();
                push(&shared, None, true);
                return;
            }
        }
    }
}
