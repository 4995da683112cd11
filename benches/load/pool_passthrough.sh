#!/usr/bin/env bash
# =============================================================================
# pool_passthrough.sh — what a pool of three servers costs pass-through
# traffic: the same uncached 1 KB GET through a route to a one-server pool
# and through a route to a three-server pool (least_inflight, health checks
# on), measured side by side in one run.
#
# The three servers are one origin process behind three names (127.0.0.1,
# 127.1 and localhost: getaddrinfo maps each to 127.0.0.1), so the rows
# differ only in what Hyperion does for a pool; ORIGINS=3 runs three origin
# processes instead, which then share one core with Hyperion and cost
# throughput of their own.
#
# Layout (2 cores): the origin(s) and Hyperion share SERVER_CPU (0); wrk runs
# alone on CLIENT_CPU (1). Each route is measured in every round, in rotating
# order; the summary gives medians over rounds.
#   wrk -t1 -c$CONNS -d$DURATION   throughput, and Hyperion's CPU µs/request
# (the origins' CPU is not counted).
#
# Usage: benches/load/pool_passthrough.sh       (ROUNDS=5, ~2 min)
# Knobs: ROUNDS DURATION CONNS ORIGINS SERVER_CPU CLIENT_CPU SHARED OUT
# Needs: wrk, taskset, curl and ../shared/bench/origin (built here if missing).
# Every process is started here, on loopback ports 27480-27490, and stopped on exit.
# =============================================================================
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
: "${ROUNDS:=5}" "${DURATION:=8}" "${CONNS:=64}" "${ORIGINS:=1}"
: "${SERVER_CPU:=0}" "${CLIENT_CPU:=1}"
: "${SHARED:=$REPO/../shared}"
: "${RUN_DIR:=/tmp/hyperion-pool-passthrough}"
: "${OUT:=$REPO/benches/runs/$(date +%Y-%m-%d)-pool-passthrough.txt}"
ORIGIN_PORT=27480 HYPERION_PORT=27490

SCRIPT=pool_passthrough.sh
# shellcheck source=benches/load/common.sh
source "$REPO/benches/load/common.sh"

if [ "$ORIGINS" = 3 ]; then
  # Two more origins beside the one common.sh started.
  for port in 27481 27482; do
    taskset -c "$SERVER_CPU" "$ORIGIN" --listen "127.0.0.1:$port" --threads 1 >"$RUN_DIR/origin-$port.log" 2>&1 &
    PIDS+=($!)
    wait_port $port
    curl -s "http://127.0.0.1:$port/_delay?ms=0" >/dev/null
  done
  TRIO="\"http://127.0.0.1:$ORIGIN_PORT\", \"http://127.0.0.1:27481\", \"http://127.0.0.1:27482\""
else
  TRIO="\"http://127.0.0.1:$ORIGIN_PORT\", \"http://127.1:$ORIGIN_PORT\", \"http://localhost:$ORIGIN_PORT\""
fi
TRIO_SERVERS=$(echo "$TRIO" | sed -E 's/("[^"]+")/{ url = \1 }/g')
start_hyperion <<TOML
[upstreams.single]
servers = [{ url = "http://127.0.0.1:$ORIGIN_PORT" }]
[upstreams.trio]
servers = [$TRIO_SERVERS]
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

side_by_side single trio "Pass-through to a 3-server pool and to a 1-server pool" \
  "uncached GET /static/1k; trio: least_inflight over $ORIGINS origin process(es) behind three servers, with health checks"
