"""Checks made before anything is written, on every path that writes (import-chat, publish).

Light on imports on purpose: the publish stage runs them without loading the processors
(the WorkOS client is imported only when users are to be resolved).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from khala_stream.config import Settings
from khala_stream.contract import read_tables
from khala_stream.contract.documents import document_hash, document_key
from khala_stream.contract.tables import CHAT_TABLES
from khala_stream.errors import UsageError, WorkosKeyError
from khala_stream.import_runs import RunOptions
from producers.export_reader import ExportSource, RejectedLine, open_export

if TYPE_CHECKING:
    from processors.workos import WorkosClient


def refuse_empty(export: ExportSource, tables: Sequence[str], flag: str) -> None:
    """UsageError (exit 2) when no chat table of `tables` holds a single document with its
    key: `--replace` would empty the chat tables and import nothing into them, and
    `--propagate-deletes` would delete every row imported before (a truncated or failed export
    looks like this; `--allow-empty` to do so). Blueprints do not count: they fill no chat
    table.

    Reads until the first document, so a real export costs one line."""
    for table in (t for t in tables if t in CHAT_TABLES):
        # closing: the entry is left after its first document, and must not stay open.
        with contextlib.closing(export.iter_table(table)) as items:  # type: ignore[type-var]
            for item in items:
                if isinstance(item, RejectedLine):
                    continue
                if document_key(table, item.doc, document_hash(item.doc)) is not None:
                    return
    raise UsageError(
        f"{export.path}: {flag} of an export without a single document would empty the chat"
        " tables; nothing was written (add --allow-empty if that is what you want)"
    )


async def check_workos_key(settings: Settings) -> WorkosClient:
    """WorkosKeyError (exit 2) unless WORKOS_API_KEY is set and WorkOS accepts it (one
    request); the client it returns is closed."""
    from processors.workos import WorkosClient

    key = settings.workos_api_key
    if key is None:
        raise WorkosKeyError("--resolve-workos-users needs WORKOS_API_KEY in the environment")
    async with WorkosClient(api_key=key.reveal(), base_url=settings.workos_base_url) as client:
        await client.check_key()
    return client


@contextlib.asynccontextmanager
async def checked_export(
    source: Path | str, settings: Settings, options: RunOptions, *, allow_empty: bool
) -> AsyncIterator[tuple[ExportSource, WorkosClient | None]]:
    """The export, opened and checked before anything is written: a valid source holding the
    tables the run reads, not empty under --replace or --propagate-deletes (unless
    `allow_empty`), and a WorkOS key
    WorkOS accepts when users are to be resolved (the processor truncates first under
    --replace). Yields the export and the checked (closed) WorkOS client, if any."""
    tables = read_tables(options.skip_blueprints)
    with open_export(
        source,
        max_entry_bytes=settings.max_entry_bytes,
        max_ratio=settings.max_ratio,
        max_total_bytes=settings.max_total_bytes,
    ) as export:
        export.verify(tables)
        if not allow_empty and (options.replace or options.propagate_deletes):
            refuse_empty(export, tables, "--replace" if options.replace else "--propagate-deletes")
        workos = await check_workos_key(settings) if options.resolve_workos_users else None
        yield export, workos
