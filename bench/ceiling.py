"""The ceiling: plain COPY of the same rows into the empty tables, nothing else.

    python -m bench.ceiling EXPORT.zip DATABASE_DSN

First (not timed) the rows of `bench.direct.derive_rows` are written to one file per table in
PostgreSQL's text COPY format, in a temp dir. Then (timed) each file is streamed with
`COPY <table> (…) FROM STDIN` (asyncpg `copy_to_table`), one table after the other, each in
its own transaction, into the tables as the schema makes them (indexes included). No parsing,
no mapping, no conflict handling, no staging: the fastest these rows can enter the database
from a client.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import orjson

from bench.direct import derive_rows, row_columns
from khala_stream.config import DEFAULT_L402_HOSTS
from khala_stream.contract.codec import dumps_text
from khala_stream.db.laravel_tables import boolean_columns, json_columns
from processors.autopilots import parse_allowed_hosts

__all__ = ["copy_files", "main", "write_copy_files"]

_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _field(value: Any, *, is_json: bool, is_bool: bool) -> str:
    if value is None:
        return "\\N"
    if is_json:
        return dumps_text(value).translate(_ESCAPES)
    if is_bool:
        return "t" if value else "f"
    return str(value).translate(_ESCAPES)


def write_copy_files(
    export: Path, directory: Path, allowed_hosts: list[str]
) -> dict[str, tuple[Path, tuple[str, ...], int]]:
    """One text-format COPY file per table: {table: (file, columns, rows)}."""
    files: dict[str, tuple[Path, tuple[str, ...], int]] = {}
    handles: dict[str, IO[str]] = {}
    try:
        for table, row in derive_rows(export, allowed_hosts=allowed_hosts):
            if table not in files:
                path = directory / f"{table}.copy"
                files[table] = (path, row_columns(table, row), 0)
                handles[table] = path.open("w", encoding="utf-8", newline="\n")
            path, columns, n = files[table]
            json_cols, bool_cols = json_columns(table), boolean_columns(table)
            handles[table].write(
                "\t".join(
                    _field(row[c], is_json=c in json_cols, is_bool=c in bool_cols) for c in columns
                )
                + "\n"
            )
            files[table] = (path, columns, n + 1)
    finally:
        for handle in handles.values():
            handle.close()
    return files


async def copy_files(dsn: str, files: dict[str, tuple[Path, tuple[str, ...], int]]) -> float:
    """COPY every file into its table; returns the seconds spent in COPY."""
    import asyncpg  # type: ignore[import-untyped, unused-ignore]

    conn = await asyncpg.connect(dsn)
    try:
        began = time.perf_counter()
        for table, (path, columns, _) in files.items():
            await conn.copy_to_table(table, source=str(path), columns=list(columns), format="text")
        return time.perf_counter() - began
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__)
    parser.add_argument("export", type=Path)
    parser.add_argument("dsn", help="postgresql://… of an empty database with the tables")
    args = parser.parse_args(argv)
    hosts = parse_allowed_hosts(DEFAULT_L402_HOSTS)
    dsn = args.dsn.replace("postgresql+asyncpg://", "postgresql://", 1)
    with tempfile.TemporaryDirectory(prefix="khala-bench-copy-", dir="/tmp") as tmp:
        began = time.perf_counter()
        files = write_copy_files(args.export, Path(tmp), hosts)
        prepared = time.perf_counter() - began
        seconds = asyncio.run(copy_files(dsn, files))
        size = sum(path.stat().st_size for path, _, _ in files.values())
    result = {
        "seconds": seconds,
        "prepare_seconds": prepared,
        "copy_bytes": size,
        "rows": {table: n for table, (_, _, n) in files.items()},
    }
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
