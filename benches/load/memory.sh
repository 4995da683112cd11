#!/usr/bin/env bash
# =============================================================================
# memory.sh — what big request bodies cost Hyperion's memory, and whether an
# unrelated client still gets quick answers meanwhile (issue 27).
#
# For each body shape (a JSON array of zeros, deeply nested objects, one long
# string), N clients POST a SIZE_MB body at once to a body-keyed route (the
# default policy's `generate`), over HTTP/1.1 and then over HTTP/2 (h2c,
# prior knowledge). Meanwhile one keep-alive client GETs /api/tags (a cached
# route) in a loop. Reported per run: Hyperion's peak RSS (VmHWM, reset
# before each run), its RSS at rest, the statuses the uploads got, and the
# unrelated GET's p50/p99.
#
# Target: peak RSS <= baseline + max_buffered_bodies + 10%, GET p99 < 5 ms.
#
#   benches/load/memory.sh                     # N=4 SIZE_MB=48 BUDGET=256MB
#   N=8 SIZE_MB=48 BUDGET=128MB benches/load/memory.sh
#
# Needs curl (with HTTP/2) and python3. Traffic stays on loopback; every run
# is bounded (curl --max-time).
# =============================================================================
set -euo pipefail
SCRIPT=memory.sh
REPO=$(cd "$(dirname "$0")/../.." && pwd)
N=${N:-4}
SIZE_MB=${SIZE_MB:-48}
BUDGET=${BUDGET:-256MB}
PROXY_PORT=${PROXY_PORT:-18480}
MOCK_PORT=${MOCK_PORT:-18434}
RUN_DIR=${RUN_DIR:-$REPO/target/memory-bench}
OUT=${OUT:-$REPO/benches/runs/$(date +%F)-memory.txt}

die() { echo "$SCRIPT: $*" >&2; exit 1; }
command -v curl >/dev/null || die "curl is missing — apt-get install -y curl"
command -v python3 >/dev/null || die "python3 is missing"
rm -rf "$RUN_DIR"; mkdir -p "$RUN_DIR" "$(dirname "$OUT")"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

echo "building hyperion and mock_ollama (release)…"
(cd "$REPO" && cargo build --release --quiet && cargo build --release --quiet --example mock_ollama)

"$REPO/target/release/examples/mock_ollama" --listen "127.0.0.1:$MOCK_PORT" --token-delay-ms 0 >"$RUN_DIR/mock.log" 2>&1 &
PIDS+=($!)
sed -e "s/127.0.0.1:8080/127.0.0.1:$PROXY_PORT/" -e "s/127.0.0.1:11434/127.0.0.1:$MOCK_PORT/" \
  -e "s/^# max_buffered_bodies = .*/max_buffered_bodies = \"$BUDGET\"/" \
  -e "s/^access_log = .*/access_log = \"off\"/" \
  "$REPO/proxy.toml" >"$RUN_DIR/proxy.toml"
"$REPO/target/release/hyperion" check --config "$RUN_DIR/proxy.toml" >"$RUN_DIR/check.txt"
"$REPO/target/release/hyperion" --config "$RUN_DIR/proxy.toml" >"$RUN_DIR/hyperion.log" 2>&1 &
HPID=$!; PIDS+=($HPID)
for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$PROXY_PORT/api/tags" && break; sleep 0.1; done
curl -s -o /dev/null "http://127.0.0.1:$PROXY_PORT/api/tags" || die "hyperion does not answer"

echo "making the bodies ($SIZE_MB MB each)…"
python3 - "$RUN_DIR" "$SIZE_MB" <<'EOF'
import sys
out, mb = sys.argv[1], int(sys.argv[2])
size = mb * 1024 * 1024
head = b'{"model":"llama3.2","prompt":"x","stream":false,"a":'
def write(name, body):
    with open(f"{out}/{name}.json", "wb") as f:
        f.write(body)
n = (size - len(head)) // 2
write("zeros", head + b"[" + b"0," * (n - 1) + b"0]}")
# Objects nested 100 deep (under the 128-level bound), repeated in an array.
unit = b'{"k":' * 100 + b"1" + b"}" * 100
write("nested", head + b"[" + b",".join([unit] * ((size - len(head)) // (len(unit) + 1))) + b"]}")
write("string", head + b'"' + b"x" * (size - len(head) - 3) + b'"}')
EOF

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$HPID/status"; }
hwm_kb() { awk '/^VmHWM/ {print $2}' "/proc/$HPID/status"; }

# One keep-alive client timing GETs of a cached route until told to stop.
probe() {
  python3 - "$PROXY_PORT" "$1" <<'EOF'
import http.client, sys, time, os
port, stop = int(sys.argv[1]), sys.argv[2]
c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
lat = []
deadline = time.time() + 600
while not os.path.exists(stop) and time.time() < deadline:
    t = time.perf_counter()
    c.request("GET", "/api/tags"); r = c.getresponse(); r.read()
    lat.append((time.perf_counter() - t) * 1000)
    time.sleep(0.005)
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
print(f"{len(lat)} GETs, p50 {q(0.5):.2f} ms, p99 {q(0.99):.2f} ms, max {lat[-1]:.2f} ms")
EOF
}

sleep 1
BASE=$(rss_kb)
{
  echo "memory.sh $(date -Is) at $(cd "$REPO" && git rev-parse --short HEAD)"
  echo "N=$N SIZE_MB=$SIZE_MB max_buffered_bodies=$BUDGET; baseline RSS $((BASE / 1024)) MB"
  echo "target: peak <= baseline + budget + 10%; GET p99 < 5 ms"
} | tee "$OUT"

for proto in http1.1 h2c; do
  for shape in zeros nested string; do
    echo 5 >"/proc/$HPID/clear_refs" 2>/dev/null || true
    stop="$RUN_DIR/stop"; rm -f "$stop"
    probe "$stop" >"$RUN_DIR/probe.txt" &
    PROBE=$!
    flag=--http1.1; [ "$proto" = h2c ] && flag=--http2-prior-knowledge
    statuses=()
    for i in $(seq 1 "$N"); do
      curl -s $flag --max-time 120 -o /dev/null -w '%{http_code}\n' \
        -H 'Content-Type: application/json' --data-binary "@$RUN_DIR/$shape.json" \
        "http://127.0.0.1:$PROXY_PORT/api/generate" >"$RUN_DIR/status.$i" &
      statuses+=($!)
    done
    wait "${statuses[@]}" || true
    touch "$stop"; wait "$PROBE" || true
    codes=$(cat "$RUN_DIR"/status.* | sort | uniq -c | awk '{printf "%s×%s ", $1, $2}')
    peak=$(hwm_kb); now=$(rss_kb)
    printf '%-7s %-6s peak %5d MB (+%d over baseline)  at rest %4d MB  statuses %s  probe: %s\n' \
      "$proto" "$shape" $((peak / 1024)) $(((peak - BASE) / 1024)) $((now / 1024)) "$codes" "$(cat "$RUN_DIR/probe.txt")" | tee -a "$OUT"
  done
done
echo "written to $OUT"
