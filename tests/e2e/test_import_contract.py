"""Issue #2's contract: replay writes nothing, dry-run touches no topic, bad sources exit 2
before any write, bad lines are set aside with their bytes and the rest is imported."""

from __future__ import annotations

import asyncio
import re
import zipfile
from pathlib import Path

import orjson
import pytest

from khala_stream.config import KafkaSettings
from khala_stream.dead_letters import read_dead_letters
from producers.generator import generate_export, load_reference_fixture, write_fixture_zip
from tests.e2e.harness import LARAVEL_TABLES, counts, env_for, khala, ok, versions


def list_topics(bootstrap: str, prefix: str) -> set[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    async def go() -> set[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            return {t for t in await admin.list_topics() if t.startswith(prefix + ".")}
        finally:
            await admin.close()

    return asyncio.run(go())


def _refused(stdout: str) -> int:
    match = re.search(r"rows refused by the database: (\d+)", stdout)
    return int(match.group(1)) if match else 0


def _written(stdout: str) -> int:
    line = next(x for x in stdout.splitlines() if x.startswith("  rows written:"))
    return sum(int(n) for n in re.findall(r"=(\d+)", line))


def test_replay_changes_no_row(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    export = tmp_path / "export.zip"
    generate_export(export, users=6, seed=3, edge_cases=True)
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)
    first = ok(khala(["import-chat", str(export)], env))
    before = versions(pg_url)
    assert sum(len(v) for v in before.values()) > 50
    second = ok(khala(["import-chat", str(export)], env))
    assert versions(pg_url) == before  # no INSERT or UPDATE reached a Laravel table
    # The rows the database refused (over-long ids of the edge cases) are settled: not
    # tried again until their value changes (or `dlq replay` retries them).
    assert _refused(first.stdout) > 0
    assert _refused(second.stdout) == 0
    assert _written(second.stdout) == 0
    # Counters keep the reference's meaning: documents that pass the filters still count.
    created = ("autopilots_created", "autopilot_profiles_upserted", "autopilot_policies_upserted")
    for key, value in first.counters.items():
        assert second.counters[key] == (0 if key in created else value), key
    assert first.counters["autopilots_created"] > 0


def test_dry_run_creates_no_topic_and_reports_what_a_run_would(
    fixture_a: Path, kafka_bootstrap: str, topic_prefix: str, sqlite_url: str
) -> None:
    env = env_for(kafka_bootstrap, topic_prefix, sqlite_url)
    dry = ok(khala(["import-chat", str(fixture_a), "--dry-run"], env))
    assert list_topics(kafka_bootstrap, topic_prefix) == set()
    assert counts(sqlite_url) == dict.fromkeys(LARAVEL_TABLES, 0)
    real = ok(khala(["import-chat", str(fixture_a)], env))
    assert dry.counters == real.counters
    again = ok(khala(["import-chat", str(fixture_a), "--dry-run"], env))
    assert again.counters["autopilots_created"] == 0  # it read the database as it is now


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _empty_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w"):
        pass
    return path


def _no_chat_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("lightningInvoices/documents.jsonl", b'{"_id": "x"}\n')
    return path


def _corrupt_entry(path: Path, good: Path) -> Path:
    """Valid central directory, damaged compressed bytes inside the messages entry."""
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as z:
        info = z.getinfo("messages/documents.jsonl")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    for i in range(start + 5, start + info.compress_size - 2):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


def _truncated_zip(path: Path, good: Path) -> Path:
    path.write_bytes(good.read_bytes()[:-200])
    return path


@pytest.mark.parametrize(
    "replace",
    [pytest.param(False, marks=pytest.mark.stress), True],  # test_hostile_exports covers merge
    ids=["merge", "replace"],
)
@pytest.mark.parametrize(
    "kind", ["missing", "not-a-zip", "truncated", "empty-zip", "no-chat-tables"]
)
def test_bad_source_exits_2_and_writes_nothing(
    tmp_path: Path,
    fixture_a: Path,
    kafka_bootstrap: str,
    topic_prefix: str,
    sqlite_url: str,
    kind: str,
    replace: bool,
) -> None:
    env = env_for(kafka_bootstrap, topic_prefix, sqlite_url)
    ok(khala(["import-chat", str(fixture_a)], env))
    before = counts(sqlite_url)
    source = {
        "missing": lambda: tmp_path / "nowhere.zip",
        "not-a-zip": lambda: _write(tmp_path / "x.zip", b"hello"),
        "truncated": lambda: _truncated_zip(tmp_path / "t.zip", fixture_a),
        "corrupt-entry": lambda: _corrupt_entry(tmp_path / "c.zip", fixture_a),
        "empty-zip": lambda: _empty_zip(tmp_path / "e.zip"),
        "no-chat-tables": lambda: _no_chat_zip(tmp_path / "n.zip"),
    }[kind]()
    expected = {
        "missing": "does not exist",
        "not-a-zip": "not a ZIP",
        "truncated": "ZIP",
        "corrupt-entry": "corrupt ZIP: entry messages/documents.jsonl",
        "empty-zip": "none of the chat tables",
        "no-chat-tables": "none of the chat tables",
    }[kind]
    result = khala(["import-chat", str(source), *(["--replace"] if replace else [])], env)
    assert result.exit_code == 2, result.stdout + result.stderr
    assert expected in result.stderr and str(source) in result.stderr
    assert counts(sqlite_url) == before  # --replace truncated nothing
    assert khala(["validate", str(source)], env).exit_code == 2


def test_bad_lines_are_set_aside_and_the_rest_imported(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    tables = load_reference_fixture("fixture-a")
    export = tmp_path / "bad-lines.zip"
    write_fixture_zip(export, tables)
    with zipfile.ZipFile(export) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    entries["messages/documents.jsonl"] += b'{"messageId": broken\n[1, 2]\n\xff\xfe{}\n'
    with zipfile.ZipFile(export, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)
    result = ok(khala(["import-chat", str(export)], env))
    assert "messages/documents.jsonl:3: invalid JSON" in result.stdout
    assert "messages/documents.jsonl:4: not a JSON object (array)" in result.stdout
    assert "messages/documents.jsonl:5: invalid UTF-8" in result.stdout
    assert result.counters["source_messages"] == 2 and result.counters["messages_imported"] == 2
    assert counts(pg_url)["messages"] == 2
    letters = asyncio.run(
        read_dead_letters(
            KafkaSettings(bootstrap_servers=kafka_bootstrap), f"{topic_prefix}.dead-letters"
        )
    )
    raw = sorted(s.letter.raw for s in letters)
    assert raw == sorted([b'{"messageId": broken', b"[1, 2]", b"\xff\xfe{}"])
    assert {s.letter.line for s in letters} == {3, 4, 5}
    listed = orjson.loads(ok(khala(["dlq", "list", "--json"], env)).stdout)
    assert listed["by_reason"] == {"invalid_json": 1, "not_object": 1, "invalid_utf8": 1}
