//! The process's defences against clients it does not trust, shared by
//! every worker and carried across reloads: how many connections are open
//! (in all and per client address), how many bytes of request bodies and
//! of answers read ahead of slow clients are held in memory at once, and
//! the counts of what was refused or cut for either, or by a deadline.
//!
//! Owns the accounting only. Where a connection is accepted or cut is
//! `server.rs`'s business, where a body is read is the handler's; they ask
//! here whether there is room and report what they cut. Nothing here knows
//! a request.

pub mod bodies;
pub mod connections;

use std::sync::atomic::{AtomicU64, Ordering};

pub use bodies::{BodyBudget, BodyCharge, ReadAheadBudget};
pub use connections::{ConnectionLimits, ConnectionPermit, Refused};

/// One per process.
pub struct Protect {
    pub connections: ConnectionLimits,
    pub bodies: BodyBudget,
    /// Answers read ahead of slow clients.
    pub read_ahead: std::sync::Arc<ReadAheadBudget>,
    pub cut: CutCounts,
    /// Addresses that presented no key or a wrong one too often.
    pub failed_keys: crate::limits::failures::FailureGate,
    /// What each API key's requests came to.
    pub usage: std::sync::Arc<crate::usage::Usage>,
    /// Requests of each API key in progress (a tier's `max_concurrent`).
    pub per_key: std::sync::Arc<crate::limits::per_key::KeyConcurrency>,
}

/// Failed API keys an address may present in a minute (and at once) before
/// it is refused with 429 for a while.
pub const FAILED_KEYS_PER_MINUTE: u64 = 20;

impl Protect {
    /// Sized from the policy the process starts with (`server.*` of the
    /// same names); `ConnectionLimits::set_limits` takes a reloaded one's.
    /// Plain numbers, not the policy: this module sits below it.
    pub fn new(
        max_connections: usize,
        max_connections_per_ip: usize,
        max_buffered_bodies: u64,
        max_read_ahead: u64,
    ) -> Protect {
        Protect {
            connections: ConnectionLimits::new(max_connections, max_connections_per_ip),
            bodies: BodyBudget::new(max_buffered_bodies),
            read_ahead: std::sync::Arc::new(ReadAheadBudget::new(max_read_ahead)),
            cut: CutCounts::default(),
            usage: Default::default(),
            per_key: Default::default(),
            failed_keys: crate::limits::failures::FailureGate::new(
                FAILED_KEYS_PER_MINUTE,
                std::time::Duration::from_secs(60),
            ),
        }
    }
}

/// Why a request or connection was cut short by a deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deadline {
    /// The request body made no progress for `body_read_timeout`.
    BodyRead,
    /// The client took no response bytes for `send_timeout`.
    Send,
    /// A tunnel carried nothing either way for `tunnel_idle_timeout`.
    TunnelIdle,
    /// A request head did not arrive within `header_read_timeout`.
    HeaderRead,
    /// An HTTP/2 client did not answer a keep-alive PING in time, or did
    /// not close after GOAWAY.
    Http2Keepalive,
}

impl Deadline {
    pub const ALL: [Deadline; 5] = [
        Deadline::BodyRead,
        Deadline::Send,
        Deadline::TunnelIdle,
        Deadline::HeaderRead,
        Deadline::Http2Keepalive,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Deadline::BodyRead => "body_read",
            Deadline::Send => "send",
            Deadline::TunnelIdle => "tunnel_idle",
            Deadline::HeaderRead => "header_read",
            Deadline::Http2Keepalive => "http2_keepalive",
        }
    }
}

/// Requests and connections cut by each deadline.
#[derive(Default)]
pub struct CutCounts([AtomicU64; 5]);

impl CutCounts {
    pub fn count(&self, why: Deadline) {
        self.0[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, why: Deadline) -> u64 {
        self.0[why as usize].load(Ordering::Relaxed)
    }
}
