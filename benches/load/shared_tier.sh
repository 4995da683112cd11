#!/usr/bin/env bash
# =============================================================================
# shared_tier.sh — what the Redis tier costs (issue 8's targets): the latency
# of a Redis hit (a memory miss answered from Redis, then promoted) against
# a memory hit, and of a memory hit on a route whose rate limit is decided
# in Redis, all through one instance (B) in one run.
#
# Layout (2 cores): the origin, redis-server and both Hyperion instances
# share SERVER_CPU (0); wrk runs alone on CLIENT_CPU (1). Instance A fills
# Redis with FILL distinct 1 KB answers (/static/1k?n=…); then, in each
# round, B is measured with one connection (latency, not throughput):
#   redis     URLs B has never seen: every request a memory miss, a Redis hit
#   memory    the first 1000 of those again: every request a memory hit
#   limited   memory hits on a route with a request limiter (never refusing)
#             decided in Redis: one round trip per request
# and the report gives each run's median latency (wrk --latency), medians
# over rounds, and the per-round differences to `memory`.
#
# Usage: benches/load/shared_tier.sh           (ROUNDS=5, ~1 min)
# Knobs: ROUNDS DURATION SERVER_CPU CLIENT_CPU SHARED OUT
# Needs: wrk, taskset, curl, redis-server and ../shared/bench/origin (built
# here if missing). Every process is started here, on loopback ports
# 27400-27420, and stopped on exit.
# =============================================================================
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
: "${ROUNDS:=5}" "${DURATION:=3}"
: "${SERVER_CPU:=0}" "${CLIENT_CPU:=1}"
: "${SHARED:=$REPO/../shared}"
: "${RUN_DIR:=/tmp/hyperion-shared-tier}"
: "${OUT:=$REPO/benches/runs/$(date +%Y-%m-%d)-shared-tier.txt}"
ORIGIN_PORT=27400 REDIS_PORT=27419
# URLs each round's `redis` run may use: more than one connection can ask for
# in DURATION seconds (~100 µs a request: 30k); checked below.
STRIDE=50000

SCRIPT=shared_tier.sh
command -v redis-server >/dev/null || { echo "$SCRIPT: redis-server is missing — apt-get install -y redis-server" >&2; exit 1; }
# shellcheck source=benches/load/common.sh
source "$REPO/benches/load/common.sh"

taskset -c "$SERVER_CPU" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  >"$RUN_DIR/redis.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

# The fleet's secret (required since issue 28): one for both instances.
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$RUN_DIR/redis.secret"

policy() {
  cat <<TOML
[cache]
max_size = "1GB"
[cache.redis]
url = "redis://127.0.0.1:$REDIS_PORT/0"
key_prefix = "bench:"
timeout = "100ms"
secret_file = "$RUN_DIR/redis.secret"
[upstreams.origin]
servers = [{ url = "http://127.0.0.1:$ORIGIN_PORT" }]
[rate_limits.fleet]
key = "client_ip"
rate = "1000000000/sec"
count_hits = true
[[route]]
name = "limited"
match = { host = "limited.test" }
upstream = "origin"
rate_limit = ["fleet"]
[route.cache]
mode = "force"
ttl = "1h"
[[route]]
name = "plain"
upstream = "origin"
[route.cache]
mode = "force"
ttl = "1h"
TOML
}
# Not `policy | start_hyperion`: a pipeline would start it in a subshell,
# whose PIDS the cleanup never sees.
HYPERION_PORT=27410; start_hyperion < <(policy); A_PORT=$HYPERION_PORT
HYPERION_PORT=27411; start_hyperion < <(policy); B_PORT=$HYPERION_PORT
for _ in $(seq 1 50); do
  grep -q "shared tier .* available" "$RUN_DIR/hyperion.log" && break; sleep 0.1
done
sleep 1.5   # both instances' keepers have connected

# One URL per request from BASE on, wrapping after MOD.
cat >"$RUN_DIR/urls.lua" <<'LUA'
local base = tonumber(os.getenv("BASE") or "0")
local mod = tonumber(os.getenv("MOD") or "1000000000")
local n = 0
request = function()
  local url = "/static/1k?n=" .. (base + (n % mod))
  n = n + 1
  return wrk.format("GET", url)
end
LUA

FILL=$(( ROUNDS * STRIDE ))
echo "filling Redis through A with $FILL answers…"
BASE=0 MOD=$FILL taskset -c "$CLIENT_CPU" wrk -t1 -c16 -d120s -s "$RUN_DIR/urls.lua" \
  "http://127.0.0.1:$A_PORT" >"$RUN_DIR/fill.txt" 2>&1 &
FILL_PID=$!
while kill -0 "$FILL_PID" 2>/dev/null; do
  [ "$(redis-cli -p "$REDIS_PORT" dbsize)" -ge "$(( 2 * FILL + 1 ))" ] && { kill "$FILL_PID"; break; }
  sleep 1
done
wait "$FILL_PID" 2>/dev/null || true
echo "redis holds $(redis-cli -p "$REDIS_PORT" dbsize) keys"
xc() { curl -s -D - -o /dev/null "${@:2}" "http://127.0.0.1:$B_PORT$1" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-cache"{print $2}'; }
[ "$(xc "/static/1k?n=$(( FILL - 1 ))")" = HIT ] || die "B does not find A's answers in Redis"

results="$RUN_DIR/results.tsv"
printf "round\trun\tp50_us\trequests\n" >"$results"
measure() { # name base mod [wrk args…]
  local name=$1 base=$2 mod=$3 log; shift 3
  log="$RUN_DIR/$round-$name.txt"
  BASE=$base MOD=$mod taskset -c "$CLIENT_CPU" wrk -t1 -c1 -d"${DURATION}s" --latency -s "$RUN_DIR/urls.lua" "$@" \
    "http://127.0.0.1:$B_PORT" >"$log" 2>&1
  local p50 reqs
  p50=$(awk '$1=="50%"{print $2}' "$log" | to_us)
  reqs=$(awk '/requests in/{print $1}' "$log")
  if grep -q "Non-2xx" "$log"; then die "$name: $(grep Non-2xx "$log")"; fi
  printf "%s\t%s\t%s\t%s\n" "$round" "$name" "$p50" "$reqs" >>"$results"
  printf "  round %s %-8s p50 %7s µs  (%s requests)\n" "$round" "$name" "$p50" "$reqs"
  LAST_REQS=$reqs
}
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round/$ROUNDS"
  base=$(( (round - 1) * STRIDE ))
  [ "$(xc "/static/1k?n=$(( base + STRIDE - 1 ))")" = HIT ] || die "n=$(( base + STRIDE - 1 )) not in Redis"
  measure redis "$base" "$(( STRIDE - 1 ))"
  [ "$LAST_REQS" -lt "$(( STRIDE - 1 ))" ] || die "the redis run wrapped: raise STRIDE"
  measure memory "$base" 1000
  # Warm the limited route's 1000 answers into memory, then measure.
  BASE=0 MOD=1000 taskset -c "$CLIENT_CPU" wrk -t1 -c1 -d1s -s "$RUN_DIR/urls.lua" -H "Host: limited.test" \
    "http://127.0.0.1:$B_PORT" >/dev/null 2>&1
  [ "$(xc /static/1k?n=999 -H 'Host: limited.test')" = HIT ] || die "the limited route is not hitting memory"
  measure limited 0 1000 -H "Host: limited.test"
done

{
  echo "# Shared tier (Redis) latency: memory hit vs Redis hit vs limit decided in Redis — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "# command: benches/load/$SCRIPT (ROUNDS=$ROUNDS DURATION=${DURATION}s, wrk -t1 -c1 --latency)"
  echo "# machine: $(nproc) cores; hyperion $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null); $(redis-server --version | awk '{print $1, $2, $3}'); origin, redis and Hyperion on CPU $SERVER_CPU, wrk on CPU $CLIENT_CPU"
  echo "# p50 latency per run; medians over rounds [min..max]"
  echo
  awk -F'\t' "$AWK_STATS"'
    NR>1 { p[$2]=p[$2]" "$3; v[$1,$2]=$3; if ($1>n) n=$1 }
    END {
      split("memory redis limited", order, " ")
      for (i=1;i<=3;i++) { k=order[i]; printf "%-8s p50 %7.1f µs [%6.1f..%6.1f]\n", k, med(p[k]), mn(p[k]), mx(p[k]) }
      for (i=1;i<=n;i++) { dr=dr" "v[i,"redis"]-v[i,"memory"]; dl=dl" "v[i,"limited"]-v[i,"memory"] }
      printf "  → a Redis hit adds %.1f µs over a memory hit (per round %.1f [%.1f..%.1f]); target < 300 µs\n", med(p["redis"])-med(p["memory"]), med(dr), mn(dr), mx(dr)
      printf "  → a limit decided in Redis adds %.1f µs to a memory hit (per round %.1f [%.1f..%.1f]): one round trip\n", med(p["limited"])-med(p["memory"]), med(dl), mn(dl), mx(dl)
    }' "$results"
} | tee "$OUT"
echo "report: $OUT"
