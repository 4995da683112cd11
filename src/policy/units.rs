//! The value types `proxy.toml` writes as strings: durations (`"250ms"`),
//! sizes (`"64KB"`, powers of 1024) and rates (`"60/min"`).
//!
//! Each parses strictly once, at load time, and deserializes through serde so a
//! bad value is reported by toml with its line and column. Nothing here knows
//! which key a value belongs to.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// A duration written as an integer and a unit: `ms`, `s`, `m`, `h`, `d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dur(pub Duration);

/// A byte size written as an integer and a unit: `B`, `KB`, `MB`, `GB` (powers of 1024).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size(pub u64);

/// A rate written as `N/unit`, unit one of `sec`, `min`, `hour`, `day`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rate {
    pub count: u64,
    pub per: Duration,
}

// === impl Dur ===

impl FromStr for Dur {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (n, unit) = split_number(s).ok_or_else(|| {
            format!("`{s}` is not a duration — write a whole number and a unit, e.g. \"250ms\", \"30s\", \"5m\", \"2h\"")
        })?;
        let per = match unit {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86_400),
            _ => {
                return Err(format!(
                    "`{s}` has an unknown duration unit `{unit}` — use ms, s, m, h or d"
                ))
            }
        };
        per.checked_mul(u32::try_from(n).map_err(|_| format!("`{s}` is too long"))?)
            .map(Dur)
            .ok_or_else(|| format!("`{s}` is too long"))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        for (unit, size) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1000),
        ] {
            if ms >= size && ms.is_multiple_of(size) {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

// === impl Size ===

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (n, unit) = split_number(s).ok_or_else(|| {
            format!("`{s}` is not a size — write a whole number and a unit, e.g. \"512B\", \"64KB\", \"8MB\", \"1GB\"")
        })?;
        let mult: u64 = match unit.to_ascii_uppercase().as_str() {
            "B" => 1,
            "KB" | "K" | "KIB" => 1 << 10,
            "MB" | "M" | "MIB" => 1 << 20,
            "GB" | "G" | "GIB" => 1 << 30,
            _ => {
                return Err(format!(
                    "`{s}` has an unknown size unit `{unit}` — use B, KB, MB or GB"
                ))
            }
        };
        n.checked_mul(mult)
            .map(Size)
            .ok_or_else(|| format!("`{s}` is too large"))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, size) in [("GB", 1u64 << 30), ("MB", 1 << 20), ("KB", 1 << 10)] {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}B", self.0)
    }
}

// === impl Rate ===

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("`{s}` is not a rate — write N/unit with unit sec, min, hour or day, e.g. \"60/min\"")
        };
        let (n, unit) = s.split_once('/').ok_or_else(bad)?;
        let count: u64 = n.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "sec" | "s" | "second" => Duration::from_secs(1),
            "min" | "m" | "minute" => Duration::from_secs(60),
            "hour" | "h" => Duration::from_secs(3600),
            "day" | "d" => Duration::from_secs(86_400),
            _ => return Err(bad()),
        };
        if count == 0 {
            return Err(format!(
                "`{s}` allows nothing — the count must be at least 1"
            ));
        }
        Ok(Rate { count, per })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "sec",
            60 => "min",
            3600 => "hour",
            _ => "day",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// Splits `"250ms"` into `(250, "ms")`; `None` when there is no leading integer or no unit.
fn split_number(s: &str) -> Option<(u64, &str)> {
    let s = s.trim();
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || digits == s.len() {
        return None;
    }
    let n = s[..digits].parse().ok()?;
    Some((n, s[digits..].trim_start()))
}

/// Deserializes any `FromStr<Err = String>` type from a TOML string, so toml
/// attaches the value's line and column to the message.
struct FromStrVisitor<T>(std::marker::PhantomData<T>, &'static str);

impl<T: FromStr<Err = String>> Visitor<'_> for FromStrVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.1)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }
}

macro_rules! deserialize_from_str {
    ($ty:ty, $expecting:literal) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_str(FromStrVisitor(std::marker::PhantomData, $expecting))
            }
        }
    };
}

deserialize_from_str!(Dur, "a duration string such as \"30s\"");
deserialize_from_str!(Size, "a size string such as \"64KB\"");
deserialize_from_str!(Rate, "a rate string such as \"60/min\"");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            "250ms".parse::<Dur>().unwrap().0,
            Duration::from_millis(250)
        );
        assert_eq!("30s".parse::<Dur>().unwrap().0, Duration::from_secs(30));
        assert_eq!("5m".parse::<Dur>().unwrap().0, Duration::from_secs(300));
        assert_eq!("2h".parse::<Dur>().unwrap().0, Duration::from_secs(7200));
        assert_eq!("0s".parse::<Dur>().unwrap().0, Duration::ZERO);
        for bad in ["", "30", "s", "1.5s", "-1s", "5 minutes", "10x"] {
            assert!(bad.parse::<Dur>().is_err(), "{bad}");
        }
        assert_eq!(Dur(Duration::from_secs(300)).to_string(), "5m");
        assert_eq!(Dur(Duration::from_millis(1500)).to_string(), "1500ms");
    }

    #[test]
    fn sizes() {
        assert_eq!("512B".parse::<Size>().unwrap().0, 512);
        assert_eq!("64KB".parse::<Size>().unwrap().0, 64 << 10);
        assert_eq!("8MB".parse::<Size>().unwrap().0, 8 << 20);
        assert_eq!("1GB".parse::<Size>().unwrap().0, 1 << 30);
        for bad in ["", "12", "MB", "1.5MB", "3TB", "99999999999999999999GB"] {
            assert!(bad.parse::<Size>().is_err(), "{bad}");
        }
        assert_eq!(Size(32 << 10).to_string(), "32KB");
    }

    #[test]
    fn rates() {
        let r: Rate = "60/min".parse().unwrap();
        assert_eq!((r.count, r.per), (60, Duration::from_secs(60)));
        let r: Rate = "100000/hour".parse().unwrap();
        assert_eq!((r.count, r.per), (100_000, Duration::from_secs(3600)));
        for bad in ["60", "60/fortnight", "/min", "0/min", "x/sec"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }
}
