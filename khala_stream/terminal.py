"""Text from an export made safe to print: control characters escaped.

ZIP entry names, table names and document keys come from whoever wrote the export; printed raw,
an ESC or a carriage return in one of them could rewrite the operator's terminal or hide a line
of the report, and a bidi override could make a name read as another. Every printer of such a
name (human output, error messages, log lines) passes it through `printable`. `--json` output
needs nothing: JSON escapes control characters itself, and its readers want the exact value.
"""

from __future__ import annotations

import logging
import re
from typing import Final

__all__ = ["EscapingFormatter", "printable"]

# C0 and C1 controls and DEL; the Unicode line and paragraph separators; the bidi marks,
# embeddings, overrides and isolates (the "Trojan Source" characters).
_UNSAFE: Final = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """`text` with every control character written as `\\xNN` or `\\uNNNN`; the rest as is."""
    return _UNSAFE.sub(_escape, text)


class EscapingFormatter(logging.Formatter):
    """A log formatter whose message part is `printable`: log lines name keys and entries.

    Only the message is escaped; a traceback (at -vv) keeps its own line breaks.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.getMessage())
        return super().formatMessage(record)
