//! Content codings on the way out: which one a client gets
//! (`Accept-Encoding`, RFC 9110 §12.5.3).
//!
//! This module owns the negotiation (codings by q-value, the policy's order
//! among equal ones, `identity` and `*` as the RFC reads them), which
//! responses are compressed or decoded (`Treatment`), and the coder that
//! does it as a body passes, flushing after each chunk when the body is a
//! stream. The copies a stored entry keeps in other codings are held by
//! `cache::recoded`; this module only says how to make them.

use std::io::Write;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

use std::sync::Arc;

use crate::body::ResponseBody;
use crate::cache::{Cache, CacheControl, Entry, Form, Recoded, StoredBody};
use crate::error::ProxyError;
use crate::policy::CompressionPolicy;

/// A content coding Hyperion can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Coding {
    Br,
    Gzip,
}

impl Coding {
    pub fn as_str(self) -> &'static str {
        match self {
            Coding::Br => "br",
            Coding::Gzip => "gzip",
        }
    }

    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(self.as_str())
    }
}

/// What the client may be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// This coding, the client's favourite among those offered.
    Encode(Coding),
    /// No coding (none offered is acceptable, or none was asked for).
    Identity,
    /// Nothing acceptable: every offered coding and `identity` are refused.
    NotAcceptable,
}

/// Picks the coding for a client that sent `headers`, among `offered` in
/// the policy's order of preference. The highest q-value wins; the policy's
/// order breaks ties. Without `Accept-Encoding` the answer is identity:
/// the RFC would allow any coding, but clients that send none (curl, most
/// scripts) rarely decode one.
pub fn negotiate(headers: &HeaderMap, offered: &[Coding]) -> Choice {
    if !headers.contains_key(header::ACCEPT_ENCODING) {
        return Choice::Identity;
    }
    let mut star: Option<u16> = None;
    let mut identity: Option<u16> = None;
    let mut q_of = [None::<u16>; 2];
    for (name, q) in elements(headers) {
        let slot = if name.eq_ignore_ascii_case(b"*") {
            &mut star
        } else if name.eq_ignore_ascii_case(b"identity") {
            &mut identity
        } else if name.eq_ignore_ascii_case(b"br") {
            &mut q_of[0]
        } else if name.eq_ignore_ascii_case(b"gzip") || name.eq_ignore_ascii_case(b"x-gzip") {
            &mut q_of[1]
        } else {
            continue;
        };
        // Listed twice: the more generous reading.
        *slot = Some(slot.map_or(q, |old| old.max(q)));
    }
    let q = |c: Coding| {
        let listed = match c {
            Coding::Br => q_of[0],
            Coding::Gzip => q_of[1],
        };
        listed.or(star).unwrap_or(0)
    };
    let mut best: Option<(Coding, u16)> = None;
    for &c in offered {
        let cq = q(c);
        if cq > 0 && best.is_none_or(|(_, bq)| cq > bq) {
            best = Some((c, cq));
        }
    }
    if let Some((c, _)) = best {
        return Choice::Encode(c);
    }
    // identity is acceptable unless refused by name, or by `*;q=0` without
    // its own entry (§12.5.3).
    match identity.or(star) {
        Some(0) => Choice::NotAcceptable,
        _ => Choice::Identity,
    }
}

/// What Hyperion does about a response's content coding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Treatment {
    /// Worth compressing: sent in the coding the client prefers.
    Compress,
    /// Encoded by the upstream in a coding Hyperion can undo: decoded for
    /// clients that do not take it.
    Decode(Decoding),
    /// Left as it is.
    AsIs,
}

/// A coding an upstream may have applied that Hyperion can undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoding {
    Br,
    Gzip,
    /// RFC 9110 §8.4.1.2: the zlib format.
    Deflate,
}

impl Decoding {
    fn parse(name: &[u8]) -> Option<Self> {
        if name.eq_ignore_ascii_case(b"gzip") || name.eq_ignore_ascii_case(b"x-gzip") {
            Some(Decoding::Gzip)
        } else if name.eq_ignore_ascii_case(b"br") {
            Some(Decoding::Br)
        } else if name.eq_ignore_ascii_case(b"deflate") {
            Some(Decoding::Deflate)
        } else {
            None
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Decoding::Br => "br",
            Decoding::Gzip => "gzip",
            Decoding::Deflate => "deflate",
        }
    }
}

/// How a response with `status` and `headers` is treated under `policy`.
pub fn treatment(policy: &CompressionPolicy, status: StatusCode, headers: &HeaderMap) -> Treatment {
    if status.is_informational()
        || matches!(
            status,
            StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED | StatusCode::PARTIAL_CONTENT
        )
        || headers.contains_key(header::CONTENT_RANGE)
    {
        return Treatment::AsIs;
    }
    let mut codings = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case(b"identity"));
    let (first, more) = (codings.next(), codings.next().is_some());
    // Changing the coding is a transformation (RFC 9110 §7.7).
    if CacheControl::parse(headers).no_transform {
        return Treatment::AsIs;
    }
    match (first, more) {
        (None, _) if worth_compressing(policy, headers) => Treatment::Compress,
        // Several codings stacked: rare enough to pass as they are.
        (Some(c), false) => Decoding::parse(c).map_or(Treatment::AsIs, Treatment::Decode),
        _ => Treatment::AsIs,
    }
}

/// A listed type, and not known to be smaller than `min_size`.
fn worth_compressing(policy: &CompressionPolicy, headers: &HeaderMap) -> bool {
    let Some(media) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|ct| ct.split(';').next().unwrap_or("").trim())
    else {
        return false;
    };
    let listed = policy
        .content_types
        .iter()
        .any(|t| match t.strip_suffix("/*") {
            Some(ty) => media
                .split_once('/')
                .is_some_and(|(mt, _)| mt.eq_ignore_ascii_case(ty)),
            None => t.eq_ignore_ascii_case(media),
        });
    listed && content_length(headers).is_none_or(|n| n >= policy.min_size)
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// Puts one response on its way to a client whose request carried `accept`
/// (its `Accept-Encoding` lines) in a coding that client takes: compressed
/// when worth it, decoded when the upstream's coding is not taken.
///
/// A response built from a stored entry gets the entry's copy in that
/// coding, made on the first request that needs it and kept with the entry
/// (`Cache::recoded`): hits never run a compressor. Anything else is
/// recoded as it streams, flushed after each chunk for NDJSON and SSE so
/// every event can be decoded on arrival.
pub async fn encode_response(
    policy: &CompressionPolicy,
    accept: &HeaderMap,
    head_only: bool,
    cache: &Cache,
    resp: &mut Response<ResponseBody>,
) -> Result<(), ProxyError> {
    let entry = resp.body().entry().cloned();
    let treatment = match &entry {
        Some(e) => e
            .recodings
            .treatment(|| treatment(policy, e.status, &e.headers)),
        None => treatment(policy, resp.status(), resp.headers()),
    };
    match treatment {
        Treatment::AsIs => Ok(()),
        Treatment::Compress => compress(policy, accept, head_only, cache, entry, resp).await,
        Treatment::Decode(d) => decode(accept, head_only, cache, entry, d, resp).await,
    }
}

async fn compress(
    policy: &CompressionPolicy,
    accept: &HeaderMap,
    head_only: bool,
    cache: &Cache,
    entry: Option<Arc<Entry>>,
    resp: &mut Response<ResponseBody>,
) -> Result<(), ProxyError> {
    add_vary_accept_encoding(resp.headers_mut());
    let coding = match negotiate(accept, &policy.algorithms) {
        Choice::Identity => return Ok(()),
        Choice::NotAcceptable => return Err(ProxyError::NotAcceptable),
        Choice::Encode(c) => c,
    };
    let level = policy.level(coding);
    if resp.status() == StatusCode::NOT_MODIFIED {
        // The validator of the representation this client holds.
        weaken_etag(resp.headers_mut());
        return Ok(());
    }
    if let Some(entry) = entry {
        match cache.recoded(&entry, Form::Encoded(coding), level).await {
            Some(copy) => {
                serve_copy(resp, &copy, Some(coding.header_value()), head_only);
                return Ok(());
            }
            // Compressing does not make it smaller: identity, unless refused.
            None if negotiate(accept, &[]) != Choice::NotAcceptable => return Ok(()),
            None => {}
        }
    }
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_ENCODING, coding.header_value());
    mark_recoded(headers, None);
    if !head_only {
        let stream = crate::headers::is_event_stream(resp.headers());
        resp.body_mut()
            .transcode(Coder::encoder(coding, level, stream));
    }
    Ok(())
}

async fn decode(
    accept: &HeaderMap,
    head_only: bool,
    cache: &Cache,
    entry: Option<Arc<Entry>>,
    decoding: Decoding,
    resp: &mut Response<ResponseBody>,
) -> Result<(), ProxyError> {
    add_vary_accept_encoding(resp.headers_mut());
    if accepts(accept, decoding) {
        return Ok(());
    }
    if resp.status() == StatusCode::NOT_MODIFIED {
        weaken_etag(resp.headers_mut());
        return Ok(());
    }
    if let Some(entry) = entry {
        let Some(copy) = cache.recoded(&entry, Form::Decoded(decoding), 0).await else {
            // Stored, but it is not what its Content-Encoding says (or
            // decodes past the largest entry): let the upstream try again.
            cache.remove(&entry).await;
            return Err(ProxyError::UndecodableBody {
                coding: decoding.as_str(),
            });
        };
        serve_copy(resp, &copy, None, head_only);
        return Ok(());
    }
    let headers = resp.headers_mut();
    headers.remove(header::CONTENT_ENCODING);
    mark_recoded(headers, None);
    if !head_only {
        resp.body_mut().transcode(Coder::decoder(decoding));
    }
    Ok(())
}

/// Sends a stored entry's `copy` instead of its body: `coding` as its
/// `Content-Encoding` (none: identity), its exact length.
fn serve_copy(
    resp: &mut Response<ResponseBody>,
    copy: &Recoded,
    coding: Option<HeaderValue>,
    head_only: bool,
) {
    let headers = resp.headers_mut();
    match coding {
        Some(c) => headers.insert(header::CONTENT_ENCODING, c),
        None => headers.remove(header::CONTENT_ENCODING),
    };
    mark_recoded(headers, copy.length.clone());
    if !head_only {
        *resp.body_mut() = ResponseBody::stored(&copy.body);
    }
}

/// What changes with the coding: the length (known for stored copies),
/// byte ranges (of the other coding's bytes), and the validator, weakened:
/// equivalent to the identity body, not byte-identical (RFC 9110 §8.8.1).
fn mark_recoded(headers: &mut HeaderMap, length: Option<HeaderValue>) {
    match length {
        Some(n) => headers.insert(header::CONTENT_LENGTH, n),
        None => headers.remove(header::CONTENT_LENGTH),
    };
    headers.remove(header::ACCEPT_RANGES);
    weaken_etag(headers);
}

fn weaken_etag(headers: &mut HeaderMap) {
    if let Some(weak) = headers.get(header::ETAG).and_then(weakened) {
        headers.insert(header::ETAG, weak);
    }
}

/// Whether the client takes `decoding` (named, or through `*`). A client
/// that sends no `Accept-Encoding` is treated as taking none, as in
/// `negotiate`.
fn accepts(headers: &HeaderMap, decoding: Decoding) -> bool {
    let (mut named, mut star) = (None::<u16>, None::<u16>);
    for (name, q) in elements(headers) {
        let slot = if Decoding::parse(name) == Some(decoding) {
            &mut named
        } else if name == b"*" {
            &mut star
        } else {
            continue;
        };
        *slot = Some(slot.map_or(q, |old| old.max(q)));
    }
    named.or(star).is_some_and(|q| q > 0)
}

fn add_vary_accept_encoding(headers: &mut HeaderMap) {
    let listed = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|n| {
            let n = n.trim();
            n == "*" || n.eq_ignore_ascii_case("accept-encoding")
        });
    if !listed {
        headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
}

/// `W/"x"` for a strong `"x"`; `None` when already weak or malformed.
fn weakened(etag: &HeaderValue) -> Option<HeaderValue> {
    let b = etag.as_bytes();
    if b.starts_with(b"W/") || !b.starts_with(b"\"") {
        return None;
    }
    let mut weak = Vec::with_capacity(b.len() + 2);
    weak.extend_from_slice(b"W/");
    weak.extend_from_slice(b);
    HeaderValue::from_bytes(&weak).ok()
}

/// A stored body in another coding: the whole body at once, or a recorded
/// stream chunk by chunk (each flushed, so a replay still streams). `None`
/// when it cannot be done: compressing does not shrink it, it does not
/// decode, or decoded it would be larger than `limit`.
pub fn recode(form: Form, level: u32, body: &StoredBody, limit: u64) -> Option<StoredBody> {
    let (mut coder, whole) = match (form, body) {
        (Form::Encoded(c), StoredBody::Whole(b)) => {
            return Coder::whole(c, level, b)
                .ok()
                .filter(|out| out.len() < b.len())
                .map(StoredBody::Whole);
        }
        (Form::Encoded(c), StoredBody::Chunks(_)) => (Coder::encoder(c, level, true), false),
        (Form::Decoded(d), StoredBody::Whole(_)) => (Coder::decoder(d), true),
        (Form::Decoded(d), StoredBody::Chunks(_)) => (Coder::decoder(d), false),
    };
    let input: &[Bytes] = match body {
        StoredBody::Whole(b) => std::slice::from_ref(b),
        StoredBody::Chunks(c) => c,
    };
    let mut out = Vec::with_capacity(input.len());
    let mut total = 0u64;
    for chunk in input {
        let piece = coder.push(chunk).ok()?;
        total += piece.len() as u64;
        if total > limit {
            return None;
        }
        if !piece.is_empty() {
            out.push(piece);
        }
    }
    let tail = coder.finish().ok()?;
    total += tail.len() as u64;
    if total > limit {
        return None;
    }
    if !tail.is_empty() {
        out.push(tail);
    }
    if matches!(form, Form::Encoded(_)) && total >= body.len() as u64 {
        return None;
    }
    Some(if whole {
        let mut all = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        for piece in &out {
            all.extend_from_slice(piece);
        }
        StoredBody::Whole(all.into())
    } else {
        StoredBody::Chunks(out.into())
    })
}

/// A body's compressor or decompressor, fed chunk by chunk.
pub struct Coder {
    kind: CoderKind,
    /// Flush after every chunk, so each one can be decoded on arrival
    /// (NDJSON, SSE); otherwise the compressor keeps what it needs.
    flush_each: bool,
}

enum CoderKind {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Br(Box<brotli::CompressorWriter<Vec<u8>>>),
    Gunzip(flate2::write::GzDecoder<Vec<u8>>),
    Inflate(flate2::write::ZlibDecoder<Vec<u8>>),
    Unbrotli(Box<brotli::DecompressorWriter<Vec<u8>>>),
}

/// Brotli's window: 4 MiB, ample for model answers, small enough per stream.
const BROTLI_LGWIN: u32 = 22;

impl Coder {
    /// Compresses: `level` is gzip 0–9 or brotli quality 0–11 (checked by
    /// the policy).
    pub fn encoder(coding: Coding, level: u32, flush_each: bool) -> Self {
        let kind = match coding {
            Coding::Gzip => CoderKind::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(level),
            )),
            Coding::Br => CoderKind::Br(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                level,
                BROTLI_LGWIN,
            ))),
        };
        Coder { kind, flush_each }
    }

    /// Decompresses, passing on whatever each chunk decodes to at once.
    pub fn decoder(decoding: Decoding) -> Self {
        let kind = match decoding {
            Decoding::Gzip => CoderKind::Gunzip(flate2::write::GzDecoder::new(Vec::new())),
            Decoding::Deflate => CoderKind::Inflate(flate2::write::ZlibDecoder::new(Vec::new())),
            Decoding::Br => {
                CoderKind::Unbrotli(Box::new(brotli::DecompressorWriter::new(Vec::new(), 4096)))
            }
        };
        Coder {
            kind,
            flush_each: true,
        }
    }

    /// Feeds `data`; returns what is ready to send (maybe nothing).
    pub fn push(&mut self, data: &[u8]) -> std::io::Result<Bytes> {
        fn step<W: Write>(w: &mut W, data: &[u8], flush: bool) -> std::io::Result<()> {
            w.write_all(data)?;
            if flush {
                w.flush()?;
            }
            Ok(())
        }
        let flush = self.flush_each;
        let out = match &mut self.kind {
            CoderKind::Gzip(e) => {
                step(e, data, flush)?;
                e.get_mut()
            }
            CoderKind::Br(e) => {
                step(e.as_mut(), data, flush)?;
                e.get_mut()
            }
            CoderKind::Gunzip(d) => {
                step(d, data, flush)?;
                d.get_mut()
            }
            CoderKind::Inflate(d) => {
                step(d, data, flush)?;
                d.get_mut()
            }
            CoderKind::Unbrotli(d) => {
                step(d.as_mut(), data, flush)?;
                d.get_mut()
            }
        };
        Ok(std::mem::take(out).into())
    }

    /// Ends the stream; returns its last bytes. A decoder fails here when
    /// its input stopped short.
    pub fn finish(self) -> std::io::Result<Bytes> {
        let out = match self.kind {
            CoderKind::Gzip(e) => e.finish()?,
            CoderKind::Br(e) => e.into_inner(),
            CoderKind::Gunzip(d) => d.finish()?,
            CoderKind::Inflate(d) => d.finish()?,
            CoderKind::Unbrotli(mut d) => {
                d.close()?;
                d.into_inner().map_err(|_| truncated())?
            }
        };
        Ok(out.into())
    }

    /// Compresses a whole body at once.
    pub fn whole(coding: Coding, level: u32, body: &[u8]) -> std::io::Result<Bytes> {
        let mut e = Coder::encoder(coding, level, false);
        let head = e.push(body)?;
        let tail = e.finish()?;
        if head.is_empty() {
            return Ok(tail);
        }
        let mut out = Vec::with_capacity(head.len() + tail.len());
        out.extend_from_slice(&head);
        out.extend_from_slice(&tail);
        Ok(out.into())
    }
}

fn truncated() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "the encoded body stops short",
    )
}

/// `(coding, q × 1000)` for each well-formed element of every
/// `Accept-Encoding` line; malformed elements are skipped.
fn elements(headers: &HeaderMap) -> impl Iterator<Item = (&[u8], u16)> {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .flat_map(|line| line.as_bytes().split(|&b| b == b','))
        .filter_map(|element| {
            let mut parts = element.split(|&b| b == b';');
            let name = parts.next()?.trim_ascii();
            if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
                return None;
            }
            let mut q = 1000;
            for param in parts {
                let param = param.trim_ascii();
                let (k, v) = match param.iter().position(|&b| b == b'=') {
                    Some(i) => (param[..i].trim_ascii(), param[i + 1..].trim_ascii()),
                    None => return None,
                };
                if k.eq_ignore_ascii_case(b"q") {
                    q = qvalue(v)?;
                }
            }
            Some((name, q))
        })
}

/// RFC 9110 §12.4.2: `0[.ddd]` or `1[.000]`, as thousandths.
fn qvalue(v: &[u8]) -> Option<u16> {
    let (int, frac) = match v.iter().position(|&b| b == b'.') {
        Some(i) => (&v[..i], &v[i + 1..]),
        None => (v, &b""[..]),
    };
    if frac.len() > 3 || !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut thousandths = 0u16;
    for i in 0..3 {
        thousandths = thousandths * 10 + frac.get(i).map_or(0, |d| u16::from(d - b'0'));
    }
    match int {
        b"0" => Some(thousandths),
        b"1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: [Coding; 2] = [Coding::Br, Coding::Gzip];

    fn choose(accept: Option<&str>, offered: &[Coding]) -> Choice {
        let mut h = HeaderMap::new();
        if let Some(a) = accept {
            h.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(a).unwrap());
        }
        negotiate(&h, offered)
    }

    #[test]
    fn q_values_decide_and_the_policy_breaks_ties() {
        use Choice::*;
        use Coding::*;
        for (accept, want) in [
            (Some("gzip, deflate, br"), Encode(Br)),
            (Some("gzip;q=1.0, br;q=0.5"), Encode(Gzip)),
            (Some("br;q=0.2, gzip;q=0.1"), Encode(Br)),
            (Some("GZIP"), Encode(Gzip)),
            (Some("x-gzip"), Encode(Gzip)),
            (Some("deflate"), Identity),
            (Some("*"), Encode(Br)),
            (Some("*;q=0.5, br;q=0"), Encode(Gzip)),
            (Some("br;q=0, gzip;q=0"), Identity),
            (Some(""), Identity),
            (None, Identity),
        ] {
            assert_eq!(choose(accept, &BOTH), want, "{accept:?}");
        }
        assert_eq!(choose(Some("gzip, br"), &[Gzip, Br]), Encode(Gzip));
    }

    #[test]
    fn identity_is_refused_only_by_name_or_by_star() {
        use Choice::*;
        assert_eq!(choose(Some("identity;q=0"), &[]), NotAcceptable);
        assert_eq!(choose(Some("*;q=0"), &BOTH), NotAcceptable);
        assert_eq!(choose(Some("*;q=0, identity"), &BOTH), Identity);
        assert_eq!(
            choose(Some("identity;q=0, gzip"), &BOTH),
            Encode(Coding::Gzip)
        );
        assert_eq!(choose(Some("deflate, identity;q=0"), &BOTH), NotAcceptable);
    }

    fn decode(coding: Coding, bytes: &[u8]) -> Vec<u8> {
        use std::io::Read;
        let mut out = Vec::new();
        match coding {
            Coding::Gzip => {
                flate2::read::GzDecoder::new(bytes)
                    .read_to_end(&mut out)
                    .unwrap();
            }
            Coding::Br => {
                brotli::Decompressor::new(bytes, 4096)
                    .read_to_end(&mut out)
                    .unwrap();
            }
        }
        out
    }

    #[test]
    fn each_flushed_chunk_decodes_on_arrival() {
        for coding in [Coding::Gzip, Coding::Br] {
            let mut e = Coder::encoder(coding, 5, true);
            let mut sent = Vec::new();
            let mut decoded_so_far = Vec::new();
            for i in 0..5 {
                let event = format!("{{\"response\":\"token {i}\",\"done\":false}}\n");
                let out = e.push(event.as_bytes()).unwrap();
                assert!(!out.is_empty(), "{coding:?}: flushed bytes for chunk {i}");
                sent.extend_from_slice(&out);
                // A streaming decoder given what was sent so far sees the
                // whole event already.
                let so_far = partial_decode(coding, &sent);
                decoded_so_far.extend_from_slice(event.as_bytes());
                assert_eq!(so_far, decoded_so_far, "{coding:?} chunk {i}");
            }
            sent.extend_from_slice(&e.finish().unwrap());
            assert_eq!(decode(coding, &sent), decoded_so_far);
        }
    }

    /// Decodes as much of an unfinished stream as it can.
    fn partial_decode(coding: Coding, bytes: &[u8]) -> Vec<u8> {
        use std::io::Read;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        match coding {
            Coding::Gzip => {
                let mut d = flate2::read::GzDecoder::new(bytes);
                while let Ok(n) = d.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    out.extend_from_slice(&buf[..n]);
                }
            }
            Coding::Br => {
                let mut d = brotli::Decompressor::new(bytes, 4096);
                while let Ok(n) = d.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    out.extend_from_slice(&buf[..n]);
                }
            }
        }
        out
    }

    #[test]
    fn whole_bodies_round_trip_and_shrink() {
        let body =
            br#"{"model":"llama3.2","response":"The sky is blue because of Rayleigh scattering."}"#
                .repeat(50);
        for (coding, level) in [(Coding::Gzip, 6), (Coding::Br, 5)] {
            let packed = Coder::whole(coding, level, &body).unwrap();
            assert!(
                packed.len() < body.len() / 5,
                "{coding:?}: {}",
                packed.len()
            );
            assert_eq!(decode(coding, &packed), body);
        }
    }

    #[test]
    fn malformed_elements_are_skipped_not_fatal() {
        use Choice::*;
        for accept in [
            "gzip;q=2, br",
            "gzip;q=0.5000, br",
            "gzip;q=abc, br",
            "gzip;level, br",
            "g zip, br",
            ",,, br ,",
        ] {
            assert_eq!(choose(Some(accept), &BOTH), Encode(Coding::Br), "{accept}");
        }
        assert_eq!(choose(Some(";;;"), &BOTH), Identity);
        assert_eq!(qvalue(b"0.001"), Some(1));
        assert_eq!(qvalue(b"1.000"), Some(1000));
        assert_eq!(qvalue(b"1.001"), None);
        assert_eq!(qvalue(b".5"), None);
    }

    #[test]
    fn stored_copies_are_kept_only_when_sound_and_worth_it() {
        let body = br#"{"response":"The sky is blue."}"#.repeat(100);
        let whole = |b: Vec<u8>| StoredBody::Whole(b.into());
        let gz = Coder::whole(Coding::Gzip, 6, &body).unwrap();
        let limit = 1 << 20;
        let decoded = recode(Form::Decoded(Decoding::Gzip), 0, &whole(gz.to_vec()), limit);
        assert!(matches!(decoded, Some(StoredBody::Whole(b)) if b[..] == body[..]));
        // Stops short, or is not gzip at all.
        let cut = whole(gz[..gz.len() - 6].to_vec());
        assert!(recode(Form::Decoded(Decoding::Gzip), 0, &cut, limit).is_none());
        assert!(recode(
            Form::Decoded(Decoding::Gzip),
            0,
            &whole(body.clone()),
            limit
        )
        .is_none());
        let br = Coder::whole(Coding::Br, 5, &body).unwrap();
        let cut = whole(br[..br.len() / 2].to_vec());
        assert!(recode(Form::Decoded(Decoding::Br), 0, &cut, limit).is_none());
        // Decodes past the limit (a small bomb).
        let zeros = Coder::whole(Coding::Gzip, 9, &vec![0u8; 1 << 20]).unwrap();
        assert!(zeros.len() < 4096);
        assert!(recode(
            Form::Decoded(Decoding::Gzip),
            0,
            &whole(zeros.to_vec()),
            64 * 1024
        )
        .is_none());
        // Compressing random bytes does not shrink them.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(recode(Form::Encoded(Coding::Gzip), 6, &whole(noise), limit).is_none());
    }
}
