"""The migration-script story against a real PostgreSQL reachable only through the relay:
psycopg through ``Dialer.forward``, pg8000 through ``dial``, asyncpg through ``AsyncDialer``,
each migrating 10,000 rows; then the example script end to end, as a user would run it."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import libtunnel

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "python"


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("migrate_example", EXAMPLES / "migrate.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def migrate(postgres: object, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.setenv("DB_TARGET", postgres.target)  # type: ignore[attr-defined]
    monkeypatch.setenv("PGUSER", postgres.user)  # type: ignore[attr-defined]
    monkeypatch.setenv("PGPASSWORD", postgres.password)  # type: ignore[attr-defined]
    monkeypatch.setenv("PGDATABASE", postgres.database)  # type: ignore[attr-defined]
    return _load_example()


def test_psycopg_through_forward(migrate: ModuleType, dialer: libtunnel.Dialer) -> None:
    assert migrate.migrate_psycopg(dialer) == 10_000


def test_pg8000_through_dial(migrate: ModuleType, dialer: libtunnel.Dialer) -> None:
    assert migrate.migrate_pg8000(dialer) == 10_000


def test_asyncpg_through_async_forward(migrate: ModuleType, relay: object) -> None:
    d = libtunnel.AsyncDialer(relay.url, key=relay.key)  # type: ignore[attr-defined]
    assert asyncio.run(migrate.migrate_asyncpg(d)) == 10_000


def test_database_port_outside_allowlist(
    postgres: object, dialer: libtunnel.Dialer, echo: tuple[str, int], hasher: tuple[str, int]
) -> None:
    allowed = {postgres.port, echo[1], hasher[1]}  # type: ignore[attr-defined]
    port = next(p for p in range(postgres.port + 1, 65536) if p not in allowed)  # type: ignore[attr-defined]
    with pytest.raises(libtunnel.NotAllowed) as info:
        dialer.dial(f"127.0.0.1:{port}")
    assert f"127.0.0.1:{port}" in info.value.message


def test_example_script_end_to_end(postgres: object, relay: object) -> None:
    env = dict(
        os.environ,
        TUNNEL_RELAY=relay.url,  # type: ignore[attr-defined]
        TUNNEL_KEY=relay.key,  # type: ignore[attr-defined]
        DB_TARGET=postgres.target,  # type: ignore[attr-defined]
        PGUSER=postgres.user,  # type: ignore[attr-defined]
        PGPASSWORD=postgres.password,  # type: ignore[attr-defined]
        PGDATABASE=postgres.database,  # type: ignore[attr-defined]
    )
    out = subprocess.run([sys.executable, str(EXAMPLES / "migrate.py")], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("10000 rows migrated and verified") == 3, out.stdout
