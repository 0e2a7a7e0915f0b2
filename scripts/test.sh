#!/usr/bin/env bash
# Runs every test of every language in the repo (the README's test command, and what CI runs).
# Installs what the tests need first, so it works on a fresh machine: Debian packages through
# apt-get (as root or with sudo), Rust components through rustup. Prints a summary at the end,
# including every test that reported itself as skipped and why.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
LOGDIR="$CARGO_TARGET_DIR/test-logs"
mkdir -p "$LOGDIR"

# shellcheck source=scripts/lib.sh
source scripts/lib.sh

command -v cargo >/dev/null || { echo "cargo not found: install Rust from https://rustup.rs" >&2; exit 1; }
# The cluster tests (core/tests/it/cluster.rs): Redis with Sentinel, HAProxy, and headless Chromium for
# the dashboard.
need_debs curl ca-certificates openssl redis-server redis-sentinel haproxy chromium
# systemd-analyze verify of the relay's unit, with its man: link (core/tests/it/deploy_files.rs).
need_debs systemd man-db procps
# Upstream proxies in front of the relay (core/tests/it/client_config.rs): squid (HTTP CONNECT with
# Basic auth, and HTTPS; also the only way out of a network namespace), dante (SOCKS5 with a
# system-account password, run in a private mount namespace) and microsocks (SOCKS5 with a
# password on its command line, also used by the C test); unshare/nsenter/ip for the namespaces.
need_debs squid dante-server microsocks util-linux iproute2 openssl
# The gRPC transport (core/tests/it/grpc*.rs): nginx with grpc_pass in front of the relay, and
# protoc for the Go client generated from proto/libtunnel/v1/tunnel.proto.
need_debs nginx-light protobuf-compiler

# Tests that cannot run here append a line saying why.
export LIBTUNNEL_SKIP_LOG="$LOGDIR/skipped.txt"
rm -f "$LIBTUNNEL_SKIP_LOG"

step "Rust: core unit and integration tests, CLI, Emissary interop (Go, from the snapshot in ../shared/emissary)"
python3 scripts/check-import-circles.py 2>&1 | tee "$LOGDIR/import-circles.log"
cargo test -p libtunnel --features cli --no-fail-fast 2>&1 | tee "$LOGDIR/rust.log"

# Each language face has its own script, which installs what it needs (Debian packages, a Python
# virtualenv, npm packages) and shares this Cargo target dir; then the release artifacts of
# `make dist`, each installed from itself and run.
for face in c python node dist; do
  script="scripts/test-$face.sh"
  [ -f "$script" ] || continue
  step "$face: $(sed -n 2p "$script" | sed 's/^# *//')"
  bash "$script" 2>&1 | tee "$LOGDIR/$face.log"
done

step "summary"
echo "all test suites passed"
if [ -s "$LIBTUNNEL_SKIP_LOG" ]; then
  echo "skipped (with the reason each test gave):"
  awk '!seen[$0]++' "$LIBTUNNEL_SKIP_LOG" | sed 's/^/  /'
fi
