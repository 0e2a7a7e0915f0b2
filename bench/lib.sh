# Helpers shared by the benchmark drivers (bench/run.sh, bench/http.sh): logging, background
# processes that are all killed on exit, and waiting for a line in a log. Source it after setting
# OUT (the results directory, with a logs/ subdirectory).

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# Processes: everything started here is killed on exit, by PID.

STARTED=()
LAST_PID=""
cleanup() {
    local p
    for p in "${STARTED[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${STARTED[@]}"; do
        for _ in $(seq 1 30); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null
    done
    wait 2>/dev/null
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

START_N=0
start_bg() { # name cmd... ; sets LAST_PID and LOG
    local name=$1; shift
    START_N=$((START_N + 1))
    LOG="$OUT/logs/$(printf '%02d' $START_N)-$name.log"
    "$@" >"$LOG" 2>&1 &
    LAST_PID=$!
    STARTED+=("$LAST_PID")
}

stop_pid() {
    local p=$1
    kill "$p" 2>/dev/null || return 0
    # Benchmarked processes need no graceful drain (the relay would wait 30 s for it).
    for _ in $(seq 1 10); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null
    wait "$p" 2>/dev/null
    return 0
}

wait_line() { # file regex timeout_s -> prints the first match
    local file=$1 re=$2 t=$3 m
    for _ in $(seq 1 $((t * 10))); do
        m=$(grep -m1 -oE "$re" "$file" 2>/dev/null) && { echo "$m"; return 0; }
        sleep 0.1
    done
    return 1
}


install_debs() { # package... : install the missing Debian packages (as root or with sudo), or exit
    local sudo=""
    [[ $(id -u) -ne 0 ]] && sudo=sudo
    log "installing $* from Debian"
    { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@"; } >"$OUT/logs/install-debs.log" 2>&1 \
        || { log "cannot install $* (see $OUT/logs/install-debs.log)"; exit 1; }
}
