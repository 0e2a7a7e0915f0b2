"""Dialers: reach a private ``host:port`` through a relay, as a socket, an asyncio stream pair,
or a local port forward any database driver can use. :class:`Dialer` blocks (releasing the GIL;
Ctrl-C interrupts), :class:`AsyncDialer` is its asyncio twin. Both share one multiplexed session
to the relay among all their dials."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Iterator, Mapping
from types import TracebackType
from typing import Any, Union

from . import _native
from ._common import wrap
from ._events import OnConnected, OnDisconnected, OnReconnecting, watch

__all__ = ["Dialer", "AsyncDialer"]

# Union, not `|`: module-level aliases are evaluated at import, and Python 3.9 has no `X | Y`.
StrPath = Union[str, os.PathLike[str]]


def _native_dialer(
    relay: str | None,
    key: str | None,
    timeout: float | None,
    ca: StrPath | None,
    classic: bool | None,
    e2e: bool = False,
    e2e_pins: Mapping[str, str] | None = None,
    e2e_identity: StrPath | None = None,
    proxy: str | None = None,
) -> _native.Dialer:
    # What is None comes from the TUNNEL_* variables (and ./.env), read by the core.
    return _native.Dialer(
        relay,
        None if key is None else os.fspath(key),
        timeout=timeout,
        ca=None if ca is None else os.fspath(ca),
        classic=classic,
        e2e=e2e,
        e2e_pins=list((e2e_pins or {}).items()),
        e2e_identity=None if e2e_identity is None else os.fspath(e2e_identity),
        proxy=proxy,
    )


@contextlib.contextmanager
def _stopping(task: _native.Background) -> Iterator[tuple[str, int]]:
    """A running forward's address; the forward stops accepting when the block is left."""
    try:
        address = task.address
        assert address is not None, "a forward always listens"
        yield address
    finally:
        task.close()


class _DialerBase:
    """Construction and properties shared by :class:`Dialer` and :class:`AsyncDialer`.

    ``relay`` is ``ws://``, ``wss://`` or ``tcp://`` (default ``$TUNNEL_RELAY``); ``key`` is
    ``KID:BASE64`` or a file holding it (default ``$TUNNEL_KEY``); ``timeout`` bounds each dial
    in seconds (default ``$TUNNEL_TIMEOUT``, else 20); ``ca`` is a PEM file of roots for a
    private CA (default ``$TUNNEL_CA``); ``classic`` speaks Emissary's protocol (default
    ``$TUNNEL_MODE``). Unset values are read from the environment and ``./.env``. ``e2e`` runs TLS end to end
    inside every dial to a listener name, accepting the listener only if its key proves the name
    (the relay can neither read nor impersonate); ``e2e_pins`` maps chosen names to their
    listener's key (base64 or key-derived name); ``e2e_identity`` (Ed25519 PEM text or file) is
    presented to listeners with ``allow_peers``. ``proxy`` is the upstream proxy to reach the relay
    through (``http://user:pass@host:port``, ``https://…``, ``socks5://…``, or ``"none"`` for a direct
    connection; default ``$TUNNEL_PROXY``, else ``https_proxy``/``http_proxy``/``all_proxy`` with
    ``no_proxy``, as curl).
    ``on_connected`` (a :class:`Connected`), ``on_disconnected`` (the cause, a
    :class:`TunnelError` with its ``.code``) and ``on_reconnecting`` (a :class:`Reconnecting`)
    are called when the session to the relay is opened (by :meth:`connect`, or by the first dial after a loss: a dialer reconnects on
    demand, not in the background) or drops; ``on_reconnecting`` is never called for a dialer: see
    :mod:`libtunnel._events`.
    """

    def __init__(
        self,
        relay: str | None = None,
        *,
        key: str | None = None,
        timeout: float | None = None,
        ca: StrPath | None = None,
        classic: bool | None = None,
        e2e: bool = False,
        e2e_pins: Mapping[str, str] | None = None,
        e2e_identity: StrPath | None = None,
        proxy: str | None = None,
        on_connected: OnConnected | None = None,
        on_disconnected: OnDisconnected | None = None,
    ) -> None:
        self._native = _native_dialer(relay, key, timeout, ca, classic, e2e, e2e_pins, e2e_identity, proxy)
        self._callbacks = (on_connected, on_disconnected)
        self._watch: _native.Watch | None = None
        self._subscribe(None)

    def _subscribe(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self._watch = watch(self._native, *self._callbacks, None, loop=loop)

    @property
    def relay(self) -> str:
        """The relay URL."""
        return self._native.relay

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.relay!r})"


class Dialer(_DialerBase):
    """A blocking client of one relay (arguments: see :class:`_DialerBase`)."""

    def connect(self) -> None:
        """Open the session now, so a wrong key or a dead relay fails here."""
        self._native.connect()

    def dial(self, target: str, *, timeout: float | None = None, via: str | None = None) -> socket.socket:
        """A connected, blocking socket to ``target`` (``host:port``) through the relay; with
        ``via``, through that exit listener, which connects it inside its own network."""
        return wrap(self._native.dial(target, timeout, via))

    @contextlib.contextmanager
    def forward(self, target: str, *, local: str = "127.0.0.1:0", via: str | None = None) -> Iterator[tuple[str, int]]:
        """Serve a local port whose every connection is tunnelled to ``target`` (through the exit
        listener ``via`` when given); yields its ``(host, port)``. Leaving the block stops
        accepting (open connections finish)."""
        task = self._native.forward(target, local, via)
        with _stopping(task) as address:
            yield address

    def close(self) -> None:
        """Close the session (streams still open on it fail)."""
        self._native.close()

    def __enter__(self) -> Dialer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncDialer(_DialerBase):
    """The asyncio twin of :class:`Dialer` (same arguments); every method is a coroutine. The
    ``on_*`` callbacks run on the event loop the dialer is first used on (coroutine functions as
    tasks). Cancelling an awaited call (``task.cancel()``, :func:`asyncio.wait_for`,
    :func:`asyncio.timeout`) cancels the dial in the core: a half-made session or stream is
    closed, and later dials work."""

    def _subscribe(self, loop: asyncio.AbstractEventLoop | None) -> None:
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # made outside a loop: subscribed by the first coroutine call
        super()._subscribe(loop)

    def _loop_ready(self) -> None:
        if self._watch is None and any(self._callbacks):
            self._subscribe(asyncio.get_running_loop())

    async def connect(self) -> None:
        """Open the session now, so a wrong key or a dead relay fails here."""
        self._loop_ready()
        await self._native.connect_async()

    async def dial(self, target: str, *, timeout: float | None = None, via: str | None = None) -> socket.socket:
        """A connected, non-blocking socket to ``target`` (for ``loop.sock_*`` or a transport);
        ``via`` names an exit listener to go through."""
        self._loop_ready()
        return wrap(await self._native.dial_async(target, timeout, via), blocking=False)

    async def open_connection(
        self, target: str, *, timeout: float | None = None, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Like :func:`asyncio.open_connection`, through the relay (``kwargs`` go to it, e.g. ``limit``)."""
        sock = await self.dial(target, timeout=timeout)
        try:
            return await asyncio.open_connection(sock=sock, **kwargs)
        except BaseException:
            sock.close()
            raise

    @contextlib.asynccontextmanager
    async def forward(self, target: str, *, local: str = "127.0.0.1:0", via: str | None = None) -> AsyncIterator[tuple[str, int]]:
        """``async with dialer.forward(target) as (host, port):`` a local port forward (for asyncpg);
        ``via`` names an exit listener to go through."""
        self._loop_ready()
        task = await self._native.forward_async(target, local, via)
        with _stopping(task) as address:
            yield address

    async def close(self) -> None:
        """Close the session (streams still open on it fail)."""
        await self._native.close_async()

    async def __aenter__(self) -> AsyncDialer:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()
