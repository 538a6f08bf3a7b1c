"""KHALA_TRIM_CONSUMED: records the stages have applied to the database are deleted from the
source and changes topics (DeleteRecords); nothing else is, and nothing else changes. Off
unless asked for on a broker of one's own (it is on by default only on the embedded broker)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiokafka import TopicPartition

from khala_stream.broker.clients import make_consumer
from khala_stream.config import KafkaSettings
from khala_stream.contract import Topics
from producers.generator import load_reference_fixture, write_fixture_zip
from tests.e2e.harness import counts, env_for, khala, ok

Span = tuple[int, int]  # (first offset still held, end offset), summed over partitions


def spans(bootstrap: str, names: list[str]) -> dict[str, Span]:
    async def go() -> dict[str, Span]:
        reader = make_consumer(KafkaSettings(bootstrap_servers=bootstrap), group_id=None)
        await reader.start()
        try:
            found: dict[str, Span] = {}
            for name in names:
                tps = [TopicPartition(name, p) for p in reader.partitions_for_topic(name) or ()]
                first = await reader.beginning_offsets(tps)
                end = await reader.end_offsets(tps)
                found[name] = (sum(first.values()), sum(end.values()))
            return found
        finally:
            await reader.stop()

    return asyncio.run(go())


@pytest.mark.parametrize("trim", [True, False], ids=["trim", "keep"])
def test_consumed_records_are_deleted_only_when_asked(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str, trim: bool
) -> None:
    tables = load_reference_fixture("fixture-a")
    export = tmp_path / "a.zip"
    write_fixture_zip(export, tables)
    extra = {"KHALA_TRIM_CONSUMED": "1"} if trim else {}
    env = env_for(kafka_bootstrap, topic_prefix, pg_url, **extra)
    ok(khala(["import-chat", str(export)], env))
    imported = counts(pg_url)
    assert imported["messages"] > 0

    topics = Topics(topic_prefix)
    consumed = [*topics.sources, topics.changes]
    found = spans(kafka_bootstrap, [*consumed, topics.manifests])
    for name in consumed:
        first, end = found[name]
        if end:
            assert first == (end if trim else 0), name
    assert sum(found[name][1] for name in consumed) > 0
    assert found[topics.manifests][0] == 0  # not a stage's input: never trimmed

    # A newer export after trimming: its documents are read and applied as usual.
    tables["messages"][0]["text"] = "Edited after the trim."
    write_fixture_zip(export, tables)
    ok(khala(["import-chat", str(export)], env))
    assert counts(pg_url) == imported
