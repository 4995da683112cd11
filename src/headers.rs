//! Header rules of a forwarding intermediary: hop-by-hop removal (RFC 9110
//! §7.6.1), `X-Forwarded-*` and `Via` (§7.6.3), the real client address
//! behind trusted proxies, and `X-Request-Id`.
//!
//! Pure functions over `HeaderMap`s; nothing here performs I/O or knows about
//! routes and upstreams.

use std::net::IpAddr;

use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::Version;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// What the cache did: `HIT`, `MISS`, `STALE`, `BYPASS`, `EXPIRED`, `REVALIDATED`.
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// RFC 9110 §7.6.1: fields that describe one connection, never forwarded.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Whether `[route.headers]` may touch a field: not the hop-by-hop ones,
/// nor those that frame or encode the body, which Hyperion sets itself.
pub fn rewritable(name: &HeaderName) -> bool {
    !HOP_BY_HOP.contains(name)
        && *name != header::CONTENT_LENGTH
        && *name != header::CONTENT_ENCODING
}

/// NDJSON and SSE: bodies read chunk by chunk (recorded, replayed and
/// compressed so that each chunk is usable when it arrives).
pub fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            let ct = ct.trim_start().as_bytes();
            let starts = |p: &[u8]| ct.len() >= p.len() && ct[..p.len()].eq_ignore_ascii_case(p);
            starts(b"application/x-ndjson") || starts(b"text/event-stream")
        })
}

/// Removes the hop-by-hop fields, including every field named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names is cheaper than
    // seven hashed removals, on every request and every response.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The upgrade protocol a request asks for (`Connection: upgrade` plus
/// `Upgrade: websocket`), when it is one a proxy can tunnel. `h2c` is refused:
/// this proxy speaks h2c itself and never hands that upgrade to an upstream.
pub fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let upgrade = headers.get(header::UPGRADE)?;
    let connection_says_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let is_h2c = upgrade
        .to_str()
        .map(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case("h2c")))
        .unwrap_or(false);
    (connection_says_upgrade && !is_h2c).then(|| upgrade.clone())
}

/// Whether `ip` is one of the trusted proxies.
pub fn is_trusted(ip: IpAddr, trusted: &[ipnet::IpNet]) -> bool {
    trusted.iter().any(|net| net.contains(&ip))
}

/// The address a request really comes from: the peer, or — when the peer is a
/// trusted proxy — the right-most `X-Forwarded-For` entry that is not itself trusted.
pub fn client_ip(
    peer: IpAddr,
    peer_trusted: bool,
    headers: &HeaderMap,
    trusted: &[ipnet::IpNet],
) -> IpAddr {
    if !peer_trusted {
        return peer;
    }
    let mut client = peer;
    let hops = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect::<Vec<_>>();
    for hop in hops.into_iter().rev() {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => {
                client = ip.to_canonical();
                if !is_trusted(client, trusted) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    client
}

/// What the forwarding headers are built from.
pub struct Forwarding<'a> {
    /// The TCP peer's address, as `peer_value` writes it once per connection.
    pub peer_value: &'a HeaderValue,
    pub peer_trusted: bool,
    /// `http` or `https`: how the client reached this proxy.
    pub proto: &'static str,
    /// The host the client asked for (with port, as sent), when known.
    pub host: Option<&'a HeaderValue>,
    pub version: Version,
}

/// Adds `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host` and `Via`.
/// Incoming `X-Forwarded-*` values are kept only from trusted peers; from
/// anyone else they are replaced, so a client cannot forge its address.
pub fn add_forwarding(headers: &mut HeaderMap, fwd: &Forwarding<'_>) {
    let prior = if fwd.peer_trusted {
        joined(headers, &X_FORWARDED_FOR)
    } else {
        None
    };
    match prior {
        Some(prior) => {
            let peer = fwd.peer_value.to_str().unwrap_or_default();
            if let Ok(v) = HeaderValue::from_str(&format!("{prior}, {peer}")) {
                headers.insert(X_FORWARDED_FOR, v);
            }
        }
        None => {
            headers.insert(X_FORWARDED_FOR, fwd.peer_value.clone());
        }
    }
    if !(fwd.peer_trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        // Constants: `from_static` checks its bytes each time it runs.
        const HTTP: HeaderValue = HeaderValue::from_static("http");
        const HTTPS: HeaderValue = HeaderValue::from_static("https");
        let proto = if fwd.proto == "https" { HTTPS } else { HTTP };
        headers.insert(X_FORWARDED_PROTO, proto);
    }
    if !(fwd.peer_trusted && headers.contains_key(&X_FORWARDED_HOST)) {
        match fwd.host {
            Some(host) => {
                headers.insert(X_FORWARDED_HOST, host.clone());
            }
            None => {
                headers.remove(X_FORWARDED_HOST);
            }
        }
    }
    // RFC 9110 §7.6.3: a gateway MUST send Via in each inbound request it forwards.
    const VIA_10: HeaderValue = HeaderValue::from_static("1.0 hyperion");
    const VIA_11: HeaderValue = HeaderValue::from_static("1.1 hyperion");
    const VIA_2: HeaderValue = HeaderValue::from_static("2 hyperion");
    let via = match fwd.version {
        Version::HTTP_10 => VIA_10,
        Version::HTTP_2 => VIA_2,
        _ => VIA_11,
    };
    // One lookup for both cases: most requests come without a Via.
    match headers.entry(header::VIA) {
        Entry::Vacant(slot) => {
            slot.insert(via);
        }
        Entry::Occupied(mut prior) => match join(prior.iter()) {
            Some(joined) => {
                let via = via.to_str().unwrap_or_default();
                if let Ok(v) = HeaderValue::from_str(&format!("{joined}, {via}")) {
                    prior.insert(v);
                }
            }
            None => {
                prior.insert(via);
            }
        },
    }
}

/// `peer` as `X-Forwarded-For` writes it: made once per connection, not per
/// request (formatting an address is a visible cost per proxied request).
pub fn peer_value(peer: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&peer.to_string()).expect("an IP address is a valid header value")
}

/// All values of a field joined with ", ", or `None` when absent.
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    join(headers.get_all(name).iter())
}

/// `values` joined with ", " (those that are text), or `None` when there is none.
fn join<'a>(values: impl Iterator<Item = &'a HeaderValue>) -> Option<String> {
    let mut values = values.filter_map(|v| v.to_str().ok());
    let first = values.next()?;
    Some(values.fold(first.to_owned(), |mut acc, v| {
        acc.push_str(", ");
        acc.push_str(v);
        acc
    }))
}

/// The request's id: the client's `X-Request-Id` (the first, as
/// `RequestFields` found it) when it is a sane token (1–128 visible ASCII
/// characters), otherwise a new random one.
pub fn request_id(given: Option<&HeaderValue>) -> HeaderValue {
    if let Some(v) = given {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic()) {
            return v.clone();
        }
    }
    new_request_id()
}

fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = fastrand::u128(..);
    let mut out = [0u8; 32];
    for b in out.iter_mut().rev() {
        *b = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    // Owned by its `Bytes` from the start: the id is cloned (for the log, the
    // upstream request), and a clone of a `Vec`-backed `Bytes` allocates.
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(out))
        .expect("hex is a valid header value")
}

/// A message's `Content-Length`, when it has a valid one.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    parse_length(headers.get(header::CONTENT_LENGTH)?)
}

/// A `Content-Length` value as a number, when it is one.
fn parse_length(value: &HeaderValue) -> Option<u64> {
    value.to_str().ok()?.trim().parse().ok()
}

/// What forwarding needs to know of a request's fields, found in one pass
/// over them: a handful of hashed lookups and removals, each paid on every
/// request whether the field is there or not, cost more than the pass.
#[derive(Debug, Default)]
pub struct RequestFields {
    /// `name: value\r\n` of every field, as on the wire.
    pub size: usize,
    /// The first `Host`.
    pub host: Option<HeaderValue>,
    /// More than one `Host` line (RFC 9112 §3.2: answered with 400).
    pub hosts_repeated: bool,
    /// The first `X-Request-Id`.
    pub request_id: Option<HeaderValue>,
    /// The first `Content-Length`: `Some(None)` when it is not a number.
    pub content_length: Option<Option<u64>>,
    pub transfer_encoding: bool,
    pub expect: bool,
    pub upgrade: bool,
    /// Any field `strip_hop_by_hop` removes by name.
    pub hop_by_hop: bool,
}

impl RequestFields {
    pub fn of(headers: &HeaderMap) -> RequestFields {
        let mut f = RequestFields::default();
        for (name, value) in headers {
            f.size += name.as_str().len() + value.len() + 4;
            if name == header::HOST {
                if f.host.is_none() {
                    f.host = Some(value.clone());
                } else {
                    f.hosts_repeated = true;
                }
            } else if name == header::CONTENT_LENGTH {
                if f.content_length.is_none() {
                    f.content_length = Some(parse_length(value));
                }
            } else if name == header::EXPECT {
                f.expect = true;
            } else if name == X_REQUEST_ID {
                if f.request_id.is_none() {
                    f.request_id = Some(value.clone());
                }
            } else if HOP_BY_HOP.contains(name) {
                f.hop_by_hop = true;
                f.transfer_encoding |= name == header::TRANSFER_ENCODING;
                f.upgrade |= name == header::UPGRADE;
            }
        }
        f
    }
}

/// Approximate size of a request head as it came on the wire: request line
/// plus `name: value\r\n` per field (`fields_size` from `RequestFields`).
pub fn head_size(method: &str, uri_len: usize, fields_size: usize) -> usize {
    method.len() + 1 + uri_len + 11 + fields_size
}

/// A header map from `(name, value)` pairs, in order (for unit tests).
#[cfg(test)]
pub(crate) fn map(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    h
}

/// `(coding, q × 1000)` for each well-formed element of every
/// `Accept-Encoding` line; malformed elements are skipped.
pub fn accept_encoding(headers: &HeaderMap) -> impl Iterator<Item = (&[u8], u16)> {
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

    #[test]
    fn qvalues_are_read_as_the_rfc_writes_them() {
        assert_eq!(qvalue(b"0.001"), Some(1));
        assert_eq!(qvalue(b"1.000"), Some(1000));
        assert_eq!(qvalue(b"1.001"), None);
        assert_eq!(qvalue(b".5"), None);
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = map(&[
            ("connection", "close, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
            ("trailer", "x"),
            ("x-keep", "yes"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-keep"], "yes");
    }

    #[test]
    fn request_fields_are_found_in_one_pass() {
        let h = map(&[
            ("host", "a.test"),
            ("host", "b.test"),
            ("content-length", "12"),
            ("expect", "100-continue"),
            ("x-other", "1"),
        ]);
        let f = RequestFields::of(&h);
        assert_eq!(f.host.as_ref().unwrap(), "a.test", "the first Host");
        assert!(f.hosts_repeated);
        assert_eq!(f.content_length, Some(Some(12)));
        assert!(f.expect);
        assert!(!f.hop_by_hop && !f.transfer_encoding && !f.upgrade);
        let wire: usize = h.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
        assert_eq!(f.size, wire);

        let h = map(&[
            ("content-length", " twelve"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
        ]);
        let f = RequestFields::of(&h);
        assert_eq!(f.content_length, Some(None), "not a number");
        assert!(f.hop_by_hop && f.transfer_encoding && f.upgrade);
        assert!(f.host.is_none() && !f.expect);

        let f = RequestFields::of(&map(&[("keep-alive", "5")]));
        assert!(f.hop_by_hop && !f.transfer_encoding && !f.upgrade);
    }

    #[test]
    fn via_is_appended_to_or_added() {
        let fwd = |h: &mut HeaderMap| {
            let peer = HeaderValue::from_static("10.0.0.1");
            add_forwarding(
                h,
                &Forwarding {
                    peer_value: &peer,
                    peer_trusted: false,
                    proto: "http",
                    host: None,
                    version: Version::HTTP_11,
                },
            )
        };
        let mut h = HeaderMap::new();
        fwd(&mut h);
        assert_eq!(h["via"], "1.1 hyperion");
        let mut h = map(&[("via", "1.0 a"), ("via", "1.1 b")]);
        fwd(&mut h);
        assert_eq!(h.get_all("via").iter().count(), 1);
        assert_eq!(h["via"], "1.0 a, 1.1 b, 1.1 hyperion");
    }

    #[test]
    fn client_ip_behind_trusted_proxies() {
        let trusted = vec![
            "127.0.0.1/32".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ];
        let h = map(&[("x-forwarded-for", "203.0.113.9, 10.1.2.3")]);
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(
            client_ip(local, true, &h, &trusted),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        let stranger: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(client_ip(stranger, false, &h, &trusted), stranger);
        let junk = map(&[("x-forwarded-for", "not-an-ip")]);
        assert_eq!(client_ip(local, true, &junk, &trusted), local);
    }

    #[test]
    fn request_ids() {
        let id_of = |h: &HeaderMap| request_id(RequestFields::of(h).request_id.as_ref());
        let h = map(&[("x-request-id", "abc-123"), ("x-request-id", "second")]);
        assert_eq!(id_of(&h), "abc-123");
        let bad = map(&[("x-request-id", "has space")]);
        let id = id_of(&bad);
        assert_eq!(id.len(), 32);
        assert_ne!(id_of(&HeaderMap::new()), id_of(&HeaderMap::new()));
    }

    #[test]
    fn upgrade_detection() {
        let ws = map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(requested_upgrade(&ws).unwrap(), "websocket");
        let h2c = map(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
        ]);
        assert!(requested_upgrade(&h2c).is_none());
        let no_conn = map(&[("upgrade", "websocket")]);
        assert!(requested_upgrade(&no_conn).is_none());
    }
}
