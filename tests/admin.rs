//! The admin API with a real client, as operators use it with curl:
//! health and readiness, the bearer token (401 without it, nothing leaked;
//! 403 when none is configured), cache figures, purges and their dry runs,
//! a key explained, upstream state, the effective policy, and reloads good
//! and bad.

mod support;

use http::{Method, Request};
use serde_json::Value;
use support::*;

const TOKEN: &str = "0123456789abcdef-test-token";

fn policy(upstream: &str, token_file: Option<&TempFile>) -> String {
    let admin = match token_file {
        Some(f) => format!("[admin]\ntoken_file = \"{}\"\n", f.display()),
        None => "[admin]\n".to_owned(),
    };
    format!(
        r#"{admin}
[upstreams.up]
servers = [{{ url = "{upstream}" }}]

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
"#
    )
}

async fn admin(proxy: &TestProxy, method: Method, path: &str, token: Option<&str>) -> (u16, Value) {
    admin_with(proxy, method, path, token, "").await
}

async fn admin_with(
    proxy: &TestProxy,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: &'static str,
) -> (u16, Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", proxy.admin.unwrap()));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let (parts, body) = send(req.body(full(body)).unwrap()).await;
    assert_eq!(parts.headers["content-type"], "application/json");
    (parts.status.as_u16(), json(&body))
}

/// A proxy whose admin token is in a file; the files live as long as the
/// returned ones (a reload reads both again).
async fn with_token() -> (Upstream, (TempFile, TempFile), TestProxy) {
    let up = Upstream::echo().await;
    let token = TempFile::new("admin.token", &format!("{TOKEN}\n"));
    let file = TempFile::new("policy.toml", &policy(&up.url(), Some(&token)));
    let proxy = TestProxy::start_file(&file.0).await;
    (up, (file, token), proxy)
}

#[tokio::test]
async fn health_and_readiness_answer_without_a_token() {
    let (_up, _file, proxy) = with_token().await;
    assert_eq!(
        admin(&proxy, Method::GET, "/healthz", None).await,
        (200, serde_json::json!({"status": "ok"}))
    );
    let (status, ready) = admin(&proxy, Method::GET, "/readyz", None).await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["status"], "ready");
}

#[tokio::test]
async fn readiness_fails_with_the_reason_when_a_pool_has_no_healthy_server() {
    let dead = refused_addr().await;
    let proxy = TestProxy::start(&format!(
        "[admin]\n[upstreams.up]\nservers = [{{ url = \"http://{dead}\" }}]\n[upstreams.up.health]\npath = \"/health\"\ninterval = \"100ms\"\nunhealthy_after = 1\n[[route]]\nname = \"all\"\nupstream = \"up\"\n"
    ))
    .await;
    let mut last = Value::Null;
    for _ in 0..100 {
        let (status, body) = admin(&proxy, Method::GET, "/readyz", None).await;
        if status == 503 {
            assert_eq!(body["status"], "not_ready");
            let reason = body["reasons"][0].as_str().unwrap();
            assert!(
                reason.contains("upstream `up` has no healthy server"),
                "{reason}"
            );
            assert!(reason.contains("health check"), "{reason}");
            return;
        }
        last = body;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("never not ready: {last}");
}

#[tokio::test]
async fn admin_endpoints_need_the_token_and_say_nothing_without_it() {
    let (_up, _file, proxy) = with_token().await;
    for token in [None, Some("wrong-token-wrong-token"), Some("")] {
        let (status, body) = admin(&proxy, Method::GET, "/admin/cache", token).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["error"]["code"], "unauthorized");
        assert!(!body.to_string().contains("hits"), "{body}");
    }
    // The header says how to authenticate.
    let (parts, _) = send(
        Request::get(format!("http://{}/admin/upstreams", proxy.admin.unwrap()))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        parts.headers["www-authenticate"],
        "Bearer realm=\"hyperion-admin\""
    );
    assert_eq!(
        admin(&proxy, Method::GET, "/admin/cache", Some(TOKEN))
            .await
            .0,
        200
    );
    assert_eq!(admin(&proxy, Method::GET, "/nope", None).await.0, 404);
    assert_eq!(
        admin(&proxy, Method::DELETE, "/admin/cache", Some(TOKEN))
            .await
            .0,
        405
    );
}

#[tokio::test]
async fn without_a_configured_token_only_the_open_endpoints_answer() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::start(&policy(&up.url(), None)).await;
    assert_eq!(admin(&proxy, Method::GET, "/healthz", None).await.0, 200);
    let (status, body) = admin(&proxy, Method::GET, "/admin/cache", Some(TOKEN)).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "admin_token_not_configured");
}

#[tokio::test]
async fn cache_figures_purges_and_explain() {
    let (up, _file, proxy) = with_token().await;
    for path in ["/cached/a", "/cached/a", "/cached/b", "/cached/c?x=1"] {
        assert_eq!(get(&proxy.url(path)).await.0.status, 200);
    }
    let t = Some(TOKEN);
    let (_, report) = admin(&proxy, Method::GET, "/admin/cache", t).await;
    assert_eq!(report["hits"], 1);
    assert_eq!(report["misses"], 3);
    assert_eq!(report["entries"], 3);

    // The key of a request, its parts, and what is stored.
    let url = format!("http://127.0.0.1:{}/cached/a", proxy.addr.port());
    let (status, explained) = admin(
        &proxy,
        Method::GET,
        &format!("/admin/cache/explain?method=GET&url={url}"),
        t,
    )
    .await;
    assert_eq!(status, 200, "{explained}");
    assert_eq!(explained["route"], "cached");
    assert_eq!(explained["key"].as_str().unwrap().len(), 64);
    assert!(
        explained["parts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["part"] == "path" && p["value"] == "/cached/a"),
        "{explained}"
    );
    assert_eq!(explained["stored"]["status"], 200);
    let (_, other) = admin(
        &proxy,
        Method::GET,
        "/admin/cache/explain?url=http://127.0.0.1/x",
        t,
    )
    .await;
    assert_eq!(other["cached"], false);

    // A dry run counts, removes nothing.
    let (status, dry) = admin(
        &proxy,
        Method::POST,
        "/admin/cache/purge?prefix=/cached/&dry_run=true",
        t,
    )
    .await;
    assert_eq!(
        (status, dry["purged"].as_u64(), dry["dry_run"].as_bool()),
        (200, Some(3), Some(true))
    );
    let (_, dry) = admin(
        &proxy,
        Method::POST,
        "/admin/cache/purge?url=/cached/c%3Fx%3D1&dry_run=true",
        t,
    )
    .await;
    assert_eq!(dry["purged"], 1);
    // One URL, with its host as clients send it.
    let (_, done) = admin(
        &proxy,
        Method::POST,
        &format!("/admin/cache/purge?url={url}"),
        t,
    )
    .await;
    assert_eq!(done["purged"], 1);
    let (parts, _) = get(&proxy.url("/cached/a")).await;
    assert_eq!(parts.headers["x-cache"], "MISS");
    let (_, done) = admin(&proxy, Method::POST, "/admin/cache/purge?route=cached", t).await;
    assert_eq!(done["purged"], 3);
    assert_eq!(
        admin(&proxy, Method::GET, "/admin/cache", t).await.1["entries"],
        0
    );
    let before = up.count();
    assert_eq!(
        get(&proxy.url("/cached/b")).await.0.headers["x-cache"],
        "MISS"
    );
    assert_eq!(up.count(), before + 1);

    // Mistakes are 400s that say what to do.
    for bad in ["", "?route=nope", "?all=true&route=cached", "?colour=red"] {
        let (status, body) =
            admin(&proxy, Method::POST, &format!("/admin/cache/purge{bad}"), t).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "bad_request");
    }
    let (_, all) = admin(&proxy, Method::POST, "/admin/cache/purge?all=true", t).await;
    assert_eq!(all["purged"], 1);
}

#[tokio::test]
async fn upstreams_and_config_are_shown() {
    let (up, _file, proxy) = with_token().await;
    get(&proxy.url("/x")).await;
    let (status, body) = admin(&proxy, Method::GET, "/admin/upstreams", Some(TOKEN)).await;
    assert_eq!(status, 200);
    let pool = &body["upstreams"][0];
    assert_eq!(pool["name"], "up");
    assert_eq!(pool["balance"], "least_inflight");
    assert_eq!(pool["servers"][0]["url"], up.url());
    assert_eq!(pool["servers"][0]["healthy"], true);
    assert_eq!(pool["servers"][0]["requests"], 1);

    let (status, config) = admin(&proxy, Method::GET, "/admin/config", Some(TOKEN)).await;
    assert_eq!(status, 200);
    assert_eq!(config["generation"], 1);
    let summary = config["summary"].to_string();
    assert!(
        summary.contains("cached") && summary.contains("token from file"),
        "{summary}"
    );
    assert!(!summary.contains(TOKEN));
}

#[tokio::test]
async fn reload_through_the_api_reports_errors_and_success() {
    let (up, (file, _token), proxy) = with_token().await;
    let good = std::fs::read_to_string(&file.0).unwrap();
    file.write("[[route]]\nname = \"broken\"\n");
    let (status, body) = admin(&proxy, Method::POST, "/admin/reload", Some(TOKEN)).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_policy");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!("{}:", file.display())),
        "{message}"
    );
    // Still serving, still the same token.
    assert_eq!(get(&proxy.url("/x")).await.0.status, 200);
    // The status page's endpoint says how the last reload went.
    let (_, status) = admin(&proxy, Method::GET, "/admin/status", Some(TOKEN)).await;
    assert_eq!(status["last_reload"]["ok"], false, "{status}");
    assert_eq!(status["last_reload"]["generation"], 1);
    assert!(status["last_reload"]["error"]
        .as_str()
        .unwrap()
        .starts_with(&file.display().to_string()));
    assert_eq!(status["reloads"]["error"], 1);
    file.write(&good.replace("name = \"all\"", "name = \"everything\""));
    let (status, body) = admin(&proxy, Method::POST, "/admin/reload", Some(TOKEN)).await;
    assert_eq!(
        (status, body["generation"].as_u64()),
        (200, Some(2)),
        "{body}"
    );
    let (_, config) = admin(&proxy, Method::GET, "/admin/config", Some(TOKEN)).await;
    assert!(config["summary"].to_string().contains("everything"));
    assert_eq!(config["last_reload"]["ok"], true);
    assert_eq!(config["last_reload"]["generation"], 2);
    drop(up);
}

#[tokio::test]
async fn curl_gets_indented_json() {
    let (_up, _file, proxy) = with_token().await;
    let (parts, body) = send(
        Request::get(format!("http://{}/healthz", proxy.admin.unwrap()))
            .header("user-agent", "curl/8.5.0")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 200);
    assert_eq!(
        String::from_utf8_lossy(&body),
        "{\n  \"status\": \"ok\"\n}\n"
    );
    let (_, compact) = get(&format!("http://{}/healthz", proxy.admin.unwrap())).await;
    assert_eq!(String::from_utf8_lossy(&compact), "{\"status\":\"ok\"}\n");
}

/// `/metrics`, read with a Prometheus text-format parser.
async fn scrape(proxy: &TestProxy) -> prometheus_parse::Scrape {
    let (parts, body) = get(&format!("http://{}/metrics", proxy.admin.unwrap())).await;
    assert_eq!(parts.status, 200);
    assert!(parts.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = String::from_utf8(body.to_vec()).unwrap();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

fn value(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
            prometheus_parse::Value::Summary(_) => f64::NAN,
        })
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_without_a_token() {
    let up = Upstream::echo().await;
    // Route names of its own: the recorder is the test process's.
    let proxy = TestProxy::start(&format!(
        "[admin]\n[upstreams.metered]\nservers = [{{ url = \"{}\" }}]\n[rate_limits.once]\nkey = \"global\"\nrate = \"1/hour\"\n[[route]]\nname = \"metered_cached\"\nmatch = {{ path_prefix = \"/c/\" }}\nupstream = \"metered\"\n[route.cache]\nmode = \"force\"\nttl = \"5m\"\n[[route]]\nname = \"metered_zip\"\nmatch = {{ path_prefix = \"/z/\" }}\nupstream = \"metered\"\n[[route]]\nname = \"metered_limited\"\nupstream = \"metered\"\nrate_limit = [\"once\"]\n[compression]\nmin_size = \"16B\"\n",
        up.url()
    ))
    .await;
    for path in ["/c/a", "/c/a", "/x", "/x"] {
        get(&proxy.url(path)).await;
    }
    let (zipped, body) = send(
        Request::get(proxy.url("/z/1"))
            .header("accept-encoding", "gzip")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(zipped.headers["content-encoding"], "gzip");
    // The same labels again, back to back (a worker keeps the last ones).
    get(&proxy.url("/z/2")).await;
    get(&proxy.url("/z/3")).await;
    let s = scrape(&proxy).await;
    let gzip_out = value(
        &s,
        "hyperion_compression_out_bytes_total",
        &[("coding", "gzip"), ("op", "encode")],
    );
    assert!(
        gzip_out.is_some_and(|v| v >= body.len() as f64),
        "{gzip_out:?}"
    );
    assert!(value(
        &s,
        "hyperion_compression_in_bytes_total",
        &[("coding", "gzip"), ("op", "encode")]
    )
    .is_some_and(|v| v > 0.0));
    let requests = |route, status, cache| {
        value(
            &s,
            "hyperion_requests_total",
            &[
                ("route", route),
                ("status", status),
                ("cache", cache),
                ("method", "GET"),
            ],
        )
    };
    assert_eq!(requests("metered_cached", "200", "MISS"), Some(1.0));
    assert_eq!(requests("metered_cached", "200", "HIT"), Some(1.0));
    assert_eq!(requests("metered_limited", "200", "-"), Some(1.0));
    assert_eq!(requests("metered_limited", "429", "-"), Some(1.0));
    assert_eq!(requests("metered_zip", "200", "-"), Some(3.0));
    assert_eq!(
        value(&s, "hyperion_rate_limited_total", &[("limiter", "once")]),
        Some(1.0)
    );
    // Timed: a histogram with buckets, by route.
    assert_eq!(
        value(
            &s,
            "hyperion_request_duration_seconds",
            &[("route", "metered_cached")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &s,
            "hyperion_request_duration_seconds",
            &[("route", "metered_zip")]
        ),
        Some(3.0)
    );
    assert_eq!(
        value(
            &s,
            "hyperion_upstream_duration_seconds",
            &[("upstream", "metered")]
        ),
        Some(5.0)
    );
    let server = up.url();
    let per_server = [("upstream", "metered"), ("server", server.as_str())];
    assert_eq!(
        value(&s, "hyperion_upstream_healthy", &per_server),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "hyperion_upstream_requests_total", &per_server),
        Some(5.0)
    );
    assert_eq!(
        value(&s, "hyperion_upstream_in_flight", &per_server),
        Some(0.0)
    );
    assert!(value(&s, "hyperion_cache_entries", &[]).is_some_and(|v| v >= 1.0));
    assert!(
        value(&s, "hyperion_cache_lookups_total", &[("result", "hit")]).is_some_and(|v| v >= 1.0)
    );
    assert!(value(&s, "hyperion_reloads_total", &[("outcome", "ok")]).is_some());
    assert_eq!(
        value(
            &s,
            "hyperion_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    // No label carries a path or a client.
    for sample in &s.samples {
        for (k, v) in sample.labels.iter() {
            assert!(
                !v.contains("/c/a") && k != "path" && k != "client",
                "{}: {k}={v}",
                sample.metric
            );
        }
    }
}

#[tokio::test]
async fn limiters_and_their_busiest_keys_are_shown_hashed() {
    let up = Upstream::echo().await;
    let token = TempFile::new("admin.token", TOKEN);
    let proxy = TestProxy::start(&format!(
        "[admin]\ntoken_file = \"{}\"\n[upstreams.up]\nservers = [{{ url = \"{}\" }}]\n[rate_limits.per_key]\nkey = \"header:x-api-key\"\nrate = \"10/min\"\n[[route]]\nname = \"all\"\nupstream = \"up\"\nrate_limit = [\"per_key\"]\n",
        token.display(),
        up.url()
    ))
    .await;
    let call = |key: &'static str| {
        let url = proxy.url("/x");
        async move {
            send(
                Request::get(url)
                    .header("x-api-key", key)
                    .body(empty())
                    .unwrap(),
            )
            .await
        }
    };
    for _ in 0..4 {
        call("secret-key-heavy").await;
    }
    call("secret-key-light").await;
    let (status, body) = admin(&proxy, Method::GET, "/admin/limits?top=5", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let limiter = &body["limiters"][0];
    assert_eq!(limiter["name"], "per_key");
    assert_eq!(limiter["key"], "header:x-api-key");
    assert_eq!(limiter["tracked_keys"], 2);
    let busiest = limiter["busiest"].as_array().unwrap();
    assert_eq!(busiest.len(), 2);
    assert_eq!(busiest[0]["remaining"], 6);
    assert_eq!(busiest[1]["remaining"], 9);
    assert!(!body.to_string().contains("secret-key"), "{body}");
}

#[test]
fn the_grafana_dashboard_and_prometheus_example_use_exported_names() {
    let dashboard: Value = serde_json::from_str(include_str!(
        "../examples/monitoring/grafana-dashboard.json"
    ))
    .unwrap();
    // Counted in telemetry, or copied in at scrape time by admin::metrics.
    let exported = concat!(
        include_str!("../src/telemetry.rs"),
        include_str!("../src/admin/metrics.rs")
    );
    let mut names = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(at) = rest.find("hyperion_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                names.push(name.trim_end_matches("_bucket").to_owned());
            }
        }
    }
    assert!(names.len() >= 10, "{names:?}");
    for name in names {
        assert!(
            exported.contains(&format!("\"{name}\"")),
            "the dashboard uses {name}, which telemetry does not export"
        );
    }
    let scrape = include_str!("../examples/monitoring/prometheus.yml");
    assert!(scrape.contains("metrics_path: /metrics") && scrape.contains("127.0.0.1:9090"));
}
