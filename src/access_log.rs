//! The access log: one line per request (`json` or `combined`) on stderr, and
//! the WARN line for requests slower than `slow_request`.
//!
//! Lines are formatted on the request's task and handed to one writer thread
//! through a bounded channel, so a slow stderr (a stalled journald) costs
//! dropped log lines, counted and reported, never a stalled request.

use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method, Version};
use serde::Serialize;
use tokio::time::Instant;

use crate::body::BodyOutcome;
use crate::policy::AccessLogFormat;

/// Lines waiting for the writer thread before new ones are dropped.
const QUEUE: usize = 65_536;

/// Where formatted lines go.
#[derive(Clone)]
pub enum LogSink {
    Stderr,
    /// Tests read lines from the other end.
    Channel(SyncSender<String>),
}

/// The access log of one running proxy.
pub struct AccessLog {
    format: AccessLogFormat,
    slow: Option<Duration>,
    tx: Option<SyncSender<String>>,
    dropped: AtomicU64,
}

/// What is known about one request by the time its response ends.
pub struct AccessRecord {
    pub started: Instant,
    pub client: IpAddr,
    pub method: Method,
    /// Path and query as the client sent them (shares the request's bytes).
    pub target: Option<http::uri::PathAndQuery>,
    pub version: Version,
    pub status: u16,
    pub route: Option<Arc<str>>,
    /// The name of the API key the request presented (`[auth]`).
    pub key: Option<Arc<str>>,
    pub upstream: Option<Arc<str>>,
    /// The arm of a split route the request took (its upstream's name).
    pub arm: Option<Arc<str>>,
    pub request_id: HeaderValue,
    /// The cache status; `-` where no cache is involved.
    pub cache: &'static str,
    pub user_agent: Option<HeaderValue>,
    pub referer: Option<HeaderValue>,
    /// The error code, when the proxy answered with an error.
    pub error: Option<&'static str>,
}

impl AccessRecord {
    pub fn target(&self) -> &str {
        self.target.as_ref().map_or("/", |pq| pq.as_str())
    }

    /// When the request arrived, by the wall clock: worked out only when a
    /// line is written, so requests that are not logged never read it.
    pub fn wall(&self) -> SystemTime {
        SystemTime::now() - self.started.elapsed()
    }
}

#[derive(Serialize)]
struct JsonLine<'a> {
    ts: &'a str,
    client: IpAddr,
    method: &'a str,
    path: &'a str,
    proto: &'a str,
    status: u16,
    bytes: u64,
    duration_ms: f64,
    route: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    upstream: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    arm: Option<&'a str>,
    request_id: &'a str,
    cache: &'a str,
    outcome: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_agent: Option<&'a str>,
}

// === impl AccessLog ===

impl AccessLog {
    pub fn new(format: AccessLogFormat, slow: Option<Duration>, sink: LogSink) -> Self {
        let tx = match (format, sink) {
            (AccessLogFormat::Off, _) => None,
            (_, LogSink::Channel(tx)) => Some(tx),
            (_, LogSink::Stderr) => {
                let (tx, rx) = mpsc::sync_channel(QUEUE);
                std::thread::Builder::new()
                    .name("access-log".into())
                    .spawn(move || write_lines(rx))
                    .expect("spawning the access-log thread");
                Some(tx)
            }
        };
        AccessLog {
            format,
            slow,
            tx,
            dropped: AtomicU64::new(0),
        }
    }

    /// Whether lines are written (`access_log` is not `off`): what only a
    /// line shows (user agent, referer) is not collected otherwise.
    pub fn writes_lines(&self) -> bool {
        self.tx.is_some()
    }

    /// Records a finished request: the access-log line, and a WARN when slow.
    pub fn finish(&self, rec: &AccessRecord, bytes: u64, outcome: BodyOutcome) {
        // A clock reading of its own, not the pass's (clock.rs): a request
        // answered within one pass, a cache hit, would otherwise last 0 µs.
        let elapsed = rec.started.elapsed();
        crate::telemetry::request_finished(
            rec.route.as_deref(),
            &rec.method,
            rec.status,
            rec.cache,
            elapsed,
        );
        crate::telemetry::slowest::offer(crate::telemetry::slowest::Finished {
            method: &rec.method,
            route: rec.route.as_ref(),
            status: rec.status,
            took: elapsed,
            cache: rec.cache,
            upstream: rec.upstream.as_ref(),
            request_id: &rec.request_id,
            error: rec.error,
        });
        if self.slow.is_some_and(|slow| elapsed >= slow) {
            tracing::warn!(
                route = rec.route.as_deref().unwrap_or("-"),
                method = %rec.method,
                path = rec.target(),
                status = rec.status,
                duration_ms = elapsed.as_secs_f64() * 1e3,
                upstream = rec.upstream.as_deref().unwrap_or("-"),
                request_id = rec.request_id.to_str().unwrap_or("-"),
                "slow request"
            );
        }
        let Some(tx) = &self.tx else { return };
        let line = match self.format {
            AccessLogFormat::Json => json_line(rec, bytes, outcome, elapsed),
            AccessLogFormat::Combined => combined_line(rec, bytes, outcome, elapsed),
            AccessLogFormat::Off => return,
        };
        match tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed);
                if n.is_power_of_two() {
                    tracing::warn!(
                        dropped = n + 1,
                        "access log cannot keep up with requests; lines dropped"
                    );
                }
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

fn write_lines(rx: Receiver<String>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stderr());
    while let Ok(line) = rx.recv() {
        let _ = out.write_all(line.as_bytes());
        while let Ok(more) = rx.try_recv() {
            let _ = out.write_all(more.as_bytes());
        }
        let _ = out.flush();
    }
}

fn proto(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

fn json_line(rec: &AccessRecord, bytes: u64, outcome: BodyOutcome, elapsed: Duration) -> String {
    let ts = humantime::format_rfc3339_millis(rec.wall()).to_string();
    let line = JsonLine {
        ts: &ts,
        client: rec.client,
        method: rec.method.as_str(),
        path: rec.target(),
        proto: proto(rec.version),
        status: rec.status,
        bytes,
        duration_ms: (elapsed.as_secs_f64() * 1e6).round() / 1e3,
        route: rec.route.as_deref(),
        key: rec.key.as_deref(),
        upstream: rec.upstream.as_deref(),
        arm: rec.arm.as_deref(),
        request_id: rec.request_id.to_str().unwrap_or("-"),
        cache: rec.cache,
        outcome: outcome.as_str(),
        error: rec.error,
        user_agent: rec.user_agent.as_ref().and_then(|v| v.to_str().ok()),
    };
    let mut s = serde_json::to_string(&line).expect("log lines serialize");
    s.push('\n');
    s
}

/// Apache/nginx "combined", plus `key=value` fields for what it lacks.
fn combined_line(
    rec: &AccessRecord,
    bytes: u64,
    outcome: BodyOutcome,
    elapsed: Duration,
) -> String {
    let quoted = |v: Option<&HeaderValue>| -> String {
        v.and_then(|v| v.to_str().ok()).map_or_else(
            || "-".to_owned(),
            |s| s.replace('\\', "\\\\").replace('"', "\\\""),
        )
    };
    format!(
        "{} - {} [{}] \"{} {} {}\" {} {} \"{}\" \"{}\" rt={:.3} route={} upstream={} request_id={} cache={} outcome={}{}\n",
        rec.client,
        // The common log format's authenticated user: the key's name.
        rec.key.as_deref().unwrap_or("-"),
        clf_time(rec.wall()),
        rec.method,
        rec.target().replace('"', "%22"),
        proto(rec.version),
        rec.status,
        bytes,
        quoted(rec.referer.as_ref()),
        quoted(rec.user_agent.as_ref()),
        elapsed.as_secs_f64(),
        rec.route.as_deref().unwrap_or("-"),
        rec.upstream.as_deref().unwrap_or("-"),
        rec.request_id.to_str().unwrap_or("-"),
        rec.cache,
        outcome.as_str(),
        rec.arm
            .as_deref()
            .map_or_else(String::new, |a| format!(" arm={a}")),
    )
}

/// `21/Nov/2026:00:52:37 +0000`, the common log format's time.
fn clf_time(t: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    // "2026-11-21T00:52:37Z"
    let iso = humantime::format_rfc3339_seconds(t).to_string();
    let month = iso[5..7].parse::<usize>().unwrap_or(1).clamp(1, 12);
    format!(
        "{}/{}/{}:{} +0000",
        &iso[8..10],
        MONTHS[month - 1],
        &iso[0..4],
        &iso[11..19]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clf_time_format() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_222_357);
        assert_eq!(clf_time(t), "21/Nov/2026:00:52:37 +0000");
    }
}
