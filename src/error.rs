//! `ProxyError`: everything that can stop a request on its way through the
//! proxy, and the one function that turns it into a status and a JSON body.
//!
//! Client-facing messages never name internal servers or addresses; the
//! detailed cause is kept in the error for the log.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

/// A request that could not be proxied.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches this request")]
    NoRoute,
    #[error("this endpoint is not exposed here (route `{route}` denies it)")]
    Denied { route: String },
    /// No key, or one Hyperion did not issue, on a route that takes keys.
    #[error("{}", if *presented { "the API key is not valid" } else { "an API key is required: send Authorization: Bearer <key> (or x-api-key: <key>)" })]
    Unauthorized { presented: bool },
    #[error("the request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("the request header section is larger than the limit of {limit} bytes")]
    HeadersTooLarge { limit: usize },
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("the request body could not be read from the client: {0}")]
    ClientBody(String),
    #[error("the request body sent nothing for {}s", timeout.as_secs_f64())]
    BodyTimeout { timeout: Duration },
    #[error("the proxy holds as many request bodies as it may; retry shortly")]
    Overloaded,
    #[error("upstream {server} is unavailable: {reason}")]
    UpstreamUnavailable { server: String, reason: String },
    #[error("upstream {server} did not {phase} within {timeout:?}")]
    UpstreamTimeout {
        server: String,
        phase: TimeoutPhase,
        timeout: Duration,
    },
    #[error("upstream {server} failed: {reason}")]
    UpstreamFailed { server: String, reason: String },
    #[error("the request said only-if-cached and nothing usable is stored")]
    NotCached,
    #[error("a precondition of the request (If-Match or If-Unmodified-Since) does not hold")]
    PreconditionFailed,
    #[error("the request's Accept-Encoding refuses identity and every coding Hyperion offers")]
    NotAcceptable,
    #[error("the stored answer does not decode as its Content-Encoding ({coding}) says")]
    UndecodableBody { coding: &'static str },
    #[error("rate limit `{limiter}` exceeded; retry in {}s", crate::limits::whole_seconds(*retry_after))]
    RateLimited {
        limiter: String,
        retry_after: Duration,
    },
    #[error("every server of upstream `{upstream}` is busy; waited {}s for a free slot", waited.as_secs())]
    UpstreamBusy {
        upstream: String,
        waited: Duration,
        retry_after: Duration,
    },
    #[error("{queued} requests of this client already wait for upstream `{upstream}`; retry in {}s", crate::limits::whole_seconds(*retry_after))]
    TenantQueueFull {
        upstream: String,
        queued: u32,
        retry_after: Duration,
    },
    #[error("this key already has {max} requests in progress, as many as its tier allows")]
    TooManyConcurrent { max: u32 },
    #[error("no server of upstream `{upstream}` is healthy")]
    NoHealthyServer { upstream: String },
    #[error("model `{model}` is not served by upstream `{upstream}`")]
    UnknownModel {
        upstream: String,
        model: String,
        /// What the pool does serve, for the client to choose from.
        served: Vec<String>,
    },
}

/// What an upstream did not do in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutPhase {
    /// `connect_timeout`: no connection. Nothing was generated.
    Connect,
    /// `response_timeout`: connected and sent, no response head. The
    /// backend may have worked all along.
    ResponseHead,
}

impl TimeoutPhase {
    /// How the client's error message says it ("did not … in time").
    pub fn as_str(self) -> &'static str {
        match self {
            TimeoutPhase::Connect => "accept the connection",
            TimeoutPhase::ResponseHead => "send response headers",
        }
    }
}

impl std::fmt::Display for TimeoutPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl ProxyError ===

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute | ProxyError::UnknownModel { .. } => StatusCode::NOT_FOUND,
            ProxyError::Denied { .. } => StatusCode::FORBIDDEN,
            ProxyError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::BadRequest(_) | ProxyError::ClientBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamUnavailable { .. } | ProxyError::UpstreamFailed { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            // RFC 9111 §5.2.1.7.
            ProxyError::NotCached => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            ProxyError::NotAcceptable => StatusCode::NOT_ACCEPTABLE,
            ProxyError::UndecodableBody { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::RateLimited { .. }
            | ProxyError::TenantQueueFull { .. }
            | ProxyError::TooManyConcurrent { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::UpstreamBusy { .. } | ProxyError::NoHealthyServer { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// Stable machine-readable code for the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no_route",
            ProxyError::Denied { .. } => "denied",
            ProxyError::Unauthorized { .. } => "invalid_api_key",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::HeadersTooLarge { .. } => "headers_too_large",
            ProxyError::BadRequest(_) | ProxyError::ClientBody(_) => "bad_request",
            ProxyError::BodyTimeout { .. } => "body_timeout",
            ProxyError::Overloaded => "overloaded",
            ProxyError::UpstreamUnavailable { .. } => "upstream_unavailable",
            ProxyError::UpstreamTimeout { .. } => "upstream_timeout",
            ProxyError::UpstreamFailed { .. } => "upstream_error",
            ProxyError::NotCached => "not_cached",
            ProxyError::PreconditionFailed => "precondition_failed",
            ProxyError::NotAcceptable => "not_acceptable",
            ProxyError::UndecodableBody { .. } => "upstream_bad_encoding",
            ProxyError::RateLimited { .. } => "rate_limited",
            ProxyError::UpstreamBusy { .. } => "upstream_busy",
            ProxyError::TenantQueueFull { .. } => "queue_full",
            ProxyError::TooManyConcurrent { .. } => "too_many_concurrent",
            ProxyError::NoHealthyServer { .. } => "no_healthy_upstream",
            ProxyError::UnknownModel { .. } => "unknown_model",
        }
    }

    /// When the client may try again (`Retry-After`), for the errors that know.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProxyError::RateLimited { retry_after, .. }
            | ProxyError::UpstreamBusy { retry_after, .. }
            | ProxyError::TenantQueueFull { retry_after, .. } => Some(*retry_after),
            // The budget frees as soon as bodies in hand are sent on; a
            // key's slot when one of its answers ends.
            ProxyError::Overloaded | ProxyError::TooManyConcurrent { .. } => {
                Some(Duration::from_secs(1))
            }
            _ => None,
        }
    }

    /// What the client is told: the cause without internal addresses.
    fn public_message(&self) -> String {
        match self {
            ProxyError::UpstreamUnavailable { .. } => {
                "the upstream server refused the connection or could not be reached".to_owned()
            }
            ProxyError::UpstreamTimeout { phase, timeout, .. } => {
                format!(
                    "the upstream server did not {phase} within {}s",
                    timeout.as_secs_f64()
                )
            }
            ProxyError::UpstreamFailed { .. } => {
                "the upstream server closed the connection or sent an invalid response".to_owned()
            }
            ProxyError::NoHealthyServer { .. } => {
                "no upstream server is healthy right now; try again shortly".to_owned()
            }
            ProxyError::UnknownModel { model, .. } => {
                format!("model `{model}` is not served here; `models` lists those that are")
            }
            other => other.to_string(),
        }
    }

    /// The response the client receives: status, JSON body, request id.
    /// (The body as bytes: the handler wraps it in its body type, so this
    /// module needs nothing of `body`.)
    pub fn to_response(&self, request_id: &HeaderValue) -> Response<Bytes> {
        let mut body = serde_json::json!({
            "error": {
                "code": self.code(),
                "message": self.public_message(),
                "request_id": request_id.to_str().unwrap_or(""),
            }
        });
        if let ProxyError::UnknownModel { served, .. } = self {
            body["error"]["models"] = served.as_slice().into();
        }
        if let ProxyError::Unauthorized { .. } = self {
            // OpenAI's shape, so its clients raise their authentication
            // error with this message.
            body["error"]["type"] = "invalid_request_error".into();
            body["error"]["param"] = serde_json::Value::Null;
        }
        let mut bytes = serde_json::to_vec(&body).expect("JSON values serialize");
        bytes.push(b'\n');
        let mut resp = Response::new(Bytes::from(bytes));
        *resp.status_mut() = self.status();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(crate::headers::X_REQUEST_ID, request_id.clone());
        if let ProxyError::BodyTimeout { .. } = self {
            // RFC 9110 §15.5.9: the server closes the connection; the
            // rest of the body is not waited for.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let ProxyError::Unauthorized { .. } = self {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"hyperion\""),
            );
        }
        if let Some(after) = self.retry_after() {
            let secs = crate::limits::whole_seconds(after).max(1);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
