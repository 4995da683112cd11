//! The policy file: the shipped default, the reference shape, and every kind
//! of mistake an operator can make, as `hyperion check` reports it.

mod support;

use std::process::Command;

use hyperion::Policy;

fn error_of(text: &str) -> String {
    match Policy::parse("proxy.toml", text) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e.to_string(),
    }
}

const FLEET_SECRET: &str = "0123456789abcdef0123456789abcdef-test-fleet";

const UPSTREAM: &str = "[upstreams.ollama]\nservers = [{ url = \"http://127.0.0.1:11434\" }]\n";
const ROUTE: &str = "[[route]]\nname = \"all\"\nupstream = \"ollama\"\n";

#[test]
fn the_shipped_proxy_toml_is_valid() {
    let policy = Policy::load(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/proxy.toml"
    )))
    .unwrap();
    assert_eq!(
        policy.server.listen,
        vec!["127.0.0.1:8080".parse().unwrap()]
    );
    let ollama = policy.upstream("ollama").unwrap();
    assert_eq!(&*ollama.servers[0].url, "http://127.0.0.1:11434");
    assert_eq!(policy.routes.len(), 5);
    assert!(policy.routes[0].deny && policy.routes[1].deny);
}

#[test]
fn every_key_of_the_reference_shape_parses() {
    // POLICY.md's reference, every key of it, is what this version reads.
    // Its files and secrets are the operator's: stand-ins here, so only the
    // keys themselves are judged.
    let ca = support::TestCa::new("reference");
    let (cert, key) = ca.issue_pem();
    let (cert, key) = (
        support::TempFile::new("cert.pem", &cert),
        support::TempFile::new("key.pem", &key),
    );
    let token = support::TempFile::new("admin.token", "a-long-enough-admin-token");
    let secret = support::TempFile::new("redis.secret", FLEET_SECRET);
    let reference = include_str!("fixtures/policy_reference.toml")
        .replace("/etc/hyperion/tls/cert.pem", &cert.display())
        .replace("/etc/hyperion/tls/key.pem", &key.display())
        .replace(
            "token_env = \"HYPERION_ADMIN_TOKEN\"",
            &format!("token_file = \"{}\"", token.display()),
        )
        // The shared tier needs its secret since issue 28.
        .replace(
            "url = \"redis://127.0.0.1:6379/0\"",
            &format!(
                "url = \"redis://127.0.0.1:6379/0\"\nsecret_file = \"{}\"",
                secret.display()
            ),
        );
    let policy = Policy::parse("proxy.toml", &reference).unwrap_or_else(|e| panic!("{e}"));
    let redis = policy.cache.redis.as_ref().expect("[cache.redis]");
    assert_eq!(redis.key_prefix, "hyperion:");
    assert_eq!(redis.timeout, std::time::Duration::from_millis(50));
}

#[test]
fn shared_tier_mistakes_name_their_line() {
    let cases = [
        (
            "url = \"rediss://cache.internal:6380/0\"\n",
            "cache.redis.secret_file: the shared tier needs a secret",
        ),
        (
            "url = \"redis://127.0.0.1/0\"\nsecret_env = \"HYPERION_TEST_UNSET_SECRET\"\n",
            "cache.redis.secret_env: the environment variable HYPERION_TEST_UNSET_SECRET is not set",
        ),
        (
            "url = \"redis://127.0.0.1/0\"\nsecret_file = \"/nonexistent/redis.secret\"\n",
            "cache.redis.secret_file: cannot read /nonexistent/redis.secret",
        ),
        (
            "url = \"http://127.0.0.1:6379\"\n",
            "cache.redis.url: not a Redis URL",
        ),
        (
            "url = \"redis://127.0.0.1/0\"\nkey_prefix = \"my fleet\"\n",
            "cache.redis.key_prefix: a prefix must be 1 to 64 characters",
        ),
        (
            "url = \"redis://127.0.0.1/0\"\ntimeout = \"30s\"\n",
            "cache.redis.timeout: 30s is not between 1ms and 10s",
        ),
    ];
    for (keys, expected) in cases {
        let text = format!("[cache]\nmax_size = \"256MB\"\n[cache.redis]\n{keys}{UPSTREAM}{ROUTE}");
        let err = error_of(&text);
        // A missing secret is the table's mistake, found at its header.
        let line = if expected.contains("needs a secret") {
            3
        } else {
            4 + keys.lines().count() - 1
        };
        assert!(err.starts_with(&format!("proxy.toml:{line}:")), "{err}");
        assert!(err.contains(expected), "{err}");
    }
    let short = support::TempFile::new("short.secret", "too short\n");
    let err = error_of(&format!(
        "[cache.redis]\nurl = \"redis://127.0.0.1/0\"\nsecret_file = \"{}\"\n{UPSTREAM}{ROUTE}",
        short.display()
    ));
    assert!(err.starts_with("proxy.toml:3:"), "{err}");
    assert!(
        err.contains("the secret is 9 bytes long; at least 32 are needed"),
        "{err}"
    );
    let secret = support::TempFile::new("redis.secret", FLEET_SECRET);
    let err = error_of(&format!(
        "[cache.redis]\nurl = \"redis://127.0.0.1/0\"\nsecret_file = \"{}\"\nca_file = \"ca.pem\"\n{UPSTREAM}{ROUTE}",
        secret.display()
    ));
    assert!(err.starts_with("proxy.toml:4:"), "{err}");
    assert!(
        err.contains("ca_file only applies to TLS (rediss://)"),
        "{err}"
    );
    let ok = Policy::parse(
        "p",
        &format!(
            "[cache.redis]\nurl = \"redis://app:pw@127.0.0.1:6379/2\"\nsecret_file = \"{}\"\n{UPSTREAM}{ROUTE}",
            secret.display()
        ),
    )
    .unwrap();
    let summary = ok.to_string();
    assert!(
        summary.contains("signed with the secret from file"),
        "{summary}"
    );
    assert!(!summary.contains(FLEET_SECRET), "{summary}");
    assert!(
        summary.contains("redis://app:***@127.0.0.1:6379/2"),
        "{summary}"
    );
    assert!(!summary.contains("pw"), "{summary}");
}

#[test]
fn defaults_this_version_has_are_accepted() {
    Policy::parse(
        "p",
        &format!("{ROUTE}[route.cache]\nmode = \"force\"\nttl = \"5m\"\n{UPSTREAM}"),
    )
    .unwrap();
    // `mode = "off"` alone is what a route without [route.cache] does: accepted.
    Policy::parse(
        "p",
        &format!("{UPSTREAM}{ROUTE}[route.cache]\nmode = \"off\"\n"),
    )
    .unwrap();
    // retries = 0 and round_robin are what this version does: accepted.
    Policy::parse(
        "p",
        &format!("{UPSTREAM}retries = 0\nbalance = \"round_robin\"\n{ROUTE}"),
    )
    .unwrap();
}

#[test]
fn mistakes_name_file_line_column_key_and_fix() {
    let cases: &[(&str, &str)] = &[
        (
            "[server]\nlisen = [\"127.0.0.1:8080\"]\n",
            "proxy.toml:2:1: server.lisen: unknown key `lisen` — did you mean `listen`?",
        ),
        (
            "[server]\nlisten = [\"127.0.0.1:80800\"]\n",
            "proxy.toml:2:10: server.listen: `127.0.0.1:80800` is not a listen address — write IP:PORT",
        ),
        (
            "[server]\nmax_request_body = \"5XB\"\n",
            "proxy.toml:2:20: server.max_request_body: `5XB` has an unknown size unit `XB` — use B, KB, MB or GB",
        ),
        (
            "[server]\nidle_timeout = 75\n",
            "proxy.toml:2:16: server.idle_timeout: invalid type: integer `75`, expected a duration string",
        ),
        (
            "[server]\naccess_log = \"jsn\"\n",
            "proxy.toml:2:14: server.access_log: unknown value `jsn` — did you mean `json`?",
        ),
        ("[server\n", "proxy.toml:1:8: syntax:"),
        (
            "[upstreams.a]\nservers = []\n",
            "proxy.toml:2:11: upstreams.a.servers: no servers — add at least one",
        ),
        (
            "[upstreams.a]\nservers = [{ url = \"127.0.0.1:11434\" }]\n",
            "proxy.toml:2:20: upstreams.a.servers[0].url: `127.0.0.1:11434` has no http:// or https:// scheme",
        ),
        (
            "[upstreams.a]\nservers = [{ url = \"http://x:1\", wieght = 2 }]\n",
            "proxy.toml:2:34: upstreams.a.servers[0].wieght: unknown key `wieght` — did you mean `weight`?",
        ),
        (
            "[upstreams.a]\nservers = [{ url = \"http://x:1/v1\" }]\n",
            "upstreams.a.servers[0].url: `http://x:1/v1` has a path",
        ),
        (
            "[upstreams.ollama]\nservers = [{ url = \"http://x:1\" }]\n[[route]]\nname = \"r\"\nupstream = \"olama\"\n",
            "proxy.toml:5:12: route[0] (r).upstream: no upstream named `olama` — did you mean `ollama`?",
        ),
        (
            "[upstreams.a]\nservers = [{ url = \"http://x:1\" }]\n[[route]]\nname = \"r\"\n",
            "proxy.toml:3:1: route[0] (r).upstream: the route names no upstream",
        ),
        (
            "[upstreams.a]\nservers = [{ url = \"http://x:1\" }]\n[[route]]\nname = \"r\"\nupstream = \"a\"\nmatch = { path_prefx = \"/\" }\n",
            "proxy.toml:6:11: route[0].match.path_prefx: unknown key `path_prefx` — did you mean `path_prefix`?",
        ),
        (
            "[upstreams.a]\nservers = [{ url = \"http://x:1\" }]\n[[route]]\nname = \"r\"\nupstream = \"a\"\nmatch = { methods = [\"GE T\"] }\n",
            "route[0] (r).match.methods: `GE T` is not an HTTP method",
        ),
        (
            "[upstreams.a]\nservers = [{ url = \"http://x:1\" }]\n[[route]]\nname = \"r\"\nupstream = \"a\"\nmatch = { path_prefix = \"api\" }\n",
            "route[0] (r).match.path_prefix: `api` does not start with /",
        ),
        (
            "[upstreams.a]\nservers = [{ url = \"http://x:1\" }]\n[[route]]\nname = \"all\"\nupstream = \"a\"\n[[route]]\nname = \"api\"\nupstream = \"a\"\nmatch = { path_prefix = \"/api/\" }\n",
            "proxy.toml:9:9: route[1] (api).match: this route can never match: route `all` (line 3) comes first",
        ),
        (
            "[upstreams.a]\nservers = [{ url = \"http://x:1\" }]\n[[route]]\nname = \"r\"\nupstream = \"a\"\n[[route]]\nname = \"r\"\nupstream = \"a\"\nmatch = { methods = [\"GET\"] }\n",
            "proxy.toml:7:8: route[1].name: route name `r` is used twice",
        ),
        ("[upstreams.a]\nservers = [{ url = \"http://x:1\" }]\n", "proxy.toml:1:1: route: no routes"),
        (
            "[compression]\ngzip_level = 12\n",
            "proxy.toml:1:1: compression.gzip_level: gzip_level 12 is out of range",
        ),
        (
            "[compression]\nalgorithms = []\n",
            "compression.algorithms: no algorithms",
        ),
        (
            "[compression]\nalgorithms = [\"gzip\", \"gzip\"]\n",
            "compression.algorithms: an algorithm is listed twice",
        ),
        (
            "[compression]\nalgorithms = [\"zstd\"]\n",
            "compression.algorithms",
        ),
        (
            "[compression]\ncontent_types = [\"json\"]\n",
            "compression.content_types: `json` is not a media type",
        ),
        (
            "[upstreams.a]\nservers = [{ url = \"http://x:1\" }]\n[[route]]\nname = \"r\"\nupstream = \"a\"\n[route.headers]\nresponse_remove = [\"Bad Name\"]\n",
            "proxy.toml:6:1: route[0] (r).headers.response_remove: `Bad Name` is not a header name",
        ),
        (
            "[upstreams.a]\nservers = [{ url = \"http://x:1\" }]\n[[route]]\nname = \"r\"\nupstream = \"a\"\n[route.headers]\nresponse_set = { \"Content-Length\" = \"5\" }\n",
            "route[0] (r).headers.response_set: `Content-Length` cannot be rewritten",
        ),
        (
            "[upstreams.a]\nservers = [{ url = \"http://x:1\" }]\n[[route]]\nname = \"r\"\nupstream = \"a\"\n[route.headers]\nrequest_set = { \"X-A\" = \"1\" }\nrequest_remove = [\"x-a\"]\n",
            "route[0] (r).headers.request_remove: `x-a` is both set and removed",
        ),
        (
            "[upstreams.a]\nservers = [{ url = \"http://x:1\" }]\n[[route]]\nname = \"r\"\nupstream = \"a\"\n[route.headers]\nresponse_sett = {}\n",
            "route[0].headers.response_sett: unknown key `response_sett` — did you mean `response_set`?",
        ),
        ("[sever]\n", "proxy.toml:1:2: sever: unknown key `sever` — did you mean `server`?"),
    ];
    for (text, expected) in cases {
        let err = error_of(text);
        assert!(
            err.contains(expected),
            "\nexpected: {expected}\n     got: {err}"
        );
        assert!(
            err.contains(" — "),
            "every message says how to fix it: {err}"
        );
    }
}

#[test]
fn values_parse_from_strings() {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:9999\"\nmax_request_body = \"8MB\"\nheader_read_timeout = \"250ms\"\nshutdown_grace = \"2m\"\ntrusted_proxies = [\"10.0.0.0/8\", \"::1\"]\naccess_log = \"combined\"\nslow_request = \"0s\"\n{UPSTREAM}{ROUTE}"
    );
    let p = Policy::parse("p", &text).unwrap();
    assert_eq!(p.server.listen, vec!["127.0.0.1:9999".parse().unwrap()]);
    assert_eq!(p.server.max_request_body, 8 << 20);
    assert_eq!(
        p.server.header_read_timeout,
        std::time::Duration::from_millis(250)
    );
    assert_eq!(p.server.shutdown_grace, std::time::Duration::from_secs(120));
    assert_eq!(p.server.trusted_proxies.len(), 2);
    assert_eq!(p.server.slow_request, None);
}

fn hyperion(args: &[&str], env: Option<(&str, &str)>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hyperion"));
    cmd.args(args).env_remove("HYPERION_CONFIG");
    if let Some((k, v)) = env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn check_prints_a_summary_and_exits_zero() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml");
    let out = hyperion(&["check", "--config", path], None);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("listeners: http://127.0.0.1:8080"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ollama           http://127.0.0.1:11434"),
        "{stdout}"
    );
    let generate = stdout.find("3. generate").unwrap();
    let meta = stdout.find("4. ollama-meta").unwrap();
    assert!(generate < meta, "routes are listed in order: {stdout}");
    // HYPERION_CONFIG names the file when --config does not.
    let out = hyperion(&["check"], Some(("HYPERION_CONFIG", path)));
    assert!(out.status.success());
}

#[test]
fn check_prints_one_error_line_and_exits_non_zero() {
    let dir = std::env::temp_dir().join(format!("hyperion-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("proxy.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = [\"127.0.0.1:8080\"]\nidle_timout = \"75s\"\n",
    )
    .unwrap();
    let out = hyperion(&["check", "--config", path.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    let expected = format!(
        "{}:3:1: server.idle_timout: unknown key `idle_timout` — did you mean `idle_timeout`?",
        path.display()
    );
    assert!(stderr.starts_with(&expected), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");

    let out = hyperion(
        &[
            "check",
            "--config",
            dir.join("missing.toml").to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("cannot read the policy file"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn version_is_printed() {
    let out = hyperion(&["--version"], None);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("hyperion {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn rate_limit_mistakes_name_their_line_and_fix() {
    let limit = |body: &str, route: &str| {
        format!("{UPSTREAM}[rate_limits.per_ip]\n{body}\n[[route]]\nname = \"all\"\nupstream = \"ollama\"\n{route}\n")
    };
    let cases = [
        (
            limit("key = \"client_ip\"\nrate = \"60/min\"", "rate_limit = [\"per_iq\"]"),
            "proxy.toml:9:15: route[0] (all).rate_limit: no rate limit is named `per_iq` — did you mean `per_ip`?",
        ),
        (
            limit("key = \"client\"\nrate = \"60/min\"", ""),
            "proxy.toml:4:7: rate_limits.per_ip.key: unknown key `client` — use \"client_ip\"",
        ),
        (
            limit("key = \"header:bad header\"\nrate = \"60/min\"", ""),
            "rate_limits.per_ip.key: `bad header` is not a header name",
        ),
        (
            limit("key = \"client_ip\"\nrate = \"60/min\"\ntokens = \"1000/hour\"", ""),
            "both `rate` (requests) and `tokens` are set",
        ),
        (
            limit("key = \"client_ip\"", ""),
            "neither `rate` nor `tokens` is set",
        ),
        (
            limit("rate = \"60/min\"", ""),
            "rate_limits.per_ip: no `key`",
        ),
        (
            limit("key = \"client_ip\"\nrate = \"60/min\"\nburst = 0", ""),
            "proxy.toml:6:9: rate_limits.per_ip.burst: a burst of 0 allows nothing",
        ),
        (
            limit("key = \"client_ip\"\nrate = \"60/min\"\ndefault_tokens = 5", ""),
            "`default_tokens` only applies to a `tokens` limit",
        ),
        (
            limit("key = \"client_ip\"\nrate = \"60/min\"", "rate_limit = [\"per_ip\", \"per_ip\"]"),
            "`per_ip` is named twice",
        ),
        (
            format!("{UPSTREAM}queue_timeout = \"5s\"\n{ROUTE}"),
            "proxy.toml:3:17: upstreams.ollama.queue_timeout: nothing waits without `max_inflight_per_server`",
        ),
        (
            format!("{UPSTREAM}max_inflight_per_server = 0\n{ROUTE}"),
            "upstreams.ollama.max_inflight_per_server: 0 requests in flight sends nothing",
        ),
    ];
    for (text, expected) in cases {
        let err = error_of(&text);
        assert!(err.contains(expected), "expected `{expected}` in:\n{err}");
    }
    // The reference shape's limits parse.
    Policy::parse(
        "p",
        &format!(
            "{UPSTREAM}max_inflight_per_server = 4\nqueue_timeout = \"30s\"\n[rate_limits.per_ip]\nkey = \"client_ip\"\nrate = \"60/min\"\nburst = 20\n[rate_limits.tokens_per_key]\nkey = \"header:authorization\"\ntokens = \"100000/hour\"\n{ROUTE}rate_limit = [\"per_ip\", \"tokens_per_key\"]\n"
        ),
    )
    .unwrap();
}

#[test]
fn cache_mistakes_name_their_line_and_fix() {
    let cases = [
        ("ttl = \"5m\"\n", 4, "cache.mode: the cache mode is missing"),
        (
            "mode = \"origin\"\nttl = \"5m\"\n",
            6,
            "cache.ttl: mode = \"origin\" takes freshness",
        ),
        (
            "mode = \"force\"\nttl = \"0s\"\n",
            6,
            "cache.ttl: a ttl of 0",
        ),
        (
            "mode = \"force\"\nignore_fields = [\"a\"]\n",
            6,
            "ignore_fields only applies to JSON bodies",
        ),
        (
            "mode = \"force\"\nbody_key = \"json\"\nignore_fields = [\"a..b\"]\n",
            7,
            "`a..b` is not a field path",
        ),
        (
            "mode = \"force\"\nscope = \"per-user\"\n",
            6,
            "unknown scope `per-user`",
        ),
        (
            "mode = \"force\"\nscope = \"header:bad header\"\n",
            6,
            "is not a header name",
        ),
        (
            "mode = \"origin\"\nstore_private = true\n",
            6,
            "never stores what the upstream marked private",
        ),
        ("mode = \"force\"\nmode_x = 1\n", 6, "mode_x"),
        (
            "mode = \"origin\"\nnegative_ttl = \"10s\"\n",
            6,
            "cache.negative_ttl: mode = \"origin\" keeps a 404",
        ),
    ];
    for (body, line, want) in cases {
        let err = error_of(&format!("{ROUTE}[route.cache]\n{body}{UPSTREAM}"));
        assert!(
            err.starts_with(&format!("proxy.toml:{line}:")),
            "{body}: {err}"
        );
        assert!(err.contains(want), "{body}: {err}");
    }
    for (list, want) in [
        ("[\"bad header\"]", "`bad header` is not a header name"),
        ("[\"Cookie\"]", "`cookie` is always keyed"),
    ] {
        let err = error_of(&format!(
            "[cache]\ncredential_headers = {list}\n{UPSTREAM}{ROUTE}"
        ));
        assert!(err.starts_with("proxy.toml:2:"), "{err}");
        assert!(err.contains("cache.credential_headers"), "{err}");
        assert!(err.contains(want), "{err}");
    }
    for (route, line, want) in [
        (
            "[[route]]\nname = \"d\"\nupstream = \"ollama\"\ndeny = true\n",
            3,
            "route[0] (d).upstream: a route with deny = true forwards nothing",
        ),
        (
            "[[route]]\nname = \"d\"\n",
            1,
            "route[0] (d).upstream: the route names no upstream",
        ),
    ] {
        let err = error_of(&format!("{route}{UPSTREAM}"));
        assert!(err.starts_with(&format!("proxy.toml:{line}:")), "{err}");
        assert!(err.contains(want), "{err}");
    }
    let err = error_of(&format!(
        "[cache]\nmax_size = \"1MB\"\nmax_entry_size = \"2MB\"\n{UPSTREAM}{ROUTE}"
    ));
    assert!(
        err.contains("cache.max_entry_size") && err.starts_with("proxy.toml:1:"),
        "{err}"
    );
}

#[test]
fn admin_mistakes_name_their_line_and_fix() {
    let cases = [
        (
            "[server]\nlisten = [\"127.0.0.1:9090\"]\n[admin]\nlisten = \"127.0.0.1:9090\"\n",
            "proxy.toml:3:",
            "admin.listen: 127.0.0.1:9090 is also a server.listen address",
        ),
        (
            "[admin]\ntoken_env = \"HYPERION_TEST_UNSET_TOKEN_VAR\"\n",
            "proxy.toml:1:",
            "the environment variable HYPERION_TEST_UNSET_TOKEN_VAR is not set",
        ),
        (
            "[admin]\ntoken_file = \"/nonexistent/admin.token\"\n",
            "proxy.toml:1:",
            "admin.token_file: cannot read /nonexistent/admin.token",
        ),
        (
            "[admin]\ntoken_env = \"A\"\ntoken_file = \"b\"\n",
            "proxy.toml:1:",
            "both token_env and token_file are set",
        ),
    ];
    for (admin, at, says) in cases {
        let err = error_of(&format!("{admin}{UPSTREAM}{ROUTE}"));
        assert!(err.starts_with(at) && err.contains(says), "{err}");
    }
    let short = std::env::temp_dir().join(format!("hyperion-short-{}", std::process::id()));
    std::fs::write(&short, "secret\n").unwrap();
    let err = error_of(&format!(
        "[admin]\ntoken_file = \"{}\"\n{UPSTREAM}{ROUTE}",
        short.display()
    ));
    std::fs::remove_file(&short).unwrap();
    assert!(
        err.contains("6 characters long; a short token can be guessed"),
        "{err}"
    );
    // No token: the admin API serves only what needs none.
    let p = Policy::parse("p", &format!("[admin]\n{UPSTREAM}{ROUTE}")).unwrap();
    let admin = p.admin.unwrap();
    assert_eq!(admin.listen, "127.0.0.1:9090".parse().unwrap());
    assert!(admin.token.is_none());
}

#[test]
fn upstream_pool_mistakes_name_their_line_and_fix() {
    // A route's unknown_model needs a pool that routes by model.
    let err = error_of(&format!(
        "{UPSTREAM}{ROUTE}unknown_model = \"any_server\"\n"
    ));
    assert!(
        err.contains("unknown_model: upstream `ollama` does not route by model"),
        "{err}"
    );
    Policy::parse(
        "p",
        &format!("{UPSTREAM}model_routing = \"discover\"\n{ROUTE}unknown_model = \"any_server\"\n"),
    )
    .unwrap();
    let cases = [
        (
            "[upstreams.ollama]\nservers = [{ url = \"http://127.0.0.1:11434\" }, { url = \"http://127.0.0.1:11434\" }]\n",
            "proxy.toml:2:",
            "listed twice",
        ),
        (
            "[upstreams.ollama]\nservers = [{ url = \"http://127.0.0.1:11434\" }]\nhash_key = \"header:x-session\"\n",
            "proxy.toml:3:",
            "only read by consistent_hash",
        ),
        (
            "[upstreams.ollama]\nservers = [{ url = \"http://127.0.0.1:11434\" }]\nbalance = \"consistent_hash\"\nhash_key = \"model\"\n",
            "proxy.toml:4:",
            "not something to hash on",
        ),
        (
            "[upstreams.ollama]\nservers = [{ url = \"http://127.0.0.1:11434\" }]\nretries = 50\n",
            "proxy.toml:3:",
            "use 0 to 10",
        ),
        (
            "[upstreams.ollama]\nservers = [{ url = \"http://127.0.0.1:11434\" }]\n[upstreams.ollama.health]\ninterval = \"5s\"\n",
            "proxy.toml:3:",
            "no `path`",
        ),
        (
            "[upstreams.ollama]\nservers = [{ url = \"http://127.0.0.1:11434\" }]\n[upstreams.ollama.health]\npath = \"/api/version\"\ninterval = \"1s\"\ntimeout = \"2s\"\n",
            "proxy.toml:6:",
            "at most its interval",
        ),
        (
            "[upstreams.ollama]\nservers = [{ url = \"http://127.0.0.1:11434\" }]\n[upstreams.ollama.health]\npath = \"/api/version\"\nunhealthy_after = 0\n",
            "proxy.toml:5:",
            "use 1 to 100",
        ),
        (
            "[upstreams.ollama]\nservers = [{ url = \"http://127.0.0.1:11434\", models = [\"llama3.2\"] }]\n",
            "proxy.toml:2:",
            "upstreams.ollama.servers[0].models: `models` are read only when the pool routes by model",
        ),
        (
            "[upstreams.ollama]\nservers = [{ url = \"http://127.0.0.1:11434\" }]\nmodel_routing = \"static\"\n",
            "proxy.toml:3:",
            "no server lists its `models`",
        ),
        (
            "[upstreams.ollama]\nmodel_routing = \"static\"\nservers = [{ url = \"http://127.0.0.1:11434\", models = [] }]\n",
            "proxy.toml:3:",
            "an empty list serves no model",
        ),
        (
            "[upstreams.ollama]\nmodel_routing = \"static\"\nservers = [{ url = \"http://127.0.0.1:11434\", models = [\"two words\"] }]\n",
            "proxy.toml:3:",
            "`two words` is not a model name",
        ),
        (
            "[upstreams.ollama]\nservers = [{ url = \"http://127.0.0.1:11434\" }]\nmodel_routing = \"static\"\ndiscover_interval = \"5s\"\n",
            "proxy.toml:4:",
            "only `model_routing = \"discover\"` asks",
        ),
        (
            "[upstreams.ollama]\nservers = [{ url = \"http://127.0.0.1:11434\" }]\nmodel_routing = \"discover\"\ndiscover_interval = \"100ms\"\n",
            "proxy.toml:4:",
            "use 1s or more",
        ),
        (
            "[upstreams.ollama]\nservers = [{ url = \"http://127.0.0.1:11434\" }]\nengine_poll_interval = \"2s\"\n",
            "proxy.toml:3:",
            "nothing is polled without `engine_signals`",
        ),
        (
            "[upstreams.ollama]\nservers = [{ url = \"http://127.0.0.1:11434\" }]\nengine_signals = \"vllm\"\nengine_poll_interval = \"10ms\"\n",
            "proxy.toml:4:",
            "10ms is not between 250ms and 1m",
        ),
        (
            "[upstreams.ollama]\nservers = [{ url = \"http://127.0.0.1:11434\" }]\nengine_signals = \"triton\"\n",
            "proxy.toml:3:",
            "engine_signals",
        ),
    ];
    for (upstream, at, says) in cases {
        let err = error_of(&format!("{upstream}{ROUTE}"));
        assert!(err.starts_with(at) && err.contains(says), "{err}");
    }
}

#[test]
fn the_defences_have_safe_defaults_and_refuse_nonsense_with_the_line() {
    let policy = Policy::parse("proxy.toml", &format!("{UPSTREAM}{ROUTE}")).unwrap();
    let s = &policy.server;
    assert_eq!(s.max_buffered_bodies, 256 << 20);
    assert_eq!((s.read_ahead, s.max_read_ahead), (256 << 10, 256 << 20));
    assert_eq!(s.body_read_timeout, std::time::Duration::from_secs(30));
    assert_eq!(s.send_timeout, std::time::Duration::from_secs(60));
    assert_eq!(s.tunnel_idle_timeout, std::time::Duration::from_secs(300));
    assert_eq!((s.max_connections, s.max_connections_per_ip), (4096, 256));
    assert_eq!(s.http2_max_concurrent_streams, 100);
    assert_eq!(s.http2_max_pending_resets, 20);
    assert_eq!(
        s.http2_keepalive_interval,
        Some(std::time::Duration::from_secs(30))
    );

    let e = error_of(&format!(
        "[server]\nmax_request_body = \"64MB\"\nmax_buffered_bodies = \"32MB\"\n{UPSTREAM}{ROUTE}"
    ));
    assert!(
        e.starts_with("proxy.toml:3:23: server.max_buffered_bodies:"),
        "{e}"
    );
    assert!(e.contains("raise max_buffered_bodies"), "{e}");
    let e = error_of(&format!(
        "[server]\nmax_connections = 10\nmax_connections_per_ip = 20\n{UPSTREAM}{ROUTE}"
    ));
    assert!(
        e.starts_with("proxy.toml:3:26: server.max_connections_per_ip:"),
        "{e}"
    );
    let e = error_of(&format!(
        "[server]\nread_ahead = \"1MB\"\nmax_read_ahead = \"512KB\"\n{UPSTREAM}{ROUTE}"
    ));
    assert!(
        e.starts_with("proxy.toml:3:18: server.max_read_ahead:"),
        "{e}"
    );
    let e = error_of(&format!(
        "[server]\nbody_read_timeout = \"0s\"\n{UPSTREAM}{ROUTE}"
    ));
    assert!(
        e.starts_with("proxy.toml:2:21: server.body_read_timeout:"),
        "{e}"
    );
    let e = error_of(&format!("[server]\nmax_connections = 0\n{UPSTREAM}{ROUTE}"));
    assert!(
        e.contains("server.max_connections: 0 is out of range"),
        "{e}"
    );
    let e = error_of(&format!(
        "[server]\nhttp2_keepalive_interval = \"100ms\"\n{UPSTREAM}{ROUTE}"
    ));
    assert!(e.contains("server.http2_keepalive_interval"), "{e}");
    // "0s" turns the pings off.
    let off = Policy::parse(
        "proxy.toml",
        &format!("[server]\nhttp2_keepalive_interval = \"0s\"\n{UPSTREAM}{ROUTE}"),
    )
    .unwrap();
    assert_eq!(off.server.http2_keepalive_interval, None);
}
