#!/usr/bin/env bash
# The cost of one node-to-node hop in a relay cluster: two `tunnel server` nodes on one Redis
# (Debian's redis-server), a `tunnel listen` in front of the echo server registered on node A, and
# two `tunnel forward`s dialing it by name, one through node A (the stream stays on one node) and
# one through node B (B forwards it to A over their node-to-node session, on the raw-TCP
# transport the nodes advertise). Reports connect +
# first byte p50/p99 and one-stream throughput for both, and the ratios.
#
#   bench/cluster.sh                 full run (2,000 connects, 2 GiB)
#   BENCH_QUICK=1 bench/cluster.sh   smoke run (200 connects, 256 MiB)
#
# Environment (optional): BENCH_CONNECTS, BENCH_BYTES, BENCH_NO_BUILD=1, BENCH_OUT=DIR.
# Benchmarks report figures; nothing here asserts a timing.
set -uo pipefail
export RUST_LOG=${RUST_LOG:-info,libtunnel::conn=warn}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case "${1:-}" in
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    "") ;;
    *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
esac
if [[ "${BENCH_QUICK:-0}" == 1 ]]; then D_CONNECTS=200; D_BYTES=$((256 << 20)); else D_CONNECTS=2000; D_BYTES=$((2 << 30)); fi
CONNECTS=${BENCH_CONNECTS:-$D_CONNECTS}
BYTES=${BENCH_BYTES:-$D_BYTES}
OUT=${BENCH_OUT:-$HERE/results/cluster-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/logs"
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

command -v redis-server >/dev/null || install_debs redis-server
if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
    log "building release binaries (target dir $TARGET_DIR)"
    (cd "$ROOT" && cargo build --release -q -p libtunnel --features cli --bin tunnel && cargo build --release -q -p libtunnel-bench) \
        || { log "build failed"; exit 1; }
fi
TUNNEL=$TARGET_DIR/release/tunnel
GEN=$TARGET_DIR/release/tunnel-bench
ready() { wait_line "$LOG" "$2" 10 || { log "$1 did not start (see $LOG)"; exit 1; }; }

REDIS_PORT=$("$GEN" freeport)
start_bg redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no
ready redis 'Ready to accept connections' >/dev/null

start_bg echo "$GEN" server --listen 127.0.0.1:0
ECHO=$(ready echo '127\.0\.0\.1:[0-9]+')
KEYGEN=$("$TUNNEL" keygen)
CLIENT_KEY=$(sed -n 's/^TUNNEL_KEY=//p' <<<"$KEYGEN")
RELAY_KEYS=$(sed -n "s/^TUNNEL_AUTH_KEYS='\(.*\)'$/\1/p" <<<"$KEYGEN")
CLUSTER_KEY=$("$TUNNEL" keygen | sed -n 's/^TUNNEL_KEY=//p')
node() { # name -> the node's ws:// URL
    TUNNEL_LISTEN=127.0.0.1:0 TUNNEL_TCP_LISTEN=127.0.0.1:0 TUNNEL_AUTH_KEYS="$RELAY_KEYS" TUNNEL_LISTENERS_OPEN=true \
        TUNNEL_ALLOW="[{\"host\":\"127.0.0.1\",\"port\":${ECHO##*:}}]" \
        TUNNEL_CLUSTER_REDIS="redis://127.0.0.1:$REDIS_PORT" TUNNEL_CLUSTER_KEY="$CLUSTER_KEY" \
        start_bg "node-$1" "$TUNNEL" server
    ready "node-$1" 'ws://127\.0\.0\.1:[0-9]+'
}
NODE_A=$(node a); PID_A=$LAST_PID
NODE_B=$(node b); PID_B=$LAST_PID
"$TUNNEL" keygen --listener --out "$OUT/echo.pem" >/dev/null
start_bg listen "$TUNNEL" listen --to "$ECHO" --relay "$NODE_A" --key "$OUT/echo.pem"
NAME=$(ready listen 'listening as: [a-z0-9-]+'); NAME=${NAME#listening as: }
forward() { # tag relay -> local address
    TUNNEL_KEY="$CLIENT_KEY" start_bg "forward-$1" "$TUNNEL" forward 127.0.0.1:0 "$NAME:0" --relay "$2"
    local f; f=$(ready "forward-$1" 'forwarding 127\.0\.0\.1:[0-9]+') || exit 1
    echo "${f#forwarding }"
}
SAME=$(forward same "$NODE_A")
HOP=$(forward hop "$NODE_B")
log "nodes $NODE_A (holds $NAME) and $NODE_B; $CONNECTS connects, $BYTES bytes per transfer"

declare -A R=()
for path in same hop; do
    addr=$SAME; pids=$PID_A
    [[ $path == hop ]] && { addr=$HOP; pids="$PID_A,$PID_B"; }
    line=$("$GEN" connect --addr "$addr" --count "$CONNECTS" 2>>"$OUT/logs/gen.err" | tail -n 1)
    R[$path.p50]=$(grep -oE 'p50_us=[0-9.]+' <<<"$line" | cut -d= -f2)
    R[$path.p99]=$(grep -oE 'p99_us=[0-9.]+' <<<"$line" | cut -d= -f2)
    log "  connect $path: $line"
    line=$("$GEN" throughput --addr "$addr" --streams 1 --bytes "$BYTES" --pids "$pids" 2>>"$OUT/logs/gen.err" | tail -n 1)
    R[$path.mib]=$(grep -oE 'mib_s=[0-9.]+' <<<"$line" | cut -d= -f2)
    R[$path.cpu]=$(grep -oE 'cpu_s_per_gb=[0-9.]+' <<<"$line" | cut -d= -f2)
    log "  throughput $path: $line"
done
{
    printf '| dial by name | one node | one node-to-node hop | hop - one node | ratio |\n|---|---|---|---|---|\n'
    printf '| connect + 1st byte p50 (us) | %s | %s | %s | |\n' "${R[same.p50]}" "${R[hop.p50]}" "$(awk -v a="${R[same.p50]}" -v b="${R[hop.p50]}" 'BEGIN { printf "%+.0f", b - a }')"
    printf '| connect + 1st byte p99 (us) | %s | %s | %s | |\n' "${R[same.p99]}" "${R[hop.p99]}" "$(awk -v a="${R[same.p99]}" -v b="${R[hop.p99]}" 'BEGIN { printf "%+.0f", b - a }')"
    printf '| throughput, 1 stream (MiB/s) | %s | %s | | %s |\n' "${R[same.mib]}" "${R[hop.mib]}" "$(awk -v a="${R[same.mib]}" -v b="${R[hop.mib]}" 'BEGIN { printf "%.2fx", b / a }')"
    printf '| relay CPU (s/GB; A, then A+B) | %s | %s | %s | |\n' "${R[same.cpu]}" "${R[hop.cpu]}" "$(awk -v a="${R[same.cpu]}" -v b="${R[hop.cpu]}" 'BEGIN { printf "%+.3f", b - a }')"
} | tee "$OUT/table.md"
