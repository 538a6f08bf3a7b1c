"""Fixtures shared by every test directory: the services (tests/fixtures/services.py), and the
stage harnesses of the order-independence, crash-safety and stress tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.stages import MakeStages, Stages

pytest_plugins = ["tests.fixtures.services"]


@pytest.fixture
def make_stages(tmp_path: Path) -> Iterator[MakeStages]:
    """Stages harnesses for this test; every process is stopped when the test ends."""
    made: list[Stages] = []

    def make(env: dict[str, str], **kwargs: int) -> Stages:
        stages = Stages(env, log_dir=tmp_path / f"stages-{len(made)}", **kwargs)  # type: ignore[arg-type]
        made.append(stages)
        return stages

    yield make
    for stages in made:
        stages.stop()


@pytest.fixture
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where generated exports are cached for the session (one per seed and size)."""
    return tmp_path_factory.getbasetemp() / "exports"
