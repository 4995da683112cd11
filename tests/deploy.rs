//! What ships beside the binary agrees with it: the Kubernetes manifests
//! (`deploy/kubernetes/`) pass the Kubernetes schemas (offline, with the
//! `kubernetes-validate` package, strict, for 1.30 and the newest it
//! knows), their policy passes Hyperion's own checks, and the Deployment's
//! numbers follow from the policy's (grace period, memory).
//!
//! Needs `kubernetes-validate` in the Python that `tests/clients.rs` uses
//! (`.ci/run` installs it in `.venv-clients`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

fn read(name: &str) -> String {
    std::fs::read_to_string(dir().join(name)).unwrap()
}

/// The number after `key: ` on the first line that has it after `from`.
fn number_after(text: &str, from: &str, key: &str) -> u64 {
    let start = text.find(from).unwrap_or_else(|| panic!("no `{from}`"));
    text[start..]
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}: ")))
        .unwrap_or_else(|| panic!("no `{key}` after `{from}`"))
        .trim_matches('"')
        .trim_end_matches("Mi")
        .parse()
        .unwrap()
}

#[test]
fn the_manifests_pass_the_kubernetes_schemas() {
    let python = std::env::var("HYPERION_CLIENTS_PYTHON").unwrap_or_else(|_| {
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-clients/bin/python");
        if venv.exists() {
            venv.display().to_string()
        } else {
            "python3".into()
        }
    });
    let manifests = [
        "secret.yaml",
        "deployment.yaml",
        "service.yaml",
        "pdb.yaml",
        "hpa.yaml",
        "redis.yaml",
    ];
    for version in ["1.30.0", "1.37.0"] {
        let out = Command::new(&python)
            .args([
                "-m",
                "kubernetes_validate",
                "--strict",
                "--quiet",
                "-k",
                version,
            ])
            .args(manifests)
            .current_dir(dir())
            .output()
            .expect("python");
        assert!(
            out.status.success(),
            "kubernetes-validate (pip install kubernetes-validate in .venv-clients, as .ci/run does) against {version}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every manifest is listed by the kustomization (redis.yaml commented,
    // as optional).
    let kustomization = read("kustomization.yaml");
    for m in manifests {
        assert!(kustomization.contains(&format!("- {m}")), "{m}");
    }
}

#[test]
fn the_deployment_follows_from_its_policy() {
    std::env::set_var("HYPERION_ADMIN_TOKEN", "0123456789abcdef-deploy-test");
    let policy = hyperion::Policy::load(&dir().join("policy.toml")).unwrap();
    let deployment = read("deployment.yaml");
    // SIGTERM comes after the preStop pause; the drain then takes up to
    // shutdown_grace: the pod must be given both.
    let grace = number_after(&deployment, "spec:", "terminationGracePeriodSeconds");
    let pause = number_after(&deployment, "preStop:", "seconds");
    assert!(
        grace >= pause + policy.server.shutdown_grace.as_secs(),
        "terminationGracePeriodSeconds {grace} < preStop {pause} + shutdown_grace"
    );
    // The memory limit holds the sizing guide's sum (README.md there):
    // the cache, the bodies and read-ahead bounds, 60 kB a connection
    // (measured: ~22 kB idle, ~57 kB streaming), and 32 MiB for the rest.
    let limit = number_after(&deployment, "limits:", "memory") << 20;
    let s = &policy.server;
    let need = policy.cache.max_size
        + s.max_buffered_bodies
        + s.max_read_ahead
        + s.max_connections as u64 * 60 * 1024
        + (32 << 20);
    assert!(
        limit >= need,
        "memory limit {} MiB under the sizing guide's {} MiB",
        limit >> 20,
        need >> 20
    );
    // The probes and the scrape reach the admin listener's port.
    let admin = policy.admin.as_ref().expect("[admin]").listen;
    assert_eq!(
        number_after(&deployment, "- name: admin", "containerPort"),
        u64::from(admin.port())
    );
    assert!(deployment.contains(&format!("prometheus.io/port: \"{}\"", admin.port())));
    assert!(policy
        .server
        .listen
        .iter()
        .any(|a| a.ip().is_unspecified() && a.port() == 8080));
}
