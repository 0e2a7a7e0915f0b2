"""Helpers shared by the dialer and listener modules: turning a native socket into a real
:class:`socket.socket`. (Defaults from the environment are the core's: see ``libtunnel::client``.)"""

from __future__ import annotations

import socket

from . import _native


def wrap(native: _native.Socket, *, blocking: bool = True) -> socket.socket:
    """Take the descriptor of a native socket and return it as a ``socket.socket``."""
    sock = socket.socket(fileno=native.detach())
    sock.setblocking(blocking)
    return sock
