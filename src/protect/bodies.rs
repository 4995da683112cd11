//! `max_buffered_bodies`: the bytes of request bodies the process holds in
//! memory at once, read whole for a cache key, a model or a token estimate.
//!
//! A body takes its share before it is read (its `Content-Length`) or as it
//! arrives (chunked), and gives it back when the request is done with it.
//! When the budget is spent a request waits briefly for room
//! (`BodyBudget::WAIT`), then is refused (503 `overloaded`): a burst of big
//! uploads slows only itself, and the process's memory stays bounded
//! whatever the clients send. Bodies streamed straight through are not
//! held, so they take nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Counted in KiB: a semaphore takes at most `u32::MAX` permits at once.
const UNIT: u64 = 1024;

/// The process's budget for buffered request bodies.
pub struct BodyBudget {
    permits: Arc<Semaphore>,
    limit: u64,
    /// Bytes held now.
    held: Arc<AtomicU64>,
    refused: AtomicU64,
}

/// A body's share of the budget; given back when dropped.
pub struct BodyCharge {
    permits: Option<OwnedSemaphorePermit>,
    bytes: u64,
    held: Option<Arc<AtomicU64>>,
}

/// The budget had no room in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overloaded;

impl BodyBudget {
    /// How long a body waits for room before it is refused.
    pub const WAIT: Duration = Duration::from_secs(1);

    pub fn new(limit: u64) -> Self {
        let units = limit.div_ceil(UNIT).min(Semaphore::MAX_PERMITS as u64) as usize;
        BodyBudget {
            permits: Arc::new(Semaphore::new(units)),
            limit,
            held: Arc::new(AtomicU64::new(0)),
            refused: AtomicU64::new(0),
        }
    }

    /// A charge of nothing, to be grown as a body arrives.
    pub fn empty(&self) -> BodyCharge {
        BodyCharge {
            permits: None,
            bytes: 0,
            held: Some(self.held.clone()),
        }
    }

    /// Grows `charge` to cover `bytes` in all, waiting until `deadline` for
    /// room. A body larger than the whole budget can never fit: refused at
    /// once.
    pub async fn grow(
        &self,
        charge: &mut BodyCharge,
        bytes: u64,
        deadline: tokio::time::Instant,
    ) -> Result<(), Overloaded> {
        let have = charge.bytes.div_ceil(UNIT);
        let need = bytes.div_ceil(UNIT);
        if need > have {
            if bytes > self.limit {
                return Err(self.refuse());
            }
            let more = u32::try_from(need - have).map_err(|_| self.refuse())?;
            let permit = match self.permits.clone().try_acquire_many_owned(more) {
                Ok(p) => p,
                Err(_) => {
                    let wait = self.permits.clone().acquire_many_owned(more);
                    match tokio::time::timeout_at(deadline, wait).await {
                        Ok(Ok(p)) => p,
                        _ => return Err(self.refuse()),
                    }
                }
            };
            match &mut charge.permits {
                Some(p) => p.merge(permit),
                None => charge.permits = Some(permit),
            }
        }
        if bytes > charge.bytes {
            self.held.fetch_add(bytes - charge.bytes, Ordering::Relaxed);
            charge.bytes = bytes;
        }
        Ok(())
    }

    fn refuse(&self) -> Overloaded {
        self.refused.fetch_add(1, Ordering::Relaxed);
        Overloaded
    }

    /// Bytes of bodies held now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Requests refused for want of room.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl BodyCharge {
    /// A charge on no budget (bodies read outside a request's budget).
    pub fn none() -> Self {
        BodyCharge {
            permits: None,
            bytes: 0,
            held: None,
        }
    }
}

impl Drop for BodyCharge {
    fn drop(&mut self) {
        if let Some(held) = &self.held {
            held.fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }
}

/// `max_read_ahead`: the bytes of upstream answers held, process-wide,
/// ahead of clients slower than their backend. Running out only pauses the
/// reading (the backend waits, as it would without read-ahead); nothing is
/// refused.
pub struct ReadAheadBudget {
    permits: Arc<Semaphore>,
    limit: u64,
}

impl ReadAheadBudget {
    pub fn new(limit: u64) -> Self {
        let units = (limit / UNIT).min(Semaphore::MAX_PERMITS as u64) as usize;
        ReadAheadBudget {
            permits: Arc::new(Semaphore::new(units)),
            limit,
        }
    }

    /// A share for `bytes`, once there is room; given back when dropped.
    /// A piece larger than the whole budget takes all of it (waiting for
    /// more than there is would never end); a budget of nothing takes
    /// nothing.
    pub async fn take(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let all = (self.limit / UNIT).min(u64::from(u32::MAX));
        let units = (bytes as u64).div_ceil(UNIT).min(all) as u32;
        if units == 0 {
            return None;
        }
        self.permits.clone().acquire_many_owned(units).await.ok()
    }

    /// Bytes held now (to the KiB).
    pub fn held(&self) -> u64 {
        let free = self.permits.available_permits() as u64 * UNIT;
        (self.limit / UNIT * UNIT).saturating_sub(free)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn bodies_share_the_budget_and_wait_briefly_for_room() {
        let budget = Arc::new(BodyBudget::new(100 * UNIT));
        let soon = || Instant::now() + BodyBudget::WAIT;
        let mut a = budget.empty();
        budget.grow(&mut a, 60 * UNIT, soon()).await.unwrap();
        budget.grow(&mut a, 60 * UNIT + 1, soon()).await.unwrap();
        assert_eq!(budget.held(), 60 * UNIT + 1);
        // 39 KiB left: a 50 KiB body waits, then is refused.
        let mut b = budget.empty();
        let started = Instant::now();
        assert_eq!(
            budget.grow(&mut b, 50 * UNIT, soon()).await,
            Err(Overloaded)
        );
        assert_eq!(started.elapsed(), BodyBudget::WAIT);
        // Room made while it waits lets it in.
        let waiter = tokio::spawn({
            let budget = budget.clone();
            async move {
                let mut c = budget.empty();
                budget.grow(&mut c, 50 * UNIT, soon()).await.map(|()| c)
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(a);
        let c = waiter.await.unwrap().unwrap();
        assert_eq!(budget.held(), 50 * UNIT);
        // Larger than the whole budget: refused without waiting.
        let mut d = budget.empty();
        let started = Instant::now();
        assert!(budget.grow(&mut d, 101 * UNIT, soon()).await.is_err());
        assert_eq!(started.elapsed(), Duration::ZERO);
        drop((b, c, d));
        assert_eq!(budget.held(), 0);
        assert_eq!(budget.refused(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_piece_larger_than_the_read_ahead_budget_takes_all_of_it_without_waiting_forever() {
        let budget = ReadAheadBudget::new(64 * UNIT);
        let all = tokio::time::timeout(Duration::from_secs(1), budget.take(1 << 20))
            .await
            .expect("not a wait for more than there is");
        assert!(all.is_some());
        assert_eq!(budget.held(), 64 * UNIT);
        drop(all);
        assert_eq!(budget.held(), 0);
    }
}
