//! Coalescing: while one request for a key is on its way upstream, identical
//! requests wait for its answer instead of sending their own.
//!
//! The first request that finds nothing usable leads a `Fill`. Its upstream
//! exchange runs in a task of its own, so the client that started it can
//! leave without cancelling what others wait for; once nobody waits any more
//! (and it is not a background refresh) the task is aborted and the upstream
//! connection closed, so the backend stops generating.
//!
//! The fill keeps the body's chunks in one log: what it will store anyway, so
//! at most `max_entry_size` while it records. Each reader (the leader's
//! client, followers of a streamed answer) has its own position in it, so a
//! slow reader never slows the others. Past `max_entry_size` the recording
//! is dropped: the upstream is then read only as fast as the fastest reader
//! takes it, the log keeps only what some reader still needs, and a reader
//! more than `max_entry_size` behind the fastest is cut.
//!
//! Followers of a streamed (NDJSON/SSE) answer join it live; followers of any
//! other answer get it whole once it has ended. When the answer cannot be
//! shared (not storable, only storable to revalidate, varies on a header they
//! differ in, too big) they go upstream alone; when the fill failed they may
//! collapse once more behind a new one, so an upstream error is not handed to
//! every waiter.
//!
//! Not here: what is storable and how a response becomes an entry
//! (`exchange`, `record`), the store itself (`Cache`).
//!
//! `exchange` and this module import each other, on purpose: they are the
//! two halves of one request's dealings with a key. The exchange decides
//! whether a request leads or follows a fill (`Role`), and the fill runs
//! the leading exchange to its end in its own task (`Exchange`, `After`,
//! `respond`). Splitting out a third module for the shared types would
//! only move the seam; neither is usable without the other, and nothing
//! outside `cache` sees either half.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::{oneshot, Notify};
use tokio::task::AbortHandle;

use super::control::age_value;
use super::exchange::{respond, After, Exchange};
use super::vary::{self, VaryValues};
use super::{
    Cache, CacheKey, CacheStatus, Cost, DigestHash, Entry, FleetLock, Recording, StoredBody,
};
use crate::body::{BoxError, ResponseBody};
use crate::error::ProxyError;
use crate::headers::X_CACHE;

/// Past recording, how many chunks the upstream may be read ahead of the
/// fastest reader.
const READ_AHEAD_CHUNKS: usize = 8;

/// Fills in flight, by key, in shards so that misses on different keys
/// rarely meet on one lock. A hit never comes here.
pub(super) struct Fills {
    shards: Box<[Shard]>,
}

type Shard = Mutex<HashMap<CacheKey, Arc<Fill>, DigestHash>>;

const SHARDS: usize = 16;

/// What a request that found nothing usable does.
pub(super) enum Role {
    /// Nobody is fetching this key: this request does, for everyone.
    Lead(Lead),
    /// Somebody is: wait for their answer.
    Follow(Member),
}

impl Fills {
    pub fn new() -> Self {
        Fills {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    fn shard(&self, key: &CacheKey) -> MutexGuard<'_, HashMap<CacheKey, Arc<Fill>, DigestHash>> {
        lock(&self.shards[usize::from(key.0[0]) % SHARDS])
    }

    /// Joins the fill in flight for `key`, or starts one led by the caller.
    pub fn follow_or_lead(&self, cache: &Arc<Cache>, key: CacheKey) -> Role {
        let mut shard = self.shard(&key);
        if let Some(fill) = shard.get(&key) {
            lock(&fill.state).members += 1;
            return Role::Follow(Member(fill.clone()));
        }
        let fill = Fill::new(cache, key, 1, false);
        shard.insert(key, fill.clone());
        Role::Lead(Lead {
            member: Some(Member(fill.clone())),
            fill,
            launched: false,
        })
    }

    /// Starts a background refresh of `key` nobody waits on, unless a fill
    /// for it is already in flight.
    pub fn lead_background(&self, cache: &Arc<Cache>, key: CacheKey) -> Option<Lead> {
        let mut shard = self.shard(&key);
        if shard.contains_key(&key) {
            return None;
        }
        let fill = Fill::new(cache, key, 0, true);
        shard.insert(key, fill.clone());
        Some(Lead {
            member: None,
            fill,
            launched: false,
        })
    }

    /// Forgets `fill` (if it is still the one registered for its key), so new
    /// requests for the key no longer join it.
    fn remove(&self, fill: &Arc<Fill>) {
        let mut shard = self.shard(&fill.key);
        if shard.get(&fill.key).is_some_and(|f| Arc::ptr_eq(f, fill)) {
            shard.remove(&fill.key);
        }
    }

    /// Fills in flight now.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }
}

/// A poisoned lock only means a panic elsewhere; the state stays usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One upstream exchange that several requests share.
pub(super) struct Fill {
    key: CacheKey,
    cache: Arc<Cache>,
    /// Bytes the log may hold once it no longer records, and so how far a
    /// reader may fall behind the fastest: `max_entry_size`.
    lag_limit: usize,
    state: Mutex<FillState>,
    /// Followers still waiting are woken through it when the phase changes.
    changed: Notify,
}

struct FillState {
    phase: Phase,
    /// Body chunks from number `base` on; earlier ones were dropped once no
    /// reader needed them (only after recording stopped).
    chunks: VecDeque<Bytes>,
    base: usize,
    /// Bytes in `chunks`.
    held: usize,
    /// Bytes received in all.
    received: usize,
    /// Still keeping every chunk for the store (within `max_entry_size`).
    recording: bool,
    /// The whole body once complete, shared by the followers served from it.
    whole: Option<Arc<[Bytes]>>,
    /// Live readers' positions; free slots are reused.
    slots: Vec<Slot>,
    /// Requests that still want the answer: the leader and followers,
    /// waiting or reading.
    members: usize,
    abort: Option<AbortHandle>,
    /// A stale-while-revalidate refresh: runs to its end with nobody waiting.
    background: bool,
    /// The fill's task, waiting for the fastest reader to catch up.
    writer: Option<Waker>,
    /// Followers that joined the body live: what the answer saved is
    /// counted for them once it is known, at its end.
    live_followers: u64,
    /// What the answer cost the upstream, once complete and recorded.
    cost: Option<Cost>,
    /// The fleet-wide claim on this key (shared tier): given back when the
    /// fill ends, after its entry was stored, so other instances waiting
    /// find it.
    fleet_lock: Option<FleetLock>,
}

enum Phase {
    /// The leader waits in line for a slot under `max_inflight_per_server`.
    /// Followers wait with it: going alone would only queue behind it.
    Queued,
    /// Waiting for the upstream's response head.
    Sending,
    /// The head is in; body chunks are arriving.
    Body(Arc<FillHead>),
    /// The body ended cleanly.
    Complete(Arc<FillHead>),
    /// The answer is a stored entry (revalidated by a 304, or stale because
    /// the upstream failed); followers get it too.
    Entry(Arc<Entry>, CacheStatus),
    /// The answer cannot be shared; `failed` when it was an upstream error
    /// (followers may collapse behind a new fill) rather than unstorable.
    Pass { failed: bool },
    /// The body failed part way, or the fill was dropped.
    Failed,
}

impl Phase {
    fn is_final(&self) -> bool {
        !matches!(self, Phase::Queued | Phase::Sending | Phase::Body(_))
    }
}

struct Slot {
    /// Number of the next chunk this reader gets.
    pos: usize,
    waker: Option<Waker>,
    active: bool,
    /// Fell more than `lag_limit` behind: its response is cut.
    lagged: bool,
}

/// The response head followers of a fill get: the stored entry's headers
/// (never the leader's cookies), with their own `Age` and `X-Cache`.
pub(super) struct FillHead {
    status: StatusCode,
    headers: HeaderMap,
    /// Request header values the answer varies on (of the leader's request).
    vary: VaryValues,
    /// NDJSON or SSE: followers join it live.
    streamed: bool,
    /// Fresh when stored: an answer kept only to be revalidated later may not
    /// be handed to others as it is (RFC 9111 §4).
    shareable: bool,
    initial_age: Duration,
    arrived: Instant,
}

impl FillHead {
    fn new(status: StatusCode, recording: &Recording) -> Self {
        let entry = &recording.entry;
        FillHead {
            status,
            headers: entry.headers.clone(),
            vary: entry.vary.clone(),
            streamed: recording.chunked,
            shareable: !entry.fresh_for.is_zero(),
            initial_age: entry.initial_age,
            arrived: crate::clock::now_std(),
        }
    }

    fn response(&self, body: ResponseBody) -> Response<ResponseBody> {
        let mut resp = Response::new(body);
        *resp.status_mut() = self.status;
        let headers = resp.headers_mut();
        headers.clone_from(&self.headers);
        headers.insert(
            header::AGE,
            age_value(self.initial_age + self.arrived.elapsed()),
        );
        headers.insert(X_CACHE, CacheStatus::Hit.header_value());
        resp
    }
}

impl Fill {
    fn new(cache: &Arc<Cache>, key: CacheKey, members: usize, background: bool) -> Arc<Fill> {
        Arc::new(Fill {
            key,
            cache: cache.clone(),
            lag_limit: usize::try_from(cache.policy.max_entry_size).unwrap_or(usize::MAX),
            state: Mutex::new(FillState {
                phase: Phase::Sending,
                chunks: VecDeque::new(),
                base: 0,
                held: 0,
                received: 0,
                recording: true,
                whole: None,
                slots: Vec::new(),
                members,
                abort: None,
                background,
                writer: None,
                live_followers: 0,
                cost: None,
                fleet_lock: None,
            }),
            changed: Notify::new(),
        })
    }

    /// Ends the fill with `phase` (anything but a complete body: see
    /// `complete`) and wakes everyone waiting or reading. It leaves the map
    /// first: a follower that looks again must not find it.
    fn settle(self: &Arc<Self>, phase: Phase) {
        self.cache.fills.remove(self);
        {
            let mut st = lock(&self.state);
            st.phase = phase;
            st.wake_readers();
        }
        self.changed.notify_waiters();
    }

    /// The body ended cleanly, and the answer cost the upstream `cost` (when
    /// recorded): counted as saved for each follower that read it live. The
    /// fill stays registered until its entry is stored, so followers still
    /// find it.
    fn complete(self: &Arc<Self>, head: Arc<FillHead>, cost: Option<Cost>) {
        let live = {
            // One lock: no follower joins live after it is counted.
            let mut st = lock(&self.state);
            st.cost = cost;
            st.phase = Phase::Complete(head);
            st.wake_readers();
            std::mem::take(&mut st.live_followers)
        };
        self.changed.notify_waiters();
        if let Some(cost) = &cost {
            self.cache.stats.saved_times(cost, live);
        }
    }

    /// The leader starts (`true`) or stops waiting for an upstream slot.
    fn queue(self: &Arc<Self>, waiting: bool) {
        {
            let mut st = lock(&self.state);
            match (&st.phase, waiting) {
                (Phase::Sending, true) => st.phase = Phase::Queued,
                (Phase::Queued, false) => st.phase = Phase::Sending,
                _ => return,
            }
        }
        self.changed.notify_waiters();
    }

    /// The head arrived: readers may start. Returns the leader's slot.
    fn begin_body(self: &Arc<Self>, head: Arc<FillHead>, leader: bool) -> Option<SlotGuard> {
        let slot = {
            let mut st = lock(&self.state);
            st.phase = Phase::Body(head);
            leader.then(|| st.add_slot())
        };
        self.changed.notify_waiters();
        slot.map(|index| SlotGuard {
            fill: self.clone(),
            index,
        })
    }

    fn push(self: &Arc<Self>, chunk: Bytes) {
        let mut abandoned = false;
        {
            let mut st = lock(&self.state);
            st.received += chunk.len();
            st.held += chunk.len();
            st.chunks.push_back(chunk);
            if st.recording && st.received > self.lag_limit {
                // Too big to store: the log now only serves the live readers.
                st.recording = false;
                abandoned = true;
            }
            if !st.recording {
                st.trim(self.lag_limit);
            }
            st.wake_readers();
        }
        if abandoned {
            self.cache.fills.remove(self);
            self.changed.notify_waiters();
        }
    }

    /// Whether the upstream may be read on: always while recording, then only
    /// when the fastest reader is close behind. `false`: nobody reads and
    /// nothing will be stored, so reading is pointless.
    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<bool> {
        let mut st = lock(&self.state);
        if st.recording {
            return Poll::Ready(true);
        }
        let fastest = st
            .slots
            .iter()
            .filter(|s| s.active && !s.lagged)
            .map(|s| s.pos)
            .max();
        match fastest {
            None => Poll::Ready(false),
            Some(pos) if st.base + st.chunks.len() - pos <= READ_AHEAD_CHUNKS => Poll::Ready(true),
            Some(_) => {
                st.writer = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl FillState {
    fn add_slot(&mut self) -> usize {
        let slot = Slot {
            pos: self.base,
            waker: None,
            active: true,
            lagged: false,
        };
        match self.slots.iter().position(|s| !s.active) {
            Some(i) => {
                self.slots[i] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        }
    }

    fn wake_readers(&mut self) {
        for slot in &mut self.slots {
            if let Some(w) = slot.waker.take() {
                w.wake();
            }
        }
    }

    fn wake_writer(&mut self) {
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }

    /// Drops chunks every reader has passed, then, while more than `limit`
    /// bytes remain, older ones the fastest reader has passed too: readers
    /// that still needed them fell too far behind and are cut.
    fn trim(&mut self, limit: usize) {
        let live = self.slots.iter().filter(|s| s.active && !s.lagged);
        let (slowest, fastest) = live.fold((usize::MAX, 0), |(lo, hi), s| {
            (lo.min(s.pos), hi.max(s.pos))
        });
        while self.base < slowest && !self.chunks.is_empty() {
            self.drop_front();
        }
        while self.held > limit && self.base < fastest {
            self.drop_front();
        }
        let base = self.base;
        for slot in &mut self.slots {
            if slot.active && !slot.lagged && slot.pos < base {
                slot.lagged = true;
                if let Some(w) = slot.waker.take() {
                    w.wake();
                }
            }
        }
    }

    fn drop_front(&mut self) {
        if let Some(c) = self.chunks.pop_front() {
            self.held -= c.len();
            self.base += 1;
        }
    }
}

/// One request that still wants a fill's answer. The last one to go
/// cancels the fill (unless it is a background refresh).
pub(super) struct Member(Arc<Fill>);

impl Drop for Member {
    fn drop(&mut self) {
        let abort = {
            let mut st = lock(&self.0.state);
            st.members -= 1;
            if st.members == 0 && !st.background && !st.phase.is_final() {
                st.abort.take()
            } else {
                None
            }
        };
        if let Some(task) = abort {
            task.abort();
        }
    }
}

/// A reader's place in the log, given back when the reader goes.
struct SlotGuard {
    fill: Arc<Fill>,
    index: usize,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut st = lock(&self.fill.state);
        let slot = &mut st.slots[self.index];
        slot.active = false;
        slot.waker = None;
        // The writer may have been waiting for this reader.
        st.wake_writer();
    }
}

/// The right to start a fill. Dropped without starting it, the fill is
/// given up and its followers sent on their way.
pub(super) struct Lead {
    fill: Arc<Fill>,
    /// The leader's own membership (none for a background refresh).
    member: Option<Member>,
    launched: bool,
}

impl Drop for Lead {
    fn drop(&mut self) {
        if !self.launched {
            self.fill.settle(Phase::Pass { failed: true });
            let claim = lock(&self.fill.state).fleet_lock.take();
            drop(claim);
        }
    }
}

/// What the fill tells its leader.
// Sent once per fill and matched at once: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Answer {
    /// Not shared: the upstream's response, or an error.
    Direct(Result<(Response<ResponseBody>, CacheStatus), ProxyError>),
    /// Being recorded: the leader's own head, and its place in the log.
    Stream {
        parts: http::response::Parts,
        slot: SlotGuard,
        status: CacheStatus,
    },
    /// A stored entry.
    Entry(Arc<Entry>, CacheStatus),
}

pub type Sent = Result<Response<ResponseBody>, ProxyError>;

impl Lead {
    /// Keeps the fleet-wide claim on the key until the fill ends.
    pub fn hold_fleet_lock(&self, claim: FleetLock) {
        lock(&self.fill.state).fleet_lock = Some(claim);
    }

    /// Tells followers the leader is waiting (`true`) or done waiting for a
    /// slot under `max_inflight_per_server`.
    pub fn queue(&self, waiting: bool) {
        self.fill.queue(waiting);
    }

    /// Runs the exchange in its own task (the fill) and waits for the
    /// leader's answer. `send` sends the request upstream and returns the
    /// response as the client would get it.
    pub async fn run<F>(
        mut self,
        ex: Exchange,
        send: F,
    ) -> Result<(Response<ResponseBody>, CacheStatus), ProxyError>
    where
        F: Future<Output = Sent> + Send + 'static,
    {
        let head_only = ex.is_head();
        let (tx, rx) = oneshot::channel();
        let member = self.member.take();
        self.spawn(ex, send, Some(tx));
        let answer = rx.await.map_err(|_| ProxyError::UpstreamFailed {
            server: "-".into(),
            reason: "the shared upstream exchange ended without an answer".into(),
        })?;
        match answer {
            Answer::Direct(res) => res,
            Answer::Entry(entry, status) => {
                let age = entry.age(crate::clock::now_std());
                Ok((respond(&entry, age, status, head_only), status))
            }
            Answer::Stream {
                parts,
                slot,
                status,
            } => {
                let reader = FillReader {
                    slot,
                    remaining: crate::headers::content_length(&parts.headers),
                    done: false,
                    _member: member.expect("a leader is a member"),
                };
                Ok((
                    Response::from_parts(parts, ResponseBody::fill(reader)),
                    status,
                ))
            }
        }
    }

    /// Runs the exchange in the background: nobody waits for it.
    pub fn run_detached<F>(self, ex: Exchange, send: F)
    where
        F: Future<Output = Sent> + Send + 'static,
    {
        self.spawn(ex, send, None);
    }

    fn spawn<F>(mut self, ex: Exchange, send: F, leader: Option<oneshot::Sender<Answer>>)
    where
        F: Future<Output = Sent> + Send + 'static,
    {
        self.launched = true;
        let fill = self.fill.clone();
        // Made before the task and moved into it: a task aborted before its
        // first poll still drops it, so the fill always ends.
        let finish = Finish(fill.clone());
        let task = tokio::spawn(drive(finish, ex, send, leader));
        let mut st = lock(&fill.state);
        if st.members == 0 && !st.background && !st.phase.is_final() {
            // Everyone left before the task even started.
            drop(st);
            task.abort();
        } else {
            st.abort = Some(task.abort_handle());
        }
    }
}

/// Ends a fill however its task ends (returned, or aborted): it leaves the
/// map, and whoever still waits is told it failed.
struct Finish(Arc<Fill>);

impl Drop for Finish {
    fn drop(&mut self) {
        self.0.cache.fills.remove(&self.0);
        let claim = {
            let mut st = lock(&self.0.state);
            if !st.phase.is_final() {
                st.phase = Phase::Failed;
            }
            st.wake_readers();
            st.fleet_lock.take()
        };
        self.0.changed.notify_waiters();
        drop(claim);
    }
}

/// The fill's task: send, decide, and record the body into the log.
async fn drive<F>(finish: Finish, ex: Exchange, send: F, leader: Option<oneshot::Sender<Answer>>)
where
    F: Future<Output = Sent>,
{
    let fill = finish.0.clone();
    // A leader that left drops what it would have got (and with a direct
    // response, the upstream connection).
    let tell = |leader: Option<oneshot::Sender<Answer>>, answer| {
        if let Some(tx) = leader {
            let _ = tx.send(answer);
        }
    };
    let resp = match send.await {
        Ok(resp) => resp,
        Err(e) => {
            match ex.stale_entry_on_error() {
                Some(entry) => {
                    fill.settle(Phase::Entry(entry.clone(), CacheStatus::Stale));
                    tell(leader, Answer::Entry(entry, CacheStatus::Stale));
                }
                None => {
                    fill.settle(Phase::Pass { failed: true });
                    tell(leader, Answer::Direct(Err(e)));
                }
            }
            return;
        }
    };
    let (resp, recording, status) = match ex.after(resp).await {
        After::Entry(entry, status) => {
            fill.settle(Phase::Entry(entry.clone(), status));
            tell(leader, Answer::Entry(entry, status));
            return;
        }
        After::Pass(resp, status) => {
            fill.settle(Phase::Pass {
                failed: resp.status().is_server_error(),
            });
            tell(leader, Answer::Direct(Ok((resp, status))));
            return;
        }
        After::Store(resp, recording, status) => (resp, recording, status),
    };
    let (parts, body) = resp.into_parts();
    let head = Arc::new(FillHead::new(parts.status, &recording));
    let leader = leader.filter(|tx| !tx.is_closed());
    if let Some(slot) = fill.begin_body(head.clone(), leader.is_some()) {
        tell(
            leader,
            Answer::Stream {
                parts,
                slot,
                status,
            },
        );
    }
    record(&fill, body, head, recording).await;
    drop(finish);
}

/// Reads the upstream's body into the fill's log, no faster than its
/// slowest reader allows, and stores the entry when the body ended well
/// and was recorded whole. A body that fails settles the fill as failed.
async fn record(
    fill: &Arc<Fill>,
    mut body: ResponseBody,
    head: Arc<FillHead>,
    recording: Recording,
) {
    loop {
        if !poll_fn(|cx| fill.poll_room(cx)).await {
            return;
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    if !data.is_empty() {
                        fill.push(data);
                    }
                }
            }
            Some(Err(_)) => {
                fill.settle(Phase::Failed);
                return;
            }
            None => break,
        }
    }
    let recorded = {
        let st = lock(&fill.state);
        st.recording
            .then(|| (st.chunks.iter().cloned().collect::<Vec<_>>(), st.received))
    };
    let cache = recording.cache.clone();
    // Made before followers are told it is complete, so each of them can
    // count what it saved.
    let entry = recorded.and_then(|(chunks, size)| recording.complete(&chunks, size));
    fill.complete(head, entry.as_ref().map(|e| e.cost));
    if let Some(entry) = entry {
        // Still registered until stored, so no request in between misses
        // both the store and the fill.
        cache.insert(Arc::new(entry)).await;
    }
}

/// How a follower's wait ended.
// Returned once per wait and matched at once.
#[allow(clippy::large_enum_variant)]
pub enum Followed {
    /// Served from the fill.
    Serve(Response<ResponseBody>, CacheStatus),
    /// The fill failed: look again (perhaps behind a new fill).
    Retry,
    /// The answer cannot be shared with this request: go upstream alone.
    Alone,
}

impl Followed {
    /// What waiting came to, in a word (for traces).
    pub fn describe(&self) -> &'static str {
        match self {
            Followed::Serve(_, status) => status.as_str(),
            Followed::Retry => "retry: the leader failed",
            Followed::Alone => "alone: the answer cannot be shared",
        }
    }
}

/// A request waiting for a fill led by another.
pub struct Follow {
    member: Member,
    timeout: Duration,
}

enum Check {
    /// The leader is waiting for an upstream slot (bounded by its
    /// `queue_timeout`; `coalesce_timeout` starts once it has one).
    Queued,
    /// Waiting for the response head (bounded by `coalesce_timeout`).
    Sending,
    /// Waiting for the end of a body that is not joined live (bounded by
    /// the upstream's own idle timeout).
    Body,
    Ready(Ready),
}

enum Ready {
    Live(Arc<FillHead>, SlotGuard),
    Whole(Arc<FillHead>, Arc<[Bytes]>),
    Entry(Arc<Entry>, CacheStatus),
    Retry,
    Alone,
}

impl Follow {
    pub(super) fn new(member: Member, timeout: Duration) -> Self {
        Follow { member, timeout }
    }

    /// Waits for an answer this request, with `headers`, may share: at most
    /// the route's `coalesce_timeout` for the response head.
    pub async fn wait(self, headers: &HeaderMap) -> Followed {
        let fill = self.member.0.clone();
        let mut deadline = tokio::time::Instant::now() + self.timeout;
        let ready = loop {
            // Registered before looking, so a change in between is not missed.
            let mut changed = pin!(fill.changed.notified());
            changed.as_mut().enable();
            match fill.check_follow(headers) {
                Check::Ready(ready) => break ready,
                Check::Queued => {
                    changed.await;
                    deadline = tokio::time::Instant::now() + self.timeout;
                }
                Check::Sending => {
                    if tokio::time::timeout_at(deadline, changed).await.is_err() {
                        break Ready::Alone;
                    }
                }
                Check::Body => changed.await,
            }
        };
        let served = |resp, status| {
            fill.cache
                .stats
                .coalesced
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Followed::Serve(resp, status)
        };
        match ready {
            Ready::Live(head, slot) => {
                let body = ResponseBody::fill(FillReader {
                    slot,
                    remaining: None,
                    done: false,
                    _member: self.member,
                });
                served(head.response(body), CacheStatus::Hit)
            }
            Ready::Whole(head, whole) => {
                let len: usize = whole.iter().map(Bytes::len).sum();
                let mut resp = head.response(ResponseBody::stored(&StoredBody::Chunks(whole)));
                if !head.streamed {
                    resp.headers_mut()
                        .insert(header::CONTENT_LENGTH, len.into());
                }
                served(resp, CacheStatus::Hit)
            }
            Ready::Entry(entry, status) => {
                let age = entry.age(crate::clock::now_std());
                let status = if status == CacheStatus::Stale {
                    status
                } else {
                    CacheStatus::Hit
                };
                served(respond(&entry, age, status, false), status)
            }
            Ready::Retry => Followed::Retry,
            Ready::Alone => Followed::Alone,
        }
    }
}

impl Fill {
    fn check_follow(self: &Arc<Self>, headers: &HeaderMap) -> Check {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let ready = match &st.phase {
            Phase::Queued => return Check::Queued,
            Phase::Sending => return Check::Sending,
            Phase::Body(head) => {
                if !head.shareable || !vary::matches(&head.vary, headers) {
                    Ready::Alone
                } else if head.streamed && st.base == 0 {
                    let head = head.clone();
                    let index = st.add_slot();
                    st.live_followers += 1;
                    Ready::Live(
                        head,
                        SlotGuard {
                            fill: self.clone(),
                            index,
                        },
                    )
                } else if !st.recording {
                    // Too big to keep whole: nothing to hand over at the end.
                    Ready::Alone
                } else {
                    return Check::Body;
                }
            }
            Phase::Complete(head) => {
                if !head.shareable
                    || !vary::matches(&head.vary, headers)
                    || st.base > 0
                    || !st.recording
                {
                    Ready::Alone
                } else {
                    if let Some(cost) = &st.cost {
                        self.cache.stats.saved_times(cost, 1);
                    }
                    let head = head.clone();
                    let whole = st
                        .whole
                        .get_or_insert_with(|| st.chunks.iter().cloned().collect())
                        .clone();
                    Ready::Whole(head, whole)
                }
            }
            Phase::Entry(entry, status) => {
                if entry.vary_matches(headers) {
                    self.cache.stats.saved(entry);
                    Ready::Entry(entry.clone(), *status)
                } else {
                    Ready::Alone
                }
            }
            Phase::Pass { failed: true } | Phase::Failed => Ready::Retry,
            Phase::Pass { failed: false } => Ready::Alone,
        };
        Check::Ready(ready)
    }
}

/// A reader's way through a fill's log: the body of the leader's response
/// and of followers of a live stream.
pub struct FillReader {
    slot: SlotGuard,
    /// Bytes still to come, when the head declared a length: hyper stops
    /// polling once it has written that many, so the end is known here.
    remaining: Option<u64>,
    done: bool,
    _member: Member,
}

/// Why a reader's response was cut.
#[derive(Debug)]
pub enum FillError {
    /// The upstream failed mid-body.
    Upstream,
    /// The reader fell more than `max_entry_size` behind the fastest one.
    FellBehind,
}

impl fmt::Display for FillError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FillError::Upstream => f.write_str("the upstream failed mid-body"),
            FillError::FellBehind => {
                f.write_str("the client fell too far behind the shared upstream stream")
            }
        }
    }
}

impl std::error::Error for FillError {}

impl FillReader {
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let mut guard = lock(&self.slot.fill.state);
        let st = &mut *guard;
        let slot = &mut st.slots[self.slot.index];
        if slot.lagged {
            return Poll::Ready(Some(Err(Box::new(FillError::FellBehind))));
        }
        if let Some(chunk) = st.chunks.get(slot.pos - st.base) {
            let chunk = chunk.clone();
            slot.pos += 1;
            let last = slot.pos == st.base + st.chunks.len();
            if let Some(left) = &mut self.remaining {
                *left = left.saturating_sub(chunk.len() as u64);
                self.done = *left == 0;
            }
            if last && matches!(st.phase, Phase::Complete(_)) {
                self.done = true;
            }
            st.wake_writer();
            return Poll::Ready(Some(Ok(chunk)));
        }
        match st.phase {
            Phase::Complete(_) => {
                self.done = true;
                Poll::Ready(None)
            }
            Phase::Failed => Poll::Ready(Some(Err(Box::new(FillError::Upstream)))),
            _ => {
                slot.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// Whether every byte has been handed out.
    pub fn is_done(&self) -> bool {
        self.done
    }
}
