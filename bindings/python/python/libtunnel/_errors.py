"""The exception hierarchy, rooted in :class:`TunnelError`.

The native layer raises these through :func:`_from_native`, choosing the class by the core's
stable code name (``core/src/error.rs``); no message text is ever parsed. Every class carries
``.code`` (that name) and ``.message``.
"""

from __future__ import annotations

__all__ = [
    "TunnelError",
    "AuthError",
    "NotAllowed",
    "Unreachable",
    "TunnelTimeout",
    "ProtocolError",
    "RelayUnavailable",
    "ConfigError",
    "Closed",
    "NameTaken",
    "E2EError",
    "E2EIdentityError",
    "E2ERefused",
]


class TunnelError(Exception):
    """Base of every libtunnel error.

    ``code`` is the core's stable name (``"NOT_ALLOWED"``, ``"AUTH_FAILED"``, ...) and
    ``message`` says what went wrong and how to fix it.
    """

    code: str
    message: str

    def __init__(self, message: str, code: str = "GENERAL") -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.message, self.code))


class AuthError(TunnelError):
    """The relay refused our key: wrong secret, unknown key id, or clock skew."""


class NotAllowed(TunnelError):
    """The target is outside the relay's allowlist."""


class Unreachable(TunnelError):
    """The relay could not resolve or reach the target, or the target refused it (``REFUSED``)."""


class TunnelTimeout(TunnelError, TimeoutError):
    """An operation did not finish in time (also a built-in :class:`TimeoutError`)."""


class ProtocolError(TunnelError):
    """The peer sent bytes that are not the protocol."""


class RelayUnavailable(TunnelError):
    """The relay cannot be reached, or the session to it died."""


class ConfigError(TunnelError, ValueError):
    """A relay setting or an argument (URL, target, key) is missing or malformed."""


class Closed(TunnelError):
    """The dialer, listener or stream was closed."""


class NameTaken(TunnelError):
    """A listener name belongs to another key, or this key may not use it."""


class E2EError(TunnelError):
    """End-to-end encryption could not be established (see the two subclasses)."""


class E2EIdentityError(E2EError):
    """``E2E_IDENTITY``: the listener's key does not prove the name dialed, or a chosen name has
    no pinned key (``e2e_pins``)."""


class E2ERefused(E2EError):
    """``E2E_REFUSED``: the listener does not admit this dialer's key (``allow_peers``), or it
    refused a plaintext connection."""


#: The core's code names to classes; codes not listed (``IO``, ``GENERAL``) raise the base.
CLASSES: dict[str, type[TunnelError]] = {
    "AUTH_FAILED": AuthError,
    "AUTH_UNKNOWN_KEY": AuthError,
    "AUTH_CLOCK_SKEW": AuthError,
    "NOT_ALLOWED": NotAllowed,
    "UNREACHABLE": Unreachable,
    "REFUSED": Unreachable,
    "TIMEOUT": TunnelTimeout,
    "PROTOCOL": ProtocolError,
    "RELAY_UNAVAILABLE": RelayUnavailable,
    "INVALID_CONFIG": ConfigError,
    "INVALID_ARGUMENT": ConfigError,
    "CLOSED": Closed,
    "NAME_TAKEN": NameTaken,
    "E2E_IDENTITY": E2EIdentityError,
    "E2E_REFUSED": E2ERefused,
}


def _from_native(code: str, message: str) -> TunnelError:
    """Called by the native module: the exception for a core error."""
    return CLASSES.get(code, TunnelError)(message, code)
