"""Progress per table: plain log lines off a terminal, rich bars on one, ETA from estimates."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from khala_stream.progress import estimate_lines, table_progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_when_not_a_terminal() -> None:
    out, clock = io.StringIO(), Clock()
    with table_progress(
        stream=out, estimates={"users": 1000}, log_every_s=5, clock=clock
    ) as progress:
        progress("users", 0)
        clock.now += 2
        progress("users", 200)  # within 5 s of the start: no line yet
        clock.now += 3
        progress("users", 500)  # 5 s: a line, with an ETA from the estimate
        clock.now += 5
        progress("users", 1000)
        progress("threads", 10)  # the next table starts: users is done
        clock.now += 1
        progress("threads", 40, done=True)  # the last table: done when it says so
        clock.now += 60  # (the import goes on)
    lines = out.getvalue().splitlines()
    assert lines == [
        "progress: publish table=users lines=500 rate=100/s eta=5s",
        "progress: publish table=users lines=1000 rate=100/s eta=0s",
        "progress: publish table=users lines=1000 done seconds=10.0 rate=100/s",
        "progress: publish table=threads lines=40 done seconds=1.0 rate=40/s",
    ]


def test_no_eta_without_an_estimate_or_past_it() -> None:
    out, clock = io.StringIO(), Clock()
    with table_progress(stream=out, estimates={"runs": 10}, log_every_s=1, clock=clock) as p:
        p("messages", 0)
        clock.now += 1
        p("messages", 50)
        p("runs", 0)
        clock.now += 1
        p("runs", 20)  # more than estimated
    text = out.getvalue()
    assert "table=messages lines=50 rate=50/s\n" in text
    assert "table=runs lines=20 rate=20/s\n" in text
    assert "eta" not in text


def test_bars_on_a_terminal() -> None:
    out = io.StringIO()
    with table_progress(stream=out, interactive=True, estimates={"users": 4000}) as progress:
        for n in range(0, 4001, 2000):
            progress("users", n)
        progress("threads", 2000)
        progress("threads", 2500)
    text = out.getvalue()
    assert "publish users" in text
    assert "publish threads" in text
    assert "4,000 lines" in text  # finished: the count, without the estimate
    assert "2,500 lines" in text


def _lines(n: int) -> bytes:
    return b"".join(b'{"_id": "doc%06d", "text": "%s"}\n' % (i, b"x" * (i % 40)) for i in range(n))


def test_estimates_from_zip_and_folder(tmp_path: Path) -> None:
    small, big = _lines(7), _lines(30000)
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("users/documents.jsonl", small)
        z.writestr("messages/documents.jsonl", big)
    entries = {
        "users": "users/documents.jsonl",
        "messages": "messages/documents.jsonl",
        "runs": "runs/documents.jsonl",  # absent: no estimate
    }
    found = estimate_lines(archive, entries, sample_bytes=64 << 10)
    assert found["users"] == 7  # the whole entry fits the sample: exact
    assert found["messages"] == pytest.approx(30000, rel=0.05)
    assert "runs" not in found

    folder = tmp_path / "export"
    (folder / "users").mkdir(parents=True)
    (folder / "users" / "documents.jsonl").write_bytes(small.rstrip(b"\n"))  # no final LF
    assert estimate_lines(folder, {"users": "users/documents.jsonl", "runs": "runs/x"}) == {
        "users": 7
    }
    assert estimate_lines(tmp_path / "missing.zip", entries) == {}
