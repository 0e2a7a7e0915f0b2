"""Dialing: real sockets, bytes in equal bytes out (hashed), half-close, many threads, forwards,
and the asyncio twin."""

from __future__ import annotations

import asyncio
import hashlib
import os
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import libtunnel

MIB = 1 << 20


def target(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


def test_64_mib_hashed_with_half_close(dialer: libtunnel.Dialer, hasher: tuple[str, int]) -> None:
    chunk = os.urandom(MIB)
    expect = hashlib.sha256()
    with dialer.dial(target(hasher)) as sock:
        assert isinstance(sock, socket.socket)
        for i in range(64):
            block = bytes([i]) + chunk[1:]
            expect.update(block)
            sock.sendall(block)
        sock.shutdown(socket.SHUT_WR)  # the target sees EOF, then answers
        sock.settimeout(30)
        got = sock.makefile("rb").read()
    assert got == expect.digest()


def test_socket_api_makefile_settimeout_selectors(dialer: libtunnel.Dialer, echo: tuple[str, int]) -> None:
    with dialer.dial(target(echo), timeout=10) as sock:
        sock.settimeout(10)
        f = sock.makefile("rwb")
        f.write(b"hello\n")
        f.flush()
        assert f.readline() == b"hello\n"
        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_READ)
        sock.sendall(b"ping")
        assert sel.select(timeout=10), "echo reply never became readable"
        assert sock.recv(4) == b"ping"
        sock.shutdown(socket.SHUT_WR)
        assert f.read() == b""  # the echo server's EOF after ours
        sel.close()
        f.close()


def test_100_threads_dial_at_once(dialer: libtunnel.Dialer, echo: tuple[str, int]) -> None:
    dialer.connect()
    start = threading.Barrier(100, timeout=30)

    def one(i: int) -> bytes:
        start.wait()
        with dialer.dial(target(echo)) as s:
            s.settimeout(30)
            msg = f"thread {i}".encode()
            s.sendall(msg)
            s.shutdown(socket.SHUT_WR)
            return s.makefile("rb").read()

    with ThreadPoolExecutor(100) as pool:
        results = list(pool.map(one, range(100), timeout=60))
    assert results == [f"thread {i}".encode() for i in range(100)]


def test_gil_released_while_dialing(dialer: libtunnel.Dialer) -> None:
    """A dial that waits (for a loopback "relay" that never answers) must not stall Python."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # never accepted: the handshake completes in the kernel, then nothing
    slow = libtunnel.Dialer(f"ws://127.0.0.1:{silent.getsockname()[1]}", key=libtunnel.keygen(), timeout=1.5)
    ticks = 0
    done = threading.Event()

    def spin() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        slow.dial("127.0.0.1:1")
    except libtunnel.TunnelError:
        pass
    finally:
        done.set()
        t.join(10)
        silent.close()
    assert ticks > 10_000


def test_forward_context_manager(dialer: libtunnel.Dialer, echo: tuple[str, int]) -> None:
    with dialer.forward(target(echo)) as (host, port):
        assert host == "127.0.0.1"
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(b"through a forward")
            s.shutdown(socket.SHUT_WR)
            assert s.makefile("rb").read() == b"through a forward"
    # The port is closed once the block is left (bounded wait for the accept loop to stop).
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
        except OSError:
            break
        assert time.monotonic() < deadline, "forward still accepting after the with-block"


def test_async_open_connection_and_forward(relay: object, echo: tuple[str, int]) -> None:
    async def main() -> None:
        async with libtunnel.AsyncDialer(relay.url, key=relay.key, timeout=10) as d:  # type: ignore[attr-defined]
            await d.connect()
            reader, writer = await d.open_connection(target(echo))
            writer.write(b"async hello")
            await writer.drain()
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 10) == b"async hello"
            writer.close()
            await writer.wait_closed()
            async with d.forward(target(echo)) as (host, port):
                r2, w2 = await asyncio.open_connection(host, port)
                w2.write(b"fwd")
                w2.write_eof()
                assert await asyncio.wait_for(r2.read(), 10) == b"fwd"
                w2.close()

    asyncio.run(main())


def test_async_dials_concurrently(relay: object, echo: tuple[str, int]) -> None:
    async def one(d: libtunnel.AsyncDialer, i: int) -> bytes:
        reader, writer = await d.open_connection(target(echo))
        writer.write(b"%d" % i)
        writer.write_eof()
        data = await reader.read()
        writer.close()
        return data

    async def main() -> None:
        d = libtunnel.AsyncDialer(relay.url, key=relay.key)  # type: ignore[attr-defined]
        got = await asyncio.wait_for(asyncio.gather(*(one(d, i) for i in range(50))), 30)
        assert got == [b"%d" % i for i in range(50)]
        await d.close()

    asyncio.run(main())


def test_grpc_transport_64_mib_hashed_with_half_close(relay: object, hasher: tuple[str, int]) -> None:
    # The same relay port serves the gRPC transport (HTTP/2 with prior knowledge).
    url = relay.url.replace("ws://", "grpc://", 1)  # type: ignore[attr-defined]
    chunk = os.urandom(MIB)
    expect = hashlib.sha256()
    with libtunnel.Dialer(url, key=relay.key, timeout=10) as d:  # type: ignore[attr-defined]
        with d.dial(target(hasher)) as sock:
            for i in range(64):
                block = bytes([i]) + chunk[1:]
                expect.update(block)
                sock.sendall(block)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(30)
            got = sock.makefile("rb").read()
    assert got == expect.digest()
