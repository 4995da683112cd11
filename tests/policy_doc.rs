//! `docs/policy.md` and the parser name the same keys: the "Every key"
//! section of the reference is what the parser accepts, table by table,
//! read from the parser itself (its unknown-key error lists every key a
//! table takes). A key added to the parser and not to the docs, or the
//! other way round, fails here; `HYPERION_BLESS=1 cargo test --test
//! policy_doc` rewrites the section.

use hyperion::Policy;

const UPSTREAM: &str = "[upstreams.a]\nservers = [{ url = \"http://127.0.0.1:1\" }]\n";
const ROUTE: &str = "[[route]]\nname = \"r\"\nupstream = \"a\"\n";
const PROBE: &str = "zz_probe = 1";

/// Each table a policy file can hold, and a policy with the probe key
/// placed in it.
fn tables() -> Vec<(&'static str, String)> {
    vec![
        ("(top level)", format!("{PROBE}\n{UPSTREAM}{ROUTE}")),
        ("[server]", format!("[server]\n{PROBE}\n{UPSTREAM}{ROUTE}")),
        (
            "[server.tls]",
            format!("[server.tls]\n{PROBE}\n{UPSTREAM}{ROUTE}"),
        ),
        ("[admin]", format!("[admin]\n{PROBE}\n{UPSTREAM}{ROUTE}")),
        ("[cache]", format!("[cache]\n{PROBE}\n{UPSTREAM}{ROUTE}")),
        (
            "[cache.redis]",
            format!("[cache.redis]\n{PROBE}\n{UPSTREAM}{ROUTE}"),
        ),
        (
            "[compression]",
            format!("[compression]\n{PROBE}\n{UPSTREAM}{ROUTE}"),
        ),
        (
            "[rate_limits.NAME]",
            format!("[rate_limits.x]\n{PROBE}\n{UPSTREAM}{ROUTE}"),
        ),
        (
            "[upstreams.NAME]",
            format!(
                "[upstreams.a]\nservers = [{{ url = \"http://127.0.0.1:1\" }}]\n{PROBE}\n{ROUTE}"
            ),
        ),
        (
            "[upstreams.NAME] servers = [{ … }]",
            format!(
                "[upstreams.a]\nservers = [{{ url = \"http://127.0.0.1:1\", {PROBE} }}]\n{ROUTE}"
            ),
        ),
        (
            "[upstreams.NAME.health]",
            format!("{UPSTREAM}[upstreams.a.health]\n{PROBE}\n{ROUTE}"),
        ),
        ("[[route]]", format!("{UPSTREAM}{ROUTE}{PROBE}\n")),
        (
            "[[route]] match = { … }",
            format!("{UPSTREAM}{ROUTE}match = {{ {PROBE} }}\n"),
        ),
        (
            "[route.cache]",
            format!("{UPSTREAM}{ROUTE}[route.cache]\n{PROBE}\n"),
        ),
        (
            "[route.headers]",
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

const BEGIN: &str = "<!-- every-key: generated from the parser by tests/policy_doc.rs -->";
const END: &str = "<!-- /every-key -->";

fn rendered() -> String {
    let mut out = String::new();
    out.push_str(BEGIN);
    out.push('\n');
    for (table, policy) in tables() {
        let keys: Vec<String> = keys_of(table, &policy)
            .into_iter()
            .map(|k| format!("`{k}`"))
            .collect();
        out.push_str(&format!("- `{table}`: {}\n", keys.join(", ")));
    }
    out.push_str(END);
    out
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
    for (table, policy) in tables() {
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
