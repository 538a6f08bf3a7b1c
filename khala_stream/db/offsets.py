"""Consumer positions kept in the database, moved in the same transaction as the data.

A batch read from `[start, end)` of a partition is applied together with
`advance(..., start, end)`; the advance is conditional, so when two workers (or a worker and its
own crashed predecessor) apply the same batch, exactly one commit moves the position and the other
sees `False` and rolls back: the data of each offset takes effect exactly once.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from khala_stream.db.importer_tables import OFFSETS
from khala_stream.db.queries import insert_for

__all__ = ["advance", "load_offsets", "rewind"]


def _where(group: str, topic: str, partition: int) -> sa.ColumnElement[bool]:
    return sa.and_(
        OFFSETS.c.consumer_group == group,
        OFFSETS.c.topic == topic,
        OFFSETS.c.partition == partition,
    )


async def load_offsets(conn: AsyncConnection, group: str, topic: str) -> dict[int, int]:
    """partition -> next offset to read, for every partition this group has a position in."""
    result = await conn.execute(
        sa.select(OFFSETS.c.partition, OFFSETS.c.next_offset).where(
            OFFSETS.c.consumer_group == group, OFFSETS.c.topic == topic
        )
    )
    return {int(partition): int(offset) for partition, offset in result}


async def _move(
    conn: AsyncConnection, group: str, topic: str, partition: int, start: int, end: int
) -> bool:
    result = await conn.execute(
        sa.update(OFFSETS)
        .where(_where(group, topic, partition), OFFSETS.c.next_offset <= start)
        .values(next_offset=end)
    )
    return result.rowcount == 1


async def advance(
    conn: AsyncConnection, group: str, topic: str, partition: int, start: int, end: int
) -> bool:
    """Move the position from `start` to `end`; False if it is already past `start`.

    The row is created when missing (`start` is then the first offset the consumer read). A
    stored position below `start` is a gap in the log (compaction, transaction markers) and is
    moved too: no other worker can have applied offsets beyond the stored position.

    Race-safe on PostgreSQL: two workers creating the same new row both `INSERT ... ON CONFLICT
    DO NOTHING`; the loser waits for the winner's transaction, inserts nothing, and re-checks
    with the conditional UPDATE, which then sees the winner's committed position.
    """
    if end < start:
        raise ValueError(f"offset range [{start}, {end}) is reversed")
    if await _move(conn, group, topic, partition, start, end):
        return True
    values = {
        "consumer_group": group,
        "topic": topic,
        "partition": partition,
        "next_offset": end,
    }
    result = await conn.execute(insert_for(conn, OFFSETS).values(**values).on_conflict_do_nothing())
    if result.rowcount == 1:
        return True
    return await _move(conn, group, topic, partition, start, end)


async def rewind(
    conn: AsyncConnection, group: str, topic: str, partition: int, stored: int, to: int
) -> bool:
    """Move the position back from `stored` to `to`; False if another worker moved it first.

    Only for a log that no longer holds what the group read (the broker lost or dropped it):
    the conditional advance would otherwise refuse every batch below the old position.
    """
    result = await conn.execute(
        sa.update(OFFSETS)
        .where(_where(group, topic, partition), OFFSETS.c.next_offset == stored)
        .values(next_offset=to)
    )
    return result.rowcount == 1
