//! Content codings on the way out: which one a client gets
//! (`Accept-Encoding`, RFC 9110 §12.5.3).
//!
//! This module owns the negotiation (codings by q-value, the policy's order
//! among equal ones, `identity` and `*` as the RFC reads them) and the
//! encoder that compresses a body as it passes, flushing after each chunk
//! when the body is a stream. It does not decide whether a response is
//! worth compressing.

use std::io::Write;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

use crate::body::ResponseBody;
use crate::cache::CacheControl;
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

/// Chooses and applies the coding of one response on its way to a client
/// whose request carried `accept` (its `Accept-Encoding` lines): headers
/// now, the encoder for the body. Responses that are not worth it or not
/// ours to touch leave as they are; a compressible one for a client that
/// refuses identity and every coding offered is a 406.
pub fn encode_response(
    policy: &CompressionPolicy,
    accept: &HeaderMap,
    head_only: bool,
    resp: &mut Response<ResponseBody>,
) -> Result<(), ProxyError> {
    if !eligible(policy, resp.status(), resp.headers()) {
        return Ok(());
    }
    let headers = resp.headers_mut();
    add_vary_accept_encoding(headers);
    let coding = match negotiate(accept, &policy.algorithms) {
        Choice::Identity => return Ok(()),
        Choice::NotAcceptable => return Err(ProxyError::NotAcceptable),
        Choice::Encode(c) => c,
    };
    headers.insert(header::CONTENT_ENCODING, coding.header_value());
    headers.remove(header::CONTENT_LENGTH);
    // Byte ranges of the identity body mean nothing in the encoded one.
    headers.remove(header::ACCEPT_RANGES);
    if let Some(weak) = headers.get(header::ETAG).and_then(weakened) {
        // Equivalent to the identity body, not byte-identical (RFC 9110 §8.8.1).
        headers.insert(header::ETAG, weak);
    }
    let stream = crate::headers::is_event_stream(headers);
    if !head_only {
        let level = match coding {
            Coding::Gzip => policy.gzip_level,
            Coding::Br => policy.brotli_quality,
        };
        resp.body_mut().encode(Encoder::new(coding, level, stream));
    }
    Ok(())
}

/// Whether a response may and should be compressed: a status with a body,
/// not already encoded, transformable, of a listed type, and not known to
/// be smaller than `min_size`.
fn eligible(policy: &CompressionPolicy, status: StatusCode, headers: &HeaderMap) -> bool {
    if status.is_informational()
        || matches!(
            status,
            StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED | StatusCode::PARTIAL_CONTENT
        )
        || headers.contains_key(header::CONTENT_RANGE)
    {
        return false;
    }
    let encoded = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"identity"));
    if encoded || CacheControl::parse(headers).no_transform {
        return false;
    }
    let Some(media) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
    else {
        return false;
    };
    let listed = policy
        .content_types
        .iter()
        .any(|t| match t.strip_suffix("/*") {
            Some(ty) => media.split_once('/').is_some_and(|(mt, _)| mt == ty),
            None => *t == media,
        });
    if !listed {
        return false;
    }
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    length.is_none_or(|n| n >= policy.min_size)
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

/// A body's compressor, fed chunk by chunk.
pub struct Encoder {
    kind: EncoderKind,
    /// Flush after every chunk, so each one can be decoded on arrival
    /// (NDJSON, SSE); otherwise the compressor keeps what it needs.
    flush_each: bool,
}

enum EncoderKind {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Br(Box<brotli::CompressorWriter<Vec<u8>>>),
}

/// Brotli's window: 4 MiB, ample for model answers, small enough per stream.
const BROTLI_LGWIN: u32 = 22;

impl Encoder {
    /// `level`: gzip 0–9, brotli quality 0–11 (checked by the policy).
    pub fn new(coding: Coding, level: u32, flush_each: bool) -> Self {
        let kind = match coding {
            Coding::Gzip => EncoderKind::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(level),
            )),
            Coding::Br => EncoderKind::Br(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                level,
                BROTLI_LGWIN,
            ))),
        };
        Encoder { kind, flush_each }
    }

    /// Compresses `data`; returns what is ready to send (maybe nothing).
    pub fn push(&mut self, data: &[u8]) -> std::io::Result<Bytes> {
        let flush = self.flush_each;
        match &mut self.kind {
            EncoderKind::Gzip(e) => {
                e.write_all(data)?;
                if flush {
                    e.flush()?;
                }
                Ok(std::mem::take(e.get_mut()).into())
            }
            EncoderKind::Br(e) => {
                e.write_all(data)?;
                if flush {
                    e.flush()?;
                }
                Ok(std::mem::take(e.get_mut()).into())
            }
        }
    }

    /// Ends the stream; returns its last bytes.
    pub fn finish(self) -> std::io::Result<Bytes> {
        match self.kind {
            EncoderKind::Gzip(e) => Ok(e.finish()?.into()),
            EncoderKind::Br(e) => Ok(e.into_inner().into()),
        }
    }

    /// Compresses a whole body at once.
    pub fn whole(coding: Coding, level: u32, body: &[u8]) -> std::io::Result<Bytes> {
        let mut e = Encoder::new(coding, level, false);
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
            let mut e = Encoder::new(coding, 5, true);
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
            let packed = Encoder::whole(coding, level, &body).unwrap();
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
}
