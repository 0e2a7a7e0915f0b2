"""libtunnel: reach private TCP services (a database in a VPC, a service behind NAT) through a
relay over one authenticated WebSocket.

Blocking classes (:class:`Dialer`, :class:`Listener`, :class:`Server`, the relay) release the GIL
and stay interruptible with Ctrl-C; their asyncio twins are :class:`AsyncDialer`,
:class:`AsyncListener` and :class:`AsyncServer`. Streams are real ``socket.socket`` objects. Errors derive from
:class:`TunnelError` and carry the core's stable ``.code``. Rust logs reach the ``libtunnel``
logger of :mod:`logging`.
"""

from __future__ import annotations

import warnings
from typing import Any

from . import _native
from ._dialer import AsyncDialer, Dialer
from ._errors import (
    AuthError,
    Closed,
    ConfigError,
    E2EError,
    E2EIdentityError,
    E2ERefused,
    NameTaken,
    NotAllowed,
    ProtocolError,
    RelayUnavailable,
    TunnelError,
    TunnelTimeout,
    Unreachable,
)
from ._events import Connected, Reconnecting
from ._keys import auth_keys, auth_keys_json, keygen, listener_identity, listener_keygen
from ._listener import AsyncListener, ExitStats, Listener, ListenerServer, PeerInfo, Registration, ThreadingListenerServer
from ._relay import AsyncServer, Server, serve

#: Aliases: the style guide's name for the allowlist refusal, and ARCHITECTURE.md's for timeouts.
TargetNotAllowed = NotAllowed
Timeout = TunnelTimeout

#: Every stable error code name of the core, in numeric order.
ERROR_CODES: tuple[str, ...] = tuple(_native.ERROR_CODES)


#: Old names, kept for one release: every face now calls the relay ``Server`` and an accepted
#: connection's details ``PeerInfo``.
_DEPRECATED = {"Relay": "Server", "AsyncRelay": "AsyncServer", "Peer": "PeerInfo"}


def __getattr__(name: str) -> Any:
    """``libtunnel.Relay``, ``AsyncRelay`` and ``Peer``: their new objects, with a
    :class:`DeprecationWarning` naming the new name."""
    new = _DEPRECATED.get(name)
    if new is None:
        raise AttributeError(f"module 'libtunnel' has no attribute {name!r}")
    warnings.warn(f"libtunnel.{name} is deprecated and will be removed in the next release; use libtunnel.{new}", DeprecationWarning, stacklevel=2)
    return globals()[new]


def refresh_logging() -> None:
    """Re-read logger levels: call after changing the ``libtunnel`` loggers' configuration (the
    bridge caches levels for speed)."""
    _native.reset_logging()


__all__ = [
    "AsyncDialer",
    "AsyncListener",
    "AsyncServer",
    "AuthError",
    "Closed",
    "ConfigError",
    "Connected",
    "Dialer",
    "E2EError",
    "E2EIdentityError",
    "E2ERefused",
    "ERROR_CODES",
    "Listener",
    "ListenerServer",
    "NameTaken",
    "NotAllowed",
    "ExitStats",
    "PeerInfo",
    "ProtocolError",
    "Reconnecting",
    "Registration",
    "Server",
    "RelayUnavailable",
    "TargetNotAllowed",
    "ThreadingListenerServer",
    "Timeout",
    "TunnelError",
    "TunnelTimeout",
    "Unreachable",
    "auth_keys",
    "auth_keys_json",
    "keygen",
    "listener_identity",
    "listener_keygen",
    "refresh_logging",
    "serve",
]
