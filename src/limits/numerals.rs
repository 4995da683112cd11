//! Decimal header values for the `RateLimit-*` fields without an allocation
//! per response: numbers under 1000 are slices of one static table, and a
//! limiter's own limit is interned once, when the limiter is built. Which
//! fields go out, and when, is `limits.rs`'s business.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use bytes::Bytes;
use http::HeaderValue;

/// "0123456789101112…999": every number under 1000, back to back.
static DIGITS: [u8; LEN] = table();
const LEN: usize = 10 + 90 * 2 + 900 * 3;

const fn table() -> [u8; LEN] {
    let mut t = [0u8; LEN];
    let (mut n, mut i) = (0, 0);
    while n < 1000 {
        if n >= 100 {
            t[i] = b'0' + (n / 100) as u8;
            i += 1;
        }
        if n >= 10 {
            t[i] = b'0' + (n / 10 % 10) as u8;
            i += 1;
        }
        t[i] = b'0' + (n % 10) as u8;
        i += 1;
        n += 1;
    }
    t
}

fn small(n: usize) -> &'static [u8] {
    let (start, len) = match n {
        0..=9 => (n, 1),
        10..=99 => (10 + (n - 10) * 2, 2),
        _ => (190 + (n - 100) * 3, 3),
    };
    &DIGITS[start..start + len]
}

/// `n` as a header value; one allocation only from 1000 up.
pub fn count(n: u64) -> HeaderValue {
    match usize::try_from(n) {
        Ok(n) if n < 1000 => HeaderValue::from_maybe_shared(Bytes::from_static(small(n)))
            .expect("digits are a valid header value"),
        _ => HeaderValue::from(n),
    }
}

/// `n` as text that lives as long as the process. Each distinct number is
/// kept once, so what this holds is bounded by the limits ever configured,
/// however often the policy is reloaded.
pub fn interned(n: u64) -> &'static str {
    static KEPT: OnceLock<Mutex<HashMap<u64, &'static str>>> = OnceLock::new();
    let mut kept = KEPT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    kept.entry(n)
        .or_insert_with(|| Box::leak(n.to_string().into_boxed_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_number_reads_as_itself() {
        for n in (0..2000).chain([u64::MAX]) {
            assert_eq!(count(n).to_str().unwrap(), n.to_string());
        }
        assert_eq!(interned(60), "60");
        assert!(std::ptr::eq(interned(60), interned(60)));
    }
}
