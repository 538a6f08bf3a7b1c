"""What `follow` keeps of a deployment (producers/live_mirror.py), on both databases: whatever
order and pages the versions of documents arrive in (a version twice, a deletion before an
older version), the mirror holds the latest version of each, and writes it out as an export
lists it (`_creationTime`, then `_id`, deleted ones left out)."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream.db.importer_tables import FOLLOW, SOURCE_DOCUMENTS
from producers import live_mirror
from producers.live_api import LiveValue, export_order
from tests.contract.engine import run_on

DEPLOYMENT = "http://127.0.0.1:1"
S = 1_000


def _value(table: str, doc_id: str, ts: int, version: int, deleted: bool) -> LiveValue:
    created = float(hash((table, doc_id)) % 7)  # ties on _creationTime: _id decides
    document = {"_id": doc_id, "_creationTime": created, "v": version}
    return LiveValue(
        table=table,
        doc_id=doc_id,
        ts=ts,
        deleted=deleted,
        creation_time=0.0 if deleted else created,
        document={} if deleted else document,
    )


# Per document, a history of versions (ts ascending); the last may be a deletion.
_HISTORIES = st.lists(
    st.tuples(
        st.sampled_from(["users", "threads", "lightningInvoices"]),
        st.sampled_from(["a", "b", "c", "É", "z1", "Z"]),
        st.integers(min_value=1, max_value=4),
        st.booleans(),
    ),
    min_size=1,
    max_size=12,
    unique_by=lambda h: (h[0], h[1]),
)


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(histories=_HISTORIES, seed=st.integers(0, 2**16))
def test_any_arrival_order_keeps_the_latest_version(
    db_url: str, tmp_path: Path, histories: list[tuple[str, str, int, bool]], seed: int
) -> None:
    rng = random.Random(seed)
    values: list[LiveValue] = []
    latest: dict[tuple[str, str], LiveValue] = {}
    for table, doc_id, versions, deleted_last in histories:
        for v in range(versions):
            gone = deleted_last and v == versions - 1 and v > 0
            value = _value(table, doc_id, S + 10 * v + rng.randint(0, 9), v, gone)
            values.append(value)
            latest[(table, doc_id)] = value
    snapshot = [v for v in values if rng.random() < 0.5 and not v.deleted]
    deltas = list(values)
    rng.shuffle(deltas)  # a page may bring an older version after a newer one

    async def body(engine: AsyncEngine) -> None:
        async with engine.begin() as conn:  # the database is the test's, not the example's
            await conn.execute(sa.delete(FOLLOW))
            await conn.execute(sa.delete(SOURCE_DOCUMENTS))
        await live_mirror.start_snapshot(engine, DEPLOYMENT, S)
        for table in ("users", "threads"):
            mine = [v for v in snapshot if v.table == table]
            await live_mirror.apply_snapshot_page(engine, DEPLOYMENT, table, mine, "c", True)
        await live_mirror.finish_snapshot(engine, DEPLOYMENT)
        cut = rng.randint(0, len(deltas))
        for page in (deltas[:cut], deltas[cut:]):
            await live_mirror.apply_delta_page(
                engine, DEPLOYMENT, page, S + 100, ["users", "threads"]
            )
        out = tmp_path / f"export-{seed}"
        await live_mirror.write_folder(engine, ["users", "threads"], out, (S + 100) * 10**9)
        for table in ("users", "threads"):
            expected = sorted(
                (v.document for (t, _), v in latest.items() if t == table and not v.deleted),
                key=export_order,
            )
            lines = (out / table / "documents.jsonl").read_bytes().splitlines()
            assert [orjson.loads(line) for line in lines] == expected
            ids = await live_mirror.document_ids(engine, table)
            assert ids == {i: v.deleted for (t, i), v in latest.items() if t == table}
        state = await live_mirror.load_state(engine, DEPLOYMENT)
        assert state is not None and state.phase == "deltas" and state.delta_cursor == S + 100
        assert (out / "users" / "documents.jsonl").stat().st_mtime_ns == (S + 100) * 10**9

    run_on(db_url, body)
