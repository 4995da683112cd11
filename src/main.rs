//! The `hyperion` binary: arguments, logging, the runtime, signals and exit
//! codes. No proxy logic lives here; see the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use hyperion::{LogSink, Policy, Proxy};
use tokio::net::TcpListener;

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
            println!("{}: OK", cli.config.display());
            print!("{policy}");
            ExitCode::SUCCESS
        }
        Command::Run => run(policy),
    }
}

fn run(policy: Policy) -> ExitCode {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let mut listeners = Vec::with_capacity(policy.server.listen.len());
        for addr in &policy.server.listen {
            match TcpListener::bind(addr).await {
                Ok(l) => listeners.push(l),
                Err(e) => {
                    eprintln!("cannot listen on {addr}: {e} — free the port or change server.listen in the policy file");
                    return ExitCode::FAILURE;
                }
            }
        }
        let proxy = Arc::new(Proxy::new(Arc::new(policy), LogSink::Stderr));
        hyperion::serve(listeners, proxy, shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}

/// Resolves on SIGTERM or SIGINT. SIGHUP (reload) is acknowledged but not yet
/// acted on, rather than killing the process as its default action would.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
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
            _ = hup.recv() => tracing::warn!("SIGHUP received: reloading the policy is not supported yet; restart to apply changes"),
        }
    }
    // A second SIGINT or SIGTERM during the drain exits at once.
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting without waiting for the drain");
        std::process::exit(1);
    });
}
