"""Shared fixtures: loopback services (echo, hash-after-EOF), a real PostgreSQL started as a
non-root user on a free loopback port, and a relay whose allowlist holds exactly those targets.
Every wait is bounded; pytest-timeout bounds each test."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import socket
import socketserver
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

import libtunnel

PG_PASSWORD = "tunnel-test-pw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)
        self.request.shutdown(socket.SHUT_WR)


class _HashAfterEof(socketserver.BaseRequestHandler):
    """Reads to EOF, then answers with the SHA-256 of what it read (proves half-close works)."""

    def handle(self) -> None:
        h = hashlib.sha256()
        while data := self.request.recv(1 << 20):
            h.update(data)
        self.request.sendall(h.digest())
        self.request.shutdown(socket.SHUT_WR)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


def _serve(handler: type[socketserver.BaseRequestHandler]) -> Iterator[tuple[str, int]]:
    srv = _Server(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield ("127.0.0.1", srv.server_address[1])
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="session")
def echo() -> Iterator[tuple[str, int]]:
    yield from _serve(_Echo)


@pytest.fixture(scope="session")
def hasher() -> Iterator[tuple[str, int]]:
    yield from _serve(_HashAfterEof)


@pytest.fixture(scope="session")
def key() -> str:
    return libtunnel.keygen(7)


@pytest.fixture(scope="session")
def pg_port() -> int:
    return free_port()


@dataclass
class Relay:
    relay: libtunnel.Server
    url: str
    key: str


@pytest.fixture(scope="session")
def relay(key: str, echo: tuple[str, int], hasher: tuple[str, int], pg_port: int) -> Iterator[Relay]:
    allow = [{"host": "127.0.0.1", "port": p} for p in (echo[1], hasher[1], pg_port)]
    config = {
        "listen": "127.0.0.1:0",
        "http_listen": "127.0.0.1:0",
        "auth_keys": libtunnel.auth_keys(key),
        "allow": allow,
        "listeners_open": True,
        "drain_timeout": 2,
    }
    r = libtunnel.Server(config, env=False)
    yield Relay(r, r.url, key)
    r.shutdown()


@pytest.fixture
def dialer(relay: Relay) -> Iterator[libtunnel.Dialer]:
    with libtunnel.Dialer(relay.url, key=relay.key, timeout=10) as d:
        yield d


@pytest.fixture
def listener_key(tmp_path: object) -> str:
    path = os.path.join(str(tmp_path), "listener.pem")
    libtunnel.listener_keygen(path)
    return path


# --- PostgreSQL ---------------------------------------------------------------------------


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
    if not candidates:
        pytest.fail(f"PostgreSQL's {name} not found (apt-get install postgresql); scripts/test-python.sh installs it")
    return max(candidates, key=lambda p: [int(x) for x in p.split("/")[4].split(".") if x.isdigit()])


@dataclass
class Postgres:
    host: str
    port: int
    user: str
    password: str
    database: str

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"


@pytest.fixture(scope="session")
def postgres(pg_port: int) -> Iterator[Postgres]:
    """A throwaway cluster: initdb + pg_ctl as a non-root user (``postgres`` when we are root),
    SCRAM password auth, listening on 127.0.0.1 only."""
    as_user: list[str] = []
    base = tempfile.mkdtemp(prefix="libtunnel-pg-")
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, "postgres", "postgres")
    data, log, pw = (os.path.join(base, x) for x in ("data", "log", "pw"))

    def run(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, timeout=120, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    run("sh", "-c", f"umask 077 && printf %s '{PG_PASSWORD}' > {pw}")
    run(_pg_bin("initdb"), "-D", data, "-U", "postgres", "--auth=scram-sha-256", f"--pwfile={pw}", "-E", "UTF8", "--no-sync")
    opts = f"-p {pg_port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
    try:
        run(_pg_bin("pg_ctl"), "-D", data, "-o", opts, "-l", log, "-w", "-t", "60", "start")
    except subprocess.CalledProcessError:
        with open(log) as f:
            pytest.fail("PostgreSQL did not start:\n" + f.read())
    try:
        yield Postgres("127.0.0.1", pg_port, "postgres", PG_PASSWORD, "postgres")
    finally:
        run(_pg_bin("pg_ctl"), "-D", data, "-m", "immediate", "-w", "-t", "60", "stop")
        shutil.rmtree(base, ignore_errors=True)
