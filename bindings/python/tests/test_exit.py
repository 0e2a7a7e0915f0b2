"""Exit listeners from Python: a relay whose own allowlist does not admit the PostgreSQL port, an
exit listener (``Listener(exit=...)``) whose allowlist does, and a migration through
``Dialer.forward(..., via=NAME)`` writing and reading back 10,000 rows with psycopg. Also the
refusals, each with its exception class: outside the exit's rules, a key the relay does not let
use the exit, and the database without ``via`` (the relay's allowlist)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

import libtunnel


@dataclass
class ExitSetup:
    url: str
    key: str
    other_key: str
    exit_name: str
    listener: libtunnel.Listener


@pytest.fixture
def exit_setup(tmp_path: object, postgres: object, echo: tuple[str, int]) -> Iterator[ExitSetup]:
    key, other = libtunnel.keygen(21), libtunnel.keygen(22)
    key_file = os.path.join(str(tmp_path), "exit.pem")
    name, _ = libtunnel.listener_keygen(key_file)
    config = {
        "listen": "127.0.0.1:0",
        "auth_keys": libtunnel.auth_keys(key, other),
        # The relay itself may reach only the echo server, never the database.
        "allow": [{"host": "127.0.0.1", "port": echo[1]}],
        "listeners_open": True,
        "exits": [{"name": name, "key_ids": [21]}],
        "drain_timeout": 2,
    }
    relay = libtunnel.Server(config, env=False)
    exit_rules = [{"host": "127.0.0.1", "port": postgres.port}]  # type: ignore[attr-defined]
    # It serves nothing itself: exit_only, so a dial to its name is refused, not swallowed.
    listener = libtunnel.Listener(relay.url, key=key_file, exit=exit_rules, exit_only=True, timeout=10)
    try:
        yield ExitSetup(relay.url, key, other, name, listener)
    finally:
        listener.close()
        relay.shutdown()


ROWS = [(i, f"row-{i:05d}") for i in range(10_000)]


def test_psycopg_migration_through_an_exit_listener(exit_setup: ExitSetup, postgres: object) -> None:
    import psycopg

    pg = postgres
    with libtunnel.Dialer(exit_setup.url, key=exit_setup.key, timeout=10) as d:
        with d.forward(pg.target, via=exit_setup.exit_name) as (host, port):  # type: ignore[attr-defined]
            with psycopg.connect(
                host=host, port=port, user=pg.user, password=pg.password, dbname=pg.database, connect_timeout=10  # type: ignore[attr-defined]
            ) as conn:
                with conn.transaction():
                    conn.execute("DROP TABLE IF EXISTS via_exit")
                    conn.execute("CREATE TABLE via_exit (id integer PRIMARY KEY, label text NOT NULL)")
                    with conn.cursor() as cur:
                        cur.executemany("INSERT INTO via_exit (id, label) VALUES (%s, %s)", ROWS)
                got = conn.execute("SELECT id, label FROM via_exit ORDER BY id").fetchall()
    assert got == ROWS
    # The exit counts a connection's bytes when it has finished closing, just after the client's.
    deadline = time.monotonic() + 10
    while True:
        stats = exit_setup.listener.exit_stats
        assert stats is not None and stats.connected == 1, stats
        if stats.bytes_to_targets > 100_000 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert stats.bytes_to_targets > 100_000 and stats.bytes_from_targets > 100_000, stats


def test_refusals_keep_their_codes(exit_setup: ExitSetup, postgres: object, echo: tuple[str, int]) -> None:
    pg = postgres
    with libtunnel.Dialer(exit_setup.url, key=exit_setup.key, timeout=10) as d:
        # Without via, the database meets the relay's allowlist.
        with pytest.raises(libtunnel.NotAllowed) as info:
            d.dial(pg.target)  # type: ignore[attr-defined]
        assert "TUNNEL_ALLOW" in info.value.message
        # Through the exit, a target outside the exit's rules (the echo server the relay allows).
        before = exit_setup.listener.exit_stats
        with pytest.raises(libtunnel.NotAllowed) as info:
            d.dial(f"127.0.0.1:{echo[1]}", via=exit_setup.exit_name)
        assert exit_setup.exit_name in info.value.message and info.value.code == "NOT_ALLOWED"
        after = exit_setup.listener.exit_stats
        assert before is not None and after is not None and after.not_allowed == before.not_allowed + 1
        # Other spellings of the host that are not the admitted 127.0.0.1 (IPv6 loopback, the
        # unspecified address): refused as the relay refuses them.
        for host in ("[::1]", "0.0.0.0", "[::ffff:0.0.0.0]"):
            with pytest.raises(libtunnel.NotAllowed):
                d.dial(f"{host}:{pg.port}", via=exit_setup.exit_name)  # type: ignore[attr-defined]
        # The exit's own name: it exposes no service (exit_only), so NOT_ALLOWED naming why.
        with pytest.raises(libtunnel.NotAllowed) as info:
            d.dial(f"{exit_setup.exit_name}:0")
        assert "exposes no service" in info.value.message
        # The options' rules are the core's, the same in every face.
        with pytest.raises(libtunnel.ConfigError) as bad:
            libtunnel.Listener(exit_setup.url, key=os.devnull, exit_only=True)
        assert bad.value.code == "INVALID_ARGUMENT" and "exit" in bad.value.message
    # A key the relay does not let use the exit: refused by the relay, the exit never sees it.
    with libtunnel.Dialer(exit_setup.url, key=exit_setup.other_key, timeout=10) as d:
        before = exit_setup.listener.exit_stats
        with pytest.raises(libtunnel.NotAllowed) as info:
            d.dial(pg.target, via=exit_setup.exit_name)  # type: ignore[attr-defined]
        assert "TUNNEL_EXITS" in info.value.message
        assert exit_setup.listener.exit_stats == before
