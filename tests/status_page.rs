//! The status page on the admin listener (`GET /`), in a real browser:
//! headless Chromium (`tests/status_page.py` drives it over the DevTools
//! protocol) opens it against a running proxy with traffic, and the test
//! checks what the page shows against what the proxy counted: before the
//! token only readiness, a wrong token refused, then the figures, the
//! upstream, the slowest request, the sparklines; the token never in the
//! URL or a cookie; a pause that stops the refresh. The screenshot goes to
//! `target/status-page.png` (with `HYPERION_BLESS=1`, also to
//! `docs/status-page.png`, which the README shows).
//!
//! Needs Chromium (`apt-get install chromium`, as `.ci/run` does);
//! `HYPERION_CHROMIUM` names another browser binary.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use support::*;

const TOKEN: &str = "0123456789abcdef-status-page";

fn chromium() -> String {
    if let Ok(c) = std::env::var("HYPERION_CHROMIUM") {
        return c;
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output();
        if let Ok(o) = found {
            if o.status.success() {
                return String::from_utf8_lossy(&o.stdout).trim().to_owned();
            }
        }
    }
    panic!("no Chromium: apt-get install chromium (as .ci/run does), or set HYPERION_CHROMIUM");
}

/// An Ollama-shaped backend: `/api/chat` answers with its token counts;
/// `/slow` takes 400 ms; `/fail` answers 500.
async fn backend() -> Upstream {
    Upstream::start(|req| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_millis(400)).await;
            return response(200, "slow");
        }
        if req.uri().path() == "/fail" {
            return response(500, "failed");
        }
        ollama_chat_answer()
    })
    .await
}

/// A figure as the page writes it: `950`, `12.5k`, `3.1M`.
fn figure(v: &serde_json::Value) -> f64 {
    let s = v.as_str().unwrap();
    let (n, scale) = match s.chars().last() {
        Some('k') => (&s[..s.len() - 1], 1e3),
        Some('M') => (&s[..s.len() - 1], 1e6),
        _ => (s, 1.0),
    };
    n.parse::<f64>()
        .unwrap_or_else(|_| panic!("not a figure: {s}"))
        * scale
}

async fn chat(proxy: &TestProxy, prompt: &str) -> String {
    let (parts, _) = send(
        Request::post(proxy.url("/api/chat"))
            .header("content-type", "application/json")
            .body(full(format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"{prompt}"}}]}}"#
            )))
            .unwrap(),
    )
    .await;
    parts.headers["x-cache"].to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_figures_in_a_browser() {
    let browser = chromium();
    let up = backend().await;
    let token = TempFile::new("admin.token", &format!("{TOKEN}\n"));
    let proxy = TestProxy::start(&format!(
        r#"[admin]
token_file = "{token}"

[rate_limits.per_ip]
key = "client_ip"
rate = "5/min"
{routes}"#,
        token = token.display(),
        routes = chat_policy(&up.url(), "rate_limit = [\"per_ip\"]")
    ))
    .await;

    // One miss, then hits of the same prompt; one slow request.
    assert_eq!(chat(&proxy, "hi").await, "MISS");
    let mut hits = 0;
    for _ in 0..200 {
        if chat(&proxy, "hi").await == "HIT" {
            hits += 1;
            if hits == 5 {
                break;
            }
        }
    }
    assert_eq!(hits, 5);
    let (slow, _) = get(&proxy.url("/slow")).await;
    assert_eq!(slow.status, 200);

    // Traffic while the page watches until the end: hits at a rate that
    // rises and falls (20 to 60 ms apart), and now and then a failure.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        let (chat, fail) = (proxy.url("/api/chat"), proxy.url("/fail"));
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let req = if n.is_multiple_of(25) {
                    Request::get(&fail).body(empty()).unwrap()
                } else {
                    Request::post(&chat)
                        .body(full(
                            r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
                        ))
                        .unwrap()
                };
                let _ = send(req).await;
                let gap = 20 + (n / 40 % 5) * 10;
                tokio::time::sleep(Duration::from_millis(gap)).await;
            }
        })
    };

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let run = tokio::process::Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/status_page.py"))
        .args([
            browser.as_str(),
            &format!("http://{}/", proxy.admin.unwrap()),
            TOKEN,
            shot.to_str().unwrap(),
        ])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("the browser finishes within five minutes")
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let page = json(&out.stdout);

    // Before the token: readiness only.
    let before = &page["before"];
    assert_eq!(before["ready"], "ready");
    assert_eq!(before["login_visible"], true);
    assert_eq!(before["figures_visible"], false);
    assert_eq!(page["wrong_token_error"], "the token was refused");

    // With it: the figures, as the proxy counts them.
    let after = &page["after"];
    assert_eq!(after["login_visible"], false, "{after}");
    assert_eq!(after["figures_visible"], true);
    let report = proxy.cache.report().await;
    // The page's ratio was read a moment before this report: both are
    // mostly hits.
    let ratio: f64 = after["hit_ratio"]
        .as_str()
        .unwrap()
        .trim_end_matches(" %")
        .parse()
        .unwrap();
    assert!(ratio > 80.0 && ratio <= 100.0, "{after}");
    assert!(report.hit_ratio > 0.8);
    // 50 tokens per hit saved.
    let saved = figure(&after["tokens_saved"]);
    assert!(saved >= 250.0, "{after}");
    assert!(after["cache_sub"].as_str().unwrap().contains("entries"));
    let rps = figure(&after["rps"]);
    assert!(rps > 0.0, "traffic flowed while the page watched: {after}");
    let routes = after["routes"].as_array().unwrap();
    assert!(
        routes
            .iter()
            .any(|r| r[0] == "chat" && r[1] == "200" && r[2] == "HIT"),
        "{routes:?}"
    );
    let upstreams = after["upstreams"].as_array().unwrap();
    assert_eq!(upstreams.len(), 1);
    assert_eq!(upstreams[0][0], "ollama");
    assert_eq!(upstreams[0][1], up.url());
    assert_eq!(upstreams[0][2], "healthy");
    // The slow request is the slowest, with its route and no path.
    let slowest = after["slowest"].as_array().unwrap();
    assert_eq!(slowest[0][1], "GET");
    assert_eq!(slowest[0][2], "other");
    assert_eq!(slowest[0][3], "200");
    let ms: f64 = slowest[0][4]
        .as_str()
        .unwrap()
        .trim_end_matches(" ms")
        .parse()
        .unwrap();
    assert!(ms >= 400.0, "{slowest:?}");
    assert!(!after.to_string().contains("/slow"));
    // The limiter's bucket for this client.
    let limiters = after["limiters"].as_array().unwrap();
    assert!(limiters.iter().any(|r| r[0] == "per_ip"), "{limiters:?}");
    assert_eq!(
        after["shared"][0][0],
        "no shared tier ([cache.redis] is not set)"
    );
    // Sparklines drawn from the page's own samples.
    let sparks = after["sparklines"].as_array().unwrap();
    assert!(sparks.len() >= 3, "{sparks:?}");
    assert!(sparks.iter().all(|n| n.as_u64().unwrap() >= 2));
    // The token: neither in the URL nor in a cookie.
    assert_eq!(after["cookie"], "");
    assert!(!after["url"].as_str().unwrap().contains(TOKEN));
    // Paused, it stops asking (one refresh may have been under way).
    assert_eq!(page["pause_label"], "Resume");
    assert!(page["ticks_while_paused"].as_u64().unwrap() <= 1);

    let png = std::fs::read(&shot).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    assert!(
        png.len() > 20_000,
        "a page, not a blank: {} bytes",
        png.len()
    );
    if std::env::var_os("HYPERION_BLESS").is_some() {
        std::fs::write(
            concat!(env!("CARGO_MANIFEST_DIR"), "/docs/status-page.png"),
            &png,
        )
        .unwrap();
    }
}

#[tokio::test]
async fn the_page_is_self_contained_and_kept_out_of_frames() {
    let up = Upstream::echo().await;
    let proxy = TestProxy::start(&format!(
        "[admin]\n[upstreams.up]\nservers = [{{ url = \"{}\" }}]\n[[route]]\nname = \"all\"\nupstream = \"up\"\n",
        up.url()
    ))
    .await;
    let (parts, body) = get(&format!("http://{}/", proxy.admin.unwrap())).await;
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["content-type"], "text/html; charset=utf-8");
    let csp = parts.headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"));
    assert_eq!(parts.headers["x-frame-options"], "DENY");
    assert_eq!(parts.headers["cache-control"], "no-store");
    let html = String::from_utf8(body.to_vec()).unwrap();
    // Nothing from elsewhere: no URL but the SVG namespace.
    for (i, _) in html.match_indices("http") {
        assert!(
            html[i..].starts_with("http://www.w3.org/2000/svg"),
            "an external reference: {}",
            &html[i..(i + 60).min(html.len())]
        );
    }
    // Data goes in as text, never as markup.
    assert!(!html.contains("innerHTML"));
    assert!(!html.contains("document.cookie"));
}
