//! `engine_signals` against real upstreams that play vLLM and Ollama: a
//! server whose engine reports a queue from other clients gets nothing
//! while an idle one is there, and is judged by this proxy's counts again
//! once its metrics stop making sense; the engine's KV-cache size and
//! prefix hits reach `prefix_affinity`'s index and `/admin/upstreams`; an
//! Ollama server that unloads its model is forgotten by the index.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use serde_json::{json, Value};
use support::*;

const TOKEN: &str = "0123456789abcdef-engine-token";

/// What one fake engine answers to its polls: a status and a body, for
/// `/metrics` and `/api/ps` alike.
type Page = Arc<Mutex<(u16, String)>>;

struct Engines {
    servers: Vec<Upstream>,
    pages: Vec<Page>,
}

fn vllm_page(running: u32, waiting: u32) -> String {
    format!(
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
         # TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{engine=\"0\",model_name=\"m\"}} {running}.0\n\
         vllm:num_requests_waiting{{engine=\"0\",model_name=\"m\"}} {waiting}.0\n\
         vllm:kv_cache_usage_perc{{engine=\"0\",model_name=\"m\"}} 0.42\n"
    )
}

impl Engines {
    /// `n` servers answering chats with `x-server: N` and polls with their
    /// page.
    async fn start(n: usize, page: &str) -> Engines {
        let mut servers = Vec::new();
        let mut pages = Vec::new();
        for i in 0..n {
            let p: Page = Arc::new(Mutex::new((200, page.to_owned())));
            pages.push(p.clone());
            servers.push(
                Upstream::start(move |req: http::Request<hyper::body::Incoming>| {
                    let p = p.clone();
                    async move {
                        if req.method() == http::Method::GET {
                            let (status, body) = p.lock().unwrap().clone();
                            return response(status, body);
                        }
                        Response::builder()
                            .header("x-server", i.to_string())
                            .header("content-type", "application/json")
                            .body(full(r#"{"choices":[{"message":{"content":"ok"}}]}"#))
                            .unwrap()
                    }
                })
                .await,
            );
        }
        Engines { servers, pages }
    }

    fn set(&self, i: usize, status: u16, body: impl Into<String>) {
        *self.pages[i].lock().unwrap() = (status, body.into());
    }

    async fn proxy(&self, pool_keys: &str) -> (TestProxy, TempFile) {
        let token = TempFile::new("admin.token", &format!("{TOKEN}\n"));
        let servers: Vec<String> = self
            .servers
            .iter()
            .map(|s| format!("{{ url = \"{}\" }}", s.url()))
            .collect();
        let proxy = TestProxy::start(&format!(
            "[admin]\ntoken_file = \"{}\"\n\n[upstreams.gpus]\nservers = [{}]\nretries = 0\n{pool_keys}\n\n[[route]]\nname = \"chat\"\nupstream = \"gpus\"\n",
            token.display(),
            servers.join(", ")
        ))
        .await;
        (proxy, token)
    }
}

async fn admin(proxy: &TestProxy, path: &str) -> String {
    String::from_utf8_lossy(&admin_get(proxy, TOKEN, path).await.1).into_owned()
}

async fn pool(proxy: &TestProxy) -> Value {
    json(admin(proxy, "/admin/upstreams").await.as_bytes())["upstreams"][0].clone()
}

/// Polls `/admin/upstreams` until `ok` holds of the pool (engines are
/// polled every 250 ms here), or fails after 10 s with the last view.
async fn until(proxy: &TestProxy, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let p = pool(proxy).await;
        if ok(&p) {
            return p;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {p:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn chat(proxy: &TestProxy, body: &Value) -> usize {
    let (parts, _) = send(
        Request::post(proxy.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(full(body.to_string()))
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 200);
    parts.headers["x-server"].to_str().unwrap().parse().unwrap()
}

fn hello() -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": "hello"}]})
}

#[tokio::test]
async fn a_queue_from_other_clients_steers_until_the_engine_stops_making_sense() {
    let engines = Engines::start(2, &vllm_page(0, 0)).await;
    // Server 0 is busy with other clients: 6 generating, 10 waiting.
    engines.set(0, 200, vllm_page(6, 10));
    let (proxy, _token) = engines
        .proxy("engine_signals = \"vllm\"\nengine_poll_interval = \"250ms\"")
        .await;
    let p = until(&proxy, "both engines read", |p| {
        p["servers"][0]["engine"]["others"] == 16 && p["servers"][1]["engine"]["in_use"] == true
    })
    .await;
    let e = &p["servers"][0]["engine"];
    assert_eq!(e["reading"]["running"], 6, "{p:#}");
    assert_eq!(e["reading"]["waiting"], 10);
    assert_eq!(e["reading"]["kv_cache_usage"], 0.42);
    // Of the 16 others, the 10 waiting are weighed.
    assert_eq!(e["others_waiting"], 10);
    // One request at a time: by this proxy's counts both servers are
    // idle, by the engines' server 0 has a queue of 10.
    for _ in 0..20 {
        assert_eq!(chat(&proxy, &hello()).await, 1);
    }
    let metrics = admin(&proxy, "/metrics").await;
    let url0 = engines.servers[0].url();
    for line in [
        format!(
            r#"hyperion_upstream_engine_requests{{upstream="gpus",server="{url0}",state="others"}} 16"#
        ),
        format!(
            r#"hyperion_upstream_engine_requests{{upstream="gpus",server="{url0}",state="waiting"}} 10"#
        ),
        format!(r#"hyperion_upstream_engine_up{{upstream="gpus",server="{url0}"}} 1"#),
    ] {
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }

    // Its metrics page turns into something else (a different server
    // behind the address): judged by this proxy's counts again.
    engines.set(0, 200, "go_goroutines 8\n");
    let p = until(&proxy, "server 0's signals dropped", |p| {
        p["servers"][0]["engine"]["in_use"] == false
    })
    .await;
    let why = p["servers"][0]["engine"]["error"].as_str().unwrap();
    assert!(why.contains("vllm:num_requests_running"), "{why}");
    // The last good reading stays visible beside the error.
    assert_eq!(p["servers"][0]["engine"]["reading"]["waiting"], 10);
    let mut at = [0; 2];
    for _ in 0..40 {
        at[chat(&proxy, &hello()).await] += 1;
    }
    assert!(at[0] >= 5 && at[1] >= 5, "both used again: {at:?}");
    let metrics = admin(&proxy, "/metrics").await;
    for line in [
        format!(r#"hyperion_upstream_engine_up{{upstream="gpus",server="{url0}"}} 0"#),
        // No figure stands for a reading that no longer steers.
        format!(
            r#"hyperion_upstream_engine_requests{{upstream="gpus",server="{url0}",state="waiting"}} NaN"#
        ),
    ] {
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }

    // Busy again, then a page past the 4 MiB bound, then an error status:
    // each drops the signal.
    engines.set(0, 200, vllm_page(6, 10));
    until(&proxy, "read again", |p| {
        p["servers"][0]["engine"]["in_use"] == true
    })
    .await;
    assert_eq!(chat(&proxy, &hello()).await, 1);
    let mut huge = vllm_page(6, 10);
    huge.push_str(&"# padding\n".repeat(500_000));
    engines.set(0, 200, huge);
    let p = until(&proxy, "a huge page refused", |p| {
        p["servers"][0]["engine"]["in_use"] == false
    })
    .await;
    assert!(p["servers"][0]["engine"]["error"].is_string(), "{p:#}");
    engines.set(0, 200, vllm_page(6, 10));
    until(&proxy, "read again", |p| {
        p["servers"][0]["engine"]["in_use"] == true
    })
    .await;
    engines.set(0, 503, "overloaded");
    let p = until(&proxy, "503 drops it", |p| {
        p["servers"][0]["engine"]["in_use"] == false
    })
    .await;
    assert_eq!(
        p["servers"][0]["engine"]["error"],
        "GET /metrics answered 503"
    );
}

/// A conversation long enough to name blocks.
fn conversation(user: usize) -> Value {
    json!({"model": "m", "messages": [
        {"role": "system", "content": "a long system prompt. ".repeat(60)},
        {"role": "user", "content": format!("user {user} asks ").repeat(30)},
    ]})
}

#[tokio::test]
async fn the_engines_cache_size_and_prefix_hits_reach_the_index() {
    let page = |hits: u32, queries: u32| {
        format!(
            "{}vllm:prefix_cache_hits_total{{engine=\"0\",model_name=\"m\"}} {hits}.0\n\
             vllm:prefix_cache_queries_total{{engine=\"0\",model_name=\"m\"}} {queries}.0\n\
             vllm:cache_config_info{{block_size=\"16\",enable_prefix_caching=\"True\",num_gpu_blocks=\"100\"}} 1.0\n",
            vllm_page(0, 0)
        )
    };
    let engines = Engines::start(2, &page(0, 0)).await;
    // Server 1 says nothing of its cache's size.
    engines.set(1, 200, vllm_page(0, 0));
    let (proxy, _token) = engines
        .proxy("balance = \"prefix_affinity\"\nengine_signals = \"vllm\"\nengine_poll_interval = \"250ms\"")
        .await;
    // 100 blocks of 16 tokens, at 4 bytes a token, in 256-byte blocks: 25.
    let p = until(&proxy, "server 0's size read", |p| {
        p["prefix_affinity"]["servers"][0]["capacity_blocks"] == 25
    })
    .await;
    assert_eq!(
        p["prefix_affinity"]["servers"][1]["capacity_blocks"],
        100_000 * 4 / 256,
        "{p:#}"
    );
    // The engine's counters move: 300 of 1,000 prompt tokens hit since
    // the proxy began asking.
    engines.set(0, 200, page(300, 1000));
    until(&proxy, "the engine's hit ratio", |p| {
        p["prefix_affinity"]["servers"][0]["engine_hit_ratio"] == 0.3
    })
    .await;
    // Hyperion's prediction beside it: a conversation sent twice.
    let first = chat(&proxy, &conversation(0)).await;
    assert_eq!(chat(&proxy, &conversation(0)).await, first);
    let p = pool(&proxy).await;
    assert_eq!(
        p["prefix_affinity"]["servers"][first]["predicted_hit_ratio"], 0.5,
        "{p:#}"
    );
    let metrics = admin(&proxy, "/metrics").await;
    let url0 = engines.servers[0].url();
    assert!(
        metrics.contains(&format!(
            r#"hyperion_upstream_prefix_hit_ratio{{upstream="gpus",server="{url0}",source="engine"}} 0.3"#
        )),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_ollama_server_that_unloads_its_model_is_forgotten() {
    let loaded = r#"{"models":[{"name":"m:latest","model":"m:latest","size_vram":5000000000}]}"#;
    let engines = Engines::start(2, loaded).await;
    let (proxy, _token) = engines
        .proxy("balance = \"prefix_affinity\"\nengine_signals = \"ollama\"\nengine_poll_interval = \"250ms\"")
        .await;
    let p = until(&proxy, "both read", |p| {
        (0..2).all(|i| p["servers"][i]["engine"]["in_use"] == true)
    })
    .await;
    assert_eq!(
        p["servers"][0]["engine"]["reading"]["loaded"],
        json!(["m:latest"])
    );
    assert_eq!(
        p["servers"][0]["engine"]["reading"]["vram_bytes"],
        5_000_000_000u64
    );
    // Ollama says nothing of its queue: no one else's requests counted.
    assert!(p["servers"][0]["engine"]["others"].is_null(), "{p:#}");
    let at = chat(&proxy, &conversation(1)).await;
    let blocks = |p: &Value| {
        p["prefix_affinity"]["servers"][at]["blocks"]
            .as_u64()
            .unwrap()
    };
    assert!(blocks(&pool(&proxy).await) > 0);
    // The model's keep-alive runs out: Ollama frees its KV cache.
    engines.set(at, 200, r#"{"models":[]}"#);
    until(&proxy, "forgotten", |p| blocks(p) == 0).await;
}
