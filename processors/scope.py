"""Touched-only derivation (issue #25): a `follow` step that changed a few documents derives
the threads they reach, not the whole store, with the result a full derivation would give.

The rows of one thread (its `threads` and `agent_conversations` rows, its runs, messages and
run events) are a function of the thread's document, its owner's user and autopilot, the
thread's messages, runs and receipts in file order, which of the runs its messages name are
imported, the snapshot time (for documents without a usable time of their own) and the rows
written before. Users and autopilots are functions of the users, blueprints and thread
documents and of the order of the owners. `plan` names the threads whose rows this run's
changes can reach, when it can show that a full derivation would emit nothing anywhere else;
otherwise it answers None and the full derivation runs, which is always correct. It answers
None when:

- the run or the run before it is not a `follow` publication (an export's file order may move
  documents the run did not change, and ties go to the first in file order), the run before
  is not the one just before this and derived, or the options differ (the snapshot time
  aside), or `--replace`, or WorkOS lookups (which may answer differently now);
- a users or blueprints document was inserted, changed or vanished; a document moved to
  another thread, run or owner (the store keeps only the latest version, so the rows it left
  are not known); a thread was added or went whose id a blueprint names; a new thread's owner
  owned no thread before (a new owner is a new autopilot, with a handle given out in order);
- a document that vanished before the run before lingers in the store of a table this run
  read whole (it may have come back with the content it had: nothing marks that as a change;
  a patched table marks it, `store._upsert`);
- a refusal without its value's hash is recorded, or a row the ledger records is gone from
  its table (a full derivation would offer both again); the store holds documents from before
  it kept their references.

The threads reached: those of every document inserted, changed or vanished in this run; the
threads of the messages naming a run whose document changed or whose thread's document did
(the message's `run_id` follows whether that run is imported); with a new snapshot time, the
threads of documents without a usable time. `Derivation` then checks the owners of those
threads and the rows they would write (`Derivation._scope_owners`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from khala_stream import import_runs
from khala_stream.contract.tables import read_tables
from khala_stream.db.importer_tables import REFUSALS
from processors import store
from processors.derive import THREAD_TABLES, RunContext
from processors.unchanged import rows_missing

logger = logging.getLogger(__name__)

__all__ = ["plan"]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Step:
    """The run being derived and the one derived just before it."""

    run: import_runs.ImportRun
    previous: import_runs.ImportRun
    context: RunContext

    def generation(self, table: str) -> int:
        return self.context.generation(table)

    def previous_generation(self, table: str) -> int:
        manifest = self.previous.manifest
        return manifest.generation(table) if manifest is not None else self.previous.id


async def plan(
    conn: AsyncConnection,
    run: import_runs.ImportRun,
    context: RunContext,
    fingerprint: Mapping[str, Any],
) -> frozenset[str] | None:
    """The threads a scoped derivation of `run` derives (module docstring), or None (and the
    reason logged) when only the full derivation is known to be right. `fingerprint`: the
    run's (`unchanged.fingerprint`)."""
    previous = await import_runs.latest_derived_before(conn, run.id)
    reason = _options_forbid(run, previous, fingerprint)
    threads: frozenset[str] | None = None
    if reason is None:
        assert previous is not None
        step = _Step(run=run, previous=previous, context=context)
        reason = await _store_forbids(conn, step)
        if reason is None:
            threads, reason = await _reach(conn, step)
    if reason is not None:
        logger.info("run %d: derived in full: %s", run.id, reason)
        return None
    return threads


def _options_forbid(
    run: import_runs.ImportRun,
    previous: import_runs.ImportRun | None,
    fingerprint: Mapping[str, Any],
) -> str | None:
    if run.options.replace:
        return "--replace"
    if run.options.resolve_workos_users:
        return "WorkOS lookups may answer differently now"
    if not run.source.startswith(import_runs.FOLLOW_SOURCE):
        return "not a follow publication"
    if previous is None or previous.id != run.id - 1 or previous.summary is None:
        return "the run just before is not derived"
    if not previous.source.startswith(import_runs.FOLLOW_SOURCE):
        return "the run before is not a follow publication"
    before = dict(previous.summary.fingerprint or {})
    if {k: v for k, v in before.items() if k != "snapshot_ms"} != {
        k: v for k, v in fingerprint.items() if k != "snapshot_ms"
    }:
        return "the options differ from the run before's"
    return None


async def _store_forbids(conn: AsyncConnection, step: _Step) -> str | None:
    tables = read_tables(step.run.options.skip_blueprints)
    if await store.any_unreferenced(conn, tables):
        return "documents stored before the store kept their threads"
    for table in tables:
        # Nothing of a carried table was sent, and a patch's document back in the state counts
        # as moved (`store._upsert`): only a table read whole can bring one back unmarked.
        if table in step.context.generations:
            continue
        if await store.lingering(conn, table, step.previous_generation(table)):
            return f"{table} documents that vanished earlier are kept and may have come back"
    hashless = await conn.scalar(
        sa.select(sa.literal(1)).where(REFUSALS.c.row_hash.is_(None)).limit(1)
    )
    if hashless is not None:
        return "a refusal without its value's hash is recorded"
    if await rows_missing(conn):
        return "a row the ledger records is gone from its table"
    return None


async def _reach(conn: AsyncConnection, step: _Step) -> tuple[frozenset[str], str | None]:
    """The threads this run's changes reach, or why a full derivation is needed."""
    run_id = step.run.id
    touched: dict[str, list[store.Touched]] = {}
    for table in read_tables(step.run.options.skip_blueprints):
        generation = step.generation(table)
        touched[table] = await store.changed_documents(conn, table, run_id, generation)
        touched[table] += await store.newly_vanished(
            conn, table, run_id, generation, step.previous_generation(table)
        )
        if touched[table] and table not in THREAD_TABLES:
            return frozenset(), f"{table} documents changed"
        if any(d.moved for d in touched[table]):
            return frozenset(), f"a {table} document moved to another thread, run or owner"
    thread_docs = touched["threads"]
    reason = await _threads_forbid(conn, step, thread_docs)
    if reason is not None:
        return frozenset(), reason
    reached = {d.thread_key or "" for table in THREAD_TABLES for d in touched[table]}
    named_runs = {d.link_key or "" for d in touched["runs"]}
    named_runs |= await store.referring(
        conn, "runs", "thread_key", [d.key for d in thread_docs], step.generation("runs"),
        wanted="link_key",
    )  # fmt: skip
    reached |= await store.referring(
        conn, "messages", "link_key", named_runs, step.generation("messages")
    )
    if step.context.snapshot_ms != (step.previous.snapshot_ms or 0):
        for table in THREAD_TABLES:
            reached |= await store.timeless_threads(conn, table, step.generation(table))
    return frozenset(reached - {""}), None


async def _threads_forbid(
    conn: AsyncConnection, step: _Step, thread_docs: list[store.Touched]
) -> str | None:
    """Why the thread documents this run added or lost need a full derivation, if they do: a
    thread added or gone may change its owner's blueprint, and a new owner is a new autopilot.
    A changed thread document kept its owner (a moved one needs a full derivation anyway)."""
    run_id = step.run.id
    new_or_gone = [d for d in thread_docs if d.inserted or not d.present]
    if not new_or_gone:
        return None
    keys = [d.key for d in new_or_gone]
    if not step.run.options.skip_blueprints and await store.referring(
        conn, "blueprints", "thread_key", keys, step.generation("blueprints"), wanted="doc_key"
    ):
        return "a blueprint names a thread that was added or went"
    owners = {d.link_key for d in new_or_gone if d.inserted and d.link_key}
    established = await store.established_owners(conn, owners, step.generation("threads"), run_id)
    if owners - established:
        return "a new thread's owner owned no thread before"
    return None
