#!/usr/bin/env bash
# =============================================================================
# bolt.sh — builds target/bolt/hyperion: the release binary with its code laid
# out by BOLT (LLVM's post-link optimizer) from a profile of Hyperion's own
# request paths, so the code a request runs sits together in memory.
#
# Why: a pass-through request runs ~33k instructions spread over ~140 KB of
# code (hyper's server and client, tokio, http, Hyperion), four times the
# CPU's 32 KB instruction cache. Under callgrind's cache simulation
# (instructions.sh CACHE_SIM=1, wrk -c64) the release build misses the L1
# instruction cache ~2,200 times a request, nginx ~1,100; the BOLT build
# ~1,450. Same code, same instructions: only their placement changes.
#
# Steps: a release build linked with --emit-relocs (in target/bolt-build, so
# the usual target/release stays as it is); `llvm-bolt -instrument`; the
# instrumented binary serves a training mix against the bench origin for
# TRAIN_SECS seconds each (pass-through GET and POST, cache hits, NDJSON
# streams, access log on), then exits on SIGTERM and writes its profile;
# `llvm-bolt` lays the code out from it (hot blocks first and together, cold
# ones split off, functions ordered by calls). Code the mix does not reach
# (TLS, HTTP/2, compression, errors) keeps working as before; it is only not
# reordered. Last, the result is smoke-tested: `check` of the default
# proxy.toml, and a pass-through answer and a cached one (miss, then hit)
# compared with the origin's bytes.
#
# Usage: benches/load/bolt.sh        (~3–6 min: one release build, ~30 s of load)
#        then e.g. BOLT_BIN=target/bolt/hyperion benches/load/passthrough.sh
# Knobs: TRAIN_SECS (5) SHARED SERVER_CPU CLIENT_CPU
# Needs: llvm-bolt (apt-get install -y bolt-19), wrk, curl, taskset and
#        ../shared/bench/origin (built here if missing).
# Every process is started here, on loopback ports 27880-27890, and stopped on exit.
# =============================================================================
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
: "${TRAIN_SECS:=5}" "${SERVER_CPU:=0}" "${CLIENT_CPU:=1}"
: "${SHARED:=$REPO/../shared}"
: "${RUN_DIR:=/tmp/hyperion-bolt}"
ORIGIN_PORT=27880 PROXY_PORT=27890
# The real path: llvm-bolt finds its instrumentation runtime beside itself.
BOLT=$(realpath "$(command -v llvm-bolt-19 || command -v llvm-bolt)" 2>/dev/null || true)
[ -n "$BOLT" ] || { echo "bolt.sh: llvm-bolt is missing — apt-get install -y bolt-19" >&2; exit 1; }

BUILD="$REPO/target/bolt-build"
echo "building hyperion with relocations kept (target/bolt-build)…"
(cd "$REPO" && CARGO_TARGET_DIR="$BUILD" RUSTFLAGS="-C link-arg=-Wl,--emit-relocs" \
  cargo build --release --locked --quiet)
PLAIN="$BUILD/release/hyperion"

SCRIPT=bolt.sh
NEEDS="wrk:wrk curl:curl taskset:util-linux"
OUT=$RUN_DIR/unused   # common.sh wants one; this script writes no report
HYPERION_BIN=$PLAIN   # common.sh: no second build
# shellcheck source=benches/load/common.sh
source "$REPO/benches/load/common.sh"

"$BOLT" "$PLAIN" -instrument -o "$RUN_DIR/hyperion.instrumented" \
  --instrumentation-file="$RUN_DIR/profile.fdata" >"$RUN_DIR/instrument.log" 2>&1 \
  || die "llvm-bolt -instrument failed (see $RUN_DIR/instrument.log)"

# The training policy: /static/16k cached (the origin sends public,
# max-age=3600), everything else passed through; access log on, as the
# default proxy.toml has it.
cat >"$RUN_DIR/train.toml" <<EOF
[server]
listen = ["127.0.0.1:$PROXY_PORT"]
access_log = "json"

[upstreams.origin]
servers = [{ url = "http://127.0.0.1:$ORIGIN_PORT" }]

[[route]]
name = "cached"
match = { methods = ["GET", "HEAD"], paths = ["/static/16k"] }
upstream = "origin"

[route.cache]
mode = "origin"
scope = "shared"

[[route]]
name = "all"
upstream = "origin"
EOF
cat >"$RUN_DIR/post.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"model":"llama3.2","prompt":"why is the sky blue?","stream":false}'
wrk.headers["Content-Type"] = "application/json"
EOF

# Serves with BIN on SERVER_CPU, the log to a file; sets SERVING_PID.
serve() {
  taskset -c "$SERVER_CPU" "$1" --config "$RUN_DIR/train.toml" >"$RUN_DIR/$2.log" 2>&1 &
  SERVING_PID=$!; PIDS+=("$SERVING_PID")
  wait_port "$PROXY_PORT"
}

echo "training for $((TRAIN_SECS * 4)) s…"
serve "$RUN_DIR/hyperion.instrumented" train
load() { taskset -c "$CLIENT_CPU" wrk -t1 "$@" >>"$RUN_DIR/wrk.log" 2>&1; }
URL="http://127.0.0.1:$PROXY_PORT"
load -c64 -d"${TRAIN_SECS}s" "$URL/static/1k"
load -c64 -d"${TRAIN_SECS}s" -s "$RUN_DIR/post.lua" "$URL/api/generate"
load -c64 -d"${TRAIN_SECS}s" "$URL/static/16k"
load -c16 -d"${TRAIN_SECS}s" "$URL/stream"
kill -TERM "$SERVING_PID"; wait "$SERVING_PID" || true
[ -s "$RUN_DIR/profile.fdata" ] || die "the instrumented run wrote no profile (see $RUN_DIR/train.log)"

mkdir -p "$REPO/target/bolt"
OUT_BIN="$REPO/target/bolt/hyperion"
"$BOLT" "$PLAIN" -o "$OUT_BIN.new" -data="$RUN_DIR/profile.fdata" \
  -reorder-blocks=ext-tsp -reorder-functions=cdsort -split-functions -split-all-cold \
  -split-eh -icf=1 -use-gnu-stack -dyno-stats >"$RUN_DIR/optimize.log" 2>&1 \
  || die "llvm-bolt failed (see $RUN_DIR/optimize.log)"

echo "smoke test…"
"$OUT_BIN.new" --version >/dev/null
"$OUT_BIN.new" check --config "$REPO/proxy.toml" >/dev/null
serve "$OUT_BIN.new" smoke
for path in /static/1k /static/16k /static/16k; do
  cmp -s <(curl -s "$URL$path") <(curl -s "http://127.0.0.1:$ORIGIN_PORT$path") \
    || die "the optimized binary answered $path differently from the origin"
done
kill -TERM "$SERVING_PID"; wait "$SERVING_PID" || true
mv "$OUT_BIN.new" "$OUT_BIN"
echo "bolt.sh: $OUT_BIN ($(grep -m1 -o 'BOLT-INFO: [0-9]* out of [0-9]* functions in the binary ([0-9.]*%) have non-empty execution profile' "$RUN_DIR/optimize.log" | sed 's/BOLT-INFO: //' || true))"
