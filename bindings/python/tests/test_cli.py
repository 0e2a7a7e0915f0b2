"""``python -m libtunnel``: keygen output, and a relay plus a forward run as separate processes,
as a user would from the README. Output lines are read with bounded waits."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import libtunnel

CLI = [sys.executable, "-m", "libtunnel"]


def test_keygen_prints_key_and_relay_config() -> None:
    out = subprocess.run([*CLI, "keygen", "--kid", "4"], capture_output=True, text=True, timeout=30, check=True).stdout
    key = next(line.split("=", 1)[1] for line in out.splitlines() if line.startswith("TUNNEL_KEY="))
    assert key.startswith("4:")
    auth = next(line.split("=", 1)[1] for line in out.splitlines() if line.startswith("TUNNEL_AUTH_KEYS="))
    assert json.loads(auth.strip("'")) == libtunnel.auth_keys(key)


def test_listener_keygen_writes_private_key(tmp_path: Path) -> None:
    path = tmp_path / "l.pem"
    out = subprocess.run([*CLI, "keygen", "--listener", "--out", str(path)], capture_output=True, text=True, timeout=30, check=True).stdout
    name, public_key = libtunnel.listener_identity(path)
    assert f"name: {name}" in out and public_key in out
    assert path.stat().st_mode & 0o777 == 0o600
    again = subprocess.run([*CLI, "keygen", "--listener", "--out", str(path)], capture_output=True, text=True, timeout=30)
    assert again.returncode == 1 and "error [IO]" in again.stderr


@contextmanager
def running(args: list[str], env: dict[str, str]) -> Iterator[queue.Queue[str]]:
    """Start the CLI; yield a queue of its stdout lines; stop it with SIGINT (bounded)."""
    proc = subprocess.Popen([*CLI, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    out = proc.stdout
    threading.Thread(target=lambda: [lines.put(line) for line in out], daemon=True).start()
    try:
        yield lines
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def wait_line(lines: queue.Queue[str], prefix: str) -> str:
    while True:
        line = lines.get(timeout=30)
        if line.startswith(prefix):
            return line.strip()


def test_server_and_forward_processes(echo: tuple[str, int]) -> None:
    key = libtunnel.keygen(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNNEL_", "EMISSARY_"))}
    relay_env = dict(env, TUNNEL_AUTH_KEYS=libtunnel.auth_keys_json(key))
    allow = json.dumps([{"host": "127.0.0.1", "port": echo[1]}])
    args = ["server", "--listen", "127.0.0.1:0", "--allow", allow, "--set", "drain_timeout=1", "--set", "http_listen=127.0.0.1:0"]
    with running(args, relay_env) as relay:
        url = wait_line(relay, "relay listening: ").split(": ", 1)[1]
        # The same lines as `tunnel server`, the public HTTP port's included (chosen for :0).
        public = wait_line(relay, "public http listening: ").split(": ", 1)[1]
        assert public.startswith("http://127.0.0.1:") and not public.endswith(":0")
        client_env = dict(env, TUNNEL_RELAY=url, TUNNEL_KEY=key)
        with running(["forward", "127.0.0.1:0", f"127.0.0.1:{echo[1]}"], client_env) as fwd:
            line = wait_line(fwd, "forwarding ")
            host, port = line.split()[1].rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(b"via the CLI")
                s.shutdown(socket.SHUT_WR)
                assert s.makefile("rb").read() == b"via the CLI"


def test_server_config_error_exits_2() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNNEL_", "EMISSARY_"))}
    out = subprocess.run([*CLI, "server", "--listen", "127.0.0.1:0"], env=env, capture_output=True, text=True, timeout=30, cwd="/")
    assert out.returncode == 2
    assert "error [INVALID_CONFIG]" in out.stderr and "TUNNEL_AUTH_KEYS" in out.stderr
