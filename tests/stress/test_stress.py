"""`make stress`: issue #3 items 1 and 3 over many seeds of the randomized export generator.

Every case here is one of the CI cases of `tests/e2e/test_order_independence.py` and
`tests/e2e/test_crash_safety.py`, run for `STRESS_SEEDS` seeds (default 10) instead of a few:

- the whole grid of partition counts (1, 3, 12) × workers per stage (1, 2, 3);
- the three crafted arrival orders (children first, shuffled, staged);
- SIGKILL of `process` or `sink` 1–3 times at seeded points; a killed publisher; a clean
  broker restart; a PostgreSQL restart; an interrupted `--replace` (sink or processor killed).

Each seed makes its own export (`generate_export(seed=...)`, every edge case included), and
every random choice of a case derives from its seed, which is in the test id and in every
assertion message: `pytest tests/stress -m stress -k <id>` replays one case.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.e2e import test_crash_safety as crash
from tests.e2e import test_order_independence as order
from tests.e2e.stages import MakeStages, Stage
from tests.fixtures.own_postgres import LocalPostgres

pytestmark = [pytest.mark.stress, pytest.mark.timeout(1800)]

STRESS_SEEDS = int(os.environ.get("STRESS_SEEDS", "10"))
SEEDS = [1000 + i for i in range(STRESS_SEEDS)]
GRID = [(p, w) for p in (1, 3, 12) for w in (1, 2, 3)]


own_broker = crash.own_broker


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("partitions", "workers"), GRID, ids=[f"p{p}w{w}" for p, w in GRID])
def test_grid(
    seed: int,
    partitions: int,
    workers: int,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    make_stages: MakeStages,
    export_dir: Path,
) -> None:
    order.run_grid_case(
        seed=seed,
        partitions=partitions,
        workers=workers,
        users=order.USERS,
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        pg_url=pg_url,
        pg_admin_url=pg_admin_url,
        make_stages=make_stages,
        export_dir=export_dir,
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("order_name", ["children-first", "shuffled", "staged"])
def test_crafted_order(
    seed: int,
    order_name: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    make_stages: MakeStages,
    export_dir: Path,
) -> None:
    rng = random.Random(seed)
    partitions, workers = rng.choice(GRID)
    order.run_crafted_order_case(
        seed=seed,
        order_name=order_name,
        partitions=partitions,
        workers=workers,
        users=order.USERS,
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        pg_url=pg_url,
        pg_admin_url=pg_admin_url,
        make_stages=make_stages,
        export_dir=export_dir,
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("interleaving", ["applied-between", "applied-after"])
def test_reimport_duplicate_keys(
    seed: int,
    interleaving: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    make_stages: MakeStages,
    export_dir: Path,
) -> None:
    order.run_reimport_case(
        seed=seed,
        interleaving=interleaving,
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        pg_url=pg_url,
        pg_admin_url=pg_admin_url,
        make_stages=make_stages,
        export_dir=export_dir,
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("stage", ["process", "sink"])
def test_sigkill_stage(
    seed: int,
    stage: Stage,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    make_stages: MakeStages,
    export_dir: Path,
) -> None:
    crash.run_stage_kill_case(
        stage=stage,
        seed=seed,
        kills=random.Random(seed).randint(1, 3),
        users=crash.STRESS_USERS,
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        pg_url=pg_url,
        pg_admin_url=pg_admin_url,
        make_stages=make_stages,
        export_dir=export_dir,
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_publisher(
    seed: int,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    make_stages: MakeStages,
    export_dir: Path,
) -> None:
    crash.run_publisher_kill_case(
        seed=seed,
        users=crash.STRESS_USERS,
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        pg_url=pg_url,
        pg_admin_url=pg_admin_url,
        make_stages=make_stages,
        export_dir=export_dir,
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_broker_restart(
    seed: int,
    own_broker: crash._Broker,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    make_stages: MakeStages,
    export_dir: Path,
) -> None:
    crash.run_broker_restart_case(
        seed=seed,
        users=crash.STRESS_USERS,
        broker=own_broker,
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        pg_url=pg_url,
        pg_admin_url=pg_admin_url,
        make_stages=make_stages,
        export_dir=export_dir,
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_postgres_restart(
    seed: int,
    own_pg: LocalPostgres,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_admin_url: str,
    make_stages: MakeStages,
    export_dir: Path,
) -> None:
    crash.run_postgres_restart_case(
        seed=seed,
        revive=False,
        users=crash.STRESS_USERS,
        server=own_pg,
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        pg_admin_url=pg_admin_url,
        make_stages=make_stages,
        export_dir=export_dir,
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("stage", ["sink", "process"])
def test_replace_interrupted(
    seed: int,
    stage: Stage,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    make_stages: MakeStages,
    export_dir: Path,
) -> None:
    crash.run_replace_interrupted_case(
        seed=seed,
        stage=stage,
        users=crash.STRESS_USERS,
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        pg_url=pg_url,
        pg_admin_url=pg_admin_url,
        make_stages=make_stages,
        export_dir=export_dir,
    )
