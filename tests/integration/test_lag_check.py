"""`khala-stream lag --check` on the real broker, as cron or a Nagios-style check runs it: one
line on stdout and the exit code for each state (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN)."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from khala_stream.contract import Topics
from tests.fixtures.services import cli_env

pytestmark = pytest.mark.kafka

PARTITIONS = 3
PER_PARTITION = 1000  # the drain below commits one per partition every 50 ms: ~50 s of work
CHECK = ("lag", "--check", "--group", "sink", "--samples", "3", "--interval", "1")


async def _fill(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        sent = [
            await producer.send(topic, b"change-%d" % i, partition=partition)
            for partition in range(PARTITIONS)
            for i in range(PER_PARTITION)
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


CheckRun = tuple[int, str, str]


async def _check(env: dict[str, str], *extra: str) -> CheckRun:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "khala_app",
        *CHECK,
        *extra,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _scenario(bootstrap: str, env: dict[str, str]) -> None:
    topics = Topics(env["KHALA_TOPIC_PREFIX"])
    await _fill(bootstrap, topics.changes)
    tp = [TopicPartition(topics.changes, p) for p in range(PARTITIONS)]

    # Nobody consumes: STOP, CRITICAL.
    code, out, err = await _check(env)
    assert code == 2, out + err
    total = PARTITIONS * PER_PARTITION
    assert out.startswith(f"LAG CRITICAL - {topics.sink_group} STOP lag {total} "), out
    assert len(out.splitlines()) == 1

    member = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=topics.sink_group, enable_auto_commit=False
    )
    await member.start()
    member.assign(tp)
    position = 0

    async def drain(stop: asyncio.Event) -> None:
        """The sink at work: one more record per partition committed every 50 ms."""
        nonlocal position
        while not stop.is_set() and position < PER_PARTITION - 1:
            position += 1
            await member.commit({t: position for t in tp})
            await asyncio.sleep(0.05)

    async def flood(stop: asyncio.Event) -> None:
        """Changes arriving five times as fast as the sink commits them."""
        while not stop.is_set():
            sent = [
                await producer.send(t.topic, b"more", partition=t.partition)
                for t in tp
                for _ in range(5)
            ]
            await asyncio.gather(*sent)
            await asyncio.sleep(0.05)

    Work = Callable[[asyncio.Event], Awaitable[None]]

    async def check_while(work: tuple[Work, ...], *extra: str) -> CheckRun:
        """`lag --check EXTRA` while `work` goes on."""
        stop = asyncio.Event()
        tasks = [asyncio.create_task(w(stop)) for w in work]
        try:
            return await _check(env, *extra)
        finally:
            stop.set()
            await asyncio.gather(*tasks)

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        # The sink commits but falls behind: Burrow's WARN, a WARNING.
        code, out, err = await check_while((drain, flood))
        assert code == 1, out + err
        assert out.startswith(f"LAG WARNING - {topics.sink_group} WARN lag "), out

        # The sink drains steadily (Burrow: OK) but more than --warn-lag is left: WARNING.
        code, out, err = await check_while((drain,), "--warn-lag", "3", "--crit-lag", "100000")
        assert code == 1, out + err
        assert out.startswith(f"LAG WARNING - {topics.sink_group} OK lag "), out
        assert ">= 3 messages" in out

        # Everything consumed: OK, even with the limits at their tightest.
        await member.commit(await member.end_offsets(tp))
        code, out, err = await _check(env, "--warn-lag", "1", "--warn-seconds", "0.001")
        assert code == 0, out + err
        assert out.startswith(f"LAG OK - {topics.sink_group} OK lag 0 |"), out
    finally:
        await producer.stop()
        await member.stop()


def test_check_exit_codes_ok_warning_critical(
    kafka_bootstrap: str, topic_prefix: str, sqlite_url: str
) -> None:
    env = cli_env(kafka_bootstrap, topic_prefix, sqlite_url)
    asyncio.run(_scenario(kafka_bootstrap, env))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_check_is_unknown_when_the_broker_cannot_be_reached(
    topic_prefix: str, sqlite_url: str
) -> None:
    env = cli_env(f"127.0.0.1:{_closed_port()}", topic_prefix, sqlite_url)
    code, out, err = asyncio.run(_check(env))
    assert code == 3, out + err
    assert out.startswith("LAG UNKNOWN - cannot read consumer offsets from the broker")
    assert len(out.splitlines()) == 1
    assert "Traceback" not in err


def test_check_is_unknown_on_bad_options(topic_prefix: str, sqlite_url: str) -> None:
    env = cli_env("127.0.0.1:9", topic_prefix, sqlite_url)
    code, out, _ = asyncio.run(_check(env, "--warn-seconds", "60", "--crit-seconds", "30"))
    assert (code, out) == (3, "LAG UNKNOWN - --warn-seconds (60) is above --crit-seconds (30)\n")
    code, out, _ = asyncio.run(_check(env, "--watch", "--json"))
    assert code == 3
    assert json.loads(out) == {
        "state": "UNKNOWN",
        "exit_code": 3,
        "summary": "LAG UNKNOWN - --check judges one burst of samples; it does not take --watch",
        "report": None,
    }


def test_check_is_unknown_without_any_broker(topic_prefix: str, tmp_path: Path) -> None:
    """No KAFKA_BOOTSTRAP_SERVERS and no embedded broker package: UNKNOWN, not exit 2."""
    env = cli_env("", topic_prefix, f"sqlite+aiosqlite:///{tmp_path}/k.sqlite")
    del env["KAFKA_BOOTSTRAP_SERVERS"]
    env["KHALA_BROKER_HOME"] = str(tmp_path / ".khala")
    code_block = (
        "import sys; sys.modules['noida_db'] = None; "
        "from khala_app.cli import main; sys.exit(main(sys.argv[1:]))"
    )

    async def run() -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code_block,
            *CHECK,
            env=env,
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
        assert proc.returncode is not None
        return proc.returncode, out.decode()

    code, out = asyncio.run(run())
    assert code == 3
    assert out.startswith("LAG UNKNOWN - no Kafka broker:")
    assert "KAFKA_BOOTSTRAP_SERVERS" in out
