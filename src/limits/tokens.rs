//! LLM token counts: the estimate reserved before a request goes upstream,
//! and the real count read from the answer as it streams past.
//!
//! Requests: OpenAI's `max_tokens` / `max_completion_tokens`, Ollama's
//! `options.num_predict`. Answers: Ollama's `prompt_eval_count` +
//! `eval_count` (in its single JSON object, or the final NDJSON line), and
//! OpenAI's `usage` (`total_tokens`, else `prompt_tokens` +
//! `completion_tokens`) in its JSON or in the last SSE event when the client
//! asked for it (`stream_options.include_usage`).
//!
//! The meter never holds a whole streamed answer: it looks at one line at a
//! time (bounded), and keeps a non-streamed JSON body only up to 1 MiB. It
//! settles its limiters when it is dropped, so an answer cut short is
//! settled too, with what passed.

use bytes::Bytes;
use serde::Deserialize;

use super::TokenSpend;

/// Lines (and whole JSON bodies) longer than this are not read for usage.
const MAX_LINE: usize = 1 << 20;

/// What a token limiter reserves for a request: the answer's size it asks
/// for (or `default`), plus its prompt at about four bytes a token.
/// Returns (reservation, prompt estimate).
pub fn estimate(body: Option<&[u8]>, default: u64) -> (u64, u64) {
    let body = body.unwrap_or_default();
    let prompt = body.len() as u64 / 4;
    let answer = requested(body).unwrap_or(default);
    (answer.saturating_add(prompt), prompt)
}

/// The tokens a request may use, if it says: `max_tokens`,
/// `max_completion_tokens` or `options.num_predict` (Ollama's -1 and -2,
/// "until done" and "fill the context", say nothing).
pub fn requested(body: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Options {
        num_predict: Option<i64>,
    }
    #[derive(Deserialize)]
    struct Request {
        max_tokens: Option<i64>,
        max_completion_tokens: Option<i64>,
        options: Option<Options>,
    }
    let req: Request = serde_json::from_slice(body).ok()?;
    [
        req.max_tokens,
        req.max_completion_tokens,
        req.options.and_then(|o| o.num_predict),
    ]
    .into_iter()
    .flatten()
    .find(|&n| n > 0)
    .map(|n| n as u64)
}

/// Usage fields of one JSON object, in either dialect.
#[derive(Deserialize)]
struct Usage {
    prompt_eval_count: Option<u64>,
    eval_count: Option<u64>,
    usage: Option<OpenAiUsage>,
}

#[derive(Deserialize)]
struct OpenAiUsage {
    total_tokens: Option<u64>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

/// Tokens an answer used: read (the prompt) and generated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenCount {
    pub prompt: u64,
    pub completion: u64,
}

impl TokenCount {
    pub fn total(self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// Told what an answer used once its body has ended (or was cut): the
/// handler's per-key usage, implemented above this module.
pub trait TokenSink: Send {
    fn counted(self: Box<Self>, tokens: TokenCount);
}

impl Usage {
    fn count(&self) -> Option<TokenCount> {
        if let Some(u) = &self.usage {
            if u.prompt_tokens.is_some() || u.completion_tokens.is_some() {
                return Some(TokenCount {
                    prompt: u.prompt_tokens.unwrap_or(0),
                    completion: u.completion_tokens.unwrap_or(0),
                });
            }
            if let Some(t) = u.total_tokens {
                // A total alone: counted as generated.
                return Some(TokenCount {
                    prompt: 0,
                    completion: t,
                });
            }
        }
        if self.prompt_eval_count.is_some() || self.eval_count.is_some() {
            return Some(TokenCount {
                prompt: self.prompt_eval_count.unwrap_or(0),
                completion: self.eval_count.unwrap_or(0),
            });
        }
        None
    }
}

/// Reads token usage from an answer and settles the reservations with it.
pub struct TokenMeter {
    spends: Vec<TokenSpend>,
    /// A whole JSON body (not streamed): kept to be parsed at the end.
    whole: bool,
    /// The current line (streams) or the body so far (`whole`).
    buf: Vec<u8>,
    /// The line outgrew `MAX_LINE`: skip to its end.
    skipping: bool,
    /// The latest usage seen.
    usage: Option<TokenCount>,
    /// Stream events carrying something: about one token each, the count
    /// used when a stream ends before its usage.
    events: u64,
    /// A non-2xx answer without usage cost the backend next to nothing.
    success: bool,
    /// The prompt's estimated tokens, added to a count made from events.
    prompt: u64,
    /// Told the count at the end.
    sink: Option<Box<dyn TokenSink>>,
}

impl TokenMeter {
    /// Whether an answer of `content_type` can carry usage a meter reads:
    /// JSON (`application/json`, `…+json`), NDJSON, or an event stream.
    pub fn reads(content_type: Option<&[u8]>) -> bool {
        let Some(ct) = content_type else {
            return false;
        };
        let essence = ct.split(|&b| b == b';').next().unwrap_or(ct).trim_ascii();
        let lower = |s: &[u8]| essence.eq_ignore_ascii_case(s);
        lower(b"application/json")
            || lower(b"application/x-ndjson")
            || lower(b"application/ndjson")
            || lower(b"text/event-stream")
            || (essence.len() > 5 && essence[essence.len() - 5..].eq_ignore_ascii_case(b"+json"))
    }

    /// A meter for an answer of `content_type` with status `success`, to a
    /// prompt estimated at `prompt` tokens.
    pub fn new(
        spends: Vec<TokenSpend>,
        content_type: Option<&[u8]>,
        success: bool,
        prompt: u64,
    ) -> Self {
        let essence = content_type
            .map(|ct| ct.split(|&b| b == b';').next().unwrap_or(ct).trim_ascii())
            .unwrap_or_default();
        TokenMeter {
            spends,
            whole: essence.eq_ignore_ascii_case(b"application/json"),
            buf: Vec::new(),
            skipping: false,
            usage: None,
            events: 0,
            success,
            prompt,
            sink: None,
        }
    }

    /// Tells `sink` what the answer used when it ends.
    pub fn report_to(&mut self, sink: Box<dyn TokenSink>) {
        self.sink = Some(sink);
    }

    /// Looks at the next piece of the body.
    pub fn observe(&mut self, data: &Bytes) {
        if self.whole {
            if self.buf.len() + data.len() <= MAX_LINE {
                self.buf.extend_from_slice(data);
            } else {
                self.skipping = true;
            }
            return;
        }
        let mut rest: &[u8] = data;
        while let Some(nl) = memchr::memchr(b'\n', rest) {
            if !self.skipping {
                if self.buf.is_empty() {
                    self.line(&rest[..nl], true);
                } else if self.buf.len() + nl <= MAX_LINE {
                    self.buf.extend_from_slice(&rest[..nl]);
                    let line = std::mem::take(&mut self.buf);
                    self.line(&line, true);
                    self.buf = line;
                    self.buf.clear();
                } else {
                    self.buf.clear();
                }
            }
            self.skipping = false;
            rest = &rest[nl + 1..];
        }
        if !self.skipping {
            if self.buf.len() + rest.len() <= MAX_LINE {
                self.buf.extend_from_slice(rest);
            } else {
                self.buf.clear();
                self.skipping = true;
            }
        }
    }

    fn line(&mut self, line: &[u8], complete: bool) {
        let line = line.trim_ascii();
        // SSE: only `data:` fields carry JSON; `[DONE]` ends OpenAI streams.
        let json = match line.strip_prefix(b"data:") {
            Some(d) => d.trim_ascii_start(),
            None => line,
        };
        if json.is_empty() || json.starts_with(b":") || !json.starts_with(b"{") {
            return;
        }
        self.events += u64::from(complete);
        if let Some(count) = usage_of(json) {
            self.usage = Some(count);
        }
    }

    /// The tokens the answer used, as well as can be told.
    pub fn counted(&mut self) -> Option<TokenCount> {
        if self.whole {
            if !self.skipping {
                if let Some(count) = usage_of(&self.buf) {
                    return Some(count);
                }
            }
        } else if !self.skipping && !self.buf.is_empty() {
            // A last line without its newline: its usage counts, but it is
            // not an event (a cut stream ends in half of one).
            let last = std::mem::take(&mut self.buf);
            self.line(&last, false);
        }
        if self.usage.is_some() {
            return self.usage;
        }
        if !self.success {
            return Some(TokenCount::default());
        }
        // A stream without usage (OpenAI's default, or cut short): about a
        // token per event, and the prompt the backend read all the same.
        (!self.whole && self.events > 0).then_some(TokenCount {
            prompt: self.prompt,
            completion: self.events,
        })
    }
}

/// The usage in one JSON object, if it has any. Objects that cannot hold
/// usage are skipped without parsing.
fn usage_of(json: &[u8]) -> Option<TokenCount> {
    let has = |needle: &[u8]| json.windows(needle.len()).any(|w| w == needle);
    if !has(b"eval_count\"") && !has(b"\"usage\"") {
        return None;
    }
    serde_json::from_slice::<Usage>(json).ok()?.count()
}

impl Drop for TokenMeter {
    fn drop(&mut self) {
        // Nothing readable (an answer in another format, or cut before a
        // byte): the reservation stands.
        let Some(actual) = self.counted() else { return };
        for spend in &self.spends {
            spend.settle(actual.total());
        }
        if let Some(sink) = self.sink.take() {
            sink.counted(actual);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meter(ct: &str, success: bool) -> TokenMeter {
        TokenMeter::new(Vec::new(), Some(ct.as_bytes()), success, 0)
    }

    #[test]
    fn only_answers_that_can_carry_usage_are_read() {
        for ct in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/x-ndjson",
            "text/event-stream",
            "application/problem+json",
        ] {
            assert!(TokenMeter::reads(Some(ct.as_bytes())), "{ct}");
        }
        for ct in [
            "text/plain",
            "application/octet-stream",
            "image/png",
            "json",
        ] {
            assert!(!TokenMeter::reads(Some(ct.as_bytes())), "{ct}");
        }
        assert!(!TokenMeter::reads(None));
    }

    #[test]
    fn requested_tokens_from_either_dialect() {
        assert_eq!(requested(br#"{"model":"m","max_tokens":200}"#), Some(200));
        assert_eq!(requested(br#"{"max_completion_tokens":64}"#), Some(64));
        assert_eq!(
            requested(br#"{"prompt":"hi","options":{"num_predict":128,"temperature":0}}"#),
            Some(128)
        );
        assert_eq!(requested(br#"{"options":{"num_predict":-1}}"#), None);
        assert_eq!(requested(br#"{"prompt":"hi"}"#), None);
        assert_eq!(requested(b"not json"), None);
    }

    #[test]
    fn ollama_ndjson_counts_the_final_line_split_anywhere() {
        let mut m = meter("application/x-ndjson", true);
        let body = b"{\"response\":\"a\",\"done\":false}\n{\"response\":\"b\",\"done\":false}\n{\"done\":true,\"prompt_eval_count\":12,\"eval_count\":30}\n";
        for chunk in body.chunks(7) {
            m.observe(&Bytes::copy_from_slice(chunk));
        }
        assert_eq!(m.counted().map(TokenCount::total), Some(42));
        assert_eq!(m.counted().unwrap().completion, 30);
    }

    #[test]
    fn openai_json_and_sse_usage() {
        let mut m = meter("application/json; charset=utf-8", true);
        m.observe(&Bytes::from_static(
            b"{\"choices\":[{\"message\":{\"content\":\"hi\\nthere\"}}],\n \"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"total_tokens\":12}}",
        ));
        assert_eq!(
            m.counted(),
            Some(TokenCount {
                prompt: 5,
                completion: 7
            })
        );

        let mut m = meter("text/event-stream", true);
        m.observe(&Bytes::from_static(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"total_tokens\":9}}\n\ndata: [DONE]\n\n",
        ));
        assert_eq!(m.counted().map(TokenCount::total), Some(9));
    }

    #[test]
    fn a_stream_cut_before_its_usage_counts_its_events() {
        let mut m = meter("text/event-stream", true);
        m.observe(&Bytes::from_static(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\ndata: {\"cho",
        ));
        assert_eq!(m.counted().map(TokenCount::total), Some(2));
        // An error answer without usage costs nothing; an unreadable one
        // keeps the reservation.
        assert_eq!(
            meter("application/json", false).counted(),
            Some(TokenCount::default())
        );
        let mut m = meter("application/json", true);
        m.observe(&Bytes::from_static(b"{\"result\":1}"));
        assert_eq!(m.counted(), None);
    }
}
