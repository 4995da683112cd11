//! Conditional requests answered from a stored entry (RFC 9110 §13), and
//! the strong `ETag` an entry gets when its upstream sent none.
//!
//! The preconditions are evaluated in the RFC's order (§13.2.2): `If-Match`,
//! else `If-Unmodified-Since`; then `If-None-Match`, else
//! `If-Modified-Since`. Only stored answers are judged here; on routes that
//! do not cache, conditionals go to the upstream untouched.

use http::header::{self, HeaderMap, HeaderValue};

/// What the preconditions of a request make of a stored representation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// Serve it (no preconditions, or they hold).
    Serve,
    /// 304: the client has it already (GET and HEAD only).
    NotModified,
    /// 412: `If-Match` / `If-Unmodified-Since` failed.
    Failed,
}

/// Judges `req`'s preconditions against a stored response's `headers`.
pub fn evaluate(req: &HeaderMap, stored: &HeaderMap) -> Precondition {
    let etag = stored
        .get(header::ETAG)
        .and_then(|v| EntityTag::parse(v.as_bytes()));
    let last_modified = date_of(stored, &header::LAST_MODIFIED);
    if req.contains_key(header::IF_MATCH) {
        // Strong comparison (§13.1.1): a weak tag never matches.
        let matched = any_tag(req, &header::IF_MATCH, |t| {
            etag.as_ref()
                .is_some_and(|e| !e.weak && !t.weak && e.opaque == t.opaque)
        });
        if !matched {
            return Precondition::Failed;
        }
    } else if let Some(since) = date_of(req, &header::IF_UNMODIFIED_SINCE) {
        if last_modified.is_none_or(|lm| lm > since) {
            return Precondition::Failed;
        }
    }
    if req.contains_key(header::IF_NONE_MATCH) {
        // Weak comparison (§13.1.2).
        let matched = any_tag(req, &header::IF_NONE_MATCH, |t| {
            etag.as_ref().is_some_and(|e| e.opaque == t.opaque)
        });
        return if matched {
            Precondition::NotModified
        } else {
            Precondition::Serve
        };
    }
    if let Some(since) = date_of(req, &header::IF_MODIFIED_SINCE) {
        // Without Last-Modified, the stored Date is the best a cache knows
        // (RFC 9111 §4.3.2).
        let modified = last_modified.or_else(|| date_of(stored, &header::DATE));
        if modified.is_some_and(|m| m <= since) {
            return Precondition::NotModified;
        }
    }
    Precondition::Serve
}

/// Whether `*` or any tag of the `name` lists passes `test`. A list that
/// does not parse matches nothing.
fn any_tag(req: &HeaderMap, name: &header::HeaderName, test: impl Fn(&EntityTag) -> bool) -> bool {
    for line in req.get_all(name) {
        let bytes = line.as_bytes();
        if bytes.trim_ascii() == b"*" {
            return true;
        }
        match EntityTag::list(bytes) {
            Some(tags) if tags.iter().any(&test) => return true,
            _ => {}
        }
    }
    false
}

fn date_of(headers: &HeaderMap, name: &header::HeaderName) -> Option<std::time::SystemTime> {
    if headers.get_all(name).iter().nth(1).is_some() {
        // Two dates: neither can be trusted (§13.1.3 asks for one).
        return None;
    }
    super::control::http_date(headers, name)
}

/// `W/"opaque"` or `"opaque"` (RFC 9110 §8.8.3).
#[derive(Debug, Clone, PartialEq, Eq)]
struct EntityTag<'a> {
    weak: bool,
    opaque: &'a [u8],
}

impl<'a> EntityTag<'a> {
    fn parse(v: &'a [u8]) -> Option<Self> {
        let (tag, rest) = Self::next(v.trim_ascii())?;
        rest.is_empty().then_some(tag)
    }

    /// A comma-separated list; empty elements allowed, anything else not.
    fn list(mut v: &'a [u8]) -> Option<Vec<Self>> {
        let mut out = Vec::new();
        loop {
            v = v.trim_ascii_start();
            while let Some(rest) = v.strip_prefix(b",") {
                v = rest.trim_ascii_start();
            }
            if v.is_empty() {
                return Some(out);
            }
            let (tag, rest) = Self::next(v)?;
            out.push(tag);
            let rest = rest.trim_ascii_start();
            if !(rest.is_empty() || rest.starts_with(b",")) {
                return None;
            }
            v = rest;
        }
    }

    /// The tag at the start of `v`, and what follows it.
    fn next(v: &'a [u8]) -> Option<(Self, &'a [u8])> {
        let (weak, v) = match v.strip_prefix(b"W/") {
            Some(rest) => (true, rest),
            None => (false, v),
        };
        let v = v.strip_prefix(b"\"")?;
        let end = v.iter().position(|&b| b == b'"')?;
        let opaque = &v[..end];
        // etagc: visible characters but `"`, and obs-text.
        if opaque.iter().any(|&b| b < 0x21 || b == 0x7f) {
            return None;
        }
        Some((EntityTag { weak, opaque }, &v[end + 1..]))
    }
}

/// A strong `ETag` for a body the upstream gave none: its digest, so equal
/// bodies get equal tags across entries and restarts.
pub fn body_etag<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> HeaderValue {
    let mut h = blake3::Hasher::new();
    for c in chunks {
        h.update(c);
    }
    let digest = h.finalize();
    let mut tag = String::with_capacity(2 + 32);
    tag.push('"');
    for b in &digest.as_bytes()[..16] {
        tag.push_str(&format!("{b:02x}"));
    }
    tag.push('"');
    HeaderValue::from_str(&tag).expect("hex in quotes is a valid value")
}

/// The headers a 304 carries from the stored 200 (RFC 9110 §15.4.5): what
/// a cache needs to update its copy, no representation metadata.
pub const NOT_MODIFIED_HEADERS: [header::HeaderName; 7] = [
    header::CACHE_CONTROL,
    header::CONTENT_LOCATION,
    header::DATE,
    header::ETAG,
    header::EXPIRES,
    header::LAST_MODIFIED,
    header::VARY,
];

#[cfg(test)]
mod tests {
    use super::*;

    use crate::headers::map as headers;

    const LM: &str = "Sun, 06 Nov 1994 08:49:37 GMT";
    const LATER: &str = "Mon, 07 Nov 1994 08:49:37 GMT";
    const EARLIER: &str = "Sat, 05 Nov 1994 08:49:37 GMT";

    fn stored() -> HeaderMap {
        headers(&[("etag", "\"v1\""), ("last-modified", LM)])
    }

    #[test]
    fn if_none_match_compares_weakly_in_lists_and_star() {
        use Precondition::*;
        for (inm, want) in [
            ("\"v1\"", NotModified),
            ("W/\"v1\"", NotModified),
            ("\"a\", \"v1\"", NotModified),
            ("\"a\",W/\"v1\",\"b\"", NotModified),
            (", \"v1\" ,", NotModified),
            ("*", NotModified),
            ("\"v2\"", Serve),
            ("\"v1", Serve),
            ("v1", Serve),
            ("\"a\" \"v1\"", Serve),
        ] {
            assert_eq!(
                evaluate(&headers(&[("if-none-match", inm)]), &stored()),
                want,
                "{inm}"
            );
        }
        let weak_stored = headers(&[("etag", "W/\"v1\"")]);
        assert_eq!(
            evaluate(&headers(&[("if-none-match", "\"v1\"")]), &weak_stored),
            NotModified
        );
    }

    #[test]
    fn if_none_match_wins_over_if_modified_since() {
        let req = headers(&[("if-none-match", "\"v2\""), ("if-modified-since", LATER)]);
        assert_eq!(evaluate(&req, &stored()), Precondition::Serve);
    }

    #[test]
    fn if_modified_since_uses_last_modified_else_date() {
        use Precondition::*;
        let ims = |d: &str| headers(&[("if-modified-since", d)]);
        assert_eq!(evaluate(&ims(LM), &stored()), NotModified);
        assert_eq!(evaluate(&ims(LATER), &stored()), NotModified);
        assert_eq!(evaluate(&ims(EARLIER), &stored()), Serve);
        assert_eq!(evaluate(&ims("yesterday"), &stored()), Serve);
        let dated = headers(&[("date", LM)]);
        assert_eq!(evaluate(&ims(LATER), &dated), NotModified);
        assert_eq!(evaluate(&ims(LATER), &HeaderMap::new()), Serve);
    }

    #[test]
    fn if_match_is_strong_and_fails_with_412() {
        use Precondition::*;
        let im = |t: &str| headers(&[("if-match", t)]);
        assert_eq!(evaluate(&im("\"v1\""), &stored()), Serve);
        assert_eq!(evaluate(&im("*"), &stored()), Serve);
        assert_eq!(evaluate(&im("W/\"v1\""), &stored()), Failed);
        assert_eq!(evaluate(&im("\"v2\""), &stored()), Failed);
        let ius = |d: &str| headers(&[("if-unmodified-since", d)]);
        assert_eq!(evaluate(&ius(LATER), &stored()), Serve);
        assert_eq!(evaluate(&ius(EARLIER), &stored()), Failed);
    }

    #[test]
    fn body_tags_are_strong_and_follow_the_bytes() {
        let a = body_etag([&b"hello "[..], b"world"]);
        assert_eq!(a, body_etag([&b"hello world"[..]]));
        assert_ne!(a, body_etag([&b"hello"[..]]));
        assert!(EntityTag::parse(a.as_bytes()).is_some_and(|t| !t.weak));
    }
}
