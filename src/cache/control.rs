//! What RFC 9111 lets a shared cache do with a response: `Cache-Control`
//! directives (response and request), whether a response may be stored, its
//! freshness lifetime, and the `Age` arithmetic.
//!
//! Pure functions of headers and times: nothing here touches the store or the
//! network, so every rule can be checked against the RFC in unit tests.

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};

/// The directives of all `Cache-Control` lines of one message.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CacheControl {
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub no_store: bool,
    /// Unqualified `no-cache` (on a request, qualified too).
    pub no_cache: bool,
    /// `no-cache="a, b"` on a response: those fields may not be served
    /// without validation, so they are not stored (RFC 9111 §5.2.2.4).
    pub no_cache_fields: Vec<HeaderName>,
    /// Unqualified `private`.
    pub private: bool,
    /// `private="a, b"`: a shared cache must not store those fields (§5.2.2.7).
    pub private_fields: Vec<HeaderName>,
    /// `must-understand`: store only statuses whose caching rules are
    /// understood, and then `no-store` does not apply (§5.2.2.3).
    pub must_understand: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub no_transform: bool,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
    /// Request only: `max-stale` (`Some(None)`: any staleness).
    pub max_stale: Option<Option<u64>>,
    pub min_fresh: Option<u64>,
    pub only_if_cached: bool,
    /// Read from a targeted field (RFC 9213, `CDN-Cache-Control`): then
    /// `Expires` does not count either.
    pub targeted: bool,
}

/// Delta-seconds past this are capped (RFC 9111 §1.2.2: 2^31).
const DELTA_MAX: u64 = 1 << 31;

impl CacheControl {
    pub fn parse(headers: &HeaderMap) -> CacheControl {
        let mut cc = CacheControl::default();
        for line in headers.get_all(header::CACHE_CONTROL) {
            let Ok(text) = line.to_str() else { continue };
            for (name, value) in directives(text) {
                cc.apply(&name.to_ascii_lowercase(), value);
            }
        }
        cc
    }

    /// The directives this cache follows on a response: those of the first
    /// of `targets` (RFC 9213 targeted fields, such as `CDN-Cache-Control`)
    /// that is present and a valid Structured Fields dictionary, in place
    /// of `Cache-Control` and `Expires`; else `Cache-Control`'s.
    pub fn for_response(headers: &HeaderMap, targets: &[HeaderName]) -> CacheControl {
        targets
            .iter()
            .find_map(|name| Self::targeted(headers, name))
            .unwrap_or_else(|| Self::parse(headers))
    }

    /// The directives of targeted field `name`; `None` when it is absent,
    /// empty or not a valid dictionary (RFC 9213 §2.1: then it is ignored).
    fn targeted(headers: &HeaderMap, name: &HeaderName) -> Option<CacheControl> {
        let mut lines = headers.get_all(name).iter();
        let first = lines.next()?;
        let mut joined = first.as_bytes().to_vec();
        for more in lines {
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(more.as_bytes());
        }
        let dict: sfv::Dictionary = sfv::Parser::new(&joined).parse().ok()?;
        if dict.is_empty() {
            return None;
        }
        let mut cc = CacheControl {
            targeted: true,
            ..CacheControl::default()
        };
        for (key, entry) in &dict {
            let sfv::ListEntry::Item(item) = entry else {
                continue;
            };
            let bare = &item.bare_item;
            let seconds = || {
                bare.as_integer()
                    .map(i64::from)
                    .filter(|n| *n >= 0)
                    .map(|n| (n as u64).min(DELTA_MAX))
            };
            // A directive of the wrong type is ignored (its value is unusable).
            match key.as_str() {
                "max-age" => cc.max_age = seconds().or(cc.max_age),
                "s-maxage" => cc.s_maxage = seconds().or(cc.s_maxage),
                "stale-while-revalidate" => cc.stale_while_revalidate = seconds(),
                "stale-if-error" => cc.stale_if_error = seconds(),
                "no-store" => cc.no_store |= bare.as_boolean() == Some(true),
                "must-revalidate" => cc.must_revalidate |= bare.as_boolean() == Some(true),
                "proxy-revalidate" => cc.proxy_revalidate |= bare.as_boolean() == Some(true),
                "public" => cc.public |= bare.as_boolean() == Some(true),
                "no-cache" | "private" => {
                    let fields = bare.as_string().map(|s| field_names(s.as_str()));
                    let unqualified = bare.as_boolean() == Some(true)
                        || fields.as_ref().is_some_and(|f| f.is_empty());
                    let (flag, list) = if key.as_str() == "no-cache" {
                        (&mut cc.no_cache, &mut cc.no_cache_fields)
                    } else {
                        (&mut cc.private, &mut cc.private_fields)
                    };
                    if unqualified {
                        *flag = true;
                    } else if let Some(f) = fields {
                        list.extend(f);
                    }
                }
                _ => {}
            }
        }
        Some(cc)
    }

    fn apply(&mut self, name: &str, value: Option<&str>) {
        let seconds = || value.map(delta_seconds);
        match name {
            // A malformed or repeated max-age makes the response stale
            // (§4.2.1, §1.2.2), which `Some(0)` says.
            "max-age" => {
                self.max_age = Some(match (self.max_age, seconds()) {
                    (None, Some(Some(s))) => s,
                    _ => 0,
                })
            }
            "s-maxage" => {
                self.s_maxage = Some(match (self.s_maxage, seconds()) {
                    (None, Some(Some(s))) => s,
                    _ => 0,
                })
            }
            "no-store" => self.no_store = true,
            "no-cache" => match value.map(field_names) {
                Some(names) if !names.is_empty() => self.no_cache_fields.extend(names),
                _ => self.no_cache = true,
            },
            "private" => match value.map(field_names) {
                Some(names) if !names.is_empty() => self.private_fields.extend(names),
                _ => self.private = true,
            },
            "must-understand" => self.must_understand = true,
            "public" => self.public = true,
            "must-revalidate" => self.must_revalidate = true,
            "proxy-revalidate" => self.proxy_revalidate = true,
            "no-transform" => self.no_transform = true,
            "stale-while-revalidate" => self.stale_while_revalidate = seconds().flatten(),
            "stale-if-error" => self.stale_if_error = seconds().flatten(),
            "max-stale" => self.max_stale = Some(value.map(|v| delta_seconds(v).unwrap_or(0))),
            "min-fresh" => self.min_fresh = seconds().flatten(),
            "only-if-cached" => self.only_if_cached = true,
            _ => {}
        }
    }

    /// Whether a stale response may be served without validation at all:
    /// `must-revalidate`, `proxy-revalidate` and `s-maxage` forbid it (§4.2.4,
    /// §5.2.2.2, §5.2.2.8, §5.2.2.10).
    pub fn forbids_stale(&self) -> bool {
        self.must_revalidate || self.proxy_revalidate || self.s_maxage.is_some()
    }

    /// A request's `no-cache`, in whatever form it came.
    pub fn wants_validation(&self) -> bool {
        self.no_cache || !self.no_cache_fields.is_empty()
    }

    /// Response fields a shared cache stores without: `no-cache` and
    /// `private` with field names.
    pub fn unstored_fields(&self) -> impl Iterator<Item = &HeaderName> {
        self.no_cache_fields.iter().chain(&self.private_fields)
    }
}

/// The field names of a qualified `no-cache` or `private`; empty when
/// there are none or one is not a field name (then the directive counts as
/// unqualified, the stricter reading).
fn field_names(value: &str) -> Vec<HeaderName> {
    let mut out = Vec::new();
    for name in value.split(',').map(str::trim) {
        match HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
            Ok(n) => out.push(n),
            Err(_) => return Vec::new(),
        }
    }
    out
}

/// `name[=value]` pairs, commas inside quoted strings respected, quotes removed.
fn directives(text: &str) -> impl Iterator<Item = (String, Option<&str>)> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let (mut start, mut quoted) = (0, false);
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'"' => quoted = !quoted,
            b',' if !quoted => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out.into_iter().filter_map(|d| {
        let d = d.trim();
        if d.is_empty() {
            return None;
        }
        Some(match d.split_once('=') {
            // No whitespace around `=` (§5.2): `max-age = 5` is not max-age.
            Some((n, v)) if n.ends_with([' ', '\t']) || v.starts_with([' ', '\t']) => return None,
            Some((n, v)) => (n.to_owned(), Some(v.trim_matches('"'))),
            None => (d.to_owned(), None),
        })
    })
}

/// RFC 9111 §1.2.2: digits only; too large saturates rather than failing.
fn delta_seconds(v: &str) -> Option<u64> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(v.parse::<u64>().unwrap_or(DELTA_MAX).min(DELTA_MAX))
}

/// Statuses a cache may store without explicit freshness (RFC 9110 §15.1),
/// minus 206 (ranges are not stored here) and 501 (5xx are never stored).
pub fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414
    )
}

/// Client errors a cache may keep without explicit freshness: what
/// `force` mode stores for `negative_ttl` (a missing model, a gone
/// resource), never for the route's whole `ttl`.
pub fn is_negative(status: StatusCode) -> bool {
    matches!(status.as_u16(), 404 | 405 | 410 | 414)
}

/// Statuses whose caching rules this cache knows (for `must-understand`).
fn understood(status: StatusCode) -> bool {
    heuristically_cacheable(status) || matches!(status.as_u16(), 302 | 303 | 307)
}

/// A date header (`Date`, `Expires`, `Last-Modified`) in HTTP-date form.
pub fn http_date(headers: &HeaderMap, name: &header::HeaderName) -> Option<SystemTime> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    super::date::parse(first.to_str().ok()?)
}

/// Why a response is not stored; `None` when it may be.
pub fn refuse_origin(
    method: &Method,
    status: StatusCode,
    req_has_authorization: bool,
    req_cc: Option<&CacheControl>,
    headers: &HeaderMap,
    cc: &CacheControl,
) -> Option<&'static str> {
    if *method != Method::GET {
        return Some("method");
    }
    if status.is_server_error() {
        return Some("status");
    }
    let understood = understood(status);
    if cc.must_understand && !understood {
        return Some("must-understand");
    }
    if (cc.no_store && !(cc.must_understand && understood)) || req_cc.is_some_and(|r| r.no_store) {
        return Some("no-store");
    }
    if cc.private {
        return Some("private");
    }
    if req_has_authorization && !(cc.public || cc.must_revalidate || cc.s_maxage.is_some()) {
        // §3.5: a shared cache stores answers to authenticated requests only
        // when the response says so.
        return Some("authorization");
    }
    if vary_star(headers) {
        return Some("vary-star");
    }
    let explicit = cc.max_age.is_some()
        || cc.s_maxage.is_some()
        || (!cc.targeted && headers.contains_key(header::EXPIRES))
        || cc.public;
    if !explicit && !heuristically_cacheable(status) {
        return Some("status");
    }
    if matches!(status.as_u16(), 206 | 304) || status.is_informational() {
        return Some("status");
    }
    None
}

/// `Vary: *`: no later request can be known to match (RFC 9110 §12.5.5).
pub fn vary_star(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim() == "*")
}

/// The freshness lifetime a shared cache gives a response (RFC 9111 §4.2.1,
/// §4.2.2): `s-maxage`, `max-age`, `Expires` − `Date`, else a heuristic of
/// 10% of the time since `Last-Modified`, at most `heuristic_cap`.
pub fn freshness_lifetime(
    headers: &HeaderMap,
    cc: &CacheControl,
    status: StatusCode,
    response_time: SystemTime,
    heuristic_cap: Duration,
) -> Duration {
    if let Some(s) = cc.s_maxage {
        return Duration::from_secs(s);
    }
    if let Some(s) = cc.max_age {
        return Duration::from_secs(s);
    }
    let date = http_date(headers, &header::DATE).unwrap_or(response_time);
    if !cc.targeted && headers.contains_key(header::EXPIRES) {
        // An invalid Expires (such as "0") means already expired (§5.3).
        return http_date(headers, &header::EXPIRES)
            .and_then(|e| e.duration_since(date).ok())
            .unwrap_or(Duration::ZERO);
    }
    if !(heuristically_cacheable(status) || cc.public) {
        return Duration::ZERO;
    }
    match http_date(headers, &header::LAST_MODIFIED).and_then(|lm| date.duration_since(lm).ok()) {
        Some(since) => (since / 10).min(heuristic_cap),
        None => Duration::ZERO,
    }
}

/// `corrected_initial_age` of RFC 9111 §4.2.3: what the response's age was
/// when it arrived, from its `Age`, its `Date` and the round trip.
pub fn initial_age(
    headers: &HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Duration {
    let age_value = headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        // A list or parameters are not `Age`, but the first number is meant.
        .and_then(|v| delta_seconds(v.split([',', ';']).next().unwrap_or("").trim()))
        .map_or(Duration::ZERO, Duration::from_secs);
    let apparent_age = http_date(headers, &header::DATE)
        .and_then(|d| response_time.duration_since(d).ok())
        .unwrap_or(Duration::ZERO);
    let response_delay = response_time
        .duration_since(request_time)
        .unwrap_or(Duration::ZERO);
    apparent_age.max(age_value + response_delay)
}

/// An `Age` header value: whole seconds, rounded down.
pub fn age_value(age: Duration) -> HeaderValue {
    HeaderValue::from(age.as_secs().min(DELTA_MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::headers::map;

    #[test]
    fn directives_parse_case_insensitively_with_quotes() {
        let cc = CacheControl::parse(&map(&[
            (
                "cache-control",
                "Public, MAX-AGE=60, no-cache=\"Set-Cookie, X-A\"",
            ),
            ("cache-control", "s-maxage=\"30\", stale-while-revalidate=5"),
        ]));
        assert!(cc.public && !cc.no_cache);
        assert_eq!(cc.no_cache_fields, ["set-cookie", "x-a"]);
        assert!(cc.wants_validation());
        assert_eq!(cc.max_age, Some(60));
        assert_eq!(cc.s_maxage, Some(30));
        assert_eq!(cc.stale_while_revalidate, Some(5));
        assert!(cc.forbids_stale(), "s-maxage implies proxy-revalidate");
    }

    #[test]
    fn a_valid_targeted_field_replaces_cache_control_and_expires() {
        let cdn = [HeaderName::from_static("cdn-cache-control")];
        let h = map(&[
            ("cache-control", "no-store"),
            ("cdn-cache-control", "max-age=60, stale-if-error=5"),
            ("expires", "0"),
        ]);
        let cc = CacheControl::for_response(&h, &cdn);
        assert!(cc.targeted && !cc.no_store);
        assert_eq!((cc.max_age, cc.stale_if_error), (Some(60), Some(5)));
        // Not a dictionary: Cache-Control decides.
        let h = map(&[
            ("cache-control", "no-store"),
            ("cdn-cache-control", "max-age =60"),
        ]);
        let cc = CacheControl::for_response(&h, &cdn);
        assert!(!cc.targeted && cc.no_store);
        // Two lines are one dictionary; a value of the wrong type is ignored.
        let h = map(&[
            ("cdn-cache-control", "max-age=\"60\""),
            ("cdn-cache-control", "private, no-cache=\"set-cookie\""),
        ]);
        let cc = CacheControl::for_response(&h, &cdn);
        assert_eq!(cc.max_age, None);
        assert!(cc.private && !cc.no_cache);
        assert_eq!(cc.no_cache_fields, ["set-cookie"]);
        // Too large saturates; negative is unusable.
        let h = map(&[("cdn-cache-control", "max-age=99999999999")]);
        assert_eq!(
            CacheControl::for_response(&h, &cdn).max_age,
            Some(DELTA_MAX)
        );
        let h = map(&[("cdn-cache-control", "max-age=-1")]);
        assert_eq!(CacheControl::for_response(&h, &cdn).max_age, None);
        // Without targets, only Cache-Control.
        let h = map(&[("cdn-cache-control", "no-store")]);
        assert!(!CacheControl::for_response(&h, &[]).no_store);
    }

    #[test]
    fn invalid_or_repeated_max_age_is_stale() {
        let cc = CacheControl::parse(&map(&[("cache-control", "max-age=abc")]));
        assert_eq!(cc.max_age, Some(0));
        let cc = CacheControl::parse(&map(&[("cache-control", "max-age=10, max-age=20")]));
        assert_eq!(cc.max_age, Some(0));
        let cc = CacheControl::parse(&map(&[("cache-control", "max-age=99999999999999")]));
        assert_eq!(cc.max_age, Some(DELTA_MAX));
    }

    #[test]
    fn whitespace_around_equals_makes_no_directive() {
        for text in ["max-age =60", "max-age= 60", "max-age = 60"] {
            let cc = CacheControl::parse(&map(&[("cache-control", text)]));
            assert_eq!(cc.max_age, None, "{text}");
        }
    }

    #[test]
    fn qualified_no_cache_and_private_name_fields() {
        let cc = CacheControl::parse(&map(&[(
            "cache-control",
            "private=\"X-User\", no-cache=\"Set-Cookie\", max-age=60",
        )]));
        assert!(!cc.private && !cc.no_cache);
        let fields: Vec<_> = cc.unstored_fields().map(|n| n.as_str()).collect();
        assert_eq!(fields, ["set-cookie", "x-user"]);
        // Not a field-name list: the strict, unqualified reading.
        let cc = CacheControl::parse(&map(&[("cache-control", "no-cache=\"a b\"")]));
        assert!(cc.no_cache);
        let cc = CacheControl::parse(&map(&[("cache-control", "private=\"\"")]));
        assert!(cc.private);
    }

    #[test]
    fn the_first_number_of_a_listed_age_counts() {
        let t = SystemTime::now();
        for v in ["7200", "7200, 0", "7200;foo=bar", " 7200 "] {
            let h = map(&[("age", v)]);
            assert_eq!(initial_age(&h, t, t).as_secs(), 7200, "{v}");
        }
        assert_eq!(initial_age(&map(&[("age", "x7200")]), t, t).as_secs(), 0);
    }

    #[test]
    fn request_directives() {
        let cc = CacheControl::parse(&map(&[(
            "cache-control",
            "max-stale, min-fresh=5, only-if-cached",
        )]));
        assert_eq!(cc.max_stale, Some(None));
        assert_eq!(cc.min_fresh, Some(5));
        assert!(cc.only_if_cached);
    }

    #[test]
    fn lifetime_prefers_s_maxage_then_max_age_then_expires() {
        let now = SystemTime::now();
        let date = httpdate::fmt_http_date(now);
        let in_100 = httpdate::fmt_http_date(now + Duration::from_secs(100));
        let cap = Duration::from_secs(3600);
        let ok = StatusCode::OK;
        let h = map(&[
            ("cache-control", "max-age=10, s-maxage=20"),
            ("date", &date),
            ("expires", &in_100),
        ]);
        let cc = CacheControl::parse(&h);
        assert_eq!(freshness_lifetime(&h, &cc, ok, now, cap).as_secs(), 20);
        let h = map(&[("date", &date), ("expires", &in_100)]);
        let cc = CacheControl::parse(&h);
        assert_eq!(freshness_lifetime(&h, &cc, ok, now, cap).as_secs(), 100);
        let h = map(&[("date", &date), ("expires", "0")]);
        assert_eq!(freshness_lifetime(&h, &cc, ok, now, cap), Duration::ZERO);
    }

    #[test]
    fn heuristic_needs_last_modified_and_a_cacheable_status() {
        let now = SystemTime::now();
        let lm = httpdate::fmt_http_date(now - Duration::from_secs(1000));
        let h = map(&[("last-modified", &lm)]);
        let cc = CacheControl::default();
        let cap = Duration::from_secs(3600);
        let got = freshness_lifetime(&h, &cc, StatusCode::OK, now, cap).as_secs();
        assert!((99..=100).contains(&got), "{got}");
        let got = freshness_lifetime(&h, &cc, StatusCode::CREATED, now, cap);
        assert_eq!(got, Duration::ZERO);
        let got = freshness_lifetime(&HeaderMap::new(), &cc, StatusCode::OK, now, cap);
        assert_eq!(got, Duration::ZERO);
    }

    #[test]
    fn initial_age_takes_the_larger_of_apparent_and_corrected() {
        let now = SystemTime::now();
        let req = now - Duration::from_secs(2);
        let h = map(&[("age", "10")]);
        assert_eq!(initial_age(&h, req, now).as_secs(), 12);
        let old = httpdate::fmt_http_date(now - Duration::from_secs(60));
        let h = map(&[("age", "10"), ("date", &old)]);
        assert_eq!(initial_age(&h, req, now).as_secs(), 60);
    }

    #[test]
    fn storability_for_a_shared_cache() {
        let get = Method::GET;
        let ok = StatusCode::OK;
        let check = |h: &[(&str, &str)], auth: bool, status: StatusCode| {
            let h = map(h);
            refuse_origin(&get, status, auth, None, &h, &CacheControl::parse(&h))
        };
        assert_eq!(check(&[("cache-control", "max-age=60")], false, ok), None);
        assert_eq!(
            check(&[("cache-control", "no-store")], false, ok),
            Some("no-store")
        );
        assert_eq!(
            check(&[("cache-control", "private, max-age=9")], false, ok),
            Some("private")
        );
        assert_eq!(
            check(&[("cache-control", "max-age=60")], true, ok),
            Some("authorization")
        );
        assert_eq!(
            check(&[("cache-control", "public, max-age=60")], true, ok),
            None
        );
        assert_eq!(
            check(&[("cache-control", "max-age=60"), ("vary", "*")], false, ok),
            Some("vary-star")
        );
        // The RFC lets Set-Cookie responses be stored (the origin says
        // `private` when they are not to be); `force` mode is stricter.
        assert_eq!(
            check(
                &[("cache-control", "max-age=60"), ("set-cookie", "a=b")],
                false,
                ok
            ),
            None
        );
        assert_eq!(
            check(&[("cache-control", "no-store, must-understand")], false, ok),
            None,
            "must-understand overrides no-store for a status it understands"
        );
        assert_eq!(
            check(
                &[("cache-control", "max-age=60, must-understand")],
                false,
                StatusCode::from_u16(299).unwrap()
            ),
            Some("must-understand")
        );
        assert_eq!(
            check(
                &[("cache-control", "max-age=60")],
                false,
                StatusCode::BAD_GATEWAY
            ),
            Some("status")
        );
        assert_eq!(check(&[], false, StatusCode::CREATED), Some("status"));
        assert_eq!(
            check(
                &[("cache-control", "max-age=60")],
                false,
                StatusCode::CREATED
            ),
            None
        );
    }
}
