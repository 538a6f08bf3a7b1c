"""Issue 25: touched-only derivation. `follow` of the fake (a `generate --edge-cases` export),
then random batches of changes at the source: after every batch the ten Laravel tables equal
a merge import of a ZIP of the source's state into a second database (a full derivation of
the same documents), and a batch a scoped derivation may take did take it (its run's summary
names the threads it derived), while one it may not (a user or blueprint changed, a message
moved to another thread, a new owner, documents that vanished earlier and are kept in a table
published whole) did not. Every batch is published as an amendment of the run before (only
what changed), except one whose new message comes before the last in file order, which is
published whole.
"""

from __future__ import annotations

import asyncio
import copy
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from khala_stream.contract.codec import decode_manifest, decode_summary
from khala_stream.contract.runs import PublishManifest
from khala_stream.db.engine import create_engine
from khala_stream.db.importer_tables import RUNS
from processors import store
from tests.e2e.harness import ok, rows, run_db
from tests.e2e.stages import MakeStages, fresh_database, generated_export, stage_env
from tests.e2e.test_follow import KEY, T0, Mirror, _compare, _follow
from tests.fakes.khala_server import FakeKhala

pytestmark = pytest.mark.timeout(600)

Docs = dict[str, dict[str, dict[str, Any]]]
Commit = tuple[list[tuple[str, dict[str, Any]]], list[tuple[str, str]]]
"""What one kind of change commits at the source: documents put, (table, _id)s deleted."""


@pytest.fixture
def fake(export_dir: Path) -> Iterator[FakeKhala]:
    export = generated_export(export_dir, seed=31, users=4)
    with FakeKhala(deploy_key=KEY, page_size=50, delta_page_size=20) as server:
        server.load_export(export, ts_s=T0)
        yield server


class Source:
    """The fake's state with the derived threads of the followed database: changes are made
    to documents whose rows a derivation writes, so that they reach something."""

    def __init__(self, fake: FakeKhala, db_url: str, step: int) -> None:
        self.state: Docs = fake.state()
        self.now = (T0 + 10 * step) * 1000
        self.step = step
        derived = {t["id"] for t in rows(db_url, "threads")}
        self.threads = sorted(
            (d for d in self.state["threads"].values() if d.get("threadId") in derived),
            key=lambda d: d["_id"],
        )

    def of_threads(self, table: str, key: str) -> list[dict[str, Any]]:
        """Documents of `table` in derived threads whose `key` no other document shares."""
        threads = {t["threadId"] for t in self.threads}
        docs = self.state[table].values()
        seen: dict[Any, int] = {}
        for d in docs:
            seen[d.get(key)] = seen.get(d.get(key), 0) + 1
        return sorted(
            (
                d
                for d in docs
                if d.get("threadId") in threads
                and isinstance(d.get(key), str)
                and seen[d[key]] == 1
            ),
            key=lambda d: d["_id"],
        )

    def uuid(self, n: int) -> str:
        return f"{self.step:08x}-0000-4000-8000-{n:012x}"


Change = Callable[[Source, random.Random], Commit]


def new_messages(s: Source, rng: random.Random) -> Commit:
    puts = []
    for n in range(rng.randint(1, 3)):
        thread = rng.choice(s.threads)
        puts.append(("messages", {
            "_id": f"msg_{s.step}_{n}", "_creationTime": s.now + n, "threadId": thread["threadId"],
            "messageId": s.uuid(100 + n), "role": rng.choice(["user", "assistant"]),
            "status": "final", "text": f"step {s.step} message {n}", "createdAtMs": s.now + n,
            "updatedAtMs": s.now + n,
        }))  # fmt: skip
    return puts, []


def edit_message(s: Source, rng: random.Random) -> Commit:
    message = rng.choice(s.of_threads("messages", "messageId"))
    return [("messages", {**message, "text": f"edited in step {s.step}", "updatedAtMs": s.now})], []


def edit_run(s: Source, rng: random.Random) -> Commit:
    run = rng.choice(s.of_threads("runs", "runId"))
    status = rng.choice(["canceled", "final", "error"])
    return [("runs", {**run, "status": status, "updatedAtMs": s.now})], []


def edit_receipt(s: Source, rng: random.Random) -> Commit:
    receipt = rng.choice(s.of_threads("receipts", "_id"))
    return [("receipts", {**receipt, "json": {"step": s.step}})], []


def new_thread_of_an_owner(s: Source, rng: random.Random) -> Commit:
    owner = rng.choice(s.threads)["ownerId"]
    thread = s.uuid(200)
    return [
        ("threads", {"_id": f"thr_{s.step}", "_creationTime": s.now, "threadId": thread,
                     "ownerId": owner, "createdAtMs": s.now, "updatedAtMs": s.now}),
        ("messages", {"_id": f"thr_msg_{s.step}", "_creationTime": s.now + 1, "threadId": thread,
                      "messageId": s.uuid(201), "role": "user", "status": "final",
                      "text": f"a new thread in step {s.step}", "createdAtMs": s.now + 1}),
    ], []  # fmt: skip


def delete_message(s: Source, rng: random.Random) -> Commit:
    return [], [("messages", rng.choice(s.of_threads("messages", "messageId"))["_id"])]


def delete_run(s: Source, rng: random.Random) -> Commit:
    return [], [("runs", rng.choice(s.of_threads("runs", "runId"))["_id"])]


def delete_receipt(s: Source, rng: random.Random) -> Commit:
    return [], [("receipts", rng.choice(s.of_threads("receipts", "_id"))["_id"])]


def repeat_a_key(s: Source, rng: random.Random) -> Commit:
    """A new message with the key of an existing one: the later line is the key's winner."""
    message = rng.choice(s.of_threads("messages", "messageId"))
    return [("messages", {**message, "_id": f"dup_{s.step}", "_creationTime": s.now,
                          "text": f"a later line of its key, step {s.step}"})], []  # fmt: skip


def delete_a_repeated_key(s: Source, rng: random.Random) -> Commit:
    """The later line of a repeated key goes: the earlier one is the key's winner again."""
    later = sorted(i for i in s.state["messages"] if i.startswith("dup_"))
    return [], [("messages", rng.choice(later))]


def rekey_message(s: Source, rng: random.Random) -> Commit:
    """A message takes another key: its old key is gone, its new one new."""
    message = rng.choice(s.of_threads("messages", "messageId"))
    return [("messages", {**message, "messageId": s.uuid(500), "updatedAtMs": s.now})], []


def backdated_message(s: Source, rng: random.Random) -> Commit:
    """A new message whose `_creationTime` is older than the newest document's: it takes a
    line before others, so the state is published whole."""
    thread = rng.choice(s.threads)
    return [("messages", {
        "_id": f"msg_old_{s.step}", "_creationTime": T0 * 1000 - 5, "threadId": thread["threadId"],
        "messageId": s.uuid(400), "role": "user", "status": "final",
        "text": f"step {s.step}, dated before", "createdAtMs": s.now,
    })], []  # fmt: skip


def move_message(s: Source, rng: random.Random) -> Commit:
    message = rng.choice(s.of_threads("messages", "messageId"))
    other = rng.choice([t for t in s.threads if t["threadId"] != message["threadId"]])
    return [("messages", {**message, "threadId": other["threadId"], "updatedAtMs": s.now})], []


def new_thread_of_a_new_owner(s: Source, rng: random.Random) -> Commit:
    return [("threads", {"_id": f"thr_new_{s.step}", "_creationTime": s.now,
                         "threadId": s.uuid(300), "ownerId": f"user_01NEWOWNER{s.step:06d}",
                         "createdAtMs": s.now})], []  # fmt: skip


def change_user(s: Source, rng: random.Random) -> Commit:
    user = rng.choice(sorted(s.state["users"].values(), key=lambda d: d["_id"]))
    return [("users", {**user, "name": f"Renamed in step {s.step}", "updatedAtMs": s.now})], []


def change_blueprint(s: Source, rng: random.Random) -> Commit:
    with_docs = [
        b
        for b in sorted(s.state["blueprints"].values(), key=lambda d: d["_id"])
        if isinstance(b.get("blueprint"), dict) and isinstance(b["blueprint"].get("docs"), dict)
    ]
    blueprint = copy.deepcopy(rng.choice(with_docs))
    blueprint["blueprint"]["docs"]["identity"] = {"vibe": f"step {s.step}"}
    blueprint["updatedAtMs"] = s.now
    return [("blueprints", blueprint)], []


SCOPED: tuple[Change, ...] = (
    new_messages, edit_message, edit_run, edit_receipt, new_thread_of_an_owner
)  # fmt: skip
DELETES: tuple[Change, ...] = (delete_message, delete_run, delete_receipt)
KEYS: tuple[Change, ...] = (repeat_a_key, delete_a_repeated_key, rekey_message, backdated_message)
FULL: tuple[Change, ...] = (
    move_message, new_thread_of_a_new_owner, change_user, change_blueprint
)  # fmt: skip


def _statistics_hold(db_url: str, manifest: PublishManifest, propagate: bool) -> None:
    """The last run's recorded document statistics (counted from the run before's and its
    own changes when it could) are those of the whole store (the vanished ones before the
    run deleted them, with --propagate-deletes)."""
    (((counters,),),) = run_db(
        db_url, [sa.select(RUNS.c.counters).where(RUNS.c.id == manifest.run_id)]
    )
    recorded = decode_summary(counters, run_id=manifest.run_id).documents

    async def count() -> dict[str, dict[str, int]]:
        engine = create_engine(db_url)
        try:
            async with engine.connect() as conn:
                counted = await store.table_changes(
                    conn, manifest.run_id, list(recorded), manifest.generations()
                )
        finally:
            await engine.dispose()
        return {t: asdict(c) for t, c in counted.items()}

    def kept(stats: dict[str, int]) -> dict[str, int]:
        return {k: v for k, v in stats.items() if not (propagate and k == "deleted")}

    counted = asyncio.run(count())
    differ = {
        t: (recorded[t], counted[t]) for t in recorded if kept(recorded[t]) != kept(counted[t])
    }
    assert not differ, f"run {manifest.run_id} ({manifest}): recorded, counted: {differ}"


def _last_run(db_url: str) -> tuple[int | None, PublishManifest]:
    """The last run's scoped threads and manifest."""
    query = sa.select(RUNS.c.id, RUNS.c.counters, RUNS.c.expected, RUNS.c.export_sha256)
    ((run_id, counters, expected, sha),) = run_db(
        db_url, [query.order_by(RUNS.c.id.desc()).limit(1)]
    )[0]
    assert counters is not None, f"run {run_id} is not derived"
    manifest = decode_manifest(expected, run_id=run_id, export_sha256=sha)
    return decode_summary(counters, run_id=run_id).scoped_threads, manifest


@pytest.mark.parametrize("propagate", [False, True], ids=["merge", "propagate-deletes"])
def test_each_batch_derives_what_a_full_derivation_does_scoped_when_it_may(
    fake: FakeKhala,
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    make_stages: MakeStages,
    propagate: bool,
) -> None:
    rng = random.Random(2025 + propagate)
    flags = ("--propagate-deletes",) if propagate else ()
    env = stage_env(kafka_bootstrap, topic_prefix, pg_url)
    stages = make_stages(env).start()
    # Scoped batches first, then deletes, then the ones that need a full derivation, each
    # followed by a scoped one: the scoped path is taken again after a full derivation.
    plan: list[list[Change]] = [
        rng.sample(SCOPED, 2),
        [new_thread_of_an_owner, new_messages],
        # The edge-case export has messages without their key, so no message is deleted
        # even with --propagate-deletes (SPEC §3.14): a deleted message stays in the store,
        # and every later run is derived in full. Runs and receipts go.
        [rng.choice(DELETES[1:] if propagate else DELETES), edit_message],
        [edit_run, edit_receipt],
        [repeat_a_key, rekey_message],
        [delete_a_repeated_key, edit_run],
        [backdated_message, edit_run],
        *([f, rng.choice(SCOPED)] for f in rng.sample(FULL, len(FULL))),
        [new_messages],
    ]
    with fresh_database(pg_admin_url) as other:
        mirror = Mirror(tmp_path, kafka_bootstrap, other, flags)
        ok(_follow(env, fake, *flags))
        _compare(pg_url, mirror.import_state(fake), stages, "after the snapshot")
        assert _last_run(pg_url)[0] is None  # the first run: no run before it
        lingering: set[str] = set()  # tables with documents vanished and kept
        for step, changes in enumerate(plan, start=1):
            source = Source(fake, pg_url, step)
            puts: list[tuple[str, dict[str, Any]]] = []
            deletes: list[tuple[str, str]] = []
            for change in changes:
                put, delete = change(source, rng)
                puts += put
                deletes += delete
            fake.commit(ts_s=T0 + 10 * step, put=puts, delete=deletes)
            ok(_follow(env, fake, *flags))
            names = ", ".join(c.__name__ for c in changes)
            _compare(pg_url, mirror.import_state(fake), stages, f"after step {step} ({names})")
            scoped, manifest = _last_run(pg_url)
            _statistics_hold(pg_url, manifest, propagate)
            changed = {t for t, _ in puts} | {t for t, _ in deletes}
            whole = backdated_message in changes
            if whole:
                assert not manifest.patched, f"step {step} ({names}): amended"
            else:
                assert set(manifest.patched) == changed, f"step {step} ({names}): {manifest}"
                assert set(manifest.carried) == set(manifest.tables) - changed
            # A table published whole may bring back, unmarked, a document that vanished.
            read_whole = lingering - set(manifest.generations())
            may = all(c in SCOPED or c in DELETES or c in KEYS for c in changes)
            assert (scoped is not None) == (
                may and not read_whole
            ), f"step {step} ({names}): scoped={scoped}"
            # Kept: what vanished without --propagate-deletes, and messages always (the
            # export's keyless messages withhold their deletes); a new key leaves the old.
            vanished = {t for t, _ in deletes} | (
                {"messages"} if rekey_message in changes else set()
            )
            lingering |= {t for t in vanished if not propagate or t == "messages"}
