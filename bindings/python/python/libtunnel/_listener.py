"""Listeners: register a name with a relay and accept the connections it routes to that name
(dialed as ``NAME:0``, public HTTP by ``Host``, or a public TCP port). Accepted connections are
real sockets, so they can be served by ``socketserver``/``http.server`` (:class:`ListenerServer`)
or by asyncio (:meth:`AsyncListener.serve`). :class:`Listener` blocks, :class:`AsyncListener`
is its asyncio twin."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import socketserver
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any, NamedTuple, Union

from . import _native
from ._common import wrap
from ._errors import Closed, TunnelTimeout
from ._events import OnConnected, OnDisconnected, OnReconnecting, watch

__all__ = ["ExitStats", "PeerInfo", "Registration", "Listener", "AsyncListener", "ListenerServer", "ThreadingListenerServer"]

# Union, not `|`: module-level aliases are evaluated at import, and Python 3.9 has no `X | Y`.
StrPath = Union[str, os.PathLike[str]]


class PeerInfo(NamedTuple):
    """Who is on the other end of an accepted connection (``PeerInfo`` in Rust and Node,
    ``tunnel_peer`` in C; ``Peer`` is its deprecated old name)."""

    #: The original client's ``ip:port`` as the relay saw it.
    client: str
    #: How it arrived: ``"dial"``, ``"http"`` or ``"tcp"``.
    via: str
    #: The port a dialer asked for (0 = default), or the public TCP port.
    port: int
    #: Whether the connection is end-to-end encrypted (the listener has ``e2e`` on).
    e2e: bool = False
    #: The dialer's verified key-derived name (``e2e`` with ``allow_peers``), else ``None``.
    dialer_name: str | None = None

    @property
    def address(self) -> tuple[str, int]:
        """``client`` as a ``(host, port)`` pair (what ``socketserver`` calls client_address)."""
        host, _, port = self.client.rpartition(":")
        return (host.strip("[]"), int(port)) if port.isdigit() else (self.client, 0)


class Registration(NamedTuple):
    """What the relay granted a listener."""

    name: str
    http_url: str | None
    tcp_addr: str | None


class ExitStats(NamedTuple):
    """An exit listener's counters since it was bound (who connected where is in its log)."""

    connected: int
    not_allowed: int
    failed: int
    bytes_to_targets: int
    bytes_from_targets: int


#: An exit listener's allow rules: ``[{"host": "db.internal", "port": 5432}, ...]`` or that JSON.
ExitRules = Union[str, list[dict[str, Any]]]


def _exit_json(rules: ExitRules | None) -> str | None:
    if rules is None or isinstance(rules, str):
        return rules
    return json.dumps(rules)


def _bind_options(
    relay: str | None, key: StrPath | None, ca: StrPath | None, exit: ExitRules | None, allow_peers: Iterable[str], **options: Any
) -> dict[str, Any]:
    """The native ``bind``'s options (the core's ``ListenerOptions`` field by field); what is None
    comes from the TUNNEL_* variables (and ./.env), read by the core, or is the core's default."""
    return dict(
        relay=relay,
        key=None if key is None else os.fspath(key),
        ca=None if ca is None else os.fspath(ca),
        exit=_exit_json(exit),
        allow_peers=list(allow_peers),
        **options,
    )


def _accepted(raw: tuple[_native.Socket, str, str, int, bool, str | None], *, blocking: bool) -> tuple[socket.socket, PeerInfo]:
    sock, client, via, port, e2e, dialer_name = raw
    return wrap(sock, blocking=blocking), PeerInfo(client, via, port, e2e, dialer_name)


class _ListenerBase:
    """Properties shared by :class:`Listener` and :class:`AsyncListener`."""

    _native: _native.Listener

    @property
    def name(self) -> str:
        """The registered name (dial it as ``NAME:0``)."""
        return self._native.name

    @property
    def registration(self) -> Registration:
        """Name, public HTTP URL and public TCP address, as granted by the relay."""
        return Registration(*self._native.registration)

    @property
    def connected(self) -> bool:
        """Whether the session to the relay is up (it reconnects in the background)."""
        return self._native.connected

    def retire(self) -> None:
        """Leave a pool's rotation (a rolling restart): the relay sends nothing new at once,
        connections already queued are still handed out by ``accept``, accepted ones keep
        running; close once they are done."""
        self._native.retire()

    @property
    def exit_stats(self) -> ExitStats | None:
        """An exit listener's counters (``None`` for other listeners)."""
        s = self._native.exit_stats
        return None if s is None else ExitStats(*s)

    def close(self) -> None:
        """Unregister; waiting and later ``accept`` calls raise :class:`Closed`."""
        self._native.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class Listener(_ListenerBase):
    """A blocking listener; binding (connect and register) happens in the constructor.

    ``relay`` defaults to ``$TUNNEL_RELAY``; ``key`` is the Ed25519 key as PEM text or a file
    (default ``$TUNNEL_LISTENER_KEY``); ``name`` registers a chosen name the relay grants this
    key; ``tcp_port`` asks for a public TCP port; ``backlog`` bounds connections waiting for
    :meth:`accept` (more are refused; ``None``: the core's default, 128). ``e2e`` terminates
    end-to-end TLS on every connection (the relay sees only ciphertext; plaintext connections are
    refused); ``allow_peers`` (base64 public keys or key-derived names) then requires dialers' own
    keys and admits only these. ``pool=True`` joins the name's pool of replicas (every replica
    opts in; the relay spreads connections over them). The options are ``tunnel listen``'s, and
    the core checks them (one that needs another raises :class:`ConfigError`). ``exit`` makes this an exit
    listener: allow rules (a list of ``{"host", "port"}`` dicts or their JSON, as the relay's
    ``allow``) for targets dialers reach through it with ``dial(target, via=NAME)``;
    ``exit_only=True`` says it exposes no service of its own (it never accepts), so a connection
    dialed to its name is refused with :class:`NotAllowed` instead of reaching nobody.
    ``h2c`` says the local service speaks HTTP/2 with prior
    knowledge (a gRPC server: public requests reach it as HTTP/2); ``tls_passthrough`` has the
    relay's HTTPS port pass connections whose SNI names this listener through undecrypted.
    ``proxy`` is the upstream proxy to reach the relay through (``http://user:pass@host:port``,
    ``https://…``, ``socks5://…``, or ``"none"``; default ``$TUNNEL_PROXY``, else the
    conventional ``https_proxy``/``http_proxy``/``all_proxy`` with ``no_proxy``, as curl).
    ``on_connected`` (a :class:`Connected`), ``on_disconnected`` (the cause, a
    :class:`TunnelError` with its ``.code``) and ``on_reconnecting`` (a :class:`Reconnecting`)
    are called (on a background thread) when the session to the relay comes back, drops, or is about to be retried: see
    :mod:`libtunnel._events`.
    """

    def __init__(
        self,
        relay: str | None = None,
        *,
        key: StrPath | None = None,
        name: str | None = None,
        tcp_port: bool = False,
        ca: StrPath | None = None,
        timeout: float | None = None,
        backlog: int | None = None,
        e2e: bool = False,
        allow_peers: Iterable[str] = (),
        pool: bool = False,
        exit: ExitRules | None = None,
        exit_only: bool = False,
        h2c: bool = False,
        tls_passthrough: bool = False,
        proxy: str | None = None,
        on_connected: OnConnected | None = None,
        on_disconnected: OnDisconnected | None = None,
        on_reconnecting: OnReconnecting | None = None,
    ) -> None:
        self._native = _native.Listener.bind(
            _bind_options(
                relay, key, ca, exit, allow_peers, timeout=timeout, name=name, tcp_port=tcp_port, pool=pool, h2c=h2c,
                tls_passthrough=tls_passthrough, backlog=backlog, exit_only=exit_only, e2e=e2e,
                proxy=proxy,
            )
        )
        self._exposed: _native.Background | None = None
        self._watch = watch(self._native, on_connected, on_disconnected, on_reconnecting)


    def accept(self, *, timeout: float | None = None) -> tuple[socket.socket, PeerInfo]:
        """Wait for the next connection. Raises :class:`TunnelTimeout` after ``timeout`` seconds
        and :class:`Closed` once the listener is closed."""
        return _accepted(self._native.accept(timeout), blocking=True)

    def __iter__(self) -> Iterator[tuple[socket.socket, PeerInfo]]:
        """Accepted connections until the listener is closed."""
        while True:
            try:
                yield self.accept()
            except Closed:
                return

    def forward_to(self, address: str, *, proxy_protocol: bool = False) -> None:
        """Connect every connection to the local service at ``address`` (``host:port``), like
        ``tunnel listen --to``; blocks until :meth:`close` or Ctrl-C (then closes)."""
        self._exposed = self._native.expose(address, proxy_protocol=proxy_protocol)
        try:
            self._exposed.wait()
        finally:
            self.close()

    def close(self) -> None:
        """Unregister; waiting and later :meth:`accept` calls raise :class:`Closed`. (To leave a
        pool without cutting open connections, :meth:`retire` first.)"""
        if self._exposed is not None:
            self._exposed.close()
        super().close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()



class AsyncListener(_ListenerBase):
    """The asyncio twin of :class:`Listener`: create it with ``await AsyncListener.bind(...)``."""

    def __init__(self, native: _native.Listener) -> None:
        """Internal: use :meth:`bind`."""
        self._native = native
        self._watch: _native.Watch | None = None

    @classmethod
    async def bind(
        cls,
        relay: str | None = None,
        *,
        key: StrPath | None = None,
        name: str | None = None,
        tcp_port: bool = False,
        ca: StrPath | None = None,
        timeout: float | None = None,
        backlog: int | None = None,
        e2e: bool = False,
        allow_peers: Iterable[str] = (),
        pool: bool = False,
        exit: ExitRules | None = None,
        exit_only: bool = False,
        h2c: bool = False,
        tls_passthrough: bool = False,
        proxy: str | None = None,
        on_connected: OnConnected | None = None,
        on_disconnected: OnDisconnected | None = None,
        on_reconnecting: OnReconnecting | None = None,
    ) -> AsyncListener:
        """Connect and register (same arguments as :class:`Listener`; the ``on_*`` callbacks
        run on the event loop, and may be coroutine functions)."""
        native = await _native.Listener.bind_async(
            _bind_options(
                relay, key, ca, exit, allow_peers, timeout=timeout, name=name, tcp_port=tcp_port, pool=pool, h2c=h2c,
                tls_passthrough=tls_passthrough, backlog=backlog, exit_only=exit_only, e2e=e2e,
                proxy=proxy,
            )
        )
        listener = cls(native)
        listener._watch = watch(native, on_connected, on_disconnected, on_reconnecting, loop=asyncio.get_running_loop())
        return listener


    async def accept(self, *, timeout: float | None = None) -> tuple[socket.socket, PeerInfo]:
        """The next connection, as a non-blocking socket."""
        return _accepted(await self._native.accept_async(timeout), blocking=False)

    async def __aiter__(self) -> AsyncIterator[tuple[socket.socket, PeerInfo]]:
        while True:
            try:
                yield await self.accept()
            except Closed:
                return

    async def serve(
        self,
        client_connected_cb: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None],
        *,
        limit: int = 2**16,
    ) -> None:
        """Serve like :func:`asyncio.start_server`: each connection becomes a
        ``(StreamReader, StreamWriter)`` passed to ``client_connected_cb`` (run as a task when it
        is a coroutine). Returns when the listener is closed."""
        loop = asyncio.get_running_loop()
        async for sock, _peer in self:
            reader = asyncio.StreamReader(limit=limit, loop=loop)
            protocol = asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop)
            try:
                await loop.connect_accepted_socket(lambda: protocol, sock)
            except OSError:
                sock.close()  # the client went away before we started; keep serving the others

    async def __aenter__(self) -> AsyncListener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()



class ListenerServer(socketserver.BaseServer):
    """A ``socketserver`` server whose requests come from a :class:`Listener`, so any
    ``RequestHandlerClass`` works, including ``http.server`` handlers::

        with ThreadingListenerServer(listener, http.server.SimpleHTTPRequestHandler) as server:
            server.serve_forever()

    ``server_close()`` closes the listener; ``shutdown()`` (from another thread) stops
    ``serve_forever`` within ``poll_interval``.
    """

    # http.server handlers read these; HTTPServer sets them in server_bind.
    server_name: str
    server_port: int

    def __init__(self, listener: Listener, RequestHandlerClass: Callable[[Any, Any, Any], socketserver.BaseRequestHandler]) -> None:
        super().__init__((listener.name, 0), RequestHandlerClass)
        self.listener = listener
        self.server_name, self.server_port = listener.name, 0
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._stop.clear()
        self._stopped.clear()
        try:
            while not self._stop.is_set():
                try:
                    sock, peer = self.listener.accept(timeout=poll_interval)
                except TunnelTimeout:
                    self.service_actions()
                    continue
                except Closed:
                    break
                self._handle(sock, peer.address)
                self.service_actions()
        finally:
            self._stopped.set()

    def handle_request(self) -> None:
        sock, peer = self.listener.accept(timeout=self.timeout)
        self._handle(sock, peer.address)

    def _handle(self, request: socket.socket, client_address: tuple[str, int]) -> None:
        if not self.verify_request(request, client_address):
            self.shutdown_request(request)
            return
        try:
            self.process_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)
        except BaseException:
            self.shutdown_request(request)
            raise

    def shutdown(self) -> None:
        self._stop.set()
        self._stopped.wait()

    def shutdown_request(self, request: Any) -> None:
        try:
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.close_request(request)

    def close_request(self, request: Any) -> None:
        request.close()

    def server_close(self) -> None:
        self.listener.close()

    def fileno(self) -> int:
        raise OSError("a ListenerServer has no socket of its own; use serve_forever()")


class ThreadingListenerServer(socketserver.ThreadingMixIn, ListenerServer):
    """:class:`ListenerServer` handling each connection in its own thread."""

    daemon_threads = True
