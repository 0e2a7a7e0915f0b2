#!/usr/bin/env bash
# Density and cluster cost of one relay node (issue 35): Debian's redis-server, FLEET_NODES (1)
# `tunnel server` nodes with cluster_redis on it, and the `fleet` example (core/examples/fleet.rs)
# registering N idle listeners through the Rust API (one Listener, key and session each; with 2
# nodes, listener i registers at node i mod 2). For each N in FLEET_COUNTS it reports:
#   - registrations per second (N binds, FLEET_CONCURRENCY in flight), and Redis's commands per
#     second meanwhile;
#   - FLEET_CHECK (100) sampled names dialed by name through the *other* node (the same one with
#     one node) and echoed: names registered at one node resolve at the other;
#   - the nodes' VmRSS growth per registered idle listener, and Redis's used_memory per name;
#   - Redis commands per second while the N names are only held (INFO commandstats over
#     FLEET_WINDOW seconds after CONFIG RESETSTAT: the steady cost of keeping them claimed);
# then, with FLEET_RESTART=1, kills the (first) node with SIGKILL (no drain, its node key left to
# expire), starts a new one on the same address and samples every second how many listeners are
# connected, Redis's commands per second (total_commands_processed) and the listeners'
# re-registration attempts so far, until all are back or FLEET_RESTART_LIMIT seconds pass.
#
#   bench/fleet.sh                                  FLEET_COUNTS="1000 10000", restart after each
#   FLEET_COUNTS=200 FLEET_WINDOW=7 bench/fleet.sh  smoke run
#   FLEET_NODES=2 FLEET_COUNTS=10000 bench/fleet.sh  through a 2-node cluster
#
# Environment (optional): FLEET_COUNTS, FLEET_NODES (1 or 2), FLEET_CHECK (100), FLEET_WINDOW (20),
# FLEET_RESTART (1), FLEET_RESTART_LIMIT (120), FLEET_CONCURRENCY (64), FLEET_TTL (cluster_ttl, 10),
# FLEET_HANDSHAKES_PER_SOURCE (the nodes' max_handshakes_per_source; unset: its default, 128 — every
# listener here comes from 127.0.0.1, so this per-address cap paces a restart's reconnections),
# FLEET_PROFILE (release; debug to use the debug binaries), BENCH_NO_BUILD=1, FLEET_RELAY_BIN (the
# relay binary to measure, e.g. an older build), BENCH_OUT=DIR.
# The hard descriptor limit must allow N + a margin per process (both processes raise their soft
# limit to it). Benchmarks report figures; nothing here asserts a timing.
set -uo pipefail
export RUST_LOG=${RUST_LOG:-warn}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case "${1:-}" in
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    "") ;;
    *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
esac
COUNTS=${FLEET_COUNTS:-"1000 10000"}
WINDOW=${FLEET_WINDOW:-20}
RESTART=${FLEET_RESTART:-1}
RESTART_LIMIT=${FLEET_RESTART_LIMIT:-120}
CONC=${FLEET_CONCURRENCY:-64}
NODES=${FLEET_NODES:-1}
HPS=${FLEET_HANDSHAKES_PER_SOURCE:-}
[[ -n $HPS ]] && export TUNNEL_MAX_HANDSHAKES_PER_SOURCE=$HPS
CHECK=${FLEET_CHECK:-100}
[[ $NODES == 1 || $NODES == 2 ]] || { echo "FLEET_NODES is 1 or 2" >&2; exit 2; }
TTL=${FLEET_TTL:-10}
PROFILE=${FLEET_PROFILE:-release}
OUT=${BENCH_OUT:-$HERE/results/fleet-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/logs"
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

command -v redis-server >/dev/null || install_debs redis-server
flag=""; [[ $PROFILE == release ]] && flag=--release
if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
    log "building $PROFILE binaries (target dir $TARGET_DIR)"
    (cd "$ROOT" && cargo build $flag -q -p libtunnel --features cli --bin tunnel --example fleet) \
        || { log "build failed"; exit 1; }
fi
TUNNEL=${FLEET_RELAY_BIN:-$TARGET_DIR/$PROFILE/tunnel}
FLEET=$TARGET_DIR/$PROFILE/examples/fleet
freeport() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
ready() { wait_line "$LOG" "$2" "${3:-20}" || { log "$1 did not start (see $LOG)"; exit 1; }; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
rcli() { redis-cli -p "$REDIS_PORT" "$@"; }
info_field() { rcli INFO "$1" | tr -d '\r' | sed -n "s/^$2:\\([0-9]*\\).*/\\1/p"; }

# Every listener comes from 127.0.0.1: the per-source cap must allow them all; and the relay
# keeps one descriptor per session.
MAXN=$(tr ' ' '\n' <<<"$COUNTS" | sort -n | tail -n 1)
ulimit -n "$(ulimit -Hn)"
REDIS_PORT=$(freeport)
start_bg redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no
ready redis 'Ready to accept connections' >/dev/null
KEYGEN=$("$TUNNEL" keygen)
CLIENT_KEY=$(sed -n 's/^TUNNEL_KEY=//p' <<<"$KEYGEN")
RELAY_KEYS=$(sed -n "s/^TUNNEL_AUTH_KEYS='\(.*\)'$/\1/p" <<<"$KEYGEN")
CLUSTER_KEY=$("$TUNNEL" keygen | sed -n 's/^TUNNEL_KEY=//p')
node() { # port -> starts a node on 127.0.0.1:port; sets NODE_PID
    TUNNEL_LISTEN=127.0.0.1:$1 TUNNEL_MAX_CONNECTIONS=$((2 * MAXN + 2000)) TUNNEL_MAX_CONNECTIONS_PER_SOURCE=$((MAXN + 1000)) TUNNEL_AUTH_KEYS="$RELAY_KEYS" TUNNEL_LISTENERS_OPEN=true \
        TUNNEL_CLUSTER_REDIS="redis://127.0.0.1:$REDIS_PORT" TUNNEL_CLUSTER_KEY="$CLUSTER_KEY" TUNNEL_CLUSTER_TTL="$TTL" \
        start_bg "node-$1" "$TUNNEL" server
    NODE_PID=$LAST_PID
    ready node "ws://127\\.0\\.0\\.1:$1" >/dev/null
}

field() { grep -oE "(^| )$1=[0-9.]+" <<<"$2" | cut -d= -f2; }
rss_all() { local s=0 p; for p in "${NODE_PIDS[@]}"; do s=$((s + $(rss_kb "$p"))); done; echo "$s"; }

log "relay $TUNNEL ($("$TUNNEL" --version 2>/dev/null)); $NODES node(s); counts $COUNTS; window ${WINDOW}s; cluster_ttl ${TTL}s"
RESULTS=$OUT/results.txt
echo "# $PROFILE, $NODES node(s), cluster_ttl ${TTL}s, $CONC in flight, max_handshakes_per_source ${HPS:-default}, $(nproc) cores; load at start:$(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$RESULTS"
for n in $COUNTS; do
    rcli FLUSHALL >/dev/null
    NODE_PIDS=(); PORTS=(); urls=""
    for _ in $(seq 1 "$NODES"); do
        PORT=$(freeport)
        node "$PORT"
        NODE_PIDS+=("$NODE_PID"); PORTS+=("$PORT"); urls+="${urls:+,}ws://127.0.0.1:$PORT"
    done
    PORT=${PORTS[0]}; NODE_PID=${NODE_PIDS[0]}
    sleep 1
    rcli CONFIG RESETSTAT >/dev/null
    rss0=$(rss_all); mem0=$(info_field memory used_memory); cmd0=$(info_field stats total_commands_processed)
    TUNNEL_KEY=$CLIENT_KEY RUST_LOG=libtunnel::listener=warn start_bg "fleet-$n" "$FLEET" --relay "$urls" --count "$n" --concurrency "$CONC" --check "$CHECK" --hold 100000 --every 0.2
    FLEET_PID=$LAST_PID; FLEET_LOG=$LOG
    reg=$(ready fleet 'registered=[0-9]+ secs=[0-9.]+ rate_per_s=[0-9]+ failed=[0-9]+' 600)
    cmd1=$(info_field stats total_commands_processed)
    rcli INFO commandstats | tr -d '\r' | sed -n '/^cmdstat_/p' >"$OUT/commandstats-registering-$n.txt"
    regsecs=$(sed 's/.*secs=\([0-9.]*\).*/\1/' <<<"$reg")
    checked=""
    ((CHECK > 0)) && checked=" $(ready fleet 'checked=[0-9]+ ok=[0-9]+ failed=[0-9]+' 120)"
    sleep 2
    rss1=$(rss_all); mem1=$(info_field memory used_memory)
    names=$(rcli --scan --pattern 'libtunnel:name:*' | wc -l)
    rcli CONFIG RESETSTAT >/dev/null
    sleep "$WINDOW"
    stats=$(rcli INFO commandstats | tr -d '\r')
    total=$(sed -n 's/^cmdstat_[a-z|]*:calls=\([0-9]*\).*/\1/p' <<<"$stats" | awk '{s+=$1} END {print s+0}')
    evals=$(sed -n 's/^cmdstat_evalsha:calls=\([0-9]*\).*/\1/p' <<<"$stats"); evals=${evals:-0}
    line="n=$n nodes=$NODES $reg redis_cmds_per_s_registering=$(awk -v a="$cmd0" -v b="$cmd1" -v s="$regsecs" 'BEGIN {printf "%.0f", (b-a)/s}')$checked"
    line+=" names_in_redis=$names node_rss_per_listener_kb=$(awk -v a="$rss0" -v b="$rss1" -v n="$n" 'BEGIN {printf "%.1f", (b-a)/n}')"
    line+=" redis_bytes_per_name=$(awk -v a="$mem0" -v b="$mem1" -v n="$n" 'BEGIN {printf "%.0f", (b-a)/n}')"
    line+=" redis_cmds_per_s=$(awk -v t="$total" -v w="$WINDOW" 'BEGIN {printf "%.1f", t/w}') evalsha_per_s=$(awk -v t="$evals" -v w="$WINDOW" 'BEGIN {printf "%.1f", t/w}')"
    echo "$line" | tee -a "$RESULTS"
    sed -n '/^cmdstat_/p' <<<"$stats" >"$OUT/commandstats-$n.txt"
    if [[ $RESTART == 1 ]]; then
        kill -9 "$NODE_PID" 2>/dev/null; wait "$NODE_PID" 2>/dev/null   # no drain, no withdrawal
        t0=$(date +%s.%N)
        # listeners registered at the killed node (the first: i mod NODES == 0)
        expect=$(( (n + NODES - 1) / NODES ))
        node "$PORT"
        prev=$(info_field stats total_commands_processed); tprev=$t0; peak=0; back=""; samples=""; 
        for s in $(seq 1 "$RESTART_LIMIT"); do
            sleep 1
            # (a loaded machine stretches the 1 s: rates are over the measured interval)
            cur=$(info_field stats total_commands_processed); now=$(date +%s.%N)
            d=$(awk -v c="$((cur - prev))" -v a="$tprev" -v b="$now" 'BEGIN {printf "%.0f", c / (b - a)}'); prev=$cur; tprev=$now
            ((d > peak)) && peak=$d
            # The fleet's latest line (every 0.2 s): back when every listener of the killed node
            # re-registered once and all N are connected; the time is the last re-registration's.
            last=$(grep -E ' connected=[0-9]+' "$FLEET_LOG" | tail -n 1)
            c=$(field connected "$last"); at=$(field attempts "$last"); r=$(field reconnected "$last")
            samples+="$(awk -v a="$t0" -v b="$now" 'BEGIN {printf "%.1f", b - a}'):${c:-0}/${d}/${at:-0} "
            if [[ ${r:-0} -ge $expect && ${c:-0} -ge $n ]]; then
                back=$(awk -v a="$t0" -v b="$(field last_reconnected_at "$last")" 'BEGIN {printf "%.2f", b-a}'); break
            fi
        done
        echo "n=$n restart: all_back_secs=${back:-not_within_${RESTART_LIMIT}} peak_redis_cmds_per_s=$peak samples(secs_since_kill:connected/redis_cmds_per_s/reregistration_attempts)=$samples" | tee -a "$RESULTS"
        # why re-registrations failed (the listeners' warnings), most common first
        echo "n=$n restart: failed re-registrations by error: $(grep 're-registering failed' "$FLEET_LOG" | sed -n 's/.*error=\(.\{1,60\}\).*/\1/p' | sed 's/[0-9]\+/N/g' | sort | uniq -c | sort -rn | head -n 6 | awk '{c=$1; $1=""; printf "%s x%s;", $0, c}')" | tee -a "$RESULTS"
    fi
    stop_pid "$FLEET_PID"
    for p in "${NODE_PIDS[@]}"; do stop_pid "$p"; done
    stop_pid "$NODE_PID"
done
echo "# load at end:$(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$RESULTS"
log "results in $RESULTS"
