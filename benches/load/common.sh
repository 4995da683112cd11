# shellcheck shell=bash
# =============================================================================
# common.sh — what the side-by-side load scripts (passthrough.sh,
# compressed_hits.sh, limited_hits.sh, pool_passthrough.sh, instructions.sh)
# share: checks,
# the release builds, the bench origin and Hyperion on SERVER_CPU, process
# cleanup, the
# readings of wrk and /proc, and two routes measured round by round.
#
# Sourced after the script has set SCRIPT (its name, for messages), SHARED,
# RUN_DIR, OUT, SERVER_CPU and ORIGIN_PORT, and NEEDS if it needs other
# tools than wrk, nginx, taskset and curl ("tool:debian-package ..."). Leaves
# HYPERION, ORIGIN and ORIGIN_PID set, RUN_DIR/nginx created, and every
# started process (PIDS) stopped on exit.
# =============================================================================

die() { echo "$SCRIPT: $*" >&2; exit 1; }
: "${NEEDS:=wrk:wrk nginx:nginx taskset:util-linux curl:curl}"
for need in $NEEDS; do
  command -v "${need%%:*}" >/dev/null || die "${need%%:*} is missing — apt-get install -y ${need#*:}"
done
[ -d "$SHARED/bench/origin" ] || die "no bench origin at $SHARED/bench/origin (set SHARED=)"

rm -rf "$RUN_DIR"; mkdir -p "$RUN_DIR/nginx" "$(dirname "$OUT")"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# HYPERION_BIN: another Hyperion binary to measure (e.g. target/bolt/hyperion
# from bolt.sh) instead of building target/release/hyperion.
if [ -n "${HYPERION_BIN:-}" ]; then
  HYPERION=$(realpath "$HYPERION_BIN")
  [ -x "$HYPERION" ] || die "HYPERION_BIN=$HYPERION_BIN is not an executable"
  echo "building bench-origin (release)…"
else
  echo "building hyperion and bench-origin (release)…"
  (cd "$REPO" && cargo build --release --quiet)
  HYPERION="$REPO/target/release/hyperion"
fi
(cd "$SHARED/bench/origin" && cargo build --release --quiet)
ORIGIN="$SHARED/bench/origin/target/release/bench-origin"

wait_port() {
  for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$1/_count" && return 0; sleep 0.1; done
  die "nothing answers on port $1"
}

taskset -c "$SERVER_CPU" "$ORIGIN" --listen "127.0.0.1:$ORIGIN_PORT" --threads 1 >"$RUN_DIR/origin.log" 2>&1 &
PIDS+=($!); ORIGIN_PID=$!
wait_port "$ORIGIN_PORT"
curl -s "http://127.0.0.1:$ORIGIN_PORT/_delay?ms=0" >/dev/null

# The start of every nginx.conf the load scripts write, up to inside its
# http block: one worker, in the foreground, files under RUN_DIR/nginx, no
# access log, long keep-alive. $1 non-empty: one process, no master (to run
# under valgrind).
nginx_preamble() {
  cat <<EOF
worker_processes 1;
daemon off;${1:+
master_process off;}
pid $RUN_DIR/nginx/nginx.pid;
error_log $RUN_DIR/nginx/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_timeout 65s;
  keepalive_requests 1000000;
  client_body_temp_path $RUN_DIR/nginx/body;
  proxy_temp_path $RUN_DIR/nginx/proxy;
  fastcgi_temp_path $RUN_DIR/nginx/fastcgi;
  uwsgi_temp_path $RUN_DIR/nginx/uwsgi;
  scgi_temp_path $RUN_DIR/nginx/scgi;
EOF
}

# Writes RUN_DIR/nginx/nginx.conf: nginx as the pass-through to compare with,
# listening on port $1, to the origin on ORIGIN_PORT, adding the headers
# Hyperion adds by default. $2 non-empty: one process (see nginx_preamble).
write_nginx_passthrough() {
  { nginx_preamble "${2:-}"; cat <<EOF; } >"$RUN_DIR/nginx/nginx.conf"
  upstream origin { server 127.0.0.1:$ORIGIN_PORT; keepalive 64; keepalive_requests 1000000; }
  # The same headers Hyperion adds by default: a request id (kept from the
  # client or made up) both ways, X-Forwarded-*, and Via.
  map \$http_x_request_id \$rid { "" \$request_id; default \$http_x_request_id; }
  server {
    listen 127.0.0.1:$1 backlog=4096;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Forwarded-Host \$host;
      proxy_set_header Via "1.1 nginx";
      proxy_set_header X-Request-Id \$rid;
      add_header X-Request-Id \$rid always;
      proxy_buffering off;
      proxy_request_buffering off;
    }
  }
}
EOF
}

# The [server] table of a measured Hyperion: 127.0.0.1:$1, access log off.
server_table() {
  printf '[server]\nlisten = ["127.0.0.1:%s"]\naccess_log = "off"\n' "$1"
}

# The pass-through policy's routing (passthrough.sh, ab.sh, instructions.sh):
# every request to the origin.
origin_route() {
  cat <<EOF
[upstreams.origin]
servers = [{ url = "http://127.0.0.1:$ORIGIN_PORT" }]
[[route]]
name = "all"
upstream = "origin"
EOF
}

# Starts a Hyperion binary (NAME BIN PORT) on SERVER_CPU with the policy on
# stdin after a [server] table of its own (PORT, access log off), checked
# first so a bad policy is its own error; sets STARTED_PID once it answers.
start_proxy() {
  { server_table "$3"; cat; } >"$RUN_DIR/$1.toml"
  "$2" check --config "$RUN_DIR/$1.toml" >/dev/null
  taskset -c "$SERVER_CPU" "$2" --config "$RUN_DIR/$1.toml" >"$RUN_DIR/$1.log" 2>&1 &
  PIDS+=($!); STARTED_PID=$!
  wait_port "$3"
}

# start_proxy for HYPERION on HYPERION_PORT; sets HYPERION_PID.
start_hyperion() {
  start_proxy hyperion "$HYPERION" "$HYPERION_PORT"
  HYPERION_PID=$STARTED_PID
}

# utime+stime clock ticks of a process and its children (nginx's worker).
tree_ticks() {
  local s=0 f p
  for p in "$1" $(ps -o pid= --ppid "$1" 2>/dev/null); do
    f=$(cat "/proc/$p/stat" 2>/dev/null) || continue
    f=${f##*) }; set -- $f; s=$(( s + ${12} + ${13} ))
  done
  echo $s
}

# wrk latency percentile → microseconds
to_us() { awk '{v=$1; if (v ~ /us$/) {sub(/us$/,"",v); print v+0} else if (v ~ /ms$/) {sub(/ms$/,"",v); print v*1000} else if (v ~ /s$/) {sub(/s$/,"",v); print v*1000000} else print v}'; }

# awk functions over space-separated samples: median, min, max.
# shellcheck disable=SC2016
AWK_STATS='
  function med(s,   a,n,i,j,t){ n=split(s,a," "); for(i=1;i<=n;i++)for(j=i+1;j<=n;j++)if(a[j]+0<a[i]+0){t=a[i];a[i]=a[j];a[j]=t}
    if(n%2) return a[(n+1)/2]; return (a[n/2]+a[n/2+1])/2 }
  function mn(s,  a,n,i,m){ n=split(s,a," "); m=a[1]; for(i=2;i<=n;i++) if(a[i]+0<m+0) m=a[i]; return m }
  function mx(s,  a,n,i,m){ n=split(s,a," "); m=a[1]; for(i=2;i<=n;i++) if(a[i]+0>m+0) m=a[i]; return m }'

# side_by_side BASE OTHER TITLE DETAIL [WRK_ARGS...]
# ROUNDS rounds, each measuring GET /static/1k through the route picked by
# Host BASE.test and the one picked by OTHER.test, back to back in rotating
# order (wrk -t1 -c$CONNS on CLIENT_CPU: 2 s warm-up, then DURATION), with
# Hyperion's CPU per request from /proc. Writes the report to OUT: medians,
# and the per-round OTHER/BASE ratio, the steadier reading on a noisy
# machine. Needs HYPERION_PID and HYPERION_PORT.
side_by_side() {
  local base=$1 other=$2 title=$3 detail=$4; shift 4
  local results="$RUN_DIR/results.tsv" hz round r log t0 t1 reqs rps cpu_us
  local url="http://127.0.0.1:$HYPERION_PORT/static/1k"
  local order=("$base" "$other")
  hz=$(getconf CLK_TCK)
  printf "round\troute\trps\tcpu_us\n" >"$results"
  for round in $(seq 1 "$ROUNDS"); do
    echo "round $round/$ROUNDS"
    for r in "${order[@]}"; do
      log="$RUN_DIR/$round-$r.txt"
      taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNS" -d2s "$@" -H "Host: $r.test" "$url" >/dev/null 2>&1
      t0=$(tree_ticks "$HYPERION_PID")
      taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" "$@" -H "Host: $r.test" "$url" >"$log" 2>&1
      t1=$(tree_ticks "$HYPERION_PID")
      reqs=$(awk '/requests in/{print $1}' "$log"); rps=$(awk '/^Requests\/sec/{print $2}' "$log")
      if grep -q "Non-2xx" "$log"; then echo "  warning: $r: $(grep Non-2xx "$log")" >&2; fi
      cpu_us=$(awk -v c="$(( t1 - t0 ))" -v hz="$hz" -v n="$reqs" 'BEGIN{printf "%.2f", c/hz*1e6/n}')
      printf "%s\t%s\t%s\t%s\n" "$round" "$r" "$rps" "$cpu_us" >>"$results"
      printf "  round %s %-8s %10s req/s  cpu %6s µs/req\n" "$round" "$r" "$rps" "$cpu_us"
    done
    order=("${order[1]}" "${order[0]}")
  done
  {
    echo "# $title — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# command: benches/load/$SCRIPT (ROUNDS=$ROUNDS DURATION=${DURATION}s CONNS=$CONNS)"
    echo "# machine: $(nproc) cores; hyperion $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null); Hyperion on CPU $SERVER_CPU, wrk on CPU $CLIENT_CPU"
    echo "# $detail; medians [min..max]"
    echo
    awk -F'\t' -v a="$base" -v b="$other" "$AWK_STATS"'
      NR>1 { rps[$2]=rps[$2]" "$3; cpu[$2]=cpu[$2]" "$4; r[$1,$2]=$3; c[$1,$2]=$4; if ($1>n) n=$1 }
      END {
        for (k in rps) printf "%-8s %10.0f req/s [%6.0f..%6.0f]  cpu %5.2f µs/req\n", k, med(rps[k]), mn(rps[k]), mx(rps[k]), med(cpu[k])
        for (i=1;i<=n;i++) { ratio=ratio" "r[i,b]/r[i,a]; extra=extra" "c[i,b]-c[i,a] }
        printf "  → %s/%s throughput %.3f× (medians); per round %.3f× [%.3f..%.3f]; cpu µs/request %+.2f (per round %+.2f)\n", b, a, med(rps[b])/med(rps[a]), med(ratio), mn(ratio), mx(ratio), med(cpu[b])-med(cpu[a]), med(extra)
      }' "$results"
  } | tee "$OUT"
  echo "report: $OUT"
}
