#!/usr/bin/env bash
# Python bindings: build the wheel with maturin, install it in a venv, stubtest + mypy, pytest (with a real PostgreSQL)
#
# Run from anywhere (scripts/test.sh runs it from the repo root). Installs what it needs on a fresh
# Debian machine: python3-venv and postgresql through apt-get (sudo when not root, skipped when
# present), then a virtualenv under $CARGO_TARGET_DIR/py-venv (reused; pip runs only when the
# requirement list changed) with maturin, pytest, pytest-timeout, mypy and the database drivers.
# The wheel is built in the debug profile into the shared Cargo target dir.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
PKG="$ROOT/bindings/python"
VENV="$CARGO_TARGET_DIR/py-venv"
WHEELS="$CARGO_TARGET_DIR/wheels/python"
REQUIREMENTS=(maturin pytest pytest-timeout mypy "psycopg[binary]" pg8000 asyncpg grpcio trustme)
# The gRPC test's server is Node's @grpc/grpc-js (the client is Python's grpcio).
GRPC_NODE="$CARGO_TARGET_DIR/grpc-node"
GRPC_JS_VERSION=1.14.7

# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

# The test fixture runs PostgreSQL's initdb/pg_ctl (found by glob under /usr/lib/postgresql).
need_debs postgresql
# tests/test_proxy.py puts a real squid (HTTP CONNECT with Basic auth) between client and relay.
need_debs squid openssl
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_debs postgresql
py_venv "$VENV" "${REQUIREMENTS[@]}"

echo "building the wheel (maturin, debug profile, target dir $CARGO_TARGET_DIR)"
rm -rf "$WHEELS"
(cd "$PKG" && maturin build --quiet --out "$WHEELS")
python -m pip install -q --force-reinstall --no-deps "$WHEELS"/libtunnel-*.whl

echo "checking the stub against the built module (mypy.stubtest) and the package types (mypy --strict)"
# Outside the source tree, so the installed package (with its native module) is what gets checked.
(cd "$CARGO_TARGET_DIR" && python -m mypy.stubtest libtunnel._native)
(cd "$PKG" && python -m mypy --strict --cache-dir "$CARGO_TARGET_DIR/mypy-cache" -p libtunnel --python-executable "$VENV/bin/python" \
  && python -m mypy --ignore-missing-imports --cache-dir "$CARGO_TARGET_DIR/mypy-cache" "$ROOT/examples/python")

if [ ! -f "$GRPC_NODE/node_modules/@grpc/grpc-js/package.json" ] \
  || [ "$(node -p "require('$GRPC_NODE/node_modules/@grpc/grpc-js/package.json').version")" != "$GRPC_JS_VERSION" ]; then
  command -v npm >/dev/null || { echo "npm not found: install Node.js 20 with npm (the gRPC test runs a Node server)" >&2; exit 1; }
  mkdir -p "$GRPC_NODE"
  npm install --silent --no-save --no-audit --no-fund --prefix "$GRPC_NODE" "@grpc/grpc-js@$GRPC_JS_VERSION"
fi
export LIBTUNNEL_GRPC_NODE_MODULES="$GRPC_NODE/node_modules"

echo "running pytest"
cd "$PKG"
python -m pytest -p no:cacheprovider -ra tests

echo "the shell blocks of bindings/python/README.md, as pasted (scripts/readme_blocks.py)"
python "$ROOT/scripts/readme_blocks.py" sh bindings/python/README.md
