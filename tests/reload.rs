//! Hot reload seen from outside: the policy file rewritten and reloaded
//! while the proxy serves. New requests follow the new policy; a request
//! in flight finishes on the one it began with; the cache and unchanged
//! limiters carry over; a broken file changes nothing and says why; and
//! reloading under load fails no request. The binary reloads on SIGHUP.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use support::*;

fn policy(upstream: &str, tag: &str, extra_route: &str) -> String {
    format!(
        r#"[upstreams.up]
servers = [{{ url = "{upstream}" }}]

[rate_limits.few]
key = "client_ip"
rate = "3/min"

[[route]]
name = "cached"
match = {{ path_prefix = "/cached/" }}
upstream = "up"
[route.cache]
mode = "force"
ttl = "5m"

[[route]]
name = "all"
upstream = "up"
{extra_route}
[route.headers]
response_set = {{ "x-policy" = "{tag}" }}
"#
    )
}

async fn tag_of(proxy: &TestProxy, path: &str) -> String {
    let (parts, _) = get(&proxy.url(path)).await;
    assert_eq!(parts.status, 200);
    parts.headers["x-policy"].to_str().unwrap().to_owned()
}

/// Waits for the workers to take up the reloaded policy: a task of theirs
/// swaps their proxy, soon but not at once.
async fn served_with(proxy: &TestProxy, want: &str) {
    for _ in 0..100 {
        if tag_of(proxy, "/x").await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("still not serving policy {want}");
}

#[tokio::test]
async fn new_requests_follow_the_new_policy_and_the_cache_carries_over() {
    let up = Upstream::echo().await;
    let file = TempFile::new("policy.toml", &policy(&up.url(), "one", ""));
    let proxy = TestProxy::start_file(&file.0).await;
    assert_eq!(tag_of(&proxy, "/x").await, "one");
    let (first, _) = get(&proxy.url("/cached/a")).await;
    assert_eq!(first.headers["x-cache"], "MISS");

    file.write(&policy(&up.url(), "two", ""));
    let done = proxy.reload().await.unwrap();
    assert_eq!(done.generation, 2);
    assert!(done.needs_restart.is_empty(), "{:?}", done.needs_restart);
    served_with(&proxy, "two").await;
    let (again, _) = get(&proxy.url("/cached/a")).await;
    assert_eq!(again.headers["x-cache"], "HIT");
    assert_eq!(up.count(), 3);
}

#[tokio::test]
async fn a_broken_file_changes_nothing_and_says_where() {
    let up = Upstream::echo().await;
    let file = TempFile::new("policy.toml", &policy(&up.url(), "one", ""));
    let proxy = TestProxy::start_file(&file.0).await;
    file.write(&policy(&up.url(), "two", "rate_limit = [\"nonexistent\"]"));
    let err = proxy.reload().await.unwrap_err().to_string();
    let name = file.0.display().to_string();
    assert!(
        err.starts_with(&format!("{name}:")) && err.contains("nonexistent"),
        "{err}"
    );
    assert_eq!(proxy.reloader.current().number, 1);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(tag_of(&proxy, "/x").await, "one");
    assert_eq!(
        proxy
            .reloader
            .failed
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn an_unchanged_limiter_keeps_what_was_spent() {
    let up = Upstream::echo().await;
    let file = TempFile::new(
        "policy.toml",
        &policy(&up.url(), "one", "rate_limit = [\"few\"]"),
    );
    let proxy = TestProxy::start_file(&file.0).await;
    for _ in 0..3 {
        assert_eq!(get(&proxy.url("/x")).await.0.status, 200);
    }
    file.write(&policy(&up.url(), "two", "rate_limit = [\"few\"]"));
    proxy.reload().await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (parts, _) = get(&proxy.url("/x")).await;
    // Hyperion's own answers carry no response_set: the 429 is the tell.
    assert_eq!(parts.status, 429);
}

#[tokio::test]
async fn a_stream_in_flight_finishes_on_the_policy_it_began_with() {
    let (old, mut chunks) = stepped_upstream("application/x-ndjson").await;
    let new = Upstream::echo().await;
    let file = TempFile::new("policy.toml", &policy(&old.url(), "one", ""));
    let proxy = TestProxy::start_file(&file.0).await;
    let resp = client()
        .request(
            http::Request::get(proxy.url("/api/generate"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-policy"], "one");
    let sender = chunks.recv().await.unwrap();
    sender.send("{\"n\":1}\n").await;

    file.write(&policy(&new.url(), "two", ""));
    proxy.reload().await.unwrap();
    served_with(&proxy, "two").await;

    // The old stream goes on from the old server.
    sender.send("{\"n\":2}\n").await;
    drop(sender);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, Bytes::from("{\"n\":1}\n{\"n\":2}\n"));
    assert_eq!(old.count(), 1);
}

#[tokio::test]
async fn reloading_under_load_fails_no_request() {
    let up = Upstream::echo().await;
    let file = TempFile::new("policy.toml", &policy(&up.url(), "0", ""));
    let proxy = TestProxy::start_file(&file.0).await;
    let url = proxy.url("/x");
    let load = tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..8 {
            let url = format!("{url}?c={c}");
            tasks.spawn(async move {
                let mut statuses = Vec::new();
                for _ in 0..50 {
                    statuses.push(get(&url).await.0.status.as_u16());
                }
                statuses
            });
        }
        let mut all = Vec::new();
        while let Some(s) = tasks.join_next().await {
            all.extend(s.unwrap());
        }
        all
    });
    for g in 1..=10 {
        file.write(&policy(&up.url(), &g.to_string(), ""));
        proxy.reload().await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let statuses = load.await.unwrap();
    assert_eq!(statuses.len(), 400);
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(proxy.reloader.current().number, 11);
}

#[tokio::test]
async fn restart_only_settings_are_named() {
    let up = Upstream::echo().await;
    let file = TempFile::new("policy.toml", &policy(&up.url(), "one", ""));
    let proxy = TestProxy::start_file(&file.0).await;
    file.write(&format!(
        "[server]\nlisten = [\"127.0.0.1:1\"]\nshutdown_grace = \"5s\"\n[cache]\nmax_size = \"64MB\"\nmax_entry_size = \"1MB\"\n{}",
        policy(&up.url(), "two", "")
    ));
    let done = proxy.reload().await.unwrap();
    assert_eq!(
        done.needs_restart,
        vec![
            "server.listen".to_owned(),
            "server.shutdown_grace".to_owned(),
            "cache.max_size".to_owned(),
            "cache.max_entry_size".to_owned(),
        ]
    );
}

async fn wait_for_tag(url: &str, want: &str) -> bool {
    for _ in 0..200 {
        if let Ok(Ok(resp)) =
            tokio::time::timeout(Duration::from_secs(1), client().get(url.parse().unwrap())).await
        {
            if resp.headers().get("x-policy").is_some_and(|v| v == want) {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

#[tokio::test]
async fn the_binary_reloads_on_sighup_and_survives_a_broken_file() {
    let up = Upstream::echo().await;
    let port = free_port();
    let with_listen = |tag: &str, extra: &str| {
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\naccess_log = \"off\"\n{}",
            policy(&up.url(), tag, extra)
        )
    };
    let file = TempFile::new("policy.toml", &with_listen("one", ""));
    let running = Running::start(&file);
    let url = format!("http://127.0.0.1:{port}/x");
    assert!(wait_for_tag(&url, "one").await, "the proxy did not start");

    file.write(&with_listen("two", ""));
    running.signal("HUP");
    assert!(wait_for_tag(&url, "two").await, "SIGHUP did not reload");

    file.write("[[route]]\nname = \"broken\"\n");
    running.signal("HUP");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        wait_for_tag(&url, "two").await,
        "a broken file stopped the proxy"
    );
}

/// A value other than the default for each key of `[server]`, `[cache]`
/// and `[admin]` (the tables a reload may not apply), by key path. Not
/// here: `server.tls.*` (a certificate pair) and `cache.redis.*` (a Redis
/// and its secret), whose reload report `tls.rs` and `shared_tier.rs` see.
const CHANGED: &[(&str, &str)] = &[
    ("server.listen", r#"["127.0.0.1:1"]"#),
    ("server.max_request_body", r#""10MB""#),
    ("server.max_header_size", r#""16KB""#),
    ("server.header_read_timeout", r#""11s""#),
    ("server.idle_timeout", r#""76s""#),
    ("server.shutdown_grace", r#""5s""#),
    ("server.body_read_timeout", r#""31s""#),
    ("server.send_timeout", r#""61s""#),
    ("server.read_ahead", r#""128KB""#),
    ("server.max_read_ahead", r#""128MB""#),
    ("server.tunnel_idle_timeout", r#""6m""#),
    ("server.max_buffered_bodies", r#""128MB""#),
    ("server.max_connections", "1000"),
    ("server.max_connections_per_ip", "100"),
    ("server.http2_max_concurrent_streams", "50"),
    ("server.http2_max_pending_resets", "10"),
    ("server.http2_keepalive_interval", r#""31s""#),
    ("server.http2_keepalive_timeout", r#""21s""#),
    ("server.trusted_proxies", r#"["10.0.0.0/8"]"#),
    ("server.access_log", r#""off""#),
    ("server.slow_request", r#""6s""#),
    ("admin.listen", r#""127.0.0.1:2""#),
    ("cache.max_size", r#""64MB""#),
    ("cache.max_entries", "1000"),
    ("cache.max_entry_size", r#""1MB""#),
    ("cache.default_ttl", r#""6m""#),
    ("cache.credential_headers", r#"["x-key"]"#),
    ("cache.targeted_cache_control", r#"["x-cdn-cache-control"]"#),
    ("tracing.sample_ratio", "0.5"),
    ("tracing.service_name", r#""other""#),
    ("tracing.max_queue", "100"),
    ("tracing.batch_size", "10"),
    ("tracing.export_interval", r#""3s""#),
    ("tracing.export_timeout", r#""11s""#),
    ("tracing.otlp_endpoint", r#""http://127.0.0.1:2/v1/traces""#),
    ("tracing.headers_env", r#""HYPERION_RELOAD_TEST_OTLP""#),
];

/// The base policy's `[tracing]` (a collector that is not there: exports
/// fail, counted, and nothing else notices).
const TRACING: &str = "[tracing]\notlp_endpoint = \"http://127.0.0.1:1/v1/traces\"\n";

#[tokio::test]
async fn a_reload_names_exactly_the_keys_the_key_table_marks_restart() {
    use hyperion::policy::keys::{self, Reload};
    let up = Upstream::echo().await;
    std::env::set_var("HYPERION_RELOAD_TEST_OTLP", "x-a=1");
    let base = format!(
        "[admin]\nlisten = \"127.0.0.1:3\"\n{TRACING}{}",
        policy(&up.url(), "base", "")
    );
    let file = TempFile::new("policy.toml", &base);
    let proxy = TestProxy::start_file(&file.0).await;
    for (path, value) in CHANGED {
        let k = keys::find(path).unwrap_or_else(|| panic!("{path} is not in the key table"));
        let (table, name) = path.rsplit_once('.').unwrap();
        let changed = if table == "admin" {
            format!(
                "[admin]\n{name} = {value}\n{TRACING}{}",
                policy(&up.url(), "base", "")
            )
        } else if table == "tracing" {
            let endpoint = if name == "otlp_endpoint" {
                String::new()
            } else {
                TRACING.lines().nth(1).unwrap().to_owned()
            };
            format!(
                "[admin]\nlisten = \"127.0.0.1:3\"\n[tracing]\n{endpoint}\n{name} = {value}\n{}",
                policy(&up.url(), "base", "")
            )
        } else {
            format!("[{table}]\n{name} = {value}\n{base}")
        };
        file.write(&changed);
        let named = proxy.reload().await.unwrap().needs_restart;
        let want: Vec<String> = match k.reload {
            Reload::Restart => vec![path.to_string()],
            Reload::Applies => vec![],
        };
        assert_eq!(named, want, "{path} = {value}");
        file.write(&base);
        proxy.reload().await.unwrap();
    }
    // Every restart key of these tables was exercised.
    for k in keys::KEYS.iter().filter(|k| k.reload == Reload::Restart) {
        let exercised = CHANGED.iter().any(|(p, _)| *p == k.path);
        let elsewhere = k.path.starts_with("server.tls") || k.path.starts_with("cache.redis");
        assert!(
            exercised || elsewhere || k.path == "admin" || k.path == "tracing",
            "{} is marked restart but no reload here changes it",
            k.path
        );
    }
    // [admin] and [tracing] appearing or going away wait for a restart too.
    file.write(&policy(&up.url(), "base", ""));
    assert_eq!(
        proxy.reload().await.unwrap().needs_restart,
        vec!["admin".to_owned(), "tracing".to_owned()]
    );
}
