"""Issue 21: the batch loop, `status`, and reruns after a kill with no help from the test.

- `process --until-idle` and `sink --until-idle` never wait on a stage that is not running:
  after a SIGKILL at any stage, running them in turn ends (each run exits 0, saying in one line
  what is left for the other stage) and reaches the tables of an uninterrupted import.
- `status` (human and --json) says, per run, what is published, derived and applied, and what
  each stage is waiting for.
- `import-chat` killed with its whole process group at a seeded random point, on the embedded
  broker and on an external one, then run again: the rerun finishes. The killed consumers'
  group membership is never cleaned up by the test (no LeaveGroup, no waiting for a group).

Every wait has a deadline (a hang fails the test instead of stalling it); none asserts speed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import env_for, khala, ok
from tests.e2e.snapshot import assert_same_tables, table_snapshot
from tests.e2e.stages import (
    MakeStages,
    Stages,
    baseline,
    describe,
    generated_export,
    stage_env,
)

USERS = 20
SEED = 21
STEP_S = 180.0  # one `--until-idle` run; it ends far sooner unless it waits for ever
ROUNDS = 4  # process/sink pairs: a kill leaves at most "sink, then process, then sink" to do
pytestmark = pytest.mark.timeout(900)


def _status(env: dict[str, str]) -> dict[str, Any]:
    result = ok(khala(["status", "--json"], env, timeout=60))
    found: dict[str, Any] = json.loads(result.stdout)
    return found


def _newest(env: dict[str, str]) -> dict[str, Any]:
    runs: list[dict[str, Any]] = _status(env)["runs"]
    assert runs, "status shows no run"
    return runs[0]


def _batch_loop(env: dict[str, str], context: str) -> list[str]:
    """`process --until-idle`, `sink --until-idle`, in turn, until the newest run is applied;
    what each run printed. Fails if a run does not exit 0 within STEP_S, or if ROUNDS pairs
    do not finish the import."""
    said: list[str] = []
    for _ in range(ROUNDS):
        for stage in ("process", "sink"):
            try:
                result = khala([stage, "--until-idle"], env, timeout=STEP_S)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"{context}: `{stage} --until-idle` still running after {STEP_S:.0f}s"
                    f" (it waits for a stage that is not running); so far: {said}"
                ) from None
            ok(result)
            assert "Traceback" not in result.stderr, result.stderr
            lines = result.stdout.strip().splitlines()
            assert len(lines) <= 1, f"{stage}: more than one line: {result.stdout}"
            said.append(f"{stage}: {lines[0] if lines else ''}")
        if _newest(env)["phase"] == "applied":
            return said
    raise AssertionError(f"{context}: not applied after {ROUNDS} rounds: {said}")


def _kill_when(stages: Stages, proc: subprocess.Popen[bytes], delay: float) -> None:
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.parametrize(
    ("killed", "flags"),
    [
        ("publish", ()),
        ("process", ()),
        ("process", ("--replace",)),
        ("sink", ()),
    ],
    ids=["publish", "process", "process-replace", "sink"],
)
def test_until_idle_in_turn_after_a_kill_reaches_the_uninterrupted_end_state(
    killed: str,
    flags: tuple[str, ...],
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    make_stages: MakeStages,
    export_dir: Path,
) -> None:
    rng = random.Random(f"{SEED}-{killed}-{flags}")
    export = generated_export(export_dir, seed=SEED, users=USERS)
    imports = ((), flags) if flags else ((),)
    expected = baseline(
        export, kafka_bootstrap=kafka_bootstrap, pg_admin_url=pg_admin_url, imports=imports
    )
    env = stage_env(kafka_bootstrap, topic_prefix, pg_url, lease_s=2)
    stages = make_stages(env, workers_process=0, workers_sink=0)
    stages.start()
    if flags:  # --replace over a first import
        ok(khala(["publish", str(export), "--incremental"], env))
        _batch_loop(env, "first import")
    first = _newest(env)["run"] if flags else 0
    delay = 0.0
    if killed == "publish":
        stages.start_publish(export, *flags)
        stages.wait_phase(pg_url, "publishing", after_run=first)
        delay = rng.uniform(0.0, 0.5)
        publisher = stages._get("publish", stages._publishes - 1).popen
        assert publisher is not None
        _kill_when(stages, publisher, delay)
    ok(khala(["publish", str(export), "--incremental", *flags], env))
    if killed == "sink":
        ok(khala(["process", "--until-idle"], env, timeout=STEP_S))
    victim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "khala_app",
            killed if killed != "publish" else "process",
            "--until-idle",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        if killed == "process":
            stages.wait_phase(pg_url, "deriving", after_run=first, timeout=STEP_S)
            delay = rng.uniform(0.0, 0.3)
        else:
            delay = rng.uniform(0.2, 1.5)
        _kill_when(stages, victim, delay)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait(timeout=30)
    context = describe(SEED, killed=killed, flags=" ".join(flags), delay=f"{delay:.2f}")
    said = _batch_loop(env, context)
    assert_same_tables(expected.snapshot, table_snapshot(pg_url), context=f"{context} {said}")
    newest = _newest(env)
    assert newest["phase"] == "applied" and newest["waiting_for"] is None, newest
    assert newest["applied"] == newest["changes"], newest


def test_a_rerun_of_a_process_killed_while_deriving_says_it_needs_the_sink(
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    make_stages: MakeStages,
    export_dir: Path,
) -> None:
    """The case of the issue: killed during the derivation after it sent changes, `process
    --until-idle` again used to wait for ever for a sink that was not running."""
    export = generated_export(export_dir, seed=SEED, users=USERS)
    env = stage_env(kafka_bootstrap, topic_prefix, pg_url, lease_s=2)
    stages = make_stages(env, workers_process=0, workers_sink=0)
    stages.start()
    ok(khala(["publish", str(export), "--incremental"], env))
    victim = subprocess.Popen(
        [sys.executable, "-m", "khala_app", "process", "--until-idle"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Killed once the derivation has sent changes that no sink has applied.
        deadline = time.monotonic() + STEP_S
        while _changes_sent(env) == 0:
            assert victim.poll() is None, "process ended before it sent a change"
            assert time.monotonic() < deadline, "no change sent"
            time.sleep(0.02)
    finally:
        victim.kill()
        victim.wait(timeout=30)
    run = _newest(env)
    if run["phase"] != "derived":  # killed before the end of the derivation
        result = ok(khala(["process", "--until-idle"], env, timeout=STEP_S))
        assert "waits for the sink to apply" in result.stdout, result.stdout
        assert "sink --until-idle" in result.stdout, result.stdout
        assert _newest(env)["phase"] in ("published", "deriving")
    said = _batch_loop(env, "process killed after sending changes")
    assert _newest(env)["phase"] == "applied", said


def _changes_sent(env: dict[str, str]) -> int:
    stages = {s["stage"]: s for s in _status(env)["stages"]}
    return int(stages["sink"]["backlog"] or 0)


def test_status_says_what_is_published_derived_applied_and_who_waits(
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    make_stages: MakeStages,
    export_dir: Path,
) -> None:
    export = generated_export(export_dir, seed=SEED, users=5)
    env = stage_env(kafka_bootstrap, topic_prefix, pg_url)
    make_stages(env, workers_process=0, workers_sink=0).start()
    empty = ok(khala(["status"], env, timeout=60)).stdout
    assert "no import run in this database" in empty

    published = json.loads(
        ok(khala(["publish", str(export), "--incremental", "--json"], env)).stdout
    )
    sent = _published_counts(published)
    status = _status(env)
    run = status["runs"][0]
    assert run["phase"] == "published" and run["waiting_for"] == "process", run
    assert run["published"] == sent and run["changes"] is None, run
    stages = {s["stage"]: s for s in status["stages"]}
    assert stages["process"]["backlog"] == sum(sent.values()), stages
    assert stages["sink"]["waiting_for"] == "process", stages
    text = ok(khala(["status"], env, timeout=60)).stdout
    assert f"run {run['run']} " in text and "waiting for process" in text, text
    assert f"published {sum(sent.values())} messages, 0 stored" in text, text

    said = ok(khala(["sink", "--until-idle"], env, timeout=STEP_S)).stdout
    assert said.strip() == (
        f"run {run['run']} is published and not derived yet:"
        " run `khala-stream process --until-idle` next"
    )
    ok(khala(["process", "--until-idle"], env, timeout=STEP_S))
    status = _status(env)
    run = status["runs"][0]
    assert run["phase"] == "derived" and run["waiting_for"] == "sink", run
    assert run["stored"] == sent and run["changes"] > 0 and run["applied"] == 0, run
    stages = {s["stage"]: s for s in status["stages"]}
    assert stages["process"]["backlog"] == 0 and stages["process"]["waiting_for"] == "sink"
    assert stages["sink"]["backlog"] == run["changes"], stages
    text = ok(khala(["status"], env, timeout=60)).stdout
    assert f"derived {run['changes']} change messages, 0 applied; waiting for sink" in text

    ok(khala(["sink", "--until-idle"], env, timeout=STEP_S))
    status = _status(env)
    run = status["runs"][0]
    assert run["phase"] == "applied" and run["waiting_for"] is None, run
    assert run["applied"] == run["changes"], run
    assert all(s["backlog"] == 0 and s["waiting_for"] is None for s in status["stages"])
    text = ok(khala(["status"], env, timeout=60)).stdout
    assert ": applied," in text and "idle: nothing to do" in text, text


def _published_counts(published: dict[str, Any]) -> dict[str, int]:
    return {t: int(n) for t, n in published["published"].items()}


# --------------------------------------------------------------------------- import-chat


def _import(env: dict[str, str], export: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "khala_app", "import-chat", str(export)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the stage children and the broker
    )


def _kill_group_and_rerun(
    env: dict[str, str], export: Path, delays: list[float], context: str
) -> str:
    """Kill `import-chat` with its process group after each delay, then run it to the end."""
    for delay in delays:
        proc = _import(env, export)
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    try:
        result = khala(["import-chat", str(export)], env, timeout=300)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{context}: the rerun did not finish within 300s") from None
    assert result.exit_code == 0, f"{context}\n{result.stdout}\n{result.stderr[-5000:]}"
    return result.stdout


@pytest.mark.parametrize("broker", ["embedded", "external"])
def test_import_chat_killed_with_its_process_group_then_rerun_finishes(
    broker: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    export_dir: Path,
    tmp_path: Path,
) -> None:
    rng = random.Random(f"{SEED}-{broker}")
    export = generated_export(export_dir, seed=SEED, users=USERS)
    expected = baseline(export, kafka_bootstrap=kafka_bootstrap, pg_admin_url=pg_admin_url)
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)
    if broker == "embedded":
        del env["KAFKA_BOOTSTRAP_SERVERS"]
        env["KHALA_BROKER_HOME"] = str(tmp_path / "broker-home")
    longest = max(2.0, expected.seconds * 1.2)
    delays = sorted(rng.uniform(0.5, longest) for _ in range(2))
    context = describe(SEED, broker=broker, delays=",".join(f"{d:.1f}" for d in delays))
    _kill_group_and_rerun(env, export, delays, context)
    assert_same_tables(expected.snapshot, table_snapshot(pg_url), context=context)
