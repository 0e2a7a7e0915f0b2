"""The QUIC transport from Python, with no new API: an embedded ``Server`` whose settings dict
turns on ``quic_listen`` (with ``tls_cert``/``tls_key`` from a test CA for ``localhost``), its
``quic listening:`` line read from ``ready_text``; a ``Dialer`` on the ``quic://`` URL with
``ca=`` echoing 4 MiB hashed both ways and half-closing; a ``Listener`` bound over ``quic://``
accepting 2 MiB dialed by name (through the relay's ``wss://`` URL, and over ``quic://``: the
relay joins two QUIC streams); a wrong key (``AuthError``, ``AUTH_FAILED``), a denied
target (``NOT_ALLOWED``), no CA (the certificate refused), and ``classic=True`` refused with
``INVALID_ARGUMENT``."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

import libtunnel

from conftest import free_port


@dataclass
class QuicRelay:
    server: libtunnel.Server
    quic: str
    wss: str
    ca: str


@pytest.fixture(scope="module")
def quic_relay(key: str, echo: tuple[str, int], hasher: tuple[str, int], tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuicRelay]:
    d = tmp_path_factory.mktemp("quic-pki")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    config = {
        "listen": "127.0.0.1:0",
        "quic_listen": "127.0.0.1:0",
        "tls_cert": str(d / "cert.pem"),
        "tls_key": str(d / "key.pem"),
        "auth_keys": libtunnel.auth_keys(key),
        "allow": [{"host": "127.0.0.1", "port": p} for p in (echo[1], hasher[1])],
        "listeners_open": True,
        "drain_timeout": 2,
    }
    server = libtunnel.Server(config, env=False)
    lines = [line for line in server.ready_text.splitlines() if line.startswith("quic listening: quic://127.0.0.1:")]
    assert len(lines) == 1, f"the ready lines name the QUIC endpoint: {server.ready_text!r}"
    port = int(lines[0].rsplit(":", 1)[1])
    assert port != 0
    assert server.url.startswith("wss://127.0.0.1:")
    wss = server.url.replace("127.0.0.1", "localhost")
    yield QuicRelay(server, f"quic://localhost:{port}", wss, str(d / "ca.pem"))
    server.shutdown()


def _pattern(n: int, seed: int) -> bytes:
    return hashlib.shake_256(b"quic-%d" % seed).digest(n)


def _echo_hashed(sock: socket.socket, data: bytes) -> bytes:
    """Send ``data`` while reading the echo, half-close, read to EOF; the SHA-256 of what came back."""
    sock.settimeout(30)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=send)
    t.start()
    h, n = hashlib.sha256(), 0
    while chunk := sock.recv(1 << 20):
        h.update(chunk)
        n += len(chunk)
    t.join(30)
    assert not errors, errors
    assert n == len(data), f"echoed {n} of {len(data)} bytes"
    return h.digest()


def test_dialer_over_quic_echoes_4_mib_and_half_closes(quic_relay: QuicRelay, key: str, echo: tuple[str, int], hasher: tuple[str, int]) -> None:
    with libtunnel.Dialer(quic_relay.quic, key=key, ca=quic_relay.ca, timeout=10) as d:
        assert d.relay == quic_relay.quic
        data = _pattern(4 << 20, 1)
        with d.dial(f"127.0.0.1:{echo[1]}") as s:
            assert _echo_hashed(s, data) == hashlib.sha256(data).digest()
        # Half-close: the hasher reads to our EOF, then answers the hash on the open half.
        data = _pattern((1 << 20) + 7, 2)
        with d.dial(f"127.0.0.1:{hasher[1]}") as s:
            s.settimeout(30)
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            assert s.makefile("rb").read() == hashlib.sha256(data).digest()


@pytest.mark.parametrize("dial_over", ["wss", "quic"])
def test_listener_over_quic_accepts_a_dial_by_name(quic_relay: QuicRelay, key: str, listener_key: str, dial_over: str) -> None:
    with libtunnel.Listener(quic_relay.quic, key=listener_key, ca=quic_relay.ca, timeout=10) as listener:
        assert listener.name == libtunnel.listener_identity(listener_key)[0]
        seen: list[int] = []

        def serve() -> None:
            server, peer = listener.accept(timeout=20)
            with server:
                assert peer.via == "dial"
                server.settimeout(30)
                n = 0
                while chunk := server.recv(1 << 20):
                    n += len(chunk)
                    server.sendall(chunk)
                server.shutdown(socket.SHUT_WR)
                seen.append(n)

        t = threading.Thread(target=serve)
        t.start()
        data = _pattern(2 << 20, 3)
        url = quic_relay.wss if dial_over == "wss" else quic_relay.quic
        with libtunnel.Dialer(url, key=key, ca=quic_relay.ca, timeout=10) as d, d.dial(f"{listener.name}:0") as s:
            assert _echo_hashed(s, data) == hashlib.sha256(data).digest()
        t.join(30)
        assert seen == [len(data)], "the listener read every byte over quic://"


def test_quic_refusals_carry_their_codes(quic_relay: QuicRelay, key: str, echo: tuple[str, int]) -> None:
    target = f"127.0.0.1:{echo[1]}"
    wrong = key.split(":")[0] + ":bm90LXRoZS1yaWdodC1zZWNyZXQtMDEyMzQ1Njc4OQ=="
    with libtunnel.Dialer(quic_relay.quic, key=wrong, ca=quic_relay.ca, timeout=10) as d, pytest.raises(libtunnel.TunnelError) as e:
        d.dial(target)
    assert isinstance(e.value, libtunnel.AuthError) and e.value.code == "AUTH_FAILED", e.value
    with libtunnel.Dialer(quic_relay.quic, key=key, ca=quic_relay.ca, timeout=10) as d, pytest.raises(libtunnel.NotAllowed) as n:
        d.dial(f"127.0.0.1:{free_port()}")
    assert n.value.code == "NOT_ALLOWED"
    with libtunnel.Dialer(quic_relay.quic, key=key, timeout=10) as d, pytest.raises(libtunnel.TunnelError) as t:
        d.dial(target)
    assert "certificate" in t.value.message, t.value
    with pytest.raises(libtunnel.TunnelError) as c:
        with libtunnel.Dialer(quic_relay.quic, key=key, ca=quic_relay.ca, classic=True, timeout=10) as d:
            d.dial(target)
    assert c.value.code == "INVALID_ARGUMENT" and "ws://" in c.value.message, c.value
    assert os.path.exists(quic_relay.ca)


def test_settings_dict_reads_the_quic_congestion_controller(key: str, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    base = {
        "listen": "127.0.0.1:0",
        "quic_listen": "127.0.0.1:0",
        "tls_cert": str(tmp_path / "cert.pem"),
        "tls_key": str(tmp_path / "key.pem"),
        "auth_keys": libtunnel.auth_keys(key),
        "allow": [{"host": "127.0.0.1", "port": 9}],
    }
    with libtunnel.Server({**base, "quic_congestion": "bbr"}, env=False) as s:
        assert "quic listening: quic://127.0.0.1:" in s.ready_text
    with pytest.raises(libtunnel.ConfigError) as e:
        libtunnel.Server({**base, "quic_congestion": "vegas"}, env=False)
    # Named as the setting the dict gave (`--quic-congestion`, as every override is named), with the choices.
    assert "quic-congestion" in str(e.value) and "bbr" in str(e.value), e.value
    no_cert = {k: v for k, v in base.items() if k not in ("tls_cert", "tls_key")}
    with pytest.raises(libtunnel.ConfigError) as e:
        libtunnel.Server(no_cert, env=False)
    assert "tls_cert" in str(e.value).lower(), e.value
