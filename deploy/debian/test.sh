#!/usr/bin/env bash
# =============================================================================
# deploy/debian/test.sh — the Debian package, built and checked on this
# machine: `cargo deb`, then `dpkg -i`; the installed policy passes
# `hyperion check` and the unit `systemd-analyze verify`; nothing was started
# (nothing listens on 8080); the binary, run as the `hyperion` user against
# the mock backend, answers; `dpkg --purge` leaves nothing but the system
# user (kept by Debian's practice).
#
# Usage (as root, on a machine without the package): deploy/debian/test.sh
# Needs: cargo-deb (cargo install cargo-deb --locked; installed here if
# missing), dpkg, systemd (systemd-analyze), curl. Ports 8080 and 11434.
# =============================================================================
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
die() { echo "deploy/debian/test.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "dpkg -i needs root"
! dpkg -s hyperion >/dev/null 2>&1 || die "hyperion is installed already: dpkg --purge hyperion first"
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked
for port in 8080 11434; do
  ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || die "port $port is in use"
done

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; die "nothing on port $1"; }
check() { echo "  ok: $*"; }

echo "== cargo deb"
cargo build --release --quiet --example mock_ollama
cargo deb --quiet
DEB=$(ls -t target/debian/hyperion_*.deb | head -1)
echo "$DEB: $(du -h "$DEB" | cut -f1)"
dpkg-deb --info "$DEB" | sed -n 's/^ \(Package\|Version\|Depends\|Section\):/  \1:/p'

echo "== dpkg -i"
dpkg -i "$DEB" >/dev/null
if [ -x /usr/bin/hyperion ]; then check "/usr/bin/hyperion"; else die "/usr/bin/hyperion: failed"; fi
if hyperion check --config /etc/hyperion/proxy.toml >/dev/null; then check "hyperion check /etc/hyperion/proxy.toml"; else die "hyperion check /etc/hyperion/proxy.toml: failed"; fi
UNIT=$(dpkg -L hyperion | grep '/hyperion.service$')
out=$(systemd-analyze verify "$UNIT" 2>&1) && [ -z "$out" ] || die "systemd-analyze verify $UNIT: $out"
check "systemd-analyze verify $UNIT"
if dpkg-query -W -f='${Conffiles}\n' hyperion | grep -q /etc/hyperion/proxy.toml; then check "proxy.toml is a conffile"; else die "proxy.toml is a conffile: failed"; fi
if [ "$(stat -c '%U:%G %a' /etc/hyperion/hyperion.env)" = "root:hyperion 640" ]; then check "hyperion.env root:hyperion 0640"; else die "hyperion.env root:hyperion 0640: failed"; fi
if [ "$(stat -c '%U:%G %a' /var/lib/hyperion)" = "hyperion:hyperion 750" ]; then check "/var/lib/hyperion hyperion 0750"; else die "/var/lib/hyperion hyperion 0750: failed"; fi
if getent passwd hyperion | grep -q nologin; then check "system user hyperion"; else die "system user hyperion: failed"; fi
if ! (exec 3<>/dev/tcp/127.0.0.1/8080) 2>/dev/null; then check "nothing started: nothing listens on 8080"; else die "nothing started: nothing listens on 8080: failed"; fi
if grep -q '^listen = \["127.0.0.1:8080"\]' /etc/hyperion/proxy.toml; then check "the policy listens on loopback only"; else die "the policy listens on loopback only: failed"; fi

echo "== the installed binary, as hyperion, in front of the mock"
target/release/examples/mock_ollama --token-delay-ms 1 >/dev/null 2>&1 & PIDS+=($!)
wait_port 11434
runuser -u hyperion -- hyperion --config /etc/hyperion/proxy.toml 2>/dev/null & PIDS+=($!)
wait_port 8080
answer=$(curl -sf localhost:8080/api/generate -d '{"model":"llama3.2","prompt":"hi","stream":false}')
if echo "$answer" | grep -q '"done":true'; then check "an answer through the installed proxy"; else die "an answer through the installed proxy: failed"; fi
cat >/tmp/hyperion-deb-keys.toml <<POLICY
[auth]
keys_file = "/var/lib/hyperion/keys.toml"
[upstreams.ollama]
servers = [{ url = "http://127.0.0.1:11434" }]
[[route]]
name = "all"
upstream = "ollama"
POLICY
if runuser -u hyperion -- hyperion keys add smoke --config /tmp/hyperion-deb-keys.toml 2>/dev/null | grep -q '^hyp_'; then
  check "hyperion keys add, as hyperion, into /var/lib/hyperion"
else
  die "hyperion keys add, as hyperion, into /var/lib/hyperion: failed"
fi
rm -f /tmp/hyperion-deb-keys.toml
cleanup; PIDS=()

echo "== dpkg --purge"
dpkg --purge hyperion >/dev/null
for gone in /usr/bin/hyperion /etc/hyperion /var/lib/hyperion "$UNIT" /usr/share/doc/hyperion; do
  [ ! -e "$gone" ] || die "$gone is left after purge"
done
[ -z "$(dpkg-statoverride --list /etc/hyperion/hyperion.env)" ] || die "the statoverride is left"
check "nothing left but the system user hyperion (kept by Debian's practice: userdel -r hyperion to remove it)"
echo "deploy/debian/test.sh: passed"
