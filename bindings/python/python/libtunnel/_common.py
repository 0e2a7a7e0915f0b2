"""Helpers shared by the dialer, listener and relay modules: defaults from the environment (the
CLI's variables) and turning a native socket into a real :class:`socket.socket`."""

from __future__ import annotations

import os
import socket

from . import _native
from ._errors import ConfigError


def from_env(value: str | os.PathLike[str] | None, var: str, what: str) -> str:
    """``value``, or the environment variable ``var``, or a :class:`ConfigError` naming both."""
    if value is not None:
        return os.fspath(value)
    env = os.environ.get(var)
    if env:
        return env
    raise ConfigError(f"no {what}: pass it, or set {var}", "INVALID_ARGUMENT")


def wrap(native: _native.Socket, *, blocking: bool = True) -> socket.socket:
    """Take the descriptor of a native socket and return it as a ``socket.socket``."""
    sock = socket.socket(fileno=native.detach())
    sock.setblocking(blocking)
    return sock
