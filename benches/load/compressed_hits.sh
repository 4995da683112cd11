#!/usr/bin/env bash
# =============================================================================
# compressed_hits.sh — cache hits served as identity, gzip and br, side by
# side in one run: if a hit ever ran a compressor, the gzip and br rows would
# fall far behind identity (compressing 16 KB at gzip 6 costs ~200 µs; a hit
# costs ~10). For reference, nginx serving the same hits from proxy_cache
# with `gzip on` (it compresses on every hit) is measured too.
#
# Layout (2 cores): the origin, Hyperion and nginx share SERVER_CPU (0); wrk
# runs alone on CLIENT_CPU (1). Every round measures every row, in rotating
# order; the report gives medians over rounds.
# Requests (cache warm; the origin sees none after the warm-up):
#   gen   POST /api/generate, ~1 KB Ollama-shaped JSON, cached by body (force)
#   16k   GET /static/16k, 16 KB of text (RFC 9111 origin mode)
# each with Accept-Encoding: none (identity), gzip, br.
#
# Usage: benches/load/compressed_hits.sh      (ROUNDS=3, ~4 min on a quiet machine)
# Knobs: ROUNDS DURATION CONNS SERVER_CPU CLIENT_CPU SHARED OUT
# Needs: wrk, nginx, taskset, curl (apt-get install -y wrk nginx util-linux curl)
#        and ../shared/bench/origin (built here if missing).
# Output: a dated report in benches/runs/. Every process is started here, on
# loopback ports 27280-27290, and stopped on exit.
# =============================================================================
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
: "${ROUNDS:=3}" "${DURATION:=8}" "${CONNS:=64}"
: "${SERVER_CPU:=0}" "${CLIENT_CPU:=1}"
: "${SHARED:=$REPO/../shared}"
: "${RUN_DIR:=/tmp/hyperion-compressed-hits}"
: "${OUT:=$REPO/benches/runs/$(date +%Y-%m-%d)-compressed-hits.txt}"
ORIGIN_PORT=27280 NGINX_PORT=27281 HYPERION_PORT=27290

SCRIPT=compressed_hits.sh
# shellcheck source=benches/load/common.sh
source "$REPO/benches/load/common.sh"
mkdir -p "$RUN_DIR/nginx/cache"

start_hyperion <<EOF
[upstreams.origin]
servers = [{ url = "http://127.0.0.1:$ORIGIN_PORT" }]

[[route]]
name = "generate"
match = { methods = ["POST"], paths = ["/api/generate"] }
upstream = "origin"

[route.cache]
mode = "force"
ttl = "1h"
body_key = "json"
scope = "shared"

[[route]]
name = "static"
match = { methods = ["GET", "HEAD"], path_prefix = "/static/" }
upstream = "origin"

[route.cache]
mode = "origin"
scope = "shared"

[compression]
algorithms = ["br", "gzip"]
min_size = "256B"
content_types = ["application/json", "application/octet-stream"]
EOF

# nginx: the same hits from proxy_cache, compressed by its gzip filter (it
# has no brotli in Debian's build; its br rows are left out).
{ nginx_preamble; cat <<EOF; } >"$RUN_DIR/nginx/nginx.conf"
  proxy_cache_path $RUN_DIR/nginx/cache keys_zone=hits:10m max_size=256m inactive=1h;
  upstream origin { server 127.0.0.1:$ORIGIN_PORT; keepalive 64; }
  gzip on;
  gzip_comp_level 6;
  gzip_min_length 256;
  gzip_proxied any;
  gzip_vary on;
  gzip_types application/json application/octet-stream;
  server {
    listen 127.0.0.1:$NGINX_PORT backlog=4096;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Accept-Encoding "";
      proxy_cache hits;
      proxy_cache_methods GET HEAD POST;
      proxy_cache_key "\$request_method\$request_uri\$request_body";
      proxy_cache_valid 200 1h;
      add_header X-Cache \$upstream_cache_status;
    }
  }
}
EOF
taskset -c "$SERVER_CPU" nginx -e "$RUN_DIR/nginx/error.log" -p "$RUN_DIR/nginx/" -c "$RUN_DIR/nginx/nginx.conf" >"$RUN_DIR/nginx.log" 2>&1 &
PIDS+=($!); NGINX_PID=$!
wait_port $NGINX_PORT

PROMPT='{"model":"llama3.2","prompt":"why is the sky blue?","stream":false}'
for coding in identity gzip br; do
  cat >"$RUN_DIR/gen-$coding.lua" <<EOF
wrk.method = "POST"
wrk.body = '$PROMPT'
wrk.headers["Content-Type"] = "application/json"
$([ "$coding" = identity ] || echo "wrk.headers[\"Accept-Encoding\"] = \"$coding\"")
EOF
  cat >"$RUN_DIR/16k-$coding.lua" <<EOF
$([ "$coding" = identity ] || echo "wrk.headers[\"Accept-Encoding\"] = \"$coding\"")
EOF
done

# Warm both caches, and check what a hit looks like.
for port in $HYPERION_PORT $NGINX_PORT; do
  for _ in 1 2 3; do
    curl -s -o /dev/null -X POST -H 'Content-Type: application/json' -d "$PROMPT" "http://127.0.0.1:$port/api/generate"
    curl -s -o /dev/null "http://127.0.0.1:$port/static/16k"
  done
done
for coding in gzip br; do
  curl -s -D - -o /dev/null -H "Accept-Encoding: $coding" -X POST -H 'Content-Type: application/json' \
    -d "$PROMPT" "http://127.0.0.1:$HYPERION_PORT/api/generate" | tr -d '\r' | grep -qi "^content-encoding: $coding" \
    || die "hyperion does not answer $coding"
done

# Requests that reached the origin for the two measured URLs.
count() { curl -s "http://127.0.0.1:$ORIGIN_PORT/_count" | sed -E 's/.*"static_16k":([0-9]+).*"generate":([0-9]+).*/\1 \2/' | awk '{print $1 + $2}'; }

RESULTS="$RUN_DIR/results.tsv"
printf "round\ttarget\treq\tcoding\trps\tp50_us\tcpu_us_per_req\tbytes_per_resp\n" >"$RESULTS"
hz=$(getconf CLK_TCK)
run() { # round target req coding
  local round=$1 target=$2 req=$3 coding=$4 port pid url log
  case $target in hyperion) port=$HYPERION_PORT pid=$HYPERION_PID;; nginx) port=$NGINX_PORT pid=$NGINX_PID;; esac
  url="http://127.0.0.1:$port$([ "$req" = gen ] && echo /api/generate || echo /static/16k)"
  log="$RUN_DIR/$round-$target-$req-$coding.txt"
  taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNS" -d2s -s "$RUN_DIR/$req-$coding.lua" "$url" >/dev/null 2>&1   # warm-up
  local t0 t1 c0 c1
  c0=$(count); t0=$(tree_ticks "$pid")
  taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -s "$RUN_DIR/$req-$coding.lua" "$url" >"$log" 2>&1
  t1=$(tree_ticks "$pid"); c1=$(count)
  local reqs rps p50 errors cpu_us bytes
  reqs=$(awk '/requests in/{print $1}' "$log")
  rps=$(awk '/^Requests\/sec/{print $2}' "$log")
  p50=$(awk '$1=="50%"{print $2}' "$log" | to_us)
  errors=$(awk '/Non-2xx|Socket errors/{print}' "$log")
  [ -z "$errors" ] || echo "  warning: $target $req $coding: $errors" >&2
  [ "$c0" = "$c1" ] || echo "  warning: $target $req $coding: the origin saw $((c1 - c0)) requests (not all hits)" >&2
  cpu_us=$(awk -v c="$(( t1 - t0 ))" -v hz="$hz" -v n="$reqs" 'BEGIN{printf "%.1f", c/hz*1e6/n}')
  bytes=$(awk '/requests in/{v=$5; u=v; sub(/[0-9.]+/,"",u); sub(/[A-Za-z]+$/,"",v); m=(u=="KB")?1024:(u=="MB")?1048576:(u=="GB")?1073741824:1; printf "%.0f", v*m/$1}' "$log")
  printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$round" "$target" "$req" "$coding" "$rps" "$p50" "$cpu_us" "$bytes" >>"$RESULTS"
  printf "  round %s %-8s %-4s %-8s %10s req/s  p50 %7s µs  cpu %6s µs/req  %6s B/resp\n" "$round" "$target" "$req" "$coding" "$rps" "$p50" "$cpu_us" "$bytes"
}

rows=("hyperion identity" "hyperion gzip" "hyperion br" "nginx identity" "nginx gzip")
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round/$ROUNDS"
  for req in gen 16k; do
    for row in "${rows[@]}"; do set -- $row; run "$round" "$1" "$req" "$2"; done
  done
  rows=("${rows[@]:1}" "${rows[0]}")   # rotate the order
done

{
  echo "# Cache hits as identity, gzip and br — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "# command: benches/load/compressed_hits.sh (ROUNDS=$ROUNDS DURATION=${DURATION}s CONNS=$CONNS)"
  echo "# machine: $(nproc) cores, $(awk -F: '/model name/{print $2; exit}' /proc/cpuinfo | sed 's/^ *//'); $(nginx -v 2>&1); hyperion $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)"
  echo "# server CPU $SERVER_CPU, wrk on CPU $CLIENT_CPU; medians over $ROUNDS rounds [min..max]; cpu: the server process alone"
  echo "# gen: POST /api/generate (~1 KB JSON, body-keyed); 16k: GET /static/16k; hyperion gzip 6 / br 5 copies kept per entry, nginx gzip 6 on every hit"
  echo
  awk -F'\t' "$AWK_STATS"'
    NR>1 { k=$3" "$2" "$4; rps[k]=rps[k]" "$5; p50[k]=p50[k]" "$6; cpu[k]=cpu[k]" "$7; by[k]=$8; keys[k]=1 }
    END {
      printf "%-4s %-9s %-9s %26s %8s %12s %8s %12s\n", "req", "target", "coding", "req/s", "p50 µs", "cpu µs/req", "B/resp", "vs identity"
      split("gen 16k", reqs, " "); split("hyperion nginx", ts, " "); split("identity gzip br", cs, " ")
      for (r=1;r<=2;r++) for (t=1;t<=2;t++) for (c=1;c<=3;c++) {
        k=reqs[r]" "ts[t]" "cs[c]; if(!(k in keys)) continue
        base=med(rps[reqs[r]" "ts[t]" identity"])
        printf "%-4s %-9s %-9s %10.0f [%6.0f..%6.0f] %8.0f %12.1f %8s %11.3f\n", reqs[r], ts[t], cs[c],
          med(rps[k]), mn(rps[k]), mx(rps[k]), med(p50[k]), med(cpu[k]), by[k], med(rps[k])/base }
    }' "$RESULTS"
} | tee "$OUT"
echo "compressed_hits.sh: report in $OUT (raw wrk logs in $RUN_DIR)"
