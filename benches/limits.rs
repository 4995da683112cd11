//! A limiter check on the request path, without the network: a route with
//! one request limiter keyed by client IP spending from a bucket (the miss
//! path), looking at it without spending (a cache hit), with 100,000 distinct
//! clients already tracked; and a limiter keyed by an API-key header.
//!
//! Run: `cargo bench --bench limits` (add `-- --quick` for a short run).
//! Target (issue 5): under 1 µs median per check.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use tokio::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use futures_util::FutureExt;
use http::{HeaderMap, HeaderValue};
use hyperion::limits::{Admission, Counting, Limits, Stage, Subject};
use hyperion::Policy;

const POLICY: &str = r#"
[upstreams.up]
servers = [{ url = "http://127.0.0.1:1" }]

[rate_limits.per_ip]
key = "client_ip"
rate = "1000000000/sec"
max_keys = 1000000

[rate_limits.per_key]
key = "header:authorization"
rate = "1000000000/sec"

[[route]]
name = "by_ip"
match = { path_prefix = "/ip/" }
upstream = "up"
rate_limit = ["per_ip"]

[[route]]
name = "by_key"
upstream = "up"
rate_limit = ["per_key"]
"#;

fn client(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i))
}

/// Client `i` of the `by_ip` route.
fn by_ip_client(i: u32, headers: &HeaderMap) -> Subject<'_> {
    Subject {
        client: client(i),
        headers,
        tenant: None,
        route: "by_ip",
        at: Instant::now(),
    }
}

fn bench(c: &mut Criterion) {
    let policy = Policy::parse("bench.toml", POLICY).expect("bench policy");
    let limits = Limits::new(&policy, None);
    let by_ip = limits.for_route(&policy.routes[0].rate_limits);
    let by_key = limits.for_route(&policy.routes[1].rate_limits);
    let none = HeaderMap::new();
    // 100,000 clients already have buckets.
    for i in 0..100_000 {
        let who = by_ip_client(i, &none);
        by_ip
            .admit(
                &who,
                Stage::Upstream,
                Counting::All,
                0,
                &mut Admission::default(),
            )
            .now_or_never()
            .expect("local limits decide at once")
            .unwrap();
    }

    let mut g = c.benchmark_group("limit_check");
    let mut i = 0u32;
    g.bench_function("spend/client_ip_100k_keys", |b| {
        b.iter(|| {
            i = (i + 7919) % 100_000;
            let who = by_ip_client(i, &none);
            let mut admission = Admission::default();
            by_ip
                .admit(
                    black_box(&who),
                    Stage::Upstream,
                    Counting::All,
                    0,
                    &mut admission,
                )
                .now_or_never()
                .expect("local limits decide at once")
                .unwrap();
            black_box(admission.headers)
        })
    });
    g.bench_function("peek/client_ip_100k_keys", |b| {
        b.iter(|| {
            i = (i + 7919) % 100_000;
            let who = by_ip_client(i, &none);
            let mut admission = Admission::default();
            by_ip.peek_rest(black_box(&who), &mut admission);
            black_box(admission.headers)
        })
    });
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_static("Bearer sk-0123456789abcdef0123456789abcdef"),
    );
    g.bench_function("spend/authorization_header", |b| {
        b.iter(|| {
            let who = Subject {
                client: client(1),
                headers: &headers,
                tenant: None,
                route: "by_key",
                at: Instant::now(),
            };
            let mut admission = Admission::default();
            by_key
                .admit(
                    black_box(&who),
                    Stage::Upstream,
                    Counting::All,
                    0,
                    &mut admission,
                )
                .now_or_never()
                .expect("local limits decide at once")
                .unwrap();
            black_box(admission.headers)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
