"""Connection-state callbacks: ``on_connected``, ``on_disconnected`` and ``on_reconnecting`` of
:class:`Listener`, :class:`AsyncListener`, :class:`Dialer` and :class:`AsyncDialer`, fed by the
core's events (the same ones Node emits as ``'connected'`` / ``'disconnected'``).

Blocking classes call their callbacks on a libtunnel background thread, one at a time and in
order; asyncio classes call them on their event loop (a coroutine function is run as a task).
An exception a callback raises is reported through :func:`sys.unraisablehook` (blocking) or
the loop's exception handler (asyncio) and does not stop later events."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple, cast

from . import _native
from ._errors import TunnelError

__all__ = ["Connected", "Reconnecting", "OnConnected", "OnDisconnected", "OnReconnecting"]


class Connected(NamedTuple):
    """``on_connected``'s argument: a session to the relay is up."""

    #: The relay URL.
    relay: str
    #: The name the relay registered (listeners), or ``None`` (dialers).
    name: str | None


class Reconnecting(NamedTuple):
    """``on_reconnecting``'s argument: a listener waits ``delay`` seconds before retry ``attempt`` (from 1)."""

    attempt: int
    delay: float


OnConnected = Callable[[Connected], Any]
OnDisconnected = Callable[[TunnelError], Any]
OnReconnecting = Callable[[Reconnecting], Any]


class _Dispatch:
    """The one callable the native watch calls: ``(name, detail)`` to the matching callback.
    It holds only the callbacks (never the listener or dialer), so it keeps nothing else alive."""

    def __init__(
        self,
        on_connected: OnConnected | None,
        on_disconnected: OnDisconnected | None,
        on_reconnecting: OnReconnecting | None,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        self._callbacks: dict[str, Callable[[Any], Any] | None] = {
            "connected": on_connected,
            "disconnected": on_disconnected,
            "reconnecting": on_reconnecting,
        }
        self._loop = loop

    def __call__(self, name: str, detail: object) -> None:
        callback = self._callbacks.get(name)
        if callback is None:
            return
        arg: object = detail
        if name == "connected":
            arg = Connected(*cast("tuple[str, str | None]", detail))  # a string: 3.9 cannot evaluate `X | None`
        elif name == "reconnecting":
            arg = Reconnecting(*cast(tuple[int, float], detail))
        if self._loop is None:
            callback(arg)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_run_on_loop, self._loop, callback, arg)


def _run_on_loop(loop: asyncio.AbstractEventLoop, callback: Callable[[Any], Any], arg: object) -> None:
    try:
        result = callback(arg)
        if inspect.isawaitable(result):
            asyncio.ensure_future(result, loop=loop)
    except Exception as exc:  # reported like an exception in any loop callback, then ignored
        loop.call_exception_handler({"message": f"exception in libtunnel event callback {callback!r}", "exception": exc})


def watch(
    native: _native.Dialer | _native.Listener,
    on_connected: OnConnected | None,
    on_disconnected: OnDisconnected | None,
    on_reconnecting: OnReconnecting | None,
    *,
    loop: asyncio.AbstractEventLoop | None = None,
) -> _native.Watch | None:
    """Subscribe the callbacks given (none given: no subscription)."""
    if on_connected is None and on_disconnected is None and on_reconnecting is None:
        return None
    return native.watch(_Dispatch(on_connected, on_disconnected, on_reconnecting, loop))
