# shellcheck shell=bash
# =============================================================================
# common.sh — what the side-by-side load scripts (passthrough.sh,
# compressed_hits.sh) share: checks, the release builds, the bench origin on
# SERVER_CPU, process cleanup, and the readings of wrk and /proc.
#
# Sourced after the script has set SCRIPT (its name, for messages), SHARED,
# RUN_DIR, OUT, SERVER_CPU and ORIGIN_PORT. Leaves HYPERION, ORIGIN and
# ORIGIN_PID set, RUN_DIR/nginx created, and every started process (PIDS)
# stopped on exit.
# =============================================================================

die() { echo "$SCRIPT: $*" >&2; exit 1; }
for tool in wrk nginx taskset curl; do
  command -v "$tool" >/dev/null || die "$tool is missing — apt-get install -y wrk nginx util-linux curl"
done
[ -d "$SHARED/bench/origin" ] || die "no bench origin at $SHARED/bench/origin (set SHARED=)"

rm -rf "$RUN_DIR"; mkdir -p "$RUN_DIR/nginx" "$(dirname "$OUT")"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

echo "building hyperion and bench-origin (release)…"
(cd "$REPO" && cargo build --release --quiet)
(cd "$SHARED/bench/origin" && cargo build --release --quiet)
HYPERION="$REPO/target/release/hyperion"
ORIGIN="$SHARED/bench/origin/target/release/bench-origin"

wait_port() {
  for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$1/_count" && return 0; sleep 0.1; done
  die "nothing answers on port $1"
}

taskset -c "$SERVER_CPU" "$ORIGIN" --listen "127.0.0.1:$ORIGIN_PORT" --threads 1 >"$RUN_DIR/origin.log" 2>&1 &
PIDS+=($!); ORIGIN_PID=$!
wait_port "$ORIGIN_PORT"
curl -s "http://127.0.0.1:$ORIGIN_PORT/_delay?ms=0" >/dev/null

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
