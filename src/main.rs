//! The `hyperion` binary: arguments, logging, the runtime, signals and exit
//! codes. No proxy logic lives here; see the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use hyperion::generation::{follow, notify_service_manager, Generation, LiveProxy, Reloader};
use hyperion::{LogSink, Policy, Transport};
use sd_notify::NotifyState;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};

mod allocator;

// mimalloc's thread-local free lists suit a proxy's many small, short-lived
// allocations (header maps, futures, buffers) better than glibc's arenas.
#[global_allocator]
static ALLOCATOR: allocator::Mimalloc = allocator::Mimalloc;

/// A caching reverse proxy for AI backends (Ollama, OpenAI-compatible servers, FastAPI).
#[derive(Parser)]
#[command(name = "hyperion", version, about, propagate_version = true)]
struct Cli {
    /// The policy file.
    #[arg(
        long,
        short,
        global = true,
        env = "HYPERION_CONFIG",
        default_value = "proxy.toml"
    )]
    config: PathBuf,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the policy file, print a summary, and exit (non-zero on error).
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let policy = match Policy::load(&cli.config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => {
            use std::io::Write;
            // Written, not printed: `hyperion check | head` must not panic
            // when the reader stops early.
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}: OK", cli.config.display());
            let _ = write!(out, "{policy}");
            ExitCode::SUCCESS
        }
        Command::Run => run(policy, &cli.config),
    }
}

fn run(policy: Policy, config: &std::path::Path) -> ExitCode {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    // Bind before starting anything, so a busy port is one clear error.
    let tls_listen = policy
        .server
        .tls
        .as_ref()
        .map_or(&[][..], |t| &t.listen[..]);
    let wanted = policy
        .server
        .listen
        .iter()
        .map(|a| (a, Transport::Plain, "server.listen"))
        .chain(
            tls_listen
                .iter()
                .map(|a| (a, Transport::Tls, "server.tls.listen")),
        );
    let mut sockets = Vec::new();
    for (addr, transport, key) in wanted {
        match std::net::TcpListener::bind(addr).and_then(|l| l.set_nonblocking(true).map(|()| l)) {
            Ok(l) => {
                let scheme = if transport == Transport::Tls {
                    "https"
                } else {
                    "http"
                };
                tracing::info!("listening on {scheme}://{addr}");
                sockets.push((l, transport));
            }
            Err(e) => {
                eprintln!("cannot listen on {addr}: {e} — free the port or change {key} in the policy file");
                return ExitCode::FAILURE;
            }
        }
    }
    let admin = match &policy.admin {
        None => None,
        Some(a) => match std::net::TcpListener::bind(a.listen)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
        {
            Ok(l) => {
                match &a.token_source {
                    Some(source) => tracing::info!("admin API on http://{} (token from {source})", a.listen),
                    None => tracing::warn!(
                        "admin API on http://{}: no token configured, so only /healthz, /readyz and /metrics are served (set [admin] token_env or token_file)",
                        a.listen
                    ),
                }
                Some(l)
            }
            Err(e) => {
                eprintln!("cannot listen on {} for the admin API: {e} — free the port or change admin.listen in the policy file", a.listen);
                return ExitCode::FAILURE;
            }
        },
    };

    // Thread per core, as nginx runs workers: each worker is a single-threaded
    // runtime with its own upstream pools, so a request never crosses threads.
    // Workers share each listening socket (dup'd descriptors, not SO_REUSEPORT,
    // so a second instance still fails with "address in use").
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let shutdown_grace = policy.server.shutdown_grace;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // The proxy's own errands (health checks, model discovery) run on a
    // thread of their own, off the workers' loops.
    let ops = {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let mut stop = stop_rx.clone();
        let spawned = std::thread::Builder::new()
            .name("hyperion-ops".into())
            .spawn(move || -> std::io::Result<()> {
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
            Ok(Ok(handle)) => handle,
            Ok(Err(_)) | Err(_) => {
                eprintln!("cannot start the operations thread");
                return ExitCode::FAILURE;
            }
        }
    };
    if hyperion::telemetry::install().is_none() {
        tracing::warn!("metrics are not recorded: another recorder is installed");
    }
    let reloader = Reloader::new(
        config,
        Generation::first(policy, LogSink::Stderr),
        ops.clone(),
    );
    if let Some(listener) = admin {
        let (reloader, mut stop) = (reloader.clone(), stop_rx.clone());
        ops.spawn(async move {
            match TcpListener::from_std(listener) {
                Ok(l) => {
                    hyperion::admin::serve(l, reloader, async move {
                        let _ = stop.wait_for(|stopped| *stopped).await;
                    })
                    .await
                }
                Err(e) => tracing::error!("admin API not served: {e}"),
            }
        });
    }
    let mut threads = Vec::with_capacity(workers);
    for w in 0..workers {
        let clones: std::io::Result<Vec<_>> = sockets
            .iter()
            .map(|(s, t)| s.try_clone().map(|s| (s, *t)))
            .collect();
        let clones = match clones {
            Ok(c) => c,
            Err(e) => {
                eprintln!("cannot share the listening sockets with worker {w}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let (reloader, mut stop) = (reloader.clone(), stop_rx.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("hyperion-w{w}"))
            .spawn(move || -> std::io::Result<()> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async move {
                    let listeners = clones
                        .into_iter()
                        .map(|(s, t)| TcpListener::from_std(s).map(|l| (l, t)))
                        .collect::<std::io::Result<Vec<_>>>()?;
                    let live = Arc::new(LiveProxy::from_pointee(reloader.current().proxy(None)));
                    tokio::spawn(follow(live.clone(), reloader.subscribe()));
                    hyperion::serve_on(listeners, live, async move {
                        let _ = stop.wait_for(|stopped| *stopped).await;
                    })
                    .await;
                    Ok(())
                })
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                eprintln!("cannot start worker {w}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    drop(sockets);
    tracing::info!(workers, "serving");
    notify_service_manager(&[
        NotifyState::Ready,
        NotifyState::Status("serving policy generation 1"),
    ]);

    let signals = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the signal runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let streams = signals.block_on(shutdown_signal(&reloader));
    // A second SIGINT or SIGTERM during the drain exits at once.
    std::thread::spawn(move || {
        if let Some((mut term, mut int)) = streams {
            signals.block_on(async {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            });
            tracing::warn!("second signal: exiting without waiting for the drain");
            std::process::exit(1);
        }
    });
    tracing::info!(
        grace_s = shutdown_grace.as_secs_f64(),
        "shutting down: no new connections, draining in-flight requests"
    );
    notify_service_manager(&[NotifyState::Stopping]);
    let _ = stop_tx.send(true);
    let mut code = ExitCode::SUCCESS;
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!("worker failed: {e}");
                code = ExitCode::FAILURE;
            }
            Err(_) => code = ExitCode::FAILURE,
        }
    }
    tracing::info!("shutdown complete");
    code
}

/// Resolves on SIGTERM or SIGINT, and returns the streams so a second signal
/// can be awaited. SIGHUP reloads the policy file meanwhile.
async fn shutdown_signal(reloader: &Reloader) -> Option<(Signal, Signal)> {
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
    Some((term, int))
}
