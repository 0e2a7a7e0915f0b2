"""``python -m libtunnel server|forward|listen|keygen``: the ``tunnel`` CLI's commands, built on
this package (same flags, same environment variables, same output lines)."""

from __future__ import annotations

import argparse
import logging
import sys
import threading

from ._dialer import Dialer
from ._errors import ConfigError, TunnelError
from . import _native
from ._listener import Listener
from ._relay import Server, serve


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--relay", help="relay URL: ws://, wss://, tcp://, grpc://, grpcs:// or quic://; several comma-separated in order of preference (default $TUNNEL_RELAY)")
    p.add_argument("--key", help="shared key KID:BASE64, or a file holding it (default $TUNNEL_KEY)")
    p.add_argument("--classic", action="store_true", help="speak Emissary's classic protocol")
    p.add_argument("--ca", help="PEM file of CA certificates to trust for wss://, grpcs:// and quic:// (default $TUNNEL_CA)")
    p.add_argument("--timeout", type=float, help="seconds one dial may take (default $TUNNEL_TIMEOUT, else 20)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m libtunnel", description="Reach private TCP services through a relay")
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("server", help="run the relay (flags > TUNNEL_* env > ./.env > --config TOML)")
    s.add_argument("--config", help="TOML config file (keys are the setting names)")
    s.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="set any relay setting (repeatable)")
    for flag in ("listen", "tcp-listen", "auth-keys", "allow", "tls-cert", "tls-key"):
        s.add_argument(f"--{flag}")

    f = sub.add_parser("forward", help="forward a local port to a target through the relay (like ssh -L)")
    f.add_argument("local", help="local address or port to listen on (5432, 127.0.0.1:0)")
    f.add_argument("target", help="target as the relay sees it (db.internal:5432)")
    _client_args(f)

    listen = sub.add_parser("listen", help="expose a local service through the relay under a name")
    listen.add_argument("--to", required=True, help="local service address (127.0.0.1:3000)")
    listen.add_argument("--relay", help="relay URL (default $TUNNEL_RELAY)")
    listen.add_argument("--key", help="listener key file (default $TUNNEL_LISTENER_KEY)")
    listen.add_argument("--name", help="register this name instead of the key-derived one")
    listen.add_argument("--tcp-port", action="store_true", help="ask the relay for a public TCP port too")
    listen.add_argument("--proxy-protocol", action="store_true", help="send a PROXY v2 header to the local service")
    listen.add_argument("--ca", help="PEM file of CA certificates to trust for wss://, grpcs:// and quic://")

    k = sub.add_parser("keygen", help="make a shared key (default) or an Ed25519 listener key (--listener)")
    k.add_argument("--kid", type=int, default=1, help="key id (shared keys)")
    k.add_argument("--listener", action="store_true", help="make a listener key, written to --out (mode 0600)")
    k.add_argument("--out", help="where to write the listener key (must not exist)")
    return ap


def _forward(a: argparse.Namespace) -> None:
    local = f"127.0.0.1:{a.local}" if a.local.isdigit() else a.local
    dialer = Dialer(a.relay, key=a.key, timeout=a.timeout, ca=a.ca, classic=a.classic or None)
    with dialer.forward(a.target, local=local) as (host, port):
        print(f"forwarding {host}:{port} -> {a.target} via {dialer.relay}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


def _listen(a: argparse.Namespace) -> None:
    listener = Listener(a.relay, key=a.key, name=a.name, tcp_port=a.tcp_port, ca=a.ca)
    reg = listener.registration
    print(f"listening as: {reg.name}")
    print(f"dial: {reg.name}:0 (through any dialer of this relay)")
    if reg.http_url:
        print(f"http: {reg.http_url}")
    if reg.tcp_addr:
        print(f"tcp: {reg.tcp_addr}")
    print(f"forwarding to: {a.to}", flush=True)
    try:
        listener.forward_to(a.to, proxy_protocol=a.proxy_protocol)
    except KeyboardInterrupt:
        pass


def _server(a: argparse.Namespace) -> None:
    config: dict[str, str] = {}
    for item in a.set:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} must be NAME=VALUE", "INVALID_CONFIG")
        config[name.strip().lower()] = value
    for name in ("listen", "tcp_listen", "auth_keys", "allow", "tls_cert", "tls_key"):
        value = getattr(a, name)
        if value is not None:
            config[name] = value

    def ready(relay: Server) -> None:
        # The core's lines, so they are exactly what `tunnel server` prints.
        print(relay.ready_text, end="", flush=True)

    serve(config, config_file=a.config, on_ready=ready)


def _keygen(a: argparse.Namespace) -> None:
    # The lines come from the core, so they are exactly what `tunnel keygen` prints.
    if a.listener:
        if not a.out:
            raise ConfigError("--listener needs --out FILE to write the private key to", "INVALID_ARGUMENT")
        print(_native.listener_keygen_text(a.out), end="")
        return
    print(_native.keygen_text(a.kid), end="")


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        {"server": _server, "forward": _forward, "listen": _listen, "keygen": _keygen}[a.cmd](a)
    except TunnelError as e:
        print(f"error [{e.code}]: {e.message}", file=sys.stderr)
        return 2 if e.code in ("INVALID_CONFIG", "INVALID_ARGUMENT") else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
