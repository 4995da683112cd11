//! Running under systemd: the unit file passes `systemd-analyze verify`,
//! and the binary speaks the notify protocol the unit's `Type=notify`
//! expects: READY=1 once serving, RELOADING=1 (with MONOTONIC_USEC) and
//! READY=1 around a SIGHUP reload, STOPPING=1 when draining.

mod support;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

#[test]
fn the_unit_file_verifies() {
    let unit = include_str!("../systemd/hyperion.service");
    assert!(unit.contains("Type=notify") && unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    assert!(unit.contains("ExecStartPre=hyperion check"));
    // Verified with the binary where the unit expects it installed.
    let dir = std::env::temp_dir().join(format!("hyperion-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("hyperion.service");
    std::fs::write(
        &path,
        unit.replace(
            "=hyperion ",
            &format!("={} ", env!("CARGO_BIN_EXE_hyperion")),
        ),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (apt-get install -y systemd; .ci/run does)");
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn next_message(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a notification in time");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// The child, killed if the test fails before it exits.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_tells_systemd_when_it_serves_reloads_and_stops() {
    let up = Upstream::echo().await;
    let dir = std::env::temp_dir().join(format!("hyperion-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let port = free_port();
    let policy = TempFile::new(
        "policy.toml",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\naccess_log = \"off\"\n[upstreams.up]\nservers = [{{ url = \"{}\" }}]\n[[route]]\nname = \"all\"\nupstream = \"up\"\n",
            up.url()
        ),
    );
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_hyperion"))
            .args(["--config", policy.0.to_str().unwrap()])
            .env("NOTIFY_SOCKET", &socket_path)
            .env_remove("HYPERION_CONFIG")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id().to_string();
    let kill = |sig: &str| {
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    };

    let ready = tokio::task::block_in_place(|| next_message(&socket));
    assert!(ready.contains("READY=1"), "{ready}");
    assert!(
        ready.contains("STATUS=serving policy generation 1"),
        "{ready}"
    );
    assert_eq!(
        get(&format!("http://127.0.0.1:{port}/x")).await.0.status,
        200
    );

    kill("-HUP");
    let reloading = tokio::task::block_in_place(|| next_message(&socket));
    assert!(
        reloading.contains("RELOADING=1") && reloading.contains("MONOTONIC_USEC="),
        "{reloading}"
    );
    let ready = tokio::task::block_in_place(|| next_message(&socket));
    assert!(
        ready.contains("READY=1") && ready.contains("generation 2"),
        "{ready}"
    );

    kill("-TERM");
    let stopping = tokio::task::block_in_place(|| next_message(&socket));
    assert!(stopping.contains("STOPPING=1"), "{stopping}");
    assert!(child.0.wait().unwrap().success());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn probe_is_the_images_healthcheck() {
    let proxy = TestProxy::start(&simple_policy("http://127.0.0.1:1", "", "").replace(
        "[upstreams.up]",
        "[admin]\nlisten = \"127.0.0.1:9\"\n\n[upstreams.up]",
    ))
    .await;
    let probe = |url: String| {
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_hyperion"))
                .args(["probe", &url])
                // No policy is read: a missing one does not matter.
                .args(["--config", "/nonexistent/proxy.toml"])
                .output()
                .unwrap()
        })
    };
    let healthy = probe(format!("http://{}/healthz", proxy.admin.unwrap()))
        .await
        .unwrap();
    assert!(healthy.status.success(), "{healthy:?}");
    let missing = probe(format!("http://{}/nothing-here", proxy.admin.unwrap()))
        .await
        .unwrap();
    assert!(!missing.status.success());
    let closed = probe(format!("http://{}/healthz", refused_addr().await))
        .await
        .unwrap();
    assert!(!closed.status.success());
}
