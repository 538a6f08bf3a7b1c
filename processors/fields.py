"""How the reference reads a document's fields and timestamps (reference §1.3, §3.0; SPEC §8.3–8.4).

Pure functions over decoded JSON documents; no I/O.
"""

from __future__ import annotations

import math
import re
import time
from datetime import UTC, datetime
from typing import Any

# Re-exported: the policies read every field through this module.
from khala_stream.contract.documents import ASCII_TRIM as ASCII_TRIM
from khala_stream.contract.documents import string_field as string_field

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_WORKOS_ID = re.compile(r"user_[A-Za-z0-9_-]+")
# PHP is_numeric(): optional leading whitespace, sign, digits with optional fraction, exponent.
_NUMERIC = re.compile(r"[ \t\n\r\v\f]*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?[ \t\n\r\v\f]*")


def int_field(doc: dict[str, Any], name: str) -> int | None:
    """An integer, or a float / numeric string truncated toward zero; anything else is missing."""
    value = doc.get(name)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) else None
    if isinstance(value, str) and _NUMERIC.fullmatch(value):
        number = float(value)
        return int(number) if math.isfinite(number) else None
    return None


# Year 10000: later instants have no `YYYY-MM-DD` form (nor a Python datetime).
_MAX_MS = 253402300800000


def usable_ms(doc: dict[str, Any], name: str) -> int | None:
    """A timestamp field is usable when it is a number (or numeric string) greater than 0,
    and before the year 10000."""
    value = int_field(doc, name)
    return value if value is not None and 0 < value < _MAX_MS else None


def first_usable_ms(doc: dict[str, Any], names: tuple[str, ...], fallback_ms: int) -> int:
    for name in names:
        value = usable_ms(doc, name)
        if value is not None:
            return value
    return fallback_ms


CREATED_CHAIN = ("createdAtMs", "_creationTime")
UPDATED_CHAIN = ("updatedAtMs", "createdAtMs", "_creationTime")


def to_timestamp(ms: int) -> str:
    """Epoch milliseconds → `YYYY-MM-DD HH:MM:SS` (UTC), floored to the second (timestamp(0))."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms // 1000))


def created_at(doc: dict[str, Any], snapshot_ms: int) -> str:
    return to_timestamp(first_usable_ms(doc, CREATED_CHAIN, snapshot_ms))


def updated_at(doc: dict[str, Any], snapshot_ms: int) -> str:
    return to_timestamp(first_usable_ms(doc, UPDATED_CHAIN, snapshot_ms))


def now_timestamp() -> str:
    """Wall clock, only for the bookkeeping columns where the reference puts "now" (SPEC §8.13)."""
    return datetime.now(tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def is_uuid(value: str) -> bool:
    """Laravel's Str::isUuid: 8-4-4-4-12 hex digits, any version, any case."""
    return _UUID.fullmatch(value) is not None


def is_workos_id(value: str) -> bool:
    return _WORKOS_ID.fullmatch(value) is not None


def php_truthy(value: Any) -> bool:
    """PHP's (bool) cast, for `cancelRequested`."""
    if value is None or value is False:
        return False
    if value is True:
        return True
    if isinstance(value, int | float):
        return value != 0
    if isinstance(value, str):
        return value not in ("", "0")
    if isinstance(value, list | dict):
        return len(value) > 0
    return True
