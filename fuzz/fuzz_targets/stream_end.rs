//! The stream recorder's end detection (Ollama NDJSON, OpenAI SSE): any
//! body is judged without a panic.
#![no_main]

use hyperion::cache::fuzzing::stream_ended_well;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let _ = stream_ended_well("application/x-ndjson", body);
    let _ = stream_ended_well("text/event-stream", body);
});
