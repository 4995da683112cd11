//! Cache keys: which requests may share a stored response.
//!
//! A key is a BLAKE3 digest (256 bits) of length-prefixed parts: the route,
//! the method (HEAD reads GET's entries), host, path, the query with its
//! parameters sorted, the scope (whose entry it is), whether a stream was
//! asked for, and for body-keyed routes a digest of the body — raw bytes, or
//! canonical JSON minus the route's `ignore_fields`. Every part can be listed
//! for the admin API's "explain". This module does not read bodies off the
//! wire or touch the store.

use std::fmt;

use crate::policy::{BodyKey, CacheScope, RouteCachePolicy};
use http::header::{self, HeaderMap};
use http::Method;

/// A request's identity in the store.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CacheKey(pub [u8; 32]);

impl std::hash::Hash for CacheKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // A digest already: any eight of its bytes are a good hash.
        let mut first = [0; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

/// Hashes a `CacheKey` from its own first bytes, mixed with a seed of this
/// process (a digest already; SipHash over it on every lookup would be
/// wasted). The seed keeps the table's buckets unpredictable even to whoever
/// knows how keys are made (a fleet's are derived from its secret).
#[derive(Clone, Copy, Default)]
pub struct DigestHash;

impl std::hash::BuildHasher for DigestHash {
    type Hasher = DigestHasher;
    fn build_hasher(&self) -> DigestHasher {
        DigestHasher(0)
    }
}

pub struct DigestHasher(u64);

impl std::hash::Hasher for DigestHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Only reached for keys hashed some other way; still deterministic.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        // murmur3's finalizer: every output bit depends on every input bit.
        let mut x = n ^ *TABLE_SEED;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^= x >> 33;
        self.0 ^= x;
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…")
    }
}

/// The body could not be keyed (a JSON route got something else).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotJson;

/// What went into a key, part by part, for "explain".
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KeyParts(pub Vec<(&'static str, String)>);

/// The request as the key sees it.
pub struct KeyInput<'a> {
    pub route: &'a str,
    pub method: &'a Method,
    /// Lower-case, without port (as routing sees it).
    pub host: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The whole body, for body-keyed routes.
    pub body: Option<&'a [u8]>,
    /// The body's part of the key when it was worked out ahead
    /// (`BodyDigest::of`, on the blocking pool for a big body); made here
    /// from `body` otherwise.
    pub body_digest: Option<&'a BodyDigest>,
    /// The API key the request presented, when Hyperion checked it.
    pub tenant: Option<TenantScope<'a>>,
    /// On a split route, the arm's upstream: arms may answer differently
    /// (a canary's new model), so each keeps its own entries.
    pub arm: Option<&'a str>,
}

/// A request's API key as the default scope keys it: by the key's name
/// (users of one key share its entries, whichever header carried it),
/// with the other credentials; the headers that carry keys, which never
/// reach the upstream, are left out.
#[derive(Clone, Copy)]
pub struct TenantScope<'a> {
    pub name: &'a str,
    pub key_headers: &'a [header::HeaderName],
}

/// A body's part of a cache key, worked out ahead of the key.
#[derive(Debug, Clone)]
pub enum BodyDigest {
    Raw(blake3::Hash),
    Json(Result<(blake3::Hash, Option<Option<bool>>), NotJson>),
}

impl BodyDigest {
    /// The digest `policy` keys `body` with; `None` on routes that do not
    /// key bodies. Parses the whole body: for a big one, call it where
    /// blocking is fine.
    pub fn of(policy: &RouteCachePolicy, body: &[u8]) -> Option<BodyDigest> {
        match policy.body_key {
            BodyKey::None => None,
            BodyKey::Raw => Some(BodyDigest::Raw(blake3::hash(body))),
            BodyKey::Json => Some(BodyDigest::Json(
                super::canonical_json::digest(body, &policy.ignore_fields)
                    .map(|d| (d.hash, d.stream))
                    .ok_or(NotJson),
            )),
        }
    }
}

impl CacheKey {
    /// The key of `req` on a route with `policy`.
    pub fn build(policy: &RouteCachePolicy, req: &KeyInput<'_>) -> Result<CacheKey, NotJson> {
        Self::derive(policy, req, None)
    }

    /// The key and the parts that went into it.
    pub fn explain(
        policy: &RouteCachePolicy,
        req: &KeyInput<'_>,
    ) -> Result<(CacheKey, KeyParts), NotJson> {
        let mut parts = KeyParts::default();
        let key = Self::derive(policy, req, Some(&mut parts))?;
        Ok((key, parts))
    }

    fn derive(
        policy: &RouteCachePolicy,
        req: &KeyInput<'_>,
        explain: Option<&mut KeyParts>,
    ) -> Result<CacheKey, NotJson> {
        // One keyed hash over the length-prefixed parts, gathered in a
        // per-thread buffer: a single BLAKE3 call is several times cheaper
        // than feeding a hasher a dozen small pieces.
        KEY_INPUT.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.clear();
            let res = Self::gather(policy, req, explain, &mut buf);
            let key = blake3::keyed_hash(key_secret(), &buf);
            if buf.capacity() > 64 * 1024 {
                // A huge path or query once must not pin its buffer forever.
                *buf = Vec::new();
            }
            res.map(|()| CacheKey(*key.as_bytes()))
        })
    }

    /// The key of one stored variant of this key's responses: this key
    /// extended with what `input` writes (see `vary`).
    pub(super) fn variant(&self, input: impl FnOnce(&mut Vec<u8>)) -> CacheKey {
        KEY_INPUT.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.clear();
            // Unlike any request key's input, which starts with its version part.
            buf.extend_from_slice(b"variant of ");
            buf.extend_from_slice(&self.0);
            input(&mut buf);
            let key = blake3::keyed_hash(key_secret(), &buf);
            if buf.capacity() > 64 * 1024 {
                *buf = Vec::new();
            }
            CacheKey(*key.as_bytes())
        })
    }

    fn gather(
        policy: &RouteCachePolicy,
        req: &KeyInput<'_>,
        mut explain: Option<&mut KeyParts>,
        buf: &mut Vec<u8>,
    ) -> Result<(), NotJson> {
        let mut part = |name: &'static str, value: &[u8], shown: &dyn Fn() -> String| {
            buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
            buf.extend_from_slice(value);
            if let Some(e) = explain.as_deref_mut() {
                e.0.push((name, shown()));
            }
        };
        // 2: canonical JSON digested as it is parsed (arrays end with a mark
        // instead of starting with a count, objects digest each member).
        // 3: the default scope keys every credential, not `Authorization`
        // alone; the client's Accept-Encoding keyed where it goes upstream.
        // A split arm's key is apart from every key without one from its
        // first part on.
        if req.arm.is_some() {
            part("version", b"hyperion-key-3-arm", &|| "3 (split arm)".into());
        } else {
            part("version", b"hyperion-key-3", &|| "3".into());
        }
        part("route", req.route.as_bytes(), &|| req.route.to_owned());
        // A HEAD is answered from GET's entry (RFC 9110 §9.3.2).
        let method = if req.method == Method::HEAD {
            &Method::GET
        } else {
            req.method
        };
        part("method", method.as_str().as_bytes(), &|| method.to_string());
        part("host", req.host.as_bytes(), &|| req.host.to_owned());
        part("path", req.path.as_bytes(), &|| req.path.to_owned());
        if let Some(arm) = req.arm {
            part("arm", arm.as_bytes(), &|| arm.to_owned());
        }
        let query = sorted_query(req.query.unwrap_or(""));
        part("query", query.as_bytes(), &|| query.to_string());
        match &policy.scope {
            CacheScope::Shared => part("scope", b"shared", &|| "shared".into()),
            CacheScope::Credentials(names) => match req.tenant {
                None => {
                    let digest = credentials_digest(names, req.headers);
                    part("scope", digest.as_bytes(), &|| {
                        describe_credentials(names, req.headers)
                    })
                }
                Some(t) => {
                    let others: Vec<header::HeaderName> = names
                        .iter()
                        .filter(|n| !t.key_headers.contains(n))
                        .cloned()
                        .collect();
                    // Apart from every credential digest: a name, tagged.
                    let mut scope = b"tenant:".to_vec();
                    scope.extend_from_slice(&(t.name.len() as u64).to_le_bytes());
                    scope.extend_from_slice(t.name.as_bytes());
                    scope.extend_from_slice(credentials_digest(&others, req.headers).as_bytes());
                    part("scope", &scope, &|| {
                        format!(
                            "API key `{}`; {}",
                            t.name,
                            describe_credentials(&others, req.headers)
                        )
                    })
                }
            },
            CacheScope::Header(name) => {
                let v = req.headers.get(name).map(|v| v.as_bytes());
                let digest = scope_digest(v);
                part("scope", &digest, &|| describe_scope(name.as_str(), v))
            }
        }
        if policy.keys_accept_encoding {
            let coding = super::accept_coding::canonical(req.headers);
            let value = coding.as_ref().map_or(&b""[..], |v| v.as_bytes());
            part("accept-encoding", value, &|| match &coding {
                Some(v) => String::from_utf8_lossy(v.as_bytes()).into_owned(),
                None => "none (identity)".into(),
            });
        }
        let body = req.body.unwrap_or(b"");
        let (stream, digest) = body_parts(policy, req)?;
        part("stream", &[stream as u8], &|| stream.to_string());
        if let Some(d) = digest {
            part("body", d.as_bytes(), &|| match policy.body_key {
                BodyKey::Json => {
                    let ignored: Vec<String> =
                        policy.ignore_fields.iter().map(|f| f.join(".")).collect();
                    format!(
                        "canonical json, blake3 {}, ignoring [{}]",
                        short(d.as_bytes()),
                        ignored.join(", ")
                    )
                }
                _ => format!("raw {} bytes, blake3 {}", body.len(), short(d.as_bytes())),
            });
        }
        Ok(())
    }
}

/// Whether the request asks for a stream, and its body's digest on
/// body-keyed routes (worked out ahead for a big body, or here).
fn body_parts(
    policy: &RouteCachePolicy,
    req: &KeyInput<'_>,
) -> Result<(bool, Option<blake3::Hash>), NotJson> {
    let body = req.body.unwrap_or(b"");
    Ok(match policy.body_key {
        BodyKey::None => (wants_event_stream(req.headers), None),
        BodyKey::Raw => {
            let d = match req.body_digest {
                Some(BodyDigest::Raw(d)) => *d,
                _ => blake3::hash(body),
            };
            (wants_event_stream(req.headers), Some(d))
        }
        BodyKey::Json => {
            let (d, stream_member) = match req.body_digest {
                Some(BodyDigest::Json(ahead)) => (*ahead)?,
                _ => super::canonical_json::digest(body, &policy.ignore_fields)
                    .map(|d| (d.hash, d.stream))
                    .ok_or(NotJson)?,
            };
            let stream =
                json_wants_stream(stream_member, req.path) || wants_event_stream(req.headers);
            (stream, Some(d))
        }
    })
}

thread_local! {
    static KEY_INPUT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The BLAKE3 key of cache-key hashing: the same in every process of this
/// version, unless a shared tier names entries for the whole fleet from its
/// secret (`share_keys_with_fleet`). A key is therefore the same on every
/// proxy, which `consistent_hash` balancing on the cache key relies on to
/// place a prompt on the same server whichever proxy it came through. The
/// store's hash table is keyed on its own (`DigestHash`, random per
/// process), so knowing how keys are made does not let anyone pick
/// colliding requests; nothing outside is addressed by a lone instance's
/// keys (the shared tier's are the fleet's, and its values are signed).
static KEY_SECRET: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();

fn key_secret() -> &'static [u8; 32] {
    KEY_SECRET
        .get_or_init(|| blake3::derive_key("hyperion 2026-12 cache keys of one instance", b""))
}

/// Makes this process key requests as every instance of its fleet does
/// (the same `secret` and `key_prefix`), so their entries have the same
/// names; nobody without the secret can compute a key, so nobody can
/// aim a value at one. Must run before any key is made; false (and keys
/// stay this process's own) when it came too late.
pub fn share_keys_with_fleet(secret: &[u8; 32], key_prefix: &str) -> bool {
    let mut material = Vec::with_capacity(32 + key_prefix.len());
    material.extend_from_slice(secret);
    material.extend_from_slice(key_prefix.as_bytes());
    let fleet = blake3::derive_key("hyperion 2026-12 cache keys shared by a fleet", &material);
    KEY_SECRET.get_or_init(|| fleet) == &fleet
}

/// A random seed of this process for the store's hash table.
static TABLE_SEED: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| fastrand::u64(..));

fn scope_digest(value: Option<&[u8]>) -> [u8; 32] {
    match value {
        // Distinct from every digest of a present header, including an empty one.
        None => [0; 32],
        Some(v) => *blake3::hash(v).as_bytes(),
    }
}

/// One digest of every value of every credential header, in the policy's
/// order: two requests share entries only when they carry the same
/// credentials, header by header (an absent header differs from an empty
/// one, and a value never slides from one header into the next).
fn credentials_digest(names: &[header::HeaderName], headers: &HeaderMap) -> blake3::Hash {
    if !names.iter().any(|n| headers.contains_key(n)) {
        // No credential at all (most anonymous traffic): a constant, unlike
        // any digest of a present one, without hashing on the hit path.
        return blake3::Hash::from_bytes([0; 32]);
    }
    let mut h = blake3::Hasher::new();
    for name in names {
        let values = headers.get_all(name);
        h.update(&(values.iter().count() as u64).to_le_bytes());
        for v in values {
            h.update(&(v.len() as u64).to_le_bytes());
            h.update(v.as_bytes());
        }
    }
    h.finalize()
}

/// Which credentials went into a key, each as a digest (never the value).
fn describe_credentials(names: &[header::HeaderName], headers: &HeaderMap) -> String {
    let present: Vec<String> = names
        .iter()
        .filter(|n| headers.contains_key(*n))
        .map(|n| {
            let mut h = blake3::Hasher::new();
            for v in headers.get_all(n) {
                h.update(&(v.len() as u64).to_le_bytes());
                h.update(v.as_bytes());
            }
            format!("{n}: blake3 {}", short(h.finalize().as_bytes()))
        })
        .collect();
    if present.is_empty() {
        let all: Vec<&str> = names.iter().map(|n| n.as_str()).collect();
        return format!("no credentials (none of {})", all.join(", "));
    }
    present.join("; ")
}

/// Never shows the credential itself.
fn describe_scope(name: &str, value: Option<&[u8]>) -> String {
    match value {
        None => format!("{name}: absent"),
        Some(v) => format!("{name}: blake3 {}", short(blake3::hash(v).as_bytes())),
    }
}

fn short(d: &[u8]) -> String {
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Parameters sorted bytewise (stable, so repeated names keep their order):
/// `b=2&a=1` and `a=1&b=2` are one key. Empty parameters are dropped.
fn sorted_query(q: &str) -> std::borrow::Cow<'_, str> {
    if !q.contains('&') {
        // Nothing to sort: most requests, and every request without a query.
        return std::borrow::Cow::Borrowed(q);
    }
    let mut params: Vec<&str> = q.split('&').filter(|p| !p.is_empty()).collect();
    fn name(p: &str) -> &str {
        p.split_once('=').map_or(p, |(n, _)| n)
    }
    params.sort_by(|a, b| name(a).cmp(name(b)));
    std::borrow::Cow::Owned(params.join("&"))
}

fn wants_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"))
}

/// Whether a JSON request asks for a streamed answer: `"stream": true`, or
/// Ollama's generate/chat, which stream unless told `"stream": false`.
/// `stream` is the top-level member as `canonical_json` noted it.
fn json_wants_stream(stream: Option<Option<bool>>, path: &str) -> bool {
    match stream {
        Some(Some(b)) => b,
        Some(None) => false,
        None => matches!(path, "/api/generate" | "/api/chat"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Freshness;
    use std::time::Duration;

    fn policy(body_key: BodyKey, scope: CacheScope, ignore: &[&str]) -> RouteCachePolicy {
        RouteCachePolicy {
            freshness: Freshness::Force {
                ttl: Duration::from_secs(60),
            },
            body_key,
            ignore_fields: ignore
                .iter()
                .map(|f| f.split('.').map(str::to_owned).collect())
                .collect(),
            scope,
            record_streams: true,
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            honour_client: true,
            store_private: false,
            coalesce_timeout: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(10),
            keys_accept_encoding: false,
        }
    }

    fn key(
        p: &RouteCachePolicy,
        method: Method,
        query: Option<&str>,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<CacheKey, NotJson> {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        CacheKey::build(
            p,
            &KeyInput {
                arm: None,
                route: "r",
                method: &method,
                host: "example.com",
                path: "/api/generate",
                query,
                headers: &h,
                body: Some(body.as_bytes()),
                body_digest: None,
                tenant: None,
            },
        )
    }

    #[test]
    fn canonical_json_ignores_order_whitespace_number_form_and_listed_fields() {
        let p = policy(
            BodyKey::Json,
            CacheScope::Shared,
            &["keep_alive", "options.num_thread"],
        );
        let a = key(
            &p,
            Method::POST,
            None,
            &[],
            r#"{"model":"m","prompt":"hi","options":{"temperature":1,"num_thread":4}}"#,
        )
        .unwrap();
        let b = key(&p, Method::POST, None, &[], r#"{ "options": {"num_thread": 8, "temperature": 1.0}, "prompt": "hi", "model": "m", "keep_alive": "5m" }"#).unwrap();
        assert_eq!(a, b);
        let c = key(
            &p,
            Method::POST,
            None,
            &[],
            r#"{"model":"m","prompt":"hi!","options":{"temperature":1}}"#,
        )
        .unwrap();
        assert_ne!(a, c);
        assert_eq!(key(&p, Method::POST, None, &[], "{not json"), Err(NotJson));
    }

    #[test]
    fn streaming_and_non_streaming_requests_differ() {
        let p = policy(BodyKey::Json, CacheScope::Shared, &[]);
        let default = key(&p, Method::POST, None, &[], r#"{"model":"m"}"#).unwrap();
        let on = key(
            &p,
            Method::POST,
            None,
            &[],
            r#"{"model":"m","stream":true}"#,
        )
        .unwrap();
        let off = key(
            &p,
            Method::POST,
            None,
            &[],
            r#"{"model":"m","stream":false}"#,
        )
        .unwrap();
        assert_ne!(on, off);
        assert_ne!(default, off);
    }

    fn credentials() -> CacheScope {
        CacheScope::credentials(&[
            header::HeaderName::from_static("x-api-key"),
            header::HeaderName::from_static("api-key"),
        ])
    }

    #[test]
    fn scopes_separate_users_unless_shared() {
        let p = policy(BodyKey::None, credentials(), &[]);
        let a = key(&p, Method::GET, None, &[("authorization", "Bearer A")], "").unwrap();
        let b = key(&p, Method::GET, None, &[("authorization", "Bearer B")], "").unwrap();
        let none = key(&p, Method::GET, None, &[], "").unwrap();
        let empty = key(&p, Method::GET, None, &[("authorization", "")], "").unwrap();
        assert!(a != b && a != none && none != empty);
        // Every credential the request carries partitions, header by header.
        let mut seen = vec![a, b, none, empty];
        for headers in [
            &[("cookie", "session=A")][..],
            &[("cookie", "session=B")],
            &[("cookie", "session=A"), ("cookie", "theme=dark")],
            &[("x-api-key", "A")],
            &[("api-key", "A")],
            &[("x-api-key", "A"), ("api-key", "A")],
            &[("authorization", "Bearer A"), ("x-api-key", "A")],
        ] {
            let k = key(&p, Method::GET, None, headers, "").unwrap();
            assert!(!seen.contains(&k), "{headers:?} shares a key");
            seen.push(k);
        }
        // Other headers do not.
        let other = key(&p, Method::GET, None, &[("x-trace", "1")], "").unwrap();
        assert_eq!(other, none);
        let p = policy(BodyKey::None, CacheScope::Shared, &[]);
        let a = key(&p, Method::GET, None, &[("authorization", "Bearer A")], "").unwrap();
        let b = key(&p, Method::GET, None, &[("authorization", "Bearer B")], "").unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn accept_encoding_is_keyed_only_where_it_goes_upstream() {
        let mut p = policy(BodyKey::None, CacheScope::Shared, &[]);
        let k =
            |p: &RouteCachePolicy, ae: &[(&str, &str)]| key(p, Method::GET, None, ae, "").unwrap();
        assert_eq!(k(&p, &[("accept-encoding", "gzip")]), k(&p, &[]));
        p.keys_accept_encoding = true;
        let gzip_br = k(&p, &[("accept-encoding", "gzip, br")]);
        assert_eq!(gzip_br, k(&p, &[("accept-encoding", "br;q=0.9,GZIP")]));
        assert_ne!(gzip_br, k(&p, &[("accept-encoding", "gzip")]));
        assert_ne!(k(&p, &[("accept-encoding", "gzip")]), k(&p, &[]));
        assert_eq!(k(&p, &[("accept-encoding", "identity")]), k(&p, &[]));
    }

    #[test]
    fn keys_are_the_same_in_every_process() {
        // consistent_hash places a prompt by its key on every proxy: a
        // lone instance's keys must not depend on the process. (A change
        // of key version changes this value on purpose.)
        let p = policy(BodyKey::Json, CacheScope::Shared, &[]);
        let k = key(
            &p,
            Method::POST,
            None,
            &[],
            r#"{"model":"m","prompt":"hi"}"#,
        )
        .unwrap();
        let hex: String = k.0.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "ef5f518b7d07f33d9ed6f991323debc92f7ae717350a89689ec996025f74283e"
        );
    }

    #[test]
    fn query_order_and_head_do_not_matter() {
        let p = policy(BodyKey::None, CacheScope::Shared, &[]);
        let a = key(&p, Method::GET, Some("b=2&a=1"), &[], "").unwrap();
        let b = key(&p, Method::HEAD, Some("a=1&b=2&"), &[], "").unwrap();
        assert_eq!(a, b);
        let c = key(&p, Method::GET, Some("a=1&b=3"), &[], "").unwrap();
        assert_ne!(a, c);
    }

    #[test]
    fn explain_lists_parts_without_secrets() {
        let p = policy(BodyKey::Json, credentials(), &[]);
        let h: HeaderMap = [(header::AUTHORIZATION, "Bearer secret".parse().unwrap())]
            .into_iter()
            .collect();
        let (_, parts) = CacheKey::explain(
            &p,
            &KeyInput {
                arm: None,
                route: "r",
                method: &Method::POST,
                host: "h",
                path: "/p",
                query: None,
                headers: &h,
                body: Some(b"{}"),
                body_digest: None,
                tenant: None,
            },
        )
        .unwrap();
        let names: Vec<_> = parts.0.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            ["version", "route", "method", "host", "path", "query", "scope", "stream", "body"]
        );
        assert!(!format!("{parts:?}").contains("secret"));
    }
}
