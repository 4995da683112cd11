//! Upgraded requests (WebSocket and other HTTP/1.1 upgrades): the 101 the
//! client gets, and the task that carries the tunnel's bytes, tracked by
//! the connection's task list so shutdown can wait for it and cut it.
//!
//! Does not own the copying or its idle clock (`tunnel`), nor asking the
//! upstream for the upgrade (`dispatch` adds the headers).

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::Response;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

use super::admit::Arrival;
use super::dispatch::unasked_upgrade;
use super::{ConnInfo, Proxy, RequestState};
use crate::body::{BoxError, ResponseBody};
use crate::error::ProxyError;
use crate::headers;
use crate::policy::UpstreamServer;
use crate::protect::{Deadline, Protect};
use crate::tunnel::TunnelEnd;
use crate::upstream::{error_chain, ConnLease, UpstreamConn};

impl Proxy {
    /// The upstream agreed to switch protocols: the tunnel starts in the
    /// background and the client gets the 101. A 101 the client did not ask
    /// for is the upstream's fault.
    pub(super) fn tunnel(
        &self,
        st: &mut RequestState<'_>,
        arrival: &mut Arrival<'_>,
        resp: Response<Incoming>,
        lease: ConnLease,
        server: &UpstreamServer,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let Some(client_upgrade) = arrival.client_upgrade.take() else {
            return Err(unasked_upgrade(server));
        };
        spawn_tunnel(
            st.conn,
            client_upgrade,
            lease.into_conn(),
            st.rec.request_id.clone(),
            self.policy.server.tunnel_idle_timeout,
            self.protect.clone(),
        );
        let (mut parts, _) = resp.into_parts();
        let protocol = parts.headers.get(header::UPGRADE).cloned();
        headers::strip_hop_by_hop(&mut parts.headers);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(p) = protocol.or(arrival.upgrade.take()) {
            parts.headers.insert(header::UPGRADE, p);
        }
        Ok(Response::from_parts(parts, ResponseBody::empty()))
    }
}

/// Copies bytes both ways between an upgraded client connection and the
/// upstream's, until either side closes, nothing passes for
/// `tunnel_idle_timeout`, or the shutdown grace runs out.
fn spawn_tunnel(
    conn: &ConnInfo,
    client: hyper::upgrade::OnUpgrade,
    upstream: Box<UpstreamConn>,
    request_id: HeaderValue,
    idle: std::time::Duration,
    protect: Arc<Protect>,
) {
    let force_close = conn.force_close.clone();
    conn.tasks.spawn(async move {
        let run = async {
            let (client, (upstream, early)) =
                tokio::try_join!(client, upstream.into_upgraded()).map_err(BoxError::from)?;
            let mut client = TokioIo::new(client);
            // Bytes the upstream sent right behind its 101 head.
            client.write_all(&early).await.map_err(BoxError::from)?;
            Ok::<_, BoxError>(crate::tunnel::splice(client, upstream, idle).await)
        };
        let id = request_id.to_str().unwrap_or("-");
        tokio::select! {
            res = run => match res {
                Ok(TunnelEnd::Closed { up, down }) => tracing::debug!(request_id = id, up, down, "tunnel closed"),
                Ok(TunnelEnd::Idle) => {
                    protect.cut.count(Deadline::TunnelIdle);
                    tracing::debug!(request_id = id, "tunnel closed: nothing passed for tunnel_idle_timeout");
                }
                Ok(TunnelEnd::Failed(e)) => tracing::debug!(request_id = id, "tunnel ended: {e}"),
                Err(e) => tracing::debug!(request_id = id, "tunnel ended: {}", error_chain(e.as_ref())),
            },
            _ = force_close.cancelled() => {}
        }
    });
}
