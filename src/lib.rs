//! Hyperion: a caching reverse proxy for AI backends (Ollama, OpenAI-compatible
//! servers, FastAPI), driven by one policy file.
//!
//! The library holds everything; the `hyperion` binary only parses arguments,
//! sets up logging and runs a [`Server`] until a signal. The tests start the
//! same [`Server`] on loopback ports.
//!
//! The public surface is what the tests, benches and fuzz targets use:
//! [`Server`] and [`Policy`] to run a proxy; [`serve_on`] to run one worker's
//! connections on listeners of your own (the `stream_delay` bench);
//! `generation` (policy generations and reloads); and the modules whose
//! parts are measured or fuzzed alone: `cache`, `coding`, `compress`,
//! `limits`, `path`, `policy`, `protect`, `shared`, `telemetry`, `upstream`.
//! The request path (`handler`), connections (`server`, `conn`), bodies,
//! headers, the admin API and the access log are the crate's own.
#![forbid(unsafe_code)]

/// Boxes a future built in its box: the allocation comes first, so the
/// compiler makes the future in place. `Box::pin(make())` makes it on the
/// stack and copies it over whole, every time (up to 12 KB on the request
/// path). For large futures awaited once per request.
macro_rules! boxed_in_place {
    ($future:expr) => {
        ::std::boxed::Box::into_pin(::std::boxed::Box::write(
            ::std::boxed::Box::new_uninit(),
            $future,
        ))
    };
}

pub(crate) mod access_log;
pub(crate) mod admin;
pub mod auth;
pub(crate) mod body;
pub mod cache;
pub(crate) mod clock;
pub mod coding;
pub mod compress;
pub(crate) mod conn;
pub(crate) mod error;
pub mod generation;
pub(crate) mod handler;
pub(crate) mod headers;
pub(crate) mod instance;
pub mod limits;
pub mod otel;
pub mod path;
pub mod policy;
pub(crate) mod progress;
pub mod protect;
pub(crate) mod route;
pub(crate) mod server;
pub mod shared;
pub mod telemetry;
pub(crate) mod tunnel;
pub mod upstream;
pub mod usage;

pub use access_log::LogSink;
#[cfg(feature = "test-clock")]
pub use clock::Skew;
pub use handler::Proxy;
pub use instance::{Server, ServerBuilder, StartError};
pub use policy::{Policy, PolicyError};
pub use server::{serve, serve_on, Transport};
