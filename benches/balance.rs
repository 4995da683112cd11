//! What choosing a server costs, per strategy, in a 16-server pool with
//! requests in flight: the hot-path part of `UpstreamPool::admit` (the
//! balancer's pick over the shared server state).
//!
//! Run: `cargo bench --bench balance`. Target: under 200 ns median.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use hyperion::policy::Balance;
use hyperion::upstream::balance::{Balancer, PickFilter};
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

criterion_group!(benches, bench);
criterion_main!(benches);
