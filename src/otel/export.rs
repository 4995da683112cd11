//! The span queue between the request path and the exporter: finished
//! spans go in without waiting (`try_send`), dropped and counted when
//! `max_queue` are already waiting; one task looks at the queue every
//! 100 ms and sends it in batches of `batch_size` once a batch is full or
//! `export_interval` has passed, each export bounded by `export_timeout`.
//! So the queue empties at up to `max_queue` spans per 100 ms (20,000 a
//! second by default) while the collector keeps up.
//!
//! The SDK's own batch processors drop alike but do not say how many; an
//! operator needs the count (`hyperion_trace_spans_total{outcome}`) to
//! know a trace is missing spans because the collector is slow, not
//! because nothing happened.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use opentelemetry_sdk::Resource;
use tokio::sync::mpsc;

use crate::policy::TracingPolicy;

/// What became of the spans: read by `/metrics`.
#[derive(Debug, Default)]
pub struct ExportStats {
    /// Accepted by the collector.
    pub exported: AtomicU64,
    /// Dropped: the queue was full.
    pub dropped: AtomicU64,
    /// Sent, and refused or not answered in time.
    pub failed: AtomicU64,
}

impl ExportStats {
    pub fn get(&self) -> (u64, u64, u64) {
        (
            self.exported.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

static LAST_WARNED: std::sync::Mutex<Option<tokio::time::Instant>> = std::sync::Mutex::new(None);

enum Control {
    Resource(Resource),
    Flush(std::sync::mpsc::SyncSender<OTelSdkResult>),
    Shutdown,
}

/// The span processor: the queue's sending end.
#[derive(Debug)]
pub struct Queue {
    spans: mpsc::Sender<SpanData>,
    control: mpsc::UnboundedSender<ControlMsg>,
    stats: Arc<ExportStats>,
}

/// `Control`, with a `Debug` the processor's derive needs.
struct ControlMsg(Control);

impl std::fmt::Debug for ControlMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlMsg")
    }
}

struct Batching {
    size: usize,
    interval: Duration,
    timeout: Duration,
}

impl Queue {
    /// The processor, and the task that exports: it ends once the
    /// processor is shut down and what was queued is sent.
    pub fn start<E: SpanExporter + 'static>(
        exporter: E,
        policy: &TracingPolicy,
        stats: Arc<ExportStats>,
    ) -> (Queue, impl std::future::Future<Output = ()> + Send) {
        let (spans, rx) = mpsc::channel(policy.max_queue.max(1));
        let (control, control_rx) = mpsc::unbounded_channel();
        let batching = Batching {
            size: policy.batch_size.max(1),
            interval: policy.export_interval,
            timeout: policy.export_timeout,
        };
        let task = run(exporter, rx, control_rx, batching, stats.clone());
        (
            Queue {
                spans,
                control,
                stats,
            },
            task,
        )
    }
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.spans.try_send(span).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits (at most 5 s) for what is queued to be sent. Never called on
    /// the request path.
    fn force_flush(&self) -> OTelSdkResult {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.control
            .send(ControlMsg(Control::Flush(tx)))
            .map_err(|_| OTelSdkError::AlreadyShutdown)?;
        let wait = Duration::from_secs(5);
        rx.recv_timeout(wait)
            .map_err(|_| OTelSdkError::Timeout(wait))?
    }

    /// Asks the task to send what is queued and stop; does not wait (the
    /// provider calls this on drop too, perhaps on a runtime thread):
    /// `Traces::shutdown` awaits the task.
    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        self.control
            .send(ControlMsg(Control::Shutdown))
            .map_err(|_| OTelSdkError::AlreadyShutdown)
    }

    fn set_resource(&mut self, resource: &Resource) {
        let _ = self
            .control
            .send(ControlMsg(Control::Resource(resource.clone())));
    }
}

async fn run<E: SpanExporter>(
    mut exporter: E,
    mut spans: mpsc::Receiver<SpanData>,
    mut control: mpsc::UnboundedReceiver<ControlMsg>,
    batching: Batching,
    stats: Arc<ExportStats>,
) {
    // The queue is looked at on a timer, never awaited: a receiver waiting
    // on it would be woken (a thread unparked, through the kernel) for
    // every span, which costs the request path more than making the span.
    let mut tick = tokio::time::interval(batching.interval.min(LOOK_EVERY));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_export = tokio::time::Instant::now();
    let mut batch: Vec<SpanData> = Vec::with_capacity(batching.size);
    loop {
        tokio::select! {
            biased;
            c = control.recv() => match c.map(|c| c.0) {
                Some(Control::Resource(r)) => exporter.set_resource(&r),
                Some(Control::Flush(reply)) => {
                    let r = drain(&exporter, &mut spans, &mut batch, &batching, &stats).await;
                    let _ = reply.try_send(r);
                }
                Some(Control::Shutdown) | None => {
                    let _ = drain(&exporter, &mut spans, &mut batch, &batching, &stats).await;
                    let _ = exporter.shutdown();
                    return;
                }
            },
            _ = tick.tick() => {
                // A full batch goes at once; a partial one when the
                // interval is up.
                let due = last_export.elapsed() >= batching.interval;
                if spans.len() >= batching.size || (due && !spans.is_empty()) {
                    let _ = drain(&exporter, &mut spans, &mut batch, &batching, &stats).await;
                    last_export = tokio::time::Instant::now();
                }
                if spans.is_closed() && spans.is_empty() {
                    return;
                }
            }
        }
    }
}

/// How often the queue is looked at (or every `export_interval`, if
/// shorter).
const LOOK_EVERY: Duration = Duration::from_millis(100);

/// Sends what is queued now.
async fn drain<E: SpanExporter>(
    exporter: &E,
    spans: &mut mpsc::Receiver<SpanData>,
    batch: &mut Vec<SpanData>,
    batching: &Batching,
    stats: &ExportStats,
) -> OTelSdkResult {
    let mut result = Ok(());
    // At most a queue's worth: spans arriving as fast as they are sent
    // must not keep this loop from the control messages.
    let mut left = spans.max_capacity();
    while left > 0 {
        let Ok(span) = spans.try_recv() else { break };
        left -= 1;
        batch.push(span);
        if batch.len() >= batching.size {
            if let Err(e) = export(exporter, batch, batching, stats).await {
                result = Err(e);
            }
        }
    }
    if let Err(e) = export(exporter, batch, batching, stats).await {
        result = Err(e);
    }
    result
}

async fn export<E: SpanExporter>(
    exporter: &E,
    batch: &mut Vec<SpanData>,
    batching: &Batching,
    stats: &ExportStats,
) -> OTelSdkResult {
    if batch.is_empty() {
        return Ok(());
    }
    let spans = std::mem::take(batch);
    let n = spans.len() as u64;
    let result = match tokio::time::timeout(batching.timeout, exporter.export(spans)).await {
        Ok(r) => r,
        Err(_) => Err(OTelSdkError::Timeout(batching.timeout)),
    };
    match &result {
        Ok(()) => stats.exported.fetch_add(n, Ordering::Relaxed),
        Err(e) => {
            // Once a minute at most: a collector down for an hour is one
            // problem, not 1,800 lines.
            let now = tokio::time::Instant::now();
            let mut last = LAST_WARNED.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60)) {
                *last = Some(now);
                tracing::warn!("tracing: {n} spans not exported (counted in hyperion_trace_spans_total{{outcome=\"failed\"}}): {e}");
            }
            stats.failed.fetch_add(n, Ordering::Relaxed)
        }
    };
    result
}
