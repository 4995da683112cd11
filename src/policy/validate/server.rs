//! Validation of `[server]`, `[server.tls]` and `[admin]`: listeners, limits, deadlines, the admin token.
//!
//! Part of `validate.rs`'s `Validator` (its errors, its order): this file
//! owns only these tables' rules.

use super::*;

impl Validator<'_> {
    pub(super) fn admin(
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

    pub(super) fn admin_token(
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

    /// `[server.tls]`: its listeners, and the chain and key read and
    /// checked now (unreadable, empty or mismatched files are errors here,
    /// not at the first handshake).
    pub(super) fn server_tls(
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

    pub(super) fn server(&self, raw: raw::RawServer) -> Result<ServerPolicy, PolicyError> {
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
            server_timing: raw.server_timing.unwrap_or(false),
            slow_request: (!slow.is_zero()).then_some(slow),
        })
    }
}
