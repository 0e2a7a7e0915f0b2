#!/usr/bin/env bash
# Node bindings: npm ci, napi debug build into the shared target dir, node --test (bindings/node/test)
# Run from the repo root (scripts/test.sh does, with CARGO_TARGET_DIR exported). Needs Rust and
# Node >= 18; installs the pinned npm devDependencies (@napi-rs/cli, ws, undici) from the
# committed package-lock.json. Quick on re-run: npm ci is skipped while node_modules matches the
# lock file, and cargo rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

command -v node >/dev/null || { echo "node not found: install Node.js 20 (https://nodejs.org)" >&2; exit 1; }
command -v npm >/dev/null || { echo "npm not found: install Node.js 20 with npm" >&2; exit 1; }

cd bindings/node
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
fi

# Debug build of the addon (cargo metadata gives napi the shared target dir); writes
# libtunnel.<platform>.node here and regenerates native.js / native.d.ts.
npx --no-install napi build --platform --js native.js --dts native.d.ts

# Each test bounds its own waits; the outer timeout only guards against a wedged runner.
timeout 600 node --test --test-concurrency=1 test/*.test.js
