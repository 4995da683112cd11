//! Content codings on the way out: which one a client gets
//! (`Accept-Encoding`, RFC 9110 §12.5.3).
//!
//! This module owns the negotiation (codings by q-value, the policy's order
//! among equal ones, `identity` and `*` as the RFC reads them) and which
//! responses are compressed or decoded (`Treatment`), and puts the coder on
//! the body. The coder itself (flushing after each chunk when the body is a
//! stream) is `coding.rs`'s. The copies a stored entry keeps in other codings are held by
//! `cache::recoded`; this module only says how to make them.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

use std::sync::Arc;

use crate::body::ResponseBody;
use crate::cache::{Cache, CacheControl, Entry, Form, Recoded, StoredBody};
use crate::error::ProxyError;
use crate::policy::CompressionPolicy;

pub use crate::coding::{Coder, Coding, Decoding};

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
    for (name, q) in crate::headers::accept_encoding(headers) {
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
    listed && crate::headers::content_length(headers).is_none_or(|n| n >= policy.min_size)
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
    rewritten: bool,
    cache: &Cache,
    resp: &mut Response<ResponseBody>,
) -> Result<(), ProxyError> {
    let entry = resp.body().entry().cloned();
    let not_modified = resp.status() == StatusCode::NOT_MODIFIED;
    let treatment = match &entry {
        // Decided once per entry, from its stored headers; unless the route
        // rewrote them (`no-transform`, another type): then from what the
        // client is sent. A 304 has no type of its own: the entry's counts.
        Some(e) if !rewritten || not_modified => e
            .recodings
            .treatment(|| treatment(policy, e.status, &e.headers)),
        _ => treatment(policy, resp.status(), resp.headers()),
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
    // A 304 carries the validator of what a 200 would have been: the same
    // choices, without a body.
    let not_modified = resp.status() == StatusCode::NOT_MODIFIED;
    let coding = match negotiate(accept, &policy.algorithms) {
        Choice::Identity => return Ok(()),
        Choice::NotAcceptable if not_modified => return Ok(()),
        Choice::NotAcceptable => return Err(ProxyError::NotAcceptable),
        Choice::Encode(c) => c,
    };
    let level = policy.level(coding);
    if let Some(entry) = entry {
        match cache.recoded(&entry, Form::Encoded(coding), level).await {
            Ok(copy) => {
                serve_copy(resp, &copy, Some(coding.header_value()), head_only);
                return Ok(());
            }
            // Compressing does not make it smaller: identity, unless refused.
            Err(_) if negotiate(accept, &[]) != Choice::NotAcceptable => return Ok(()),
            Err(_) => {}
        }
    }
    let headers = resp.headers_mut();
    if not_modified {
        mark_recoded(headers, None, None);
        return Ok(());
    }
    headers.insert(header::CONTENT_ENCODING, coding.header_value());
    mark_recoded(headers, None, None);
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
    if let Some(entry) = entry {
        match cache.recoded(&entry, Form::Decoded(decoding), 0).await {
            Ok(copy) => {
                serve_copy(resp, &copy, None, head_only);
                return Ok(());
            }
            Err(Unkept::Corrupt) => {
                // Stored, but not what its Content-Encoding says: let the
                // upstream try again.
                cache.remove(&entry).await;
                return Err(ProxyError::UndecodableBody {
                    coding: decoding.as_str(),
                });
            }
            // Too large to keep decoded: decoded as it is sent, below.
            Err(_) => {}
        }
    }
    let headers = resp.headers_mut();
    headers.remove(header::CONTENT_ENCODING);
    mark_recoded(headers, None, None);
    if !head_only && resp.status() != StatusCode::NOT_MODIFIED {
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
    let not_modified = resp.status() == StatusCode::NOT_MODIFIED;
    let headers = resp.headers_mut();
    if !not_modified {
        match coding {
            Some(c) => headers.insert(header::CONTENT_ENCODING, c),
            None => headers.remove(header::CONTENT_ENCODING),
        };
    }
    let length = copy.length.clone().filter(|_| !not_modified);
    mark_recoded(headers, length, copy.etag.as_ref());
    if !head_only && !not_modified {
        *resp.body_mut() = ResponseBody::stored(&copy.body);
    }
}

/// Fields that describe the bytes and change with the coding: the length
/// (known for stored copies), byte ranges, digests of the content, and the
/// validator, weakened: equivalent to the identity body, not
/// byte-identical (RFC 9110 §8.8.1). `etag`: the entry's strong tag and
/// its weak form, made once per copy.
fn mark_recoded(
    headers: &mut HeaderMap,
    length: Option<HeaderValue>,
    etag: Option<&(HeaderValue, HeaderValue)>,
) {
    match length {
        Some(n) => headers.insert(header::CONTENT_LENGTH, n),
        None => headers.remove(header::CONTENT_LENGTH),
    };
    for name in BYTE_FIELDS {
        if headers.contains_key(name) {
            headers.remove(name);
        }
    }
    match (etag, headers.get(header::ETAG)) {
        (Some((strong, weak)), Some(now)) if now == strong => {
            headers.insert(header::ETAG, weak.clone());
        }
        (_, Some(now)) => {
            if let Some(weak) = weakened(now) {
                headers.insert(header::ETAG, weak);
            }
        }
        (_, None) => {}
    }
}

/// Fields about the exact bytes sent that a recoding makes false.
const BYTE_FIELDS: [&str; 4] = [
    "accept-ranges",
    "content-md5",
    "content-digest",
    "repr-digest",
];

/// Whether the client takes `decoding` (named, or through `*`). A client
/// that sends no `Accept-Encoding` is treated as taking none, as in
/// `negotiate`.
fn accepts(headers: &HeaderMap, decoding: Decoding) -> bool {
    let (mut named, mut star) = (None::<u16>, None::<u16>);
    for (name, q) in crate::headers::accept_encoding(headers) {
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
pub fn weakened(etag: &HeaderValue) -> Option<HeaderValue> {
    let b = etag.as_bytes();
    if b.starts_with(b"W/") || !b.starts_with(b"\"") {
        return None;
    }
    let mut weak = Vec::with_capacity(b.len() + 2);
    weak.extend_from_slice(b"W/");
    weak.extend_from_slice(b);
    HeaderValue::from_bytes(&weak).ok()
}

/// Why a stored body has no copy in another coding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unkept {
    /// Compressed, it would not be smaller.
    NotSmaller,
    /// Decoded, it would be larger than the largest entry.
    TooLarge,
    /// It does not decode: not what its `Content-Encoding` says.
    Corrupt,
}

/// A stored body in another coding: a whole body as one, a recorded stream
/// chunk by chunk (each chunk flushed, so a replay still streams). At most
/// `limit` bytes are ever produced.
pub fn recode(form: Form, level: u32, body: &StoredBody, limit: u64) -> Result<StoredBody, Unkept> {
    let (mut coder, stream) = match (form, body) {
        (Form::Encoded(c), StoredBody::Whole(_)) => (Coder::encoder(c, level, false), false),
        (Form::Encoded(c), StoredBody::Chunks(_)) => (Coder::encoder(c, level, true), true),
        (Form::Decoded(d), b) => (Coder::decoder(d), matches!(b, StoredBody::Chunks(_))),
    };
    let input: &[Bytes] = match body {
        StoredBody::Whole(b) => std::slice::from_ref(b),
        StoredBody::Chunks(c) => c,
    };
    let (limit, too_large) = match form {
        // Not worth keeping unless smaller.
        Form::Encoded(_) => (
            (body.len() as u64).min(limit).saturating_sub(1),
            Unkept::NotSmaller,
        ),
        Form::Decoded(_) => (limit, Unkept::TooLarge),
    };
    // Pieces of output; with `stream`, each input chunk's ends one piece.
    let mut pieces: Vec<Vec<u8>> = Vec::with_capacity(input.len());
    let mut total = 0u64;
    let mut add = |pieces: &mut Vec<Vec<u8>>, out: Bytes, new_piece: bool| {
        total += out.len() as u64;
        if new_piece || pieces.is_empty() {
            pieces.push(Vec::new());
        }
        pieces
            .last_mut()
            .expect("just pushed")
            .extend_from_slice(&out);
        total <= limit
    };
    for chunk in input {
        let mut out = coder.push(chunk.clone()).map_err(|_| Unkept::Corrupt)?;
        let mut first = true;
        loop {
            if !add(&mut pieces, out, stream && first) {
                return Err(too_large);
            }
            first = false;
            if !coder.has_pending() {
                break;
            }
            out = coder.resume().map_err(|_| Unkept::Corrupt)?;
        }
    }
    let tail = coder.finish().map_err(|_| Unkept::Corrupt)?;
    if !add(&mut pieces, tail, false) {
        return Err(too_large);
    }
    // One exact-size buffer, sliced: the copy weighs what the store counts.
    let mut all = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    let mut ends = Vec::with_capacity(pieces.len());
    for piece in pieces.iter().filter(|p| !p.is_empty()) {
        all.extend_from_slice(piece);
        ends.push(all.len());
    }
    let all = Bytes::from(all);
    Ok(if stream {
        StoredBody::split(&all, ends)
    } else {
        StoredBody::Whole(all)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coding::DECODE_STEP_OUT;

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
                let out = e.push(Bytes::from(event.clone())).unwrap();
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
    }

    #[test]
    fn stored_copies_are_kept_only_when_sound_and_worth_it() {
        let body = br#"{"response":"The sky is blue."}"#.repeat(100);
        let whole = |b: Vec<u8>| StoredBody::Whole(b.into());
        let gz = Coder::whole(Coding::Gzip, 6, &body).unwrap();
        let limit = 1 << 20;
        let gunzip = |b: StoredBody, limit| recode(Form::Decoded(Decoding::Gzip), 0, &b, limit);
        let decoded = gunzip(whole(gz.to_vec()), limit);
        assert!(matches!(decoded, Ok(StoredBody::Whole(b)) if b[..] == body[..]));
        // Two gzip members back to back are one body.
        let twice = [&gz[..], &gz[..]].concat();
        let decoded = gunzip(whole(twice), limit);
        assert!(matches!(decoded, Ok(b) if b.len() == 2 * body.len()));
        // Stops short, or is not gzip at all.
        let cut = whole(gz[..gz.len() - 6].to_vec());
        assert_eq!(gunzip(cut, limit).unwrap_err(), Unkept::Corrupt);
        assert_eq!(
            gunzip(whole(body.clone()), limit).unwrap_err(),
            Unkept::Corrupt
        );
        let br = Coder::whole(Coding::Br, 5, &body).unwrap();
        let cut = whole(br[..br.len() / 2].to_vec());
        let unbrotli = recode(Form::Decoded(Decoding::Br), 0, &cut, limit);
        assert_eq!(unbrotli.unwrap_err(), Unkept::Corrupt);
        // A bomb: 64 MiB of zeros in ~64 KB; decoding stops at the limit.
        let zeros = Coder::whole(Coding::Gzip, 9, &vec![0u8; 64 << 20]).unwrap();
        assert!(zeros.len() < 100_000, "{}", zeros.len());
        assert_eq!(
            gunzip(whole(zeros.to_vec()), 1 << 20).unwrap_err(),
            Unkept::TooLarge
        );
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
        let packed = recode(Form::Encoded(Coding::Gzip), 6, &whole(noise), limit);
        assert_eq!(packed.unwrap_err(), Unkept::NotSmaller);
    }

    #[test]
    fn a_decoder_hands_out_a_bomb_in_bounded_steps() {
        let zeros = Coder::whole(Coding::Br, 5, &vec![0u8; 16 << 20]).unwrap();
        let mut d = Coder::decoder(Decoding::Br);
        let mut out = d.push(zeros).unwrap();
        let (mut total, mut steps) = (0usize, 0usize);
        loop {
            assert!(
                out.len() <= 2 * DECODE_STEP_OUT,
                "step of {} bytes",
                out.len()
            );
            total += out.len();
            steps += 1;
            if !d.has_pending() {
                break;
            }
            out = d.resume().unwrap();
        }
        total += d.finish().unwrap().len();
        assert_eq!(total, 16 << 20);
        assert!(steps > 16, "{steps} steps");
    }
}
