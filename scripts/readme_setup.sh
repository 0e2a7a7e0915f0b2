# What the hidden `setup` marks of the docs call (scripts/readme_blocks.py sources this file first):
# the machines a page's terminals talk to, made inside the group's own network and mount namespace.
# There `relay.example.com` and `relay` are 127.0.0.1 and the private hosts (`db.internal`,
# `internal-api.db.internal`, `bastion.internal`) 127.0.0.2, through a private /etc/hosts. Every
# process started here dies with the namespace (its PID namespace ends with the group).
# Each helper returns once its server printed that it is ready (bounded by README_WAIT seconds).

README_WAIT=${README_WAIT:-60}

# await_line FILE TEXT [PID]: wait until FILE has a line containing TEXT (bounded, and over as
# soon as process PID, which writes FILE, has exited; no polling sleep).
await_line() {
  if ! timeout "$README_WAIT" grep -q -m1 -F -- "$2" <(tail ${3:+--pid="$3"} -n +1 -F "$1" 2>/dev/null); then
    echo "setup: $1 never printed '$2'; it printed:" >&2
    cat "$1" >&2
    return 1
  fi
}

# pki: a private CA (ca.pem) and a certificate for relay.example.com signed by it (relay.pem,
# relay.key), as an operator would have; clients trust the CA through TUNNEL_CA in ./.env.
pki() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=docs test CA" \
    -keyout ca.key -out ca.pem 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=relay.example.com" \
    -keyout relay.key -out relay.csr 2>/dev/null
  printf 'subjectAltName=DNS:relay.example.com\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > relay.ext
  openssl x509 -req -in relay.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile relay.ext \
    -out relay.pem 2>/dev/null
}

# relay [NAME=VALUE...]: `tunnel server` at wss://relay.example.com (port 443), with dialer key 1
# (README_SECRET: the secret the harness put in place of the page's `1:0mB1…=`), the extra settings given as environment
# variables, its log in relay.log; ./.env points every client of the page at it.
relay() {
  [ -f relay.pem ] || pki
  env TUNNEL_AUTH_KEYS="[{\"kid\":1,\"data\":\"$README_SECRET\"}]" TUNNEL_ALLOW='[{"host":"db.internal","port":5432}]' \
    TUNNEL_LISTEN=127.0.0.1:443 TUNNEL_TLS_CERT=relay.pem TUNNEL_TLS_KEY=relay.key "$@" \
    tunnel server > relay.log 2>&1 &
  await_line relay.log "relay listening: wss://127.0.0.1:443" $!
  printf 'TUNNEL_RELAY=wss://relay.example.com\nTUNNEL_KEY=1:%s\nTUNNEL_CA=%s/ca.pem\n' "$README_SECRET" "$PWD" > .env
}

# postgres ADDRESS: PostgreSQL on ADDRESS:5432, user and database `app`, trusted (no password).
postgres_at() {
  local bin data
  bin=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n1)")
  data=$(mktemp -d /tmp/readme-pg-XXXXXX)
  chown postgres: "$data"
  cd /
  runuser -u postgres -- "$bin/initdb" -D "$data/db" -A trust -U app > "$data/initdb.log" 2>&1
  runuser -u postgres -- "$bin/postgres" -D "$data/db" -k "$data" -c listen_addresses="$1" -p 5432 \
    > "$data/postgres.log" 2>&1 &
  await_line "$data/postgres.log" "ready to accept connections" $!
  runuser -u postgres -- "$bin/createdb" -h "$1" -U app app
  cd - > /dev/null
}

# http_at ADDRESS PORT: an HTTP server answering `GET /` with a directory listing.
http_at() {
  mkdir -p "www-$2"
  python3 -u -m http.server "$2" --bind "$1" --directory "www-$2" > "http-$2.log" 2>&1 &
  await_line "http-$2.log" "Serving HTTP on" $!
}

# listener_key FILE: an Ed25519 listener key in FILE (what `tunnel keygen --listener` printed in
# FILE.txt); key_public FILE and key_name FILE print its public key and the name it registers.
listener_key() {
  tunnel keygen --listener --out "$1" > "$1.txt"
}
key_public() { sed -n 's/^public key: //p' "$1.txt"; }
key_name() { sed -n 's/^name: //p' "$1.txt"; }

# fill OLD NEW: the terminals of this group run with OLD replaced by NEW (what a reader types in
# place of a name or key the page shows).
fill() {
  printf '%s\t%s\n' "$1" "$2" >> .readme-fill
}

# sshd_at ADDRESS USER: an OpenSSH server on ADDRESS:22 that lets USER in with the key it makes for
# the reader (~/.ssh/id_ed25519, its host key already in ~/.ssh/known_hosts). A private
# /etc/passwd (this mount namespace only) adds USER and makes the working directory root's home,
# which is where ssh looks for ~/.ssh (not $HOME).
sshd_at() {
  sed "s|^root:\([^:]*\):0:0:\([^:]*\):[^:]*:|root:\1:0:0:\2:$PWD:|" /etc/passwd > passwd
  echo "$2:x:0:0:$2:$PWD:/bin/bash" >> passwd
  mount --bind passwd /etc/passwd
  mkdir -p ~/.ssh /run/sshd
  ssh-keygen -q -t ed25519 -N '' -f ~/.ssh/id_ed25519
  ssh-keygen -q -t ed25519 -N '' -f ssh_host_key
  echo "bastion.internal $(cut -d' ' -f1,2 ssh_host_key.pub)" > ~/.ssh/known_hosts
  /usr/sbin/sshd -D -e -f /dev/null -h "$PWD/ssh_host_key" -o ListenAddress="$1" -o Port=22 \
    -o AuthorizedKeysFile="$PWD/.ssh/id_ed25519.pub" -o StrictModes=no -o UsePAM=no \
    -o PasswordAuthentication=no -o PidFile=none > sshd.log 2>&1 &
  await_line sshd.log "Server listening on $1 port 22" $!
}
