//! Upstream pools seen from outside, with three real upstreams on loopback:
//! one killed mid-run (clients see no failure) and brought back (it rejoins
//! after `healthy_after` checks), one made slow (traffic shifts away), one
//! answering 500s (taken out), all down (503, or stale when the cache may).

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// A server that can be killed (listener and open connections closed) and
/// brought back on the same port, slowed down, or made to answer 500.
struct FleetServer {
    addr: SocketAddr,
    /// Delay before answering, in ms; `u64::MAX`: answer 500 at once.
    behaviour: Arc<AtomicU64>,
    served: Arc<AtomicUsize>,
    tasks: std::sync::Mutex<Option<JoinSet<()>>>,
}

const FAIL: u64 = u64::MAX;

impl FleetServer {
    async fn start() -> Arc<FleetServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Arc::new(FleetServer {
            addr: listener.local_addr().unwrap(),
            behaviour: Arc::new(AtomicU64::new(0)),
            served: Arc::new(AtomicUsize::new(0)),
            tasks: std::sync::Mutex::new(None),
        });
        server.serve(listener);
        server
    }

    fn serve(&self, listener: TcpListener) {
        let (behaviour, served) = (self.behaviour.clone(), self.served.clone());
        let mut tasks = JoinSet::new();
        let conns = Arc::new(std::sync::Mutex::new(JoinSet::new()));
        let held = conns.clone();
        tasks.spawn(async move {
            let _keep = held;
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (behaviour, served) = (behaviour.clone(), served.clone());
                conns.lock().unwrap().spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (behaviour, served) = (behaviour.clone(), served.clone());
                        async move {
                            let is_health = req.uri().path() == "/health";
                            let mode = behaviour.load(Ordering::SeqCst);
                            if !is_health {
                                served.fetch_add(1, Ordering::SeqCst);
                            }
                            if mode == FAIL && !is_health {
                                return Ok::<_, Infallible>(response(500, "broken"));
                            }
                            if mode != FAIL && mode > 0 && !is_health {
                                tokio::time::sleep(Duration::from_millis(mode)).await;
                            }
                            Ok(Response::new(full("ok")))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        *self.tasks.lock().unwrap() = Some(tasks);
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }

    /// Gone: new connections refused, open ones closed.
    fn kill(&self) {
        // Dropping the set aborts the acceptor, which drops the connections.
        drop(self.tasks.lock().unwrap().take());
    }

    async fn revive(&self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    fn set(&self, behaviour: u64) {
        self.behaviour.store(behaviour, Ordering::SeqCst);
    }
}

async fn fleet(n: usize) -> Vec<Arc<FleetServer>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(FleetServer::start().await);
    }
    out
}

fn pool_policy(servers: &[Arc<FleetServer>], upstream_extra: &str, route_extra: &str) -> String {
    let urls: Vec<String> = servers.iter().map(|s| s.url()).collect();
    policy_for_urls(&urls, upstream_extra, route_extra)
}

/// One pool `up` of `urls` (in that order) behind one route `all`.
fn policy_for_urls(urls: &[String], upstream_extra: &str, route_extra: &str) -> String {
    let list: Vec<String> = urls
        .iter()
        .map(|u| format!("{{ url = \"{u}\" }}"))
        .collect();
    format!(
        "[upstreams.up]\nservers = [{}]\n{upstream_extra}\n\n[[route]]\nname = \"all\"\nupstream = \"up\"\n{route_extra}\n",
        list.join(", ")
    )
}

const CHECKS: &str = "[upstreams.up.health]\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nunhealthy_after = 2\nhealthy_after = 2\n";

async fn statuses(proxy: &TestProxy, n: usize) -> Vec<u16> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(get(&proxy.url("/api/generate")).await.0.status.as_u16());
    }
    out
}

#[tokio::test]
async fn a_killed_server_costs_clients_nothing_and_rejoins_after_its_checks() {
    let servers = fleet(3).await;
    let proxy = TestProxy::start(&pool_policy(
        &servers,
        &format!("retries = 2\n{CHECKS}"),
        "",
    ))
    .await;
    assert!(statuses(&proxy, 30).await.iter().all(|&s| s == 200));
    assert!(
        servers.iter().all(|s| s.served() > 0),
        "all three share the load"
    );

    servers[1].kill();
    let before = servers[1].served();
    let after_kill = statuses(&proxy, 60).await;
    assert!(
        after_kill.iter().all(|&s| s == 200),
        "a dead server is retried around: {after_kill:?}"
    );
    assert_eq!(servers[1].served(), before);

    let state = |proxy: &TestProxy| proxy.fleet.pool("up").unwrap().snapshot()[1].state.clone();
    // Two failed checks 100 ms apart mark it unhealthy.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let down = state(&proxy);
    assert!(
        !down.healthy
            && down
                .reason
                .as_deref()
                .unwrap_or("")
                .starts_with("health check"),
        "{down:?}"
    );
    servers[1].revive().await;
    // Two passed checks 100 ms apart bring it back.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(state(&proxy).healthy, "{:?}", state(&proxy));
    assert!(statuses(&proxy, 30).await.iter().all(|&s| s == 200));
    assert!(servers[1].served() > before, "it rejoined");
}

#[tokio::test]
async fn traffic_shifts_away_from_a_slow_server() {
    for balance in ["least_inflight", "p2c_ewma"] {
        let servers = fleet(3).await;
        servers[0].set(150);
        for s in &servers[1..] {
            s.set(5);
        }
        let proxy = TestProxy::start(&pool_policy(
            &servers,
            &format!("balance = \"{balance}\""),
            "",
        ))
        .await;
        let clients: Vec<_> = (0..6)
            .map(|_| {
                let url = proxy.url("/api/generate");
                tokio::spawn(async move {
                    for _ in 0..15 {
                        assert_eq!(get(&url).await.0.status, 200);
                    }
                })
            })
            .collect();
        for c in clients {
            c.await.unwrap();
        }
        let slow = servers[0].served();
        let total: usize = servers.iter().map(|s| s.served()).sum();
        assert_eq!(total, 90);
        assert!(
            slow * 100 / total < 20,
            "{balance}: the slow server served {slow} of {total}"
        );
    }
}

#[tokio::test]
async fn a_server_answering_500s_is_taken_out_for_a_while() {
    let servers = fleet(3).await;
    servers[2].set(FAIL);
    let proxy = TestProxy::start(&pool_policy(&servers, "balance = \"round_robin\"", "")).await;
    let got = statuses(&proxy, 60).await;
    // Three 500s in a row take it out for a second; the 500s themselves
    // reach the client (an answer is never retried).
    assert_eq!(servers[2].served(), 3, "ejected after 3 failures in a row");
    assert_eq!(got.iter().filter(|&&s| s == 500).count(), 3);
    // After the back-off it is tried again, fails once, and is out for
    // twice as long.
    proxy.advance(Duration::from_millis(1100));
    statuses(&proxy, 30).await;
    assert!(
        (4..=6).contains(&servers[2].served()),
        "{}",
        servers[2].served()
    );
}

#[tokio::test]
async fn with_every_server_down_the_pool_answers_503_or_stale() {
    let servers = fleet(2).await;
    let proxy = TestProxy::start(&pool_policy(
        &servers,
        CHECKS,
        "[route.cache]\nmode = \"force\"\nttl = \"100ms\"\nstale_if_error = \"1h\"\n",
    ))
    .await;
    assert_eq!(get(&proxy.url("/cached")).await.0.status, 200);
    for s in &servers {
        s.kill();
    }
    // Two failed checks each, 100 ms apart.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (parts, body) = get(&proxy.url("/fresh")).await;
    assert_eq!(parts.status, 503);
    assert_eq!(json(&body)["error"]["code"], "no_healthy_upstream");
    let (parts, body) = get(&proxy.url("/cached")).await;
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["x-cache"], "STALE");
    assert_eq!(&body[..], b"ok");
}

#[tokio::test]
async fn consistent_hash_keeps_a_key_on_one_server() {
    let servers = fleet(3).await;
    let proxy = TestProxy::start(&pool_policy(
        &servers,
        "balance = \"consistent_hash\"\nhash_key = \"header:x-session\"",
        "",
    ))
    .await;
    for session in ["alpha", "beta", "gamma", "delta"] {
        let before: Vec<usize> = servers.iter().map(|s| s.served()).collect();
        for _ in 0..10 {
            let req = Request::get(proxy.url("/api/chat"))
                .header("x-session", session)
                .body(empty())
                .unwrap();
            assert_eq!(send(req).await.0.status, 200);
        }
        let moved: Vec<usize> = servers
            .iter()
            .zip(&before)
            .map(|(s, b)| s.served() - b)
            .collect();
        assert!(moved.contains(&10), "{session}: {moved:?}");
    }
}

/// A server that reads a request's head and closes the connection without
/// answering, every time (a box crashing under load).
async fn closer() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = read_head(&mut stream).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_request_cut_off_before_any_answer_is_retried_on_another_server() {
    let good = FleetServer::start().await;
    let bad = closer().await;
    let proxy = TestProxy::start(&policy_for_urls(
        &[format!("http://{bad}"), good.url()],
        "balance = \"round_robin\"",
        "",
    ))
    .await;
    // A GET (idempotent) can be sent again, so no client sees the cut.
    for _ in 0..6 {
        assert_eq!(get(&proxy.url("/api/tags")).await.0.status, 200);
    }
    assert_eq!(good.served(), 6);
}

#[tokio::test]
async fn a_retried_get_reaches_the_next_server_whole() {
    // The retry is rebuilt from a copy of the request taken before it left:
    // target, query and every field, repeated ones in order.
    let good = Upstream::echo().await;
    let bad = closer().await;
    let proxy = TestProxy::start(&policy_for_urls(
        &[format!("http://{bad}"), good.url()],
        "balance = \"round_robin\"",
        "",
    ))
    .await;
    for _ in 0..4 {
        let req = Request::get(proxy.url("/api/tags?name=llama3.2&x=1%202"))
            .header("x-trace", "a")
            .header("x-trace", "b")
            .header("accept", "application/json")
            .body(empty())
            .unwrap();
        assert_eq!(send(req).await.0.status, 200);
    }
    let seen = good.seen();
    assert_eq!(
        seen.len(),
        4,
        "each GET answered once, half of them after a retry"
    );
    for s in seen {
        assert_eq!(s.method, http::Method::GET);
        assert_eq!(s.uri, "/api/tags?name=llama3.2&x=1%202");
        let trace: Vec<_> = s.headers.get_all("x-trace").iter().collect();
        assert_eq!(trace, ["a", "b"]);
        assert_eq!(s.headers["accept"], "application/json");
        assert!(s.headers.contains_key("x-request-id"));
        assert!(s.headers.contains_key("x-forwarded-for"));
    }
}

#[tokio::test]
async fn a_post_the_server_may_have_acted_on_is_not_sent_again() {
    let good = FleetServer::start().await;
    let bad = closer().await;
    let proxy = TestProxy::start(&policy_for_urls(
        &[format!("http://{bad}"), good.url()],
        "balance = \"round_robin\"\nretries = 2",
        "",
    ))
    .await;
    // The server that read the POST and hung up may have started on it:
    // RFC 9110 §9.2.2 forbids resending it, so that client gets the 502.
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let post = Request::post(proxy.url("/api/generate"))
            .body(full(r#"{"model":"llama3.2","prompt":"hi"}"#))
            .unwrap();
        statuses.push(send(post).await.0.status);
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let failed = statuses.iter().filter(|s| **s == 502).count();
    assert_eq!(ok + failed, 6, "{statuses:?}");
    assert!(
        failed >= 1,
        "some POSTs met the server that hangs up: {statuses:?}"
    );
    assert_eq!(good.served(), ok, "no POST went out twice");
}

#[tokio::test]
async fn a_post_that_never_reached_a_server_is_sent_to_another() {
    let good = FleetServer::start().await;
    // Nothing listens there: the connection is refused, the POST never left.
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let proxy = TestProxy::start(&policy_for_urls(
        &[format!("http://{refused}"), good.url()],
        "balance = \"round_robin\"",
        "",
    ))
    .await;
    for _ in 0..4 {
        let post = Request::post(proxy.url("/api/generate"))
            .body(full(r#"{"model":"llama3.2","prompt":"hi"}"#))
            .unwrap();
        assert_eq!(send(post).await.0.status, 200);
    }
    assert_eq!(good.served(), 4);
}
