//! Response and request fields the cache and compression read:
//! `Cache-Control` (and a targeted `CDN-Cache-Control`), `Vary`, HTTP dates,
//! `Accept-Encoding` (negotiation and the canonical key form, which must be
//! a fixed point).
#![no_main]

use http::header::{HeaderMap, HeaderName, HeaderValue};
use hyperion::cache::accept_coding;
use hyperion::cache::fuzzing::{http_date, vary_names, vary_values};
use hyperion::cache::CacheControl;
use hyperion::compress::{negotiate, Coding};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Up to four field lines, split at NUL bytes.
    let mut lines = data.split(|&b| b == 0);
    let mut map = HeaderMap::new();
    let names = [
        "cache-control",
        "cdn-cache-control",
        "vary",
        "accept-encoding",
        "expires",
    ];
    for name in names {
        if let Some(Ok(v)) = lines.next().map(HeaderValue::from_bytes) {
            map.append(HeaderName::from_static(name), v);
        }
    }
    let _ = CacheControl::parse(&map);
    let _ = CacheControl::for_response(&map, &[HeaderName::from_static("cdn-cache-control")]);
    let _ = vary_values(&map, &map);
    let _ = vary_names(&map);
    if let Some(Ok(text)) = map.get("expires").map(|v| v.to_str()) {
        let _ = http_date(text);
    }
    let _ = negotiate(&map, &[Coding::Br, Coding::Gzip]);
    if let Some(once) = accept_coding::canonical(&map) {
        let mut again = HeaderMap::new();
        again.insert(http::header::ACCEPT_ENCODING, once.clone());
        assert_eq!(accept_coding::canonical(&again), Some(once));
    }
});
