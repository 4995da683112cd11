//! `max_inflight_per_server`: requests in flight to each server of an
//! upstream, and the line in front of them.
//!
//! Places for the whole pool, as many as the sum of its servers' slots,
//! are given out by the line (`fair_line`: by tenant, or with `queue =
//! "fifo"` in arrival order); each server has a semaphore of its own
//! slots. A request first takes a pool place, then any server's free slot,
//! starting with the one the balancer picked. Every server slot is held
//! together with a pool place, so a pool place always finds a free server.
//! A slot is held until the response body has been read (it travels with
//! the connection lease), not just until the headers.
//!
//! The queue's length and waits are counted here for the metrics issue; the
//! 503 itself is the handler's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::fair_line::{FairLine, LinePermit, Place};
use crate::policy::{QueueOrder, UpstreamPolicy};

pub struct InflightLimit {
    pool: Arc<FairLine>,
    servers: Box<[Arc<Semaphore>]>,
    per_server: u32,
    queue_timeout: Duration,
    order: QueueOrder,
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
    // Dropped in this order: the server's slot is free before the pool's
    // place goes to the next in line, which looks for it.
    _server: OwnedSemaphorePermit,
    _pool: LinePermit,
}

/// Why a request got no slot.
#[derive(Debug)]
pub enum NoSlot {
    /// None came free within `queue_timeout`.
    TimedOut {
        waited: Duration,
        /// A guess at when one will: the queue ahead times the usual hold.
        retry_after: Duration,
    },
    /// The request's tenant has its `max_queued` requests waiting already.
    TenantFull { queued: u32, retry_after: Duration },
}

impl InflightLimit {
    pub fn new(
        servers: usize,
        per_server: u32,
        queue_timeout: Duration,
        order: QueueOrder,
    ) -> Self {
        let total = servers * per_server as usize;
        InflightLimit {
            pool: FairLine::new(total),
            servers: (0..servers)
                .map(|_| Arc::new(Semaphore::new(per_server as usize)))
                .collect(),
            per_server,
            queue_timeout,
            order,
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
            && self.order == upstream.queue
    }

    /// A slot, preferably at server `preferred`, else at another server
    /// `allowed` (healthy, serving the model); waits in line as `place`
    /// says (in arrival order under `queue = "fifo"`) up to
    /// `queue_timeout`, calling `waiting(true)` when it starts to wait and
    /// `waiting(false)` when it stops.
    pub async fn acquire(
        self: &Arc<Self>,
        preferred: usize,
        allowed: impl Fn(usize) -> bool,
        place: &Place,
        waiting: impl Fn(bool),
    ) -> Result<InflightSlot, NoSlot> {
        let started = crate::clock::now();
        let fifo;
        let place = match self.order {
            QueueOrder::Fair => place,
            QueueOrder::Fifo => {
                fifo = Place::fifo();
                &fifo
            }
        };
        let line = self.pool.take(place).map_err(|full| NoSlot::TenantFull {
            queued: full.queued,
            retry_after: self.retry_after(),
        })?;
        let pool = if line.in_line() {
            waiting(true);
            // A client leaving drops this future mid-wait, and with it its
            // place in line.
            let waited = tokio::time::timeout(self.queue_timeout, line.place()).await;
            waiting(false);
            let elapsed = started.elapsed();
            match waited {
                Ok(p) => {
                    self.waited.fetch_add(1, Ordering::Relaxed);
                    self.waited_nanos
                        .fetch_add(nanos(elapsed), Ordering::Relaxed);
                    p
                }
                Err(_) => {
                    self.timed_out.fetch_add(1, Ordering::Relaxed);
                    return Err(NoSlot::TimedOut {
                        waited: elapsed,
                        retry_after: self.retry_after(),
                    });
                }
            }
        } else {
            line.place().await
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
                Err(NoSlot::TimedOut {
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
        let pool = self.pool.try_take()?;
        self.server_slot(preferred, pool, &allowed).ok()
    }

    /// A slot at `preferred` or, when it is full, at the next allowed server
    /// with one free; the pool permit back when there is none.
    fn server_slot(
        self: &Arc<Self>,
        preferred: usize,
        pool: LinePermit,
        allowed: &impl Fn(usize) -> bool,
    ) -> Result<InflightSlot, LinePermit> {
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
        pool: LinePermit,
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
        self.pool.length().0
    }

    /// Requests waiting now, and the tenants they wait for.
    pub fn line_length(&self) -> (usize, usize) {
        self.pool.length()
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

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn slots_are_per_server_and_the_queue_is_first_come_first_served() {
        let limit = Arc::new(InflightLimit::new(
            2,
            1,
            Duration::from_secs(5),
            QueueOrder::Fifo,
        ));
        let anyone = Place::fifo();
        let a = limit.acquire(0, |_| true, &anyone, |_| ()).await.unwrap();
        assert_eq!(a.server, 0);
        // Server 0 is busy: the next one goes to server 1.
        let b = limit.acquire(0, |_| true, &anyone, |_| ()).await.unwrap();
        assert_eq!(b.server, 1);
        assert_eq!((limit.in_flight(0), limit.in_flight(1)), (1, 1));

        let first = tokio::spawn({
            let limit = limit.clone();
            async move { limit.acquire(1, |_| true, &Place::fifo(), |_| ()).await }
        });
        tokio::task::yield_now().await;
        let second = tokio::spawn({
            let limit = limit.clone();
            async move {
                let slot = limit.acquire(1, |_| true, &Place::fifo(), |_| ()).await;
                slot.map(|s| s.server)
            }
        });
        tokio::task::yield_now().await;
        assert_eq!(limit.queued(), 2);
        drop(a);
        // The first in line takes the freed slot, on server 0.
        let first = first.await.unwrap().unwrap();
        assert_eq!(first.server, 0);
        tokio::time::advance(Duration::from_secs(6)).await;
        let NoSlot::TimedOut {
            waited,
            retry_after,
        } = second.await.unwrap().unwrap_err()
        else {
            panic!("timed out, not refused");
        };
        assert!(waited >= Duration::from_secs(5));
        assert!(retry_after >= Duration::from_secs(1));
        assert_eq!(limit.waits().2, 1);
        drop((b, first));
    }
}
