//! The one spelling of a request's path that routing, the cache key, the
//! limits and the upstream all see (RFC 3986 §6.2.2).
//!
//! Percent-encoded unreserved characters are decoded (`%61` is `a`), other
//! escapes are kept with upper-case hex (`%2f` is `%2F`, and never becomes
//! a `/`: an encoded reserved character is data, not structure), repeated
//! slashes are merged and dot segments removed (`/a/./b/../c` is `/a/c`,
//! `%2E%2E` counting as `..` since it decodes to it). A path that cannot be
//! normalized safely is refused: an invalid escape, an encoded NUL, or dot
//! segments climbing above the root.
//!
//! Owns the path only; the query is left as it came (the cache key sorts
//! it), and what a refused path answers is the handler's business.

use std::borrow::Cow;

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadPath {
    /// `%` not followed by two hex digits.
    InvalidEscape,
    /// `%00`.
    EncodedNul,
    /// More `..` segments than there are segments above them.
    AboveRoot,
}

impl BadPath {
    pub fn as_str(self) -> &'static str {
        match self {
            BadPath::InvalidEscape => "the path has an invalid percent-escape",
            BadPath::EncodedNul => "the path has an encoded NUL",
            BadPath::AboveRoot => "the path climbs above the root with '..'",
        }
    }
}

/// The normalized form of `path` (an origin-form path starting with `/`,
/// or `*`), borrowed when it already is normal (most requests).
pub fn normalize(path: &str) -> Result<Cow<'_, str>, BadPath> {
    if is_normal(path) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    let mut out: Vec<&str> = Vec::new();
    let trailing_slash =
        decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    for segment in decoded.split('/') {
        match segment {
            // Empty segments (repeated slashes, the leading one) merge.
            "" | "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err(BadPath::AboveRoot);
                }
            }
            s => out.push(s),
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for s in &out {
        normal.push('/');
        normal.push_str(s);
    }
    if normal.is_empty() || (trailing_slash && !out.is_empty()) {
        normal.push('/');
    }
    Ok(Cow::Owned(normal))
}

/// Whether `path` has nothing to normalize: no escape, no repeated slash,
/// no dot segment. One pass over the bytes; true for nearly every request.
fn is_normal(path: &str) -> bool {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        // `*` (OPTIONS) and anything else that is not a path: left alone,
        // unless it is a dot segment on its own (found by the fuzzer: `.`
        // came out as `.`), which is normalized like any other.
        return b != b"" && b != b"." && b != b".." && !b.contains(&b'%') && !b.contains(&b'/');
    }
    let mut prev_slash = false;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'%' => return false,
            b'/' if prev_slash => return false,
            b'.' if prev_slash => {
                // A segment starting with a dot: "." or ".." alone is one.
                let rest = &b[i..];
                let seg_len = rest.iter().position(|&c| c == b'/').unwrap_or(rest.len());
                if seg_len <= 2 && rest[..seg_len].iter().all(|&c| c == b'.') {
                    return false;
                }
            }
            _ => {}
        }
        prev_slash = c == b'/';
    }
    true
}

fn unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

/// Decodes escapes of unreserved characters, upper-cases the others'.
fn decode_unreserved(path: &str) -> Result<Cow<'_, str>, BadPath> {
    if !path.contains('%') {
        return Ok(Cow::Borrowed(path));
    }
    let b = path.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            // Safe: `path` is a str and only ASCII bytes are examined.
            let start = i;
            while i < b.len() && b[i] != b'%' {
                i += 1;
            }
            out.push_str(&path[start..i]);
            continue;
        }
        let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let (Some(hi), Some(lo)) = (
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(BadPath::InvalidEscape);
        };
        let c = hi << 4 | lo;
        if c == 0 {
            return Err(BadPath::EncodedNul);
        }
        if unreserved(c) {
            out.push(c as char);
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(hi)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(lo)]));
        }
        i += 3;
    }
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, BadPath> {
        normalize(p).map(Cow::into_owned)
    }

    #[test]
    fn every_spelling_of_a_path_is_one_path() {
        for p in [
            "/api/generate",
            "/api/gener%61te",
            "/api/gen%45rate".replace("%45", "%65").as_str(),
            "//api/generate",
            "/api//generate",
            "/api/./generate",
            "/api/x/../generate",
            "/api/x/%2E%2E/generate",
            "/api/x/%2e./generate",
            "/./api/generate",
        ] {
            assert_eq!(n(p).as_deref(), Ok("/api/generate"), "{p}");
        }
    }

    #[test]
    fn reserved_escapes_stay_data_and_are_upper_cased() {
        assert_eq!(n("/a%2fb").as_deref(), Ok("/a%2Fb"));
        assert_eq!(n("/a%2Fb/../c").as_deref(), Ok("/c"));
        assert_eq!(n("/a%20b").as_deref(), Ok("/a%20b"));
        assert_eq!(n("/%e2%82%ac").as_deref(), Ok("/%E2%82%AC"));
    }

    #[test]
    fn trailing_slashes_and_the_root_are_kept() {
        assert_eq!(n("/").as_deref(), Ok("/"));
        assert_eq!(n("/api/").as_deref(), Ok("/api/"));
        assert_eq!(n("/api/x/..").as_deref(), Ok("/api/"));
        assert_eq!(n("/api/.").as_deref(), Ok("/api/"));
        assert_eq!(n("//").as_deref(), Ok("/"));
        assert_eq!(n("/..x/.y").as_deref(), Ok("/..x/.y"));
        assert_eq!(n("*").as_deref(), Ok("*"));
        // A dot segment alone (no leading slash; found by fuzzing).
        assert_eq!(n(".").as_deref(), Ok("/"));
        assert_eq!(n(".."), Err(BadPath::AboveRoot));
    }

    #[test]
    fn unsafe_paths_are_refused() {
        assert_eq!(n("/a%zz"), Err(BadPath::InvalidEscape));
        assert_eq!(n("/a%4"), Err(BadPath::InvalidEscape));
        assert_eq!(n("/a%00b"), Err(BadPath::EncodedNul));
        assert_eq!(n("/.."), Err(BadPath::AboveRoot));
        assert_eq!(n("/a/../../etc/passwd"), Err(BadPath::AboveRoot));
        assert_eq!(n("/%2e%2e/x"), Err(BadPath::AboveRoot));
    }

    mod properties {
        use super::super::normalize;
        use proptest::prelude::*;

        fn path() -> impl Strategy<Value = String> {
            prop::collection::vec(
                prop_oneof![
                    Just("".to_owned()),
                    Just(".".to_owned()),
                    Just("..".to_owned()),
                    Just("%2e".to_owned()),
                    Just("%2F".to_owned()),
                    Just("%41".to_owned()),
                    "[a-z0-9._~-]{1,4}",
                ],
                0..8,
            )
            .prop_map(|segs| format!("/{}", segs.join("/")))
        }

        proptest! {
            #[test]
            fn normal_forms_are_fixed_points_without_dot_segments(p in path()) {
                if let Ok(once) = normalize(&p) {
                    let twice = normalize(&once).expect("a normal form normalizes");
                    prop_assert_eq!(&*once, &*twice);
                    prop_assert!(once.starts_with('/'));
                    prop_assert!(!once.contains("//"));
                    for seg in once.split('/') {
                        prop_assert!(seg != "." && seg != "..", "dot segment in {}", once);
                    }
                }
            }

            #[test]
            fn decoding_an_unreserved_escape_changes_nothing(p in path()) {
                let spelled = p.replace('a', "%61");
                prop_assert_eq!(
                    normalize(&p).map(|c| c.into_owned()),
                    normalize(&spelled).map(|c| c.into_owned())
                );
            }

            #[test]
            fn any_text_is_normalized_or_refused_without_panicking(p in "/[ -~]{0,40}") {
                let _ = normalize(&p);
            }
        }
    }
}
