//! The policy: `proxy.toml` parsed once into typed, validated values.
//!
//! Owns loading (`Policy::load`, `Policy::parse`), the types the rest of the
//! proxy reads, and the one-screen summary `hyperion check` prints. It does not
//! hold runtime state (connection pools, counters); those are built from a
//! `Policy` by the modules that own them.

mod error;
pub mod keys;
mod model_name;
mod raw;
pub mod tenancy;
mod units;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};

pub use error::PolicyError;
pub use model_name::ModelName;
pub use raw::{
    AccessLogFormat, AuthMode, Balance, EngineSignals, ModelRouting, Priority, QueueOrder,
    UnknownModel, WhenAbsent,
};
pub use units::{Dur, Rate, Size};

use crate::route::RouteMatch;

/// A validated `proxy.toml`.
#[derive(Debug)]
pub struct Policy {
    pub server: ServerPolicy,
    /// `[cache]`, with its defaults when the file has none.
    pub cache: CachePolicy,
    /// Sorted by name.
    pub upstreams: Vec<Arc<UpstreamPolicy>>,
    /// In file order: the first match wins.
    pub routes: Vec<Arc<RoutePolicy>>,
    /// `[compression]`; `None`: bodies leave as the upstream sent them.
    pub compression: Option<Arc<CompressionPolicy>>,
    /// `[rate_limits.NAME]`, sorted by name.
    pub rate_limits: Vec<Arc<RateLimitPolicy>>,
    /// `[admin]`; `None`: no admin listener.
    pub admin: Option<AdminPolicy>,
    /// `[auth]`; `None`: keys are not checked anywhere.
    pub auth: Option<AuthPolicy>,
    /// `[tracing]`; `None`: no traces.
    pub tracing: Option<TracingPolicy>,
    /// `[tiers.NAME]` and `[keys.NAME]`, resolved: what each key gets.
    pub tenancy: Arc<tenancy::Tenancy>,
}

/// `[tracing]`: OpenTelemetry traces, exported over OTLP/HTTP (protobuf).
#[derive(Debug, Clone, PartialEq)]
pub struct TracingPolicy {
    /// The collector's traces URL, `http(s)://host:port/v1/traces`.
    pub otlp_endpoint: http::Uri,
    /// The share of traces started here that are kept (a client's sampled
    /// `traceparent` is always followed).
    pub sample_ratio: f64,
    pub service_name: String,
    /// Extra export headers (`key=value,key=value`, OTLP's format), read
    /// from this environment variable; values are never shown.
    pub headers_env: Option<String>,
    pub headers: ExportHeaders,
    /// Finished spans waiting for export; past it they are dropped and
    /// counted.
    pub max_queue: usize,
    pub batch_size: usize,
    pub export_interval: std::time::Duration,
    pub export_timeout: std::time::Duration,
}

/// The export headers: debug output names them, never their values
/// (they are credentials, often).
#[derive(Clone, PartialEq, Default)]
pub struct ExportHeaders(pub Vec<(String, String)>);

impl std::fmt::Debug for ExportHeaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(k, _)| format!("{k}: <hidden>")))
            .finish()
    }
}

/// The platform's CA certificates (those rustls can use).
pub fn platform_roots() -> rustls::RootCertStore {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    roots
}

/// A TLS client configuration checking servers against `roots`, speaking
/// HTTP/1.1 (upstream servers, the OTLP collector).
pub fn http1_client_config(roots: Arc<rustls::RootCertStore>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// `[auth]`: the keys Hyperion issued.
#[derive(Debug, Clone)]
pub struct AuthPolicy {
    /// Resolved against the policy file's directory.
    pub keys_file: std::path::PathBuf,
    /// What the file holds: read with the policy, then followed
    /// (`auth::watch`) so an added or revoked key counts within seconds.
    pub keyring: Arc<crate::auth::LiveKeyring>,
}

/// `[admin]`: the operators' listener (served by `admin`).
#[derive(Debug, Clone)]
pub struct AdminPolicy {
    pub listen: SocketAddr,
    /// `None`: only `/healthz`, `/readyz` and `/metrics` are served.
    pub token: Option<AdminToken>,
    /// Where the token comes from (`env HYPERION_ADMIN_TOKEN`, `file …`),
    /// for operators; never the token.
    pub token_source: Option<String>,
}

/// The admin bearer token, kept only as its digest: comparing digests takes
/// the same time whatever the guess (blake3's `Hash` compares in constant
/// time), and the policy never holds the secret itself.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(blake3::Hash);

impl AdminToken {
    pub fn new(token: &str) -> Self {
        AdminToken(blake3::hash(token.as_bytes()))
    }

    pub fn accepts(&self, presented: &str) -> bool {
        blake3::hash(presented.as_bytes()) == self.0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// `[rate_limits.NAME]`: one limiter (applied in `limits`). Two policies
/// that compare equal describe the same limiter, so a reload keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitPolicy {
    pub name: String,
    pub key: LimitKey,
    pub unit: LimitUnit,
    /// Units (requests or tokens) per period.
    pub rate: Rate,
    /// Units that may be spent at once from a rested bucket.
    pub burst: u64,
    /// Whether cache hits (and coalesced followers) spend from the bucket.
    pub count_hits: bool,
    /// Distinct keys tracked at most; past it, keys that were idle longest go.
    pub max_keys: u64,
    /// For `header:` and `tenant` keys: whose bucket a request without one
    /// spends from.
    pub when_absent: WhenAbsent,
}

/// What a limiter's buckets are keyed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitKey {
    /// The client behind `trusted_proxies`.
    ClientIp,
    /// A request header's value (hashed); a request without it spends
    /// from its address's bucket (or, `when_absent = "shared"`, one shared
    /// bucket).
    Header(http::HeaderName),
    /// The API key's name (`[auth]`); without a key, as for a header.
    Tenant,
    /// One bucket per route naming the limiter.
    Route,
    /// One bucket for everything.
    Global,
}

/// What a limiter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitUnit {
    Requests,
    /// LLM tokens from the response's usage fields; `default_tokens` are
    /// reserved for a request that names no `max_tokens`/`num_predict`.
    Tokens {
        default_tokens: u64,
    },
}

/// `[compression]`: which answers Hyperion compresses, and how hard
/// (applied in `compress`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressionPolicy {
    /// Preference order among the codings a client accepts equally.
    pub algorithms: Vec<crate::coding::Coding>,
    /// Bodies known to be smaller are sent as they are.
    pub min_size: u64,
    /// `type/subtype` (exact) or `type/*`, lower-case.
    pub content_types: Vec<String>,
    pub gzip_level: u32,
    pub brotli_quality: u32,
}

impl CompressionPolicy {
    /// The level `coding` is produced at.
    pub fn level(&self, coding: crate::coding::Coding) -> u32 {
        match coding {
            crate::coding::Coding::Gzip => self.gzip_level,
            crate::coding::Coding::Br => self.brotli_quality,
        }
    }
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
    /// Whether answers carry `Server-Timing` (the proxy's time, the
    /// upstream's time to headers, the cache's result).
    pub server_timing: bool,
    /// `None` when set to `"0s"`.
    pub slow_request: Option<Duration>,
    /// `[server.tls]`: listeners that speak TLS.
    pub tls: Option<TlsTermination>,
    /// Bytes of request bodies held in memory at once, process-wide (read
    /// whole for a cache key, a model or a token estimate).
    pub max_buffered_bodies: u64,
    /// Bytes of one upstream answer read ahead of a slow client; 0: none.
    pub read_ahead: u64,
    /// Bytes of answers read ahead of slow clients, process-wide.
    pub max_read_ahead: u64,
    /// Longest silence between two reads of a request body.
    pub body_read_timeout: Duration,
    /// Longest time a client may take no response bytes.
    pub send_timeout: Duration,
    /// Longest time a tunnel (WebSocket, other upgrades) carries nothing.
    pub tunnel_idle_timeout: Duration,
    /// Open connections over every proxy listener.
    pub max_connections: usize,
    /// Open connections per client address (IPv6 by /64).
    pub max_connections_per_ip: usize,
    pub http2_max_concurrent_streams: u32,
    /// Streams a client may reset before the server has accepted them.
    pub http2_max_pending_resets: usize,
    /// How often an HTTP/2 connection is PINGed; `None` when "0s".
    pub http2_keepalive_interval: Option<Duration>,
    /// How long a PING (and a client after GOAWAY) may take to answer.
    pub http2_keepalive_timeout: Duration,
}

/// `[server.tls]`: TLS on its own listeners (HTTP/1.1 and h2 by ALPN), with
/// the certificate chain and key read when the policy is (so a reload
/// picks up renewed files).
#[derive(Debug, Clone)]
pub struct TlsTermination {
    pub listen: Vec<SocketAddr>,
    pub config: Arc<rustls::ServerConfig>,
    /// Where the chain was read from, for the summary.
    pub cert: std::path::PathBuf,
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
    /// Requests in flight to each server at most (until the response body
    /// ends); `None`: unlimited.
    pub max_inflight_per_server: Option<u32>,
    /// How long a request waits for a free slot before a 503.
    pub queue_timeout: Duration,
    /// Who gets a slot first when several wait.
    pub queue: QueueOrder,
    /// Requests one tenant may have waiting at once (`queue = "fair"`);
    /// past it, that tenant's next gets a 429. A tier may say otherwise.
    pub max_queued_per_tenant: u32,
    /// How a server is chosen.
    pub balance: Balance,
    /// What `consistent_hash` hashes (and `prefix_affinity` places an
    /// unknown prompt by, when it is a header).
    pub hash_key: HashKey,
    /// `prefix_affinity`: the prompt tokens one server's KV cache holds.
    pub prefix_cache_tokens: u64,
    /// Further tries on another server after a failure before any response
    /// byte (connect errors, resets), under the pool's retry budget.
    pub retries: u32,
    /// Consecutive failures (connect errors, resets, 5xx) that take a server
    /// out of rotation for a while: the health table's `unhealthy_after`.
    pub eject_after: u32,
    /// `[upstreams.NAME.health]`: active checks.
    pub health: Option<HealthPolicy>,
    /// Whether requests go only to servers serving their `model`, and how
    /// the proxy learns who serves what.
    pub model_routing: ModelRouting,
    /// How often `discover` asks each server for its models.
    pub discover_interval: Duration,
    /// Whether (and how) each server is asked for its engine's own load.
    pub engine_signals: EngineSignals,
    /// How often.
    pub engine_poll_interval: Duration,
}

/// What `consistent_hash` keeps together on one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// The request's cache key (its target, when the route does not cache):
    /// identical prompts meet the same server and its warm caches.
    CacheKey,
    /// A header's value, e.g. a session id; requests without it are spread
    /// by load.
    Header(http::HeaderName),
}

/// `[upstreams.NAME.health]`: a cheap GET that never costs a generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthPolicy {
    pub path: http::uri::PathAndQuery,
    pub interval: Duration,
    pub timeout: Duration,
    /// Failed checks in a row that mark a server unhealthy.
    pub unhealthy_after: u32,
    /// Passed checks in a row that bring it back.
    pub healthy_after: u32,
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
    /// Its `models`, normalized; `None`: any model (or, under `discover`,
    /// whatever it says it serves).
    pub models: Option<Vec<ModelName>>,
    /// For an `https://` server: how to talk TLS to it.
    pub tls: Option<ServerTls>,
    /// The pool's `auth_header`, sent on every request and errand to it.
    pub credential: Option<Arc<UpstreamCredential>>,
}

/// A pool's own credential (`auth_header`): a header sent to its servers
/// instead of any the client sent by that name.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamCredential {
    pub name: http::HeaderName,
    /// Marked sensitive: HTTP/2 never indexes it.
    pub value: http::HeaderValue,
    /// Where it came from (`env VLLM_API_KEY`), for operators; never the value.
    pub source: String,
}

impl std::fmt::Debug for UpstreamCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UpstreamCredential({} from {})", self.name, self.source)
    }
}

/// How the proxy reaches an `https://` server: the pool's trust roots (the
/// platform's, or its `ca_file`) and the name the server's certificate must
/// carry, sent as SNI (an IP address is checked but not sent).
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub config: Arc<rustls::ClientConfig>,
    pub name: rustls::pki_types::ServerName<'static>,
}

/// One `[[route]]`.
#[derive(Debug)]
pub struct RoutePolicy {
    pub name: String,
    pub matcher: RouteMatch,
    /// Name of an entry in `Policy::upstreams`; empty on a `deny` route;
    /// the first arm's on a split route.
    pub upstream: String,
    /// `split`: the route's requests shared by weight among several
    /// upstreams (the first is `upstream`); empty: all go to `upstream`.
    pub split: Vec<SplitArm>,
    /// What keeps a client (or a conversation) on one arm of `split`.
    pub split_by: SplitBy,
    /// `deny = true`: requests matching it get 403 and go nowhere.
    pub deny: bool,
    /// Send the client's `Host` upstream (default), or the server's own authority.
    pub preserve_host: bool,
    /// `[route.cache]`; `None` when the route does not cache.
    pub cache: Option<Arc<RouteCachePolicy>>,
    /// `[route.headers]`; `None` when the route rewrites nothing.
    pub headers: Option<Arc<HeaderRewrite>>,
    /// `rate_limit`: every limiter must allow a request.
    pub rate_limits: Vec<Arc<RateLimitPolicy>>,
    /// What a request for a model its model-routed upstream does not serve
    /// gets.
    pub unknown_model: UnknownModel,
    /// `auth`: `Off` unless the policy has `[auth]` (then `Required` by
    /// default).
    pub auth: AuthMode,
}

/// The bounds of `prefix_cache_tokens` (and of a KV-cache size an engine
/// reports, `engine_signals`).
pub const MIN_PREFIX_CACHE_TOKENS: u64 = 1_000;
pub const MAX_PREFIX_CACHE_TOKENS: u64 = 100_000_000;

/// One arm of a route's `split`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitArm {
    pub upstream: String,
    pub weight: u32,
}

/// `split_by`: whose requests stay on one arm.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SplitBy {
    /// The client: its API key's name when it presented one (`[auth]`),
    /// else its address.
    #[default]
    Client,
    /// A header's value (a session or conversation id); the client when
    /// the request has none.
    Header(http::HeaderName),
}

impl RoutePolicy {
    /// The arm of `split` a request takes: by its `split_by` header's
    /// value, else by its API key's name (`key`), else by its address;
    /// `None` when that is needed and not given (`/admin/cache/explain`).
    pub fn arm_of(
        &self,
        headers: &http::HeaderMap,
        key: Option<&str>,
        client: Option<std::net::IpAddr>,
    ) -> Option<usize> {
        if let SplitBy::Header(name) = &self.split_by {
            if let Some(v) = headers.get(name) {
                let mut sticky = b"header:".to_vec();
                sticky.extend_from_slice(v.as_bytes());
                return Some(self.arm_for(&sticky));
            }
        }
        match (key, client) {
            (Some(key), _) => Some(self.arm_for(format!("key:{key}").as_bytes())),
            (None, Some(ip)) => Some(self.arm_for(format!("ip:{ip}").as_bytes())),
            (None, None) => None,
        }
    }

    /// The arm of `split` a request whose sticky value (`split_by`) is
    /// `sticky` takes: weighted rendezvous hashing. Each arm draws a
    /// number from the value and its own upstream's name, scaled by its
    /// weight (`-ln(u) / weight`), and the lowest wins; so the same value
    /// takes the same arm in every process, and changing one arm's weight
    /// (or adding or removing an arm) moves values only to or from that
    /// arm: a canary raised from 5 to 10 keeps every client it had.
    pub fn arm_for(&self, sticky: &[u8]) -> usize {
        let mut h = blake3::Hasher::new_derive_key("hyperion route split 2");
        h.update(&(self.name.len() as u64).to_le_bytes());
        h.update(self.name.as_bytes());
        h.update(sticky);
        let digest = h.finalize();
        let seed = u64::from_le_bytes(digest.as_bytes()[..8].try_into().expect("8 bytes"));
        let mut best: Option<(f64, usize)> = None;
        for (i, arm) in self.split.iter().enumerate() {
            if arm.weight == 0 {
                continue;
            }
            let draw = xxhash_rust::xxh3::xxh3_64_with_seed(arm.upstream.as_bytes(), seed);
            // Uniform in (0, 1]: the top 53 bits, never 0.
            let u = ((draw >> 11) + 1) as f64 / (1u64 << 53) as f64;
            let score = -u.ln() / f64::from(arm.weight);
            if best.is_none_or(|(b, _)| score < b) {
                best = Some((score, i));
            }
        }
        best.map_or(0, |(_, i)| i)
    }
}

/// `[route.headers]`: fields set on or removed from what goes upstream and
/// what goes back to the client (applied in `headers::HeaderRewrite`).
/// What the cache stores follows the upstream's own headers, not these.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderRewrite {
    pub request_set: Vec<(http::HeaderName, http::HeaderValue)>,
    pub request_remove: Vec<http::HeaderName>,
    pub response_set: Vec<(http::HeaderName, http::HeaderValue)>,
    pub response_remove: Vec<http::HeaderName>,
}

impl HeaderRewrite {
    /// `request_remove`, then `request_set`, on a request going upstream.
    pub fn apply_request(&self, headers: &mut http::HeaderMap) {
        Self::apply(headers, &self.request_remove, &self.request_set);
    }

    /// Whether it changes responses at all.
    pub fn rewrites_responses(&self) -> bool {
        !self.response_remove.is_empty() || !self.response_set.is_empty()
    }

    /// `response_remove`, then `response_set`, on a response going to the client.
    pub fn apply_response(&self, headers: &mut http::HeaderMap) {
        Self::apply(headers, &self.response_remove, &self.response_set);
    }

    fn apply(
        headers: &mut http::HeaderMap,
        remove: &[http::HeaderName],
        set: &[(http::HeaderName, http::HeaderValue)],
    ) {
        for name in remove {
            headers.remove(name);
        }
        for (name, value) in set {
            headers.insert(name.clone(), value.clone());
        }
    }
}

/// `[cache]`: the in-memory store every caching route shares.
#[derive(Debug, Clone)]
pub struct CachePolicy {
    /// Bytes of stored responses (bodies and heads) the store keeps.
    pub max_size: u64,
    /// Entries the store keeps at most, beside `max_size`; `None`: only
    /// bytes bound it.
    pub max_entries: Option<u64>,
    /// Responses bigger than this stream through uncached.
    pub max_entry_size: u64,
    /// `ttl` of `force` routes that set none.
    pub default_ttl: Duration,
    /// `[cache.redis]`: the tier shared with other instances, if any.
    pub redis: Option<RedisPolicy>,
    /// `credential_headers`: request headers that carry a credential, besides
    /// `Authorization` and `Cookie`; the default scope keys each of them.
    pub credential_headers: Vec<http::HeaderName>,
    /// `targeted_cache_control`: RFC 9213 targeted fields this cache obeys
    /// in place of `Cache-Control` (first valid one wins), in `origin` mode.
    pub targeted_cache_control: Vec<http::HeaderName>,
}

/// `[cache.redis]`: where the shared tier is, and how long it may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisPolicy {
    /// As written (the password, if any, never printed: see `display_url`).
    pub url: String,
    /// Prepended to every key and channel, so fleets can share one Redis.
    pub key_prefix: String,
    /// Slower than this counts as unavailable: serve from memory.
    pub timeout: Duration,
    /// `secret_env` / `secret_file`: what every entry and message in Redis
    /// is signed with, and the fleet's cache keys are derived from.
    pub secret: FleetSecret,
    /// Where the secret came from, for `check` ("env NAME", "file PATH").
    pub secret_source: String,
    /// `ca_file` (rediss:// only): PEM certificates that replace the
    /// platform's CAs for checking the server.
    pub ca_pem: Option<Arc<[u8]>>,
}

/// The fleet's shared secret, as a 32-byte key (derived from what the
/// operator gave, whatever its length). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct FleetSecret(pub [u8; 32]);

impl FleetSecret {
    /// The key for `text` (at least 32 bytes, checked by validation).
    pub fn from_text(text: &str) -> FleetSecret {
        FleetSecret(blake3::derive_key(
            "hyperion 2026-12 shared tier secret",
            text.as_bytes(),
        ))
    }
}

impl fmt::Debug for FleetSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FleetSecret(***)")
    }
}

impl RedisPolicy {
    /// The URL with any password masked, for logs and `check`.
    pub fn display_url(&self) -> String {
        match (self.url.find("://"), self.url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                let userinfo = &self.url[scheme + 3..at];
                let user = userinfo.split(':').next().unwrap_or("");
                if userinfo.contains(':') {
                    format!("{}{user}:***{}", &self.url[..scheme + 3], &self.url[at..])
                } else {
                    format!("{}***{}", &self.url[..scheme + 3], &self.url[at..])
                }
            }
            _ => self.url.clone(),
        }
    }
}

impl Default for CachePolicy {
    fn default() -> Self {
        CachePolicy {
            max_size: 256 << 20,
            max_entries: None,
            max_entry_size: 8 << 20,
            default_ttl: Duration::from_secs(300),
            redis: None,
            credential_headers: vec![
                http::HeaderName::from_static("x-api-key"),
                http::HeaderName::from_static("api-key"),
            ],
            targeted_cache_control: vec![http::HeaderName::from_static("cdn-cache-control")],
        }
    }
}

/// `[route.cache]` of a route that caches.
#[derive(Debug)]
pub struct RouteCachePolicy {
    pub freshness: Freshness,
    pub body_key: BodyKey,
    /// `ignore_fields`, each split at its dots.
    pub ignore_fields: Vec<Box<[String]>>,
    pub scope: CacheScope,
    /// `stream = "record"`: NDJSON and SSE responses are stored and replayed.
    pub record_streams: bool,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    /// Whether the client's `Cache-Control` (`no-cache`, `no-store`, `max-age`…) counts.
    pub honour_client: bool,
    /// Store responses marked `private` or `no-store`, or that set cookies
    /// (`force` mode only; meant for per-user scopes).
    pub store_private: bool,
    /// How long identical requests wait for the one already on its way
    /// upstream before going themselves; zero turns coalescing off.
    pub coalesce_timeout: Duration,
    /// `negative_ttl` (`force` mode): how long a 404, 405, 410 or 414 is
    /// kept; zero stores none. Never longer than `ttl`.
    pub negative_ttl: Duration,
    /// The client's `Accept-Encoding` goes upstream (Hyperion neither
    /// compresses nor reads answers on this route), so it is normalized and
    /// keyed: an upstream that picks a coding without saying `Vary` cannot
    /// hand a gzip answer to a client that cannot read it.
    pub keys_accept_encoding: bool,
}

/// Where an entry's freshness lifetime comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// The upstream's headers, as RFC 9111 says for a shared cache.
    Origin,
    /// The policy's `ttl`, whatever the upstream says about freshness.
    Force { ttl: Duration },
}

/// Which part of the request a body-keyed route digests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKey {
    None,
    Raw,
    /// Canonical JSON: keys sorted, whitespace dropped, numbers normalised.
    Json,
}

/// Who may share an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheScope {
    /// Requests carrying the same credentials (or none) share: the values
    /// of every header named here (`Authorization`, `Cookie` and
    /// `[cache] credential_headers`), in this order.
    Credentials(Arc<[http::HeaderName]>),
    /// Requests with the same value of this header share.
    Header(http::HeaderName),
    /// Everybody shares.
    Shared,
}

impl CacheScope {
    /// The default scope: `Authorization`, `Cookie`, then `extra` (the
    /// `[cache] credential_headers`).
    pub fn credentials(extra: &[http::HeaderName]) -> CacheScope {
        let mut names = vec![http::header::AUTHORIZATION, http::header::COOKIE];
        names.extend(
            extra
                .iter()
                .filter(|n| !names.contains(n))
                .cloned()
                .collect::<Vec<_>>(),
        );
        CacheScope::Credentials(names.into())
    }
}

impl fmt::Display for CacheScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheScope::Credentials(names) => {
                f.write_str("credentials (")?;
                for (i, n) in names.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    f.write_str(n.as_str())?;
                }
                f.write_str(")")
            }
            CacheScope::Header(h) => write!(f, "header:{h}"),
            CacheScope::Shared => {
                f.write_str("shared (no credential is keyed: every client shares entries)")
            }
        }
    }
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
        if let Some(tls) = &s.tls {
            let listen: Vec<String> = tls.listen.iter().map(|a| format!("https://{a}")).collect();
            writeln!(
                f,
                "tls:       {} (certificate {})",
                listen.join(", "),
                tls.cert.display()
            )?;
        }
        if let Some(a) = &self.admin {
            match &a.token_source {
                Some(source) => {
                    writeln!(f, "admin:     http://{} (token from {source})", a.listen)?
                }
                None => writeln!(
                    f,
                    "admin:     http://{} (no token: /healthz, /readyz and /metrics only)",
                    a.listen
                )?,
            }
        }
        if let Some(t) = &self.tracing {
            writeln!(
                f,
                "tracing:   OTLP/HTTP to {} as `{}`, {:.0}% of new traces sampled{}",
                t.otlp_endpoint,
                t.service_name,
                t.sample_ratio * 100.0,
                t.headers_env
                    .as_ref()
                    .map(|v| format!(", headers from env {v}"))
                    .unwrap_or_default()
            )?;
        }
        writeln!(
            f,
            "limits:    body {} (buffered at once {}), header {}, read ahead of slow clients {} per answer ({} at once)",
            Size(s.max_request_body),
            Size(s.max_buffered_bodies),
            Size(s.max_header_size as u64),
            Size(s.read_ahead),
            Size(s.max_read_ahead),
        )?;
        writeln!(
            f,
            "deadlines: header read {}, body read {}, send {}, keep-alive idle {}, tunnel idle {}, drain {}",
            Dur(s.header_read_timeout),
            Dur(s.body_read_timeout),
            Dur(s.send_timeout),
            Dur(s.idle_timeout),
            Dur(s.tunnel_idle_timeout),
            Dur(s.shutdown_grace)
        )?;
        writeln!(
            f,
            "conns:     at most {} open, {} per client address; HTTP/2 {} streams each, {} pending resets, ping {} (answer within {})",
            s.max_connections,
            s.max_connections_per_ip,
            s.http2_max_concurrent_streams,
            s.http2_max_pending_resets,
            s.http2_keepalive_interval.map_or_else(|| "off".to_owned(), |d| Dur(d).to_string()),
            Dur(s.http2_keepalive_timeout),
        )?;
        if self.routes.iter().any(|r| r.cache.is_some()) {
            writeln!(
                f,
                "cache:     memory {}, entries up to {}, default ttl {}",
                Size(self.cache.max_size),
                Size(self.cache.max_entry_size),
                Dur(self.cache.default_ttl)
            )?;
        }
        if let Some(a) = &self.auth {
            let keyring = a.keyring.load();
            writeln!(
                f,
                "auth:      {} key(s) in {} (hyperion keys add|list|revoke; followed while running)",
                keyring.len(),
                a.keys_file.display()
            )?;
            // A tier the policy no longer defines gives its keys the
            // default tier's terms, or none: say which keys.
            let stray: Vec<String> = keyring
                .tenants()
                .iter()
                .filter_map(|t| {
                    let tier = t.tier.as_deref()?;
                    (!self.tenancy.tiers.iter().any(|x| x == tier))
                        .then(|| format!("{} ({tier})", t.name))
                })
                .collect();
            if !stray.is_empty() {
                writeln!(
                    f,
                    "           warning: keys of a tier this policy does not define, given [tiers.default]'s terms or none: {}",
                    stray.join(", ")
                )?;
            }
        }
        if let Some(r) = &self.cache.redis {
            writeln!(
                f,
                "shared:    {} (keys {}*, timeout {}{}): cache, rate limits and fill locks shared with the fleet; entries and messages signed with the secret from {}",
                r.display_url(),
                r.key_prefix,
                Dur(r.timeout),
                match (&r.ca_pem, r.url.starts_with("rediss") || r.url.starts_with("valkeys")) {
                    (Some(_), _) => ", TLS checked against ca_file",
                    (None, true) => ", TLS checked against the platform's CAs",
                    (None, false) => ", no TLS",
                },
                r.secret_source
            )?;
        }
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
            if let Some(c) = u.servers.first().and_then(|s| s.credential.as_ref()) {
                writeln!(
                    f,
                    "                   sends its own {} (from {})",
                    c.name, c.source
                )?;
            }
            let hashed = match (&u.balance, &u.hash_key) {
                (Balance::ConsistentHash, HashKey::CacheKey) => " on the cache key".to_owned(),
                (Balance::ConsistentHash, HashKey::Header(h)) => format!(" on header {h}"),
                (Balance::PrefixAffinity, HashKey::Header(h)) => format!(
                    " ({} tokens cached per server; unknown prompts placed by header {h})",
                    u.prefix_cache_tokens
                ),
                (Balance::PrefixAffinity, _) => {
                    format!(" ({} tokens cached per server)", u.prefix_cache_tokens)
                }
                _ => String::new(),
            };
            let checks = match &u.health {
                Some(h) => format!(
                    "GET {} every {}, down after {}, up after {}",
                    h.path,
                    Dur(h.interval),
                    h.unhealthy_after,
                    h.healthy_after
                ),
                None => "no active checks".to_owned(),
            };
            writeln!(
                f,
                "  {:<16} {}{hashed}, {} retries, out after {} failures; {checks}",
                "",
                u.balance.as_str(),
                u.retries,
                u.eject_after
            )?;
            match u.model_routing {
                ModelRouting::Off => {}
                ModelRouting::Static => {
                    writeln!(f, "  {:<16} by model, from the servers' `models`", "")?
                }
                ModelRouting::Discover => writeln!(
                    f,
                    "  {:<16} by model, asking each server every {} (/api/tags, /api/ps)",
                    "",
                    Dur(u.discover_interval)
                )?,
            }
            if u.engine_signals != EngineSignals::Off {
                writeln!(
                    f,
                    "  {:<16} load as each server's engine reports it ({}, every {})",
                    "",
                    match u.engine_signals {
                        EngineSignals::Ollama => "ollama: GET /api/ps",
                        EngineSignals::Sglang => "sglang: GET /metrics",
                        _ => "vllm: GET /metrics",
                    },
                    Dur(u.engine_poll_interval)
                )?;
            }
            if let Some(max) = u.max_inflight_per_server {
                writeln!(
                    f,
                    "  {:<16} at most {max} in flight per server, {} line of {}, {} waiting per tenant",
                    "",
                    match u.queue {
                        QueueOrder::Fair => "fair",
                        QueueOrder::Fifo => "fifo",
                    },
                    Dur(u.queue_timeout),
                    u.max_queued_per_tenant,
                )?;
            }
        }
        if !self.rate_limits.is_empty() {
            writeln!(f, "rate limits:")?;
            for l in &self.rate_limits {
                let key = match &l.key {
                    LimitKey::ClientIp => "client_ip".to_owned(),
                    LimitKey::Header(h) => format!("header:{h}"),
                    LimitKey::Tenant => "tenant".to_owned(),
                    LimitKey::Route => "route".to_owned(),
                    LimitKey::Global => "global".to_owned(),
                };
                let what = match l.unit {
                    LimitUnit::Requests => "requests",
                    LimitUnit::Tokens { .. } => "tokens",
                };
                writeln!(
                    f,
                    "  {:<16} {} {what} by {key}, burst {}{}",
                    l.name,
                    l.rate,
                    l.burst,
                    if l.count_hits {
                        ", cache hits count"
                    } else {
                        ""
                    }
                )?;
            }
        }
        let tenancy = &self.tenancy;
        if !tenancy.tiers.is_empty() || !tenancy.keys.is_empty() {
            // The plans of a key of each tier with no terms of its own.
            writeln!(f, "tiers:")?;
            for tier in &tenancy.tiers {
                let Some(p) = tenancy.plan("", Some(tier)) else {
                    continue;
                };
                writeln!(
                    f,
                    "  {tier:<16} {} class (up to {}), weight {}{}{}",
                    p.priority.as_str(),
                    p.max_priority.as_str(),
                    p.weight,
                    p.max_concurrent
                        .map(|n| format!(", {n} at once"))
                        .unwrap_or_default(),
                    if p.limiters.is_empty() {
                        String::new()
                    } else {
                        let names: Vec<&str> = p.limiters.iter().map(|l| l.name.as_str()).collect();
                        format!(", budgets {}", names.join(" "))
                    }
                )?;
            }
            if !tenancy.keys.is_empty() {
                writeln!(
                    f,
                    "  keys with terms of their own: {}",
                    tenancy.keys.join(", ")
                )?;
            }
        }
        writeln!(f, "routes (first match wins):")?;
        for (i, r) in self.routes.iter().enumerate() {
            write!(
                f,
                "  {}. {:<16} {}  → {}",
                i + 1,
                r.name,
                r.matcher,
                if r.deny { "403 (deny)" } else { &r.upstream }
            )?;
            if !r.split.is_empty() {
                let arms: Vec<String> = r
                    .split
                    .iter()
                    .map(|a| format!("{} {}", a.upstream, a.weight))
                    .collect();
                let by = match &r.split_by {
                    SplitBy::Client => "client".to_owned(),
                    SplitBy::Header(h) => format!("header {h}"),
                };
                write!(f, "  [split {} by {by}]", arms.join(" / "))?;
            }
            if let Some(c) = r.cache.as_deref() {
                match c.freshness {
                    Freshness::Origin => write!(f, "  [cache origin")?,
                    Freshness::Force { ttl } => write!(f, "  [cache force {}", Dur(ttl))?,
                }
                write!(f, ", scope {}]", c.scope)?;
            }
            if !r.rate_limits.is_empty() {
                let names: Vec<&str> = r.rate_limits.iter().map(|l| l.name.as_str()).collect();
                write!(f, "  [limits {}]", names.join(", "))?;
            }
            match r.auth {
                AuthMode::Required if !r.deny => write!(f, "  [key required]")?,
                AuthMode::Optional if !r.deny => write!(f, "  [key optional]")?,
                _ => {}
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod split_tests {
    use super::*;

    fn route(weights: &[u32]) -> RoutePolicy {
        let names = ["stable", "canary", "third"];
        RoutePolicy {
            name: "chat".into(),
            matcher: RouteMatch::default(),
            upstream: "stable".into(),
            split: weights
                .iter()
                .zip(names)
                .map(|(&weight, n)| SplitArm {
                    upstream: n.into(),
                    weight,
                })
                .collect(),
            split_by: SplitBy::Client,
            deny: false,
            preserve_host: true,
            cache: None,
            headers: None,
            rate_limits: Vec::new(),
            unknown_model: UnknownModel::Reject,
            auth: AuthMode::Off,
        }
    }

    #[test]
    fn shares_follow_the_weights_and_a_raise_moves_only_the_gained() {
        let n = 100_000;
        // The canary raised from 5 % as an operator would: 95/5, then
        // 95/10 (the total changes).
        let before = route(&[95, 5]);
        let after = route(&[95, 10]);
        let (mut canary, mut moved_back, mut now_canary) = (0, 0, 0);
        for i in 0..n {
            let v = format!("ip:10.0.{}.{}", i / 256, i % 256);
            let a = before.arm_for(v.as_bytes());
            let b = after.arm_for(v.as_bytes());
            canary += a;
            now_canary += b;
            if a == 1 && b == 0 {
                moved_back += 1;
            }
        }
        let share = |k: usize| k as f64 / n as f64;
        assert!((share(canary) - 0.05).abs() < 0.005, "{}", share(canary));
        let want = 10.0 / 105.0;
        assert!(
            (share(now_canary) - want).abs() < 0.005,
            "{}",
            share(now_canary)
        );
        assert_eq!(
            moved_back, 0,
            "raising the canary moved none of its clients back"
        );
        // A third arm added takes its share from both, and moves no one
        // between the first two.
        let (two, three) = (route(&[80, 20]), route(&[80, 20, 25]));
        let (mut crossed, mut third) = (0, 0);
        for i in 0..n {
            let v = format!("key:{i}");
            let (a, b) = (two.arm_for(v.as_bytes()), three.arm_for(v.as_bytes()));
            if b == 2 {
                third += 1;
            } else if a != b {
                crossed += 1;
            }
        }
        assert_eq!(crossed, 0);
        assert!((share(third) - 0.2).abs() < 0.005, "{}", share(third));
        // Three arms, one at 0: never taken.
        let three = route(&[50, 0, 50]);
        assert!((0..1000).all(|i| three.arm_for(format!("k{i}").as_bytes()) != 1));
    }
}
