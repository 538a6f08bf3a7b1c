"""Where PostgreSQL's time goes in a step: its statements, grouped by what they do to which table.

When the bench's server can load `pg_stat_statements` (a contrib module: Debian's server has
it, a bare build may not), the server is restarted once with it preloaded, its counters are
reset before each measured step and read after it. Statements are grouped by a label (`COPY
messages`, `SELECT khala_import_documents`, ...) so that a thousand batches of one COPY are one
line; a staging table's random suffix is left out of its name. The figure is execution time,
which for these CPU-bound statements is close to the backends' CPU; what no statement accounts
for (WAL writing at commit, checkpoints, autovacuum) is the rest of the step's PostgreSQL CPU.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

__all__ = ["AVAILABLE", "EXTENSION", "RESET", "TOP", "Statement", "grouped", "statement_label"]

EXTENSION: Final = "pg_stat_statements"
AVAILABLE: Final = f"SELECT count(*) FROM pg_available_extensions WHERE name = '{EXTENSION}'"
RESET: Final = "SELECT pg_stat_statements_reset()"
# Every database's statements but the admin database's own (the bench's CHECKPOINTs, this).
TOP: Final = (
    "SELECT query, calls, rows, total_exec_time FROM pg_stat_statements"
    " WHERE dbid <> (SELECT oid FROM pg_database WHERE datname = current_database())"
)

_NAME = r'"?([A-Za-z_][A-Za-z0-9_]*)"?'
_PATTERNS: Final = (
    ("COPY", re.compile(rf"^\s*COPY\s+{_NAME}", re.I)),
    ("INSERT", re.compile(rf"\bINSERT\s+INTO\s+{_NAME}", re.I)),
    ("UPDATE", re.compile(rf"\bUPDATE\s+{_NAME}\s+SET\b", re.I)),  # not ON CONFLICT's
    ("DELETE", re.compile(rf"\bDELETE\s+FROM\s+{_NAME}", re.I)),
    ("ANALYZE", re.compile(rf"^\s*ANALYZE\s+{_NAME}", re.I)),
    ("SELECT", re.compile(rf"^\s*SELECT\b.*?\bFROM\s+{_NAME}", re.I | re.S)),
)
# A staging table's name ends in a random suffix of hex digits (db/queries.py `staged`).
_STAGE_SUFFIX: Final = re.compile(r"_[0-9a-f]{8,}$")


def statement_label(query: str) -> str:
    """What a statement does, and to which table: `COPY messages`, `INSERT runs`, ...; its
    first word when it names no table."""
    for verb, pattern in _PATTERNS:
        if match := pattern.search(query):
            return f"{verb} {_STAGE_SUFFIX.sub('', match.group(1))}"
    words = query.split(None, 1)
    return words[0].upper() if words else "?"


@dataclass(frozen=True, slots=True)
class Statement:
    label: str
    seconds: float
    calls: int
    rows: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def grouped(rows: list[Any]) -> list[Statement]:
    """(query, calls, rows, total_exec_time in ms) rows as one `Statement` per label, the
    longest first."""
    totals: dict[str, tuple[float, int, int]] = {}
    for query, calls, n, ms in rows:
        label = statement_label(str(query))
        seconds, c, r = totals.get(label, (0.0, 0, 0))
        totals[label] = (seconds + float(ms) / 1000, c + int(calls), r + int(n))
    return sorted(
        (Statement(label, round(s, 2), c, r) for label, (s, c, r) in totals.items()),
        key=lambda s: -s.seconds,
    )


SHOWN: Final = 6
"""Statement groups a printed line names, the longest first."""


def statements_line(statements: Sequence[tuple[str, float]], every: float) -> str:
    """The line the bench prints of a step's statements: the seconds of all of them, then
    the `SHOWN` longest groups (label, seconds), longest first."""
    each = ", ".join(f"{label} {seconds:.1f}" for label, seconds in statements[:SHOWN])
    return f"of postgres, seconds executing statements ({every:.1f} in all): {each}"
