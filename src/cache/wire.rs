//! The stored form of an entry outside this process (the shared tier): a
//! versioned binary layout, written by `encode` and read back by `decode`.
//!
//! Layout v1, little-endian: `HYPE`, version (u16); stored-at as wall-clock
//! nanoseconds since the epoch (an `Instant` means nothing to another
//! process); initial age, freshness, stale-while-revalidate and
//! stale-if-error in microseconds; flags; status; key; cost; route and
//! target; headers; the vary values; the body, whole or as recorded chunks.
//! Every length is checked against the bytes left before anything is
//! allocated, so a corrupt or hostile value costs nothing. A value of
//! another version is `WireError::Version`: ignored by the reader, never
//! misread. A key whose responses vary is stored as a `Varies` record
//! (`HYPV`, version, how long to keep it, route, target, the header names):
//! what selects the variant key. Copies in other codings are not carried: each instance makes
//! its own when a client asks. Where values are kept, and for how long, is
//! the tier's business; this module only turns entries into bytes and back.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;

use super::recoded::Recodings;
use super::{CacheKey, Cost, Entry, StoredBody, Varies};

const MAGIC: &[u8; 4] = b"HYPE";
const VARIES_MAGIC: &[u8; 4] = b"HYPV";
/// Bumped whenever the layout changes: readers skip other versions.
pub const VERSION: u16 = 1;

const FORBIDS_STALE: u8 = 1;
const OWN_ETAG: u8 = 2;

/// Why stored bytes are not an entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("not a Hyperion entry")]
    NotAnEntry,
    #[error("an entry of format version {0}; this build reads version {VERSION}")]
    Version(u16),
    #[error("the entry stops short")]
    Truncated,
    #[error("the entry holds an invalid {0}")]
    Invalid(&'static str),
}

/// `entry` as bytes.
pub fn encode(entry: &Entry) -> Bytes {
    let body_len = entry.body.len();
    let mut out = BytesMut::with_capacity(256 + body_len + entry.headers.len() * 48);
    out.put_slice(MAGIC);
    out.put_u16_le(VERSION);
    // The wall-clock time it was stored: now, less how long ago that was.
    let stored = crate::clock::wall()
        .checked_sub(entry.stored_at.elapsed())
        .unwrap_or(UNIX_EPOCH)
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    out.put_u64_le(u64::try_from(stored.as_nanos()).unwrap_or(u64::MAX));
    for d in [
        entry.initial_age,
        entry.fresh_for,
        entry.stale_while_revalidate,
        entry.stale_if_error,
    ] {
        out.put_u64_le(micros(d));
    }
    let mut flags = 0;
    if entry.forbids_stale {
        flags |= FORBIDS_STALE;
    }
    if entry.own_etag {
        flags |= OWN_ETAG;
    }
    out.put_u8(flags);
    out.put_u16_le(entry.status.as_u16());
    out.put_slice(&entry.key.0);
    out.put_u64_le(entry.cost.tokens);
    out.put_u64_le(micros(entry.cost.upstream));
    put_bytes(&mut out, entry.route.as_bytes());
    put_bytes(&mut out, entry.target.as_bytes());
    out.put_u32_le(entry.headers.len() as u32);
    for (name, value) in &entry.headers {
        put_bytes(&mut out, name.as_str().as_bytes());
        put_bytes(&mut out, value.as_bytes());
    }
    out.put_u32_le(entry.vary.len() as u32);
    for (name, value) in &entry.vary {
        put_bytes(&mut out, name.as_str().as_bytes());
        match value {
            Some(v) => {
                out.put_u8(1);
                put_bytes(&mut out, v.as_bytes());
            }
            None => out.put_u8(0),
        }
    }
    match &entry.body {
        StoredBody::Whole(b) => {
            out.put_u8(0);
            put_bytes(&mut out, b);
        }
        StoredBody::Chunks(chunks) => {
            out.put_u8(1);
            out.put_u32_le(chunks.len() as u32);
            for c in chunks.iter() {
                put_bytes(&mut out, c);
            }
        }
    }
    out.freeze()
}

/// The entry `bytes` hold. Its body shares `bytes`' memory.
pub fn decode(bytes: &Bytes) -> Result<Entry, WireError> {
    let mut r = Reader { bytes, at: 0 };
    if r.take(4).map_err(|_| WireError::NotAnEntry)? != MAGIC {
        return Err(WireError::NotAnEntry);
    }
    let version = r.u16()?;
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let stored_wall = UNIX_EPOCH + Duration::from_nanos(r.u64()?);
    // As long ago here as it was there (a clock ahead of ours: just now).
    let ago = crate::clock::wall()
        .duration_since(stored_wall)
        .unwrap_or_default();
    let now = crate::clock::now_std();
    let stored_at = now.checked_sub(ago).unwrap_or(now);
    let initial_age = r.duration()?;
    let fresh_for = r.duration()?;
    let stale_while_revalidate = r.duration()?;
    let stale_if_error = r.duration()?;
    let flags = r.u8()?;
    let status = StatusCode::from_u16(r.u16()?).map_err(|_| WireError::Invalid("status"))?;
    let mut key = [0u8; 32];
    key.copy_from_slice(r.take(32)?);
    let cost = Cost {
        tokens: r.u64()?,
        upstream: r.duration()?,
    };
    let route: Arc<str> = Arc::from(r.str("route")?);
    let target: Box<str> = Box::from(r.str("target")?);
    let count = r.count(4)?;
    let mut headers = HeaderMap::with_capacity(count);
    for _ in 0..count {
        let name = r.header_name()?;
        let value =
            HeaderValue::from_bytes(r.bytes()?).map_err(|_| WireError::Invalid("header value"))?;
        headers.append(name, value);
    }
    let count = r.count(5)?;
    let mut vary = Vec::with_capacity(count);
    for _ in 0..count {
        let name = r.header_name()?;
        let value = match r.u8()? {
            0 => None,
            1 => Some(
                HeaderValue::from_bytes(r.bytes()?)
                    .map_err(|_| WireError::Invalid("vary value"))?,
            ),
            _ => return Err(WireError::Invalid("vary value")),
        };
        vary.push((name, value));
    }
    let body = match r.u8()? {
        0 => StoredBody::Whole(r.shared()?),
        1 => {
            let count = r.count(4)?;
            let mut chunks = Vec::with_capacity(count);
            for _ in 0..count {
                chunks.push(r.shared()?);
            }
            StoredBody::Chunks(chunks.into())
        }
        _ => return Err(WireError::Invalid("body kind")),
    };
    if r.at != bytes.len() {
        return Err(WireError::Invalid("length: bytes after the body"));
    }
    Ok(Entry {
        status,
        headers,
        body,
        stored_at,
        initial_age,
        fresh_for,
        stale_while_revalidate,
        stale_if_error,
        forbids_stale: flags & FORBIDS_STALE != 0,
        vary,
        route,
        target,
        cost,
        own_etag: flags & OWN_ETAG != 0,
        key: CacheKey(key),
        recodings: Recodings::default(),
    })
}

/// `varies` (the names a key's responses vary on: what another process
/// needs to find the variant a request selects) as bytes.
pub(super) fn encode_varies(varies: &Varies) -> Bytes {
    let mut out = BytesMut::with_capacity(64 + varies.target.len() + varies.names.len() * 24);
    out.put_slice(VARIES_MAGIC);
    out.put_u16_le(VERSION);
    out.put_u64_le(micros(varies.keep));
    put_bytes(&mut out, varies.route.as_bytes());
    put_bytes(&mut out, varies.target.as_bytes());
    out.put_u32_le(varies.names.len() as u32);
    for n in varies.names.iter() {
        put_bytes(&mut out, n.as_str().as_bytes());
    }
    out.freeze()
}

/// What stored bytes hold: an entry or the names a key varies on.
// Decoded once per read and turned into an `Arc` at once: boxing would only
// add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(super) enum Decoded {
    Entry(Entry),
    Varies(Varies),
}

/// An entry or a `Varies` record, whichever `bytes` hold.
pub(super) fn decode_any(bytes: &Bytes) -> Result<Decoded, WireError> {
    if bytes.get(..4) != Some(&VARIES_MAGIC[..]) {
        return decode(bytes).map(Decoded::Entry);
    }
    let mut r = Reader { bytes, at: 4 };
    let version = r.u16()?;
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let keep = r.duration()?;
    let route: Arc<str> = Arc::from(r.str("route")?);
    let target: Box<str> = Box::from(r.str("target")?);
    let count = r.count(5)?;
    let mut names = Vec::with_capacity(count);
    for _ in 0..count {
        names.push(r.header_name()?);
    }
    if r.at != bytes.len() || names.is_empty() {
        return Err(WireError::Invalid("varies record"));
    }
    Ok(Decoded::Varies(Varies {
        names: names.into(),
        route,
        target,
        keep,
    }))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    out.put_u32_le(u32::try_from(b.len()).expect("entries are far below 4 GB"));
    out.put_slice(b);
}

struct Reader<'a> {
    bytes: &'a Bytes,
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.at.checked_add(n).ok_or(WireError::Truncated)?;
        let slice = self.bytes.get(self.at..end).ok_or(WireError::Truncated)?;
        self.at = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn duration(&mut self) -> Result<Duration, WireError> {
        Ok(Duration::from_micros(self.u64()?))
    }

    /// A count of items at least `min_each` bytes long each: one that
    /// cannot fit in what is left is refused before anything is allocated.
    fn count(&mut self, min_each: usize) -> Result<usize, WireError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_each) > self.bytes.len() - self.at {
            return Err(WireError::Truncated);
        }
        Ok(n)
    }

    fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    /// Like `bytes`, sharing the buffer instead of copying.
    fn shared(&mut self) -> Result<Bytes, WireError> {
        let n = self.u32()? as usize;
        let start = self.at;
        self.take(n)?;
        Ok(self.bytes.slice(start..start + n))
    }

    fn str(&mut self, what: &'static str) -> Result<&'a str, WireError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| WireError::Invalid(what))
    }

    fn header_name(&mut self) -> Result<HeaderName, WireError> {
        HeaderName::from_bytes(self.bytes()?).map_err(|_| WireError::Invalid("header name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn sample(body: StoredBody) -> Entry {
        let mut headers = HeaderMap::new();
        headers.insert(
            "content-type",
            HeaderValue::from_static("application/x-ndjson"),
        );
        headers.append("set-cookie", HeaderValue::from_static("a=1"));
        headers.append("set-cookie", HeaderValue::from_static("b=2"));
        headers.insert("etag", HeaderValue::from_static("\"abc\""));
        Entry {
            status: StatusCode::NON_AUTHORITATIVE_INFORMATION,
            headers,
            body,
            stored_at: Instant::now() - Duration::from_secs(30),
            initial_age: Duration::from_secs(5),
            fresh_for: Duration::from_secs(600),
            stale_while_revalidate: Duration::from_secs(60),
            stale_if_error: Duration::from_secs(3600),
            forbids_stale: true,
            vary: vec![
                (
                    HeaderName::from_static("accept-language"),
                    Some(HeaderValue::from_static("fr")),
                ),
                (HeaderName::from_static("x-user"), None),
            ],
            route: "generate".into(),
            target: "ollama.internal/api/generate".into(),
            cost: Cost {
                tokens: 1234,
                upstream: Duration::from_millis(2500),
            },
            own_etag: true,
            key: CacheKey([7; 32]),
            recodings: Recodings::default(),
        }
    }

    fn assert_same(a: &Entry, b: &Entry) {
        assert_eq!(a.status, b.status);
        assert_eq!(a.headers, b.headers);
        assert_eq!(a.body.len(), b.body.len());
        match (&a.body, &b.body) {
            (StoredBody::Whole(x), StoredBody::Whole(y)) => assert_eq!(x, y),
            (StoredBody::Chunks(x), StoredBody::Chunks(y)) => assert_eq!(x, y),
            _ => panic!("body kinds differ"),
        }
        for (x, y) in [
            (a.initial_age, b.initial_age),
            (a.fresh_for, b.fresh_for),
            (a.stale_while_revalidate, b.stale_while_revalidate),
            (a.stale_if_error, b.stale_if_error),
            (a.cost.upstream, b.cost.upstream),
        ] {
            assert_eq!(x, y);
        }
        // The age carries over (to the clock's and encoding's precision).
        let (x, y) = (a.stored_at.elapsed(), b.stored_at.elapsed());
        assert!(x.abs_diff(y) < Duration::from_millis(50), "{x:?} vs {y:?}");
        assert_eq!(
            (
                a.forbids_stale,
                a.own_etag,
                a.cost.tokens,
                &a.route,
                &a.target,
                a.key,
                &a.vary
            ),
            (
                b.forbids_stale,
                b.own_etag,
                b.cost.tokens,
                &b.route,
                &b.target,
                b.key,
                &b.vary
            )
        );
    }

    #[test]
    fn entries_come_back_as_they_went() {
        for body in [
            StoredBody::Whole(Bytes::from_static(b"{\"response\":\"hi\"}")),
            StoredBody::split(&Bytes::from_static(b"{\"a\":1}\n{\"b\":2}\n"), [8, 16]),
            StoredBody::Whole(Bytes::new()),
        ] {
            let entry = sample(body);
            let bytes = encode(&entry);
            assert_same(&entry, &decode(&bytes).unwrap());
        }
    }

    #[test]
    fn other_versions_and_other_values_are_refused_not_misread() {
        let bytes = encode(&sample(StoredBody::Whole(Bytes::from_static(b"x"))));
        let mut next = bytes.to_vec();
        next[4..6].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(
            decode(&Bytes::from(next)).unwrap_err(),
            WireError::Version(2)
        );
        assert_eq!(
            decode(&Bytes::from_static(b"{\"json\":1}")).unwrap_err(),
            WireError::NotAnEntry
        );
        assert_eq!(decode(&Bytes::new()).unwrap_err(), WireError::NotAnEntry);
    }

    #[test]
    fn varies_records_come_back_and_cuts_fail() {
        let v = Varies {
            names: vec![
                HeaderName::from_static("accept-language"),
                HeaderName::from_static("x-user"),
            ]
            .into(),
            route: "r".into(),
            target: "h/p?q".into(),
            keep: Duration::from_secs(90),
        };
        let bytes = encode_varies(&v);
        match decode_any(&bytes).unwrap() {
            Decoded::Varies(back) => assert_eq!(back, v),
            Decoded::Entry(_) => panic!("an entry"),
        }
        for cut in 0..bytes.len() {
            assert!(decode_any(&bytes.slice(..cut)).is_err(), "cut at {cut}");
        }
        let entry = encode(&sample(StoredBody::Whole(Bytes::from_static(b"x"))));
        assert!(matches!(decode_any(&entry), Ok(Decoded::Entry(_))));
    }

    #[test]
    fn every_cut_and_a_huge_length_fail_cleanly() {
        let bytes = encode(&sample(StoredBody::split(
            &Bytes::from_static(b"one\ntwo\n"),
            [4, 8],
        )));
        for cut in 0..bytes.len() {
            assert!(decode(&bytes.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut extra = bytes.to_vec();
        extra.push(0);
        assert!(decode(&Bytes::from(extra)).is_err());
        // The header count claims four billion headers: refused at once.
        let mut huge = bytes.to_vec();
        let at = 4
            + 2
            + 8
            + 32
            + 1
            + 2
            + 32
            + 16
            + 4
            + "generate".len()
            + 4
            + "ollama.internal/api/generate".len();
        huge[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode(&Bytes::from(huge)).unwrap_err(),
            WireError::Truncated
        );
    }
}
