#!/usr/bin/env bash
# libtunnel benchmark, lossy-link and cold-start rows (also `bench/run.sh --lossy ...`).
#
# A real IP link in user space: two network namespaces (A: the client's side, B: the server's),
# each with a TUN device, joined by `tunnel-bench tun-link` (per direction: random loss, a drop-tail
# queue in front of a rate cap, a one-way delay), so real kernel TCP on both sides reacts to real
# loss and queueing. Needs root (ip netns, /dev/net/tun). Everything is torn down on exit.
#
#   bench/lossy.sh                 both parts: lossy link at 0 % and 1 % loss, then cold start
#   bench/lossy.sh --no-cold       the lossy link only
#   bench/lossy.sh --no-lossy      cold start only
#   bench/lossy.sh --rounds 3      interleaved rounds of the lossy rows (table: median [each round])
#
# Lossy link (defaults: RTT 50 ms, 100 Mbit/s each way, drop-tail queue of one RTT = 625,000 bytes,
# random loss 0 % then 1 % each way). Paths: direct (client in A -> echo server in B), libtunnel
# mux over WebSocket and raw TCP and classic (client -> `tunnel forward` in A -> link -> `tunnel
# server` in B -> echo), libtunnel over QUIC (muxquic: the same, `quic://`, each tunnel stream a
# QUIC stream; muxquic-cubic, muxquic-bbr, muxquic-newreno: with that congestion controller on
# both ends, TUNNEL_QUIC_CONGESTION), wstunnel (client -> `wstunnel client -L` in A -> link ->
# server in B -> echo), frp (client -> frps in A -> link -> frpc in B -> echo). Rows: bulk of one stream alone
# (fixed duration, counted by the server), idle ping-pong, and ping-pong p50/p99 of one connection
# while a second connection to the same address runs a bulk transfer (through `tunnel forward` or
# frp both are streams of one session; muxquic: two QUIC streams of one connection; direct, classic
# and wstunnel: two TCP connections).
#
# Cold start (default RTT 100 ms, 1 Gbit/s, no loss; COLD_RTT="50 100" for several): wall time of
# a new `tunnel dial` process (ws://, wss://, quic://, tcp://; wss and quic from one relay), and of
# a new `wstunnel client -L stdio://` (ws://, wss://), that sends 5 bytes to the echo server and
# reads them back; direct = a new TCP connection from a running process. frp has no one-shot
# client (its visitors run inside a long-lived frpc): no frp row.
#
# Benchmarks report figures; nothing here asserts a timing.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

DO_LOSSY=1; DO_COLD=1
ROUNDS=${LOSSY_ROUNDS:-1}
while (($#)); do
    arg=$1; shift
    case "$arg" in
        --no-cold) DO_COLD=0 ;;
        --no-lossy) DO_LOSSY=0 ;;
        --rounds) ROUNDS=${1:-}; shift ;;
        --rounds=*) ROUNDS=${arg#--rounds=} ;;
        -h|--help) sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; cat <<'EOF'

Environment (all optional):
  LOSSY_RTT=MS         RTT of the lossy link (default 50)
  LOSSY_MBIT=R         its rate per direction (default 100)
  LOSSY_LOSS="0 1"     random loss per direction in percent, one table section each
  LOSSY_QUEUE=BYTES    drop-tail queue per direction (default one RTT at the rate)
  LOSSY_SECS=S         seconds of the bulk-alone row (default 10)
  LOSSY_PINGS=N        round trips under bulk (default 200, at most LOSSY_PING_SECS)
  LOSSY_PING_SECS=S    (default 20); the bulk runs LOSSY_LOAD_SECS (3) before the first ping
  LOSSY_PATHS="..."    of: direct mux muxtcp muxquic muxquic-cubic muxquic-bbr muxquic-newreno
                       classic wstunnel frp (default: direct mux muxtcp muxquic classic wstunnel frp)
  LOSSY_ROUNDS=N       same as --rounds (default 1)
  LOSSY_TCP_CC=NAME    congestion control of the load generator's TCP sockets (direct's senders;
                       e.g. cubic; default the kernel's)
  LOSSY_RT=0           run the link forwarder at normal priority (default: SCHED_FIFO 10 via chrt)
  COLD_RTT="MS ..."    RTT(s) of the cold-start link (default 100; "50 100": one table each);
                       COLD_COUNT=N tries (default 5), interleaved ws, wss, quic, tcp per try round
  BENCH_NO_BUILD=1, BENCH_TUNNEL_BIN, BENCH_OUT, PEER_DIR, WSTUNNEL_SRC: as bench/run.sh
EOF
            exit 0 ;;
        *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "--rounds takes a positive count: $ROUNDS" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "bench/lossy.sh needs root (network namespaces and TUN devices)" >&2; exit 1; }

RTT=${LOSSY_RTT:-50}
MBIT=${LOSSY_MBIT:-100}
LOSSES=${LOSSY_LOSS:-0 1}
LOSSES=${LOSSES//,/ }
QUEUE=${LOSSY_QUEUE:-$(awk -v r="$MBIT" -v t="$RTT" 'BEGIN { printf "%d", r * 1e6 / 8 * t / 1e3 }')}
SECS=${LOSSY_SECS:-10}
PINGS=${LOSSY_PINGS:-200}
PING_SECS=${LOSSY_PING_SECS:-20}
LOAD_SECS=${LOSSY_LOAD_SECS:-3}
PATHS=${LOSSY_PATHS:-"direct mux muxtcp muxquic classic wstunnel frp"}
COLD_RTTS=${COLD_RTT:-100}
COLD_RTTS=${COLD_RTTS//,/ }
COLD_COUNT=${COLD_COUNT:-5}
OUT=${BENCH_OUT:-$HERE/results/lossy-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/logs"
RAW="$OUT/raw.txt"
: >"$RAW"
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
    log "building release binaries (target dir $TARGET_DIR)"
    (cd "$ROOT" && cargo build --release -q -p libtunnel --features cli --bin tunnel) || { log "building tunnel failed"; exit 1; }
    (cd "$ROOT" && cargo build --release -q -p libtunnel-bench) || { log "building tunnel-bench failed"; exit 1; }
fi
TUNNEL=${BENCH_TUNNEL_BIN:-$TARGET_DIR/release/tunnel}
GEN=${BENCH_GEN_BIN:-$TARGET_DIR/release/tunnel-bench}
for b in "$TUNNEL" "$GEN"; do [[ -x "$b" ]] || { log "missing binary $b"; exit 1; }; done

PEER_DIR=${PEER_DIR:-$TARGET_DIR/bench-peers}
WSTUNNEL=""; FRP=""
declare -A SKIP=()
if [[ " $PATHS " == *" wstunnel "* ]]; then
    WSTUNNEL=$(build_wstunnel) || SKIP[wstunnel]="building wstunnel failed (see $OUT/logs/build-wstunnel.log)"
fi
if [[ " $PATHS " == *" frp "* ]]; then
    FRP=$(build_frp) || SKIP[frp]="building frp failed (see $OUT/logs/build-frp.log)"
fi

# ---------------------------------------------------------------------------------------------
# The two namespaces and their TUN devices (addresses exist only inside them).

NSA=ltbench-a-$$; NSB=ltbench-b-$$
IPA=10.231.0.1; IPB=10.231.0.2
NA=(ip netns exec "$NSA"); NB=(ip netns exec "$NSB")
EXIT_CMDS+=("ip netns del $NSA" "ip netns del $NSB")
{
    ip netns add "$NSA" && ip netns add "$NSB" &&
        for ns in "$NSA" "$NSB"; do
            ip -n "$ns" link set lo up && ip -n "$ns" tuntap add dev lt0 mode tun || exit 1
        done &&
        ip -n "$NSA" addr add "$IPA" peer "$IPB/32" dev lt0 && ip -n "$NSA" link set lt0 up &&
        ip -n "$NSB" addr add "$IPB" peer "$IPA/32" dev lt0 && ip -n "$NSB" link set lt0 up
} >"$OUT/logs/netns.log" 2>&1 || { log "cannot set up the network namespaces (see $OUT/logs/netns.log)"; exit 1; }
# The congestion control of the load generator's own TCP sockets (LOSSY_TCP_CC, e.g. cubic: the
# direct path's senders; tunnels keep the kernel's default). The namespaces' sysctl cannot be
# written here (EPERM), so tunnel-bench sets it per socket (BENCH_TCP_CC).
[[ -n ${LOSSY_TCP_CC:-} ]] && export BENCH_TCP_CC=$LOSSY_TCP_CC

LINK_PID=""
start_tun_link() { # rtt_ms mbit queue_bytes loss_pct
    [[ -n $LINK_PID ]] && stop_pid "$LINK_PID"
    local oneway
    oneway=$(awk -v r="$1" 'BEGIN { print r / 2 }')
    # Real-time priority (SCHED_FIFO, when allowed): the link stands for the network and must not
    # be starved by the tunnels it carries or by other work on the machine (on a shared 2-core
    # machine a starved forwarder capped every path below the link's rate and added its own delay).
    local rt=()
    [[ ${LOSSY_RT:-1} == 1 ]] && chrt -f 10 true 2>/dev/null && rt=(chrt -f 10)
    start_bg "tun-link-${1}ms-${4}pct" "${rt[@]}" "$GEN" tun-link --netns-a "/run/netns/$NSA" --netns-b "/run/netns/$NSB" \
        --delay-ms "$oneway" --rate-mbit "$2" --queue-bytes "$3" --loss-pct "$4"
    LINK_PID=$LAST_PID
    wait_line "$LOG" 'link up' 10 >/dev/null || { log "the tun link did not start (see $LOG)"; exit 1; }
}

start_bg echo "${NB[@]}" "$GEN" server --listen "$IPB:0"
ECHO=$(wait_line "$LOG" '10\.231\.0\.2:[0-9]+' 10) || { log "echo server did not start"; exit 1; }
ECHO_PORT=${ECHO##*:}
# Until the echo server holds no connection (at most 10 s: after a classic connection over this link
# the relay's connection to the target can stay open longer; see raw.txt's settle lines).
settle() { "${NB[@]}" "$GEN" settle --addr "$ECHO" --timeout 10 >>"$RAW" 2>&1; }
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
# The relay's self-signed certificate (wss:// and quic://), trusted by the clients with --ca.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=relay \
    -addext "subjectAltName=IP:$IPB" -keyout "$OUT/relay-key.pem" -out "$OUT/relay-cert.pem" >"$OUT/logs/openssl.log" 2>&1 \
    || log "openssl failed: no wss:// or quic:// rows (see $OUT/logs/openssl.log)"
TLS_ENV=(TUNNEL_TLS_CERT="$OUT/relay-cert.pem" TUNNEL_TLS_KEY="$OUT/relay-key.pem")
log "namespaces $NSA ($IPA) and $NSB ($IPB); echo server $ECHO; load average $LOAD_START"

declare -A R=() RL=()
put() { R[$1]=$2; RL[$1]="${RL[$1]:-}${RL[$1]:+ }$2"; }
gen() { # key-prefix cmd... : runs in namespace A, parses key=value into R[prefix.key]
    local pre=$1 line kv; shift
    line=$("${NA[@]}" "$@" 2>>"$OUT/logs/gen.err" | tail -n 1)
    echo "$pre $line" >>"$RAW"
    if [[ "$line" == error* || -z "$line" ]]; then
        R[$pre.error]=${line:-no output}; log "  $pre: FAILED ${R[$pre.error]}"; return 1
    fi
    # shellcheck disable=SC2086
    for kv in $line; do [[ "$kv" == *=* ]] && put "$pre.${kv%%=*}" "${kv#*=}"; done
    log "  $pre: $line"
}

KEYGEN=$("$TUNNEL" keygen)
CLIENT_KEY=$(sed -n 's/^TUNNEL_KEY=//p' <<<"$KEYGEN")
RELAY_KEYS=$(sed -n "s/^TUNNEL_AUTH_KEYS='\(.*\)'$/\1/p" <<<"$KEYGEN")
SECRET=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
TUNNEL_ENV=(RUST_LOG=${RUST_LOG:-info,libtunnel::conn=warn} ${BENCH_TUNNEL_ENV:-})

ADDR=""; PATH_PIDS=()
start_relay() { # name scheme [env...] : a `tunnel server` in B; sets RELAY_URL and RELAY_PID
    # (scheme quic: pass TLS_ENV and TUNNEL_QUIC_LISTEN in env)
    local name=$1 scheme=$2; shift 2
    start_bg "relay-$name" "${NB[@]}" env "${TUNNEL_ENV[@]}" "$@" TUNNEL_LISTEN="$IPB:0" TUNNEL_TCP_LISTEN="$IPB:0" \
        TUNNEL_AUTH_KEYS="$RELAY_KEYS" TUNNEL_ALLOW="[{\"host\":\"$IPB\",\"port\":$ECHO_PORT}]" "$TUNNEL" server
    RELAY_PID=$LAST_PID
    RELAY_URL=$(wait_line "$LOG" "$scheme://10\.231\.0\.2:[0-9]+" 10)
}

start_direct() { ADDR=$ECHO; PATH_PIDS=(); }
start_libtunnel() { # mux|muxtcp|classic|muxquic[-cubic|-bbr|-newreno]
    local scheme=ws flag=() fwd env=()
    [[ $1 == muxtcp ]] && scheme=tcp
    [[ $1 == classic ]] && flag=(--classic)
    if [[ $1 == muxquic* ]]; then
        [[ -s "$OUT/relay-cert.pem" ]] || { SKIP[$1]="no certificate (openssl failed)"; return 1; }
        scheme=quic; flag=(--ca "$OUT/relay-cert.pem"); env=("${TLS_ENV[@]}" TUNNEL_QUIC_LISTEN="$IPB:0")
        # The controller on both ends: the relay's quic_congestion setting and the client's variable.
        [[ $1 == muxquic-* ]] && env+=(TUNNEL_QUIC_CONGESTION="${1#muxquic-}")
    fi
    start_relay "$1" "$scheme" "${env[@]}" || { SKIP[$1]="tunnel server did not start (see $LOG)"; stop_pid "$RELAY_PID"; return 1; }
    TUNNEL_KEY="$CLIENT_KEY" start_bg "forward-$1" "${NA[@]}" env "${TUNNEL_ENV[@]}" "${env[@]}" "$TUNNEL" forward 127.0.0.1:0 "$ECHO" --relay "$RELAY_URL" "${flag[@]}"
    local f=$LAST_PID
    fwd=$(wait_line "$LOG" 'forwarding 127\.0\.0\.1:[0-9]+' 20) || { SKIP[$1]="tunnel forward did not start (see $LOG)"; stop_pid "$f"; stop_pid "$RELAY_PID"; return 1; }
    ADDR=${fwd#forwarding }; PATH_PIDS=("$f" "$RELAY_PID")
}
start_mux() { start_libtunnel mux; }
start_muxtcp() { start_libtunnel muxtcp; }
start_classic() { start_libtunnel classic; }
start_muxquic() { start_libtunnel "muxquic$1"; } # "" or -cubic, -bbr, -newreno
start_wstunnel() {
    [[ -n $WSTUNNEL ]] || return 1
    local port=$((20000 + RANDOM % 20000)) lport=$((40000 + RANDOM % 20000))
    RUST_LOG=warn start_bg wstunnel-server "${NB[@]}" "$WSTUNNEL" server "ws://$IPB:$port"
    local s=$LAST_PID
    RUST_LOG=warn start_bg wstunnel-client "${NA[@]}" "$WSTUNNEL" client -L "tcp://127.0.0.1:$lport:$ECHO" "ws://$IPB:$port"
    ADDR=127.0.0.1:$lport; PATH_PIDS=("$LAST_PID" "$s")
}
start_frp() { # frps on the client's side, frpc next to the server: the yamux session crosses the link
    [[ -n $FRP ]] || return 1
    local ctrl=$((20000 + RANDOM % 20000)) svc=$((40000 + RANDOM % 20000))
    printf '%s\n' "bindAddr = \"$IPA\"" "bindPort = $ctrl" "auth.token = \"$SECRET\"" 'log.level = "warn"' >"$OUT/frps.toml"
    printf '%s\n' "serverAddr = \"$IPA\"" "serverPort = $ctrl" "auth.token = \"$SECRET\"" 'log.level = "warn"' 'loginFailExit = false' \
        '[[proxies]]' 'name = "echo"' 'type = "tcp"' "localIP = \"$IPB\"" "localPort = $ECHO_PORT" "remotePort = $svc" >"$OUT/frpc.toml"
    start_bg frps "${NA[@]}" "$FRP/frps" -c "$OUT/frps.toml"
    local s=$LAST_PID
    start_bg frpc "${NB[@]}" "$FRP/frpc" -c "$OUT/frpc.toml"
    ADDR=$IPA:$svc; PATH_PIDS=("$LAST_PID" "$s")
}
start_path() {
    local p=$1
    case $p in
        muxquic | muxquic-cubic | muxquic-bbr | muxquic-newreno) start_muxquic "${p#muxquic}" ;;
        *) "start_$p" ;;
    esac || { [[ -n "${SKIP[$p]:-}" ]] || SKIP[$p]="could not start"; return 1; }
    for _ in $(seq 1 150); do
        "${NA[@]}" "$GEN" connect --addr "$ADDR" --count 1 --warmup 0 >/dev/null 2>&1 && { settle; return 0; }
        sleep 0.2
    done
    SKIP[$p]="no echo through the path within 30 s (see $OUT/logs)"; stop_path; return 1
}
stop_path() { local x; for x in "${PATH_PIDS[@]}"; do stop_pid "$x"; done; PATH_PIDS=(); settle; }

declare -A NAMES=([direct]="direct" [mux]="libtunnel mux ws" [muxtcp]="libtunnel mux tcp" [muxquic]="libtunnel quic" [muxquic-cubic]="libtunnel quic cubic"
    [muxquic-bbr]="libtunnel quic bbr" [muxquic-newreno]="libtunnel quic newreno" [classic]="libtunnel classic" [wstunnel]="wstunnel $WSTUNNEL_VERSION" [frp]="frp ${FRP_VERSION#v}")

cellv() { # key: median, with each round's value when there are several
    local v=${R[$1]:-} all=${RL[$1]:-}
    [[ -z $v ]] && { [[ -n ${R[${1%.*}.error]:-} ]] && echo failed || echo -; return; }
    if [[ $all == *" "* ]]; then echo "$v [${all// /,}]"; else echo "$v"; fi
}
udp_drops() { "$@" awk '/^Udp:/ { if (!h) { for (i = 1; i <= NF; i++) c[$i] = i; h = 1 } else print $c["RcvbufErrors"] }' /proc/net/snmp; }
cellms() { # key in us: median in ms, with each round's value when there are several
    local v=${R[$1]:-} all=${RL[$1]:-}
    [[ -z $v ]] && return
    # shellcheck disable=SC2086
    if [[ $all == *" "* ]]; then
        echo "$(awk -v v="$v" 'BEGIN { printf "%.1f", v / 1000 }') [$(printf '%s\n' $all | awk '{ printf "%s%.0f", (NR > 1 ? "," : ""), $1 / 1000 }')] ms"
    else
        awk -v v="$v" 'BEGIN { printf "%.1f ms", v / 1000 }'
    fi
}
medians() {
    local k
    for k in "${!RL[@]}"; do
        # shellcheck disable=SC2086
        set -- ${RL[$k]}
        (($# > 1)) || continue
        R[$k]=$(printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
    done
}

TABLE="$OUT/table.txt"
{
    echo
    echo "libtunnel bench (bench/lossy.sh): $(date -u +%Y-%m-%dT%H:%MZ), $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo '+dirty'), $(uname -r), $(nproc) CPUs; load average at start $LOAD_START"
    echo "namespace kernel: tcp_congestion_control $("${NA[@]}" sysctl -n net.ipv4.tcp_congestion_control), tcp_rmem $("${NA[@]}" sysctl -n net.ipv4.tcp_rmem | tr -s '\t ' ' '), tcp_wmem $("${NA[@]}" sysctl -n net.ipv4.tcp_wmem | tr -s '\t ' ' ')${BENCH_TCP_CC:+; load generator TCP sockets: $BENCH_TCP_CC}"
} >"$TABLE"

# ---------------------------------------------------------------------------------------------
# Lossy link

if ((DO_LOSSY)); then
    log "lossy link: RTT $RTT ms, $MBIT Mbit/s, queue $QUEUE bytes, loss ${LOSSES// /, } % each way; $ROUNDS round(s)"
    for loss in $LOSSES; do
        start_tun_link "$RTT" "$MBIT" "$QUEUE" "$loss"
        for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
            for p in $PATHS; do
                [[ -n ${SKIP[$p]:-} ]] && continue
                log "== loss $loss %, round $ROUND: $p"
                drops0=$(($(udp_drops "${NA[@]}") + $(udp_drops "${NB[@]}")))
                start_path "$p" || { log "  $p skipped: ${SKIP[$p]}"; continue; }
                gen "$loss.$p.bulk" "$GEN" throughput --addr "$ADDR" --streams 1 --secs "$SECS"
                settle
                gen "$loss.$p.ping" "$GEN" pingpong --addr "$ADDR" --count 50 --warmup 3 --secs 10
                settle
                gen "$loss.$p.load" "$GEN" pingpong --addr "$ADDR" --count "$PINGS" --warmup 3 --secs "$PING_SECS" --load "$LOAD_SECS"
                stop_path
                # UDP datagrams dropped at a full socket receive buffer (QUIC paths) during this path's rows.
                put "$loss.$p.udp_drops" $(($(udp_drops "${NA[@]}") + $(udp_drops "${NB[@]}") - drops0))
                echo "$loss.$p udp_rcvbuf_drops=${R[$loss.$p.udp_drops]}" >>"$RAW"
            done
        done
        log "link counters: $(tail -n 1 "$OUT"/logs/*tun-link-"${RTT}"ms-"${loss}"pct.log)"
    done
    medians
    {
        echo
        echo "lossy link: RTT $RTT ms, $MBIT Mbit/s each way, drop-tail queue $QUEUE bytes (one RTT) each way, real kernel TCP in two namespaces (tunnel-bench tun-link)"
        echo "bulk = one stream alone, $SECS s, counted by the server; ping = 64 B round trips, idle; under bulk = $PINGS round trips (at most $PING_SECS s) on one connection while a"
        echo "second connection to the same address pushes bulk, started $LOAD_SECS s before (mux, muxtcp, quic, frp: two streams of one session; direct, classic, wstunnel: two TCP connections)"
        [[ $ROUNDS -gt 1 ]] && echo "$ROUNDS interleaved rounds: median [each round]"
        for loss in $LOSSES; do
            echo
            echo "random loss $loss % each way"
            printf '%-20s | %-22s | %-9s | %-12s | %-14s | %-28s | %-12s | %-20s | %s\n' path "bulk MiB/s" "of direct" "ping p50 ms" "under bulk p50" "under bulk p99" "p99 / direct" "bulk meanwhile MiB/s" "UDP rcvbuf drops"
            for p in $PATHS; do
                b=${R[$loss.$p.bulk.mib_s]:-}; d=${R[$loss.direct.bulk.mib_s]:-}
                u99=${R[$loss.$p.load.p99_us]:-}; d99=${R[$loss.direct.load.p99_us]:-}
                printf '%-20s | %-22s | %-9s | %-12s | %-14s | %-28s | %-12s | %-20s | %s\n' "${NAMES[$p]:-$p}" \
                    "$(cellv "$loss.$p.bulk.mib_s")" \
                    "$([[ -n $b && -n $d ]] && awk -v b="$b" -v d="$d" 'BEGIN { printf "%.2fx", b / d }')" \
                    "$(awk -v v="${R[$loss.$p.ping.p50_us]:-}" 'BEGIN { if (v != "") printf "%.1f", v / 1000 }')" \
                    "$(awk -v v="${R[$loss.$p.load.p50_us]:-}" 'BEGIN { if (v != "") printf "%.1f ms", v / 1000 }')" \
                    "$(cellms "$loss.$p.load.p99_us")" \
                    "$([[ -n $u99 && -n $d99 ]] && awk -v u="$u99" -v d="$d99" 'BEGIN { printf "%.2fx", u / d }')" \
                    "${R[$loss.$p.load.load_mib_s]:-}" "$([[ $p == muxquic* ]] && cellv "$loss.$p.udp_drops")"
            done
        done
        for p in $PATHS; do [[ -n ${SKIP[$p]:-} ]] && echo "note: $p skipped: ${SKIP[$p]}"; done
        for k in "${!R[@]}"; do [[ $k == *.error ]] && echo "note: ${k%.error}: ${R[$k]}"; done | sort
        echo "link counters (packets, random losses, queue drops, per direction; last 10 s report of each link):"
        for loss in $LOSSES; do echo "  $loss %: $(tail -n 1 "$OUT"/logs/*tun-link-"${RTT}"ms-"${loss}"pct.log)"; done
        # UDP datagrams the kernel dropped because a QUIC endpoint's socket buffer was full: loss the
        # link did not make (the namespaces' counters since they were made).
        echo "UDP receive-buffer drops (RcvbufErrors) over the run: A $(udp_drops "${NA[@]}"), B $(udp_drops "${NB[@]}")"
    } >>"$TABLE"
fi

# ---------------------------------------------------------------------------------------------
# Cold start

if ((DO_COLD)); then
    # wstunnel's one-shot client: `wstunnel client -L stdio://TARGET` (its ssh ProxyCommand mode)
    # against a running `wstunnel server` in B, plain and with TLS (the same certificate; the
    # wstunnel client does not verify certificates unless told, and has no option for a private CA).
    cold_wstunnel() { # rtt name scheme [server flags...]
        local rtt=$1 name=$2 scheme=$3 port=$((20000 + RANDOM % 20000)) s; shift 3
        RUST_LOG=warn start_bg "wstunnel-server-$name" "${NB[@]}" "$WSTUNNEL" server "$scheme://$IPB:$port" "$@"
        s=$LAST_PID
        for _ in $(seq 1 100); do "${NA[@]}" bash -c "exec 3<>/dev/tcp/$IPB/$port" 2>/dev/null && break; sleep 0.1; done
        gen "cold.$rtt.$name" "$GEN" coldstart --count "$COLD_COUNT" -- env RUST_LOG=warn "$WSTUNNEL" client -L "stdio://$ECHO" "$scheme://$IPB:$port"
        stop_pid "$s"
    }
    for rtt in $COLD_RTTS; do
        log "cold start: RTT $rtt ms, 1000 Mbit/s, no loss; $COLD_COUNT tries each, interleaved"
        start_tun_link "$rtt" 1000 "$(awk -v t="$rtt" 'BEGIN { printf "%d", 1e9 / 8 * t / 1e3 }')" 0
        # Two relays up at once: plain (ws://, tcp://) and TLS (wss://, quic://, one certificate),
        # so every try round runs each scheme once and a change of load hits them alike.
        declare -A CURL=()
        if start_relay "cold-$rtt" ws; then
            CURL[ws]=$RELAY_URL; CURL[tcp]=$(wait_line "$LOG" "tcp://10\.231\.0\.2:[0-9]+" 5)
            PLAIN_PID=$RELAY_PID
        fi
        if [[ -s "$OUT/relay-cert.pem" ]] && start_relay "cold-tls-$rtt" wss "${TLS_ENV[@]}" TUNNEL_QUIC_LISTEN="$IPB:0"; then
            CURL[wss]=$RELAY_URL; CURL[quic]=$(wait_line "$LOG" "quic://10\.231\.0\.2:[0-9]+" 5)
            TLS_PID=$RELAY_PID
        fi
        for ((i = 1; i <= COLD_COUNT; i++)); do
            gen "cold.$rtt.direct" "$GEN" coldstart --count 1 --addr "$ECHO"
            for n in ws wss quic tcp; do
                [[ -n ${CURL[$n]:-} ]] || continue
                ca=(); [[ $n == wss || $n == quic ]] && ca=(--ca "$OUT/relay-cert.pem")
                gen "cold.$rtt.$n" "$GEN" coldstart --count 1 -- env "${TUNNEL_ENV[@]}" TUNNEL_KEY="$CLIENT_KEY" "$TUNNEL" dial "$ECHO" --relay "${CURL[$n]}" "${ca[@]}"
            done
        done
        stop_pid "${PLAIN_PID:-}"; stop_pid "${TLS_PID:-}"
        if [[ -n $WSTUNNEL ]]; then
            cold_wstunnel "$rtt" wstunnel-ws ws
            [[ -s "$OUT/relay-cert.pem" ]] && cold_wstunnel "$rtt" wstunnel-wss wss --tls-certificate "$OUT/relay-cert.pem" --tls-private-key "$OUT/relay-key.pem"
        fi
    done
    medians
    for rtt in $COLD_RTTS; do
        {
            echo
            echo "cold start at RTT $rtt ms (1 Gbit/s, no loss): a new process sends 5 bytes to the echo server and reads them back, wall time from spawn, $COLD_COUNT tries"
            echo "(direct = a new TCP connection from a running process: one RTT for the handshake, one for the echo; tunnel dial tries interleaved ws, wss, quic, tcp)"
            printf '%-28s | %-10s | %-10s | %-10s | %-16s | %s\n' path "p50 ms" "min ms" "max ms" "RTTs (p50 / RTT)" "of wss"
            for n in direct ws wss quic tcp wstunnel-ws wstunnel-wss; do
                k=cold.$rtt.$n; v=${R[$k.p50_ms]:-}
                case $n in
                    direct) label=direct ;;
                    wstunnel-*) label="wstunnel $WSTUNNEL_VERSION (${n#wstunnel-}://)"; [[ -z $WSTUNNEL ]] && continue ;;
                    *) label="tunnel dial ($n://)" ;;
                esac
                # shellcheck disable=SC2086
                all=$(printf '%s\n' ${RL[$k.min_ms]:-} | sort -g)
                w=${R[cold.$rtt.wss.p50_ms]:-}
                printf '%-28s | %-10s | %-10s | %-10s | %-16s | %s\n' "$label" "${v:-${R[$k.error]:+failed}}" \
                    "$(head -n 1 <<<"$all")" "$(tail -n 1 <<<"$all")" "$([[ -n $v ]] && awk -v v="$v" -v r="$rtt" 'BEGIN { printf "%.1f", v / r }')" \
                    "$([[ -n $v && -n $w ]] && awk -v v="$v" -v w="$w" 'BEGIN { printf "%.2fx", v / w }')"
            done
            for k in "${!R[@]}"; do [[ $k == cold.$rtt.*.error ]] && echo "note: ${k%.error}: ${R[$k]}"; done | sort
        } >>"$TABLE"
    done
fi

echo "load average at end $(cut -d' ' -f1-3 /proc/loadavg); raw results and logs: $OUT" >>"$TABLE"
cat "$TABLE"
cp "$TABLE" "$HERE/results/latest-lossy.txt" 2>/dev/null || true
