#!/usr/bin/env bash
# =============================================================================
# bolt.sh — builds target/bolt/hyperion, the optimized build: the release
# binary compiled with profile-guided optimization (PGO) from a profile of
# Hyperion's own request paths, then its code laid out by BOLT (LLVM's
# post-link optimizer) from a second profile. The code a request runs is
# compiled for the paths requests take, and sits together in memory.
#
# Why: a pass-through request runs ~32k instructions spread over ~140 KB of
# code (hyper's server and client, tokio, http, Hyperion), four times the
# CPU's 32 KB instruction cache. Under callgrind's cache simulation
# (instructions.sh CACHE_SIM=1, wrk -c64) the release build runs ~32,200
# instructions and misses the L1 instruction cache ~2,200 times a request;
# nginx ~28,000 and ~1,100. With PGO: ~24,900 and ~1,430 (inlining, branch
# layout and hot/cold splitting chosen from the profile).
#
# Steps (PGO=0 skips 1 and 2's profile):
#  1. a release build instrumented for PGO (-Cprofile-generate, in
#     target/pgo-gen) serves the training mix; its profile is merged with
#     llvm-profdata (rustup's llvm-tools: the one matching rustc's LLVM);
#  2. the release build with that profile (-Cprofile-use), linked with
#     --emit-relocs for BOLT, in target/bolt-build (target/release is left
#     as it is);
#  3. `llvm-bolt -instrument`; the instrumented binary serves the same mix;
#  4. `llvm-bolt` lays the code out from its profile (hot blocks first and
#     together, cold ones split off, functions ordered by calls);
#  5. the result is smoke-tested before it replaces the previous one:
#     `check` of the default proxy.toml, and a pass-through answer and a
#     cached one (miss, then hit) compared with the origin's bytes.
# The training mix, TRAIN_SECS seconds each against the bench origin:
# pass-through GET and POST, cache hits, NDJSON streams, access log on; the
# proxy then exits on SIGTERM and writes its profile. Code the mix does not
# reach (TLS, HTTP/2, compression, errors) works as before: it is only
# compiled and placed as code that seldom runs.
#
# Usage: benches/load/bolt.sh        (~10 min: two release builds, ~40 s of load)
#        then e.g. BOLT_BIN=target/bolt/hyperion benches/load/passthrough.sh
# Knobs: PGO (1) TRAIN_SECS (5) SHARED SERVER_CPU CLIENT_CPU
# Needs: llvm-bolt (apt-get install -y bolt-19), llvm-profdata (rustup
#        component add llvm-tools; not with PGO=0), wrk, curl, taskset and
#        ../shared/bench/origin (built here if missing).
# Every process is started here, on loopback ports 27880-27890, and stopped on exit.
# =============================================================================
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
: "${PGO:=1}" "${TRAIN_SECS:=5}" "${SERVER_CPU:=0}" "${CLIENT_CPU:=1}"
: "${SHARED:=$REPO/../shared}"
: "${RUN_DIR:=/tmp/hyperion-bolt}"
ORIGIN_PORT=27880 PROXY_PORT=27890
# The real path: llvm-bolt finds its instrumentation runtime beside itself.
BOLT=$(realpath "$(command -v llvm-bolt-19 || command -v llvm-bolt)" 2>/dev/null || true)
[ -n "$BOLT" ] || { echo "bolt.sh: llvm-bolt is missing — apt-get install -y bolt-19" >&2; exit 1; }
if [ "$PGO" = 1 ]; then
  # The one shipped with the toolchain: profiles are read by rustc's own LLVM.
  PROFDATA="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/llvm-profdata"
  [ -x "$PROFDATA" ] || { echo "bolt.sh: llvm-profdata is missing — rustup component add llvm-tools (or PGO=0)" >&2; exit 1; }
fi

SCRIPT=bolt.sh
NEEDS="wrk:wrk curl:curl taskset:util-linux"
OUT=$RUN_DIR/unused    # common.sh wants one; this script writes no report
HYPERION_BIN=/bin/true # common.sh: no build of its own, the builds are below
# shellcheck source=benches/load/common.sh
source "$REPO/benches/load/common.sh"

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

URL="http://127.0.0.1:$PROXY_PORT"
# Serves with BIN on SERVER_CPU, its log to RUN_DIR/NAME.log; sets SERVING_PID.
serve() {
  taskset -c "$SERVER_CPU" "$1" --config "$RUN_DIR/train.toml" >"$RUN_DIR/$2.log" 2>&1 &
  SERVING_PID=$!; PIDS+=("$SERVING_PID")
  wait_port "$PROXY_PORT"
}
# Serves the training mix with BIN (NAME for its logs), then stops it.
train() {
  echo "training ($2) for $((TRAIN_SECS * 4)) s…"
  serve "$1" "$2"
  local log="$RUN_DIR/wrk-$2.log"
  taskset -c "$CLIENT_CPU" wrk -t1 -c64 -d"${TRAIN_SECS}s" "$URL/static/1k" >>"$log" 2>&1
  taskset -c "$CLIENT_CPU" wrk -t1 -c64 -d"${TRAIN_SECS}s" -s "$RUN_DIR/post.lua" "$URL/api/generate" >>"$log" 2>&1
  taskset -c "$CLIENT_CPU" wrk -t1 -c64 -d"${TRAIN_SECS}s" "$URL/static/16k" >>"$log" 2>&1
  taskset -c "$CLIENT_CPU" wrk -t1 -c16 -d"${TRAIN_SECS}s" "$URL/stream" >>"$log" 2>&1
  kill -TERM "$SERVING_PID"; wait "$SERVING_PID" || true
}

USE_PROFILE=""
if [ "$PGO" = 1 ]; then
  echo "building hyperion instrumented for PGO (target/pgo-gen)…"
  # Build scripts and proc macros are instrumented as well: their profiles
  # go to pgo-build and are not used; the proxy's go to LLVM_PROFILE_FILE.
  (cd "$REPO" && CARGO_TARGET_DIR="$REPO/target/pgo-gen" \
    RUSTFLAGS="-Cprofile-generate=$RUN_DIR/pgo-build" cargo build --release --locked --quiet)
  LLVM_PROFILE_FILE="$RUN_DIR/pgo/hyperion-%p.profraw" train "$REPO/target/pgo-gen/release/hyperion" pgo
  compgen -G "$RUN_DIR/pgo/hyperion-*.profraw" >/dev/null \
    || die "the PGO-instrumented run wrote no profile (see $RUN_DIR/pgo.log)"
  "$PROFDATA" merge -o "$RUN_DIR/hyperion.profdata" "$RUN_DIR"/pgo/hyperion-*.profraw
  USE_PROFILE="-Cprofile-use=$RUN_DIR/hyperion.profdata "
fi

BUILD="$REPO/target/bolt-build"
echo "building hyperion${USE_PROFILE:+ with the PGO profile}, relocations kept (target/bolt-build)…"
(cd "$REPO" && CARGO_TARGET_DIR="$BUILD" RUSTFLAGS="${USE_PROFILE}-C link-arg=-Wl,--emit-relocs" \
  cargo build --release --locked --quiet)
PLAIN="$BUILD/release/hyperion"

"$BOLT" "$PLAIN" -instrument -o "$RUN_DIR/hyperion.instrumented" \
  --instrumentation-file="$RUN_DIR/profile.fdata" >"$RUN_DIR/instrument.log" 2>&1 \
  || die "llvm-bolt -instrument failed (see $RUN_DIR/instrument.log)"
train "$RUN_DIR/hyperion.instrumented" bolt
[ -s "$RUN_DIR/profile.fdata" ] || die "the instrumented run wrote no profile (see $RUN_DIR/bolt.log)"

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
echo "bolt.sh: $OUT_BIN (${USE_PROFILE:+PGO and }$(grep -m1 -o 'BOLT-INFO: [0-9]* out of [0-9]* functions in the binary ([0-9.]*%) have non-empty execution profile' "$RUN_DIR/optimize.log" | sed 's/BOLT-INFO: //' || true))"
