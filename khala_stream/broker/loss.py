"""Records the broker acknowledged and then lost: when to look, and what is missing.

noida-db loses the tail of a topic when a stop races a write (and a new, empty broker may take
an old one's place). A stage that waits for acknowledged records to arrive would then wait for
ever, so whoever waits checks, at one pace, whether the log still reaches what was
acknowledged: `import-chat` for the documents it published (it publishes them again), the
processor for the changes of the run the sink has not applied (it derives the run again).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Final

__all__ = ["LOSS_CHECK_S", "LossCheck", "short_partitions"]

LOSS_CHECK_S: Final = 2.0
"""How often a waiting stage asks the broker whether it lost what it acknowledged."""


class LossCheck:
    """`due()` is true at most once every `every_s` seconds (the first call included)."""

    def __init__(self, every_s: float = LOSS_CHECK_S) -> None:
        self._every = every_s
        self._next = 0.0

    def due(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self._every
        return True


def short_partitions(
    ends: Mapping[int, int], acknowledged: Mapping[int, int]
) -> dict[int, tuple[int, int]]:
    """Partitions whose log now ends before what the broker acknowledged: (end now, end
    acknowledged)."""
    return {p: (ends.get(p, 0), end) for p, end in acknowledged.items() if ends.get(p, 0) < end}
