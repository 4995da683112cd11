//! Upstream pools: which server gets a request, and sending it there with the
//! pool's connect and response timeouts over pooled keep-alive connections.
//!
//! Choice is smooth weighted round-robin over a schedule computed once, so a
//! pick is one atomic increment. Connections themselves (connecting, reuse,
//! driving them) live in `conns`. Health, retries and other strategies belong
//! to later work; this module does not read or change response bodies.

mod conns;

use std::error::Error as StdError;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::uri::{PathAndQuery, Uri};
use http::{Request, Response};
use hyper::body::Incoming;

pub use conns::{ConnLease, UpstreamConn};
use conns::{ConnectError, ServerConns};

use crate::body::{BodyTooLarge, ClientBodyError, RequestBody};
use crate::error::ProxyError;
use crate::limits::{InflightLimit, InflightSlot};
use crate::policy::{UpstreamPolicy, UpstreamServer};

/// One `[upstreams.NAME]` at run time, owned by one worker thread.
pub struct UpstreamPool {
    pub policy: Arc<UpstreamPolicy>,
    /// Parallel to `policy.servers`.
    conns: Box<[Arc<ServerConns>]>,
    /// Server indices in smooth weighted round-robin order, one cycle long.
    schedule: Box<[usize]>,
    next: AtomicUsize,
    /// `max_inflight_per_server`, shared by every worker's pool.
    inflight: Option<Arc<InflightLimit>>,
}

/// The server chosen for one request.
pub struct Pick<'a> {
    pub server: &'a UpstreamServer,
    /// Its place in `servers`, to pick it again elsewhere (`pick_at`).
    pub index: usize,
    conns: &'a Arc<ServerConns>,
}

// === impl UpstreamPool ===

impl UpstreamPool {
    pub fn new(policy: Arc<UpstreamPolicy>, inflight: Option<Arc<InflightLimit>>) -> Self {
        let weights: Vec<u32> = policy.servers.iter().map(|s| s.weight).collect();
        UpstreamPool {
            conns: policy
                .servers
                .iter()
                .map(|s| ServerConns::new(s, policy.connect_timeout))
                .collect(),
            schedule: smooth_weighted_schedule(&weights).into_boxed_slice(),
            policy,
            next: AtomicUsize::new(0),
            inflight,
        }
    }

    /// The next server, and a slot there when the pool limits requests in
    /// flight: waiting in line for one up to `queue_timeout`, then a 503.
    /// The balancer's pick is preferred; a busy pick gives way to any free
    /// server. `waiting` hears when the wait in line starts and ends.
    pub async fn admit(
        &self,
        waiting: impl Fn(bool),
    ) -> Result<(usize, Option<InflightSlot>), ProxyError> {
        let index = self.next_index();
        let Some(limit) = &self.inflight else {
            return Ok((index, None));
        };
        match limit.acquire(index, waiting).await {
            Ok(slot) => Ok((slot.server, Some(slot))),
            Err(full) => Err(ProxyError::UpstreamBusy {
                upstream: self.policy.name.clone(),
                waited: full.waited,
                retry_after: full.retry_after,
            }),
        }
    }

    /// Like `admit`, without waiting: `None` when every server is busy.
    pub fn try_admit(&self) -> Option<(usize, Option<InflightSlot>)> {
        let index = self.next_index();
        match &self.inflight {
            None => Some((index, None)),
            Some(limit) => limit
                .try_acquire(index)
                .map(|slot| (slot.server, Some(slot))),
        }
    }

    /// The balancer's next server, in weighted round-robin order.
    fn next_index(&self) -> usize {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.schedule[n % self.schedule.len()]
    }

    /// The server at `index` of `servers`, as `admit` chose it.
    pub fn pick_at(&self, index: usize) -> Pick<'_> {
        Pick {
            server: &self.policy.servers[index],
            index,
            conns: &self.conns[index],
        }
    }

    /// The request target an HTTP/1.1 origin server expects: path and query
    /// only. HTTP/2 clients (and some HTTP/1.1 ones) send an absolute URI.
    pub fn origin_form(uri: Uri) -> Uri {
        if uri.scheme().is_none() && uri.authority().is_none() {
            return uri;
        }
        let pq = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        Uri::from(pq)
    }

    /// Sends `req` to the picked server and waits for the response head, at
    /// most `response_timeout`. The lease carries the connection the body
    /// will arrive on; it goes back to the pool when the body has been read.
    pub async fn send(
        &self,
        pick: &Pick<'_>,
        req: Request<RequestBody>,
        slot: Option<InflightSlot>,
    ) -> Result<(Response<Incoming>, ConnLease), ProxyError> {
        let timeout = self.policy.response_timeout;
        match tokio::time::timeout(timeout, self.exchange(pick, req)).await {
            Ok(Ok((resp, mut lease))) => {
                lease.hold(slot);
                Ok((resp, lease))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ProxyError::UpstreamTimeout {
                server: pick.server.url.to_string(),
                phase: "send response headers",
                timeout,
            }),
        }
    }

    async fn exchange(
        &self,
        pick: &Pick<'_>,
        req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, ConnLease), ProxyError> {
        let connect_err = |e| self.connect_error(pick.server, e);
        let mut lease = pick.conns.checkout().await.map_err(connect_err)?;
        let req = match lease.conn().send(req).await {
            Ok(resp) => return Ok((resp, lease)),
            Err((e, None)) => return Err(classify(pick.server, &e)),
            // A pooled connection that was closing as we took it: the request
            // never left, so it goes out once more on a new connection.
            Err((_, Some(req))) => req,
        };
        let mut lease = pick.conns.checkout_new().await.map_err(connect_err)?;
        match lease.conn().send(req).await {
            Ok(resp) => Ok((resp, lease)),
            Err((e, _)) => Err(classify(pick.server, &e)),
        }
    }

    fn connect_error(&self, server: &UpstreamServer, e: ConnectError) -> ProxyError {
        let timed_out = ProxyError::UpstreamTimeout {
            server: server.url.to_string(),
            phase: "accept the connection",
            timeout: self.policy.connect_timeout,
        };
        let reason = match e {
            ConnectError::TimedOut => return timed_out,
            ConnectError::Io(e) if e.kind() == std::io::ErrorKind::TimedOut => return timed_out,
            ConnectError::Io(e) => format!("connecting: {e}"),
            ConnectError::Handshake(e) => error_chain(&e),
        };
        ProxyError::UpstreamUnavailable {
            server: server.url.to_string(),
            reason,
        }
    }
}

/// Maps a failed exchange to what the client is told: the client's own body
/// failing is the client's fault, anything else the upstream's.
fn classify(server: &UpstreamServer, e: &hyper::Error) -> ProxyError {
    let mut source: Option<&(dyn StdError + 'static)> = e.source();
    while let Some(err) = source {
        if let Some(too_large) = err.downcast_ref::<BodyTooLarge>() {
            return ProxyError::BodyTooLarge {
                limit: too_large.limit,
            };
        }
        if let Some(client) = err.downcast_ref::<ClientBodyError>() {
            return ProxyError::ClientBody(client.to_string());
        }
        source = err.source();
    }
    ProxyError::UpstreamFailed {
        server: server.url.to_string(),
        reason: error_chain(e),
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
