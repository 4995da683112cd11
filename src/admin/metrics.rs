//! `/metrics` at scrape time: the live state that counts itself anyway
//! (the cache's statistics, upstream servers, connection and body budgets,
//! reloads) copied into the recorder, then `telemetry`'s exposition text.
//!
//! Lives on the admin side because it reads the running generation;
//! `telemetry` owns the metric names counted as requests pass and imports
//! nothing above it.

use metrics::{counter, gauge};

use crate::generation::{Generation, Reloader};

/// The exposition text: the counted metrics, after copying in what is read
/// at scrape time.
pub async fn render(reloader: &Reloader) -> Option<String> {
    let generation = reloader.current();
    scrape_cache(&generation).await;
    scrape_upstreams(&generation);
    scrape_protect(&generation.protect);
    counter!("hyperion_reloads_total", "outcome" => "ok").absolute(
        reloader
            .succeeded
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    counter!("hyperion_reloads_total", "outcome" => "error")
        .absolute(reloader.failed.load(std::sync::atomic::Ordering::Relaxed));
    gauge!("hyperion_policy_generation").set(generation.number as f64);
    if let Some(traces) = &generation.traces {
        let (exported, dropped, failed) = traces.stats.get();
        for (outcome, n) in [
            ("exported", exported),
            ("dropped", dropped),
            ("failed", failed),
        ] {
            counter!("hyperion_trace_spans_total", "outcome" => outcome).absolute(n);
        }
    }
    crate::telemetry::exposition()
}

/// Connections, buffered bodies, and what was refused or cut for them.
fn scrape_protect(p: &crate::protect::Protect) {
    gauge!("hyperion_connections_open").set(p.connections.open_count() as f64);
    gauge!("hyperion_connection_addresses").set(p.connections.addresses() as f64);
    counter!("hyperion_connections_refused_total", "reason" => "max_connections_per_ip")
        .absolute(p.connections.refused_per_ip());
    counter!("hyperion_accept_paused_total").absolute(p.connections.accept_paused());
    gauge!("hyperion_buffered_body_bytes").set(p.bodies.held() as f64);
    gauge!("hyperion_buffered_body_max_bytes").set(p.bodies.limit() as f64);
    gauge!("hyperion_read_ahead_bytes").set(p.read_ahead.held() as f64);
    gauge!("hyperion_read_ahead_max_bytes").set(p.read_ahead.limit() as f64);
    counter!("hyperion_overloaded_total", "reason" => "max_buffered_bodies")
        .absolute(p.bodies.refused());
    for why in crate::protect::Deadline::ALL {
        counter!("hyperion_deadline_cuts_total", "deadline" => why.as_str())
            .absolute(p.cut.get(why));
    }
}

async fn scrape_cache(generation: &Generation) {
    let r = generation.cache.report().await;
    gauge!("hyperion_cache_entries").set(r.entries as f64);
    gauge!("hyperion_cache_bytes").set(r.bytes as f64);
    gauge!("hyperion_cache_max_bytes").set(r.max_bytes as f64);
    for (result, value) in [
        ("hit", r.hits),
        ("miss", r.misses),
        ("stale", r.stale),
        ("bypass", r.bypasses),
        ("revalidated", r.revalidated),
        ("coalesced", r.coalesced),
    ] {
        counter!("hyperion_cache_lookups_total", "result" => result).absolute(value);
    }
    counter!("hyperion_cache_stored_total").absolute(r.stored);
    counter!("hyperion_cache_tokens_saved_total").absolute(r.tokens_saved);
    // A float that only grows: exported as a gauge, since the facade's
    // counters are whole numbers.
    gauge!("hyperion_cache_upstream_saved_seconds").set(r.upstream_seconds_saved);
    gauge!("hyperion_cache_fills_in_flight").set(r.fills_in_flight as f64);
    if let Some(t) = r.shared {
        gauge!("hyperion_shared_tier_up").set(f64::from(u8::from(t.up)));
        for (result, value) in [("hit", t.hits), ("miss", t.misses)] {
            counter!("hyperion_shared_tier_lookups_total", "result" => result).absolute(value);
        }
        counter!("hyperion_shared_tier_writes_total").absolute(t.writes);
        counter!("hyperion_shared_tier_errors_total").absolute(t.errors);
        counter!("hyperion_shared_tier_outages_total").absolute(t.outages);
        for (result, value) in [
            ("served", t.fill_waits_served),
            (
                "not_served",
                t.fill_waits.saturating_sub(t.fill_waits_served),
            ),
        ] {
            counter!("hyperion_shared_tier_fill_waits_total", "result" => result).absolute(value);
        }
        counter!("hyperion_shared_tier_limit_checks_total").absolute(t.limit_checks);
        counter!("hyperion_shared_tier_purges_received_total").absolute(t.purges_received);
        counter!("hyperion_shared_tier_rejected_total", "what" => "value")
            .absolute(t.rejected_values);
        counter!("hyperion_shared_tier_rejected_total", "what" => "message")
            .absolute(t.rejected_messages);
    }
}

fn scrape_upstreams(generation: &Generation) {
    for pool in generation.fleet.pools() {
        let upstream = pool.policy.name.clone();
        if let Some(limit) = generation.limits.inflight(&upstream) {
            let (queued, tenants) = limit.line_length();
            gauge!("hyperion_upstream_queued", "upstream" => upstream.clone()).set(queued as f64);
            gauge!("hyperion_upstream_queued_tenants", "upstream" => upstream.clone())
                .set(tenants as f64);
        }
        if let Some(idx) = &pool.prefix {
            use crate::upstream::prefix::{FELL_BACK_FOR_LOAD, PLACED, ROUTED_BY_PREFIX};
            for (how, i) in [
                ("prefix", ROUTED_BY_PREFIX),
                ("load", FELL_BACK_FOR_LOAD),
                ("placed", PLACED),
            ] {
                counter!("hyperion_upstream_prefix_routed_total", "upstream" => upstream.clone(), "how" => how)
                    .absolute(idx.routed[i].load(std::sync::atomic::Ordering::Relaxed));
            }
            for (server, held) in pool.policy.servers.iter().zip(idx.servers()) {
                gauge!("hyperion_upstream_prefix_blocks", "upstream" => upstream.clone(), "server" => server.url.to_string())
                    .set(held.blocks as f64);
                if let Some(ratio) = held.predicted_hit_ratio {
                    gauge!("hyperion_upstream_prefix_hit_ratio", "upstream" => upstream.clone(), "server" => server.url.to_string(), "source" => "predicted")
                        .set(ratio);
                }
            }
        }
        if let Some(engines) = &pool.engines {
            for (i, server) in pool.policy.servers.iter().enumerate() {
                let Some(e) = engines.snapshot(i) else {
                    continue;
                };
                let labels = [
                    ("upstream", upstream.clone()),
                    ("server", server.url.to_string()),
                ];
                gauge!("hyperion_upstream_engine_up", &labels).set(f64::from(u8::from(e.in_use)));
                if let Some(ratio) = e.prefix_hit_ratio {
                    gauge!("hyperion_upstream_prefix_hit_ratio", "upstream" => upstream.clone(), "server" => server.url.to_string(), "source" => "engine")
                        .set(ratio);
                }
                let Some(r) = e.reading.filter(|_| e.in_use) else {
                    // No reading steers now: no figure stands for one.
                    for state in ["running", "waiting", "others", "others_waiting"] {
                        gauge!("hyperion_upstream_engine_requests", "upstream" => upstream.clone(), "server" => server.url.to_string(), "state" => state)
                            .set(f64::NAN);
                    }
                    gauge!("hyperion_upstream_engine_kv_cache_usage_ratio", &labels).set(f64::NAN);
                    continue;
                };
                for (state, n) in [
                    ("running", r.running),
                    ("waiting", r.waiting),
                    ("others", e.others),
                    ("others_waiting", e.others_waiting),
                ] {
                    if let Some(n) = n {
                        gauge!("hyperion_upstream_engine_requests", "upstream" => upstream.clone(), "server" => server.url.to_string(), "state" => state)
                            .set(f64::from(n));
                    }
                }
                if let Some(u) = r.kv_cache_usage {
                    gauge!("hyperion_upstream_engine_kv_cache_usage_ratio", &labels).set(u);
                }
            }
        }
        for server in pool.snapshot().into_iter().map(|v| v.state) {
            let labels = [
                ("upstream", upstream.clone()),
                ("server", server.url.clone()),
            ];
            gauge!("hyperion_upstream_healthy", &labels).set(f64::from(u8::from(server.healthy)));
            gauge!("hyperion_upstream_in_flight", &labels).set(f64::from(server.in_flight));
            gauge!("hyperion_upstream_latency_ewma_seconds", &labels).set(server.ewma_ms / 1e3);
            counter!("hyperion_upstream_requests_total", &labels).absolute(server.requests);
            counter!("hyperion_upstream_failures_total", &labels).absolute(server.failures);
        }
    }
}
