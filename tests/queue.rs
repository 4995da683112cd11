//! The line in front of a busy upstream (`max_inflight_per_server`): a
//! tenant flooding it does not make another wait behind its backlog
//! (`queue = "fair"`, the default), unlike arrival order (`queue =
//! "fifo"`); a tenant past `max_queued_per_tenant` is refused alone.
//!
//! The upstream holds every request until the test lets one go, so what
//! is asserted is the order requests reached it, not how long anything
//! took.

mod support;

use http::Request;
use support::*;

/// A proxy with keys `a` and `b`, one server with two slots, `extra`
/// lines in its upstream table.
async fn proxy(up: &Upstream, name: &str, extra: &str) -> Keyed {
    let rest = format!(
        "[upstreams.{name}]\nservers = [{{ url = \"{url}\" }}]\nmax_inflight_per_server = 2\nqueue_timeout = \"60s\"\n{extra}\n\n[[route]]\nname = \"all\"\nupstream = \"{name}\"\n",
        url = up.url(),
    );
    keyed_proxy(&[("a", None), ("b", None)], &rest).await
}

/// Sends a generation as `who` (its key, and `x-who` for the upstream to
/// record), returning the status.
fn generate(proxy: &TestProxy, key: &str, who: &str) -> tokio::task::JoinHandle<u16> {
    let req = Request::post(proxy.url("/api/generate"))
        .header("authorization", format!("Bearer {key}"))
        .header("x-who", who)
        .body(full("{\"model\":\"m\",\"prompt\":\"hi\"}"))
        .unwrap();
    tokio::spawn(async move { send(req).await.0.status.as_u16() })
}

/// Who the upstream saw, in the order requests reached it.
fn order(up: &Upstream) -> Vec<String> {
    up.seen()
        .iter()
        .map(|s| s.headers["x-who"].to_str().unwrap().to_owned())
        .collect()
}

/// Tenant `a` sends 12 requests at once; once 10 wait and one more has
/// started (`a` is taking turns by then), `b` sends one. Returns the
/// order the upstream saw them in.
async fn flood_then_one(name: &str, extra: &str) -> Vec<String> {
    let (up, release) = held_upstream().await;
    let bx = proxy(&up, name, extra).await;
    let [a, b] = &bx.keys[..] else {
        unreachable!("two keys")
    };
    let floods: Vec<_> = (0..12).map(|_| generate(&bx.proxy, a, "a")).collect();
    until("two in flight", || async { up.count() == 2 }).await;
    until("ten in line", || async {
        queued(&bx.proxy, name).await == 10
    })
    .await;
    release.add_permits(1);
    until("a third started", || async { up.count() == 3 }).await;
    until("nine in line", || async {
        queued(&bx.proxy, name).await == 9
    })
    .await;
    let one = generate(&bx.proxy, b, "b");
    until("b in line", || async {
        queued(&bx.proxy, name).await == 10
    })
    .await;
    release.add_permits(12);
    for r in floods {
        assert_eq!(r.await.unwrap(), 200);
    }
    assert_eq!(one.await.unwrap(), 200);
    order(&up)
}

#[tokio::test]
async fn a_second_tenant_is_not_queued_behind_a_floods_backlog() {
    let fair = flood_then_one("fair_up", "").await;
    assert_eq!(fair.len(), 13);
    assert_eq!(
        fair.iter().position(|w| w == "b"),
        Some(3),
        "b takes the first slot that frees: {fair:?}"
    );
    let fifo = flood_then_one("fifo_up", "queue = \"fifo\"").await;
    assert_eq!(
        fifo.iter().position(|w| w == "b"),
        Some(12),
        "in arrival order b is last: {fifo:?}"
    );
}

#[tokio::test]
async fn a_tenant_past_its_queue_cap_is_refused_alone() {
    let (up, release) = held_upstream().await;
    let name = "capped_up";
    let bx = proxy(&up, name, "max_queued_per_tenant = 3").await;
    let [a, b] = &bx.keys[..] else {
        unreachable!("two keys")
    };
    let floods: Vec<_> = (0..5).map(|_| generate(&bx.proxy, a, "a")).collect();
    until("five in flight or line", || async {
        queued(&bx.proxy, name).await == 3
    })
    .await;
    // The sixth of `a` is refused at once, with when to retry.
    let req = Request::post(bx.proxy.url("/api/generate"))
        .header("authorization", format!("Bearer {a}"))
        .body(full("{}"))
        .unwrap();
    let (parts, body) = send(req).await;
    assert_eq!(parts.status, 429);
    assert!(parts.headers.contains_key("retry-after"));
    assert_eq!(json(&body)["error"]["code"], "queue_full");
    // `b` still gets in line.
    let one = generate(&bx.proxy, b, "b");
    until("b in line", || async { queued(&bx.proxy, name).await == 4 }).await;
    release.add_permits(6);
    for r in floods {
        assert_eq!(r.await.unwrap(), 200);
    }
    assert_eq!(one.await.unwrap(), 200);
    assert_eq!(up.count(), 6);
}
