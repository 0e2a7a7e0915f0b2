"""Rust logs reach Python ``logging`` under ``libtunnel``; the asyncio listener example serves
through the relay."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import libtunnel

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "python"


class _Waiter(logging.Handler):
    def __init__(self, needle: str) -> None:
        super().__init__(logging.DEBUG)
        self.needle = needle
        self.seen = threading.Event()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING and self.needle in record.getMessage():
            self.records.append(record)
            self.seen.set()


def test_core_warnings_reach_python_logging(dialer: libtunnel.Dialer) -> None:
    """A forward to a refused target logs the core's warning (with the target) to ``libtunnel.*``."""
    waiter = _Waiter("127.0.0.1:1")
    logging.getLogger("libtunnel").addHandler(waiter)
    try:
        with dialer.forward("127.0.0.1:1") as (host, port):
            with socket.create_connection((host, port), timeout=10) as s:
                s.settimeout(10)
                assert s.recv(1) == b""  # the forward drops the connection it cannot tunnel
            assert waiter.seen.wait(10), "the core's warning never reached Python logging"
    finally:
        logging.getLogger("libtunnel").removeHandler(waiter)
    record = waiter.records[0]
    assert record.name == "libtunnel.forward" and "NOT_ALLOWED" in record.getMessage()


def test_asyncio_listener_example(relay: object, dialer: libtunnel.Dialer, listener_key: str) -> None:
    env = dict(os.environ, TUNNEL_RELAY=relay.url, TUNNEL_LISTENER_KEY=listener_key)  # type: ignore[attr-defined]
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / "asyncio_listener.py")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded by the test timeout
        name = libtunnel.listener_identity(listener_key)[0]
        assert line.startswith(f"listening as: {name}"), line + (proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        with dialer.dial(f"{name}:0") as s:
            s.settimeout(10)
            f = s.makefile("rwb")
            f.write(b"quiet please\n")
            f.flush()
            assert f.readline() == b"QUIET PLEASE\n"
            s.shutdown(socket.SHUT_WR)
            assert f.read() == b""
            f.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
