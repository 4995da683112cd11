//! API keys issued by Hyperion: making one, the keys file that keeps only
//! their digests, and finding the key a request presents.
//!
//! A key is `hyp_` and 48 hex digits (192 random bits from the operating
//! system), shown once when made. The keys file (`[auth] keys_file`) keeps
//! for each key its name, its tier and a BLAKE3 digest of it, never the key:
//! a leaked file lets no one in. With that much randomness a plain digest
//! cannot be searched back to its key, and it is the same on every
//! instance, so one file serves a fleet.
//!
//! Owns keys and the file, not what a route requires (`policy`) nor what is
//! answered to a request without a good key (the handler).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName};
use serde::{Deserialize, Serialize};

/// Digests are uniformly random already (and the map is only ever filled
/// from the keys file): their first eight bytes are their hash, instead of
/// SipHash over all 32 on every request.
type DigestHash = std::hash::BuildHasherDefault<FirstBytes>;

#[derive(Default)]
struct FirstBytes(u64);

impl std::hash::Hasher for FirstBytes {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        if let Some(first) = bytes.first_chunk::<8>() {
            self.0 = u64::from_le_bytes(*first);
        }
    }

    // The slice's length prefix says nothing.
    fn write_usize(&mut self, _: usize) {}
}

/// What a key is known as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub name: Arc<str>,
    /// `--tier`, when the key was given one.
    pub tier: Option<Arc<str>>,
}

/// The keys of a keys file, by digest.
#[derive(Debug, Default, Clone)]
pub struct Keyring {
    by_digest: HashMap<[u8; 32], Arc<Tenant>, DigestHash>,
}

/// The request headers a key may come in, in the order they are read:
/// `Authorization: Bearer` (OpenAI's clients), `x-api-key` (Anthropic's),
/// `api-key` (Azure's). All of them are removed before the upstream.
pub static KEY_HEADERS: [HeaderName; 3] = [
    header::AUTHORIZATION,
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("api-key"),
];

/// A keys file's keyring as it stands: swapped whole when the file
/// changes, read without a lock.
pub type LiveKeyring = arc_swap::ArcSwap<Keyring>;

/// How often a keys file is looked at for changes.
pub const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Follows the keys file at `path` while `keyring` lives: a change (its
/// modification time or length) is read and swapped in; a file that does
/// not read or parse leaves the keys as they were, and says so.
pub async fn watch(path: PathBuf, keyring: std::sync::Weak<LiveKeyring>) {
    let stamp = |path: &Path| {
        std::fs::metadata(path)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut seen = stamp(&path);
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        let Some(live) = keyring.upgrade() else {
            return;
        };
        let now = stamp(&path);
        if now == seen {
            continue;
        }
        seen = now;
        match Keyring::load(&path) {
            Ok(ring) => {
                tracing::info!(
                    keys = ring.len(),
                    "{} changed: keys reloaded",
                    path.display()
                );
                live.store(Arc::new(ring));
            }
            Err(e) => tracing::warn!(
                "{} changed but cannot be read ({e}): the keys stay as they were",
                path.display()
            ),
        }
    }
}

/// The prefix every key starts with, so one found in a log or a repository
/// is recognisable.
pub const KEY_PREFIX: &str = "hyp_";

/// Random bytes in a key.
const KEY_BYTES: usize = 24;

/// Presented keys longer than this are refused without a look.
const MAX_KEY_LEN: usize = 256;

impl Keyring {
    /// The tenant `key` belongs to.
    pub fn find(&self, key: &[u8]) -> Option<&Arc<Tenant>> {
        if key.len() > MAX_KEY_LEN {
            return None;
        }
        self.by_digest.get(&digest(key))
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// Every key's tenant, by name.
    pub fn tenants(&self) -> Vec<Arc<Tenant>> {
        let mut all: Vec<Arc<Tenant>> = self.by_digest.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// The keyring of a keys file's text.
    pub fn parse(text: &str) -> Result<Keyring, String> {
        let file: KeysFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut by_digest =
            HashMap::with_capacity_and_hasher(file.key.len(), DigestHash::default());
        for k in file.key {
            let d = parse_digest(&k.digest)
                .ok_or_else(|| format!("key `{}`: digest is not 64 hex digits", k.name))?;
            let tenant = Tenant {
                name: Arc::from(k.name.as_str()),
                tier: k.tier.as_deref().map(Arc::from),
            };
            if by_digest.insert(d, Arc::new(tenant)).is_some() {
                return Err(format!("key `{}` is listed twice", k.name));
            }
        }
        Ok(Keyring { by_digest })
    }

    /// The keyring of the file at `path`; none yet is an empty one (every
    /// request on a route that requires a key is then refused).
    pub fn load(path: &Path) -> Result<Keyring, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => Keyring::parse(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Keyring::default()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// The key a request presents, if any: the first of `KEY_HEADERS` it has
/// (a `Bearer` token for `Authorization`).
pub fn presented(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.as_bytes();
        let token = v
            .get(..7)
            .filter(|scheme| scheme.eq_ignore_ascii_case(b"bearer "))
            .map(|_| v[7..].trim_ascii());
        return token.filter(|t| !t.is_empty());
    }
    KEY_HEADERS[1..]
        .iter()
        .find_map(|name| headers.get(name))
        .map(|v| v.as_bytes().trim_ascii())
        .filter(|t| !t.is_empty())
}

/// Removes the headers a key may come in, and `also`, in one pass over
/// the request's fields (most are absent: a removal by name would hash
/// each one).
pub fn strip_key_headers(headers: &mut HeaderMap, also: &HeaderName) {
    let mut found: [Option<&HeaderName>; 4] = [None; 4];
    let mut n = 0;
    for name in headers.keys() {
        if let Some(k) = KEY_HEADERS.iter().chain([also]).find(|k| *k == name) {
            if n < found.len() && !found[..n].contains(&Some(k)) {
                found[n] = Some(k);
                n += 1;
            }
        }
    }
    for name in found.into_iter().flatten() {
        headers.remove(name);
    }
}

/// A key's digest, as the keys file keeps it.
pub fn digest(key: &[u8]) -> [u8; 32] {
    // The context's own hashing is done once: every request's key is
    // digested, and it would double the work.
    static CONTEXT: std::sync::LazyLock<blake3::Hasher> = std::sync::LazyLock::new(|| {
        blake3::Hasher::new_derive_key("hyperion 2026 api key digest v1")
    });
    *CONTEXT.clone().update(key).finalize().as_bytes()
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.strip_prefix("blake3:").unwrap_or(hex);
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A new key: the prefix and 192 random bits, in hex.
pub fn new_key() -> Result<String, String> {
    let mut bytes = [0u8; KEY_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness from the system: {e}"))?;
    let mut key = String::with_capacity(KEY_PREFIX.len() + 2 * KEY_BYTES);
    key.push_str(KEY_PREFIX);
    for b in bytes {
        key.push_str(&format!("{b:02x}"));
    }
    Ok(key)
}

/// The keys file as written: `[[key]]` tables of name, tier, digest and
/// when it was made.
#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    key: Vec<KeyEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    tier: Option<String>,
    digest: String,
    created: String,
}

/// One key as `hyperion keys list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    pub tier: Option<String>,
    pub created: String,
}

/// The keys file at a path, for `hyperion keys`.
pub struct KeysFileAt(pub PathBuf);

impl KeysFileAt {
    fn read(&self) -> Result<KeysFile, String> {
        match std::fs::read_to_string(&self.0) {
            Ok(text) => toml::from_str(&text).map_err(|e| format!("{}: {e}", self.0.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(KeysFile::default()),
            Err(e) => Err(format!("{}: {e}", self.0.display())),
        }
    }

    /// Written whole to a temporary file beside it, then renamed over it:
    /// a proxy reading it sees the old file or the new one, never half.
    /// Readable by its owner only.
    fn write(&self, file: &KeysFile) -> Result<(), String> {
        let text = format!(
            "# Hyperion API keys: digests only (`hyperion keys add|list|revoke`).\n{}",
            toml::to_string(file).map_err(|e| e.to_string())?
        );
        let tmp = self.0.with_extension("tmp");
        let io = |e: std::io::Error| format!("{}: {e}", tmp.display());
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io)?;
            f.write_all(text.as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &self.0).map_err(|e| format!("{}: {e}", self.0.display()))
    }

    /// Makes a key for `name`, keeps its digest, and returns the key (the
    /// only time it is seen).
    pub fn add(&self, name: &str, tier: Option<&str>) -> Result<String, String> {
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(format!(
                "`{name}` is not a key name: use 1 to 64 letters, digits, '-', '_' or '.'"
            ));
        }
        let mut file = self.read()?;
        if file.key.iter().any(|k| k.name == name) {
            return Err(format!(
                "a key named `{name}` exists: revoke it first, or choose another name"
            ));
        }
        let key = new_key()?;
        let d = digest(key.as_bytes());
        file.key.push(KeyEntry {
            name: name.to_owned(),
            tier: tier.map(str::to_owned),
            digest: d.iter().map(|b| format!("{b:02x}")).collect(),
            created: httpdate::fmt_http_date(std::time::SystemTime::now()),
        });
        self.write(&file)?;
        Ok(key)
    }

    /// Removes the key named `name`.
    pub fn revoke(&self, name: &str) -> Result<(), String> {
        let mut file = self.read()?;
        let before = file.key.len();
        file.key.retain(|k| k.name != name);
        if file.key.len() == before {
            return Err(format!("no key named `{name}`"));
        }
        self.write(&file)
    }

    pub fn list(&self) -> Result<Vec<Listed>, String> {
        Ok(self
            .read()?
            .key
            .into_iter()
            .map(|k| Listed {
                name: k.name,
                tier: k.tier,
                created: k.created,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_headers_go_in_one_pass_and_others_stay() {
        let also = HeaderName::from_static("x-hyperion-priority");
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer k".parse().unwrap());
        h.append("x-api-key", "k".parse().unwrap());
        h.append("x-api-key", "k2".parse().unwrap());
        h.insert("x-hyperion-priority", "batch".parse().unwrap());
        h.insert("content-type", "application/json".parse().unwrap());
        strip_key_headers(&mut h, &also);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("content-type"));
        let mut none = HeaderMap::new();
        strip_key_headers(&mut none, &also);
        assert!(none.is_empty());
    }
    use http::HeaderValue;

    #[test]
    fn keys_are_found_by_digest_and_only_the_digest_is_kept() {
        let dir = std::env::temp_dir().join(format!("hyperion-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = KeysFileAt(dir.join("keys.toml"));
        let _ = std::fs::remove_file(&file.0);
        let key = file.add("alice", Some("pro")).unwrap();
        assert!(key.starts_with(KEY_PREFIX) && key.len() == 4 + 48, "{key}");
        let text = std::fs::read_to_string(&file.0).unwrap();
        assert!(!text.contains(&key[4..]), "the key itself is never written");
        let ring = Keyring::parse(&text).unwrap();
        let t = ring.find(key.as_bytes()).unwrap();
        assert_eq!((&*t.name, t.tier.as_deref()), ("alice", Some("pro")));
        assert!(ring.find(b"hyp_000").is_none());
        assert!(file.add("alice", None).is_err(), "names are unique");
        assert!(file.add("bad name", None).is_err());
        let other = file.add("bob", None).unwrap();
        assert_ne!(key, other);
        file.revoke("alice").unwrap();
        let ring = Keyring::load(&file.0).unwrap();
        assert!(ring.find(key.as_bytes()).is_none());
        assert!(ring.find(other.as_bytes()).is_some());
        assert_eq!(file.list().unwrap().len(), 1);
        assert!(file.revoke("alice").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_key_is_read_from_the_headers_the_official_clients_send() {
        let with = |name: &'static str, v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_static(v));
            h
        };
        assert_eq!(
            presented(&with("authorization", "Bearer hyp_1")),
            Some(&b"hyp_1"[..])
        );
        assert_eq!(
            presented(&with("authorization", "bearer  hyp_1 ")),
            Some(&b"hyp_1"[..])
        );
        assert_eq!(presented(&with("authorization", "Basic eHl6")), None);
        assert_eq!(presented(&with("authorization", "Bearer ")), None);
        assert_eq!(presented(&with("x-api-key", "hyp_2")), Some(&b"hyp_2"[..]));
        assert_eq!(presented(&with("api-key", "hyp_3")), Some(&b"hyp_3"[..]));
        assert_eq!(presented(&HeaderMap::new()), None);
    }
}
