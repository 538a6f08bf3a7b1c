"""A followed table's snapshot walk, kept as the walk stores it, so that the table's file of
the folder export is written without reading the mirror back (`live_mirror.write_folder`
reads it back, and stays the way for a walk this cannot take whole).

    spool = TableSpool(folder / "users.spool")
    spool.add(copied)          # each page's documents, as COPied new into the mirror
    spool.give_up()            # a page stored otherwise: the mirror writes the file
    if spool.whole:
        with (folder / "users" / "documents.jsonl").open("wb") as out:
            count = spool.write(out)
    spool.close()
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO, Final

MOST_DOCUMENTS: Final = 1_000_000
"""Beyond this many documents the spool gives up: its index is in memory (about 250 bytes a
document with an `_id` of 32 characters), the mirror's sort is not."""

_BLOCK: Final = 4096
"""Documents joined into one write: a write each costs more than the join."""


class TableSpool:
    """The documents of one table's walk in a file, in the order they came; in memory, each
    one's place in file order and in that file."""

    def __init__(self, path: Path, *, most: int = MOST_DOCUMENTS) -> None:
        self._path = path
        self._most = most
        self._file = path.open("wb")
        self._size = 0
        self._index: list[tuple[float, str, int, int]] = []
        self.whole = True
        """Every document of the walk is here, and only those: the file may be written."""

    def add(self, documents: Iterable[tuple[float, str, str]]) -> None:
        """Documents the mirror stored as new: sort position of `_creationTime`, `_id`, text."""
        if not self.whole:
            return
        for creation_time, doc_id, text in documents:
            line = text.encode() + b"\n"
            self._file.write(line)
            self._index.append((creation_time, doc_id, self._size, self._size + len(line)))
            self._size += len(line)
        if len(self._index) > self._most:
            self.give_up()

    def give_up(self) -> None:
        """The walk stored a page otherwise (a document there already): the file is to be
        written from the mirror."""
        self.whole = False
        self._index = []

    def write(self, out: BinaryIO) -> int:
        """The table's file into `out`: documents by `_creationTime`, then `_id` in byte order
        (the order `write_folder` asks PostgreSQL for; Python compares strings by code point,
        which is UTF-8's byte order). The number of documents. May be called again."""
        if not self.whole:
            raise RuntimeError("the spool gave up: write the table from the mirror")
        self._file.flush()
        self._index.sort()
        if self._size:
            with (
                self._path.open("rb") as source,
                mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_READ) as text,
            ):
                for first in range(0, len(self._index), _BLOCK):
                    block = self._index[first : first + _BLOCK]
                    out.write(b"".join([text[start:end] for _, _, start, end in block]))
        return len(self._index)

    def close(self) -> None:
        """Remove the file."""
        self._file.close()
        self._path.unlink(missing_ok=True)
        self._index = []
