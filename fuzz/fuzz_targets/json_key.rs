//! The canonical JSON digest of request bodies: any bytes are digested or
//! refused, never a panic, and re-serializing a document that digests
//! changes nothing (order and whitespace are not part of the key).
#![no_main]

use hyperion::cache::fuzzing::canonical_json_digest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let ignore: Vec<Box<[String]>> = vec![
        vec!["keep_alive".to_owned()].into_boxed_slice(),
        vec!["options".to_owned(), "num_thread".to_owned()].into_boxed_slice(),
    ];
    let Some(d) = canonical_json_digest(body, &ignore) else {
        return;
    };
    // Whitespace is not part of the key: a document serde_json wrote
    // compact and pretty digests alike. (The original's own spelling is
    // not compared: serde_json's f64 reading rounds numbers the digest
    // keeps exact, such as a 53-digit integer.)
    let _ = d;
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) {
        let compact = serde_json::to_vec(&value).expect("a Value serializes");
        let pretty = serde_json::to_vec_pretty(&value).expect("a Value serializes");
        let a = canonical_json_digest(&compact, &ignore);
        let b = canonical_json_digest(&pretty, &ignore);
        assert_eq!(a.map(|d| d.hash), b.map(|d| d.hash));
    }
});
