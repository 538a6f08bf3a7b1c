"""Text rules of the reference: display widths, whitespace, emails, handles (SPEC §8.4–8.5)."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterator
from functools import lru_cache
from itertools import count

from email_validator import EmailNotValidError, validate_email

from processors.fields import ASCII_TRIM

_WHITESPACE_RUN = re.compile(r"\s+")
_PLACEHOLDER = re.compile(r"migrated\+[0-9a-f]{20}@openagents\.local")
_HANDLE_DISALLOWED = re.compile(r"[^a-z0-9:_-]+")
HANDLE_MAX = 64


def collapse_whitespace(text: str) -> str:
    """Every run of Unicode whitespace becomes one space."""
    return _WHITESPACE_RUN.sub(" ", text)


def _char_width(char: str) -> int:
    # mb_strwidth: East Asian Wide and Fullwidth characters take two columns.
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def display_width(text: str) -> int:
    if text.isascii():
        return len(text)
    return sum(_char_width(c) for c in text)


def limit(text: str, columns: int, end: str = "") -> str:
    """Laravel's Str::limit: cut to `columns` display columns, right-trim, append `end` if cut."""
    if len(text) <= columns // 2 or display_width(text) <= columns:
        return text  # (a character is at most two columns wide)
    kept: list[str] = []
    width = 0
    for char in text:
        width += _char_width(char)
        if width > columns:
            break
        kept.append(char)
    return "".join(kept).rstrip(ASCII_TRIM) + end


def normalise_email(email: str) -> str:
    return email.strip(ASCII_TRIM).lower()


def is_placeholder(email: str) -> bool:
    return email.endswith("@openagents.local")


@lru_cache(maxsize=65536)
def is_valid_email(email: str) -> bool:
    """email-validator 2.x without deliverability checks; our own placeholders count as valid."""
    if _PLACEHOLDER.fullmatch(email):
        return True
    try:
        validate_email(email, check_deliverability=False)
    except EmailNotValidError:
        return False
    return True


def placeholder_email(workos_id: str, attempt: int = 0) -> str:
    seed = workos_id if attempt == 0 else f"{workos_id}|{attempt}"
    return f"migrated+{hashlib.sha256(seed.encode()).hexdigest()[:20]}@openagents.local"


def gravatar_url(email: str) -> str:
    digest = hashlib.md5(normalise_email(email).encode()).hexdigest()
    return f"https://www.gravatar.com/avatar/{digest}?d=identicon"


def normalise_handle(seed: str) -> str:
    """User::normalizeHandleBase: lower-case, local part only, safe characters, at most 64."""
    value = seed.lower().strip(ASCII_TRIM)
    if "@" in value:
        value = value.split("@", 1)[0]
    value = _HANDLE_DISALLOWED.sub("-", value).strip("-")[:HANDLE_MAX]
    return value or "autopilot"


def handle_candidates(base: str) -> Iterator[str]:
    """base, then base cut so that base + `-n` stays within 64 characters, for n = 1, 2, ..."""
    yield base
    for n in count(1):
        suffix = f"-{n}"
        yield base[: HANDLE_MAX - len(suffix)] + suffix
