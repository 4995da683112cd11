#!/usr/bin/env bash
# =============================================================================
# deploy/container/test.sh — the container image, built and checked on this
# machine with podman: the mock backend on loopback, the image run with a
# policy mounted at /etc/hyperion/proxy.toml (host network, ports 18080 and
# 9090, where the image's healthcheck looks); it checks the user it runs as, its healthcheck, a stream, a cache
# hit, a reload (podman kill -s HUP) and a clean stop (the drain, exit 0).
#
# Usage: deploy/container/test.sh      (as a user podman runs for; ports
#        11434, 18080, 9090 free)
# RUN_FLAGS: podman run flags this machine needs. The default suits this
# VM: runc (apt-get install -y runc; crun refuses its hybrid cgroups), and
# rlimits it may set (it refuses raising them to podman's defaults).
# =============================================================================
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
die() { echo "deploy/container/test.sh: $*" >&2; exit 1; }
check() { echo "  ok: $*"; }
for port in 11434 18080 9090; do
  ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || die "port $port is in use"
done
: "${RUN_FLAGS:=--runtime runc --ulimit nofile=16384:16384 --ulimit nproc=4096:4096}"
NAME=hyperion-test-$$
TAG=hyperion:test-$$
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  podman rm -f "$NAME" >/dev/null 2>&1 || true
  podman rmi -f "$TAG" >/dev/null 2>&1 || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; die "nothing on port $1"; }

echo "== build"
deploy/container/build.sh "$TAG"
cargo build --release --quiet --example mock_ollama

cat >"$WORK/proxy.toml" <<POLICY
[server]
listen = ["127.0.0.1:18080"]
shutdown_grace = "5s"

[admin]
listen = "127.0.0.1:9090"
token_env = "HYPERION_ADMIN_TOKEN"

[upstreams.ollama]
servers = [{ url = "http://127.0.0.1:11434" }]

[[route]]
name = "generate"
match = { path_prefix = "/api/" }
upstream = "ollama"

[route.cache]
mode = "force"
ttl = "10m"
body_key = "json"
POLICY
TOKEN=container-test-token-0123456789

echo "== run"
target/release/examples/mock_ollama --token-delay-ms 5 >/dev/null 2>&1 & PIDS+=($!)
wait_port 11434
podman run -d --name "$NAME" --network host -e HYPERION_ADMIN_TOKEN=$TOKEN \
  -v "$WORK/proxy.toml:/etc/hyperion/proxy.toml:ro" --read-only \
  $RUN_FLAGS --health-interval disable "$TAG" >/dev/null
# (--health-interval disable: podman's periodic checks need a systemd it
# can talk to, absent here; `podman healthcheck run` runs the image's own.)
wait_port 18080
if [ "$(podman inspect "$NAME" --format '{{.Config.User}}')" = "65532:65532" ]; then check "runs as 65532, not root"; else die "runs as 65532, not root: failed"; fi
if ! podman top "$NAME" user huser | tail -n +2 | grep -qw root; then check "the process is not root"; else die "the process is not root: failed"; fi
if podman healthcheck run "$NAME"; then check "healthcheck (hyperion probe /healthz)"; else die "healthcheck (hyperion probe /healthz): failed"; fi

lines=$(curl -sN localhost:18080/api/generate -d '{"model":"llama3.2","prompt":"why is the sky blue?"}' | wc -l)
if [ "$lines" -gt 2 ]; then check "a stream: $lines NDJSON lines"; else die "a stream: $lines NDJSON lines: failed"; fi
ask() { curl -s -o /dev/null -D - localhost:18080/api/generate -d '{"model":"llama3.2","prompt":"hi","stream":false}' | tr -d '\r' | sed -n 's/^x-cache: //Ip'; }
if [ "$(ask)" = "MISS" ] && [ "$(ask)" = "HIT" ]; then check "a cache hit"; else die "a cache hit: failed"; fi

generation() { curl -s -H "Authorization: Bearer $TOKEN" localhost:9090/admin/config | grep -o '"generation": *[0-9]*' | grep -o '[0-9]*$'; }
[ "$(generation)" = 1 ] || die "generation $(generation) before the reload"
sed -i 's/ttl = "10m"/ttl = "20m"/' "$WORK/proxy.toml"
podman kill -s HUP "$NAME" >/dev/null
for _ in $(seq 50); do [ "$(generation)" = 2 ] && break; sleep 0.1; done
if [ "$(generation)" = 2 ]; then check "reloaded on SIGHUP: policy generation 2"; else die "reloaded on SIGHUP: policy generation 2: failed"; fi

started=$(date +%s.%N)
podman stop --time 10 "$NAME" >/dev/null
took=$(echo "$(date +%s.%N) - $started" | bc)
code=$(podman inspect "$NAME" --format '{{.State.ExitCode}}')
if [ "$code" = 0 ]; then check "stopped cleanly on SIGTERM: exit 0 in ${took}s"; else die "stopped cleanly on SIGTERM: exit 0 in ${took}s: failed"; fi
if podman logs "$NAME" 2>&1 | grep -qi "drain"; then check "it drained"; else die "it drained: failed"; fi
echo "image: $(podman image inspect "$TAG" --format '{{.Size}}' | awk '{printf "%.1f MB", $1/1e6}')"
echo "deploy/container/test.sh: passed"
