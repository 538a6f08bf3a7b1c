"""One database per topic prefix: the topics remember the database they feed.

The stages keep their consumer positions in the database (SPEC §4), so a second database
reading the same topics would see none of its positions there: on a broker that deletes
consumed records (the embedded one) it would wait forever for changes its sink never saw, on
one that keeps them it would apply the first database's changes as its own. The first stage
to start writes its database's id to `<prefix>.owner`; every stage reads the first record
there before it reads or writes anything else, and refuses (exit 2) topics of another
database. The owner topic is compacted: its record must outlive any retention period.
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from aiokafka import TopicPartition
from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream.broker.clients import ensure_topics, make_consumer, make_producer
from khala_stream.config import KafkaSettings, Settings
from khala_stream.contract import Topics
from khala_stream.db.importer_tables import IDENTITY
from khala_stream.db.port import Database
from khala_stream.db.queries import insert_for
from khala_stream.errors import UsageError
from khala_stream.runtime import with_retries


class TopicsOfAnotherDatabase(UsageError):
    """The prefix's topics feed another database; nothing has been read or written."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        super().__init__(
            f"the topics with prefix {prefix!r} feed another database, and the stages keep "
            "their positions in the database they write: use one prefix per database "
            "(KHALA_TOPIC_PREFIX), or on the embedded broker one KHALA_BROKER_HOME per database "
            "(to start over with a new database there, delete the broker's folder, `.khala/` "
            "by default, with it)"
        )


async def prepare_topics(kafka: KafkaSettings, topics: Topics, engine: AsyncEngine) -> None:
    """Creates the missing topics and binds them to this database (or refuses them)."""
    # Compacted: after a retention period without it, another database could claim them.
    await ensure_topics(kafka, topics.all, compacted=[topics.owner])
    mine = await database_id(engine)
    owner = await _owner(kafka, topics.owner)
    if owner is None:
        producer = make_producer(kafka)
        await producer.start()
        try:
            await producer.send_and_wait(topics.owner, mine.encode(), mine.encode(), partition=0)
        finally:
            await producer.stop()
        owner = await _owner(kafka, topics.owner)  # the first claim wins a race
    if owner != mine:
        raise TopicsOfAnotherDatabase(topics.prefix)


async def prepare_topics_waiting(live: Settings, db: Database) -> None:
    """`prepare_topics` for `live`'s prefix and `db`, waiting for a broker that is away for up
    to the database port's deadline (then RuntimeFailure)."""
    await with_retries(
        lambda: prepare_topics(live.kafka, Topics(live.topic_prefix), db.engine),
        what="the broker",
        deadline_s=db.deadline_s,
    )


async def database_id(engine: AsyncEngine) -> str:
    """This database's id, made on first use."""
    async with engine.begin() as conn:
        await conn.execute(
            insert_for(conn, IDENTITY)
            .values(singleton=1, database_id=str(uuid.uuid4()))
            .on_conflict_do_nothing()
        )
        return str(await conn.scalar(sa.select(IDENTITY.c.database_id)))


async def _owner(kafka: KafkaSettings, topic: str) -> str | None:
    """The database id of the first record of the topic's first partition, if there is one."""
    consumer = make_consumer(kafka, group_id=None)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        start = (await consumer.beginning_offsets([tp]))[tp]
        end = (await consumer.end_offsets([tp]))[tp]
        if start >= end:
            return None
        consumer.seek(tp, start)
        record = await consumer.getone(tp)
        return record.value.decode() if record.value else None
    finally:
        await consumer.stop()
