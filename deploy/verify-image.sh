#!/usr/bin/env bash
# Builds deploy/Dockerfile with podman and checks the container: it runs as the non-root user,
# its health check passes (and fails when /healthz does not answer), a dial through the
# containerized relay reaches a service on the host (1 MiB sent, its SHA-256 compared), and
# SIGTERM stops it with status 0. A manual check (not in
# the test command: it needs root, podman and a base image), run as root from anywhere:
#
#   deploy/verify-image.sh            # base: debootstrap'ed Debian bookworm (minbase), imported
#   BASE_IMAGE=debian:bookworm-slim deploy/verify-image.sh    # where base images can be pulled
#   deploy/verify-image.sh --from-source   # the Dockerfile's default path: its Rust stage compiles
#                                          # this checkout (BUILD_IMAGE, else one made with rustup)
#
# By default the image takes the release binary from the CLI tarball of `make dist` (built first
# when dist/ has none), as the Dockerfile's BINARY=prebuilt. Installs podman, runc and
# debootstrap (Debian packages) when missing. Container options are probed, simplest first, and
# the set that works is printed: some sandboxes lack CAP_SYS_RESOURCE (podman's default
# RLIMIT_NOFILE/NPROC cannot be set: pass the current limits) or mount cgroups v1 and v2 side by
# side (crun refuses "hybrid mode": use runc).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

[ "$(id -u)" -eq 0 ] || { echo "run as root (rootful podman)" >&2; exit 1; }
need_debs podman runc debootstrap curl
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
CLI_TGZ="dist/libtunnel-cli-$VERSION-linux-$(uname -m).tar.gz"
IMAGE=localhost/libtunnel-relay:verify
NAME=libtunnel-relay-verify
PORT=7835 # the image's TUNNEL_LISTEN and health check port; the container uses the host's network

T=$(mktemp -d "${TMPDIR:-/tmp}/libtunnel-image.XXXXXX")
hasher_pid=""
cleanup() {
  podman rm -f "$NAME" >/dev/null 2>&1 || true
  [ -n "$hasher_pid" ] && kill "$hasher_pid" 2>/dev/null
  rm -rf "$T"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*" >&2
  podman logs "$NAME" 2>&1 | tail -n 20 >&2 || true
  exit 1
}

step "image: the base"
if [ -z "${BASE_IMAGE:-}" ]; then
  BASE_IMAGE=localhost/libtunnel-debian-bookworm:minbase
  if ! podman image exists "$BASE_IMAGE"; then
    rootfs="$CARGO_TARGET_DIR/image/rootfs"
    rm -rf "$rootfs"
    mkdir -p "$(dirname "$rootfs")"
    debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import - "$BASE_IMAGE"
    rm -rf "$rootfs"
  fi
fi
echo "base image: $BASE_IMAGE"

# The first option set under which a container starts ("GLOBAL|RUN": podman's global options,
# then those of run and build). 32768 processes: the limit podman's runtime is left with here.
ULIMITS="--ulimit nofile=$(ulimit -Hn):$(ulimit -Hn) --ulimit nproc=32768:32768"
found=""
for candidate in "|" "|$ULIMITS" "--runtime runc|$ULIMITS"; do
  read -ra GLOBAL <<<"${candidate%%|*}"
  read -ra RUN <<<"${candidate#*|}"
  if out=$(podman "${GLOBAL[@]}" run --rm --network=host "${RUN[@]}" "$BASE_IMAGE" true 2>&1); then
    found=1
    break
  fi
  echo "podman ${candidate%%|*} run ${candidate#*|}: $out"
done
[ -n "$found" ] || fail "no option set could start a container"
echo "container options: ${GLOBAL[*]} ${RUN[*]}"

# The tunnel binary on this side (keys, the dial) comes from the CLI tarball either way.
[ -f "$CLI_TGZ" ] || bash scripts/dist.sh
tar -xzf "$CLI_TGZ" -C "$T"
CTX="$T/libtunnel-cli-$VERSION-linux-$(uname -m)"
if [ "${1:-}" = --from-source ]; then
  # The Dockerfile's own path: its Rust stage compiles the binary from this checkout. Without
  # BUILD_IMAGE, a Rust image is made from the base (rustup's stable toolchain, like rust:1-bookworm).
  # It trusts what this host trusts (its /etc/ssl/certs bundle), so rustup and cargo get through
  # a TLS-inspecting proxy the host is set up for; the relay image does not get that bundle.
  if [ -z "${BUILD_IMAGE:-}" ]; then
    BUILD_IMAGE=localhost/libtunnel-rust-bookworm:stable
    if ! podman image exists "$BUILD_IMAGE"; then
      step "image: a Rust build image on $BASE_IMAGE (rustup)"
      printf '%s\n' "FROM $BASE_IMAGE" \
        'RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl gcc libc6-dev && apt-get clean && rm -rf /var/lib/apt/lists/*' \
        'COPY host-ca-certificates.crt /etc/ssl/certs/ca-certificates.crt' \
        'ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        "RUN curl -fsSo /tmp/rustup-init https://static.rust-lang.org/rustup/dist/$(uname -m)-unknown-linux-gnu/rustup-init && chmod +x /tmp/rustup-init && /tmp/rustup-init -y --profile minimal --no-modify-path && rm /tmp/rustup-init && cargo --version" \
        >"$T/Rust.Containerfile"
      cp /etc/ssl/certs/ca-certificates.crt "$T/host-ca-certificates.crt"
      podman "${GLOBAL[@]}" build --quiet --network=host "${RUN[@]}" -f "$T/Rust.Containerfile" -t "$BUILD_IMAGE" "$T" >/dev/null
    fi
  fi
  step "image: podman build -f deploy/Dockerfile . (the Rust stage on $BUILD_IMAGE)"
  podman "${GLOBAL[@]}" build --format docker --network=host "${RUN[@]}" -f deploy/Dockerfile \
    --build-arg BUILD_IMAGE="$BUILD_IMAGE" --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$IMAGE" . >"$T/build.log" 2>&1 \
    || { tail -n 30 "$T/build.log" >&2; fail "podman build"; }
else
  step "image: podman build -f deploy/Dockerfile (BINARY=prebuilt, from $CLI_TGZ)"
  podman "${GLOBAL[@]}" build --quiet --format docker --network=host "${RUN[@]}" -f deploy/Dockerfile \
    --build-arg BINARY=prebuilt --build-arg BUILD_IMAGE="$BASE_IMAGE" --build-arg BASE_IMAGE="$BASE_IMAGE" \
    -t "$IMAGE" "$CTX" >/dev/null
fi
echo "built $IMAGE: $(podman image inspect --format '{{.Size}}' "$IMAGE" | numfmt --to=iec) ($(podman image inspect --format '{{.Size}}' "$BASE_IMAGE" | numfmt --to=iec) of it the base)"

step "image: run it"
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then fail "port $PORT is taken on this host (the container uses the host's network)"; fi
exec {hasher}< <(hash_server)
hasher_pid=$!
read -r -t 10 -u "$hasher" line || fail "the hashing service did not start"
HASH_PORT=${line#hasher listening: }
keys=$("$CTX/bin/tunnel" keygen --kid 1)
KEY=$(sed -n 's/^TUNNEL_KEY=//p' <<<"$keys")
AUTH_KEYS=$(sed -n "s/^TUNNEL_AUTH_KEYS='\(.*\)'$/\1/p" <<<"$keys")
podman "${GLOBAL[@]}" run -d --name "$NAME" --network=host "${RUN[@]}" \
  -e TUNNEL_AUTH_KEYS="$AUTH_KEYS" -e TUNNEL_ALLOW="[{\"host\":\"127.0.0.1\",\"port\":$HASH_PORT}]" "$IMAGE" >/dev/null
# The URL of the container's "relay listening: URL" line (waiting 30 s at most for it).
listening() {
  local line logs pid
  exec {logs}< <(exec timeout 30 podman logs -f "$NAME" 2>/dev/null)
  pid=$!
  while IFS= read -r -u "$logs" line; do
    if [[ $line == "relay listening: "* ]]; then
      echo "${line#relay listening: }"
      break
    fi
  done
  kill "$pid" 2>/dev/null || true
  exec {logs}<&-
}
said=$(listening)
[ "$said" = "ws://0.0.0.0:$PORT" ] || fail "the relay printed no 'relay listening: ws://0.0.0.0:$PORT' line within 30 s"
URL="ws://127.0.0.1:$PORT"
echo "ok: the container's relay says: relay listening: $said"

uid=$(podman exec "$NAME" sh -c 'awk "/^Uid:/ {print \$2}" /proc/1/status')
[ "$uid" = 10001 ] || fail "the relay (pid 1) runs as uid $uid, not 10001"
[ "$(podman exec "$NAME" id -un)" = tunnel ] || fail "the image's user is not 'tunnel'"
echo "ok: runs as uid 10001 (tunnel), not root"

check=$(podman inspect --format '{{.Config.Healthcheck.Test}}' "$NAME")
[[ $check == *curl*/healthz* ]] || fail "the image has no health check (got: $check)"
podman "${GLOBAL[@]}" healthcheck run "$NAME" || fail "podman healthcheck run: unhealthy"
health=$(curl -fsS "http://127.0.0.1:$PORT/healthz")
[[ $health == *'"ok":true'* ]] || fail "GET /healthz answered $health"
echo "ok: podman healthcheck run passes (the image's HEALTHCHECK); /healthz says $health"

head -c 1048576 /dev/urandom >"$T/payload"
want=$(sha256sum "$T/payload" | cut -d' ' -f1)
got=$(TUNNEL_RELAY="$URL" TUNNEL_KEY="$KEY" timeout 60 "$CTX/bin/tunnel" dial "127.0.0.1:$HASH_PORT" <"$T/payload") \
  || fail "tunnel dial through the container failed"
[ "$got" = "$want" ] || fail "dial through the container: got '$got', want $want"
echo "ok: tunnel dial through the containerized relay (1 MiB, sha256 matches)"

podman "${GLOBAL[@]}" stop -t 20 "$NAME" >/dev/null
code=$(podman inspect --format '{{.State.ExitCode}}' "$NAME")
[ "$code" = 0 ] || fail "after SIGTERM the relay exited with $code"
echo "ok: SIGTERM (podman stop) drains and exits 0"

# The health check tests the relay: with the health path moved, it fails.
podman rm "$NAME" >/dev/null
podman "${GLOBAL[@]}" run -d --name "$NAME" --network=host "${RUN[@]}" -e TUNNEL_HEALTH_PATH=/elsewhere \
  -e TUNNEL_AUTH_KEYS="$AUTH_KEYS" -e TUNNEL_ALLOW="[{\"host\":\"127.0.0.1\",\"port\":$HASH_PORT}]" "$IMAGE" >/dev/null
[ -n "$(listening)" ] || fail "the second relay did not start"
if podman "${GLOBAL[@]}" healthcheck run "$NAME" >/dev/null 2>&1; then fail "the health check passed with no /healthz"; fi
echo "ok: the health check fails when /healthz does not answer"
echo "image verified: $IMAGE"
