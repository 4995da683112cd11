#!/usr/bin/env bash
# =============================================================================
# limited_hits.sh — what rate limits cost a cache hit: the same 1 KB cached
# answer through a route without limits and through a route with a request
# limiter (client_ip) and a token limiter (header:authorization), neither of
# which ever refuses, measured side by side in one run.
#
# Layout (2 cores): the origin and Hyperion share SERVER_CPU (0); wrk runs
# alone on CLIENT_CPU (1). Each route is measured in every round, in rotating
# order; the summary gives medians over rounds.
#   wrk -t1 -c$CONNS -d$DURATION   throughput, and Hyperion's CPU µs/request
#
# Usage: benches/load/limited_hits.sh           (ROUNDS=5, ~2 min)
# Knobs: ROUNDS DURATION CONNS SERVER_CPU CLIENT_CPU SHARED OUT
# Needs: wrk, taskset, curl and ../shared/bench/origin (built here if missing).
# Every process is started here, on loopback ports 27380-27390, and stopped on exit.
# =============================================================================
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
: "${ROUNDS:=5}" "${DURATION:=8}" "${CONNS:=64}"
: "${SERVER_CPU:=0}" "${CLIENT_CPU:=1}"
: "${SHARED:=$REPO/../shared}"
: "${RUN_DIR:=/tmp/hyperion-limited-hits}"
: "${OUT:=$REPO/benches/runs/$(date +%Y-%m-%d)-limited-hits.txt}"
ORIGIN_PORT=27380 HYPERION_PORT=27390

SCRIPT=limited_hits.sh
# shellcheck source=benches/load/common.sh
source "$REPO/benches/load/common.sh"

cat >"$RUN_DIR/hyperion.toml" <<TOML
[server]
listen = ["127.0.0.1:$HYPERION_PORT"]
access_log = "off"
[upstreams.origin]
servers = [{ url = "http://127.0.0.1:$ORIGIN_PORT" }]
[rate_limits.per_ip]
key = "client_ip"
rate = "1000000000/sec"
[rate_limits.tokens]
key = "header:authorization"
tokens = "1000000000/sec"
[[route]]
name = "limited"
match = { host = "limited.test" }
upstream = "origin"
rate_limit = ["per_ip", "tokens"]
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
taskset -c "$SERVER_CPU" "$HYPERION" --config "$RUN_DIR/hyperion.toml" >"$RUN_DIR/hyperion.log" 2>&1 &
PIDS+=($!); HYPERION_PID=$!
wait_port $HYPERION_PORT
# The same path on both routes: the limited one is picked by Host.
for host in limited.test plain.test; do
  curl -s -o /dev/null -H "Host: $host" "http://127.0.0.1:$HYPERION_PORT/static/1k"
  hit=$(curl -s -D - -o /dev/null -H "Host: $host" "http://127.0.0.1:$HYPERION_PORT/static/1k" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-cache"{print $2}')
  [ "$hit" = HIT ] || die "$host/static/1k is not a cache hit (X-Cache: $hit)"
done

RESULTS="$RUN_DIR/results.tsv"
printf "round\troute\trps\tcpu_us\n" >"$RESULTS"
hz=$(getconf CLK_TCK)
run() { # round route host
  local log="$RUN_DIR/$1-$2.txt" t0 t1 reqs rps cpu_us
  taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNS" -d2s -H "Authorization: Bearer sk-bench" -H "Host: $3" "http://127.0.0.1:$HYPERION_PORT/static/1k" >/dev/null 2>&1
  t0=$(tree_ticks "$HYPERION_PID")
  taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" -H "Authorization: Bearer sk-bench" -H "Host: $3" "http://127.0.0.1:$HYPERION_PORT/static/1k" >"$log" 2>&1
  t1=$(tree_ticks "$HYPERION_PID")
  reqs=$(awk '/requests in/{print $1}' "$log"); rps=$(awk '/^Requests\/sec/{print $2}' "$log")
  if grep -q "Non-2xx" "$log"; then echo "  warning: $2: $(grep Non-2xx "$log")" >&2; fi
  cpu_us=$(awk -v c="$(( t1 - t0 ))" -v hz="$hz" -v n="$reqs" 'BEGIN{printf "%.2f", c/hz*1e6/n}')
  printf "%s\t%s\t%s\t%s\n" "$1" "$2" "$rps" "$cpu_us" >>"$RESULTS"
  printf "  round %s %-8s %10s req/s  cpu %6s µs/req\n" "$1" "$2" "$rps" "$cpu_us"
}
order=(plain limited)
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round/$ROUNDS"
  for r in "${order[@]}"; do
    run "$round" "$r" "$r.test"
  done
  order=("${order[1]}" "${order[0]}")
done
{
  echo "# Cache hits with and without rate limits — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "# command: benches/load/limited_hits.sh (ROUNDS=$ROUNDS DURATION=${DURATION}s CONNS=$CONNS)"
  echo "# machine: $(nproc) cores; hyperion $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null); Hyperion on CPU $SERVER_CPU, wrk on CPU $CLIENT_CPU"
  echo "# limited: per_ip (client_ip) + tokens (header:authorization), never refusing; medians [min..max]"
  echo
  awk -F'\t' "$AWK_STATS"'
    NR>1 { rps[$2]=rps[$2]" "$3; cpu[$2]=cpu[$2]" "$4; r[$1,$2]=$3; c[$1,$2]=$4; if ($1>n) n=$1 }
    END {
      for (k in rps) printf "%-8s %10.0f req/s [%6.0f..%6.0f]  cpu %5.2f µs/req\n", k, med(rps[k]), mn(rps[k]), mx(rps[k]), med(cpu[k])
      # Each round measures both routes back to back: its ratio is the
      # steadier reading on a noisy machine.
      for (i=1;i<=n;i++) { ratio=ratio" "r[i,"limited"]/r[i,"plain"]; extra=extra" "c[i,"limited"]-c[i,"plain"] }
      printf "  → limited/plain throughput %.3f× (medians); per round %.3f× [%.3f..%.3f]; cpu µs/hit %+.2f (per round %+.2f)\n", med(rps["limited"])/med(rps["plain"]), med(ratio), mn(ratio), mx(ratio), med(cpu["limited"])-med(cpu["plain"]), med(extra)
    }' "$RESULTS"
} | tee "$OUT"
echo "report: $OUT"
