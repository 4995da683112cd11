#!/usr/bin/env bash
# =============================================================================
# instructions.sh — user-space instructions per pass-through request, counted
# by callgrind: the same figure run after run (within ~0.1%), where a wrk A/B
# on this shared VM moves by ±5%. For weighing a change to the request path
# too small to show in req/s; the real-time benchmarks stay the verdict.
#
# Each binary (default: target/release/hyperion, built here) runs under
# `valgrind --tool=callgrind` with one route to the bench origin; after a
# warm-up the counters are zeroed, `wrk -c8` sends GET /static/1k for SECS
# seconds, and the instructions of that window are divided by the requests
# the origin counted. hyper-floor (benches/load/hyper-floor) and nginx (the
# pass-through of passthrough.sh, one process) are measured as references
# unless FLOOR=0 or NGINX=0. The callgrind files are kept in RUN_DIR
# (callgrind_annotate reads them) to see where the instructions go.
#
# Usage: benches/load/instructions.sh [BIN ...]     (~20 s per binary)
# Knobs: SECS (5) CONNS (8) FLOOR (1) NGINX (1) CACHE_SIM (0) SHARED SERVER_CPU
#        CLIENT_CPU OUT. CACHE_SIM=1 adds callgrind's cache simulation (L1
#        32 KB, last level 1 MB as this EPYC's L2, 64-byte lines) and reports
#        L1 instruction and data misses and last-level misses per request:
#        the proxy's own accesses only, not the origin's or the kernel's.
# Needs: valgrind, wrk, curl, taskset, nginx (apt-get install -y valgrind wrk
#        curl util-linux nginx) and ../shared/bench/origin (built here if missing).
# Output: a dated report in benches/runs/ (and the callgrind files in $RUN_DIR).
# Every process is started here, on loopback ports 27680-27690, and stopped on exit.
# Counts include what instrumentation cannot see the cost of: an atomic
# operation or a cache miss counts as one instruction, a memcpy done with
# `rep movsb` as one per byte (so copies are reported apart as well).
# Compare binaries with each other, not with wall-clock figures.
# =============================================================================
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
: "${SECS:=5}" "${FLOOR:=1}" "${NGINX:=1}" "${CONNS:=8}" "${CACHE_SIM:=0}"
: "${SERVER_CPU:=0}" "${CLIENT_CPU:=1}"
: "${SHARED:=$REPO/../shared}"
: "${RUN_DIR:=/tmp/hyperion-instructions}"
: "${OUT:=$REPO/benches/runs/$(date +%Y-%m-%d)-instructions.txt}"
ORIGIN_PORT=27680 PROXY_PORT=27690

SCRIPT=instructions.sh
NEEDS="valgrind:valgrind callgrind_control:valgrind callgrind_annotate:valgrind wrk:wrk curl:curl taskset:util-linux"
# shellcheck source=benches/load/common.sh
source "$REPO/benches/load/common.sh"

SIM=()
[ "$CACHE_SIM" = 1 ] && SIM=(--cache-sim=yes --I1=32768,8,64 --D1=32768,8,64 --LL=1048576,16,64)

BINS=("$@")
[ ${#BINS[@]} -gt 0 ] || BINS=("$HYPERION")
if [ "$FLOOR" = 1 ]; then
  (cd "$REPO/benches/load/hyper-floor" && cargo build --release --quiet)
  BINS+=(floor)
fi
if [ "$NGINX" = 1 ]; then
  command -v nginx >/dev/null || die "nginx is missing — apt-get install -y nginx (or NGINX=0)"
  write_nginx_passthrough "$PROXY_PORT" one-process
  BINS+=(nginx)
fi

{ server_table "$PROXY_PORT"; origin_route; } >"$RUN_DIR/policy.toml"

URL="http://127.0.0.1:$PROXY_PORT/static/1k"
# Not a `{ …; } | tee` around the loop: that subshell's PIDS would escape cleanup.
{
  echo "# instructions per pass-through request (callgrind) — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "# command: benches/load/instructions.sh (SECS=$SECS CONNS=$CONNS CACHE_SIM=$CACHE_SIM) $*; hyperion $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null); GET /static/1k, wrk -t1 -c$CONNS"
} | tee "$OUT"
for bin in "${BINS[@]}"; do
  # Named by the binary's directory too: target/release/hyperion and
  # target/bolt/hyperion are both "hyperion".
  case $bin in floor|nginx) label=$bin;; *) label="$(basename "$(dirname "$bin")")/$(basename "$bin")";; esac
  out="$RUN_DIR/callgrind.${label//\//-}.$$"
  if [ "$bin" = floor ]; then
    cmd=("$REPO/benches/load/hyper-floor/target/release/hyper-floor" "127.0.0.1:$PROXY_PORT" "127.0.0.1:$ORIGIN_PORT")
  elif [ "$bin" = nginx ]; then
    cmd=(nginx -e "$RUN_DIR/nginx/error.log" -p "$RUN_DIR/nginx/" -c "$RUN_DIR/nginx/nginx.conf")
  else
    cmd=("$bin" --config "$RUN_DIR/policy.toml")
  fi
  taskset -c "$SERVER_CPU" valgrind --tool=callgrind --callgrind-out-file="$out" "${SIM[@]}" \
    "${cmd[@]}" >"$RUN_DIR/valgrind.log" 2>&1 &
  vg=$!; PIDS+=($vg)
  up=0
  for _ in $(seq 1 200); do curl -s -o /dev/null "$URL" && { up=1; break; }; sleep 0.2; done
  [ $up = 1 ] || die "$bin does not answer under valgrind (see $RUN_DIR/valgrind.log)"
  taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNS" -d2s "$URL" >/dev/null   # warm-up: connections, pools
  callgrind_control -z "$vg" >/dev/null 2>&1
  curl -s "http://127.0.0.1:$ORIGIN_PORT/_reset" >/dev/null
  taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNS" -d"${SECS}s" "$URL" >"$RUN_DIR/wrk.log"
  n=$(curl -s "http://127.0.0.1:$ORIGIN_PORT/_count" | sed 's/.*"total":\([0-9]*\).*/\1/')
  callgrind_control -d "$vg" >/dev/null 2>&1
  kill "$vg"; wait "$vg" 2>/dev/null || true
  dump=$(ls -t "$out".* 2>/dev/null | head -1)
  [ -n "$dump" ] && [ "$n" -gt 0 ] || die "no measurement for $bin"
  ir=$(callgrind_annotate "$dump" | awk '/PROGRAM TOTALS/{gsub(",","",$1); print $1}')
  # Copies on their own: rep movsb counts a byte as an instruction, which
  # weighs them far above what they cost a real CPU.
  copy=$(callgrind_annotate --threshold=100 "$dump" 2>/dev/null \
    | awk '/memmove-vec-unaligned-erms.S:__mem/ && !/=>/ && $1 ~ /^[0-9,]+$/ {gsub(",","",$1); s+=$1} END{print s+0}')
  printf "%-32s %7d requests  %7d instructions/request, %6d of them memcpy, %6d without\n" \
    "$label" "$n" $(( ir / n )) $(( copy / n )) $(( (ir - copy) / n )) | tee -a "$OUT"
  if [ "$CACHE_SIM" = 1 ]; then
    # Totals in callgrind's event order, each followed by its "(100.0%)":
    # Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw.
    callgrind_annotate "$dump" | awk -v n="$n" '/PROGRAM TOTALS/{for(i=1;i<=17;i+=2) gsub(",","",$i);
      printf "%-32s %7s           %7.0f L1i misses/request, %5.0f L1d, %5.0f last-level (i+d); %6.0f data accesses\n",
        "", "", $7/n, ($9+$11)/n, ($13+$15+$17)/n, ($3+$5)/n}' | tee -a "$OUT"
  fi
done
echo "report: $OUT"
