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

start_hyperion <<TOML
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
# The same path on both routes: the limited one is picked by Host.
for host in limited.test plain.test; do
  curl -s -o /dev/null -H "Host: $host" "http://127.0.0.1:$HYPERION_PORT/static/1k"
  hit=$(curl -s -D - -o /dev/null -H "Host: $host" "http://127.0.0.1:$HYPERION_PORT/static/1k" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-cache"{print $2}')
  [ "$hit" = HIT ] || die "$host/static/1k is not a cache hit (X-Cache: $hit)"
done

side_by_side plain limited "Cache hits with and without rate limits" \
  "limited: per_ip (client_ip) + tokens (header:authorization), never refusing" -H "Authorization: Bearer sk-bench"
