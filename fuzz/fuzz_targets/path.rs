//! The request-target normalizer: never panics, and what it returns is a
//! fixed point without dot segments or repeated slashes.
#![no_main]

use hyperion::path::normalize;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|path: &str| {
    if let Ok(once) = normalize(path) {
        let twice = normalize(&once).expect("a normalized path normalizes");
        assert_eq!(once, twice);
        assert!(!once.split('/').any(|s| s == "." || s == ".."));
        assert!(!once.contains("//"));
    }
});
