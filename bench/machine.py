"""The machine, the versions and the code a run measured (for the results file and README)."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["describe"]

REPO_ROOT = Path(__file__).resolve().parents[1]
_PACKAGES = (
    "khala-stream",
    "aiokafka",
    "cramjam",
    "asyncpg",
    "sqlalchemy",
    "orjson",
    "noida-db",
    "py-spy",
)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _memory_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return 0.0


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except OSError:
        return ""
    return done.stdout.strip()


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe(postgres_version: str, postgres_settings: dict[str, str]) -> dict[str, Any]:
    dirty = [line for line in _git("status", "--porcelain").splitlines() if line.strip()]
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": _memory_gb(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": postgres_version,
        "postgresql_settings": postgres_settings,
        "packages": {name: _version(name) for name in _PACKAGES},
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty_files": len(dirty),
    }
