#!/usr/bin/env bash
# Reverse listeners under load: HTTP requests/s and latency percentiles (wrk) through the relay's
# public HTTP port (Host routing to a `tunnel listen` in front of a small HTTP server) against the
# same server direct, and dial-by-name connect latency (`tunnel forward` to NAME:0, through the
# relay, to a listener in front of the echo server) against a direct connect and a dial by address.
#
#   bench/http.sh                 full run (10 s per wrk run, 2,000 connects)
#   BENCH_QUICK=1 bench/http.sh   smoke run (3 s per wrk run, 200 connects)
#
# Environment (optional): HTTP_SECONDS, HTTP_CONNS ("1 50": wrk concurrency levels), BENCH_CONNECTS,
# BENCH_NO_BUILD=1, BENCH_OUT=DIR. wrk is installed from Debian (apt-get, with sudo when not root).
# Benchmarks report figures; nothing here asserts a timing.
set -uo pipefail
# No per-connection log lines (target libtunnel::conn): the figures measure the tunnel.
export RUST_LOG=${RUST_LOG:-info,libtunnel::conn=warn}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case "${1:-}" in
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    "") ;;
    *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
esac

if [[ "${BENCH_QUICK:-0}" == 1 ]]; then D_SECONDS=3; D_CONNECTS=200; else D_SECONDS=10; D_CONNECTS=2000; fi
SECONDS_PER_RUN=${HTTP_SECONDS:-$D_SECONDS}
CONNS=${HTTP_CONNS:-"1 50"}
CONNECTS=${BENCH_CONNECTS:-$D_CONNECTS}
OUT=${BENCH_OUT:-$HERE/results/http-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/logs"
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

if ! command -v wrk >/dev/null; then
    log "installing wrk from Debian"
    sudo=""; [[ $(id -u) -ne 0 ]] && sudo=sudo
    { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends wrk; } >"$OUT/logs/install-wrk.log" 2>&1 \
        || { log "cannot install wrk (see $OUT/logs/install-wrk.log)"; exit 1; }
fi
if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
    log "building release binaries (target dir $TARGET_DIR)"
    (cd "$ROOT" && cargo build --release -q -p libtunnel --features cli --bin tunnel && cargo build --release -q -p libtunnel-bench) \
        || { log "build failed"; exit 1; }
fi
TUNNEL=$TARGET_DIR/release/tunnel
GEN=$TARGET_DIR/release/tunnel-bench

ready() { # name regex -> the first match in the last started process's log, or exit
    wait_line "$LOG" "$2" 10 || { log "$1 did not start (see $LOG)"; exit 1; }
}

# The targets: the echo server of bench/run.sh and a fixed-answer HTTP server.
start_bg echo "$GEN" server --listen 127.0.0.1:0
ECHO=$(ready echo '127\.0\.0\.1:[0-9]+')
start_bg http-server "$GEN" http-server --listen 127.0.0.1:0
HTTP=$(ready http-server '127\.0\.0\.1:[0-9]+')

# A relay with a public HTTP port; listeners may register their key-derived names.
KEYGEN=$("$TUNNEL" keygen)
CLIENT_KEY=$(sed -n 's/^TUNNEL_KEY=//p' <<<"$KEYGEN")
RELAY_KEYS=$(sed -n "s/^TUNNEL_AUTH_KEYS='\(.*\)'$/\1/p" <<<"$KEYGEN")
TUNNEL_LISTEN=127.0.0.1:0 TUNNEL_HTTP_LISTEN=127.0.0.1:0 TUNNEL_AUTH_KEYS="$RELAY_KEYS" TUNNEL_LISTENERS_OPEN=true \
    TUNNEL_ALLOW="[{\"host\":\"127.0.0.1\",\"port\":${ECHO##*:}}]" \
    start_bg relay "$TUNNEL" server --set max_connections=100000 --set max_streams=100000 --set max_connections_per_source=50000 --set max_handshakes_per_source=20000 --set max_handshakes=20000 --set http_max_requests_per_source=100000 --set http_max_requests_per_listener=100000
RELAY_LOG=$LOG
RELAY=$(ready relay 'ws://127\.0\.0\.1:[0-9]+')
RELAY_HTTP=$(wait_line "$RELAY_LOG" 'http://127\.0\.0\.1:[0-9]+' 10) || { log "the relay has no public HTTP port"; exit 1; }
RELAY_HTTP=${RELAY_HTTP#http://}

listen() { # name target -> prints the registered name
    local key="$OUT/$1.pem" name
    "$TUNNEL" keygen --listener --out "$key" >/dev/null
    start_bg "listen-$1" "$TUNNEL" listen --to "$2" --relay "$RELAY" --key "$key"
    name=$(ready "listen-$1" 'listening as: [a-z0-9-]+') || exit 1
    echo "${name#listening as: }"
}
WEB=$(listen web "$HTTP")
ECHO_NAME=$(listen echo "$ECHO")
forward() { # tag target -> local address
    TUNNEL_KEY="$CLIENT_KEY" start_bg "forward-$1" "$TUNNEL" forward 127.0.0.1:0 "$2" --relay "$RELAY"
    local f
    f=$(ready "forward-$1" 'forwarding 127\.0\.0\.1:[0-9]+') || exit 1
    echo "${f#forwarding }"
}
BY_NAME=$(forward name "$ECHO_NAME:0")
BY_ADDR=$(forward addr "$ECHO")
log "relay $RELAY (http $RELAY_HTTP); listeners $WEB -> $HTTP, $ECHO_NAME -> $ECHO"

# Results: R[path.key]
declare -A R=()

# wrk: requests/s and the 50th/99th latency percentiles, in microseconds.
wrk_run() { # path conns url [host]
    local path=$1 c=$2 url=$3 host=${4:-} out t=$(( $2 < 2 ? 1 : 2 ))
    local args=(-t"$t" -c"$c" -d"${SECONDS_PER_RUN}s" --latency)
    [[ -n "$host" ]] && args+=(-H "Host: $host")
    out=$(wrk "${args[@]}" "$url" 2>&1)
    echo "$out" >"$OUT/logs/wrk-$path-c$c.txt"
    R[$path.c$c.rps]=$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' <<<"$out")
    R[$path.c$c.p50]=$(awk '$1 == "50%" { print $2 }' <<<"$out" | us)
    R[$path.c$c.p99]=$(awk '$1 == "99%" { print $2 }' <<<"$out" | us)
    R[$path.c$c.errors]=$(awk '/Non-2xx|Socket errors/ { $1 = $1; printf "%s; ", $0 }' <<<"$out")
    log "  $path c=$c: ${R[$path.c$c.rps]} req/s, p50 ${R[$path.c$c.p50]} us, p99 ${R[$path.c$c.p99]} us ${R[$path.c$c.errors]}"
}
us() { awk '{ v = $1; u = v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v);
              m = (u == "ms") ? 1000 : (u == "s") ? 1000000 : 1; printf "%.0f", v * m }'; }

connect_run() { # path addr
    local line
    line=$("$GEN" connect --addr "$2" --count "$CONNECTS" 2>>"$OUT/logs/gen.err" | tail -n 1)
    R[$1.p50]=$(grep -oE 'p50_us=[0-9.]+' <<<"$line" | cut -d= -f2)
    R[$1.p99]=$(grep -oE 'p99_us=[0-9.]+' <<<"$line" | cut -d= -f2)
    log "  connect $1: $line"
}

log "sizes: wrk ${SECONDS_PER_RUN}s per run at concurrency $CONNS; $CONNECTS sequential connects"
for c in $CONNS; do
    wrk_run direct "$c" "http://$HTTP/"
    wrk_run relay "$c" "http://$RELAY_HTTP/" "$WEB.localhost"
done
connect_run direct "$ECHO"
connect_run by_addr "$BY_ADDR"
connect_run by_name "$BY_NAME"

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print "-"; else printf "%.2fx", a / b }'; }
{
    echo
    echo "libtunnel http bench: $(date -u +%Y-%m-%dT%H:%MZ), $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo '+dirty'), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "wrk ${SECONDS_PER_RUN}s per run; relay path = wrk -> relay public HTTP (Host: $WEB.localhost) -> tunnel listen -> HTTP server; every process on one machine"
    printf '%-44s | %-14s | %-14s | %s\n' "metric" "direct" "through relay" "ratio"
    printf '%s\n' "---------------------------------------------+----------------+----------------+------"
    for c in $CONNS; do
        printf '%-44s | %-14s | %-14s | %s\n' "HTTP requests/s, $c connections" "${R[direct.c$c.rps]:-}" "${R[relay.c$c.rps]:-}" "$(ratio "${R[relay.c$c.rps]:-}" "${R[direct.c$c.rps]:-}")"
        printf '%-44s | %-14s | %-14s | %s\n' "HTTP latency p50 (us), $c connections" "${R[direct.c$c.p50]:-}" "${R[relay.c$c.p50]:-}" "$(ratio "${R[relay.c$c.p50]:-}" "${R[direct.c$c.p50]:-}")"
        printf '%-44s | %-14s | %-14s | %s\n' "HTTP latency p99 (us), $c connections" "${R[direct.c$c.p99]:-}" "${R[relay.c$c.p99]:-}" "$(ratio "${R[relay.c$c.p99]:-}" "${R[direct.c$c.p99]:-}")"
        [[ -n "${R[relay.c$c.errors]:-}" ]] && echo "note: relay c=$c: ${R[relay.c$c.errors]}"
    done
    printf '%-44s | %-14s | %-14s | %s\n' "connect+1st byte p50 (us), dial by name" "${R[direct.p50]:-}" "${R[by_name.p50]:-}" "$(ratio "${R[by_name.p50]:-}" "${R[direct.p50]:-}")"
    printf '%-44s | %-14s | %-14s | %s\n' "connect+1st byte p99 (us), dial by name" "${R[direct.p99]:-}" "${R[by_name.p99]:-}" "$(ratio "${R[by_name.p99]:-}" "${R[direct.p99]:-}")"
    printf '%-44s | %-14s | %-14s | %s\n' "connect+1st byte p50 (us), dial by address" "${R[direct.p50]:-}" "${R[by_addr.p50]:-}" "$(ratio "${R[by_addr.p50]:-}" "${R[direct.p50]:-}")"
    echo "raw wrk output and logs: $OUT"
} | tee "$OUT/table.txt"
cp "$OUT/table.txt" "$HERE/results/http-latest.txt" 2>/dev/null || true
