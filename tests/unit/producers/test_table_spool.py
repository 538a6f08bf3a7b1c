"""The spool of a table's walk writes the table's file in export order (SPEC §5:
`_creationTime`, then `_id` in byte order), whatever order the walk stored the documents in,
and refuses to once it gave up."""

from __future__ import annotations

import io
import random
from pathlib import Path

import orjson
import pytest

from producers.live_api import export_order
from producers.table_spool import TableSpool


def _written(spool: TableSpool) -> bytes:
    out = io.BytesIO()
    spool.write(out)
    return out.getvalue()


def test_the_file_is_in_export_order_whatever_order_pages_came_in(tmp_path: Path) -> None:
    ids = ["a", "B", "b", "É", "e", "z9", "Z", "ü", "a\\\\b", "日本", "\U0001f600", "m n"]
    docs = [
        {"_id": i, "_creationTime": float(n % 3), "text": f'"{i}"\n\tline'}
        for n, i in enumerate(ids)
    ]
    for seed in range(5):
        shuffled = docs[:]
        random.Random(seed).shuffle(shuffled)
        spool = TableSpool(tmp_path / f"{seed}.spool")
        for start in range(0, len(shuffled), 5):
            page = shuffled[start : start + 5]
            spool.add((d["_creationTime"], d["_id"], orjson.dumps(d).decode()) for d in page)
        assert spool.whole
        expected = b"".join(orjson.dumps(d) + b"\n" for d in sorted(docs, key=export_order))
        byte_order = sorted(docs, key=lambda d: (d["_creationTime"], d["_id"].encode()))
        assert [d["_id"] for d in sorted(docs, key=export_order)] == [d["_id"] for d in byte_order]
        assert _written(spool) == expected
        assert _written(spool) == expected  # a retried write writes the same
        spool.close()
        assert not (tmp_path / f"{seed}.spool").exists()


def test_an_empty_walk_writes_an_empty_file(tmp_path: Path) -> None:
    spool = TableSpool(tmp_path / "e.spool")
    spool.add([])
    assert spool.whole and _written(spool) == b""
    spool.close()


def test_a_spool_that_gave_up_or_grew_too_large_writes_nothing(tmp_path: Path) -> None:
    spool = TableSpool(tmp_path / "g.spool")
    spool.add([(1.0, "a", "{}")])
    spool.give_up()
    spool.add([(2.0, "b", "{}")])  # later pages change nothing
    assert not spool.whole
    with pytest.raises(RuntimeError, match="gave up"):
        _written(spool)
    spool.close()

    small = TableSpool(tmp_path / "s.spool", most=3)
    small.add([(float(n), str(n), "{}") for n in range(3)])
    assert small.whole
    small.add([(9.0, "9", "{}")])
    assert not small.whole
    small.close()
