"""The import layers (composition -> stages -> kernel) are enforced, not just described:
lint-imports passes on the tree as it is and fails when a kernel module imports a stage or a
stage imports another."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("khala_app", "khala_stream", "producers", "processors", "sinks")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _copy_tree(into: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(REPO / package, into / package, ignore=shutil.ignore_patterns("sample"))
    shutil.copy(REPO / "pyproject.toml", into / "pyproject.toml")
    return into


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_tree_keeps_its_layers(tmp_path: Path) -> None:
    result = _lint(_copy_tree(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("khala_stream/config.py", "import producers.publisher"),
        ("khala_stream/db/engine.py", "import khala_app.counts"),
        ("sinks/runner.py", "import processors.store"),
    ],
)
def test_an_import_against_the_layers_breaks_the_build(
    tmp_path: Path, module: str, forbidden: str
) -> None:
    tree = _copy_tree(tmp_path)
    target = tree / module
    target.write_text(target.read_text() + f"\n{forbidden}  # noqa\n")
    result = _lint(tree)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
