"""Upstream proxies from Python: a real squid (HTTP CONNECT with Basic auth) between the client
and the relay. A ``Dialer`` and a ``Listener`` given ``proxy=`` (and a dialer given only
``TUNNEL_PROXY``) reach the relay through it, one CONNECT per session in squid's access log;
a wrong password is an ``AuthError`` that never shows the password. As root, a Dialer in a
network namespace whose only way out is squid reaches the relay through it."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

import libtunnel

from conftest import Relay, free_port

PASSWORD = "s3cret-py"


@dataclass
class Squid:
    port: int
    access_log: str
    ip: str = "127.0.0.1"

    def url(self, password: str = PASSWORD) -> str:
        return f"http://alice:{password}@{self.ip}:{self.port}"

    def connects(self, n: int) -> list[str]:
        """The access log's CONNECT lines, once there are at least ``n`` (squid writes a line
        when a session ends), within 10 s."""
        deadline = time.monotonic() + 10
        while True:
            try:
                with open(self.access_log) as f:
                    lines = [line for line in f if " CONNECT " in line]
            except FileNotFoundError:
                lines = []
            if len(lines) >= n or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)


def skip(why: str) -> None:
    """Skip, never silently: pytest -ra prints the reason, scripts/test.sh's summary lists it,
    and under CI it is a failure."""
    if os.environ.get("CI"):
        pytest.fail(why)
    if os.environ.get("LIBTUNNEL_SKIP_LOG"):
        with open(os.environ["LIBTUNNEL_SKIP_LOG"], "a") as log:
            log.write(f"python proxy test skipped: {why}\n")
    pytest.skip(why)


@pytest.fixture(scope="module")
def squid() -> Iterator[Squid]:
    yield from run_squid("127.0.0.1")


def run_squid(ip: str) -> Iterator[Squid]:
    """squid listening on ``ip`` with Basic auth (alice / PASSWORD), until the generator ends."""
    exe = shutil.which("squid") or shutil.which("squid", path="/usr/sbin:/sbin")
    if exe is None:
        skip("squid not installed (apt-get install squid; scripts/test-python.sh does)")
        return
    # squid drops root for its `proxy` user, which must write here and read the password file.
    d = tempfile.mkdtemp(prefix="libtunnel-squid-")
    os.chmod(d, 0o777)
    hashed = subprocess.run(["openssl", "passwd", "-apr1", PASSWORD], check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(d, "passwd"), "w") as f:
        f.write(f"alice:{hashed}\n")
    port = free_port()
    with open(os.path.join(d, "squid.conf"), "w") as f:
        f.write(
            f"http_port {ip}:{port}\npid_filename {d}/squid.pid\naccess_log stdio:{d}/access.log\n"
            f"cache_log {d}/cache.log\ncache_store_log none\ncoredump_dir {d}\ncache deny all\n"
            "shutdown_lifetime 0 seconds\npinger_enable off\n"
            f"auth_param basic program /usr/lib/squid/basic_ncsa_auth {d}/passwd\n"
            "acl authed proxy_auth REQUIRED\nhttp_access allow authed\nhttp_access deny all\n"
        )
    # Its own service name: squid names its shared-memory segments after it.
    service = f"ltpy{os.getpid()}p{port}"
    proc = subprocess.Popen(
        [exe, "-N", "-d", "1", "-n", service, "-f", os.path.join(d, "squid.conf")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    ready = threading.Event()

    def watch() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "Accepting HTTP Socket" in line:
                ready.set()

    threading.Thread(target=watch, daemon=True).start()
    try:
        if not ready.wait(30):
            with open(os.path.join(d, "cache.log")) as f:
                pytest.fail(f"squid did not start within 30 s: {f.read()}")
        # squid logs that line before its listen() has run: wait until a connection is accepted.
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((ip, port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "squid did not accept connections within 10 s"
                time.sleep(0.02)
        yield Squid(port, os.path.join(d, "access.log"), ip)
    finally:
        proc.kill()
        proc.wait()
        for seg in glob.glob(f"/dev/shm/{service}-*"):
            os.remove(seg)
        shutil.rmtree(d, ignore_errors=True)


MIB = bytes((i * 2654435761 >> 13) & 0xFF for i in range(1 << 20))


def roundtrip(sock: socket.socket) -> None:
    """1 MiB to the echo server and back, hashed."""
    with sock:
        sock.settimeout(20)
        threading.Thread(target=lambda: (sock.sendall(MIB), sock.shutdown(socket.SHUT_WR)), daemon=True).start()
        back = sock.makefile("rb").read()
    assert hashlib.sha256(back).hexdigest() == hashlib.sha256(MIB).hexdigest(), f"{len(back)} bytes back"


def test_dialer_and_listener_through_squid(
    squid: Squid, relay: Relay, echo: tuple[str, int], listener_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = len(squid.connects(0))
    target = f"{echo[0]}:{echo[1]}"
    # proxy= on the dialer.
    with libtunnel.Dialer(relay.url, key=relay.key, timeout=10, proxy=squid.url()) as d:
        roundtrip(d.dial(target))
    # TUNNEL_PROXY, read by the core when the dialer is made.
    monkeypatch.setenv("TUNNEL_PROXY", squid.url())
    with libtunnel.Dialer(relay.url, key=relay.key, timeout=10) as d:
        roundtrip(d.dial(target))
    # proxy="none" wins over TUNNEL_PROXY: no CONNECT for this one.
    with libtunnel.Dialer(relay.url, key=relay.key, timeout=10, proxy="none") as d:
        roundtrip(d.dial(target))
    monkeypatch.delenv("TUNNEL_PROXY")
    lines = squid.connects(before + 2)
    assert len(lines) == before + 2 and all(" alice " in line for line in lines), lines

    # A listener registered through the proxy, dialed directly by name.
    with libtunnel.Listener(relay.url, key=listener_key, proxy=squid.url()) as listener:
        with libtunnel.Dialer(relay.url, key=relay.key, timeout=10, proxy="none") as d:
            client = d.dial(f"{listener.name}:0")
            server, _peer = listener.accept(timeout=10)
            with server:
                client.sendall(b"through squid")
                client.shutdown(socket.SHUT_WR)
                server.settimeout(10)
                assert server.makefile("rb").read() == b"through squid"
                server.sendall(b"back")
                server.shutdown(socket.SHUT_WR)
            with client:
                client.settimeout(10)
                assert client.makefile("rb").read() == b"back"
    lines = squid.connects(before + 3)
    assert len(lines) == before + 3, lines


def test_a_wrong_proxy_password_is_an_auth_error_without_it(squid: Squid, relay: Relay, listener_key: str) -> None:
    with libtunnel.Dialer(relay.url, key=relay.key, timeout=10, proxy=squid.url("hunter2")) as d:
        with pytest.raises(libtunnel.AuthError) as e:
            d.connect()
    assert e.value.code == "AUTH_FAILED"
    assert f"alice:***@127.0.0.1:{squid.port}" in e.value.message and "407" in e.value.message, e.value.message
    assert "hunter2" not in str(e.value)
    with pytest.raises(libtunnel.AuthError) as e:
        libtunnel.Listener(relay.url, key=listener_key, timeout=10, proxy=squid.url("hunter2"))
    assert "hunter2" not in str(e.value) and "refused the credentials" in e.value.message, e.value.message
    # A malformed proxy URL is refused when the dialer is made, without echoing it.
    with pytest.raises(libtunnel.TunnelError) as e:
        libtunnel.Dialer(relay.url, key=relay.key, proxy="gopher://alice:hunter2@127.0.0.1:1")
    assert "gopher" in e.value.message and "hunter2" not in str(e.value), e.value.message


# Run inside the namespace: dial directly (must fail), then through the proxy (1 MiB echoed).
_INSIDE = """
import hashlib, socket, sys, threading, libtunnel
relay, key, target, proxy = sys.argv[1:5]
try:
    libtunnel.Dialer(relay, key=key, timeout=5, proxy="none").connect()
    print("direct: connected")
except libtunnel.RelayUnavailable as e:
    print("direct: RELAY_UNAVAILABLE" if e.code == "RELAY_UNAVAILABLE" else e.code)
data = bytes(i * 7 % 251 for i in range(1 << 20))
with libtunnel.Dialer(relay, key=key, timeout=10, proxy=proxy) as d:
    s = d.dial(target)
    s.settimeout(20)
    threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)), daemon=True).start()
    back = s.makefile("rb").read()
print("proxied:", hashlib.sha256(back).hexdigest() == hashlib.sha256(data).hexdigest(), len(back))
"""


def test_a_dialer_whose_only_way_out_is_squid(relay: Relay, echo: tuple[str, int]) -> None:
    """A Python Dialer in a network namespace (a veth pair to this one, no route to the relay on
    this namespace's loopback) reaches the relay only through squid."""
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "nsenter", "ip")):
        skip("the namespace test needs root, unshare, nsenter and ip (util-linux, iproute2)")
    ns = subprocess.Popen(["unshare", "-n", "--", "sleep", "600"], stdin=subprocess.DEVNULL)
    outside = f"pyo{ns.pid % 100000}"
    try:
        own = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{ns.pid}/ns/net") == own:
            assert time.monotonic() < deadline, "unshare -n made no namespace"
            time.sleep(0.005)
        net = f"10.214.{ns.pid % 250}."
        inns = ["nsenter", "-t", str(ns.pid), "-n", "--"]
        for cmd in (
            ["ip", "link", "add", outside, "type", "veth", "peer", "name", f"pyi{ns.pid % 100000}", "netns", str(ns.pid)],
            ["ip", "addr", "add", f"{net}1/30", "dev", outside],
            ["ip", "link", "set", outside, "up"],
            [*inns, "ip", "addr", "add", f"{net}2/30", "dev", f"pyi{ns.pid % 100000}"],
            [*inns, "ip", "link", "set", f"pyi{ns.pid % 100000}", "up"],
            [*inns, "ip", "link", "set", "lo", "up"],
        ):
            subprocess.run(cmd, check=True)
        proxy = run_squid(f"{net}1")
        squid = next(proxy)
        try:
            out = subprocess.run(
                [*inns, sys.executable, "-c", _INSIDE, relay.url, relay.key, f"{echo[0]}:{echo[1]}", squid.url()],
                capture_output=True, text=True, timeout=60,
            )
            assert out.returncode == 0, out.stderr
            assert out.stdout.split("\n")[:2] == ["direct: RELAY_UNAVAILABLE", f"proxied: True {1 << 20}"], out.stdout + out.stderr
            assert PASSWORD not in out.stdout + out.stderr
            lines = squid.connects(1)
            assert len(lines) == 1 and " alice " in lines[0], lines
        finally:
            proxy.close()
    finally:
        ns.kill()
        ns.wait()
        subprocess.run(["ip", "link", "del", outside], stderr=subprocess.DEVNULL)
