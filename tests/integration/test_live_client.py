"""The live source client against the fake deployment on 127.0.0.1 (a real HTTP server):
endpoints and auth header, page shapes, retries that honour Retry-After, a refused key, an
answer of the wrong shape, an expired snapshot."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from khala_stream.errors import DeployKeyError, SourceAnswerError, SourceUnreachable
from producers.generator import generate_export
from producers.live_api import Cursor, LiveValue
from producers.live_client import CursorExpired, LiveClient, SnapshotExpired
from tests.fakes.khala_server import (
    DOCUMENT_DELTAS,
    JSON_SCHEMAS,
    LIST_SNAPSHOT,
    FakeKhala,
    Reply,
)

T = TypeVar("T")
T0 = 1_780_000_000


def _run(coro: Awaitable[T]) -> T:
    async def go() -> T:
        return await coro

    return asyncio.run(go())


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeKhala]:
    export = generate_export(tmp_path / "edge.zip", users=3, seed=5, edge_cases=True).path
    with FakeKhala(page_size=4, delta_page_size=3) as server:
        server.load_export(export, ts_s=T0)
        yield server


def _client(fake: FakeKhala, key: str | None = None, deadline_s: float = 30) -> LiveClient:
    return LiveClient(
        base_url=fake.base_url,
        deploy_key=key or fake.deploy_key,
        deadline_s=deadline_s,
        backoff_base_s=0.05,
    )


async def _walk(client: LiveClient, table: str, snapshot: Cursor) -> list[LiveValue]:
    values: list[LiveValue] = []
    cursor: Cursor | None = None
    while True:
        page = await client.snapshot_page(table, snapshot=snapshot, cursor=cursor)
        assert page.snapshot == snapshot
        values += page.values
        cursor = page.cursor
        if not page.has_more:
            return values


def test_snapshot_then_deltas_with_the_key_in_the_convex_header(fake: FakeKhala) -> None:
    async def go() -> None:
        async with _client(fake) as client:
            tables = await client.tables()
            assert {"users", "threads", "messages", "blueprints"} <= set(tables)
            first = await client.snapshot_page(None, snapshot=None, cursor=None)
            snapshot = first.snapshot
            users = await _walk(client, "users", snapshot)
            assert {v.doc_id for v in users} == set(fake.state()["users"])
            assert all(v.ts == T0 * 10**9 and not v.deleted for v in users)
            assert all("_table" not in v.document and "_ts" not in v.document for v in users)
            assert users[0].document == fake.get("users", users[0].doc_id)

            doc = fake.get("users", users[0].doc_id)
            doc["name"] = "Changed"
            gone = users[1].doc_id
            fake.commit(ts_s=T0 + 2, put=[("users", doc)], delete=[("users", gone)])
            page = await client.deltas(snapshot)
            assert [(v.doc_id, v.deleted) for v in page.values] == [
                (doc["_id"], False),
                (gone, True),
            ]
            assert page.values[1].document == {}
            assert page.cursor == (T0 + 2) * 10**9 and not page.has_more
            assert (await client.deltas(page.cursor)).values == []

    _run(go())
    for request in fake.requests:
        assert request.authorization == f"Convex {fake.deploy_key}"
        assert request.params["format"] == "json"
    assert fake.requests_to(JSON_SCHEMAS)[0].params["deltaSchema"] == "true"


def test_pages_rendered_ahead_are_the_pages_served_until_the_next_commit(
    fake: FakeKhala, tmp_path: Path
) -> None:
    """The bench's fake serves its snapshot pages encoded ahead; they must be the pages the
    fake works out on request, and a commit must not leave them served."""
    export = generate_export(tmp_path / "edge.zip", users=3, seed=5, edge_cases=True).path

    async def walks(server: FakeKhala) -> dict[str, list[LiveValue]]:
        async with _client(server) as client:
            snapshot = (await client.snapshot_page(None, snapshot=None, cursor=None)).snapshot
            return {t: await _walk(client, t, snapshot) for t in await client.tables()}

    fake.prepare_snapshot(render=True)
    rendered = _run(walks(fake))
    with FakeKhala(page_size=4, delta_page_size=3) as plain:
        plain.load_export(export, ts_s=T0)
        assert rendered == _run(walks(plain))
    assert sum(map(len, rendered.values())) == sum(map(len, fake.state().values()))
    user = rendered["users"][0]
    fake.commit(ts_s=T0 + 2, put=[("users", {**user.document, "name": "After"})])
    after = _run(walks(fake))["users"]
    assert [v.document.get("name") for v in after if v.doc_id == user.doc_id] == ["After"]


def test_a_wrong_key_is_a_deploy_key_error_without_the_key(fake: FakeKhala) -> None:
    async def go() -> None:
        async with _client(fake, key="not-the-key") as client:
            await client.tables()

    with pytest.raises(DeployKeyError) as caught:
        _run(go())
    assert caught.value.exit_code == 2
    assert "not-the-key" not in str(caught.value)
    assert "401" in str(caught.value)
    assert "not-the-key" not in repr(_client(fake, key="not-the-key"))


def test_throttling_and_server_errors_are_waited_out_honouring_retry_after(
    fake: FakeKhala,
) -> None:
    fake.script(
        DOCUMENT_DELTAS,
        Reply(429, {"code": "RateLimited", "message": "slow down"}, {"Retry-After": "1"}),
        Reply(500, {"code": "Internal", "message": "oops"}),
        Reply(503, None),
    )

    async def go() -> tuple[float, int]:
        async with _client(fake) as client:
            started = time.monotonic()
            page = await client.deltas(fake.now)
            assert page.values == [] and page.cursor == fake.now
            return time.monotonic() - started, client.retries

    elapsed, retries = _run(go())
    assert retries == 3
    assert elapsed >= 1.0  # the Retry-After second was honoured
    statuses = [r.status for r in fake.requests_to(DOCUMENT_DELTAS)]
    assert statuses == [429, 500, 503, 200]


def test_failing_past_the_deadline_is_source_unreachable(fake: FakeKhala) -> None:
    fake.script(LIST_SNAPSHOT, *[Reply(502, None)] * 100)

    async def go() -> None:
        async with _client(fake, deadline_s=0.6) as client:
            await client.snapshot_page("users", snapshot=None, cursor=None)

    started = time.monotonic()
    with pytest.raises(SourceUnreachable) as caught:
        _run(go())
    assert 0.5 <= time.monotonic() - started < 5
    assert caught.value.exit_code == 1
    assert "/api/list_snapshot" in str(caught.value) and "HTTP 502" in str(caught.value)


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        (DOCUMENT_DELTAS, {"values": 3, "cursor": 1, "hasMore": False}, "values that are not"),
        (DOCUMENT_DELTAS, {"values": [], "hasMore": False}, "without cursor"),
        (DOCUMENT_DELTAS, {"values": [{"_id": "a", "_ts": 1}], "cursor": 1, "hasMore": False},
         "values[0] without a string _table"),
        (LIST_SNAPSHOT, {"values": [], "cursor": None, "hasMore": "no", "snapshot": 1},
         "hasMore that is not"),
        (LIST_SNAPSHOT, [1, 2], "other than a JSON object"),
        (JSON_SCHEMAS, ["users"], "an object of tables"),
    ],
)  # fmt: skip
def test_an_answer_of_another_shape_names_the_endpoint(
    fake: FakeKhala, path: str, body: object, words: str
) -> None:
    fake.script(path, Reply(200, body))

    async def go() -> None:
        async with _client(fake) as client:
            if path == DOCUMENT_DELTAS:
                await client.deltas(0)
            elif path == LIST_SNAPSHOT:
                await client.snapshot_page("users", snapshot=None, cursor=None)
            else:
                await client.tables()

    with pytest.raises(SourceAnswerError) as caught:
        _run(go())
    assert f"GET {path} answered" in str(caught.value)
    assert words in str(caught.value)


def test_an_expired_snapshot_or_cursor_says_so_and_an_unknown_status_is_an_answer_error(
    fake: FakeKhala,
) -> None:
    fake.expired.add(fake.now)
    fake.deltas_kept_after = fake.now
    fake.script(DOCUMENT_DELTAS, Reply(404, {"code": "NotFound", "message": "?"}))

    async def go() -> None:
        async with _client(fake) as client:
            with pytest.raises(SnapshotExpired):
                await client.snapshot_page("users", snapshot=fake.now, cursor=None)
            with pytest.raises(SourceAnswerError, match="HTTP 404 \\(NotFound\\)"):
                await client.deltas(0)  # the scripted answer comes first
            with pytest.raises(CursorExpired):
                await client.deltas(fake.now - 1)

    _run(go())
