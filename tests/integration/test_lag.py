"""`lag` on the real broker: the expected lag, STOP and STALL when commits stop, OK once drained."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from khala_app.cli.operations import watch_lag
from khala_stream.config import KafkaSettings, Settings
from khala_stream.contract import Topics
from khala_stream.lag import LagReport, WatchedGroup, prefix_groups, snapshot
from producers.generator import generate_export
from tests.fixtures.services import cli_env

pytestmark = pytest.mark.kafka

PARTITIONS = 3
MESSAGES = 90


async def _topic_with_messages(bootstrap: str, topic: str) -> dict[int, int]:
    """Create `topic` with 3 partitions, write keyed messages; returns the end offsets."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    ends: Counter[int] = Counter()
    try:
        for i in range(MESSAGES):
            meta = await producer.send_and_wait(topic, b"change-%d" % i, key=b"row-%d" % (i % 17))
            ends[meta.partition] += 1
    finally:
        await producer.stop()
    assert len(ends) == PARTITIONS, "17 keys should reach all 3 partitions"
    return dict(ends)


@contextlib.asynccontextmanager
async def _group_member(bootstrap: str, group: str, topic: str) -> AsyncIterator[AIOKafkaConsumer]:
    """A consumer of `group` that commits by hand, like the stages' `commit_for_lag`."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
    try:
        yield consumer
    finally:
        await consumer.stop()


def _by_partition(report: LagReport, group: str) -> dict[int, tuple[int | None, int, int, str]]:
    return {
        p.partition: (p.committed, p.end, p.lag, p.status) for p in report.group(group).partitions
    }


async def _scenario(bootstrap: str, prefix: str) -> None:
    topics = Topics(prefix)
    group, topic = topics.sink_group, topics.changes
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    watched = prefix_groups(prefix, "sink")
    assert watched == [WatchedGroup(group, (topic,))]
    ends = await _topic_with_messages(bootstrap, topic)
    produced_at = time.time()
    tp = [TopicPartition(topic, p) for p in range(PARTITIONS)]

    async with _group_member(bootstrap, group, topic) as member:
        # Partition 0 half consumed, partition 1 fully, partition 2 never committed.
        await member.commit({tp[0]: ends[0] // 2, tp[1]: ends[1]})

        # The sink is stopped: nothing commits while `lag` samples.
        started = time.monotonic()
        report = await snapshot(kafka, watched, samples=3, interval_s=0.3)
        took = time.monotonic() - started
        rows = _by_partition(report, group)
        assert rows[0] == (ends[0] // 2, ends[0], ends[0] - ends[0] // 2, "STOP")
        assert rows[1] == (ends[1], ends[1], 0, "OK")
        assert rows[2] == (None, ends[2], ends[2], "STOP")
        sink = report.group(group)
        assert (sink.status, sink.severity) == ("STOP", "ERR")
        assert sink.total_lag == ends[0] - ends[0] // 2 + ends[2]
        p0 = sink.partitions[0]
        # The oldest unconsumed message was written before sampling began.
        assert p0.lag_seconds is not None
        assert took <= p0.lag_seconds <= time.time() - produced_at + 1
        assert sink.partitions[1].lag_seconds == 0.0
        assert p0.rate == 0.0 and p0.time_to_drain is None
        print(f"STOP detected by a one-shot lag of 3 samples in {took:.2f}s")

        # Commits keep coming but never move the offset (metadata tells them apart): STALL.
        async def recommit(stop: asyncio.Event) -> None:
            while not stop.is_set():
                await member.commit({tp[0]: (ends[0] // 2, f"t={time.time_ns()}")})
                await asyncio.sleep(0.05)

        stop = asyncio.Event()
        task = asyncio.create_task(recommit(stop))
        try:
            report = await snapshot(kafka, watched, samples=4, interval_s=0.3)
        finally:
            stop.set()
            await task
        rows = _by_partition(report, group)
        assert rows[0][3] == "STALL"
        assert report.group(group).status == "STALL"  # worse than partition 2's STOP

        # The sink resumes and drains partition 0 bit by bit while `lag` watches: not STOP.
        async def drain(stop: asyncio.Event) -> None:
            position = ends[0] // 2
            while not stop.is_set() and position < ends[0]:
                position += 1
                await member.commit({tp[0]: position})
                await asyncio.sleep(0.05)

        stop = asyncio.Event()
        task = asyncio.create_task(drain(stop))
        try:
            report = await snapshot(kafka, watched, samples=4, interval_s=0.2)
        finally:
            stop.set()
            await task
        p0 = report.group(group).partitions[0]
        assert p0.status == "OK", p0
        assert p0.rate is not None and p0.rate > 0

        # Everything consumed and committed: OK and no lag anywhere.
        records = 0
        member.seek(tp[2], 0)
        member.seek(tp[0], 0)
        async with asyncio.timeout(30):
            while records < ends[0] + ends[2]:
                batch = await member.getmany(tp[0], tp[2], timeout_ms=500)
                records += sum(len(v) for v in batch.values())
        await member.commit({t: ends[t.partition] for t in tp})
        report = await snapshot(kafka, watched, samples=2, interval_s=0.2)
        sink = report.group(group)
        assert sink.status == "OK"
        assert sink.total_lag == 0
        assert [(p.lag, p.lag_seconds, p.time_to_drain) for p in sink.partitions] == [
            (0, 0.0, 0.0)
        ] * PARTITIONS


def test_lag_stop_stall_then_ok(kafka_bootstrap: str, topic_prefix: str) -> None:
    asyncio.run(_scenario(kafka_bootstrap, topic_prefix))


def test_lag_of_groups_without_topics(kafka_bootstrap: str, topic_prefix: str) -> None:
    # Nothing has been published under this prefix: both groups show, with no partitions.
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    report = asyncio.run(snapshot(kafka, prefix_groups(topic_prefix), samples=1))
    assert [(g.group, g.status, g.partitions) for g in report.groups] == [
        (f"{topic_prefix}.process", "OK", ()),
        (f"{topic_prefix}.sink", "OK", ()),
    ]


def test_watch_keeps_a_sliding_window(
    kafka_bootstrap: str, topic_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    topic = Topics(topic_prefix).changes
    ends = asyncio.run(_topic_with_messages(kafka_bootstrap, topic))
    settings = Settings(
        kafka=KafkaSettings(bootstrap_servers=kafka_bootstrap), topic_prefix=topic_prefix
    )
    asyncio.run(watch_lag(settings, group="sink", window=2, interval_s=0.2, as_json=True, rounds=3))
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["samples"] for r in reports] == [1, 2, 2]  # the window holds 2 samples
    sink = reports[-1]["groups"][0]
    assert sink["group"] == f"{topic_prefix}.sink"
    assert sink["total_lag"] == sum(ends.values())
    assert sink["status"] == "STOP"  # no consumer at all: nothing moved over the window
    assert reports[0]["groups"][0]["status"] == "OK"  # one sample cannot be judged


def test_lag_command(kafka_bootstrap: str, topic_prefix: str, sqlite_url: str) -> None:
    """`khala-stream lag --json` (needs `operations.register` wired into the CLI)."""
    topic = Topics(topic_prefix).changes
    ends = asyncio.run(_topic_with_messages(kafka_bootstrap, topic))
    env = cli_env(kafka_bootstrap, topic_prefix, sqlite_url)
    command = [sys.executable, "-m", "khala_app", "lag", "--samples", "2", "--interval", "0.2"]
    result = subprocess.run(
        [*command, "--json"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    groups = {g["group"]: g for g in data["groups"]}
    assert groups[f"{topic_prefix}.sink"]["total_lag"] == sum(ends.values())
    assert groups[f"{topic_prefix}.process"]["partitions"] == []

    # The default view: one line per group, process then sink.
    text = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert len(lines) == 2, text.stdout
    assert lines[0] == f"{topic_prefix}.process: OK"
    assert lines[1].startswith(f"{topic_prefix}.sink: STOP (lag {sum(ends.values())}, oldest ")

    # --partitions: each group's partitions as a table under its line.
    table = subprocess.run(
        [*command, "--partitions"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert table.returncode == 0, table.stderr
    assert "COMMITTED" in table.stdout
    rows = [r.split() for r in table.stdout.splitlines() if r.startswith(f"  {topic}")]
    assert sorted((int(r[1]), int(r[4])) for r in rows) == sorted(ends.items())


def _cli(env: dict[str, str], *args: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "khala_app", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"{args}: {result.stderr[-2000:]}"


def test_lag_of_the_real_stages(
    kafka_bootstrap: str, topic_prefix: str, sqlite_url: str, tmp_path: Path
) -> None:
    """Publish and process an export with the sink stopped, then let the sink drain it."""
    export = tmp_path / "export.zip"
    generate_export(export, users=3, threads_per_user=2, messages_per_thread=3)
    env = cli_env(kafka_bootstrap, topic_prefix, sqlite_url)
    _cli(env, "publish", str(export))
    _cli(env, "process", "--until-idle")

    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    topics = Topics(topic_prefix)
    report = asyncio.run(snapshot(kafka, prefix_groups(topic_prefix), samples=3, interval_s=0.3))
    process, sink = report.group(topics.processor_group), report.group(topics.sink_group)
    assert (process.status, process.total_lag) == ("OK", 0)
    assert sink.total_lag > 0
    assert sink.total_lag == sum(p.end for p in sink.partitions)  # nothing consumed yet
    assert all(p.committed is None for p in sink.partitions)
    assert sink.status == "STOP"
    assert sink.max_lag_seconds > 0

    _cli(env, "sink", "--until-idle")
    report = asyncio.run(snapshot(kafka, prefix_groups(topic_prefix, "sink"), samples=2))
    drained = report.group(topics.sink_group)
    assert (drained.status, drained.total_lag, drained.max_lag_seconds) == ("OK", 0, 0.0)
    # Every partition that holds changes has its end committed (an empty one never needs to).
    assert all(p.committed == p.end for p in drained.partitions if p.end)
    assert any(p.end for p in drained.partitions)
