//! Engine signals (`engine_signals`): each server of a pool asked every
//! `engine_poll_interval` how loaded it is by its inference engine's own
//! count, for servers shared with clients other than this proxy.
//!
//! - `vllm`, `sglang`: `GET /metrics` (Prometheus text). Requests running
//!   and waiting (vLLM's `vllm:num_requests_running`/`_waiting`, SGLang's
//!   `sglang:num_running_reqs`/`num_queue_reqs`), KV-cache use, the KV
//!   cache's size in tokens (vLLM's `vllm:cache_config_info` labels,
//!   SGLang's `sglang:max_total_num_tokens`) and the engine's prefix-cache
//!   hits (vLLM's hit and query counters, SGLang's hit-rate gauge). Every
//!   label set of a name is summed (one per engine core or model).
//! - `ollama`: `GET /api/ps`: the models loaded and their VRAM. Ollama
//!   reports no queue; a server that unloads a model has lost the prompts
//!   it cached, so `prefix_affinity` forgets them.
//!
//! What a reading feeds: the server's load (`ServerState::set_foreign`: the
//! requests waiting there beyond this proxy's own, standing for three
//! intervals or a poll's timeout and an interval, whichever is longer; requests running are not weighed, an engine batching them
//! takes a new one beside them), the
//! prefix index's size for that server, and the operators' view (this
//! module's `PoolEngines`). A server that stops answering, answers an
//! error, or answers something unreadable is judged by this proxy's counts
//! again at once; its last reading stays visible with the error.
//!
//! Bounds: one poll per server per interval, each bounded by a timeout
//! (the interval, between 1 and 5 s) and a 4 MiB body; the parse is one
//! pass over the text. This module does not choose servers (`balance`).

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use http::StatusCode;
use serde::Deserialize;

use super::conns::ServerConns;
use super::prefix::PrefixIndex;
use super::server_state::ServerState;
use crate::policy::{EngineSignals, UpstreamServer};

/// The largest metrics page or model list read from a server.
const MAX_BODY: usize = 4 << 20;
/// A reading stands for this many intervals (one poll missed is no news),
/// or a poll's whole time and an interval, whichever is longer.
const STANDS_FOR: u32 = 3;

/// What one poll of a server's engine said.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct EngineReading {
    /// Requests generating, and waiting for the engine to take them; `None`
    /// for an engine that does not say (Ollama).
    pub running: Option<u32>,
    pub waiting: Option<u32>,
    /// Share of the KV cache in use, 0 to 1.
    pub kv_cache_usage: Option<f64>,
    /// The KV cache's size, in tokens.
    pub kv_cache_tokens: Option<u64>,
    /// Prefix-cache counters (tokens; vLLM), or the engine's own hit rate
    /// (SGLang).
    #[serde(skip)]
    pub prefix_hits: Option<f64>,
    #[serde(skip)]
    pub prefix_queries: Option<f64>,
    #[serde(skip)]
    pub prefix_hit_rate: Option<f64>,
    /// Models loaded (Ollama), and the VRAM they take in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loaded: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vram_bytes: Option<u64>,
}

/// Reads an engine's Prometheus page. Unknown names, comments, and lines
/// that do not parse are skipped; a page without the engine's request
/// counts is not that engine's.
pub fn parse_metrics(kind: EngineSignals, text: &str) -> Result<EngineReading, String> {
    let names = match kind {
        EngineSignals::Sglang => Names {
            running: "sglang:num_running_reqs",
            waiting: "sglang:num_queue_reqs",
            usage: &["sglang:token_usage"],
            hits: &[],
            queries: &[],
            hit_rate: &["sglang:cache_hit_rate"],
        },
        _ => Names {
            running: "vllm:num_requests_running",
            waiting: "vllm:num_requests_waiting",
            // Renamed in vLLM 0.10; both are a share, "perc" or not.
            usage: &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
            hits: &["vllm:prefix_cache_hits_total", "vllm:prefix_cache_hits"],
            queries: &[
                "vllm:prefix_cache_queries_total",
                "vllm:prefix_cache_queries",
            ],
            hit_rate: &["vllm:gpu_prefix_cache_hit_rate"],
        },
    };
    let mut sums = Sums::default();
    let mut usage_count = 0u32;
    let mut rate_count = 0u32;
    for line in text.lines() {
        let Some(sample) = Sample::parse(line) else {
            continue;
        };
        let v = sample.value;
        let add = |slot: &mut Option<f64>| *slot = Some(slot.unwrap_or(0.0) + v);
        match sample.name {
            n if n == names.running => add(&mut sums.running),
            n if n == names.waiting => add(&mut sums.waiting),
            n if names.usage.contains(&n) => {
                add(&mut sums.usage);
                usage_count += 1;
            }
            n if names.hits.contains(&n) => add(&mut sums.hits),
            n if names.queries.contains(&n) => add(&mut sums.queries),
            n if names.hit_rate.contains(&n) => {
                add(&mut sums.hit_rate);
                rate_count += 1;
            }
            "vllm:cache_config_info" if kind == EngineSignals::Vllm => {
                let blocks = sample
                    .label("num_gpu_blocks")
                    .and_then(|b| b.parse::<u64>().ok());
                let size = sample
                    .label("block_size")
                    .and_then(|b| b.parse::<u64>().ok());
                if let (Some(blocks), Some(size)) = (blocks, size) {
                    let tokens = blocks.saturating_mul(size);
                    sums.tokens = Some(sums.tokens.unwrap_or(0).saturating_add(tokens));
                }
            }
            "sglang:max_total_num_tokens" if kind == EngineSignals::Sglang => {
                sums.tokens = Some(sums.tokens.unwrap_or(0).saturating_add(count(v)));
            }
            _ => {}
        }
    }
    let (Some(running), Some(waiting)) = (sums.running, sums.waiting) else {
        return Err(format!(
            "GET /metrics has no {} and {}: not a {} server, or its metrics are off",
            names.running,
            names.waiting,
            kind.as_str()
        ));
    };
    // A share is averaged over the label sets it came in.
    let mean = |sum: Option<f64>, n: u32| sum.map(|s| (s / f64::from(n.max(1))).clamp(0.0, 1.0));
    Ok(EngineReading {
        running: Some(clamp_u32(running)),
        waiting: Some(clamp_u32(waiting)),
        kv_cache_usage: mean(sums.usage, usage_count),
        kv_cache_tokens: sums.tokens.filter(|&t| t > 0),
        prefix_hits: sums.hits,
        prefix_queries: sums.queries,
        prefix_hit_rate: mean(sums.hit_rate, rate_count),
        loaded: None,
        vram_bytes: None,
    })
}

/// Reads Ollama's `/api/ps`.
pub fn parse_ollama_ps(body: &[u8]) -> Result<EngineReading, String> {
    #[derive(Deserialize)]
    struct Ps {
        models: Vec<Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        name: Option<String>,
        model: Option<String>,
        #[serde(default)]
        size_vram: u64,
    }
    let ps: Ps = serde_json::from_slice(body)
        .map_err(|_| "GET /api/ps answered something other than a model list".to_owned())?;
    let mut loaded: Vec<String> = ps
        .models
        .iter()
        .filter_map(|m| m.name.clone().or_else(|| m.model.clone()))
        .filter_map(|n| crate::policy::ModelName::parse(&n).map(|m| m.as_str().to_owned()))
        .collect();
    loaded.sort();
    loaded.dedup();
    Ok(EngineReading {
        vram_bytes: Some(
            ps.models
                .iter()
                .map(|m| m.size_vram)
                .fold(0, u64::saturating_add),
        ),
        loaded: Some(loaded),
        ..EngineReading::default()
    })
}

struct Names {
    running: &'static str,
    waiting: &'static str,
    usage: &'static [&'static str],
    hits: &'static [&'static str],
    queries: &'static [&'static str],
    hit_rate: &'static [&'static str],
}

#[derive(Default)]
struct Sums {
    running: Option<f64>,
    waiting: Option<f64>,
    usage: Option<f64>,
    hits: Option<f64>,
    queries: Option<f64>,
    hit_rate: Option<f64>,
    tokens: Option<u64>,
}

fn clamp_u32(v: f64) -> u32 {
    // NaN and negatives are 0; `as` saturates the rest.
    if v.is_finite() && v > 0.0 {
        v.round() as u32
    } else {
        0
    }
}

fn count(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 {
        v as u64
    } else {
        0
    }
}

/// One line of the Prometheus text format: `name{labels} value [time]`.
struct Sample<'a> {
    name: &'a str,
    /// Between the braces, unparsed.
    labels: &'a str,
    value: f64,
}

impl<'a> Sample<'a> {
    fn parse(line: &'a str) -> Option<Sample<'a>> {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let name_end = line.find(|c: char| c == '{' || c.is_ascii_whitespace())?;
        let (name, rest) = line.split_at(name_end);
        let (labels, rest) = match rest.strip_prefix('{') {
            Some(inner) => {
                let close = closing_brace(inner)?;
                (&inner[..close], &inner[close + 1..])
            }
            None => ("", rest),
        };
        let value = rest.split_ascii_whitespace().next()?;
        let value = match value {
            "+Inf" | "Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().ok()?,
        };
        Some(Sample {
            name,
            labels,
            value,
        })
    }

    /// The value of label `key` (escapes left as they are: the labels read
    /// here are numbers).
    fn label(&self, key: &str) -> Option<&'a str> {
        let mut rest = self.labels;
        loop {
            let rest_trimmed = rest.trim_start_matches([',', ' ']);
            let eq = rest_trimmed.find('=')?;
            let name = rest_trimmed[..eq].trim();
            let after = rest_trimmed[eq + 1..].trim_start().strip_prefix('"')?;
            let end = closing_quote(after)?;
            if name == key {
                return Some(&after[..end]);
            }
            rest = &after[end + 1..];
        }
    }
}

/// Where the label set opened before `s` closes: the first `}` outside a
/// quoted value.
fn closing_brace(s: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// The end of a quoted value that began before `s`.
fn closing_quote(s: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(i),
            _ => {}
        }
    }
    None
}

/// What operators see of one server's engine (`/admin/upstreams`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EngineSnapshot {
    /// The last good reading, and when it came.
    pub reading: Option<EngineReading>,
    pub read_at: Option<String>,
    /// Whether the balancers weigh it now (it is recent and the last poll
    /// worked).
    pub in_use: bool,
    /// Requests at the server beyond this proxy's, by the last reading.
    pub others: Option<u32>,
    /// Of those, the ones waiting for the engine: what the balancers add
    /// to this proxy's own count.
    pub others_waiting: Option<u32>,
    /// The engine's prefix-cache hit ratio since this proxy began asking.
    pub prefix_hit_ratio: Option<f64>,
    /// Why the last poll failed, when it did.
    pub error: Option<String>,
}

/// One pool's engine readings, for operators.
pub struct PoolEngines {
    kind: EngineSignals,
    servers: Box<[Mutex<ServerEngine>]>,
}

#[derive(Default)]
struct ServerEngine {
    snapshot: EngineSnapshot,
    /// The counters' last values, and what they have added up to since the
    /// first reading (a restart's reset counted from zero).
    last: Option<(f64, f64)>,
    hits: f64,
    queries: f64,
}

impl PoolEngines {
    pub fn new(kind: EngineSignals, servers: usize) -> Self {
        PoolEngines {
            kind,
            servers: (0..servers).map(|_| Mutex::default()).collect(),
        }
    }

    pub fn kind(&self) -> EngineSignals {
        self.kind
    }

    pub fn snapshot(&self, index: usize) -> Option<EngineSnapshot> {
        let s = self.servers.get(index)?;
        Some(s.lock().unwrap_or_else(|e| e.into_inner()).snapshot.clone())
    }

    fn read(&self, index: usize, url: &str, reading: EngineReading, others: Option<(u32, u32)>) {
        let Some(s) = self.servers.get(index) else {
            return;
        };
        let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(h), Some(q)) = (reading.prefix_hits, reading.prefix_queries) {
            if let Some((lh, lq)) = s.last {
                // Counters only grow; smaller means the engine restarted.
                s.hits += if h >= lh { h - lh } else { h };
                s.queries += if q >= lq { q - lq } else { q };
            }
            s.last = Some((h, q));
        }
        let ratio = if s.queries > 0.0 {
            Some((s.hits / s.queries).clamp(0.0, 1.0))
        } else {
            reading.prefix_hit_rate
        };
        if s.snapshot.error.take().is_some() {
            tracing::info!(server = url, "engine signals answer again");
        }
        s.snapshot = EngineSnapshot {
            read_at: Some(httpdate::fmt_http_date(crate::clock::wall())),
            reading: Some(reading),
            in_use: true,
            others: others.map(|(all, _)| all),
            others_waiting: others.map(|(_, waiting)| waiting),
            prefix_hit_ratio: ratio,
            error: None,
        };
    }

    fn failed(&self, index: usize, url: &str, why: String) {
        let Some(s) = self.servers.get(index) else {
            return;
        };
        let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
        if s.snapshot.error.is_none() {
            tracing::warn!(
                server = url,
                "engine signals failed, judging the server by this proxy's counts: {why}"
            );
        }
        s.snapshot.error = Some(why);
        s.snapshot.in_use = false;
    }
}

/// The polling of one server's engine.
pub struct EnginePoll {
    pub server: UpstreamServer,
    pub index: usize,
    pub state: Weak<ServerState>,
    /// This poller's token for writing the server's load.
    pub owner: u64,
    pub engines: Weak<PoolEngines>,
    pub prefix: Option<Weak<PrefixIndex>>,
    pub interval: Duration,
    pub connect_timeout: Duration,
}

impl EnginePoll {
    pub async fn run(self) {
        let conns = ServerConns::new(&self.server, self.connect_timeout);
        let timeout = self
            .interval
            .clamp(Duration::from_secs(1), Duration::from_secs(5));
        // Until the next reading is due at the latest: a slow answer (a
        // busy engine's) must not let the last one lapse.
        let stands = (self.interval * STANDS_FOR).max(timeout + self.interval);
        let Some(kind) = self.engines.upgrade().map(|e| e.kind()) else {
            return;
        };
        // What the last reading of Ollama said was loaded.
        let mut loaded_before: Option<Vec<String>> = None;
        tokio::time::sleep(self.interval.mul_f64(fastrand::f64() * 0.5)).await;
        loop {
            let mine_before = self.state.upgrade().map_or(0, |s| s.in_flight());
            let outcome = tokio::time::timeout(timeout, self.poll(kind, &conns))
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "no answer within {}",
                        humantime::format_duration(timeout)
                    ))
                });
            let (Some(state), Some(engines)) = (self.state.upgrade(), self.engines.upgrade())
            else {
                return;
            };
            let prefix = self.prefix.as_ref().and_then(Weak::upgrade);
            match outcome {
                Ok(reading) => {
                    let others = match (reading.running, reading.waiting) {
                        (Some(r), Some(w)) => {
                            // The engine counted this proxy's requests too:
                            // those in flight while it was asked.
                            let mine = mine_before.max(state.in_flight());
                            let others = r.saturating_add(w).saturating_sub(mine);
                            // Only the others' queue is weighed: a request
                            // running beside a new one (a continuous batch)
                            // delays it little, one queued ahead delays it
                            // a whole turn. Which of the waiting are the
                            // others' is not said: their share of all.
                            let all = r.saturating_add(w);
                            let waiting = if all == 0 {
                                0
                            } else {
                                (u64::from(w) * u64::from(others)).div_ceil(u64::from(all)) as u32
                            };
                            let until = crate::clock::now() + stands;
                            state.set_foreign_as(self.owner, waiting, Some(until));
                            Some((others, waiting))
                        }
                        _ => None,
                    };
                    if let Some(prefix) = &prefix {
                        // A failed poll keeps the size: a cache does not
                        // change size between polls, and shrinking would
                        // drop what is known.
                        if kind != EngineSignals::Ollama {
                            prefix.set_capacity(self.index, reading.kv_cache_tokens);
                        }
                        if let (Some(before), Some(now)) = (&loaded_before, &reading.loaded) {
                            if before.iter().any(|m| !now.contains(m)) {
                                // Unloading a model frees its KV cache.
                                prefix.forget(self.index);
                            }
                        }
                    }
                    if reading.loaded.is_some() {
                        loaded_before = reading.loaded.clone();
                    }
                    engines.read(self.index, &self.server.url, reading, others);
                }
                Err(why) => {
                    state.set_foreign_as(self.owner, 0, None);
                    engines.failed(self.index, &self.server.url, why);
                }
            }
            drop((state, engines, prefix));
            tokio::time::sleep(self.interval).await;
        }
    }

    async fn poll(
        &self,
        kind: EngineSignals,
        conns: &Arc<ServerConns>,
    ) -> Result<EngineReading, String> {
        let path = if kind == EngineSignals::Ollama {
            "/api/ps"
        } else {
            "/metrics"
        };
        let (status, body) = conns
            .get(&self.server, path, "hyperion-engine-signals", MAX_BODY)
            .await?;
        if status != StatusCode::OK {
            return Err(format!("GET {path} answered {}", status.as_u16()));
        }
        if kind == EngineSignals::Ollama {
            return parse_ollama_ps(&body);
        }
        let text =
            std::str::from_utf8(&body).map_err(|_| format!("GET {path} answered non-UTF-8"))?;
        parse_metrics(kind, text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VLLM: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen3-0.6B"} 3.0
vllm:num_requests_running{engine="1",model_name="Qwen/Qwen3-0.6B"} 2.0
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen3-0.6B"} 4.0
vllm:num_requests_waiting{engine="1",model_name="Qwen/Qwen3-0.6B"} 0.0
vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen3-0.6B"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="Qwen/Qwen3-0.6B"} 0.25
vllm:prefix_cache_queries_total{engine="0",model_name="Qwen/Qwen3-0.6B"} 1000.0
vllm:prefix_cache_hits_total{engine="0",model_name="Qwen/Qwen3-0.6B"} 600.0
vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",gpu_memory_utilization="0.9",num_gpu_blocks="2000",prefix_caching_hash_algo="a} \"b\""} 1.0
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 7.0
"#;

    #[test]
    fn vllm_pages_are_read_and_summed_over_label_sets() {
        let r = parse_metrics(EngineSignals::Vllm, VLLM).unwrap();
        assert_eq!((r.running, r.waiting), (Some(5), Some(4)));
        assert_eq!(r.kv_cache_usage, Some(0.375));
        assert_eq!(r.kv_cache_tokens, Some(32_000));
        assert_eq!(
            (r.prefix_hits, r.prefix_queries),
            (Some(600.0), Some(1000.0))
        );
        // The old names of vLLM before 0.10.
        let old = "vllm:num_requests_running 1\nvllm:num_requests_waiting 0\nvllm:gpu_cache_usage_perc 0.1 1700000000\n";
        let r = parse_metrics(EngineSignals::Vllm, old).unwrap();
        assert_eq!(
            (r.running, r.waiting, r.kv_cache_usage),
            (Some(1), Some(0), Some(0.1))
        );
        assert_eq!(r.kv_cache_tokens, None);
    }

    #[test]
    fn sglang_pages_are_read() {
        let page = "sglang:num_running_reqs{model_name=\"m\"} 7\nsglang:num_queue_reqs{model_name=\"m\"} 2\nsglang:token_usage{model_name=\"m\"} 0.28\nsglang:cache_hit_rate{model_name=\"m\"} 0.75\nsglang:max_total_num_tokens{name=\"m\"} 161721.0\n";
        let r = parse_metrics(EngineSignals::Sglang, page).unwrap();
        assert_eq!((r.running, r.waiting), (Some(7), Some(2)));
        assert_eq!(
            (r.kv_cache_usage, r.prefix_hit_rate),
            (Some(0.28), Some(0.75))
        );
        assert_eq!(r.kv_cache_tokens, Some(161_721));
    }

    #[test]
    fn pages_of_other_servers_and_odd_values_are_refused_or_bounded() {
        let e = parse_metrics(EngineSignals::Vllm, "go_goroutines 8\n").unwrap_err();
        assert!(e.contains("vllm:num_requests_running"), "{e}");
        assert!(parse_metrics(EngineSignals::Sglang, VLLM).is_err());
        let odd = "vllm:num_requests_running NaN\nvllm:num_requests_waiting -3\nvllm:kv_cache_usage_perc 7\n";
        let r = parse_metrics(EngineSignals::Vllm, odd).unwrap();
        assert_eq!(
            (r.running, r.waiting, r.kv_cache_usage),
            (Some(0), Some(0), Some(1.0))
        );
        let huge = "vllm:num_requests_running 1e30\nvllm:num_requests_waiting +Inf\n";
        let r = parse_metrics(EngineSignals::Vllm, huge).unwrap();
        assert_eq!((r.running, r.waiting), (Some(u32::MAX), Some(0)));
    }

    #[test]
    fn ollama_ps_lists_the_loaded_models() {
        let ps = br#"{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest","size_vram":1000},{"name":"Qwen3","size_vram":24}]}"#;
        let r = parse_ollama_ps(ps).unwrap();
        assert_eq!(
            r.loaded.as_deref(),
            Some(&["llama3.2:latest".to_owned(), "qwen3:latest".to_owned()][..])
        );
        assert_eq!((r.vram_bytes, r.running), (Some(1024), None));
        assert!(parse_ollama_ps(b"[]").is_err());
    }

    proptest! {
        // Whatever a server answers, the reader ends without panicking,
        // and anything it reports is within its bounds.
        #[test]
        fn any_page_is_read_safely(page in "(vllm:num_requests_(running|waiting)|sglang:[a-z_]+|#|[a-z{}\"=, \\\\.0-9+-]){0,40}( [-+0-9.eEInfa]{0,8})?(\n[ -~]{0,60}){0,8}") {
            for kind in [EngineSignals::Vllm, EngineSignals::Sglang] {
                if let Ok(r) = parse_metrics(kind, &page) {
                    prop_assert!(r.kv_cache_usage.is_none_or(|u| (0.0..=1.0).contains(&u)));
                }
            }
        }

        #[test]
        fn any_bytes_are_read_safely(page in proptest::collection::vec(any::<u8>(), 0..300)) {
            let text = String::from_utf8_lossy(&page);
            let _ = parse_metrics(EngineSignals::Vllm, &text);
            let _ = parse_ollama_ps(&page);
        }
    }
}
