"""End-to-end encryption from Python: an ``e2e`` listener admitting one dialer key, an ``e2e``
dialer presenting it, 8 MiB dialed by name both ways (hashed, half-closed); the peer names the
dialer; a dialer without the key gets :class:`libtunnel.E2ERefused`, an unpinned chosen name
:class:`libtunnel.E2EIdentityError`."""

from __future__ import annotations

import hashlib
import os
import socket
import threading

import pytest

import libtunnel

SIZE = 8 << 20


def _data(seed: int) -> bytes:
    return hashlib.sha256(b"%d" % seed).digest() * (SIZE // 32)


def test_e2e_dial_by_name_hashed_both_ways(relay: object, tmp_path: object) -> None:
    url, key = relay.url, relay.key  # type: ignore[attr-defined]
    dialer_key = os.path.join(str(tmp_path), "dialer.pem")
    dialer_name, dialer_public = libtunnel.listener_keygen(dialer_key)
    listener_key = os.path.join(str(tmp_path), "listener.pem")
    libtunnel.listener_keygen(listener_key)
    up, down = _data(1), _data(2)
    with libtunnel.Listener(url, key=listener_key, e2e=True, allow_peers=[dialer_public]) as listener:
        served: dict[str, object] = {}

        def serve() -> None:
            sock, peer = listener.accept(timeout=10)
            served["peer"] = peer
            with sock:
                sock.settimeout(30)
                sender = threading.Thread(target=lambda: (sock.sendall(down), sock.shutdown(socket.SHUT_WR)))
                sender.start()
                h = hashlib.sha256()
                while chunk := sock.recv(1 << 20):
                    h.update(chunk)
                served["up"] = h.hexdigest()
                sender.join(30)

        t = threading.Thread(target=serve)
        t.start()
        with libtunnel.Dialer(url, key=key, timeout=10, e2e=True, e2e_identity=dialer_key) as d:
            with d.dial(f"{listener.name}:0") as client:
                client.settimeout(30)
                writer = threading.Thread(target=lambda: (client.sendall(up), client.shutdown(socket.SHUT_WR)))
                writer.start()
                h = hashlib.sha256()
                while chunk := client.recv(1 << 20):
                    h.update(chunk)
                writer.join(30)
                # The listener's side must read everything before the dialer (and its session)
                # closes: bytes still in flight would be cut off.
                t.join(30)
        assert not t.is_alive()
        assert h.hexdigest() == hashlib.sha256(down).hexdigest(), "the dialer read the listener's bytes intact"
        assert served["up"] == hashlib.sha256(up).hexdigest(), "the listener's side read the dialer's bytes in plaintext, intact"
        peer = served["peer"]
        assert isinstance(peer, libtunnel.PeerInfo) and peer.e2e and peer.dialer_name == dialer_name

        with libtunnel.Dialer(url, key=key, timeout=10, e2e=True) as keyless:
            with pytest.raises(libtunnel.E2ERefused) as refused:
                keyless.dial(f"{listener.name}:0")
            assert refused.value.code == "E2E_REFUSED" and "identity" in refused.value.message
            with pytest.raises(libtunnel.E2EIdentityError) as unpinned:
                keyless.dial("api:0")
            assert unpinned.value.code == "E2E_IDENTITY" and "api=" in unpinned.value.message
            assert isinstance(unpinned.value, libtunnel.E2EError)
