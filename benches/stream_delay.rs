//! Streaming compression's delay: how much later each event of an NDJSON
//! stream becomes readable at a client when Hyperion compresses the stream
//! (gzip, br) than when it passes as identity.
//!
//! In one process, on loopback: an upstream sends `EVENTS` events `GAP`
//! apart; Hyperion (compression on, nothing cached) sits in front; a client
//! decodes what arrives as it arrives and notes, for every event, the time
//! from the upstream sending it to the client holding all of it. The
//! promise is at most one chunk of delay: every event readable before the
//! upstream sends the next one.
//!
//! Run: cargo bench --bench stream_delay   (about 15 s; prints medians)

use std::convert::Infallible;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyperion::generation::{Generation, LiveProxy};
use hyperion::{LogSink, Policy};
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;

const EVENTS: usize = 40;
const GAP: Duration = Duration::from_millis(20);
const STREAMS: usize = 5;

type Body = BoxBody<Bytes, Infallible>;

fn event(i: usize) -> String {
    format!(
        "{{\"model\":\"llama3.2\",\"created_at\":\"2026-11-21T00:00:00Z\",\"response\":\" token{i}\",\"done\":{}}}\n",
        i + 1 == EVENTS
    )
}

/// When the upstream sent each event of the stream in flight.
type SentAt = Arc<Mutex<Vec<Instant>>>;

async fn upstream(sent_at: SentAt) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            // As a streaming server should: no Nagle wait on small events.
            tcp.set_nodelay(true).unwrap();
            let sent_at = sent_at.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    let sent_at = sent_at.clone();
                    async move {
                        let (tx, rx) =
                            tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
                        tokio::spawn(async move {
                            sent_at.lock().unwrap().clear();
                            for i in 0..EVENTS {
                                sent_at.lock().unwrap().push(Instant::now());
                                if tx.send(Ok(Frame::data(event(i).into()))).await.is_err() {
                                    return;
                                }
                                tokio::time::sleep(GAP).await;
                            }
                        });
                        let body: Body = StreamBody::new(ReceiverStream::new(rx)).boxed();
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("content-type", "application/x-ndjson")
                                .body(body)
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

async fn proxy(upstream: &str) -> String {
    let policy = format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
access_log = "off"

[upstreams.up]
servers = [{{ url = "{upstream}" }}]

[[route]]
name = "stream"
upstream = "up"

[compression]
algorithms = ["br", "gzip"]
"#
    );
    let policy = Policy::parse("stream_delay.toml", &policy).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let first = Generation::first(policy, LogSink::Stderr);
    let proxy = Arc::new(LiveProxy::from_pointee(first.proxy(None)));
    tokio::spawn(hyperion::serve(
        vec![listener],
        proxy,
        std::future::pending(),
    ));
    format!("http://{addr}/api/generate")
}

/// Decodes a stream as its bytes arrive.
enum Reader {
    Identity(Vec<u8>),
    Gzip(flate2::write::GzDecoder<Vec<u8>>),
    Br(Box<brotli::DecompressorWriter<Vec<u8>>>),
}

impl Reader {
    fn new(coding: &str) -> Self {
        match coding {
            "gzip" => Reader::Gzip(flate2::write::GzDecoder::new(Vec::new())),
            "br" => Reader::Br(Box::new(brotli::DecompressorWriter::new(Vec::new(), 4096))),
            _ => Reader::Identity(Vec::new()),
        }
    }

    /// Feeds `bytes`; returns everything decoded so far.
    fn feed(&mut self, bytes: &[u8]) -> &[u8] {
        match self {
            Reader::Identity(out) => {
                out.extend_from_slice(bytes);
                out
            }
            Reader::Gzip(d) => {
                d.write_all(bytes).unwrap();
                d.flush().unwrap();
                d.get_ref()
            }
            Reader::Br(d) => {
                d.write_all(bytes).unwrap();
                d.flush().unwrap();
                d.get_ref()
            }
        }
    }
}

/// One stream: each event's delay from the upstream sending it to the
/// client holding all of it.
async fn one_stream(url: &str, coding: &str, sent_at: &SentAt) -> Vec<Duration> {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let mut req = Request::get(url);
    if coding != "identity" {
        req = req.header("accept-encoding", coding);
    }
    let resp = client
        .request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    if coding != "identity" {
        assert_eq!(resp.headers()["content-encoding"], coding);
    }
    let mut body = resp.into_body();
    let mut reader = Reader::new(coding);
    let mut delays = Vec::with_capacity(EVENTS);
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.unwrap().into_data() else {
            continue;
        };
        let arrived = Instant::now();
        let lines = reader.feed(&data).iter().filter(|&&b| b == b'\n').count();
        let sent = sent_at.lock().unwrap().clone();
        while delays.len() < lines {
            delays.push(arrived - sent[delays.len()]);
        }
    }
    assert_eq!(delays.len(), EVENTS, "{coding}: every event arrived");
    delays
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let sent_at: SentAt = Arc::default();
        let url = proxy(&upstream(sent_at.clone()).await).await;
        println!(
            "stream_delay: {EVENTS} NDJSON events {GAP:?} apart, {STREAMS} streams per coding, through Hyperion (no caching)"
        );
        println!(
            "{:<9} {:>12} {:>12} {:>12} {:>24}",
            "coding", "median", "p90", "max", "readable before next"
        );
        let mut base = Duration::ZERO;
        for coding in ["identity", "gzip", "br"] {
            let mut all = Vec::new();
            for _ in 0..STREAMS {
                all.extend(one_stream(&url, coding, &sent_at).await);
            }
            let within = all.iter().filter(|d| **d < GAP).count();
            let med = median(&mut all);
            let p90 = all[all.len() * 9 / 10];
            let max = *all.last().unwrap();
            if coding == "identity" {
                base = med;
            }
            println!(
                "{coding:<9} {:>10.0}µs {:>10.0}µs {:>10.0}µs {:>17}/{} {}",
                med.as_secs_f64() * 1e6,
                p90.as_secs_f64() * 1e6,
                max.as_secs_f64() * 1e6,
                within,
                all.len(),
                if coding == "identity" {
                    String::new()
                } else {
                    format!(
                        "(median +{:.0}µs vs identity)",
                        (med.saturating_sub(base)).as_secs_f64() * 1e6
                    )
                }
            );
        }
    });
}
