"""TLS passthrough by SNI: a Python ssl server with its own certificate (its own CA, its own name)
behind ``Listener(tls_passthrough=True)``; a Python ssl client reaches it through the relay's
public HTTPS port and verifies the service's certificate, not the relay's (the relay's wildcard
certificate comes from another CA, which the client does not trust for this name). A name that
is not a passthrough listener still gets the relay's certificate on the same port."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import trustme

import libtunnel

DOMAIN = "test.example"


@dataclass
class Setup:
    relay: libtunnel.Server
    relay_ca: trustme.CA
    service_ca: trustme.CA
    name: str


def _tls_echo_server(ctx: ssl.SSLContext) -> tuple[socket.socket, threading.Thread]:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                raw, _ = srv.accept()
            except OSError:
                return
            with raw:
                try:
                    with ctx.wrap_socket(raw, server_side=True) as tls:
                        data = tls.recv(65536)
                        tls.sendall(b"service saw: " + data)
                except (OSError, ssl.SSLError):
                    continue

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t


@pytest.fixture(scope="module")
def setup(key: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    d = tmp_path_factory.mktemp("passthrough")
    relay_ca = trustme.CA()
    relay_cert = relay_ca.issue_cert(f"*.{DOMAIN}", DOMAIN)
    relay_cert.cert_chain_pems[0].write_to_path(str(d / "relay.pem"))
    relay_cert.private_key_pem.write_to_path(str(d / "relay.key"))
    relay = libtunnel.Server(
        {
            "listen": "127.0.0.1:0",
            "https_listen": "127.0.0.1:0",
            "public_tls_cert": str(d / "relay.pem"),
            "public_tls_key": str(d / "relay.key"),
            "domain": DOMAIN,
            "auth_keys": libtunnel.auth_keys(key),
            "allow": [{"host": "127.0.0.1", "port": 9}],
            "listeners_open": True,
            "drain_timeout": 2,
        },
        env=False,
    )
    listener_key = str(d / "listener.pem")
    name, _ = libtunnel.listener_keygen(listener_key)
    service_ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    service_ca.issue_cert(f"{name}.{DOMAIN}").configure_cert(ctx)
    srv, t = _tls_echo_server(ctx)
    listener = libtunnel.Listener(relay.url, key=listener_key, tls_passthrough=True)
    assert listener.name == name
    lt = threading.Thread(target=listener.forward_to, args=(f"127.0.0.1:{srv.getsockname()[1]}",), daemon=True)
    lt.start()
    yield Setup(relay, relay_ca, service_ca, name)
    listener.close()
    srv.close()
    lt.join(timeout=10)
    relay.shutdown()


def _connect(s: Setup, ca: trustme.CA, host: str) -> ssl.SSLSocket:
    addr = s.relay.https_address
    assert addr is not None
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    raw = socket.create_connection(("127.0.0.1", addr[1]), timeout=10)
    return ctx.wrap_socket(raw, server_hostname=host)


def test_client_verifies_the_services_own_certificate(setup: Setup) -> None:
    host = f"{setup.name}.{DOMAIN}"
    with _connect(setup, setup.service_ca, host) as tls:
        cert = tls.getpeercert()
        assert cert is not None
        assert ("DNS", host) in cert.get("subjectAltName", ())
        tls.sendall(b"hello, end to end")
        assert tls.recv(65536) == b"service saw: hello, end to end"


def test_the_relays_ca_does_not_vouch_for_a_passthrough_name(setup: Setup) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        _connect(setup, setup.relay_ca, f"{setup.name}.{DOMAIN}")


def test_other_names_get_the_relays_certificate(setup: Setup) -> None:
    # No listener has this name: the relay terminates TLS with its wildcard and answers 502.
    with _connect(setup, setup.relay_ca, f"nobody.{DOMAIN}") as tls:
        tls.sendall(f"GET / HTTP/1.1\r\nHost: nobody.{DOMAIN}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 502"), answer[:200]
