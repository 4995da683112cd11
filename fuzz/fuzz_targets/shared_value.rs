//! What the shared tier reads from Redis: the MAC check of values and
//! messages (nothing unsigned verifies), and the entry decoder behind it
//! (any bytes decode or are refused, never a panic).
#![no_main]

use bytes::Bytes;
use hyperion::cache::fuzzing::decode_shared_value;
use hyperion::policy::FleetSecret;
use hyperion::shared::Seal;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let seal = Seal::new(&FleetSecret::from_text("a fuzzing secret, 32 bytes or more"));
    assert!(seal.open_value("h:e:00", data).is_none());
    if let Ok(text) = std::str::from_utf8(data) {
        assert!(seal.open_message("h:events", text, 0).is_none());
    }
    // The decoder sees only verified values; fuzz it directly, and through
    // a value this fleet sealed.
    let _ = decode_shared_value(&Bytes::copy_from_slice(data));
    let sealed = seal.seal_value("h:e:00", data);
    let opened = seal.open_value("h:e:00", &sealed).expect("a sealed value opens");
    let _ = decode_shared_value(&Bytes::copy_from_slice(opened));
});
