//! Raw `proxy.toml` → validated `Policy`: defaults, cross-references
//! (upstream and limiter names), reachability of routes, and the keys whose
//! behaviour this build does not have yet.
//!
//! Every rejection names the key, its line and what to do. Keys that are
//! parsed but not built are refused here rather than silently ignored, so an
//! operator never believes a limit or a cache is active when it is not.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use http::header;
use http::uri::{Authority, Scheme};
use http::{Method, Uri};
use toml::Spanned;

use super::error::{nearest, PolicyError, Source};
use super::raw::{self, Balance, ModelRouting, RawPolicy, UnknownModel};
use super::units::{Dur, Size};
use super::ModelName;
use super::{
    AdminPolicy, AdminToken, BodyKey, CachePolicy, CacheScope, CompressionPolicy, FleetSecret,
    Freshness, HashKey, HeaderRewrite, HealthPolicy, LimitKey, LimitUnit, Policy, RateLimitPolicy,
    RedisPolicy, RouteCachePolicy, RoutePolicy, ServerPolicy, ServerTls, TlsTermination,
    UpstreamPolicy, UpstreamServer,
};
use crate::route::{HostPattern, RouteMatch};

/// Servers in one pool at most (the balancers track them in 64-bit sets).
const MAX_SERVERS: usize = 64;

pub(super) fn parse(name: &str, text: &str) -> Result<Policy, PolicyError> {
    let src = Source { name, text };
    let de = toml::Deserializer::parse(text).map_err(|e| {
        let span = e.span();
        let first = e
            .message()
            .lines()
            .next()
            .unwrap_or("invalid TOML")
            .to_owned();
        src.error(
            span,
            "syntax",
            first,
            "fix the TOML syntax at this position",
        )
    })?;
    let raw: RawPolicy =
        serde_path_to_error::deserialize(de).map_err(|e| src.deserialize_error(e))?;
    Validator {
        src,
        platform_roots: std::cell::OnceCell::new(),
    }
    .policy(raw)
}

struct Validator<'a> {
    src: Source<'a>,
    /// The platform's CA certificates, read once, for https upstreams
    /// without a `ca_file`.
    platform_roots: std::cell::OnceCell<Arc<rustls::RootCertStore>>,
}

/// How many certificates a PEM file holds (0 for none or garbage).
fn rustls_pemfile_certs(reader: &mut dyn std::io::BufRead) -> usize {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_reader_iter(reader)
        .filter(|c| c.is_ok())
        .count()
}

/// `negative_ttl` of a `force` route that sets none: long enough to
/// absorb a burst of requests for a missing model, short enough that
/// pulling it is noticed soon.
const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(10);

impl Validator<'_> {
    fn err(
        &self,
        span: Range<usize>,
        key: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> PolicyError {
        self.src.error(Some(span), key, problem, fix)
    }

    fn line_of(&self, span: &Range<usize>) -> usize {
        self.src.text[..span.start.min(self.src.text.len())]
            .matches('\n')
            .count()
            + 1
    }

    fn policy(&self, raw: RawPolicy) -> Result<Policy, PolicyError> {
        let server = self.server(raw.server)?;
        let admin = match raw.admin {
            Some(a) => Some(self.admin(a, &server)?),
            None => None,
        };
        let cache = match raw.cache {
            Some(c) => self.cache(c)?,
            None => CachePolicy::default(),
        };
        let compression = match raw.compression {
            Some(c) => Some(Arc::new(self.compression(c)?)),
            None => None,
        };
        let mut rate_limits = Vec::with_capacity(raw.rate_limits.len());
        for (name, limit) in raw.rate_limits {
            rate_limits.push(Arc::new(self.rate_limit(name, limit)?));
        }
        let mut upstreams = Vec::with_capacity(raw.upstreams.len());
        for (name, up) in raw.upstreams {
            upstreams.push(Arc::new(self.upstream(name, up.into_inner())?));
        }
        let routes = self.routes(
            raw.route,
            &upstreams,
            &cache,
            &rate_limits,
            compression.is_some(),
        )?;
        Ok(Policy {
            server,
            cache,
            upstreams,
            routes,
            compression,
            rate_limits,
            admin,
        })
    }

    fn admin(
        &self,
        raw: Spanned<raw::RawAdmin>,
        server: &ServerPolicy,
    ) -> Result<AdminPolicy, PolicyError> {
        let span = raw.span();
        let raw = raw.into_inner();
        let listen = raw.listen.map_or_else(
            || "127.0.0.1:9090".parse().expect("a valid address"),
            |l| l.0,
        );
        if server.listen.contains(&listen) {
            return Err(self.err(
                span,
                "admin.listen",
                format!("{listen} is also a server.listen address"),
                "give the admin API an address of its own, e.g. listen = \"127.0.0.1:9090\"",
            ));
        }
        let (token, token_source) = match (raw.token_env, raw.token_file) {
            (Some(_), Some(_)) => {
                return Err(self.err(
                    span,
                    "admin",
                    "both token_env and token_file are set",
                    "keep one of them",
                ))
            }
            (Some(var), None) => {
                let value = std::env::var(&var).map_err(|_| {
                    self.err(
                        span.clone(),
                        "admin.token_env",
                        format!("the environment variable {var} is not set"),
                        format!("export {var}=<a long random token> (e.g. openssl rand -hex 32), or remove token_env"),
                    )
                })?;
                (
                    self.admin_token(value.trim(), &span, "admin.token_env")?,
                    format!("env {var}"),
                )
            }
            (None, Some(file)) => {
                let path = self.src.relative_path(&file);
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    self.err(
                        span.clone(),
                        "admin.token_file",
                        format!("cannot read {}: {e}", path.display()),
                        "write the token to that file, readable by hyperion (e.g. openssl rand -hex 32 > FILE)",
                    )
                })?;
                (
                    self.admin_token(text.trim(), &span, "admin.token_file")?,
                    format!("file {}", path.display()),
                )
            }
            (None, None) => {
                return Ok(AdminPolicy {
                    listen,
                    token: None,
                    token_source: None,
                })
            }
        };
        Ok(AdminPolicy {
            listen,
            token: Some(token),
            token_source: Some(token_source),
        })
    }

    fn admin_token(
        &self,
        token: &str,
        span: &Range<usize>,
        key: &str,
    ) -> Result<AdminToken, PolicyError> {
        if token.len() < 16 {
            return Err(self.err(
                span.clone(),
                key,
                format!(
                    "the admin token is {} characters long; a short token can be guessed",
                    token.len()
                ),
                "use at least 16 random characters, e.g. openssl rand -hex 32",
            ));
        }
        Ok(AdminToken::new(token))
    }

    fn rate_limit(
        &self,
        name: String,
        raw: Spanned<raw::RawRateLimit>,
    ) -> Result<RateLimitPolicy, PolicyError> {
        let k = |f: &str| format!("rate_limits.{name}.{f}");
        let span = raw.span();
        let raw = raw.into_inner();
        let Some(key_raw) = raw.key else {
            return Err(self.err(
                span,
                format!("rate_limits.{name}"),
                "no `key`: what the buckets are counted by",
                "add key = \"client_ip\" (or \"header:<name>\", \"route\", \"global\")",
            ));
        };
        let key = match key_raw.get_ref().as_str() {
            "client_ip" => LimitKey::ClientIp,
            "route" => LimitKey::Route,
            "global" => LimitKey::Global,
            other => match other.strip_prefix("header:") {
                Some(h) => match http::HeaderName::from_bytes(h.trim().as_bytes()) {
                    Ok(h) => LimitKey::Header(h),
                    Err(_) => return Err(self.err(
                        key_raw.span(),
                        k("key"),
                        format!("`{h}` is not a header name"),
                        "write the header's name after `header:`, e.g. \"header:authorization\"",
                    )),
                },
                None => {
                    return Err(self.err(
                        key_raw.span(),
                        k("key"),
                        format!("unknown key `{other}`"),
                        "use \"client_ip\", \"header:<name>\", \"route\" or \"global\"",
                    ))
                }
            },
        };
        let (unit, rate) = match (raw.rate, raw.tokens) {
            (Some(rate), None) => {
                if let Some(d) = &raw.default_tokens {
                    return Err(self.err(
                        d.span(),
                        k("default_tokens"),
                        "`default_tokens` only applies to a `tokens` limit",
                        "remove it, or count tokens with tokens = \"N/period\" instead of `rate`",
                    ));
                }
                (LimitUnit::Requests, rate.into_inner())
            }
            (None, Some(tokens)) => {
                let default_tokens = match raw.default_tokens {
                    Some(d) if *d.get_ref() == 0 => {
                        return Err(self.err(
                            d.span(),
                            k("default_tokens"),
                            "a request reserves at least one token",
                            "use a typical answer's size, e.g. default_tokens = 1024",
                        ))
                    }
                    Some(d) => d.into_inner(),
                    None => 1024,
                };
                (LimitUnit::Tokens { default_tokens }, tokens.into_inner())
            }
            (Some(rate), Some(_)) => {
                return Err(self.err(
                    rate.span(),
                    format!("rate_limits.{name}"),
                    "both `rate` (requests) and `tokens` are set",
                    "a limiter counts one thing: define two limiters and name both in the route's rate_limit",
                ))
            }
            (None, None) => {
                return Err(self.err(
                    span,
                    format!("rate_limits.{name}"),
                    "neither `rate` nor `tokens` is set",
                    "add rate = \"60/min\" (requests) or tokens = \"100000/hour\" (LLM tokens)",
                ))
            }
        };
        let burst = match raw.burst {
            Some(b) if *b.get_ref() == 0 => {
                return Err(self.err(
                    b.span(),
                    k("burst"),
                    "a burst of 0 allows nothing",
                    "use 1 or more (the default is the rate's count)",
                ))
            }
            Some(b) => b.into_inner(),
            None => rate.count,
        };
        let max_keys = match raw.max_keys {
            Some(m) if *m.get_ref() == 0 => {
                return Err(self.err(
                    m.span(),
                    k("max_keys"),
                    "0 keys cannot track anybody",
                    "use 1 or more (the default is 100000)",
                ))
            }
            Some(m) => m.into_inner(),
            None => 100_000,
        };
        Ok(RateLimitPolicy {
            name,
            key,
            unit,
            rate,
            burst,
            count_hits: raw.count_hits.unwrap_or(false),
            max_keys,
        })
    }

    fn compression(
        &self,
        raw: Spanned<raw::RawCompression>,
    ) -> Result<CompressionPolicy, PolicyError> {
        use crate::coding::Coding;
        let span = raw.span();
        let raw = raw.into_inner();
        let algorithms: Vec<Coding> = raw
            .algorithms
            .unwrap_or_else(|| vec![raw::Encoding::Br, raw::Encoding::Gzip])
            .into_iter()
            .map(|e| match e {
                raw::Encoding::Br => Coding::Br,
                raw::Encoding::Gzip => Coding::Gzip,
            })
            .collect();
        if algorithms.is_empty() {
            return Err(self.err(
                span,
                "compression.algorithms",
                "no algorithms: nothing would be compressed",
                "list at least one of \"br\", \"gzip\", or remove [compression]",
            ));
        }
        if algorithms
            .iter()
            .enumerate()
            .any(|(i, a)| algorithms[..i].contains(a))
        {
            return Err(self.err(
                span,
                "compression.algorithms",
                "an algorithm is listed twice",
                "list each of \"br\", \"gzip\" once, in order of preference",
            ));
        }
        let gzip_level = raw.gzip_level.unwrap_or(6);
        if gzip_level > 9 {
            return Err(self.err(
                span,
                "compression.gzip_level",
                format!("gzip_level {gzip_level} is out of range"),
                "use 1 (fastest) to 9 (smallest); 6 is the usual balance",
            ));
        }
        let brotli_quality = raw.brotli_quality.unwrap_or(5);
        if brotli_quality > 11 {
            return Err(self.err(
                span,
                "compression.brotli_quality",
                format!("brotli_quality {brotli_quality} is out of range"),
                "use 0 (fastest) to 11 (smallest); 4 to 6 suit answers compressed as they stream",
            ));
        }
        let defaults = [
            "application/json",
            "application/x-ndjson",
            "text/event-stream",
            "text/*",
        ];
        let mut content_types = Vec::new();
        for t in raw
            .content_types
            .unwrap_or_else(|| defaults.iter().map(|t| (*t).to_owned()).collect())
        {
            let t = t.trim().to_ascii_lowercase();
            let valid = t.split_once('/').is_some_and(|(ty, sub)| {
                let token = |s: &str| {
                    !s.is_empty()
                        && s.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
                };
                token(ty) && (sub == "*" || token(sub))
            });
            if !valid {
                return Err(self.err(
                    span,
                    "compression.content_types",
                    format!("`{t}` is not a media type"),
                    "write type/subtype or type/*, e.g. \"application/json\" or \"text/*\"",
                ));
            }
            content_types.push(t);
        }
        Ok(CompressionPolicy {
            algorithms,
            min_size: raw.min_size.map_or(1024, |s| s.0),
            content_types,
            gzip_level,
            brotli_quality,
        })
    }

    /// `[server.tls]`: its listeners, and the chain and key read and
    /// checked now (unreadable, empty or mismatched files are errors here,
    /// not at the first handshake).
    fn server_tls(
        &self,
        raw: Spanned<raw::RawTls>,
        plain: &[std::net::SocketAddr],
    ) -> Result<TlsTermination, PolicyError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let span = raw.span();
        let raw = raw.into_inner();
        let listen: Vec<_> = raw.listen.0.into_iter().map(|a| a.0).collect();
        if listen.is_empty() {
            return Err(self.err(
                span,
                "server.tls.listen",
                "no address to listen on",
                "give at least one, e.g. listen = [\"0.0.0.0:8443\"]",
            ));
        }
        if let Some(both) = listen.iter().find(|a| plain.contains(a)) {
            return Err(self.err(
                span,
                "server.tls.listen",
                format!("{both} is also in server.listen"),
                "an address speaks either plain HTTP or TLS: give TLS its own port",
            ));
        }
        let read = |file: &str, key: &str, what: &str| {
            let path = self.src.relative_path(file);
            std::fs::read(&path)
                .map(|b| (b, path.clone()))
                .map_err(|e| {
                    self.err(
                        span.clone(),
                        key,
                        format!("cannot read {}: {e}", path.display()),
                        format!("give the path of the PEM {what}, readable by hyperion"),
                    )
                })
        };
        let (pem, cert_path) = read(&raw.cert, "server.tls.cert", "certificate chain")?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(|e| {
                self.err(
                    span.clone(),
                    "server.tls.cert",
                    format!(
                        "{} is not a PEM certificate chain: {e:?}",
                        cert_path.display()
                    ),
                    "give the server certificate first, then its intermediates, in PEM",
                )
            })?;
        if chain.is_empty() {
            return Err(self.err(
                span,
                "server.tls.cert",
                format!("{} holds no PEM certificate", cert_path.display()),
                "give the server certificate first, then its intermediates, in PEM",
            ));
        }
        let (pem, key_path) = read(&raw.key, "server.tls.key", "private key")?;
        let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
            self.err(
                span.clone(),
                "server.tls.key",
                format!("{} holds no PEM private key", key_path.display()),
                "give the key in PEM: PKCS#8 (BEGIN PRIVATE KEY), RSA or EC",
            )
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| {
                self.err(
                    span.clone(),
                    "server.tls",
                    format!("the certificate and key cannot be used together: {e}"),
                    "give the key that belongs to the certificate (the first in the chain)",
                )
            })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsTermination {
            listen,
            config: Arc::new(config),
            cert: cert_path,
        })
    }

    fn server(&self, raw: raw::RawServer) -> Result<ServerPolicy, PolicyError> {
        let listen = match raw.listen {
            Some(l) => {
                let span = l.span();
                let addrs: Vec<_> = l.into_inner().0.into_iter().map(|a| a.0).collect();
                // TLS listeners alone are enough.
                if addrs.is_empty() && raw.tls.is_none() {
                    return Err(self.err(
                        span,
                        "server.listen",
                        "no address to listen on",
                        "give at least one, e.g. listen = [\"127.0.0.1:8080\"]",
                    ));
                }
                let mut seen = HashSet::new();
                if let Some(dup) = addrs.iter().find(|a| !seen.insert(**a)) {
                    return Err(self.err(
                        span,
                        "server.listen",
                        format!("{dup} is listed twice"),
                        "list each address once",
                    ));
                }
                addrs
            }
            None => vec!["127.0.0.1:8080".parse().expect("valid default")],
        };
        let max_header_size = match raw.max_header_size {
            Some(s) => {
                let bytes = s.get_ref().0;
                if !(1024..=1 << 20).contains(&bytes) {
                    return Err(self.err(
                        s.span(),
                        "server.max_header_size",
                        format!("{} is out of range", s.get_ref()),
                        "use a size from \"1KB\" to \"1MB\"",
                    ));
                }
                bytes as usize
            }
            None => 32 << 10,
        };
        let slow = raw.slow_request.map_or(Duration::from_secs(5), |d| d.0);
        let tls = match raw.tls {
            Some(t) => Some(self.server_tls(t, &listen)?),
            None => None,
        };
        let max_request_body = raw.max_request_body.map_or(50 << 20, |s| s.0);
        // A process-wide budget (default 256MB) must hold at least one of
        // what it budgets, as large as its key `per` allows.
        let budget = |v: &Option<Spanned<Size>>, name: &str, per: (&str, u64)| match v {
            Some(s) if s.get_ref().0 < per.1 => Err(self.err(
                s.span(),
                format!("server.{name}"),
                format!(
                    "{} is less than {} ({}): one of the allowed size could never be held",
                    s.get_ref(),
                    per.0,
                    Size(per.1)
                ),
                format!("raise {name} to at least {0}, or lower {0}", per.0),
            )),
            Some(s) => Ok(s.get_ref().0),
            None => Ok((256 << 20).max(per.1)),
        };
        let max_buffered_bodies = budget(
            &raw.max_buffered_bodies,
            "max_buffered_bodies",
            ("max_request_body", max_request_body),
        )?;
        let timeout = |v: &Option<Spanned<Dur>>, name: &str, default: u64| match v {
            Some(d) if d.get_ref().0.is_zero() => Err(self.err(
                d.span(),
                format!("server.{name}"),
                "a deadline of 0s would cut every request",
                format!("use a duration such as \"{default}s\""),
            )),
            Some(d) => Ok(d.get_ref().0),
            None => Ok(Duration::from_secs(default)),
        };
        let count = |v: &Option<Spanned<u64>>, name: &str, default: u64, max: u64| match v {
            Some(n) if *n.get_ref() == 0 || *n.get_ref() > max => Err(self.err(
                n.span(),
                format!("server.{name}"),
                format!("{} is out of range", n.get_ref()),
                format!("use a number from 1 to {max} (default {default})"),
            )),
            Some(n) => Ok(*n.get_ref()),
            None => Ok(default),
        };
        let max_connections = count(&raw.max_connections, "max_connections", 4096, 1 << 20)?;
        let max_connections_per_ip = match &raw.max_connections_per_ip {
            Some(n) if *n.get_ref() > max_connections => {
                return Err(self.err(
                    n.span(),
                    "server.max_connections_per_ip",
                    format!(
                        "{} is more than max_connections ({max_connections})",
                        n.get_ref()
                    ),
                    "lower it, or raise max_connections",
                ))
            }
            _ => count(
                &raw.max_connections_per_ip,
                "max_connections_per_ip",
                256.min(max_connections),
                1 << 20,
            )?,
        };
        let http2_keepalive_interval = match &raw.http2_keepalive_interval {
            Some(d) if d.get_ref().0.is_zero() => None,
            Some(d) if d.get_ref().0 < Duration::from_secs(1) => {
                return Err(self.err(
                    d.span(),
                    "server.http2_keepalive_interval",
                    "PINGing more often than every second loads clients for nothing",
                    "use 1s or more (default \"30s\"), or \"0s\" for no pings",
                ))
            }
            Some(d) => Some(d.get_ref().0),
            None => Some(Duration::from_secs(30)),
        };
        let read_ahead = raw.read_ahead.as_ref().map_or(256 << 10, |s| s.get_ref().0);
        let max_read_ahead = budget(
            &raw.max_read_ahead,
            "max_read_ahead",
            ("read_ahead", read_ahead),
        )?;
        Ok(ServerPolicy {
            tls,
            listen,
            max_request_body,
            max_buffered_bodies,
            read_ahead,
            max_read_ahead,
            body_read_timeout: timeout(&raw.body_read_timeout, "body_read_timeout", 30)?,
            send_timeout: timeout(&raw.send_timeout, "send_timeout", 60)?,
            tunnel_idle_timeout: timeout(&raw.tunnel_idle_timeout, "tunnel_idle_timeout", 300)?,
            max_connections: max_connections as usize,
            max_connections_per_ip: max_connections_per_ip as usize,
            http2_max_concurrent_streams: count(
                &raw.http2_max_concurrent_streams,
                "http2_max_concurrent_streams",
                100,
                10_000,
            )? as u32,
            http2_max_pending_resets: count(
                &raw.http2_max_pending_resets,
                "http2_max_pending_resets",
                20,
                10_000,
            )? as usize,
            http2_keepalive_interval,
            http2_keepalive_timeout: timeout(
                &raw.http2_keepalive_timeout,
                "http2_keepalive_timeout",
                20,
            )?,
            max_header_size,
            header_read_timeout: raw
                .header_read_timeout
                .map_or(Duration::from_secs(10), |d| d.0),
            idle_timeout: raw.idle_timeout.map_or(Duration::from_secs(75), |d| d.0),
            shutdown_grace: raw.shutdown_grace.map_or(Duration::from_secs(30), |d| d.0),
            trusted_proxies: raw
                .trusted_proxies
                .unwrap_or_default()
                .into_iter()
                .map(|c| c.0)
                .collect(),
            access_log: raw.access_log.unwrap_or_default(),
            slow_request: (!slow.is_zero()).then_some(slow),
        })
    }

    fn upstream(&self, name: String, raw: raw::RawUpstream) -> Result<UpstreamPolicy, PolicyError> {
        let key = |k: &str| format!("upstreams.{name}.{k}");
        let balance = raw
            .balance
            .as_ref()
            .map_or(Balance::LeastInflight, |b| *b.get_ref());
        let hash_key = match &raw.hash_key {
            None => HashKey::CacheKey,
            Some(h) if balance != Balance::ConsistentHash => {
                return Err(self.err(
                    h.span(),
                    key("hash_key"),
                    format!("hash_key is only read by consistent_hash, not `{}`", balance.as_str()),
                    "set balance = \"consistent_hash\", or remove hash_key",
                ))
            }
            Some(h) => match h.get_ref().as_str() {
                "cache_key" => HashKey::CacheKey,
                other => match other
                    .strip_prefix("header:")
                    .map(|n| http::HeaderName::from_bytes(n.trim().as_bytes()))
                {
                    Some(Ok(n)) => HashKey::Header(n),
                    _ => {
                        return Err(self.err(
                            h.span(),
                            key("hash_key"),
                            format!("`{other}` is not something to hash on"),
                            "use \"cache_key\" (the default) or \"header:<name>\", e.g. \"header:x-session-id\"",
                        ))
                    }
                },
            },
        };
        let model_routing = raw
            .model_routing
            .as_ref()
            .map_or(ModelRouting::Off, |m| *m.get_ref());
        let discover_interval = match &raw.discover_interval {
            Some(d) if model_routing != ModelRouting::Discover => {
                return Err(self.err(
                    d.span(),
                    key("discover_interval"),
                    "only `model_routing = \"discover\"` asks servers for their models",
                    "set model_routing = \"discover\", or remove discover_interval",
                ))
            }
            Some(d) if d.get_ref().0 < Duration::from_secs(1) => {
                return Err(self.err(
                    d.span(),
                    key("discover_interval"),
                    "asking for the model list more often than every second loads the server for nothing",
                    "use 1s or more, e.g. \"10s\"",
                ))
            }
            Some(d) => d.get_ref().0,
            None => Duration::from_secs(10),
        };
        let max_inflight_per_server = match &raw.max_inflight_per_server {
            Some(v) if *v.get_ref() == 0 => {
                return Err(self.err(
                    v.span(),
                    key("max_inflight_per_server"),
                    "0 requests in flight sends nothing",
                    "use 1 or more, or remove the key for no limit",
                ))
            }
            Some(v) => Some(*v.get_ref()),
            None => None,
        };
        let queue_timeout = match (&raw.queue_timeout, max_inflight_per_server) {
            (Some(t), None) => {
                return Err(self.err(
                    t.span(),
                    key("queue_timeout"),
                    "nothing waits without `max_inflight_per_server`",
                    "set max_inflight_per_server, or remove queue_timeout",
                ))
            }
            (Some(t), Some(_)) => t.get_ref().0,
            (None, _) => Duration::from_secs(30),
        };
        let retries = match &raw.retries {
            Some(v) if *v.get_ref() > 10 => {
                return Err(self.err(
                    v.span(),
                    key("retries"),
                    format!("{} retries would multiply an outage's load", v.get_ref()),
                    "use 0 to 10 (a retry budget caps them at ~20% of requests anyway)",
                ))
            }
            Some(v) => *v.get_ref(),
            None => 1,
        };
        let health = match raw.health {
            Some(h) => Some(self.health(&name, h)?),
            None => None,
        };
        let servers_span = raw.servers.span();
        let entries = raw.servers.into_inner();
        if entries.is_empty() {
            return Err(self.err(
                servers_span,
                key("servers"),
                "no servers",
                "add at least one, e.g. servers = [{ url = \"http://127.0.0.1:11434\" }]",
            ));
        }
        if entries.len() > MAX_SERVERS {
            return Err(self.err(
                servers_span,
                key("servers"),
                format!(
                    "{} servers in one pool; at most {MAX_SERVERS}",
                    entries.len()
                ),
                "split them into several upstreams, or front them with another balancer",
            ));
        }
        let mut servers = Vec::with_capacity(entries.len());
        // Built for the pool's first https server, shared by the others.
        let mut tls_config: Option<Arc<rustls::ClientConfig>> = None;
        for (i, entry) in entries.into_iter().enumerate() {
            let entry = entry.into_inner();
            let k = format!("upstreams.{name}.servers[{i}]");
            let models = match &entry.models {
                None => None,
                Some(m) => Some(self.server_models(m, &format!("{k}.models"), model_routing)?),
            };
            let weight = match &entry.weight {
                Some(w) if *w.get_ref() == 0 => {
                    return Err(self.err(
                        w.span(),
                        format!("{k}.weight"),
                        "a weight of 0 never sends traffic",
                        "use a weight of 1 or more, or remove the server",
                    ));
                }
                Some(w) if *w.get_ref() > 1000 => {
                    return Err(self.err(
                        w.span(),
                        format!("{k}.weight"),
                        format!("a weight of {} is too large", w.get_ref()),
                        "use weights from 1 to 1000; only their ratios matter",
                    ));
                }
                Some(w) => *w.get_ref(),
                None => 1,
            };
            let (scheme, authority) = self.server_url(&entry.url, &format!("{k}.url"))?;
            if servers
                .iter()
                .any(|s: &UpstreamServer| s.authority == authority)
            {
                return Err(self.err(
                    entry.url.span(),
                    format!("{k}.url"),
                    format!("{authority} is listed twice in this pool"),
                    "list each server once; give it weight = 2 to send it twice the traffic",
                ));
            }
            let host_header = http::HeaderValue::from_str(authority.as_str())
                .expect("a parsed authority is a valid header value");
            let tls = if scheme == Scheme::HTTPS {
                let config = match &tls_config {
                    Some(c) => c.clone(),
                    None => tls_config
                        .insert(self.client_tls(
                            raw.ca_file.as_ref(),
                            &key("ca_file"),
                            &entry.url,
                        )?)
                        .clone(),
                };
                let host = authority
                    .host()
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                let name =
                    rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|_| {
                        self.err(
                            entry.url.span(),
                            format!("{k}.url"),
                            format!("`{host}` cannot be checked against a certificate"),
                            "use the DNS name or IP address the server's certificate is for",
                        )
                    })?;
                Some(ServerTls { config, name })
            } else {
                None
            };
            servers.push(UpstreamServer {
                url: Arc::from(entry.url.into_inner()),
                host_header,
                scheme,
                authority,
                weight,
                models,
                tls,
            });
        }
        if let (Some(f), None) = (&raw.ca_file, &tls_config) {
            return Err(self.err(
                f.span(),
                key("ca_file"),
                "ca_file is only read for https:// servers, and this pool has none",
                "use https:// server URLs, or remove ca_file",
            ));
        }
        if model_routing == ModelRouting::Static && servers.iter().all(|s| s.models.is_none()) {
            return Err(self.err(
                raw.model_routing.as_ref().map_or(servers_span, |m| m.span()),
                key("model_routing"),
                "static model routing, but no server lists its `models`",
                "give servers a list, e.g. { url = \"http://10.0.0.12:11434\", models = [\"llama3.2\"] }, or use \"discover\"",
            ));
        }
        Ok(UpstreamPolicy {
            name,
            servers,
            connect_timeout: raw.connect_timeout.map_or(Duration::from_secs(2), |d| d.0),
            response_timeout: raw
                .response_timeout
                .map_or(Duration::from_secs(300), |d| d.0),
            idle_timeout: raw.idle_timeout.map_or(Duration::from_secs(60), |d| d.0),
            max_inflight_per_server,
            queue_timeout,
            balance,
            hash_key,
            retries,
            eject_after: health.as_ref().map_or(3, |h| h.unhealthy_after),
            health,
            model_routing,
            discover_interval,
        })
    }

    /// A server's `models`: names Ollama would resolve, for a pool that
    /// routes by model.
    fn server_models(
        &self,
        raw: &Spanned<Vec<String>>,
        key: &str,
        routing: ModelRouting,
    ) -> Result<Vec<ModelName>, PolicyError> {
        if routing == ModelRouting::Off {
            return Err(self.err(
                raw.span(),
                key,
                "`models` are read only when the pool routes by model",
                "set model_routing = \"static\" (or \"discover\") on this upstream, or remove models",
            ));
        }
        if raw.get_ref().is_empty() {
            return Err(self.err(
                raw.span(),
                key,
                "an empty list serves no model",
                "list the models it serves, or remove `models` for any model",
            ));
        }
        let mut names = Vec::with_capacity(raw.get_ref().len());
        for m in raw.get_ref() {
            match ModelName::parse(m) {
                Some(name) => names.push(name),
                None => {
                    return Err(self.err(
                        raw.span(),
                        key,
                        format!("`{m}` is not a model name"),
                        "write names as Ollama does, e.g. \"llama3.2\" or \"llama3.2:1b\"",
                    ))
                }
            }
        }
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn health(
        &self,
        name: &str,
        raw: Spanned<raw::RawHealth>,
    ) -> Result<HealthPolicy, PolicyError> {
        let key = |k: &str| format!("upstreams.{name}.health.{k}");
        let span = raw.span();
        let raw = raw.into_inner();
        let Some(path) = raw.path else {
            return Err(self.err(
                span,
                format!("upstreams.{name}.health"),
                "no `path` to check",
                "add a cheap GET that never runs a model, e.g. path = \"/api/version\" (Ollama) or \"/health\"",
            ));
        };
        let parsed = match path.get_ref().parse::<http::uri::PathAndQuery>() {
            Ok(p) if path.get_ref().starts_with('/') => p,
            _ => {
                return Err(self.err(
                    path.span(),
                    key("path"),
                    format!("`{}` is not a path", path.get_ref()),
                    "write a path starting with /, e.g. \"/api/version\"",
                ))
            }
        };
        let interval = raw
            .interval
            .as_ref()
            .map_or(Duration::from_secs(5), |d| d.get_ref().0);
        if interval < Duration::from_millis(100) {
            let span = raw.interval.as_ref().map_or(span.clone(), |d| d.span());
            return Err(self.err(
                span,
                key("interval"),
                "checks more often than every 100ms load the server for nothing",
                "use an interval of 100ms or more, e.g. \"5s\"",
            ));
        }
        let timeout = raw
            .timeout
            .as_ref()
            .map_or(Duration::from_secs(2).min(interval), |d| d.get_ref().0);
        if let Some(t) = raw
            .timeout
            .as_ref()
            .filter(|_| timeout > interval || timeout.is_zero())
        {
            return Err(self.err(
                t.span(),
                key("timeout"),
                "a check's timeout must be above 0 and at most its interval",
                format!(
                    "use a timeout of at most {}",
                    humantime::format_duration(interval)
                ),
            ));
        }
        let count = |v: &Option<Spanned<u32>>, k: &str, default: u32| match v {
            Some(v) if *v.get_ref() == 0 || *v.get_ref() > 100 => Err(self.err(
                v.span(),
                key(k),
                format!("{} checks in a row cannot be used", v.get_ref()),
                "use 1 to 100",
            )),
            Some(v) => Ok(*v.get_ref()),
            None => Ok(default),
        };
        Ok(HealthPolicy {
            path: parsed,
            interval,
            timeout,
            unhealthy_after: count(&raw.unhealthy_after, "unhealthy_after", 3)?,
            healthy_after: count(&raw.healthy_after, "healthy_after", 2)?,
        })
    }

    fn server_url(
        &self,
        url: &Spanned<String>,
        key: &str,
    ) -> Result<(Scheme, Authority), PolicyError> {
        let span = url.span();
        let text = url.get_ref();
        let fix =
            "write it as http://HOST:PORT or https://HOST:PORT, e.g. \"http://127.0.0.1:11434\"";
        let uri: Uri = text
            .parse()
            .map_err(|_| self.err(span.clone(), key, format!("`{text}` is not a URL"), fix))?;
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::HTTP,
            Some("https") => Scheme::HTTPS,
            _ => {
                return Err(self.err(
                    span,
                    key,
                    format!("`{text}` has no http:// or https:// scheme"),
                    fix,
                ))
            }
        };
        let authority = match uri.authority() {
            Some(a) if !a.host().is_empty() => a.clone(),
            _ => return Err(self.err(span, key, format!("`{text}` has no host"), fix)),
        };
        if authority.as_str().contains('@') {
            return Err(self.err(
                span,
                key,
                "credentials in server URLs are not supported",
                "remove the user:password@ part",
            ));
        }
        if uri.path_and_query().is_some_and(|pq| pq.as_str() != "/") {
            return Err(self.err(
                span,
                key,
                format!("`{text}` has a path; server URLs name a server, not a location"),
                "remove the path: requests keep their own path",
            ));
        }
        Ok((scheme, authority))
    }

    /// The TLS client setup of a pool with https servers: trusting the
    /// certificates of `ca_file` (relative to the policy file), or else the
    /// platform's.
    fn client_tls(
        &self,
        ca_file: Option<&Spanned<String>>,
        key: &str,
        first_https: &Spanned<String>,
    ) -> Result<Arc<rustls::ClientConfig>, PolicyError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let roots = match ca_file {
            Some(f) => {
                let path = self.src.relative_path(f.get_ref());
                let fix = "give the path of a PEM file of CA certificates that hyperion can read";
                let pem = std::fs::read(&path).map_err(|e| {
                    self.err(
                        f.span(),
                        key,
                        format!("cannot read {}: {e}", path.display()),
                        fix,
                    )
                })?;
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let added = cert
                        .map_err(|e| format!("{e:?}"))
                        .and_then(|c| roots.add(c).map_err(|e| e.to_string()));
                    if let Err(e) = added {
                        return Err(self.err(
                            f.span(),
                            key,
                            format!(
                                "{} holds a certificate that cannot be used: {e}",
                                path.display()
                            ),
                            fix,
                        ));
                    }
                }
                if roots.is_empty() {
                    return Err(self.err(
                        f.span(),
                        key,
                        format!("{} holds no PEM certificate", path.display()),
                        fix,
                    ));
                }
                Arc::new(roots)
            }
            None => {
                let roots = self.platform_roots.get_or_init(|| {
                    let found = rustls_native_certs::load_native_certs();
                    let mut roots = rustls::RootCertStore::empty();
                    roots.add_parsable_certificates(found.certs);
                    Arc::new(roots)
                });
                if roots.is_empty() {
                    return Err(self.err(
                        first_https.span(),
                        key.replace("ca_file", "servers"),
                        "an https server, but this machine has no CA certificates to check it with",
                        "install the platform's CA certificates (e.g. apt-get install ca-certificates), or set ca_file",
                    ));
                }
                roots.clone()
            }
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Upstream connections speak HTTP/1.1 only.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// A list of header names (lower-cased, repeats dropped); `refuse`
    /// names the ones this key cannot take, with the problem and its fix.
    fn header_names(
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

    fn cache(&self, raw: Spanned<raw::RawCache>) -> Result<CachePolicy, PolicyError> {
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

    fn redis(&self, raw: Spanned<raw::RawRedis>) -> Result<RedisPolicy, PolicyError> {
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
    fn redis_secret(
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
    fn route_cache(
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

    /// `[route.headers]`: names and values checked once, here.
    fn route_headers(
        &self,
        raw: Spanned<raw::RawRouteHeaders>,
        route_key: &str,
    ) -> Result<HeaderRewrite, PolicyError> {
        let span = raw.span();
        let raw = raw.into_inner();
        let key = |field: &str| format!("{route_key}.headers.{field}");
        let name = |field: &str, n: &str| -> Result<http::HeaderName, PolicyError> {
            let parsed = http::HeaderName::from_bytes(n.trim().as_bytes()).map_err(|_| {
                self.err(
                    span.clone(),
                    key(field),
                    format!("`{n}` is not a header name"),
                    "use letters, digits and `-`, e.g. \"X-Served-By\"",
                )
            })?;
            if !crate::headers::rewritable(&parsed) {
                return Err(self.err(
                    span.clone(),
                    key(field),
                    format!("`{n}` cannot be rewritten: Hyperion frames messages and manages connections and encodings itself"),
                    "remove it from the list",
                ));
            }
            Ok(parsed)
        };
        let set = |field: &str,
                   map: Option<std::collections::BTreeMap<String, String>>|
         -> Result<Vec<(http::HeaderName, http::HeaderValue)>, PolicyError> {
            let mut out = Vec::new();
            for (n, v) in map.unwrap_or_default() {
                let value = http::HeaderValue::from_str(&v).map_err(|_| {
                    self.err(
                        span.clone(),
                        key(field),
                        format!("the value of `{n}` is not a valid header value"),
                        "use visible ASCII characters and spaces, no line breaks",
                    )
                })?;
                out.push((name(field, &n)?, value));
            }
            Ok(out)
        };
        let remove = |field: &str, list: Option<Vec<String>>| {
            list.unwrap_or_default()
                .iter()
                .map(|n| name(field, n))
                .collect::<Result<Vec<_>, _>>()
        };
        let rewrite = HeaderRewrite {
            request_set: set("request_set", raw.request_set)?,
            request_remove: remove("request_remove", raw.request_remove)?,
            response_set: set("response_set", raw.response_set)?,
            response_remove: remove("response_remove", raw.response_remove)?,
        };
        for (field, sets, removes) in [
            ("request", &rewrite.request_set, &rewrite.request_remove),
            ("response", &rewrite.response_set, &rewrite.response_remove),
        ] {
            if let Some((n, _)) = sets.iter().find(|(n, _)| removes.contains(n)) {
                return Err(self.err(
                    span.clone(),
                    key(&format!("{field}_remove")),
                    format!("`{n}` is both set and removed"),
                    format!("keep it in only one of {field}_set and {field}_remove"),
                ));
            }
        }
        Ok(rewrite)
    }

    fn routes(
        &self,
        raw: Vec<Spanned<raw::RawRoute>>,
        upstreams: &[Arc<UpstreamPolicy>],
        cache: &CachePolicy,
        rate_limits: &[Arc<RateLimitPolicy>],
        compression_on: bool,
    ) -> Result<Vec<Arc<RoutePolicy>>, PolicyError> {
        if raw.is_empty() {
            return Err(self.src.error(
                None,
                "route",
                "no routes: every request would get 404",
                "add a [[route]] with a name and an upstream (see the shipped proxy.toml)",
            ));
        }
        let upstream_names: Vec<String> = upstreams.iter().map(|u| u.name.clone()).collect();
        let mut routes: Vec<(Range<usize>, Arc<RoutePolicy>)> = Vec::with_capacity(raw.len());
        for (i, spanned) in raw.into_iter().enumerate() {
            let route_span = spanned.span();
            let r = spanned.into_inner();
            let key = format!("route[{i}]");
            let name = r.name.get_ref().trim().to_owned();
            if name.is_empty() {
                return Err(self.err(
                    r.name.span(),
                    format!("{key}.name"),
                    "empty route name",
                    "give the route a short name, e.g. name = \"generate\"",
                ));
            }
            if routes.iter().any(|(_, p)| p.name == name) {
                return Err(self.err(
                    r.name.span(),
                    format!("{key}.name"),
                    format!("route name `{name}` is used twice"),
                    "give each route its own name",
                ));
            }
            let key = format!("route[{i}] ({name})");
            let mut limits: Vec<Arc<RateLimitPolicy>> = Vec::new();
            for n in r.rate_limit.map(|v| v.into_inner()).unwrap_or_default() {
                let Some(found) = rate_limits.iter().find(|l| l.name == *n.get_ref()) else {
                    let names: Vec<String> = rate_limits.iter().map(|l| l.name.clone()).collect();
                    let fix = match nearest(n.get_ref(), &names) {
                        Some(best) => format!("did you mean `{best}`?"),
                        None if names.is_empty() => {
                            "define it first, e.g. [rate_limits.per_ip] key = \"client_ip\" rate = \"60/min\"".into()
                        }
                        None => format!("use one of: {}", names.join(", ")),
                    };
                    return Err(self.err(
                        n.span(),
                        format!("{key}.rate_limit"),
                        format!("no rate limit is named `{}`", n.get_ref()),
                        fix,
                    ));
                };
                if limits.iter().any(|l| l.name == found.name) {
                    return Err(self.err(
                        n.span(),
                        format!("{key}.rate_limit"),
                        format!("`{}` is named twice", found.name),
                        "name each limiter once",
                    ));
                }
                limits.push(found.clone());
            }
            let headers = match r.headers {
                Some(h) => Some(Arc::new(self.route_headers(h, &key)?)),
                None => None,
            };
            let deny = r.deny.as_ref().is_some_and(|d| *d.get_ref());
            if deny {
                let forwarding = [
                    (r.upstream.as_ref().map(|u| u.span()), "upstream"),
                    (r.cache.as_ref().map(|c| c.span()), "cache"),
                    (r.unknown_model.as_ref().map(|u| u.span()), "unknown_model"),
                ];
                if let Some((Some(span), what)) = forwarding.into_iter().find(|(s, _)| s.is_some())
                {
                    return Err(self.err(
                        span,
                        format!("{key}.{what}"),
                        "a route with deny = true forwards nothing",
                        format!("remove {what}, or remove deny to forward this route"),
                    ));
                }
                let matcher = self.route_matcher(r.matcher, &routes, &route_span, &key)?;
                routes.push((
                    route_span,
                    Arc::new(RoutePolicy {
                        name,
                        matcher,
                        upstream: String::new(),
                        deny: true,
                        preserve_host: true,
                        cache: None,
                        headers,
                        rate_limits: limits,
                        unknown_model: UnknownModel::Reject,
                    }),
                ));
                continue;
            }
            let Some(upstream_raw) = r.upstream else {
                return Err(self.err(
                    route_span,
                    format!("{key}.upstream"),
                    "the route names no upstream",
                    "add upstream = \"<name of an [upstreams.*] table>\", or deny = true to answer 403",
                ));
            };
            let upstream = upstream_raw.get_ref().clone();
            if !upstream_names.contains(&upstream) {
                let fix = match nearest(&upstream, &upstream_names) {
                    Some(best) => format!(
                        "did you mean `{best}`? (defined: {})",
                        upstream_names.join(", ")
                    ),
                    None if upstream_names.is_empty() => {
                        format!("define it with [upstreams.{upstream}] and servers = [...]")
                    }
                    None => format!("use one of: {}", upstream_names.join(", ")),
                };
                return Err(self.err(
                    upstream_raw.span(),
                    format!("{key}.upstream"),
                    format!("no upstream named `{upstream}`"),
                    fix,
                ));
            }
            let pool = upstreams
                .iter()
                .find(|u| u.name == upstream)
                .expect("the upstream was found above");
            let response_timeout = pool.response_timeout;
            let unknown_model = match &r.unknown_model {
                Some(u) if pool.model_routing == ModelRouting::Off => {
                    return Err(self.err(
                        u.span(),
                        format!("{key}.unknown_model"),
                        format!("upstream `{upstream}` does not route by model"),
                        format!(
                            "set model_routing on [upstreams.{upstream}], or remove unknown_model"
                        ),
                    ))
                }
                Some(u) => *u.get_ref(),
                None => UnknownModel::Reject,
            };
            // Whether this route's answers are read here (compressed, or
            // their tokens counted): then the upstream is asked for identity,
            // else the client's Accept-Encoding goes up and is keyed.
            let reads_answers = compression_on
                || limits
                    .iter()
                    .any(|l| matches!(l.unit, LimitUnit::Tokens { .. }));
            let route_cache = match r.cache {
                Some(c) => self
                    .route_cache(c, &key, cache, response_timeout)?
                    .map(|mut c| {
                        c.keys_accept_encoding = !reads_answers;
                        Arc::new(c)
                    }),
                None => None,
            };
            let matcher = self.route_matcher(r.matcher, &routes, &route_span, &key)?;
            routes.push((
                route_span,
                Arc::new(RoutePolicy {
                    name,
                    matcher,
                    upstream,
                    deny: false,
                    preserve_host: r.preserve_host.unwrap_or(true),
                    cache: route_cache,
                    headers,
                    rate_limits: limits,
                    unknown_model,
                }),
            ));
        }
        Ok(routes.into_iter().map(|(_, r)| r).collect())
    }

    /// A route's `match` (everything when absent); an error when a route
    /// before it matches everything it does.
    fn route_matcher(
        &self,
        raw: Option<Spanned<raw::RawMatch>>,
        routes: &[(Range<usize>, Arc<RoutePolicy>)],
        route_span: &Range<usize>,
        key: &str,
    ) -> Result<RouteMatch, PolicyError> {
        let (matcher, match_span) = match raw {
            Some(m) => {
                let span = m.span();
                (self.route_match(m.into_inner(), key)?, span)
            }
            None => (RouteMatch::default(), route_span.clone()),
        };
        if let Some((earlier_span, earlier)) =
            routes.iter().find(|(_, e)| e.matcher.covers(&matcher))
        {
            let earlier_line = self.line_of(earlier_span);
            return Err(self.err(
                match_span,
                format!("{key}.match"),
                format!("this route can never match: route `{}` (line {earlier_line}) comes first and matches everything it does", earlier.name),
                format!("move it above `{}` or narrow that route's match", earlier.name),
            ));
        }
        Ok(matcher)
    }

    fn route_match(&self, raw: raw::RawMatch, key: &str) -> Result<RouteMatch, PolicyError> {
        let methods = match raw.methods {
            None => None,
            Some(list) if list.is_empty() => None,
            Some(list) => {
                let mut out = Vec::with_capacity(list.len());
                for m in list {
                    let upper = m.get_ref().trim().to_ascii_uppercase();
                    let method = Method::from_bytes(upper.as_bytes())
                        .ok()
                        .filter(|_| !upper.is_empty())
                        .ok_or_else(|| {
                            self.err(
                                m.span(),
                                format!("{key}.match.methods"),
                                format!("`{}` is not an HTTP method", m.get_ref()),
                                "use method names such as \"GET\", \"POST\"",
                            )
                        })?;
                    out.push(method);
                }
                Some(out)
            }
        };
        let mut paths = Vec::new();
        for p in raw.paths.unwrap_or_default() {
            if !p.get_ref().starts_with('/') {
                return Err(self.err(
                    p.span(),
                    format!("{key}.match.paths"),
                    format!("`{}` does not start with /", p.get_ref()),
                    "write absolute paths such as \"/api/generate\"",
                ));
            }
            paths.push(p.into_inner());
        }
        let path_prefix = match raw.path_prefix {
            Some(p) if !p.get_ref().starts_with('/') => {
                return Err(self.err(
                    p.span(),
                    format!("{key}.match.path_prefix"),
                    format!("`{}` does not start with /", p.get_ref()),
                    "write an absolute prefix such as \"/api/\"",
                ));
            }
            Some(p) => Some(p.into_inner()),
            None => None,
        };
        let host = match raw.host {
            Some(h) => Some(self.host_pattern(&h, key)?),
            None => None,
        };
        Ok(RouteMatch {
            methods,
            paths,
            path_prefix,
            host,
        })
    }

    fn host_pattern(&self, h: &Spanned<String>, key: &str) -> Result<HostPattern, PolicyError> {
        let text = h.get_ref().trim().to_ascii_lowercase();
        let (wild, name) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest.to_owned()),
            None => (false, text.clone()),
        };
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
            && !name.starts_with('.');
        if !valid {
            return Err(self.err(
                h.span(),
                format!("{key}.match.host"),
                format!("`{}` is not a host name", h.get_ref()),
                "write a name such as \"api.example.com\" or \"*.example.com\", without port",
            ));
        }
        Ok(if wild {
            HostPattern::Subdomains(format!(".{name}"))
        } else {
            HostPattern::Exact(name)
        })
    }
}
