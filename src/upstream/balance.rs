//! Choosing a server of a pool for one request, by the pool's `balance`:
//!
//! - `round_robin`: smooth weighted round-robin (nginx's), unrolled into one
//!   cycle when the pool is built, so a pick is one atomic increment;
//! - `least_inflight`: fewest requests in flight per unit of weight, ties
//!   broken at random;
//! - `p2c_ewma`: two servers at random (weighted), the one with the lower
//!   peak-EWMA latency × requests in flight;
//! - `consistent_hash`: a ring of virtual nodes (stable across processes, so
//!   a fleet of proxies agrees), with bounded load: a server already
//!   carrying more than 1.25× its share of the requests in flight passes the
//!   request on along the ring;
//! - `prefix_affinity`: the least loaded of the servers holding the
//!   request's longest known prompt prefix (`prefix.rs` says which), within
//!   the same 1.25× bound; over it, those holding the next longest; a
//!   prompt known nowhere (or only at servers over their bound) is placed
//!   on the ring by its first block (or the pool's `hash_key` header), so
//!   prompts opening alike land together and the load stays bounded.
//!
//! A server's load is this proxy's requests in flight to it, plus, with
//! `engine_signals`, the others its engine last reported (`engine.rs`), so
//! a server shared with other clients is judged by its whole queue.
//!
//! Every strategy skips servers that are out (health, ejection) or excluded
//! (already tried, or not serving the model). Nothing here locks. What a
//! server's state is belongs to `server_state`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::time::Instant;

use super::server_state::ServerState;
use crate::policy::Balance;

/// Virtual nodes on the consistent-hash ring, shared out by weight.
const RING_POINTS: usize = 4096;
/// Bounded-load factor: a server may carry this much over its share.
const LOAD_FACTOR: f64 = 1.25;

pub enum Balancer {
    RoundRobin {
        /// Server indices in smooth weighted order, one cycle long.
        schedule: Box<[usize]>,
        next: AtomicUsize,
    },
    LeastInflight,
    P2cEwma,
    ConsistentHash {
        /// (point, server), sorted by point.
        ring: Box<[(u64, usize)]>,
    },
    PrefixAffinity {
        /// As `ConsistentHash`'s: where unknown prompts are placed.
        ring: Box<[(u64, usize)]>,
        /// Requests a server runs at once (`max_inflight_per_server`):
        /// below it, a server holding the prefix is never over its bound.
        floor: u32,
    },
}

/// What a pick must respect beyond health, as bit sets over the pool's
/// servers (a pool has at most 64).
#[derive(Clone, Copy, Debug)]
pub struct PickFilter {
    /// Servers already tried by this request.
    pub tried: u64,
    /// Servers allowed at all (those serving the request's model).
    pub only: u64,
    /// Of the usable allowed servers, the ones to choose among when any is
    /// usable (those with the model loaded); 0: no preference.
    pub prefer: u64,
    /// The request's hash, for `consistent_hash` (and `prefix_affinity`'s
    /// placement of a prompt known nowhere).
    pub hash: Option<u64>,
    /// `prefix_affinity`: the servers holding the request's longest known
    /// prompt prefix, and those holding the next longest.
    pub affine: u64,
    pub affine_next: u64,
    /// `prefix_affinity`: where a prompt known nowhere may be placed (the
    /// servers whose caches have the most room); 0: anywhere.
    pub room: u64,
}

impl Default for PickFilter {
    fn default() -> Self {
        PickFilter {
            tried: 0,
            only: u64::MAX,
            prefer: 0,
            hash: None,
            affine: 0,
            affine_next: 0,
            room: 0,
        }
    }
}

impl PickFilter {
    fn allows(&self, i: usize) -> bool {
        (self.only & !self.tried) & (1 << i) != 0
    }
}

impl Balancer {
    /// `prefix_affinity`'s floor: the requests one server runs at once.
    pub fn with_parallelism(mut self, per_server: Option<u32>) -> Self {
        if let (Balancer::PrefixAffinity { floor, .. }, Some(n)) = (&mut self, per_server) {
            *floor = n;
        }
        self
    }

    pub fn new(balance: Balance, servers: &[Arc<ServerState>]) -> Self {
        let weights: Vec<u32> = servers.iter().map(|s| s.weight).collect();
        match balance {
            Balance::RoundRobin => Balancer::RoundRobin {
                schedule: smooth_weighted_schedule(&weights).into_boxed_slice(),
                next: AtomicUsize::new(0),
            },
            Balance::LeastInflight => Balancer::LeastInflight,
            Balance::P2cEwma => Balancer::P2cEwma,
            Balance::ConsistentHash => Balancer::ConsistentHash {
                ring: ring(servers).into_boxed_slice(),
            },
            Balance::PrefixAffinity => Balancer::PrefixAffinity {
                ring: ring(servers).into_boxed_slice(),
                floor: 0,
            },
        }
    }

    /// A usable server allowed by `filter`, or `None` when there is none.
    pub fn pick(
        &self,
        servers: &[Arc<ServerState>],
        filter: &PickFilter,
        now: Instant,
    ) -> Option<usize> {
        // Who may be chosen, as a bit set: one clock reading, one look at
        // each server's health, whatever the strategy does next.
        let now = servers.first()?.nanos(now);
        let mut ok = Candidates(0);
        for (i, s) in servers.iter().enumerate() {
            if filter.allows(i) && s.usable_at(now) {
                ok.0 |= 1 << i;
            }
        }
        if ok.0 == 0 {
            return None;
        }
        if ok.0 & filter.prefer != 0 {
            ok.0 &= filter.prefer;
        }
        match self {
            Balancer::RoundRobin { schedule, next } => {
                let start = next.fetch_add(1, Ordering::Relaxed);
                (0..schedule.len())
                    .map(|k| schedule[(start + k) % schedule.len()])
                    .find(|&i| ok.has(i))
            }
            Balancer::LeastInflight => least_inflight(servers, ok, now),
            Balancer::P2cEwma => p2c(servers, ok, now),
            Balancer::ConsistentHash { ring } => match filter.hash {
                Some(hash) => bounded_ring_walk(ring, servers, hash, ok, now),
                // Nothing to hash on: spread by load.
                None => least_inflight(servers, ok, now),
            },
            Balancer::PrefixAffinity { ring, floor } => {
                for held in [filter.affine, filter.affine_next] {
                    let held = Candidates(ok.0 & held);
                    if let Some(i) = least_loaded_within_bound(servers, held, *floor, now) {
                        return Some(i);
                    }
                }
                // Known nowhere: on the ring, among the servers with room
                // when one of them is within its bound.
                let roomy = Candidates(ok.0 & filter.room);
                let place = |among: Candidates| match filter.hash {
                    Some(hash) => bounded_ring_walk(ring, servers, hash, among, now),
                    None => least_inflight(servers, among, now),
                };
                if roomy.0 != 0 && roomy.0 != ok.0 {
                    if let Some(i) =
                        least_loaded_within_bound(servers, roomy, 0, now).and_then(|_| place(roomy))
                    {
                        return Some(i);
                    }
                }
                place(ok)
            }
        }
    }
}

/// The least loaded (per weight) of `of` whose load is within the bound
/// `bounded_ring_walk` keeps, or with this proxy's requests below `floor`
/// (what a server runs at once: under it, a request waits at most behind
/// the others' queue) while the others' queue its engine reports is
/// shorter than one such batch (a wait of less than one turn, which a
/// cached prefix is worth); `None` when all are over it (or `of` is
/// empty).
fn least_loaded_within_bound(
    servers: &[Arc<ServerState>],
    of: Candidates,
    floor: u32,
    now: u64,
) -> Option<usize> {
    if of.0 == 0 {
        return None;
    }
    let total_weight: u64 = servers.iter().map(|s| u64::from(s.weight)).sum();
    let total_load: u64 = servers.iter().map(|s| u64::from(s.load_at(now))).sum();
    let within = of
        .iter()
        .filter(|&i| {
            let s = &servers[i];
            let share = (total_load + 1) as f64 * s.weight as f64 / total_weight as f64;
            let load = s.load_at(now);
            let mine = s.in_flight();
            f64::from(load) + 1.0 <= (LOAD_FACTOR * share).ceil()
                || (mine < floor && load.saturating_sub(mine) < floor)
        })
        .fold(0u64, |m, i| m | (1 << i));
    least_inflight(servers, Candidates(within).nonempty()?, now)
}

/// The servers a pick may choose from (a pool has at most 64).
#[derive(Clone, Copy)]
struct Candidates(u64);

impl Candidates {
    fn nonempty(self) -> Option<Candidates> {
        (self.0 != 0).then_some(self)
    }

    fn has(self, i: usize) -> bool {
        self.0 & (1 << i) != 0
    }

    fn iter(self) -> impl Iterator<Item = usize> {
        let mut bits = self.0;
        std::iter::from_fn(move || {
            (bits != 0).then(|| {
                let i = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                i
            })
        })
    }
}

/// Fewest in flight per unit of weight (as nginx's `least_conn`); ties at
/// random, in proportion to weight, so idle servers share traffic by
/// weight too (weighted reservoir sampling: one pass, nothing locked).
fn least_inflight(servers: &[Arc<ServerState>], ok: Candidates, now: u64) -> Option<usize> {
    // (index, in flight, weight, summed weight of the tied)
    let mut best: Option<(usize, u64, u64, u64)> = None;
    for i in ok.iter() {
        let s = &servers[i];
        let load = u64::from(s.load_at(now));
        let weight = u64::from(s.weight);
        best = match best {
            // load/weight vs best_load/best_weight, cross-multiplied.
            Some((_, bl, bw, _)) if load * bw > bl * weight => best,
            Some((bi, bl, bw, tied)) if load * bw == bl * weight => {
                let tied = tied + weight;
                if fastrand::u64(..tied) < weight {
                    Some((i, load, weight, tied))
                } else {
                    Some((bi, bl, bw, tied))
                }
            }
            _ => Some((i, load, weight, weight)),
        };
    }
    best.map(|(i, ..)| i)
}

/// Power of two choices on peak-EWMA latency × (in flight + 1) / weight.
/// The two candidates are drawn by weight; a server with no latency yet
/// costs nothing while idle (so it gets tried) and a penalty once busy.
fn p2c(servers: &[Arc<ServerState>], ok: Candidates, now: u64) -> Option<usize> {
    let usable: u64 = ok.iter().map(|i| u64::from(servers[i].weight)).sum();
    let draw = || {
        let mut ticket = fastrand::u64(..usable);
        for i in ok.iter() {
            let w = u64::from(servers[i].weight);
            if ticket < w {
                return i;
            }
            ticket -= w;
        }
        unreachable!("the ticket is below the usable weight")
    };
    let a = draw();
    let mut b = draw();
    // One more draw for a distinct second candidate (when there is one).
    if a == b {
        b = draw();
    }
    if a == b {
        return Some(a);
    }
    let cost = |i: usize| {
        let s = &servers[i];
        let load = s.load_at(now);
        let latency = match s.latency_at(now) {
            Some(l) => l,
            None if load == 0 => 0.0,
            // Busy and never measured: as if it took a second.
            None => 1e9,
        };
        (latency + 1.0) * (f64::from(load) + 1.0) / f64::from(s.weight)
    };
    Some(if cost(b) < cost(a) { b } else { a })
}

/// From the hash's place on the ring, clockwise, the first usable server
/// within its bounded load; failing that (all over their bound), the first
/// usable one.
fn bounded_ring_walk(
    ring: &[(u64, usize)],
    servers: &[Arc<ServerState>],
    hash: u64,
    ok: Candidates,
    now: u64,
) -> Option<usize> {
    let total_weight: u64 = servers.iter().map(|s| u64::from(s.weight)).sum();
    let total_load: u64 = servers.iter().map(|s| u64::from(s.load_at(now))).sum();
    let start = ring.partition_point(|&(p, _)| p < hash);
    let mut fallback = None;
    // Each server is judged once, at its first point.
    let mut seen = 0u64;
    for k in 0..ring.len() {
        let (_, i) = ring[(start + k) % ring.len()];
        if seen & (1 << i) != 0 {
            continue;
        }
        seen |= 1 << i;
        if ok.has(i) {
            let s = &servers[i];
            let share = (total_load + 1) as f64 * s.weight as f64 / total_weight as f64;
            if f64::from(s.load_at(now)) + 1.0 <= (LOAD_FACTOR * share).ceil() {
                return Some(i);
            }
            fallback.get_or_insert(i);
        }
        if seen.count_ones() as usize == servers.len() {
            break;
        }
    }
    fallback
}

/// The ring's points: each server gets a share of `RING_POINTS` by weight,
/// placed by hashing its URL and the point's number, so every proxy with
/// the same servers builds the same ring.
fn ring(servers: &[Arc<ServerState>]) -> Vec<(u64, usize)> {
    let total: u64 = servers.iter().map(|s| u64::from(s.weight)).sum();
    let mut ring = Vec::with_capacity(RING_POINTS + servers.len());
    for (i, s) in servers.iter().enumerate() {
        let points = (RING_POINTS as u64 * u64::from(s.weight) / total).max(1);
        for n in 0..points {
            let mut h = blake3::Hasher::new();
            h.update(s.url.as_bytes());
            h.update(&n.to_le_bytes());
            let digest = h.finalize();
            let point = u64::from_le_bytes(digest.as_bytes()[..8].try_into().expect("8 bytes"));
            ring.push((point, i));
        }
    }
    ring.sort_unstable();
    ring
}

/// Smooth weighted round-robin (as nginx does it), unrolled into one cycle:
/// weights 5,1,1 give a,a,b,a,c,a,a rather than a,a,a,a,a,b,c.
fn smooth_weighted_schedule(weights: &[u32]) -> Vec<usize> {
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, &w) in current.iter_mut().zip(weights) {
            *c += i64::from(w);
        }
        let (best, _) = current
            .iter()
            .enumerate()
            .max_by_key(|&(i, &c)| (c, std::cmp::Reverse(i)))
            .expect("a pool has at least one server");
        current[best] -= total;
        out.push(best);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(weights: &[u32]) -> Vec<Arc<ServerState>> {
        let epoch = Instant::now();
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                Arc::new(ServerState::new(
                    format!("http://10.0.0.{i}:11434").into(),
                    w,
                    epoch,
                ))
            })
            .collect()
    }

    const EVERY_STRATEGY: [Balance; 5] = [
        Balance::RoundRobin,
        Balance::LeastInflight,
        Balance::P2cEwma,
        Balance::ConsistentHash,
        Balance::PrefixAffinity,
    ];

    fn counts(
        b: &Balancer,
        s: &[Arc<ServerState>],
        n: usize,
        hash: impl Fn(usize) -> Option<u64>,
    ) -> Vec<usize> {
        let mut out = vec![0; s.len()];
        let now = Instant::now();
        for k in 0..n {
            let filter = PickFilter {
                hash: hash(k),
                ..Default::default()
            };
            out[b.pick(s, &filter, now).unwrap()] += 1;
        }
        out
    }

    #[test]
    fn schedule_is_smooth_and_weighted() {
        assert_eq!(smooth_weighted_schedule(&[1]), vec![0]);
        assert_eq!(smooth_weighted_schedule(&[1, 1, 1]), vec![0, 1, 2]);
        assert_eq!(
            smooth_weighted_schedule(&[5, 1, 1]),
            vec![0, 0, 1, 0, 2, 0, 0]
        );
        let s = smooth_weighted_schedule(&[2, 3]);
        assert_eq!(s.iter().filter(|&&i| i == 0).count(), 2);
        assert_eq!(s.len(), 5);
    }

    #[tokio::test]
    async fn every_strategy_follows_the_weights_when_idle() {
        let s = servers(&[1, 2, 1]);
        // Stated tolerances: round-robin is exact over its cycle; p2c leans
        // a little to the heavier server, which is also the less loaded.
        for (balance, tolerance) in [
            (Balance::RoundRobin, 0.01),
            (Balance::LeastInflight, 0.1),
            (Balance::P2cEwma, 0.15),
        ] {
            let b = Balancer::new(balance, &s);
            // Idle servers: least_inflight ties everywhere, so hold what is
            // picked to make the weights matter.
            let mut held = Vec::new();
            let mut c = vec![0; 3];
            let now = Instant::now();
            for _ in 0..4000 {
                let i = b.pick(&s, &PickFilter::default(), now).unwrap();
                c[i] += 1;
                held.push(s[i].begin());
                if held.len() == 8 {
                    held.clear();
                }
            }
            for (i, want) in [1000.0, 2000.0, 1000.0].iter().enumerate() {
                let got = c[i] as f64;
                assert!((got - want).abs() / want <= tolerance, "{balance:?}: {c:?}");
            }
        }
        // Consistent hashing spreads distinct keys by weight too.
        let b = Balancer::new(Balance::ConsistentHash, &s);
        let c = counts(&b, &s, 30_000, |k| {
            Some(
                blake3::hash(&k.to_le_bytes()).as_bytes()[0..8]
                    .iter()
                    .fold(0u64, |a, &x| a << 8 | u64::from(x)),
            )
        });
        for (i, want) in [7500.0, 15000.0, 7500.0].iter().enumerate() {
            assert!((c[i] as f64 - want).abs() / want < 0.15, "{c:?}");
        }
    }

    #[tokio::test]
    async fn a_key_stays_on_its_server_until_that_server_is_overloaded_or_out() {
        let s = servers(&[1, 1, 1]);
        let b = Balancer::new(Balance::ConsistentHash, &s);
        let now = Instant::now();
        let key = PickFilter {
            hash: Some(0xdead_beef_cafe),
            ..Default::default()
        };
        let home = b.pick(&s, &key, now).unwrap();
        assert!((0..100).all(|_| b.pick(&s, &key, now) == Some(home)));
        // The same ring in another process: same answer.
        assert_eq!(
            Balancer::new(Balance::ConsistentHash, &servers(&[1, 1, 1])).pick(&s, &key, now),
            Some(home)
        );
        // A hot key: once home carries more than its bounded share, the
        // next request goes elsewhere.
        let held: Vec<_> = (0..4).map(|_| s[home].begin()).collect();
        assert_ne!(b.pick(&s, &key, now), Some(home));
        drop(held);
        assert_eq!(b.pick(&s, &key, now), Some(home));
        // Tried already: the next server on the ring.
        let tried = 1 << home;
        let other = b.pick(&s, &PickFilter { tried, ..key }, now).unwrap();
        assert_ne!(other, home);
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_moves_traffic_away_from_a_slow_server() {
        let s = servers(&[1, 1, 1]);
        let b = Balancer::new(Balance::P2cEwma, &s);
        let now = Instant::now();
        s[0].succeeded(std::time::Duration::from_millis(800), now);
        s[1].succeeded(std::time::Duration::from_millis(20), now);
        s[2].succeeded(std::time::Duration::from_millis(20), now);
        let c = counts(&b, &s, 3000, |_| None);
        assert!(c[0] < 400, "{c:?}");
    }

    #[tokio::test]
    async fn out_tried_and_filtered_servers_are_never_picked() {
        let s = servers(&[1, 1, 1]);
        let now = Instant::now();
        for _ in 0..3 {
            s[1].failed("refused", 3, true, now);
        }
        let only = 0b011;
        let tried = 0b001;
        for balance in EVERY_STRATEGY {
            let b = Balancer::new(balance, &s);
            for k in 0..50u64 {
                let f = PickFilter {
                    only,
                    hash: Some(k * 7919),
                    ..Default::default()
                };
                assert_eq!(b.pick(&s, &f, now), Some(0), "{balance:?}");
                let f = PickFilter { tried, ..f };
                assert_eq!(b.pick(&s, &f, now), None, "{balance:?}");
            }
        }
    }

    #[tokio::test]
    async fn preferred_servers_are_chosen_while_any_is_usable() {
        let s = servers(&[1, 1, 1]);
        let now = Instant::now();
        for balance in EVERY_STRATEGY {
            let b = Balancer::new(balance, &s);
            for k in 0..50u64 {
                let f = PickFilter {
                    only: 0b110,
                    prefer: 0b100,
                    hash: Some(k * 7919),
                    ..Default::default()
                };
                assert_eq!(b.pick(&s, &f, now), Some(2), "{balance:?}");
            }
        }
        // The preferred server out: another allowed one.
        for _ in 0..3 {
            s[2].failed("refused", 3, true, now);
        }
        let b = Balancer::new(Balance::LeastInflight, &s);
        let f = PickFilter {
            only: 0b110,
            prefer: 0b100,
            ..Default::default()
        };
        assert_eq!(b.pick(&s, &f, now), Some(1));
    }

    #[tokio::test]
    async fn prefix_affinity_stays_within_the_bound_or_below_the_floor() {
        let s = servers(&[1, 1, 1, 1]);
        let now = Instant::now();
        let f = PickFilter {
            hash: Some(42),
            affine: 0b0100,
            affine_next: 0b0010,
            ..Default::default()
        };
        let plain = Balancer::new(Balance::PrefixAffinity, &s);
        assert_eq!(plain.pick(&s, &f, now), Some(2));
        // One in flight at the prefix's server, none elsewhere: over 1.25x
        // an even share, so the next longest prefix's server.
        let held = s[2].begin();
        assert_eq!(plain.pick(&s, &f, now), Some(1));
        // Told a server runs 4 at once, it stays until that is reached.
        let four = Balancer::new(Balance::PrefixAffinity, &s).with_parallelism(Some(4));
        assert_eq!(four.pick(&s, &f, now), Some(2));
        let more: Vec<_> = (0..3).map(|_| s[2].begin()).collect();
        assert_ne!(four.pick(&s, &f, now), Some(2));
        drop((held, more));
        // Its engine reports others' requests waiting there: fewer than a
        // batch, the prefix is worth the wait; a batch or more, not.
        let later = Some(now + std::time::Duration::from_secs(3));
        s[2].set_foreign(3, later);
        assert_eq!(four.pick(&s, &f, now), Some(2));
        s[2].set_foreign(4, later);
        assert_eq!(four.pick(&s, &f, now), Some(1));
        // Without the floor, the others count against the bound at once.
        s[2].set_foreign(1, later);
        assert_eq!(plain.pick(&s, &f, now), Some(1));
        // A report stands only until its time.
        assert_eq!(
            plain.pick(&s, &f, now + std::time::Duration::from_secs(4)),
            Some(2)
        );
        s[2].set_foreign(0, None);
        // Known nowhere: placed among the servers with room.
        let unknown = PickFilter {
            hash: Some(42),
            room: 0b1000,
            ..Default::default()
        };
        for k in 0..20u64 {
            let f = PickFilter {
                hash: Some(k * 7919),
                ..unknown
            };
            assert_eq!(plain.pick(&s, &f, now), Some(3));
        }
    }
}
