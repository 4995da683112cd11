#!/usr/bin/env bash
# =============================================================================
# deploy/container/build.sh — the container image, from this checkout and
# this Debian machine only: no image registry is asked for anything.
#
# Stages target/container/root/ (the Containerfile's context) with:
#   /usr/bin/hyperion                the release binary, stripped
#   the C libraries it links         glibc and libgcc_s, as `ldd` lists them
#   /etc/ssl/certs/ca-certificates.crt  Debian's CA bundle, for upstream TLS
#   /etc/passwd, /etc/group          the unprivileged user hyperion (65532)
#   /etc/hyperion/proxy.toml         proxy.toml, listening on 0.0.0.0:8080
#                                    (a published port reaches that, not
#                                    loopback), the admin API on 0.0.0.0:9090
#                                    (for the healthcheck and /metrics) and
#                                    Ollama at host.containers.internal:11434
# then `podman build --format docker` (the OCI format drops HEALTHCHECK).
#
# Usage: deploy/container/build.sh [TAG]     (default hyperion:<version>)
# Needs: podman (apt-get install -y podman), ca-certificates, binutils (strip).
# =============================================================================
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
die() { echo "deploy/container/build.sh: $*" >&2; exit 1; }
command -v podman >/dev/null || die "podman is missing — apt-get install -y podman"
[ -f /etc/ssl/certs/ca-certificates.crt ] || die "no CA bundle — apt-get install -y ca-certificates"
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
TAG=${1:-hyperion:$VERSION}

cargo build --release --quiet
CTX=target/container
rm -rf "$CTX"; mkdir -p "$CTX/root/usr/bin" "$CTX/root/etc/hyperion" "$CTX/root/etc/ssl/certs"
strip -o "$CTX/root/usr/bin/hyperion" target/release/hyperion
# The dynamic loader and each library, at the paths the binary asks for.
for lib in $(ldd target/release/hyperion | grep -o '/[^ ]*'); do
  mkdir -p "$CTX/root$(dirname "$lib")"
  cp -L "$lib" "$CTX/root$lib"
done
cp /etc/ssl/certs/ca-certificates.crt "$CTX/root/etc/ssl/certs/"
echo 'hyperion:x:65532:65532:hyperion:/nonexistent:/usr/sbin/nologin' >"$CTX/root/etc/passwd"
echo 'hyperion:x:65532:' >"$CTX/root/etc/group"
sed -e 's|^listen = \["127.0.0.1:8080"\]|listen = ["0.0.0.0:8080"]|' \
    -e 's|^# \[admin\]$|[admin]|' \
    -e 's|^# listen = "127.0.0.1:9090"$|listen = "0.0.0.0:9090"|' \
    -e 's|{ url = "http://127.0.0.1:11434" }|{ url = "http://host.containers.internal:11434" }|' \
    proxy.toml >"$CTX/root/etc/hyperion/proxy.toml"
grep -q '^listen = "0.0.0.0:9090"' "$CTX/root/etc/hyperion/proxy.toml" || die "proxy.toml's [admin] lines moved: update the sed above"
# (host.containers.internal resolves inside the container only: check
# the policy with a stand-in.)
sed 's|host.containers.internal|127.0.0.1|' "$CTX/root/etc/hyperion/proxy.toml" >"$CTX/check.toml"
target/release/hyperion check --config "$CTX/check.toml" >/dev/null || die "the image's policy does not pass hyperion check"
cp Containerfile "$CTX/"

podman build --quiet --format docker -t "$TAG" -f "$CTX/Containerfile" "$CTX" >/dev/null
echo "$TAG: $(podman image inspect "$TAG" --format '{{.Size}}' | awk '{printf "%.1f MB", $1/1e6}')"
