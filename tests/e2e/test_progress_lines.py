"""Progress through every phase of an import, and the stages' status lines as services
(issue 24): read by their content from a non-terminal run of the CLI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from producers.generator import generate_export
from tests.e2e.harness import env_for, khala, ok

_DERIVE_PHASES = ("identities", "autopilots", "runs", "messages", "threads", "run_events")


def _progress(stderr: str) -> list[tuple[str, dict[str, str]]]:
    found = []
    for line in stderr.splitlines():
        if line.startswith("progress: "):
            phase, *fields = line[len("progress: ") :].split()
            found.append((phase, dict(f.split("=", 1) if "=" in f else (f, "") for f in fields)))
    return found


def test_import_chat_shows_every_phase_as_it_runs(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    export = tmp_path / "export.zip"
    generate_export(export, users=8, seed=11, edge_cases=False)
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)
    result = ok(khala(["import-chat", str(export)], env))
    lines = _progress(result.stderr)
    phases = [phase for phase, _ in lines]
    finished = {phase: fields for phase, fields in lines if "finished" in fields}

    for table in ("users", "threads", "runs", "messages", "receipts", "blueprints"):
        assert f"publish_{table}" in finished
    for phase in ("store_documents", *(f"derive_{p}" for p in _DERIVE_PHASES), "write_rows"):
        assert phase in finished, (phase, result.stderr)
        assert re.fullmatch(r"\d+/\d+|\d+", finished[phase]["done"])
        assert "rate" in finished[phase]
    # The phases come in the order they run: publish, store, derive, write.
    assert phases.index("publish_users") < phases.index("store_documents")
    assert phases.index("derive_identities") < phases.index("derive_messages")
    assert phases.index("derive_messages") < phases.index("derive_run_events")
    # Every document published is stored; every row sent is applied.
    stored, total = finished["store_documents"]["done"].split("/")
    assert stored == total and int(total) > 0
    applied, sent = finished["write_rows"]["done"].split("/")
    assert int(applied) >= int(sent) > 0
    messages = finished["derive_messages"]["done"].split("/")
    assert messages[0] == messages[-1] and int(messages[0]) > 0
    # Results stay on stdout, progress on stderr.
    assert "progress:" not in result.stdout


def test_stages_as_services_log_a_status_line_every_few_seconds(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, sqlite_url: str
) -> None:
    """Without -v: one INFO line every few seconds with records in, rows written and lag."""
    export = tmp_path / "export.zip"
    generate_export(export, users=4, seed=12, edge_cases=False)
    env = env_for(kafka_bootstrap, topic_prefix, sqlite_url)
    ok(khala(["publish", str(export), "--incremental"], env))
    stages = {
        name: subprocess.Popen(
            [sys.executable, "-m", "khala_app", name],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("process", "sink")
    }
    try:
        # Run until each stage has logged at least two status lines; bounded, never timed.
        logs = {name: "" for name in stages}
        for name, child in stages.items():
            assert child.stderr is not None
            for _ in range(60):
                line = child.stderr.readline()
                if not line:
                    break
                logs[name] += line
                if logs[name].count(f"INFO khala_stream.status: {name}:") >= 3:
                    break
        for name in stages:
            status = re.findall(
                rf"INFO khala_stream\.status: {name}: records in=(\d+) \(\d+/s\), "
                rf"rows (?:sent|written)=(\d+), lag=(\d+|\?)",
                logs[name],
            )
            assert len(status) >= 3, logs[name]
            records, rows, _ = status[-1]
            assert int(records) > 0 and int(rows) > 0, logs[name]
    finally:
        for child in stages.values():
            child.terminate()
        for child in stages.values():
            child.wait(timeout=60)
            if child.stderr is not None:
                child.stderr.close()


def test_the_opening_lines_come_before_the_work(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, sqlite_url: str
) -> None:
    """stdout and stderr in one pipe: the reference's opening lines are printed before the
    first progress line, not after the work is done."""
    export = tmp_path / "export.zip"
    generate_export(export, users=2, seed=13, edge_cases=False)
    done = subprocess.run(
        [sys.executable, "-m", "khala_app", "import-chat", str(export)],
        env=env_for(kafka_bootstrap, topic_prefix, sqlite_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout
    lines = done.stdout.splitlines()
    first_progress = next(i for i, line in enumerate(lines) if line.startswith("progress: "))
    assert lines.index("Khala chat import starting...") < first_progress
    assert lines.index("  import_blueprints: yes") < first_progress
    assert lines.index("Khala chat import summary:") > first_progress
