"""The stages' Prometheus endpoints during a real import: `process` and `sink` run as CLI
subprocesses with `--metrics-port` on the test broker and PostgreSQL, an export is published,
and scrapes before and after show the records, rows and lag series move as the work does."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import create_async_engine

from khala_stream.contract import Topics
from producers.generator import generate_export
from tests.e2e.stages import Stages, stage_env

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> Series | None:
    """Every sample of the endpoint by (name, labels); None while it does not answer."""
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    except httpx.HTTPError:
        return None
    assert response.status_code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def _total(series: Series, name: str, **labels: str) -> float:
    return sum(
        v
        for (n, ls), v in series.items()
        if n == name and all(dict(ls).get(k) == w for k, w in labels.items())
    )


def _by_partition(series: Series, name: str, group: str) -> dict[tuple[str, str], float]:
    return {
        (dict(ls)["topic"], dict(ls)["partition"]): v
        for (n, ls), v in series.items()
        if n == name and dict(ls).get("group") == group
    }


def _until(what: str, probe: Callable[[], Series | None], ok: Callable[[Series], bool]) -> Series:
    """Scrape until `ok` holds (the lag exporter samples every 5 s); fail after 90 s."""
    deadline = time.monotonic() + 90
    last: Series | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last is not None and ok(last):
            return last
        time.sleep(0.5)
    raise AssertionError(f"{what} not seen within 90 s; last scrape: {last}")


def _caught_up(group: str) -> Callable[[Series], bool]:
    def ok(series: Series) -> bool:
        ends = _by_partition(series, "khala_consumergroup_end_offset", group)
        committed = _by_partition(series, "khala_consumergroup_committed_offset", group)
        lag = _by_partition(series, "khala_consumergroup_lag_messages", group)
        return (
            sum(ends.values()) > 0
            and all(committed.get(k) == v for k, v in ends.items() if v)
            and not any(lag.values())
        )

    return ok


async def _messages(db_url: str) -> int:
    engine = create_async_engine(db_url)
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(sa.text("SELECT count(*) FROM messages"))).scalar_one())
    finally:
        await engine.dispose()


def test_stages_metrics_move_during_a_real_import(
    kafka_bootstrap: str, topic_prefix: str, pg_url: str, tmp_path: Path
) -> None:
    export = tmp_path / "export.zip"
    generate_export(export, users=6, threads_per_user=3, messages_per_thread=4)
    topics = Topics(topic_prefix)
    ports = {"process": _free_port(), "sink": _free_port()}
    stages = Stages(
        stage_env(kafka_bootstrap, topic_prefix, pg_url),
        log_dir=tmp_path / "stages",
        stage_args={stage: ("--metrics-port", str(port)) for stage, port in ports.items()},
    )
    with stages:
        stages.start()
        before = {
            stage: _until(f"{stage}'s endpoint", lambda p=port: _scrape(p), lambda _: True)
            for stage, port in ports.items()
        }
        # Nothing has been read or written yet, and no partition has an end offset.
        assert _total(before["process"], "khala_records_in_total", stage="process") == 0
        assert _total(before["sink"], "khala_records_out_total", stage="sink") == 0
        for stage, group in (("process", topics.processor_group), ("sink", topics.sink_group)):
            ends = _by_partition(before[stage], "khala_consumergroup_end_offset", group)
            assert sum(ends.values()) == 0, (stage, ends)

        stages.publish(export)
        stages.wait_applied(pg_url)

        process = _until(
            "the process group caught up",
            lambda: _scrape(ports["process"]),
            _caught_up(topics.processor_group),
        )
        sink = _until(
            "the sink group caught up",
            lambda: _scrape(ports["sink"]),
            _caught_up(topics.sink_group),
        )

    # Records: every published document was read by the processor, which emitted row changes.
    published = _by_partition(process, "khala_consumergroup_end_offset", topics.processor_group)
    documents_in = _total(process, "khala_records_in_total", stage="process")
    assert documents_in >= sum(published.values()) > 0
    assert _total(process, "khala_records_out_total", stage="process") > 0
    assert _total(process, "khala_records_in_total", stage="process", table="messages") > 0
    # Rows: the sink read changes and applied at least every message row now in the table.
    assert _total(sink, "khala_records_in_total", stage="sink") > 0
    messages = asyncio.run(_messages(pg_url))
    assert messages > 0
    assert _total(sink, "khala_records_out_total", stage="sink", table="messages") >= messages
    # Lag: the sink's series are on the changes topic, its group's total back to 0.
    sink_ends = _by_partition(sink, "khala_consumergroup_end_offset", topics.sink_group)
    assert {topic for topic, _ in sink_ends} == {topics.changes}
    assert _total(sink, "khala_consumergroup_total_lag_messages", group=topics.sink_group) == 0
    assert _total(process, "khala_batch_duration_seconds_count", stage="process") > 0
