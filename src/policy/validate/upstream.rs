//! Validation of `[upstreams.NAME]`: servers, their models and TLS, health checks, balancing and retries.
//!
//! Part of `validate.rs`'s `Validator` (its errors, its order): this file
//! owns only these tables' rules.

use super::*;

/// What `prefix_affinity` takes one server's KV cache to hold, in tokens,
/// unless told.
pub const DEFAULT_PREFIX_CACHE_TOKENS: u64 = 100_000;

/// The bounds of `engine_poll_interval`: more often than 4 times a second
/// costs the engine for nothing (a vLLM `/metrics` page is tens of KB);
/// rarer than a minute steers by history.
const MIN_ENGINE_POLL: Duration = Duration::from_millis(250);
const MAX_ENGINE_POLL: Duration = Duration::from_secs(60);

impl Validator<'_> {
    pub(super) fn upstream(
        &self,
        name: String,
        raw: raw::RawUpstream,
    ) -> Result<UpstreamPolicy, PolicyError> {
        let key = |k: &str| format!("upstreams.{name}.{k}");
        let balance = raw
            .balance
            .as_ref()
            .map_or(Balance::LeastInflight, |b| *b.get_ref());
        let hash_key = match &raw.hash_key {
            None => HashKey::CacheKey,
            Some(h)
                if !matches!(balance, Balance::ConsistentHash | Balance::PrefixAffinity) =>
            {
                return Err(self.err(
                    h.span(),
                    key("hash_key"),
                    format!(
                        "hash_key is only read by consistent_hash and prefix_affinity, not `{}`",
                        balance.as_str()
                    ),
                    "set balance = \"consistent_hash\", or remove hash_key",
                ))
            }
            Some(h) => match h.get_ref().as_str() {
                "cache_key" => HashKey::CacheKey,
                other => match header_ref(other) {
                    Some(n) => HashKey::Header(n),
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
        let prefix_cache_tokens = match &raw.prefix_cache_tokens {
            None => DEFAULT_PREFIX_CACHE_TOKENS,
            Some(t) if balance != Balance::PrefixAffinity => {
                return Err(self.err(
                    t.span(),
                    key("prefix_cache_tokens"),
                    format!(
                        "prefix_cache_tokens is only read by prefix_affinity, not `{}`",
                        balance.as_str()
                    ),
                    "set balance = \"prefix_affinity\", or remove prefix_cache_tokens",
                ))
            }
            Some(t)
                if !(crate::policy::MIN_PREFIX_CACHE_TOKENS..=crate::policy::MAX_PREFIX_CACHE_TOKENS)
                    .contains(t.get_ref()) =>
            {
                return Err(self.err(
                    t.span(),
                    key("prefix_cache_tokens"),
                    format!("{} is not between 1,000 and 100,000,000", t.get_ref()),
                    "the KV cache one server holds, in tokens, as the engine reports it (vLLM logs \"GPU KV cache size: N tokens\")",
                ))
            }
            Some(t) => *t.get_ref(),
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
        let engine_signals = raw
            .engine_signals
            .as_ref()
            .map_or(EngineSignals::Off, |e| *e.get_ref());
        let engine_poll_interval = match &raw.engine_poll_interval {
            Some(d) if engine_signals == EngineSignals::Off => {
                return Err(self.err(
                    d.span(),
                    key("engine_poll_interval"),
                    "nothing is polled without `engine_signals`",
                    "set engine_signals = \"vllm\" (or \"sglang\", \"ollama\"), or remove engine_poll_interval",
                ))
            }
            Some(d) if !(MIN_ENGINE_POLL..=MAX_ENGINE_POLL).contains(&d.get_ref().0) => {
                return Err(self.err(
                    d.span(),
                    key("engine_poll_interval"),
                    format!(
                        "{} is not between {} and {}",
                        humantime::format_duration(d.get_ref().0),
                        humantime::format_duration(MIN_ENGINE_POLL),
                        humantime::format_duration(MAX_ENGINE_POLL)
                    ),
                    "use e.g. \"1s\": a load figure older than a few seconds steers nothing",
                ))
            }
            Some(d) => d.get_ref().0,
            None => Duration::from_secs(1),
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
        let waits = |span: std::ops::Range<usize>, name: &str| {
            if max_inflight_per_server.is_none() {
                return Err(self.err(
                    span,
                    key(name),
                    "nothing waits without `max_inflight_per_server`",
                    format!("set max_inflight_per_server, or remove {name}"),
                ));
            }
            Ok(())
        };
        let queue = match &raw.queue {
            Some(q) => {
                waits(q.span(), "queue")?;
                *q.get_ref()
            }
            None => QueueOrder::Fair,
        };
        let max_queued_per_tenant = match &raw.max_queued_per_tenant {
            Some(v) => {
                waits(v.span(), "max_queued_per_tenant")?;
                if *v.get_ref() == 0 {
                    return Err(self.err(
                        v.span(),
                        key("max_queued_per_tenant"),
                        "0 would refuse every request that has to wait",
                        "use 1 or more (the default is 100)",
                    ));
                }
                if queue == QueueOrder::Fifo {
                    return Err(self.err(
                        v.span(),
                        key("max_queued_per_tenant"),
                        "the fifo line does not tell tenants apart",
                        "remove it, or use queue = \"fair\"",
                    ));
                }
                *v.get_ref()
            }
            None => DEFAULT_MAX_QUEUED,
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
        let credential = match &raw.auth_header {
            Some(a) => Some(Arc::new(self.upstream_credential(a, &key("auth_header"))?)),
            None => None,
        };
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
                credential: credential.clone(),
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
            queue,
            max_queued_per_tenant,
            balance,
            hash_key,
            prefix_cache_tokens,
            retries,
            eject_after: health.as_ref().map_or(3, |h| h.unhealthy_after),
            health,
            model_routing,
            discover_interval,
            engine_signals,
            engine_poll_interval,
        })
    }

    /// A server's `models`: names Ollama would resolve, for a pool that
    /// routes by model.
    pub(super) fn server_models(
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

    pub(super) fn health(
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

    pub(super) fn server_url(
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
    pub(super) fn client_tls(
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
                let roots = self
                    .platform_roots
                    .get_or_init(|| Arc::new(crate::policy::platform_roots()));
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
        // Upstream connections speak HTTP/1.1 only.
        Ok(crate::policy::http1_client_config(roots))
    }

    /// `auth_header`: a header name (default `authorization`) and a value
    /// from an environment variable or a file, read now. For
    /// `Authorization`, a bare token is sent as `Bearer <token>`.
    pub(super) fn upstream_credential(
        &self,
        raw: &Spanned<raw::RawAuthHeader>,
        key: &str,
    ) -> Result<UpstreamCredential, PolicyError> {
        let a = raw.get_ref();
        let name = match &a.name {
            None => header::AUTHORIZATION,
            Some(n) => {
                http::HeaderName::from_bytes(n.get_ref().trim().as_bytes()).map_err(|_| {
                    self.err(
                        n.span(),
                        format!("{key}.name"),
                        format!("`{}` is not a header name", n.get_ref()),
                        "use a header name such as \"authorization\" or \"x-api-key\"",
                    )
                })?
            }
        };
        let (secret, source, span) = match (&a.env, &a.file) {
            (Some(e), None) => match std::env::var(e.get_ref()) {
                Ok(v) => (v, format!("env {}", e.get_ref()), e.span()),
                Err(_) => {
                    return Err(self.err(
                        e.span(),
                        format!("{key}.env"),
                        format!("the environment variable {} is not set", e.get_ref()),
                        "set it in the proxy's environment (the systemd unit's EnvironmentFile), or use file = \"…\"",
                    ))
                }
            },
            (None, Some(f)) => {
                let path = self.src.relative_path(f.get_ref());
                match std::fs::read_to_string(&path) {
                    Ok(v) => (v, format!("file {}", path.display()), f.span()),
                    Err(e) => {
                        return Err(self.err(
                            f.span(),
                            format!("{key}.file"),
                            format!("{} cannot be read: {e}", path.display()),
                            "point it at a file holding the credential (mode 0600)",
                        ))
                    }
                }
            }
            _ => {
                return Err(self.err(
                    raw.span(),
                    key,
                    "give the credential's source: env or file, one of them",
                    "e.g. auth_header = { env = \"VLLM_API_KEY\" }",
                ))
            }
        };
        let secret = secret.trim();
        let value = if name == header::AUTHORIZATION && !secret.contains(' ') {
            format!("Bearer {secret}")
        } else {
            secret.to_owned()
        };
        let mut value = match http::HeaderValue::from_str(&value) {
            Ok(v) if !secret.is_empty() => v,
            _ => {
                return Err(self.err(
                    span,
                    key,
                    format!("the credential from {source} is empty or not a header value"),
                    "store one line of visible characters",
                ))
            }
        };
        value.set_sensitive(true);
        Ok(UpstreamCredential {
            name,
            value,
            source,
        })
    }
}
