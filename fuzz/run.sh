#!/usr/bin/env bash
# Runs every fuzz target for a bounded time, one after another, and prints executions and coverage
# per target. Needs nightly and cargo-fuzz (`cargo install cargo-fuzz --locked`); CI does not run
# this, it replays the committed corpus instead (core/tests/it/fuzz_regressions.rs).
#
#   FUZZ_SECONDS=60 fuzz/run.sh            # every target, 60 s each (the default)
#   FUZZ_SECONDS=30 fuzz/run.sh socks5     # some targets
#   FUZZ_MINIMIZE=1 fuzz/run.sh            # afterwards, `cargo fuzz cmin` each working corpus
#   FUZZ_NO_BUILD=1 fuzz/run.sh            # use the binaries already built
#
# The committed seeds in fuzz/corpus/<target> are read, never written: new inputs go to
# fuzz/corpus-work/<target> (gitignored). Crashes land in fuzz/artifacts/<target>; copy each into
# fuzz/regressions/<target>/ so the stable test replays it.
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_EACH="${FUZZ_SECONDS:-60}"
TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=(socks5 mux_frames server_connect auth_proof listen_hello http_host dial_route config)
unset CARGO_TARGET_DIR   # the fuzz crate builds in fuzz/target with its own flags
LOGDIR="target/fuzz-logs"
mkdir -p "$LOGDIR"

command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz not found: cargo install cargo-fuzz --locked" >&2; exit 1; }
# Build once, then run the binaries directly (`cargo fuzz run` would rebuild whenever core/ changes).
if [ "${FUZZ_NO_BUILD:-0}" != 1 ]; then
  nice -n 10 cargo +nightly fuzz build >"$LOGDIR/build.log" 2>&1 || { tail -30 "$LOGDIR/build.log" >&2; exit 1; }
fi
BIN="target/$(rustc +nightly -vV | sed -n 's/^host: //p')/release"

summary=()
status=0
for t in "${TARGETS[@]}"; do
  mkdir -p "corpus-work/$t" "corpus/$t" "artifacts/$t"
  log="$LOGDIR/$t.log"
  echo "== $t: ${SECONDS_EACH}s"
  # -timeout: one input may take at most 20 s (the live-relay targets do real loopback I/O).
  if nice -n 10 "$BIN/$t" "corpus-work/$t" "corpus/$t" -artifact_prefix="artifacts/$t/" \
      -max_total_time="$SECONDS_EACH" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    result=ok
  else
    result="CRASH (see $log and artifacts/$t)"
    status=1
  fi
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  last=$(grep -E '^#[0-9]+' "$log" | tail -1)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\/[0-9a-zA-Z]*\).*/\1/p' <<<"$last")
  summary+=("$(printf '%-15s %10s %8s %7s %7s %12s  %s' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$result")")
  if [ "${FUZZ_MINIMIZE:-0}" = 1 ]; then
    nice -n 10 cargo +nightly fuzz cmin "$t" "corpus-work/$t" >>"$log" 2>&1 || true
  fi
done

echo
printf '%-15s %10s %8s %7s %7s %12s  %s\n' target execs exec/s cov ft corpus result
printf '%s\n' "${summary[@]}"
echo "(cov = covered edges, ft = features, as libFuzzer counts them; ${SECONDS_EACH}s per target)"
exit $status
