//! The `hyperion` binary: arguments, logging, the runtime, signals and exit
//! codes. No proxy logic lives here, nor the process layout: see the
//! library's `Server` (`instance.rs`), which the tests start too.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hyperion::{Policy, Server};

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
            // What the file sets, read against the table of keys.
            let text = std::fs::read_to_string(&cli.config).unwrap_or_default();
            if let Some(keys) = hyperion::policy::keys::summary(&text) {
                let _ = writeln!(out, "{keys}");
            }
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
    let server = match Server::builder(policy, config).start() {
        Ok(server) => server,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    match server.run_until_signalled() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
