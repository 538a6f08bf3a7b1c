"""The benchmark's own services: one PostgreSQL server for the whole run, one fresh broker per
size, and a fresh database per measured path. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped, unused-ignore]
from sqlalchemy.engine import make_url

from bench.statements import AVAILABLE, EXTENSION, RESET, TOP, Statement, grouped
from khala_stream.broker.local_broker import LocalBroker, start_local_broker
from khala_stream.db.engine import create_engine, init_db

__all__ = ["PostgresServer", "fresh_broker", "postgres_server"]

REPO_ROOT = Path(__file__).resolve().parents[1]
POSTGRES_SH = REPO_ROOT / "infra" / "local" / "postgres.sh"

# infra/local/postgres.sh configures a test server (fsync, synchronous_commit and
# full_page_writes off). A benchmark of database writes must pay for durability the way a real
# server does, so these are switched back on (ALTER SYSTEM overrides postgresql.conf).
_DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}


@dataclass(frozen=True, slots=True)
class PostgresServer:
    admin_url: str  # postgresql://postgres@127.0.0.1:PORT/postgres
    directory: Path
    statements: bool = False
    """`pg_stat_statements` is loaded: a step's statements are told apart (bench/statements.py)."""

    @property
    def pid(self) -> int:
        """The postmaster's pid (its CPU time includes every backend it has reaped)."""
        return int((self.directory / "data" / "postmaster.pid").read_text().split()[0])

    def url(self, database: str) -> str:
        """A SQLAlchemy asyncpg URL of one database of this server."""
        url = make_url(self.admin_url).set(drivername="postgresql+asyncpg", database=database)
        return url.render_as_string(hide_password=False)

    def dsn(self, database: str) -> str:
        """A plain libpq/asyncpg DSN of one database of this server."""
        return make_url(self.admin_url).set(database=database).render_as_string(False)

    async def admin(self, *statements: str) -> list[Any]:
        conn = await asyncpg.connect(self.admin_url, timeout=30)
        try:
            return [await conn.fetch(s) for s in statements]
        finally:
            await conn.close()

    def version(self) -> str:
        rows = asyncio.run(self.admin("SHOW server_version"))[0]
        return str(rows[0][0])

    def settings(self) -> dict[str, str]:
        names = ", ".join(f"'{n}'" for n in (*_DURABLE, "shared_buffers", "max_wal_size"))
        rows = asyncio.run(
            self.admin(
                f"SELECT name, current_setting(name) FROM pg_settings WHERE name IN ({names})"
            )
        )[0]
        return {str(r[0]): str(r[1]) for r in rows}

    def create_database(self, prefix: str) -> str:
        """A new empty database with the Laravel and importer tables already created, so no
        measured path pays for DDL."""
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        asyncio.run(self.admin(f'CREATE DATABASE "{name}"'))

        async def init() -> None:
            engine = create_engine(self.url(name))
            try:
                await init_db(engine)
            finally:
                await engine.dispose()

        asyncio.run(init())
        return name

    def drop_database(self, name: str) -> None:
        with contextlib.suppress(Exception):
            asyncio.run(self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def checkpoint(self) -> None:
        """Flush the previous step's dirty pages, so the next step does not pay for them."""
        asyncio.run(self.admin("CHECKPOINT"))

    def reset_statements(self) -> None:
        if self.statements:
            asyncio.run(self.admin(RESET))

    def read_statements(self) -> list[Statement]:
        """The statements run since `reset_statements`, in every database but the admin one."""
        if not self.statements:
            return []
        return grouped(list(asyncio.run(self.admin(TOP))[0]))

    def settle(self, database: str) -> None:
        """Vacuum and analyse `database` now, untimed, so that the autovacuum its writes would
        set off does not run inside the next measured step (a path measured after another
        one would pay for it)."""

        async def vacuum() -> None:
            conn = await asyncpg.connect(self.dsn(database), timeout=30)
            try:
                await conn.execute("VACUUM (ANALYZE)")
            finally:
                await conn.close()

        asyncio.run(vacuum())


def _with_statements(server: PostgresServer) -> PostgresServer:
    """`server` restarted with `pg_stat_statements` preloaded, when it has the module; else as
    it is (a server told to preload a module it lacks would not start)."""
    if not asyncio.run(server.admin(AVAILABLE))[0][0][0]:
        return server
    asyncio.run(server.admin(f"ALTER SYSTEM SET shared_preload_libraries = '{EXTENSION}'"))
    port = str(make_url(server.admin_url).port)
    for step in (("stop", str(server.directory)), ("start", str(server.directory), port)):
        result = _run_postgres_sh(*step)
        if result.returncode != 0:
            raise RuntimeError(f"could not restart PostgreSQL:\n{result.stdout}{result.stderr}")
    asyncio.run(server.admin(f"CREATE EXTENSION IF NOT EXISTS {EXTENSION}"))
    return PostgresServer(admin_url=server.admin_url, directory=server.directory, statements=True)


def _run_postgres_sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(POSTGRES_SH), *args], capture_output=True, text=True, timeout=180, check=False
    )


@contextlib.contextmanager
def postgres_server(*, durable: bool = True, keep: bool = False) -> Iterator[PostgresServer]:
    """Start a PostgreSQL server in a fresh directory under /tmp; stop it after, and delete
    its directory unless `keep`."""
    directory = Path(tempfile.mkdtemp(prefix="khala-bench-pg-", dir="/tmp"))
    result = _run_postgres_sh("start", str(directory))
    urls = [
        line.split("=", 1)[1]
        for line in result.stdout.splitlines()
        if line.startswith("DATABASE_ADMIN_URL=")
    ]
    try:
        if result.returncode != 0 or not urls:
            raise RuntimeError(
                f"could not start PostgreSQL with {POSTGRES_SH} (exit {result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )
        server = PostgresServer(admin_url=urls[0], directory=directory)
        if durable:
            asyncio.run(
                server.admin(
                    *(f"ALTER SYSTEM SET {k} = '{v}'" for k, v in _DURABLE.items()),
                    "SELECT pg_reload_conf()",
                )
            )
        yield _with_statements(server)
    finally:
        _run_postgres_sh("stop", str(directory))
        if not keep:
            shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def fresh_broker() -> Iterator[LocalBroker]:
    """An embedded noida-db broker in its own temp dir, stopped (SIGTERM) and deleted after."""
    directory = Path(tempfile.mkdtemp(prefix="khala-bench-broker-", dir="/tmp"))
    broker = start_local_broker(directory / "data", log_path=directory / "broker.log")
    try:
        yield broker
    finally:
        broker.stop()
        shutil.rmtree(directory, ignore_errors=True)
