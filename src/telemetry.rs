//! Every metric Hyperion exports (Prometheus text on the admin listener's
//! `/metrics`): their names, labels, and where their values come from.
//!
//! Two kinds, so the request path pays little:
//! - counted as requests pass (`request_finished`, `upstream_answered`,
//!   `rate_limited`, `queued`): handles fetched once per label set and
//!   worker thread, then an atomic add; durations go to fixed-bucket
//!   histograms of our own (`seconds`), rendered after the recorder's text
//!   (the recorder's own histograms would keep every sample until an
//!   upkeep folded them in: none is used, so none runs);
//! - read at scrape time from the state that counts them anyway (cache
//!   statistics, server states, reloads): `admin::metrics` copies them in
//!   before `exposition`, so this module imports nothing above it.
//!
//! Labels are bounded: routes, upstreams, servers and limiters come from
//! the policy, statuses and methods from short fixed lists; never paths,
//! keys or clients. Recording without `install` (tests, benches) is free.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use http::Method;
use metrics::{counter, gauge, Counter};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

mod seconds;
pub mod slowest;
pub use seconds::SecondsHistogram;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The duration histograms, beside the recorder's metrics.
static SECONDS: LazyLock<seconds::Registry> = LazyLock::new(seconds::Registry::default);

/// Installs the process's recorder (once; later calls return the same
/// handle). `None` when another recorder is installed already.
pub fn install() -> Option<&'static PrometheusHandle> {
    if let Some(h) = HANDLE.get() {
        return Some(h);
    }
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    // Failing means another install won the race: theirs stands.
    if metrics::set_global_recorder(recorder).is_ok() {
        let _ = HANDLE.set(handle);
        gauge!("hyperion_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    }
    HANDLE.get()
}

/// The exposition text of what is counted here: the recorder's metrics
/// (including the gauges and totals the admin side copied in from live
/// state just before, `admin::metrics`), then the duration histograms.
/// `None` before `install`.
pub fn exposition() -> Option<String> {
    let handle = HANDLE.get()?;
    let mut text = handle.render();
    SECONDS.render(&mut text);
    Some(text)
}

/// The label set of one finished request.
#[derive(PartialEq, Eq, Hash, Clone, Copy)]
struct RequestLabels {
    /// The route name's hash (names are the policy's, so few).
    route: u64,
    method: &'static str,
    status: u16,
    cache: &'static str,
}

/// FNV-1a: the label maps' keys are the policy's names and short fixed
/// lists, never a client's bytes, so they need no flood-resistant hash, and
/// SipHash three times per request was a visible cost.
struct LabelHasher(u64);

impl Default for LabelHasher {
    fn default() -> Self {
        LabelHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for LabelHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type LabelMap<K, V> = HashMap<K, V, BuildHasherDefault<LabelHasher>>;

thread_local! {
    /// This worker's handles: a request's metrics take no lock and
    /// touch no cache line another worker writes, beyond the counters.
    static REQUESTS: RefCell<LabelMap<RequestLabels, Counter>> = RefCell::default();
    static DURATIONS: RefCell<LabelMap<u64, Arc<SecondsHistogram>>> = RefCell::default();
    /// The handles of the last request finished on this worker: steady
    /// traffic repeats its labels, and a repeat skips hashing them and the
    /// two map lookups.
    static LAST_FINISHED: RefCell<Option<LastFinished>> = const { RefCell::new(None) };
}

struct LastFinished {
    route: Box<str>,
    method: &'static str,
    status: u16,
    cache: &'static str,
    requests: Counter,
    seconds: Arc<SecondsHistogram>,
}

/// A request has ended (its body sent, or given up): counted by route,
/// method, status and cache status, timed by route.
pub fn request_finished(
    route: Option<&str>,
    method: &Method,
    status: u16,
    cache: &'static str,
    took: Duration,
) {
    if HANDLE.get().is_none() {
        return;
    }
    let route_name = route.unwrap_or("-");
    let method = method_label(method);
    let status = bounded_status(status);
    let repeated = LAST_FINISHED.with_borrow(|last| match last {
        Some(l)
            if l.status == status
                && l.method == method
                && l.cache == cache
                && *l.route == *route_name =>
        {
            l.requests.increment(1);
            l.seconds.record(took);
            true
        }
        _ => false,
    });
    if repeated {
        return;
    }
    let mut h = LabelHasher::default();
    route_name.hash(&mut h);
    let route_hash = h.finish();
    let labels = RequestLabels {
        route: route_hash,
        method,
        status,
        cache,
    };
    let requests = REQUESTS.with_borrow_mut(|map| {
        map.entry(labels)
            .or_insert_with(|| {
                counter!(
                    "hyperion_requests_total",
                    "route" => route_name.to_owned(),
                    "method" => method,
                    "status" => status.to_string(),
                    "cache" => cache,
                )
            })
            .clone()
    });
    let seconds = DURATIONS.with_borrow_mut(|map| {
        map.entry(route_hash)
            .or_insert_with(|| {
                SECONDS.get("hyperion_request_duration_seconds", "route", route_name)
            })
            .clone()
    });
    requests.increment(1);
    seconds.record(took);
    // The name is kept without a new allocation when only the other labels
    // changed (a route's hits and misses alternating).
    let route = match LAST_FINISHED.take() {
        Some(last) if *last.route == *route_name => last.route,
        _ => route_name.into(),
    };
    LAST_FINISHED.set(Some(LastFinished {
        route,
        method,
        status,
        cache,
        requests,
        seconds,
    }));
}

/// The histogram of one pool's time to a response head, for its
/// `UpstreamPool` to keep.
pub fn upstream_latency(upstream: &str) -> Arc<SecondsHistogram> {
    SECONDS.get("hyperion_upstream_duration_seconds", "upstream", upstream)
}

/// Bytes in and out, by (coding, op).
type CodedCounters = LabelMap<(&'static str, &'static str), (Counter, Counter)>;

thread_local! {
    static CODED: RefCell<CodedCounters> = RefCell::default();
}

/// A body compressed or decompressed (`op`: encode, decode) with `coding`:
/// its bytes before and after.
pub fn coded(coding: &'static str, op: &'static str, bytes_in: u64, bytes_out: u64) {
    if HANDLE.get().is_none() || (bytes_in == 0 && bytes_out == 0) {
        return;
    }
    CODED.with_borrow_mut(|map| {
        let (i, o) = map.entry((coding, op)).or_insert_with(|| {
            (
                counter!("hyperion_compression_in_bytes_total", "coding" => coding, "op" => op),
                counter!("hyperion_compression_out_bytes_total", "coding" => coding, "op" => op),
            )
        });
        i.increment(bytes_in);
        o.increment(bytes_out);
    });
}

/// One API key's series (`hyperion_key_requests_total` by status class,
/// `hyperion_key_tokens_total` by kind), registered once per key: a
/// registration with a key's label per request would cost more than the
/// rest of its accounting.
pub struct KeyCounters {
    /// 2xx, 3xx, 4xx, 5xx.
    requests: [Counter; 4],
    /// in, out, saved.
    tokens: [Counter; 3],
}

impl KeyCounters {
    /// `None` without a recorder (tests, tools).
    pub fn new(key: &str) -> Option<KeyCounters> {
        HANDLE.get()?;
        let req = |class: &'static str| counter!("hyperion_key_requests_total", "key" => key.to_owned(), "class" => class);
        let tok = |kind: &'static str| counter!("hyperion_key_tokens_total", "key" => key.to_owned(), "kind" => kind);
        Some(KeyCounters {
            requests: [req("2xx"), req("3xx"), req("4xx"), req("5xx")],
            tokens: [tok("in"), tok("out"), tok("saved")],
        })
    }

    /// An answer with `status`.
    pub fn request(&self, status: u16) {
        let class = match status {
            200..=299 => 0,
            300..=399 => 1,
            400..=499 => 2,
            _ => 3,
        };
        self.requests[class].increment(1);
    }

    /// Tokens read and generated by the upstream, and saved.
    pub fn tokens(&self, tokens_in: u64, tokens_out: u64, saved: u64) {
        for (counter, n) in self.tokens.iter().zip([tokens_in, tokens_out, saved]) {
            if n > 0 {
                counter.increment(n);
            }
        }
    }
}

/// A request refused by rate limiter `limiter`.
pub fn rate_limited(limiter: &str) {
    if HANDLE.get().is_some() {
        counter!("hyperion_rate_limited_total", "limiter" => limiter.to_owned()).increment(1);
    }
}

/// A request on split route `route` took the arm to `upstream`.
pub fn split_arm(route: &Arc<str>, upstream: &Arc<str>) {
    if HANDLE.get().is_some() {
        counter!("hyperion_route_split_total", "route" => route.to_string(), "upstream" => upstream.to_string())
            .increment(1);
    }
}

/// An upstream answer broke the protocol in a way Hyperion repaired
/// (`te_and_content_length`: both framings sent, RFC 9112 §6.3).
pub fn upstream_fault(fault: &'static str) {
    if HANDLE.get().is_some() {
        counter!("hyperion_upstream_faults_total", "fault" => fault).increment(1);
    }
}

/// A request began waiting for a slot at `upstream`
/// (`max_inflight_per_server`).
pub fn queued(upstream: &str) {
    if HANDLE.get().is_some() {
        counter!("hyperion_upstream_queued_total", "upstream" => upstream.to_owned()).increment(1);
    }
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Statuses as they are, except unusual ones folded into their class's
/// hundred (a client sending odd codes cannot grow the label set).
fn bounded_status(status: u16) -> u16 {
    match status {
        200..=206 | 301..=308 | 400..=417 | 421..=431 | 500..=504 => status,
        100..=599 => status / 100 * 100,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_stay_a_short_list() {
        assert_eq!(bounded_status(200), 200);
        assert_eq!(bounded_status(429), 429);
        assert_eq!(bounded_status(299), 200);
        assert_eq!(bounded_status(599), 500);
        assert_eq!(bounded_status(1000), 0);
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "other");
    }
}
