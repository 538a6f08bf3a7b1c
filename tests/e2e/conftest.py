from __future__ import annotations

from pathlib import Path

import pytest

from producers.generator import load_reference_fixture, write_fixture_zip


@pytest.fixture
def fixture_a(tmp_path: Path) -> Path:
    out = tmp_path / "fixture-a.zip"
    write_fixture_zip(out, load_reference_fixture("fixture-a"))
    return out


@pytest.fixture
def fixture_b(tmp_path: Path) -> Path:
    out = tmp_path / "fixture-b.zip"
    write_fixture_zip(out, load_reference_fixture("fixture-b"))
    return out
