//! What a key's tier gives it (`[tiers.NAME]`, `[keys.NAME]`): request and
//! token budgets per key, requests in progress at once, and its class and
//! share in the line in front of a busy upstream.

mod support;

use std::time::Duration;

use http::Request;
use support::*;

/// A keyed proxy (`support::keyed_proxy`) with `tiers` (TOML tables) and
/// one route to `upstream`, whose upstream table gets `pool` lines and
/// whose route `route` lines.
async fn setup(
    upstream: &str,
    keys: &[(&str, Option<&str>)],
    tiers: &str,
    pool: &str,
    route: &str,
) -> Keyed {
    let rest = format!(
        "{tiers}\n\n[upstreams.up]\nservers = [{{ url = \"{upstream}\" }}]\n{pool}\n\n[[route]]\nname = \"all\"\nupstream = \"up\"\n{route}\n"
    );
    keyed_proxy(keys, &rest).await
}

fn post(proxy: &TestProxy, key: &str, body: &'static str) -> Request<TestBody> {
    Request::post(proxy.url("/api/generate"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(full(body))
        .unwrap()
}

async fn status(proxy: &TestProxy, key: &str) -> (u16, serde_json::Value) {
    let (parts, body) = send(post(proxy, key, "{\"model\":\"m\",\"prompt\":\"hi\"}")).await;
    let body = if parts.status.is_success() {
        serde_json::Value::Null
    } else {
        json(&body)
    };
    (parts.status.as_u16(), body)
}

#[tokio::test]
async fn a_tiers_request_budget_is_each_keys_and_a_keys_own_terms_go_over_it() {
    let up = Upstream::echo().await;
    let s = setup(
        &up.url(),
        &[
            ("a", Some("free")),
            ("b", Some("free")),
            ("c", Some("free")),
            ("d", None),
        ],
        "[tiers.free]\nrate = \"2/min\"\n\n[keys.c]\nrate = \"3/min\"",
        "",
        "",
    )
    .await;
    let keys = &s.keys;
    let p = &s.proxy;
    for _ in 0..2 {
        assert_eq!(status(p, &keys[0]).await.0, 200);
    }
    let (refused, body) = status(p, &keys[0]).await;
    assert_eq!(refused, 429);
    assert_eq!(body["error"]["code"], "rate_limited");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("tier.free.rate"));
    // Another key of the tier has its own budget.
    assert_eq!(status(p, &keys[1]).await.0, 200);
    // `c` has three.
    for _ in 0..3 {
        assert_eq!(status(p, &keys[2]).await.0, 200);
    }
    assert_eq!(status(p, &keys[2]).await.0, 429);
    // No tier and no `default` tier: no budget.
    for _ in 0..5 {
        assert_eq!(status(p, &keys[3]).await.0, 200);
    }
}

#[tokio::test]
async fn a_daily_token_budget_settles_from_the_answers_usage() {
    let up = ollama_json().await;
    let s = setup(
        &up.url(),
        &[("a", None), ("b", None)],
        "[tiers.default]\ntokens_per_day = 200",
        "",
        "",
    )
    .await;
    let keys = &s.keys;
    let body = r#"{"model":"m","prompt":"hi","options":{"num_predict":20}}"#;
    // Each answer used 80, settled after the reservation of 34 showed.
    for remaining in ["166", "86", "6"] {
        let (parts, _) = send(post(&s.proxy, &keys[0], body)).await;
        assert_eq!(parts.status, 200);
        assert_eq!(parts.headers["ratelimit-limit"], "200");
        assert_eq!(parts.headers["ratelimit-remaining"], remaining);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (refused, text) = send(post(&s.proxy, &keys[0], body)).await;
    assert_eq!(refused.status, 429);
    assert!(String::from_utf8_lossy(&text).contains("tier.default.tokens_per_day"));
    // 74 tokens over a budget of 200 a day: 432 s a token.
    let retry: u64 = refused.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry > 30_000, "{retry}");
    // `b`'s budget is its own.
    assert_eq!(send(post(&s.proxy, &keys[1], body)).await.0.status, 200);
    assert_eq!(up.count(), 4);
}

#[tokio::test]
async fn a_key_past_max_concurrent_is_refused_until_one_ends() {
    let (up, release) = held_upstream().await;
    let s = setup(
        &up.url(),
        &[("a", None), ("b", None)],
        "[tiers.default]\nmax_concurrent = 1",
        "",
        "",
    )
    .await;
    let keys = &s.keys;
    let first = tokio::spawn(send(post(&s.proxy, &keys[0], "{}")));
    until("the first reached the upstream", || async {
        up.count() == 1
    })
    .await;
    let (refused, body) = status(&s.proxy, &keys[0]).await;
    assert_eq!(refused, 429);
    assert_eq!(body["error"]["code"], "too_many_concurrent");
    // Another key is not affected.
    let other = tokio::spawn(send(post(&s.proxy, &keys[1], "{}")));
    until("b reached the upstream", || async { up.count() == 2 }).await;
    release.add_permits(2);
    assert_eq!(first.await.unwrap().0.status, 200);
    assert_eq!(other.await.unwrap().0.status, 200);
    release.add_permits(1);
    assert_eq!(
        status(&s.proxy, &keys[0]).await.0,
        200,
        "its slot came back"
    );
}

#[tokio::test]
async fn an_interactive_tier_goes_before_batch_and_a_header_asks_only_as_high_as_allowed() {
    let (up, release) = held_upstream().await;
    let s = setup(
        &up.url(),
        &[
            ("batch", Some("bulk")),
            ("chat", Some("live")),
            ("std", None),
        ],
        "[tiers.bulk]\npriority = \"batch\"\n\n[tiers.live]\npriority = \"interactive\"",
        "max_inflight_per_server = 1\nqueue_timeout = \"60s\"",
        "",
    )
    .await;
    let keys = &s.keys;
    let p = &s.proxy;
    let sent = |key: &str, who: &str, class: Option<&str>| {
        let mut req = Request::post(p.url("/api/generate"))
            .header("authorization", format!("Bearer {key}"))
            .header("x-who", who);
        if let Some(class) = class {
            req = req.header("x-hyperion-priority", class);
        }
        tokio::spawn(send(req.body(full("{}")).unwrap()))
    };
    let first = sent(&keys[0], "batch-0", None);
    until("one in flight", || async { up.count() == 1 }).await;
    let mut waiting = vec![first];
    waiting.push(sent(&keys[0], "batch-1", None));
    until("1 in line", || async { queued(p, "up").await == 1 }).await;
    // `std` asks for interactive; its tier (none) allows standard at most.
    waiting.push(sent(&keys[2], "std-asked-interactive", Some("interactive")));
    until("2 in line", || async { queued(p, "up").await == 2 }).await;
    waiting.push(sent(&keys[1], "chat", None));
    until("3 in line", || async { queued(p, "up").await == 3 }).await;
    release.add_permits(4);
    for w in waiting {
        assert_eq!(w.await.unwrap().0.status, 200);
    }
    let order: Vec<String> = up
        .seen()
        .iter()
        .map(|s| s.headers["x-who"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        order,
        ["batch-0", "chat", "std-asked-interactive", "batch-1"],
        "interactive, then standard, then batch"
    );
    // The header is Hyperion's: the upstream never sees it.
    assert!(up
        .seen()
        .iter()
        .all(|s| !s.headers.contains_key("x-hyperion-priority")));
}

#[test]
fn tier_mistakes_name_their_line_and_fix() {
    let base = "[auth]\nkeys_file = \"k.toml\"\n\n[upstreams.up]\nservers = [{ url = \"http://127.0.0.1:1\" }]\n\n[[route]]\nname = \"r\"\nupstream = \"up\"\n";
    let err = |extra: &str| {
        hyperion::Policy::parse("proxy.toml", &format!("{extra}\n{base}"))
            .unwrap_err()
            .to_string()
    };
    let e = err("[tiers.free]\nweight = 0");
    assert!(
        e.contains("proxy.toml:2:") && e.contains("tiers.free.weight"),
        "{e}"
    );
    let e = err("[tiers.free]\npriority = \"interactive\"\nmax_priority = \"batch\"");
    assert!(
        e.contains("tiers.free.max_priority") && e.contains("below"),
        "{e}"
    );
    let e = err("[keys.alice]\ntokens_per_day = 0");
    assert!(e.contains("keys.alice.tokens_per_day"), "{e}");
    let e = err("[tiers.free]\npriority = \"urgent\"");
    assert!(
        e.contains("tiers.free.priority") || e.contains("urgent"),
        "{e}"
    );
    let no_auth = hyperion::Policy::parse(
        "proxy.toml",
        &format!(
            "[tiers.free]\nweight = 2\n{}",
            base.replace("[auth]\nkeys_file = \"k.toml\"\n", "")
        ),
    )
    .unwrap_err()
    .to_string();
    assert!(no_auth.contains("[auth]"), "{no_auth}");
}

#[tokio::test]
async fn usage_counts_the_backends_tokens_for_misses_and_saves_them_for_hits_and_followers() {
    // Ollama's answer: 30 prompt tokens read, 50 generated; held until
    // the test lets it go, so that identical requests join it.
    let (up, release) = held_upstream_with(OLLAMA_ANSWER).await;
    let s = setup(
        &up.url(),
        &[("a", None)],
        "",
        "",
        "[route.cache]\nmode = \"force\"\nttl = \"1h\"\nbody_key = \"json\"",
    )
    .await;
    let keys = &s.keys;
    let p = &s.proxy;
    let cached = |prompt: &'static str| {
        let req = Request::post(p.url("/api/generate"))
            .header("authorization", format!("Bearer {}", keys[0]))
            .header("content-type", "application/json")
            .body(full(prompt))
            .unwrap();
        tokio::spawn(send(req))
    };
    // A miss, then a hit of it.
    release.add_permits(1);
    let (miss, _) = cached(r#"{"model":"m","prompt":"one"}"#).await.unwrap();
    assert_eq!(miss.headers["x-cache"], "MISS");
    let (hit, _) = cached(r#"{"model":"m","prompt":"one"}"#).await.unwrap();
    assert_eq!(hit.headers["x-cache"], "HIT");
    // Three at once: one goes upstream, two wait for its answer.
    let three: Vec<_> = (0..3)
        .map(|_| cached(r#"{"model":"m","prompt":"two"}"#))
        .collect();
    until("the leader reached the upstream", || async {
        up.count() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    release.add_permits(1);
    for r in three {
        assert_eq!(r.await.unwrap().0.status, 200);
    }
    assert_eq!(up.count(), 2);
    let mut usage = serde_json::Value::Null;
    for _ in 0..100 {
        usage = keyed_admin(p, "/admin/keys/a").await["usage"].clone();
        if usage["tokens_saved"] == 240 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(usage["requests"], 5, "{usage}");
    assert_eq!(usage["cache_hits"], 3, "{usage}");
    assert_eq!(usage["tokens_in"], 60, "two answers made: {usage}");
    assert_eq!(usage["tokens_out"], 100, "{usage}");
    assert_eq!(
        usage["tokens_saved"], 240,
        "three answers not made: {usage}"
    );
    assert!(usage["upstream_seconds_saved"].as_f64().unwrap() > 0.0);
    let cache = keyed_admin(p, "/admin/cache").await;
    assert_eq!(cache["coalesced"], 2, "{cache}");
    assert_eq!(
        cache["tokens_saved"], 240,
        "the cache says the same: {cache}"
    );
    // A request without a good key is counted, against no key.
    assert_eq!(status(p, "hyp_wrong").await.0, 401);
    let all = keyed_admin(p, "/admin/keys").await;
    assert_eq!(all["unauthorized"], 1);
    let (_, metrics) = get(&format!("http://{}/metrics", p.admin.unwrap())).await;
    let metrics = String::from_utf8_lossy(&metrics).into_owned();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("hyperion_key_tokens_total{")
                && l.contains("key=\"a\"")
                && l.contains("kind=\"saved\"")),
        "{metrics}"
    );
}
