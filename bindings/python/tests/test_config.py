"""The client configuration every face shares (the core's ``libtunnel::client``): the bad-input
table of ``tests/fixtures/client_config_cases.json`` (the CLI, Node and C faces run the same
table), and one ``.env`` holding the relay's and the clients' variables that starts ``Server(env=True)``
and configures ``Dialer()`` and ``Listener()`` with no argument at all."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import time
from collections.abc import Iterator

import pytest

import libtunnel

ROOT = pathlib.Path(__file__).resolve().parents[3]
TABLE = json.loads((ROOT / "tests" / "fixtures" / "client_config_cases.json").read_text())


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A working directory of its own and no inherited TUNNEL_* variables."""
    for k in list(os.environ):
        if k.startswith(("TUNNEL_", "EMISSARY_", "LIBTUNNEL_")):
            monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)
    yield tmp_path


@pytest.mark.parametrize("case", TABLE["cases"], ids=[c["name"] for c in TABLE["cases"]])
def test_the_shared_bad_input_table(case: dict[str, str], clean_env: pathlib.Path) -> None:
    listener_key = str(clean_env / "listener.pem")
    libtunnel.listener_keygen(listener_key)
    relay = "ws://127.0.0.1:9"  # nothing listens there, and no case may get as far as connecting
    listener = case["role"] == "listener"
    key = case.get("key", listener_key if listener else TABLE["good_key"])
    timeout = float(case["timeout"]) if "timeout" in case else None
    started = time.monotonic()
    with pytest.raises(libtunnel.TunnelError) as info:
        if listener:
            libtunnel.Listener(relay, key=key, timeout=timeout)
        else:
            libtunnel.Dialer(relay, key=key, timeout=timeout)
    err = info.value
    assert err.code == case["code"], str(err)
    assert isinstance(err, libtunnel.ConfigError) and isinstance(err, ValueError)
    for name in case["names"]:
        assert name in err.message, f"{case['name']}: {err.message!r} names {name!r}"
    assert TABLE["secret"] not in str(err), f"{case['name']}: the secret leaked: {err}"
    assert time.monotonic() - started < 10


def test_missing_values_name_the_variables(clean_env: pathlib.Path) -> None:
    with pytest.raises(libtunnel.ConfigError, match="TUNNEL_RELAY"):
        libtunnel.Dialer()
    with pytest.raises(libtunnel.ConfigError, match="TUNNEL_KEY"):
        libtunnel.Dialer("ws://127.0.0.1:9")
    with pytest.raises(libtunnel.ConfigError, match="TUNNEL_LISTENER_KEY"):
        libtunnel.Listener("ws://127.0.0.1:9")


def test_dial_timeout_is_checked(dialer: libtunnel.Dialer) -> None:
    for bad in (float("nan"), -1.0, 1e30, float("inf")):
        with pytest.raises(libtunnel.ConfigError, match="positive number of seconds"):
            dialer.dial("127.0.0.1:9", timeout=bad)


def test_one_dotenv_serves_the_relay_and_the_clients(clean_env: pathlib.Path, hasher: tuple[str, int]) -> None:
    key = libtunnel.keygen(5)
    listener_key = clean_env / "listener.pem"
    libtunnel.listener_keygen(str(listener_key))
    # Relay and client variables side by side, as in one compose file (the old worker-thread
    # name too: warned about, not refused).
    (clean_env / ".env").write_text(
        "TUNNEL_LISTEN=127.0.0.1:0\n"
        f"TUNNEL_AUTH_KEYS='{libtunnel.auth_keys_json(key)}'\n"
        f"TUNNEL_ALLOW='[{{\"host\":\"127.0.0.1\",\"port\":{hasher[1]}}}]'\n"
        "TUNNEL_LISTENERS_OPEN=true\n"
        f"TUNNEL_KEY={key}\n"
        f"TUNNEL_LISTENER_KEY={listener_key}\n"
        "TUNNEL_CA=\nTUNNEL_TIMEOUT=15\nTUNNEL_MODE=multiplexed\nTUNNEL_WORKER_THREADS=2\nLIBTUNNEL_WORKER_THREADS=2\n"
    )
    with libtunnel.Server(env=True) as relay:
        # The relay's port is only known now: the clients' TUNNEL_RELAY comes from the process
        # environment, which wins over .env as for the relay.
        os.environ["TUNNEL_RELAY"] = relay.url
        try:
            with libtunnel.Dialer() as d:
                payload = os.urandom(300_000)
                with d.dial(f"127.0.0.1:{hasher[1]}") as s:
                    s.sendall(payload)
                    s.shutdown(1)
                    back = b""
                    while chunk := s.recv(65536):
                        back += chunk
                assert back == hashlib.sha256(payload).digest()
            with libtunnel.Listener() as listener:
                assert listener.name == libtunnel.listener_identity(str(listener_key))[0]
        finally:
            del os.environ["TUNNEL_RELAY"]
