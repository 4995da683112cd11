//! The policy parser and validator: any text gives a policy or one error
//! line, never a panic. (Files it names are looked up relative to a
//! directory that does not exist, so nothing outside is read.)
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Err(e) = hyperion::Policy::parse("/nonexistent-fuzz-dir/proxy.toml", text) {
        let _ = e.to_string();
    }
});
