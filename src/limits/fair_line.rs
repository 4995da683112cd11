//! The line in front of an upstream's busy servers: who gets the next free
//! slot when several tenants wait.
//!
//! A slot that comes free goes to the highest priority class with anyone
//! waiting; within a class, tenants take turns by deficit round robin,
//! each turn worth its weight in requests, so a tenant with 200 requests
//! queued and one with 1 alternate rather than the second waiting behind
//! all 200. A tenant that starts waiting goes before those already taking
//! turns, for one turn (the "new flows" list of FQ-CoDel, RFC 8290 §4.1):
//! a client sending one request at a time, the interactive one, waits for
//! the next free slot only; whoever keeps a backlog takes turns. That buys
//! no more than a fair share: a tenant is new only while it has nothing
//! waiting, so it gets one slot per turn of the others at most. One
//! tenant's own requests go in arrival order. Each tenant may
//! have at most `max_queued` waiting; past that its next request is
//! refused and the others are not affected.
//!
//! A waiting request is one future; dropping it (its client left, or the
//! line's time ran out) takes it out of the line at once. A permit is
//! handed from the request that frees it straight to the next in line, so
//! a newcomer never overtakes those waiting.
//!
//! The unit of share is a request started, not GPU seconds: what a
//! generation will cost is not known when it starts.
//!
//! Owns the order of waiting requests and the count of free places; not
//! which server a place is at (`inflight`) nor who a request's tenant is
//! (the handler's, from its key or address).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::policy::Priority;

/// Who a request waits in line as.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LineTenant {
    /// An API key, by its name.
    Key(Arc<str>),
    /// A request without a key: its client address (an IPv6 /64 as one).
    Address(IpAddr),
    /// Everyone alike: `queue = "fifo"`.
    Everyone,
}

impl LineTenant {
    /// The tenant of a keyless request from `client`.
    pub fn address(client: IpAddr) -> Self {
        LineTenant::Address(match client {
            IpAddr::V6(v6) => {
                let segs = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(
                    segs[0], segs[1], segs[2], segs[3], 0, 0, 0, 0,
                ))
            }
            v4 => v4,
        })
    }
}

/// A request's place in line: who it waits as and with what share.
#[derive(Debug, Clone)]
pub struct Place {
    pub tenant: LineTenant,
    pub class: Priority,
    /// Requests started per turn, 1 or more.
    pub weight: u32,
    /// Requests this tenant may have waiting at once.
    pub max_queued: u32,
}

impl Place {
    /// Everyone in one line, in arrival order, without a cap.
    pub fn fifo() -> Self {
        Place {
            tenant: LineTenant::Everyone,
            class: Priority::Standard,
            weight: 1,
            max_queued: u32::MAX,
        }
    }
}

/// The tenant has `max_queued` requests waiting already.
#[derive(Debug)]
pub struct TenantFull {
    pub queued: u32,
}

pub struct FairLine {
    state: Mutex<LineState>,
}

#[derive(Default)]
struct LineState {
    /// Places nobody holds or waits for.
    free: usize,
    /// Tenants with requests waiting, by class and tenant.
    queues: HashMap<(Priority, LineTenant), TenantQueue>,
    /// Per class, tenants that just started waiting, served first for
    /// one turn each.
    fresh: [VecDeque<LineTenant>; Priority::COUNT],
    /// Per class, the tenants with requests waiting, in turn order; the
    /// front one is being served.
    turns: [VecDeque<LineTenant>; Priority::COUNT],
    /// Requests waiting per tenant, over all classes (for `max_queued`).
    waiting: HashMap<LineTenant, u32>,
    queued: usize,
    next_ticket: u64,
}

struct TenantQueue {
    waiters: VecDeque<(u64, oneshot::Sender<LinePermit>)>,
    weight: u32,
    /// Requests left in the front tenant's current turn.
    credit: u32,
    /// In `fresh`, not yet in `turns`.
    fresh: bool,
}

/// One place under the line; given to the next in line when dropped.
pub struct LinePermit {
    line: Option<Arc<FairLine>>,
}

impl FairLine {
    pub fn new(places: usize) -> Arc<Self> {
        Arc::new(FairLine {
            state: Mutex::new(LineState {
                free: places,
                ..LineState::default()
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LineState> {
        // Nothing panics while the lock is held; a poisoned one is whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place now, or `None` when all are held (nothing waits).
    pub fn try_take(self: &Arc<Self>) -> Option<LinePermit> {
        let mut st = self.lock();
        if st.free == 0 {
            return None;
        }
        st.free -= 1;
        Some(self.permit())
    }

    /// A place, waiting in line for it as `place` says. The returned
    /// future leaves the line when dropped.
    pub fn take(self: &Arc<Self>, place: &Place) -> Result<Waiting, TenantFull> {
        let mut st = self.lock();
        if st.free > 0 {
            st.free -= 1;
            return Ok(Waiting::Ready(Some(self.permit())));
        }
        let waiting = st.waiting.get(&place.tenant).copied().unwrap_or(0);
        if waiting >= place.max_queued {
            return Err(TenantFull { queued: waiting });
        }
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        let (tx, rx) = oneshot::channel();
        let key = (place.class, place.tenant.clone());
        let st = &mut *st;
        let queue = st.queues.entry(key).or_insert_with(|| {
            st.fresh[place.class as usize].push_back(place.tenant.clone());
            TenantQueue {
                waiters: VecDeque::new(),
                weight: place.weight.max(1),
                credit: place.weight.max(1),
                fresh: true,
            }
        });
        queue.waiters.push_back((ticket, tx));
        *st.waiting.entry(place.tenant.clone()).or_insert(0) += 1;
        st.queued += 1;
        Ok(Waiting::InLine(InLine {
            line: self.clone(),
            ticket,
            class: place.class,
            tenant: place.tenant.clone(),
            rx,
        }))
    }

    /// Requests waiting now, and how many tenants they are.
    pub fn length(&self) -> (usize, usize) {
        let st = self.lock();
        (st.queued, st.waiting.len())
    }

    fn permit(self: &Arc<Self>) -> LinePermit {
        LinePermit {
            line: Some(self.clone()),
        }
    }

    /// A place given back: to the next in line, or free.
    fn hand_on(self: &Arc<Self>) {
        let mut permit = self.permit();
        loop {
            let next = {
                let mut st = self.lock();
                match st.next_in_line() {
                    Some(tx) => tx,
                    None => {
                        st.free += 1;
                        permit.line = None;
                        return;
                    }
                }
            };
            // Sent outside the lock. A receiver gone in between (its waiter
            // dropped after being chosen) gives the permit back to try the
            // next one.
            match next.send(permit) {
                Ok(()) => return,
                Err(back) => permit = back,
            }
        }
    }
}

impl LineState {
    /// The waiter whose turn it is, out of the line.
    fn next_in_line(&mut self) -> Option<oneshot::Sender<LinePermit>> {
        let class = (0..Priority::COUNT)
            .find(|&c| !self.fresh[c].is_empty() || !self.turns[c].is_empty())?;
        let from_fresh = !self.fresh[class].is_empty();
        let list = if from_fresh {
            &mut self.fresh[class]
        } else {
            &mut self.turns[class]
        };
        let tenant = list.front()?.clone();
        let key = (Priority::ALL[class], tenant);
        let queue = self.queues.get_mut(&key)?;
        if queue.credit == 0 {
            queue.credit = queue.weight;
        }
        queue.credit -= 1;
        let (_, tx) = queue.waiters.pop_front()?;
        if queue.waiters.is_empty() {
            self.queues.remove(&key);
            list.pop_front();
        } else if queue.credit == 0 {
            // Its turn is over: to the back of those taking turns.
            queue.fresh = false;
            let tenant = list.pop_front()?;
            self.turns[class].push_back(tenant);
        }
        self.counted_out(&key.1);
        Some(tx)
    }

    fn counted_out(&mut self, tenant: &LineTenant) {
        self.queued -= 1;
        if let Some(n) = self.waiting.get_mut(tenant) {
            *n -= 1;
            if *n == 0 {
                self.waiting.remove(tenant);
            }
        }
    }

    /// Takes ticket `ticket` out of the line, if it is still waiting.
    fn leave(&mut self, class: Priority, tenant: &LineTenant, ticket: u64) {
        let key = (class, tenant.clone());
        let Some(queue) = self.queues.get_mut(&key) else {
            return;
        };
        let Some(at) = queue.waiters.iter().position(|(t, _)| *t == ticket) else {
            return;
        };
        queue.waiters.remove(at);
        if queue.waiters.is_empty() {
            let list = if queue.fresh {
                &mut self.fresh[class as usize]
            } else {
                &mut self.turns[class as usize]
            };
            if let Some(i) = list.iter().position(|t| t == tenant) {
                list.remove(i);
            }
            self.queues.remove(&key);
        }
        self.counted_out(tenant);
    }
}

impl Drop for LinePermit {
    fn drop(&mut self) {
        if let Some(line) = self.line.take() {
            line.hand_on();
        }
    }
}

/// A request's wait for a place.
pub enum Waiting {
    Ready(Option<LinePermit>),
    InLine(InLine),
}

impl Waiting {
    /// Whether the request has to wait.
    pub fn in_line(&self) -> bool {
        matches!(self, Waiting::InLine(_))
    }

    /// The place, once it is this request's turn.
    pub async fn place(self) -> LinePermit {
        match self {
            Waiting::Ready(mut permit) => permit.take().expect("a ready permit"),
            Waiting::InLine(mut in_line) => match (&mut in_line.rx).await {
                Ok(permit) => permit,
                // Senders are only dropped with the line's state, which
                // this waiter holds an `Arc` to: unreachable, but a wait
                // that never ends is the safe answer.
                Err(_) => std::future::pending().await,
            },
        }
    }
}

/// A request in line; leaves it when dropped.
pub struct InLine {
    line: Arc<FairLine>,
    ticket: u64,
    class: Priority,
    tenant: LineTenant,
    rx: oneshot::Receiver<LinePermit>,
}

impl Drop for InLine {
    fn drop(&mut self) {
        // Out of the line under the lock; a permit already sent to `rx` is
        // dropped with it after the lock is released (and handed on).
        self.line
            .lock()
            .leave(self.class, &self.tenant, self.ticket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(tenant: &str, weight: u32) -> Place {
        Place {
            tenant: LineTenant::Key(tenant.into()),
            class: Priority::Standard,
            weight,
            max_queued: 100,
        }
    }

    /// The order in which `waiters` (tenant name, place) get a place, as
    /// places are given back one at a time.
    async fn order(
        line: &Arc<FairLine>,
        held: LinePermit,
        waiters: Vec<(&'static str, Place)>,
    ) -> Vec<&'static str> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for (name, place) in waiters {
            let waiting = line.take(&place).unwrap();
            assert!(waiting.in_line());
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                let permit = waiting.place().await;
                tx.send((name, permit)).unwrap();
            }));
        }
        drop(held);
        let mut got = Vec::new();
        while let Some((name, permit)) = rx.recv().await {
            got.push(name);
            drop(permit);
            if got.len() == tasks.len() {
                break;
            }
        }
        got
    }

    #[tokio::test]
    async fn tenants_take_turns_by_weight() {
        let line = FairLine::new(1);
        let held = line.try_take().unwrap();
        let mut waiters = Vec::new();
        for _ in 0..4 {
            waiters.push(("a", place("a", 1)));
        }
        waiters.push(("b", place("b", 1)));
        waiters.push(("b", place("b", 1)));
        let got = order(&line, held, waiters).await;
        assert_eq!(got, ["a", "b", "a", "b", "a", "a"]);

        let held = line.try_take().unwrap();
        let mut waiters = Vec::new();
        for _ in 0..4 {
            waiters.push(("a", place("a", 1)));
        }
        for _ in 0..4 {
            waiters.push(("b", place("b", 2)));
        }
        let got = order(&line, held, waiters).await;
        assert_eq!(got, ["a", "b", "b", "a", "b", "b", "a", "a"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tenant_that_starts_waiting_goes_before_a_backlog() {
        let line = FairLine::new(1);
        let held = line.try_take().unwrap();
        let mut a = Vec::new();
        for _ in 0..3 {
            a.push(line.take(&place("a", 1)).unwrap());
        }
        drop(held);
        // `a` had its fresh turn: it now takes turns, and `b`, new, is next.
        let first = a.remove(0).place().await;
        let b = line.take(&place("b", 1)).unwrap();
        drop(first);
        let in_time = std::time::Duration::from_secs(1);
        let second = tokio::time::timeout(in_time, b.place()).await;
        drop(second.expect("`b` goes before `a`'s backlog"));
        let _third = a.remove(0).place().await;
    }

    #[tokio::test]
    async fn a_higher_class_goes_first_and_fifo_keeps_arrival_order() {
        let line = FairLine::new(1);
        let held = line.try_take().unwrap();
        let batch = Place {
            class: Priority::Batch,
            ..place("a", 1)
        };
        let interactive = Place {
            class: Priority::Interactive,
            ..place("b", 1)
        };
        let got = order(
            &line,
            held,
            vec![
                ("batch", batch.clone()),
                ("std", place("c", 1)),
                ("int", interactive),
            ],
        )
        .await;
        assert_eq!(got, ["int", "std", "batch"]);

        let held = line.try_take().unwrap();
        let got = order(
            &line,
            held,
            vec![
                ("1", Place::fifo()),
                ("2", Place::fifo()),
                ("3", Place::fifo()),
            ],
        )
        .await;
        assert_eq!(got, ["1", "2", "3"]);
    }

    #[tokio::test]
    async fn a_full_tenant_is_refused_and_a_leaver_leaves_at_once() {
        let line = FairLine::new(1);
        let held = line.try_take().unwrap();
        let capped = Place {
            max_queued: 2,
            ..place("a", 1)
        };
        let first = line.take(&capped).unwrap();
        let second = line.take(&capped).unwrap();
        let Err(full) = line.take(&capped) else {
            panic!("a third request of `a` is refused");
        };
        assert_eq!(full.queued, 2);
        // Another tenant is not affected.
        let other = line.take(&place("b", 1)).unwrap();
        assert_eq!(line.length().0, 3);
        drop(first);
        assert_eq!(line.length().0, 2, "a dropped wait leaves the line at once");
        assert!(line.take(&capped).is_ok());
        // The place goes to those still waiting: `a`'s second, then `b`.
        drop(held);
        let permit = second.place().await;
        drop(permit);
        let _permit = other.place().await;
        assert!(line.try_take().is_none());
    }

    #[tokio::test]
    async fn a_place_chosen_for_a_leaver_goes_on() {
        let line = FairLine::new(1);
        let held = line.try_take().unwrap();
        let leaver = line.take(&place("a", 1)).unwrap();
        let stayer = line.take(&place("b", 1)).unwrap();
        // The place is sent to `a`, which leaves before taking it.
        drop(held);
        drop(leaver);
        let permit = stayer.place().await;
        drop(permit);
        assert!(line.try_take().is_some(), "nothing lost");
    }
}
