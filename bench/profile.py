"""Where the Kafka path's time goes: `import-chat` under py-spy, summarised by function.

    python -m bench --profile …          (the harness runs it once, at the smallest size)
    python -m bench.profile RAW_FILE     (summarise an existing `py-spy record -f raw` file)

py-spy samples the process and its children (`--subprocesses`: the `process` and `sink`
stages when import-chat runs them as child processes) 100 times a second. Idle threads are
not recorded; samples whose innermost frame is a known wait (the event loop's selector, a
thread blocked in waitpid or on a lock) are counted apart as "waiting" and left out, so the
rest is Python CPU time. Inclusive share = samples whose stack contains the function at least
once, over the CPU samples of all processes. Only the product's own code (khala_stream/,
producers/, processors/, sinks/) is listed inclusively, without the command-line entry chain
that every sample passes through; the self-time lists show which libraries the leaves are in.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.rss import Measured, run_measured

__all__ = ["ProfileSummary", "format_summary", "profile_command", "summarise"]

REPO_ROOT = Path(__file__).resolve().parents[1]
PRODUCT_DIRS = ("khala_app", "khala_stream", "producers", "processors", "sinks")
RATE = 100
# The command-line entry chains (of import-chat and of its stage processes): every sample of a
# process passes through its chain, which says nothing the by-process shares do not.
_ENTRY = frozenset(
    {
        "khala_app/__main__.py:<module>",
        "khala_app/cli/__init__.py:main",
        "khala_app/cli/__init__.py:run_async",
        "khala_app/cli/commands.py:_run",
        "khala_app/cli/commands.py:import_chat",
        "khala_app/cli/commands.py:process",
        "khala_app/cli/commands.py:sink",
        "khala_app/cli/commands.py:_stage",
    }
)
# Frames every stack of an asyncio program has, however the time is spent.
_PLUMBING = (
    "stdlib/asyncio/",
    "stdlib/runpy",
    "<frozen runpy>",
    "stdlib/threading",
    "stdlib/selectors",
    ".venv/bin/",
)
# "function (path:line)" as py-spy writes one frame of a raw stack.
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.+?):(?P<line>\d+)\)$")
_PROCESS = re.compile(r'^process \d+:"(?P<cmd>.*)"$')
# Innermost frames that mean "blocked", which py-spy does not always recognise as idle.
_WAITING = (
    "stdlib/selectors.py:",
    "stdlib/asyncio/unix_events.py:ThreadedChildWatcher._do_waitpid",
    "stdlib/threading.py:Condition.wait",
    "stdlib/threading.py:Event.wait",
)


@dataclass(slots=True)
class ProfileSummary:
    samples: int
    wall_seconds: float
    waiting: int = 0
    by_process: list[tuple[str, int]] = field(default_factory=list)
    inclusive: list[tuple[str, int]] = field(default_factory=list)
    libraries: list[tuple[str, int]] = field(default_factory=list)
    self_by_package: list[tuple[str, int]] = field(default_factory=list)
    self_functions: list[tuple[str, int]] = field(default_factory=list)

    @property
    def cpu_share(self) -> float:
        """Sampled busy time over wall time: cores kept busy by Python, on average."""
        return self.samples / (RATE * self.wall_seconds) if self.wall_seconds else 0.0

    def to_json(self) -> dict[str, Any]:
        def pct(rows: list[tuple[str, int]]) -> list[dict[str, Any]]:
            return [{"name": n, "samples": c, "pct": 100 * c / self.samples} for n, c in rows]

        return {
            "samples": self.samples,
            "waiting_samples": self.waiting,
            "wall_seconds": self.wall_seconds,
            "cpu_share": self.cpu_share,
            "by_process": pct(self.by_process),
            "inclusive_product": pct(self.inclusive),
            "inclusive_libraries": pct(self.libraries),
            "self_by_package": pct(self.self_by_package),
            "self_functions": pct(self.self_functions),
        }


def _short(path: str) -> str:
    """Repo-relative for product code, `package/…` for site-packages, else the file name."""
    marker = "site-packages/"
    if marker in path:
        return path.split(marker, 1)[1]
    root = str(REPO_ROOT) + "/"
    if path.startswith(root):
        return path[len(root) :]
    if "/lib/python3" in path:
        return "stdlib/" + path.rsplit("/lib/python3", 1)[1].split("/", 1)[-1]
    return path


def _is_product(short: str) -> bool:
    return short.split("/", 1)[0] in PRODUCT_DIRS


def _package(short: str) -> str:
    head = short.split("/", 1)[0]
    if head == "stdlib":
        rest = short.split("/", 2)
        return f"stdlib/{rest[1].removesuffix('.py')}" if len(rest) > 1 else "stdlib"
    return head.removesuffix(".py")


def _process_name(cmd: str) -> str:
    words = cmd.split()
    if words and Path(words[0]).name.startswith("python"):
        words = words[1:]
    if len(words) >= 2 and words[0] == "-m":
        words = words[1:]
    elif words:
        words[0] = Path(words[0]).name
    return " ".join(w for w in words[:2] if "/" not in w) or cmd


def summarise(raw: Path, wall_seconds: float, *, top: int = 25) -> ProfileSummary:
    """Aggregate a `py-spy record -f raw` file (one `frame;frame;… count` line per stack)."""
    inclusive: Counter[str] = Counter()
    leaf_package: Counter[str] = Counter()
    leaf_function: Counter[str] = Counter()
    processes: Counter[str] = Counter()
    libraries: Counter[str] = Counter()
    total = waiting = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        process = "?"
        names: list[str] = []
        for frame in stack.split(";"):
            match = _FRAME.match(frame)
            if match is not None:
                names.append(f"{_short(match['file'])}:{match['func']}")
            elif (found := _PROCESS.match(frame)) is not None:
                process = _process_name(found["cmd"])
        if not names:
            continue
        if names[-1].startswith(_WAITING):
            waiting += count
            continue
        total += count
        processes[process] += count
        for name in dict.fromkeys(names):
            path = name.split(":", 1)[0]
            if _is_product(path):
                if name not in _ENTRY:
                    inclusive[name] += count
            elif not path.startswith(_PLUMBING):
                libraries[name] += count
        leaf_package[_package(names[-1].split(":", 1)[0])] += count
        leaf_function[names[-1]] += count
    return ProfileSummary(
        samples=total,
        wall_seconds=wall_seconds,
        waiting=waiting,
        by_process=processes.most_common(),
        inclusive=inclusive.most_common(top),
        libraries=libraries.most_common(15),
        self_by_package=leaf_package.most_common(12),
        self_functions=leaf_function.most_common(15),
    )


def format_summary(summary: ProfileSummary) -> list[str]:
    n = max(summary.samples, 1)
    lines = [
        f"py-spy: {summary.samples} CPU samples at {RATE} Hz over {summary.wall_seconds:.1f} s"
        f" wall = {summary.cpu_share:.2f} cores busy in Python on average"
        f" ({summary.waiting} samples waiting, left out)",
        "CPU samples by process: "
        + ", ".join(f"{name} {100 * c / n:.0f}%" for name, c in summary.by_process),
        "",
        f"top {len(summary.inclusive)} product functions, inclusive (% of CPU samples):",
    ]
    lines += [f"  {100 * c / n:5.1f}%  {name}" for name, c in summary.inclusive]
    lines += ["", "top library functions, inclusive (asyncio plumbing left out):"]
    lines += [f"  {100 * c / n:5.1f}%  {name}" for name, c in summary.libraries]
    lines += ["", "self time by package (leaf frames):"]
    lines += [f"  {100 * c / n:5.1f}%  {name}" for name, c in summary.self_by_package]
    lines += ["", "top self-time functions:"]
    lines += [f"  {100 * c / n:5.1f}%  {name}" for name, c in summary.self_functions]
    return lines


def profile_command(
    argv: list[str],
    *,
    env: Mapping[str, str],
    raw: Path,
    exclude: list[int],
    log_dir: Path,
    label: str,
) -> Measured:
    """Run `argv` under `py-spy record -f raw` (py-spy from the venv, or PATH)."""
    venv_spy = Path(sys.executable).parent / "py-spy"
    spy = str(venv_spy) if venv_spy.exists() else shutil.which("py-spy")
    if spy is None:
        raise RuntimeError("py-spy not found: pip install py-spy (the bench extra)")
    command = [
        spy,
        "record",
        "--format",
        "raw",
        "--output",
        str(raw),
        "--rate",
        str(RATE),
        "--function",
        "--full-filenames",
        "--subprocesses",
        "--",
        *argv,
    ]
    return run_measured(
        command, env=env, cwd=REPO_ROOT, exclude=exclude, log_dir=log_dir, label=label
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m bench.profile RAW_FILE [WALL_SECONDS]", file=sys.stderr)
        return 2
    wall = float(args[1]) if len(args) > 1 else 0.0
    print("\n".join(format_summary(summarise(Path(args[0]), wall))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
