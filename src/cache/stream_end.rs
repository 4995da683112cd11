//! Whether a recorded stream ended the way its protocol says a good answer
//! ends, so that only whole, successful generations are stored.
//!
//! A stream can end cleanly at the transport (the last chunk arrived, no
//! reset) and still be a failure: Ollama reports an error mid-generation
//! as an `{"error": …}` line with a 200 status already sent; an
//! OpenAI-compatible server (vLLM and the like) sends an event with an
//! `error` object, sometimes followed by `[DONE]`. Storing either would
//! replay the failure to everyone for a whole ttl. The rules:
//!
//! - NDJSON (Ollama): the last non-blank line is a JSON object with
//!   `"done": true`, and no line carries a top-level `error` member.
//! - SSE (OpenAI): the last data event is `[DONE]`, no event carries a
//!   top-level `error` member, and no event is named `error`.
//! - Anything else was not a stream protocol this module knows: the
//!   transport's clean end is all there is to go by.
//!
//! Reads bytes that came from the upstream: every parse is bounded by the
//! stored body (itself bounded by `max_entry_size`), and only lines that
//! mention `error` (and the last one) are parsed as JSON at all.

/// Whether the stored body of a stream with this `Content-Type` is a
/// finished, successful answer.
pub fn ended_well(content_type: &str, body: &[u8]) -> bool {
    let ct = content_type.trim_start().to_ascii_lowercase();
    if ct.starts_with("application/x-ndjson") {
        ndjson_ended_well(body)
    } else if ct.starts_with("text/event-stream") {
        sse_ended_well(body)
    } else {
        true
    }
}

fn ndjson_ended_well(body: &[u8]) -> bool {
    let mut last = None;
    for line in body.split(|&b| b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if mentions_error(line) && has_error_member(line) {
            return false;
        }
        last = Some(line);
    }
    let Some(last) = last else { return false };
    // An array would be read as a struct by position: objects only.
    if !is_object(last) {
        return false;
    }
    #[derive(serde::Deserialize)]
    struct Done {
        done: bool,
    }
    serde_json::from_slice::<Done>(last).is_ok_and(|d| d.done)
}

fn sse_ended_well(body: &[u8]) -> bool {
    let mut last_data: Option<Vec<u8>> = None;
    let mut data: Vec<u8> = Vec::new();
    let mut has_data = false;
    let mut named_error = false;
    // One event at a time: fields until a blank line (RFC-less, per the
    // WHATWG EventSource parsing rules: `data:` lines joined with `\n`,
    // one optional space after the colon).
    let mut end_event = |data: &mut Vec<u8>, has_data: &mut bool, named_error: &mut bool| {
        let bad = *named_error || (mentions_error(data) && has_error_member(data));
        if *has_data {
            last_data = Some(std::mem::take(data));
        }
        data.clear();
        *has_data = false;
        *named_error = false;
        !bad
    };
    for raw in body.split(|&b| b == b'\n') {
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line.is_empty() {
            if !end_event(&mut data, &mut has_data, &mut named_error) {
                return false;
            }
            continue;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(0) => continue, // a comment
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                if has_data {
                    data.push(b'\n');
                }
                data.extend_from_slice(value);
                has_data = true;
            }
            b"event" => named_error = value.trim_ascii() == b"error",
            _ => {}
        }
    }
    // An event without its final blank line still counts as sent.
    if !end_event(&mut data, &mut has_data, &mut named_error) {
        return false;
    }
    last_data.is_some_and(|d| d.trim_ascii() == b"[DONE]")
}

fn mentions_error(bytes: &[u8]) -> bool {
    bytes.windows(7).any(|w| w == b"\"error\"")
}

fn is_object(json: &[u8]) -> bool {
    json.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// Whether `json` is an object with a top-level `error` member that is not
/// null (vLLM and OpenAI send `"error": {…}`, Ollama `"error": "…"`).
fn has_error_member(json: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Failure {
        #[serde(default)]
        error: Option<serde_json::Value>,
    }
    is_object(json)
        && serde_json::from_slice::<Failure>(json)
            .is_ok_and(|f| f.error.is_some_and(|e| !e.is_null()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NDJSON: &str = "application/x-ndjson";
    const SSE: &str = "text/event-stream; charset=utf-8";

    #[test]
    fn ollama_streams_end_with_done_true_and_no_error() {
        let good = "{\"response\":\"a\",\"done\":false}\n{\"response\":\"\",\"done\":true,\"eval_count\":3}\n";
        assert!(ended_well(NDJSON, good.as_bytes()));
        let cut = "{\"response\":\"a\",\"done\":false}\n";
        assert!(!ended_well(NDJSON, cut.as_bytes()));
        let failed = "{\"response\":\"a\",\"done\":false}\n{\"error\":\"model runner has unexpectedly stopped\"}\n";
        assert!(!ended_well(NDJSON, failed.as_bytes()));
        let error_then_done = "{\"error\":\"x\"}\n{\"done\":true}\n";
        assert!(!ended_well(NDJSON, error_then_done.as_bytes()));
        assert!(!ended_well(NDJSON, b""));
        assert!(!ended_well(NDJSON, b"{\"done\":\"true\"}\n"));
        assert!(!ended_well(NDJSON, b"not json\n"));
        // A prompt that talks about errors is not an error.
        let about = "{\"response\":\"the \\\"error\\\" key\",\"done\":false}\n{\"done\":true,\"error\":null}\n";
        assert!(ended_well(NDJSON, about.as_bytes()));
    }

    #[test]
    fn openai_streams_end_with_done_and_no_error() {
        let good = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
        assert!(ended_well(SSE, good.as_bytes()));
        assert!(ended_well(SSE, good.replace("\n", "\r\n").as_bytes()));
        let cut = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
        assert!(!ended_well(SSE, cut.as_bytes()));
        let failed = "data: {\"choices\":[]}\n\ndata: {\"error\":{\"message\":\"out of memory\",\"code\":500}}\n\ndata: [DONE]\n\n";
        assert!(!ended_well(SSE, failed.as_bytes()));
        let named = "event: error\ndata: {\"message\":\"overloaded\"}\n\ndata: [DONE]\n\n";
        assert!(!ended_well(SSE, named.as_bytes()));
        let no_blank_line_at_end = "data: {\"choices\":[]}\n\ndata: [DONE]";
        assert!(ended_well(SSE, no_blank_line_at_end.as_bytes()));
        let comments = ": keep-alive\n\ndata: [DONE]\n\n";
        assert!(ended_well(SSE, comments.as_bytes()));
    }

    #[test]
    fn other_types_go_by_the_transport() {
        assert!(ended_well("application/json", b"{\"error\":\"x\"}"));
        assert!(ended_well("", b""));
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_judged_without_a_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = ended_well(NDJSON, &body);
            let _ = ended_well(SSE, &body);
        }
    }
}
