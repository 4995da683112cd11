//! Validation of `[cache]`, `[cache.redis]` and each route's `[route.cache]`.
//!
//! Part of `validate.rs`'s `Validator` (its errors, its order): this file
//! owns only these tables' rules.

use super::*;

impl Validator<'_> {
    /// A list of header names (lower-cased, repeats dropped); `refuse`
    /// names the ones this key cannot take, with the problem and its fix.
    pub(super) fn header_names(
        &self,
        list: Spanned<Vec<Spanned<String>>>,
        key: &str,
        example: &str,
        refuse: impl Fn(&http::HeaderName) -> Option<(String, &'static str)>,
    ) -> Result<Vec<http::HeaderName>, PolicyError> {
        let mut names = Vec::new();
        for n in list.into_inner() {
            let text = n.get_ref().trim().to_ascii_lowercase();
            let name = http::HeaderName::from_bytes(text.as_bytes()).map_err(|_| {
                self.err(
                    n.span(),
                    key,
                    format!("`{}` is not a header name", n.get_ref()),
                    format!("list header names, e.g. {example}"),
                )
            })?;
            if let Some((problem, fix)) = refuse(&name) {
                return Err(self.err(n.span(), key, problem, fix));
            }
            if !names.contains(&name) {
                names.push(name);
            }
        }
        Ok(names)
    }

    pub(super) fn cache(&self, raw: Spanned<raw::RawCache>) -> Result<CachePolicy, PolicyError> {
        let span = raw.span();
        let raw = raw.into_inner();
        let redis = raw.redis.map(|r| self.redis(r)).transpose()?;
        let d = CachePolicy::default();
        let credential_headers = match raw.credential_headers {
            None => d.credential_headers.clone(),
            Some(list) => self.header_names(
                list,
                "cache.credential_headers",
                "credential_headers = [\"x-api-key\", \"api-key\"]",
                |name| {
                    (*name == header::AUTHORIZATION || *name == header::COOKIE).then(|| {
                        (
                            format!("`{name}` is always keyed"),
                            "list only the other headers that carry credentials",
                        )
                    })
                },
            )?,
        };
        let targeted_cache_control = match raw.targeted_cache_control {
            None => d.targeted_cache_control.clone(),
            Some(list) => self.header_names(
                list,
                "cache.targeted_cache_control",
                "targeted_cache_control = [\"hyperion-cache-control\", \"cdn-cache-control\"]",
                |name| {
                    (*name == header::CACHE_CONTROL).then(|| {
                        (
                            "Cache-Control is what targeted fields override".to_owned(),
                            "list only targeted fields (RFC 9213), e.g. \"cdn-cache-control\"; [] to obey Cache-Control alone",
                        )
                    })
                },
            )?,
        };
        let c = CachePolicy {
            targeted_cache_control,
            max_size: raw.max_size.map_or(d.max_size, |s| s.0),
            max_entries: match &raw.max_entries {
                Some(n) if *n.get_ref() == 0 => return Err(self.err(
                    n.span(),
                    "cache.max_entries",
                    "a cache of 0 entries stores nothing",
                    "give it room, e.g. max_entries = 10000, or remove the key to bound bytes only",
                )),
                Some(n) => Some(*n.get_ref()),
                None => None,
            },
            max_entry_size: raw.max_entry_size.map_or(d.max_entry_size, |s| s.0),
            default_ttl: raw.default_ttl.map_or(d.default_ttl, |t| t.0),
            redis,
            credential_headers,
        };
        if c.max_size == 0 {
            return Err(self.err(
                span,
                "cache.max_size",
                "a cache of 0 bytes stores nothing",
                "give it room, e.g. max_size = \"256MB\", or remove the routes' [route.cache]",
            ));
        }
        if c.max_entry_size == 0 || c.max_entry_size > c.max_size {
            return Err(self.err(
                span,
                "cache.max_entry_size",
                format!(
                    "{} is not between 1 byte and max_size ({})",
                    Size(c.max_entry_size),
                    Size(c.max_size)
                ),
                "set it at most max_size, e.g. max_entry_size = \"8MB\"",
            ));
        }
        if c.default_ttl.is_zero() {
            return Err(self.err(
                span,
                "cache.default_ttl",
                "a ttl of 0 makes every entry stale at once",
                "give it a duration, e.g. default_ttl = \"5m\"",
            ));
        }
        Ok(c)
    }

    pub(super) fn redis(&self, raw: Spanned<raw::RawRedis>) -> Result<RedisPolicy, PolicyError> {
        let span = raw.span();
        let raw = raw.into_inner();
        let url_span = raw.url.span();
        let url = raw.url.into_inner();
        let scheme = url.split("://").next().unwrap_or("");
        let tls = url.contains("://") && matches!(scheme, "rediss" | "valkeys");
        if let Err(e) = redis::IntoConnectionInfo::into_connection_info(url.as_str()) {
            return Err(self.err(
                url_span,
                "cache.redis.url",
                format!("not a Redis URL: {e}"),
                "write it as redis://[user:password@]host:port/db, e.g. url = \"redis://127.0.0.1:6379/0\", or redis+unix:///path/to/redis.sock",
            ));
        }
        let key_prefix = match raw.key_prefix {
            None => "hyperion:".to_owned(),
            Some(p) => {
                let span = p.span();
                let p = p.into_inner();
                if p.is_empty()
                    || p.len() > 64
                    || p.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(self.err(
                        span,
                        "cache.redis.key_prefix",
                        "a prefix must be 1 to 64 characters, without spaces or control characters",
                        "name the fleet, e.g. key_prefix = \"hyperion:\"",
                    ));
                }
                p
            }
        };
        let timeout = match raw.timeout {
            None => Duration::from_millis(50),
            Some(t) => {
                let span = t.span();
                let t = t.into_inner().0;
                if t < Duration::from_millis(1) || t > Duration::from_secs(10) {
                    return Err(self.err(
                        span,
                        "cache.redis.timeout",
                        format!(
                            "{} is not between 1ms and 10s",
                            humantime::format_duration(t)
                        ),
                        "a few round trips on your network, e.g. timeout = \"50ms\"",
                    ));
                }
                t
            }
        };
        let (secret, secret_source) = self.redis_secret(&raw.secret_env, &raw.secret_file, span)?;
        let ca_pem = match raw.ca_file {
            None => None,
            Some(f) if !tls => {
                return Err(self.err(
                    f.span(),
                    "cache.redis.ca_file",
                    "ca_file only applies to TLS (rediss://)",
                    "write url = \"rediss://...\", or remove ca_file",
                ))
            }
            Some(f) => {
                let path = self.src.relative_path(f.get_ref());
                let pem = std::fs::read(&path).map_err(|e| {
                    self.err(
                        f.span(),
                        "cache.redis.ca_file",
                        format!("cannot read {}: {e}", path.display()),
                        "name a PEM file of the CA that signed the Redis server's certificate",
                    )
                })?;
                let mut reader = std::io::BufReader::new(&pem[..]);
                let certs = rustls_pemfile_certs(&mut reader);
                if certs == 0 {
                    return Err(self.err(
                        f.span(),
                        "cache.redis.ca_file",
                        format!("{} holds no PEM certificate", path.display()),
                        "name a PEM file (-----BEGIN CERTIFICATE-----)",
                    ));
                }
                Some(Arc::from(pem))
            }
        };
        Ok(RedisPolicy {
            url,
            key_prefix,
            timeout,
            secret,
            secret_source,
            ca_pem,
        })
    }

    /// The shared tier's secret: required, from exactly one of `secret_env`
    /// and `secret_file`, and long enough not to be guessed.
    pub(super) fn redis_secret(
        &self,
        env: &Option<Spanned<String>>,
        file: &Option<Spanned<String>>,
        table: Range<usize>,
    ) -> Result<(FleetSecret, String), PolicyError> {
        const FIX: &str = "generate one with `openssl rand -hex 32`, give the same one to every instance of the fleet";
        let (text, source, key, span) = match (env, file) {
            (Some(e), Some(_)) => {
                return Err(self.err(
                    e.span(),
                    "cache.redis.secret_env",
                    "both secret_env and secret_file are set",
                    "keep one of them",
                ))
            }
            (None, None) => {
                return Err(self.err(
                    table,
                    "cache.redis.secret_file",
                    "the shared tier needs a secret: entries and messages in Redis are signed with it, so nothing written there by anyone else is served",
                    format!("add secret_file = \"/etc/hyperion/redis.secret\" (or secret_env = \"HYPERION_REDIS_SECRET\"); {FIX}"),
                ))
            }
            (Some(var), None) => {
                let text = std::env::var(var.get_ref()).map_err(|_| {
                    self.err(
                        var.span(),
                        "cache.redis.secret_env",
                        format!("the environment variable {} is not set", var.get_ref()),
                        format!("export {}=<secret>; {FIX}", var.get_ref()),
                    )
                })?;
                (text, format!("env {}", var.get_ref()), "cache.redis.secret_env", var.span())
            }
            (None, Some(f)) => {
                let path = self.src.relative_path(f.get_ref());
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    self.err(
                        f.span(),
                        "cache.redis.secret_file",
                        format!("cannot read {}: {e}", path.display()),
                        format!("write the secret to that file, readable by hyperion only; {FIX}"),
                    )
                })?;
                (text, format!("file {}", path.display()), "cache.redis.secret_file", f.span())
            }
        };
        let text = text.trim();
        if text.len() < 32 {
            return Err(self.err(
                span,
                key,
                format!(
                    "the secret is {} bytes long; at least 32 are needed",
                    text.len()
                ),
                FIX,
            ));
        }
        Ok((FleetSecret::from_text(text), source))
    }

    /// `None` for `mode = "off"` (the other keys may stay, so caching can be
    /// switched off and on again by editing one line).
    pub(super) fn route_cache(
        &self,
        raw: Spanned<raw::RawRouteCache>,
        route: &str,
        store: &CachePolicy,
        response_timeout: Duration,
    ) -> Result<Option<RouteCachePolicy>, PolicyError> {
        let span = raw.span();
        let raw = raw.into_inner();
        let key = format!("{route}.cache");
        let Some(mode) = raw.mode else {
            return Err(self.err(
                span,
                format!("{key}.mode"),
                "the cache mode is missing",
                "add mode = \"force\" (the policy's ttl), \"origin\" (the upstream's Cache-Control) or \"off\"",
            ));
        };
        let freshness = match mode.get_ref() {
            raw::CacheMode::Off => return Ok(None),
            raw::CacheMode::Origin => {
                if let Some(ttl) = &raw.ttl {
                    return Err(self.err(
                        ttl.span(),
                        format!("{key}.ttl"),
                        "mode = \"origin\" takes freshness from the upstream's headers, not from ttl",
                        "remove ttl, or use mode = \"force\" to impose it",
                    ));
                }
                Freshness::Origin
            }
            raw::CacheMode::Force => {
                let ttl = match &raw.ttl {
                    Some(t) if t.get_ref().0.is_zero() => {
                        return Err(self.err(
                            t.span(),
                            format!("{key}.ttl"),
                            "a ttl of 0 makes every entry stale at once",
                            "give it a duration, e.g. ttl = \"10m\", or use mode = \"off\"",
                        ))
                    }
                    Some(t) => t.get_ref().0,
                    None => store.default_ttl,
                };
                Freshness::Force { ttl }
            }
        };
        let negative_ttl = match (&raw.negative_ttl, freshness) {
            (Some(t), Freshness::Origin) => {
                return Err(self.err(
                    t.span(),
                    format!("{key}.negative_ttl"),
                    "mode = \"origin\" keeps a 404 as long as the upstream's headers say",
                    "remove negative_ttl, or use mode = \"force\"",
                ))
            }
            (_, Freshness::Origin) => Duration::ZERO,
            (Some(t), Freshness::Force { ttl }) => t.get_ref().0.min(ttl),
            (None, Freshness::Force { ttl }) => DEFAULT_NEGATIVE_TTL.min(ttl),
        };
        let body_key = match raw.body_key.as_ref().map(|b| *b.get_ref()) {
            None | Some(raw::BodyKey::None) => BodyKey::None,
            Some(raw::BodyKey::Raw) => BodyKey::Raw,
            Some(raw::BodyKey::Json) => BodyKey::Json,
        };
        let mut ignore_fields = Vec::new();
        if let Some(fields) = raw.ignore_fields {
            if body_key != BodyKey::Json {
                return Err(self.err(
                    fields.span(),
                    format!("{key}.ignore_fields"),
                    "ignore_fields only applies to JSON bodies",
                    "add body_key = \"json\", or remove ignore_fields",
                ));
            }
            for f in fields.into_inner() {
                let parts: Vec<String> = f.get_ref().split('.').map(str::to_owned).collect();
                if parts.iter().any(|p| p.is_empty()) {
                    return Err(self.err(
                        f.span(),
                        format!("{key}.ignore_fields"),
                        format!("`{}` is not a field path", f.get_ref()),
                        "name a field, or a nested one with dots: \"keep_alive\", \"options.num_thread\"",
                    ));
                }
                ignore_fields.push(parts.into_boxed_slice());
            }
        }
        let credentials = || CacheScope::credentials(&store.credential_headers);
        let scope = match &raw.scope {
            None => credentials(),
            Some(s) => {
                let text = s.get_ref().trim();
                match text {
                    // "authorization" is the first contract's name for it.
                    "credentials" | "authorization" => credentials(),
                    "shared" => CacheScope::Shared,
                    _ => match text.strip_prefix("header:") {
                        Some(name) => match http::HeaderName::from_bytes(name.trim().as_bytes()) {
                            Ok(h) => CacheScope::Header(h),
                            Err(_) => {
                                return Err(self.err(
                                    s.span(),
                                    format!("{key}.scope"),
                                    format!("`{name}` is not a header name"),
                                    "write scope = \"header:x-api-key\" with a real header name",
                                ))
                            }
                        },
                        None => {
                            return Err(self.err(
                                s.span(),
                                format!("{key}.scope"),
                                format!("unknown scope `{text}`"),
                                "use \"credentials\" (per user, the default), \"header:<name>\" or \"shared\"",
                            ))
                        }
                    },
                }
            }
        };
        let store_private = raw.store_private.as_ref().is_some_and(|b| *b.get_ref());
        if let (Some(b), Freshness::Origin) = (&raw.store_private, freshness) {
            if *b.get_ref() {
                return Err(self.err(
                    b.span(),
                    format!("{key}.store_private"),
                    "mode = \"origin\" never stores what the upstream marked private",
                    "remove store_private, or use mode = \"force\"",
                ));
            }
        }
        Ok(Some(RouteCachePolicy {
            freshness,
            body_key,
            ignore_fields,
            scope,
            record_streams: raw
                .stream
                .is_some_and(|s| *s.get_ref() == raw::StreamCaching::Record),
            stale_while_revalidate: raw
                .stale_while_revalidate
                .map_or(Duration::ZERO, |d| d.get_ref().0),
            stale_if_error: raw.stale_if_error.map_or(Duration::ZERO, |d| d.get_ref().0),
            honour_client: raw
                .client_cache_control
                .is_none_or(|c| *c.get_ref() == raw::ClientCacheControl::Honour),
            store_private,
            coalesce_timeout: raw
                .coalesce_timeout
                .map_or(response_timeout, |d| d.get_ref().0),
            negative_ttl,
            // Set by the route, which knows whether answers are read here.
            keys_accept_encoding: false,
        }))
    }
}
