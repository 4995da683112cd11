//! The serde mirror of `proxy.toml`: every key of the reference shape in
//! POLICY.md, typed, with unknown keys rejected.
//!
//! This is the file's grammar only. Whether a key makes sense with the others
//! (names resolve, routes are reachable, the behaviour exists in this build) is
//! decided in `validate.rs`, which turns these types into a `Policy`.
//! `Spanned` marks the values that validation must point at by line.

// Tables whose behaviour lands in later issues are parsed (so typos are caught)
// and then refused by validation; their fields are read once they are built.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use toml::Spanned;

use super::units::{Dur, Rate, Size};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    #[serde(default)]
    pub server: RawServer,
    pub admin: Option<Spanned<RawAdmin>>,
    pub auth: Option<Spanned<RawAuth>>,
    pub cache: Option<Spanned<RawCache>>,
    pub compression: Option<Spanned<RawCompression>>,
    pub tracing: Option<Spanned<RawTracing>>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, Spanned<RawUpstream>>,
    #[serde(default)]
    pub rate_limits: BTreeMap<String, Spanned<RawRateLimit>>,
    #[serde(default)]
    pub tiers: BTreeMap<String, Spanned<RawTier>>,
    #[serde(default)]
    pub keys: BTreeMap<String, Spanned<RawTier>>,
    #[serde(default)]
    pub route: Vec<Spanned<RawRoute>>,
}

/// `[tiers.NAME]`, and `[keys.NAME]` (one key's terms over its tier's).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTier {
    pub rate: Option<Spanned<Rate>>,
    pub tokens_per_minute: Option<Spanned<u64>>,
    pub tokens_per_day: Option<Spanned<u64>>,
    pub max_concurrent: Option<Spanned<u32>>,
    pub priority: Option<Spanned<Priority>>,
    pub max_priority: Option<Spanned<Priority>>,
    pub weight: Option<Spanned<u32>>,
    pub max_queued: Option<Spanned<u32>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<Spanned<OneOrMany<ListenAddr>>>,
    pub max_request_body: Option<Size>,
    pub max_header_size: Option<Spanned<Size>>,
    pub header_read_timeout: Option<Dur>,
    pub idle_timeout: Option<Dur>,
    pub shutdown_grace: Option<Dur>,
    pub trusted_proxies: Option<Vec<Cidr>>,
    pub access_log: Option<AccessLogFormat>,
    pub server_timing: Option<bool>,
    pub slow_request: Option<Dur>,
    pub tls: Option<Spanned<RawTls>>,
    pub max_buffered_bodies: Option<Spanned<Size>>,
    pub read_ahead: Option<Spanned<Size>>,
    pub max_read_ahead: Option<Spanned<Size>>,
    pub body_read_timeout: Option<Spanned<Dur>>,
    pub send_timeout: Option<Spanned<Dur>>,
    pub tunnel_idle_timeout: Option<Spanned<Dur>>,
    pub max_connections: Option<Spanned<u64>>,
    pub max_connections_per_ip: Option<Spanned<u64>>,
    pub http2_max_concurrent_streams: Option<Spanned<u64>>,
    pub http2_max_pending_resets: Option<Spanned<u64>>,
    pub http2_keepalive_interval: Option<Spanned<Dur>>,
    pub http2_keepalive_timeout: Option<Spanned<Dur>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub listen: OneOrMany<ListenAddr>,
    pub cert: String,
    pub key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<ListenAddr>,
    pub token_env: Option<String>,
    pub token_file: Option<String>,
}

/// `[tracing]`: OpenTelemetry traces over OTLP/HTTP.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    pub otlp_endpoint: Option<Spanned<String>>,
    pub sample_ratio: Option<Spanned<f64>>,
    pub service_name: Option<Spanned<String>>,
    pub headers_env: Option<Spanned<String>>,
    pub max_queue: Option<Spanned<u64>>,
    pub batch_size: Option<Spanned<u64>>,
    pub export_interval: Option<Spanned<Dur>>,
    pub export_timeout: Option<Spanned<Dur>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    pub keys_file: Option<Spanned<String>>,
}

/// A route's `auth`: whether a request needs a key issued by Hyperion.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// No key, no answer (401).
    Required,
    /// A key is taken when one is presented (a wrong one is still refused).
    Optional,
    /// Keys are not looked at; the credential headers pass as sent.
    Off,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    pub max_size: Option<Size>,
    pub max_entries: Option<Spanned<u64>>,
    pub max_entry_size: Option<Size>,
    pub default_ttl: Option<Dur>,
    pub redis: Option<Spanned<RawRedis>>,
    pub credential_headers: Option<Spanned<Vec<Spanned<String>>>>,
    pub targeted_cache_control: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    pub url: Spanned<String>,
    pub key_prefix: Option<Spanned<String>>,
    pub timeout: Option<Spanned<Dur>>,
    pub secret_env: Option<Spanned<String>>,
    pub secret_file: Option<Spanned<String>>,
    pub ca_file: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCompression {
    pub algorithms: Option<Vec<Encoding>>,
    pub min_size: Option<Size>,
    pub content_types: Option<Vec<String>>,
    pub gzip_level: Option<u32>,
    pub brotli_quality: Option<u32>,
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Br,
    Gzip,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub servers: Spanned<Vec<Spanned<RawServerEntry>>>,
    pub balance: Option<Spanned<Balance>>,
    pub model_routing: Option<Spanned<ModelRouting>>,
    pub connect_timeout: Option<Dur>,
    pub response_timeout: Option<Dur>,
    pub idle_timeout: Option<Dur>,
    pub max_inflight_per_server: Option<Spanned<u32>>,
    pub queue_timeout: Option<Spanned<Dur>>,
    pub queue: Option<Spanned<QueueOrder>>,
    pub max_queued_per_tenant: Option<Spanned<u32>>,
    pub retries: Option<Spanned<u32>>,
    pub hash_key: Option<Spanned<String>>,
    pub prefix_cache_tokens: Option<Spanned<u64>>,
    pub discover_interval: Option<Spanned<Dur>>,
    pub engine_signals: Option<Spanned<EngineSignals>>,
    pub engine_poll_interval: Option<Spanned<Dur>>,
    pub ca_file: Option<Spanned<String>>,
    pub health: Option<Spanned<RawHealth>>,
    pub auth_header: Option<Spanned<RawAuthHeader>>,
}

/// `[upstreams.NAME] auth_header`: the pool's own credential.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuthHeader {
    pub name: Option<Spanned<String>>,
    pub env: Option<Spanned<String>>,
    pub file: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServerEntry {
    pub url: Spanned<String>,
    pub weight: Option<Spanned<u32>>,
    pub models: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    RoundRobin,
    LeastInflight,
    P2cEwma,
    ConsistentHash,
    PrefixAffinity,
}

impl Balance {
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastInflight => "least_inflight",
            Balance::P2cEwma => "p2c_ewma",
            Balance::ConsistentHash => "consistent_hash",
            Balance::PrefixAffinity => "prefix_affinity",
        }
    }
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ModelRouting {
    Off,
    Static,
    Discover,
}

impl ModelRouting {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelRouting::Off => "off",
            ModelRouting::Static => "static",
            ModelRouting::Discover => "discover",
        }
    }
}

/// `[upstreams.NAME] engine_signals`: how the pool's servers report their
/// own load, when Hyperion should ask them.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum EngineSignals {
    /// Hyperion's own counts only.
    #[default]
    Off,
    /// vLLM's Prometheus `/metrics`.
    Vllm,
    /// SGLang's Prometheus `/metrics`.
    Sglang,
    /// Ollama's `GET /api/ps`.
    Ollama,
}

impl EngineSignals {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineSignals::Off => "off",
            EngineSignals::Vllm => "vllm",
            EngineSignals::Sglang => "sglang",
            EngineSignals::Ollama => "ollama",
        }
    }
}

/// A route's `unknown_model`: what a request for a model no server of a
/// model-routed pool serves gets.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum UnknownModel {
    /// 404 JSON listing the models the pool serves.
    #[default]
    Reject,
    /// Any server, which answers for itself (e.g. pulls the model).
    AnyServer,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub path: Option<Spanned<String>>,
    pub interval: Option<Spanned<Dur>>,
    pub timeout: Option<Spanned<Dur>>,
    pub unhealthy_after: Option<Spanned<u32>>,
    pub healthy_after: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub key: Option<Spanned<String>>,
    pub rate: Option<Spanned<Rate>>,
    pub burst: Option<Spanned<u64>>,
    pub tokens: Option<Spanned<Rate>>,
    pub default_tokens: Option<Spanned<u64>>,
    pub count_hits: Option<bool>,
    pub max_keys: Option<Spanned<u64>>,
    pub when_absent: Option<Spanned<WhenAbsent>>,
}

/// `[upstreams.NAME] queue`: who goes first when a slot comes free.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum QueueOrder {
    /// Tenants take turns by weight, priority classes first.
    Fair,
    /// Arrival order, whoever sent it.
    Fifo,
}

/// A priority class in the line in front of a busy upstream: a slot goes
/// to the highest class with anyone waiting.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Interactive = 0,
    Standard = 1,
    Batch = 2,
}

impl Priority {
    pub const COUNT: usize = 3;
    /// Highest first, at their own index.
    pub const ALL: [Priority; Priority::COUNT] =
        [Priority::Interactive, Priority::Standard, Priority::Batch];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Interactive => "interactive",
            Priority::Standard => "standard",
            Priority::Batch => "batch",
        }
    }

    /// A class by its name, as a request header may ask for it.
    pub fn parse(name: &[u8]) -> Option<Priority> {
        Priority::ALL.into_iter().find(|p| {
            p.as_str()
                .as_bytes()
                .eq_ignore_ascii_case(name.trim_ascii())
        })
    }
}

/// `when_absent`: the bucket of a request without the header (or key) a
/// limiter counts by.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WhenAbsent {
    /// The client address's own bucket.
    ClientIp,
    /// One bucket for every request without it.
    Shared,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Spanned<String>,
    #[serde(rename = "match", default)]
    pub matcher: Option<Spanned<RawMatch>>,
    pub upstream: Option<Spanned<String>>,
    /// `split = [{ upstream = "stable", weight = 95 }, …]`.
    pub split: Option<Spanned<Vec<Spanned<RawSplitArm>>>>,
    pub split_by: Option<Spanned<String>>,
    /// `deny = true`: answered 403 here, never forwarded.
    pub deny: Option<Spanned<bool>>,
    pub preserve_host: Option<bool>,
    pub unknown_model: Option<Spanned<UnknownModel>>,
    pub auth: Option<Spanned<AuthMode>>,
    pub rate_limit: Option<Spanned<Vec<Spanned<String>>>>,
    pub cache: Option<Spanned<RawRouteCache>>,
    pub headers: Option<Spanned<RawRouteHeaders>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSplitArm {
    pub upstream: Spanned<String>,
    pub weight: Spanned<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    pub methods: Option<Vec<Spanned<String>>>,
    pub paths: Option<Vec<Spanned<String>>>,
    pub path_prefix: Option<Spanned<String>>,
    pub host: Option<Spanned<String>>,
    /// `headers = { "x-canary" = "1" }` (`"*"`: any value).
    pub headers: Option<Spanned<std::collections::BTreeMap<String, Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouteCache {
    pub mode: Option<Spanned<CacheMode>>,
    pub ttl: Option<Spanned<Dur>>,
    pub body_key: Option<Spanned<BodyKey>>,
    pub ignore_fields: Option<Spanned<Vec<Spanned<String>>>>,
    pub scope: Option<Spanned<String>>,
    pub stream: Option<Spanned<StreamCaching>>,
    pub stale_if_error: Option<Spanned<Dur>>,
    pub stale_while_revalidate: Option<Spanned<Dur>>,
    pub client_cache_control: Option<Spanned<ClientCacheControl>>,
    pub store_private: Option<Spanned<bool>>,
    pub coalesce_timeout: Option<Spanned<Dur>>,
    pub negative_ttl: Option<Spanned<Dur>>,
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClientCacheControl {
    Honour,
    Ignore,
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CacheMode {
    Off,
    Origin,
    Force,
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BodyKey {
    None,
    Raw,
    Json,
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StreamCaching {
    Off,
    Record,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouteHeaders {
    pub response_set: Option<BTreeMap<String, String>>,
    pub response_remove: Option<Vec<String>>,
    pub request_set: Option<BTreeMap<String, String>>,
    pub request_remove: Option<Vec<String>>,
}

/// `access_log = "json" | "combined" | "off"`.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogFormat {
    #[default]
    Json,
    Combined,
    Off,
}

/// A listen address, `IP:PORT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        s.parse().map(ListenAddr).map_err(|_| {
            format!("`{s}` is not a listen address — write IP:PORT, e.g. \"127.0.0.1:8080\" or \"[::1]:8080\"")
        })
    }
}

/// A trusted-proxy network: a CIDR (`10.0.0.0/8`) or a single address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr(pub ipnet::IpNet);

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(net) = s.parse::<ipnet::IpNet>() {
            return Ok(Cidr(net.trunc()));
        }
        s.parse::<std::net::IpAddr>()
            .map(|ip| Cidr(ip.into()))
            .map_err(|_| {
                format!("`{s}` is not a network — write a CIDR such as \"10.0.0.0/8\" or an address such as \"127.0.0.1\"")
            })
    }
}

/// One value or an array of them: `listen = "127.0.0.1:8080"` and
/// `listen = ["127.0.0.1:8080"]` mean the same.
pub struct OneOrMany<T>(pub Vec<T>);

impl<'de, T> Deserialize<'de> for OneOrMany<T>
where
    T: FromStr<Err = String>,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: FromStr<Err = String>> Visitor<'de> for V<T> {
            type Value = OneOrMany<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                v.parse().map(|t| OneOrMany(vec![t])).map_err(E::custom)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s.parse().map_err(de::Error::custom)?);
                }
                Ok(OneOrMany(out))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

macro_rules! deserialize_via_from_str {
    ($($ty:ty),*) => {$(
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(de::Error::custom)
            }
        }
    )*};
}

deserialize_via_from_str!(ListenAddr, Cidr);
