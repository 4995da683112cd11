#!/usr/bin/env bash
# =============================================================================
# cache_hits.sh — Hyperion as one more row of the shared anchor harness
# (../shared/bench/anchors.sh): cache hits of 1 KB and 16 KB against nginx
# proxy_cache, Varnish and HAProxy's cache, and the bare origin answering from
# memory, in the same run, one core for the server side and one for wrk.
#
# Usage: benches/load/cache_hits.sh           (ROUNDS=3 SECTIONS=hit by default)
#        SECTIONS="hit miss lat stream" benches/load/cache_hits.sh
# Any anchors.sh knob passes through (ROUNDS, DURATION, TARGETS, ...).
# Needs: apt-get install -y nginx varnish haproxy wrk; a release build of
# Hyperion (built here if missing). Output: anchors.sh's results directory
# (path printed at the end); its summary.txt is copied to benches/runs/.
# Every process is started by anchors.sh on loopback and stopped on exit.
# =============================================================================
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
: "${SHARED:=$REPO/../shared}"
: "${ROUNDS:=3}" "${SECTIONS:=hit}" "${TARGETS:=origin nginx varnish haproxy}"
HARNESS="$SHARED/bench/anchors.sh"
[ -x "$HARNESS" ] || [ -f "$HARNESS" ] || { echo "cache_hits.sh: no $HARNESS (set SHARED=)" >&2; exit 1; }
BIN="$REPO/target/release/hyperion"
[ -x "$BIN" ] || (cd "$REPO" && cargo build --release --locked)
"$BIN" check --config "$REPO/benches/load/anchors-hyperion.toml" >/dev/null

OUT_DIR="${OUT_DIR:-$SHARED/bench/results/$(date +%Y%m%d-%H%M%S)-hyperion}"
export ROUNDS SECTIONS TARGETS OUT_DIR
ORIGIN_PORT=27080 EXTRA_NAME=hyperion EXTRA_PORT=27090 \
EXTRA_CMD="$BIN --config $REPO/benches/load/anchors-hyperion.toml" \
  bash "$HARNESS"
mkdir -p "$REPO/benches/runs"
cp "$OUT_DIR/summary.txt" "$REPO/benches/runs/$(date +%Y-%m-%d)-cache-hits.txt"
echo "cache_hits.sh: summary copied to benches/runs/$(date +%Y-%m-%d)-cache-hits.txt"
