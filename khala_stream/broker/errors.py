"""Classify broker failures: wait them out (transient), or stop (anything else).

The counterpart of `khala_stream/db/errors.py` for the broker: every retry decision about a
Kafka client's failure is made here, from exception classes, never from message text.
"""

from __future__ import annotations

from aiokafka.errors import (
    CommitFailedError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    NoBrokersAvailable,
    NodeNotReadyError,
    UnknownTopicOrPartitionError,
)

__all__ = ["is_transient"]

# Not flagged `retriable` by aiokafka, but what a broker that is down or restarting looks like
# from a client: no connection, no answer, or a topic not (yet again) in its metadata.
_DOWN = (
    KafkaConnectionError,
    KafkaTimeoutError,
    NoBrokersAvailable,
    NodeNotReadyError,
    UnknownTopicOrPartitionError,
    CommitFailedError,
)


def is_transient(exc: BaseException) -> bool:
    """True when the same broker call may succeed later: broker down, restarting, electing.

    Connection-level errors of the socket (ConnectionError, TimeoutError) count too: aiokafka
    lets some of them through unwrapped while a broker goes away.
    """
    if isinstance(exc, (*_DOWN, ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, KafkaError) and bool(getattr(exc, "retriable", False))
