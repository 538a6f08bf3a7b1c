"""The derivation: one export's documents → every destination row change, by reference rules.

It runs once per export, when the processors' store holds all of the export's documents, so
its result cannot depend on the order in which documents arrived (SPEC §4). It reads the
documents back in file order and applies the reference's phases (§3): identities, autopilots,
runs, messages (finding the titles on the way), threads, run events; rows of different tables
are independent, so threads may follow the messages that title them. Only rows whose computed
value differs from the last computed one, or that are missing from their table, are emitted
(SPEC §3.8, §8.7); a row the database refused is not offered again with the value it refused
(`Derivation.refused_again`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream.contract.changes import RowChange, RowUpsert, SourceRef
from khala_stream.contract.codec import content_hash
from khala_stream.contract.runs import PublishManifest
from khala_stream.contract.tables import DestinationTable, read_tables
from khala_stream.import_runs import RunOptions
from processors import store
from processors.autopilots import (
    PROFILE_COLUMNS,
    autopilot_id_for,
    extract_blueprint,
    policy_payload,
    profile_payload,
)
from processors.fields import CREATED_CHAIN, first_usable_ms, now_timestamp, string_field
from processors.identity import (
    Candidate,
    IdentityCounters,
    IdentityResolver,
    ResolvedUser,
    WorkosLookup,
)
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
from processors.lookups import LedgerEntry, LegacyEvent, TargetView, UserIds
from processors.store import StoredDocument
from processors.text import gravatar_url, handle_candidates, is_valid_email, limit, normalise_handle
from processors.workspace import Workspace

logger = logging.getLogger(__name__)

COUNTER_KEYS: tuple[str, ...] = (
    "source_users",
    "source_threads",
    "source_runs",
    "source_messages",
    "source_receipts",
    "source_blueprints",
    "users_imported",
    "users_resolved_via_workos",
    "users_unresolved_placeholder",
    "users_email_conflicts",
    "threads_imported",
    "runs_imported",
    "messages_imported",
    "events_imported",
    "autopilots_created",
    "autopilot_profiles_upserted",
    "autopilot_policies_upserted",
    "blueprints_mapped",
    "threads_linked_backfilled",
    "runs_linked_backfilled",
    "messages_linked_backfilled",
    "run_events_linked_backfilled",
)
_BATCH = 2000
_OWNER_PAGE = 500  # owners whose blueprints and autopilot rows are held at once
# The source tables whose documents belong to a thread (read by thread in a scoped derivation).
THREAD_TABLES: Final = ("threads", "runs", "messages", "receipts")
# The tables whose rows are compared in batches with what is there (see `_Pending`).
_ROW_TABLES: tuple[DestinationTable, ...] = (
    "threads",
    "agent_conversations",
    "runs",
    "messages",
    "agent_conversation_messages",
    "run_events",
)


class PhaseProgress(Protocol):
    """`(phase, items done, total or None, finished)`: called as a phase goes."""

    def __call__(self, phase: str, done: int, total: int | None, finished: bool) -> None: ...


class ChangeOutput(Protocol):
    """Where derived changes go: the changes topic, or nowhere in a dry run."""

    async def emit(self, changes: Sequence[RowChange]) -> None: ...

    async def emit_rows(
        self, table: DestinationTable, rows: Sequence[RowUpsert], *, new: bool = False
    ) -> None:
        """Upserts of one table, sent as `RowBatch`es (`new`: to a table that was empty);
        the output takes over their values."""

    async def drain(self) -> Mapping[int, int]:
        """Until everything emitted so far is durable (acknowledged by the broker); the end
        offset reached per partition."""


# The rows a vanished document's delete removes (--propagate-deletes), by source table.
DELETED_WITH: Final[dict[str, tuple[DestinationTable, ...]]] = {
    "users": (),
    "threads": ("threads", "agent_conversations"),
    "runs": ("runs",),
    "messages": ("messages", "agent_conversation_messages"),
    "receipts": ("run_events",),
    "blueprints": (),
}


def withheld_deletes(manifest: PublishManifest, tables: Sequence[str]) -> dict[str, str]:
    """The tables of `tables` whose vanished documents must not be deleted, with the reason.

    `manifest` is what the publisher (or the dry run's reading) reports about the export.
    Only a table that is present and read whole may lose documents: a line the reader
    rejected (not UTF-8, not JSON, too long ...) or a document without its key may be any
    document of its table, and its key cannot be known, so a table with one of them deletes
    nothing; a table missing from the export deletes nothing either. Their documents stay in
    the store, so a later complete export deletes what is really gone.
    """
    # A manifest stored before it listed the export's tables: take them all as present.
    present = set(manifest.tables or tables)
    rejected, keyless = manifest.rejected, manifest.missing_key
    withheld: dict[str, str] = {}
    for table in tables:
        if table not in present:
            withheld[table] = "missing from the export"
        elif rejected.get(table) or keyless.get(table):
            reasons = []
            if rejected.get(table):
                reasons.append(f"{rejected[table]} rejected lines")
            if keyless.get(table):
                reasons.append(f"{keyless[table]} documents without their key")
            withheld[table] = " and ".join(reasons)
    return withheld


@dataclass(frozen=True, slots=True, kw_only=True)
class RunContext:
    """The run a derivation works on: its id, the export's snapshot time, the L402 hosts
    allowed, and the options it was published with."""

    run_id: int
    snapshot_ms: int
    allowed_hosts: list[str]
    options: RunOptions
    withheld_deletes: Mapping[str, str] = field(default_factory=dict)
    """Tables whose vanished documents are kept, with why (`withheld_deletes`)."""
    generations: Mapping[str, int] = field(default_factory=dict)
    """Tables whose documents are stored under an earlier run, carried over or patched
    (`PublishManifest.generations`)."""

    def generation(self, table: str) -> int:
        """The run under which the store holds this run's documents of `table`."""
        return self.generations.get(table, self.run_id)


@dataclass(slots=True)
class Derived:
    """What a derivation reports: the 22 counters and the rows it emitted per table."""

    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTER_KEYS, 0))
    written: dict[str, int] = field(default_factory=dict)
    documents: dict[str, store.TableChanges] = field(default_factory=dict)
    scoped_threads: int | None = None
    """How many threads a scoped derivation derived (its counters count theirs); None: all."""


class _Pending:
    """Computed rows of one table, emitted in batches when new, changed or missing."""

    def __init__(self, derivation: Derivation, table: DestinationTable) -> None:
        self._d = derivation
        self.table: DestinationTable = table
        self._rows: list[tuple[str, dict[str, Any], SourceRef]] = []

    async def add(self, key: str, values: dict[str, Any], source: SourceRef) -> None:
        self._rows.append((key, values, source))
        if len(self._rows) >= _BATCH:
            await self.flush()

    async def flush(self) -> None:
        rows, self._rows = self._rows, []
        if not rows:
            return
        if self.table in self._d.untouched:  # nothing there to compare with
            upserts = [
                RowUpsert(key, values, content_hash(values), source) for key, values, source in rows
            ]
            await self._d.emit_rows(self.table, upserts, new=True)
            return
        keys = [k for k, _, _ in rows]
        ledger = await self._d.view.ledger(self.table, keys)
        present = await self._d.view.existing(self.table, keys)
        upserts = []
        for key, values, source in rows:
            digest = content_hash(values)
            if key in present and self._d.settled(ledger.get(key), digest):
                continue
            upserts.append(RowUpsert(key, values, digest, source))
        refused = await self._d.refused_again(
            self.table, [(u.key, u.row_hash) for u in upserts], ledger
        )
        await self._d.emit_rows(self.table, [u for u in upserts if u.key not in refused])


class Derivation:
    def __init__(
        self,
        *,
        context: RunContext,
        documents: AsyncEngine,
        view: TargetView,
        user_ids: UserIds,
        workos: WorkosLookup | None,
        out: ChangeOutput,
        statistics: Mapping[str, store.TableChanges] | None = None,
        progress: PhaseProgress | None = None,
        scope: frozenset[str] | None = None,
    ) -> None:
        """`statistics`: the run's `store.table_changes`, when the caller has them already;
        `progress` hears each phase's items done (and total, when known) as it goes; `scope`:
        the only threads whose rows can differ from those written (`processors/scope.py`),
        or None to derive everything."""
        self.context = context
        self.view = view
        self._documents = documents
        self._user_ids = user_ids
        self._workos = workos
        self._out = out
        self._statistics = statistics
        self.result = Derived()
        self._work: Workspace  # the per-export maps, open while `run` runs
        self.untouched: set[str] = set()  # row tables empty when the derivation began
        self._progress = progress
        self._phase: tuple[str, int | None] | None = None  # (name, total) of the current one
        self._phase_done = 0
        self.refused_tables: set[str] = set()  # tables with refused values (`refused_again`)
        self.scope = scope

    # -- plumbing ---------------------------------------------------------------------------

    def change(
        self,
        table: DestinationTable,
        op: Any,
        key: str,
        values: dict[str, Any],
        digest: str | None = None,
        source: SourceRef | None = None,
    ) -> RowChange:
        return RowChange(
            run_id=self.context.run_id,
            table=table,
            op=op,
            key=key,
            values=values,
            row_hash=digest,
            source=source,
        )

    async def emit(self, changes: Sequence[RowChange]) -> None:
        refused: set[tuple[str, str]] = set()
        for table in {c.table for c in changes} & self.refused_tables:
            upserts = [
                (c.key, c.row_hash) for c in changes if c.table == table and c.op == "upsert"
            ]
            refused.update((table, key) for key in await self.refused_again(table, upserts))
        if refused:
            changes = [c for c in changes if c.op != "upsert" or (c.table, c.key) not in refused]
        if not changes:
            return
        for c in changes:
            self.result.written[c.table] = self.result.written.get(c.table, 0) + 1
        await self._out.emit(changes)

    async def emit_rows(
        self, table: DestinationTable, rows: Sequence[RowUpsert], *, new: bool = False
    ) -> None:
        if not rows:
            return
        self.result.written[table] = self.result.written.get(table, 0) + len(rows)
        await self._out.emit_rows(table, rows, new=new)

    def settled(self, entry: LedgerEntry | None, digest: str) -> bool:
        """The row holds this value from an earlier run, so writing it again changes nothing.

        A value recorded by this very run is not settled: the run is being derived again after
        a crash, and must emit what it emitted the first time (same changes, same counters).
        """
        return (
            entry is not None and entry.row_hash == digest and entry.run_id != self.context.run_id
        )

    async def refused_again(
        self,
        table: str,
        rows: Sequence[tuple[str, str | None]],
        ledger: Mapping[str, LedgerEntry] | None = None,
    ) -> set[str]:
        """The keys of these (key, row hash) upserts that the database refused with this very
        value, with no value of the row written since: settled until something changes (the
        value, or the cause: `dlq replay` retries the row, SPEC §3.2), so not offered again.

        A refusal by this very run does not count (derived again after a crash: the same
        changes again), nor one older than the row's ledger entry (a replayed row, or one
        written with another value since). `ledger`: the rows' entries, when already read.
        """
        if table not in self.refused_tables or not rows:
            return set()
        refusals = await self.view.refused(table, [key for key, _ in rows])
        again = [
            key
            for key, digest in rows
            if (r := refusals.get(key)) is not None
            and r.row_hash == digest
            and r.run_id != self.context.run_id
        ]
        if not again:
            return set()
        if ledger is None:
            ledger = await self.view.ledger(table, again)
        return {
            key
            for key in again
            if (entry := ledger.get(key)) is None or (entry.run_id or 0) < refusals[key].run_id
        }

    async def _pages(self, table: str) -> AsyncIterator[list[StoredDocument]]:
        generation = self.context.generation(table)
        if self.scope is not None and table in THREAD_TABLES:
            pages = store.documents_of_threads(
                self._documents, table, sorted(self.scope), generation
            )
        else:
            pages = store.iter_pages(self._documents, table, generation)
        async for page in pages:
            yield page
            self._advance(len(page))

    # -- progress: the reference's phases as they run ---------------------------------------

    def _begin(self, name: str, *tables: str, within: bool = False) -> None:
        """A new phase over the documents of `tables` (their count is the total, if known);
        the current one ends, unless the new one runs `within` it."""
        if not within:
            self._end()
        total = None
        if self._statistics is not None and tables:
            total = 0
            for table in tables:
                stats = self._statistics.get(table)
                total += stats.inserted + stats.updated + stats.unchanged if stats else 0
        self._phase, self._phase_done = (name, total), 0
        if self._progress is not None:
            self._progress(name, 0, total, False)

    async def _within(self, name: str, table: str, work: Awaitable[None]) -> None:
        """`work` as a phase of its own inside the current one, which then goes on."""
        outer = self._phase, self._phase_done
        self._begin(name, table, within=True)
        await work
        self._end()
        self._phase, self._phase_done = outer

    def _advance(self, n: int) -> None:
        self._phase_done += n
        if self._progress is not None and self._phase is not None:
            self._progress(self._phase[0], self._phase_done, self._phase[1], False)

    def _end(self) -> None:
        if self._progress is not None and self._phase is not None:
            self._progress(self._phase[0], self._phase_done, self._phase_done, True)
        self._phase = None

    def _count(self, key: str, n: int = 1) -> None:
        self.result.counters[key] += n

    # -- the phases -------------------------------------------------------------------------

    async def run(self) -> Derived:
        self.untouched = await self.view.untouched(_ROW_TABLES)
        self.refused_tables = await self.view.refused_tables()
        if self.scope is not None:
            owners = await self._scope_owners()
            if owners is not None:
                await self._run_scoped(*owners)
                self.result.scoped_threads = len(self.scope)
                await self._vanished()
                return self.result
            self.scope = None
        with Workspace() as self._work:
            resolver = IdentityResolver(
                run_id=self.context.run_id,
                view=self.view,
                user_ids=self._user_ids,
                workos=self._workos,
                workspace=self._work,
            )
            self._begin("identities", "users", "threads")
            await self._users(resolver)
            # Blueprints before the threads: each owner's pick is made as they come.
            if not self.context.options.skip_blueprints:
                await self._within("blueprints", "blueprints", self._blueprints())
            await self._thread_owners(resolver)
            self._identity_counters(resolver.counters)
            self._begin("autopilots")
            await self._autopilots()
            # Threads after messages: their titles come from the messages, and one pass over
            # the messages finds them while it emits the message rows (row order across
            # tables does not matter to the sink; each row is emitted once).
            self._begin("runs", "runs")
            await self._runs()
            self._begin("messages", "messages")
            await self._messages()
            self._begin("threads", "threads")
            await self._threads()
            self._begin("run events", "receipts")
            await self._events()
            self._end()
        await self._vanished()
        return self.result

    # A scoped derivation (processors/scope.py): the row phases over the threads in scope,
    # with their owners' users and autopilots as they are.

    async def _run_scoped(
        self, threads: list[tuple[str, str]], owners: dict[str, Owner], runs: list[str]
    ) -> None:
        with Workspace() as self._work:
            self._work.add_threads(threads)
            self._work.set_owners(owners)
            self._work.add_runs(runs)  # imported runs of other threads named by messages here
            for phase, work in (
                ("runs", self._runs),
                ("messages", self._messages),
                ("threads", self._threads),
                ("run events", self._events),
            ):
                self._begin(phase)
                await work()
            self._end()

    async def _scope_owners(
        self,
    ) -> tuple[list[tuple[str, str]], dict[str, Owner], list[str]] | None:
        """What the row phases of a scoped derivation need to know beyond their threads: the
        (thread, owner) pairs in scope, each owner's `Owner` as the full derivation would
        find it (users and autopilots untouched: their rows as they are), and the imported
        runs of other threads that messages in scope name. None (and why, logged) when the
        scope cannot be derived alone after all: an owner without its user or autopilot row,
        or a row in scope that another thread's document writes too."""
        assert self.scope is not None
        scope = sorted(self.scope)
        threads = [
            (d.key, owner)
            async for page in self._scoped_documents("threads", scope)
            for d in page
            if (owner := string_field(d.doc, "ownerId")) is not None
        ]
        workos_ids = sorted({owner for _, owner in threads})
        users = await self.view.users_by_workos(workos_ids)
        autopilots = await self.view.autopilots_by_owner([u.id for u in users.values()])
        owners: dict[str, Owner] = {}
        for w in workos_ids:
            if w not in users or (autopilot := autopilots.get(users[w].id)) is None:
                self._unscoped("an owner in scope has no user or autopilot row")
                return None
            owners[w] = Owner(users[w].id, autopilot.id, autopilot.config_version)
        named: set[str] = set()
        for table, keys_of in (("runs", run_keys), ("messages", message_keys)):
            rows: dict[str, str] = {}  # row key → the thread of the document that writes it
            async for page in self._scoped_documents(table, scope):
                for d in page:
                    if (keys := keys_of(d.doc)) is None:
                        continue
                    # One row from documents of two threads: the later one in file order wins,
                    # which the documents in scope alone do not show.
                    if rows.setdefault(keys[1], keys[0]) != keys[0]:
                        self._unscoped(f"one {table} row from documents of two threads")
                        return None
                if table == "messages":
                    named |= {r for d in page if (r := string_field(d.doc, "runId"))}
            written = await self.view.threads_of(table, sorted(rows))
            if any(rows[key] != thread for key, thread in written.items()):
                self._unscoped(f"{table} rows in scope written from another thread's documents")
                return None
        return threads, owners, await self._imported_runs(named)

    async def _imported_runs(self, run_ids: set[str]) -> list[str]:
        """Those of `run_ids` a full derivation imports: a run document whose thread has an
        owner (every owner has an autopilot)."""
        runs = {
            keys
            for d in await self._current("runs", "link_key", run_ids)
            if (keys := run_keys(d.doc)) is not None
        }
        owned = {
            d.key
            for d in await self._current("threads", "doc_key", {thread for thread, _ in runs})
            if string_field(d.doc, "ownerId") is not None
        }
        return sorted({run_id for thread, run_id in runs if thread in owned})

    async def _current(self, table: str, column: str, values: set[str]) -> list[StoredDocument]:
        return await store.documents_where(
            self._documents, table, column, sorted(values), self.context.generation(table)
        )

    def _scoped_documents(
        self, table: str, threads: list[str]
    ) -> AsyncIterator[list[StoredDocument]]:
        return store.documents_of_threads(
            self._documents, table, threads, self.context.generation(table)
        )

    def _unscoped(self, reason: str) -> None:
        logger.info("run %d: derived in full: %s", self.context.run_id, reason)

    # Identities (reference §4): the users in file order, then owners of threads who are not
    # among them, in the order of their first thread.

    async def _users(self, resolver: IdentityResolver) -> None:
        snapshot = self.context.snapshot_ms
        async for page in self._pages("users"):
            candidates = [
                Candidate(
                    workos_id=d.key,
                    email=string_field(d.doc, "email"),
                    created_ms=first_usable_ms(d.doc, CREATED_CHAIN, snapshot),
                    source=SourceRef(table="users", line=d.line, doc_id=string_field(d.doc, "_id")),
                )
                for d in page
            ]
            await self._resolve(resolver, candidates)

    async def _thread_owners(self, resolver: IdentityResolver) -> None:
        snapshot = self.context.snapshot_ms
        async for page in self._pages("threads"):
            # anonymous threads are not imported (reference §3.1)
            owned = [(d, o) for d in page if (o := string_field(d.doc, "ownerId")) is not None]
            first_seen = self._work.add_threads([(d.key, owner) for d, owner in owned])
            unknown = set(first_seen) - self._work.has_user(first_seen)
            candidates: list[Candidate] = []
            for d, owner in owned:
                if owner in unknown:
                    unknown.discard(owner)
                    candidates.append(
                        Candidate(
                            workos_id=owner,
                            email=None,
                            created_ms=first_usable_ms(d.doc, CREATED_CHAIN, snapshot),
                            source=SourceRef(table="threads", line=d.line, doc_id=d.key),
                        )
                    )
            await self._resolve(resolver, candidates)

    async def _resolve(self, resolver: IdentityResolver, candidates: list[Candidate]) -> None:
        users, changes = await resolver.resolve(candidates)
        self._work.add_users((w, u.id, u.name, u.email, u.handle) for w, u in users.items())
        await self.emit(changes)

    def _identity_counters(self, c: IdentityCounters) -> None:
        self._count("users_imported", c.users_imported)
        self._count("users_resolved_via_workos", c.users_resolved_via_workos)
        self._count("users_unresolved_placeholder", c.users_unresolved_placeholder)
        self._count("users_email_conflicts", c.users_email_conflicts)

    # Autopilots (reference §5): one per owner, with its profile and policy.

    async def _blueprints(self) -> None:
        """Each thread's best blueprint, as key and recency: payloads are large (a few KB
        each), so only the chosen ones are read again, an owner batch at a time."""
        if self.context.options.skip_blueprints:
            return
        async for page in self._pages("blueprints"):
            found: list[tuple[str, str, int]] = []
            for d in page:
                if (extracted := extract_blueprint(d.doc, d.line)) is not None:
                    thread_id, blueprint = extracted
                    found.append((thread_id, d.key, blueprint.recency))
            self._work.best_blueprints(found)

    async def _autopilots(self) -> None:
        for page in self._work.owner_pages(_OWNER_PAGE):
            self._work.set_owners(await self._autopilot_batch(page))
            self._advance(len(page))

    async def _autopilot_batch(self, page: list[tuple[str, str | None]]) -> dict[str, Owner]:
        """Owners (WorkOS id, key of the chosen blueprint) → their autopilots' rows."""
        skip = self.context.options.skip_blueprints
        workos_ids = [w for w, _ in page]
        chosen = dict(page)
        users = {w: ResolvedUser(*u) for w, u in self._work.users(workos_ids).items()}
        payloads = await self._payloads([key for _, key in page if key])
        existing = await self.view.autopilots_by_owner([users[w].id for w in workos_ids])
        created_here = await self.view.ledger("autopilots", [a.id for a in existing.values()])
        ids = {
            w: existing[users[w].id].id if users[w].id in existing else autopilot_id_for(w)
            for w in workos_ids
        }
        keys = list(ids.values())
        profiles_present = await self.view.existing("autopilot_profiles", keys)
        policies_present = await self.view.existing("autopilot_policies", keys)
        profile_ledger = await self.view.ledger("autopilot_profiles", keys)
        policy_ledger = await self.view.ledger("autopilot_policies", keys)
        now = now_timestamp()
        owners: dict[str, Owner] = {}
        changes: list[RowChange] = []
        bases = [
            normalise_handle(_handle_seed(users[w]))
            for w in workos_ids
            if users[w].id not in existing
        ]
        taken = await self.view.taken_handles(bases)
        free = {b for b in bases if b not in taken}  # in the table, when the batch began
        for w in workos_ids:
            user, blueprint, autopilot_id = users[w], chosen[w], ids[w]
            payload = payloads[blueprint] if blueprint else None
            if blueprint is not None:
                self._count("blueprints_mapped")
            profile = profile_payload(payload, user.name)
            policy = policy_payload(payload, self.context.allowed_hosts)
            current = existing.get(user.id)
            redo = current is not None and self._made_by_this_run(created_here.get(current.id))
            new = current is None or redo
            wrote = False
            for table, values, present, ledger in (
                ("autopilot_profiles", profile, profiles_present, profile_ledger),
                ("autopilot_policies", policy, policies_present, policy_ledger),
            ):
                digest = content_hash(values)
                exists = autopilot_id in present
                # --skip-blueprints never resets a profile or policy (SPEC §3.9).
                if exists and (skip or self.settled(ledger.get(autopilot_id), digest)):
                    # A new autopilot's profile or policy that the importer wrote already: an
                    # attempt killed before its autopilot was applied. It was written for this
                    # autopilot all the same, which ends at version 2 as after one clean run.
                    wrote = wrote or (new and ledger.get(autopilot_id) is not None)
                    continue
                row = {"autopilot_id": autopilot_id, **values, "updated_at": now}
                if not exists:
                    row["created_at"] = now
                changes.append(self.change(table, "upsert", autopilot_id, row, digest))  # type: ignore[arg-type]
                self._count(f"{table}_upserted")
                wrote = True
            version = (current.config_version if current and not redo else 1) + (1 if wrote else 0)
            if new:
                handle = current.handle if current is not None else None
                changes.append(
                    await self._new_autopilot(
                        autopilot_id, user, profile, version, now, handle, free
                    )
                )
                self._count("autopilots_created")
            elif wrote:
                values = {"config_version": version, "updated_at": now}
                changes.append(self.change("autopilots", "update", autopilot_id, values))
            owners[w] = Owner(user_id=user.id, autopilot_id=autopilot_id, config_version=version)
        await self.emit(changes)
        return owners

    async def _payloads(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        """The payloads of these blueprint documents (chosen in `_blueprints`)."""
        payloads: dict[str, dict[str, Any]] = {}
        for d in await store.documents_by_key(self._documents, "blueprints", keys):
            found = extract_blueprint(d.doc, d.line)
            if found is not None:
                payloads[d.key] = found[1].payload
        return payloads

    async def _new_autopilot(
        self,
        autopilot_id: str,
        user: ResolvedUser,
        profile: dict[str, Any],
        version: int,
        now: str,
        handle: str | None,
        free: set[str],
    ) -> RowChange:
        if handle is None:
            handle = await self._free_handle(normalise_handle(_handle_seed(user)), free)
        summary = profile["persona_summary"]
        tagline = (
            limit(summary, 255)
            if summary is not None and not self.context.options.skip_blueprints
            else None
        )
        values = {
            "id": autopilot_id,
            "owner_user_id": user.id,
            "handle": handle,
            "display_name": limit(profile["owner_display_name"], 120),
            "avatar": gravatar_url(user.email) if is_valid_email(user.email) else None,
            "status": "active",
            "visibility": "private",
            "tagline": tagline,
            "config_version": version,
            "deleted_at": None,
            "created_at": now,
            "updated_at": now,
        }
        return self.change("autopilots", "upsert", autopilot_id, values, content_hash(values))

    def _made_by_this_run(self, entry: LedgerEntry | None) -> bool:
        """An autopilot this run created before it crashed: it is derived as new again."""
        return entry is not None and entry.run_id == self.context.run_id

    async def _free_handle(self, base: str, free: set[str]) -> str:
        """The first free handle, against the table and this run's own (reference §5.3)."""
        if base in free and self._work.take_handle(base):
            return base
        candidates = handle_candidates(base)
        while True:
            batch = [next(candidates) for _ in range(8)]
            taken = await self.view.taken_handles(batch)
            for handle in batch:
                if handle not in taken and self._work.take_handle(handle):
                    return handle

    # Rows that follow their thread's owner: runs, messages (and titles), threads, events.

    async def _runs(self) -> None:
        pending = _Pending(self, "runs")
        async for page in self._pages("runs"):
            keyed = [(d, keys) for d in page if (keys := run_keys(d.doc)) is not None]
            owners = self._work.owners_of(thread_id for _, (thread_id, _) in keyed)
            imported: list[str] = []
            for d, (thread_id, run_id) in keyed:
                if (owner := owners.get(thread_id)) is None:
                    continue
                row = run_row(run_id, thread_id, d.doc, owner, self.context.snapshot_ms)
                await pending.add(run_id, row, SourceRef(table="runs", line=d.line, doc_id=run_id))
                imported.append(run_id)
                self._count("runs_imported")
            self._work.add_runs(imported)
        await pending.flush()

    async def _messages(self) -> None:
        """Emits the message rows, and offers each thread's title (with its sort key)."""
        messages = _Pending(self, "messages")
        conversation_messages = _Pending(self, "agent_conversation_messages")
        async for page in self._pages("messages"):
            parsed = [(d, title_candidate(d.doc), message_keys(d.doc)) for d in page]
            owners = self._work.owners_of(
                {seed[0] for _, seed, _ in parsed if seed} | {k[0] for _, _, k in parsed if k}
            )
            runs = self._work.imported_runs(
                run_id for d in page if (run_id := string_field(d.doc, "runId"))
            )
            titles: dict[str, tuple[float, str]] = {}
            for d, seed, keys in parsed:
                if seed is not None and seed[0] in owners:
                    thread_id, sort_key, title = seed
                    current = titles.get(thread_id)
                    if current is None or sort_key < current[0]:
                        titles[thread_id] = (sort_key, title_from(title))  # ≤ 120 characters
                if keys is None or keys[0] not in owners:
                    continue
                thread_id, message_id, role = keys
                run_id = string_field(d.doc, "runId")
                message, conversation_message = message_rows(
                    message_id,
                    thread_id,
                    role,
                    d.doc,
                    owners[thread_id],
                    run_id if run_id in runs else None,
                    self.context.snapshot_ms,
                )
                source = SourceRef(table="messages", line=d.line, doc_id=message_id)
                await messages.add(message_id, message, source)
                await conversation_messages.add(message_id, conversation_message, source)
                self._count("messages_imported")
            self._work.offer_titles(titles)
        await messages.flush()
        await conversation_messages.flush()

    async def _threads(self) -> None:
        thread_rows_out = _Pending(self, "threads")
        conversations = _Pending(self, "agent_conversations")
        snapshot = self.context.snapshot_ms
        async for page in self._pages("threads"):
            owners = self._work.owners_of(d.key for d in page)  # anonymous ones are not there
            titles = self._work.titles(owners)
            for d in page:
                thread_id = d.key
                if (owner := owners.get(thread_id)) is None:
                    continue
                title = titles[thread_id] if thread_id in titles else default_title(thread_id)
                row, conversation = thread_rows(thread_id, d.doc, owner, title, snapshot)
                source = SourceRef(table="threads", line=d.line, doc_id=thread_id)
                await thread_rows_out.add(thread_id, row, source)
                await conversations.add(thread_id, conversation, source)
                self._count("threads_imported")
        await thread_rows_out.flush()
        await conversations.flush()

    async def _events(self) -> None:
        linked: set[int] = set()
        async for page in self._pages("receipts"):
            keyed = [(d, keys) for d in page if (keys := run_keys(d.doc)) is not None]
            owners = self._work.owners_of(thread_id for _, (thread_id, _) in keyed)
            batch: list[tuple[str, dict[str, Any], SourceRef]] = []
            for d, (thread_id, run_id) in keyed:
                if (owner := owners.get(thread_id)) is None:
                    continue
                row = event_row(run_id, thread_id, d.doc, owner, self.context.snapshot_ms)
                batch.append((d.key, row, SourceRef(table="receipts", line=d.line, doc_id=d.key)))
                self._count("events_imported")
            await self._event_batch(batch, linked)

    async def _event_batch(
        self, batch: list[tuple[str, dict[str, Any], SourceRef]], linked: set[int]
    ) -> None:
        if not batch:
            return
        if "run_events" in self.untouched:  # no ledger, no events of older importers
            upserts = [RowUpsert(key, row, content_hash(row), source) for key, row, source in batch]
            await self.emit_rows("run_events", upserts, new=True)
            return
        ledger = await self.view.ledger("run_events", [k for k, _, _ in batch])
        ids = [e.row_id for e in ledger.values() if e.row_id is not None]
        present = await self.view.existing("run_events", ids)
        # Events of older importers: matched by content for receipts never seen before, and
        # linked to their autopilot when they have none (reference §3.6).
        unseen_runs = sorted({row["run_id"] for key, row, _ in batch if key not in ledger})
        older: dict[tuple[Any, ...], list[LegacyEvent]] = {}
        for event in await self.view.legacy_events(unseen_runs):
            older.setdefault(_event_key(event), []).append(event)
        changes: list[RowChange] = []
        for key, row, source in batch:
            digest = content_hash(row)
            last = ledger.get(key)
            if last is not None:
                if last.row_id in present and self.settled(last, digest):
                    continue
            elif any(e.payload == row["payload"] for e in older.get(_row_event_key(row), ())):
                continue  # written by an older importer: matched by content (SPEC §3.4)
            changes.append(self.change("run_events", "upsert", key, row, digest, source))
        owners = {
            (r["thread_id"], r["run_id"], r["user_id"]): r["autopilot_id"] for _, r, _ in batch
        }
        runs = sorted({row["run_id"] for _, row, _ in batch})
        for event in await self.view.legacy_events(runs, unlinked_only=True):
            autopilot_id = owners.get((event.thread_id, event.run_id, event.user_id))
            if autopilot_id is None or event.id in linked:
                continue
            linked.add(event.id)
            values = {
                "autopilot_id": autopilot_id,
                "actor_type": "autopilot",
                "actor_autopilot_id": autopilot_id,
            }
            changes.append(self.change("run_events", "update", f"id:{event.id}", values))
            self._count("run_events_linked_backfilled")
        await self.emit(changes)

    async def _vanished(self) -> None:
        """Documents of earlier exports missing from this one: reported; deleted on request."""
        run_id = self.context.run_id
        read = read_tables(self.context.options.skip_blueprints)  # the others are not "vanished"
        if self._statistics is not None:
            self.result.documents = dict(self._statistics)
        else:
            async with self._documents.connect() as conn:
                self.result.documents = await store.table_changes(
                    conn, run_id, read, self.context.generations
                )
        if not self.context.options.propagate_deletes:
            return
        withheld = self.context.withheld_deletes
        for table, reason in withheld.items():
            logger.warning("run %d: no deletes from %s: %s", run_id, table, reason)
        async with self._documents.begin() as conn:
            vanished = {
                t: await store.vanished_keys(conn, t, self.context.generation(t))
                for t in read
                if t not in withheld
            }
            for table, keys in vanished.items():
                await self.emit(
                    [self.change(t, "delete", k, {}) for t in DELETED_WITH[table] for k in keys]
                )
            # The deletes are durable before the store forgets what they delete: after a crash
            # in between, no later derivation would know these rows were to go.
            await self._out.drain()
            for table, keys in vanished.items():
                await store.forget(conn, table, keys)


def _handle_seed(user: ResolvedUser) -> str:
    return f"{user.handle}-autopilot" if user.handle else f"autopilot-{user.id}"


def _event_key(event: LegacyEvent) -> tuple[Any, ...]:
    return (event.thread_id, event.run_id, event.user_id, event.type, event.created_at)


def _row_event_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["thread_id"], row["run_id"], row["user_id"], row["type"], row["created_at"])


__all__ = [
    "COUNTER_KEYS",
    "DELETED_WITH",
    "PROFILE_COLUMNS",
    "THREAD_TABLES",
    "ChangeOutput",
    "Derivation",
    "Derived",
    "RunContext",
    "withheld_deletes",
]
