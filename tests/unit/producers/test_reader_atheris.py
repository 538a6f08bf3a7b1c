"""Coverage-guided fuzzing of the export reader with atheris (libFuzzer), when it is installed.

Whatever the bytes, `open_export` and reading every table end in documents and rejected lines
or in `InvalidExportError`; nothing else may escape, and every non-blank line of a table comes
out exactly once with its number (SPEC §3.1, §8.1). The hypothesis tests next door check the
same properties with random inputs; atheris adds coverage feedback (it learns which bytes
reach new branches of the reader and of `zipfile`).

Under pytest a short session runs in a subprocess (libFuzzer ends its process when it is
done). A long session by hand, keeping what it learns in a corpus folder:

    .venv/bin/python tests/unit/producers/test_reader_atheris.py -runs=2000000 CORPUS_DIR
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":  # the fuzzing process: instrument what it imports from here on
    import atheris

    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    with atheris.instrument_imports(include=["zipfile", "producers", "khala_stream"]):
        import zipfile

        from khala_stream.errors import InvalidExportError
        from producers.export_reader import RejectedLine, SourceDocument, open_export
else:
    import zipfile

    import pytest

    pytest.importorskip("atheris", reason="atheris is not installed in this environment")

RUNS = int(os.environ.get("ATHERIS_RUNS", "3000"))
NAMES = (
    "users/documents.jsonl",
    "x/threads/documents.jsonl",
    "../runs/documents.jsonl",
    "messages/documents.jsonl/",
    "/abs/receipts/documents.jsonl",
    "documents.jsonl",
)


def _expected_lines(content: bytes) -> list[tuple[int, bytes]]:
    out = []
    for number, line in enumerate(content.split(b"\n"), start=1):
        if number == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        if line.endswith(b"\r"):
            line = line[:-1]
        if line.strip():
            out.append((number, line))
    return out


def _drain(path: Path) -> list[tuple[str, int, bytes]]:
    """Every item of every table, or [] when the export is refused as a whole."""
    try:
        with open_export(path) as export:
            items = []
            for table in list(export.tables):
                for item in export.iter_table(table):
                    assert isinstance(item, SourceDocument | RejectedLine)
                    items.append((table, item.line, item.raw))
            export.sha256()
            return items
    except InvalidExportError as exc:
        assert exc.reason and exc.exit_code == 2
        return []


def fuzz_one(data: bytes, workdir: Path) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 2)
    if mode == 0:  # the bytes are the export file
        path = workdir / "export.zip"
        path.write_bytes(fdp.ConsumeBytes(fdp.remaining_bytes()))
        _drain(path)
        return
    content = fdp.ConsumeBytes(fdp.remaining_bytes())
    if mode == 1:  # the bytes are one table file inside a ZIP, under a hostile or safe name
        name = NAMES[len(content) % len(NAMES)]
        path = workdir / "export.zip"
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(name, content)
            archive.writestr("threads/documents.jsonl", b"")
        items = [i for i in _drain(path) if i[0] == "users"]
        if name == "users/documents.jsonl":
            assert [(n, raw) for _, n, raw in items] == _expected_lines(content)
        return
    path = workdir / "folder"  # the bytes are a table file of a folder export
    (path / "users").mkdir(parents=True, exist_ok=True)
    (path / "users" / "documents.jsonl").write_bytes(content)
    items = _drain(path)
    assert [(n, raw) for _, n, raw in items] == _expected_lines(content)


def _main() -> None:
    given = os.environ.get("KHALA_ATHERIS_WORKDIR")
    workdir = Path(given) if given else Path(tempfile.mkdtemp(prefix="khala-atheris-"))
    workdir.mkdir(parents=True, exist_ok=True)
    atheris.Setup(sys.argv, lambda data: fuzz_one(data, workdir))
    atheris.Fuzz()


def _seeds(folder: Path) -> None:
    folder.mkdir()
    good = folder / "good.zip"
    with zipfile.ZipFile(good, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("users/documents.jsonl", b'{"userId":"u1"}\n[1]\n\xff\n')
        archive.writestr("x/threads/documents.jsonl", b'{"threadId":"t"}\r\n' * 3)
    (folder / "zip").write_bytes(b"\x00" + good.read_bytes())
    (folder / "lines").write_bytes(b'\x02\xef\xbb\xbf{"a":1}\r\n\n[]\n"x"\n{"a":')


def test_atheris_session_finds_no_crash(tmp_path: Path) -> None:
    corpus_dir = tmp_path / "corpus"
    _seeds(corpus_dir)
    done = subprocess.run(
        [
            sys.executable,
            __file__,
            f"-runs={RUNS}",
            "-max_len=4096",
            "-timeout=30",
            "-rss_limit_mb=1024",
            f"-artifact_prefix={tmp_path}/",
            str(corpus_dir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "KHALA_ATHERIS_WORKDIR": str(tmp_path / "work")},
    )
    tail = done.stderr[-4000:]
    assert done.returncode == 0, tail
    assert f"Done {RUNS} runs" in done.stderr, tail
    assert not list(tmp_path.glob("crash-*")), tail


if __name__ == "__main__":
    _main()
