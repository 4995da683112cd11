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
        Reading::Outside => Instant::now(),
        Reading::Due => {
            let t = Instant::now();
            pass.set(Reading::Taken(t));
            t
        }
        Reading::Taken(t) => t,
    })
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
