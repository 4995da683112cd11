//! Hyperion: a caching reverse proxy for AI backends.
#![forbid(unsafe_code)]

pub mod policy;
pub mod route;
