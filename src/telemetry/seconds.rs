//! Durations as Prometheus histograms with fixed buckets: recording one is
//! a bucket search and two relaxed atomic adds.
//!
//! Owns the two per-request histograms (`hyperion_request_duration_seconds`,
//! `hyperion_upstream_duration_seconds`) and their exposition text. Not the
//! `metrics` recorder's histograms: those keep every sample in a lock-free
//! list (crossbeam epochs) until upkeep folds them into buckets, ~450
//! instructions a sample, twice a request; this is ~40. Nothing else is
//! recorded here: counters and gauges stay with the recorder.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Bucket bounds (`le`), in seconds: a cache hit's tens of microseconds up
/// to a generation's minutes.
const BOUNDS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
    30.0, 120.0,
];

/// `BOUNDS` in nanoseconds, so a sample is placed without floating point.
const BOUNDS_NANOS: [u64; 16] = {
    let mut out = [0u64; 16];
    let mut i = 0;
    while i < BOUNDS.len() {
        out[i] = (BOUNDS[i] * 1e9) as u64;
        i += 1;
    }
    out
};

/// One histogram's counts, shared by every worker recording into it.
#[derive(Default)]
pub struct SecondsHistogram {
    /// Samples per bucket (not cumulative); the last is `+Inf`'s own.
    buckets: [AtomicU64; BOUNDS.len() + 1],
    sum_nanos: AtomicU64,
}

impl SecondsHistogram {
    pub fn record(&self, took: Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        // Prometheus buckets count samples <= their bound.
        let i = BOUNDS_NANOS.partition_point(|&b| b < nanos);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The exposition lines of this histogram: cumulative buckets, `_sum`,
    /// `_count`, with `labels` (already `name="value"` pairs).
    fn render(&self, name: &str, labels: &str, out: &mut String) {
        let mut seen = 0u64;
        for (i, bucket) in self.buckets.iter().enumerate() {
            seen += bucket.load(Ordering::Relaxed);
            let le = match BOUNDS.get(i) {
                Some(b) => b.to_string(),
                None => "+Inf".to_owned(),
            };
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {seen}");
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {seen}");
    }
}

/// Every histogram made so far, by metric name and label; one entry per
/// route or upstream, created once and kept (as the recorder keeps its
/// metrics), so a reload that keeps a name keeps its counts.
#[derive(Default)]
pub struct Registry {
    entries: Mutex<Vec<Entry>>,
}

struct Entry {
    name: &'static str,
    label: &'static str,
    value: String,
    histogram: Arc<SecondsHistogram>,
}

impl Registry {
    /// The histogram `name{label="value"}`, made on first use.
    pub fn get(
        &self,
        name: &'static str,
        label: &'static str,
        value: &str,
    ) -> Arc<SecondsHistogram> {
        let mut entries = self.entries.lock().expect("histogram registry lock");
        if let Some(e) = entries
            .iter()
            .find(|e| e.name == name && e.label == label && e.value == value)
        {
            return e.histogram.clone();
        }
        let histogram = Arc::new(SecondsHistogram::default());
        entries.push(Entry {
            name,
            label,
            value: value.to_owned(),
            histogram: histogram.clone(),
        });
        histogram
    }

    /// Appends every histogram to `out` in the Prometheus text format, one
    /// `# TYPE` line per metric name.
    pub fn render(&self, out: &mut String) {
        let entries = self.entries.lock().expect("histogram registry lock");
        let mut names: Vec<&str> = entries.iter().map(|e| e.name).collect();
        names.sort_unstable();
        names.dedup();
        for name in names {
            let _ = writeln!(out, "# TYPE {name} histogram");
            for e in entries.iter().filter(|e| e.name == name) {
                let labels = format!("{}=\"{}\"", e.label, escape(&e.value));
                e.histogram.render(name, &labels, out);
            }
            out.push('\n');
        }
    }
}

/// A label value as the text format wants it: `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_land_in_the_first_bucket_that_holds_them() {
        let h = SecondsHistogram::default();
        h.record(Duration::from_micros(100)); // on the bound: le="0.0001"
        h.record(Duration::from_micros(101));
        h.record(Duration::from_secs(121)); // past the last bound: +Inf only
        let mut out = String::new();
        h.render("t_seconds", "route=\"r\"", &mut out);
        assert!(
            out.contains("t_seconds_bucket{route=\"r\",le=\"0.0001\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("t_seconds_bucket{route=\"r\",le=\"0.00025\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("t_seconds_bucket{route=\"r\",le=\"120\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("t_seconds_bucket{route=\"r\",le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("t_seconds_count{route=\"r\"} 3\n"), "{out}");
        assert!(
            out.contains("t_seconds_sum{route=\"r\"} 121.000201\n"),
            "{out}"
        );
    }

    #[test]
    fn one_histogram_per_name_and_label_value() {
        let r = Registry::default();
        let a = r.get("a_seconds", "route", "x");
        r.get("a_seconds", "route", "x")
            .record(Duration::from_millis(1));
        r.get("a_seconds", "route", "y\"z");
        assert_eq!(a.buckets[3].load(Ordering::Relaxed), 1);
        let mut out = String::new();
        r.render(&mut out);
        assert_eq!(out.matches("# TYPE a_seconds histogram").count(), 1);
        assert!(out.contains("a_seconds_count{route=\"x\"} 1\n"), "{out}");
        assert!(
            out.contains("a_seconds_count{route=\"y\\\"z\"} 0\n"),
            "{out}"
        );
    }
}
