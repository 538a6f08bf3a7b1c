"""The synthetic export generator, the fixture writer and the bundled sample."""

from __future__ import annotations

import itertools
import re
import unicodedata
import uuid
import zipfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest

from khala_stream.contract.tables import DOCUMENT_KEYS, SOURCE_TABLES
from producers.export_reader import RejectedLine, SourceDocument, open_export
from producers.generator import (
    EPOCH_MS,
    generate_export,
    load_reference_fixture,
    shared_dir,
    write_fixture_zip,
)
from producers.sample import SAMPLE_EXPORT, SAMPLE_PARAMETERS

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)


def read_all(path: Path) -> dict[str, list[dict[str, Any]]]:
    with open_export(path) as source:
        return {
            table: [i.doc for i in source.iter_table(table) if isinstance(i, SourceDocument)]
            for table in source.tables
        }


def width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    path = tmp_path_factory.mktemp("gen") / "plain.zip"
    generate_export(path, users=40, seed=11)
    return read_all(path)


@pytest.fixture(scope="module")
def edgy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gen") / "edge.zip"
    generate_export(path, users=30, seed=5, edge_cases=True)
    return path


def test_same_seed_same_bytes_different_seed_different(tmp_path: Path) -> None:
    a = generate_export(tmp_path / "a.zip", users=5, seed=9, edge_cases=True)
    b = generate_export(tmp_path / "b.zip", users=5, seed=9, edge_cases=True)
    c = generate_export(tmp_path / "c.zip", users=5, seed=10, edge_cases=True)
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.counts == b.counts
    assert a.path.read_bytes() != c.path.read_bytes()
    assert not list(tmp_path.glob("*.partial"))


def test_layout_counts_and_entry_metadata(tmp_path: Path) -> None:
    made = generate_export(tmp_path / "g.zip", users=4, seed=2)
    with zipfile.ZipFile(made.path) as archive:
        infos = archive.infolist()
    names = [i.filename for i in infos]
    assert names == [
        "README.md",
        "_tables/documents.jsonl",
        *sorted(
            f"{t}/documents.jsonl" for t in (*SOURCE_TABLES, "messageParts", "lightningInvoices")
        ),
    ]
    assert {i.date_time for i in infos} == {infos[0].date_time}
    assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in infos)
    data = read_all(made.path)
    assert {t: len(rows) for t, rows in data.items() if t in made.counts} == made.counts
    assert set(made.malformed.values()) == {0}
    assert made.size_bytes == made.path.stat().st_size
    with open_export(made.path) as source:
        newest = max(
            ms
            for rows in data.values()
            for row in rows
            for key in ("createdAtMs", "updatedAtMs", "paidAtMs")
            if isinstance(ms := row.get(key), int)
        )
        assert source.snapshot_ms is not None and source.snapshot_ms > newest


def test_no_extra_tables(tmp_path: Path) -> None:
    made = generate_export(tmp_path / "g.zip", users=2, extra_tables=False)
    with zipfile.ZipFile(made.path) as archive:
        assert sorted(archive.namelist()) == sorted(f"{t}/documents.jsonl" for t in SOURCE_TABLES)


def test_shapes(plain: dict[str, list[dict[str, Any]]]) -> None:
    users, threads = plain["users"], plain["threads"]
    runs, messages, receipts, blueprints = (
        plain["runs"],
        plain["messages"],
        plain["receipts"],
        plain["blueprints"],
    )
    assert len(users) == 40 and len(threads) == 120
    assert min(u["createdAtMs"] for u in users) == EPOCH_MS
    for table, rows in plain.items():
        for row in rows:
            if table != "_tables":
                assert isinstance(row["_id"], str) and isinstance(row["_creationTime"], float)
    # Users: mostly WorkOS ids, some legacy ones; unique keys; mostly valid emails.
    ids = [u["userId"] for u in users]
    assert len(set(ids)) == len(ids)
    workos = [i for i in ids if re.fullmatch(r"user_01[0-9A-Z]{24}", i)]
    assert len(ids) * 0.6 < len(workos) < len(ids)
    emails = [u.get("email") for u in users]
    valid = [e for e in emails if isinstance(e, str) and re.fullmatch(r"[^@\s]+@[^@\s]+\.\w+", e)]
    assert len(valid) > len(emails) * 0.6
    assert len({e.lower() for e in valid}) == len(valid)  # no conflicts outside edge cases
    assert any(e is None or (isinstance(e, str) and not e.strip()) for e in emails) or (
        len(valid) < len(emails)
    )
    # Threads: uuid4 ids; owned or anonymous.
    for t in threads:
        assert uuid.UUID(t["threadId"]).version == 4
        assert ("ownerId" in t) != ("anonKey" in t)
        assert t["createdAtMs"] <= t["updatedAtMs"]
    assert any("anonKey" in t for t in threads)
    assert {t["ownerId"] for t in threads if "ownerId" in t} <= set(ids)
    # Runs: 1-2 per thread, each pointing at an assistant message of its thread.
    by_id = {m["messageId"]: m for m in messages}
    per_thread = Counter(r["threadId"] for r in runs)
    assert set(per_thread.values()) <= {1, 2}
    for r in runs:
        assert UUID_RE.match(r["runId"])
        assert r["status"] in {"streaming", "final", "error", "canceled"}
        assert isinstance(r["cancelRequested"], bool)
        target = by_id[r["assistantMessageId"]]
        assert target["role"] == "assistant" and target["threadId"] == r["threadId"]
        assert target["runId"] == r["runId"]
    assert {r["status"] for r in runs} >= {"final", "error"}
    # Messages: dominant, alternating roles, varied texts.
    assert len(messages) > len(runs) + len(threads)
    assert {m["role"] for m in messages} <= {"user", "assistant", "system"}
    thread_msgs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for m in messages:
        thread_msgs[m["threadId"]].append(m)
    for rows in thread_msgs.values():
        roles = [m["role"] for m in rows if m["role"] != "system"]
        assert all(a != b for a, b in itertools.pairwise(roles))
        stamps = [m["createdAtMs"] for m in rows]
        assert stamps == sorted(stamps)
    texts = [m["text"] for m in messages if isinstance(m.get("text"), str)]
    assert any("\n" in t for t in texts)
    assert any(len(t) > 2000 for t in texts)
    assert any(any(unicodedata.east_asian_width(c) == "W" for c in t) for t in texts)
    assert any(not t.isascii() for t in texts)
    # Receipts: 0-3 per run, known kinds, a JSON object payload.
    run_ids = {r["runId"] for r in runs}
    assert max(Counter(r["runId"] for r in receipts).values()) <= 3
    for rc in receipts:
        assert rc["runId"] in run_ids
        assert rc["kind"] in {"model", "tool", "dse.predict"}
        assert isinstance(rc["json"], dict)
        if rc["kind"] == "dse.predict":
            assert rc["signatureId"] and rc["compiled_id"]
    # Blueprints: both shapes, for owned threads only.
    owned = {t["threadId"] for t in threads if "ownerId" in t}
    assert all(b["threadId"] in owned for b in blueprints)
    wrapped = [b for b in blueprints if isinstance(b.get("blueprint"), dict)]
    legacy = [b for b in blueprints if not isinstance(b.get("blueprint"), dict)]
    assert wrapped and legacy
    for b in wrapped:
        payload = b["blueprint"]
        assert set(payload) == {"bootstrapState", "docs", "memory"}
        assert {"user", "identity", "character", "rules"} <= set(payload["docs"])
    for b in legacy:
        assert isinstance(b["docs"], dict) and isinstance(b["bootstrapState"], dict)
    assert plain["messageParts"] and plain["lightningInvoices"]
    assert [row["name"] for row in plain["_tables"]] == sorted(
        [*SOURCE_TABLES, "messageParts", "lightningInvoices"]
    )


def test_edge_cases(edgy: Path) -> None:
    data = read_all(edgy)
    with open_export(edgy) as source:
        bad = [
            item
            for table in source.tables
            for item in source.iter_table(table)
            if isinstance(item, RejectedLine)
        ]
        raw_users = (edgy, source.tables["users"])
    reasons = {r.reason.split(":")[0].split(" (")[0] for r in bad}
    assert reasons >= {"invalid JSON", "not a JSON object", "invalid UTF-8"}
    assert any(r.reason == "not a JSON object (array)" for r in bad)
    with zipfile.ZipFile(raw_users[0]) as archive:
        users_raw = archive.read(raw_users[1])
    assert b"\n\n" in users_raw and b"\r\n" in users_raw  # a blank line, a CRLF line

    users, threads, runs, messages = data["users"], data["threads"], data["runs"], data["messages"]
    # Duplicate keys with different content, in every source table.
    for table in SOURCE_TABLES:
        key = DOCUMENT_KEYS[table]
        groups: dict[Any, list[bytes]] = defaultdict(list)
        for row in data[table]:
            if isinstance(row.get(key), str):
                groups[row[key]].append(orjson.dumps(row, option=orjson.OPT_SORT_KEYS))
        assert any(len(set(g)) > 1 for g in groups.values()), table
    # Owners missing from users.
    user_ids = {u.get("userId") for u in users}
    assert {t["ownerId"] for t in threads if isinstance(t.get("ownerId"), str)} - user_ids
    # Non-UUID run ids, invalid roles.
    assert any(not UUID_RE.match(r["runId"]) for r in runs)
    assert any(m.get("role") not in {"user", "assistant", "system"} for m in messages)
    # Email conflicts: same address in different case.
    emails = [u["email"] for u in users if isinstance(u.get("email"), str)]
    folded = Counter(e.strip().lower() for e in emails)
    assert any(
        n > 1 and len({e for e in emails if e.strip().lower() == k}) > 1 for k, n in folded.items()
    )
    # Timestamps missing, zero, as strings.
    stamps = [row.get("createdAtMs", "missing") for t in SOURCE_TABLES for row in data[t]]
    assert "missing" in stamps and 0 in stamps
    assert any(isinstance(s, str) and s.isdigit() for s in stamps)
    # Blueprint recency ties.
    recency = Counter(b.get("updatedAtMs") for b in data["blueprints"])
    assert any(n > 1 for stamp, n in recency.items() if stamp is not None)
    # Titles over 120 display columns, wide characters included.
    firsts = [
        m["text"] for m in messages if m.get("role") == "user" and isinstance(m.get("text"), str)
    ]
    assert any(
        width(t) > 120 and any(unicodedata.east_asian_width(c) == "W" for c in t) for t in firsts
    )
    assert any(width(t) > 120 and t.isascii() is False and "\u2028" in t for t in firsts)


def test_edge_cases_with_no_regular_users(tmp_path: Path) -> None:
    made = generate_export(tmp_path / "g.zip", users=0, edge_cases=True, extra_tables=False)
    assert made.counts["users"] > 0 and sum(made.malformed.values()) > 0
    assert read_all(made.path)["threads"]


def test_zero_sizes(tmp_path: Path) -> None:
    made = generate_export(tmp_path / "g.zip", users=3, threads_per_user=0, messages_per_thread=0)
    assert made.counts["users"] == 3 and made.counts["threads"] == 0
    with pytest.raises(ValueError):
        generate_export(tmp_path / "h.zip", users=-1)


def test_write_fixture_zip_matches_the_reference_helper(tmp_path: Path) -> None:
    tables = load_reference_fixture("fixture-a")
    assert list(tables) == ["users", "threads", "blueprints", "runs", "messages", "receipts"]
    path = tmp_path / "a.zip"
    write_fixture_zip(path, tables)
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == [f"{t}/documents.jsonl" for t in tables]
        threads = archive.read("threads/documents.jsonl")
        blueprints = archive.read("blueprints/documents.jsonl")
    assert threads == b"\n".join(orjson.dumps(r) for r in tables["threads"]) + b"\n"
    assert threads.count(b"\n") == 2
    assert b'"templateVersion":5.0' in blueprints
    again = tmp_path / "b.zip"
    write_fixture_zip(again, tables)
    assert again.read_bytes() == path.read_bytes()


def test_load_reference_fixture_by_short_name_and_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = load_reference_fixture("b")
    assert b["users"][0]["userId"] == "user_legacy_1" and b["users"][0]["email"] is None
    fixtures = tmp_path / "reference" / "fixtures"
    fixtures.mkdir(parents=True)
    (fixtures / "mine.json").write_bytes(orjson.dumps({"users": [{"userId": "x"}]}))
    monkeypatch.setenv("KHALA_SHARED_DIR", str(tmp_path))
    assert load_reference_fixture("mine") == {"users": [{"userId": "x"}]}
    (fixtures / "broken.json").write_bytes(b"[1, 2]")
    with pytest.raises(ValueError):
        load_reference_fixture("broken")


def test_bundled_reference_fixtures_are_the_shared_ones() -> None:
    """The fixtures bundled for a lone clone are byte for byte those of `../shared`."""
    repo = Path(__file__).resolve().parents[3]
    shared = repo.parent / "shared" / "reference" / "fixtures"
    if not shared.is_dir():
        pytest.skip("no ../shared beside this checkout to compare with")
    bundled = shared_dir() / "reference" / "fixtures"
    names = sorted(p.name for p in bundled.glob("*.json"))
    assert names == ["fixture-a.json", "fixture-b.json"]
    for name in names:
        assert (bundled / name).read_bytes() == (shared / name).read_bytes(), name


def test_bundled_sample_is_current(tmp_path: Path) -> None:
    assert SAMPLE_EXPORT.is_file()
    made = generate_export(tmp_path / "sample.zip", **SAMPLE_PARAMETERS)
    assert made.path.read_bytes() == SAMPLE_EXPORT.read_bytes(), "regenerate the sample"
    chat = sum(n for t, n in made.counts.items() if t in SOURCE_TABLES)
    assert 300 <= chat <= 500
    assert set(made.counts) >= set(SOURCE_TABLES)
