//! A running Hyperion, as the binary runs it and the tests start it: the
//! listening sockets, one worker thread per core (each a single-threaded
//! runtime with its own upstream connections), the operations thread (health
//! checks, model discovery, the admin API), reloads, and the drain.
//!
//! Owns the process layout and its start-up errors. Does not own serving a
//! connection (`server`), what a reload changes (`generation`), or
//! arguments, logging set-up and exit codes (the binary).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::access_log::LogSink;
use crate::clock::Skew;
use crate::generation::{follow, notify_service_manager, Generation, LiveProxy, Reloader};
use crate::policy::Policy;
use crate::server::{serve_on, Transport};

/// How to start a [`Server`]: [`Server::builder`], then [`ServerBuilder::start`].
pub struct ServerBuilder {
    policy: Policy,
    path: PathBuf,
    log: LogSink,
    workers: Option<usize>,
    loopback: bool,
}

/// A running proxy. Dropping it starts the drain without waiting for it;
/// [`Server::shutdown`] then [`Server::join`] wait.
pub struct Server {
    listening: Vec<(SocketAddr, Transport)>,
    admin: Option<SocketAddr>,
    reloader: Arc<Reloader>,
    stop: watch::Sender<bool>,
    workers: Vec<std::thread::JoinHandle<std::io::Result<()>>>,
    /// How many workers have finished their drain.
    finished: Arc<watch::Sender<usize>>,
    started: usize,
    /// What every reading of `clock` on this server's threads adds.
    skew: Skew,
    /// The policy generation each worker serves.
    adopted: Arc<watch::Sender<Vec<u64>>>,
}

/// Why a server did not start: a message for the operator, naming the
/// policy key to change where one is at fault.
#[derive(Debug)]
pub struct StartError(String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

impl Server {
    /// A server for `policy`, read from `path` (which a reload reads again).
    pub fn builder(policy: Policy, path: impl Into<PathBuf>) -> ServerBuilder {
        ServerBuilder {
            policy,
            path: path.into(),
            log: LogSink::Stderr,
            workers: None,
            loopback: false,
        }
    }

    /// Where the proxy listens: each address with its transport.
    pub fn listening(&self) -> &[(SocketAddr, Transport)] {
        &self.listening
    }

    /// The first address of `transport`.
    pub fn addr(&self, transport: Transport) -> Option<SocketAddr> {
        self.listening
            .iter()
            .find(|(_, t)| *t == transport)
            .map(|(a, _)| *a)
    }

    /// The admin API's address, when the policy has `[admin]`.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// This server's clock, which a test can move forward (freshness,
    /// ages, buckets, ejection: see `clock.rs`).
    #[cfg(feature = "test-clock")]
    pub fn clock(&self) -> &Skew {
        &self.skew
    }

    /// The policy generations: the current one, and reloads.
    pub fn reloader(&self) -> &Arc<Reloader> {
        &self.reloader
    }

    /// Stops accepting connections and drains the open ones, for at most
    /// `shutdown_grace`.
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// Resolves once every worker has finished its drain, on any runtime
    /// (for callers that cannot block, as `join` does).
    pub async fn drained(&self) {
        let mut finished = self.finished.subscribe();
        let _ = finished.wait_for(|n| *n >= self.started).await;
    }

    /// Resolves once every worker serves policy generation `number` or a
    /// later one (a reload is published at once; each worker switches on
    /// its own thread).
    pub async fn serving(&self, number: u64) {
        let mut adopted = self.adopted.subscribe();
        let _ = adopted
            .wait_for(|each| each.iter().all(|n| *n >= number))
            .await;
    }

    /// Waits until every worker has finished its drain.
    pub fn join(mut self) -> Result<(), StartError> {
        let mut failed = None;
        for t in std::mem::take(&mut self.workers) {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed = Some(format!("a worker failed: {e}")),
                Err(_) => failed = Some("a worker panicked".to_owned()),
            }
        }
        failed.map_or(Ok(()), |e| Err(StartError(e)))
    }

    /// Serves until SIGTERM or SIGINT, reloading the policy file on SIGHUP,
    /// then drains (a second SIGTERM or SIGINT exits at once) and tells the
    /// service manager at each step.
    pub fn run_until_signalled(self) -> Result<(), StartError> {
        use tokio::signal::unix::{signal, SignalKind};
        let signals = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StartError(format!("cannot start the signal runtime: {e}")))?;
        let reloader = self.reloader.clone();
        let streams = signals.block_on(async move {
            let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
                signal(SignalKind::hangup()),
            ) else {
                tracing::error!("cannot install signal handlers; stop the proxy with SIGKILL");
                return std::future::pending().await;
            };
            loop {
                tokio::select! {
                    _ = term.recv() => { tracing::info!("SIGTERM received"); break }
                    _ = int.recv() => { tracing::info!("SIGINT received"); break }
                    _ = hup.recv() => {
                        tracing::info!("SIGHUP received: reloading {}", reloader.path().display());
                        // The outcome is logged by the reloader.
                        let _ = reloader.reload();
                    }
                }
            }
            (term, int)
        });
        std::thread::spawn(move || {
            let (mut term, mut int) = streams;
            signals.block_on(async {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            });
            tracing::warn!("second signal: exiting without waiting for the drain");
            std::process::exit(1);
        });
        let grace = self.reloader.current().policy.server.shutdown_grace;
        tracing::info!(
            grace_s = grace.as_secs_f64(),
            "shutting down: no new connections, draining in-flight requests"
        );
        notify_service_manager(&[sd_notify::NotifyState::Stopping]);
        self.shutdown();
        let traces = self.reloader.current().traces.clone();
        let joined = self.join();
        if let Some(traces) = traces {
            // The drained requests' spans go out before the process ends.
            traces.shutdown(std::time::Duration::from_secs(5));
        }
        tracing::info!("shutdown complete");
        joined
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl ServerBuilder {
    /// Where access-log lines go (standard error by default).
    pub fn log(mut self, sink: LogSink) -> Self {
        self.log = sink;
        self
    }

    /// How many worker threads (by default, one per core).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = Some(n.max(1));
        self
    }

    /// Listens on fresh loopback ports instead of the policy's addresses:
    /// one for plain HTTP, one for TLS when the policy has `[server.tls]`,
    /// one for the admin API when it has `[admin]`. For tests and examples.
    pub fn loopback(mut self) -> Self {
        self.loopback = true;
        self
    }

    /// Binds every listener first (so a busy port is one clear error before
    /// anything starts), then starts the operations thread, the admin API
    /// and the workers.
    pub fn start(self) -> Result<Server, StartError> {
        let sockets = self.bind_proxy()?;
        let admin = self.bind_admin()?;
        let workers = self
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let (stop, stop_rx) = watch::channel(false);
        let skew = Skew::default();
        let ops = spawn_ops(stop_rx.clone(), skew.clone())?;
        if crate::telemetry::install().is_none() {
            tracing::warn!("metrics are not recorded: another recorder is installed");
        }
        let reloader = Reloader::new(
            &self.path,
            Generation::first(self.policy, self.log),
            ops.clone(),
        );
        let admin_addr = match admin {
            Some(listener) => Some(serve_admin(listener, &ops, &reloader, stop_rx.clone())?),
            None => None,
        };
        let mut listening = Vec::new();
        for (s, t) in &sockets {
            let addr = s
                .local_addr()
                .map_err(|e| StartError(format!("cannot read a listener's address: {e}")))?;
            listening.push((addr, *t));
        }
        let mut server = Server {
            listening,
            admin: admin_addr,
            reloader,
            stop,
            workers: Vec::with_capacity(workers),
            finished: Arc::new(watch::channel(0).0),
            started: workers,
            skew,
            adopted: Arc::new(watch::channel(vec![1; workers]).0),
        };
        for w in 0..workers {
            let ends = Ends {
                finished: server.finished.clone(),
                skew: server.skew.clone(),
                adopted: server.adopted.clone(),
            };
            let t = spawn_worker(w, &sockets, &server.reloader, stop_rx.clone(), ends)?;
            server.workers.push(t);
        }
        tracing::info!(workers, "serving");
        notify_service_manager(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status("serving policy generation 1"),
        ]);
        Ok(server)
    }

    fn bind_proxy(&self) -> Result<Vec<(std::net::TcpListener, Transport)>, StartError> {
        let server = &self.policy.server;
        let tls_listen = server.tls.as_ref().map_or(&[][..], |t| &t.listen[..]);
        let mut wanted: Vec<(SocketAddr, Transport, &str)> = Vec::new();
        if self.loopback {
            let any = SocketAddr::from(([127, 0, 0, 1], 0));
            wanted.push((any, Transport::Plain, "server.listen"));
            if server.tls.is_some() {
                wanted.push((any, Transport::Tls, "server.tls.listen"));
            }
        } else {
            wanted.extend(
                server
                    .listen
                    .iter()
                    .map(|a| (*a, Transport::Plain, "server.listen")),
            );
            wanted.extend(
                tls_listen
                    .iter()
                    .map(|a| (*a, Transport::Tls, "server.tls.listen")),
            );
        }
        let mut sockets = Vec::with_capacity(wanted.len());
        for (addr, transport, key) in wanted {
            let l = bind(addr).map_err(|e| {
                StartError(format!(
                    "cannot listen on {addr}: {e} — free the port or change {key} in the policy file"
                ))
            })?;
            if !self.loopback {
                let scheme = if transport == Transport::Tls {
                    "https"
                } else {
                    "http"
                };
                tracing::info!("listening on {scheme}://{addr}");
            }
            sockets.push((l, transport));
        }
        Ok(sockets)
    }

    fn bind_admin(&self) -> Result<Option<std::net::TcpListener>, StartError> {
        let Some(a) = &self.policy.admin else {
            return Ok(None);
        };
        let addr = if self.loopback {
            SocketAddr::from(([127, 0, 0, 1], 0))
        } else {
            a.listen
        };
        let l = bind(addr).map_err(|e| {
            StartError(format!(
                "cannot listen on {addr} for the admin API: {e} — free the port or change admin.listen in the policy file"
            ))
        })?;
        match &a.token_source {
            Some(source) => tracing::info!("admin API on http://{addr} (token from {source})"),
            None => tracing::warn!(
                "admin API on http://{addr}: no token configured, so only /healthz, /readyz and /metrics are served (set [admin] token_env or token_file)"
            ),
        }
        Ok(Some(l))
    }
}

/// A non-blocking listener, ready for any runtime.
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// The proxy's own errands (health checks, model discovery, the admin API)
/// run on a thread of their own, off the workers' loops, until `stop`.
fn spawn_ops(
    mut stop: watch::Receiver<bool>,
    skew: Skew,
) -> Result<tokio::runtime::Handle, StartError> {
    let (handle_tx, handle_rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("hyperion-ops".into())
        .spawn(move || -> std::io::Result<()> {
            skew.install();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let _ = handle_tx.send(runtime.handle().clone());
            runtime.block_on(async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            });
            Ok(())
        });
    match spawned.map(|_| handle_rx.recv()) {
        Ok(Ok(handle)) => Ok(handle),
        Ok(Err(_)) | Err(_) => Err(StartError("cannot start the operations thread".into())),
    }
}

/// The admin API on the operations thread; returns its address.
fn serve_admin(
    listener: std::net::TcpListener,
    ops: &tokio::runtime::Handle,
    reloader: &Arc<Reloader>,
    mut stop: watch::Receiver<bool>,
) -> Result<SocketAddr, StartError> {
    let addr = listener
        .local_addr()
        .map_err(|e| StartError(format!("cannot read the admin listener's address: {e}")))?;
    let reloader = reloader.clone();
    ops.spawn(async move {
        match TcpListener::from_std(listener) {
            Ok(l) => {
                crate::admin::serve(l, reloader, async move {
                    let _ = stop.wait_for(|stopped| *stopped).await;
                })
                .await
            }
            Err(e) => tracing::error!("admin API not served: {e}"),
        }
    });
    Ok(addr)
}

/// What a worker shares with its `Server`.
struct Ends {
    /// Counted when the worker ends.
    finished: Arc<watch::Sender<usize>>,
    skew: Skew,
    /// Where the worker says which generation it serves.
    adopted: Arc<watch::Sender<Vec<u64>>>,
}

/// Worker `w`: a single-threaded runtime serving every listener (sharing
/// the sockets by dup'd descriptors, not SO_REUSEPORT, so a second instance
/// still fails with "address in use"), following reloads, until `stop`.
fn spawn_worker(
    w: usize,
    sockets: &[(std::net::TcpListener, Transport)],
    reloader: &Arc<Reloader>,
    mut stop: watch::Receiver<bool>,
    ends: Ends,
) -> Result<std::thread::JoinHandle<std::io::Result<()>>, StartError> {
    let Ends {
        finished,
        skew,
        adopted,
    } = ends;
    let clones = sockets
        .iter()
        .map(|(s, t)| s.try_clone().map(|s| (s, *t)))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| {
            StartError(format!(
                "cannot share the listening sockets with worker {w}: {e}"
            ))
        })?;
    let reloader = reloader.clone();
    std::thread::Builder::new()
        .name(format!("hyperion-w{w}"))
        .spawn(move || -> std::io::Result<()> {
            // Counted however the worker ends.
            struct Finished(Arc<watch::Sender<usize>>);
            impl Drop for Finished {
                fn drop(&mut self) {
                    self.0.send_modify(|n| *n += 1);
                }
            }
            let _finished = Finished(finished);
            skew.install();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let listeners = clones
                    .into_iter()
                    .map(|(s, t)| TcpListener::from_std(s).map(|l| (l, t)))
                    .collect::<std::io::Result<Vec<_>>>()?;
                // Subscribed before the first generation is read: a reload
                // in between is then seen as a change, not missed.
                let generations = reloader.subscribe();
                let first = generations.borrow().clone();
                let live = Arc::new(LiveProxy::from_pointee(first.proxy(None)));
                let adopted = move |n| adopted.send_modify(|each| each[w] = n);
                adopted(first.number);
                tokio::spawn(follow(live.clone(), generations, adopted));
                serve_on(listeners, live, async move {
                    let _ = stop.wait_for(|stopped| *stopped).await;
                })
                .await;
                Ok(())
            })
        })
        .map_err(|e| StartError(format!("cannot start worker {w}: {e}")))
}
