//! An Ollama-shaped backend for trying Hyperion without Ollama.
//!
//! ```text
//! cargo run --example mock_ollama -- --listen 127.0.0.1:11434 --token-delay-ms 30
//! ```
//!
//! Endpoints (the shapes Ollama and OpenAI-compatible servers use):
//! - `POST /api/generate`  `{"model","prompt","stream"}` — NDJSON stream by default, one JSON with `"stream": false`
//! - `POST /api/chat`      `{"model","messages","stream"}` — same, with `message` objects
//! - `POST /api/embed`     `{"model","input"}` — a small deterministic vector per input
//! - `POST /v1/chat/completions` `{"model","messages","stream"}` — SSE chunks then `data: [DONE]`, or one JSON
//! - `GET /api/tags`, `GET /api/version`, `GET /api/ps`
//!
//! Answers are derived from the prompt, so the same prompt gives the same
//! answer (as a cache would return it) and a different one gives another.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Parser;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

#[derive(Parser, Clone)]
#[command(about = "An Ollama-shaped mock backend for trying Hyperion")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:11434")]
    listen: SocketAddr,
    /// Delay before each generated token, in milliseconds.
    #[arg(long, default_value_t = 25)]
    token_delay_ms: u64,
    /// Tokens per answer.
    #[arg(long, default_value_t = 16)]
    tokens: usize,
    /// Models this server serves (comma-separated).
    #[arg(long, default_value = "llama3.2,phi3", value_delimiter = ',')]
    models: Vec<String>,
}

type Body = BoxBody<Bytes, Infallible>;

const WORDS: [&str; 24] = [
    "the",
    "model",
    "answers",
    "quickly",
    "because",
    "a",
    "cache",
    "remembers",
    "every",
    "prompt",
    "it",
    "has",
    "seen",
    "so",
    "GPUs",
    "rest",
    "while",
    "tokens",
    "flow",
    "from",
    "memory",
    "and",
    "latency",
    "drops",
];

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Arc::new(Args::parse());
    let listener = TcpListener::bind(args.listen).await?;
    eprintln!(
        "mock ollama on http://{} (models: {}, {} tokens, {} ms/token)",
        listener.local_addr()?,
        args.models.join(", "),
        args.tokens,
        args.token_delay_ms
    );
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let args = args.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let args = args.clone();
                async move { Ok::<_, Infallible>(route(req, &args).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn route(req: Request<Incoming>, args: &Args) -> Response<Body> {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    match (method, path.as_str()) {
        (Method::GET, "/api/version") => {
            json_response(StatusCode::OK, json!({"version": "0.5.7-mock"}))
        }
        (Method::GET | Method::HEAD, "/api/tags") => {
            let models: Vec<Value> = args
                .models
                .iter()
                .map(|m| json!({"name": format!("{m}:latest"), "model": format!("{m}:latest"), "size": 2_019_393_189u64,
                               "details": {"format": "gguf", "family": "llama", "parameter_size": "3.2B", "quantization_level": "Q4_K_M"}}))
                .collect();
            json_response(StatusCode::OK, json!({ "models": models }))
        }
        (Method::GET, "/api/ps") => json_response(StatusCode::OK, json!({"models": []})),
        (Method::POST, "/api/generate" | "/api/chat" | "/api/embed" | "/v1/chat/completions") => {
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return error(StatusCode::BAD_REQUEST, &format!("reading body: {e}")),
            };
            let request: Value = match serde_json::from_slice(&body) {
                Ok(v @ Value::Object(_)) => v,
                Ok(_) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "request body must be a JSON object",
                    )
                }
                Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}")),
            };
            let model = request["model"].as_str().unwrap_or_default().to_owned();
            let base = model.split(':').next().unwrap_or_default();
            if !args.models.iter().any(|m| m == base) {
                return error(
                    StatusCode::NOT_FOUND,
                    &format!("model '{model}' not found, try pulling it first"),
                );
            }
            generate(&path, &model, &request, args)
        }
        (
            _,
            "/api/version"
            | "/api/tags"
            | "/api/ps"
            | "/api/generate"
            | "/api/chat"
            | "/api/embed"
            | "/v1/chat/completions",
        ) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        _ => error(StatusCode::NOT_FOUND, "404 page not found"),
    }
}

fn generate(path: &str, model: &str, request: &Value, args: &Args) -> Response<Body> {
    let prompt = match path {
        "/api/generate" => request["prompt"].to_string(),
        "/api/embed" => request["input"].to_string(),
        _ => request["messages"].to_string(),
    };
    let seed = fnv1a(prompt.as_bytes());
    if path == "/api/embed" {
        let vector: Vec<f64> = (0..8)
            .map(|i| ((seed >> (i * 8)) & 0xff) as f64 / 255.0)
            .collect();
        return json_response(
            StatusCode::OK,
            json!({"model": model, "embeddings": [vector]}),
        );
    }
    let tokens: Vec<String> = (0..args.tokens)
        .map(|i| {
            let w = WORDS[((seed.rotate_left(i as u32 * 7)) % WORDS.len() as u64) as usize];
            if i == 0 {
                w.to_owned()
            } else {
                format!(" {w}")
            }
        })
        .collect();
    let prompt_tokens = (prompt.len() / 4).max(1) as u64;
    let eval = tokens.len() as u64;
    let openai = path.starts_with("/v1/");
    let stream = request["stream"].as_bool().unwrap_or(!openai);
    let delay = Duration::from_millis(args.token_delay_ms);
    let chat = path == "/api/chat";
    let model = model.to_owned();

    if !stream {
        let text = tokens.concat();
        let value = if openai {
            json!({"id": "chatcmpl-mock", "object": "chat.completion", "created": unix(), "model": model,
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": eval, "total_tokens": prompt_tokens + eval}})
        } else {
            let mut v = done_line(&model, chat, prompt_tokens, eval, delay);
            if chat {
                v["message"] = json!({"role": "assistant", "content": text});
            } else {
                v["response"] = json!(text);
            }
            v
        };
        // A non-streaming answer still takes the time its tokens would.
        return delayed(delay * tokens.len() as u32, value);
    }

    let include_usage = request["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    tokio::spawn(async move {
        let send = |line: String| {
            let tx = tx.clone();
            async move { tx.send(Ok(Frame::data(Bytes::from(line)))).await.is_ok() }
        };
        for token in &tokens {
            tokio::time::sleep(delay).await;
            let line = if openai {
                let chunk = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": unix(), "model": model,
                                   "choices": [{"index": 0, "delta": {"content": token}, "finish_reason": null}]});
                format!("data: {chunk}\n\n")
            } else if chat {
                format!(
                    "{}\n",
                    json!({"model": model, "created_at": now_rfc3339(), "message": {"role": "assistant", "content": token}, "done": false})
                )
            } else {
                format!(
                    "{}\n",
                    json!({"model": model, "created_at": now_rfc3339(), "response": token, "done": false})
                )
            };
            if !send(line).await {
                return; // the client went away
            }
        }
        let last = if openai {
            let mut chunk = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": unix(), "model": model,
                                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
            if include_usage {
                chunk["usage"] = json!({"prompt_tokens": prompt_tokens, "completion_tokens": eval, "total_tokens": prompt_tokens + eval});
            }
            format!("data: {chunk}\n\ndata: [DONE]\n\n")
        } else {
            let mut v = done_line(&model, chat, prompt_tokens, eval, delay);
            if chat {
                v["message"] = json!({"role": "assistant", "content": ""});
            } else {
                v["response"] = json!("");
            }
            format!("{v}\n")
        };
        send(last).await;
    });
    let content_type = if openai {
        "text/event-stream"
    } else {
        "application/x-ndjson"
    };
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .body(StreamBody::new(ReceiverStream::new(rx)).boxed())
        .expect("valid response")
}

fn done_line(model: &str, chat: bool, prompt_tokens: u64, eval: u64, delay: Duration) -> Value {
    let ns = (delay.as_nanos() as u64) * eval;
    let mut v = json!({"model": model, "created_at": now_rfc3339(), "done": true, "done_reason": "stop",
                       "total_duration": ns + 1_000_000, "load_duration": 1_000_000, "prompt_eval_count": prompt_tokens,
                       "prompt_eval_duration": 500_000, "eval_count": eval, "eval_duration": ns});
    if !chat {
        v["context"] = json!([1, 2, 3]);
    }
    v
}

fn delayed(delay: Duration, value: Value) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let _ = tx
            .send(Ok(Frame::data(Bytes::from(value.to_string()))))
            .await;
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .body(StreamBody::new(ReceiverStream::new(rx)).boxed())
        .expect("valid response")
}

fn json_response(status: StatusCode, value: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .expect("valid response")
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json_response(status, json!({ "error": message }))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
}
