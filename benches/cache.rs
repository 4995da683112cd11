//! The cache's own costs, without the network: deriving a key from an AI
//! request (1 KB and 64 KB JSON bodies, canonical JSON), and store lookups
//! and inserts on one core.
//!
//! Run: `cargo bench --bench cache` (add `-- --quick` for a short run).
//! The seed application Hyperion replaces reported 2.74 M gets/s and 197 k
//! sets/s for its cache; compare with the `store/get_hit_*` and
//! `store/insert` figures (per core: this runs on one thread).

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{HeaderMap, Method, StatusCode};
use hyperion::cache::{Cache, CacheKey, Cost, DigestHash, Entry, KeyInput, StoredBody};
use hyperion::policy::{BodyKey, CachePolicy, CacheScope, Freshness, RouteCachePolicy};

/// Runs a future that never really waits (the store's async API completes
/// at once when uncontended) without a runtime's overhead in the figures.
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

fn route_policy() -> RouteCachePolicy {
    RouteCachePolicy {
        freshness: Freshness::Force {
            ttl: Duration::from_secs(1800),
        },
        body_key: BodyKey::Json,
        ignore_fields: vec![
            vec!["keep_alive".to_owned()].into_boxed_slice(),
            vec!["options".to_owned(), "num_thread".to_owned()].into_boxed_slice(),
        ],
        scope: CacheScope::credentials(&[]),
        record_streams: true,
        stale_while_revalidate: Duration::ZERO,
        stale_if_error: Duration::ZERO,
        honour_client: true,
        store_private: false,
        coalesce_timeout: Duration::from_secs(30),
        negative_ttl: Duration::from_secs(10),
        keys_accept_encoding: false,
    }
}

/// An Ollama chat request of about `size` bytes: a conversation of messages.
fn chat_body(size: usize) -> Bytes {
    let mut messages = Vec::new();
    let mut len = 0;
    let mut i = 0;
    while len < size {
        let content = format!("message {i}: {}", "why is the sky blue? ".repeat(3));
        len += content.len() + 40;
        messages.push(serde_json::json!({"role": if i % 2 == 0 {"user"} else {"assistant"}, "content": content}));
        i += 1;
    }
    let body = serde_json::json!({
        "model": "llama3.2",
        "messages": messages,
        "stream": false,
        "keep_alive": "5m",
        "options": {"temperature": 0.2, "num_thread": 8, "seed": 42}
    });
    Bytes::from(serde_json::to_vec(&body).unwrap())
}

fn key_derivation(c: &mut Criterion) {
    let policy = route_policy();
    let mut headers = HeaderMap::new();
    headers.insert(
        "authorization",
        "Bearer sk-test-0123456789".parse().unwrap(),
    );
    headers.insert("content-type", "application/json".parse().unwrap());
    let mut group = c.benchmark_group("key");
    for size in [1024, 64 * 1024] {
        let body = chat_body(size);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("json_body", format!("{}KB", size / 1024)),
            &body,
            |b, body| {
                b.iter(|| {
                    CacheKey::build(
                        &policy,
                        &KeyInput {
                            arm: None,
                            route: "generate",
                            method: &Method::POST,
                            host: "127.0.0.1",
                            path: "/api/chat",
                            query: None,
                            headers: &headers,
                            body: Some(black_box(&body[..])),
                            body_digest: None,
                            tenant: None,
                        },
                    )
                    .unwrap()
                })
            },
        );
    }
    let plain = HeaderMap::new();
    group.throughput(Throughput::Elements(1));
    let get_policy = RouteCachePolicy {
        body_key: BodyKey::None,
        ignore_fields: Vec::new(),
        scope: CacheScope::Shared,
        ..route_policy()
    };
    group.bench_function("get_request", |b| {
        b.iter(|| {
            CacheKey::build(
                &get_policy,
                &KeyInput {
                    arm: None,
                    route: "static",
                    method: &Method::GET,
                    host: "127.0.0.1",
                    path: black_box("/static/1k"),
                    query: Some("b=2&a=1"),
                    headers: &plain,
                    body: None,
                    body_digest: None,
                    tenant: None,
                },
            )
            .unwrap()
        })
    });
    group.finish();
}

fn entry(key: CacheKey, body: Bytes) -> Arc<Entry> {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", "application/json".parse().unwrap());
    headers.insert("content-length", body.len().into());
    Arc::new(Entry {
        status: StatusCode::OK,
        headers,
        body: StoredBody::Whole(body),
        stored_at: Instant::now(),
        initial_age: Duration::ZERO,
        fresh_for: Duration::from_secs(3600),
        stale_while_revalidate: Duration::ZERO,
        stale_if_error: Duration::ZERO,
        forbids_stale: false,
        vary: Vec::new(),
        route: "generate".into(),
        target: "127.0.0.1/api/chat".into(),
        cost: Cost::default(),
        own_etag: false,
        key,
        recodings: Default::default(),
    })
}

fn key(i: u64) -> CacheKey {
    CacheKey(*blake3::hash(&i.to_le_bytes()).as_bytes())
}

fn store(c: &mut Criterion) {
    const KEYS: u64 = 100_000;
    let cache = Cache::new(CachePolicy::default());
    let answer = Bytes::from(vec![b'x'; 1024]);
    for i in 0..KEYS {
        ready(cache.insert(entry(key(i), answer.clone())));
    }
    let keys: Vec<CacheKey> = (0..KEYS).map(key).collect();
    let no_headers = HeaderMap::new();
    let mut group = c.benchmark_group("store");
    group.throughput(Throughput::Elements(1));
    // Spread over all 100k entries (~120 MB: every lookup misses the CPU
    // caches), and over a hot set of 1,000 (the common case of a few popular
    // prompts and pages).
    for (name, span) in [("get_hit_100k", keys.len()), ("get_hit_hot_1k", 1000)] {
        let mut i = 0usize;
        group.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % span;
                ready(cache.lookup(black_box(&keys[i]), &no_headers)).expect("stored")
            })
        });
    }
    let mut n = KEYS;
    group.bench_function("insert", |b| {
        b.iter_batched(
            || {
                n += 1;
                entry(key(n), answer.clone())
            },
            |stored| ready(cache.insert(stored)),
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// The same gets from a bare moka store (same key, hasher and size, no
/// expiry): the floor the store's bookkeeping sets, for reading the figures
/// above.
fn moka_floor(c: &mut Criterion) {
    const KEYS: u64 = 100_000;
    let store: moka::future::Cache<CacheKey, Arc<Entry>, DigestHash> =
        moka::future::Cache::builder()
            .max_capacity(1 << 30)
            .weigher(|_, e: &Arc<Entry>| e.body.len() as u32 + 512)
            .build_with_hasher(DigestHash);
    let answer = Bytes::from(vec![b'x'; 1024]);
    for i in 0..KEYS {
        ready(store.insert(key(i), entry(key(i), answer.clone())));
    }
    let keys: Vec<CacheKey> = (0..KEYS).map(key).collect();
    let mut group = c.benchmark_group("moka_alone");
    group.throughput(Throughput::Elements(1));
    for (name, span) in [("get_hit_100k", keys.len()), ("get_hit_hot_1k", 1000)] {
        let mut i = 0usize;
        group.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % span;
                ready(store.get(black_box(&keys[i]))).expect("stored")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, key_derivation, store, moka_floor);
criterion_main!(benches);
