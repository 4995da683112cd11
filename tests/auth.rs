//! API keys issued by Hyperion (`[auth]`, `hyperion keys`): what a client
//! without a good key gets, what the upstream sees, and a revoked key.

mod support;

use http::{Method, Request};
use hyperion::auth::KeysFileAt;
use support::*;

/// A policy with `[auth]` over `keys`, one route to `upstream` with `route`
/// extra lines, and a second route `/open/` with `auth = "off"`.
fn auth_policy(upstream: &str, keys: &TempFile, route: &str) -> String {
    format!(
        r#"[auth]
keys_file = "{keys}"

[upstreams.up]
servers = [{{ url = "{upstream}" }}]

[[route]]
name = "open"
match = {{ path_prefix = "/open/" }}
upstream = "up"
auth = "off"

[[route]]
name = "all"
upstream = "up"
{route}
"#,
        keys = keys.display()
    )
}

fn keys_file() -> TempFile {
    let file = TempFile::new("keys.toml", "");
    std::fs::remove_file(&file.0).unwrap();
    file
}

async fn with_key(
    proxy: &TestProxy,
    path: &str,
    header: Option<(&str, String)>,
) -> (http::response::Parts, bytes::Bytes) {
    let mut req = Request::builder().method(Method::POST).uri(proxy.url(path));
    if let Some((name, value)) = header {
        req = req.header(name, value);
    }
    send(
        req.body(full("{\"model\":\"m\",\"prompt\":\"hi\"}"))
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn a_request_without_a_good_key_gets_401_and_reaches_nothing() {
    let up = Upstream::echo().await;
    let keys = keys_file();
    let key = KeysFileAt(keys.0.clone()).add("alice", None).unwrap();
    let proxy = TestProxy::start(&auth_policy(&up.url(), &keys, "")).await;

    for header in [
        None,
        Some(("authorization", "Bearer hyp_0000".to_owned())),
        Some(("authorization", format!("Bearer {key}x"))),
        Some(("x-api-key", "not-a-key".to_owned())),
    ] {
        let presented = header.is_some();
        let (parts, body) = with_key(&proxy, "/api/generate", header).await;
        assert_eq!(parts.status, 401);
        assert_eq!(
            parts.headers["www-authenticate"],
            "Bearer realm=\"hyperion\""
        );
        // OpenAI's error shape: its clients raise AuthenticationError.
        let body = json(&body);
        assert_eq!(body["error"]["code"], "invalid_api_key");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(body["error"]["param"].is_null());
        let message = body["error"]["message"].as_str().unwrap();
        assert_eq!(message.contains("not valid"), presented, "{message}");
    }
    assert_eq!(up.count(), 0, "nothing reached the upstream");
}

#[tokio::test]
async fn a_good_key_passes_in_each_clients_header_and_never_reaches_the_upstream() {
    let up = Upstream::echo().await;
    let keys = keys_file();
    let key = KeysFileAt(keys.0.clone())
        .add("alice", Some("pro"))
        .unwrap();
    let proxy = TestProxy::start(&auth_policy(&up.url(), &keys, "")).await;

    for header in ["authorization", "x-api-key", "api-key"] {
        let value = if header == "authorization" {
            format!("Bearer {key}")
        } else {
            key.clone()
        };
        let (parts, _) = with_key(&proxy, "/api/generate", Some((header, value))).await;
        assert_eq!(parts.status, 200, "{header}");
        // The access log names the key, never shows it.
        let id = parts.headers["x-request-id"].to_str().unwrap().to_owned();
        let line = proxy.log_for(&id).await;
        assert_eq!(line["key"], "alice");
        assert!(!line.to_string().contains(&key[4..]));
        let seen = up.last();
        for name in ["authorization", "x-api-key", "api-key"] {
            assert!(
                !seen.headers.contains_key(name),
                "{name} reached the upstream"
            );
        }
    }
    // A route with auth = "off" neither asks for a key nor removes one.
    let (parts, _) = with_key(
        &proxy,
        "/open/x",
        Some(("authorization", "Basic dXNlcjpwYXNz".to_owned())),
    )
    .await;
    assert_eq!(parts.status, 200);
    assert_eq!(up.last().headers["authorization"], "Basic dXNlcjpwYXNz");
}

#[tokio::test]
async fn optional_takes_no_key_but_refuses_a_wrong_one() {
    let up = Upstream::echo().await;
    let keys = keys_file();
    let proxy = TestProxy::start(&auth_policy(&up.url(), &keys, "auth = \"optional\"")).await;
    let (parts, _) = with_key(&proxy, "/x", None).await;
    assert_eq!(parts.status, 200);
    let (parts, _) = with_key(&proxy, "/x", Some(("x-api-key", "hyp_nope".into()))).await;
    assert_eq!(parts.status, 401);
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn a_key_added_or_revoked_counts_within_seconds_without_a_reload() {
    let up = Upstream::echo().await;
    let keys = keys_file();
    let file = KeysFileAt(keys.0.clone());
    let alice = file.add("alice", None).unwrap();
    let policy = TempFile::new("policy.toml", &auth_policy(&up.url(), &keys, ""));
    let proxy = TestProxy::start_file(&policy.0).await;
    let bearer = |k: &str| Some(("authorization", format!("Bearer {k}")));
    assert_eq!(with_key(&proxy, "/x", bearer(&alice)).await.0.status, 200);

    let bob = file.add("bob", None).unwrap();
    file.revoke("alice").unwrap();
    // The file is looked at every couple of seconds.
    let switched = async {
        loop {
            let bob_in = with_key(&proxy, "/x", bearer(&bob)).await.0.status == 200;
            let alice_out = with_key(&proxy, "/x", bearer(&alice)).await.0.status == 401;
            if bob_in && alice_out {
                return;
            }
            // Not faster: each try of bob's key fails until then, and an
            // address failing 20 times a minute is refused for a while.
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    };
    tokio::time::timeout(PATIENCE, switched)
        .await
        .expect("the keys file is followed");
    // A file that no longer parses leaves the keys as they were.
    std::fs::write(&keys.0, "[[key]]\nname = 1\n").unwrap();
    tokio::time::sleep(hyperion::auth::WATCH_EVERY * 2).await;
    assert_eq!(with_key(&proxy, "/x", bearer(&bob)).await.0.status, 200);
    // And a reload reads it too (refused here: the file is broken).
    assert!(proxy.reload().await.is_err());
}

#[tokio::test]
async fn a_keys_entries_are_its_own_unless_the_route_shares() {
    let up = Upstream::echo().await;
    let keys = keys_file();
    let file = KeysFileAt(keys.0.clone());
    let (a, b) = (file.add("a", None).unwrap(), file.add("b", None).unwrap());
    let proxy = TestProxy::start(&auth_policy(
        &up.url(),
        &keys,
        "[route.cache]\nmode = \"force\"\nttl = \"1h\"\nbody_key = \"json\"",
    ))
    .await;
    let bearer = |k: &str| Some(("authorization", format!("Bearer {k}")));
    assert_eq!(
        with_key(&proxy, "/x", bearer(&a)).await.0.headers["x-cache"],
        "MISS"
    );
    assert_eq!(
        with_key(&proxy, "/x", bearer(&a)).await.0.headers["x-cache"],
        "HIT"
    );
    assert_eq!(
        with_key(&proxy, "/x", bearer(&b)).await.0.headers["x-cache"],
        "MISS"
    );
    assert_eq!(up.count(), 2);
    // The entries are the key's, whichever header carried it.
    assert_eq!(
        with_key(&proxy, "/x", Some(("x-api-key", a.clone())))
            .await
            .0
            .headers["x-cache"],
        "HIT"
    );
    // scope = "shared" shares across keys, as it says.
    let shared = TestProxy::start(&auth_policy(
        &up.url(),
        &keys,
        "[route.cache]\nmode = \"force\"\nttl = \"1h\"\nbody_key = \"json\"\nscope = \"shared\"",
    ))
    .await;
    assert_eq!(
        with_key(&shared, "/x", bearer(&a)).await.0.headers["x-cache"],
        "MISS"
    );
    assert_eq!(
        with_key(&shared, "/x", bearer(&b)).await.0.headers["x-cache"],
        "HIT"
    );
}

#[test]
fn auth_on_a_route_needs_an_auth_table() {
    let text = simple_policy("http://127.0.0.1:1", "", "auth = \"required\"");
    let err = hyperion::Policy::parse("proxy.toml", &text)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("proxy.toml:")
            && err.contains("route[0] (all).auth")
            && err.contains("[auth]"),
        "{err}"
    );
}

#[test]
fn the_binary_makes_lists_and_revokes_keys() {
    let keys = keys_file();
    let policy = auth_policy("http://127.0.0.1:1", &keys, "").replace(
        "[upstreams.up]",
        "[tiers.pro]\nweight = 4\n\n[upstreams.up]",
    );
    let policy = TempFile::new("policy.toml", &policy);
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_hyperion"))
            .args(args)
            .arg("--config")
            .arg(&policy.0)
            .output()
            .unwrap()
    };
    let typo = run(&["keys", "add", "alice", "--tier", "prod"]);
    assert!(!typo.status.success(), "a tier the policy lacks is refused");
    assert!(String::from_utf8_lossy(&typo.stderr).contains("defines pro"));
    let added = run(&["keys", "add", "alice", "--tier", "pro"]);
    assert!(added.status.success(), "{added:?}");
    let key = String::from_utf8(added.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("hyp_") && key.len() == 52, "{key}");
    let text = std::fs::read_to_string(&keys.0).unwrap();
    assert!(!text.contains(&key[4..]), "only the digest is kept");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&keys.0).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "readable by its owner only: {mode:o}");
    }
    let listed = run(&["keys", "list"]);
    let listed = String::from_utf8(listed.stdout).unwrap();
    assert!(listed.starts_with("alice\tpro\t"), "{listed}");
    // A tier the policy stops defining: `check` names its keys.
    let text = std::fs::read_to_string(&policy.0).unwrap();
    policy.write(&text.replace("[tiers.pro]", "[tiers.premium]"));
    let checked = String::from_utf8(run(&["check"]).stdout).unwrap();
    assert!(
        checked.contains("warning: keys of a tier") && checked.contains("alice (pro)"),
        "{checked}"
    );
    policy.write(&text);
    assert!(
        !run(&["keys", "add", "alice"]).status.success(),
        "names are unique"
    );
    assert!(run(&["keys", "revoke", "alice"]).status.success());
    assert_eq!(
        String::from_utf8(run(&["keys", "list"]).stdout).unwrap(),
        ""
    );
}

#[tokio::test]
async fn an_address_that_keeps_failing_is_refused_for_a_while() {
    let up = Upstream::echo().await;
    let keys = keys_file();
    let key = KeysFileAt(keys.0.clone()).add("alice", None).unwrap();
    let proxy = TestProxy::start(&auth_policy(&up.url(), &keys, "")).await;
    let per_minute = hyperion::protect::FAILED_KEYS_PER_MINUTE;
    for _ in 0..per_minute {
        let wrong = Some(("x-api-key", "hyp_guess".to_owned()));
        assert_eq!(with_key(&proxy, "/x", wrong).await.0.status, 401);
    }
    // Even a good key waits now: the address is refused before its key is
    // looked at.
    let (parts, body) = with_key(&proxy, "/x", Some(("x-api-key", key.clone()))).await;
    assert_eq!(parts.status, 429);
    assert_eq!(json(&body)["error"]["code"], "rate_limited");
    let wait: u64 = parts.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=3).contains(&wait),
        "one failure comes back every 3 s: {wait}"
    );
    // Routes that take no keys are not gated.
    assert_eq!(with_key(&proxy, "/open/x", None).await.0.status, 200);
    // Time heals.
    proxy.advance(std::time::Duration::from_secs(4));
    assert_eq!(
        with_key(&proxy, "/x", Some(("x-api-key", key)))
            .await
            .0
            .status,
        200
    );
    assert_eq!(up.count(), 2);
}

#[tokio::test]
async fn a_pool_sends_its_own_credential_instead_of_the_clients() {
    let up = Upstream::echo().await;
    let keys = keys_file();
    let key = KeysFileAt(keys.0.clone()).add("alice", None).unwrap();
    // Read once, when the policy is: a name no other test uses.
    std::env::set_var("HYPERION_TEST_POOL_KEY", "sk-pool-secret\n");
    let policy = auth_policy(&up.url(), &keys, "").replace(
        "servers = [",
        "model_routing = \"discover\"\nauth_header = { env = \"HYPERION_TEST_POOL_KEY\" }\nservers = [",
    );
    let proxy = TestProxy::start(&policy).await;
    let (parts, _) = with_key(
        &proxy,
        "/x",
        Some(("authorization", format!("Bearer {key}"))),
    )
    .await;
    assert_eq!(parts.status, 200);
    let seen = up.last();
    assert_eq!(seen.headers["authorization"], "Bearer sk-pool-secret");
    // The pool's model list is asked for with it too.
    let listed = async {
        loop {
            if let Some(s) = up.seen().iter().find(|s| s.uri.path() == "/api/tags") {
                return s.headers.get("authorization").cloned();
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    let sent = tokio::time::timeout(PATIENCE, listed).await.unwrap();
    assert_eq!(sent.unwrap(), "Bearer sk-pool-secret");
    // Never shown: not by check's summary, not by the policy's Debug.
    let summary = format!("{:?}", proxy.reloader.current().policy);
    assert!(!summary.contains("sk-pool-secret"));
}

#[test]
fn a_pool_credential_comes_from_a_file_under_any_header_name() {
    let secret = TempFile::new("pool.key", "k-123\n");
    let text = simple_policy("http://127.0.0.1:1", "", "").replace(
        "servers = [",
        &format!(
            "auth_header = {{ name = \"x-api-key\", file = \"{}\" }}\nservers = [",
            secret.display()
        ),
    );
    let policy = hyperion::Policy::parse("proxy.toml", &text).unwrap();
    let c = policy.upstreams[0].servers[0].credential.as_ref().unwrap();
    assert_eq!(
        (c.name.as_str(), c.value.to_str().unwrap()),
        ("x-api-key", "k-123")
    );
    let missing = simple_policy("http://127.0.0.1:1", "", "").replace(
        "servers = [",
        "auth_header = { env = \"HYPERION_TEST_NOT_SET\" }\nservers = [",
    );
    let err = hyperion::Policy::parse("proxy.toml", &missing)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("upstreams.up.auth_header.env") && err.contains("HYPERION_TEST_NOT_SET"),
        "{err}"
    );
}

/// A policy with a limiter of 2 requests a minute keyed by `key` (plus
/// `extra` lines), trusting loopback's X-Forwarded-For.
fn limited_policy(upstream: &str, keys: &TempFile, key: &str, extra: &str) -> String {
    auth_policy(upstream, keys, "rate_limit = [\"two\"]\nauth = \"optional\"").replace(
        "[upstreams.up]",
        &format!(
            "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\n[rate_limits.two]\nkey = \"{key}\"\nrate = \"2/min\"\n{extra}\n\n[upstreams.up]"
        ),
    )
}

async fn from(proxy: &TestProxy, ip: &str, header: Option<(&str, String)>) -> u16 {
    let mut req = Request::get(proxy.url("/x")).header("x-forwarded-for", ip);
    if let Some((name, value)) = header {
        req = req.header(name, value);
    }
    send(req.body(empty()).unwrap()).await.0.status.as_u16()
}

#[tokio::test]
async fn a_request_without_the_limiters_header_spends_from_its_own_address() {
    let up = Upstream::echo().await;
    let keys = keys_file();
    let proxy = TestProxy::start(&limited_policy(&up.url(), &keys, "header:x-user", "")).await;
    // Two anonymous clients do not share one bucket.
    assert_eq!(from(&proxy, "10.0.0.1", None).await, 200);
    assert_eq!(from(&proxy, "10.0.0.1", None).await, 200);
    assert_eq!(from(&proxy, "10.0.0.1", None).await, 429);
    assert_eq!(from(&proxy, "10.0.0.2", None).await, 200);
    // A header value is its own bucket, apart from any address's.
    assert_eq!(
        from(&proxy, "10.0.0.1", Some(("x-user", "u".into()))).await,
        200
    );

    let shared = limited_policy(
        &up.url(),
        &keys,
        "header:x-user",
        "when_absent = \"shared\"",
    );
    let proxy = TestProxy::start(&shared).await;
    assert_eq!(from(&proxy, "10.0.0.1", None).await, 200);
    assert_eq!(from(&proxy, "10.0.0.2", None).await, 200);
    assert_eq!(
        from(&proxy, "10.0.0.3", None).await,
        429,
        "one bucket for all"
    );
}

#[tokio::test]
async fn a_tenant_keyed_limiter_gives_each_key_its_bucket_wherever_it_calls_from() {
    let up = Upstream::echo().await;
    let keys = keys_file();
    let file = KeysFileAt(keys.0.clone());
    let (a, b) = (file.add("a", None).unwrap(), file.add("b", None).unwrap());
    let proxy = TestProxy::start(&limited_policy(&up.url(), &keys, "tenant", "")).await;
    let bearer = |k: &str| Some(("authorization", format!("Bearer {k}")));
    assert_eq!(from(&proxy, "10.0.0.1", bearer(&a)).await, 200);
    assert_eq!(from(&proxy, "10.0.0.2", bearer(&a)).await, 200);
    assert_eq!(
        from(&proxy, "10.0.0.3", bearer(&a)).await,
        429,
        "one bucket per key"
    );
    assert_eq!(from(&proxy, "10.0.0.1", bearer(&b)).await, 200);
    // Without a key (auth = "optional" here): the address's bucket.
    assert_eq!(from(&proxy, "10.0.0.9", None).await, 200);
    let err = hyperion::Policy::parse(
        "proxy.toml",
        &simple_policy("http://127.0.0.1:1", "", "").replace(
            "[upstreams.up]",
            "[rate_limits.t]\nkey = \"tenant\"\nrate = \"1/s\"\n\n[upstreams.up]",
        ),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("rate_limits.t.key") && err.contains("[auth]"),
        "{err}"
    );
}

#[tokio::test]
async fn each_keys_usage_is_shown_on_the_admin_api() {
    let up = Upstream::echo().await;
    let keys = keys_file();
    let file = KeysFileAt(keys.0.clone());
    let (a, _b) = (
        file.add("a", Some("pro")).unwrap(),
        file.add("b", None).unwrap(),
    );
    let token = TempFile::new("admin.token", "0123456789abcdef-usage-token\n");
    let policy = auth_policy(
        &up.url(),
        &keys,
        "[route.cache]\nmode = \"force\"\nttl = \"1h\"\nbody_key = \"json\"",
    )
    .replace(
        "[upstreams.up]",
        &format!(
            "[admin]\nlisten = \"127.0.0.1:9\"\ntoken_file = \"{}\"\n\n[upstreams.up]",
            token.display()
        ),
    );
    let proxy = TestProxy::start(&policy).await;
    let bearer = |k: &str| Some(("authorization", format!("Bearer {k}")));
    for _ in 0..3 {
        assert_eq!(with_key(&proxy, "/x", bearer(&a)).await.0.status, 200);
    }
    let admin = |path: &str| {
        let url = format!("http://{}{path}", proxy.admin.unwrap());
        send(
            Request::get(url)
                .header("authorization", "Bearer 0123456789abcdef-usage-token")
                .body(empty())
                .unwrap(),
        )
    };
    let (parts, body) = admin("/admin/keys").await;
    assert_eq!(parts.status, 200);
    let body = json(&body);
    let listed: Vec<&str> = body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["a", "b"]);
    let (parts, body) = admin("/admin/keys/a").await;
    assert_eq!(parts.status, 200);
    let a_report = json(&body);
    assert_eq!(a_report["tier"], "pro");
    assert_eq!(a_report["usage"]["requests"], 3);
    assert_eq!(a_report["usage"]["cache_hits"], 2);
    assert_eq!(
        json(&admin("/admin/keys/b").await.1)["usage"]["requests"],
        0
    );
    assert_eq!(admin("/admin/keys/nobody").await.0.status, 404);
    let (_, metrics) = send(
        Request::get(format!("http://{}/metrics", proxy.admin.unwrap()))
            .body(empty())
            .unwrap(),
    )
    .await;
    let metrics = String::from_utf8_lossy(&metrics).into_owned();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("hyperion_key_requests_total{")
                && l.contains("key=\"a\"")
                && l.contains("class=\"2xx\"")),
        "{metrics}"
    );
    // Never a key or its digest.
    assert!(!String::from_utf8_lossy(&body).contains(&a[4..]));
}
