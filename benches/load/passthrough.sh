#!/usr/bin/env bash
# =============================================================================
# passthrough.sh — Hyperion's pass-through path against the bare upstream and
# against nginx doing the same pass-through, measured side by side in one run.
#
# Layout (2 cores): the origin and the proxy under test share SERVER_CPU (0);
# wrk runs alone on CLIENT_CPU (1). Each target is measured in every round, in
# rotating order, and the summary gives medians over rounds.
#   origin    wrk → bench-origin directly (the floor: a bare hyper server)
#   nginx     wrk → nginx (proxy_pass, keep-alive upstream, worker_processes 1,
#             access_log off, proxy_buffering off, and the forwarding headers
#             Hyperion adds: X-Forwarded-For/-Proto/-Host, Via, X-Request-Id
#             both ways) → origin
#   floor     wrk → hyper-floor (benches/load/hyper-floor: hyper's server and
#             client state machines polled by one task, request and answer
#             untouched, no timeouts, logs or metrics) → origin. Not a proxy to
#             run: the least a hyper 1 proxy can spend, so the report tells how
#             much of Hyperion's cost is hyper's and how much its own.
#   hyperion  wrk → hyperion (access_log off, one tokio worker) → origin
#   bolt      with BOLT_BIN=target/bolt/hyperion (benches/load/bolt.sh): the
#             same proxy, its code laid out by BOLT, on its own port
# Requests: GET /static/1k and POST /api/generate (origin delay 0, ~1 KB answer).
#   tput  wrk -t1 -c$CONNS -d$DURATION       throughput, and server CPU µs/request
#   lat   wrk -t1 -c1 -d$LAT_DURATION        unloaded round trip, p50
#
# Usage: benches/load/passthrough.sh          (ROUNDS=3, ~8 min on a quiet machine)
# Knobs: ROUNDS DURATION LAT_DURATION CONNS SERVER_CPU CLIENT_CPU SHARED OUT
#        MODES ("tput lat"; "tput" skips the latency runs: more, shorter
#        rounds in the same time on a busy host)
#        HYPERION_BIN (measure that binary as hyperion) BOLT_BIN (add the bolt row)
# Needs: wrk, nginx, taskset, curl (apt-get install -y wrk nginx util-linux curl)
#        and ../shared/bench/origin (built here if missing).
# Output: a dated report in benches/runs/ (and the raw wrk logs in $RUN_DIR).
# Every process is started here, on loopback ports 27180-27190, and stopped on exit.
# =============================================================================
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
: "${ROUNDS:=3}" "${DURATION:=10}" "${LAT_DURATION:=5}" "${CONNS:=64}" "${MODES:=tput lat}"
: "${SERVER_CPU:=0}" "${CLIENT_CPU:=1}"
: "${SHARED:=$REPO/../shared}"
: "${RUN_DIR:=/tmp/hyperion-passthrough}"
: "${OUT:=$REPO/benches/runs/$(date +%Y-%m-%d)-passthrough.txt}"
ORIGIN_PORT=27180 NGINX_PORT=27181 FLOOR_PORT=27182 HYPERION_PORT=27190 BOLT_PORT=27191

SCRIPT=passthrough.sh
# shellcheck source=benches/load/common.sh
source "$REPO/benches/load/common.sh"

write_nginx_passthrough "$NGINX_PORT"
taskset -c "$SERVER_CPU" nginx -e "$RUN_DIR/nginx/error.log" -p "$RUN_DIR/nginx/" -c "$RUN_DIR/nginx/nginx.conf" >"$RUN_DIR/nginx.log" 2>&1 &
PIDS+=($!); NGINX_PID=$!
wait_port $NGINX_PORT

(cd "$REPO/benches/load/hyper-floor" && cargo build --release --quiet)
taskset -c "$SERVER_CPU" "$REPO/benches/load/hyper-floor/target/release/hyper-floor" \
  "127.0.0.1:$FLOOR_PORT" "127.0.0.1:$ORIGIN_PORT" >"$RUN_DIR/floor.log" 2>&1 &
PIDS+=($!); FLOOR_PID=$!
wait_port $FLOOR_PORT

# Not `origin_route | start_hyperion`: a pipeline's subshell would keep its PIDS.
start_hyperion < <(origin_route)
targets=(origin nginx floor hyperion)
if [ -n "${BOLT_BIN:-}" ]; then
  [ -x "$BOLT_BIN" ] || die "BOLT_BIN=$BOLT_BIN is not an executable (benches/load/bolt.sh builds it)"
  start_proxy bolt "$BOLT_BIN" "$BOLT_PORT" < <(origin_route)
  BOLT_PID=$STARTED_PID
  targets+=(bolt)
fi

cat >"$RUN_DIR/post.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"model":"llama3.2","prompt":"why is the sky blue?","stream":false}'
wrk.headers["Content-Type"] = "application/json"
EOF


pid_of() { case $1 in origin) echo "$ORIGIN_PID";; nginx) echo "$NGINX_PID";; floor) echo "$FLOOR_PID";; hyperion) echo "$HYPERION_PID";; bolt) echo "$BOLT_PID";; esac; }
port_of() { case $1 in origin) echo $ORIGIN_PORT;; nginx) echo $NGINX_PORT;; floor) echo $FLOOR_PORT;; hyperion) echo $HYPERION_PORT;; bolt) echo $BOLT_PORT;; esac; }

RESULTS="$RUN_DIR/results.tsv"
printf "round\ttarget\treq\tmode\trps\tp50_us\tcpu_us_per_req\n" >"$RESULTS"
hz=$(getconf CLK_TCK)
run() { # round target req mode
  local round=$1 target=$2 req=$3 mode=$4 url script=() conns dur log
  url="http://127.0.0.1:$(port_of "$target")$([ "$req" = get1k ] && echo /static/1k || echo /api/generate)"
  [ "$req" = post ] && script=(-s "$RUN_DIR/post.lua")
  if [ "$mode" = tput ]; then conns=$CONNS dur=$DURATION; else conns=1 dur=$LAT_DURATION; fi
  log="$RUN_DIR/$round-$target-$req-$mode.txt"
  taskset -c "$CLIENT_CPU" wrk -t1 -c"$conns" -d2s "${script[@]}" "$url" >/dev/null 2>&1   # warm-up
  local t0 o0 t1 o1
  t0=$(tree_ticks "$(pid_of "$target")"); o0=$(tree_ticks "$ORIGIN_PID")
  taskset -c "$CLIENT_CPU" wrk -t1 -c"$conns" -d"${dur}s" --latency "${script[@]}" "$url" >"$log" 2>&1
  t1=$(tree_ticks "$(pid_of "$target")"); o1=$(tree_ticks "$ORIGIN_PID")
  local reqs rps p50 errors cpu
  reqs=$(awk '/requests in/{print $1}' "$log")
  rps=$(awk '/^Requests\/sec/{print $2}' "$log")
  p50=$(awk '$1=="50%"{print $2}' "$log" | to_us)
  errors=$(awk '/Non-2xx|Socket errors/{print}' "$log")
  [ -z "$errors" ] || echo "  warning: $target $req $mode: $errors" >&2
  # Server CPU per request: the proxy and the origin behind it (both on SERVER_CPU);
  # for the origin row that is the origin alone.
  if [ "$target" = origin ]; then cpu=$(( t1 - t0 )); else cpu=$(( t1 - t0 + o1 - o0 )); fi
  local cpu_us
  cpu_us=$(awk -v c="$cpu" -v hz="$hz" -v n="$reqs" 'BEGIN{printf "%.1f", c/hz*1e6/n}')
  printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$round" "$target" "$req" "$mode" "$rps" "$p50" "$cpu_us" >>"$RESULTS"
  printf "  round %s %-8s %-6s %-4s %10s req/s  p50 %7s µs  cpu %6s µs/req\n" "$round" "$target" "$req" "$mode" "$rps" "$p50" "$cpu_us"
}

for round in $(seq 1 "$ROUNDS"); do
  echo "round $round/$ROUNDS"
  for req in get1k post; do
    for mode in $MODES; do
      for t in "${targets[@]}"; do run "$round" "$t" "$req" "$mode"; done
    done
  done
  targets=("${targets[@]:1}" "${targets[0]}")   # rotate the order
done

{
  echo "# Hyperion pass-through vs nginx vs hyper-floor vs bare origin — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "# command: benches/load/passthrough.sh (ROUNDS=$ROUNDS DURATION=${DURATION}s CONNS=$CONNS LAT_DURATION=${LAT_DURATION}s MODES=\"$MODES\")"
  echo "# machine: $(nproc) cores, $(awk -F: '/model name/{print $2; exit}' /proc/cpuinfo | sed 's/^ *//'); $(nginx -v 2>&1); hyperion $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null) ($HYPERION${BOLT_BIN:+; bolt: $(realpath "$BOLT_BIN")})"
  echo "# server CPU $SERVER_CPU (origin + proxy), wrk on CPU $CLIENT_CPU; medians over $ROUNDS rounds [min..max]"
  echo "# cpu µs/req counts the proxy and the origin behind it (the origin row: the origin alone)"
  echo
  awk -F'\t' "$AWK_STATS"'
    NR>1 { k=$3" "$4" "$2; rps[k]=rps[k]" "$5; p50[k]=p50[k]" "$6; cpu[k]=cpu[k]" "$7; keys[k]=1
           byround[k" "$1]=$5; if ($1+0>rounds) rounds=$1+0 }
    END {
      printf "%-8s %-4s %-9s %26s %22s %12s\n", "request", "mode", "target", "req/s", "p50 µs", "cpu µs/req"
      split("get1k post", reqs, " "); split("tput lat", modes, " "); split("origin nginx floor hyperion bolt", ts, " ")
      for (r=1;r<=2;r++) for (m=1;m<=2;m++) {
        if (!((reqs[r]" "modes[m]" nginx") in keys)) continue   # a mode left out (MODES)
        for (t=1;t<=5;t++) { k=reqs[r]" "modes[m]" "ts[t]; if(!(k in keys)) continue
          printf "%-8s %-4s %-9s %10.0f [%6.0f..%6.0f] %8.0f [%4.0f..%4.0f] %12.1f\n", reqs[r], modes[m], ts[t],
            med(rps[k]), mn(rps[k]), mx(rps[k]), med(p50[k]), mn(p50[k]), mx(p50[k]), med(cpu[k]) }
        o=reqs[r]" "modes[m]" origin"; n=reqs[r]" "modes[m]" nginx"; h=reqs[r]" "modes[m]" hyperion"; f=reqs[r]" "modes[m]" floor"; b=reqs[r]" "modes[m]" bolt"
        if (modes[m]=="tput") printf "  → hyperion/nginx throughput %.2f×, floor/nginx %.2f×, hyperion/floor %.2f×, hyperion/origin %.2f×; cpu µs/req hyperion %.1f, floor %.1f, nginx %.1f\n",
            med(rps[h])/med(rps[n]), med(rps[f])/med(rps[n]), med(rps[h])/med(rps[f]), med(rps[h])/med(rps[o]), med(cpu[h]), med(cpu[f]), med(cpu[n])
        # Each round measures every target within a minute or so: the ratio
        # within a round is steadier than the ratio of medians on a busy host.
        if (modes[m]=="tput") { hn=""; fn=""
          for (i=1;i<=rounds;i++) if ((h" "i in byround) && (n" "i in byround) && byround[n" "i]>0) {
            hn=hn" "byround[h" "i]/byround[n" "i]; fn=fn" "byround[f" "i]/byround[n" "i] }
          if (hn!="") printf "  → per round: hyperion/nginx %.2f× [%.2f..%.2f], floor/nginx %.2f× [%.2f..%.2f]\n", med(hn), mn(hn), mx(hn), med(fn), mn(fn), mx(fn)
          if (b in keys) { bn=""; bh=""
            for (i=1;i<=rounds;i++) if ((b" "i in byround) && (n" "i in byround) && byround[n" "i]>0) {
              bn=bn" "byround[b" "i]/byround[n" "i]; bh=bh" "byround[b" "i]/byround[h" "i] }
            printf "  → bolt/nginx throughput %.2f× (per round %.2f× [%.2f..%.2f]), bolt/hyperion per round %.2f× [%.2f..%.2f]; cpu µs/req bolt %.1f\n",
              med(rps[b])/med(rps[n]), med(bn), mn(bn), mx(bn), med(bh), mn(bh), mx(bh), med(cpu[b]) } }
        else { printf "  → added p50 latency over the bare origin: hyperion %+.0f µs, floor %+.0f µs, nginx %+.0f µs", med(p50[h])-med(p50[o]), med(p50[f])-med(p50[o]), med(p50[n])-med(p50[o])
          if (b in keys) printf ", bolt %+.0f µs", med(p50[b])-med(p50[o])
          printf "\n" }
      }
    }' "$RESULTS"
} | tee "$OUT"
echo "report: $OUT"
