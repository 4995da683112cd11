//! Whether a response's client takes what it is handed: the moment a
//! response body last had something ready that nobody came back for.
//!
//! On HTTP/1.1 a client that stops reading blocks the socket's writes,
//! which the connection's timer sees (`conn.rs`). On HTTP/2 it can instead
//! keep a stream's flow-control window shut: hyper then holds the chunk in
//! hand and stops asking the body for more, and no write ever blocks. The
//! body marks here when it hands a chunk over (and at its start) and when
//! it is asked again; a watchdog of the stream (`conn::watch_stream`) cuts
//! the connection when a handed chunk waits longer than `send_timeout`.
//!
//! Owns the marks only; it neither reads bodies nor cuts anything.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

const NOT_WAITING: u64 = u64::MAX;

/// One response body's progress, shared by the body and its watchdog.
pub struct StallWatch {
    start: Instant,
    /// Milliseconds since `start` when something was handed over and not
    /// yet asked for again; `NOT_WAITING` while the body is being asked
    /// (or waits on its own source).
    waiting_since: AtomicU64,
    done: AtomicBool,
    ended: Notify,
}

impl StallWatch {
    /// A response about to be handed to the connection: waiting from now.
    pub fn new() -> Self {
        StallWatch {
            start: Instant::now(),
            waiting_since: AtomicU64::new(0),
            done: AtomicBool::new(false),
            ended: Notify::new(),
        }
    }

    /// The body was asked for its next frame.
    pub fn asked(&self) {
        if self.waiting_since.load(Ordering::Relaxed) != NOT_WAITING {
            self.waiting_since.store(NOT_WAITING, Ordering::Relaxed);
        }
    }

    /// The body handed a chunk over.
    pub fn handed(&self) {
        let ms = Instant::now()
            .saturating_duration_since(self.start)
            .as_millis() as u64;
        self.waiting_since.store(ms, Ordering::Relaxed);
    }

    /// The body ended or was dropped: the watchdog may go.
    pub fn finish(&self) {
        self.done.store(true, Ordering::Release);
        self.ended.notify_one();
    }

    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Since when a handed chunk has waited, if one does.
    pub fn waiting_since(&self) -> Option<Instant> {
        match self.waiting_since.load(Ordering::Relaxed) {
            NOT_WAITING => None,
            ms => Some(self.start + Duration::from_millis(ms)),
        }
    }

    /// Resolves once `finish` was called (at once if it was already).
    pub async fn finished(&self) {
        if !self.is_done() {
            self.ended.notified().await;
        }
    }
}

impl Default for StallWatch {
    fn default() -> Self {
        Self::new()
    }
}
