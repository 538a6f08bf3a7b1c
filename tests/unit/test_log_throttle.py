"""A broker that is down makes aiokafka log every reconnection attempt: through the CLI's
handler, each such line is said once, then once in a while with how many were held back;
our own lines pass untouched."""

from __future__ import annotations

import io
import logging

from khala_stream.log_throttle import Throttle


def _logging(clock: list[float]) -> tuple[io.StringIO, logging.Handler]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    handler.addFilter(Throttle("aiokafka", every_s=10, clock=lambda: clock[0]))
    return out, handler


def test_repeats_are_held_back_and_counted_others_pass() -> None:
    clock = [0.0]
    out, handler = _logging(clock)
    loggers = [logging.getLogger(n) for n in ("aiokafka", "aiokafka.conn", "khala_stream.x")]
    for logger in loggers:
        logger.addHandler(handler)
        logger.propagate = False
    try:
        for attempt in range(150):  # 15 s of attempts, ten a second
            clock[0] = attempt / 10
            loggers[0].error("Unable connect to node with id %s: %s", 1, f"attempt {attempt}")
            loggers[1].error("Connection at %s closed", "127.0.0.1:9092")
            loggers[2].warning("waiting for the broker (attempt %d)", attempt)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
            logger.propagate = True
    lines = out.getvalue().splitlines()
    connect = [line for line in lines if line.startswith("aiokafka: Unable connect")]
    closed = [line for line in lines if line.startswith("aiokafka.conn:")]
    ours = [line for line in lines if line.startswith("khala_stream.x:")]
    assert connect == [
        "aiokafka: Unable connect to node with id 1: attempt 0",
        "aiokafka: Unable connect to node with id 1: attempt 100"
        " [99 more like it in the last 10s]",
    ]
    assert len(closed) == 2 and closed[1].endswith("[99 more like it in the last 10s]")
    assert len(ours) == 150
