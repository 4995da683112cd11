#!/usr/bin/env bash
# =============================================================================
# soak.sh — the release binary under a bad day's traffic for DURATION
# seconds (600 by default), then it stops by itself (issue 27).
#
# Against the default policy (proxy.toml, its deadlines shortened where the
# mix needs them to fire: body_read_timeout 2s, send_timeout 3s; the cache
# CACHE_SIZE, 16MB, so it fills early and RSS can be seen flat) in front of
# examples/mock_ollama, worker threads keep sending, each its own kind:
#   stream     streamed generations (NDJSON), new prompts
#   whole      "stream": false generations, new prompts
#   hit        a few prompts asked again and again (cache hits)
#   burst      8 identical new prompts at once (coalescing)
#   slow_read  a stream read one byte now and then, or not at all (cut by
#              send_timeout)
#   slow_up    a body sent in pieces, some stopping for good (408)
#   abort      a stream the client leaves after its first chunk
# and, beside them, the upstream is killed and started again every 45 s
# (faults: 502, or stale answers) and the policy reloaded every 30 s.
#
# Every 10 s: Hyperion's RSS, open descriptors and the cache's own size. At the end: requests by
# kind and outcome, and every status no kind expects (target: none); RSS and
# descriptors flat after warm-up and back near their start once the load
# stops.
#
#   benches/load/soak.sh                     # DURATION=600
#   DURATION=120 benches/load/soak.sh
#
# Needs python3 and curl. Loopback only; every request has a timeout.
# =============================================================================
set -euo pipefail
SCRIPT=soak.sh
REPO=$(cd "$(dirname "$0")/../.." && pwd)
: "${DURATION:=600}" "${CACHE_SIZE:=16MB}"
ADMIN_PORT=${ADMIN_PORT:-18581}
PROXY_PORT=${PROXY_PORT:-18580}
MOCK_PORT=${MOCK_PORT:-18534}
RUN_DIR=${RUN_DIR:-/tmp/hyperion-soak}
OUT=${OUT:-$REPO/benches/runs/$(date +%F)-soak.txt}

die() { echo "$SCRIPT: $*" >&2; exit 1; }
command -v python3 >/dev/null || die "python3 is missing"
command -v curl >/dev/null || die "curl is missing — apt-get install -y curl"
rm -rf "$RUN_DIR"; mkdir -p "$RUN_DIR" "$(dirname "$OUT")"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; [ -n "${MOCK:-}" ] && kill "$MOCK" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

if [ -n "${HYPERION_BIN:-}" ]; then
  HYPERION=$(realpath "$HYPERION_BIN")
  (cd "$REPO" && cargo build --release --quiet --example mock_ollama)
else
  echo "building hyperion and mock_ollama (release)…"
  (cd "$REPO" && cargo build --release --quiet && cargo build --release --quiet --example mock_ollama)
  HYPERION="$REPO/target/release/hyperion"
fi
MOCK_BIN="$REPO/target/release/examples/mock_ollama"

start_mock() {
  "$MOCK_BIN" --listen "127.0.0.1:$MOCK_PORT" --token-delay-ms 20 >>"$RUN_DIR/mock.log" 2>&1 &
  MOCK=$!
}
start_mock

sed -e "s/127.0.0.1:8080/127.0.0.1:$PROXY_PORT/" -e "s/127.0.0.1:11434/127.0.0.1:$MOCK_PORT/" \
  -e 's/^# body_read_timeout = .*/body_read_timeout = "2s"/' \
  -e 's/^# send_timeout = .*/send_timeout = "3s"/' \
  -e 's/^access_log = .*/access_log = "off"/' \
  -e "s/^max_size = .*/max_size = \"$CACHE_SIZE\"/" \
  "$REPO/proxy.toml" >"$RUN_DIR/proxy.toml"
# The admin API, for the cache's own size beside RSS.
export HYPERION_SOAK_TOKEN=soak-bench-token-0123456789
printf '\n[admin]\nlisten = "127.0.0.1:%s"\ntoken_env = "HYPERION_SOAK_TOKEN"\n' "$ADMIN_PORT" >>"$RUN_DIR/proxy.toml"
"$HYPERION" check --config "$RUN_DIR/proxy.toml" >"$RUN_DIR/check.txt"
"$HYPERION" --config "$RUN_DIR/proxy.toml" >"$RUN_DIR/hyperion.log" 2>&1 &
HPID=$!; PIDS+=($HPID)
for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$PROXY_PORT/api/version" && break; sleep 0.1; done

rss_mb() { awk '/^VmRSS/ {printf "%d", $2 / 1024}' "/proc/$HPID/status"; }
fds() { ls "/proc/$HPID/fd" | wc -l; }
cache_mb() {
  curl -s -H "Authorization: Bearer $HYPERION_SOAK_TOKEN" "http://127.0.0.1:$ADMIN_PORT/admin/cache" |
    python3 -c 'import json,sys; c=json.load(sys.stdin); print(c["bytes"] // 1048576)' 2>/dev/null || echo "?"
}
{
  echo "soak.sh $(date -Is) at $(cd "$REPO" && git rev-parse --short HEAD), DURATION=${DURATION}s"
  echo "start: RSS $(rss_mb) MB, $(fds) descriptors"
} | tee "$OUT"

python3 "$REPO/benches/load/soak_traffic.py" "$PROXY_PORT" "$DURATION" >"$RUN_DIR/traffic.txt" 2>&1 &
TRAFFIC=$!; PIDS+=($TRAFFIC)

t=0
while kill -0 "$TRAFFIC" 2>/dev/null; do
  sleep 10; t=$((t + 10))
  if [ $((t % 30)) -eq 0 ]; then kill -HUP "$HPID"; fi
  if [ $((t % 45)) -eq 0 ]; then kill -9 "$MOCK" 2>/dev/null || true; sleep 2; start_mock; fi
  printf 'load %4ds  RSS %4d MB  %4d descriptors  cache %s MB\n' "$t" "$(rss_mb)" "$(fds)" "$(cache_mb)" | tee -a "$OUT"
done
for t in 10 20 30; do
  sleep 10
  printf 'idle %4ds  RSS %4d MB  %4d descriptors  cache %s MB\n' "$t" "$(rss_mb)" "$(fds)" "$(cache_mb)" | tee -a "$OUT"
done
cat "$RUN_DIR/traffic.txt" | tee -a "$OUT"
grep -c "reload refused" "$RUN_DIR/hyperion.log" | sed 's/^/reloads refused: /' | tee -a "$OUT" || true
kill -0 "$HPID" || die "hyperion died (see $RUN_DIR/hyperion.log)"
echo "written to $OUT"
