# Helpers shared by the benchmark drivers (bench/run.sh, bench/http.sh): logging, background
# processes that are all killed on exit, and waiting for a line in a log. Source it after setting
# OUT (the results directory, with a logs/ subdirectory).

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# Processes: everything started here is killed on exit, by PID.

STARTED=()
LAST_PID=""
# Extra clean-up commands (e.g. deleting network namespaces), run after the processes are killed.
EXIT_CMDS=()
cleanup() {
    local p c
    for p in "${STARTED[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${STARTED[@]}"; do
        for _ in $(seq 1 30); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null
    done
    wait 2>/dev/null
    for c in "${EXIT_CMDS[@]}"; do eval "$c" >/dev/null 2>&1; done
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

# ---------------------------------------------------------------------------------------------
# Peers built from their public source, once, into $PEER_DIR (default <target>/bench-peers).
# Pinned versions; a peer that cannot be built is skipped by the caller with the log's path.

WSTUNNEL_VERSION=${WSTUNNEL_VERSION:-10.6.2}
FRP_VERSION=v0.70.1 # pinned in bench/peers/frp/go.mod (+ go.sum)

build_wstunnel() { # -> prints the binary's path
    local dir="$PEER_DIR/wstunnel-$WSTUNNEL_VERSION" src log="$OUT/logs/build-wstunnel.log"
    if [[ -x "$dir/wstunnel" ]]; then echo "$dir/wstunnel"; return 0; fi
    mkdir -p "$dir"
    src="$dir/src"
    log "building wstunnel $WSTUNNEL_VERSION from source into $dir (once; several minutes)"
    {
        if [[ ! -f "$src/Cargo.toml" ]]; then
            rm -rf "$src"; mkdir -p "$src"
            # WSTUNNEL_SRC: a git repository of erebe/wstunnel (bare or not) or an unpacked source
            # tree of the version; by default a shallow clone of the release tag from GitHub (the
            # crate is not published on crates.io, only its source).
            if [[ -n ${WSTUNNEL_SRC:-} && -f "$WSTUNNEL_SRC/Cargo.toml" && ! -d "$WSTUNNEL_SRC/.git" ]]; then
                cp -a "$WSTUNNEL_SRC/." "$src/"
            elif [[ -n ${WSTUNNEL_SRC:-} ]]; then
                git -C "$WSTUNNEL_SRC" archive "v$WSTUNNEL_VERSION" | tar -x -C "$src"
            else
                git clone -q --depth 1 --branch "v$WSTUNNEL_VERSION" https://github.com/erebe/wstunnel "$src"
            fi
        fi
        # The upstream release profile (fat LTO, one codegen unit), as its released binaries.
        (cd "$src" && cargo build --release --locked -p wstunnel-cli --target-dir "$dir/build") \
            && cp "$dir/build/release/wstunnel" "$dir/wstunnel"
    } >"$log" 2>&1 || { rm -rf "$src"; return 1; }
    echo "$dir/wstunnel"
}

build_frp() { # -> prints the directory holding frps and frpc
    local dir="$PEER_DIR/frp-$FRP_VERSION" log="$OUT/logs/build-frp.log" b
    if [[ -x "$dir/frps" && -x "$dir/frpc" ]]; then echo "$dir"; return 0; fi
    mkdir -p "$dir"
    log "building frp $FRP_VERSION from source (Go module proxy) into $dir (once)"
    # go install pkg@version would ask the proxy for the module's version list (deprecation
    # check), which not every proxy serves; a pinned go.mod + go.sum builds the same source.
    # noweb: the dashboard's assets are built with npm upstream and are not in the module.
    for b in frps frpc; do
        (cd "$HERE/peers/frp" && CGO_ENABLED=0 go build -trimpath -tags "$b,noweb" -o "$dir/$b" "github.com/fatedier/frp/cmd/$b") \
            >>"$log" 2>&1 || return 1
    done
    echo "$dir"
}
