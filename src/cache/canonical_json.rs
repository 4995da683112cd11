//! The digest of a JSON request body in canonical form, computed as the
//! bytes are parsed: no tree of values is ever built.
//!
//! Canonical means what a cache key needs: object members in key order, no
//! whitespace, numbers by value (`1`, `1.0` and `1e0` are one number), the
//! last of duplicate members winning (as a JSON object map would keep it),
//! and the members named by the route's `ignore_fields` left out. Every item
//! is typed and delimited, so no two different documents feed the hasher the
//! same bytes.
//!
//! Memory is about the body's own size at worst: an array streams into its
//! parent's hasher item by item, and an object keeps only its members' keys
//! and a 32-byte digest of each member's value until it is closed and
//! sorted. (Building a `serde_json::Value` first cost ~30 times the body:
//! a 48 MB array of zeros took 1.3 GB.) Nesting is bounded by serde_json's
//! recursion limit (128 levels): deeper bodies are not keyed (`NotJson`,
//! the request passes through as `BYPASS`).
//!
//! This module only digests; which requests are keyed, and on what else, is
//! `key.rs`'s business.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// What a body's canonical digest is taken with, and what it found.
pub struct Digest {
    pub hash: blake3::Hash,
    /// The top-level `stream` member when it is a boolean; `Some(None)`
    /// when it is there with another type; `None` when absent (or the
    /// body is not an object).
    pub stream: Option<Option<bool>>,
}

/// Digests `body` canonically, leaving out the members at `ignore` (each a
/// path of keys from the top). `None` when it is not valid JSON, or nests
/// deeper than serde_json's recursion limit.
pub fn digest(body: &[u8], ignore: &[Box<[String]>]) -> Option<Digest> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let mut hasher = Feed::new();
    let mut path = Vec::new();
    let mut stream = None;
    Canon {
        h: &mut hasher,
        ignore,
        path: &mut path,
        stream: Some(&mut stream),
    }
    .deserialize(&mut de)
    .ok()?;
    // Trailing characters other than whitespace make it invalid.
    de.end().ok()?;
    Some(Digest {
        hash: hasher.finalize(),
        stream,
    })
}

/// A hasher fed through a buffer: canonical JSON comes in pieces of a few
/// bytes (a type mark, a length, a number's digits), and BLAKE3 takes
/// small updates at several times the cost per byte of large ones.
struct Feed {
    buf: Vec<u8>,
    hasher: blake3::Hasher,
}

impl Feed {
    const FLUSH_AT: usize = 16 * 1024;

    fn new() -> Self {
        Feed {
            // Grown on demand: most members are a few bytes.
            buf: Vec::new(),
            hasher: blake3::Hasher::new(),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        if self.buf.len() + bytes.len() > Self::FLUSH_AT {
            self.hasher.update(&self.buf);
            self.buf.clear();
            if bytes.len() > Self::FLUSH_AT {
                self.hasher.update(bytes);
                return;
            }
        }
        self.buf.extend_from_slice(bytes);
    }

    fn finalize(&mut self) -> blake3::Hash {
        self.hasher.update(&self.buf);
        self.buf.clear();
        self.hasher.finalize()
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.hasher.reset();
    }
}

/// Hashes one value into `h` as it is read. `stream` is set only for the
/// top-level value, to note its `stream` member.
struct Canon<'a> {
    h: &'a mut Feed,
    ignore: &'a [Box<[String]>],
    path: &'a mut Vec<String>,
    stream: Option<&'a mut Option<Option<bool>>>,
}

/// What a value was, as far as the `stream` member needs to know.
enum Shape {
    Bool(bool),
    Other,
}

impl<'de> DeserializeSeed<'de> for Canon<'_> {
    type Value = Shape;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Shape, D::Error> {
        de.deserialize_any(self)
    }
}

impl Canon<'_> {
    fn number(self, text: &str) -> Shape {
        self.h.update(b"#");
        self.h.update(&(text.len() as u64).to_le_bytes());
        self.h.update(text.as_bytes());
        Shape::Other
    }
}

/// Whether the member at `path` is left out of the key.
fn ignored(ignore: &[Box<[String]>], path: &[String]) -> bool {
    ignore.iter().any(|f| **f == *path)
}

/// Whether some ignored field lies below `path` (only then are the members
/// of an object there worth comparing with the list).
fn under_ignored(ignore: &[Box<[String]>], path: &[String]) -> bool {
    let depth = path.len();
    ignore
        .iter()
        .any(|f| f.len() > depth && f[..depth] == *path)
}

impl<'de> Visitor<'de> for Canon<'_> {
    type Value = Shape;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<Shape, E> {
        self.h.update(b"n");
        Ok(Shape::Other)
    }

    fn visit_bool<E>(self, b: bool) -> Result<Shape, E> {
        self.h.update(if b { b"t" } else { b"f" });
        Ok(Shape::Bool(b))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Shape, E> {
        Ok(self.number(itoa::Buffer::new().format(n)))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Shape, E> {
        Ok(self.number(itoa::Buffer::new().format(n)))
    }

    fn visit_f64<E>(self, f: f64) -> Result<Shape, E> {
        if f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15 {
            // Integral floats key like integers: 1.0 == 1.
            return Ok(self.number(itoa::Buffer::new().format(f as i64)));
        }
        Ok(self.number(&format!("{f:e}")))
    }

    fn visit_str<E>(self, s: &str) -> Result<Shape, E> {
        self.h.update(b"s");
        self.h.update(&(s.len() as u64).to_le_bytes());
        self.h.update(s.as_bytes());
        Ok(Shape::Other)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
        // Items stream into this hasher; each starts with its type byte,
        // none of which is `]`, so the end needs no count ahead of it.
        self.h.update(b"[");
        loop {
            let item = Canon {
                h: &mut *self.h,
                ignore: self.ignore,
                path: &mut *self.path,
                stream: None,
            };
            if seq.next_element_seed(item)?.is_none() {
                break;
            }
        }
        self.h.update(b"]");
        Ok(Shape::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
        let Canon {
            h,
            ignore,
            path,
            mut stream,
        } = self;
        // Each member's value digested on its own, then sorted by key.
        // One hasher for every member, on the heap: 128 nested levels of
        // ~2 KB hashers on the stack would be a lot for a worker thread.
        // Made only once the object has a member.
        let mut member: Option<Box<Feed>> = None;
        let mut members: Vec<(String, [u8; 32])> = Vec::new();
        let check_ignored = under_ignored(ignore, path);
        while let Some(key) = map.next_key::<String>()? {
            let is_stream = stream.is_some() && key == "stream";
            path.push(key);
            if check_ignored && ignored(ignore, path) {
                path.pop();
                // Still read, to find where it ends (and that it is valid);
                // a `stream` flag counts even when it is not keyed on.
                let shape = if is_stream {
                    let member = member.get_or_insert_with(|| Box::new(Feed::new()));
                    member.reset();
                    map.next_value_seed(Canon {
                        h: member,
                        ignore: &[],
                        path: &mut Vec::new(),
                        stream: None,
                    })?
                } else {
                    map.next_value::<IgnoredAny>()?;
                    Shape::Other
                };
                if is_stream {
                    note_stream(&mut stream, shape);
                }
                continue;
            }
            let member = member.get_or_insert_with(|| Box::new(Feed::new()));
            member.reset();
            let shape = map.next_value_seed(Canon {
                h: &mut *member,
                ignore,
                path: &mut *path,
                stream: None,
            })?;
            let key = path.pop().expect("pushed above");
            if is_stream {
                note_stream(&mut stream, shape);
            }
            members.push((key, *member.finalize().as_bytes()));
        }
        // Stable: equal keys keep their order, and the last one wins.
        members.sort_by(|a, b| a.0.cmp(&b.0));
        let mut kept: Vec<&(String, [u8; 32])> = Vec::with_capacity(members.len());
        for m in &members {
            match kept.last_mut() {
                Some(last) if last.0 == m.0 => *last = m,
                _ => kept.push(m),
            }
        }
        h.update(b"{");
        h.update(&(kept.len() as u64).to_le_bytes());
        for (key, digest) in kept {
            h.update(&(key.len() as u64).to_le_bytes());
            h.update(key.as_bytes());
            h.update(digest);
        }
        Ok(Shape::Other)
    }
}

fn note_stream(stream: &mut Option<&mut Option<Option<bool>>>, shape: Shape) {
    if let Some(slot) = stream.as_deref_mut() {
        *slot = Some(match shape {
            Shape::Bool(b) => Some(b),
            Shape::Other => None,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(list: &[&str]) -> Vec<Box<[String]>> {
        list.iter()
            .map(|f| f.split('.').map(str::to_owned).collect())
            .collect()
    }

    fn d(body: &str) -> Option<blake3::Hash> {
        digest(body.as_bytes(), &[]).map(|d| d.hash)
    }

    #[test]
    fn order_whitespace_and_number_spelling_do_not_matter() {
        assert_eq!(
            d(r#"{"a":1,"b":[1.0,"x",null,true]}"#),
            d(r#" { "b" : [ 1e0 , "x" , null , true ] , "a" : 1.0 } "#)
        );
        assert_ne!(d(r#"{"a":1}"#), d(r#"{"a":2}"#));
        assert_ne!(d(r#"{"a":1.5}"#), d(r#"{"a":1}"#));
        assert_ne!(d(r#"[1,2]"#), d(r#"[2,1]"#));
        assert_ne!(d(r#"{"a":"1"}"#), d(r#"{"a":1}"#));
    }

    #[test]
    fn structure_is_never_ambiguous() {
        // Nesting moved between levels, empty containers, keys and strings
        // with the same bytes: all distinct.
        let docs = [
            "[]",
            "[[]]",
            "[[],[]]",
            "[[[]]]",
            "{}",
            "[{}]",
            r#"{"a":[]}"#,
            r#"{"a":[],"b":[]}"#,
            r#"{"a":[[]]}"#,
            r#"[{"a":1}]"#,
            r#"[{"a":1},{}]"#,
            r#"[{"a":1,"b":{}}]"#,
            r#""a""#,
            r#"["a"]"#,
            r#"{"a":"a"}"#,
            r#"{"aa":""}"#,
            "null",
            "[null]",
            "0",
            "[0]",
        ];
        let mut seen = std::collections::HashSet::new();
        for doc in docs {
            assert!(seen.insert(d(doc).unwrap()), "{doc} collides");
        }
    }

    #[test]
    fn the_last_of_duplicate_members_wins() {
        assert_eq!(d(r#"{"a":1,"a":2}"#), d(r#"{"a":2}"#));
        assert_ne!(d(r#"{"a":1,"a":2}"#), d(r#"{"a":1}"#));
    }

    #[test]
    fn ignored_fields_are_left_out_at_their_path_only() {
        let ignore = fields(&["keep_alive", "options.num_thread"]);
        let k = |b: &str| digest(b.as_bytes(), &ignore).unwrap().hash;
        assert_eq!(
            k(r#"{"m":1,"options":{"t":1,"num_thread":4},"keep_alive":"5m"}"#),
            k(r#"{"m":1,"options":{"t":1}}"#)
        );
        // The same name elsewhere is kept.
        assert_ne!(k(r#"{"m":1,"x":{"keep_alive":1}}"#), k(r#"{"m":1,"x":{}}"#));
        // An ignored member must still be valid JSON.
        assert!(digest(br#"{"keep_alive": nope}"#, &ignore).is_none());
    }

    #[test]
    fn the_stream_member_is_noted_at_the_top_only() {
        let s = |b: &str| digest(b.as_bytes(), &[]).unwrap().stream;
        assert_eq!(s(r#"{"stream":true}"#), Some(Some(true)));
        assert_eq!(s(r#"{"stream":false}"#), Some(Some(false)));
        assert_eq!(s(r#"{"stream":"yes"}"#), Some(None));
        assert_eq!(s(r#"{"x":{"stream":true}}"#), None);
        assert_eq!(s(r#"[{"stream":true}]"#), None);
        let ignore = fields(&["stream"]);
        let ignored = digest(br#"{"stream":true}"#, &ignore).unwrap();
        assert_eq!(ignored.stream, Some(Some(true)));
    }

    #[test]
    fn invalid_or_too_deep_bodies_are_not_digested() {
        assert!(d("{not json").is_none());
        assert!(d(r#"{"a":1} trailing"#).is_none());
        assert!(d("").is_none());
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(d(&deep).is_none());
        let deep_objects = format!("{}1{}", r#"{"a":"#.repeat(200), "}".repeat(200));
        assert!(d(&deep_objects).is_none());
        let fine = format!("{}1{}", r#"{"a":"#.repeat(100), "}".repeat(100));
        assert!(d(&fine).is_some());
    }

    mod properties {
        use super::super::digest;
        use proptest::prelude::*;
        use serde_json::{Map, Value};

        /// JSON documents of integers, strings, booleans and nulls in
        /// nested arrays and objects (floats left out: their equality is
        /// by value, tested above).
        fn document() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                "[a-z\\\\\"é\\u{1F600} ]{0,8}".prop_map(Value::String),
            ];
            leaf.prop_recursive(5, 64, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    prop::collection::btree_map("[a-z]{0,4}", inner, 0..6)
                        .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
                ]
            })
        }

        /// `v` written with every object's members in reverse order and
        /// spaces between tokens.
        fn reordered(v: &Value) -> String {
            match v {
                Value::Array(items) => {
                    let parts: Vec<String> = items.iter().map(reordered).collect();
                    format!("[ {} ]", parts.join(" , "))
                }
                Value::Object(map) => {
                    let parts: Vec<String> = map
                        .iter()
                        .rev()
                        .map(|(k, v)| format!("{} : {}", Value::from(k.as_str()), reordered(v)))
                        .collect();
                    format!("{{ {} }}", parts.join(" , "))
                }
                other => other.to_string(),
            }
        }

        proptest! {
            #[test]
            fn spelling_does_not_change_the_digest(v in document()) {
                let compact = digest(v.to_string().as_bytes(), &[]).expect("valid JSON").hash;
                let spaced = digest(reordered(&v).as_bytes(), &[]).expect("valid JSON").hash;
                let pretty = serde_json::to_string_pretty(&v).unwrap();
                let pretty = digest(pretty.as_bytes(), &[]).expect("valid JSON").hash;
                prop_assert_eq!(compact, spaced);
                prop_assert_eq!(compact, pretty);
            }

            #[test]
            fn different_documents_have_different_digests(a in document(), b in document()) {
                let da = digest(a.to_string().as_bytes(), &[]).unwrap().hash;
                let db = digest(b.to_string().as_bytes(), &[]).unwrap().hash;
                prop_assert_eq!(a == b, da == db);
            }

            #[test]
            fn any_bytes_are_digested_or_refused_without_panicking(
                bytes in prop::collection::vec(any::<u8>(), 0..256)
            ) {
                let _ = digest(&bytes, &[]);
            }

            #[test]
            fn json_like_bytes_are_digested_or_refused_without_panicking(
                text in "[\\[\\]{}:,\"a-c0-9.eE+\\- \\\\]{0,128}"
            ) {
                let parsed = serde_json::from_str::<Value>(&text).is_ok();
                let digested = digest(text.as_bytes(), &[]).is_some();
                // Valid JSON nested within the bound is always digested.
                let opened = text.matches(['[', '{']).count();
                prop_assert!(digested || !parsed || opened > 100, "valid JSON refused: {}", text);
            }
        }
    }
}
