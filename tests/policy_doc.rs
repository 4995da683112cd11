//! The table of keys (`hyperion::policy::keys`), the parser and the docs
//! say the same thing:
//! - the table lists exactly the keys the parser takes, table by table
//!   (read from the parser itself: its unknown-key error lists every key a
//!   table takes);
//! - a key set to the table's default parses to the very policy its absence
//!   gives;
//! - `docs/policy.md`'s "Every key" section is rendered from the table
//!   (`HYPERION_BLESS=1 cargo test --test policy_doc` rewrites it);
//! - `proxy.toml` shows a line for every key.

use hyperion::policy::keys::{self, Fallback, Reload, Unit};
use hyperion::Policy;

const UPSTREAM: &str = "[upstreams.a]\nservers = [{ url = \"http://127.0.0.1:1\" }]\n";
const ROUTE: &str = "[[route]]\nname = \"r\"\nupstream = \"a\"\n";
const PROBE: &str = "zz_probe = 1";
const AUTH: &str = "[auth]\nkeys_file = \"/nonexistent/keys.toml\"\n";

/// Each table a policy file can hold: as the docs name it, its path in
/// the key table, and a policy with the probe key placed in it.
fn tables() -> Vec<(&'static str, &'static str, String)> {
    vec![
        ("(top level)", "", format!("{PROBE}\n{UPSTREAM}{ROUTE}")),
        (
            "[server]",
            "server",
            format!("[server]\n{PROBE}\n{UPSTREAM}{ROUTE}"),
        ),
        (
            "[server.tls]",
            "server.tls",
            format!("[server.tls]\n{PROBE}\n{UPSTREAM}{ROUTE}"),
        ),
        (
            "[admin]",
            "admin",
            format!("[admin]\n{PROBE}\n{UPSTREAM}{ROUTE}"),
        ),
        (
            "[cache]",
            "cache",
            format!("[cache]\n{PROBE}\n{UPSTREAM}{ROUTE}"),
        ),
        (
            "[tracing]",
            "tracing",
            format!("[tracing]\n{PROBE}\n{UPSTREAM}{ROUTE}"),
        ),
        (
            "[cache.redis]",
            "cache.redis",
            format!("[cache.redis]\n{PROBE}\n{UPSTREAM}{ROUTE}"),
        ),
        (
            "[compression]",
            "compression",
            format!("[compression]\n{PROBE}\n{UPSTREAM}{ROUTE}"),
        ),
        (
            "[rate_limits.NAME]",
            "rate_limits.NAME",
            format!("[rate_limits.x]\n{PROBE}\n{UPSTREAM}{ROUTE}"),
        ),
        (
            "[tiers.NAME]",
            "tiers.NAME",
            format!("{AUTH}[tiers.x]\n{PROBE}\n{UPSTREAM}{ROUTE}"),
        ),
        (
            "[keys.NAME]",
            "keys.NAME",
            format!("{AUTH}[keys.x]\n{PROBE}\n{UPSTREAM}{ROUTE}"),
        ),
        (
            "[upstreams.NAME]",
            "upstreams.NAME",
            format!(
                "[upstreams.a]\nservers = [{{ url = \"http://127.0.0.1:1\" }}]\n{PROBE}\n{ROUTE}"
            ),
        ),
        (
            "[upstreams.NAME] servers = [{ … }]",
            "upstreams.NAME.servers",
            format!(
                "[upstreams.a]\nservers = [{{ url = \"http://127.0.0.1:1\", {PROBE} }}]\n{ROUTE}"
            ),
        ),
        (
            "[upstreams.NAME] auth_header = { … }",
            "upstreams.NAME.auth_header",
            format!(
                "[upstreams.a]\nservers = [{{ url = \"http://127.0.0.1:1\" }}]\nauth_header = {{ {PROBE} }}\n{ROUTE}"
            ),
        ),
        (
            "[upstreams.NAME.health]",
            "upstreams.NAME.health",
            format!("{UPSTREAM}[upstreams.a.health]\n{PROBE}\n{ROUTE}"),
        ),
        ("[[route]]", "route", format!("{UPSTREAM}{ROUTE}{PROBE}\n")),
        (
            "[[route]] match = { … }",
            "route.match",
            format!("{UPSTREAM}{ROUTE}match = {{ {PROBE} }}\n"),
        ),
        (
            "[[route]] split = [{ … }]",
            "route.split",
            format!("{UPSTREAM}[upstreams.b]\nservers = [{{ url = \"http://127.0.0.1:2\" }}]\n[[route]]\nname = \"r\"\nsplit = [{{ upstream = \"a\", weight = 1 }}, {{ upstream = \"b\", weight = 1, {PROBE} }}]\n"),
        ),
        (
            "[route.cache]",
            "route.cache",
            format!("{UPSTREAM}{ROUTE}[route.cache]\n{PROBE}\n"),
        ),
        (
            "[route.headers]",
            "route.headers",
            format!("{UPSTREAM}{ROUTE}[route.headers]\n{PROBE}\n"),
        ),
    ]
}

/// The keys the parser accepts in the table `policy` probes.
fn keys_of(table: &str, policy: &str) -> Vec<String> {
    let err = match Policy::parse("probe.toml", policy) {
        Ok(_) => panic!("{table}: the probe key was accepted"),
        Err(e) => e.to_string(),
    };
    let Some((_, list)) = err.split_once("use one of: ") else {
        panic!("{table}: not an unknown-key error: {err}");
    };
    let mut keys: Vec<String> = list.split(", ").map(|k| k.trim().to_owned()).collect();
    keys.sort();
    keys
}

const BEGIN: &str = "<!-- every-key: generated from src/policy/keys.rs by tests/policy_doc.rs -->";
const END: &str = "<!-- /every-key -->";

/// The reference's "Every key" section, from the key table.
fn rendered() -> String {
    let mut out = String::new();
    out.push_str(BEGIN);
    out.push('\n');
    for (table, path, _) in tables() {
        out.push_str(&format!("\n#### `{table}`\n\n"));
        out.push_str("| key | default | unit | on reload |\n|---|---|---|---|\n");
        for k in keys::children(path) {
            let reload = match k.reload {
                Reload::Applies => "applies",
                Reload::Restart => "**restart**",
            };
            out.push_str(&format!(
                "| `{}` | {} | {} | {reload} |\n",
                keys::name(k),
                k.default,
                k.unit
            ));
        }
    }
    out.push_str(END);
    out
}

#[test]
fn the_key_table_names_every_key_the_parser_takes_and_no_other() {
    for (table, path, policy) in tables() {
        let parser = keys_of(table, &policy);
        let mut listed: Vec<String> = keys::children(path)
            .map(|k| keys::name(k).to_owned())
            .collect();
        listed.sort();
        assert_eq!(
            parser, listed,
            "{table}: the parser's keys (left) and src/policy/keys.rs's (right) differ"
        );
    }
}

/// Lines a key needs beside it to be accepted at all, by key path.
fn context(path: &str) -> &'static str {
    match path {
        "upstreams.NAME.discover_interval" => "model_routing = \"discover\"\n",
        "upstreams.NAME.queue_timeout"
        | "upstreams.NAME.queue"
        | "upstreams.NAME.max_queued_per_tenant" => "max_inflight_per_server = 2\n",
        "upstreams.NAME.hash_key" => "balance = \"consistent_hash\"\n",
        "upstreams.NAME.prefix_cache_tokens" => "balance = \"prefix_affinity\"\n",
        "upstreams.NAME.engine_poll_interval" => "engine_signals = \"vllm\"\n",
        _ => "",
    }
}

/// A policy with `line` in the table at `path`.
fn policy_with(path: &str, line: &str) -> String {
    let ctx = context(path);
    let up = "[upstreams.a]\nservers = [{ url = \"http://127.0.0.1:1\" }]\n";
    let route = "[[route]]\nname = \"r\"\nupstream = \"a\"\n";
    let table = path.rsplit_once('.').map_or("", |(t, _)| t);
    match table {
        "" => format!("{line}\n{up}{route}"),
        "upstreams.NAME" => format!("{up}{ctx}{line}\n{route}"),
        "upstreams.NAME.servers" => format!(
            "[upstreams.a]\nservers = [{{ url = \"http://127.0.0.1:1\", {line} }}]\n{route}"
        ),
        "upstreams.NAME.auth_header" => {
            let line = if line.is_empty() {
                String::new()
            } else {
                format!(", {line}")
            };
            format!(
                "{up}auth_header = {{ env = \"HYPERION_POLICY_DOC_SECRET\"{line} }}\n{route}"
            )
        }
        "upstreams.NAME.health" => {
            format!("{up}[upstreams.a.health]\npath = \"/\"\n{line}\n{route}")
        }
        "rate_limits.NAME" => {
            // default_tokens is read by token limits only.
            let limit = if path.ends_with("default_tokens") {
                "tokens = \"1000/min\""
            } else {
                "rate = \"10/s\""
            };
            // when_absent is read by header and tenant keys only.
            let key = if path.ends_with("when_absent") {
                "header:x-user"
            } else {
                "client_ip"
            };
            format!(
                "{up}[rate_limits.x]\nkey = \"{key}\"\n{limit}\n{line}\n{route}rate_limit = [\"x\"]\n"
            )
        }
        // auth is read where the policy has [auth].
        "route" if path.ends_with(".auth") => {
            format!("[auth]\nkeys_file = \"/nonexistent/keys.toml\"\n{up}{route}{line}\n")
        }
        // unknown_model is read on model-routed upstreams only.
        "route" if path.ends_with("unknown_model") => {
            format!("{up}model_routing = \"discover\"\n{route}{line}\n")
        }
        // split_by is read on split routes only.
        "route" if path.ends_with("split_by") => format!(
            "{up}[upstreams.b]\nservers = [{{ url = \"http://127.0.0.1:2\" }}]\n[[route]]\nname = \"r\"\nsplit = [{{ upstream = \"a\", weight = 1 }}, {{ upstream = \"b\", weight = 1 }}]\n{line}\n"
        ),
        "route" => format!("{up}{route}{line}\n"),
        "route.cache" => {
            // ignore_fields is read on JSON-keyed routes only.
            let json = if path.ends_with("ignore_fields") {
                "body_key = \"json\"\n"
            } else {
                ""
            };
            format!("{up}{route}[route.cache]\nmode = \"force\"\nttl = \"1m\"\n{json}{line}\n")
        }
        "tiers.NAME" | "keys.NAME" => {
            let t = table.split('.').next().unwrap();
            format!("{AUTH}[{t}.x]\n{line}\n{up}{route}")
        }
        // The other keys are read beside a collector.
        "tracing" if !path.ends_with("otlp_endpoint") => format!(
            "[tracing]\notlp_endpoint = \"http://127.0.0.1:4318/v1/traces\"\n{line}\n{up}{route}"
        ),
        "cache.redis" => format!(
            "[cache.redis]\nurl = \"redis://127.0.0.1:1/0\"\nsecret_env = \"HYPERION_POLICY_DOC_SECRET\"\n{line}\n{up}{route}"
        ),
        t => format!("[{t}]\n{line}\n{up}{route}"),
    }
}

#[test]
fn every_listed_choice_is_accepted() {
    std::env::set_var(
        "HYPERION_POLICY_DOC_SECRET",
        "0123456789abcdef0123456789abcdef",
    );
    for k in keys::KEYS {
        let Unit::Choice(words) = k.unit else {
            continue;
        };
        for word in words.split(", ") {
            let word = word.replace("<name>", "x-session");
            let text = policy_with(k.path, &format!("{} = \"{word}\"", keys::name(k)));
            // A choice may need others beside it (a limiter keyed by
            // route, a scope for a header): only "unknown value" is wrong.
            if let Err(e) = Policy::parse("choices.toml", &text) {
                let e = e.to_string();
                assert!(
                    !e.contains("unknown value") && !e.contains("is not"),
                    "{}: `{word}` is listed but refused: {e}",
                    k.path
                );
            }
        }
    }
}

#[test]
fn a_key_set_to_its_listed_default_changes_nothing() {
    // Read by [cache.redis]'s policies (only this test reads it).
    std::env::set_var(
        "HYPERION_POLICY_DOC_SECRET",
        "0123456789abcdef0123456789abcdef",
    );
    let mut checked = 0;
    for k in keys::KEYS {
        let Fallback::Value(default) = k.default else {
            continue;
        };
        let name = keys::name(k);
        let parse = |text: &str| match Policy::parse("defaults.toml", text) {
            Ok(p) => format!("{p:?}"),
            Err(e) => panic!("{}: {e}\n{text}", k.path),
        };
        let with = parse(&policy_with(k.path, &format!("{name} = {default}")));
        let without = parse(&policy_with(k.path, ""));
        assert_eq!(
            with, without,
            "{}: the parser's default is not {default}, as src/policy/keys.rs says",
            k.path
        );
        checked += 1;
    }
    assert!(checked > 60, "only {checked} defaults checked");
}

#[test]
fn docs_policy_md_names_every_key_the_parser_takes_and_no_other() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/policy.md");
    let doc = std::fs::read_to_string(path).unwrap();
    let want = rendered();
    let (Some(start), Some(end)) = (doc.find(BEGIN), doc.find(END)) else {
        panic!("docs/policy.md has no every-key section: add {BEGIN} … {END}");
    };
    let have = &doc[start..end + END.len()];
    if have != want {
        if std::env::var_os("HYPERION_BLESS").is_some() {
            let updated = format!("{}{want}{}", &doc[..start], &doc[end + END.len()..]);
            std::fs::write(path, updated).unwrap();
            return;
        }
        panic!(
            "docs/policy.md's key list differs from the parser's; run \
             HYPERION_BLESS=1 cargo test --test policy_doc, and describe any new key.\n\
             parser:\n{want}\n\ndocs:\n{have}"
        );
    }
}

#[test]
fn the_shipped_proxy_toml_shows_every_key() {
    let shipped = include_str!("../proxy.toml");
    let mut missing = Vec::new();
    for (table, _, policy) in tables() {
        for key in keys_of(table, &policy) {
            let shown = shipped.lines().any(|line| {
                let line = line.trim_start_matches(['#', ' ']);
                // A line setting it, commented or not, or prose showing
                // how (`preserve_host = false` sends …).
                line.contains(&format!("{key} ="))
                    || line.starts_with(&format!("[{key}"))
                    || line.starts_with(&format!("[[{key}"))
                    || line.contains(&format!("{{ {key} ="))
                    || line.contains(&format!(", {key} ="))
                    || line.starts_with(&format!("[upstreams.ollama.{key}"))
                    || line.starts_with(&format!("[cache.{key}"))
                    || line.starts_with(&format!("[server.{key}"))
                    || line.starts_with(&format!("[route.{key}"))
                    || line.starts_with(&format!("[rate_limits.{key}"))
            });
            if !shown {
                missing.push(format!("{table} {key}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "proxy.toml shows no line for (add one, commented with its default): {missing:?}"
    );
}
