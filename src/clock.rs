//! The request path's monotonic clock: read once per pass of a connection's
//! task, and that reading shared by everything the pass does.
//!
//! A pass-through request needs the time at about ten points: the head
//! arriving, the access record, admission, the upstream attempt, the answer,
//! the upstream connection going back to its pool, the body's end for the
//! access log and for the connection's idle timer. Those points fall in two
//! polls of the connection's task (the request arriving, the answer arriving)
//! and within one poll they are microseconds apart, less than the
//! durations they feed are measured in. Each reading costs ~40 ns here (the
//! vDSO, and `rdtsc` under a hypervisor), ~1% of the request's CPU.
//!
//! So `server.rs` marks each poll of a connection's task as a pass, and
//! `now()` inside it returns the pass's first reading, as nginx and Envoy
//! read the time once per event-loop turn (here the turn is one
//! connection's, not the whole loop's). Outside a pass (other tasks, HTTP/2
//! streams, which run in tasks of their own, tests) every call reads the
//! clock.
//!
//! It is the one clock that decisions read: the cache's freshness and ages,
//! the limiters' buckets, ejection and health windows, connection checkout.
//! Tests built with the `test-clock` feature can move a running server's
//! clock forward ([`Skew`]): every reading on that server's threads is
//! then that much later, so a test sees an entry go stale or a server come
//! back without sleeping through the TTL. Timers (tokio's sleeps and
//! timeouts: deadlines of phases, the drain) are not moved by it; tests of
//! those wait for them. Wall-clock time (`Date`, `Age` arithmetic) comes
//! from [`wall`], moved alike.
//!
//! Owns the reading, not what it is used for: timeouts, latencies and the
//! access log stay with their modules. The access log's duration takes a
//! reading of its own, so a request answered within one pass (a cache hit)
//! is not logged as taking no time. A deadline made from a reading is as
//! early as the pass is long (microseconds, or the time a large response
//! takes to compress), which no timeout here is fine enough to notice.

use std::cell::Cell;

use tokio::time::Instant;

#[derive(Clone, Copy)]
enum Reading {
    /// Not in a pass: read the clock every time.
    Outside,
    /// In a pass that has not read the clock yet.
    Due,
    Taken(Instant),
}

thread_local! {
    static PASS: Cell<Reading> = const { Cell::new(Reading::Outside) };
}

/// The time, as of the current pass when there is one.
#[inline]
pub fn now() -> Instant {
    PASS.with(|pass| match pass.get() {
        Reading::Outside => read(),
        Reading::Due => {
            let t = read();
            pass.set(Reading::Taken(t));
            t
        }
        Reading::Taken(t) => t,
    })
}

/// `now()` as the standard library's type (the cache's entries keep it).
#[inline]
pub fn now_std() -> std::time::Instant {
    now().into_std()
}

/// The wall-clock time, moved as `now()` is.
pub fn wall() -> std::time::SystemTime {
    std::time::SystemTime::now() + skew::get()
}

#[inline]
fn read() -> Instant {
    #[cfg(feature = "test-clock")]
    return Instant::now() + skew::get();
    #[cfg(not(feature = "test-clock"))]
    Instant::now()
}

/// How far a test has moved this thread's server's clock. (Without the
/// `test-clock` feature it is carried but never read.)
#[derive(Clone, Default)]
#[cfg_attr(not(feature = "test-clock"), allow(dead_code))]
pub struct Skew(std::sync::Arc<std::sync::atomic::AtomicU64>);

#[cfg_attr(not(feature = "test-clock"), allow(dead_code))]
impl Skew {
    /// Moves the clock of every thread that installed this skew forward.
    pub fn advance(&self, by: std::time::Duration) {
        let ns = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.0.fetch_add(ns, std::sync::atomic::Ordering::Relaxed);
    }

    /// This thread's readings follow `self` from now on (a server's
    /// threads, as they start).
    pub fn install(&self) {
        skew::install(self);
    }
}

#[cfg(feature = "test-clock")]
mod skew {
    use std::cell::RefCell;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    thread_local! {
        static THIS_THREAD: RefCell<Option<super::Skew>> = const { RefCell::new(None) };
    }

    pub fn install(skew: &super::Skew) {
        THIS_THREAD.with(|t| *t.borrow_mut() = Some(skew.clone()));
    }

    pub fn get() -> Duration {
        THIS_THREAD.with(|t| {
            t.borrow().as_ref().map_or(Duration::ZERO, |s| {
                Duration::from_nanos(s.0.load(Ordering::Relaxed))
            })
        })
    }
}

/// Without the `test-clock` feature the clock cannot be moved: readings
/// cost nothing more.
#[cfg(not(feature = "test-clock"))]
mod skew {
    use std::time::Duration;

    pub fn install(_: &super::Skew) {}

    #[inline(always)]
    pub fn get() -> Duration {
        Duration::ZERO
    }
}

/// One poll of a connection's task, from `begin` until dropped (also on a
/// panic, so a thread never keeps a stale reading).
pub struct Pass {
    outer: Reading,
}

impl Pass {
    pub fn begin() -> Pass {
        Pass {
            outer: PASS.replace(Reading::Due),
        }
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        PASS.set(self.outer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_pass_shares_one_reading_and_ends_with_its_guard() {
        let first = {
            let _pass = Pass::begin();
            let first = now();
            std::thread::sleep(Duration::from_millis(2));
            assert_eq!(now(), first, "one reading per pass");
            first
        };
        // Outside a pass, each call reads the clock.
        let a = now();
        assert!(a > first);
        std::thread::sleep(Duration::from_millis(2));
        assert!(now() > a);
        // A new pass reads afresh.
        let _pass = Pass::begin();
        assert!(now() > a);
    }

    #[test]
    fn a_panic_inside_a_pass_leaves_the_clock_live() {
        let caught = std::panic::catch_unwind(|| {
            let _pass = Pass::begin();
            let _ = now();
            panic!("a request's code panicked");
        });
        assert!(caught.is_err());
        let a = now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(now() > a);
    }
}
