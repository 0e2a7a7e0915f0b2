#!/usr/bin/env bash
# Release artifacts into dist/ (`make dist`): the CLI tarball, the C tarball, the Python wheel and the npm tarball
#
#   dist/libtunnel-cli-VERSION-linux-ARCH.tar.gz  bin/tunnel, man page, bash/zsh/fish completions, README.md,
#                                                 LICENSE, the relay's systemd unit (lib/systemd/system) and
#                                                 its env/TOML examples (a prefix tree for /usr/local:
#                                                 share/man, share/doc/libtunnel, ...)
#   dist/libtunnel-c-VERSION-linux-ARCH.tar.gz    include/tunnel.h, lib/libtunnel.so.* (+ SONAME links),
#                                                 lib/libtunnel.a, lib/pkgconfig/tunnel.pc (relocatable),
#                                                 README.md (ffi/README.md) and the C examples
#   dist/libtunnel-VERSION-cp39-abi3-manylinux2014_ARCH.manylinux_2_17_ARCH.whl
#                                                 the Python package (maturin build --release --zig)
#   dist/libtunnel-node-VERSION-linux-ARCH.tgz    `npm pack` of bindings/node with the release addon
#   dist/SHA256SUMS
#
# Old Linux: every binary links against glibc GLIBC (default 2.17, manylinux2014: RHEL 7, Amazon
# Linux 2 and anything newer), whatever this machine's glibc: zig is the linker and C compiler
# (`ziglang` from PyPI; napi --zig for the cargo build below, maturin --zig for the wheel) with
# the target ARCH-unknown-linux-gnu.GLIBC. ARCH (DIST_ARCH, default this machine's) may be another:
# aarch64 needs `rustup target add aarch64-unknown-linux-gnu` only (zig links it); the man page and
# completions then come from a host build of the CLI. DIST_OUT: another output dir than dist/
# (emptied first), e.g. `DIST_ARCH=aarch64 DIST_OUT=dist-aarch64 make dist`.
# scripts/test-old-linux.sh runs the artifacts on Debian 11.
#
# All in the release profile (stripped). The Node addon, the C libraries and the CLI come from one
# cargo invocation; maturin's own (`cargo rustc`, one package) then rebuilds what its feature set
# changes (pyo3's macros, tracing with `log`). Installs what it needs: maturin in a virtualenv
# ($CARGO_TARGET_DIR/dist-venv, with ziglang), @napi-rs/cli from bindings/node/package-lock.json.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
ARCH="${DIST_ARCH:-$(uname -m)}"
GLIBC="${DIST_GLIBC:-2.17}"
TRIPLE="$ARCH-unknown-linux-gnu"
PLATFORM="linux-$ARCH"
BUILT="$CARGO_TARGET_DIR/$TRIPLE/release"
OUT="$(realpath -m "${DIST_OUT:-$ROOT/dist}")"  # absolute: steps below run in other directories
STAGE="$CARGO_TARGET_DIR/dist-stage-$ARCH"
# Reproducible tarballs: file times from the last commit, owner root, names sorted.
EPOCH=$(git log -1 --format=%ct 2>/dev/null || date +%s)
pack() { # pack DIR NAME: DIR/NAME as OUT/NAME.tar.gz
  tar -C "$1" --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$EPOCH" -czf "$OUT/$2.tar.gz" "$2"
}

need_debs make gcc pkg-config
rm -rf "$OUT" "$STAGE"
mkdir -p "$OUT" "$STAGE"
rustup target list --installed 2>/dev/null | grep -qx "$TRIPLE" || rustup target add "$TRIPLE" \
  || { echo "no Rust standard library for $TRIPLE: rustup target add $TRIPLE" >&2; exit 1; }
# zig (PyPI's ziglang) as `zig` on PATH for napi; maturin finds the module by itself. (auditwheel:
# for scripts/test-dist.sh.)
py_venv "$CARGO_TARGET_DIR/dist-venv" maturin ziglang auditwheel
printf '#!/bin/sh\nexec "%s" -m ziglang "$@"\n' "$CARGO_TARGET_DIR/dist-venv/bin/python" >"$CARGO_TARGET_DIR/dist-venv/bin/zig"
chmod +x "$CARGO_TARGET_DIR/dist-venv/bin/zig"

# One cargo invocation builds the Node addon, the C libraries and the CLI together (one feature
# set, so every shared crate is compiled once): napi's, which has to compile the addon itself to
# write native.js / native.d.ts. The package's files (package.json `files`) are copied beside the
# release addon in a staging dir, so the working tree keeps its debug addon.
step "dist: cargo build --release of the Node addon, the C libraries and the CLI (napi build)"
node_deps
NODE="$STAGE/node"
mkdir -p "$NODE"
(cd bindings/node && node -e '
  const fs = require("fs"), path = require("path"), dest = process.argv[1]
  const pkg = require("./package.json")
  for (const f of [...pkg.files, "package.json", "README.md"]) {
    if (f.includes("*") || f.startsWith("native.")) continue
    fs.cpSync(f, path.join(dest, f), { recursive: true })
  }' "$NODE")
install -m 644 LICENSE "$NODE/LICENSE"
# napi takes the destination relative to bindings/node, and --js / --dts relative to it.
(cd bindings/node && npx --no-install napi build --platform --release --js native.js --dts native.d.ts \
  --target "$TRIPLE" --zig --zig-abi-suffix "$GLIBC" \
  --cargo-flags="-p libtunnel-node -p libtunnel-ffi -p libtunnel --features libtunnel/cli" \
  "$(realpath --relative-to=. "$NODE")")

step "dist: the npm tarball (npm pack)"
(cd "$NODE" && npm pack --silent --pack-destination "$OUT" >/dev/null)
mv "$OUT/libtunnel-$VERSION.tgz" "$OUT/libtunnel-node-$VERSION-$PLATFORM.tgz"

step "dist: the C tarball (ffi/install.mk into a staging dir)"
C_NAME="libtunnel-c-$VERSION-$PLATFORM"
# CARGO=true: the libraries were just built above, by the same cargo invocation as the addon.
make --no-print-directory -f ffi/install.mk install CARGO=true BUILT="$BUILT" DESTDIR="$STAGE/c" PREFIX="/$C_NAME" \
  'PC_PREFIX=$${pcfiledir}/../..' >/dev/null
# The release profile strips linked outputs, not an archive: drop the debug info that the
# standard library's objects bring into libtunnel.a (symbols stay, so it links the same).
# The host's strip reads only its own architecture: another one's archive ships with its debug info.
if [ "$ARCH" = "$(uname -m)" ]; then
  strip --strip-debug "$STAGE/c/$C_NAME/lib/libtunnel.a"
fi
install -m 644 LICENSE "$STAGE/c/$C_NAME/LICENSE"
install -m 644 ffi/README.md "$STAGE/c/$C_NAME/README.md"
install -D -m 644 -t "$STAGE/c/$C_NAME/examples" examples/c/*.c
pack "$STAGE/c" "$C_NAME"

step "dist: the CLI tarball (binary, man page, completions, README and docs/, systemd unit and relay config examples)"
CLI_NAME="libtunnel-cli-$VERSION-$PLATFORM"
CLI="$STAGE/cli/$CLI_NAME"
install -D -m 755 "$BUILT/tunnel" "$CLI/bin/tunnel"
install -D -m 644 LICENSE "$CLI/share/doc/libtunnel/LICENSE"
install -m 644 README.md deploy/relay.env.example deploy/relay.toml.example "$CLI/share/doc/libtunnel/"
# The guides, references and design notes README.md links to, at the same relative paths.
cp -r docs "$CLI/share/doc/libtunnel/docs"
# Unpacked into /usr/local, the unit lands where systemd looks (/usr/local/lib/systemd/system).
install -D -m 644 deploy/libtunnel-relay.service "$CLI/lib/systemd/system/libtunnel-relay.service"
mkdir -p "$CLI/share/man/man1" "$CLI/share/bash-completion/completions" "$CLI/share/zsh/site-functions" \
  "$CLI/share/fish/vendor_completions.d"
# The binary writes its own man page and completions: a host build of it when ARCH is another.
run_tunnel="$CLI/bin/tunnel"
if [ "$ARCH" != "$(uname -m)" ]; then
  cargo build --release --quiet -p libtunnel --features cli --bin tunnel
  run_tunnel="$CARGO_TARGET_DIR/release/tunnel"
fi
"$run_tunnel" man >"$CLI/share/man/man1/tunnel.1"
"$run_tunnel" completions bash >"$CLI/share/bash-completion/completions/tunnel"
"$run_tunnel" completions zsh >"$CLI/share/zsh/site-functions/_tunnel"
"$run_tunnel" completions fish >"$CLI/share/fish/vendor_completions.d/tunnel.fish"
pack "$STAGE/cli" "$CLI_NAME"

step "dist: the Python wheel (maturin build --release --zig, manylinux_${GLIBC//./_})"
(cd bindings/python && maturin build --release --quiet --zig --target "$TRIPLE" --compatibility "manylinux_${GLIBC//./_}" --out "$OUT")

(cd "$OUT" && sha256sum -- * >SHA256SUMS)
step "dist: $OUT"
(cd "$OUT" && ls -l --block-size=K -- *)
