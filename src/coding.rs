//! The content codings Hyperion can produce, as values: what the policy's
//! `[compression] algorithms` names and what `Content-Encoding` says.
//!
//! Only the names: negotiation and the coder are `compress`'s, so the
//! policy can name a coding without importing anything above it.

use http::HeaderValue;

/// A content coding Hyperion can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Coding {
    Br,
    Gzip,
}

impl Coding {
    pub fn as_str(self) -> &'static str {
        match self {
            Coding::Br => "br",
            Coding::Gzip => "gzip",
        }
    }

    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(self.as_str())
    }
}
