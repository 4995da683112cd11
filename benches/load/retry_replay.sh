#!/usr/bin/env bash
# =============================================================================
# retry_replay.sh — what being ready to retry costs a request that needs no
# retry: with `retries > 0`, a request whose body is in hand (a GET) keeps a
# copy of its head to send again should the server cut it off. The same
# uncached 1 KB GET through a pool with `retries = 0` and one with the
# default `retries = 1`, same origin, measured side by side in one run.
#
# Layout (2 cores): the origin and Hyperion share SERVER_CPU (0); wrk runs
# alone on CLIENT_CPU (1). Each route is measured in every round, in rotating
# order; the summary gives medians over rounds.
#
# Usage: benches/load/retry_replay.sh       (ROUNDS=5, ~2 min)
# Knobs: ROUNDS DURATION CONNS SERVER_CPU CLIENT_CPU SHARED OUT
# Needs: wrk, taskset, curl and ../shared/bench/origin (built here if missing).
# Every process is started here, on loopback ports 27580-27590, and stopped on exit.
# =============================================================================
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
: "${ROUNDS:=5}" "${DURATION:=8}" "${CONNS:=64}"
: "${SERVER_CPU:=0}" "${CLIENT_CPU:=1}"
: "${SHARED:=$REPO/../shared}"
: "${RUN_DIR:=/tmp/hyperion-retry-replay}"
: "${OUT:=$REPO/benches/runs/$(date +%Y-%m-%d)-retry-replay.txt}"
ORIGIN_PORT=27580 HYPERION_PORT=27590

SCRIPT=retry_replay.sh
# shellcheck source=benches/load/common.sh
source "$REPO/benches/load/common.sh"

start_hyperion <<TOML
[upstreams.once]
servers = [{ url = "http://127.0.0.1:$ORIGIN_PORT" }]
retries = 0
[upstreams.again]
servers = [{ url = "http://127.0.0.1:$ORIGIN_PORT" }]
retries = 1
[[route]]
name = "retries1"
match = { host = "retries1.test" }
upstream = "again"
[[route]]
name = "retries0"
upstream = "once"
TOML

side_by_side retries0 retries1 "Pass-through with retries = 1 and with retries = 0" \
  "uncached GET /static/1k to one server; retries1 keeps each request's head to send again"
