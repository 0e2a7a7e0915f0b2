#!/usr/bin/env bash
# Release artifacts: `make dist` (scripts/dist.sh), then each artifact installed from itself in a temp dir and run
#
# CLI tarball: unpacked into a prefix, `tunnel --version`, man page, completions, README and the deploy files
# present, the systemd unit from the tarball checked with `systemd-analyze verify` (its binary and man page
# those of the unpacked tree), then a relay
# (`tunnel server` on 127.0.0.1:0) and `tunnel dial` through it to a hashing service: 1 MiB of
# random bytes sent, the service's SHA-256 of what it received compared with ours.
# C tarball: unpacked; its README.md and examples present; examples/c/relay.c (embedded relay) and examples/c/dial.c compiled with
# `pkg-config --cflags --libs tunnel` (PKG_CONFIG_PATH into the unpacked tree), once linked to
# libtunnel.so (rpath) and once to libtunnel.a (`pkg-config --static`); each relay serves a dial
# of the other link kind, same hash check.
# Wheel: pip-installed into a fresh virtualenv (no index); an embedded libtunnel.Server and a
# Dialer round trip, same hash check. npm tarball: `npm install`ed into a fresh project (offline);
# Server.start, Dialer.connect and a dial, same hash check. Old Linux: `auditwheel show` names the
# wheel's manylinux tag (DIST_GLIBC, 2.17 by default), `objdump -T` finds no glibc symbol version
# newer than that in the CLI, libtunnel.so, the wheel's module and the addon; then
# scripts/test-old-linux.sh runs them on Debian 11 (unless LIBTUNNEL_SKIP_OLD_LINUX=1). Prints
# every artifact's size.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

started=$SECONDS
bash scripts/dist.sh
built=$((SECONDS - started))
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
PLATFORM="linux-$(uname -m)"
GLIBC="${DIST_GLIBC:-2.17}"
DIST="$ROOT/dist"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"

T=$(mktemp -d "${TMPDIR:-/tmp}/libtunnel-dist.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$T"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*" >&2
  for f in "$T"/*.log; do [ -s "$f" ] && { echo "--- $f" >&2; tail -n 20 "$f" >&2; }; done
  exit 1
}

# spawn NAME CMD...: runs CMD in the background, its stdout on fd $OUT_FD (read with
# `ready`), its stderr in $T/NAME.log, its stdin from $SPAWN_IN (default /dev/null); its pid in
# $PID. Killed at exit.
spawn() {
  local name=$1
  shift
  # A function (hash_server) execs by itself.
  if declare -F "$1" >/dev/null; then
    exec {OUT_FD}< <("$@" 2>"$T/$name.log" <"${SPAWN_IN:-/dev/null}")
  else
    exec {OUT_FD}< <(exec "$@" 2>"$T/$name.log" <"${SPAWN_IN:-/dev/null}")
  fi
  PID=$!
  pids+=("$PID")
}
# ready FD PREFIX: waits (30 s at most) for the line starting with PREFIX on FD, prints the rest,
# then drains FD in the background so the process never blocks on a full pipe. The drain holds no
# other descriptor of ours (a relay's stdin FIFO must reach EOF when we close it).
ready() {
  local fd=$1 prefix=$2 line
  while IFS= read -r -t 30 -u "$fd" line; do
    if [[ $line == "$prefix"* ]]; then
      echo "${line#"$prefix"}"
      (
        for f in "/proc/$BASHPID/fd/"*; do
          n=${f##*/}
          if [ "$n" -gt 2 ] && [ "$n" != "$fd" ]; then eval "exec $n>&-" 2>/dev/null || true; fi
        done
        exec cat <&"$fd" >/dev/null
      ) &
      return 0
    fi
  done
  return 1
}

# The target every round trip dials (scripts/lib.sh).
spawn hasher hash_server
HASH_PORT=$(ready "$OUT_FD" "hasher listening: ") || fail "the hashing service did not start"
TARGET="127.0.0.1:$HASH_PORT"
head -c 1048576 /dev/urandom >"$T/payload"
WANT=$(sha256sum "$T/payload" | cut -d' ' -f1)
# A key for every relay of this test, made by the CLI under test below.
KEY="" AUTH_KEYS=""
ALLOW="[{\"host\":\"127.0.0.1\",\"port\":$HASH_PORT}]"
check() { # check WHAT GOT: GOT must be the payload's hash
  [ "$2" = "$WANT" ] || fail "$1: got '$2', want sha256 $WANT"
  echo "ok: $1 (1 MiB, sha256 matches)"
}

step "dist: the CLI tarball"
# Into a prefix, as README.md says (~/.local there).
CLI="$T/prefix"
mkdir -p "$CLI"
tar -xzf "$DIST/libtunnel-cli-$VERSION-$PLATFORM.tar.gz" -C "$CLI" --strip-components=1
got=$("$CLI/bin/tunnel" --version)
[ "$got" = "tunnel $VERSION" ] || fail "tunnel --version said '$got'"
echo "ok: tunnel --version: $got"
grep -q '^\.TH' "$CLI/share/man/man1/tunnel.1" || fail "no man page in the CLI tarball"
for f in share/bash-completion/completions/tunnel share/zsh/site-functions/_tunnel share/fish/vendor_completions.d/tunnel.fish; do
  grep -q server "$CLI/$f" || fail "the completion $f does not know \`tunnel server\`"
done
[ -f "$CLI/share/doc/libtunnel/LICENSE" ] || fail "no LICENSE in the CLI tarball"
diff -r "$CLI/share/doc/libtunnel/docs" "$ROOT/docs" >/dev/null || fail "share/doc/libtunnel/docs of the CLI tarball differs from docs/ (README.md links there)"
for pair in "share/doc/libtunnel/README.md README.md" "share/doc/libtunnel/relay.env.example deploy/relay.env.example" \
  "share/doc/libtunnel/relay.toml.example deploy/relay.toml.example" "lib/systemd/system/libtunnel-relay.service deploy/libtunnel-relay.service"; do
  read -r got want <<<"$pair"
  cmp -s "$CLI/$got" "$ROOT/$want" || fail "$got is missing from the CLI tarball or differs from $want"
done
echo "ok: man page, bash/zsh/fish completions, LICENSE, README.md and docs/, the systemd unit and the relay config examples"
# The unit as shipped, checked by systemd itself: its ExecStart pointed at the unpacked binary (it names
# /usr/local/bin/tunnel, where the tarball goes when unpacked into /usr/local) and its man: link resolved
# in the unpacked tree.
need_debs systemd man-db procps
sed "s#/usr/local/bin/tunnel#$CLI/bin/tunnel#g" "$CLI/lib/systemd/system/libtunnel-relay.service" >"$T/libtunnel-relay.service"
grep -q '^Type=notify$' "$T/libtunnel-relay.service" || fail "the unit is not Type=notify"
grep -q '^RestrictAddressFamilies=.*AF_NETLINK' "$T/libtunnel-relay.service" || fail "the unit does not allow AF_NETLINK"
! grep -q curl "$T/libtunnel-relay.service" || fail "the unit still needs curl"
said=$(MANPATH="$CLI/share/man" systemd-analyze verify "$T/libtunnel-relay.service" 2>&1) \
  || fail "systemd-analyze verify of the tarball's unit: $said"
! grep -q 'libtunnel-relay.service:' <<<"$said" || fail "systemd-analyze verify warns about the tarball's unit: $said"
echo "ok: systemd-analyze verify of the tarball's unit (man page found in the tarball)"
keys=$("$CLI/bin/tunnel" keygen --kid 1)
KEY=$(sed -n 's/^TUNNEL_KEY=//p' <<<"$keys")
AUTH_KEYS=$(sed -n "s/^TUNNEL_AUTH_KEYS='\(.*\)'$/\1/p" <<<"$keys")
[ -n "$KEY" ] && [ -n "$AUTH_KEYS" ] || fail "tunnel keygen printed: $keys"
spawn cli-relay env -i -C "$T" PATH="$PATH" TUNNEL_AUTH_KEYS="$AUTH_KEYS" TUNNEL_ALLOW="$ALLOW" "$CLI/bin/tunnel" server --listen 127.0.0.1:0
URL=$(ready "$OUT_FD" "relay listening: ") || fail "tunnel server did not start"
got=$(TUNNEL_RELAY="$URL" TUNNEL_KEY="$KEY" timeout 60 "$CLI/bin/tunnel" dial "$TARGET" <"$T/payload" 2>"$T/cli-dial.log") \
  || fail "tunnel dial failed"
check "tunnel dial through tunnel server" "$got"

step "dist: the C tarball"
tar -xzf "$DIST/libtunnel-c-$VERSION-$PLATFORM.tar.gz" -C "$T"
C="$T/libtunnel-c-$VERSION-$PLATFORM"
[ -L "$C/lib/libtunnel.so" ] && [ -f "$C/lib/libtunnel.so.$VERSION" ] || fail "libtunnel.so and its links are not in the C tarball"
soname=$(objdump -p "$C/lib/libtunnel.so.$VERSION" | awk '/SONAME/ {print $2}')
[ -L "$C/lib/$soname" ] || fail "no $soname link beside libtunnel.so.$VERSION"
export PKG_CONFIG_PATH="$C/lib/pkgconfig"
[ "$(pkg-config --modversion tunnel)" = "$VERSION" ] || fail "pkg-config --modversion tunnel"
cmp -s "$C/README.md" ffi/README.md || fail "the C tarball's README.md is not ffi/README.md"
for f in examples/c/*.c; do cmp -s "$C/examples/${f##*/}" "$f" || fail "the C tarball lacks $f"; done
echo "ok: the C tarball carries README.md and the C examples"
read -ra shared <<<"$(pkg-config --cflags --libs tunnel)"
read -ra static <<<"$(pkg-config --static --cflags --libs tunnel)"
for prog in relay dial; do
  cc -Wall -Wextra -Werror -pedantic "examples/c/$prog.c" -o "$T/$prog-shared" "${shared[@]}" -Wl,-rpath,"$C/lib"
  # -l:libtunnel.a picks the archive even though libtunnel.so sits beside it.
  cc -Wall -Wextra -Werror -pedantic "examples/c/$prog.c" -o "$T/$prog-static" "${static[@]/#-ltunnel/-l:libtunnel.a}"
done
grep -q "$soname => $C/lib/" <<<"$(ldd "$T/dial-shared")" || fail "dial-shared does not load $soname from the tarball"
! grep -q libtunnel <<<"$(ldd "$T/dial-static")" || fail "dial-static is linked to libtunnel.so"
echo "ok: compiled examples/c/relay.c and dial.c with pkg-config, shared ($soname via rpath) and static"
unset PKG_CONFIG_PATH
for pair in "shared static" "static shared"; do
  read -r rk dk <<<"$pair"
  # The relay example serves until its stdin's EOF: its stdin is a FIFO we hold open.
  mkfifo "$T/relay-$rk.in"
  SPAWN_IN="$T/relay-$rk.in" spawn "relay-$rk" env -C "$T" "$T/relay-$rk" listen=127.0.0.1:0 "auth_keys=$AUTH_KEYS" "allow=$ALLOW"
  exec {relay_in}>"$T/relay-$rk.in"
  URL=$(ready "$OUT_FD" "relay listening: ") || fail "relay-$rk did not start"
  got=$(TUNNEL_RELAY="$URL" TUNNEL_KEY="$KEY" timeout 60 "$T/dial-$dk" "$TARGET" <"$T/payload" 2>"$T/dial-$dk.log") \
    || fail "dial-$dk through relay-$rk failed"
  check "C dial ($dk link) through the C embedded relay ($rk link)" "$got"
  exec {relay_in}>&-
  wait "$PID" || fail "relay-$rk did not stop cleanly at its stdin's EOF"
done

step "dist: the Python wheel"
wheels=("$DIST"/libtunnel-"$VERSION"-*.whl)
[ -f "${wheels[0]}" ] || fail "no wheel in dist/"
( py_venv "$T/venv" && python -m pip install -q --no-index "${wheels[0]}" \
  && cd "$T" && python -c '
import hashlib, sys, libtunnel
target, payload, key = sys.argv[1], open(sys.argv[2], "rb").read(), libtunnel.keygen(3)
relay = libtunnel.Server({"listen": "127.0.0.1:0", "auth_keys": libtunnel.auth_keys(key),
                         "allow": [{"host": "127.0.0.1", "port": int(target.rsplit(":", 1)[1])}]}, env=False)
assert libtunnel.__file__.startswith(sys.prefix), libtunnel.__file__
with libtunnel.Dialer(relay.url, key=key, timeout=30) as dialer, dialer.dial(target) as s:
    s.sendall(payload)
    s.shutdown(1)
    got = b"".join(iter(lambda: s.recv(65536), b""))
relay.shutdown()
print(got.decode())' "$TARGET" "$T/payload" ) >"$T/py.out" 2>"$T/py.log" \
  || fail "the wheel's round trip failed"
check "wheel: import libtunnel, embedded Server, Dialer.dial" "$(cat "$T/py.out")"

step "dist: the npm tarball"
mkdir -p "$T/app"
(cd "$T/app" && npm init -y >/dev/null && npm install --offline --no-audit --no-fund --silent "$DIST/libtunnel-node-$VERSION-$PLATFORM.tgz")
[ -f "$T/app/node_modules/libtunnel/libtunnel.linux-x64-gnu.node" ] || fail "the npm tarball holds no linux-x64-gnu addon"
(cd "$T/app" && node -e '
const crypto = require("node:crypto"), fs = require("node:fs")
const { Server, Dialer, generateKey } = require("libtunnel")
async function main () {
  const [target, file] = process.argv.slice(1)
  if (!require.resolve("libtunnel").startsWith(process.cwd())) throw new Error("not the installed package")
  const { key, authKeys } = generateKey(5)
  const port = Number(target.split(":")[1])
  const server = await Server.start({ listen: "127.0.0.1:0", auth_keys: authKeys, allow: [{ host: "127.0.0.1", port }] }, { env: false })
  const dialer = await Dialer.connect({ relay: server.url, key })
  const socket = await dialer.dial(target)
  const chunks = []
  socket.on("data", (c) => chunks.push(c))
  const ended = new Promise((resolve, reject) => { socket.on("end", resolve); socket.on("error", reject) })
  socket.end(fs.readFileSync(file))
  await ended
  await dialer.close()
  await server.close()
  console.log(Buffer.concat(chunks).toString())
}
main().catch((err) => { console.error(err); process.exit(1) })' "$TARGET" "$T/payload") >"$T/node.out" 2>"$T/node.log" \
  || fail "the npm package's round trip failed"
check "npm package: Server.start, Dialer.connect, dial" "$(cat "$T/node.out")"

step "dist: glibc $GLIBC at most (objdump -T, auditwheel show)"
# newest_glibc FILE: the newest GLIBC_x.y version FILE's dynamic symbols need.
newest_glibc() { objdump -T "$1" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n 1; }
for f in "$CLI/bin/tunnel" "$C/lib/libtunnel.so.$VERSION" "$T"/venv/lib/python*/site-packages/libtunnel/_native*.so \
  "$T/app/node_modules/libtunnel/libtunnel.linux-x64-gnu.node"; do
  got=$(newest_glibc "$f")
  [ "$(printf '%s\n' "$got" "$GLIBC" | sort -V | tail -n 1)" = "$GLIBC" ] \
    || fail "${f##*/} needs GLIBC_$got, newer than the target $GLIBC: objdump -T $f | grep GLIBC_$got"
  echo "ok: ${f##*/} needs glibc $got at most"
done
py_venv "$CARGO_TARGET_DIR/dist-venv" maturin ziglang auditwheel
shown=$(auditwheel show "${wheels[0]}")
tag="manylinux_${GLIBC//./_}_$(uname -m)"
grep -q "\"$tag\"" <<<"$shown" || fail "auditwheel show does not find the wheel consistent with $tag: $shown"
echo "ok: auditwheel show: $(tr '\n' ' ' <<<"$shown" | grep -o 'consistent with the following platform tag: "[^"]*"')"
deactivate

step "dist: artifact sizes"
(cd "$DIST" && for f in *; do [ "$f" = SHA256SUMS ] || printf '%8s  %s\n' "$(du -h --apparent-size "$f" | cut -f1)" "$f"; done)
printf '%8s  %s\n' "$(du -h --apparent-size "$CLI/bin/tunnel" | cut -f1)" "tunnel (unpacked)"
for f in "$C/lib/libtunnel.so.$VERSION" "$C/lib/libtunnel.a" "$T"/venv/lib/python*/site-packages/libtunnel/_native*.so \
  "$T/app/node_modules/libtunnel/libtunnel.linux-x64-gnu.node"; do printf '%8s  %s\n' "$(du -h --apparent-size "$f" | cut -f1)" "${f##*/} (unpacked)"; done
echo "dist built in ${built}s, artifacts checked in $((SECONDS - started - built))s"
if [ "${LIBTUNNEL_SKIP_OLD_LINUX:-}" != 1 ]; then
  old=$SECONDS
  bash scripts/test-old-linux.sh
  echo "Debian 11 check in $((SECONDS - old))s"
fi
