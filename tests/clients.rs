//! The official clients against Hyperion's API keys: OpenAI's Python
//! client (as used against Ollama's OpenAI-compatible `/v1`) and Ollama's
//! own, run for real. A wrong key raises the client's authentication
//! error; a good one gets the answer, and never reaches the backend.
//!
//! Needs a Python with `openai` and `ollama` installed: `.ci/run` makes
//! `.venv-clients` (`python3 -m venv .venv-clients && .venv-clients/bin/pip
//! install openai ollama kubernetes-validate`); `HYPERION_CLIENTS_PYTHON`
//! names another.

mod support;

use http::{Request, Response};
use hyperion::auth::KeysFileAt;
use support::*;

const SCRIPT: &str = r#"
import json, sys
import ollama, openai

base, key = sys.argv[1], sys.argv[2]
out = {}
ask = [{"role": "user", "content": "hi"}]
try:
    openai.OpenAI(base_url=base + "/v1", api_key="hyp_" + "0" * 48, max_retries=0) \
        .chat.completions.create(model="m", messages=ask)
    out["openai_wrong_key"] = "answered"
except openai.AuthenticationError as e:
    out["openai_wrong_key"] = "AuthenticationError: " + str(e.body.get("code"))
r = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0) \
    .chat.completions.create(model="m", messages=ask)
out["openai"] = r.choices[0].message.content
out["openai_usage"] = r.usage.total_tokens
r = ollama.Client(host=base, headers={"Authorization": "Bearer " + key}).chat(model="m", messages=ask)
out["ollama"] = r["message"]["content"]
try:
    ollama.Client(host=base).chat(model="m", messages=ask)
    out["ollama_no_key"] = "answered"
except ollama.ResponseError as e:
    out["ollama_no_key"] = e.status_code
print(json.dumps(out))
"#;

/// The Python that has the clients.
fn python() -> String {
    if let Ok(p) = std::env::var("HYPERION_CLIENTS_PYTHON") {
        return p;
    }
    let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv-clients/bin/python");
    if std::path::Path::new(venv).exists() {
        return venv.to_owned();
    }
    "python3".to_owned()
}

/// An OpenAI-compatible and Ollama-shaped backend: one answer each, with
/// its usage.
async fn backend() -> Upstream {
    Upstream::start(|req| async move {
        let body = match req.uri().path() {
            "/v1/chat/completions" => {
                r#"{"id":"c1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hello from v1"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#
            }
            _ => {
                r#"{"model":"m","created_at":"2026-12-05T00:00:00Z","message":{"role":"assistant","content":"hello from ollama"},"done":true,"done_reason":"stop","prompt_eval_count":5,"eval_count":6}"#
            }
        };
        Response::builder()
            .header("content-type", "application/json")
            .body(full(body))
            .unwrap()
    })
    .await
}

#[tokio::test]
async fn the_official_clients_raise_their_auth_error_and_pass_with_a_key() {
    let check = std::process::Command::new(python())
        .args(["-c", "import openai, ollama"])
        .output();
    match check {
        Ok(o) if o.status.success() => {}
        other => panic!(
            "no Python with the openai and ollama clients ({other:?}): python3 -m venv \
             .venv-clients && .venv-clients/bin/pip install openai ollama (as .ci/run does), \
             or set HYPERION_CLIENTS_PYTHON"
        ),
    }
    let up = backend().await;
    let keys = TempFile::new("keys.toml", "");
    std::fs::remove_file(&keys.0).unwrap();
    let key = KeysFileAt(keys.0.clone()).add("alice", None).unwrap();
    let token = TempFile::new("admin.token", "0123456789abcdef-clients-token\n");
    let proxy = TestProxy::start(&format!(
        "[auth]\nkeys_file = \"{}\"\n\n[admin]\nlisten = \"127.0.0.1:9\"\ntoken_file = \"{}\"\n\n\
         [upstreams.ollama]\nservers = [{{ url = \"{}\" }}]\n\n[[route]]\nname = \"all\"\nupstream = \"ollama\"\n",
        keys.display(),
        token.display(),
        up.url()
    ))
    .await;
    let base = proxy.url("").trim_end_matches('/').to_owned();
    let script = TempFile::new("clients.py", SCRIPT);
    let run = tokio::process::Command::new(python())
        .arg(&script.0)
        .args([&base, &key])
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), run)
        .await
        .expect("the clients finish within a minute")
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = json(&out.stdout);
    assert_eq!(
        said["openai_wrong_key"],
        "AuthenticationError: invalid_api_key"
    );
    assert_eq!(said["openai"], "hello from v1");
    assert_eq!(said["openai_usage"], 7);
    assert_eq!(said["ollama"], "hello from ollama");
    assert_eq!(said["ollama_no_key"], 401);
    // Two answers reached the clients; the backend never saw the key.
    assert_eq!(up.count(), 2);
    assert!(up
        .seen()
        .iter()
        .all(|s| !s.headers.contains_key("authorization")));
    // And the key's usage says what the backend's answers said.
    let mut usage = serde_json::Value::Null;
    for _ in 0..100 {
        let (_, body) = send(
            Request::get(format!("http://{}/admin/keys/alice", proxy.admin.unwrap()))
                .header("authorization", "Bearer 0123456789abcdef-clients-token")
                .body(empty())
                .unwrap(),
        )
        .await;
        usage = json(&body)["usage"].clone();
        if usage["tokens_out"] == 10 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(usage["requests"], 2, "{usage}");
    assert_eq!(usage["tokens_in"], 8, "{usage}");
    assert_eq!(usage["tokens_out"], 10, "{usage}");
}
