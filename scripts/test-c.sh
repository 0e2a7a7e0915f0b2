#!/usr/bin/env bash
# C ABI: header check, C programs with ASan (shared + static), examples under valgrind, make install + pkg-config, the C and shell blocks of the READMEs and docs/
# Builds libtunnel.so / libtunnel.a, then runs ffi/tests (header regeneration, the C programs in
# tests/c and examples/c against a live loopback relay, the install story). Installs the Debian
# packages it needs when missing (valgrind, pkg-config, make, gcc); cbindgen is a pinned Rust
# dev-dependency, so nothing else is installed. Re-runs are incremental.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

# shellcheck source=scripts/lib.sh
source scripts/lib.sh
need_debs valgrind pkg-config make gcc libc6-dev
# tests/c/test_client.c reaches the relay through a SOCKS5 proxy with a password.
need_debs microsocks

# The C programs link the libraries cargo builds here (target/debug); build them first, since
# `cargo test` alone does not refresh the cdylib when only a dependency changed.
cargo build -p libtunnel-ffi
cargo test -p libtunnel-ffi --no-fail-fast -- --test-threads=2

# Every code block of every README and docs/ page is run by a test or marked with why not
# (scripts/readme_blocks.py); the shell blocks of README.md, ffi/README.md, docs/ and
# bench/README.md run here as pasted, with the CLI on PATH and `make install` reusing the debug
# build above. The docs' terminal groups run in namespaces of their own (unshare, as root) against
# a relay, PostgreSQL (psql) and HTTP servers their hidden setup starts (scripts/readme_setup.sh).
need_debs postgresql postgresql-client curl openssl iproute2 util-linux openssh-client openssh-server
python3 scripts/readme_blocks.py check
cargo build -p libtunnel --features cli --bin tunnel
PATH="$CARGO_TARGET_DIR/debug:$PATH" PROFILE=debug python3 scripts/readme_blocks.py sh README.md ffi/README.md docs/ bench/README.md
