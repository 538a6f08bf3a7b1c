"""Names from an export printed safely (issue 22 item 9): `khala_stream.terminal`."""

from __future__ import annotations

import io
import logging

import pytest

from khala_stream.terminal import EscapingFormatter, printable


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("users/documents.jsonl", "users/documents.jsonl"),
        ("déjà vu 漢字 🙂\t", "déjà vu 漢字 🙂\\x09"),
        ("\x1b[2J\x1b]0;title\x07", "\\x1b[2J\\x1b]0;title\\x07"),
        ("a\rb\nc\x00d\x7f\x9b", "a\\x0db\\x0ac\\x00d\\x7f\\x9b"),
        ("admin\u202egnp.exe", "admin\\u202egnp.exe"),  # a bidi override
        ("line\u2028break\u2066", "line\\u2028break\\u2066"),
    ],
)
def test_printable_escapes_control_characters_only(raw: str, shown: str) -> None:
    assert printable(raw) == shown
    assert printable(shown) == shown  # escaping twice changes nothing


def test_log_messages_are_escaped() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(EscapingFormatter("%(levelname)s %(message)s"))
    log = logging.getLogger("tests.terminal")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("unresolved user %s", "user_\x1b[31mred")
    finally:
        log.removeHandler(handler)
    assert stream.getvalue() == "WARNING unresolved user user_\\x1b[31mred\n"
