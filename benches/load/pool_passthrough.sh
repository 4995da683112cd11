#!/usr/bin/env bash
# =============================================================================
# pool_passthrough.sh — what a pool of three servers costs pass-through
# traffic: the same uncached 1 KB GET through a route to a one-server pool
# and through a route to a three-server pool (least_inflight, health checks
# on), measured side by side in one run.
#
# Layout (2 cores): the origins and Hyperion share SERVER_CPU (0); wrk runs
# alone on CLIENT_CPU (1). Each route is measured in every round, in rotating
# order; the summary gives medians over rounds.
#   wrk -t1 -c$CONNS -d$DURATION   throughput, and Hyperion's CPU µs/request
# (the origins' CPU is not counted).
#
# Usage: benches/load/pool_passthrough.sh       (ROUNDS=5, ~2 min)
# Knobs: ROUNDS DURATION CONNS SERVER_CPU CLIENT_CPU SHARED OUT
# Needs: wrk, taskset, curl and ../shared/bench/origin (built here if missing).
# Every process is started here, on loopback ports 27480-27490, and stopped on exit.
# =============================================================================
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
: "${ROUNDS:=5}" "${DURATION:=8}" "${CONNS:=64}"
: "${SERVER_CPU:=0}" "${CLIENT_CPU:=1}"
: "${SHARED:=$REPO/../shared}"
: "${RUN_DIR:=/tmp/hyperion-pool-passthrough}"
: "${OUT:=$REPO/benches/runs/$(date +%Y-%m-%d)-pool-passthrough.txt}"
ORIGIN_PORT=27480 HYPERION_PORT=27490

SCRIPT=pool_passthrough.sh
# shellcheck source=benches/load/common.sh
source "$REPO/benches/load/common.sh"

# Two more origins beside the one common.sh started.
for port in 27481 27482; do
  taskset -c "$SERVER_CPU" "$ORIGIN" --listen "127.0.0.1:$port" --threads 1 >"$RUN_DIR/origin-$port.log" 2>&1 &
  PIDS+=($!)
  wait_port $port
  curl -s "http://127.0.0.1:$port/_delay?ms=0" >/dev/null
done
cat >"$RUN_DIR/hyperion.toml" <<TOML
[server]
listen = ["127.0.0.1:$HYPERION_PORT"]
access_log = "off"
[upstreams.single]
servers = [{ url = "http://127.0.0.1:$ORIGIN_PORT" }]
[upstreams.trio]
servers = [{ url = "http://127.0.0.1:$ORIGIN_PORT" }, { url = "http://127.0.0.1:27481" }, { url = "http://127.0.0.1:27482" }]
[upstreams.trio.health]
path = "/_count"
interval = "1s"
[[route]]
name = "trio"
match = { host = "trio.test" }
upstream = "trio"
[[route]]
name = "single"
upstream = "single"
TOML
taskset -c "$SERVER_CPU" "$HYPERION" --config "$RUN_DIR/hyperion.toml" >"$RUN_DIR/hyperion.log" 2>&1 &
PIDS+=($!); HYPERION_PID=$!
wait_port $HYPERION_PORT

RESULTS="$RUN_DIR/results.tsv"
printf "round\troute\trps\tcpu_us\n" >"$RESULTS"
hz=$(getconf CLK_TCK)
run() { # round route host
  local log="$RUN_DIR/$1-$2.txt" t0 t1 reqs rps cpu_us
  taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNS" -d2s -H "Host: $3" "http://127.0.0.1:$HYPERION_PORT/static/1k" >/dev/null 2>&1
  t0=$(tree_ticks "$HYPERION_PID")
  taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" -H "Host: $3" "http://127.0.0.1:$HYPERION_PORT/static/1k" >"$log" 2>&1
  t1=$(tree_ticks "$HYPERION_PID")
  reqs=$(awk '/requests in/{print $1}' "$log"); rps=$(awk '/^Requests\/sec/{print $2}' "$log")
  if grep -q "Non-2xx" "$log"; then echo "  warning: $2: $(grep Non-2xx "$log")" >&2; fi
  cpu_us=$(awk -v c="$(( t1 - t0 ))" -v hz="$hz" -v n="$reqs" 'BEGIN{printf "%.2f", c/hz*1e6/n}')
  printf "%s\t%s\t%s\t%s\n" "$1" "$2" "$rps" "$cpu_us" >>"$RESULTS"
  printf "  round %s %-8s %10s req/s  cpu %6s µs/req\n" "$1" "$2" "$rps" "$cpu_us"
}
order=(single trio)
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round/$ROUNDS"
  for r in "${order[@]}"; do
    run "$round" "$r" "$r.test"
  done
  order=("${order[1]}" "${order[0]}")
done
{
  echo "# Pass-through to a 3-server pool and to a 1-server pool — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "# command: benches/load/pool_passthrough.sh (ROUNDS=$ROUNDS DURATION=${DURATION}s CONNS=$CONNS)"
  echo "# machine: $(nproc) cores; hyperion $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null); Hyperion on CPU $SERVER_CPU, wrk on CPU $CLIENT_CPU"
  echo "# uncached GET /static/1k; trio: least_inflight over three origins with health checks; medians [min..max]"
  echo
  awk -F'\t' "$AWK_STATS"'
    NR>1 { rps[$2]=rps[$2]" "$3; cpu[$2]=cpu[$2]" "$4; r[$1,$2]=$3; c[$1,$2]=$4; if ($1>n) n=$1 }
    END {
      for (k in rps) printf "%-8s %10.0f req/s [%6.0f..%6.0f]  cpu %5.2f µs/req\n", k, med(rps[k]), mn(rps[k]), mx(rps[k]), med(cpu[k])
      # Each round measures both routes back to back: its ratio is the
      # steadier reading on a noisy machine.
      for (i=1;i<=n;i++) { ratio=ratio" "r[i,"trio"]/r[i,"single"]; extra=extra" "c[i,"trio"]-c[i,"single"] }
      printf "  → trio/single throughput %.3f× (medians); per round %.3f× [%.3f..%.3f]; cpu µs/request %+.2f (per round %+.2f)\n", med(rps["trio"])/med(rps["single"]), med(ratio), mn(ratio), mx(ratio), med(cpu["trio"])-med(cpu["single"]), med(extra)
    }' "$RESULTS"
} | tee "$OUT"
echo "report: $OUT"
