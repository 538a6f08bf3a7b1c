"""Where noida-db has no wheel (arm64 Linux) the project installs without it (an environment
marker in pyproject.toml), and the embedded default then says in one line what to set.

The package's absence is real, not mocked: the CLI runs in a subprocess whose interpreter
refuses to import `noida_db` (`sys.modules["noida_db"] = None`), as on a machine where pip
skipped it. The code under test runs unchanged.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
_WITHOUT_NOIDA = (
    "import sys; sys.modules['noida_db'] = None; "
    "from khala_app.cli import main; sys.exit(main(sys.argv[1:]))"
)


def _run_without_noida(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    env["KHALA_BROKER_HOME"] = str(tmp_path / ".khala")
    env["DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path}/khala.sqlite"
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_NOIDA, *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("argv", [("lag",), ("process", "--until-idle"), ("import-chat",)])
def test_embedded_default_without_noida_says_what_to_set(
    tmp_path: Path, argv: tuple[str, ...]
) -> None:
    done = _run_without_noida(tmp_path, *argv)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("khala-stream: error: ")
    assert "KAFKA_BOOTSTRAP_SERVERS" in lines[0]
    assert "noida-db" in lines[0]


def test_noida_db_is_required_only_where_pypi_has_a_wheel() -> None:
    # noida-db 0.2.3 on PyPI: manylinux x86_64, macOS x86_64/arm64, win_amd64; no aarch64 Linux.
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (noida,) = (Requirement(d) for d in deps if d.startswith("noida-db"))
    assert noida.marker is not None

    def installs(system: str, machine: str) -> bool:
        assert noida.marker is not None
        return noida.marker.evaluate({"sys_platform": system, "platform_machine": machine})

    assert installs("linux", "x86_64")
    assert installs("darwin", "arm64")
    assert not installs("linux", "aarch64")
    assert not installs("linux", "armv7l")
