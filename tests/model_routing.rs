//! Model-aware routing seen from outside: Ollama-shaped upstreams that each
//! serve some models, the proxy sending each request only where its
//! `model` is served (from the policy's `models`, or learnt from
//! `/api/tags`, `/v1/models` and `/api/ps`), preferring a server with the
//! model loaded, and answering 404 with the pool's models for a model
//! nobody serves.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::Value;
use support::*;

/// An Ollama (or, with `openai`, an OpenAI-compatible server) whose model
/// lists can change while it runs. Generation requests answer with the
/// server's name and, as Ollama does, leave the model loaded; `x-delay-ms`
/// makes one slow.
struct ModelServer {
    up: Upstream,
    served: Arc<Mutex<Vec<String>>>,
}

impl ModelServer {
    async fn start(name: &'static str, served: &[&str], loaded: &[&str], openai: bool) -> Self {
        let list = |v: &[&str]| Arc::new(Mutex::new(v.iter().map(|s| s.to_string()).collect()));
        let (served, loaded) = (list(served), list(loaded));
        let (s, l) = (served.clone(), loaded.clone());
        let up = Upstream::start(move |req: Request<Incoming>| {
            let (served, loaded) = (s.clone(), l.clone());
            async move {
                let entries = |v: &Mutex<Vec<String>>| -> Vec<Value> {
                    v.lock()
                        .unwrap()
                        .iter()
                        .map(|m| serde_json::json!({ "name": m, "model": m, "size": 1 }))
                        .collect()
                };
                match req.uri().path() {
                    "/api/tags" if openai => response(404, "404 page not found"),
                    "/api/tags" => response(
                        200,
                        serde_json::json!({ "models": entries(&served) }).to_string(),
                    ),
                    "/api/ps" => response(
                        200,
                        serde_json::json!({ "models": entries(&loaded) }).to_string(),
                    ),
                    "/v1/models" if openai => {
                        let data: Vec<Value> = served
                            .lock()
                            .unwrap()
                            .iter()
                            .map(|m| serde_json::json!({ "id": m, "object": "model" }))
                            .collect();
                        response(
                            200,
                            serde_json::json!({ "object": "list", "data": data }).to_string(),
                        )
                    }
                    "/api/version" => response(200, r#"{"version":"0.5.0"}"#),
                    _ => {
                        let delay = req
                            .headers()
                            .get("x-delay-ms")
                            .and_then(|v| v.to_str().ok()?.parse().ok())
                            .unwrap_or(0);
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                        let model = serde_json::from_slice::<Value>(&body)
                            .ok()
                            .and_then(|v| v["model"].as_str().map(str::to_owned));
                        if let Some(m) = &model {
                            let mut loaded = loaded.lock().unwrap();
                            if !loaded.contains(m) {
                                loaded.push(m.clone());
                            }
                        }
                        response(
                            200,
                            serde_json::json!({ "server": name, "model": model }).to_string(),
                        )
                    }
                }
            }
        })
        .await;
        ModelServer { up, served }
    }

    /// Generation requests it received.
    fn generations(&self) -> usize {
        self.up
            .seen()
            .iter()
            .filter(|s| s.method == http::Method::POST)
            .count()
    }
}

async fn generate(proxy: &TestProxy, body: &str) -> (u16, Value) {
    generate_at(proxy.url("/api/generate"), body, 0).await
}

async fn generate_at(url: String, body: &str, delay_ms: u64) -> (u16, Value) {
    let req = Request::post(url)
        .header("content-type", "application/json")
        .header("x-delay-ms", delay_ms.to_string())
        .body(full(Bytes::from(body.to_owned())))
        .unwrap();
    let (parts, body) = send(req).await;
    (parts.status.as_u16(), json(&body))
}

fn served_by(answer: &(u16, Value)) -> &str {
    assert_eq!(answer.0, 200, "{}", answer.1);
    answer.1["server"].as_str().expect("a server's answer")
}

/// Waits until every server of pool `up` has answered discovery.
async fn discovered(proxy: &TestProxy, servers: usize) {
    for _ in 0..100 {
        let pool = proxy.fleet.pool("up").unwrap();
        let snapshot = pool.snapshot();
        let known = snapshot
            .iter()
            .filter(|s| s.models.as_ref().is_some_and(|m| m.models.is_some()))
            .count();
        if known == servers {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("discovery did not answer in time");
}

#[tokio::test]
async fn static_lists_send_each_model_only_to_its_servers() {
    let a = ModelServer::start("a", &[], &[], false).await;
    let b = ModelServer::start("b", &[], &[], false).await;
    let c = ModelServer::start("c", &[], &[], false).await;
    let policy = format!(
        r#"[upstreams.up]
servers = [
  {{ url = "{}", models = ["llama3.2"] }},
  {{ url = "{}", models = ["llama3.2:latest", "qwen2.5:7b"] }},
  {{ url = "{}", models = ["phi3:mini"] }},
  {{ url = "http://{}", models = ["llama3.2"] }},
]
model_routing = "static"

[[route]]
name = "generate"
match = {{ methods = ["POST"], path_prefix = "/api/" }}
upstream = "up"

[[route]]
name = "meta"
upstream = "up"
"#,
        a.up.url(),
        b.up.url(),
        c.up.url(),
        refused_addr().await
    );
    let proxy = TestProxy::start(&policy).await;

    // Names resolve as Ollama's do: case and `:latest` do not matter. The
    // fourth server refuses connections: its share is retried on the
    // model's other servers, never on one without the model.
    for body in [
        r#"{"model":"llama3.2","prompt":"hi"}"#,
        r#"{"model":"LLAMA3.2:latest","prompt":"hi"}"#,
    ] {
        for _ in 0..6 {
            let s = served_by(&generate(&proxy, body).await).to_owned();
            assert!(s == "a" || s == "b", "llama3.2 went to {s}");
        }
    }
    assert!(a.generations() > 0 && b.generations() > 0);
    assert_eq!(c.generations(), 0);
    let answer = generate(&proxy, r#"{"model":"phi3:mini","prompt":"hi"}"#).await;
    assert_eq!(served_by(&answer), "c");
    let answer = generate(&proxy, r#"{"model":"qwen2.5:7b","prompt":"hi"}"#).await;
    assert_eq!(served_by(&answer), "b");

    // A model nobody serves: 404 with the pool's models, nothing sent.
    let before = a.generations() + b.generations() + c.generations();
    let (status, body) = generate(&proxy, r#"{"model":"mistral","prompt":"hi"}"#).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "unknown_model");
    assert_eq!(
        body["error"]["models"],
        serde_json::json!(["llama3.2:latest", "phi3:mini", "qwen2.5:7b"])
    );
    assert!(body["error"]["request_id"].as_str().is_some());
    assert_eq!(before, a.generations() + b.generations() + c.generations());

    // No model named (or no body): any server.
    let answer = generate(&proxy, r#"{"prompt":"hi"}"#).await;
    served_by(&answer);
    let (parts, _) = get(&proxy.url("/api/version")).await;
    assert_eq!(parts.status, 200);
}

#[tokio::test]
async fn unknown_models_go_anywhere_when_the_route_says_so() {
    let a = ModelServer::start("a", &[], &[], false).await;
    let policy = format!(
        r#"[upstreams.up]
servers = [{{ url = "{}", models = ["llama3.2"] }}]
model_routing = "static"

[[route]]
name = "generate"
upstream = "up"
unknown_model = "any_server"
"#,
        a.up.url()
    );
    let proxy = TestProxy::start(&policy).await;
    let answer = generate(&proxy, r#"{"model":"mistral","prompt":"hi"}"#).await;
    assert_eq!(served_by(&answer), "a");
}

#[tokio::test]
async fn discovery_learns_who_serves_what_and_prefers_loaded_models() {
    let a = ModelServer::start("a", &["llama3.2:latest", "phi3:latest"], &[], false).await;
    let b = ModelServer::start("b", &["llama3.2:latest"], &["llama3.2:latest"], false).await;
    let c = ModelServer::start("c", &["Qwen2.5-7B-Instruct"], &[], true).await;
    let policy = format!(
        r#"[upstreams.up]
servers = [{{ url = "{}" }}, {{ url = "{}" }}, {{ url = "{}" }}]
model_routing = "discover"
discover_interval = "1s"

[[route]]
name = "generate"
upstream = "up"
"#,
        a.up.url(),
        b.up.url(),
        c.up.url()
    );
    let proxy = TestProxy::start(&policy).await;
    discovered(&proxy, 3).await;

    // llama3.2 is served by a and b, loaded on b: b gets it.
    for _ in 0..8 {
        let answer = generate(&proxy, r#"{"model":"llama3.2","prompt":"hi"}"#).await;
        assert_eq!(served_by(&answer), "b");
    }
    let answer = generate(&proxy, r#"{"model":"phi3","prompt":"hi"}"#).await;
    assert_eq!(served_by(&answer), "a");
    // From /v1/models, for a server without Ollama's API.
    let answer = generate(&proxy, r#"{"model":"qwen2.5-7b-instruct","messages":[]}"#).await;
    assert_eq!(served_by(&answer), "c");
    let (status, body) = generate(&proxy, r#"{"model":"mistral"}"#).await;
    assert_eq!(status, 404);
    assert_eq!(
        body["error"]["models"],
        serde_json::json!([
            "llama3.2:latest",
            "phi3:latest",
            "qwen2.5-7b-instruct:latest"
        ])
    );

    // What operators see: models, and what answered loads the model there.
    let snapshot = proxy.fleet.pool("up").unwrap().snapshot();
    let models = snapshot[0].models.as_ref().unwrap();
    assert_eq!(
        models.models.as_deref(),
        Some(&["llama3.2:latest".to_owned(), "phi3:latest".to_owned()][..])
    );
    assert_eq!(models.loaded, vec!["phi3:latest".to_owned()]);
    assert_eq!(
        snapshot[1].models.as_ref().unwrap().loaded,
        vec!["llama3.2:latest".to_owned()]
    );

    // A model pulled on `a` later: requests for it go there after the next poll.
    a.served.lock().unwrap().push("gemma2:2b".to_owned());
    let mut found = false;
    for _ in 0..40 {
        let (status, body) = generate(&proxy, r#"{"model":"gemma2:2b"}"#).await;
        if status == 200 {
            assert_eq!(body["server"], "a");
            found = true;
            break;
        }
        assert_eq!(status, 404);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(found, "gemma2:2b never routed");
}

#[tokio::test]
async fn a_full_loaded_server_gives_way_to_another_serving_the_model() {
    let a = ModelServer::start("a", &["llama3.2"], &[], false).await;
    let b = ModelServer::start("b", &["llama3.2"], &["llama3.2"], false).await;
    let policy = format!(
        r#"[upstreams.up]
servers = [{{ url = "{}" }}, {{ url = "{}" }}]
model_routing = "discover"
max_inflight_per_server = 1

[[route]]
name = "generate"
upstream = "up"
"#,
        a.up.url(),
        b.up.url()
    );
    let proxy = TestProxy::start(&policy).await;
    discovered(&proxy, 2).await;
    let url = proxy.url("/api/generate");
    let slow = tokio::spawn(async move {
        generate_at(url, r#"{"model":"llama3.2","prompt":"long"}"#, 600).await
    });
    // The slow one holds b's only slot; the next goes to a at once.
    while b.generations() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let answer = generate(&proxy, r#"{"model":"llama3.2","prompt":"short"}"#).await;
    assert_eq!(served_by(&answer), "a");
    assert!(
        !slow.is_finished(),
        "the second request waited for the first"
    );
    assert_eq!(served_by(&slow.await.unwrap()), "b");
}
