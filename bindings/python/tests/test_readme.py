"""Every ```python block of every README, run as pasted (only the placeholders a reader fills in
replaced, by ``scripts/readme_blocks.py``'s table) as its own ``python`` process against the test
relay and a real PostgreSQL holding the README's ``app`` database: exit 0 and nothing on stderr.

The blocks that open a tunnel run 20 times each, and so does the minimal form of issue 28's exit:
a panic on a libtunnel thread while the interpreter finalised (``The Python interpreter is not
initialized``) showed on stderr in about half of such runs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[3]
RUNS = 20


def _harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("readme_blocks", ROOT / "scripts" / "readme_blocks.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["readme_blocks"] = mod  # dataclasses look the module up by name
    spec.loader.exec_module(mod)
    return mod


readme_blocks = _harness()
# Blocks marked `not run` name the test that covers them instead.
BLOCKS = [b for b in readme_blocks.code_blocks("python") if not b.mark.startswith("not run: ")]

# The README's database: role and database `app`, password `…` (the README's text, as it is).
APP_PASSWORD = "…"


@pytest.fixture(scope="module")
def app_db(postgres: object) -> Iterator[str]:
    """`app` as the README names it; yields the database's ``host:port`` as the relay sees it."""
    pg = postgres
    admin = dict(host=pg.host, port=pg.port, user=pg.user, password=pg.password, dbname=pg.database, autocommit=True)  # type: ignore[attr-defined]
    with psycopg.connect(**admin) as conn:  # type: ignore[arg-type]
        conn.execute("DROP DATABASE IF EXISTS app")
        conn.execute("DROP ROLE IF EXISTS app")
        conn.execute(f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'")
        conn.execute("CREATE DATABASE app OWNER app")
    yield pg.target  # type: ignore[attr-defined]


def _reset_table(postgres: object) -> None:
    """The migration block creates and fills `t`; every run starts without it, so every run
    migrates (and the blocks that read `t` find the 10,000 rows the migration left)."""
    pg = postgres
    with psycopg.connect(host=pg.host, port=pg.port, user="app", password=APP_PASSWORD, dbname="app", autocommit=True) as conn:  # type: ignore[attr-defined]
        conn.execute("DROP TABLE IF EXISTS t")


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNNEL_", "PG"))}
    env["PGPASSWORD"] = APP_PASSWORD  # what libpq reads when a block gives no password
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def _check(r: subprocess.CompletedProcess[str], what: str, run: int) -> None:
    assert r.returncode == 0 and r.stderr == "", f"{what}, run {run + 1} of {RUNS}: exit {r.returncode}\n--- stderr:\n{r.stderr}--- stdout:\n{r.stdout}"


def _migration_first() -> list[object]:
    """The migration blocks (they create `t`) before the blocks that read it."""
    return sorted(BLOCKS, key=lambda b: "CREATE TABLE" not in b.text)


def test_every_readme_has_its_python_blocks() -> None:
    where = {b.readme.relative_to(ROOT).as_posix() for b in BLOCKS}
    assert {"README.md", "bindings/python/README.md"} <= where, where


@pytest.mark.timeout(900)
@pytest.mark.parametrize("block", _migration_first(), ids=lambda b: b.where)
def test_readme_block_runs_as_pasted(block: object, relay: object, app_db: str, postgres: object, tmp_path: Path) -> None:
    code = readme_blocks.fill(block.text, relay=relay.url, key=relay.key, db=app_db)  # type: ignore[attr-defined]
    tunnels = "db.internal:5432" in block.text  # type: ignore[attr-defined]
    for run in range(RUNS if tunnels else 1):
        if "CREATE TABLE" in code:
            _reset_table(postgres)
        _check(_run(code, tmp_path), block.where, run)  # type: ignore[attr-defined]


@pytest.mark.timeout(300)
def test_exit_right_after_a_forward_is_quiet(relay: object, hasher: tuple[str, int], tmp_path: Path) -> None:
    """Issue 28's minimal form: a forward, one connection, exit. Nothing may run on a libtunnel
    thread against the interpreter once it finalises (the log bridge logged the connection's end
    from the runtime while `atexit` had run)."""
    code = textwrap.dedent(
        f"""
        import socket, libtunnel
        dialer = libtunnel.Dialer({relay.url!r}, key={relay.key!r})
        with dialer.forward("127.0.0.1:{hasher[1]}") as (host, port):
            socket.create_connection((host, port)).close()
        """  # type: ignore[attr-defined]
    )
    for run in range(RUNS):
        _check(_run(code, tmp_path), "Dialer.forward, one connection, exit", run)
