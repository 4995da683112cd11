#!/usr/bin/env bash
# =============================================================================
# churn.sh — does the cache's memory stay near its max_size when every
# request stores a new entry? (issue 27)
#
# Hyperion caches every GET for an hour in a MAX_SIZE cache (64MB by
# default); wrk asks for /static/16k with a query no request repeats, so
# every request is a miss that stores a 16 KB answer and pushes an older one
# out. Hyperion's RSS is sampled every SAMPLE seconds for DURATION seconds,
# then for IDLE seconds with no load, beside the cache's own count of
# entries and bytes (/admin/cache).
#
# Target: RSS <= 1.1 x max_size + 30 MB throughout, flat after warm-up.
#
#   benches/load/churn.sh                    # DURATION=600 SAMPLE=10 IDLE=30
#   DURATION=120 benches/load/churn.sh       # a shorter look
#
# Knobs: DURATION SAMPLE IDLE MAX_SIZE CONNS HYPERION_BIN MIMALLOC_* (passed
# to the proxy, to try the allocator's options). Needs wrk, taskset, curl and
# ../shared/bench/origin. Loopback only; stops by itself.
# =============================================================================
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
: "${DURATION:=600}" "${SAMPLE:=10}" "${IDLE:=30}" "${MAX_SIZE:=64MB}" "${CONNS:=32}"
: "${SERVER_CPU:=0}" "${CLIENT_CPU:=1}"
: "${SHARED:=$REPO/../shared}"
: "${RUN_DIR:=/tmp/hyperion-churn}"
: "${OUT:=$REPO/benches/runs/$(date +%Y-%m-%d)-churn.txt}"
ORIGIN_PORT=27880 HYPERION_PORT=27881 ADMIN_PORT=27882

SCRIPT=churn.sh
NEEDS="wrk:wrk taskset:util-linux curl:curl"
# shellcheck source=benches/load/common.sh
source "$REPO/benches/load/common.sh"

export HYPERION_BENCH_TOKEN=churn-bench-token-0123456789
{
  cat <<EOF
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
token_env = "HYPERION_BENCH_TOKEN"

[cache]
max_size = "$MAX_SIZE"
max_entry_size = "1MB"

EOF
  origin_route
  cat <<EOF

[route.cache]
mode = "force"
ttl = "1h"
scope = "shared"
EOF
} >"$RUN_DIR/policy.part"
# Not piped: start_proxy must run in this shell to leave its pid here.
start_proxy hyperion "$HYPERION" "$HYPERION_PORT" <"$RUN_DIR/policy.part"
HPID=$STARTED_PID

cat >"$RUN_DIR/unique.lua" <<'EOF'
-- Every request a path no other asks for: a miss that stores an entry.
local n = 0
local id = tostring(math.random(1, 1e9))
request = function()
  n = n + 1
  return wrk.format("GET", "/static/16k?u=" .. id .. "-" .. n)
end
EOF

rss_mb() { awk '/^VmRSS/ {printf "%d", $2 / 1024}' "/proc/$HPID/status"; }
cache_line() {
  curl -s -H "Authorization: Bearer $HYPERION_BENCH_TOKEN" "http://127.0.0.1:$ADMIN_PORT/admin/cache" |
    python3 -c 'import json,sys; c=json.load(sys.stdin); print("cache", c["entries"], "entries,", c["bytes"] // 1048576, "MB")' 2>/dev/null || echo "cache ?"
}

{
  echo "churn.sh $(date -Is) at $(cd "$REPO" && git rev-parse --short HEAD): max_size $MAX_SIZE, wrk -c$CONNS, unique 16 KB answers"
  echo "target: RSS <= 1.1 x max_size + 30 MB, flat after warm-up"
  echo "start: RSS $(rss_mb) MB"
} | tee "$OUT"

taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" -s "$RUN_DIR/unique.lua" \
  "http://127.0.0.1:$HYPERION_PORT" >"$RUN_DIR/wrk.txt" 2>&1 &
WRK=$!; PIDS+=($WRK)
t=0
while kill -0 "$WRK" 2>/dev/null; do
  sleep "$SAMPLE"; t=$((t + SAMPLE))
  printf 'load %4ds  RSS %4d MB  %s\n' "$t" "$(rss_mb)" "$(cache_line)" | tee -a "$OUT"
done
grep -E "Requests/sec|Non-2xx|Socket errors" "$RUN_DIR/wrk.txt" | sed 's/^/wrk: /' | tee -a "$OUT"
t=0
while [ "$t" -lt "$IDLE" ]; do
  sleep "$SAMPLE"; t=$((t + SAMPLE))
  printf 'idle %4ds  RSS %4d MB  %s\n' "$t" "$(rss_mb)" "$(cache_line)" | tee -a "$OUT"
done
echo "written to $OUT"
