"""The Prometheus endpoint: scraped over HTTP, parsed with prometheus-client's own parser."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from khala_app.cli.operations import add_metrics_flags, stage_metrics
from khala_stream import metrics
from khala_stream.config import KafkaSettings, Settings
from khala_stream.contract import Topics
from khala_stream.errors import UsageError


@pytest.fixture
def server() -> Iterator[metrics.MetricsServer]:
    running = metrics.serve(0)
    try:
        yield running
    finally:
        running.close()


def scrape(port: int) -> dict[str, list[Sample]]:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = text_string_to_metric_families(response.text)
    return {family.name: family.samples for family in families}


def value(families: dict[str, list[Sample]], family: str, name: str, **labels: str) -> float:
    matches = [
        s.value
        for s in families.get(family, [])
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


def test_recorded_values_are_scraped(server: metrics.MetricsServer) -> None:
    before = scrape(server.port)

    def delta(family: str, name: str, **labels: str) -> float:
        after = value(now, family, name, **labels)
        try:
            return after - value(before, family, name, **labels)
        except AssertionError:  # the series did not exist yet
            return after

    metrics.record_batch("sink", {"messages": 30, "threads": 5}, 0.2)
    metrics.record_batch("sink", {"messages": 10}, 0.04)
    metrics.record_output("sink", {"messages": 39})
    metrics.dead_letters("sink", "db_refused", 1)
    metrics.dead_letters("publish", "invalid_json", 2)
    metrics.workos_request("ok")
    metrics.workos_request("retryable")
    metrics.workos_retry()
    metrics.workos_cache(hits=3, misses=1)
    now = scrape(server.port)

    assert delta("khala_records_in", "khala_records_in_total", stage="sink", table="messages") == 40
    assert delta("khala_records_in", "khala_records_in_total", stage="sink", table="threads") == 5
    assert (
        delta("khala_records_out", "khala_records_out_total", stage="sink", table="messages") == 39
    )
    assert delta("khala_batch_records", "khala_batch_records_count", stage="sink") == 2
    assert delta("khala_batch_records", "khala_batch_records_sum", stage="sink") == 45
    assert delta(
        "khala_batch_duration_seconds", "khala_batch_duration_seconds_sum", stage="sink"
    ) == pytest.approx(0.24)
    assert (
        delta(
            "khala_batch_duration_seconds",
            "khala_batch_duration_seconds_bucket",
            stage="sink",
            le="0.05",
        )
        == 1
    )
    assert (
        delta("khala_dead_letters", "khala_dead_letters_total", stage="sink", reason="db_refused")
        == 1
    )
    assert (
        delta(
            "khala_dead_letters", "khala_dead_letters_total", stage="publish", reason="invalid_json"
        )
        == 2
    )
    assert delta("khala_workos_requests", "khala_workos_requests_total", outcome="ok") == 1
    assert delta("khala_workos_retries", "khala_workos_retries_total") == 1
    assert (
        delta("khala_workos_cache_lookups", "khala_workos_cache_lookups_total", result="hit") == 3
    )
    # The process collector is there too (a Linux-only collector: this is Linux).
    assert "process_resident_memory_bytes" in now


def test_partition_lag_series_come_and_go(server: metrics.MetricsServer) -> None:
    metrics.set_partition_lag(
        "g.sink",
        "g.changes",
        0,
        committed=None,
        end=10,
        lag=10,
        lag_seconds=4.5,
        time_to_drain=None,
        status="STOP",
    )
    families = scrape(server.port)
    labels = {"group": "g.sink", "topic": "g.changes", "partition": "0"}
    name = "khala_consumergroup_partition_status"
    assert value(families, name, name, **labels, status="STOP") == 1
    assert value(families, name, name, **labels, status="OK") == 0
    assert (
        value(
            families, "khala_consumergroup_lag_seconds", "khala_consumergroup_lag_seconds", **labels
        )
        == 4.5
    )
    assert not [
        s for s in families.get("khala_consumergroup_committed_offset", []) if s.labels == labels
    ]
    metrics.forget_partition("g.sink", "g.changes", 0)
    families = scrape(server.port)
    assert not [s for s in families.get(name, []) if s.labels.get("group") == "g.sink"]


def test_port_in_use_is_a_usage_error(server: metrics.MetricsServer) -> None:
    parser = argparse.ArgumentParser()
    add_metrics_flags(parser)
    args = parser.parse_args(["--metrics-port", str(server.port)])
    settings = Settings(kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1"))

    async def enter() -> None:
        async with stage_metrics(args, settings, "publish"):
            pass

    with pytest.raises(UsageError, match="--metrics-port"):
        asyncio.run(enter())


async def _lagging_topic(bootstrap: str, topic: str, messages: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 2, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for i in range(messages):
            await producer.send_and_wait(topic, b"x", partition=i % 2)
    finally:
        await producer.stop()


@pytest.mark.kafka
def test_a_stage_serves_its_groups_lag(kafka_bootstrap: str, topic_prefix: str) -> None:
    """What a `sink --metrics-port` does: the endpoint plus lag gauges of the sink group."""
    topics = Topics(topic_prefix)
    asyncio.run(_lagging_topic(kafka_bootstrap, topics.changes, 12))
    parser = argparse.ArgumentParser()
    add_metrics_flags(parser)
    args = parser.parse_args(["--metrics-port", "0"])
    settings = Settings(
        kafka=KafkaSettings(bootstrap_servers=kafka_bootstrap), topic_prefix=topic_prefix
    )

    async def run() -> dict[str, list[Sample]]:
        async with stage_metrics(args, settings, "sink") as served:
            assert served is not None and served.port > 0
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                families = await asyncio.to_thread(scrape, served.port)
                group = [
                    s
                    for s in families.get("khala_consumergroup_total_lag_messages", [])
                    if s.labels.get("group") == topics.sink_group
                ]
                if group:
                    return families
                await asyncio.sleep(0.2)
        raise AssertionError("the lag gauges never appeared")

    families = asyncio.run(run())
    group = {"group": topics.sink_group}
    name = "khala_consumergroup_total_lag_messages"
    assert value(families, name, name, **group) == 12
    lag = "khala_consumergroup_lag_messages"
    for partition in ("0", "1"):
        assert value(families, lag, lag, **group, topic=topics.changes, partition=partition) == 6
    status = "khala_consumergroup_status"
    current = [
        s.labels["status"]
        for s in families[status]
        if s.labels["group"] == topics.sink_group and s.value == 1
    ]
    # One sample cannot be judged (OK); a second one, 5 s later, would show nobody consuming.
    assert current in (["OK"], ["STOP"])
    # The process group is not this stage's: not exported here.
    assert not [s for s in families[name] if s.labels.get("group") == topics.processor_group]
