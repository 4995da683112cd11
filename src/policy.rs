//! The policy: `proxy.toml` parsed once into typed, validated values.
//!
//! Owns loading (`Policy::load`, `Policy::parse`), the types the rest of the
//! proxy reads, and the one-screen summary `hyperion check` prints. It does not
//! hold runtime state (connection pools, counters); those are built from a
//! `Policy` by the modules that own them.

mod error;
mod raw;
mod units;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};

pub use error::PolicyError;
pub use raw::AccessLogFormat;
pub use units::{Dur, Rate, Size};

use crate::route::RouteMatch;

/// A validated `proxy.toml`.
#[derive(Debug)]
pub struct Policy {
    pub server: ServerPolicy,
    /// Sorted by name.
    pub upstreams: Vec<Arc<UpstreamPolicy>>,
    /// In file order: the first match wins.
    pub routes: Vec<Arc<RoutePolicy>>,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerPolicy {
    pub listen: Vec<SocketAddr>,
    pub max_request_body: u64,
    /// The request head (request line and headers) in bytes.
    pub max_header_size: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub shutdown_grace: Duration,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub access_log: AccessLogFormat,
    /// `None` when set to `"0s"`.
    pub slow_request: Option<Duration>,
}

/// `[upstreams.NAME]`.
#[derive(Debug)]
pub struct UpstreamPolicy {
    pub name: String,
    pub servers: Vec<UpstreamServer>,
    pub connect_timeout: Duration,
    /// Until the response headers arrive.
    pub response_timeout: Duration,
    /// Longest gap between two response body chunks.
    pub idle_timeout: Duration,
}

/// One entry of an upstream's `servers`.
#[derive(Debug, Clone)]
pub struct UpstreamServer {
    /// As written, for logs and the summary.
    pub url: Arc<str>,
    pub scheme: Scheme,
    pub authority: Authority,
    /// `Host` for this server, sent when a route has `preserve_host = false`.
    pub host_header: http::HeaderValue,
    pub weight: u32,
}

/// One `[[route]]`.
#[derive(Debug)]
pub struct RoutePolicy {
    pub name: String,
    pub matcher: RouteMatch,
    /// Name of an entry in `Policy::upstreams`.
    pub upstream: String,
    /// Send the client's `Host` upstream (default), or the server's own authority.
    pub preserve_host: bool,
}

impl Policy {
    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Policy::parse(&path.display().to_string(), &text)
    }

    /// Validates policy text; `name` is used in error messages.
    pub fn parse(name: &str, text: &str) -> Result<Policy, PolicyError> {
        validate::parse(name, text)
    }

    pub fn upstream(&self, name: &str) -> Option<&Arc<UpstreamPolicy>> {
        self.upstreams.iter().find(|u| u.name == name)
    }
}

impl fmt::Display for Policy {
    /// The summary `hyperion check` prints: listeners, upstreams, routes in order.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.server;
        let listen: Vec<String> = s.listen.iter().map(|a| format!("http://{a}")).collect();
        writeln!(f, "listeners: {}", listen.join(", "))?;
        writeln!(
            f,
            "limits:    body {}, header {}, header read {}, keep-alive idle {}, drain {}",
            Size(s.max_request_body),
            Size(s.max_header_size as u64),
            Dur(s.header_read_timeout),
            Dur(s.idle_timeout),
            Dur(s.shutdown_grace)
        )?;
        writeln!(f, "upstreams:")?;
        for u in &self.upstreams {
            let servers: Vec<String> = u
                .servers
                .iter()
                .map(|srv| match srv.weight {
                    1 => srv.url.to_string(),
                    w => format!("{} (weight {w})", srv.url),
                })
                .collect();
            writeln!(
                f,
                "  {:<16} {}  [connect {}, response {}, idle {}]",
                u.name,
                servers.join(", "),
                Dur(u.connect_timeout),
                Dur(u.response_timeout),
                Dur(u.idle_timeout)
            )?;
        }
        writeln!(f, "routes (first match wins):")?;
        for (i, r) in self.routes.iter().enumerate() {
            writeln!(
                f,
                "  {}. {:<16} {}  → {}",
                i + 1,
                r.name,
                r.matcher,
                r.upstream
            )?;
        }
        Ok(())
    }
}
