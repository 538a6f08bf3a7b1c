"""A library's repeated complaint, said once in a while.

A broker that is down makes aiokafka log every reconnection attempt, ten a second and more,
which buries the lines that say what the tool is doing. `Throttle` lets the first record of
each message template of the throttled loggers through, then at most one every `every_s`
seconds, which says how many like it were held back since.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["Throttle"]


class Throttle(logging.Filter):
    """A handler filter for the loggers named `prefix` and below; the others pass."""

    def __init__(
        self, prefix: str, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self._prefix = prefix
        self._every_s = every_s
        self._clock = clock
        # (logger, template) -> (when one was last let through, how many held back since)
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not (record.name == self._prefix or record.name.startswith(self._prefix + ".")):
            return True
        key = (record.name, str(record.msg))  # the template: its arguments vary
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self._every_s:
            self._seen[key] = (seen[0], seen[1] + 1)
            return False
        self._seen[key] = (now, 0)
        if seen is not None and seen[1]:
            record.msg = f"{record.msg} [{seen[1]} more like it in the last {now - seen[0]:.0f}s]"
        return True
