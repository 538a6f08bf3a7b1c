"""The direct path (the baseline): one process, no Kafka, no document store, no ledger.

    python -m bench.direct EXPORT.zip DATABASE_DSN [--batch 5000]

It reads the ZIP with `zipfile` + orjson, maps documents to rows with the product's own pure
policy functions (`processors/linkage.py`, `autopilots.py`, `fields.py`, `text.py`), in the
reference's phase order, and upserts them with asyncpg: binary COPY into a temporary staging
table, then `INSERT … SELECT … ON CONFLICT (pk) DO UPDATE`, one transaction per batch of
`--batch` rows of a table. Parsing and writing overlap: a writer task drains a small queue of
batches while the reader keeps parsing (one batch in flight), so the baseline is what a plain
single-process importer could reasonably reach, not a strawman.

Simplifications against the product (none of them matters on the generator's exports, which
is what the benchmark feeds it; the harness checks that both paths leave the same rows):

- identities: one user per Khala user id (the `users` table first, then thread owners, in
  file order), with the export email when valid, else the placeholder, and the reference's
  in-batch uniqueness loop; no WorkOS, and no look-up of existing users (the database is
  empty). User ids are 1, 2, … in that order, as the product reserves them on an empty database;
- duplicate document keys are not collapsed (the generator writes none without edge cases);
- a fresh autopilot per owner (config_version 2, handle `autopilot-<user id>`), as on an empty
  database; nothing is compared with earlier rows, and nothing is recorded for a re-import.

`derive_rows` is also what the ceiling (`bench/ceiling.py`) copies.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson

from khala_stream.config import DEFAULT_L402_HOSTS
from khala_stream.contract.codec import dumps_text
from khala_stream.contract.documents import string_field
from khala_stream.contract.tables import DestinationTable
from khala_stream.db.laravel_tables import (
    TABLES,
    boolean_columns,
    json_columns,
    primary_key,
    timestamp_columns,
)
from processors.autopilots import (
    Blueprint,
    autopilot_id_for,
    extract_blueprint,
    parse_allowed_hosts,
    policy_payload,
    profile_payload,
)
from processors.fields import CREATED_CHAIN, first_usable_ms, now_timestamp, to_timestamp
from processors.linkage import (
    Owner,
    default_title,
    event_row,
    message_keys,
    message_rows,
    run_keys,
    run_row,
    thread_rows,
    title_candidate,
    title_from,
)
from processors.text import (
    gravatar_url,
    is_valid_email,
    limit,
    normalise_email,
    normalise_handle,
    placeholder_email,
)

__all__ = ["Row", "derive_rows", "main", "read_table", "row_columns", "run"]

Row = dict[str, Any]
_CHUNK: Final = 1 << 20
_DOCUMENT_FILE: Final = "documents.jsonl"
_YIELD_EVERY: Final = 256  # rows between two chances for the writer task to run


# --------------------------------------------------------------------------- reading


def table_entries(archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """`<…>/<table>/documents.jsonl` entries by table; a later entry wins (reference §1.1)."""
    found: dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        parts = info.filename.strip("/").split("/")
        if len(parts) >= 2 and parts[-1] == _DOCUMENT_FILE and parts[-2]:
            found[parts[-2]] = info
    return found


def read_table(archive: zipfile.ZipFile, info: zipfile.ZipInfo | None) -> Iterator[dict[str, Any]]:
    """The JSON objects of one entry, in file order; other lines are skipped."""
    for line in table_lines(archive, info):
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(value, dict):
            yield value


def table_lines(archive: zipfile.ZipFile, info: zipfile.ZipInfo | None) -> Iterator[bytes]:
    """The non-blank lines of one entry, in file order, as they are."""
    if info is None:
        return
    with archive.open(info) as stream:
        rest = b""
        while chunk := stream.read(_CHUNK):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            yield from (line for line in lines if line.strip())
        if rest.strip():
            yield rest


def _snapshot_ms(entries: dict[str, zipfile.ZipInfo]) -> int:
    """The newest entry time, as the product's reader computes `snapshot_ms`."""
    times = []
    for info in entries.values():
        try:
            times.append(int(datetime(*info.date_time, tzinfo=UTC).timestamp() * 1000))
        except (ValueError, OverflowError):
            continue
    return max(times, default=0)


# --------------------------------------------------------------------------- mapping


def derive_rows(path: Path, *, allowed_hosts: list[str]) -> Iterator[tuple[DestinationTable, Row]]:
    """Every destination row of the export, phase by phase (reference §3), as plain values
    (timestamps as `YYYY-MM-DD HH:MM:SS` text, JSON columns as Python values)."""
    with zipfile.ZipFile(path) as archive:
        entries = table_entries(archive)

        def docs(table: str) -> Iterator[dict[str, Any]]:
            return read_table(archive, entries.get(table))

        yield from map_documents(docs, _snapshot_ms(entries), allowed_hosts=allowed_hosts)


def snapshot_ms(path: Path) -> int:
    with zipfile.ZipFile(path) as archive:
        return _snapshot_ms(table_entries(archive))


def map_documents(
    docs: Callable[[str], Iterable[dict[str, Any]]], snapshot: int, *, allowed_hosts: list[str]
) -> Iterator[tuple[DestinationTable, Row]]:
    """`derive_rows` over any source of documents: `docs(table)` yields a table's documents in
    file order, and may be asked for one table twice (messages)."""
    # Candidates: the users table, then thread owners it does not mention (§4.1).
    candidates: dict[str, tuple[str | None, int]] = {}
    for doc in docs("users"):
        workos_id = string_field(doc, "userId")
        if workos_id is not None:
            candidates[workos_id] = (
                string_field(doc, "email"),
                first_usable_ms(doc, CREATED_CHAIN, snapshot),
            )
    threads: dict[str, tuple[str, dict[str, Any]]] = {}
    for doc in docs("threads"):
        thread_id, owner = string_field(doc, "threadId"), string_field(doc, "ownerId")
        if thread_id is None or owner is None:
            continue  # anonymous threads are not imported (§3.1)
        threads[thread_id] = (owner, doc)
        if owner not in candidates:
            candidates[owner] = (None, first_usable_ms(doc, CREATED_CHAIN, snapshot))

    # Identities (§4, simplified: see the module docstring).
    users: dict[str, tuple[int, str, str]] = {}  # workos id → (id, name, email)
    reserved: dict[str, str] = {}
    for user_id, (workos_id, (email, created_ms)) in enumerate(candidates.items(), start=1):
        export_email = normalise_email(email) if email else None
        chosen = (
            export_email
            if export_email and is_valid_email(export_email)
            else placeholder_email(workos_id)
        )
        attempt = 0
        while reserved.get(chosen, workos_id) != workos_id:
            attempt += 1
            chosen = placeholder_email(workos_id, attempt)
        reserved[chosen] = workos_id
        name = limit(chosen.split("@", 1)[0] or workos_id, 80)
        users[workos_id] = (user_id, name, chosen)
        created = to_timestamp(created_ms)
        yield (
            "users",
            {
                "id": user_id,
                "name": name,
                "email": chosen,
                "handle": None,
                "email_verified_at": None,
                "workos_id": workos_id,
                "remember_token": None,
                "avatar": gravatar_url(chosen),
                "created_at": created,
                "updated_at": created,
            },
        )
    del reserved

    # Blueprints: the most recent per thread, then per owner (§5.1–5.2).
    per_thread: dict[str, Blueprint] = {}
    for line, doc in enumerate(docs("blueprints"), start=1):
        found = extract_blueprint(doc, line)
        if found is not None:
            thread_id, blueprint = found
            current = per_thread.get(thread_id)
            if current is None or blueprint.recency >= current.recency:
                per_thread[thread_id] = blueprint
    chosen_blueprint: dict[str, Blueprint | None] = {}
    for thread_id, (owner, _) in threads.items():
        candidate = per_thread.get(thread_id)
        current = chosen_blueprint.get(owner)
        if candidate is not None and (current is None or candidate.recency >= current.recency):
            chosen_blueprint[owner] = candidate
        else:
            chosen_blueprint.setdefault(owner, current)
    del per_thread

    # One autopilot per owner, with its profile and policy (§5.3–5.4).
    owners: dict[str, Owner] = {}
    now = now_timestamp()
    for workos_id, picked in chosen_blueprint.items():
        user_id, name, email = users[workos_id]
        payload = picked.payload if picked else None
        profile = profile_payload(payload, name)
        policy = policy_payload(payload, allowed_hosts)
        autopilot_id = autopilot_id_for(workos_id)
        yield (
            "autopilot_profiles",
            {
                "autopilot_id": autopilot_id,
                **profile,
                "updated_at": now,
                "created_at": now,
            },
        )
        yield (
            "autopilot_policies",
            {
                "autopilot_id": autopilot_id,
                **policy,
                "updated_at": now,
                "created_at": now,
            },
        )
        summary = profile["persona_summary"]
        yield (
            "autopilots",
            {
                "id": autopilot_id,
                "owner_user_id": user_id,
                "handle": normalise_handle(f"autopilot-{user_id}"),
                "display_name": limit(profile["owner_display_name"], 120),
                "avatar": gravatar_url(email) if is_valid_email(email) else None,
                "status": "active",
                "visibility": "private",
                "tagline": limit(summary, 255) if summary is not None else None,
                "config_version": 2,
                "deleted_at": None,
                "created_at": now,
                "updated_at": now,
            },
        )
        owners[workos_id] = Owner(user_id=user_id, autopilot_id=autopilot_id, config_version=2)
    del chosen_blueprint, users

    # Titles: the earliest eligible user message of each thread (§3.2).
    seeds: dict[str, tuple[float, str]] = {}
    for doc in docs("messages"):
        seed = title_candidate(doc)
        if seed is None or seed[0] not in threads:
            continue
        thread_id, sort_key, text = seed
        current_seed = seeds.get(thread_id)
        if current_seed is None or sort_key < current_seed[0]:
            seeds[thread_id] = (sort_key, text)

    # Threads and conversations (§3.3).
    for thread_id, (owner, doc) in threads.items():
        title = title_from(seeds[thread_id][1]) if thread_id in seeds else default_title(thread_id)
        thread, conversation = thread_rows(thread_id, doc, owners[owner], title, snapshot)
        yield "threads", thread
        yield "agent_conversations", conversation
    del seeds
    owner_of = {thread_id: owners[owner] for thread_id, (owner, _) in threads.items()}
    del threads

    # Runs (§3.4).
    imported_runs: set[str] = set()
    for doc in docs("runs"):
        keys = run_keys(doc)
        if keys is None or keys[0] not in owner_of:
            continue
        thread_id, run_id = keys
        yield "runs", run_row(run_id, thread_id, doc, owner_of[thread_id], snapshot)
        imported_runs.add(run_id)

    # Messages (§3.5).
    for doc in docs("messages"):
        message_key = message_keys(doc)
        if message_key is None or message_key[0] not in owner_of:
            continue
        thread_id, message_id, role = message_key
        source_run = string_field(doc, "runId")
        message, conversation_message = message_rows(
            message_id,
            thread_id,
            role,
            doc,
            owner_of[thread_id],
            source_run if source_run in imported_runs else None,
            snapshot,
        )
        yield "messages", message
        yield "agent_conversation_messages", conversation_message
    del imported_runs

    # Run events from receipts (§3.6); ids 1, 2, … in file order.
    event_id = 0
    for doc in docs("receipts"):
        keys = run_keys(doc)
        if keys is None or keys[0] not in owner_of:
            continue
        thread_id, run_id = keys
        event_id += 1
        yield (
            "run_events",
            {
                "id": event_id,
                **event_row(run_id, thread_id, doc, owner_of[thread_id], snapshot),
            },
        )


def row_columns(table: str, row: Row) -> tuple[str, ...]:
    """The row's columns in table order (the same shape rule as the product's sink)."""
    return tuple(c.name for c in TABLES[table].columns if c.name in row)


# --------------------------------------------------------------------------- writing

_Batch = tuple[str, tuple[str, ...], list[tuple[Any, ...]]]


class _Converter:
    """Row dicts → record tuples for asyncpg's binary COPY."""

    def __init__(self) -> None:
        self._times: dict[str, datetime] = {}

    def record(self, table: str, columns: tuple[str, ...], row: Row) -> tuple[Any, ...]:
        json_cols, time_cols = json_columns(table), timestamp_columns(table)
        bool_cols = boolean_columns(table)
        out: list[Any] = []
        for name in columns:
            value = row[name]
            if value is None:
                out.append(None)
            elif name in json_cols:
                out.append(dumps_text(value))
            elif name in time_cols:
                out.append(self._timestamp(value))
            elif name in bool_cols:
                out.append(bool(value))
            else:
                out.append(value)
        return tuple(out)

    def _timestamp(self, text: str) -> datetime:
        parsed = self._times.get(text)
        if parsed is None:
            if len(self._times) > 100_000:
                self._times.clear()
            parsed = self._times[text] = datetime.fromisoformat(text)
        return parsed


class _Writer:
    """Upserts batches through COPY → staging → INSERT … ON CONFLICT, one per transaction."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._staged: set[tuple[str, tuple[str, ...]]] = set()
        self.rows: dict[str, int] = {}

    async def write(self, table: str, columns: tuple[str, ...], records: list[Any]) -> None:
        stage = f"bench_stage_{table}"
        if (table, columns) not in self._staged:
            await self._conn.execute(
                f'CREATE TEMP TABLE IF NOT EXISTS "{stage}" '
                f'(LIKE "{table}" INCLUDING DEFAULTS) ON COMMIT DELETE ROWS'
            )
            self._staged.add((table, columns))
        pk = primary_key(table)
        cols = ", ".join(f'"{c}"' for c in columns)
        sets = ", ".join(f'"{c}" = excluded."{c}"' for c in columns if c != pk)
        async with self._conn.transaction():
            await self._conn.copy_records_to_table(stage, records=records, columns=list(columns))
            await self._conn.execute(
                f'INSERT INTO "{table}" ({cols}) SELECT {cols} FROM "{stage}" '
                f'ON CONFLICT ("{pk}") DO UPDATE SET {sets}'
            )
        self.rows[table] = self.rows.get(table, 0) + len(records)

    async def drain(self, queue: asyncio.Queue[_Batch | None]) -> None:
        while (batch := await queue.get()) is not None:
            await self.write(*batch)

    async def fix_sequences(self) -> None:
        for table in ("users", "run_events"):
            await self._conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f'coalesce((SELECT max(id) FROM "{table}"), 0) + 1, false)'
            )


async def run(path: Path, dsn: str, *, batch: int, allowed_hosts: list[str]) -> dict[str, Any]:
    return await write_rows(derive_rows(path, allowed_hosts=allowed_hosts), dsn, batch=batch)


async def write_rows(
    rows: Iterator[tuple[DestinationTable, Row]], dsn: str, *, batch: int
) -> dict[str, Any]:
    """`rows` upserted in batches of `batch` rows of a table, one batch in flight while the
    next is mapped; the seconds it took and the rows per table."""
    import asyncpg  # type: ignore[import-untyped, unused-ignore]

    began = time.perf_counter()
    conn = await asyncpg.connect(dsn)
    try:
        writer = _Writer(conn)
        queue: asyncio.Queue[_Batch | None] = asyncio.Queue(maxsize=1)
        drain = asyncio.create_task(writer.drain(queue))
        convert = _Converter()
        pending: dict[tuple[str, tuple[str, ...]], list[tuple[Any, ...]]] = {}
        try:
            for n, (table, row) in enumerate(rows):
                columns = row_columns(table, row)
                bucket = pending.setdefault((table, columns), [])
                bucket.append(convert.record(table, columns, row))
                if len(bucket) >= batch:
                    del pending[(table, columns)]
                    await _put(queue, drain, (table, columns, bucket))
                elif n % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # let the writer send its next command
            for (name, columns), rest in pending.items():
                await _put(queue, drain, (name, columns, rest))
            await _put(queue, drain, None)
            await drain
        finally:
            if not drain.done():
                drain.cancel()
        await writer.fix_sequences()
    finally:
        await conn.close()
    return {"seconds": time.perf_counter() - began, "rows": writer.rows}


async def _put(queue: asyncio.Queue[_Batch | None], drain: asyncio.Task[None], item: Any) -> None:
    """Queue a batch, or re-raise the writer's error if it has stopped."""
    while True:
        if drain.done():
            drain.result()
            raise RuntimeError("the writer stopped early")
        try:
            await asyncio.wait_for(queue.put(item), timeout=1.0)
            return
        except TimeoutError:
            continue


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.direct", description=__doc__)
    parser.add_argument("export", type=Path)
    parser.add_argument("dsn", help="postgresql://… of an empty database with the tables")
    parser.add_argument("--batch", type=int, default=5000, help="rows per COPY (default 5000)")
    args = parser.parse_args(argv)
    hosts = parse_allowed_hosts(DEFAULT_L402_HOSTS)
    result = asyncio.run(
        run(args.export, plain_dsn(args.dsn), batch=args.batch, allowed_hosts=hosts)
    )
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


def plain_dsn(url: str) -> str:
    """asyncpg wants `postgresql://`, not SQLAlchemy's `postgresql+asyncpg://`."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


if __name__ == "__main__":
    sys.exit(main())
