//! `max_inflight_per_server`: requests in flight to each server of an
//! upstream, and the fair queue in front of them.
//!
//! Two semaphores (tokio's are FIFO): one for the whole pool, sized to the
//! sum of its servers' slots, which is the queue requests wait in; and one
//! per server. A request first takes a pool permit, in arrival order, then
//! any server's free slot, starting with the one the balancer picked. Every
//! server slot is held together with a pool permit, so a pool permit always
//! finds a free server. A slot is held until the response body has been
//! read (it travels with the connection lease), not just until the headers.
//!
//! The queue's length and waits are counted here for the metrics issue; the
//! 503 itself is the handler's.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::policy::UpstreamPolicy;

pub struct InflightLimit {
    pool: Arc<Semaphore>,
    servers: Box<[Arc<Semaphore>]>,
    per_server: u32,
    queue_timeout: Duration,
    /// Requests waiting for a slot now.
    queued: AtomicUsize,
    /// Requests that got a slot after waiting, and their total wait.
    waited: AtomicU64,
    waited_nanos: AtomicU64,
    /// Requests that gave up at `queue_timeout`.
    timed_out: AtomicU64,
    /// Moving average of how long a slot is held, for `Retry-After`.
    hold_nanos: AtomicU64,
}

/// A request's place at one server; released when dropped.
pub struct InflightSlot {
    /// Index of the server in the upstream's `servers`.
    pub server: usize,
    limit: Arc<InflightLimit>,
    since: Instant,
    _server: OwnedSemaphorePermit,
    _pool: OwnedSemaphorePermit,
}

/// No slot came free within `queue_timeout`.
#[derive(Debug)]
pub struct QueueFull {
    pub waited: Duration,
    /// A guess at when one will: the queue ahead times the usual hold.
    pub retry_after: Duration,
}

impl InflightLimit {
    pub fn new(servers: usize, per_server: u32, queue_timeout: Duration) -> Self {
        let total = servers * per_server as usize;
        InflightLimit {
            pool: Arc::new(Semaphore::new(total)),
            servers: (0..servers)
                .map(|_| Arc::new(Semaphore::new(per_server as usize)))
                .collect(),
            per_server,
            queue_timeout,
            queued: AtomicUsize::new(0),
            waited: AtomicU64::new(0),
            waited_nanos: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            hold_nanos: AtomicU64::new(0),
        }
    }

    /// Whether this limit fits `upstream` as its policy now reads (a reload
    /// then keeps the queue and the requests in flight).
    pub fn same_shape(&self, upstream: &UpstreamPolicy, per_server: u32) -> bool {
        self.servers.len() == upstream.servers.len()
            && self.per_server == per_server
            && self.queue_timeout == upstream.queue_timeout
    }

    /// A slot, preferably at server `preferred`, else at another server
    /// `allowed` (healthy, serving the model); waits in line up to
    /// `queue_timeout`, calling `waiting(true)` when it starts to wait and
    /// `waiting(false)` when it stops.
    pub async fn acquire(
        self: &Arc<Self>,
        preferred: usize,
        allowed: impl Fn(usize) -> bool,
        waiting: impl Fn(bool),
    ) -> Result<InflightSlot, QueueFull> {
        let started = crate::clock::now();
        let pool = match self.pool.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.queued.fetch_add(1, Ordering::Relaxed);
                // Counted out by a guard: a client leaving drops this future
                // mid-wait.
                let in_line = InLine(&self.queued);
                waiting(true);
                let waited =
                    tokio::time::timeout(self.queue_timeout, self.pool.clone().acquire_owned())
                        .await;
                waiting(false);
                drop(in_line);
                let elapsed = started.elapsed();
                match waited {
                    Ok(Ok(p)) => {
                        self.waited.fetch_add(1, Ordering::Relaxed);
                        self.waited_nanos
                            .fetch_add(nanos(elapsed), Ordering::Relaxed);
                        p
                    }
                    // The semaphore is never closed; treat it like a timeout.
                    Ok(Err(_)) | Err(_) => {
                        self.timed_out.fetch_add(1, Ordering::Relaxed);
                        return Err(QueueFull {
                            waited: elapsed,
                            retry_after: self.retry_after(),
                        });
                    }
                }
            }
        };
        let pool = match self.server_slot(preferred, pool, &allowed) {
            Ok(slot) => return Ok(slot),
            Err(pool) => pool,
        };
        // The free slots are at servers this request may not use: wait for
        // one at its own, within what is left of the line's time.
        let left = self.queue_timeout.saturating_sub(started.elapsed());
        let server = self.servers[preferred].clone();
        match tokio::time::timeout(left, server.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(self.slot(preferred, permit, pool)),
            Ok(Err(_)) | Err(_) => {
                self.timed_out.fetch_add(1, Ordering::Relaxed);
                Err(QueueFull {
                    waited: started.elapsed(),
                    retry_after: self.retry_after(),
                })
            }
        }
    }

    /// A slot now, or `None` when all are taken (nothing waits).
    pub fn try_acquire(
        self: &Arc<Self>,
        preferred: usize,
        allowed: impl Fn(usize) -> bool,
    ) -> Option<InflightSlot> {
        let pool = self.pool.clone().try_acquire_owned().ok()?;
        self.server_slot(preferred, pool, &allowed).ok()
    }

    /// A slot at `preferred` or, when it is full, at the next allowed server
    /// with one free; the pool permit back when there is none.
    fn server_slot(
        self: &Arc<Self>,
        preferred: usize,
        pool: OwnedSemaphorePermit,
        allowed: &impl Fn(usize) -> bool,
    ) -> Result<InflightSlot, OwnedSemaphorePermit> {
        let n = self.servers.len();
        for i in 0..n {
            let server = (preferred + i) % n;
            if i > 0 && !allowed(server) {
                continue;
            }
            if let Ok(permit) = self.servers[server].clone().try_acquire_owned() {
                return Ok(self.slot(server, permit, pool));
            }
        }
        Err(pool)
    }

    fn slot(
        self: &Arc<Self>,
        server: usize,
        permit: OwnedSemaphorePermit,
        pool: OwnedSemaphorePermit,
    ) -> InflightSlot {
        InflightSlot {
            server,
            limit: self.clone(),
            since: crate::clock::now(),
            _server: permit,
            _pool: pool,
        }
    }

    /// Requests waiting for a slot now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Requests in flight to server `index` now.
    pub fn in_flight(&self, index: usize) -> usize {
        self.per_server as usize - self.servers[index].available_permits()
    }

    /// (requests that waited and got a slot, their total wait, requests that gave up).
    pub fn waits(&self) -> (u64, Duration, u64) {
        (
            self.waited.load(Ordering::Relaxed),
            Duration::from_nanos(self.waited_nanos.load(Ordering::Relaxed)),
            self.timed_out.load(Ordering::Relaxed),
        )
    }

    fn retry_after(&self) -> Duration {
        let hold = self.hold_nanos.load(Ordering::Relaxed);
        let slots = (self.servers.len() as u64 * u64::from(self.per_server)).max(1);
        let ahead = self.queued() as u64 + 1;
        Duration::from_nanos(hold.saturating_mul(ahead) / slots).max(Duration::from_secs(1))
    }
}

impl Drop for InflightSlot {
    fn drop(&mut self) {
        // An exponential moving average (1/8 weight): a racy update loses a
        // sample now and then, which a guess for Retry-After can afford.
        let held = nanos(self.since.elapsed());
        let avg = self.limit.hold_nanos.load(Ordering::Relaxed);
        let next = if avg == 0 {
            held
        } else {
            avg - avg / 8 + held / 8
        };
        self.limit.hold_nanos.store(next, Ordering::Relaxed);
    }
}

/// One request waiting in line, counted out of `queued` when it stops waiting.
struct InLine<'a>(&'a AtomicUsize);

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn slots_are_per_server_and_the_queue_is_first_come_first_served() {
        let limit = Arc::new(InflightLimit::new(2, 1, Duration::from_secs(5)));
        let a = limit.acquire(0, |_| true, |_| ()).await.unwrap();
        assert_eq!(a.server, 0);
        // Server 0 is busy: the next one goes to server 1.
        let b = limit.acquire(0, |_| true, |_| ()).await.unwrap();
        assert_eq!(b.server, 1);
        assert_eq!((limit.in_flight(0), limit.in_flight(1)), (1, 1));

        let first = tokio::spawn({
            let limit = limit.clone();
            async move { limit.acquire(1, |_| true, |_| ()).await }
        });
        tokio::task::yield_now().await;
        let second = tokio::spawn({
            let limit = limit.clone();
            async move { limit.acquire(1, |_| true, |_| ()).await.map(|s| s.server) }
        });
        tokio::task::yield_now().await;
        assert_eq!(limit.queued(), 2);
        drop(a);
        // The first in line takes the freed slot, on server 0.
        let first = first.await.unwrap().unwrap();
        assert_eq!(first.server, 0);
        tokio::time::advance(Duration::from_secs(6)).await;
        let refused = second.await.unwrap().unwrap_err();
        assert!(refused.waited >= Duration::from_secs(5));
        assert!(refused.retry_after >= Duration::from_secs(1));
        assert_eq!(limit.waits().2, 1);
        drop((b, first));
    }
}
