//! Recording a response as it streams to the client, and storing it only if
//! it ended cleanly.
//!
//! The client gets every chunk as it arrives; the recorder keeps a reference
//! to each (no copy until the end). Past `max_entry_size` the recording is
//! dropped and the response simply streams on. At a clean end the chunks are
//! copied into one exact-size buffer (so the store's byte weight is what the
//! entry really holds) and inserted; an upstream error, a client leaving, or
//! a stream that did not end as its protocol says a good answer ends
//! (`stream_end`) store nothing.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::header;

use super::{Cache, CacheKey, Entry, StoredBody};

/// What will be stored once the body has been read to its end.
pub struct Recording {
    pub cache: Arc<Cache>,
    pub key: CacheKey,
    /// Everything but the body (which is filled in at the end).
    pub entry: Entry,
    /// Keep chunk boundaries, to replay a stream chunk by chunk.
    pub chunked: bool,
    /// When the request went upstream.
    pub started: std::time::Instant,
}

/// Collects a response body's chunks for a `Recording`.
pub struct Recorder {
    recording: Option<Recording>,
    chunks: Vec<Bytes>,
    size: usize,
    limit: usize,
}

impl Recorder {
    pub fn new(recording: Recording) -> Self {
        let limit = usize::try_from(recording.cache.policy.max_entry_size).unwrap_or(usize::MAX);
        Recorder {
            recording: Some(recording),
            chunks: Vec::new(),
            size: 0,
            limit,
        }
    }

    pub fn push(&mut self, chunk: &Bytes) {
        if self.recording.is_none() || chunk.is_empty() {
            return;
        }
        self.size += chunk.len();
        if self.size > self.limit {
            // Too big to store: stream on without keeping anything.
            self.recording = None;
            self.chunks = Vec::new();
            return;
        }
        self.chunks.push(chunk.clone());
    }

    /// Stores the recording if the body ended cleanly (`complete`).
    pub fn finish(&mut self, complete: bool) {
        let Some(rec) = self.recording.take() else {
            return;
        };
        if !complete {
            return;
        }
        let chunks = std::mem::take(&mut self.chunks);
        let cache = rec.cache.clone();
        let Some(entry) = rec.complete(&chunks, self.size) else {
            return;
        };
        // Inserting is async; the body's poll cannot wait for it.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { cache.insert(Arc::new(entry)).await });
        }
    }
}

impl Recording {
    /// The entry to store, from the chunks of a body that ended cleanly
    /// (`size` bytes in all); `None` when it must not be stored after all.
    pub fn complete<'a>(
        mut self,
        chunks: impl IntoIterator<Item = &'a Bytes>,
        size: usize,
    ) -> Option<Entry> {
        let mut whole = BytesMut::with_capacity(size);
        let mut bounds = Vec::new();
        for c in chunks {
            whole.extend_from_slice(c);
            bounds.push(whole.len());
        }
        let whole = whole.freeze();
        if self.chunked {
            let ct = self
                .entry
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !super::stream_end::ended_well(ct, &whole) {
                return None;
            }
        }
        self.entry.cost = super::Cost {
            tokens: tokens_used(&self.entry, &whole),
            upstream: self.started.elapsed(),
        };
        if !self.entry.headers.contains_key(header::ETAG) {
            // Clients can revalidate what Hyperion stored even when the
            // upstream (Ollama, most FastAPI apps) sends no validator.
            self.entry
                .headers
                .insert(header::ETAG, super::conditional::body_etag([&whole[..]]));
            self.entry.own_etag = true;
        }
        self.entry.body = if self.chunked {
            StoredBody::split(&whole, bounds)
        } else {
            self.entry
                .headers
                .insert(header::CONTENT_LENGTH, whole.len().into());
            StoredBody::Whole(whole)
        };
        Some(self.entry)
    }
}

/// Tokens an LLM answer says it processed: OpenAI's `usage.total_tokens`, or
/// Ollama's `prompt_eval_count + eval_count`; in a stream, from its last
/// event carrying them. 0 when the answer says nothing of the kind.
fn tokens_used(entry: &Entry, body: &[u8]) -> u64 {
    let ct = entry
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let last_json = |lines: &mut dyn Iterator<Item = &[u8]>| {
        lines.filter_map(Usage::read).find_map(|u| u.total())
    };
    let lines = || body.split(|&b| b == b'\n').rev();
    let found = if ct.starts_with("application/x-ndjson") {
        last_json(&mut lines())
    } else if ct.starts_with("text/event-stream") {
        last_json(&mut lines().filter_map(|l| {
            l.strip_prefix(b"data:")
                .map(|d| d.trim_ascii())
                .filter(|d| *d != b"[DONE]")
        }))
    } else if ct.contains("json") {
        Usage::read(body).and_then(|u| u.total())
    } else {
        None
    };
    found.unwrap_or(0)
}

/// The usage fields of one JSON answer or event, read without building the
/// rest of it (a stored answer may be megabytes): unknown members are
/// skipped, and a field of another type counts as absent.
#[derive(serde::Deserialize)]
struct Usage {
    #[serde(default, deserialize_with = "lenient_u64")]
    prompt_eval_count: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    eval_count: Option<u64>,
    #[serde(default)]
    usage: Option<OpenAiUsage>,
}

#[derive(serde::Deserialize)]
struct OpenAiUsage {
    #[serde(default, deserialize_with = "lenient_u64")]
    total_tokens: Option<u64>,
}

fn lenient_u64<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Option<u64>, D::Error> {
    Ok(match de.deserialize_any(ScalarVisitor)? {
        Scalar::Count(n) => Some(n),
        _ => None,
    })
}

/// A JSON value as far as usage needs it; containers are read
/// past without being kept.
enum Scalar {
    Count(u64),
    Other,
}

struct ScalarVisitor;

impl<'de> serde::de::Visitor<'de> for ScalarVisitor {
    type Value = Scalar;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_u64<E>(self, n: u64) -> Result<Scalar, E> {
        Ok(Scalar::Count(n))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Scalar, E> {
        Ok(Scalar::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Scalar, E> {
        Ok(Scalar::Other)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Scalar, E> {
        Ok(Scalar::Other)
    }
    fn visit_str<E>(self, _: &str) -> Result<Scalar, E> {
        Ok(Scalar::Other)
    }
    fn visit_unit<E>(self) -> Result<Scalar, E> {
        Ok(Scalar::Other)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Scalar, A::Error> {
        while map
            .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
            .is_some()
        {}
        Ok(Scalar::Other)
    }
}

impl<'de> serde::Deserialize<'de> for Scalar {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Scalar, D::Error> {
        de.deserialize_any(ScalarVisitor)
    }
}

impl Usage {
    /// The usage of one JSON object (serde would read a struct from an
    /// array too, by position).
    fn read(json: &[u8]) -> Option<Usage> {
        if json.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return None;
        }
        serde_json::from_slice(json).ok()
    }

    fn total(&self) -> Option<u64> {
        if let Some(total) = self.usage.as_ref().and_then(|u| u.total_tokens) {
            return Some(total);
        }
        match (self.prompt_eval_count, self.eval_count) {
            (None, None) => None,
            (p, a) => Some(p.unwrap_or(0) + a.unwrap_or(0)),
        }
    }
}
