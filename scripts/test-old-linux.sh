#!/usr/bin/env bash
# The release artifacts of `make dist` on an old Linux: Debian 11 (bullseye: glibc 2.31, Python 3.9, gcc 10)
#
# A bullseye root made with debootstrap (minbase plus python3-venv, gcc, libc6-dev, pkg-config),
# kept under $CARGO_TARGET_DIR/old-linux/bullseye and reused (delete it to start over), entered
# with chroot in a private mount namespace (unshare; /dev and /proc bound inside). It shares the
# host's network, so a relay and a hashing service on the host's 127.0.0.1 are reachable:
#
# - the wheel pip-installs (no index) into a venv of bullseye's python3 (3.9); an
#   AsyncDialer (asyncio streams) dials through the host's relay: 1 MiB sent, its SHA-256 compared;
# - the CLI tarball's `tunnel` runs `server` inside, and `tunnel dial` goes through it, same check;
# - the C tarball: examples/c/dial.c compiled with bullseye's gcc and pkg-config, run, same check.
#
# Node is not tried there: bullseye's nodejs is 12, and the package needs Node 18 or newer.
# Needs root (chroot; sudo when not root; debootstrap reaches deb.debian.org the first time). Run by scripts/test-dist.sh
# after `make dist`, or alone once dist/ is built.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "scripts/test-old-linux.sh needs root (debootstrap, chroot): run it as root" >&2; exit 1; }
  exec sudo --preserve-env=CARGO_TARGET_DIR,PYTHON bash "$0" "$@"
fi
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
PLATFORM="linux-$(uname -m)"
DIST="$ROOT/dist"
for f in "libtunnel-cli-$VERSION-$PLATFORM.tar.gz" "libtunnel-c-$VERSION-$PLATFORM.tar.gz"; do
  [ -f "$DIST/$f" ] || { echo "no dist/$f: run make dist first" >&2; exit 1; }
done
wheels=("$DIST"/libtunnel-"$VERSION"-*.whl)
[ -f "${wheels[0]}" ] || { echo "no wheel in dist/: run make dist first" >&2; exit 1; }

step "old Linux: the Debian 11 root"
BULLSEYE="$CARGO_TARGET_DIR/old-linux/bullseye"
if [ ! -f "$BULLSEYE/.libtunnel-complete" ]; then
  need_debs debootstrap
  started=$SECONDS
  rm -rf "$BULLSEYE" "$BULLSEYE.tmp"
  mkdir -p "$(dirname "$BULLSEYE")"
  debootstrap --variant=minbase --include=python3,python3-venv,gcc,libc6-dev,pkg-config \
    bullseye "$BULLSEYE.tmp" http://deb.debian.org/debian >"$CARGO_TARGET_DIR/old-linux/debootstrap.log" 2>&1 \
    || { tail -n 20 "$CARGO_TARGET_DIR/old-linux/debootstrap.log" >&2; exit 1; }
  rm -rf "$BULLSEYE.tmp"/var/cache/apt/archives/*.deb
  touch "$BULLSEYE.tmp/.libtunnel-complete"
  mv "$BULLSEYE.tmp" "$BULLSEYE"
  echo "debootstrapped in $((SECONDS - started))s"
fi
echo "$BULLSEYE: $(cat "$BULLSEYE/etc/debian_version"), $(chroot "$BULLSEYE" ldd --version | head -n 1)," \
  "$(chroot "$BULLSEYE" python3 --version), $(chroot "$BULLSEYE" gcc --version | head -n 1)"

# Work dir inside the root: the artifacts, the payload, the inner script.
W="$BULLSEYE/opt/libtunnel-test"
T=$(mktemp -d "${TMPDIR:-/tmp}/libtunnel-old-linux.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$T" "$W"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*" >&2
  for f in "$T"/*.log; do [ -s "$f" ] && { echo "--- $f" >&2; tail -n 20 "$f" >&2; }; done
  exit 1
}
rm -rf "$W"
mkdir -p "$W"
cp "${wheels[0]}" "$DIST/libtunnel-cli-$VERSION-$PLATFORM.tar.gz" "$DIST/libtunnel-c-$VERSION-$PLATFORM.tar.gz" \
  examples/c/dial.c "$W/"
head -c 1048576 /dev/urandom >"$W/payload"
WANT=$(sha256sum "$W/payload" | cut -d' ' -f1)

# On the host: the hashing service and a relay (the host's own CLI from the tarball).
tar -xzf "$DIST/libtunnel-cli-$VERSION-$PLATFORM.tar.gz" -C "$T"
HOST_TUNNEL="$T/libtunnel-cli-$VERSION-$PLATFORM/bin/tunnel"
exec {hasher}< <(hash_server 2>"$T/hasher.log")
pids+=($!)
read -r -t 30 -u "$hasher" line || fail "the hashing service did not start"
HASH_PORT=${line#hasher listening: }
keys=$("$HOST_TUNNEL" keygen --kid 1)
KEY=$(sed -n 's/^TUNNEL_KEY=//p' <<<"$keys")
AUTH_KEYS=$(sed -n "s/^TUNNEL_AUTH_KEYS='\(.*\)'$/\1/p" <<<"$keys")
ALLOW="[{\"host\":\"127.0.0.1\",\"port\":$HASH_PORT}]"
exec {relay}< <(cd "$T" && TUNNEL_AUTH_KEYS="$AUTH_KEYS" TUNNEL_ALLOW="$ALLOW" exec "$HOST_TUNNEL" server --listen 127.0.0.1:0 2>"$T/host-relay.log" </dev/null)
pids+=($!)
URL=""
while IFS= read -r -t 30 -u "$relay" line; do
  if [[ $line == "relay listening: "* ]]; then URL=${line#relay listening: }; break; fi
done
[ -n "$URL" ] || fail "the host's tunnel server did not start"
exec {relay}<&-

# Inside the root. Every check prints "ok: ..." or exits non-zero.
cat >"$W/inner.sh" <<'INNER'
set -euo pipefail
trap 'echo "FAIL: status $? at line $LINENO of the script in the root: $BASH_COMMAND" >&2' ERR
cd /opt/libtunnel-test
export HOME=/opt/libtunnel-test PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8
check() { [ "$2" = "$WANT" ] || { echo "FAIL: $1: got '$2', want sha256 $WANT" >&2; exit 1; }; echo "ok: $1 (1 MiB, sha256 matches)"; }

python3 -m venv venv
venv/bin/python -m pip install -q --no-index ./libtunnel-*.whl
got=$(venv/bin/python -c '
import asyncio, sys, libtunnel
async def main() -> str:
    target, url, key = sys.argv[1:4]
    payload = open("payload", "rb").read()
    async with libtunnel.AsyncDialer(url, key=key, timeout=30) as dialer:
        reader, writer = await dialer.open_connection(target)
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        got = await reader.read()
        writer.close()
    return got.decode()
print(asyncio.run(main()))' "$TARGET" "$URL" "$KEY")
check "wheel on $(venv/bin/python --version): AsyncDialer.open_connection through the host's relay" "$got"

mkdir cli && tar -xzf libtunnel-cli-*.tar.gz -C cli --strip-components=1
mkfifo relay.out
TUNNEL_AUTH_KEYS="$AUTH_KEYS" TUNNEL_ALLOW="$ALLOW" cli/bin/tunnel server --listen 127.0.0.1:0 >relay.out 2>relay.log </dev/null &
relay=$!
trap 'kill $relay 2>/dev/null || true' EXIT
exec {out}<relay.out
inner_url=""
while IFS= read -r -t 30 -u "$out" line; do
  if [[ $line == "relay listening: "* ]]; then inner_url=${line#relay listening: }; break; fi
done
[ -n "$inner_url" ] || { cat relay.log >&2; echo "FAIL: tunnel server did not start in the root" >&2; exit 1; }
(exec cat <&"$out" >/dev/null) &
got=$(TUNNEL_RELAY="$inner_url" TUNNEL_KEY="$KEY" timeout 60 cli/bin/tunnel dial "$TARGET" <payload)
check "CLI tarball: tunnel server and tunnel dial in the root" "$got"

tar -xzf libtunnel-c-*.tar.gz
C=$(echo "$PWD"/libtunnel-c-*/)
export PKG_CONFIG_PATH="$C/lib/pkgconfig"
# shellcheck disable=SC2046
gcc -Wall -Wextra -Werror -pedantic dial.c -o dial $(pkg-config --cflags --libs tunnel) -Wl,-rpath,"$C/lib"
got=$(TUNNEL_RELAY="$URL" TUNNEL_KEY="$KEY" timeout 60 ./dial "$TARGET" <payload)
check "C tarball: dial.c built with $(gcc --version | head -n 1), through the host's relay" "$got"
INNER

step "old Linux: the artifacts in the Debian 11 root"
unshare --mount --propagation private -- sh -c '
  set -e
  mount --rbind /dev "$1/dev"
  mount -t proc proc "$1/proc"
  shift
  exec chroot "$0" /usr/bin/env -i "$@" /bin/bash /opt/libtunnel-test/inner.sh
' "$BULLSEYE" "$BULLSEYE" WANT="$WANT" TARGET="127.0.0.1:$HASH_PORT" URL="$URL" KEY="$KEY" \
  AUTH_KEYS="$AUTH_KEYS" ALLOW="$ALLOW" >"$T/inner.out" 2>"$T/inner.log" \
  || { cat "$T/inner.out"; fail "the checks in the Debian 11 root failed (their output above, their stderr below)"; }
cat "$T/inner.out"
echo "(Node not tried on Debian 11: its nodejs is 12, the package needs Node 18 or newer)"
