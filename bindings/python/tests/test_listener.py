"""Listeners: accept by name, iteration, interruption by a signal, http.server behind the relay's
public HTTP port, an asyncio server, and exposing a local service."""

from __future__ import annotations

import asyncio
import http.client
import http.server
import os
import signal
import socket
import threading
import time

import pytest

import libtunnel


def test_accept_dialed_by_name(relay: object, dialer: libtunnel.Dialer, listener_key: str) -> None:
    with libtunnel.Listener(relay.url, key=listener_key) as listener:  # type: ignore[attr-defined]
        assert listener.name == libtunnel.listener_identity(listener_key)[0]
        assert listener.registration.name == listener.name
        with dialer.dial(f"{listener.name}:0") as client:
            server, peer = listener.accept(timeout=10)
            with server:
                assert peer.via == "dial" and peer.port == 0 and peer.address[0]
                client.sendall(b"over the reverse tunnel")
                client.shutdown(socket.SHUT_WR)
                server.settimeout(10)
                assert server.makefile("rb").read() == b"over the reverse tunnel"
                server.sendall(b"back")
                server.shutdown(socket.SHUT_WR)
            client.settimeout(10)
            assert client.makefile("rb").read() == b"back"


def test_iteration_ends_when_closed(relay: object, dialer: libtunnel.Dialer, listener_key: str) -> None:
    listener = libtunnel.Listener(relay.url, key=listener_key)  # type: ignore[attr-defined]
    got: list[bytes] = []
    all_read = threading.Event()

    def serve() -> None:
        for sock, _peer in listener:
            with sock:
                sock.settimeout(10)
                got.append(sock.makefile("rb").read())
                if len(got) == 3:
                    all_read.set()

    t = threading.Thread(target=serve)
    t.start()
    for i in range(3):
        with dialer.dial(f"{listener.name}:0") as c:
            c.sendall(b"n%d" % i)
    assert all_read.wait(10)
    listener.close()
    t.join(10)
    assert not t.is_alive(), "iteration did not end on close()"
    assert sorted(got) == [b"n0", b"n1", b"n2"]
    with pytest.raises(libtunnel.Closed):
        listener.accept(timeout=1)


def test_blocking_accept_interrupted_by_ctrl_c(relay: object, listener_key: str) -> None:
    """SIGINT (Ctrl-C) while the main thread waits in accept() raises KeyboardInterrupt promptly."""
    # Python's own handler, as in an interactive program: a test run started in the background
    # by a non-interactive shell (`cmd &`) inherits SIGINT ignored.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with libtunnel.Listener(relay.url, key=listener_key) as listener:  # type: ignore[attr-defined]
            ctrl_c = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
            start = time.monotonic()
            ctrl_c.start()
            try:
                with pytest.raises(KeyboardInterrupt):
                    listener.accept()  # no timeout: only the signal ends it
            finally:
                ctrl_c.cancel()
            assert time.monotonic() - start < 3
            # The listener is still usable after the interrupted wait.
            with pytest.raises(libtunnel.TunnelTimeout):
                listener.accept(timeout=0.1)
    finally:
        signal.signal(signal.SIGINT, previous)


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello {self.path} from {self.headers['X-Forwarded-Host']}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_http_server_behind_the_relay(relay: object, listener_key: str) -> None:
    listener = libtunnel.Listener(relay.url, key=listener_key)  # type: ignore[attr-defined]
    server = libtunnel.ThreadingListenerServer(listener, _Hello)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    t.start()
    try:
        host, port = relay.relay.http_address  # type: ignore[attr-defined]
        for i in range(3):
            conn = http.client.HTTPConnection(host, port, timeout=10)
            conn.request("GET", f"/page{i}", headers={"Host": f"{listener.name}.localhost"})
            resp = conn.getresponse()
            assert resp.status == 200
            assert resp.read() == f"hello /page{i} from {listener.name}.localhost".encode()
            conn.close()
    finally:
        server.shutdown()
        server.server_close()
        t.join(10)
    assert not t.is_alive()


def test_async_listener_serves_streams(relay: object, listener_key: str) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        writer.write(data.upper())
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with await libtunnel.AsyncListener.bind(relay.url, key=listener_key) as listener:  # type: ignore[attr-defined]
            serving = asyncio.create_task(listener.serve(handle))
            d = libtunnel.AsyncDialer(relay.url, key=relay.key)  # type: ignore[attr-defined]

            async def one(i: int) -> bytes:
                r, w = await d.open_connection(f"{listener.name}:0")
                w.write(b"async %d" % i)
                w.write_eof()
                out = await r.read()
                w.close()
                return out

            got = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(10))), 20)
            assert got == [b"ASYNC %d" % i for i in range(10)]
            listener.close()
            await asyncio.wait_for(serving, 10)
            await d.close()

    asyncio.run(main())


def test_forward_to_local_service(relay: object, dialer: libtunnel.Dialer, listener_key: str, echo: tuple[str, int]) -> None:
    listener = libtunnel.Listener(relay.url, key=listener_key)  # type: ignore[attr-defined]
    t = threading.Thread(target=listener.forward_to, args=(f"127.0.0.1:{echo[1]}",))
    t.start()
    try:
        with dialer.dial(f"{listener.name}:0") as c:
            c.settimeout(10)
            c.sendall(b"exposed")
            c.shutdown(socket.SHUT_WR)
            assert c.makefile("rb").read() == b"exposed"
    finally:
        listener.close()
        t.join(10)
    assert not t.is_alive()
