"""Issue #3 item 1 (with item 6's generator): the end state does not depend on arrival order.

Every case compares the Laravel tables, normalised (`snapshot.py`), with a baseline: a clean
sequential `import-chat` of the same export on a fresh PostgreSQL database. The stages run as
separate processes (`stages.py`) with several partitions and workers in one consumer group;
in the children-before-parents cases the test produces the documents itself, with exactly the
publisher's keys and headers, in an order of its choosing.

CI runs a few seeds; `tests/stress/test_stress.py` runs the whole grid with many seeds.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from khala_stream import import_runs
from khala_stream.broker.clients import ensure_topics, make_producer
from khala_stream.config import KafkaSettings
from khala_stream.contract import Topics
from khala_stream.contract.documents import (
    Provenance,
    document_hash,
    document_headers,
    document_key,
)
from khala_stream.contract.runs import PublishManifest
from khala_stream.db.engine import create_engine, init_db
from khala_stream.db.importer_tables import APPLIED
from producers.export_reader import RejectedLine, open_export
from producers.ledger import mark_unchanged, stored_hashes
from tests.e2e.harness import khala, ok
from tests.e2e.snapshot import assert_same_tables, table_snapshot
from tests.e2e.stages import (
    MakeStages,
    Stages,
    baseline,
    describe,
    generated_export,
    latest_run,
    run_counters,
    stage_env,
)

CI_SEEDS = (11, 12)
# (partitions, workers of each stage, seed): two corners of the grid in CI (the shuffled case
# below runs 3 partitions and 2 workers); `make stress` runs the whole grid for every seed.
CI_GRID = ((1, 1, 11), (12, 3, 12))
USERS = 12  # every edge case of the generator is there whatever the size; keep CI quick
TIMEOUT_S = 180.0

# Children before parents: every table after the tables that depend on it, lines reversed.
CHILDREN_FIRST = ("receipts", "messages", "runs", "blueprints", "threads", "users")

# Each case starts processes and waits on them with its own deadlines (TIMEOUT_S per wait).
# The cases below are the CI subset; tests/stress/test_stress.py runs them all, many seeds.
pytestmark = pytest.mark.timeout(900)


# --------------------------------------------------------------------------- documents


@dataclass(frozen=True, slots=True)
class Document:
    """One export line as the publisher sends it."""

    table: str
    key: str
    line: int
    raw: bytes
    digest: str
    doc_id: str | None


@dataclass(frozen=True, slots=True)
class ExportDocuments:
    sha256: str
    snapshot_ms: int
    documents: list[Document]
    source: dict[str, int]
    """Parsed lines per table (rejected lines and lines without a key excluded / included as
    the publisher counts them)."""


def read_documents(export: Path) -> ExportDocuments:
    """The export's documents in file order, with the publisher's keys and hashes."""
    documents: list[Document] = []
    source: Counter[str] = Counter()
    with open_export(export) as opened:
        sha256, snapshot_ms = opened.sha256(), opened.snapshot_ms or 0
        for table in CHILDREN_FIRST[::-1]:
            for item in opened.iter_table(table):
                if isinstance(item, RejectedLine):
                    continue
                source[table] += 1
                digest = document_hash(item.doc)
                key = document_key(table, item.doc, digest)
                if key is None:
                    continue  # the publisher sets it aside; it is not part of `published`
                doc_id = item.doc.get("_id")
                documents.append(
                    Document(
                        table=table,
                        key=key,
                        line=item.line,
                        raw=item.raw,
                        digest=digest,
                        doc_id=doc_id if isinstance(doc_id, str) else None,
                    )
                )
    return ExportDocuments(sha256, snapshot_ms, documents, dict(source))


def children_first(docs: Sequence[Document]) -> list[Document]:
    """All receipts, then messages, runs, blueprints, threads, users; each table reversed."""
    by_table = {t: [d for d in docs if d.table == t] for t in CHILDREN_FIRST}
    return [d for t in CHILDREN_FIRST for d in reversed(by_table[t])]


def shuffled(docs: Sequence[Document], seed: int) -> list[Document]:
    out = list(docs)
    random.Random(seed).shuffle(out)
    return out


async def _prepare(
    kafka: KafkaSettings, prefix: str, db_url: str, sha256: str, *, incremental: bool
) -> int:
    """Topics and tables exist, and a run is registered as the publisher would register it."""
    await ensure_topics(kafka, Topics(prefix).all)
    engine = create_engine(db_url)
    try:
        await init_db(engine)
        return await import_runs.register(
            engine,
            source="test-crafted-order",
            sha256=sha256,
            options=import_runs.RunOptions(incremental=incremental),
        )
    finally:
        await engine.dispose()


async def _applied(db_url: str, run_id: int) -> dict[str, int]:
    engine = create_engine(db_url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                sa.select(APPLIED.c.source_table, APPLIED.c.applied).where(
                    APPLIED.c.run_id == run_id
                )
            )
            return {t: int(n) for t, n in rows.all()}
    finally:
        await engine.dispose()


async def _wait_store(
    db_url: str, run_id: int, wanted: dict[str, int], stages: Stages, timeout: float
) -> None:
    """Until the processors have applied `wanted` messages per table of this run."""
    deadline = time.monotonic() + timeout
    while True:
        applied = await _applied(db_url, run_id)
        if all(applied.get(t, 0) >= n for t, n in wanted.items()):
            return
        dead = stages.dead()
        if dead or time.monotonic() > deadline:
            raise AssertionError(
                f"processors applied {applied}, wanted {wanted} ({'; '.join(dead) or 'timeout'})"
                f"\n{stages.tails()}"
            )
        await asyncio.sleep(0.1)


async def produce(
    kafka: KafkaSettings,
    prefix: str,
    run_id: int,
    export: ExportDocuments,
    order: Sequence[Document],
    *,
    ledger_url: str | None = None,
    pause_after: Callable[[int, Document], bool] | None = None,
    wait: Callable[[dict[str, int]], Awaitable[None]] | None = None,
) -> dict[str, int]:
    """Send `order` to the source topics exactly as the publisher would (key, headers, bytes);
    returns the messages sent per table (the run's `published`).

    With `ledger_url`, publishing is incremental as in `producers/publisher.py`: a document
    whose content hash the store already holds is marked as part of this run in the store
    (`mark_unchanged`) instead of being sent, one document at a time here. When
    `pause_after(i, doc)` is true, everything sent so far is flushed and `wait(sent)` awaited.
    """
    topics = Topics(prefix)
    producer = make_producer(kafka)
    engine = create_engine(ledger_url) if ledger_url is not None else None
    await producer.start()
    sent: Counter[str] = Counter()
    try:
        futures = []
        for i, d in enumerate(order):
            if engine is not None:
                known = await stored_hashes(engine, d.table, [d.key])
                if known.get(d.key) == d.digest:
                    marked = await mark_unchanged(
                        engine, d.table, run_id, [(d.key, d.digest, d.line)]
                    )
                    if (d.key, d.line) in marked.unchanged:
                        continue
            provenance = Provenance(
                export_sha256=export.sha256,
                run_id=run_id,
                table=d.table,
                line=d.line,
                doc_id=d.doc_id,
                content_hash=d.digest,
            )
            futures.append(
                await producer.send(
                    topics.source(d.table),
                    d.raw,
                    key=d.key.encode(),
                    headers=document_headers(provenance),
                )
            )
            sent[d.table] += 1
            if pause_after is not None and wait is not None and pause_after(i, d):
                await asyncio.gather(*futures)
                futures = []
                await wait(dict(sent))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
        if engine is not None:
            await engine.dispose()
    return dict(sent)


async def mark_published(
    db_url: str, run_id: int, export: ExportDocuments, published: dict[str, int]
) -> None:
    """What `producers/publisher.py` records once every document is sent."""
    engine = create_engine(db_url)
    try:
        await import_runs.mark_published(
            engine,
            run_id,
            manifest=PublishManifest(
                run_id=run_id,
                export_sha256=export.sha256,
                published=published,
                source=dict(export.source),
            ),
            snapshot_ms=export.snapshot_ms,
        )
    finally:
        await engine.dispose()


# --------------------------------------------------------------------------- cases


def check_same_as_baseline(
    db_url: str,
    expected_tables: dict[str, list[tuple[object, ...]]],
    expected_counters: dict[str, int],
    stages: Stages,
    context: str,
) -> None:
    actual = table_snapshot(db_url)
    try:
        assert_same_tables(expected_tables, actual, context=context)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stages.tails()}") from None
    counters = run_counters(latest_run(db_url))
    assert counters == expected_counters, (
        f"{context}: counters differ from the baseline: {counters} != {expected_counters}"
        f"\n{stages.tails()}"
    )


def run_grid_case(
    *,
    seed: int,
    partitions: int,
    workers: int,
    users: int,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    make_stages: MakeStages,
    export_dir: Path,
) -> None:
    """The stages as processes with `partitions` and `workers`; end state = baseline."""
    export = generated_export(export_dir, seed=seed, users=users)
    expected = baseline(export, kafka_bootstrap=kafka_bootstrap, pg_admin_url=pg_admin_url)
    env = stage_env(kafka_bootstrap, topic_prefix, pg_url, partitions=partitions)
    stages = make_stages(env, workers_process=workers, workers_sink=workers)
    context = describe(seed, users=users, partitions=partitions, workers=workers)
    stages.context = context
    stages.start()
    stages.publish(export)
    stages.wait_applied(pg_url, TIMEOUT_S)
    check_same_as_baseline(pg_url, expected.snapshot, expected.counters, stages, context)


def run_crafted_order_case(
    *,
    seed: int,
    order_name: str,
    partitions: int,
    workers: int,
    users: int,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    make_stages: MakeStages,
    export_dir: Path,
) -> None:
    """Documents produced by the test in a chosen order; end state = baseline.

    "children-first" and "shuffled" are produced before any processor runs; "staged" sends
    one table at a time, children first, and waits until the running processors have stored
    each table before sending the next, so that parents really arrive after their children.
    """
    export_path = generated_export(export_dir, seed=seed, users=users)
    expected = baseline(export_path, kafka_bootstrap=kafka_bootstrap, pg_admin_url=pg_admin_url)
    export = read_documents(export_path)
    env = stage_env(kafka_bootstrap, topic_prefix, pg_url, partitions=partitions)
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap, partitions=partitions)
    stages = make_stages(env, workers_process=workers, workers_sink=workers)
    context = describe(seed, users=users, order=order_name, partitions=partitions, workers=workers)
    stages.context = context

    run_id = asyncio.run(_prepare(kafka, topic_prefix, pg_url, export.sha256, incremental=False))
    if order_name == "staged":
        stages.start()
        order = children_first(export.documents)
        boundaries = {i for i, (a, b) in enumerate(itertools.pairwise(order)) if a.table != b.table}

        def wait(sent: dict[str, int]) -> Awaitable[None]:
            return _wait_store(pg_url, run_id, sent, stages, TIMEOUT_S)

        published = asyncio.run(
            produce(
                kafka,
                topic_prefix,
                run_id,
                export,
                order,
                pause_after=lambda i, _d: i in boundaries,
                wait=wait,
            )
        )
    else:
        order = (
            children_first(export.documents)
            if order_name == "children-first"
            else shuffled(export.documents, seed)
        )
        published = asyncio.run(produce(kafka, topic_prefix, run_id, export, order))
    asyncio.run(mark_published(pg_url, run_id, export, published))
    stages.start()  # no-op for the workers already running
    stages.wait_applied(pg_url, TIMEOUT_S, run_id=run_id)
    check_same_as_baseline(pg_url, expected.snapshot, expected.counters, stages, context)


def run_reimport_case(
    *,
    seed: int,
    interleaving: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    make_stages: MakeStages,
    export_dir: Path,
) -> None:
    """An incremental re-import of the same export ends where one import ends, whatever the
    interleaving of the publisher's ledger marks and the processors' writes.

    The export has keys on two lines (SPEC §8.2: the last line wins). On the re-import the
    earlier line differs from the stored (last) version and is sent; the last line is
    unchanged and is marked in the store instead. "applied-between": the processors store the
    earlier line before the publisher looks at the last one; "applied-after": the processors
    start only once everything is published.
    """
    export_path = generated_export(export_dir, seed=seed, users=USERS)
    expected = baseline(export_path, kafka_bootstrap=kafka_bootstrap, pg_admin_url=pg_admin_url)
    export = read_documents(export_path)
    partitions = 3
    env = stage_env(kafka_bootstrap, topic_prefix, pg_url, partitions=partitions)
    ok(khala(["import-chat", str(export_path)], env, timeout=300))
    context = describe(seed, users=USERS, case=f"re-import, duplicate keys, {interleaving}")
    assert_same_tables(
        expected.snapshot, table_snapshot(pg_url), context=context + ", first import"
    )

    stages = make_stages(env, workers_process=1, workers_sink=1)
    stages.context = context
    if interleaving == "applied-between":
        stages.start()
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap, partitions=partitions)
    run_id = asyncio.run(_prepare(kafka, topic_prefix, pg_url, export.sha256, incremental=True))
    keys = Counter((d.table, d.key) for d in export.documents)
    repeated = {k for k, n in keys.items() if n > 1}
    assert repeated, "the generator's edge cases must hold duplicate keys"

    def wait(sent: dict[str, int]) -> Awaitable[None]:
        return _wait_store(pg_url, run_id, sent, stages, TIMEOUT_S)

    published = asyncio.run(
        produce(
            kafka,
            topic_prefix,
            run_id,
            export,
            export.documents,
            ledger_url=pg_url,
            pause_after=(
                (lambda _i, d: (d.table, d.key) in repeated)
                if interleaving == "applied-between"
                else None
            ),
            wait=wait,
        )
    )
    # Only lines of repeated keys can differ from the store: the others are marked, not sent.
    assert 0 < sum(published.values()) <= sum(keys[k] for k in repeated), published
    asyncio.run(mark_published(pg_url, run_id, export, published))
    stages.start()
    stages.wait_applied(pg_url, TIMEOUT_S, run_id=run_id)
    actual = table_snapshot(pg_url)
    try:
        assert_same_tables(expected.snapshot, actual, context=context)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stages.tails()}") from None


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    ("partitions", "workers", "seed"), CI_GRID, ids=[f"p{p}w{w}-s{s}" for p, w, s in CI_GRID]
)
def test_partitions_and_workers_do_not_change_the_end_state(
    seed: int,
    partitions: int,
    workers: int,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    make_stages: MakeStages,
    export_dir: Path,
) -> None:
    run_grid_case(
        seed=seed,
        partitions=partitions,
        workers=workers,
        users=USERS,
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        pg_url=pg_url,
        pg_admin_url=pg_admin_url,
        make_stages=make_stages,
        export_dir=export_dir,
    )


@pytest.mark.parametrize(
    ("order_name", "seed", "partitions", "workers"),
    [("children-first", 11, 3, 1), ("shuffled", 12, 3, 2), ("staged", 11, 3, 1)],
    ids=["children-first", "shuffled", "staged"],
)
def test_children_before_parents_end_as_if_in_order(
    order_name: str,
    seed: int,
    partitions: int,
    workers: int,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    make_stages: MakeStages,
    export_dir: Path,
) -> None:
    run_crafted_order_case(
        seed=seed,
        order_name=order_name,
        partitions=partitions,
        workers=workers,
        users=USERS,
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        pg_url=pg_url,
        pg_admin_url=pg_admin_url,
        make_stages=make_stages,
        export_dir=export_dir,
    )


def test_reimport_with_duplicate_keys_across_batches(
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    make_stages: MakeStages,
    export_dir: Path,
) -> None:
    run_reimport_case(
        seed=CI_SEEDS[0],
        interleaving="applied-between",
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        pg_url=pg_url,
        pg_admin_url=pg_admin_url,
        make_stages=make_stages,
        export_dir=export_dir,
    )
