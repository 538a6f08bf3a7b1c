"""Synthetic exports of a given size, generated once and cached under `.cache/bench/`.

An export of "N documents" holds about N documents in the six tables an import reads (users,
threads, runs, messages, receipts, blueprints); the generator's extra tables (messageParts,
lightningInvoices, `_tables`, README) are in the ZIP too, as in a real Convex export, and are
ignored by every path. The generator is driven by a user count, so the harness calibrates
documents per user on a small export first.

Two shapes: the generator's default one, and `edge_cases` (`generate --edge-cases`: repeated
document keys, rejected lines, documents without their key, in the proportions a real export
shows them), which is what re-imports must stay fast on.

The cache key holds the size, the shape, the seed and a hash of `producers/generator.py`: a changed
generator regenerates. Generation runs as `khala-stream generate` in a child process, so its
time and peak RSS are measured too (issue #5 item 1: the generator must stream).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.rss import run_measured
from khala_stream.contract.tables import SOURCE_TABLES
from producers.generator import generate_export

__all__ = ["Export", "ensure_export", "parse_size", "size_label"]

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE = REPO_ROOT / ".cache" / "bench"
_CALIBRATION_USERS = 200
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([kKmM]?)$")


def parse_size(text: str) -> int:
    """`100k` → 100_000, `1M` → 1_000_000, `2500` → 2500."""
    match = _SIZE.match(text.strip())
    if match is None:
        raise ValueError(f"not a size: {text!r} (use e.g. 20k, 100k, 1M)")
    number, unit = float(match.group(1)), match.group(2).lower()
    value = int(number * {"": 1, "k": 1_000, "m": 1_000_000}[unit])
    if value < 100:
        raise ValueError(f"size {text!r} is too small (at least 100 documents)")
    return value


def size_label(n: int) -> str:
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


@dataclass(frozen=True, slots=True)
class Export:
    path: Path
    size: int
    seed: int
    users: int
    documents: int
    """Documents in the six tables an import reads."""
    counts: dict[str, int]
    size_bytes: int
    generate_seconds: float | None
    generate_peak_rss_kb: int | None
    cached: bool
    edge_cases: bool = False

    @property
    def label(self) -> str:
        """`100k`, or `100k edge` for the edge-case shape."""
        return size_label(self.size) + (" edge" if self.edge_cases else "")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


def _generator_hash() -> str:
    source = (REPO_ROOT / "producers" / "generator.py").read_bytes()
    return hashlib.sha1(source).hexdigest()[:10]


def _imported_documents(counts: dict[str, int]) -> int:
    return sum(counts.get(t, 0) for t in SOURCE_TABLES)


def _docs_per_user(seed: int, key: str, edge_cases: bool) -> float:
    meta = CACHE / f"calibration-s{seed}-{key}.json"
    if meta.exists():
        return float(json.loads(meta.read_text())["docs_per_user"])
    with tempfile.TemporaryDirectory(prefix="khala-bench-cal-", dir="/tmp") as tmp:
        made = generate_export(
            Path(tmp) / "cal.zip", users=_CALIBRATION_USERS, seed=seed, edge_cases=edge_cases
        )
    ratio = _imported_documents(made.counts) / _CALIBRATION_USERS
    CACHE.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps({"docs_per_user": ratio, "users": _CALIBRATION_USERS}))
    return ratio


def ensure_export(size: int, seed: int, *, edge_cases: bool = False, log_dir: Path) -> Export:
    """The cached export of about `size` documents, generating it if needed."""
    shape = "-edge" if edge_cases else ""
    key = _generator_hash()
    path = CACHE / f"export-{size_label(size)}{shape}-s{seed}-{key}.zip"
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return Export(**{**meta, "path": path, "cached": True})
    users = max(1, round(size / _docs_per_user(seed, key + shape, edge_cases)))
    CACHE.mkdir(parents=True, exist_ok=True)
    for stale in CACHE.glob(f"export-{size_label(size)}{shape}-s{seed}-*"):
        stale.unlink()  # an older generator's export of the same size
    measured = run_measured(
        [
            sys.executable,
            "-m",
            "khala_app",
            "generate",
            "--out",
            str(path),
            "--users",
            str(users),
            "--seed",
            str(seed),
            *(["--edge-cases"] if edge_cases else []),
            "--json",
        ],
        env=os.environ,
        cwd=REPO_ROOT,
        log_dir=log_dir,
        label=f"generate-{size_label(size)}{shape}",
    )
    if not measured.ok:
        raise RuntimeError(f"generating the {size_label(size)} export failed:\n{measured.stderr}")
    made = json.loads(measured.stdout)
    counts = {str(k): int(v) for k, v in made["counts"].items()}
    export = Export(
        path=path,
        size=size,
        seed=seed,
        users=users,
        documents=_imported_documents(counts),
        counts=counts,
        size_bytes=path.stat().st_size,
        generate_seconds=measured.seconds,
        generate_peak_rss_kb=measured.peak_rss_kb,
        cached=False,
        edge_cases=edge_cases,
    )
    meta = export.to_json()
    meta.pop("path")
    meta.pop("cached")
    meta_path.write_text(json.dumps(meta, indent=2))
    return export
