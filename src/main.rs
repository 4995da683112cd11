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
    /// API keys in `[auth] keys_file`: add, list, revoke.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// GET an http:// URL (e.g. the admin's /healthz) and exit 0 on a 2xx
    /// within 3 s: the container image's healthcheck, which has no curl.
    /// Reads no policy.
    Probe { url: String },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Make a key for NAME and print it (the only time it is shown; the
    /// file keeps its digest).
    Add {
        name: String,
        /// The key's tier.
        #[arg(long)]
        tier: Option<String>,
    },
    /// List the keys' names, tiers and when they were made.
    List,
    /// Remove NAME's key (a running proxy refuses it within seconds).
    Revoke { name: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Probe { url }) = &cli.command {
        return probe(url);
    }
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
        Command::Keys(command) => keys(&policy, &cli.config, command),
        Command::Probe { .. } => unreachable!("answered before the policy is read"),
    }
}

/// `hyperion probe URL`: one GET over HTTP/1.1, success on a 2xx.
fn probe(url: &str) -> ExitCode {
    let answer = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            rt.block_on(async {
                tokio::time::timeout(std::time::Duration::from_secs(3), get_status(url))
                    .await
                    .map_err(|_| "no answer within 3s".to_owned())?
            })
        });
    match answer {
        Ok(status) if status.is_success() => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("{url}: {status}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{url}: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn get_status(url: &str) -> Result<http::StatusCode, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("only http:// URLs are probed".into());
    }
    let authority = uri.authority().ok_or("the URL has no host")?.clone();
    let port = authority.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((authority.host(), port))
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, authority.as_str())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(resp.status())
}

fn keys(policy: &Policy, config: &std::path::Path, command: KeysCommand) -> ExitCode {
    let Some(auth) = &policy.auth else {
        eprintln!(
            "{}: no [auth] table: add one with keys_file = \"keys.toml\" (see docs/policy.md)",
            config.display()
        );
        return ExitCode::FAILURE;
    };
    if let KeysCommand::Add {
        tier: Some(tier), ..
    } = &command
    {
        // A tier the policy does not define would give the key the
        // default tier's terms (or none): a typo must not go unnoticed.
        let tiers = &policy.tenancy.tiers;
        if !tiers.contains(tier) {
            let defined = if tiers.is_empty() {
                "it defines none".to_owned()
            } else {
                format!("it defines {}", tiers.join(", "))
            };
            eprintln!(
                "{}: no [tiers.{tier}] ({defined}): add the table first, or choose one of those",
                config.display()
            );
            return ExitCode::FAILURE;
        }
    }
    let file = hyperion::auth::KeysFileAt(auth.keys_file.clone());
    let done = match command {
        KeysCommand::Add { name, tier } => file.add(&name, tier.as_deref()).map(|key| {
            println!("{key}");
            eprintln!(
                "key `{name}` added to {}; it is shown only now. A running proxy accepts it within seconds.",
                auth.keys_file.display()
            );
        }),
        KeysCommand::List => file.list().map(|keys| {
            for k in keys {
                println!("{}\t{}\t{}", k.name, k.tier.as_deref().unwrap_or("-"), k.created);
            }
        }),
        KeysCommand::Revoke { name } => file.revoke(&name).map(|()| {
            eprintln!("key `{name}` revoked. A running proxy refuses it within seconds.");
        }),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
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
