#!/usr/bin/env bash
# =============================================================================
# ab.sh — two Hyperion binaries side by side on the pass-through path: which
# one is faster, by how much, measured in one run on the same origin.
#
# Each binary listens on its own port with the same policy (one route to the
# bench origin, access log off) and runs on SERVER_CPU with the origin; wrk
# runs on CLIENT_CPU. Every round measures A then B, or B then A (alternating,
# so a drift of the machine weighs on both), GET /static/1k, wrk -t1
# -c$CONNS for DURATION seconds after a 2 s warm-up. The report gives medians
# and the per-round B/A ratio, the steadier reading on a shared machine, with
# each binary's user and system CPU per request from /proc.
#
# Usage: benches/load/ab.sh BIN_A BIN_B      (ROUNDS=8, ~2 min)
#        e.g. git stash; cargo build --release; cp target/release/hyperion /tmp/a
#             git stash pop; cargo build --release; benches/load/ab.sh /tmp/a target/release/hyperion
# Knobs: ROUNDS DURATION CONNS PATHQ SERVER_CPU CLIENT_CPU SHARED OUT, and
# CACHE=1 to cache the route (force, 1 h): then every request after the
# first is a cache hit, and the run compares hits instead of pass-through.
# AUTH=ab (or AUTH=b, AUTH=a): those binaries' policies add [auth] with one
# key (every request presents it, and its usage is counted), e.g. AUTH=b
# with the same binary twice to measure what API keys cost.
# TRACING=ab (or b, a): those binaries' policies add [tracing] (sample_ratio
# 1.0: every request a trace of three or more spans) exporting to a stand-in
# collector (otlp_sink.py, on CLIENT_CPU), to measure what traces cost;
# TRACING_KEYS adds [tracing] keys (e.g. 'max_queue = 200000'). The
# collector's counts (POSTs, bytes) are in $RUN_DIR/otlp-counts after the run.
# UPSTREAM_A / UPSTREAM_B: lines added to that binary's [upstreams.origin]
# (e.g. UPSTREAM_B='balance = "prefix_affinity"'); POST_BODY=FILE sends
# every request as a POST of that file (application/json) instead of a GET.
# Needs: wrk, taskset, curl and ../shared/bench/origin (built here if missing).
# Output: a dated report in benches/runs/ (raw wrk logs in $RUN_DIR).
# Every process is started here, on loopback ports 27780-27792, and stopped on exit.
# =============================================================================
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
[ $# -eq 2 ] || { echo "usage: benches/load/ab.sh BIN_A BIN_B" >&2; exit 2; }
BIN_A=$(realpath "$1") BIN_B=$(realpath "$2")
: "${ROUNDS:=8}" "${DURATION:=5}" "${CONNS:=64}" "${PATHQ:=/static/1k}"
: "${SERVER_CPU:=0}" "${CLIENT_CPU:=1}"
: "${SHARED:=$REPO/../shared}"
: "${RUN_DIR:=/tmp/hyperion-ab}"
: "${OUT:=$REPO/benches/runs/$(date +%Y-%m-%d)-ab.txt}"
ORIGIN_PORT=27780 PORT_A=27791 PORT_B=27792 OTLP_PORT=27793

SCRIPT=ab.sh
NEEDS="wrk:wrk taskset:util-linux curl:curl"
# shellcheck source=benches/load/common.sh
source "$REPO/benches/load/common.sh"

if [ -n "${TRACING:-}" ]; then
  taskset -c "$CLIENT_CPU" python3 "$REPO/benches/load/otlp_sink.py" $OTLP_PORT "$RUN_DIR/otlp-counts" &
  PIDS+=($!)
  wait_port $OTLP_PORT
fi
start() { # name binary port → pid on stdout
  local auth="" traces=""
  case "${AUTH:-}" in *"$1"*) auth=$(printf '[auth]\nkeys_file = "%s"\n' "$RUN_DIR/keys-$1.toml") ;; esac
  case "${TRACING:-}" in *"$1"*) traces=$(printf '[tracing]\notlp_endpoint = "http://127.0.0.1:%s/v1/traces"\nsample_ratio = 1.0\n%b\n' $OTLP_PORT "${TRACING_KEYS:-}") ;; esac
  local up_var="UPSTREAM_${1^^}"
  { server_table "$3"; echo "$auth"; echo "$traces"; origin_route | awk -v extra="${!up_var:-}" '{ print } /^servers = / && extra != "" { print extra }'; [ -z "${CACHE:-}" ] || printf '[route.cache]\nmode = "force"\nttl = "1h"\n'; } >"$RUN_DIR/$1.toml"
  "$2" check --config "$RUN_DIR/$1.toml" >/dev/null
  if [ -n "$auth" ]; then "$2" keys add bench --config "$RUN_DIR/$1.toml" 2>/dev/null >"$RUN_DIR/key-$1"; fi
  taskset -c "$SERVER_CPU" "$2" --config "$RUN_DIR/$1.toml" >"$RUN_DIR/$1.log" 2>&1 &
  echo $!
}
if [ -n "${POST_BODY:-}" ]; then
  python3 - "$POST_BODY" >"$RUN_DIR/post.lua" <<'LUA'
import json, sys
body = open(sys.argv[1]).read()
print('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = ' + json.dumps(body))
LUA
fi
PID_A=$(start a "$BIN_A" $PORT_A); PIDS+=("$PID_A")
PID_B=$(start b "$BIN_B" $PORT_B); PIDS+=("$PID_B")
wait_port $PORT_A; wait_port $PORT_B

# user and system clock ticks of one process: "utime stime"
ticks() { local f; f=$(cat "/proc/$1/stat"); f=${f##*) }; set -- $f; echo "${12} ${13}"; }
hz=$(getconf CLK_TCK)
RESULTS="$RUN_DIR/results.tsv"
printf "round\tbin\trps\tuser_us\tsys_us\n" >"$RESULTS"
order=(a b)
for round in $(seq 1 "$ROUNDS"); do
  for w in "${order[@]}"; do
    if [ "$w" = a ]; then pid=$PID_A port=$PORT_A; else pid=$PID_B port=$PORT_B; fi
    url="http://127.0.0.1:$port$PATHQ"
    key=$(cat "$RUN_DIR/key-$w" 2>/dev/null || echo none)
    hdr=(-H "Authorization: Bearer $key")
    if [ -n "${POST_BODY:-}" ]; then hdr+=(-s "$RUN_DIR/post.lua"); fi
    taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNS" -d2s "${hdr[@]}" "$url" >/dev/null 2>&1
    read -r u0 s0 < <(ticks "$pid")
    taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" "${hdr[@]}" "$url" >"$RUN_DIR/$round-$w.txt" 2>&1
    read -r u1 s1 < <(ticks "$pid")
    reqs=$(awk '/requests in/{print $1}' "$RUN_DIR/$round-$w.txt")
    rps=$(awk '/^Requests\/sec/{print $2}' "$RUN_DIR/$round-$w.txt")
    if grep -q "Non-2xx\|Socket errors" "$RUN_DIR/$round-$w.txt"; then
      echo "  warning: $w: $(grep -h "Non-2xx\|Socket errors" "$RUN_DIR/$round-$w.txt")" >&2
    fi
    read -r uu su < <(awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$hz" -v n="$reqs" 'BEGIN{printf "%.2f %.2f\n", u/hz*1e6/n, s/hz*1e6/n}')
    printf "%s\t%s\t%s\t%s\t%s\n" "$round" "$w" "$rps" "$uu" "$su" >>"$RESULTS"
    printf "  round %s %s %10s req/s  user %5s sys %5s µs/req\n" "$round" "$w" "$rps" "$uu" "$su"
  done
  order=("${order[1]}" "${order[0]}")
done

{
  echo "# A/B of two Hyperion binaries, $([ -n "${CACHE:-}" ] && echo "cache hits of" || echo "pass-through") GET $PATHQ — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "# command: benches/load/ab.sh A B (ROUNDS=$ROUNDS DURATION=${DURATION}s CONNS=$CONNS AUTH=${AUTH:-} TRACING=${TRACING:-} UPSTREAM_A=${UPSTREAM_A:-} UPSTREAM_B=${UPSTREAM_B:-} POST_BODY=${POST_BODY:-})"
  echo "# A: $BIN_A ($(sha256sum "$BIN_A" | cut -c1-12))"
  echo "# B: $BIN_B ($(sha256sum "$BIN_B" | cut -c1-12))"
  echo "# machine: $(nproc) cores; proxies and origin on CPU $SERVER_CPU, wrk on CPU $CLIENT_CPU; medians [min..max]"
  echo
  awk -F'\t' "$AWK_STATS"'
    NR>1 { rps[$2]=rps[$2]" "$3; u[$2]=u[$2]" "$4; s[$2]=s[$2]" "$5; r[$1,$2]=$3; uu[$1,$2]=$4; if ($1>n) n=$1 }
    END {
      for (k in rps) printf "%s %10.0f req/s [%6.0f..%6.0f]  user %5.2f  sys %5.2f µs/req\n", k, med(rps[k]), mn(rps[k]), mx(rps[k]), med(u[k]), med(s[k])
      for (i=1;i<=n;i++) { ratio=ratio" "r[i,"b"]/r[i,"a"]; du=du" "uu[i,"b"]-uu[i,"a"] }
      printf "  → B/A throughput %.3f× (medians); per round %.3f× [%.3f..%.3f]; user µs/request %+.2f (per round %+.2f)\n", med(rps["b"])/med(rps["a"]), med(ratio), mn(ratio), mx(ratio), med(u["b"])-med(u["a"]), med(du)
    }' "$RESULTS"
} | tee "$OUT"
echo "report: $OUT"
