"""A small synthetic export shipped with the package, for demos and smoke tests.

Made by `generate_export(SAMPLE_EXPORT, **SAMPLE_PARAMETERS)`; run that again after changing
the generator (the unit tests fail when the file no longer matches).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

__all__ = ["SAMPLE_EXPORT", "SAMPLE_PARAMETERS"]

SAMPLE_EXPORT: Final[Path] = Path(__file__).resolve().with_name("khala-sample.zip")
SAMPLE_PARAMETERS: Final[dict[str, Any]] = {
    "users": 12,
    "seed": 7,
    "edge_cases": False,
    "extra_tables": True,
}
