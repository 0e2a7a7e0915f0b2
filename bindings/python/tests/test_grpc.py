"""gRPC through the relay's public ports: a Node gRPC server (@grpc/grpc-js, tests/grpc_server.js)
behind an h2c listener, called by Python's grpcio through the HTTPS port (a test CA's wildcard
certificate, ALPN h2) and through the plain port (h2c with prior knowledge). Unary, server,
client and bidirectional streaming with 10,000 messages, a 16 MiB message, a status error
whose details and trailers survive, a deadline, and 100 calls in progress at once on one
channel."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trustme

import libtunnel

DOMAIN = "test.example"
SERVER_JS = Path(__file__).with_name("grpc_server.js")
MAX_MESSAGE = 64 << 20


@dataclass
class Target:
    relay: libtunnel.Server
    host: str
    ca_pem: bytes


@pytest.fixture(scope="module")
def node_grpc_server() -> Iterator[int]:
    modules = os.environ.get("LIBTUNNEL_GRPC_NODE_MODULES")
    if not modules:
        pytest.fail("LIBTUNNEL_GRPC_NODE_MODULES is not set: run scripts/test-python.sh, which installs @grpc/grpc-js")
    env = dict(os.environ, NODE_PATH=modules)
    proc = subprocess.Popen(["node", str(SERVER_JS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    line = proc.stdout.readline()
    assert line.startswith("listening "), f"the Node gRPC server did not start: {line!r}"
    yield int(line.split()[1])
    proc.stdin.close()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def target(key: str, node_grpc_server: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    d = tmp_path_factory.mktemp("grpc-pki")
    ca = trustme.CA()
    cert = ca.issue_cert(f"*.{DOMAIN}", DOMAIN)
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    config = {
        "listen": "127.0.0.1:0",
        "http_listen": "127.0.0.1:0",
        "https_listen": "127.0.0.1:0",
        "public_tls_cert": str(d / "cert.pem"),
        "public_tls_key": str(d / "key.pem"),
        "domain": DOMAIN,
        "auth_keys": libtunnel.auth_keys(key),
        "allow": [{"host": "127.0.0.1", "port": 9}],
        "listeners_open": True,
        "drain_timeout": 2,
    }
    relay = libtunnel.Server(config, env=False)
    listener_key = str(d / "listener.pem")
    libtunnel.listener_keygen(listener_key)
    listener = libtunnel.Listener(relay.url, key=listener_key, h2c=True)
    t = threading.Thread(target=listener.forward_to, args=(f"127.0.0.1:{node_grpc_server}",), daemon=True)
    t.start()
    yield Target(relay, f"{listener.name}.{DOMAIN}", ca.cert_pem.bytes())
    listener.close()
    t.join(timeout=10)
    relay.shutdown()


def _channel(target: Target, transport: str) -> grpc.Channel:
    opts = [
        ("grpc.default_authority", target.host),
        ("grpc.enable_http_proxy", 0),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
    ]
    if transport == "tls":
        addr = target.relay.https_address
        assert addr is not None
        creds = grpc.ssl_channel_credentials(root_certificates=target.ca_pem)
        return grpc.secure_channel(f"127.0.0.1:{addr[1]}", creds, options=[*opts, ("grpc.ssl_target_name_override", target.host)])
    addr = target.relay.http_address
    assert addr is not None
    return grpc.insecure_channel(f"127.0.0.1:{addr[1]}", options=opts)


@pytest.fixture(params=["tls", "h2c"])
def channel(request: pytest.FixtureRequest, target: Target) -> Iterator[grpc.Channel]:
    ch = _channel(target, request.param)
    grpc.channel_ready_future(ch).result(timeout=10)
    yield ch
    ch.close()


def _unary(ch: grpc.Channel, name: str) -> grpc.UnaryUnaryMultiCallable:
    return ch.unary_unary(f"/test.Probe/{name}")


def test_unary(channel: grpc.Channel) -> None:
    assert _unary(channel, "Echo")(b"hello through the relay", timeout=10) == b"hello through the relay"


def test_server_streaming_10000_messages(channel: grpc.Channel) -> None:
    got = list(channel.unary_stream("/test.Probe/Count")(b"10000", timeout=60))
    assert got == [str(i).encode() for i in range(10000)]


def test_client_streaming_10000_messages(channel: grpc.Channel) -> None:
    msgs = [f"message {i}".encode() for i in range(10000)]
    answer = channel.stream_unary("/test.Probe/Sum")(iter(msgs), timeout=60)
    assert answer == f"10000 {hashlib.sha256(b''.join(msgs)).hexdigest()}".encode()


def test_bidi_streaming_10000_messages(channel: grpc.Channel) -> None:
    msgs = [f"chat {i}".encode() for i in range(10000)]
    got = list(channel.stream_stream("/test.Probe/Chat")(iter(msgs), timeout=60))
    assert got == msgs


def test_16_mib_message(channel: grpc.Channel) -> None:
    big = os.urandom(16 << 20)
    got = _unary(channel, "Echo")(big, timeout=60)
    assert hashlib.sha256(got).digest() == hashlib.sha256(big).digest()


def test_status_error_keeps_details_and_trailers(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as e:
        _unary(channel, "Fail")(b"x", timeout=10)
    err = e.value
    assert isinstance(err, grpc.Call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "bad probe: x"
    trailers = dict(err.trailing_metadata() or ())
    assert trailers.get("x-why") == "the probe asked for it"


def test_deadline_exceeded(channel: grpc.Channel) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        _unary(channel, "Slow")(b"", timeout=0.5)
    assert isinstance(e.value, grpc.Call)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 4, "the deadline, not the server's 5 s answer, ended the call"


def test_100_concurrent_calls_on_one_connection(channel: grpc.Channel) -> None:
    # The server answers only once 100 Gather calls are in progress together, so all 100 were
    # open at once on this channel's single HTTP/2 connection to the relay.
    gather = _unary(channel, "Gather")
    futures = [gather.future(b"100", timeout=30) for _ in range(100)]
    assert [f.result() for f in futures] == [b"100"] * 100
