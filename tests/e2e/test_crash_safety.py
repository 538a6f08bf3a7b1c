"""Issue #3 item 3 (with item 6's generator): crashes and restarts do not change the end state.

The stages run as separate processes (`stages.py`). Each case interrupts an import — SIGKILL of
a stage at a seeded random point, then a restart; a killed publisher, then a new publish; a
clean broker restart; a PostgreSQL restart; an interrupted `--replace`, then a rerun — and
compares the Laravel tables, normalised (`snapshot.py`), with those of an uninterrupted
`import-chat` of the same export on a fresh database (and the run's counters with its).

CI runs a few seeds; `tests/stress/test_stress.py` runs many (STRESS_SEEDS).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from khala_stream.broker.local_broker import LocalBroker, start_local_broker
from tests.e2e.harness import khala, ok
from tests.e2e.snapshot import Snapshot, assert_same_tables, table_snapshot
from tests.e2e.stages import (
    Baseline,
    MakeStages,
    Phase,
    Stage,
    StageError,
    Stages,
    baseline,
    describe,
    generated_export,
    latest_run,
    run_counters,
    run_phase,
    stage_env,
)
from tests.fixtures.own_postgres import LocalPostgres

CI_SEEDS = (11, 12)
USERS = 40  # enough for each stage to work a second or more, so that a kill lands inside
STRESS_USERS = USERS
PARTITIONS = 3
LEASE_S = 2  # a killed processor's claim on a run blocks the others this long
TIMEOUT_S = 240.0
# Where a stage has work to do: (phase of the import run, longest delay after reaching it).
# The phase is a seeded choice and the delay seeded too, so a kill lands inside the work.
KILL_POINTS: dict[str, tuple[tuple[Phase, float], ...]] = {
    "process": (("publishing", 0.5), ("deriving", 0.15)),  # storing documents; deriving
    "sink": (("deriving", 1.0), ("derived", 3.0)),  # (--replace: truncating;) writing rows
}

# Each case starts processes and waits on them with its own deadlines (TIMEOUT_S per wait).
# The cases below are the CI subset; tests/stress/test_stress.py runs them all, many seeds.
pytestmark = pytest.mark.timeout(900)


# --------------------------------------------------------------------------- checks


def check(
    db_url: str, expected: Baseline, stages: Stages, context: str, *, counters: bool = True
) -> None:
    actual: Snapshot = table_snapshot(db_url)
    try:
        assert_same_tables(expected.snapshot, actual, context=context)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stages.tails()}") from None
    print(f"case passed: {context}")  # shown with -rP: where the kills landed
    if counters:
        found = run_counters(latest_run(db_url))
        assert found == expected.counters, (
            f"{context}: counters differ from the uninterrupted run:\n"
            f"  got      {found}\n  expected {expected.counters}\n{stages.tails()}"
        )


# --------------------------------------------------------------------------- scenarios


def run_stage_kill_case(
    *,
    stage: Stage,
    seed: int,
    kills: int,
    users: int,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    make_stages: MakeStages,
    export_dir: Path,
) -> None:
    """SIGKILL `stage` `kills` times at seeded random points of an import, restarting it each
    time; the end state and counters equal those of an uninterrupted run.

    A kill point is a seeded random delay after a seeded choice among the phases in which the
    stage has work (`KILL_POINTS`), so that kills land inside the stage's work rather than
    before or after it; where each kill landed is part of the assertion message.
    """
    rng = random.Random(seed)
    export = generated_export(export_dir, seed=seed, users=users)
    expected = baseline(export, kafka_bootstrap=kafka_bootstrap, pg_admin_url=pg_admin_url)
    env = stage_env(kafka_bootstrap, topic_prefix, pg_url, partitions=PARTITIONS, lease_s=LEASE_S)
    stages = make_stages(env)
    stages.context = describe(seed, stage=stage, users=users, kills=kills)
    stages.start()
    stages.start_publish(export)
    landed = []
    for _ in range(kills):
        anchor, longest = rng.choice(KILL_POINTS[stage])
        delay = rng.uniform(0.0, longest)
        stages.wait_phase(pg_url, anchor, timeout=TIMEOUT_S)
        time.sleep(delay)
        where = run_phase(pg_url, topic_prefix)
        stages.kill(stage)
        landed.append(f"{anchor}+{delay:.1f}s ({where})")
        time.sleep(rng.uniform(0.0, 1.5))
        stages.restart(stage)
    context = describe(seed, stage=stage, users=users, kills="; ".join(landed))
    assert stages.wait_publish(timeout=TIMEOUT_S) == 0, f"{context}\n{stages.tails()}"
    stages.wait_applied(pg_url, TIMEOUT_S)
    check(pg_url, expected, stages, context)


def run_publisher_kill_case(
    *,
    seed: int,
    users: int,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    make_stages: MakeStages,
    export_dir: Path,
) -> None:
    """The publisher is killed mid-publish; a second publish (a new run) completes the import."""
    rng = random.Random(seed)
    export = generated_export(export_dir, seed=seed, users=users)
    expected = baseline(export, kafka_bootstrap=kafka_bootstrap, pg_admin_url=pg_admin_url)
    env = stage_env(kafka_bootstrap, topic_prefix, pg_url, partitions=PARTITIONS, lease_s=LEASE_S)
    stages = make_stages(env)
    stages.context = describe(seed, case="publisher killed", users=users)
    stages.start()
    stages.start_publish(export)
    stages.wait_phase(pg_url, "publishing", timeout=TIMEOUT_S)
    at = rng.uniform(0.0, 0.25)  # publishing this export takes about a third of a second
    time.sleep(at)
    where = run_phase(pg_url, topic_prefix)
    stages.kill("publish", 0)
    first = latest_run(pg_url)
    interrupted = first is not None and first.status == "publishing"
    context = describe(
        seed, case="publisher killed", users=users, at=f"publishing+{at:.1f}s ({where})"
    )
    stages.publish(export, timeout=TIMEOUT_S)
    stages.wait_applied(pg_url, TIMEOUT_S)
    # When the kill came before the end of the publish, the first run is never derived and
    # the second derives everything: its counters are those of the uninterrupted run. When it
    # came too late, the second run is a replay, whose counters count no creation.
    check(pg_url, expected, stages, f"{context} interrupted={interrupted}", counters=interrupted)


@dataclass
class _Broker:
    data_dir: Path
    broker: LocalBroker | None = None
    port: int | None = None

    def start(self) -> str:
        self.broker = start_local_broker(self.data_dir, port=self.port, timeout=120)
        self.port = self.broker.port
        return self.broker.bootstrap

    def stop(self) -> None:
        if self.broker is not None:
            self.broker.stop()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[_Broker]:
    """A broker of this test's own, so that it can be restarted."""
    broker = _Broker(tmp_path / "broker" / "data")
    try:
        yield broker
    finally:
        broker.stop()


def run_broker_restart_case(
    *,
    seed: int,
    users: int,
    broker: _Broker,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    make_stages: MakeStages,
    export_dir: Path,
) -> None:
    """A clean broker restart (SIGTERM, same port and data) in the middle of an import.

    A publisher that gave up while the broker was away is run again (a new run); stage
    processes that exited are restarted, as their service manager would.
    """
    rng = random.Random(seed)
    export = generated_export(export_dir, seed=seed, users=users)
    expected = baseline(export, kafka_bootstrap=kafka_bootstrap, pg_admin_url=pg_admin_url)
    bootstrap = broker.start()
    env = stage_env(bootstrap, topic_prefix, pg_url, partitions=PARTITIONS, lease_s=LEASE_S)
    stages = make_stages(env)
    stages.context = describe(seed, case="broker restart", users=users)
    stages.start()
    stages.start_publish(export)
    anchor: Phase = rng.choice(("publishing", "deriving", "derived"))
    at = rng.uniform(0.0, 2.0)
    stages.wait_phase(pg_url, anchor, timeout=TIMEOUT_S)
    time.sleep(at)
    where = run_phase(pg_url, topic_prefix)
    broker.stop()
    down = rng.uniform(1.0, 3.0)
    time.sleep(down)
    broker.start()
    context = describe(
        seed, case="broker restart", at=f"{anchor}+{at:.1f}s ({where})", down=f"{down:.1f}s"
    )
    code = stages.wait_publish(timeout=TIMEOUT_S)
    run = latest_run(pg_url)
    if code != 0 or run is None or run.status == "publishing":
        stages.publish(export, timeout=TIMEOUT_S)  # the operator reruns a failed publish
    stages.wait_applied(pg_url, TIMEOUT_S, revive=True)
    check(pg_url, expected, stages, f"{context} publish exit {code}", counters=code == 0)


def run_postgres_restart_case(
    *,
    seed: int,
    revive: bool,
    users: int,
    server: LocalPostgres,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_admin_url: str,
    make_stages: MakeStages,
    export_dir: Path,
) -> None:
    """PostgreSQL stops for a few seconds while the processors and the sink work; the stages
    wait for it with backoff and lose nothing.

    Without `revive` no stage may exit (README: every stage retries until the retry deadline);
    with it, stages that exit are restarted as a service manager would, and only the end state
    is checked.
    """
    rng = random.Random(seed)
    export = generated_export(export_dir, seed=seed, users=users)
    expected = baseline(export, kafka_bootstrap=kafka_bootstrap, pg_admin_url=pg_admin_url)
    db_url = server.create_database()
    env = stage_env(kafka_bootstrap, topic_prefix, db_url, partitions=PARTITIONS, lease_s=LEASE_S)
    stages = make_stages(env)
    stages.context = describe(seed, case="postgres restart", users=users, revive=revive)
    stages.start()
    stages.start_publish(export)
    anchor: Phase = rng.choice(("deriving", "derived"))
    at = rng.uniform(0.0, 2.0)
    stages.wait_phase(db_url, anchor, timeout=TIMEOUT_S)
    time.sleep(at)
    where = run_phase(db_url, topic_prefix)
    server.stop()
    down = rng.uniform(2.0, 4.0)
    time.sleep(down)
    server.start()
    context = describe(
        seed, case="postgres restart", at=f"{anchor}+{at:.1f}s ({where})", down=f"{down:.1f}s"
    )
    code = stages.wait_publish(timeout=TIMEOUT_S)
    assert code == 0, f"{context}: publish exited with {code}\n{stages.tails()}"
    try:
        stages.wait_applied(db_url, TIMEOUT_S, revive=revive)
    except StageError as exc:
        raise AssertionError(f"{context}: {exc}") from None
    check(db_url, expected, stages, context)


def run_replace_interrupted_case(
    *,
    seed: int,
    stage: Stage,
    users: int,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    make_stages: MakeStages,
    export_dir: Path,
) -> None:
    """Import, then `--replace` with `stage` killed half-way and restarted; then a rerun of
    `import-chat --replace`. Both end where an uninterrupted replace ends."""
    rng = random.Random(seed)
    export = generated_export(export_dir, seed=seed, users=users)
    replaced = baseline(
        export,
        kafka_bootstrap=kafka_bootstrap,
        pg_admin_url=pg_admin_url,
        imports=((), ("--replace",)),
    )
    env = stage_env(kafka_bootstrap, topic_prefix, pg_url, partitions=PARTITIONS, lease_s=LEASE_S)
    stages = make_stages(env)
    stages.context = describe(seed, case=f"--replace, {stage} killed", users=users)
    stages.start()
    stages.publish(export, timeout=TIMEOUT_S)
    first = stages.wait_applied(pg_url, TIMEOUT_S)
    stages.start_publish(export, "--replace")
    anchor, longest = rng.choice(KILL_POINTS[stage])
    at = rng.uniform(0.0, longest)
    stages.wait_phase(pg_url, anchor, after_run=first.id, timeout=TIMEOUT_S)
    time.sleep(at)
    where = run_phase(pg_url, topic_prefix)
    stages.kill(stage)
    time.sleep(rng.uniform(0.0, 1.5))
    stages.restart(stage)
    context = describe(seed, case=f"--replace, {stage} killed", at=f"{anchor}+{at:.1f}s ({where})")
    assert stages.wait_publish(timeout=TIMEOUT_S) == 0, f"{context}\n{stages.tails()}"
    stages.wait_applied(pg_url, TIMEOUT_S)
    check(pg_url, replaced, stages, f"{context}, after the restart")
    stages.stop()
    ok(khala(["import-chat", str(export), "--replace"], env, timeout=300))
    check(pg_url, replaced, stages, f"{context}, after the rerun")


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    ("stage", "seed"), [("process", CI_SEEDS[0]), ("sink", CI_SEEDS[1])], ids=["process", "sink"]
)
def test_sigkill_a_stage_and_restart_it(
    stage: Stage,
    seed: int,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    make_stages: MakeStages,
    export_dir: Path,
) -> None:
    run_stage_kill_case(
        stage=stage,
        seed=seed,
        kills=1,
        users=USERS,
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        pg_url=pg_url,
        pg_admin_url=pg_admin_url,
        make_stages=make_stages,
        export_dir=export_dir,
    )


def test_sigkill_the_publisher_then_publish_again(
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    make_stages: MakeStages,
    export_dir: Path,
) -> None:
    run_publisher_kill_case(
        seed=CI_SEEDS[0],
        users=USERS,
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        pg_url=pg_url,
        pg_admin_url=pg_admin_url,
        make_stages=make_stages,
        export_dir=export_dir,
    )


def test_clean_broker_restart_mid_import(
    own_broker: _Broker,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    make_stages: MakeStages,
    export_dir: Path,
) -> None:
    run_broker_restart_case(
        seed=CI_SEEDS[1],
        users=USERS,
        broker=own_broker,
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        pg_url=pg_url,
        pg_admin_url=pg_admin_url,
        make_stages=make_stages,
        export_dir=export_dir,
    )


def test_postgres_restart_mid_import(
    own_pg: LocalPostgres,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_admin_url: str,
    make_stages: MakeStages,
    export_dir: Path,
) -> None:
    run_postgres_restart_case(
        seed=CI_SEEDS[0],
        revive=False,
        users=USERS,
        server=own_pg,
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        pg_admin_url=pg_admin_url,
        make_stages=make_stages,
        export_dir=export_dir,
    )


def test_replace_interrupted_then_rerun(
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    make_stages: MakeStages,
    export_dir: Path,
) -> None:
    run_replace_interrupted_case(
        seed=CI_SEEDS[1],
        stage="sink",
        users=USERS,
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        pg_url=pg_url,
        pg_admin_url=pg_admin_url,
        make_stages=make_stages,
        export_dir=export_dir,
    )
