"""The relay, embedded: :class:`Server` (blocking), :class:`AsyncServer` (asyncio) and
:func:`serve` (run until Ctrl-C or SIGTERM, like ``tunnel server``). Settings are the names of
``tunnel server --set help`` (``listen``, ``auth_keys``, ``allow``, ...); they win over
``TUNNEL_*`` variables and ``./.env`` (read unless ``env=False``), which win over ``config_file``.
``Server`` is the relay's name in every face (Rust ``libtunnel::Server``, C ``tunnel_server``, Node
``Server``); ``Relay`` and ``AsyncRelay`` are its deprecated old names here."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any, Union

from . import _native

__all__ = ["Server", "AsyncServer", "serve"]

# Union, not `|`: module-level aliases are evaluated at import, and Python 3.9 has no `X | Y`.
StrPath = Union[str, os.PathLike[str]]


def _settings(config: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """Setting values as the CLI spells them: lists and dicts as JSON, booleans lower case."""
    out = []
    for name, value in (config or {}).items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (list, tuple, dict)):
            text = json.dumps(value)
        elif value is None:
            text = "off"
        else:
            text = str(value)
        out.append((name, text))
    return out


def _path(p: StrPath | None) -> str | None:
    return None if p is None else os.fspath(p)


class _RelayInfo:
    _native: _native.Server

    @property
    def url(self) -> str:
        """The URL dialers and listeners use."""
        return self._native.url

    @property
    def address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the tunnel endpoint."""
        return self._native.address

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the raw-TCP endpoint, when enabled."""
        return self._native.tcp_address

    @property
    def http_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the public HTTP port, when enabled."""
        return self._native.http_address

    @property
    def https_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the public HTTPS port (TLS, h2, TLS passthrough), when enabled."""
        return self._native.https_address

    @property
    def ready_text(self) -> str:
        """The lines ``tunnel server`` prints when it is up: ``relay listening: URL`` and the raw-TCP,
        public HTTP(S), admin and QUIC (``quic listening: quic://ADDR``) addresses, when enabled
        (the ports chosen for ``:0``)."""
        return self._native.ready_text

    def abort(self) -> None:
        """Stop at once, dropping every connection (like a crash)."""
        self._native.abort()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class Server(_RelayInfo):
    """A relay running in the background of this process; the constructor binds and starts it.
    Raises :class:`ConfigError` naming the setting to fix."""

    def __init__(self, config: Mapping[str, Any] | None = None, *, config_file: StrPath | None = None, env: bool = True) -> None:
        self._native = _native.Server.start(_settings(config), _path(config_file), env)

    def shutdown(self) -> None:
        """Stop accepting, let open streams drain (``drain_timeout``), then return."""
        self._native.shutdown()

    close = shutdown

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


class AsyncServer(_RelayInfo):
    """The asyncio twin of :class:`Server`: ``relay = await AsyncServer.start(config)``."""

    def __init__(self, native: _native.Server) -> None:
        """Internal: use :meth:`start`."""
        self._native = native

    @classmethod
    async def start(cls, config: Mapping[str, Any] | None = None, *, config_file: StrPath | None = None, env: bool = True) -> AsyncServer:
        """Bind and start a relay."""
        return cls(await _native.Server.start_async(_settings(config), _path(config_file), env))

    async def shutdown(self) -> None:
        """Stop accepting, let open streams drain, then return."""
        await self._native.shutdown_async()

    async def __aenter__(self) -> AsyncServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()


class _Terminate(Exception):
    pass


def serve(config: Mapping[str, Any] | None = None, *, config_file: StrPath | None = None, env: bool = True, on_ready: Any = None) -> None:
    """Run a relay until Ctrl-C or SIGTERM, then drain (what ``python -m libtunnel server`` runs).
    ``on_ready(relay)`` is called once it listens."""
    relay = Server(config, config_file=config_file, env=env)
    previous = None
    if threading.current_thread() is threading.main_thread():

        def _on_term(signum: int, frame: object) -> None:
            raise _Terminate

        previous = signal.signal(signal.SIGTERM, _on_term)
    try:
        if on_ready is not None:
            on_ready(relay)
        threading.Event().wait()
    except (KeyboardInterrupt, _Terminate):
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        relay.shutdown()
