//! The one table of policy keys: each key's place, its default, its unit,
//! and what a reload does with it.
//!
//! From this table come the reference in `docs/policy.md` (its "Every key"
//! section is rendered from it by `tests/policy_doc.rs`) and the reload
//! report (`generation.rs` names changed keys by their path here). Tests
//! hold the rest to it, so none can drift: the parser takes exactly these
//! keys (table by table), a key set to its default here parses to the very
//! policy its absence gives (`validate.rs`'s defaults), and every key marked
//! `Restart` is named by a reload that changes it while no other key is.
//!
//! Owns the facts about keys, not their parsing or their checks
//! (`validate.rs`), nor their meaning (the reference's prose).

/// A key of the policy file.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// Where it goes: `server.idle_timeout`, `upstreams.NAME.retries`,
    /// `route.cache.ttl` (a `[[route]]`'s `[route.cache]`).
    pub path: &'static str,
    /// Its value when the file does not set it.
    pub default: Fallback,
    pub unit: Unit,
    pub reload: Reload,
}

/// What a key is worth when the file does not set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// This value, as the file would write it.
    Value(&'static str),
    /// Absent, the feature is off or there is no limit (said how).
    Off(&'static str),
    /// Follows another setting (said which).
    Derived(&'static str),
    /// The file must set it.
    Required,
}

/// What a key's value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// `"30s"`, `"5m"`, `"250ms"`.
    Duration,
    /// `"32KB"`, `"256MB"` (powers of 1024).
    Size,
    /// A whole number.
    Count,
    /// A number from 0 to 1.
    Fraction,
    Bool,
    /// One of these words.
    Choice(&'static str),
    /// Text: a name, a URL, a header name, a path.
    Text,
    /// A file path.
    File,
    /// `"host:port"`.
    Address,
    /// A list of the unit named.
    List(&'static str),
    /// `"N/unit"`: `"60/min"`, `"100000/hour"`.
    Rate,
    /// A table of its own (its keys are listed under it).
    Table,
    /// A TOML table of header names to values.
    Headers,
}

/// What a reload does with a changed key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// The next request uses the new value.
    Applies,
    /// The running value stays until a restart; the reload names the key.
    Restart,
}

use Fallback::{Derived, Off, Required, Value};
use Reload::{Applies, Restart};
use Unit::*;

const fn key(path: &'static str, default: Fallback, unit: Unit, reload: Reload) -> Key {
    Key {
        path,
        default,
        unit,
        reload,
    }
}

/// Every key, in the order of the reference.
pub const KEYS: &[Key] = &[
    // [server]
    key("server", Off("every default below"), Table, Applies),
    key(
        "server.listen",
        Value(r#"["127.0.0.1:8080"]"#),
        List("address"),
        Restart,
    ),
    key("server.max_request_body", Value(r#""50MB""#), Size, Applies),
    key("server.server_timing", Value("false"), Bool, Applies),
    key("server.max_header_size", Value(r#""32KB""#), Size, Restart),
    key(
        "server.header_read_timeout",
        Value(r#""10s""#),
        Duration,
        Restart,
    ),
    key("server.idle_timeout", Value(r#""75s""#), Duration, Restart),
    key(
        "server.shutdown_grace",
        Value(r#""30s""#),
        Duration,
        Restart,
    ),
    key(
        "server.body_read_timeout",
        Value(r#""30s""#),
        Duration,
        Applies,
    ),
    key("server.send_timeout", Value(r#""60s""#), Duration, Restart),
    key("server.read_ahead", Value(r#""256KB""#), Size, Applies),
    key("server.max_read_ahead", Value(r#""256MB""#), Size, Restart),
    key(
        "server.tunnel_idle_timeout",
        Value(r#""5m""#),
        Duration,
        Applies,
    ),
    key(
        "server.max_buffered_bodies",
        Value(r#""256MB""#),
        Size,
        Restart,
    ),
    key("server.max_connections", Value("4096"), Count, Applies),
    key(
        "server.max_connections_per_ip",
        Value("256"),
        Count,
        Applies,
    ),
    key(
        "server.http2_max_concurrent_streams",
        Value("100"),
        Count,
        Restart,
    ),
    key(
        "server.http2_max_pending_resets",
        Value("20"),
        Count,
        Restart,
    ),
    key(
        "server.http2_keepalive_interval",
        Value(r#""30s""#),
        Duration,
        Restart,
    ),
    key(
        "server.http2_keepalive_timeout",
        Value(r#""20s""#),
        Duration,
        Restart,
    ),
    key(
        "server.trusted_proxies",
        Value("[]"),
        List("address or CIDR"),
        Applies,
    ),
    key(
        "server.access_log",
        Value(r#""json""#),
        Choice("json, combined, off"),
        Applies,
    ),
    key("server.slow_request", Value(r#""5s""#), Duration, Applies),
    key("server.tls", Off("no TLS listener"), Table, Applies),
    key("server.tls.listen", Required, List("address"), Restart),
    key("server.tls.cert", Required, File, Applies),
    key("server.tls.key", Required, File, Applies),
    // [admin]
    key("admin", Off("no admin listener"), Table, Restart),
    key("admin.listen", Required, Address, Restart),
    key("admin.token_env", Off("open endpoints only"), Text, Applies),
    key(
        "admin.token_file",
        Off("open endpoints only"),
        File,
        Applies,
    ),
    // [tracing]
    key("tracing", Off("no traces"), Table, Restart),
    key("tracing.otlp_endpoint", Required, Text, Restart),
    key("tracing.sample_ratio", Value("1.0"), Fraction, Restart),
    key(
        "tracing.service_name",
        Value(r#""hyperion""#),
        Text,
        Restart,
    ),
    key(
        "tracing.headers_env",
        Off("no extra headers"),
        Text,
        Restart,
    ),
    key("tracing.max_queue", Value("2048"), Count, Restart),
    key("tracing.batch_size", Value("512"), Count, Restart),
    key(
        "tracing.export_interval",
        Value(r#""2s""#),
        Duration,
        Restart,
    ),
    key(
        "tracing.export_timeout",
        Value(r#""10s""#),
        Duration,
        Restart,
    ),
    // [auth]
    key("auth", Off("keys are not checked"), Table, Applies),
    key("auth.keys_file", Required, File, Applies),
    // [cache]
    key("cache", Off("every default below"), Table, Applies),
    key("cache.max_size", Value(r#""256MB""#), Size, Restart),
    key(
        "cache.max_entries",
        Off("bytes alone bound it"),
        Count,
        Restart,
    ),
    key("cache.max_entry_size", Value(r#""8MB""#), Size, Restart),
    key("cache.default_ttl", Value(r#""5m""#), Duration, Restart),
    key(
        "cache.credential_headers",
        Value(r#"["x-api-key", "api-key"]"#),
        List("header name"),
        Applies,
    ),
    key(
        "cache.targeted_cache_control",
        Value(r#"["cdn-cache-control"]"#),
        List("header name"),
        Restart,
    ),
    key("cache.redis", Off("no shared tier"), Table, Restart),
    key("cache.redis.url", Required, Text, Restart),
    key(
        "cache.redis.secret_file",
        Derived("one of secret_file, secret_env is required"),
        File,
        Restart,
    ),
    key(
        "cache.redis.secret_env",
        Derived("one of secret_file, secret_env is required"),
        Text,
        Restart,
    ),
    key(
        "cache.redis.key_prefix",
        Value(r#""hyperion:""#),
        Text,
        Restart,
    ),
    key("cache.redis.timeout", Value(r#""50ms""#), Duration, Restart),
    key(
        "cache.redis.ca_file",
        Off("the platform's roots"),
        File,
        Restart,
    ),
    // [compression]
    key(
        "compression",
        Off("answers leave as the upstream sent them"),
        Table,
        Applies,
    ),
    key(
        "compression.algorithms",
        Value(r#"["br", "gzip"]"#),
        List("br, gzip"),
        Applies,
    ),
    key("compression.min_size", Value(r#""1KB""#), Size, Applies),
    key(
        "compression.content_types",
        Value(r#"["application/json", "application/x-ndjson", "text/event-stream", "text/*"]"#),
        List("media type"),
        Applies,
    ),
    key("compression.gzip_level", Value("6"), Count, Applies),
    key("compression.brotli_quality", Value("5"), Count, Applies),
    // [rate_limits.NAME]
    key("rate_limits", Off("no limiters"), Table, Applies),
    key(
        "rate_limits.NAME.key",
        Required,
        Choice("client_ip, header:<name>, tenant, route, global"),
        Applies,
    ),
    key(
        "rate_limits.NAME.rate",
        Derived("one of rate, tokens is required"),
        Rate,
        Applies,
    ),
    key(
        "rate_limits.NAME.tokens",
        Derived("one of rate, tokens is required"),
        Rate,
        Applies,
    ),
    key(
        "rate_limits.NAME.burst",
        Derived("the rate's count"),
        Count,
        Applies,
    ),
    key("rate_limits.NAME.count_hits", Value("false"), Bool, Applies),
    key(
        "rate_limits.NAME.default_tokens",
        Value("1024"),
        Count,
        Applies,
    ),
    key("rate_limits.NAME.max_keys", Value("100000"), Count, Applies),
    key(
        "rate_limits.NAME.when_absent",
        Value(r#""client_ip""#),
        Choice("client_ip, shared"),
        Applies,
    ),
    // [tiers.NAME]
    key("tiers", Off("no tiers"), Table, Applies),
    key("tiers.NAME.rate", Off("no request budget"), Rate, Applies),
    key(
        "tiers.NAME.tokens_per_minute",
        Off("no per-minute budget"),
        Count,
        Applies,
    ),
    key(
        "tiers.NAME.tokens_per_day",
        Off("no daily budget"),
        Count,
        Applies,
    ),
    key("tiers.NAME.max_concurrent", Off("no limit"), Count, Applies),
    key(
        "tiers.NAME.priority",
        Value(r#""standard""#),
        Choice("interactive, standard, batch"),
        Applies,
    ),
    key(
        "tiers.NAME.max_priority",
        Derived("priority"),
        Choice("interactive, standard, batch"),
        Applies,
    ),
    key("tiers.NAME.weight", Value("1"), Count, Applies),
    key(
        "tiers.NAME.max_queued",
        Derived("the upstream's max_queued_per_tenant"),
        Count,
        Applies,
    ),
    // [keys.NAME]
    key("keys", Off("no key has terms of its own"), Table, Applies),
    key("keys.NAME.rate", Derived("the key's tier"), Rate, Applies),
    key(
        "keys.NAME.tokens_per_minute",
        Derived("the key's tier"),
        Count,
        Applies,
    ),
    key(
        "keys.NAME.tokens_per_day",
        Derived("the key's tier"),
        Count,
        Applies,
    ),
    key(
        "keys.NAME.max_concurrent",
        Derived("the key's tier"),
        Count,
        Applies,
    ),
    key(
        "keys.NAME.priority",
        Derived("the key's tier"),
        Choice("interactive, standard, batch"),
        Applies,
    ),
    key(
        "keys.NAME.max_priority",
        Derived("the key's tier"),
        Choice("interactive, standard, batch"),
        Applies,
    ),
    key(
        "keys.NAME.weight",
        Derived("the key's tier"),
        Count,
        Applies,
    ),
    key(
        "keys.NAME.max_queued",
        Derived("the key's tier"),
        Count,
        Applies,
    ),
    // [upstreams.NAME]
    key("upstreams", Required, Table, Applies),
    key(
        "upstreams.NAME.servers",
        Required,
        List("server table"),
        Applies,
    ),
    key("upstreams.NAME.servers.url", Required, Text, Applies),
    key("upstreams.NAME.servers.weight", Value("1"), Count, Applies),
    key(
        "upstreams.NAME.servers.models",
        Off("any model"),
        List("model name"),
        Applies,
    ),
    key(
        "upstreams.NAME.auth_header",
        Off("the client's headers pass (without Hyperion's keys)"),
        Table,
        Applies,
    ),
    key(
        "upstreams.NAME.auth_header.name",
        Value(r#""authorization""#),
        Text,
        Applies,
    ),
    key(
        "upstreams.NAME.auth_header.env",
        Derived("one of env, file is required"),
        Text,
        Applies,
    ),
    key(
        "upstreams.NAME.auth_header.file",
        Derived("one of env, file is required"),
        File,
        Applies,
    ),
    key(
        "upstreams.NAME.ca_file",
        Off("the platform's roots"),
        File,
        Applies,
    ),
    key(
        "upstreams.NAME.connect_timeout",
        Value(r#""2s""#),
        Duration,
        Applies,
    ),
    key(
        "upstreams.NAME.response_timeout",
        Value(r#""300s""#),
        Duration,
        Applies,
    ),
    key(
        "upstreams.NAME.idle_timeout",
        Value(r#""60s""#),
        Duration,
        Applies,
    ),
    key(
        "upstreams.NAME.balance",
        Value(r#""least_inflight""#),
        Choice("least_inflight, round_robin, p2c_ewma, consistent_hash, prefix_affinity"),
        Applies,
    ),
    key(
        "upstreams.NAME.hash_key",
        Value(r#""cache_key""#),
        Choice("cache_key, header:<name>"),
        Applies,
    ),
    key(
        "upstreams.NAME.prefix_cache_tokens",
        Value("100000"),
        Count,
        Applies,
    ),
    key("upstreams.NAME.retries", Value("1"), Count, Applies),
    key(
        "upstreams.NAME.health",
        Off("passive ejection only"),
        Table,
        Applies,
    ),
    key("upstreams.NAME.health.path", Required, Text, Applies),
    key(
        "upstreams.NAME.health.interval",
        Value(r#""5s""#),
        Duration,
        Applies,
    ),
    key(
        "upstreams.NAME.health.timeout",
        Derived("2s, at most interval"),
        Duration,
        Applies,
    ),
    key(
        "upstreams.NAME.health.unhealthy_after",
        Value("3"),
        Count,
        Applies,
    ),
    key(
        "upstreams.NAME.health.healthy_after",
        Value("2"),
        Count,
        Applies,
    ),
    key(
        "upstreams.NAME.model_routing",
        Value(r#""off""#),
        Choice("off, static, discover"),
        Applies,
    ),
    key(
        "upstreams.NAME.discover_interval",
        Value(r#""10s""#),
        Duration,
        Applies,
    ),
    key(
        "upstreams.NAME.engine_signals",
        Value(r#""off""#),
        Choice("off, vllm, sglang, ollama"),
        Applies,
    ),
    key(
        "upstreams.NAME.engine_poll_interval",
        Value(r#""1s""#),
        Duration,
        Applies,
    ),
    key(
        "upstreams.NAME.max_inflight_per_server",
        Off("no limit"),
        Count,
        Applies,
    ),
    key(
        "upstreams.NAME.queue_timeout",
        Value(r#""30s""#),
        Duration,
        Applies,
    ),
    key(
        "upstreams.NAME.queue",
        Value(r#""fair""#),
        Choice("fair, fifo"),
        Applies,
    ),
    key(
        "upstreams.NAME.max_queued_per_tenant",
        Value("100"),
        Count,
        Applies,
    ),
    // [[route]]
    key("route", Required, Table, Applies),
    key("route.name", Required, Text, Applies),
    key("route.match", Off("every request"), Table, Applies),
    key("route.match.host", Off("any host"), Text, Applies),
    key(
        "route.match.methods",
        Off("any method"),
        List("method"),
        Applies,
    ),
    key("route.match.path_prefix", Off("any path"), Text, Applies),
    key("route.match.headers", Off("any headers"), Table, Applies),
    key("route.match.paths", Off("any path"), List("path"), Applies),
    key(
        "route.upstream",
        Derived("required unless deny or split"),
        Text,
        Applies,
    ),
    key(
        "route.split",
        Off("all to upstream"),
        List("arm table"),
        Applies,
    ),
    key("route.split.upstream", Required, Text, Applies),
    key("route.split.weight", Required, Count, Applies),
    key(
        "route.split_by",
        Value(r#""client""#),
        Choice("client, header:<name>"),
        Applies,
    ),
    key("route.deny", Value("false"), Bool, Applies),
    key("route.preserve_host", Value("true"), Bool, Applies),
    key(
        "route.rate_limit",
        Value("[]"),
        List("limiter name"),
        Applies,
    ),
    key(
        "route.auth",
        Derived("required with [auth], else off"),
        Choice("required, optional, off"),
        Applies,
    ),
    key(
        "route.unknown_model",
        Value(r#""reject""#),
        Choice("reject, any_server"),
        Applies,
    ),
    key("route.cache", Off("not cached"), Table, Applies),
    key(
        "route.cache.mode",
        Required,
        Choice("origin, force, off"),
        Applies,
    ),
    key(
        "route.cache.ttl",
        Derived("cache.default_ttl (force mode)"),
        Duration,
        Applies,
    ),
    key(
        "route.cache.negative_ttl",
        Value(r#""10s""#),
        Duration,
        Applies,
    ),
    key(
        "route.cache.scope",
        Value(r#""credentials""#),
        Choice("credentials, shared, header:<name>"),
        Applies,
    ),
    key(
        "route.cache.body_key",
        Value(r#""none""#),
        Choice("none, raw, json"),
        Applies,
    ),
    key(
        "route.cache.ignore_fields",
        Value("[]"),
        List("JSON field path"),
        Applies,
    ),
    key(
        "route.cache.stream",
        Value(r#""off""#),
        Choice("off, record"),
        Applies,
    ),
    key(
        "route.cache.stale_if_error",
        Value(r#""0s""#),
        Duration,
        Applies,
    ),
    key(
        "route.cache.stale_while_revalidate",
        Value(r#""0s""#),
        Duration,
        Applies,
    ),
    key(
        "route.cache.client_cache_control",
        Value(r#""honour""#),
        Choice("honour, ignore"),
        Applies,
    ),
    key("route.cache.store_private", Value("false"), Bool, Applies),
    key(
        "route.cache.coalesce_timeout",
        Derived("the upstream's response_timeout"),
        Duration,
        Applies,
    ),
    key("route.headers", Off("no rewrite"), Table, Applies),
    key("route.headers.request_set", Off("none"), Headers, Applies),
    key(
        "route.headers.request_remove",
        Off("none"),
        List("header name"),
        Applies,
    ),
    key("route.headers.response_set", Off("none"), Headers, Applies),
    key(
        "route.headers.response_remove",
        Off("none"),
        List("header name"),
        Applies,
    ),
];

/// The key at `path`, if the table has it.
pub fn find(path: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.path == path)
}

/// The keys directly under `table` (`""` for the top level,
/// `"upstreams.NAME"`), in the reference's order.
pub fn children(table: &str) -> impl Iterator<Item = &'static Key> + '_ {
    KEYS.iter().filter(move |k| match k.path.rsplit_once('.') {
        Some((parent, _)) => parent == table,
        None => table.is_empty(),
    })
}

/// The name of `k` within its table: `idle_timeout` for
/// `server.idle_timeout`.
pub fn name(k: &Key) -> &'static str {
    k.path.rsplit_once('.').map_or(k.path, |(_, n)| n)
}

/// The keys a policy file sets, each with its value as parsed: paths as
/// in the table (`upstreams.ollama.retries` is `upstreams.NAME.retries`).
/// Keys the table does not have (the parser refuses them) are left out.
pub fn set_in(doc: &toml::Table) -> Vec<(&'static Key, &toml::Value)> {
    fn walk<'d>(
        prefix: &str,
        table: &'d toml::Table,
        out: &mut Vec<(&'static Key, &'d toml::Value)>,
    ) {
        for (name, value) in table {
            let path = format!("{prefix}{name}");
            let path = match find(&path) {
                Some(k) => {
                    out.push((k, value));
                    path
                }
                // `[upstreams.ollama]`, `[rate_limits.per_ip]`: a name of
                // the operator's, standing for NAME.
                None if find(&format!("{prefix}NAME.key")).is_some()
                    || find(&format!("{prefix}NAME.servers")).is_some()
                    || find(&format!("{prefix}NAME.weight")).is_some() =>
                {
                    format!("{prefix}NAME")
                }
                None => continue,
            };
            match value {
                toml::Value::Table(t) => walk(&format!("{path}."), t, out),
                toml::Value::Array(items) => {
                    for item in items {
                        if let toml::Value::Table(t) = item {
                            walk(&format!("{path}."), t, out);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    walk("", doc, &mut out);
    out
}

/// `hyperion check`'s account of the keys a file sets, from this table:
/// how many, which of them a reload cannot change, and which repeat their
/// default (and can go).
pub fn summary(text: &str) -> Option<String> {
    let doc: toml::Table = text.parse().ok()?;
    let set = set_in(&doc);
    let mut restart: Vec<&str> = Vec::new();
    let mut defaults: Vec<&str> = Vec::new();
    for (k, value) in &set {
        if k.reload == Reload::Restart && k.unit != Table && !restart.contains(&k.path) {
            restart.push(k.path);
        }
        if let Value(default) = k.default {
            let parsed = format!("v = {default}").parse::<toml::Table>().ok();
            if parsed.as_ref().and_then(|t| t.get("v")) == Some(*value)
                && !defaults.contains(&k.path)
            {
                defaults.push(k.path);
            }
        }
    }
    let mut out = format!(
        "keys:      {} set (each key's default, unit and reload: docs/policy.md#every-key)",
        set.len()
    );
    if !restart.is_empty() {
        out.push_str(&format!(
            "\n           a reload keeps the running value of: {}",
            restart.join(", ")
        ));
    }
    if !defaults.is_empty() {
        out.push_str(&format!(
            "\n           set to their default: {}",
            defaults.join(", ")
        ));
    }
    Some(out)
}

impl std::fmt::Display for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value(v) => write!(f, "`{v}`"),
            Off(what) => write!(f, "none: {what}"),
            Derived(from) => write!(f, "{from}"),
            Required => f.write_str("required"),
        }
    }
}

impl std::fmt::Display for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Duration => f.write_str("duration"),
            Size => f.write_str("size"),
            Count => f.write_str("number"),
            Fraction => f.write_str("number from 0 to 1"),
            Bool => f.write_str("true/false"),
            Choice(words) => write!(f, "one of: {words}"),
            Text => f.write_str("text"),
            File => f.write_str("file path"),
            Address => f.write_str("host:port"),
            List(of) => write!(f, "list of {of}"),
            Rate => f.write_str("N/unit"),
            Table => f.write_str("table"),
            Headers => f.write_str("header → value table"),
        }
    }
}

impl std::fmt::Display for Reload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Applies => "applies",
            Restart => "restart",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_s_keys_are_found_through_the_operator_s_names() {
        let doc: toml::Table = r#"
[server]
listen = ["127.0.0.1:8080"]
idle_timeout = "90s"
[upstreams.ollama]
servers = [{ url = "http://a", weight = 2 }]
retries = 1
[upstreams.ollama.health]
path = "/"
[rate_limits.per_ip]
key = "client_ip"
[[route]]
name = "r"
match = { path_prefix = "/" }
[route.cache]
mode = "force"
"#
        .parse()
        .unwrap();
        let paths: Vec<&str> = set_in(&doc).iter().map(|(k, _)| k.path).collect();
        for want in [
            "server",
            "server.listen",
            "server.idle_timeout",
            "upstreams",
            "upstreams.NAME.servers",
            "upstreams.NAME.servers.url",
            "upstreams.NAME.servers.weight",
            "upstreams.NAME.retries",
            "upstreams.NAME.health",
            "upstreams.NAME.health.path",
            "rate_limits",
            "rate_limits.NAME.key",
            "route",
            "route.name",
            "route.match",
            "route.match.path_prefix",
            "route.cache",
            "route.cache.mode",
        ] {
            assert!(paths.contains(&want), "{want} not found in {paths:?}");
        }
        let text =
            summary("[server]\nlisten = [\"127.0.0.1:8080\"]\nidle_timeout = \"90s\"\n").unwrap();
        assert!(
            text.contains(
                "a reload keeps the running value of: server.idle_timeout, server.listen"
            ),
            "{text}"
        );
        assert!(
            text.contains("set to their default: server.listen"),
            "{text}"
        );
    }

    #[test]
    fn every_path_is_listed_once_under_a_listed_table() {
        for (i, k) in KEYS.iter().enumerate() {
            assert!(
                KEYS[..i].iter().all(|o| o.path != k.path),
                "{} is listed twice",
                k.path
            );
            if let Some((parent, _)) = k.path.rsplit_once('.') {
                let parent = parent.strip_suffix(".NAME").unwrap_or(parent);
                assert!(find(parent).is_some(), "{}: no table {parent}", k.path);
            }
        }
    }
}
