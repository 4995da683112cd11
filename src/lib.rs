//! Hyperion: a caching reverse proxy for AI backends (Ollama, OpenAI-compatible
//! servers, FastAPI), driven by one policy file.
//!
//! The library holds everything; the `hyperion` binary only parses arguments,
//! loads the policy, binds listeners and handles signals. Tests start the proxy
//! in-process through [`serve`] on listeners bound to port 0.
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

pub mod access_log;
pub mod admin;
pub mod body;
pub mod cache;
pub mod clock;
pub mod coding;
pub mod compress;
pub mod conn;
pub mod error;
pub mod generation;
pub mod handler;
pub mod headers;
pub mod instance;
pub mod limits;
pub mod path;
pub mod policy;
pub mod progress;
pub mod protect;
pub mod route;
pub mod server;
pub mod shared;
pub mod telemetry;
pub mod tunnel;
pub mod upstream;

pub use access_log::LogSink;
pub use handler::Proxy;
pub use instance::{Server, ServerBuilder, StartError};
pub use policy::{Policy, PolicyError};
pub use server::{serve, serve_on, Transport};
