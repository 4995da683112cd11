//! Traffic splits and canaries: a route's `split` sends the configured
//! shares to two real upstream pools and keeps each client (or session) on
//! its arm; `match.headers` sends opted-in clients to the canary; a caching
//! split route keeps each arm's answers apart; the access log and
//! `/metrics` name the arm; bad policies are refused with their line.

mod support;

use std::collections::HashMap;

use http::{Request, Response};
use hyperion::policy::Policy;
use support::*;

const TOKEN: &str = "0123456789abcdef-splits-token";

/// A pool's server answering `x-arm: NAME` with a body naming it too.
async fn arm_server(name: &'static str) -> Upstream {
    Upstream::start(
        move |_req: http::Request<hyper::body::Incoming>| async move {
            Response::builder()
                .header("x-arm", name)
                .header("content-type", "application/json")
                .body(full(format!(r#"{{"served_by":"{name}"}}"#)))
                .unwrap()
        },
    )
    .await
}

struct Arms {
    stable: Upstream,
    canary: Upstream,
    _token: TempFile,
}

impl Arms {
    async fn start() -> Arms {
        Arms {
            stable: arm_server("stable").await,
            canary: arm_server("canary").await,
            _token: TempFile::new("admin.token", &format!("{TOKEN}\n")),
        }
    }

    async fn proxy(&self, routes: &str) -> TestProxy {
        TestProxy::start(&format!(
            "[admin]\ntoken_file = \"{}\"\n\n[upstreams.stable]\nservers = [{{ url = \"{}\" }}]\n\n[upstreams.canary]\nservers = [{{ url = \"{}\" }}]\n\n{routes}",
            self._token.display(),
            self.stable.url(),
            self.canary.url()
        ))
        .await
    }
}

async fn ask(proxy: &TestProxy, headers: &[(&str, &str)]) -> (String, http::response::Parts) {
    let mut req =
        Request::post(proxy.url("/v1/chat/completions")).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let (parts, _) = send(req.body(full(r#"{"model":"m","prompt":"hi"}"#)).unwrap()).await;
    assert_eq!(parts.status, 200);
    let arm = parts.headers["x-arm"].to_str().unwrap().to_owned();
    (arm, parts)
}

#[tokio::test]
async fn a_split_sends_its_shares_and_keeps_each_session_on_its_arm() {
    let arms = Arms::start().await;
    let proxy = arms
        .proxy(
            r#"[[route]]
name = "chat"
split = [{ upstream = "stable", weight = 80 }, { upstream = "canary", weight = 20 }]
split_by = "header:x-session-id"
"#,
        )
        .await;
    // 1,000 sessions: the canary's share is 20 % within ±5 points (the
    // binomial's σ is 1.3 points; the choice is a hash, so this run's
    // count is the same every time).
    let mut arm_of = HashMap::new();
    for s in 0..1000 {
        let id = format!("session-{s}");
        let (arm, _) = ask(&proxy, &[("x-session-id", &id)]).await;
        arm_of.insert(id, arm);
    }
    let canary = arm_of.values().filter(|a| *a == "canary").count();
    eprintln!("the canary got {canary} of 1,000 sessions");
    assert!((150..=250).contains(&canary), "canary got {canary} of 1000");
    assert_eq!(arms.canary.count(), canary);
    assert_eq!(arms.stable.count(), 1000 - canary);
    // Each session stays on its arm, turn after turn.
    for s in (0..1000).step_by(37) {
        let id = format!("session-{s}");
        for _ in 0..3 {
            assert_eq!(ask(&proxy, &[("x-session-id", &id)]).await.0, arm_of[&id]);
        }
    }
    // Without the header, the client: one address, one arm.
    let first = ask(&proxy, &[]).await.0;
    for _ in 0..20 {
        assert_eq!(ask(&proxy, &[]).await.0, first);
    }
    // The access log and the metrics name the arm.
    let (arm, parts) = ask(&proxy, &[("x-session-id", "session-1")]).await;
    let id = parts.headers["x-request-id"].to_str().unwrap().to_owned();
    let line = proxy.log_for(&id).await;
    assert_eq!(line["arm"], arm.as_str(), "{line}");
    assert_eq!(line["route"], "chat");
    let (_, metrics) = admin_get(&proxy, TOKEN, "/metrics").await;
    let metrics = String::from_utf8_lossy(&metrics).into_owned();
    let canary_line = format!(
        r#"hyperion_route_split_total{{route="chat",upstream="canary"}} {}"#,
        arms.canary.count()
    );
    assert!(
        metrics.contains(&canary_line),
        "{canary_line} in\n{metrics}"
    );
}

#[tokio::test]
async fn a_header_match_sends_opted_in_clients_to_the_canary() {
    let arms = Arms::start().await;
    let proxy = arms
        .proxy(
            r#"[[route]]
name = "opt-in"
match = { headers = { "x-canary" = "1" } }
upstream = "canary"

[[route]]
name = "any-beta"
match = { headers = { "x-beta" = "*" } }
upstream = "canary"

[[route]]
name = "rest"
upstream = "stable"
"#,
        )
        .await;
    assert_eq!(ask(&proxy, &[("x-canary", "1")]).await.0, "canary");
    assert_eq!(ask(&proxy, &[("x-canary", "0")]).await.0, "stable");
    assert_eq!(ask(&proxy, &[]).await.0, "stable");
    assert_eq!(ask(&proxy, &[("x-beta", "whatever")]).await.0, "canary");
    // A header's name in any case.
    assert_eq!(ask(&proxy, &[("X-Canary", "1")]).await.0, "canary");
}

#[tokio::test]
async fn a_caching_split_route_keeps_each_arms_answers_apart() {
    let arms = Arms::start().await;
    let proxy = arms
        .proxy(
            r#"[[route]]
name = "cached-chat"
split = [{ upstream = "stable", weight = 50 }, { upstream = "canary", weight = 50 }]
split_by = "header:x-session-id"

[route.cache]
mode = "force"
ttl = "1m"
body_key = "json"
scope = "shared"
"#,
        )
        .await;
    // A session on each arm.
    let mut on = HashMap::new();
    for s in 0.. {
        let id = format!("s{s}");
        let (arm, _) = ask(&proxy, &[("x-session-id", &id)]).await;
        on.entry(arm).or_insert(id);
        if on.len() == 2 {
            break;
        }
    }
    // The same prompt on each arm: each arm's own answer, then hits.
    for (arm, id) in &on {
        for _ in 0..3 {
            let (served, parts) = ask(&proxy, &[("x-session-id", id)]).await;
            assert_eq!(&served, arm);
            assert_ne!(parts.headers["x-cache"], "BYPASS");
        }
    }
    // Each arm's upstream generated the prompt once (the search above
    // included), then answered from the cache.
    assert_eq!(arms.stable.count(), 1);
    assert_eq!(arms.canary.count(), 1);
}

#[test]
fn bad_splits_and_header_matches_are_refused_with_their_line() {
    let up = "[upstreams.stable]\nservers = [{ url = \"http://127.0.0.1:1\" }]\n[upstreams.canary]\nservers = [{ url = \"http://127.0.0.1:2\" }]\n[[route]]\nname = \"r\"\n";
    let cases = [
        (
            "upstream = \"stable\"\nsplit = [{ upstream = \"stable\", weight = 1 }, { upstream = \"canary\", weight = 1 }]\n",
            "proxy.toml:7:",
            "a route with split names its upstreams in split",
        ),
        (
            "split = [{ upstream = \"stable\", weight = 1 }, { upstream = \"canery\", weight = 1 }]\n",
            "proxy.toml:7:",
            "did you mean `canary`?",
        ),
        (
            "split = [{ upstream = \"stable\", weight = 1 }]\n",
            "proxy.toml:7:",
            "1 arms; a split has 2 to 16",
        ),
        (
            "split = [{ upstream = \"stable\", weight = 1 }, { upstream = \"stable\", weight = 1 }]\n",
            "proxy.toml:7:",
            "upstream `stable` is in the split twice",
        ),
        (
            "split = [{ upstream = \"stable\", weight = 0 }, { upstream = \"canary\", weight = 0 }]\n",
            "proxy.toml:7:",
            "every weight is 0",
        ),
        (
            "split = [{ upstream = \"stable\", weight = 1 }, { upstream = \"canary\", weight = 2000000 }]\n",
            "proxy.toml:7:",
            "weight 2000000 is over 1000000",
        ),
        (
            "split = [{ upstream = \"stable\", weight = 1 }, { upstream = \"canary\" }]\n",
            "proxy.toml:7:",
            "weight",
        ),
        (
            "upstream = \"stable\"\nsplit_by = \"client\"\n",
            "proxy.toml:8:",
            "split_by is read only with split",
        ),
        (
            "split = [{ upstream = \"stable\", weight = 1 }, { upstream = \"canary\", weight = 1 }]\nsplit_by = \"cookie\"\n",
            "proxy.toml:8:",
            "`cookie` names nothing",
        ),
        (
            "deny = true\nsplit = [{ upstream = \"stable\", weight = 1 }, { upstream = \"canary\", weight = 1 }]\n",
            "proxy.toml:8:",
            "a route with deny = true forwards nothing",
        ),
        (
            "upstream = \"stable\"\nmatch = { headers = { \"bad name\" = \"1\" } }\n",
            "proxy.toml:8:",
            "`bad name` is not a header name",
        ),
        (
            "upstream = \"stable\"\nmatch = { headers = { \"x-canary\" = \"line\\nbreak\" } }\n",
            "proxy.toml:8:",
            "cannot be a header's value",
        ),
        (
            // A header route after a route matching everything it does.
            "upstream = \"stable\"\n[[route]]\nname = \"late\"\nmatch = { headers = { \"x-canary\" = \"1\" } }\nupstream = \"canary\"\n",
            "proxy.toml:10:",
            "this route can never match: route `r`",
        ),
    ];
    for (route, at, says) in cases {
        let text = format!("{up}{route}");
        let err = match Policy::parse("proxy.toml", &text) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e.to_string(),
        };
        assert!(err.starts_with(at) && err.contains(says), "{says}: {err}");
    }
    // The other way round is fine: the header route first.
    let ok = format!(
        "{}upstream = \"canary\"\nmatch = {{ headers = {{ \"x-canary\" = \"1\" }} }}\n[[route]]\nname = \"rest\"\nupstream = \"stable\"\n",
        up
    );
    let policy = Policy::parse("proxy.toml", &ok).unwrap();
    assert!(policy.to_string().contains("[x-canary: 1]"));
}
