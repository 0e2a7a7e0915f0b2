"""Pools from Python: replicas of one name (``Listener(pool=True)`` with the same key) share the
dials the relay sends them (round-robin), a retired replica (``retire()``) gets nothing new and
its iteration ends once its queue is empty, and the other keeps serving. Every byte that crosses
is hashed; every wait is bounded (pytest-timeout bounds each test)."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from dataclasses import dataclass, field

import libtunnel


@dataclass
class Replica:
    listener: libtunnel.Listener
    served: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    thread: threading.Thread | None = None

    def start(self) -> None:
        """Echo every accepted connection until the listener's iteration ends."""

        def serve() -> None:
            for sock, _peer in self.listener:
                with self.lock:
                    self.served += 1
                with sock:
                    sock.settimeout(10)
                    while data := sock.recv(65536):
                        sock.sendall(data)
                    sock.shutdown(socket.SHUT_WR)

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def count(self) -> int:
        with self.lock:
            return self.served


def ping(dialer: libtunnel.Dialer, name: str, n: int) -> None:
    """One dial by name: 64 KiB out, half-close, the echo back hashed."""
    data = os.urandom(64 * 1024) + n.to_bytes(4, "big")
    with dialer.dial(f"{name}:0") as s:
        s.settimeout(10)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        got = s.makefile("rb").read()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest(), f"dial {n}: {len(got)} bytes back of {len(data)}"


def test_replicas_share_the_dials_and_a_retired_one_gets_nothing_new(relay: object, listener_key: str) -> None:
    url, key = relay.url, relay.key  # type: ignore[attr-defined]
    a = Replica(libtunnel.Listener(url, key=listener_key, pool=True, timeout=10))
    b = Replica(libtunnel.Listener(url, key=listener_key, pool=True, timeout=10))
    assert a.listener.name == b.listener.name == libtunnel.listener_identity(listener_key)[0]
    name = a.listener.name
    a.start()
    b.start()
    try:
        with libtunnel.Dialer(url, key=key, timeout=10) as d:
            for i in range(10):
                ping(d, name, i)
            assert (a.count(), b.count()) == (5, 5), "the relay spreads dials over the replicas in turn"

            a.listener.retire()
            assert a.thread is not None
            a.thread.join(10)
            assert not a.thread.is_alive(), "a retired replica's iteration ends once its queue is empty"
            for i in range(6):
                ping(d, name, 10 + i)
            assert (a.count(), b.count()) == (5, 11), "a retired replica got a new connection"
    finally:
        a.listener.close()
        b.listener.close()
    assert b.thread is not None
    b.thread.join(10)
    assert not b.thread.is_alive(), "iteration ends when the listener is closed"


def test_a_listener_without_pool_takes_the_name_from_a_pool(relay: object, listener_key: str) -> None:
    """Without ``pool``, the same key takes the name over (the rule for a restarted listener):
    the pool replica's waiting ``accept`` raises :class:`NameTaken`, naming why."""
    url, key = relay.url, relay.key  # type: ignore[attr-defined]
    replica = libtunnel.Listener(url, key=listener_key, pool=True, timeout=10)
    raised: list[BaseException] = []

    def wait() -> None:
        try:
            replica.accept(timeout=10)
        except BaseException as e:  # noqa: BLE001 - the test inspects what was raised
            raised.append(e)

    t = threading.Thread(target=wait, daemon=True)
    t.start()
    with libtunnel.Listener(url, key=listener_key, timeout=10) as single:
        t.join(10)
        assert not t.is_alive(), "the replaced replica's accept returned"
        assert raised and isinstance(raised[0], libtunnel.NameTaken), f"raised: {raised!r}"
        with libtunnel.Dialer(url, key=key, timeout=10) as d, d.dial(f"{single.name}:0") as c:
            server, _peer = single.accept(timeout=10)
            with server:
                c.sendall(b"to the new owner")
                c.shutdown(socket.SHUT_WR)
                server.settimeout(10)
                assert server.makefile("rb").read() == b"to the new owner"
    replica.close()
