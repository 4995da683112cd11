//! What choosing a server costs, per strategy, in a 16-server pool with
//! requests in flight: the hot-path part of `UpstreamPool::admit` (the
//! balancer's pick over the shared server state).
//!
//! Also what model routing adds before the pick (reading `model` from a
//! chat request, finding its servers), and what keeping a request's head
//! for a retry costs (one `HeaderMap` clone of a forwarded request).
//!
//! And what `prefix_affinity` costs a request: reading its prompt's blocks
//! (per KB of prompt), and asking and updating the pool's index.
//!
//! Run: `cargo bench --bench balance`. Target: under 200 ns median.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use hyperion::policy::{Balance, Policy};
use hyperion::upstream::balance::{Balancer, PickFilter};
use hyperion::upstream::models::{requested_model, PoolModels};
use hyperion::upstream::server_state::ServerState;
use tokio::time::Instant;

fn bench(c: &mut Criterion) {
    let epoch = Instant::now();
    let servers: Vec<Arc<ServerState>> = (0..16)
        .map(|i| {
            let url = format!("http://10.0.0.{i}:11434");
            Arc::new(ServerState::new(url.into(), 1 + i % 3, epoch))
        })
        .collect();
    // A pool at work: some requests in flight, latencies measured.
    let now = Instant::now();
    let held: Vec<_> = servers
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            s.succeeded(std::time::Duration::from_millis(20 + 5 * i as u64), now);
            (0..i % 4).map(|_| s.begin()).collect::<Vec<_>>()
        })
        .collect();
    let mut g = c.benchmark_group("pick_16_servers");
    for (name, balance) in [
        ("round_robin", Balance::RoundRobin),
        ("least_inflight", Balance::LeastInflight),
        ("p2c_ewma", Balance::P2cEwma),
        ("consistent_hash", Balance::ConsistentHash),
    ] {
        let b = Balancer::new(balance, &servers);
        let mut key = 0u64;
        g.bench_function(name, |bench| {
            bench.iter(|| {
                key = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let filter = PickFilter {
                    hash: Some(key),
                    ..PickFilter::default()
                };
                black_box(b.pick(&servers, &filter, Instant::now()))
            })
        });
    }
    g.finish();
    drop(held);
}

fn model_routing(c: &mut Criterion) {
    let servers: Vec<String> = (0..16)
        .map(|i| {
            let models = match i % 3 {
                0 => r#""llama3.2", "phi3""#,
                1 => r#""qwen2.5:7b", "llama3.2""#,
                _ => r#""mistral""#,
            };
            format!(r#"{{ url = "http://10.0.0.{i}:11434", models = [{models}] }}"#)
        })
        .collect();
    let policy = Policy::parse(
        "bench.toml",
        &format!(
            "[upstreams.up]\nservers = [{}]\nmodel_routing = \"static\"\n[[route]]\nname = \"r\"\nupstream = \"up\"\n",
            servers.join(", ")
        ),
    )
    .unwrap();
    let models = PoolModels::new(&policy.upstreams[0], None);
    let body = br#"{"model":"llama3.2","stream":true,"messages":[{"role":"system","content":"You are a helpful assistant. Answer briefly and cite sources when you can."},{"role":"user","content":"Why is the sky blue? Explain Rayleigh scattering in two sentences, for a curious ten-year-old who likes experiments."}],"options":{"temperature":0.2,"num_predict":256,"num_ctx":4096},"keep_alive":"5m"}"#;
    let mut g = c.benchmark_group("model_routing");
    g.bench_function("read_model_from_chat_body", |b| {
        b.iter(|| black_box(requested_model(black_box(body))))
    });
    let model = requested_model(body).unwrap();
    g.bench_function("servers_for_model_16", |b| {
        b.iter(|| black_box(models.choose(Some(black_box(&model)))))
    });
    g.finish();
}

fn retry_replay(c: &mut Criterion) {
    // A request head as it leaves for the upstream.
    let mut head = http::HeaderMap::new();
    for (k, v) in [
        ("host", "127.0.0.1:11434"),
        ("user-agent", "python-httpx/0.27.0"),
        ("accept", "application/json"),
        ("content-type", "application/json"),
        (
            "authorization",
            "Bearer sk-0123456789abcdef0123456789abcdef",
        ),
        ("x-forwarded-for", "10.1.2.3"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-host", "ai.internal"),
        ("via", "1.1 hyperion"),
        ("x-request-id", "96e08335ba65148f7107a33f4f0f86de"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
    ] {
        head.insert(
            http::HeaderName::from_static(k),
            http::HeaderValue::from_static(v),
        );
    }
    c.bench_function("retry_replay_head_clone", |b| {
        b.iter(|| black_box(black_box(&head).clone()))
    });
}

fn prefix_affinity(c: &mut Criterion) {
    use hyperion::upstream::prefix::{PrefixIndex, PromptBlocks};
    let mut g = c.benchmark_group("prefix_affinity");
    // A chat body of about `kb` KB: a system prompt and a conversation.
    let body = |kb: usize| {
        let system = "You are a careful assistant for our support team. ".repeat(kb * 8);
        let turns = "What does the error in my last message mean? ".repeat(kb * 12);
        serde_json::to_vec(&serde_json::json!({
            "model": "llama3.2",
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": turns},
            ],
        }))
        .unwrap()
    };
    for kb in [1usize, 16, 128] {
        let b = body(kb);
        g.throughput(criterion::Throughput::Bytes(b.len() as u64));
        g.bench_function(format!("blocks_of_{}kb_chat", b.len() / 1024), |bench| {
            bench.iter(|| black_box(PromptBlocks::of(black_box(&b))))
        });
    }
    // A pool of 16 servers, each holding its cache's worth of prompts.
    let index = PrefixIndex::new(16, 100_000);
    let prompts: Vec<PromptBlocks> = (0..64)
        .map(|i| {
            let mut b = body(16);
            b.extend_from_slice(format!("{i}").as_bytes());
            let mut blocks = PromptBlocks::of(&body(16)).unwrap();
            blocks.0.iter_mut().skip(8).for_each(|x| *x ^= i as u64 + 1);
            blocks
        })
        .collect();
    for (i, p) in prompts.iter().enumerate() {
        index.record(p, i % 16);
    }
    let ask = &prompts[7];
    g.throughput(criterion::Throughput::Elements(1));
    g.bench_function(format!("affinity_16_servers_{}_blocks", ask.0.len()), |b| {
        b.iter(|| black_box(index.affinity(black_box(ask), u64::MAX)))
    });
    g.bench_function(format!("record_{}_blocks", ask.0.len()), |b| {
        b.iter(|| index.record(black_box(ask), 7))
    });
    g.finish();
}

criterion_group!(benches, bench, model_routing, retry_replay, prefix_affinity);
criterion_main!(benches);
