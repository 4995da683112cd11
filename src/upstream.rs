//! Upstream pools: which server gets a request, and sending it there with the
//! pool's connect and response timeouts over pooled keep-alive connections.
//!
//! Choice is smooth weighted round-robin over a schedule computed once, so a
//! pick is one atomic increment. Health, retries and other strategies belong
//! to later work; this module does not read or change response bodies.

use std::error::Error as StdError;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{PathAndQuery, Uri};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::{BodyTooLarge, ClientBodyError, RequestBody};
use crate::error::ProxyError;
use crate::policy::{UpstreamPolicy, UpstreamServer};

/// How long an unused upstream connection stays pooled. Below the 5 s
/// keep-alive of uvicorn (FastAPI's server), so the proxy never reuses a
/// connection the upstream is closing at the same moment.
const POOL_IDLE: Duration = Duration::from_secs(4);

/// One `[upstreams.NAME]` at run time.
pub struct UpstreamPool {
    pub policy: Arc<UpstreamPolicy>,
    client: Client<HttpConnector, RequestBody>,
    /// Server indices in smooth weighted round-robin order, one cycle long.
    schedule: Box<[usize]>,
    next: AtomicUsize,
}

// === impl UpstreamPool ===

impl UpstreamPool {
    pub fn new(policy: Arc<UpstreamPolicy>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(policy.connect_timeout));
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        let weights: Vec<u32> = policy.servers.iter().map(|s| s.weight).collect();
        UpstreamPool {
            schedule: smooth_weighted_schedule(&weights).into_boxed_slice(),
            policy,
            client,
            next: AtomicUsize::new(0),
        }
    }

    /// The next server in weighted round-robin order.
    pub fn pick(&self) -> &UpstreamServer {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        &self.policy.servers[self.schedule[n % self.schedule.len()]]
    }

    /// The absolute URI hyper's client needs: the server's authority with the
    /// request's own path and query.
    pub fn target(server: &UpstreamServer, pq: Option<&PathAndQuery>) -> Uri {
        Uri::builder()
            .scheme(server.scheme.clone())
            .authority(server.authority.clone())
            .path_and_query(
                pq.cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
            )
            .build()
            .expect("scheme, authority and path are each valid")
    }

    /// Sends `req` (already addressed to `server`) and waits for the response
    /// head, at most `response_timeout`.
    pub async fn send(
        &self,
        server: &UpstreamServer,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let timeout = self.policy.response_timeout;
        match tokio::time::timeout(timeout, self.client.request(req)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(classify(server, &e, self.policy.connect_timeout)),
            Err(_) => Err(ProxyError::UpstreamTimeout {
                server: server.url.to_string(),
                phase: "send response headers",
                timeout,
            }),
        }
    }
}

/// Maps a client error to what the client is told.
fn classify(
    server: &UpstreamServer,
    e: &hyper_util::client::legacy::Error,
    connect_timeout: Duration,
) -> ProxyError {
    let mut source: Option<&(dyn StdError + 'static)> = e.source();
    let mut timed_out = false;
    while let Some(err) = source {
        if let Some(too_large) = err.downcast_ref::<BodyTooLarge>() {
            return ProxyError::BodyTooLarge {
                limit: too_large.limit,
            };
        }
        if let Some(client) = err.downcast_ref::<ClientBodyError>() {
            return ProxyError::ClientBody(client.to_string());
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            timed_out |= io.kind() == std::io::ErrorKind::TimedOut;
        }
        source = err.source();
    }
    let reason = error_chain(e);
    if e.is_connect() {
        if timed_out {
            return ProxyError::UpstreamTimeout {
                server: server.url.to_string(),
                phase: "accept the connection",
                timeout: connect_timeout,
            };
        }
        return ProxyError::UpstreamUnavailable {
            server: server.url.to_string(),
            reason,
        };
    }
    ProxyError::UpstreamFailed {
        server: server.url.to_string(),
        reason,
    }
}

/// "outer: inner: innermost", for logs.
pub fn error_chain(e: &dyn StdError) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(err) = source {
        let s = err.to_string();
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        source = err.source();
    }
    out
}

/// Smooth weighted round-robin (as nginx does it), unrolled into one cycle:
/// weights 5,1,1 give a,a,b,a,c,a,a rather than a,a,a,a,a,b,c.
fn smooth_weighted_schedule(weights: &[u32]) -> Vec<usize> {
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, &w) in current.iter_mut().zip(weights) {
            *c += i64::from(w);
        }
        let (best, _) = current
            .iter()
            .enumerate()
            .max_by_key(|&(i, &c)| (c, std::cmp::Reverse(i)))
            .expect("a pool has at least one server");
        current[best] -= total;
        out.push(best);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_smooth_and_weighted() {
        assert_eq!(smooth_weighted_schedule(&[1]), vec![0]);
        assert_eq!(smooth_weighted_schedule(&[1, 1, 1]), vec![0, 1, 2]);
        assert_eq!(
            smooth_weighted_schedule(&[5, 1, 1]),
            vec![0, 0, 1, 0, 2, 0, 0]
        );
        let s = smooth_weighted_schedule(&[2, 3]);
        assert_eq!(s.iter().filter(|&&i| i == 0).count(), 2);
        assert_eq!(s.len(), 5);
    }
}
