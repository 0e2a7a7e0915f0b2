#!/usr/bin/env bash
# Soak: many short connections through the relay via the `tunnel` binary (client -> `tunnel
# forward` -> `tunnel server` -> echo server, multiplexed), with the open fds and RSS of both tunnel
# processes before, during and after. A leak shows as fds or RSS that keep growing batch after
# batch. Reports figures; not part of CI. Fails only if the connections fail or fds leak.
#
#   bench/soak.sh                          200,000 connections in batches of 10,000
#   SOAK_CONNECTIONS=20000 bench/soak.sh   a shorter run
#   SOAK_MODE=classic bench/soak.sh        one WebSocket per connection instead
#   SOAK_NO_BUILD=1 bench/soak.sh          use the release binaries already built
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
N=${SOAK_CONNECTIONS:-200000}
BATCH=${SOAK_BATCH:-10000}
MODE=${SOAK_MODE:-mux}
# fds a tunnel process may hold after the run beyond what it held before (pooled sessions, timers).
FD_SLACK=${SOAK_FD_SLACK:-50}
OUT=${SOAK_OUT:-$HERE/results/soak-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/logs"
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

if [[ "${SOAK_NO_BUILD:-0}" != 1 ]]; then
    log "building release binaries (target dir $TARGET_DIR)"
    (cd "$ROOT" && cargo build --release -q -p libtunnel --features cli --bin tunnel) || { log "building tunnel failed"; exit 1; }
    (cd "$ROOT" && cargo build --release -q -p libtunnel-bench) || { log "building tunnel-bench failed"; exit 1; }
fi
TUNNEL=$TARGET_DIR/release/tunnel
GEN=$TARGET_DIR/release/tunnel-bench
for b in "$TUNNEL" "$GEN"; do [[ -x "$b" ]] || { log "missing binary $b"; exit 1; }; done
ulimit -n 65536 2>/dev/null || true

start_bg echo "$GEN" server --listen 127.0.0.1:0
ECHO=$(wait_line "$LOG" '127\.0\.0\.1:[0-9]+' 10) || { log "echo server did not start"; exit 1; }
KEYGEN=$("$TUNNEL" keygen)
CLIENT_KEY=$(sed -n 's/^TUNNEL_KEY=//p' <<<"$KEYGEN")
RELAY_KEYS=$(sed -n "s/^TUNNEL_AUTH_KEYS='\(.*\)'$/\1/p" <<<"$KEYGEN")
TUNNEL_LISTEN=127.0.0.1:0 TUNNEL_AUTH_KEYS="$RELAY_KEYS" TUNNEL_ALLOW="[{\"host\":\"127.0.0.1\",\"port\":${ECHO##*:}}]" \
    start_bg relay "$TUNNEL" server
RELAY=$LAST_PID
URL=$(wait_line "$LOG" 'ws://127\.0\.0\.1:[0-9]+' 10) || { log "tunnel server did not start (see $LOG)"; exit 1; }
flag=(); [[ $MODE == classic ]] && flag=(--classic)
TUNNEL_KEY="$CLIENT_KEY" start_bg forward "$TUNNEL" forward 127.0.0.1:0 "$ECHO" --relay "$URL" "${flag[@]}"
FWD=$LAST_PID
ADDR=$(wait_line "$LOG" 'forwarding 127\.0\.0\.1:[0-9]+' 10) || { log "tunnel forward did not start (see $LOG)"; exit 1; }
ADDR=${ADDR#forwarding }

fds() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null; }
row() { printf '%-10s %9s   relay fds %5s rss %7s KiB   forward fds %5s rss %7s KiB\n' "$1" "$2" "$(fds $RELAY)" "$(rss $RELAY)" "$(fds $FWD)" "$(rss $FWD)"; }

"$GEN" connect --addr "$ADDR" --count 1000 --warmup 0 >>"$OUT/raw.txt" 2>&1 || { log "warm-up failed (see $OUT/raw.txt)"; exit 1; }
sleep 1
read -r RELAY_FD0 FWD_FD0 <<<"$(fds $RELAY) $(fds $FWD)"
RELAY_RSS0=$(rss $RELAY); FWD_RSS0=$(rss $FWD)
row before 0 | tee "$OUT/soak.txt"
done_n=0; failed=0; t0=$(date +%s)
while (( done_n < N )); do
    n=$(( N - done_n < BATCH ? N - done_n : BATCH ))
    if ! "$GEN" connect --addr "$ADDR" --count "$n" --warmup 0 >>"$OUT/raw.txt" 2>&1; then
        failed=1; log "a batch failed (see $OUT/raw.txt)"; break
    fi
    done_n=$(( done_n + n ))
    row batch "$done_n" | tee -a "$OUT/soak.txt"
done
secs=$(( $(date +%s) - t0 ))
sleep 2 # let the last closes settle
row after "$done_n" | tee -a "$OUT/soak.txt"
RELAY_FD1=$(fds $RELAY); FWD_FD1=$(fds $FWD)
echo "$done_n connections in ${secs}s; fds relay $RELAY_FD0 -> $RELAY_FD1, forward $FWD_FD0 -> $FWD_FD1; RSS relay $RELAY_RSS0 -> $(rss $RELAY) KiB, forward $FWD_RSS0 -> $(rss $FWD) KiB" | tee -a "$OUT/soak.txt"
if (( RELAY_FD1 > RELAY_FD0 + FD_SLACK || FWD_FD1 > FWD_FD0 + FD_SLACK )); then
    log "fds grew by more than $FD_SLACK: a leak"; failed=1
fi
exit $failed
