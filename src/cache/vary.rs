//! `Vary` (RFC 9111 §4.1): which request headers select among one URL's
//! stored responses, how their values compare, and the key each of those
//! responses (variants) is stored under.
//!
//! A response that varies is stored under a variant key: the request's own
//! key extended with the request's values of the headers it varies on. The
//! request's own key then holds just those header names, so a lookup reads
//! the names first and the variant second, and any number of variants live
//! side by side. Values compare as lists, as the RFC allows: field lines
//! combined, whitespace around commas and empty elements ignored, so
//! `gzip,br` and `gzip, br` select one variant. Whether a response may be
//! stored at all (`Vary: *` never is) is `control`'s business.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::key::CacheKey;

/// The request headers a response varies on, each with the value (as a
/// normalised list) the request that filled it had, or `None` where it had
/// none.
pub type VaryValues = Vec<(HeaderName, Option<HeaderValue>)>;

/// The header names `resp` varies on, lower-case, each once, in order.
pub fn names(resp: &HeaderMap) -> Vec<HeaderName> {
    let mut out: Vec<HeaderName> = Vec::new();
    for line in resp.get_all(header::VARY) {
        for item in items(std::iter::once(line)) {
            if let Ok(name) = HeaderName::from_bytes(&item.to_ascii_lowercase()) {
                if !out.contains(&name) {
                    out.push(name);
                }
            }
        }
    }
    out
}

/// `req`'s values of the headers `resp` varies on, to store with it.
pub fn values(resp: &HeaderMap, req: &HeaderMap) -> VaryValues {
    names(resp)
        .into_iter()
        .map(|name| {
            let value = normalised(req.get_all(&name).iter());
            (name, value)
        })
        .collect()
}

/// Whether `req` has, for each header a response varies on, the value the
/// response was stored for (absent where it was absent).
pub fn matches(stored: &[(HeaderName, Option<HeaderValue>)], req: &HeaderMap) -> bool {
    stored.iter().all(|(name, value)| {
        let mut lines = req.get_all(name).iter().peekable();
        match value {
            None => lines.peek().is_none(),
            Some(v) => lines.peek().is_some() && items(std::iter::once(v)).eq(items(lines)),
        }
    })
}

/// Where the variant of `primary` that `req` selects is stored, when the
/// responses of `primary` vary on `names`.
pub fn request_key(primary: &CacheKey, names: &[HeaderName], req: &HeaderMap) -> CacheKey {
    primary.variant(|buf| {
        for name in names {
            let mut lines = req.get_all(name).iter().peekable();
            let present = lines.peek().is_some();
            feed(buf, name, present.then_some(lines));
        }
    })
}

/// Where a response stored with `values` goes: the key `request_key` gives
/// every request that matches it.
pub fn stored_key(primary: &CacheKey, values: &[(HeaderName, Option<HeaderValue>)]) -> CacheKey {
    primary.variant(|buf| {
        for (name, value) in values {
            feed(buf, name, value.as_ref().map(std::iter::once));
        }
    })
}

/// One header's part of a variant key: its name, whether it was there,
/// and its list items, each length-prefixed so no two inputs run together.
fn feed<'a>(
    buf: &mut Vec<u8>,
    name: &HeaderName,
    lines: Option<impl Iterator<Item = &'a HeaderValue>>,
) {
    let mut put = |bytes: &[u8]| {
        buf.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        buf.extend_from_slice(bytes);
    };
    put(name.as_str().as_bytes());
    match lines {
        None => put(b"absent"),
        Some(lines) => {
            put(b"present");
            for item in items(lines) {
                put(item);
            }
        }
    }
    // Ends this header's items: a following name cannot pass for an item.
    buf.extend_from_slice(&u64::MAX.to_le_bytes());
}

/// The list items of some field lines: split on commas, optional
/// whitespace trimmed, empty elements dropped (RFC 9110 §5.6.1).
fn items<'a>(lines: impl Iterator<Item = &'a HeaderValue>) -> impl Iterator<Item = &'a [u8]> {
    lines
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|item| item.trim_ascii())
        .filter(|item| !item.is_empty())
}

/// The items of `lines` as one value, `", "`-separated; `None` when there
/// are no lines at all (an empty line is a present, empty value).
fn normalised<'a>(lines: impl Iterator<Item = &'a HeaderValue>) -> Option<HeaderValue> {
    let mut lines = lines.peekable();
    lines.peek()?;
    let mut out = Vec::new();
    for item in items(lines) {
        if !out.is_empty() {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(item);
    }
    // Items are slices of valid values, joined by ", ": still a valid value.
    Some(HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("")))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::headers::map as req;

    fn resp(vary: &str) -> HeaderMap {
        req(&[("vary", vary)])
    }

    #[test]
    fn names_are_lower_case_and_listed_once() {
        let r = req(&[
            ("vary", "Accept-Language, accept-encoding"),
            ("vary", "ACCEPT-language,,"),
        ]);
        assert_eq!(names(&r), ["accept-language", "accept-encoding"]);
    }

    #[test]
    fn values_compare_as_lists() {
        let stored = values(
            &resp("accept-encoding"),
            &req(&[("accept-encoding", "gzip,br")]),
        );
        assert_eq!(stored[0].1.as_ref().unwrap(), "gzip, br");
        for same in [
            req(&[("accept-encoding", "gzip, br")]),
            req(&[("accept-encoding", " gzip ,  br ,")]),
            req(&[("accept-encoding", "gzip"), ("accept-encoding", "br")]),
        ] {
            assert!(matches(&stored, &same), "{same:?}");
        }
        for other in [
            req(&[("accept-encoding", "br, gzip")]),
            req(&[("accept-encoding", "gzip")]),
            req(&[]),
        ] {
            assert!(!matches(&stored, &other), "{other:?}");
        }
    }

    #[test]
    fn absent_and_empty_are_different_values() {
        let absent = values(&resp("accept-language"), &req(&[]));
        let empty = values(&resp("accept-language"), &req(&[("accept-language", "")]));
        assert!(absent[0].1.is_none());
        assert_eq!(empty[0].1.as_ref().unwrap(), "");
        assert!(matches(&absent, &req(&[])));
        assert!(!matches(&absent, &req(&[("accept-language", "")])));
        assert!(matches(&empty, &req(&[("accept-language", "")])));
        assert!(!matches(&empty, &req(&[])));
        let k = CacheKey([7; 32]);
        assert_ne!(stored_key(&k, &absent), stored_key(&k, &empty));
    }

    #[test]
    fn a_stored_variant_is_found_by_every_request_that_matches_it() {
        let k = CacheKey([1; 32]);
        let r = resp("accept-language, x-tenant");
        let first = req(&[("accept-language", "fr,de"), ("x-tenant", "a")]);
        let stored = values(&r, &first);
        let names = names(&r);
        let key = stored_key(&k, &stored);
        assert_eq!(request_key(&k, &names, &first), key);
        let same = req(&[
            ("x-tenant", "a"),
            ("accept-language", "fr"),
            ("accept-language", "de"),
        ]);
        assert_eq!(request_key(&k, &names, &same), key);
        let other = req(&[("accept-language", "fr,de"), ("x-tenant", "b")]);
        assert_ne!(request_key(&k, &names, &other), key);
        // Items cannot shift between headers.
        let shifted = req(&[("accept-language", "fr"), ("x-tenant", "de, a")]);
        assert_ne!(request_key(&k, &names, &shifted), key);
        assert_ne!(stored_key(&CacheKey([2; 32]), &stored), key);
        assert_ne!(key, k);
    }
}
