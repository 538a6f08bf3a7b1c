"""Running the CLI as a person would (a subprocess) and reading the database it wrote."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from khala_stream.contract.tables import DESTINATION_TABLES
from khala_stream.db.engine import create_engine
from khala_stream.db.laravel_tables import TABLES

LARAVEL_TABLES = DESTINATION_TABLES
_COUNTER = re.compile(r"^  ([a-z_]+):\s+(\d+)$")


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def counters(self) -> dict[str, int]:
        """The 22 `  key: value` lines of the reference summary, in order."""
        found: dict[str, int] = {}
        in_summary = False
        for line in self.stdout.splitlines():
            if line == "Khala chat import summary:":
                in_summary = True
                continue
            match = _COUNTER.match(line)
            if in_summary and match:
                found[match.group(1)] = int(match.group(2))
            elif in_summary and found:
                break
        return found


def khala(
    args: Sequence[str], env: dict[str, str], *, cwd: Path | None = None, timeout: float = 180
) -> CliResult:
    done = subprocess.run(
        [sys.executable, "-m", "khala_app", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return CliResult(done.returncode, done.stdout, done.stderr)


def ok(result: CliResult) -> CliResult:
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.stdout}\n{result.stderr}"
    return result


def env_for(kafka_bootstrap: str, topic_prefix: str, db_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKOS_", "KAFKA_", "KHALA_"))}
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
        KHALA_TOPIC_PREFIX=topic_prefix,
        DATABASE_URL=db_url,
        **extra,
    )
    return env


def run_db(db_url: str, statements: Sequence[Any]) -> list[list[sa.Row[Any]]]:
    async def go() -> list[list[sa.Row[Any]]]:
        engine = create_engine(db_url)
        try:
            results = []
            async with engine.begin() as conn:
                for stmt in statements:
                    result = await conn.execute(stmt)
                    results.append(list(result.all()) if result.returns_rows else [])
            return results
        finally:
            await engine.dispose()

    return asyncio.run(go())


def rows(db_url: str, table: str, order_by: str = "id") -> list[dict[str, Any]]:
    t = TABLES[table]
    (found,) = run_db(db_url, [sa.select(t).order_by(t.c[order_by])])
    return [dict(r._mapping) for r in found]


def counts(db_url: str, tables: Sequence[str] = LARAVEL_TABLES) -> dict[str, int]:
    async def go() -> dict[str, int]:
        engine = create_engine(db_url)
        try:
            async with engine.connect() as conn:
                names = set(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))
                out = {}
                for table in tables:
                    if table in names:
                        out[table] = int(
                            await conn.scalar(sa.text(f"SELECT count(*) FROM {table}")) or 0
                        )
                    else:
                        out[table] = 0
                return out
        finally:
            await engine.dispose()

    return asyncio.run(go())


def versions(db_url: str) -> dict[str, list[tuple[Any, Any]]]:
    """PostgreSQL's system version (xmin) of every row: it moves on any INSERT or UPDATE."""
    out: dict[str, list[tuple[Any, Any]]] = {}
    for table in LARAVEL_TABLES:
        key = "autopilot_id" if table in ("autopilot_profiles", "autopilot_policies") else "id"
        (found,) = run_db(
            db_url, [sa.text(f"SELECT {key}::text, xmin::text FROM {table} ORDER BY 1")]
        )
        out[table] = [tuple(r) for r in found]
    return out


def json_value(value: Any) -> Any:
    import orjson

    return orjson.loads(value) if isinstance(value, str | bytes) else value
