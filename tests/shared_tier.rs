//! The shared tier with a real Redis and two Hyperion instances: a fill
//! through one is a hit through the other; a purge through one empties the
//! other; a rate limit holds across both; identical requests spread over
//! both reach the backend once; Redis dying costs no request, and its
//! return is taken up again.
//!
//! Each test starts its own `redis-server` (see `support::RedisServer`).

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use support::*;

/// Routes caching GETs (`pages`) and POST bodies by JSON (`r`), the rate
/// limit `fleet` when `extra` defines it, and the shared tier at `redis`.
fn policy(upstream: &str, redis: &str, prefix: &str, token: &TempFile, extra: &str) -> String {
    format!(
        r#"
[server]
listen = ["127.0.0.1:0"]

[admin]
token_file = "{token}"

[cache]
max_size = "16MB"

[cache.redis]
url = "{redis}"
key_prefix = "{prefix}"
timeout = "250ms"
secret_file = "{secret}"

[upstreams.up]
servers = [{{ url = "{upstream}" }}]

{extra}

[[route]]
name = "pages"
match = {{ methods = ["GET", "HEAD", "DELETE"] }}
upstream = "up"
{route_extra}

[route.cache]
mode = "force"
ttl = "5m"

[[route]]
name = "r"
upstream = "up"
{route_extra}

[route.cache]
mode = "force"
ttl = "5m"
body_key = "json"
coalesce_timeout = "10s"
"#,
        token = token.display(),
        secret = fleet_secret().display(),
        route_extra = if extra.is_empty() {
            ""
        } else {
            "rate_limit = [\"fleet\"]"
        },
    )
}

const TOKEN: &str = "shared-tier-test-token";

/// The fleet's secret, one file for the whole test binary (every instance
/// of a test's fleet must read the same one).
fn fleet_secret() -> &'static TempFile {
    static FILE: std::sync::OnceLock<TempFile> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        TempFile::new(
            "redis.secret",
            "shared-tier-tests-fleet-secret-0123456789\n",
        )
    })
}

/// An upstream that answers after `delay` with a numbered JSON answer.
async fn numbered(delay: Duration) -> Upstream {
    let n = Arc::new(AtomicUsize::new(0));
    Upstream::start(move |req| {
        let n = n.fetch_add(1, Ordering::SeqCst) + 1;
        let varies = req.uri().path().starts_with("/lang");
        async move {
            tokio::time::sleep(delay).await;
            let mut resp = Response::builder().header("content-type", "application/json");
            if varies {
                resp = resp.header("vary", "accept-language");
            }
            resp.body(full(format!(r#"{{"response":"answer {n}","done":true}}"#)))
                .unwrap()
        }
    })
    .await
}

fn post(url: &str, body: &str) -> Request<TestBody> {
    Request::post(url)
        .header("content-type", "application/json")
        .body(full(body.to_owned()))
        .unwrap()
}

const PROMPT: &str = r#"{"model":"llama3.2","prompt":"why is the sky blue?","stream":false}"#;

/// Two instances sharing `redis` under one prefix.
async fn fleet(
    upstream: &Upstream,
    redis: &RedisServer,
    extra: &str,
) -> (TestProxy, TestProxy, TempFile) {
    let token = TempFile::new("admin.token", TOKEN);
    let prefix = format!("test{:08x}:", fastrand::u32(..));
    let text = policy(&upstream.url(), &redis.url(), &prefix, &token, extra);
    let a = TestProxy::start(&text).await;
    let b = TestProxy::start(&text).await;
    shared_tier_up(&a, true).await;
    shared_tier_up(&b, true).await;
    (a, b, token)
}

/// The names of the cache entries in Redis (`<prefix>e:<key>`; the
/// prefixes end with `:`, so no index name matches).
async fn entry_names(conn: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    redis::cmd("KEYS")
        .arg("*:e:*")
        .query_async(conn)
        .await
        .unwrap()
}

async fn value_at(conn: &mut redis::aio::MultiplexedConnection, name: &str) -> Vec<u8> {
    redis::cmd("GET").arg(name).query_async(conn).await.unwrap()
}

/// Writes `value` under `name` as someone with access to Redis would.
async fn set_value(conn: &mut redis::aio::MultiplexedConnection, name: &str, value: &[u8]) {
    let _: () = redis::cmd("SET")
        .arg(name)
        .arg(value)
        .query_async(conn)
        .await
        .unwrap();
}

/// Waits until `proxy` has written `n` entries to Redis.
async fn written(proxy: &TestProxy, n: u64) {
    let tier = proxy.cache.shared_tier().unwrap();
    for _ in 0..300 {
        if tier.stats.writes.load(Ordering::Relaxed) >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no write to the shared tier");
}

async fn admin_post(proxy: &TestProxy, path: &str) -> serde_json::Value {
    let req = Request::post(format!("http://{}{path}", proxy.admin.unwrap()))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(empty())
        .unwrap();
    let (parts, body) = send(req).await;
    assert_eq!(parts.status, 200, "{}", String::from_utf8_lossy(&body));
    json(&body)
}

#[tokio::test]
async fn a_fill_through_one_instance_is_a_hit_through_the_other() {
    let redis = RedisServer::start().await;
    let up = numbered(Duration::ZERO).await;
    let (a, b, _t) = fleet(&up, &redis, "").await;

    let (parts, body) = send(post(&a.url("/api/generate"), PROMPT)).await;
    assert_eq!(parts.headers["x-cache"], "MISS");
    written(&a, 1).await;
    let (parts, again) = send(post(&b.url("/api/generate"), PROMPT)).await;
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["x-cache"], "HIT");
    assert_eq!(again, body, "the same answer, from Redis");
    assert!(parts.headers.contains_key("etag"));
    assert_eq!(up.count(), 1);
    let tier = b.cache.shared_tier().unwrap();
    assert_eq!(tier.stats.hits.load(Ordering::Relaxed), 1);

    // Promoted into B's memory: the next hit does not ask Redis.
    let (parts, _) = send(post(&b.url("/api/generate"), PROMPT)).await;
    assert_eq!(parts.headers["x-cache"], "HIT");
    assert_eq!(tier.stats.hits.load(Ordering::Relaxed), 1);

    // GETs travel too, and the variants of a response that varies.
    let (parts, _) = get(&a.url("/models?x=1")).await;
    assert_eq!(parts.headers["x-cache"], "MISS");
    written(&a, 2).await;
    let (parts, _) = get(&b.url("/models?x=1")).await;
    assert_eq!(parts.headers["x-cache"], "HIT");
    assert_eq!(up.count(), 2);
    let lang = |url: String, l: &'static str| {
        Request::get(url)
            .header("accept-language", l)
            .body(empty())
            .unwrap()
    };
    let (parts, _) = send(lang(a.url("/lang"), "fr")).await;
    assert_eq!(parts.headers["x-cache"], "MISS");
    // The variant and the names it varies on.
    written(&a, 4).await;
    let (parts, fr) = send(lang(b.url("/lang"), "fr")).await;
    assert_eq!(parts.headers["x-cache"], "HIT");
    let (parts, de) = send(lang(b.url("/lang"), "de")).await;
    assert_eq!(parts.headers["x-cache"], "MISS");
    assert_ne!(fr, de);
    assert_eq!(up.count(), 4);

    // The report shows the tier.
    let req = Request::get(format!("http://{}/admin/cache", b.admin.unwrap()))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(empty())
        .unwrap();
    let (_, report) = send(req).await;
    let report = json(&report);
    assert_eq!(report["shared"]["up"], true, "{report}");
    assert_eq!(report["shared"]["hits"], 4, "{report}");
}

#[tokio::test]
async fn entries_another_format_version_wrote_are_ignored_not_misread() {
    let redis = RedisServer::start().await;
    let up = numbered(Duration::ZERO).await;
    let (a, b, _t) = fleet(&up, &redis, "").await;
    send(post(&a.url("/api/generate"), PROMPT)).await;
    written(&a, 1).await;
    // Every stored entry rewritten as a future version would write it.
    let mut conn = redis.conn().await;
    let keys = entry_names(&mut conn).await;
    assert!(!keys.is_empty());
    for k in &keys {
        set_value(
            &mut conn,
            k,
            b"HYPE\x09\x00something else entirely".as_slice(),
        )
        .await;
    }
    let (parts, body) = send(post(&b.url("/api/generate"), PROMPT)).await;
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["x-cache"], "MISS");
    assert!(String::from_utf8_lossy(&body).contains("answer 2"));
}

#[tokio::test]
async fn a_purge_through_one_instance_empties_the_other() {
    let redis = RedisServer::start().await;
    let up = numbered(Duration::ZERO).await;
    let (a, b, _t) = fleet(&up, &redis, "").await;
    send(post(&a.url("/api/generate"), PROMPT)).await;
    written(&a, 1).await;
    // Now in both memories.
    let (parts, _) = send(post(&b.url("/api/generate"), PROMPT)).await;
    assert_eq!(parts.headers["x-cache"], "HIT");

    let purged = admin_post(&b, "/admin/cache/purge?url=/api/generate").await;
    assert_eq!(purged["shared"]["up"], true, "{purged}");
    assert_eq!(purged["shared"]["purged"], 1, "{purged}");
    assert_eq!(purged["purged"], 1, "{purged}");
    // A hears of it through pub/sub.
    let received = &a.cache.shared_tier().unwrap().stats.purges_received;
    for _ in 0..300 {
        if received.load(Ordering::Relaxed) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (parts, body) = send(post(&a.url("/api/generate"), PROMPT)).await;
    assert_eq!(parts.headers["x-cache"], "MISS");
    assert!(String::from_utf8_lossy(&body).contains("answer 2"));
    assert_eq!(up.count(), 2);

    // An unsafe method through one instance invalidates the URL everywhere.
    let (parts, _) = get(&a.url("/doc")).await;
    assert_eq!(parts.headers["x-cache"], "MISS");
    written(&a, 2).await;
    let (parts, _) = get(&b.url("/doc")).await;
    assert_eq!(parts.headers["x-cache"], "HIT");
    let (parts, _) = send(Request::delete(a.url("/doc")).body(empty()).unwrap()).await;
    assert_eq!(parts.status, 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (parts, _) = get(&b.url("/doc")).await;
    assert_eq!(parts.headers["x-cache"], "MISS", "B dropped its copy");
}

#[tokio::test]
async fn a_rate_limit_holds_across_the_fleet() {
    let redis = RedisServer::start().await;
    let up = numbered(Duration::ZERO).await;
    let limit = "[rate_limits.fleet]\nkey = \"client_ip\"\nrate = \"6/min\"\nburst = 6\ncount_hits = true\n";
    let (a, b, _t) = fleet(&up, &redis, limit).await;
    let mut allowed = 0;
    let mut refused = 0;
    for i in 0..12 {
        let proxy = if i % 2 == 0 { &a } else { &b };
        let (parts, _) = get(&proxy.url(&format!("/q{i}"))).await;
        match parts.status.as_u16() {
            200 => allowed += 1,
            429 => {
                refused += 1;
                assert!(parts.headers.contains_key("retry-after"));
                assert_eq!(parts.headers["ratelimit-remaining"], "0");
            }
            s => panic!("status {s}"),
        }
    }
    assert_eq!(
        (allowed, refused),
        (6, 6),
        "6/min for the fleet, not per instance"
    );
    let checks = |p: &TestProxy| {
        p.cache
            .shared_tier()
            .unwrap()
            .stats
            .limit_checks
            .load(Ordering::Relaxed)
    };
    assert_eq!(checks(&a) + checks(&b), 12);
}

#[tokio::test]
async fn identical_requests_spread_over_the_fleet_reach_the_backend_once() {
    let redis = RedisServer::start().await;
    let up = numbered(Duration::from_millis(400)).await;
    let (a, b, _t) = fleet(&up, &redis, "").await;
    let client = h2c_client();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let url = if i % 2 == 0 {
            a.url("/api/generate")
        } else {
            b.url("/api/generate")
        };
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let resp = client.request(post(&url, PROMPT)).await.unwrap();
            let (parts, body) = resp.into_parts();
            let body = http_body_util::BodyExt::collect(body)
                .await
                .unwrap()
                .to_bytes();
            (parts.status, body)
        }));
    }
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200);
        assert!(
            String::from_utf8_lossy(&body).contains("answer 1"),
            "{body:?}"
        );
    }
    assert_eq!(up.count(), 1, "one generation for the whole fleet");
    let waits = |p: &TestProxy| {
        p.cache
            .shared_tier()
            .unwrap()
            .stats
            .fill_waits_served
            .load(Ordering::Relaxed)
    };
    assert_eq!(
        waits(&a) + waits(&b),
        1,
        "one instance waited for the other"
    );
}

#[tokio::test]
async fn redis_dying_costs_no_request_and_its_return_is_taken_up() {
    let mut redis = RedisServer::start().await;
    let up = numbered(Duration::ZERO).await;
    let limit =
        "[rate_limits.fleet]\nkey = \"client_ip\"\nrate = \"1000/min\"\ncount_hits = true\n";
    let (a, b, _t) = fleet(&up, &redis, limit).await;
    let (parts, _) = get(&a.url("/before")).await;
    assert_eq!(parts.status, 200);
    written(&a, 1).await;

    redis.kill();
    // Every request answers while Redis is gone (memory and local limits).
    for i in 0..20 {
        let proxy = if i % 2 == 0 { &a } else { &b };
        let (parts, _) = get(&proxy.url(&format!("/during{}", i / 4))).await;
        assert_eq!(parts.status, 200, "request {i}");
    }
    shared_tier_up(&a, false).await;
    shared_tier_up(&b, false).await;
    // Memory still serves what it holds.
    let (parts, _) = get(&a.url("/during0")).await;
    assert_eq!(parts.headers["x-cache"], "HIT");

    redis.resume().await;
    shared_tier_up(&a, true).await;
    shared_tier_up(&b, true).await;
    let writes = a
        .cache
        .shared_tier()
        .unwrap()
        .stats
        .writes
        .load(Ordering::Relaxed);
    let (parts, _) = get(&a.url("/after")).await;
    assert_eq!(parts.headers["x-cache"], "MISS");
    written(&a, writes + 1).await;
    let (parts, _) = get(&b.url("/after")).await;
    assert_eq!(parts.headers["x-cache"], "HIT", "shared again");
    let outages = a
        .cache
        .shared_tier()
        .unwrap()
        .stats
        .outages
        .load(Ordering::Relaxed);
    assert_eq!(outages, 1);
    // Operators see it in the metrics.
    let (_, metrics) = get(&format!("http://{}/metrics", a.admin.unwrap())).await;
    let metrics = String::from_utf8_lossy(&metrics);
    for line in [
        "hyperion_shared_tier_up 1",
        "hyperion_shared_tier_outages_total 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
    assert!(
        metrics.contains("hyperion_shared_tier_errors_total "),
        "{metrics}"
    );
}

#[tokio::test]
async fn two_processes_name_entries_alike() {
    // In-process instances share everything a process has; separate
    // processes must agree on entry names through the policy alone.
    let redis = RedisServer::start().await;
    let up = numbered(Duration::ZERO).await;
    let token = TempFile::new("admin.token", TOKEN);
    let mut ports = Vec::new();
    let mut running = Vec::new();
    let mut files = Vec::new();
    for _ in 0..2 {
        let (port, admin) = (free_port(), free_port());
        let text = policy(&up.url(), &redis.url(), "procs:", &token, "")
            .replace(
                "listen = [\"127.0.0.1:0\"]",
                &format!("listen = [\"127.0.0.1:{port}\"]\naccess_log = \"off\""),
            )
            .replace(
                "[admin]\n",
                &format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\n"),
            );
        let file = TempFile::new("policy.toml", &text);
        running.push(Running::start(&file));
        files.push(file);
        ports.push((port, admin));
    }
    // Both serving, with the tier up.
    for (_, admin) in &ports {
        let url = format!("http://127.0.0.1:{admin}/admin/cache");
        let mut up_now = false;
        for _ in 0..300 {
            let req = Request::get(&url)
                .header("authorization", format!("Bearer {TOKEN}"))
                .body(empty())
                .unwrap();
            if let Ok(Ok(resp)) =
                tokio::time::timeout(Duration::from_secs(1), client().request(req)).await
            {
                let body = http_body_util::BodyExt::collect(resp.into_body())
                    .await
                    .unwrap()
                    .to_bytes();
                if json(&body)["shared"]["up"] == true {
                    up_now = true;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            up_now,
            "instance with admin port {admin} never had the tier up"
        );
    }
    let url = |i: usize, path: &str| format!("http://127.0.0.1:{}{path}", ports[i].0);
    let (parts, body) = send(post(&url(0, "/api/generate"), PROMPT)).await;
    assert_eq!(parts.headers["x-cache"], "MISS");
    let (parts, _) = get(&url(0, "/page")).await;
    assert_eq!(parts.headers["x-cache"], "MISS");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (parts, again) = send(post(&url(1, "/api/generate"), PROMPT)).await;
    assert_eq!(
        parts.headers["x-cache"], "HIT",
        "the other process finds it"
    );
    assert_eq!(again, body);
    let (parts, _) = get(&url(1, "/page")).await;
    assert_eq!(parts.headers["x-cache"], "HIT");
    assert_eq!(up.count(), 2);
}

#[tokio::test]
async fn a_full_redis_refusing_writes_neither_fails_requests_nor_flaps() {
    let redis = RedisServer::start().await;
    let up = numbered(Duration::ZERO).await;
    let (a, b, _t) = fleet(&up, &redis, "").await;
    let mut conn = redis.conn().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query_async(&mut conn)
        .await
        .unwrap();
    for i in 0..5 {
        let (parts, _) = get(&a.url(&format!("/full{i}"))).await;
        assert_eq!(parts.status, 200);
        assert_eq!(parts.headers["x-cache"], "MISS");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let tier = a.cache.shared_tier().unwrap();
    assert!(
        tier.stats.errors.load(Ordering::Relaxed) >= 5,
        "OOM refusals counted: {:?}",
        tier.report()
    );
    assert_eq!(
        tier.stats.outages.load(Ordering::Relaxed),
        0,
        "and not an outage"
    );
    assert!(tier.is_up());
    // Memory still serves them; the other instance, which Redis could not
    // tell, asks the upstream.
    let (parts, _) = get(&a.url("/full0")).await;
    assert_eq!(parts.headers["x-cache"], "HIT");
    let (parts, _) = get(&b.url("/full0")).await;
    assert_eq!(parts.headers["x-cache"], "MISS");
}

#[tokio::test]
async fn a_stale_entry_is_refreshed_once_for_the_fleet() {
    let redis = RedisServer::start().await;
    let up = numbered(Duration::from_millis(300)).await;
    let token = TempFile::new("admin.token", TOKEN);
    let text = policy(&up.url(), &redis.url(), "swr:", &token, "").replace(
        "mode = \"force\"\nttl = \"5m\"\n\n[[route]]\nname = \"r\"",
        "mode = \"force\"\nttl = \"1s\"\nstale_while_revalidate = \"1m\"\n\n[[route]]\nname = \"r\"",
    );
    assert!(text.contains("stale_while_revalidate"));
    let a = TestProxy::start(&text).await;
    let b = TestProxy::start(&text).await;
    shared_tier_up(&a, true).await;
    shared_tier_up(&b, true).await;
    let (parts, _) = get(&a.url("/news")).await;
    assert_eq!(parts.headers["x-cache"], "MISS");
    written(&a, 1).await;
    let (parts, _) = get(&b.url("/news")).await;
    assert_eq!(parts.headers["x-cache"], "HIT");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Both serve stale at once; one of them refreshes, for both.
    let (ua, ub) = (a.url("/news"), b.url("/news"));
    let (ra, rb) = tokio::join!(get(&ua), get(&ub));
    assert_eq!(ra.0.headers["x-cache"], "STALE");
    assert_eq!(rb.0.headers["x-cache"], "STALE");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(up.count(), 2, "one refresh for the fleet");
    // Each instance now serves the refreshed answer: the one that did not
    // refresh finds it in Redis rather than refreshing again.
    for p in [&a, &b] {
        let (parts, body) = get(&p.url("/news")).await;
        assert_eq!(parts.headers["x-cache"], "HIT");
        assert!(
            String::from_utf8_lossy(&body).contains("answer 2"),
            "{body:?}"
        );
    }
    assert_eq!(up.count(), 2);
}

#[tokio::test]
async fn a_slow_redis_is_not_waited_for() {
    let redis = RedisServer::start().await;
    let up = numbered(Duration::ZERO).await;
    let (a, _b, _t) = fleet(&up, &redis, "").await;
    // Redis stops answering for 1.5 s (the policy's timeout is 250 ms).
    let mut conn = redis.conn().await;
    let sleeper = tokio::spawn(async move {
        let _: Result<(), _> = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg("1.5")
            .query_async(&mut conn)
            .await;
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 0..4 {
        let started = std::time::Instant::now();
        let (parts, _) = send(post(
            &a.url("/api/generate"),
            &PROMPT.replace("sky", &format!("sky {i}")),
        ))
        .await;
        assert_eq!(parts.status, 200);
        // At most one timeout's wait; once the tier is down, none.
        assert!(
            started.elapsed() < Duration::from_millis(700),
            "request {i} waited {:?}",
            started.elapsed()
        );
    }
    let tier = a.cache.shared_tier().unwrap();
    assert_eq!(tier.stats.outages.load(Ordering::Relaxed), 1);
    sleeper.await.unwrap();
    shared_tier_up(&a, true).await;
}

#[tokio::test]
async fn purges_by_prefix_route_and_all_reach_redis_and_the_fleet() {
    let redis = RedisServer::start().await;
    let up = numbered(Duration::ZERO).await;
    let (a, b, _t) = fleet(&up, &redis, "").await;
    for path in ["/docs/a", "/docs/b", "/other"] {
        let (parts, _) = get(&a.url(path)).await;
        assert_eq!(parts.headers["x-cache"], "MISS");
    }
    send(post(&a.url("/api/generate"), PROMPT)).await;
    written(&a, 4).await;
    let cached = |p: &TestProxy, path: &'static str| {
        let url = p.url(path);
        async move { get(&url).await.0.headers["x-cache"].clone() }
    };

    // By prefix: the two /docs pages, from Redis and from A's memory.
    let purged = admin_post(&b, "/admin/cache/purge?prefix=/docs/").await;
    assert_eq!(purged["shared"]["purged"], 2, "{purged}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(cached(&a, "/docs/a").await, "MISS");
    assert_eq!(cached(&a, "/other").await, "HIT");

    // By route: everything `pages` stored (the /docs pages again, /other).
    written(&a, 5).await;
    let purged = admin_post(&b, "/admin/cache/purge?route=pages").await;
    assert_eq!(purged["shared"]["purged"], 2, "{purged}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(cached(&b, "/other").await, "MISS");
    let (parts, _) = send(post(&b.url("/api/generate"), PROMPT)).await;
    assert_eq!(
        parts.headers["x-cache"], "HIT",
        "the other route's entry stays"
    );

    // Everything.
    let purged = admin_post(&b, "/admin/cache/purge?all=true").await;
    assert_eq!(purged["shared"]["up"], true, "{purged}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (parts, _) = send(post(&a.url("/api/generate"), PROMPT)).await;
    assert_eq!(parts.headers["x-cache"], "MISS");
    let mut conn = redis.conn().await;
    let left: Vec<String> = redis::cmd("KEYS")
        .arg("*t:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(left.len() <= 1, "only what was stored since: {left:?}");
}

/// Waits until `counter` reaches `n`.
async fn counted(counter: &std::sync::atomic::AtomicU64, n: u64) {
    for _ in 0..300 {
        if counter.load(Ordering::Relaxed) >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the counter stayed at {}", counter.load(Ordering::Relaxed));
}

#[tokio::test]
async fn values_and_messages_not_signed_by_the_fleet_are_ignored_and_counted() {
    let redis = RedisServer::start().await;
    let up = numbered(Duration::ZERO).await;
    let (a, b, _t) = fleet(&up, &redis, "").await;
    send(post(&a.url("/api/generate"), PROMPT)).await;
    written(&a, 1).await;
    let mut conn = redis.conn().await;
    let keys = entry_names(&mut conn).await;
    assert_eq!(keys.len(), 1);
    let sealed = value_at(&mut conn, &keys[0]).await;
    // Someone with write access to Redis changes the answer's bytes (the
    // signature no longer matches) ...
    let mut tampered = sealed.clone();
    let at = tampered.len() - 3;
    tampered[at] ^= 0x20;
    set_value(&mut conn, &keys[0], &tampered[..]).await;
    let (parts, body) = send(post(&b.url("/api/generate"), PROMPT)).await;
    assert_eq!(
        parts.headers["x-cache"], "MISS",
        "the tampered value was not served"
    );
    assert!(String::from_utf8_lossy(&body).contains("answer 2"));
    let b_stats = &b.cache.shared_tier().unwrap().stats;
    assert!(b_stats.rejected_values.load(Ordering::Relaxed) >= 1);

    // ... or moves a genuine value under another key (a signed answer to
    // another prompt): refused too.
    let other = r#"{"model":"llama3.2","prompt":"something else","stream":false}"#;
    send(post(&a.url("/api/generate"), other)).await;
    written(&a, 2).await;
    let keys = entry_names(&mut conn).await;
    let genuine = value_at(&mut conn, &keys[0]).await;
    for k in &keys[1..] {
        set_value(&mut conn, k, &genuine[..]).await;
    }
    let c = TestProxy::start(&policy(
        &up.url(),
        &redis.url(),
        &keys[0][..keys[0].find(":e:").unwrap() + 1],
        &TempFile::new("admin.token", TOKEN),
        "",
    ))
    .await;
    shared_tier_up(&c, true).await;
    for prompt in [PROMPT, other] {
        send(post(&c.url("/api/generate"), prompt)).await;
    }
    let c_stats = &c.cache.shared_tier().unwrap().stats;
    assert!(
        c_stats.rejected_values.load(Ordering::Relaxed) >= 1,
        "the moved value was refused"
    );

    // A forged purge published on the fleet's channel is not obeyed.
    let (parts, _) = send(post(&b.url("/api/generate"), PROMPT)).await;
    assert_eq!(parts.headers["x-cache"], "HIT", "B holds its own copy");
    let channel = format!("{}events", &keys[0][..keys[0].find(":e:").unwrap() + 1]);
    let _: i64 = redis::cmd("PUBLISH")
        .arg(&channel)
        .arg("purge 0123456789abcdef all")
        .query_async(&mut conn)
        .await
        .unwrap();
    counted(&b_stats.rejected_messages, 1).await;
    let (parts, _) = send(post(&b.url("/api/generate"), PROMPT)).await;
    assert_eq!(
        parts.headers["x-cache"], "HIT",
        "the forged purge changed nothing"
    );
    assert_eq!(b_stats.purges_received.load(Ordering::Relaxed), 0);
    // The metrics say so.
    let (_, metrics) = get(&format!("http://{}/metrics", b.admin.unwrap())).await;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("hyperion_shared_tier_rejected_total{what=\"message\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_purge_of_everything_stays_inside_its_own_prefix() {
    let redis = RedisServer::start().await;
    let up = numbered(Duration::ZERO).await;
    let token = TempFile::new("admin.token", TOKEN);
    let id = fastrand::u32(..);
    // `fleet*` would match `fleetB...` as a pattern; as a prefix it must not.
    let globby = TestProxy::start(&policy(
        &up.url(),
        &redis.url(),
        &format!("t{id:x}fleet*"),
        &token,
        "",
    ))
    .await;
    let plain = TestProxy::start(&policy(
        &up.url(),
        &redis.url(),
        &format!("t{id:x}fleetB"),
        &token,
        "",
    ))
    .await;
    shared_tier_up(&globby, true).await;
    shared_tier_up(&plain, true).await;
    send(post(&plain.url("/api/generate"), PROMPT)).await;
    written(&plain, 1).await;
    let purged = admin_post(&globby, "/admin/cache/purge?all=true").await;
    assert_eq!(purged["shared"]["purged"], 0, "{purged}");
    let mut conn = redis.conn().await;
    let left: Vec<String> = redis::cmd("KEYS")
        .arg(format!("t{id:x}fleetBe:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(left.len(), 1, "the other fleet's entry is still there");
}

#[tokio::test]
async fn the_fleet_shares_through_redis_over_tls() {
    let ca = TestCa::new("redis-ca");
    let (redis, _files) = RedisServer::start_tls(&ca).await;
    let up = numbered(Duration::ZERO).await;
    let token = TempFile::new("admin.token", TOKEN);
    let url = format!("rediss://127.0.0.1:{}/0", redis.port);
    let text = policy(
        &up.url(),
        &url,
        &format!("tls{:08x}:", fastrand::u32(..)),
        &token,
        "",
    )
    .replace(
        "timeout = \"250ms\"",
        &format!("timeout = \"250ms\"\nca_file = \"{}\"", ca.file.display()),
    );
    let a = TestProxy::start(&text).await;
    let b = TestProxy::start(&text).await;
    shared_tier_up(&a, true).await;
    shared_tier_up(&b, true).await;
    send(post(&a.url("/api/generate"), PROMPT)).await;
    written(&a, 1).await;
    let (parts, body) = send(post(&b.url("/api/generate"), PROMPT)).await;
    assert_eq!(
        parts.headers["x-cache"], "HIT",
        "filled through A, over TLS"
    );
    assert!(String::from_utf8_lossy(&body).contains("answer 1"));
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn each_keys_usage_sums_over_the_fleet_and_outlives_an_instance() {
    let redis = RedisServer::start().await;
    let up = numbered(Duration::ZERO).await;
    let keys = TempFile::new("keys.toml", "");
    std::fs::remove_file(&keys.0).unwrap();
    let key = hyperion::auth::KeysFileAt(keys.0.clone())
        .add("a", None)
        .unwrap();
    let extra = format!(
        "[auth]\nkeys_file = \"{}\"\n\n[rate_limits.fleet]\nkey = \"global\"\nrate = \"1000/s\"",
        keys.display()
    );
    let (a, b, token) = fleet(&up, &redis, &extra).await;
    let ask = |proxy: &TestProxy, prompt: &str| {
        send(
            Request::post(proxy.url("/x"))
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .body(full(format!(r#"{{"model":"m","prompt":"{prompt}"}}"#)))
                .unwrap(),
        )
    };
    assert_eq!(ask(&a, "one").await.0.status, 200);
    assert_eq!(ask(&a, "two").await.0.status, 200);
    written(&a, 2).await;
    let (hit, _) = ask(&b, "one").await;
    assert_eq!(hit.headers["x-cache"], "HIT");
    let usage_at = |proxy: &TestProxy| {
        let req = Request::get(format!("http://{}/admin/keys/a", proxy.admin.unwrap()))
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(empty())
            .unwrap();
        async move { json(&send(req).await.1) }
    };
    // Asking writes what the instance counted: a's two, then b's one.
    let at_a = usage_at(&a).await;
    assert_eq!(at_a["usage"]["requests"], 2, "{at_a}");
    let at_b = usage_at(&b).await;
    assert_eq!(at_b["usage"]["requests"], 3, "the fleet's: {at_b}");
    assert_eq!(at_b["usage"]["cache_hits"], 1, "{at_b}");
    assert!(at_b["counted"].as_str().unwrap().contains("fleet"));
    // Another instance of the fleet (its prefix), after the first two are
    // gone, reads the same.
    drop((a, b));
    let mut conn = redis.conn().await;
    let names: Vec<String> = redis::cmd("KEYS")
        .arg("*usage:a")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(names.len(), 1, "{names:?}");
    let prefix = names[0].trim_end_matches("usage:a").to_owned();
    let c = TestProxy::start(&policy(&up.url(), &redis.url(), &prefix, &token, &extra)).await;
    shared_tier_up(&c, true).await;
    let at_c = usage_at(&c).await;
    assert_eq!(at_c["usage"]["requests"], 3, "kept in Redis: {at_c}");
}
