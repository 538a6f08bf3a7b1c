"""`counts`: the runbook's snapshot, and `--before` reporting exactly the rows added since."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from khala_app.counts import (
    LINKED_TABLES,
    RUNBOOK_TABLES,
    Snapshot,
    diff,
    load_snapshot,
    snapshot,
)
from khala_stream.db import TABLES, create_engine, init_db
from khala_stream.errors import UsageError
from tests.fixtures.services import cli_env


def run(db_url: str, body: Callable[[AsyncEngine], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        engine = create_engine(db_url)
        try:
            return await body(engine)
        finally:
            await engine.dispose()

    return asyncio.run(main())


def _id() -> str:
    return str(uuid.uuid4())


async def _insert(engine: AsyncEngine, rows: dict[str, list[dict[str, Any]]]) -> None:
    async with engine.begin() as conn:
        for table, values in rows.items():
            if values:
                await conn.execute(sa.insert(TABLES[table]), values)


def _user() -> dict[str, Any]:
    n = uuid.uuid4().hex[:12]
    return {"name": "User", "email": f"{n}@example.test", "workos_id": f"user_{n}", "avatar": ""}


def _rows(autopilot: str) -> dict[str, list[dict[str, Any]]]:
    """What a small import adds: 2 users, 1 autopilot, and chat rows, some linked to it."""
    threads = [_id(), _id(), _id()]
    runs = [_id(), _id()]
    conversation = _id()
    return {
        "users": [_user(), _user()],
        "autopilots": [
            {
                "id": autopilot,
                "owner_user_id": 1,
                "handle": autopilot[:8],
                "display_name": "Autopilot",
            }
        ],
        "threads": [
            {"id": t, "user_id": 1, "autopilot_id": a, "title": "t"}
            for t, a in zip(threads, [autopilot, autopilot, None], strict=True)
        ],
        "runs": [
            {"id": r, "thread_id": threads[0], "user_id": 1, "autopilot_id": a, "status": "done"}
            for r, a in zip(runs, [autopilot, None], strict=True)
        ],
        "messages": [
            {
                "id": _id(),
                "thread_id": threads[0],
                "user_id": 1,
                "autopilot_id": a,
                "role": "user",
                "content": "hi",
            }
            for a in [autopilot, autopilot, autopilot, None]
        ],
        "run_events": [
            {
                "thread_id": threads[0],
                "run_id": runs[0],
                "user_id": 1,
                "autopilot_id": autopilot,
                "type": "receipt",
            }
            for _ in range(2)
        ],
        "agent_conversations": [{"id": conversation, "user_id": 1, "title": "c"}],
        "agent_conversation_messages": [
            {
                "id": _id(),
                "conversation_id": conversation,
                "user_id": 1,
                "agent": "a",
                "role": "user",
                **dict.fromkeys(
                    ("content", "attachments", "tool_calls", "tool_results", "usage", "meta"), ""
                ),
            }
            for _ in range(2)
        ],
    }


EXPECTED = {
    "users": 2,
    "threads": 3,
    "runs": 2,
    "messages": 4,
    "run_events": 2,
    "agent_conversations": 1,
    "agent_conversation_messages": 2,
    "autopilots": 1,
    "autopilot_profiles": 0,
    "autopilot_policies": 0,
    "threads_with_autopilot": 2,
    "runs_with_autopilot": 1,
    "messages_with_autopilot": 3,
    "run_events_with_autopilot": 2,
}


def test_before_and_after(db_url: str, tmp_path: Path) -> None:
    async def body(engine: AsyncEngine) -> tuple[Snapshot, Snapshot]:
        await init_db(engine)
        # Rows that were there before the "import" do not show in the difference.
        await _insert(engine, {"users": [_user()]})
        await _insert(engine, _rows(_id()))
        before = await snapshot(engine)
        await _insert(engine, _rows(_id()))
        return before, await snapshot(engine)

    before, after = run(db_url, body)
    assert list(before.tables) == [*RUNBOOK_TABLES, "autopilot_profiles", "autopilot_policies"]
    assert list(before.linkage) == [f"{t}_with_autopilot" for t in LINKED_TABLES]
    assert before.tables["users"] == 3
    assert before.linkage["threads_with_autopilot"] == 2

    # The --before file round trip: what `counts --json` prints is what `--before` reads.
    saved = tmp_path / "before.json"
    saved.write_text(json.dumps(before.to_json()))
    changes = diff(load_snapshot(saved), after)
    assert changes.difference == EXPECTED
    assert changes.changed == {k: v for k, v in EXPECTED.items() if v}
    lines = changes.lines()
    assert f"  {'users:':<32} {'3':>10} -> {'5':>10}  (+2)" in lines
    # A diff's own JSON is accepted as the "before" of the next check (its `after`).
    saved.write_text(json.dumps(changes.to_json()))
    assert load_snapshot(saved) == after


def test_missing_tables_count_as_missing(sqlite_url: str) -> None:
    async def body(engine: AsyncEngine) -> Snapshot:
        await init_db(engine, laravel=False)  # the importer's tables only
        await _create(engine, "users")
        return await snapshot(engine)

    async def _create(engine: AsyncEngine, name: str) -> None:
        async with engine.begin() as conn:
            await conn.run_sync(TABLES[name].create)

    snap = run(sqlite_url, body)
    assert snap.tables["users"] == 0
    assert snap.tables["threads"] is None
    assert snap.linkage["threads_with_autopilot"] is None
    assert "  threads:                         missing" in snap.lines()


def test_bad_before_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read"):
        load_snapshot(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(UsageError, match="not JSON"):
        load_snapshot(bad)
    bad.write_text('{"tables": {"users": "many"}, "linkage": {}}')
    with pytest.raises(UsageError, match="integer"):
        load_snapshot(bad)


def test_counts_command(sqlite_url: str, tmp_path: Path) -> None:
    """`counts --json`, then `counts --before` (needs `operations.register` wired into the CLI)."""
    run(sqlite_url, init_db)
    env = cli_env("127.0.0.1:1", "unused", sqlite_url)  # counts never talks to Kafka
    command = [sys.executable, "-m", "khala_app", "counts"]
    first = subprocess.run(
        [*command, "--json"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert first.returncode == 0, first.stderr
    before = tmp_path / "before.json"
    before.write_text(first.stdout)
    assert json.loads(first.stdout)["tables"]["users"] == 0

    async def add(engine: AsyncEngine) -> None:
        await _insert(engine, {"users": [_user()]})
        await _insert(engine, _rows(_id()))

    run(sqlite_url, add)
    second = subprocess.run(
        [*command, "--before", str(before), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["difference"] == {**EXPECTED, "users": 3}

    missing = subprocess.run(
        [*command, "--before", str(tmp_path / "nope.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert missing.returncode == 2
    assert "cannot read" in missing.stderr
