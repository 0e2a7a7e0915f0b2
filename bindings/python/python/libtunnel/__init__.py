"""libtunnel: reach private TCP services (a database in a VPC, a service behind NAT) through a
relay over one authenticated WebSocket.

Blocking classes (:class:`Dialer`, :class:`Listener`, :class:`Relay`) release the GIL and stay
interruptible with Ctrl-C; their asyncio twins are :class:`AsyncDialer`, :class:`AsyncListener`
and :class:`AsyncRelay`. Streams are real ``socket.socket`` objects. Errors derive from
:class:`TunnelError` and carry the core's stable ``.code``. Rust logs reach the ``libtunnel``
logger of :mod:`logging`.
"""

from __future__ import annotations

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
from ._listener import AsyncListener, ExitStats, Listener, ListenerServer, Peer, Registration, ThreadingListenerServer
from ._relay import AsyncRelay, Relay, serve

#: Aliases: the style guide's name for the allowlist refusal, and ARCHITECTURE.md's for timeouts.
TargetNotAllowed = NotAllowed
Timeout = TunnelTimeout

#: Every stable error code name of the core, in numeric order.
ERROR_CODES: tuple[str, ...] = tuple(_native.ERROR_CODES)


def refresh_logging() -> None:
    """Re-read logger levels: call after changing the ``libtunnel`` loggers' configuration (the
    bridge caches levels for speed)."""
    _native.reset_logging()


__all__ = [
    "AsyncDialer",
    "AsyncListener",
    "AsyncRelay",
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
    "Peer",
    "ProtocolError",
    "Reconnecting",
    "Registration",
    "Relay",
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
