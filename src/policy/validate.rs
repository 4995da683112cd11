//! Raw `proxy.toml` → validated `Policy`: defaults, cross-references
//! (upstream and limiter names), reachability of routes, and the keys whose
//! behaviour this build does not have yet.
//!
//! This file holds the order (`Validator::policy`) and the errors; each
//! table's rules are in `validate/` (`server`, `upstream`, `cache`,
//! `routes`, `limits`, `compression`). Each key's default, unit and reload
//! behaviour are listed in `keys.rs`, which tests hold these rules to.
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
use super::raw::{
    self, AuthMode, Balance, EngineSignals, ModelRouting, QueueOrder, RawPolicy, UnknownModel,
    WhenAbsent,
};
use super::tenancy::Tenancy;
use super::units::{Dur, Size};
use super::ModelName;
use super::{
    AdminPolicy, AdminToken, AuthPolicy, BodyKey, CachePolicy, CacheScope, CompressionPolicy,
    FleetSecret, Freshness, HashKey, HeaderRewrite, HealthPolicy, LimitKey, LimitUnit, Policy,
    RateLimitPolicy, RedisPolicy, RouteCachePolicy, RoutePolicy, ServerPolicy, ServerTls, SplitArm,
    SplitBy, TlsTermination, UpstreamCredential, UpstreamPolicy, UpstreamServer,
};
use crate::route::{HostPattern, RouteMatch};

// Each table's rules, as methods of the one `Validator` below.
mod auth;
mod cache;
mod compression;
mod limits;
mod routes;
mod server;
mod tiers;
mod tracing;
mod upstream;

/// Servers in one pool at most (the balancers track them in 64-bit sets).
const MAX_SERVERS: usize = 64;
/// `max_queued_per_tenant` when unset.
const DEFAULT_MAX_QUEUED: u32 = 100;

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
        let auth = match &raw.auth {
            Some(a) => Some(self.auth(a)?),
            None => None,
        };
        let tracing = match raw.tracing {
            Some(t) => Some(self.tracing(t)?),
            None => None,
        };
        let mut rate_limits = Vec::with_capacity(raw.rate_limits.len());
        for (name, limit) in raw.rate_limits {
            rate_limits.push(Arc::new(self.rate_limit(
                name,
                limit,
                raw.auth.is_some(),
            )?));
        }
        let auth_on = raw.auth.is_some();
        let mut tiers = Vec::with_capacity(raw.tiers.len());
        for (name, terms) in raw.tiers {
            let terms = self.tier_terms("tiers", &name, terms, auth_on)?;
            tiers.push((name, terms));
        }
        let mut keys = Vec::with_capacity(raw.keys.len());
        for (name, terms) in raw.keys {
            let terms = self.tier_terms("keys", &name, terms, auth_on)?;
            keys.push((name, terms));
        }
        let (tenancy, budgets) = Tenancy::resolve(tiers, keys);
        let mut upstreams = Vec::with_capacity(raw.upstreams.len());
        for (name, up) in raw.upstreams {
            upstreams.push(Arc::new(self.upstream(name, up.into_inner())?));
        }
        let routes = self.routes(
            raw.route,
            &upstreams,
            &cache,
            &rate_limits,
            (compression.is_some(), raw.auth.is_some()),
        )?;
        // The budgets' limiters beside the named ones (their names, with a
        // dot, cannot be a limiter's).
        rate_limits.extend(budgets);
        rate_limits.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Policy {
            server,
            cache,
            upstreams,
            routes,
            compression,
            rate_limits,
            admin,
            auth,
            tracing,
            tenancy: Arc::new(tenancy),
        })
    }
}

/// The header a `"header:<name>"` choice names; `None` when the text is
/// not one, or the name is not a header's.
fn header_ref(text: &str) -> Option<http::HeaderName> {
    let name = text.strip_prefix("header:")?;
    http::HeaderName::from_bytes(name.trim().as_bytes()).ok()
}
