//! Compression of a 16 KB JSON answer at the policy's default levels (gzip
//! 6, brotli 5) and their neighbours: throughput, and the ratio printed
//! once per level. Run: `cargo bench --bench compress`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hyperion::compress::{Coder, Coding};

/// An OpenAI-style chat answer of about 16 KB: JSON with natural-ish text.
fn answer() -> Vec<u8> {
    let words = [
        "the",
        "sky",
        "appears",
        "blue",
        "because",
        "molecules",
        "in",
        "air",
        "scatter",
        "shorter",
        "wavelengths",
        "of",
        "sunlight",
        "more",
        "strongly",
        "than",
        "longer",
        "ones",
        "which",
        "is",
        "called",
        "Rayleigh",
        "scattering",
        "at",
        "sunset",
        "light",
        "travels",
        "through",
        "atmosphere",
        "so",
        "reds",
        "and",
        "oranges",
        "dominate",
    ];
    let mut rng = fastrand::Rng::with_seed(7);
    let mut text = String::new();
    while text.len() < 15_500 {
        text.push_str(words[rng.usize(..words.len())]);
        text.push(if rng.u8(..12) == 0 { '.' } else { ' ' });
    }
    format!(
        r#"{{"id":"chatcmpl-7","object":"chat.completion","created":1732147200,"model":"llama3.2","choices":[{{"index":0,"message":{{"role":"assistant","content":"{text}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":42,"completion_tokens":3400,"total_tokens":3442}}}}"#
    )
    .into_bytes()
}

fn compress(c: &mut Criterion) {
    let body = answer();
    let mut group = c.benchmark_group("compress_16k_json");
    group.throughput(Throughput::Bytes(body.len() as u64));
    for (coding, level) in [
        (Coding::Gzip, 1),
        (Coding::Gzip, 6),
        (Coding::Gzip, 9),
        (Coding::Br, 4),
        (Coding::Br, 5),
        (Coding::Br, 6),
        (Coding::Br, 11),
    ] {
        let packed = Coder::whole(coding, level, &body).unwrap();
        println!(
            "{} level {level}: {} → {} bytes, ratio {:.2}",
            coding.as_str(),
            body.len(),
            packed.len(),
            body.len() as f64 / packed.len() as f64
        );
        group.bench_with_input(
            BenchmarkId::new(coding.as_str(), level),
            &level,
            |b, &level| b.iter(|| Coder::whole(coding, level, black_box(&body)).unwrap()),
        );
    }
    group.finish();
}

criterion_group!(benches, compress);
criterion_main!(benches);
