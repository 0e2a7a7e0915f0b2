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

# shellcheck source=scripts/lib.sh
source scripts/lib.sh
node_deps
# test/proxy.test.js puts a real squid (HTTP CONNECT with Basic auth) between client and relay.
need_debs squid openssl
cd bindings/node

# Debug build of the addon (cargo metadata gives napi the shared target dir); writes
# libtunnel.<platform>.node here and regenerates native.js / native.d.ts.
npx --no-install napi build --platform --js native.js --dts native.d.ts

# Each test bounds its own waits; the outer timeout only guards against a wedged runner.
timeout 600 node --test --test-concurrency=1 test/*.test.js

# The shell blocks of this README, as pasted (scripts/readme_blocks.py; `npx libtunnel` is this build).
python3 ../../scripts/readme_blocks.py sh bindings/node/README.md
