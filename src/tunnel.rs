//! A tunnel's bytes: both directions of an upgraded connection (WebSocket
//! and other HTTP/1.1 upgrades) copied until either side closes, or until
//! nothing has passed either way for `tunnel_idle_timeout`.
//!
//! Owns the copying and its idle clock, not the upgrade itself (the
//! handler negotiates it and spawns the task) nor shutdown (the caller
//! races this against its grace deadline).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// How a tunnel ended.
#[derive(Debug)]
pub enum TunnelEnd {
    /// One side closed: the bytes sent up and down.
    Closed {
        up: u64,
        down: u64,
    },
    /// Nothing passed either way for the idle timeout.
    Idle,
    Failed(io::Error),
}

/// Copies between `client` and `upstream` both ways until one closes, or
/// both are silent for `idle`.
pub async fn splice<C, U>(client: C, upstream: U, idle: Duration) -> TunnelEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut client = Watched {
        inner: client,
        start,
        last: last.clone(),
    };
    let mut upstream = Watched {
        inner: upstream,
        start,
        last: last.clone(),
    };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    let quiet = tokio::time::sleep(idle);
    tokio::pin!(quiet);
    loop {
        tokio::select! {
            res = &mut copy => return match res {
                Ok((up, down)) => TunnelEnd::Closed { up, down },
                Err(e) => TunnelEnd::Failed(e),
            },
            () = &mut quiet => {
                // Woken at the deadline of the last activity it knew of:
                // later activity moves it on.
                let seen = start + Duration::from_millis(last.load(Ordering::Relaxed));
                let due = seen + idle;
                if Instant::now() >= due {
                    return TunnelEnd::Idle;
                }
                quiet.as_mut().reset(due);
            }
        }
    }
}

/// One side of the tunnel, noting when bytes pass.
struct Watched<T> {
    inner: T,
    start: Instant,
    last: Arc<AtomicU64>,
}

impl<T> Watched<T> {
    fn touch(&self) {
        let ms = Instant::now()
            .saturating_duration_since(self.start)
            .as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.touch();
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_silent_tunnel_ends_after_the_idle_timeout_and_traffic_keeps_it_open() {
        let (client, mut client_peer) = tokio::io::duplex(1024);
        let (upstream, mut upstream_peer) = tokio::io::duplex(1024);
        let idle = Duration::from_secs(60);
        let started = Instant::now();
        let tunnel = tokio::spawn(splice(client, upstream, idle));
        // Bytes every 40 s keep it open past the timeout...
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(40)).await;
            client_peer.write_all(b"ping").await.unwrap();
            let mut got = [0; 4];
            upstream_peer.read_exact(&mut got).await.unwrap();
        }
        assert!(!tunnel.is_finished());
        // ...then silence ends it, 60 s after the last byte.
        let end = tunnel.await.unwrap();
        assert!(matches!(end, TunnelEnd::Idle), "{end:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(180));
    }
}
