"""Connection-state callbacks and cancelled dials, against embedded relays on loopback: a relay
that dies under a listener and a dialer calls their ``on_disconnected`` with a
:class:`RelayUnavailable`; a relay started again on the same port calls ``on_connected`` and
hashed bytes flow again (blocking and asyncio classes). An awaited dial stuck in a handshake
that never comes is really cancelled by ``asyncio.wait_for`` / ``task.cancel()``: its
connection is closed and the next dial works. Every wait is bounded."""

from __future__ import annotations

import asyncio
import hashlib
import os
import queue
import socket
import threading
import time
from typing import Any

import pytest

import libtunnel

STEP = 10.0


def _config(key: str, echo: tuple[str, int], listen: str = "127.0.0.1:0") -> dict[str, Any]:
    return {
        "listen": listen,
        "auth_keys": libtunnel.auth_keys(key),
        "allow": [{"host": echo[0], "port": echo[1]}],
        "listeners_open": True,
        "drain_timeout": 1,
    }


def _round_trip(sock: socket.socket, size: int = 256 * 1024) -> None:
    data = os.urandom(size)
    sock.settimeout(STEP)
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    h, n = hashlib.sha256(), 0
    while chunk := sock.recv(1 << 16):
        h.update(chunk)
        n += len(chunk)
    sock.close()
    assert n == size and h.digest() == hashlib.sha256(data).digest()


def _serve_echo(listener: libtunnel.Listener) -> None:
    def one(sock: socket.socket) -> None:
        with sock:
            while data := sock.recv(65536):
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)

    for sock, _peer in listener:
        threading.Thread(target=one, args=(sock,), daemon=True).start()


class _Events:
    """Callbacks' calls, one queue per ``who.kind``, so waiting for one never drops another."""

    def __init__(self) -> None:
        self._queues: dict[str, queue.Queue[Any]] = {}
        self._lock = threading.Lock()

    def _queue(self, name: str) -> queue.Queue[Any]:
        with self._lock:
            return self._queues.setdefault(name, queue.Queue())

    def recorder(self, who: str, kind: str) -> Any:
        return lambda arg: self._queue(f"{who}.{kind}").put(arg)

    def next(self, name: str) -> Any:
        """The next call of ``name``, within STEP."""
        return self._queue(name).get(timeout=STEP)


def test_blocking_listener_and_dialer_report_the_relay_going_and_coming_back(echo: tuple[str, int], listener_key: str) -> None:
    key = libtunnel.keygen(7)
    relay = libtunnel.Server(_config(key, echo), env=False)
    addr = relay.address
    assert addr is not None
    events = _Events()
    record = events.recorder

    listener = libtunnel.Listener(
        relay.url,
        key=listener_key,
        on_connected=record("listener", "connected"),
        on_disconnected=record("listener", "disconnected"),
        on_reconnecting=record("listener", "reconnecting"),
    )
    threading.Thread(target=_serve_echo, args=(listener,), daemon=True).start()
    dialer = libtunnel.Dialer(relay.url, key=key, timeout=STEP, on_connected=record("dialer", "connected"), on_disconnected=record("dialer", "disconnected"))
    target = f"{echo[0]}:{echo[1]}"
    relay2 = None
    try:
        dialer.connect()
        first = events.next("dialer.connected")
        assert isinstance(first, libtunnel.Connected) and first.name is None and first.relay.startswith(relay.url.rstrip("/"))
        _round_trip(dialer.dial(target))
        _round_trip(dialer.dial(f"{listener.name}:0"))

        t0 = time.monotonic()
        relay.abort()
        for who in ("listener", "dialer"):
            err = events.next(f"{who}.disconnected")
            assert isinstance(err, libtunnel.RelayUnavailable), f"{who}: {err!r}"
            assert err.code == "RELAY_UNAVAILABLE"
        print(f"on_disconnected called {1e3 * (time.monotonic() - t0):.0f} ms after the relay died")
        retry = events.next("listener.reconnecting")
        assert isinstance(retry, libtunnel.Reconnecting) and retry.attempt >= 1 and retry.delay > 0

        relay2 = libtunnel.Server(_config(key, echo, f"{addr[0]}:{addr[1]}"), env=False)
        back = events.next("listener.connected")
        assert back == libtunnel.Connected(back.relay, listener.name)
        _round_trip(dialer.dial(target))
        assert events.next("dialer.connected").name is None
        _round_trip(dialer.dial(f"{listener.name}:0"))

        listener.close()
        assert events.next("listener.disconnected").code == "CLOSED"
    finally:
        listener.close()
        dialer.close()
        if relay2 is not None:
            relay2.shutdown()


def test_async_listener_callbacks_run_on_the_loop(echo: tuple[str, int], listener_key: str) -> None:
    async def main() -> None:
        key = libtunnel.keygen(7)
        relay = await libtunnel.AsyncServer.start(_config(key, echo), env=False)
        addr = relay.address
        assert addr is not None
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[libtunnel.TunnelError] = loop.create_future()
        back: asyncio.Future[libtunnel.Connected] = loop.create_future()
        seen_threads: set[int] = set()

        def on_disconnected(err: libtunnel.TunnelError) -> None:
            seen_threads.add(threading.get_ident())
            if not lost.done():
                lost.set_result(err)

        async def on_connected(info: libtunnel.Connected) -> None:  # a coroutine function runs as a task
            seen_threads.add(threading.get_ident())
            if not back.done():
                back.set_result(info)

        listener = await libtunnel.AsyncListener.bind(relay.url, key=listener_key, on_connected=on_connected, on_disconnected=on_disconnected)
        relay.abort()
        err = await asyncio.wait_for(lost, STEP)
        assert isinstance(err, libtunnel.RelayUnavailable)
        relay2 = await libtunnel.AsyncServer.start(_config(key, echo, f"{addr[0]}:{addr[1]}"), env=False)
        try:
            info = await asyncio.wait_for(back, STEP)
            assert info.name == listener.name
            assert seen_threads == {threading.get_ident()}, "callbacks ran off the loop's thread"
        finally:
            listener.close()
            await relay2.shutdown()

    asyncio.run(main())


class _SilentFront:
    """A relay front: connections numbered in ``silent`` (from 1) are accepted and never
    answered (a dial's handshake hangs); others are piped to the relay. Counts silent closes."""

    def __init__(self, relay: tuple[str, int], silent: set[int]) -> None:
        self.relay, self.silent = relay, silent
        self.count = 0
        self.silent_closed = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.count += 1
            if self.count in self.silent:
                threading.Thread(target=self._hold, args=(conn,), daemon=True).start()
            else:
                up = socket.create_connection(self.relay)
                for a, b in ((conn, up), (up, conn)):
                    threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _hold(self, conn: socket.socket) -> None:
        with conn:
            while conn.recv(4096):
                pass
        self.silent_closed.set()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("how", ["wait_for", "cancel"])
def test_cancelling_an_awaited_dial_cancels_it_in_the_core(echo: tuple[str, int], how: str) -> None:
    async def main() -> None:
        key = libtunnel.keygen(7)
        relay = await libtunnel.AsyncServer.start(_config(key, echo), env=False)
        assert relay.address is not None
        front = _SilentFront(relay.address, {1})
        dialer = libtunnel.AsyncDialer(f"ws://127.0.0.1:{front.port}", key=key, timeout=STEP)
        target = f"{echo[0]}:{echo[1]}"
        try:
            t0 = time.monotonic()
            if how == "wait_for":
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(dialer.dial(target), 0.2)
            else:
                task = asyncio.create_task(dialer.dial(target))
                while front.count < 1:
                    await asyncio.sleep(0.005)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await asyncio.wait_for(task, STEP)
            took = time.monotonic() - t0
            assert took < 2, f"the cancelled dial took {took:.2f}s"
            # The core dropped the dial: the half-made session's connection is closed.
            assert await asyncio.to_thread(front.silent_closed.wait, STEP), "the stuck connection was left open"
            print(f"{how}: connection closed {1e3 * (time.monotonic() - t0):.0f} ms after the dial began")
            sock = await asyncio.wait_for(dialer.dial(target), STEP)
            sock.setblocking(True)
            await asyncio.to_thread(_round_trip, sock)
        finally:
            await dialer.close()
            front.close()
            await relay.shutdown()

    asyncio.run(main())
