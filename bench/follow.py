"""Issue 25's bench entry: `follow` of a live deployment against `import-chat` of the same
documents from a ZIP, on one PostgreSQL (fsync on) and one embedded broker per path.

    .venv/bin/python -m bench.follow --size 20k [--changes 50] [--edge-cases]
        [--rounds N] [--snapshot-only]

1. **ZIP**: `import-chat EXPORT` on a fresh database: wall time from spawn to exit.
2. **follow, snapshot**: the same documents served by the fake deployment of the tests
   (`tests/fakes/khala_server.py`, on 127.0.0.1, pages of 1,000 encoded before the first
   round), `process` and `sink` running as services on a fresh database; wall time from
   spawning `follow --until-caught-up` until the sink has applied the run. Throughput
   ratio = ZIP time / follow time (target >= 0.8).
3. **follow, two steps**: `--changes` messages edited in one commit at the source (derived
   scoped: only their threads), then as many again with one user renamed besides (derived in
   full); per step the time from the commit to the sink having applied the run that carries
   them (freshness of that batch, with `follow --until-caught-up` started at the commit: no
   poll interval counted), and the CPU the `process` stage used for it.
4. **follow, sustained**: `follow` running (its 1-second poll), `--rate` message edits a
   second at the source for `--seconds` (five commits a second, each edit another message):
   per change the time from its commit to the sink having applied a run that carries it
   (p50, p95, max; target p95 <= 5 s), and the `process` stage's CPU per change (target: the
   same at 100k and 1M).
The two paths' ten tables are compared (tests/e2e/snapshot.py) after step 2. With `--rounds N`
phases 1 and 2 run N times, one path after the other, each on fresh databases and brokers,
and the ratios of every round are printed (this machine's noise shows in their spread);
phases 3 and 4 follow the last round unless `--snapshot-only`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.exports import ensure_export, parse_size
from bench.rss import cpu_seconds, own_cpu_seconds
from bench.services import PostgresServer, fresh_broker, postgres_server
from bench.statements import statements_line
from khala_stream import import_runs
from khala_stream.broker.local_broker import LocalBroker
from khala_stream.db.engine import create_engine
from tests.e2e.snapshot import diff_tables, table_snapshot
from tests.fakes.khala_server import FakeKhala

KEY = "bench:fake|deploy-key"
T0 = 1_780_000_000


def _env(database_url: str, bootstrap: str) -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "TMPDIR")
    return {k: v for k, v in os.environ.items() if k in keep} | {
        "DATABASE_URL": database_url,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KHALA_TRIM_CONSUMED": "1",
        "KHALA_TOPIC_PREFIX": f"bench{uuid.uuid4().hex[:8]}",
        "KHALA_DEPLOY_KEY": KEY,
    }


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "khala_app", *args]


def _latest(url: str) -> int:
    async def go() -> int:
        engine = create_engine(url)
        try:
            run = await import_runs.latest(engine)
            return run.id if run else 0
        finally:
            await engine.dispose()

    return asyncio.run(go())


def _scoped_threads(url: str) -> int | None:
    """How many threads the latest run's derivation derived, None when it derived all."""

    async def go() -> int | None:
        engine = create_engine(url)
        try:
            run = await import_runs.latest(engine)
            return run.summary.scoped_threads if run and run.summary else None
        finally:
            await engine.dispose()

    return asyncio.run(go())


def _wait_applied(url: str, prefix: str, after: int, timeout: float = 3600) -> None:
    """Until the sink has applied a run newer than `after`; polled on one connection pool (a
    poller starting an engine ten times a second would tax the path it measures)."""

    async def go() -> None:
        engine = create_engine(url)
        deadline = time.monotonic() + timeout
        try:
            while True:
                run = await import_runs.latest(engine)
                if (
                    run is not None
                    and run.id > after
                    and await import_runs.applied_by_sink(
                        engine, run, f"{prefix}.sink", f"{prefix}.changes"
                    )
                ):
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError("the run was not applied in time")
                await asyncio.sleep(0.1)
        finally:
            await engine.dispose()

    asyncio.run(go())


class _PathCost:
    """What one path cost from the moment this is made: CPU seconds of each process (the
    servers: PostgreSQL with the backends it reaped, the broker; `stages` by name; the
    command the bench waited for meanwhile, `import-chat` with its stages or `follow`; the
    bench process itself, which serves the fake deployment), and PostgreSQL's statements."""

    def __init__(self, pg: PostgresServer, broker: LocalBroker, waited: str,
                 stages: Mapping[str, int] | None = None) -> None:  # fmt: skip
        self._pg = pg
        self._pids = {"postgres": pg.pid, "broker": broker.pid, **(stages or {})}
        self._waited = waited
        pg.reset_statements()
        self._start = self._read()

    def _read(self) -> dict[str, float]:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {
            self._waited: children.ru_utime + children.ru_stime,
            **{name: cpu_seconds(pid) for name, pid in self._pids.items()},
            "bench": time.process_time(),
        }

    def lines(self) -> list[str]:
        """CPU seconds in all and per process, then the statements' line (when the server
        counts them)."""
        now = self._read()
        used = {name: now[name] - self._start[name] for name in now}
        each = ", ".join(f"{name} {s:.1f}" for name, s in used.items())
        lines = [f"CPU seconds {sum(used.values()):.1f} ({each})"]
        if statements := self._pg.read_statements():
            every = sum(st.seconds for st in statements)
            lines.append(statements_line([(st.label, st.seconds) for st in statements], every))
        return lines


def _step(
    fake: FakeKhala,
    env: dict[str, str],
    url: str,
    prefix: str,
    process_pid: int,
    ts_s: int,
    edits: list[tuple[str, dict[str, Any]]],
    name: str,
) -> None:
    """One commit at the source, followed until the sink applied it: its freshness and the
    `process` stage's CPU for it."""
    before, cpu = _latest(url), own_cpu_seconds(process_pid)
    began = time.monotonic()
    fake.commit(ts_s=ts_s, put=edits)
    subprocess.run(_cli("follow", "--deployment", fake.base_url, "--until-caught-up"),
                   env=env, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    published_s = time.monotonic() - began
    published_cpu = own_cpu_seconds(process_pid)
    _wait_applied(url, prefix, before)
    step_s = time.monotonic() - began
    after = own_cpu_seconds(process_pid)
    scoped = _scoped_threads(url)
    derived = "every thread" if scoped is None else f"{scoped} threads"
    print(
        f"follow step of {len(edits)} changes ({name}: derived {derived}): {step_s:.1f} s from"
        f" commit to applied (published in {published_s:.1f} s); process CPU {after - cpu:.2f} s"
        f" ({after - published_cpu:.2f} s of it once published)",
        flush=True,
    )


def _cursor_of(run: import_runs.ImportRun) -> int:
    """The source position a `follow` run carries the changes up to (`run_source`)."""
    return int(run.source.rsplit("cursor=", 1)[1])


async def _applied_cursor(engine: Any, prefix: str) -> int | None:
    """The source position of the newest of the last few runs the sink has applied, if any."""
    latest = await import_runs.latest(engine)
    for run_id in range(latest.id, max(0, latest.id - 3), -1) if latest else ():
        run = await import_runs.load(engine, run_id)
        if run is not None and await import_runs.applied_by_sink(
            engine, run, f"{prefix}.sink", f"{prefix}.changes"
        ):
            return _cursor_of(run)
    return None


def _sustained(
    fake: FakeKhala,
    env: dict[str, str],
    url: str,
    prefix: str,
    process_pid: int,
    rate: int,
    seconds: float,
    logs: Path,
) -> None:
    """Phase 4 (module docstring)."""
    messages = sorted(fake.state()["messages"].values(), key=lambda d: d["_id"])
    per_commit = max(1, rate // 5)
    follow = subprocess.Popen(_cli("follow", "--deployment", fake.base_url), env=env,
                              stdout=subprocess.DEVNULL,
                              stderr=(logs / "follow-sustained.log").open("wb"))  # fmt: skip

    async def go() -> tuple[list[float], int]:
        engine = create_engine(url)
        latencies: list[float] = []
        pending: list[tuple[int, float]] = []  # (commit _ts, monotonic time of the commit)
        try:
            await asyncio.sleep(3)  # follow started and caught up with nothing to publish
            began = time.monotonic()
            commits = 0
            while True:
                now = time.monotonic()
                if now - began < seconds and now >= began + commits / 5:
                    edits = [
                        ("messages", {**m, "text": f"sustained {commits}.{j}"})
                        for j, m in enumerate(
                            messages[(commits * per_commit + j) % len(messages)]
                            for j in range(per_commit)
                        )
                    ]
                    pending.append((fake.commit(ts_s=time.time(), put=edits), time.monotonic()))
                    commits += 1
                cursor = await _applied_cursor(engine, prefix)
                while pending and cursor is not None and pending[0][0] <= cursor:
                    latencies += [time.monotonic() - pending.pop(0)[1]] * per_commit
                if not pending and time.monotonic() - began >= seconds:
                    return latencies, commits * per_commit
                if pending and time.monotonic() - pending[0][1] > 600:
                    raise RuntimeError("a change was not applied within 10 minutes")
                await asyncio.sleep(0.05)
        finally:
            await engine.dispose()

    cpu = own_cpu_seconds(process_pid)
    try:
        latencies, changes = asyncio.run(go())
    finally:
        follow.terminate()
        follow.wait(timeout=60)
    used = own_cpu_seconds(process_pid) - cpu
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))]

    print(
        f"follow sustained, {rate} changes/s for {seconds:.0f} s ({changes} changes): commit to"
        f" applied p50 {pct(0.5):.2f} s, p95 {pct(0.95):.2f} s, max {latencies[-1]:.2f} s;"
        f" process CPU {used:.2f} s, {1000 * used / changes:.2f} ms per change",
        flush=True,
    )


def _steps(
    fake: FakeKhala,
    env: dict[str, str],
    url: str,
    prefix: str,
    process_pid: int,
    args: argparse.Namespace,
    logs: Path,
) -> None:
    """Phases 3 and 4 (module docstring), on the state the snapshot phase left."""
    messages = sorted(fake.state()["messages"].values(), key=lambda d: d["_id"])
    users = sorted(fake.state()["users"].values(), key=lambda d: d["_id"])
    for n, (name, extra) in enumerate(
        (
            ("scoped", []),
            # One user changed besides: the whole store is derived again.
            ("full", [("users", {**users[0], "name": "Renamed for the bench"})]),
        ),
        start=1,
    ):
        edits = [
            ("messages", {**m, "text": f"edited {n}.{i}"})
            for i, m in enumerate(messages[: args.changes])
        ]
        _step(fake, env, url, prefix, process_pid, T0 + 10 * n, edits + extra, name)
    _sustained(fake, env, url, prefix, process_pid, args.rate, args.seconds, logs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.follow")
    parser.add_argument("--size", default="20k")
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--rate", type=int, default=50, help="changes a second, phase 4")
    parser.add_argument("--seconds", type=float, default=30, help="phase 4's length")
    parser.add_argument(
        "--edge-cases",
        action="store_true",
        help="serve a `generate --edge-cases` export (repeated keys, bad lines, keyless documents)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat phases 1-2 this many times, alternating the paths (noise shows in the spread)",
    )
    parser.add_argument(
        "--snapshot-only", action="store_true", help="phases 1-2 only: no steps, no sustained phase"
    )
    args = parser.parse_args(argv)
    logs = Path(tempfile.mkdtemp(prefix="khala-bench-follow-"))
    export = ensure_export(parse_size(args.size), 1, edge_cases=args.edge_cases, log_dir=logs)
    print(f"export: {export.documents:,} documents ({export.path.name}); logs in {logs}",
          flush=True)  # fmt: skip
    zip_path = export.path
    if args.edge_cases:
        # The generator lists some documents out of export order (SPEC §5), and a followed
        # table takes that order: the ZIP path imports the deployment's state as an export
        # lists it, so that both paths read the same documents in the same order.
        with FakeKhala(deploy_key=KEY) as fake:
            fake.load_export(export.path, ts_s=T0)
            zip_path = fake.write_export(logs / "state.zip")
    ratios: list[float] = []
    with (
        postgres_server(durable=True) as pg,
        FakeKhala(deploy_key=KEY, page_size=1000, delta_page_size=1000) as fake,
    ):
        fake.load_export(export.path, ts_s=T0)
        # The fake's sorting and encoding, once, not in a round's time: a deployment serves
        # its pages from another machine, and here they would take the cores being measured.
        fake.prepare_snapshot(render=True)
        # The fake's documents live as long as this process: spare the collector walking
        # them again and again while it serves (a deployment's own cost, not the product's).
        gc.freeze()
        for round_ in range(1, args.rounds + 1):
            last = round_ == args.rounds
            zip_db = pg.create_database("bench_zip")
            with fresh_broker() as broker:
                env = _env(pg.url(zip_db), broker.bootstrap)
                pg.checkpoint()
                cost = _PathCost(pg, broker, "import-chat")
                began = time.monotonic()
                with (logs / f"zip-{round_}.log").open("wb") as log:
                    subprocess.run(_cli("import-chat", str(zip_path)), env=env, check=True,
                                   stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
                zip_s = time.monotonic() - began
                zip_cost = cost.lines()
            print(f"round {round_}: zip import-chat: {zip_s:.1f} s", flush=True)
            for line in zip_cost:
                print(f"  zip: {line}", flush=True)
            pg.settle(zip_db)

            follow_db = pg.create_database("bench_follow")
            with fresh_broker() as broker:
                url = pg.url(follow_db)
                env = _env(url, broker.bootstrap)
                prefix = env["KHALA_TOPIC_PREFIX"]
                stages = {
                    stage: subprocess.Popen(_cli(stage), env=env, stdout=subprocess.DEVNULL,
                                            stderr=(logs / f"{stage}-{round_}.log").open("wb"))
                    for stage in ("process", "sink")
                }  # fmt: skip
                try:
                    pg.checkpoint()
                    cost = _PathCost(pg, broker, "follow", {k: p.pid for k, p in stages.items()})
                    began = time.monotonic()
                    with (logs / f"follow-{round_}.log").open("wb") as log:
                        subprocess.run(
                            _cli("follow", "--deployment", fake.base_url, "--until-caught-up"),
                            env=env, check=True, stdout=subprocess.DEVNULL, stderr=log,
                        )  # fmt: skip
                    published_s = time.monotonic() - began
                    _wait_applied(url, prefix, 0)
                    follow_s = time.monotonic() - began
                    follow_cost = cost.lines()
                    ratios.append(zip_s / follow_s)
                    print(
                        f"round {round_}: follow snapshot: {follow_s:.1f} s (published in"
                        f" {published_s:.1f} s); throughput ratio zip/follow = {ratios[-1]:.2f}",
                        flush=True,
                    )
                    for line in follow_cost:
                        print(f"  follow: {line}", flush=True)
                    diff = diff_tables(table_snapshot(pg.url(zip_db)), table_snapshot(url))
                    print("tables: identical" if not diff else f"tables differ:\n{diff}",
                          flush=True)  # fmt: skip
                    pg.settle(follow_db)
                    if last and not args.snapshot_only:
                        _steps(fake, env, url, prefix, stages["process"].pid, args, logs)
                finally:
                    for proc in stages.values():
                        proc.terminate()
                    for proc in stages.values():
                        proc.wait(timeout=30)
            pg.drop_database(zip_db)
            pg.drop_database(follow_db)
    if len(ratios) > 1:
        print(
            f"snapshot throughput ratio zip/follow over {len(ratios)} rounds:"
            f" {' '.join(f'{r:.2f}' for r in ratios)} (median {statistics.median(ratios):.2f})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
