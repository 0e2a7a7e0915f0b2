#!/usr/bin/env bash
# Reverse listeners under load: HTTP requests/s and latency percentiles (wrk) through the relay's
# public HTTP port (Host routing to a `tunnel listen` in front of a small HTTP server) against the
# same server direct, and dial-by-name connect latency (`tunnel forward` to NAME:0, through the
# relay, to a listener in front of the echo server) against a direct connect and a dial by address.
# Then HTTPS (h2load, from Debian's nghttp2-client): HTTP/1.1 and h2 requests/s and p50/p99
# through the relay's public HTTPS port (TLS at the relay; listeners of both kinds, HTTP/1.1 and
# --h2c, in front of one hyper server speaking HTTP/1.1 and h2c) against the same server's own TLS
# port, and gRPC unary calls/s (h2load posting one gRPC frame to the Node @grpc/grpc-js server of
# the Python tests) through the relay against the server direct.
#
#   bench/http.sh                 full run (10 s per wrk run, 2,000 connects)
#   BENCH_QUICK=1 bench/http.sh   smoke run (3 s per wrk run, 200 connects)
#
# Environment (optional): HTTP_SECONDS, HTTP_CONNS ("1 50": wrk concurrency levels), BENCH_CONNECTS,
# BENCH_NO_BUILD=1, BENCH_OUT=DIR, H2_CONNS ("50"), H2_STREAMS (10: h2 streams per connection).
# wrk and h2load are installed from Debian (apt-get, with sudo when not root); the gRPC run needs
# node and npm (it installs @grpc/grpc-js under the target dir) and is skipped without them.
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

debs=()
command -v wrk >/dev/null || debs+=(wrk)
command -v h2load >/dev/null || debs+=(nghttp2-client)
command -v openssl >/dev/null || debs+=(openssl)
(( ${#debs[@]} )) && install_debs "${debs[@]}"
H2_CONNS=${H2_CONNS:-50}
H2_STREAMS=${H2_STREAMS:-10}
# A wildcard certificate for the relay's HTTPS port and the direct server (h2load does not verify).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
    -addext "subjectAltName=DNS:*.localhost,DNS:localhost" -keyout "$OUT/tls.key" -out "$OUT/tls.crt" >"$OUT/logs/openssl.log" 2>&1 \
    || { log "cannot make a test certificate (see $OUT/logs/openssl.log)"; exit 1; }
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
start_bg hyper-tls "$GEN" hyper-server --listen 127.0.0.1:0 --cert "$OUT/tls.crt" --key "$OUT/tls.key"
HYPER_TLS=$(ready hyper-tls '127\.0\.0\.1:[0-9]+')
start_bg hyper-plain "$GEN" hyper-server --listen 127.0.0.1:0
HYPER_PLAIN=$(ready hyper-plain '127\.0\.0\.1:[0-9]+')

# A relay with a public HTTP port; listeners may register their key-derived names.
KEYGEN=$("$TUNNEL" keygen)
CLIENT_KEY=$(sed -n 's/^TUNNEL_KEY=//p' <<<"$KEYGEN")
RELAY_KEYS=$(sed -n "s/^TUNNEL_AUTH_KEYS='\(.*\)'$/\1/p" <<<"$KEYGEN")
TUNNEL_LISTEN=127.0.0.1:0 TUNNEL_HTTP_LISTEN=127.0.0.1:0 TUNNEL_HTTPS_LISTEN=127.0.0.1:0 \
    TUNNEL_PUBLIC_TLS_CERT="$OUT/tls.crt" TUNNEL_PUBLIC_TLS_KEY="$OUT/tls.key" TUNNEL_AUTH_KEYS="$RELAY_KEYS" TUNNEL_LISTENERS_OPEN=true \
    TUNNEL_ALLOW="[{\"host\":\"127.0.0.1\",\"port\":${ECHO##*:}}]" \
    start_bg relay "$TUNNEL" server --set max_connections=100000 --set max_streams=100000 --set max_connections_per_source=50000 --set max_handshakes_per_source=20000 --set max_handshakes=20000 --set http_max_requests_per_source=100000 --set http_max_requests_per_listener=100000
RELAY_LOG=$LOG
RELAY=$(ready relay 'ws://127\.0\.0\.1:[0-9]+')
RELAY_HTTP=$(wait_line "$RELAY_LOG" 'http://127\.0\.0\.1:[0-9]+' 10) || { log "the relay has no public HTTP port"; exit 1; }
RELAY_HTTP=${RELAY_HTTP#http://}
RELAY_HTTPS=$(wait_line "$RELAY_LOG" 'https://127\.0\.0\.1:[0-9]+' 10) || { log "the relay has no public HTTPS port"; exit 1; }
RELAY_HTTPS=${RELAY_HTTPS#https://}

listen() { # name target [tunnel listen flags] -> prints the registered name
    local key="$OUT/$1.pem" name
    "$TUNNEL" keygen --listener --out "$key" >/dev/null
    start_bg "listen-$1" "$TUNNEL" listen --to "$2" --relay "$RELAY" --key "$key" "${@:3}"
    name=$(ready "listen-$1" 'listening as: [a-z0-9-]+') || exit 1
    echo "${name#listening as: }"
}
WEB=$(listen web "$HTTP")
ECHO_NAME=$(listen echo "$ECHO")
WEB_H1=$(listen web-h1 "$HYPER_PLAIN")
WEB_H2C=$(listen web-h2c "$HYPER_PLAIN" --h2c)
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

percentile() { # q < h2load log (start, status, microseconds) -> the q-quantile of the durations
    cut -f3 | sort -n | awk -v q="$1" '{ v[NR] = $1 } END { if (NR) { i = int(NR * q + 0.5); if (i < 1) i = 1; print v[i] } }'
}
# h2load: requests/s from its summary, p50/p99 (microseconds) from its per-request log.
h2load_run() { # path url [h2load args...]
    local path=$1 url=$2 out
    out=$(h2load -D "$SECONDS_PER_RUN" --warm-up-time=1 --log-file="$OUT/logs/h2load-$path.tsv" "${@:3}" "$url" 2>&1)
    echo "$out" >"$OUT/logs/h2load-$path.txt"
    R[$path.rps]=$(awk '/^finished in/ { gsub(",", "", $4); printf "%.0f", $4 }' <<<"$out")
    R[$path.p50]=$(percentile 0.50 <"$OUT/logs/h2load-$path.tsv")
    R[$path.p99]=$(percentile 0.99 <"$OUT/logs/h2load-$path.tsv")
    R[$path.errors]=$(awk '/^requests:/ { if ($10 + $12 + $14 > 0) print $0 } /^status codes:/ { if ($3 + 0 == 0 || $5 + $7 + $9 > 0) print $0 }' <<<"$out" | tr '\n' ' ')
    log "  $path: ${R[$path.rps]} req/s, p50 ${R[$path.p50]} us, p99 ${R[$path.p99]} us ${R[$path.errors]}"
}
via_relay() { # name path -> URL naming NAME.localhost on the relay's HTTPS port (h2load --connect-to reaches it)
    echo "https://$1.localhost:${RELAY_HTTPS##*:}$2"
}
log "HTTPS: h2load ${SECONDS_PER_RUN}s per run, $H2_CONNS connections, $H2_STREAMS streams per h2 connection"
h2load_run https_h1_direct "https://$HYPER_TLS/" --h1 -c "$H2_CONNS" -t 2
h2load_run https_h1_relay "$(via_relay "$WEB_H1" /)" --h1 -c "$H2_CONNS" -t 2 --connect-to="$RELAY_HTTPS"
h2load_run https_h2_direct "https://$HYPER_TLS/" -c "$H2_CONNS" -m "$H2_STREAMS" -t 2
h2load_run https_h2_relay "$(via_relay "$WEB_H2C" /)" -c "$H2_CONNS" -m "$H2_STREAMS" -t 2 --connect-to="$RELAY_HTTPS"
h2load_run https_h2_relay_h1 "$(via_relay "$WEB_H1" /)" -c "$H2_CONNS" -m "$H2_STREAMS" -t 2 --connect-to="$RELAY_HTTPS"

# gRPC unary: one 5-byte message (gRPC frame: flag, u32 length, bytes) to test.Probe/Echo.
GRPC_NODE=$TARGET_DIR/grpc-node
if command -v node >/dev/null && command -v npm >/dev/null; then
    [[ -f "$GRPC_NODE/node_modules/@grpc/grpc-js/package.json" ]] \
        || npm install --silent --no-save --no-audit --no-fund --prefix "$GRPC_NODE" @grpc/grpc-js@1.14.7 >"$OUT/logs/npm.log" 2>&1
    NODE_PATH=$GRPC_NODE/node_modules GRPC_SERVER_FOREVER=1 start_bg grpc-server node "$ROOT/bindings/python/tests/grpc_server.js"
    GRPC_PORT=$(ready grpc-server 'listening [0-9]+')
    GRPC=127.0.0.1:${GRPC_PORT#listening }
    GRPC_NAME=$(listen grpc "$GRPC" --h2c)
    printf '\x00\x00\x00\x00\x05hello' >"$OUT/grpc-echo.bin"
    grpc_args=(-c "$H2_CONNS" -m "$H2_STREAMS" -t 2 -d "$OUT/grpc-echo.bin" -H "content-type: application/grpc" -H "te: trailers")
    h2load_run grpc_direct "http://$GRPC/test.Probe/Echo" "${grpc_args[@]}"
    h2load_run grpc_relay "$(via_relay "$GRPC_NAME" /test.Probe/Echo)" "${grpc_args[@]}" --connect-to="$RELAY_HTTPS"
else
    log "  gRPC run skipped: node and npm are needed for the @grpc/grpc-js server"
fi

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
    echo "h2load ${SECONDS_PER_RUN}s per run, $H2_CONNS connections ($H2_STREAMS streams each for h2); relay path = h2load -> relay HTTPS port (TLS ends there) -> tunnel listen -> server (plain)"
    row() { # label direct relay
        printf '%-44s | %-14s | %-14s | %s\n' "$1" "${R[$2]:-}" "${R[$3]:-}" "$(ratio "${R[$3]:-}" "${R[$2]:-}")"
    }
    row "HTTPS h1 requests/s" https_h1_direct.rps https_h1_relay.rps
    row "HTTPS h1 latency p50 (us)" https_h1_direct.p50 https_h1_relay.p50
    row "HTTPS h1 latency p99 (us)" https_h1_direct.p99 https_h1_relay.p99
    row "HTTPS h2 requests/s (h2c listener)" https_h2_direct.rps https_h2_relay.rps
    row "HTTPS h2 latency p50 (us) (h2c listener)" https_h2_direct.p50 https_h2_relay.p50
    row "HTTPS h2 latency p99 (us) (h2c listener)" https_h2_direct.p99 https_h2_relay.p99
    row "HTTPS h2 requests/s (HTTP/1.1 listener)" https_h2_direct.rps https_h2_relay_h1.rps
    row "gRPC unary calls/s" grpc_direct.rps grpc_relay.rps
    row "gRPC unary latency p50 (us)" grpc_direct.p50 grpc_relay.p50
    row "gRPC unary latency p99 (us)" grpc_direct.p99 grpc_relay.p99
    for k in https_h1_relay https_h2_relay https_h2_relay_h1 grpc_relay; do
        [[ -n "${R[$k.errors]:-}" ]] && echo "note: $k: ${R[$k.errors]}"
    done
    echo "raw wrk output and logs: $OUT"
} | tee "$OUT/table.txt"
cp "$OUT/table.txt" "$HERE/results/http-latest.txt" 2>/dev/null || true
