#!/usr/bin/env bash
# libtunnel benchmark suite: direct loopback vs libtunnel (multiplexed over WebSocket and raw TCP,
# and classic, through `tunnel forward` + `tunnel server`) and two peers built from their public
# source: wstunnel (`-L`, a WebSocket per connection) and frp (a tcp proxy, yamux over one TCP
# connection); rathole and bore on request. Interleaved rounds, medians, one table with absolute
# figures and ratios to direct. See bench/README.md.
#
#   bench/run.sh                 full run (2 GiB transfers, 2,000 connects, 20,000 round trips,
#                                1,000 and 10,000 held connections)
#   BENCH_QUICK=1 bench/run.sh   smoke run with small sizes (about a minute)
#   bench/run.sh --rounds 3      interleaved rounds (every path once per round), medians
#   bench/run.sh --no-peers      skip wstunnel, frp, rathole and bore
#   bench/run.sh --lossy         the lossy-link and cold-start rows (bench/lossy.sh: network
#                                namespaces, TUN devices, the tun-link forwarder; needs root)
#   bench/run.sh --link 50,100   long-link mode: the same client over an emulated link (RTT 50 ms,
#                                then 100 ms; 1 Gbit/s each way) between client and server (direct)
#                                and between `tunnel forward` and the relay (fixed-duration rows)
#
# Paths: direct (client -> echo server), proxy (two chained plain TCP forwarders: the floor any
# two-process tunnel pays to the kernel), mux and classic (client -> tunnel forward -> tunnel
# server -> echo server), rathole and bore (client -> server -> client -> echo server).
#
# Benchmarks report figures; nothing here asserts a timing.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

PEERS=1
LINK_RTTS=${LINK_RTT:-}
LINK_MBIT=${LINK_MBIT:-1000}
ARGS=("$@")
while (($#)); do
    arg=$1; shift
    case "$arg" in
        --no-peers) PEERS=0 ;;
        --rounds) ROUNDS=${1:-}; shift ;;
        --rounds=*) ROUNDS=${arg#--rounds=} ;;
        --lossy) exec "$HERE/lossy.sh" "$@" ;;
        --link) LINK_RTTS=${1:-}; shift ;;
        --link=*) LINK_RTTS=${arg#--link=} ;;
        --rate) LINK_MBIT=${1:-}; shift ;;
        --rate=*) LINK_MBIT=${arg#--rate=} ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; cat <<'EOF'

Long-link mode (--link RTTS, or LINK_RTT=RTTS): RTTS is a comma-separated list of round-trip times
in ms ("50", "50ms", "50,100"); each gets its own run and table. --rate MBIT (LINK_MBIT) is the cap
per direction, default 1000. Paths: direct, mux, classic (and muxtcp, muxgrpc). Knobs:
  LINK_SECS=S          seconds per throughput row (default 8; quick 3)
  LINK_PINGS=N         round trips of the latency rows (default 100; at most 10 s each)
  LINK_CONNECTS=N      sequential connects (default 20)

Environment (all optional):
  BENCH_QUICK=1        small sizes for a smoke run
  BENCH_BYTES=N        bytes per throughput run (default 2 GiB; quick 64 MiB)
  BENCH_STREAMS=N      parallel streams of the second throughput run (default 8)
  BENCH_CONNECTS=N     sequential connects (default 2000; quick 200)
  BENCH_PINGS=N        ping-pong round trips (default 20000; quick 2000)
  BENCH_HOLD="N M"     held-connection counts (default "1000 10000"; quick "100 1000")
  BENCH_ROUNDS=N       interleaved rounds, medians (default 3; quick 1); same as --rounds
  BENCH_PATHS="..."    which of: direct proxy mux muxtcp muxgrpc muxquic classic wstunnel frp rathole
                       bore (default: all but muxgrpc, muxquic, rathole and bore; muxtcp =
                       multiplexed over raw TCP, muxgrpc = over the gRPC transport, grpc://,
                       muxquic = over QUIC, quic://, a self-signed certificate and --ca; loopback
                       only; muxwss = the WebSocket mux over TLS with the same certificate)
  PEER_DIR=DIR         where the peers are built and cached (default <target>/bench-peers)
  WSTUNNEL_SRC=DIR     a git repository or source tree of wstunnel (default: clone the tag)
  BENCH_PIN_CPU=N      the CPU for pinned runs (default 0)
  BENCH_NO_BUILD=1     use the binaries already built
  BENCH_TUNNEL_BIN=P   benchmark this `tunnel` binary instead (e.g. an older build)
  BENCH_TUNNEL_ENV=".." extra environment for the tunnel processes (e.g. TOKIO_WORKER_THREADS=1)
  BENCH_OUT=DIR        where logs and results go (default bench/results/<timestamp>)
  BENCH_STALL_SECS=S   longest write phase of the stalled-streams row (default 8)
EOF
            exit 0 ;;
        *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done
LINK_RTTS=${LINK_RTTS//ms/}
LINK_RTTS=${LINK_RTTS//,/ }
for r in $LINK_RTTS $LINK_MBIT; do
    [[ $r =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "--link/--rate take numbers (ms, Mbit/s): $r" >&2; exit 2; }
done

if [[ "${BENCH_QUICK:-0}" == 1 ]]; then
    D_BYTES=$((64 << 20)); D_CONNECTS=200; D_PINGS=2000; D_HOLD="100 1000"; D_ROUNDS=1
else
    D_BYTES=$((2 << 30)); D_CONNECTS=2000; D_PINGS=20000; D_HOLD="1000 10000"; D_ROUNDS=3
fi
ROUNDS=${ROUNDS:-${BENCH_ROUNDS:-$D_ROUNDS}}
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "--rounds takes a positive count: $ROUNDS" >&2; exit 2; }
BYTES=${BENCH_BYTES:-$D_BYTES}
STREAMS=${BENCH_STREAMS:-8}
CONNECTS=${BENCH_CONNECTS:-$D_CONNECTS}
PINGS=${BENCH_PINGS:-$D_PINGS}
HOLDS=${BENCH_HOLD:-$D_HOLD}
STALL_SECS=${BENCH_STALL_SECS:-8}
LINK_SECS=${LINK_SECS:-$([[ "${BENCH_QUICK:-0}" == 1 ]] && echo 3 || echo 8)}
LINK_PINGS=${LINK_PINGS:-100}
LINK_CONNECTS=${LINK_CONNECTS:-20}
PATHS=${BENCH_PATHS:-"direct proxy mux muxtcp classic wstunnel frp"}
# The per-connection log lines (target libtunnel::conn) would cost each connect a write to the
# log file; the figures measure the tunnel, so they are off here.
# shellcheck disable=SC2206
TUNNEL_ENV=(RUST_LOG=${RUST_LOG:-info,libtunnel::conn=warn} ${BENCH_TUNNEL_ENV:-})
PIN_CPU=${BENCH_PIN_CPU:-0}
OUT=${BENCH_OUT:-$HERE/results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/logs"
RAW="$OUT/raw.txt"
: >"$RAW"

# Logging and processes (all killed on exit), shared with bench/http.sh.
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"


# ---------------------------------------------------------------------------------------------
# Build

if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
    log "building release binaries (target dir $TARGET_DIR)"
    (cd "$ROOT" && cargo build --release -q -p libtunnel --features cli --bin tunnel) || { log "building tunnel failed"; exit 1; }
    (cd "$ROOT" && cargo build --release -q -p libtunnel-bench) || { log "building tunnel-bench failed"; exit 1; }
fi
TUNNEL=${BENCH_TUNNEL_BIN:-$TARGET_DIR/release/tunnel}
GEN=${BENCH_GEN_BIN:-$TARGET_DIR/release/tunnel-bench}
for b in "$TUNNEL" "$GEN"; do
    [[ -x "$b" ]] || { log "missing binary $b"; exit 1; }
done

# Several link RTTs: one run of this script per RTT (built once), tables concatenated.
# shellcheck disable=SC2206
RTT_LIST=($LINK_RTTS)
if ((${#RTT_LIST[@]} > 1)); then
    : >"$OUT/table.txt"
    for r in "${RTT_LIST[@]}"; do
        keep=()
        for a in "${ARGS[@]}"; do [[ $a == --no-peers ]] && keep+=("$a"); done
        BENCH_ROUNDS=$ROUNDS BENCH_NO_BUILD=1 BENCH_OUT="$OUT/link-${r}ms" LINK_RTT=$r LINK_MBIT=$LINK_MBIT "$0" "${keep[@]}"
        cat "$OUT/link-${r}ms/table.txt" >>"$OUT/table.txt"
    done
    cp "$OUT/table.txt" "$HERE/results/latest-link.txt" 2>/dev/null || true
    echo "all tables: $OUT/table.txt"
    exit 0
fi
LINK_MS=${RTT_LIST[0]:-}
if [[ -n $LINK_MS ]]; then
    ONE_WAY=$(awk -v r="$LINK_MS" 'BEGIN { print r / 2 }')
    # Long links: direct, the tunnels and the two peers (the link sits on each one's tunnel hop);
    # the proxy floor, rathole and bore are loopback figures.
    D_LINK_PATHS="direct mux classic wstunnel frp"
    [[ $PEERS == 1 ]] || D_LINK_PATHS="direct mux classic"
    PATHS=${BENCH_PATHS:-$D_LINK_PATHS}
    for p in $PATHS; do
        [[ " direct mux classic muxtcp muxgrpc wstunnel frp " == *" $p "* ]] || { echo "path $p is not measured in long-link mode (muxquic: the delay line carries TCP; bench/lossy.sh has QUIC on a real IP link)" >&2; exit 2; }
    done
fi

TOOLS="$HERE/.tools"
PEER_DIR=${PEER_DIR:-$TARGET_DIR/bench-peers}
RATHOLE=""; BORE=""; WSTUNNEL=""; FRP=""
declare -A SKIP=()
if [[ $PEERS == 1 ]]; then
    if [[ " $PATHS " == *" wstunnel "* ]]; then
        WSTUNNEL=$(build_wstunnel) || SKIP[wstunnel]="building wstunnel $WSTUNNEL_VERSION failed (see $OUT/logs/build-wstunnel.log)"
    fi
    if [[ " $PATHS " == *" frp "* ]]; then
        FRP=$(build_frp) || SKIP[frp]="building frp $FRP_VERSION failed (see $OUT/logs/build-frp.log)"
    fi
    install_peer() { # crate binary
        local crate=$1 bin=$2
        if [[ -x "$TOOLS/bin/$bin" ]]; then echo "$TOOLS/bin/$bin"; return 0; fi
        log "installing $crate from crates.io into bench/.tools (once)"
        if cargo install --quiet --locked --root "$TOOLS" "$crate" >"$OUT/logs/install-$crate.log" 2>&1 \
            || cargo install --quiet --root "$TOOLS" "$crate" >>"$OUT/logs/install-$crate.log" 2>&1; then
            echo "$TOOLS/bin/$bin"
        else
            return 1
        fi
    }
    if [[ " $PATHS " == *" rathole "* ]]; then
        RATHOLE=$(install_peer rathole rathole) || SKIP[rathole]="cargo install rathole failed (see $OUT/logs/install-rathole.log)"
    fi
    if [[ " $PATHS " == *" bore "* ]]; then
        BORE=$(install_peer bore-cli bore) || SKIP[bore]="cargo install bore-cli failed (see $OUT/logs/install-bore-cli.log)"
    fi
else
    for p in rathole bore wstunnel frp; do SKIP[$p]="--no-peers"; done
fi

# ---------------------------------------------------------------------------------------------
# Descriptors: holding 10,000 connections costs a classic forwarder 20,000 fds.
ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null
FD_LIMIT=$(ulimit -n)
NCPU=$(nproc)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------------------------------------
# The echo/sink server shared by every path.

start_bg echo "$GEN" server --listen 127.0.0.1:0
ECHO_PID=$LAST_PID
ECHO=$(wait_line "$LOG" '127\.0\.0\.1:[0-9]+' 10) || { log "echo server did not start"; exit 1; }
ECHO_PORT=${ECHO##*:}
log "echo server on $ECHO (pid $ECHO_PID); fd limit $FD_LIMIT; $NCPU CPUs; load average $LOAD_START"
if awk -v l="${LOAD_START%% *}" 'BEGIN { exit !(l > 0.5) }'; then
    log "warning: the machine is busy (load $LOAD_START): other work shares these CPUs and skews every figure"
fi

settle() { "$GEN" settle --addr "$ECHO" --timeout 30 >>"$RAW" 2>&1; }

# Results: R[path.key] = value; RL[path.key] = the values of every round (medians at the end).
declare -A R=() RL=()
put() { R[$1]=$2; RL[$1]="${RL[$1]:-}${RL[$1]:+ }$2"; }

gen() { # path tag [taskset...] -- generator args ; parses key=value output into R[path.tag.key]
    local path=$1 tag=$2; shift 2
    local line
    line=$("$@" 2>>"$OUT/logs/gen.err" | tail -n 1)
    echo "$path $tag $line" >>"$RAW"
    if [[ "$line" == error* || -z "$line" ]]; then
        R[$path.$tag.error]=${line#error msg=}
        [[ -z "$line" ]] && R[$path.$tag.error]="no output"
        log "  $path $tag: FAILED ${R[$path.$tag.error]}"
        return 1
    fi
    local kv
    # shellcheck disable=SC2086
    for kv in $(sed 's/ error=.*//' <<<"$line"); do
        [[ "$kv" == *=* ]] && put "$path.$tag.${kv%%=*}" "${kv#*=}"
    done
    [[ "$line" == *" error="* ]] && R[$path.$tag.error]=${line#* error=}
    log "  $path $tag: $line"
}

# ---------------------------------------------------------------------------------------------
# Paths. start_<path> sets ADDR (where the client connects), TPIDS (comma-separated tunnel
# processes) and PATH_PIDS (to stop), or returns non-zero with SKIP[path] set.

KEYGEN=$("$TUNNEL" keygen)
CLIENT_KEY=$(sed -n 's/^TUNNEL_KEY=//p' <<<"$KEYGEN")
RELAY_KEYS=$(sed -n "s/^TUNNEL_AUTH_KEYS='\(.*\)'$/\1/p" <<<"$KEYGEN")
SECRET=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')

ADDR=""; TPIDS=""; PATH_PIDS=()

# The emulated link: a `tunnel-bench delay` process (one-way delay = RTT / 2 each direction, the
# rate cap shared by every connection through it). Sets LINK_ADDR and LINK_PID.
start_link() { # name target rtt_ms
    local oneway
    oneway=$(awk -v r="$3" 'BEGIN { print r / 2 }')
    start_bg "link-$1" "$GEN" delay --to "$2" --delay-ms "$oneway" --rate-mbit "$LINK_MBIT"
    LINK_PID=$LAST_PID
    LINK_ADDR=$(wait_line "$LOG" '127\.0\.0\.1:[0-9]+' 10) || { stop_pid "$LINK_PID"; return 1; }
}

start_direct() {
    ADDR=$ECHO; TPIDS=""; PATH_PIDS=()
    if [[ -n $LINK_MS ]]; then
        start_link direct "$ECHO" "$LINK_MS" || { SKIP[direct]="the delay line did not start"; return 1; }
        ADDR=$LINK_ADDR; PATH_PIDS=("$LINK_PID")
    fi
}

start_proxy() {
    local a b
    start_bg proxy-2 "$GEN" proxy --to "$ECHO"
    b=$LAST_PID
    a=$(wait_line "$LOG" '127\.0\.0\.1:[0-9]+' 10) || { SKIP[proxy]="proxy did not start"; stop_pid "$b"; return 1; }
    start_bg proxy-1 "$GEN" proxy --to "$a"
    local c=$LAST_PID
    ADDR=$(wait_line "$LOG" '127\.0\.0\.1:[0-9]+' 10) || { SKIP[proxy]="proxy did not start"; stop_pid "$b"; stop_pid "$c"; return 1; }
    TPIDS="$c,$b"; PATH_PIDS=("$c" "$b")
}

# The relay's self-signed certificate for the muxquic path (QUIC always runs TLS 1.3), made once;
# the clients trust it with --ca (CA_FLAG).
quic_cert() {
    [[ -s "$OUT/relay-cert.pem" ]] && return 0
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=localhost \
        -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" -keyout "$OUT/relay-key.pem" -out "$OUT/relay-cert.pem" >"$OUT/logs/openssl.log" 2>&1
}

CA_FLAG=()
start_libtunnel() { # mux|classic|muxtcp|muxgrpc|muxquic|muxwss
    local mode=$1 relay_url fwd scheme=ws quic_env=()
    [[ $mode == muxtcp ]] && scheme=tcp
    CA_FLAG=()
    if [[ $mode == muxquic || $mode == muxwss ]]; then
        quic_cert || { SKIP[$mode]="openssl could not make the relay's certificate (see $OUT/logs/openssl.log)"; return 1; }
        scheme=wss; CA_FLAG=(--ca "$OUT/relay-cert.pem")
        quic_env=(TUNNEL_TLS_CERT="$OUT/relay-cert.pem" TUNNEL_TLS_KEY="$OUT/relay-key.pem")
        [[ $mode == muxquic ]] && { scheme=quic; quic_env+=(TUNNEL_QUIC_LISTEN=127.0.0.1:0); }
    fi
    TUNNEL_LISTEN=127.0.0.1:0 TUNNEL_TCP_LISTEN=127.0.0.1:0 TUNNEL_AUTH_KEYS="$RELAY_KEYS" TUNNEL_LISTENERS_OPEN=true \
        TUNNEL_ALLOW="[{\"host\":\"127.0.0.1\",\"port\":$ECHO_PORT}]" \
        start_bg "relay-$mode" env "${TUNNEL_ENV[@]}" "${quic_env[@]}" "$TUNNEL" server --set max_connections=100000 --set max_streams=100000 --set max_connections_per_source=50000 --set max_handshakes_per_source=20000 --set max_handshakes=20000
    local relay=$LAST_PID
    relay_url=$(wait_line "$LOG" "$scheme://127\.0\.0\.1:[0-9]+" 10) \
        || { SKIP[$mode]="tunnel server did not start (see $LOG)"; stop_pid "$relay"; return 1; }
    # The gRPC transport is served on the WebSocket port.
    [[ $mode == muxgrpc ]] && { scheme=grpc; relay_url=grpc://${relay_url#*://}; }
    RELAY_SCHEME=$scheme; RELAY_ADDR=${relay_url#*://}; RELAY_PID=$relay
    local link=()
    if [[ -n $LINK_MS ]]; then
        start_link "$mode" "$RELAY_ADDR" "$LINK_MS" || { SKIP[$mode]="the delay line did not start"; stop_pid "$relay"; return 1; }
        relay_url=$scheme://$LINK_ADDR; link=("$LINK_PID")
    fi
    local flag=()
    [[ $mode == classic ]] && flag=(--classic)
    TUNNEL_KEY="$CLIENT_KEY" start_bg "forward-$mode" env "${TUNNEL_ENV[@]}" "$TUNNEL" forward 127.0.0.1:0 "$ECHO" --relay "$relay_url" "${flag[@]}" "${CA_FLAG[@]}"
    local fwdpid=$LAST_PID
    fwd=$(wait_line "$LOG" 'forwarding 127\.0\.0\.1:[0-9]+' 10) \
        || { SKIP[$mode]="tunnel forward did not start (see $LOG)"; stop_pid "$fwdpid"; stop_pid "$relay"; return 1; }
    ADDR=${fwd#forwarding }
    TPIDS="$relay,$fwdpid"; PATH_PIDS=("$fwdpid" "$relay" "${link[@]}")
}
start_mux() { start_libtunnel mux; }
start_classic() { start_libtunnel classic; }
start_muxtcp() { start_libtunnel muxtcp; }
start_muxgrpc() { start_libtunnel muxgrpc; }
start_muxquic() { start_libtunnel muxquic; }
start_muxwss() { start_libtunnel muxwss; }

start_rathole() {
    [[ -n "$RATHOLE" ]] || return 1
    local ctrl svc
    ctrl=$("$GEN" freeport); svc=$("$GEN" freeport)
    cat >"$OUT/rathole-server.toml" <<EOF
[server]
bind_addr = "127.0.0.1:$ctrl"
default_token = "$SECRET"
[server.services.echo]
bind_addr = "127.0.0.1:$svc"
EOF
    cat >"$OUT/rathole-client.toml" <<EOF
[client]
remote_addr = "127.0.0.1:$ctrl"
default_token = "$SECRET"
[client.services.echo]
local_addr = "$ECHO"
EOF
    start_bg rathole-server "$RATHOLE" --server "$OUT/rathole-server.toml"
    local s=$LAST_PID
    start_bg rathole-client "$RATHOLE" --client "$OUT/rathole-client.toml"
    local c=$LAST_PID
    ADDR=127.0.0.1:$svc; TPIDS="$s,$c"; PATH_PIDS=("$c" "$s")
}

start_bore() {
    [[ -n "$BORE" ]] || return 1
    local port
    port=$("$GEN" freeport)
    if (exec 3<>/dev/tcp/127.0.0.1/7835) 2>/dev/null; then
        SKIP[bore]="bore's fixed control port 7835 is in use on this machine"; return 1
    fi
    BORE_SECRET=$SECRET start_bg bore-server "$BORE" server --bind-addr 127.0.0.1 --min-port "$port" --max-port "$port"
    local s=$LAST_PID
    wait_line "$LOG" 'server listening' 10 >/dev/null \
        || { SKIP[bore]="bore server did not start (see $LOG)"; stop_pid "$s"; return 1; }
    BORE_SECRET=$SECRET start_bg bore-local "$BORE" local "$ECHO_PORT" --local-host 127.0.0.1 --to 127.0.0.1 --port "$port"
    local c=$LAST_PID
    ADDR=127.0.0.1:$port; TPIDS="$s,$c"; PATH_PIDS=("$c" "$s")
}

# wstunnel: client -> `wstunnel client -L` -> `wstunnel server` -> echo server; a WebSocket per
# connection (fastwebsockets), no authentication beyond the upgrade.
start_wstunnel() {
    [[ -n "$WSTUNNEL" ]] || return 1
    local port lport
    port=$("$GEN" freeport); lport=$("$GEN" freeport)
    RUST_LOG=warn start_bg wstunnel-server "$WSTUNNEL" server "ws://127.0.0.1:$port"
    local s=$LAST_PID server=127.0.0.1:$port link=()
    if [[ -n $LINK_MS ]]; then # the link between the wstunnel client and its server
        start_link wstunnel "$server" "$LINK_MS" || { SKIP[wstunnel]="the delay line did not start"; stop_pid "$s"; return 1; }
        server=$LINK_ADDR; link=("$LINK_PID")
    fi
    RUST_LOG=warn start_bg wstunnel-client "$WSTUNNEL" client -L "tcp://127.0.0.1:$lport:$ECHO" "ws://$server"
    local c=$LAST_PID
    ADDR=127.0.0.1:$lport; TPIDS="$s,$c"; PATH_PIDS=("$c" "$s" "${link[@]}")
}

# frp: client -> frps (the proxy's remote port) -> frpc -> echo server; one TCP connection between
# frpc and frps carrying yamux streams (tcpMux, frp's default), token authentication.
start_frp() {
    [[ -n "$FRP" ]] || return 1
    local ctrl svc cport link=()
    ctrl=$("$GEN" freeport); svc=$("$GEN" freeport); cport=$ctrl
    if [[ -n $LINK_MS ]]; then # the link between frpc and frps (their one yamux connection)
        start_link frp "127.0.0.1:$ctrl" "$LINK_MS" || { SKIP[frp]="the delay line did not start"; return 1; }
        cport=${LINK_ADDR##*:}; link=("$LINK_PID")
    fi
    printf '%s\n' "bindAddr = \"127.0.0.1\"" "bindPort = $ctrl" "auth.token = \"$SECRET\"" 'log.level = "warn"' >"$OUT/frps.toml"
    printf '%s\n' "serverAddr = \"127.0.0.1\"" "serverPort = $cport" "auth.token = \"$SECRET\"" 'log.level = "warn"' 'loginFailExit = false' \
        '[[proxies]]' 'name = "echo"' 'type = "tcp"' 'localIP = "127.0.0.1"' "localPort = $ECHO_PORT" "remotePort = $svc" >"$OUT/frpc.toml"
    start_bg frps "$FRP/frps" -c "$OUT/frps.toml"
    local s=$LAST_PID
    for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$ctrl") 2>/dev/null && break; sleep 0.1; done
    start_bg frpc "$FRP/frpc" -c "$OUT/frpc.toml"
    local c=$LAST_PID
    ADDR=127.0.0.1:$svc; TPIDS="$s,$c"; PATH_PIDS=("$c" "$s" "${link[@]}")
}

start_path() { # path -> 0 when ready
    local p=$1
    "start_$p" || { [[ -n "${SKIP[$p]:-}" ]] || SKIP[$p]="could not start"; return 1; }
    # Ready when one connection echoes end to end (bounded: 100 tries).
    for _ in $(seq 1 100); do
        "$GEN" connect --addr "$ADDR" --count 1 --warmup 0 >/dev/null 2>&1 && { settle; return 0; }
        sleep 0.1
    done
    SKIP[$p]="no echo through the path within 10 s (see $OUT/logs)"
    stop_path
    return 1
}

stop_path() {
    local p
    for p in "${PATH_PIDS[@]}"; do stop_pid "$p"; done
    PATH_PIDS=()
    settle
}

pin_all() { # cpu-list
    local p
    for p in $ECHO_PID ${TPIDS//,/ }; do taskset -apc "$1" "$p" >/dev/null 2>&1; done
}

# ---------------------------------------------------------------------------------------------
# Measurements

measure() {
    local p=$1
    log "== $p"
    start_path "$p" || { log "  $p skipped: ${SKIP[$p]}"; return; }
    if [[ -n $LINK_MS ]]; then
        # Long link: fixed durations (today's tunnel moves a few MB/s there), no pinned runs.
        gen "$p" connect "$GEN" connect --addr "$ADDR" --count "$LINK_CONNECTS" --warmup 2
        settle
        gen "$p" ping "$GEN" pingpong --addr "$ADDR" --count "$LINK_PINGS" --warmup 3 --secs 10
        settle
        gen "$p" tp1 "$GEN" throughput --addr "$ADDR" --streams 1 --secs "$LINK_SECS" --pids "$TPIDS"
        settle
        gen "$p" tpN "$GEN" throughput --addr "$ADDR" --streams "$STREAMS" --secs "$LINK_SECS" --pids "$TPIDS"
        settle
        gen "$p" pingload "$GEN" pingpong --addr "$ADDR" --count "$LINK_PINGS" --warmup 3 --secs 10 --load 1.5
    else
        gen "$p" connect "$GEN" connect --addr "$ADDR" --count "$CONNECTS"
        settle
        gen "$p" ping "$GEN" pingpong --addr "$ADDR" --count "$PINGS"
        pin_all "$PIN_CPU"
        settle
        gen "$p" connect_pin taskset -c "$PIN_CPU" "$GEN" connect --addr "$ADDR" --count "$CONNECTS"
        settle
        gen "$p" ping_pin taskset -c "$PIN_CPU" "$GEN" pingpong --addr "$ADDR" --count "$PINGS"
        pin_all "0-$((NCPU - 1))"
        settle
        gen "$p" tp1 "$GEN" throughput --addr "$ADDR" --streams 1 --bytes "$BYTES" --pids "$TPIDS"
        settle
        gen "$p" tpN "$GEN" throughput --addr "$ADDR" --streams "$STREAMS" --bytes "$BYTES" --pids "$TPIDS"
        settle
        gen "$p" pingload "$GEN" pingpong --addr "$ADDR" --count $((PINGS / 10)) --warmup 100 --secs 10 --load 1
    fi
    settle
    # Dial by name, stalled streams and held connections: once, in the first round.
    if ((ROUND > 1)); then stop_path; return; fi
    [[ $p == mux || $p == classic || $p == muxtcp || $p == muxgrpc || $p == muxquic || $p == muxwss ]] && measure_byname "$p"
    stop_path
    # Memory per connection is a figure of tunnels only (the proxy's copy buffers are not a design).
    [[ $p == direct || $p == proxy ]] && return
    # What a session buffers for streams whose readers stopped (fresh tunnel processes).
    if start_path "$p"; then
        gen "$p" stall "$GEN" stall --addr "$ADDR" --count 100 --secs "$STALL_SECS" --pids "$TPIDS"
        stop_path
    else
        log "  $p stall skipped: ${SKIP[$p]}"; unset "SKIP[$p]"
    fi
    [[ -n $LINK_MS ]] && return
    local n
    for n in $HOLDS; do
        # Fresh tunnel processes for each count, so memory freed by earlier runs is not reused.
        local first=$START_N
        start_path "$p" || { log "  $p hold $n skipped: ${SKIP[$p]}"; unset "SKIP[$p]"; continue; }
        gen "$p" "hold$n" "$GEN" hold --addr "$ADDR" --count "$n" --pids "$TPIDS"
        stop_path
        [[ -n "${R[$p.hold$n.error]:-}" ]] && hold_cause "$p" "hold$n" "$first"
    done
}

# Dial by name: a `tunnel listen` in front of the echo server registers with the path's relay, and a
# second `tunnel forward` dials NAME:0 (the relay splices the dialer's stream to the listener's
# session). On a long link the dialer's hop and the listener's hop each get half the RTT, so the
# end-to-end RTT equals the direct one and both hops are long. The path's relay must be running.
# Multiplexed paths run it twice in the same run: plaintext (tags byname, byname_connect) and with
# end-to-end TLS (`--e2e` on both ends: byname_e2e, byname_e2e_connect), so the E2E cost in CPU per
# GB (relay + forward + listen) and in connect latency reads off one table.
measure_byname() { # path
    local p=$1
    measure_byname_one "$p" ""
    [[ $p == classic ]] || measure_byname_one "$p" e2e
}

measure_byname_one() { # path "" | e2e
    local p=$1 mode=$2 key="$OUT/listener-$p$2.pem" lurl furl name fwd addr lpid fpid ok=0 pids=() flag=() e2e=() size tag=byname${2:+_$2} connects
    lurl=$RELAY_SCHEME://$RELAY_ADDR; furl=$lurl
    if [[ -n $LINK_MS ]]; then
        start_link "$tag-dialer-$p" "$RELAY_ADDR" "$ONE_WAY" && { furl=$RELAY_SCHEME://$LINK_ADDR; pids+=("$LINK_PID"); }
        start_link "$tag-listener-$p" "$RELAY_ADDR" "$ONE_WAY" && { lurl=$RELAY_SCHEME://$LINK_ADDR; pids+=("$LINK_PID"); }
        size=(--secs "$LINK_SECS"); connects=(--count "$LINK_CONNECTS" --warmup 2)
    else
        size=(--bytes "$BYTES"); connects=(--count "$CONNECTS")
    fi
    [[ $mode == e2e ]] && e2e=(--e2e)
    rm -f "$key"
    "$TUNNEL" keygen --listener --out "$key" >/dev/null 2>&1
    start_bg "listen-$p$mode" env "${TUNNEL_ENV[@]}" "$TUNNEL" listen --to "$ECHO" --relay "$lurl" --key "$key" "${e2e[@]}" "${CA_FLAG[@]}"
    lpid=$LAST_PID; pids+=("$lpid")
    if name=$(wait_line "$LOG" 'listening as: [a-z0-9-]+' 10); then
        name=${name#listening as: }
        [[ $p == classic ]] && flag=(--classic)
        TUNNEL_KEY="$CLIENT_KEY" start_bg "forward-$tag-$p" env "${TUNNEL_ENV[@]}" "$TUNNEL" forward 127.0.0.1:0 "$name:0" --relay "$furl" "${flag[@]}" "${e2e[@]}" "${CA_FLAG[@]}"
        fpid=$LAST_PID; pids+=("$fpid")
        if fwd=$(wait_line "$LOG" 'forwarding 127\.0\.0\.1:[0-9]+' 10); then
            addr=${fwd#forwarding }
            for _ in $(seq 1 100); do
                "$GEN" connect --addr "$addr" --count 1 --warmup 0 >/dev/null 2>&1 && { ok=1; break; }
                sleep 0.1
            done
        fi
    fi
    if ((ok)); then
        settle
        gen "$p" "$tag" "$GEN" throughput --addr "$addr" --streams 1 "${size[@]}" --pids "$RELAY_PID,$fpid,$lpid"
        settle
        gen "$p" "${tag}_connect" "$GEN" connect --addr "$addr" "${connects[@]}"
    else
        R[$p.$tag.error]="no echo through a dial by name${mode:+ ($mode)} within 10 s (see $OUT/logs/*$tag-$p*, *listen-$p$mode*)"
        log "  $p $tag: FAILED ${R[$p.$tag.error]}"
    fi
    local x
    for x in "${pids[@]}"; do stop_pid "$x"; done
}

hold_cause() { # path tag first-log-index: name the tunnel's own reason for refusing connections
    local p=$1 tag=$2 first=$3 f i cause=""
    for f in "$OUT"/logs/[0-9]*.log; do
        i=$(basename "$f"); i=$((10#${i%%-*}))
        ((i > first)) || continue
        cause=$(grep -m1 -ohE "already has [0-9]+ open streams|[Tt]oo many open files|connection limit reached" "$f") && break
    done
    case "$cause" in
        already*) R[$p.$tag.error]="${R[$p.$tag.error]}; cause: the session's stream limit (tunnel forward logged '$cause'; the dialer's MuxConfig::max_streams defaults to 4096)" ;;
        [Tt]oo*) R[$p.$tag.error]="${R[$p.$tag.error]}; cause: a tunnel process ran out of file descriptors (fd limit $FD_LIMIT)" ;;
        connection*) R[$p.$tag.error]="${R[$p.$tag.error]}; cause: the relay's max_connections" ;;
    esac
    return 0
}

if [[ -n $LINK_MS ]]; then
    log "long link: RTT $LINK_MS ms, $LINK_MBIT Mbit/s each way; $LINK_SECS s per throughput row, $LINK_PINGS round trips, $LINK_CONNECTS connects"
else
    log "sizes: throughput $BYTES bytes (1 and $STREAMS streams), $CONNECTS connects, $PINGS round trips, hold: $HOLDS"
fi
# Interleaved rounds: every path once per round, so a change in the machine's load hits all of
# them alike; each figure is the median of its rounds.
for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
    ((ROUNDS > 1)) && log "=== round $ROUND of $ROUNDS"
    for p in $PATHS; do
        if [[ -n "${SKIP[$p]:-}" ]]; then log "== $p skipped: ${SKIP[$p]}"; continue; fi
        measure "$p"
    done
done
for k in "${!RL[@]}"; do
    # shellcheck disable=SC2086
    set -- ${RL[$k]}
    (($# > 1)) || continue
    R[$k]=$(printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; print m }')
done

# ---------------------------------------------------------------------------------------------
# The table

declare -A NAMES=([direct]="direct" [proxy]="2x tcp proxy (floor)" [mux]="libtunnel mux" [muxtcp]="libtunnel mux tcp://" [muxgrpc]="libtunnel mux grpc://" [muxquic]="libtunnel mux quic://" [muxwss]="libtunnel mux wss://" [classic]="libtunnel classic" [rathole]="rathole" [bore]="bore" [wstunnel]="wstunnel $WSTUNNEL_VERSION -L" [frp]="frp ${FRP_VERSION#v} tcp")

# Derived figures: fairness (p50 under a bulk stream / idle p50, same path) and the direct
# reference of the dial-by-name row (a direct stream: direct has no names).
# On loopback the idle reference is the pinned p50: unpinned idle latency on a small VM is mostly
# the wake-up of an idle CPU, which a busy machine (under bulk) does not pay.
IDLE_PING=ping; [[ -z $LINK_MS ]] && IDLE_PING=ping_pin
for p in $PATHS; do
    if [[ -n "${R[$p.$IDLE_PING.p50_us]:-}" && -n "${R[$p.pingload.p50_us]:-}" ]]; then
        R[$p.fair.x]=$(awk -v l="${R[$p.pingload.p50_us]}" -v i="${R[$p.$IDLE_PING.p50_us]}" 'BEGIN { printf "%.2fx", (i > 0 ? l / i : 0) }')
    fi
done
[[ -n "${R[direct.tp1.mib_s]:-}" ]] && R[direct.byname.mib_s]=${R[direct.tp1.mib_s]} && R[direct.byname_e2e.mib_s]=${R[direct.tp1.mib_s]}
[[ -n "${R[direct.connect.p50_us]:-}" ]] && R[direct.byname_connect.p50_us]=${R[direct.connect.p50_us]} && R[direct.byname_e2e_connect.p50_us]=${R[direct.connect.p50_us]}
# What end-to-end encryption costs over plaintext dial by name, same path, same run.
for p in $PATHS; do
    if [[ -n "${R[$p.byname.cpu_s_per_gb]:-}" && -n "${R[$p.byname_e2e.cpu_s_per_gb]:-}" ]]; then
        R[$p.e2e_cost.cpu_s_per_gb]=$(awk -v e="${R[$p.byname_e2e.cpu_s_per_gb]}" -v b="${R[$p.byname.cpu_s_per_gb]}" 'BEGIN { printf "%+.3f", e - b }')
    fi
    if [[ -n "${R[$p.byname_connect.p50_us]:-}" && -n "${R[$p.byname_e2e_connect.p50_us]:-}" ]]; then
        R[$p.e2e_cost.connect_us]=$(awk -v e="${R[$p.byname_e2e_connect.p50_us]}" -v b="${R[$p.byname_connect.p50_us]}" 'BEGIN { printf "%+.1f", e - b }')
    fi
done

# key | label | ratio to direct (1) or not (0)
if [[ -n $LINK_MS ]]; then
    ROWS=(
        "tp1.mib_s|throughput, 1 stream (MiB/s)|1"
        "tpN.mib_s|throughput, $STREAMS streams (MiB/s)|1"
        "tpN.min_stream_mib_s|  slowest of the $STREAMS (MiB/s)|1"
        "byname.mib_s|dial by name, 1 stream (MiB/s)|1"
        "byname.cpu_s_per_gb|  dial by name CPU (s/GB)|0"
        "byname_connect.p50_us|  dial by name connect p50 (us)|1"
        "byname_e2e.mib_s|dial by name e2e, 1 stream (MiB/s)|1"
        "byname_e2e.cpu_s_per_gb|  e2e CPU (s/GB)|0"
        "byname_e2e_connect.p50_us|  e2e connect p50 (us)|1"
        "e2e_cost.cpu_s_per_gb|  e2e - plaintext CPU (s/GB)|0"
        "e2e_cost.connect_us|  e2e - plaintext connect (us)|0"
        "tp1.cpu_s_per_gb|tunnel CPU, 1 stream (s/GB)|0"
        "ping.p50_us|ping-pong 64 B p50, idle (us)|1"
        "pingload.p50_us|ping-pong p50 under bulk (us)|1"
        "pingload.p99_us|ping-pong p99 under bulk (us)|1"
        "fair.x|  under bulk / idle p50|0"
        "pingload.load_mib_s|  bulk stream meanwhile (MiB/s)|1"
        "connect.p50_us|connect+1st byte p50 (us)|1"
    )
else
    ROWS=(
        "tp1.mib_s|throughput, 1 stream (MiB/s)|1"
        "tpN.mib_s|throughput, $STREAMS streams (MiB/s)|1"
        "byname.mib_s|dial by name, 1 stream (MiB/s)|1"
        "byname.cpu_s_per_gb|  dial by name CPU (s/GB)|0"
        "byname_connect.p50_us|  dial by name connect p50 (us)|1"
        "byname_e2e.mib_s|dial by name e2e, 1 stream (MiB/s)|1"
        "byname_e2e.cpu_s_per_gb|  e2e CPU (s/GB)|0"
        "byname_e2e_connect.p50_us|  e2e connect p50 (us)|1"
        "e2e_cost.cpu_s_per_gb|  e2e - plaintext CPU (s/GB)|0"
        "e2e_cost.connect_us|  e2e - plaintext connect (us)|0"
        "tp1.cpu_s_per_gb|tunnel CPU, 1 stream (s/GB)|0"
        "tpN.cpu_s_per_gb|tunnel CPU, $STREAMS streams (s/GB)|0"
        "connect.p50_us|connect+1st byte p50 (us)|1"
        "connect.p99_us|connect+1st byte p99 (us)|1"
        "connect_pin.p50_us|connect p50, pinned (us)|1"
        "connect_pin.p99_us|connect p99, pinned (us)|1"
        "ping.p50_us|ping-pong 64 B p50 (us)|1"
        "ping.p99_us|ping-pong 64 B p99 (us)|1"
        "ping_pin.p50_us|ping-pong p50, pinned (us)|1"
        "ping_pin.p99_us|ping-pong p99, pinned (us)|1"
        "pingload.p50_us|ping-pong p50 under bulk (us)|1"
        "fair.x|  under bulk / pinned idle p50|0"
        "pingload.load_mib_s|  bulk stream meanwhile (MiB/s)|1"
    )
    for n in $HOLDS; do ROWS+=("hold$n.kib_per_conn|RSS per held conn @$n (KiB)|0"); done
fi
ROWS+=(
    "stall.rss0_growth_mib|stalled x100: relay RSS+ (MiB)|0"
    "stall.rss1_growth_mib|stalled x100: forward RSS+ (MiB)|0"
    "stall.written_mib|  written by the clients (MiB)|0"
)

# The loopback targets of issue 29, read off this run: libtunnel's multiplexed paths against
# wstunnel's figure of the same run (or a fixed bound), "meets" or "misses" per path.
target_row() { # label key of_direct(1|0) cmp(ge|le) bound(wstunnel|number) unit
    local label=$1 key=$2 rel=$3 cmp=$4 bound=$5 unit=$6 b v p line
    fig() { # path -> the figure compared: the value, or its ratio to direct
        local x=${R[$1.$key]:-} d=${R[direct.$key]:-}
        [[ -z $x ]] && return
        if [[ $rel == 1 ]]; then [[ -n $d ]] && awk -v x="$x" -v d="$d" 'BEGIN { if (d > 0) printf "%.2f", x / d }'
        else echo "$x"; fi
    }
    if [[ $bound == wstunnel ]]; then
        b=$(fig wstunnel); [[ -z $b ]] && return
        line=$(printf '%-32s | %-4s wstunnel %s%s' "$label" "$([[ $cmp == ge ]] && echo ">=" || echo "<=")" "$b" "$unit")
    else
        b=$bound; line=$(printf '%-32s | %-4s %s%s' "$label" "$([[ $cmp == ge ]] && echo ">=" || echo "<=")" "$b" "$unit")
    fi
    for p in mux muxtcp muxgrpc muxquic muxwss; do
        [[ " $PATHS " == *" $p "* ]] || continue
        v=$(fig "$p"); [[ -z $v ]] && continue
        line+=$(awk -v v="$v" -v b="$b" -v c="$cmp" -v n="${NAMES[$p]}" -v u="$unit" \
            'BEGIN { ok = (c == "ge") ? v >= b : v <= b; printf " | %s %s%s %s", n, v, u, ok ? "meets" : "MISSES" }')
    done
    echo "$line"
}
targets() {
    echo
    echo "issue 29 targets (loopback; x = of direct; libtunnel against wstunnel in this run):"
    target_row "1 stream, of direct" tp1.mib_s 1 ge wstunnel x
    target_row "CPU-s per GB, both processes" tp1.cpu_s_per_gb 0 le wstunnel ""
    target_row "$STREAMS streams, of direct" tpN.mib_s 1 ge wstunnel x
    target_row "ping-pong p50 (us)" ping.p50_us 0 le wstunnel ""
    target_row "connect + 1st byte p50 (us)" connect.p50_us 0 le wstunnel ""
    local n q m
    q=${R[muxquic.tp1.cpu_s_per_gb]:-}
    for m in mux muxwss; do
        [[ -n $q && -n ${R[$m.tp1.cpu_s_per_gb]:-} ]] || continue
        awk -v q="$q" -v m="${R[$m.tp1.cpu_s_per_gb]}" -v n="$m" 'BEGIN { r = q / m; printf "%-32s | <=   1.5x %s (%s) | libtunnel mux quic:// %s = %.2fx %s\n", "issue 32: QUIC CPU-s per GB", n, m, q, r, (r <= 1.5 ? "meets" : "MISSES") }'
    done
    for n in $HOLDS; do
        [[ $n == 1000 ]] && target_row "RSS per held conn @1000 (KiB)" hold1000.kib_per_conn 0 le 12 ""
    done
}

cell() { # path key ratio
    local p=$1 key=$2 ratio=$3 v d mark="" tag=${2%%.*}
    v=${R[$p.$key]:-}
    if [[ -z "$v" ]]; then
        if [[ -n "${SKIP[$p]:-}" ]]; then echo "skipped"
        elif [[ -n "${R[$p.$tag.error]:-}" ]]; then echo "failed"
        else echo "-"; fi
        return
    fi
    if [[ $p == direct && $key == *cpu* ]]; then echo "-"; return; fi
    [[ -n "${R[$p.$tag.error]:-}" ]] && mark="*"
    d=${R[direct.$key]:-}
    if [[ $ratio == 1 && $p != direct && -n "$d" ]]; then
        awk -v v="$v" -v d="$d" -v m="$mark" 'BEGIN { printf "%s%s (%.2fx)", v, m, (d > 0 ? v / d : 0) }'
    else
        echo "$v$mark"
    fi
}

{
    echo
    echo "libtunnel bench: $(date -u +%Y-%m-%dT%H:%MZ), $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo '+dirty'), $(uname -r), $NCPU CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
    if [[ -n $LINK_MS ]]; then
        echo "long link: RTT $LINK_MS ms ($ONE_WAY ms each way), $LINK_MBIT Mbit/s each way shared by the link's connections (tunnel-bench delay);"
        echo "  direct = client -> link -> server; tunnels = client -> forward -> link -> relay -> server; dial by name = forward -> link (RTT/2) -> relay -> link (RTT/2) -> listen -> server"
        echo "sizes: ${LINK_SECS} s per throughput row, $LINK_PINGS round trips (at most 10 s; under bulk: 1.5 s of bulk first), $LINK_CONNECTS connects, stall: 100 streams up to $STALL_SECS s; ratios are to direct"
    else
        echo "sizes: $BYTES bytes per throughput run, $CONNECTS connects, $PINGS round trips ($((PINGS / 10)) under bulk); pinned = every process on CPU $PIN_CPU; ratios are to direct"
    fi
    echo "kernel: $(sysctl -n net.ipv4.tcp_rmem | tr -s '\t ' ' ') = tcp_rmem, $(sysctl -n net.ipv4.tcp_wmem | tr -s '\t ' ' ') = tcp_wmem, rmem_max $(sysctl -n net.core.rmem_max), wmem_max $(sysctl -n net.core.wmem_max)"
    echo "rounds: $ROUNDS, interleaved (every path once per round), figures are medians of the rounds; dial by name, stalled and held: first round only"
    echo "load average at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg); fd limit $FD_LIMIT${BENCH_TUNNEL_ENV:+; tunnel env: $BENCH_TUNNEL_ENV}"
    printf '%-34s' "metric"
    for p in $PATHS; do printf ' | %-20s' "${NAMES[$p]:-$p}"; done
    echo
    printf '%-34s' "" | tr ' ' '-'
    for p in $PATHS; do printf -- '-+-%-20s' "" | tr ' ' '-'; done
    echo
    for row in "${ROWS[@]}"; do
        IFS='|' read -r key label ratio <<<"$row"
        printf '%-34s' "$label"
        for p in $PATHS; do printf ' | %-20s' "$(cell "$p" "$key" "$ratio")"; done
        echo
    done
    for p in $PATHS; do
        [[ -n "${SKIP[$p]:-}" ]] && echo "note: $p skipped: ${SKIP[$p]}"
    done
    for k in "${!R[@]}"; do
        [[ $k == *.error ]] && echo "note: ${k%.error}: ${R[$k]}"
    done | sort
    echo "(* = not every connection could be held; see the notes. CPU is utime+stime of both tunnel processes; RSS counts both."
    echo " Dial-by-name CPU counts relay + forward + listen; e2e = TLS 1.3 inside the stream, --e2e on forward and listen.)"
    echo "(stalled x100: RSS growth with 100 streams whose server stopped reading, written until none moves; most of what the clients wrote sits in kernel socket buffers)"
    max_hold=0
    [[ -n $LINK_MS ]] && HOLDS=""
    for n in $HOLDS; do ((n > max_hold)) && max_hold=$n; done
    if ((2 * max_hold + 64 > FD_LIMIT)); then
        echo "(fd limit $FD_LIMIT: a process with one upstream socket per client connection (classic, rathole, bore)"
        echo " needs 2 descriptors per held connection, so $max_hold cannot all be held; the hard limit here cannot be raised.)"
    fi
    [[ -z $LINK_MS ]] && targets
    echo "raw results and logs: $OUT"
} | tee "$OUT/table.txt"
cp "$OUT/table.txt" "$HERE/results/latest${LINK_MS:+-link${LINK_MS}ms}.txt" 2>/dev/null || true
