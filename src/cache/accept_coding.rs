//! The client's `Accept-Encoding` as one canonical value, for routes where
//! it goes upstream (Hyperion neither compresses nor reads the answers).
//!
//! The upstream may pick a content coding from it without saying `Vary`
//! (a careless backend), so the cache key must hold it; and two spellings
//! that accept the same codings must key alike, or every client library
//! would have entries of its own. The canonical form is what the upstream
//! is sent too, so what is keyed is exactly what it saw: the accepted
//! codings (q > 0) sorted and lower-cased, `x-gzip` read as `gzip`, and
//! `identity;q=0` at the end when the client refuses an unencoded answer.
//! Preferences among accepted codings are dropped: whichever the upstream
//! picks, the client said it can read it.
//!
//! This module does not parse the field's grammar (`headers` does, for
//! `compress` too), choose a coding for the client (`compress` does) nor
//! touch the store.

use http::header::{HeaderMap, HeaderValue};

/// More distinct codings than this in one request are ignored: real
/// clients list three or four.
const MAX_CODINGS: usize = 16;
/// A coding name longer than this is not one.
const MAX_NAME: usize = 32;

/// The canonical `Accept-Encoding` of `headers`; `None` when nothing but an
/// unencoded answer is asked for (no header, or only refusals of codings),
/// which is what sending no header asks of the upstream.
pub fn canonical(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut codings: Vec<(String, u16)> = Vec::new();
    for (name, q) in crate::headers::accept_encoding(headers) {
        if name.len() > MAX_NAME {
            continue;
        }
        let name = match name.to_ascii_lowercase() {
            n if n == b"x-gzip" => "gzip".to_owned(),
            n if n == b"x-compress" => "compress".to_owned(),
            // Tokens are ASCII (the parser checked every byte).
            n => String::from_utf8_lossy(&n).into_owned(),
        };
        if let Some((_, old)) = codings.iter_mut().find(|(n, _)| *n == name) {
            // Listed twice: the more generous reading (as `compress`).
            *old = (*old).max(q);
        } else if codings.len() < MAX_CODINGS {
            codings.push((name, q));
        }
    }
    let q_of = |name: &str| codings.iter().find(|(n, _)| n == name).map(|(_, q)| *q);
    // RFC 9110 §12.5.3: identity is acceptable unless refused by name, or
    // by `*;q=0` without an entry of its own.
    let identity_refused = q_of("identity").or(q_of("*")) == Some(0);
    let mut accepted: Vec<&str> = codings
        .iter()
        .filter(|(n, q)| *q > 0 && n != "identity")
        .map(|(n, _)| n.as_str())
        .collect();
    accepted.sort_unstable();
    let mut out = accepted.join(", ");
    if identity_refused {
        if !out.is_empty() {
            out.push_str(", ");
        }
        out.push_str("identity;q=0");
    }
    if out.is_empty() {
        return None;
    }
    HeaderValue::from_str(&out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::map;
    use http::header;

    fn canon(values: &[&str]) -> Option<String> {
        let pairs: Vec<(&str, &str)> = values.iter().map(|v| ("accept-encoding", *v)).collect();
        canonical(&map(&pairs)).map(|v| v.to_str().unwrap().to_owned())
    }

    #[test]
    fn spellings_of_one_meaning_are_one_value() {
        let want = Some("br, gzip".to_owned());
        assert_eq!(canon(&["gzip, br"]), want);
        assert_eq!(canon(&["BR;q=0.5 , x-gzip"]), want);
        assert_eq!(canon(&["gzip", "br"]), want);
        assert_eq!(canon(&["gzip;q=1.000, br;q=0.001, deflate;q=0"]), want);
        assert_eq!(canon(&["br, gzip, identity"]), want);
    }

    #[test]
    fn nothing_accepted_is_no_header() {
        assert_eq!(canon(&[]), None);
        assert_eq!(canon(&[""]), None);
        assert_eq!(canon(&["identity"]), None);
        assert_eq!(canon(&["gzip;q=0"]), None);
        assert_eq!(
            canon(&["gzip;q=2, br;q=x"]),
            None,
            "malformed q-values are ignored"
        );
    }

    #[test]
    fn refusing_identity_is_kept() {
        assert_eq!(
            canon(&["gzip, identity;q=0"]).as_deref(),
            Some("gzip, identity;q=0")
        );
        assert_eq!(
            canon(&["gzip, *;q=0"]).as_deref(),
            Some("gzip, identity;q=0")
        );
        assert_eq!(canon(&["gzip, *;q=0, identity"]).as_deref(), Some("gzip"));
        assert_eq!(canon(&["*"]).as_deref(), Some("*"));
    }

    #[test]
    fn junk_is_bounded() {
        let many: Vec<String> = (0..100).map(|i| format!("c{i}")).collect();
        let joined = many.join(", ");
        let out = canon(&[&joined]).unwrap();
        assert_eq!(out.split(", ").count(), MAX_CODINGS);
        assert_eq!(canon(&["g\"zip, br"]).as_deref(), Some("br"));
        assert_eq!(canon(&[&"a".repeat(100)]), None);
    }

    proptest::proptest! {
        #[test]
        fn canonical_is_a_fixed_point(s in "[a-zA-Z*;=.,0-9 -]{0,60}") {
            let Ok(v) = HeaderValue::from_str(&s) else { return Ok(()) };
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT_ENCODING, v);
            if let Some(once) = canonical(&h) {
                let mut again = HeaderMap::new();
                again.insert(header::ACCEPT_ENCODING, once.clone());
                proptest::prop_assert_eq!(canonical(&again), Some(once));
            }
        }
    }
}
