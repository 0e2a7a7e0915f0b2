"""Key generation, in Rust (the same keys ``tunnel keygen`` makes)."""

from __future__ import annotations

import json
import os

from . import _native

__all__ = ["keygen", "auth_keys", "auth_keys_json", "listener_keygen", "listener_identity"]


def keygen(kid: int = 1) -> str:
    """A new random shared key for dialers, as ``KID:BASE64`` (the ``TUNNEL_KEY`` form)."""
    return _native.keygen(kid)


def auth_keys(*keys: str) -> list[dict[str, object]]:
    """The relay's ``auth_keys`` setting for these ``KID:BASE64`` keys."""
    out: list[dict[str, object]] = []
    for k in keys:
        kid, _, data = k.strip().partition(":")
        out.append({"kid": int(kid), "data": data})
    return out


def auth_keys_json(*keys: str) -> str:
    """:func:`auth_keys` as the JSON text of ``TUNNEL_AUTH_KEYS``."""
    return json.dumps(auth_keys(*keys), separators=(",", ":"))


def listener_keygen(path: str | os.PathLike[str]) -> tuple[str, str]:
    """Write a new Ed25519 listener key to ``path`` (mode 0600; it must not exist).
    Returns ``(name, public_key_base64)``."""
    return _native.listener_keygen(os.fspath(path))


def listener_identity(key: str | os.PathLike[str]) -> tuple[str, str]:
    """``(name, public_key_base64)`` of a listener key (PEM text or a file)."""
    return _native.identity_name(os.fspath(key))
