"""One database per topic prefix: a second database on the same topics is refused, not fed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from khala_app.topic_owner import TopicsOfAnotherDatabase, database_id, prepare_topics
from khala_stream.broker.clients import MAX_MESSAGE_BYTES, ensure_topics, make_admin
from khala_stream.config import KafkaSettings
from khala_stream.contract import Topics
from khala_stream.db import create_engine, init_db
from tests.e2e.harness import counts, env_for, khala, ok


def _sqlite(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


async def _prepare(kafka: KafkaSettings, prefix: str, db_url: str) -> str:
    engine = create_engine(db_url)
    try:
        await init_db(engine, laravel=False)
        await prepare_topics(kafka, Topics(prefix), engine)
        return await database_id(engine)
    finally:
        await engine.dispose()


async def _configs(kafka: KafkaSettings, names: list[str]) -> dict[str, dict[str, str]]:
    """Each topic's configuration as the broker describes it."""
    admin = make_admin(kafka)
    await admin.start()
    try:
        described = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
        )
    finally:
        await admin.close()
    return {
        name: {str(entry[0]): str(entry[1]) for entry in entries}
        for response in described
        for _error, _message, _kind, name, entries in response.resources
    }


def test_the_first_database_keeps_the_topics_and_a_second_is_refused(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    first, second = _sqlite(tmp_path / "a.sqlite"), _sqlite(tmp_path / "b.sqlite")

    async def scenario() -> None:
        # Three stages of the first database starting together all get the topics.
        ids = await asyncio.gather(*(_prepare(kafka, topic_prefix, first) for _ in range(3)))
        assert len(set(ids)) == 1
        with pytest.raises(TopicsOfAnotherDatabase, match="KHALA_TOPIC_PREFIX"):
            await _prepare(kafka, topic_prefix, second)
        assert await _prepare(kafka, topic_prefix, first) == ids[0]  # still the owner
        await _prepare(kafka, f"{topic_prefix}_b", second)  # its own prefix is fine

    asyncio.run(scenario())


def test_import_into_a_second_database_on_the_same_topics_exits_2_and_writes_nothing(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, fixture_a: Path
) -> None:
    first, second = _sqlite(tmp_path / "a.sqlite"), _sqlite(tmp_path / "b.sqlite")
    ok(khala(["import-chat", str(fixture_a)], env_for(kafka_bootstrap, topic_prefix, first)))
    assert counts(first)["users"] > 0

    refused = khala(["import-chat", str(fixture_a)], env_for(kafka_bootstrap, topic_prefix, second))
    assert refused.exit_code == 2, refused.stderr
    assert "feed another database" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert set(counts(second).values()) == {0}


def test_the_owner_topic_is_compacted_so_the_claim_outlives_any_retention(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    kafka, topics = KafkaSettings(bootstrap_servers=kafka_bootstrap), Topics(topic_prefix)

    async def scenario() -> None:
        await _prepare(kafka, topic_prefix, _sqlite(tmp_path / "a.sqlite"))
        configs = await _configs(kafka, topics.all)
        assert configs[topics.owner]["cleanup.policy"] == "compact"
        others = [name for name in topics.all if name != topics.owner]
        assert {configs[name]["cleanup.policy"] for name in others} == {"delete"}
        assert {c["max.message.bytes"] for c in configs.values()} == {str(MAX_MESSAGE_BYTES)}

    asyncio.run(scenario())


def test_an_owner_topic_made_without_compaction_is_switched_to_it(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    kafka, topics = KafkaSettings(bootstrap_servers=kafka_bootstrap), Topics(topic_prefix)

    async def scenario() -> None:
        await ensure_topics(kafka, topics.all)  # as versions before compaction made them
        before = (await _configs(kafka, [topics.owner]))[topics.owner]
        assert before["cleanup.policy"] == "delete"
        await _prepare(kafka, topic_prefix, _sqlite(tmp_path / "a.sqlite"))
        after = (await _configs(kafka, [topics.owner]))[topics.owner]
        assert after["cleanup.policy"] == "compact"
        assert after["max.message.bytes"] == str(MAX_MESSAGE_BYTES)  # not reset by the switch

    asyncio.run(scenario())
