//! Signatures on what the fleet keeps in Redis and sends through it, so
//! that whoever can write to Redis (a neighbour sharing it, a leaked
//! password, a compromised host on its network) cannot make an instance
//! serve an answer or obey a purge it did not get from the fleet.
//!
//! Both are keyed BLAKE3 MACs with keys derived from the fleet's secret
//! (`[cache.redis] secret_env` / `secret_file`), one key for stored values
//! and one for messages, so neither can be passed off as the other:
//!
//! - a stored value is `mac ‖ value`, the MAC over the Redis key's name and
//!   the value, so a signed value moved under another name does not verify;
//! - a message is `v1 <unix ms> <mac hex> <text>`, the MAC over the channel,
//!   the time and the text; one older or newer than `MESSAGE_WINDOW` is
//!   refused, which bounds how long a captured message can be replayed.
//!
//! Comparisons are constant-time (`blake3::Hash`'s equality). This module
//! does not talk to Redis nor decode what it verifies.

use std::time::Duration;

use crate::policy::FleetSecret;

/// Bytes of MAC in front of every stored value.
pub const MAC_LEN: usize = 32;

/// How far a message's time may be from this instance's clock: covers
/// delivery and clock skew between the fleet's hosts.
pub const MESSAGE_WINDOW: Duration = Duration::from_secs(60);

/// The keys of one fleet.
pub struct Seal {
    values: [u8; 32],
    messages: [u8; 32],
}

impl Seal {
    pub fn new(secret: &FleetSecret) -> Seal {
        Seal {
            values: blake3::derive_key("hyperion 2026-12 shared tier values", &secret.0),
            messages: blake3::derive_key("hyperion 2026-12 shared tier messages", &secret.0),
        }
    }

    fn value_mac(&self, name: &str, value: &[u8]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.values);
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(value);
        h.finalize()
    }

    /// `value` signed for the Redis key `name`.
    pub fn seal_value(&self, name: &str, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAC_LEN + value.len());
        out.extend_from_slice(self.value_mac(name, value).as_bytes());
        out.extend_from_slice(value);
        out
    }

    /// The value `sealed` holds, if it was signed for `name` with this
    /// fleet's secret.
    pub fn open_value<'a>(&self, name: &str, sealed: &'a [u8]) -> Option<&'a [u8]> {
        if sealed.len() < MAC_LEN {
            return None;
        }
        let (mac, value) = sealed.split_at(MAC_LEN);
        let mac: [u8; MAC_LEN] = mac.try_into().ok()?;
        (self.value_mac(name, value) == blake3::Hash::from_bytes(mac)).then_some(value)
    }

    fn message_mac(&self, channel: &str, millis: u64, text: &str) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.messages);
        h.update(&(channel.len() as u64).to_le_bytes());
        h.update(channel.as_bytes());
        h.update(&millis.to_le_bytes());
        h.update(text.as_bytes());
        h.finalize()
    }

    /// `text` signed for `channel` at `now_ms` (Unix milliseconds).
    pub fn seal_message(&self, channel: &str, text: &str, now_ms: u64) -> String {
        let mac = self.message_mac(channel, now_ms, text);
        format!("v1 {now_ms} {} {text}", mac.to_hex())
    }

    /// The text of a message on `channel`, if this fleet signed it within
    /// `MESSAGE_WINDOW` of `now_ms`.
    pub fn open_message<'a>(
        &self,
        channel: &str,
        message: &'a str,
        now_ms: u64,
    ) -> Option<&'a str> {
        let rest = message.strip_prefix("v1 ")?;
        let (millis, rest) = rest.split_once(' ')?;
        let (mac_hex, text) = rest.split_once(' ')?;
        if millis.len() > 20 || !millis.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let millis: u64 = millis.parse().ok()?;
        let window = MESSAGE_WINDOW.as_millis() as u64;
        if millis.abs_diff(now_ms) > window {
            return None;
        }
        let mac = blake3::Hash::from_hex(mac_hex).ok()?;
        (self.message_mac(channel, millis, text) == mac).then_some(text)
    }
}

/// The time messages are signed with and checked against.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `prefix` with the characters `SCAN MATCH` reads as a pattern escaped,
/// so a fleet's prefix matches only itself.
pub fn glob_escape(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 4);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^' | '-') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal(secret: &str) -> Seal {
        Seal::new(&FleetSecret::from_text(secret))
    }

    #[test]
    fn values_verify_only_under_their_name_and_secret() {
        let s = seal("a fleet secret long enough to be hard to guess");
        let sealed = s.seal_value("h:e:00", b"entry");
        assert_eq!(s.open_value("h:e:00", &sealed), Some(&b"entry"[..]));
        assert_eq!(
            s.open_value("h:e:01", &sealed),
            None,
            "moved to another key"
        );
        let other = seal("another fleet's secret, just as long as the first");
        assert_eq!(other.open_value("h:e:00", &sealed), None);
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(s.open_value("h:e:00", &flipped), None);
        assert_eq!(s.open_value("h:e:00", b"short"), None);
        assert_eq!(s.open_value("h:e:00", b""), None);
    }

    #[test]
    fn messages_verify_within_the_window_on_their_channel() {
        let s = seal("a fleet secret long enough to be hard to guess");
        let now = 1_800_000_000_000;
        let m = s.seal_message("h:events", "purge abc all", now);
        assert_eq!(
            s.open_message("h:events", &m, now + 1000),
            Some("purge abc all")
        );
        assert_eq!(
            s.open_message("h:events", &m, now + 61_000),
            None,
            "too old"
        );
        assert_eq!(s.open_message("x:events", &m, now), None, "another channel");
        assert_eq!(
            s.open_message("h:events", "purge abc all", now),
            None,
            "unsigned"
        );
        let forged = m.replace("purge abc all", "purge abc route x");
        assert_eq!(s.open_message("h:events", &forged, now), None);
        let later = m.replacen(&now.to_string(), &(now + 5).to_string(), 1);
        assert_eq!(
            s.open_message("h:events", &later, now),
            None,
            "time is signed"
        );
    }

    #[test]
    fn prefixes_match_only_themselves_in_scan() {
        assert_eq!(glob_escape("hyperion:"), "hyperion:");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_refused_or_verified_without_a_panic(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
            text in ".{0,120}",
        ) {
            let s = seal("a fleet secret long enough to be hard to guess");
            proptest::prop_assert!(s.open_value("k", &bytes).is_none());
            proptest::prop_assert!(s.open_message("c", &text, 0).is_none());
        }
    }
}
