"""The Kafka floor: the direct path with one trip through the broker in the middle.

    python -m bench.floor EXPORT.zip DATABASE_DSN BOOTSTRAP [--trips 2]

A measurement for the design discussion of issue #5, not a way to import: what a streaming
import must pay at the least on this machine, before any of the guarantees the product gives.
A publisher process sends every line of the six tables the import reads, as it is (not
parsed), to a topic of one partition per table, so that file order is offset order, through
the product's own producer settings (`make_producer`: idempotent, acks=all, zstd); an empty
message closes each table. Meanwhile this process reads the topics in the order the direct
path's mapping asks for them (`bench.direct.map_documents`), parses each line once, and maps
and writes the rows exactly as the direct path does. Read records are deleted from the broker
after their last read, as the product trims the embedded broker. With `--trips 2`, the
product's shape: the mapped rows go through the broker once more, in messages of about 512 KB
of JSON rows of one table (one partition, in order), to a writer process that parses them and
writes them as the direct path does.

What it leaves out, and the product cannot: the document store (arrival order and partition
count do not change the result; incremental re-imports), the row ledger (a replay writes
nothing; re-derivation after a crash), identities and WorkOS, dead letters, and with one
trip, the second trip through the broker (processors and sinks scale and fail apart). Like
the direct path it holds each thread's owner and document in memory.
"""

from __future__ import annotations

import argparse
import asyncio
import queue
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import orjson
from aiokafka import TopicPartition  # type: ignore[import-untyped, unused-ignore]

from bench.direct import (
    Row,
    map_documents,
    plain_dsn,
    snapshot_ms,
    table_entries,
    table_lines,
    write_rows,
)
from khala_stream.broker.clients import Trimmer, ensure_topics, make_consumer, make_producer
from khala_stream.config import DEFAULT_L402_HOSTS, KafkaSettings
from khala_stream.contract.codec import chunks
from khala_stream.contract.tables import DestinationTable
from processors.autopilots import parse_allowed_hosts

# The order in which the mapping first asks for each table: the publisher's order too.
TABLES: Final = ("users", "threads", "blueprints", "messages", "runs", "receipts")
MAPPING_READS: Final = {"messages": 2}  # titles first, then the rows (as the direct path)
_END: Final = b""  # the message that closes a table
_AHEAD: Final = 8  # parsed pages the reader may be ahead of the mapping
_PAGE: Final = 2000  # records per page
_IN_FLIGHT: Final = 20_000  # sends the publisher leaves unacknowledged
_ROWS: Final = "rows"  # the second trip's topic
_ROWS_BYTES: Final = 512 * 1024  # of JSON rows per message, as the product's row batches
_ROWS_IN_FLIGHT: Final = 8


def _settings(bootstrap: str) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=bootstrap, partitions=1, trim_consumed=True)


# --------------------------------------------------------------------------- publisher


async def publish(path: Path, bootstrap: str, prefix: str) -> None:
    """Every non-blank line of the six tables, in file order, then an end message each."""
    producer = make_producer(_settings(bootstrap))
    await producer.start()
    try:
        with zipfile.ZipFile(path) as archive:
            entries = table_entries(archive)
            for table in TABLES:
                pending: list[asyncio.Future[Any]] = []
                for line in table_lines(archive, entries.get(table)):
                    pending.append(await producer.send(f"{prefix}.{table}", line))
                    if len(pending) >= _IN_FLIGHT:
                        await asyncio.gather(*pending)
                        pending = []
                pending.append(await producer.send(f"{prefix}.{table}", _END))
                await asyncio.gather(*pending)
    finally:
        await producer.stop()


# --------------------------------------------------------------------------- reader


class TopicReader:
    """Reads one topic from its start to its end message, on a thread of its own (the mapping
    and the writer are synchronous with respect to it), a page of parsed values at a time."""

    def __init__(self, bootstrap: str, prefix: str, reads: dict[str, int] | None = None) -> None:
        """`reads`: how often each topic is read (default once); consumed records are deleted
        on the last read, as the product trims the embedded broker (its CPU follows what it
        holds)."""
        self._bootstrap, self._prefix = bootstrap, prefix
        self._reads_left = dict(reads or {})

    def documents(self, table: str) -> Iterator[dict[str, Any]]:
        return (value for value in self.values(table) if isinstance(value, dict))

    def rows(self) -> Iterator[tuple[DestinationTable, Row]]:
        """The rows of the rows topic (`send_rows`), in order."""
        for table, rows in self.values(_ROWS):
            for row in rows:
                yield table, row

    def values(self, name: str) -> Iterator[Any]:
        self._reads_left[name] = left = self._reads_left.get(name, 1) - 1
        pages: queue.Queue[list[Any] | BaseException | None] = queue.Queue(_AHEAD)
        worker = threading.Thread(target=self._read, args=(name, pages, left == 0), daemon=True)
        worker.start()
        while (page := pages.get()) is not None:
            if isinstance(page, BaseException):
                raise page
            yield from page
        worker.join()

    def _read(self, name: str, pages: queue.Queue[Any], trim: bool) -> None:
        try:
            asyncio.run(self._consume(name, pages, trim))
        except BaseException as exc:  # handed to the reading side
            pages.put(exc)
            return
        pages.put(None)

    async def _consume(self, name: str, pages: queue.Queue[Any], trim: bool) -> None:
        settings = _settings(self._bootstrap)
        consumer = make_consumer(settings, group_id=None)
        trimmer = Trimmer(settings)
        await consumer.start()
        try:
            tp = TopicPartition(f"{self._prefix}.{name}", 0)
            consumer.assign([tp])
            consumer.seek(tp, 0)
            while True:
                batch = await consumer.getmany(tp, timeout_ms=200, max_records=_PAGE)
                page: list[Any] = []
                records = batch.get(tp, [])
                for record in records:
                    if record.value == _END:
                        await asyncio.to_thread(pages.put, page)
                        return
                    page.append(orjson.loads(record.value))
                if page:
                    await asyncio.to_thread(pages.put, page)
                if trim and records:
                    await trimmer.consumed({tp: records[-1].offset + 1})
        finally:
            await consumer.stop()


async def send_rows(
    rows: Iterator[tuple[DestinationTable, Row]], bootstrap: str, prefix: str
) -> None:
    """The second trip: `rows` as messages of about `_ROWS_BYTES` of JSON rows of one table
    (`["table", [row, …]]`, the rows encoded once and joined), then an end message."""
    producer = make_producer(_settings(bootstrap))
    await producer.start()
    topic = f"{prefix}.{_ROWS}"
    pending: list[asyncio.Future[Any]] = []
    try:
        encoded = ((table, orjson.dumps(row)) for table, row in rows)
        for table, items in chunks(encoded, _ROWS_BYTES):
            value = b'["' + table.encode() + b'",[' + b",".join(items) + b"]]"
            pending.append(await producer.send(topic, value))
            if len(pending) > _ROWS_IN_FLIGHT:
                await pending.pop(0)
            await asyncio.sleep(0)  # let the producer send while the mapping goes on
        pending.append(await producer.send(topic, _END))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


# --------------------------------------------------------------------------- the run


async def run(path: Path, dsn: str, bootstrap: str, *, batch: int, trips: int) -> dict[str, Any]:
    prefix = f"floor{uuid.uuid4().hex[:8]}"
    await ensure_topics(_settings(bootstrap), [f"{prefix}.{t}" for t in (*TABLES, _ROWS)])
    began = time.perf_counter()
    children = {"publisher": _child("--publish", str(path), bootstrap, prefix)}
    if trips == 2:
        children["writer"] = _child("--write", dsn, bootstrap, prefix, str(batch))
    try:
        reader = TopicReader(bootstrap, prefix, reads=MAPPING_READS)
        rows = map_documents(
            reader.documents,
            snapshot_ms(path),
            allowed_hosts=parse_allowed_hosts(DEFAULT_L402_HOSTS),
        )
        if trips == 2:
            await send_rows(rows, bootstrap, prefix)
            result: dict[str, Any] = {}
        else:
            result = await write_rows(rows, dsn, batch=batch)
    finally:
        for name, child in children.items():
            if child.wait() != 0:
                raise RuntimeError(f"the {name} exited with {child.returncode}")
    return result | {"seconds": time.perf_counter() - began, "trips": trips}


def _child(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "bench.floor", *args])


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--publish":
        path, bootstrap, prefix = args[1:4]
        asyncio.run(publish(Path(path), bootstrap, prefix))
        return 0
    if args and args[0] == "--write":
        dsn, bootstrap, prefix, batch = args[1:5]
        rows = TopicReader(bootstrap, prefix).rows()
        asyncio.run(write_rows(rows, dsn, batch=int(batch)))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("export", type=Path)
    parser.add_argument("dsn", help="postgresql://… of an empty database with the tables")
    parser.add_argument("bootstrap", help="the broker, host:port on 127.0.0.1")
    parser.add_argument("--batch", type=int, default=5000, help="rows per COPY (default 5000)")
    parser.add_argument("--trips", type=int, choices=(1, 2), default=1)
    parsed = parser.parse_args(args)
    result = asyncio.run(
        run(
            parsed.export,
            plain_dsn(parsed.dsn),
            parsed.bootstrap,
            batch=parsed.batch,
            trips=parsed.trips,
        )
    )
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
