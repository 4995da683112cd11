//! What a request's metrics cost on the request path: counting it by
//! route, method, status and cache status, and timing it by route
//! (`telemetry::request_finished`, called once per request), with the
//! Prometheus recorder installed as the binary installs it.
//!
//! Run: `cargo bench --bench telemetry`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use http::Method;
use hyperion::telemetry;

fn bench(c: &mut Criterion) {
    telemetry::install().expect("no other recorder in the bench");
    let routes = ["generate", "ollama-meta", "app"];
    let mut i = 0usize;
    c.bench_function("request_finished", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            telemetry::request_finished(
                Some(black_box(routes[i % 3])),
                black_box(&Method::GET),
                black_box(200),
                black_box("HIT"),
                black_box(Duration::from_micros(40)),
            )
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
