"""A database migration through a libtunnel relay: the PostgreSQL server is private (only the
relay can reach it), and this script opens it three ways:

1. psycopg (3.x) through ``Dialer.forward``: a local port any driver can use;
2. pg8000 (pure Python) through ``Dialer.dial``: the driver talks over the tunnel socket itself;
3. asyncpg through ``AsyncDialer.forward``.

Each runs the same migration: create a table, insert 10,000 rows in one transaction, read them
back and compare.

Configuration (environment): TUNNEL_RELAY and TUNNEL_KEY (from ``python -m libtunnel keygen``),
DB_TARGET (``host:port`` as the relay sees the database, e.g. ``db.internal:5432``), and the usual
PGUSER, PGPASSWORD, PGDATABASE.

    python examples/python/migrate.py
"""

from __future__ import annotations

import asyncio
import os
import sys

import libtunnel

ROWS = 10_000


def rows(tag: str) -> list[tuple[int, str]]:
    return [(i, f"{tag}-row-{i}") for i in range(ROWS)]


def settings() -> tuple[str, str, str, str]:
    env = os.environ
    return env["DB_TARGET"], env.get("PGUSER", "postgres"), env.get("PGPASSWORD", ""), env.get("PGDATABASE", "postgres")


def migrate_psycopg(dialer: libtunnel.Dialer, table: str = "migration_psycopg") -> int:
    """psycopg through a local port forward."""
    import psycopg

    target, user, password, db = settings()
    with dialer.forward(target) as (host, port):
        with psycopg.connect(host=host, port=port, user=user, password=password, dbname=db, connect_timeout=10) as conn:
            with conn.transaction():
                conn.execute(f"DROP TABLE IF EXISTS {table}")
                conn.execute(f"CREATE TABLE {table} (id integer PRIMARY KEY, label text NOT NULL)")
                with conn.cursor() as cur:
                    cur.executemany(f"INSERT INTO {table} (id, label) VALUES (%s, %s)", rows("psycopg"))
            got = conn.execute(f"SELECT id, label FROM {table} ORDER BY id").fetchall()
    if got != rows("psycopg"):
        raise SystemExit(f"psycopg: read back {len(got)} rows that differ from what was written")
    return len(got)


def migrate_pg8000(dialer: libtunnel.Dialer, table: str = "migration_pg8000") -> int:
    """pg8000 straight over the tunnel socket (no local port at all)."""
    import pg8000.native

    target, user, password, db = settings()
    sock = dialer.dial(target)
    conn = pg8000.native.Connection(user, password=password, database=db, sock=sock, timeout=30)
    try:
        conn.run("START TRANSACTION")
        conn.run(f"DROP TABLE IF EXISTS {table}")
        conn.run(f"CREATE TABLE {table} (id integer PRIMARY KEY, label text NOT NULL)")
        conn.run(
            f"INSERT INTO {table} (id, label) SELECT * FROM unnest(CAST(:ids AS integer[]), CAST(:labels AS text[]))",
            ids=[r[0] for r in rows("pg8000")],
            labels=[r[1] for r in rows("pg8000")],
        )
        conn.run("COMMIT")
        got = [tuple(r) for r in conn.run(f"SELECT id, label FROM {table} ORDER BY id")]
    finally:
        conn.close()
    if got != rows("pg8000"):
        raise SystemExit(f"pg8000: read back {len(got)} rows that differ from what was written")
    return len(got)


async def migrate_asyncpg(dialer: libtunnel.AsyncDialer, table: str = "migration_asyncpg") -> int:
    """asyncpg through an asyncio port forward."""
    import asyncpg

    target, user, password, db = settings()
    async with dialer.forward(target) as (host, port):
        conn = await asyncpg.connect(host=host, port=port, user=user, password=password, database=db, timeout=10)
        try:
            async with conn.transaction():
                await conn.execute(f"DROP TABLE IF EXISTS {table}")
                await conn.execute(f"CREATE TABLE {table} (id integer PRIMARY KEY, label text NOT NULL)")
                await conn.copy_records_to_table(table, records=rows("asyncpg"), columns=["id", "label"])
            got = [tuple(r) for r in await conn.fetch(f"SELECT id, label FROM {table} ORDER BY id")]
        finally:
            await conn.close()
    if got != rows("asyncpg"):
        raise SystemExit(f"asyncpg: read back {len(got)} rows that differ from what was written")
    return len(got)


def main() -> int:
    try:
        with libtunnel.Dialer(timeout=20) as dialer:  # TUNNEL_RELAY, TUNNEL_KEY
            print(f"psycopg via forward: {migrate_psycopg(dialer)} rows migrated and verified")
            print(f"pg8000 via dial: {migrate_pg8000(dialer)} rows migrated and verified")
        print(f"asyncpg via AsyncDialer.forward: {asyncio.run(migrate_asyncpg(libtunnel.AsyncDialer(timeout=20)))} rows migrated and verified")
    except libtunnel.TunnelError as e:
        print(f"error [{e.code}]: {e.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
