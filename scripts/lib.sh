# Shell helpers shared by scripts/test.sh and the per-face test scripts (source it).

step() { printf '\n== %s\n' "$*"; }

# Install Debian packages that are missing (no-op when all are present); as root or with sudo.
need_debs() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing Debian packages: ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# A virtualenv at $1 with the pip packages $2... installed, activated in the calling shell. Made
# once and reused; pip runs again only when the package list changes. Uses $PYTHON, else
# python3.11 or python3, and installs python3-venv when that Python lacks venv.
py_venv() {
  local venv=$1
  shift
  local python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
  [ -n "$python" ] || { echo "python3 not found: apt-get install python3" >&2; return 1; }
  if [ ! -x "$venv/bin/python" ]; then
    if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
      need_debs python3-venv "python$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')-venv"
    fi
    "$python" -m venv "$venv"
  fi
  # shellcheck disable=SC1091
  . "$venv/bin/activate"
  local stamp="$venv/.libtunnel-requirements"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$*" ]; then
    python -m pip install -q --upgrade pip
    python -m pip install -q "$@"
    echo "$*" >"$stamp"
  fi
}

# Node and npm present, and bindings/node's pinned devDependencies (@napi-rs/cli, ws, undici)
# installed from its package-lock.json; npm ci is skipped while node_modules matches the lock.
# Run from the repository root.
node_deps() {
  command -v node >/dev/null || { echo "node not found: install Node.js 20 (https://nodejs.org)" >&2; return 1; }
  command -v npm >/dev/null || { echo "npm not found: install Node.js 20 with npm" >&2; return 1; }
  if [ ! -f bindings/node/node_modules/.package-lock.json ] \
    || [ bindings/node/package-lock.json -nt bindings/node/node_modules/.package-lock.json ]; then
    (cd bindings/node && npm ci --no-audit --no-fund)
  fi
}

# A TCP service on 127.0.0.1 (a free port) that reads each connection to EOF, then answers with the
# SHA-256 (hex) of what it read and closes; prints "hasher listening: PORT" once it accepts. The
# target of the round trips of scripts/test-dist.sh and deploy/verify-image.sh. Replaces the shell.
hash_server() {
  exec "${PYTHON:-python3}" -u -c '
import hashlib, socketserver
class H(socketserver.StreamRequestHandler):
    def handle(self):
        h = hashlib.sha256()
        while chunk := self.rfile.read1(65536):
            h.update(chunk)
        self.wfile.write(h.hexdigest().encode())
with socketserver.ThreadingTCPServer(("127.0.0.1", 0), H) as s:
    print("hasher listening:", s.server_address[1], flush=True)
    s.serve_forever()'
}
