"""Errors: one hierarchy keyed by the core's stable codes, raised quickly and with messages that
name the cause."""

from __future__ import annotations

import pickle
import socket
import time

import pytest

import libtunnel
from libtunnel._errors import CLASSES


def test_every_core_code_has_a_class() -> None:
    assert libtunnel.ERROR_CODES[:4] == ("AUTH_FAILED", "AUTH_UNKNOWN_KEY", "AUTH_CLOCK_SKEW", "NOT_ALLOWED")
    unmapped = set(libtunnel.ERROR_CODES) - set(CLASSES)
    assert unmapped == {"IO", "GENERAL"}, "a new core code needs a class (or a decision to use the base)"
    for cls in set(CLASSES.values()):
        assert issubclass(cls, libtunnel.TunnelError)
    assert issubclass(libtunnel.TunnelTimeout, TimeoutError)
    assert issubclass(libtunnel.ConfigError, ValueError)


def test_exceptions_carry_code_and_pickle() -> None:
    e = libtunnel.TunnelTimeout("too slow", "TIMEOUT")
    assert (e.code, e.message, str(e)) == ("TIMEOUT", "too slow", "[TIMEOUT] too slow")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is libtunnel.TunnelTimeout and back.code == "TIMEOUT"


def test_target_outside_allowlist(dialer: libtunnel.Dialer) -> None:
    with pytest.raises(libtunnel.NotAllowed) as info:
        dialer.dial("127.0.0.1:1")
    assert info.value.code == "NOT_ALLOWED"
    assert "127.0.0.1:1" in info.value.message


def test_wrong_key_is_auth_error(relay: object, echo: tuple[str, int]) -> None:
    wrong = libtunnel.Dialer(relay.url, key=libtunnel.keygen(7), timeout=10)  # type: ignore[attr-defined]
    with pytest.raises(libtunnel.AuthError) as info:
        wrong.dial(f"127.0.0.1:{echo[1]}")
    assert info.value.code == "AUTH_FAILED"
    unknown = libtunnel.Dialer(relay.url, key=libtunnel.keygen(99), timeout=10)  # type: ignore[attr-defined]
    with pytest.raises(libtunnel.AuthError) as info:
        unknown.connect()
    assert info.value.code == "AUTH_UNKNOWN_KEY"


def test_relay_down_is_relay_unavailable_quickly(key: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # released: nothing listens there any more
    d = libtunnel.Dialer(f"ws://127.0.0.1:{port}", key=key, timeout=20)
    start = time.monotonic()
    with pytest.raises(libtunnel.RelayUnavailable) as info:
        d.dial("127.0.0.1:5432")
    assert time.monotonic() - start < 5, "a refused relay connection must fail fast, not wait for the timeout"
    assert info.value.code == "RELAY_UNAVAILABLE"


def test_dial_timeout_is_tunnel_timeout(key: str) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        d = libtunnel.Dialer(f"ws://127.0.0.1:{silent.getsockname()[1]}", key=key, timeout=0.5)
        with pytest.raises(TimeoutError) as info:
            d.dial("127.0.0.1:5432")
        assert isinstance(info.value, libtunnel.TunnelTimeout)


def test_bad_arguments_are_config_errors(relay: object) -> None:
    with pytest.raises(libtunnel.ConfigError) as info:
        libtunnel.Dialer(relay.url, key="not a key")  # type: ignore[attr-defined]
    assert info.value.code == "INVALID_ARGUMENT"
    d = libtunnel.Dialer(relay.url, key=libtunnel.keygen())  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        d.dial("no-port-here")
    with pytest.raises(libtunnel.ConfigError) as info:
        libtunnel.Server({"listen": "127.0.0.1:0", "allow": [{"host": "x", "port": 1}]}, env=False)
    assert info.value.code == "INVALID_CONFIG" and "TUNNEL_AUTH_KEYS" in info.value.message
    with pytest.raises(libtunnel.ConfigError) as info:
        libtunnel.Server({"lisen": "127.0.0.1:0"}, env=False)
    assert "listen" in info.value.message


def test_relay_killed_mid_transfer_resets_the_socket(key: str, echo: tuple[str, int]) -> None:
    config = {"listen": "127.0.0.1:0", "auth_keys": libtunnel.auth_keys(key), "allow": [{"host": "127.0.0.1", "port": echo[1]}]}
    relay = libtunnel.Server(config, env=False)
    d = libtunnel.Dialer(relay.url, key=key, timeout=10)
    with d.dial(f"127.0.0.1:{echo[1]}") as sock:
        sock.settimeout(10)
        sock.sendall(b"before")
        assert sock.recv(6) == b"before"
        relay.abort()
        with pytest.raises(ConnectionResetError):
            while sock.recv(65536):  # a cut tunnel is an error, never a clean EOF
                pass
    with pytest.raises((libtunnel.RelayUnavailable, libtunnel.Closed)):
        d.dial(f"127.0.0.1:{echo[1]}")


def test_old_names_still_work_with_a_deprecation_warning() -> None:
    # Every face calls the relay Server and an accepted connection's details PeerInfo; the old
    # Python names stay for one release.
    for old, new in (("Relay", libtunnel.Server), ("AsyncRelay", libtunnel.AsyncServer), ("Peer", libtunnel.PeerInfo)):
        with pytest.warns(DeprecationWarning, match=f"libtunnel.{old} is deprecated"):
            assert getattr(libtunnel, old) is new
    with pytest.raises(AttributeError):
        getattr(libtunnel, "NoSuchName")
