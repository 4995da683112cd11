//! Prefix affinity (`balance = "prefix_affinity"`): which server was
//! recently sent which prompt prefix, so that a conversation's next turn
//! goes where its history is likely still in the KV cache.
//!
//! Owns two things:
//! - [`PromptBlocks`]: a chat or completion request's prompt (OpenAI and
//!   Ollama bodies: `system`, `messages` with their text parts and images,
//!   `prompt`, `suffix`, `tools`) read in order as one byte stream, cut
//!   into fixed-size blocks, each named by a hash of everything up to and
//!   including it (as vLLM names its KV blocks). Two prompts share their
//!   first `k` block names when they share their first `k` blocks of text
//!   (and, but for a 64-bit collision, only then). The hash is XXH3, not a
//!   cryptographic one: a client who crafted a collision would only send
//!   its own request to another server. The maps the names index are keyed
//!   at random per process, so crafted names cannot pile into one bucket.
//! - [`PrefixIndex`]: per pool, per server, the block names sent there
//!   recently, aged out as the server's own cache would evict them: each
//!   server holds at most `prefix_cache_tokens` worth of blocks, least
//!   recently used first out. A server taken out of rotation (ejected,
//!   unhealthy) is forgotten whole: it may come back with an empty cache.
//!
//! Does not choose the server (`balance` does, with what this says) nor
//! read the body (the handler hands it over).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::Value;

/// Bytes of prompt text per block: small enough that a conversation's
/// growth is seen turn by turn, large enough that a long prompt makes a
/// few hundred names, not thousands.
pub const BLOCK_BYTES: usize = 256;

/// A prompt's block names, in order; at most `MAX_BLOCKS` (a 4 MB prompt).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PromptBlocks(pub Vec<u64>);

const MAX_BLOCKS: usize = 16_384;

impl PromptBlocks {
    /// The blocks of a JSON request body; `None` when it is not JSON or
    /// carries no prompt.
    pub fn of(body: &[u8]) -> Option<PromptBlocks> {
        // Typed and borrowing: the prompt's text is hashed where it lies
        // in the body (unless it has escapes), not copied into a tree.
        let b: Body<'_> = serde_json::from_slice(body).ok()?;
        let mut cut = Cutter::default();
        // The order engines lay a prompt out in: system, tools, then the
        // conversation. A field's name goes in before its text, so moving
        // text between fields changes the names.
        if let Some(s) = &b.system {
            cut.part(b"system", s.as_bytes());
        }
        if let Some(tools) = b.tools.as_ref().filter(|t| !t.is_null()) {
            cut.part(b"tools", tools.to_string().as_bytes());
        }
        for m in b.messages.iter().flatten() {
            m.cut(&mut cut);
        }
        for (field, value) in [(&b"prompt"[..], &b.prompt), (b"suffix", &b.suffix)] {
            match value {
                Some(Text::Str(s)) => cut.part(field, s.as_bytes()),
                // OpenAI's completions take a list of prompts (or tokens).
                Some(Text::Other(v)) if !v.is_null() => cut.part(field, v.to_string().as_bytes()),
                _ => {}
            }
        }
        for i in b.images.iter().flatten() {
            cut.part(b"image", i.as_bytes());
        }
        let blocks = cut.finish();
        (!blocks.0.is_empty()).then_some(blocks)
    }

    /// The first block's name: what `prefix_affinity` places an unknown
    /// prompt by, so prompts opening alike (a tenant's system prompt) land
    /// together.
    pub fn first(&self) -> Option<u64> {
        self.0.first().copied()
    }
}

/// What of a chat or completion body makes its prompt; the rest is
/// skipped unread.
#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow, default)]
    system: Option<Cow<'a, str>>,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(borrow, default)]
    messages: Option<Vec<Message<'a>>>,
    #[serde(borrow, default)]
    prompt: Option<Text<'a>>,
    #[serde(borrow, default)]
    suffix: Option<Text<'a>>,
    #[serde(borrow, default)]
    images: Option<Vec<Cow<'a, str>>>,
}

/// One message: its role, its text (a string, or the text parts of a
/// list), its images (Ollama's base64 list, OpenAI's `image_url` parts),
/// its tool calls.
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<Text<'a>>,
    #[serde(borrow, default)]
    images: Option<Vec<Cow<'a, str>>>,
    #[serde(default)]
    tool_calls: Option<Value>,
}

impl Message<'_> {
    fn cut(&self, cut: &mut Cutter) {
        cut.part(b"role", self.role.as_deref().unwrap_or("").as_bytes());
        match &self.content {
            Some(Text::Str(s)) => cut.part(b"content", s.as_bytes()),
            Some(Text::Other(Value::Array(parts))) => {
                for p in parts {
                    if let Some(t) = p.get("text").and_then(Value::as_str) {
                        cut.part(b"text", t.as_bytes());
                    } else if let Some(url) = p
                        .get("image_url")
                        .and_then(|u| u.get("url").or(Some(u)))
                        .and_then(Value::as_str)
                    {
                        cut.part(b"image", url.as_bytes());
                    } else {
                        cut.part(b"part", p.to_string().as_bytes());
                    }
                }
            }
            _ => {}
        }
        for i in self.images.iter().flatten() {
            cut.part(b"image", i.as_bytes());
        }
        if let Some(calls) = self.tool_calls.as_ref().filter(|c| !c.is_null()) {
            cut.part(b"tool_calls", calls.to_string().as_bytes());
        }
    }
}

/// A field that is text most of the time: borrowed then; anything else
/// (a list of parts, of prompts) as a tree.
enum Text<'a> {
    Str(Cow<'a, str>),
    Other(Value),
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Text<'a>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("text, or any JSON value")
            }

            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Text<'a>, E> {
                Ok(Text::Str(Cow::Borrowed(s)))
            }

            fn visit_str<E>(self, s: &str) -> Result<Text<'a>, E> {
                Ok(Text::Str(Cow::Owned(s.to_owned())))
            }

            fn visit_string<E>(self, s: String) -> Result<Text<'a>, E> {
                Ok(Text::Str(Cow::Owned(s)))
            }

            fn visit_unit<E>(self) -> Result<Text<'a>, E> {
                Ok(Text::Other(Value::Null))
            }

            fn visit_bool<E>(self, b: bool) -> Result<Text<'a>, E> {
                Ok(Text::Other(Value::Bool(b)))
            }

            fn visit_i64<E>(self, n: i64) -> Result<Text<'a>, E> {
                Ok(Text::Other(n.into()))
            }

            fn visit_u64<E>(self, n: u64) -> Result<Text<'a>, E> {
                Ok(Text::Other(n.into()))
            }

            fn visit_f64<E>(self, n: f64) -> Result<Text<'a>, E> {
                Ok(Text::Other(n.into()))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Text<'a>, A::Error> {
                let v = Value::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?;
                Ok(Text::Other(v))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Text<'a>, A::Error> {
                let v = Value::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(Text::Other(v))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// Cuts a stream of parts into blocks and names each by the hash of the
/// whole stream up to its end.
#[derive(Default)]
struct Cutter {
    hasher: xxhash_rust::xxh3::Xxh3Default,
    /// Bytes of the current block so far.
    filled: usize,
    blocks: PromptBlocks,
}

impl Cutter {
    /// A labelled part: its label and length first, so parts cannot run
    /// into each other ambiguously.
    fn part(&mut self, label: &[u8], bytes: &[u8]) {
        self.feed(label);
        self.feed(&[0]);
        self.feed(&(bytes.len() as u64).to_le_bytes());
        self.feed(bytes);
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && self.blocks.0.len() < MAX_BLOCKS {
            let take = (BLOCK_BYTES - self.filled).min(bytes.len());
            self.hasher.update(&bytes[..take]);
            self.filled += take;
            bytes = &bytes[take..];
            if self.filled == BLOCK_BYTES {
                self.blocks.0.push(self.hasher.digest());
                self.filled = 0;
            }
        }
    }

    /// The names of the whole blocks (a partial last block is not named:
    /// the next turn's prompt will not end there).
    fn finish(self) -> PromptBlocks {
        self.blocks
    }
}

/// Block names → `V`, hashed again with a per-process random key.
type NameMap<V> = HashMap<u64, V, foldhash::fast::RandomState>;

/// One server's recent blocks, least recently used first out.
#[derive(Default)]
struct Held {
    /// Blocks it holds at most: the pool's `prefix_cache_tokens`, or the
    /// KV-cache size its engine reports.
    capacity: usize,
    /// Of the blocks sent to it, those it was predicted to hold: Hyperion's
    /// prefix hit ratio, to set beside the engine's own.
    predicted_hits: u64,
    sent: u64,
    /// Block name → when last sent (a counter).
    at: NameMap<u64>,
    /// (name, when) in sending order; entries whose `when` is older than
    /// `at`'s are stale and skipped.
    order: VecDeque<(u64, u64)>,
}

/// One server's part of the index, as operators see it.
pub struct HeldReport {
    pub blocks: usize,
    pub capacity_blocks: usize,
    /// Of the blocks sent there, the share it was predicted to hold.
    pub predicted_hit_ratio: Option<f64>,
}

/// The blocks a cache of `tokens` tokens holds (a token taken as 4 bytes).
fn blocks_for(tokens: u64) -> usize {
    let blocks = (tokens.saturating_mul(4) / BLOCK_BYTES as u64).clamp(1, 1 << 22);
    usize::try_from(blocks).unwrap_or(usize::MAX)
}

impl Held {
    /// Forgets every block, keeping the capacity and the counters.
    fn forget(&mut self) {
        self.at = NameMap::default();
        self.order = VecDeque::new();
    }

    fn new(capacity: usize) -> Held {
        Held {
            capacity,
            ..Held::default()
        }
    }

    fn touch(&mut self, name: u64, now: u64) {
        self.at.insert(name, now);
        self.order.push_back((name, now));
        self.trim();
    }

    /// Gives up the least recently used blocks beyond the capacity.
    fn trim(&mut self) {
        let capacity = self.capacity;
        while self.at.len() > capacity {
            let Some((old, when)) = self.order.pop_front() else {
                break;
            };
            if self.at.get(&old) == Some(&when) {
                self.at.remove(&old);
            }
        }
        // Stale entries are dropped from the front as they come; a queue
        // much longer than the set is rebuilt.
        if self.order.len() > 2 * capacity.max(64) {
            let mut live: Vec<(u64, u64)> = self.at.iter().map(|(&n, &w)| (n, w)).collect();
            live.sort_unstable_by_key(|&(_, w)| w);
            self.order = live.into();
        }
    }

    /// How many of `blocks`' first names are held: the held ones form a
    /// prefix (`record` touches a prompt's blocks last first, so an earlier
    /// block is never older than a later one), found by binary search.
    fn depth(&self, blocks: &[u64]) -> usize {
        if self.at.is_empty() || blocks.is_empty() || !self.at.contains_key(&blocks[0]) {
            return 0;
        }
        let (mut lo, mut hi) = (1, blocks.len());
        // Invariant: blocks[..lo] held; blocks[hi..] not known to be.
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if self.at.contains_key(&blocks[mid - 1]) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }
}

/// Where a prompt's longest known prefix is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Affinity {
    /// The servers holding the longest known prefix (bit set).
    pub best: u64,
    /// The servers holding the next longest (bit set): where a request
    /// goes when the best are over their load bound.
    pub next: u64,
    /// Blocks of the prompt known at `best`.
    pub depth: u32,
    /// The servers in rotation with the most room: holding no more than
    /// an eighth of a cache over the emptiest. A prompt known nowhere goes
    /// to one of them, so new system prompts spread over the fleet's
    /// caches instead of two landing on one server by chance.
    pub room: u64,
}

/// The pool's index.
pub struct PrefixIndex {
    servers: Mutex<Vec<Held>>,
    /// Blocks a server holds at most unless its engine says otherwise.
    capacity: usize,
    counter: AtomicU64,
    /// Requests sent where their prefix was (`prefix`), elsewhere because
    /// those servers were over their bound (`load`), or placed by their
    /// first block (`placed`): for `/admin/upstreams` and `/metrics`.
    pub routed: [AtomicU64; 3],
}

/// Indices into `PrefixIndex::routed`.
pub const ROUTED_BY_PREFIX: usize = 0;
pub const FELL_BACK_FOR_LOAD: usize = 1;
pub const PLACED: usize = 2;

impl PrefixIndex {
    /// For `servers` servers holding about `cache_tokens` tokens of prompt
    /// each (a token taken as 4 bytes of text).
    pub fn new(servers: usize, cache_tokens: u64) -> PrefixIndex {
        let capacity = blocks_for(cache_tokens);
        PrefixIndex {
            servers: Mutex::new((0..servers).map(|_| Held::new(capacity)).collect()),
            capacity,
            counter: AtomicU64::new(0),
            routed: Default::default(),
        }
    }

    /// Where `blocks` is known, among the servers of `in_rotation` (bit
    /// set: not ejected, not failing health checks); the others are
    /// forgotten.
    pub fn affinity(&self, blocks: &PromptBlocks, in_rotation: u64) -> Affinity {
        let mut held = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        let mut a = Affinity::default();
        let mut next_depth = 0u32;
        // How full each cache is, in 64ths (a server's engine may report a
        // size of its own, so fullness, not block counts, compares).
        let fill = |h: &Held| h.at.len() * 64 / h.capacity.max(1);
        let emptiest = held
            .iter()
            .enumerate()
            .filter(|(i, _)| in_rotation & (1 << i) != 0)
            .map(|(_, h)| fill(h))
            .min()
            .unwrap_or(0);
        for (i, h) in held.iter_mut().enumerate() {
            if in_rotation & (1 << i) == 0 {
                if !h.at.is_empty() {
                    h.forget();
                }
                continue;
            }
            if fill(h) <= emptiest + 8 {
                a.room |= 1 << i;
            }
            let d = u32::try_from(h.depth(&blocks.0)).unwrap_or(u32::MAX);
            if d == 0 {
                continue;
            }
            if d > a.depth {
                next_depth = a.depth;
                a.next = a.best;
                a.depth = d;
                a.best = 1 << i;
            } else if d == a.depth {
                a.best |= 1 << i;
            } else if d > next_depth {
                next_depth = d;
                a.next = 1 << i;
            } else if d == next_depth {
                a.next |= 1 << i;
            }
        }
        a
    }

    /// `blocks` were sent to server `index`.
    pub fn record(&self, blocks: &PromptBlocks, index: usize) {
        let n = blocks.0.len() as u64;
        let start = self.counter.fetch_add(n, Ordering::Relaxed);
        let mut held = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = held.get_mut(index) {
            h.predicted_hits += h.depth(&blocks.0) as u64;
            h.sent += n;
            // Last block first: a prompt's first blocks are its most
            // recently used, so the cache gives up a prompt from its end
            // (as vLLM evicts), and what a server holds of a prompt is
            // always a prefix of it.
            for (k, &name) in blocks.0.iter().rev().enumerate() {
                h.touch(name, start + k as u64);
            }
        }
    }

    /// Per server, for `/admin/upstreams` and `/metrics`.
    pub fn servers(&self) -> Vec<HeldReport> {
        let held = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        held.iter()
            .map(|h| HeldReport {
                blocks: h.at.len(),
                capacity_blocks: h.capacity,
                predicted_hit_ratio: (h.sent > 0).then(|| h.predicted_hits as f64 / h.sent as f64),
            })
            .collect()
    }

    /// Server `index`'s engine reports a KV cache of `tokens` (`None`: it
    /// stopped saying; the pool's `prefix_cache_tokens` stands again),
    /// taken within the bounds `prefix_cache_tokens` has: a server's
    /// metrics page sets no memory bound an operator could not.
    pub fn set_capacity(&self, index: usize, tokens: Option<u64>) {
        let capacity = tokens.map_or(self.capacity, |t| {
            blocks_for(t.clamp(
                crate::policy::MIN_PREFIX_CACHE_TOKENS,
                crate::policy::MAX_PREFIX_CACHE_TOKENS,
            ))
        });
        let mut held = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = held.get_mut(index) {
            if h.capacity != capacity {
                h.capacity = capacity;
                h.trim();
            }
        }
    }

    /// Every server back to the pool's `prefix_cache_tokens` (after a
    /// reload: its engines, if asked, say their sizes again).
    pub fn reset_capacities(&self) {
        let mut held = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        for h in held.iter_mut().filter(|h| h.capacity != self.capacity) {
            h.capacity = self.capacity;
            h.trim();
        }
    }

    /// Server `index` has lost what it cached (its engine unloaded the
    /// model, or restarted).
    pub fn forget(&self, index: usize) {
        let mut held = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = held.get_mut(index) {
            h.forget();
        }
    }

    pub fn count(&self, how: usize) {
        self.routed[how].fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(system: &str, turns: &[&str]) -> Vec<u8> {
        let mut messages = vec![serde_json::json!({"role": "system", "content": system})];
        for t in turns {
            messages.push(serde_json::json!({"role": "user", "content": t}));
        }
        serde_json::to_vec(&serde_json::json!({"model": "m", "messages": messages})).unwrap()
    }

    #[test]
    fn a_longer_conversation_extends_its_prefix() {
        let system = "be brief ".repeat(200);
        let one =
            PromptBlocks::of(&chat(&system, &["first question ".repeat(40).as_str()])).unwrap();
        let two = PromptBlocks::of(&chat(
            &system,
            &[
                "first question ".repeat(40).as_str(),
                "second question ".repeat(40).as_str(),
            ],
        ))
        .unwrap();
        assert!(two.0.len() > one.0.len());
        assert_eq!(&two.0[..one.0.len()], &one.0[..]);
        // Another system prompt shares nothing.
        let other = PromptBlocks::of(&chat(&"be verbose ".repeat(200), &["x"])).unwrap();
        assert_ne!(other.0[0], one.0[0]);
        // Same system prompt, another user: the system's blocks are shared.
        let third = PromptBlocks::of(&chat(&system, &["another user"])).unwrap();
        assert_eq!(third.0[..4], one.0[..4]);
    }

    #[test]
    fn prompts_of_every_shape_are_read() {
        for body in [
            r#"{"model":"m","prompt":"PROMPT"}"#,
            r#"{"model":"m","system":"S","prompt":"PROMPT","images":["aGVsbG8="]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"PROMPT"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"PROMPT","images":["AAAA"]}],"tools":[{"type":"function","function":{"name":"f"}}]}"#,
        ] {
            let long = body.replace("PROMPT", &"words ".repeat(100));
            assert!(PromptBlocks::of(long.as_bytes()).is_some(), "{body}");
        }
        assert!(PromptBlocks::of(b"not json").is_none());
        assert!(PromptBlocks::of(br#"{"model":"m"}"#).is_none());
        // A prompt shorter than a block names nothing.
        assert!(PromptBlocks::of(br#"{"prompt":"hi"}"#).is_none());
    }

    #[test]
    fn the_index_finds_the_longest_prefix_and_ages_out() {
        let idx = PrefixIndex::new(3, 10 * BLOCK_BYTES as u64 / 4); // 10 blocks each
        let a = PromptBlocks((1..=6).collect());
        let longer = PromptBlocks((1..=9).collect());
        idx.record(&a, 0);
        idx.record(&PromptBlocks(vec![1, 2]), 1);
        let got = idx.affinity(&longer, 0b111);
        assert_eq!((got.best, got.depth, got.next), (0b001, 6, 0b010));
        // Server 0 unusable: forgotten; server 1 is best now.
        assert_eq!(idx.affinity(&longer, 0b110).best, 0b010);
        assert_eq!(idx.affinity(&longer, 0b111).best, 0b010);
        // Capacity: 10 blocks; 20 other blocks push the old ones out.
        idx.record(&PromptBlocks((100..120).collect()), 1);
        assert_eq!(idx.affinity(&longer, 0b111).best, 0);
        let blocks = |idx: &PrefixIndex| idx.servers().iter().map(|h| h.blocks).collect::<Vec<_>>();
        assert_eq!(blocks(&idx), vec![0, 10, 0]);
    }

    #[test]
    fn an_engines_cache_size_and_loss_are_followed() {
        let tokens = |blocks: u64| blocks * BLOCK_BYTES as u64 / 4;
        let idx = PrefixIndex::new(2, tokens(100));
        let a = PromptBlocks((1..=30).collect());
        idx.record(&a, 0);
        // Sent again: all 30 predicted held; 60 sent in all.
        idx.record(&a, 0);
        let report = idx.servers();
        assert_eq!(report[0].predicted_hit_ratio, Some(0.5));
        assert_eq!(report[1].predicted_hit_ratio, None);
        // The engine says its cache is 20 blocks: it keeps the first 20.
        idx.set_capacity(0, Some(tokens(20)));
        assert_eq!(idx.servers()[0].capacity_blocks, 20);
        assert_eq!(idx.affinity(&a, 0b11).depth, 20);
        // Fuller caches take no new prompts while an emptier one has room.
        assert_eq!(idx.affinity(&PromptBlocks(vec![99]), 0b11).room, 0b10);
        // It stops saying: the pool's size stands again.
        idx.set_capacity(0, None);
        assert_eq!(idx.servers()[0].capacity_blocks, 100);
        // An engine's size is held to prefix_cache_tokens' bounds.
        idx.set_capacity(1, Some(u64::MAX));
        assert_eq!(
            idx.servers()[1].capacity_blocks,
            100_000_000 * 4 / BLOCK_BYTES
        );
        idx.set_capacity(1, Some(1));
        assert_eq!(idx.servers()[1].capacity_blocks, 1_000 * 4 / BLOCK_BYTES);
        // A reload puts every server back to the pool's size.
        idx.reset_capacities();
        assert_eq!(idx.servers()[1].capacity_blocks, 100);
        idx.forget(0);
        assert_eq!(idx.affinity(&a, 0b11).depth, 0);
        assert_eq!(idx.servers()[0].predicted_hit_ratio, Some(0.5));
    }
}
