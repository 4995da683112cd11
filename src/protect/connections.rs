//! Connection ceilings: `max_connections` over every proxy listener, and
//! `max_connections_per_ip` per client address (an IPv6 client by its /64,
//! which one host usually holds whole).
//!
//! Past the total, the accept loops stop accepting until a connection
//! closes: the kernel's backlog holds the next ones, and clients see a slow
//! connect rather than a reset. Past the per-address count, a new
//! connection from that address is closed at once and counted. Peers in
//! `trusted_proxies` (a load balancer carries many clients) are not held to
//! the per-address count.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Open connections and the limits they are held to.
pub struct ConnectionLimits {
    inner: Arc<Inner>,
}

struct Inner {
    max_total: AtomicUsize,
    max_per_ip: AtomicUsize,
    open: AtomicUsize,
    /// Open connections by address, for addresses with any open.
    per_ip: Mutex<HashMap<AddrKey, u32>>,
    /// Woken when a connection closes: an accept loop may be waiting.
    closed: Notify,
    refused_per_ip: AtomicU64,
    accept_paused: AtomicU64,
    /// When a pause was last logged: at most once a minute, so a proxy held
    /// at its ceiling does not write a line per connection.
    last_warned: Mutex<Option<std::time::Instant>>,
}

/// An address as the per-address count groups it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum AddrKey {
    V4([u8; 4]),
    /// The /64.
    V6([u8; 8]),
}

impl AddrKey {
    fn of(ip: IpAddr) -> AddrKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => AddrKey::V4(v4.octets()),
            IpAddr::V6(v6) => {
                let mut net = [0; 8];
                net.copy_from_slice(&v6.octets()[..8]);
                AddrKey::V6(net)
            }
        }
    }
}

/// A new connection turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its address already has `max_connections_per_ip` open.
    PerIp,
}

/// One open connection; the counts go down when it is dropped.
pub struct ConnectionPermit {
    inner: Arc<Inner>,
    /// `None` for a peer not held to the per-address count.
    addr: Option<AddrKey>,
}

impl ConnectionLimits {
    pub fn new(max_total: usize, max_per_ip: usize) -> Self {
        ConnectionLimits {
            inner: Arc::new(Inner {
                max_total: AtomicUsize::new(max_total),
                max_per_ip: AtomicUsize::new(max_per_ip),
                open: AtomicUsize::new(0),
                per_ip: Mutex::new(HashMap::new()),
                closed: Notify::new(),
                refused_per_ip: AtomicU64::new(0),
                accept_paused: AtomicU64::new(0),
                last_warned: Mutex::new(None),
            }),
        }
    }

    pub fn set_limits(&self, max_total: usize, max_per_ip: usize) {
        self.inner.max_total.store(max_total, Ordering::Relaxed);
        self.inner.max_per_ip.store(max_per_ip, Ordering::Relaxed);
        // A raised ceiling lets waiting accept loops go on.
        self.inner.closed.notify_waiters();
    }

    /// Resolves once fewer than `max_connections` are open. Accept loops
    /// wait here before accepting, so the kernel's backlog holds the rest.
    pub async fn room(&self) {
        let inner = &self.inner;
        let mut counted = false;
        loop {
            let closed = inner.closed.notified();
            if inner.open.load(Ordering::Acquire) < inner.max_total.load(Ordering::Relaxed) {
                return;
            }
            if !counted {
                counted = true;
                let paused = inner.accept_paused.fetch_add(1, Ordering::Relaxed) + 1;
                let mut last = inner.last_warned.lock().unwrap_or_else(|e| e.into_inner());
                if last.is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(60)) {
                    *last = Some(std::time::Instant::now());
                    tracing::warn!(
                        open = inner.open.load(Ordering::Relaxed),
                        paused,
                        "server.max_connections reached: not accepting until a connection closes (logged at most once a minute; hyperion_accept_paused_total counts each time)"
                    );
                }
            }
            closed.await;
        }
    }

    /// Counts a connection from `peer`, or turns it away when its address
    /// has too many open. `exempt`: a trusted proxy, counted in the total
    /// only.
    pub fn open(&self, peer: IpAddr, exempt: bool) -> Result<ConnectionPermit, Refused> {
        let inner = &self.inner;
        let addr = if exempt {
            None
        } else {
            let key = AddrKey::of(peer);
            let max = inner.max_per_ip.load(Ordering::Relaxed);
            let mut map = inner.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            let n = map.entry(key).or_insert(0);
            if *n as usize >= max {
                if *n == 0 {
                    map.remove(&key);
                }
                drop(map);
                inner.refused_per_ip.fetch_add(1, Ordering::Relaxed);
                return Err(Refused::PerIp);
            }
            *n += 1;
            Some(key)
        };
        inner.open.fetch_add(1, Ordering::AcqRel);
        Ok(ConnectionPermit {
            inner: inner.clone(),
            addr,
        })
    }

    /// Connections open now.
    pub fn open_count(&self) -> usize {
        self.inner.open.load(Ordering::Relaxed)
    }

    /// Addresses with a connection open (the per-address table's size).
    pub fn addresses(&self) -> usize {
        self.inner
            .per_ip
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Connections closed at once for `max_connections_per_ip`.
    pub fn refused_per_ip(&self) -> u64 {
        self.inner.refused_per_ip.load(Ordering::Relaxed)
    }

    /// Times an accept loop stopped at `max_connections`.
    pub fn accept_paused(&self) -> u64 {
        self.inner.accept_paused.load(Ordering::Relaxed)
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let inner = &self.inner;
        if let Some(key) = self.addr {
            let mut map = inner.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = map.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&key);
                }
            }
        }
        inner.open.fetch_sub(1, Ordering::AcqRel);
        inner.closed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_address_ceiling_counts_v6_by_its_64_and_exempts_trusted_peers() {
        let limits = ConnectionLimits::new(100, 2);
        let a = limits.open(ip("2001:db8::1"), false).unwrap();
        let _b = limits.open(ip("2001:db8::ffff"), false).unwrap();
        assert_eq!(
            limits.open(ip("2001:db8::2"), false).err(),
            Some(Refused::PerIp)
        );
        // Another /64, another count.
        let _c = limits.open(ip("2001:db8:0:1::1"), false).unwrap();
        // A trusted proxy is not held to it.
        let trusted: Vec<_> = (0..5)
            .map(|_| limits.open(ip("10.0.0.1"), true).unwrap())
            .collect();
        assert_eq!(limits.open_count(), 8);
        assert_eq!(limits.refused_per_ip(), 1);
        drop(a);
        assert!(limits.open(ip("2001:db8::3"), false).is_ok());
        drop(trusted);
        // IPv4-mapped addresses count as IPv4.
        let _d = limits.open(ip("192.0.2.1"), false).unwrap();
        let _e = limits.open(ip("::ffff:192.0.2.1"), false).unwrap();
        assert!(limits.open(ip("192.0.2.1"), false).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn accepting_waits_for_room_under_the_total() {
        let limits = Arc::new(ConnectionLimits::new(1, 10));
        let first = limits.open(ip("192.0.2.1"), false).unwrap();
        let waiting = tokio::spawn({
            let limits = limits.clone();
            async move { limits.room().await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            !waiting.is_finished(),
            "no room while the one allowed is open"
        );
        drop(first);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("room once it closed")
            .unwrap();
        assert_eq!(limits.accept_paused(), 1);
        assert_eq!(limits.addresses(), 0);
    }
}
