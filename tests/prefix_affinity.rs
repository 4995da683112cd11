//! `balance = "prefix_affinity"` against three real upstreams that say who
//! they are: a conversation's turns stay on the server that has its
//! history, a tenant's users land where its system prompt is, a server
//! over its load bound passes a hot prefix on, a server taken out of
//! rotation is forgotten, and `/admin/upstreams` and `/metrics` say how
//! requests were routed.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use serde_json::{json, Value};
use support::*;

const TOKEN: &str = "0123456789abcdef-prefix-token";

/// Three servers answering `x-server: N`; a request with `x-hold` waits
/// until `release` is set; server `failing` (when set) answers 500.
struct Fleet {
    servers: Vec<Upstream>,
    release: Arc<AtomicBool>,
    failing: Arc<std::sync::atomic::AtomicUsize>,
}

impl Fleet {
    async fn start() -> Fleet {
        let release = Arc::new(AtomicBool::new(false));
        let failing = Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX));
        let mut servers = Vec::new();
        for n in 0..3usize {
            let (release, failing) = (release.clone(), failing.clone());
            servers.push(
                Upstream::start(move |req: http::Request<hyper::body::Incoming>| {
                    let (release, failing) = (release.clone(), failing.clone());
                    async move {
                        if req.headers().contains_key("x-hold") {
                            while !release.load(Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                        }
                        let status = if failing.load(Ordering::SeqCst) == n {
                            500
                        } else {
                            200
                        };
                        Response::builder()
                            .status(status)
                            .header("x-server", n.to_string())
                            .header("content-type", "application/json")
                            .body(full(r#"{"choices":[{"message":{"content":"ok"}}]}"#))
                            .unwrap()
                    }
                })
                .await,
            );
        }
        Fleet {
            servers,
            release,
            failing,
        }
    }

    async fn proxy(&self) -> (TestProxy, TempFile) {
        let token = TempFile::new("admin.token", &format!("{TOKEN}\n"));
        let servers: Vec<String> = self
            .servers
            .iter()
            .map(|s| format!("{{ url = \"{}\" }}", s.url()))
            .collect();
        let proxy = TestProxy::start(&format!(
            r#"[admin]
token_file = "{}"

[upstreams.gpus]
servers = [{}]
balance = "prefix_affinity"
prefix_cache_tokens = 100000
retries = 0

[[route]]
name = "chat"
upstream = "gpus"
"#,
            token.display(),
            servers.join(", ")
        ))
        .await;
        (proxy, token)
    }
}

/// A conversation: the tenant's long system prompt, then the user's turns.
fn conversation(tenant: usize, user: usize, turns: usize) -> Value {
    let system = format!("tenant {tenant} system prompt. ").repeat(60);
    let mut messages = vec![json!({"role": "system", "content": system})];
    for t in 0..turns {
        messages.push(
            json!({"role": "user", "content": format!("user {user} question {t} ").repeat(20)}),
        );
        messages.push(json!({"role": "assistant", "content": format!("answer {t}")}));
    }
    messages.pop();
    json!({"model": "m", "messages": messages})
}

async fn ask(proxy: &TestProxy, body: &Value, hold: bool) -> (u16, Option<usize>) {
    let mut req =
        Request::post(proxy.url("/v1/chat/completions")).header("content-type", "application/json");
    if hold {
        req = req.header("x-hold", "1");
    }
    let (parts, _) = send(req.body(full(body.to_string())).unwrap()).await;
    let server = parts
        .headers
        .get("x-server")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    (parts.status.as_u16(), server)
}

async fn upstreams(proxy: &TestProxy) -> Value {
    let (_, body) = admin_get(proxy, TOKEN, "/admin/upstreams").await;
    json(&body)["upstreams"][0]["prefix_affinity"].clone()
}

#[tokio::test]
async fn a_conversation_stays_where_its_history_is_and_a_tenant_lands_together() {
    let fleet = Fleet::start().await;
    let (proxy, _token) = fleet.proxy().await;
    // Two tenants, three users each, four turns, one request at a time.
    let mut first = std::collections::HashMap::new();
    for turn in 1..=4 {
        for tenant in 0..2 {
            for user in 0..3 {
                let (status, server) = ask(&proxy, &conversation(tenant, user, turn), false).await;
                assert_eq!(status, 200);
                let server = server.unwrap();
                let at = *first.entry((tenant, user)).or_insert(server);
                assert_eq!(server, at, "tenant {tenant} user {user} turn {turn}");
            }
        }
    }
    // A tenant's users share its system prompt: the same server.
    for tenant in 0..2 {
        let servers: Vec<usize> = (0..3).map(|u| first[&(tenant, u)]).collect();
        assert!(
            servers.iter().all(|s| *s == servers[0]),
            "tenant {tenant}: {servers:?}"
        );
    }
    let report = upstreams(&proxy).await;
    // 24 requests: the first of each tenant placed, the rest by prefix.
    assert_eq!(report["placed"], 2, "{report}");
    assert_eq!(report["routed_by_prefix"], 22, "{report}");
    assert_eq!(report["fell_back_for_load"], 0);
    let held: u64 = report["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["blocks"].as_u64().unwrap())
        .sum();
    assert!(held > 0);
    let (_, metrics) = get(&format!("http://{}/metrics", proxy.admin.unwrap())).await;
    let metrics = String::from_utf8_lossy(&metrics).into_owned();
    assert!(
        metrics
            .contains(r#"hyperion_upstream_prefix_routed_total{upstream="gpus",how="prefix"} 22"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_server_over_its_load_bound_passes_the_prefix_on() {
    let fleet = Fleet::start().await;
    let (proxy, _token) = fleet.proxy().await;
    let (_, home) = ask(&proxy, &conversation(0, 0, 1), false).await;
    let home = home.unwrap();
    // Another of the tenant's users generating at its server.
    let held: Vec<_> = (1..=1)
        .map(|u| {
            let body = conversation(0, u, 1);
            let url = proxy.url("/v1/chat/completions");
            tokio::spawn(async move {
                let (parts, _) = send(
                    Request::post(url)
                        .header("x-hold", "1")
                        .body(full(body.to_string()))
                        .unwrap(),
                )
                .await;
                parts.headers["x-server"]
                    .to_str()
                    .unwrap()
                    .parse::<usize>()
                    .unwrap()
            })
        })
        .collect();
    // Until they are in flight there.
    for _ in 0..200 {
        let in_flight: u64 = fleet.servers.iter().map(|s| s.count() as u64).sum();
        if in_flight >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The next turn of the first user: its server is over its bound (the
    // one request in flight is there: 1.25x a third of 2 is 1), so it
    // goes elsewhere.
    let (_, moved) = ask(&proxy, &conversation(0, 0, 2), false).await;
    fleet.release.store(true, Ordering::SeqCst);
    let mut held_at = Vec::new();
    for h in held {
        held_at.push(h.await.unwrap());
    }
    assert_eq!(held_at, vec![home]);
    assert_ne!(moved.unwrap(), home);
    let report = upstreams(&proxy).await;
    assert!(
        report["fell_back_for_load"].as_u64().unwrap() >= 1,
        "{report}"
    );
}

#[tokio::test]
async fn a_server_out_of_rotation_is_forgotten() {
    let fleet = Fleet::start().await;
    let (proxy, _token) = fleet.proxy().await;
    let (_, home) = ask(&proxy, &conversation(1, 0, 1), false).await;
    let home = home.unwrap();
    // It fails (500) until ejected: three failures in a row.
    fleet.failing.store(home, Ordering::SeqCst);
    for _ in 0..3 {
        let (status, _) = ask(&proxy, &conversation(1, 0, 1), false).await;
        assert_eq!(status, 500);
    }
    // Ejected: the next turn goes elsewhere, and the index forgets it.
    let (status, now) = ask(&proxy, &conversation(1, 0, 2), false).await;
    assert_eq!(status, 200);
    assert_ne!(now.unwrap(), home);
    let report = upstreams(&proxy).await;
    assert_eq!(report["servers"][home]["blocks"], 0, "{report}");
}
