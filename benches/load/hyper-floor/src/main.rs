//! hyper-floor: the least work a hyper 1 proxy can do per request, as a
//! reference row for `benches/load/passthrough.sh`.
//!
//! One tokio current-thread runtime; per client connection one upstream
//! connection, opened with it, and one task polling both (hyper's server and
//! client HTTP/1 state machines). A request goes upstream as it came (no
//! header is added, removed or checked) and the answer comes back as it came.
//! No routing, no timeouts, no logs, no errors worth the name: it is not a
//! proxy anyone should run, only the cost of hyper itself, so a run can tell
//! how much of Hyperion's cost per request is hyper's and how much is ours.
//!
//! Usage: hyper-floor LISTEN UPSTREAM   (both host:port, loopback)

use std::sync::{Arc, Mutex};

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: hyper-floor LISTEN UPSTREAM");
        std::process::exit(2);
    };
    let upstream: Arc<str> = upstream.into();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind(&listen).await.expect("bind");
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let _ = client.set_nodelay(true);
                let Ok(up) = TcpStream::connect(&*upstream).await else {
                    return;
                };
                let _ = up.set_nodelay(true);
                let Ok((sender, client_conn)) =
                    hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(up)).await
                else {
                    return;
                };
                // HTTP/1 serves one request at a time, so the lock is never
                // contended; the send future does not borrow the sender.
                let sender = Arc::new(Mutex::new(sender));
                let service = service_fn(move |req: Request<Incoming>| {
                    let sent = sender.lock().expect("sender").send_request(req);
                    sent
                });
                let server_conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(client), service);
                tokio::select! {
                    _ = server_conn => {}
                    _ = client_conn => {}
                }
            });
        }
    });
}
