"""broker/errors.py: which broker failures a stage waits out, and which stop it."""

from __future__ import annotations

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    NotLeaderForPartitionError,
    OutOfOrderSequenceNumber,
    RecordTooLargeError,
    UnknownTopicOrPartitionError,
)

from khala_stream.broker.errors import is_transient
from khala_stream.runtime import retryable


@pytest.mark.parametrize(
    "exc",
    [
        KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 9)]"),  # consumer.start()
        KafkaTimeoutError(),
        NotLeaderForPartitionError(),
        UnknownTopicOrPartitionError(),
        ConnectionResetError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_broker_that_is_down_or_restarting_is_waited_out(exc: Exception) -> None:
    assert is_transient(exc)
    assert retryable(exc)


@pytest.mark.parametrize(
    "exc",
    [OutOfOrderSequenceNumber(), RecordTooLargeError(), ValueError("bad data")],
    ids=lambda e: type(e).__name__,
)
def test_what_a_retry_cannot_fix_stops_the_stage(exc: Exception) -> None:
    assert not is_transient(exc)
    assert not retryable(exc)
