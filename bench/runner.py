"""Orchestration: one PostgreSQL server for the run; per size a fresh broker and, per path, a
fresh database; the four paths in a fixed order; results printed and saved.

Per size:

1. `khala-stream import-chat EXPORT` (child process; DATABASE_URL, KAFKA_BOOTSTRAP_SERVERS and a
   fresh KHALA_TOPIC_PREFIX in its environment), timed, peak RSS of its process tree;
2. the same command again on the same database, broker and prefix (re-import of the unchanged
   export), timed; rows it wrote are counted by `xmin` (bench/verify.py);
3. `python -m bench.direct EXPORT DSN` on a fresh database (the baseline);
4. `python -m bench.ceiling EXPORT DSN` on a fresh database (the ceiling; only its COPY is
   timed).

Every database gets its tables before the clock starts, and a CHECKPOINT runs before every
measured step so that no step pays for the previous one's dirty pages.
"""

from __future__ import annotations

import compileall
import contextlib
import json
import os
import shlex
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import verify
from bench.exports import Export, ensure_export, size_label
from bench.machine import describe
from bench.profile import PRODUCT_DIRS, format_summary, profile_command, summarise
from bench.report import (
    CEILING,
    DIRECT,
    FLOOR_ONE,
    FLOOR_TWO,
    KAFKA_AGAIN,
    KAFKA_FIRST,
    PathResult,
    RunResult,
    SizeResult,
    format_report,
)
from bench.rss import Measured, TreeSampler, cpu_seconds, read_status_kb, run_measured
from bench.services import PostgresServer, fresh_broker, postgres_server
from bench.statements import Statement
from khala_stream.broker.local_broker import LocalBroker

__all__ = ["Options", "run"]

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "bench" / "results"
_SCRUBBED = (
    "DATABASE_URL",
    "KAFKA_BOOTSTRAP_SERVERS",
    "KAFKA_SECURITY_PROTOCOL",
    "KAFKA_SASL_MECHANISM",
    "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD",
    "KAFKA_SSL_CAFILE",
    "KHALA_TOPIC_PREFIX",
    "WORKOS_API_KEY",
)
_STATEMENTS_KEPT = 12  # of a step's grouped statements, in its results


@dataclass(frozen=True, slots=True)
class Options:
    sizes: list[int]
    seed: int
    keep: bool
    durable: bool
    profile: bool
    step_timeout: float
    command: str
    shapes: tuple[str, ...] = ("default", "edge-cases")


def _log(message: str) -> None:
    stamp = datetime.now().strftime("%H:%M:%S")
    print(f"[bench {stamp}] {message}", file=sys.stderr, flush=True)


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "khala-stream"
    return [str(script)] if script.exists() else [sys.executable, "-m", "khala_app"]


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class _Context:
    def __init__(self, server: PostgresServer, options: Options, log_dir: Path) -> None:
        self.server = server
        self.options = options
        self.log_dir = log_dir
        self.databases: list[str] = []
        self.server_cpu: dict[str, float] = {}
        """CPU seconds the broker and PostgreSQL spent during the last measured step."""
        self.server_statements: list[Statement] = []
        """PostgreSQL's statements during the last measured step, grouped, longest first."""

    @contextlib.contextmanager
    def database(self, prefix: str) -> Iterator[str]:
        name = self.server.create_database(prefix)
        self.databases.append(name)
        try:
            yield name
        finally:
            if not self.options.keep:
                self.server.drop_database(name)

    def measure(
        self, argv: list[str], env: dict[str, str], label: str, broker_pid: int | None = None
    ) -> Measured:
        """Run one step; its own tree is measured, and the CPU the servers spent meanwhile."""
        self.server.checkpoint()
        exclude = [broker_pid] if broker_pid is not None else []
        servers = ({"broker": broker_pid} if broker_pid is not None else {}) | {
            "postgres": self.server.pid
        }
        self.server_cpu, self.server_statements = {}, []
        self.server.reset_statements()
        before = {k: cpu_seconds(pid) for k, pid in servers.items()}
        try:
            measured = run_measured(
                argv,
                env=env,
                cwd=REPO_ROOT,
                exclude=exclude,
                timeout=self.options.step_timeout,
                log_dir=self.log_dir,
                label=label,
            )
            self.server_cpu = {k: cpu_seconds(servers[k]) - v for k, v in before.items()}
            self.server_statements = self.server.read_statements()
            return measured
        except TimeoutError as exc:
            return Measured(
                argv=argv,
                seconds=self.options.step_timeout,
                returncode=-1,
                stdout="",
                stderr=f"timed out: {exc}",
                peak_rss_kb=0,
                tree_peak_kb=0,
                processes=[],
            )


def _path_result(ctx: _Context, name: str, measured: Measured, load: float) -> PathResult:
    cpu = {"ours": round(measured.cpu_seconds, 1)} | {
        k: round(v, 1) for k, v in ctx.server_cpu.items()
    }
    return PathResult(
        path=name,
        ok=measured.ok,
        seconds=measured.seconds,
        peak_rss_kb=measured.peak_rss_kb or None,
        processes=[
            {"pid": p.pid, "name": p.name, "peak_kb": p.peak_kb, "cpu_s": round(p.cpu_seconds, 1)}
            for p in measured.processes
        ],
        error=None if measured.ok else measured.stderr_tail(),
        load_before=load,
        extra={
            "tree_peak_kb": measured.tree_peak_kb,
            "cpu_seconds": cpu,
            "statements": [st.to_json() for st in ctx.server_statements[:_STATEMENTS_KEPT]],
            "statements_s": round(sum(st.seconds for st in ctx.server_statements), 1),
        },
    )


def _json_out(measured: Measured) -> dict[str, Any]:
    try:
        value = json.loads(measured.stdout)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _kafka(ctx: _Context, export: Export, result: SizeResult) -> dict[str, str] | None:
    """Steps 1 and 2; returns the Kafka database's fingerprints (None if the import failed)."""
    label = export.label
    fingerprints: dict[str, str] | None = None
    with fresh_broker() as broker, ctx.database("bench_kafka") as db:
        broker_sampler = TreeSampler(broker.pid, interval=0.5).start()
        dsn = ctx.server.dsn(db)
        env = _import_env(ctx.server.url(db), broker)
        argv = [*_cli(), "import-chat", str(export.path), "--json"]
        try:
            _log(f"{label}: {KAFKA_FIRST} ({export.documents:,} documents)")
            load = os.getloadavg()[0]
            deadlocks = verify.deadlocks(dsn)
            first = ctx.measure(argv, env, f"{label}-kafka-first", broker.pid)
            r1 = result.paths[KAFKA_FIRST] = _path_result(ctx, KAFKA_FIRST, first, load)
            r1.rows = verify.counts(dsn)
            r1.extra["report"] = _json_out(first).get("rows_written")
            r1.extra["deadlocks"] = verify.deadlocks(dsn) - deadlocks
            _log(f"{label}: {KAFKA_FIRST}: {_outcome(r1)}")
            if not r1.ok:
                return None
            fingerprints = verify.fingerprints(dsn)
            mark = verify.mark(dsn)
            _log(f"{label}: {KAFKA_AGAIN}")
            load = os.getloadavg()[0]
            deadlocks = verify.deadlocks(dsn)
            again = ctx.measure(argv, env, f"{label}-kafka-again", broker.pid)
            r2 = result.paths[KAFKA_AGAIN] = _path_result(ctx, KAFKA_AGAIN, again, load)
            r2.extra["deadlocks"] = verify.deadlocks(dsn) - deadlocks
            r2.extra["documents"] = _json_out(again).get("documents")
            r2.rows = verify.counts(dsn)
            written = verify.written_since(dsn, mark)
            deleted = sum(max(0, r1.rows[t] - r2.rows.get(t, 0)) for t in r1.rows)
            r2.extra["rows_written"] = sum(written.values()) + deleted
            r2.extra["rows_written_by_table"] = {t: n for t, n in written.items() if n}
            bookkeeping = verify.written_since(dsn, mark, importer=True)
            r2.extra["importer_rows_written"] = sum(bookkeeping.values())
            r2.extra["importer_rows_written_by_table"] = bookkeeping
            r2.extra["report"] = _json_out(again).get("rows_written")
            _log(f"{label}: {KAFKA_AGAIN}: {_outcome(r2)}, rows written {r2.extra['rows_written']}")
        finally:
            broker_sampler.sample()
            broker_sampler.stop()
            hwm = read_status_kb(broker.pid).get("VmHWM", 0)
            result.broker_peak_rss_kb = max(hwm, broker_sampler.tree_peak_kb) or None
    return fingerprints


def _import_env(database_url: str, broker: LocalBroker) -> dict[str, str]:
    """import-chat's environment: this size's broker, trimmed as import-chat trims the broker
    it starts itself (the default way to run it), and a fresh topic prefix."""
    return _base_env() | {
        "DATABASE_URL": database_url,
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
        "KHALA_TRIM_CONSUMED": "1",
        "KHALA_TOPIC_PREFIX": f"bench{uuid.uuid4().hex[:8]}",
    }


def _outcome(r: PathResult) -> str:
    if not r.ok:
        return "FAILED: " + ((r.error or "").strip().splitlines() or ["?"])[-1]
    return f"{r.seconds:.1f} s, peak RSS {(r.peak_rss_kb or 0) / 1024:.0f} MB"


def _direct(ctx: _Context, export: Export, result: SizeResult) -> dict[str, str] | None:
    label = size_label(export.size)
    with ctx.database("bench_direct") as db:
        dsn = ctx.server.dsn(db)
        _log(f"{label}: {DIRECT}")
        load = os.getloadavg()[0]
        argv = [sys.executable, "-m", "bench.direct", str(export.path), dsn]
        measured = ctx.measure(argv, _base_env(), f"{label}-direct")
        r = result.paths[DIRECT] = _path_result(ctx, DIRECT, measured, load)
        r.rows = verify.counts(dsn)
        _log(f"{label}: {DIRECT}: {_outcome(r)}")
        return verify.fingerprints(dsn) if r.ok else None


def _floor(
    ctx: _Context, export: Export, result: SizeResult, trips: int, direct: dict[str, str] | None
) -> None:
    """The Kafka floor (`bench/floor.py`): what one or two trips through the broker cost
    without the product's guarantees; its rows are checked against the direct path's."""
    label, name = size_label(export.size), FLOOR_ONE if trips == 1 else FLOOR_TWO
    with fresh_broker() as broker, ctx.database("bench_floor") as db:
        dsn = ctx.server.dsn(db)
        _log(f"{label}: {name}")
        load = os.getloadavg()[0]
        argv = [
            sys.executable,
            *("-m", "bench.floor", str(export.path), dsn, broker.bootstrap),
            *("--trips", str(trips)),
        ]
        measured = ctx.measure(argv, _base_env(), f"{label}-floor{trips}", broker.pid)
        r = result.paths[name] = _path_result(ctx, name, measured, load)
        r.rows = verify.counts(dsn)
        if r.ok and direct is not None:
            result.floor_same[name] = verify.fingerprints(dsn) == direct
        _log(f"{label}: {name}: {_outcome(r)}")


def _ceiling(ctx: _Context, export: Export, result: SizeResult) -> None:
    label = size_label(export.size)
    with ctx.database("bench_ceiling") as db:
        dsn = ctx.server.dsn(db)
        _log(f"{label}: {CEILING}")
        load = os.getloadavg()[0]
        argv = [sys.executable, "-m", "bench.ceiling", str(export.path), dsn]
        measured = ctx.measure(argv, _base_env(), f"{label}-ceiling")
        r = result.paths[CEILING] = _path_result(ctx, CEILING, measured, load)
        out = _json_out(measured)
        if r.ok:
            r.extra["process_seconds"] = r.seconds
            r.seconds = float(out["seconds"])  # the COPY statements only
            r.extra["prepare_seconds"] = out.get("prepare_seconds")
            r.extra["copy_bytes"] = out.get("copy_bytes")
        r.rows = verify.counts(dsn)
        _log(f"{label}: {CEILING}: {_outcome(r)}")


def _profile(ctx: _Context, export: Export) -> dict[str, Any]:
    label = size_label(export.size)
    raw = ctx.log_dir / f"{label}-kafka-first.pyspy.raw"
    with fresh_broker() as broker, ctx.database("bench_profile") as db:
        env = _import_env(ctx.server.url(db), broker)
        _log(f"{label}: profiling {KAFKA_FIRST} under py-spy")
        ctx.server.checkpoint()
        measured = profile_command(
            [*_cli(), "import-chat", str(export.path), "--json"],
            env=env,
            raw=raw,
            exclude=[broker.pid],
            log_dir=ctx.log_dir,
            label=f"{label}-profile",
        )
    if not measured.ok or not raw.exists():
        return {"ok": False, "error": measured.stderr_tail()}
    summary = summarise(raw, measured.seconds)
    text = format_summary(summary)
    print("\n".join(["", f"profile of {KAFKA_FIRST} at {label}:", *text]), flush=True)
    return {"ok": True, "size": export.size, "raw": str(raw), **summary.to_json()}


def _compile_product() -> None:
    """Bytecode for the product's modules, as a regular (non-editable) install has. Without
    it, where PYTHONDONTWRITEBYTECODE is set (as on these machines), each process of the
    Kafka path compiles them again at its start: about 0.2 CPU-s per process, every run."""
    for name in (*PRODUCT_DIRS, "bench"):
        compileall.compile_dir(REPO_ROOT / name, quiet=1)


def run(options: Options) -> RunResult:
    _compile_product()
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    log_dir = REPO_ROOT / ".cache" / "bench" / "logs" / stamp
    with postgres_server(durable=options.durable, keep=options.keep) as server:
        result = RunResult(
            started=started.isoformat(timespec="seconds"),
            command=options.command,
            machine=describe(server.version(), server.settings()),
        )
        ctx = _Context(server, options, log_dir)
        exports: list[Export] = []
        for size in options.sizes:
            if "edge-cases" in options.shapes:
                # Only the product's own paths: the others do not collapse repeated keys.
                _log(f"{size_label(size)} edge: export (cached under .cache/bench/)")
                edge = ensure_export(size, options.seed, edge_cases=True, log_dir=log_dir)
                edge_result = SizeResult(size=size, export=edge)
                result.sizes.append(edge_result)
                _kafka(ctx, edge, edge_result)
            if "default" not in options.shapes:
                continue
            _log(f"{size_label(size)}: export (cached under .cache/bench/)")
            export = ensure_export(size, options.seed, log_dir=log_dir)
            exports.append(export)
            size_result = SizeResult(size=size, export=export)
            result.sizes.append(size_result)
            kafka_prints = _kafka(ctx, export, size_result)
            direct_prints = _direct(ctx, export, size_result)
            if kafka_prints is not None and direct_prints is not None:
                size_result.same_rows = {
                    t: kafka_prints[t] == direct_prints.get(t) for t in kafka_prints
                }
            for trips in (1, 2):
                _floor(ctx, export, size_result, trips, direct_prints)
            _ceiling(ctx, export, size_result)
        if options.profile and exports:
            result.profile = _profile(ctx, min(exports, key=lambda e: e.size))
        if options.keep:
            result.notes.append(
                f"kept: PostgreSQL data in {server.directory} (start it with"
                f" infra/local/postgres.sh start {server.directory}); databases"
                f" {', '.join(ctx.databases)}"
            )
    result.notes.append(f"logs of every child process: {log_dir.relative_to(REPO_ROOT)}")
    print("\n".join(["", *format_report(result)]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{stamp}.json"
    out.write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n")
    print(f"\nresults: {out.relative_to(REPO_ROOT)}", flush=True)
    return result


def command_line(argv: list[str]) -> str:
    return shlex.join([".venv/bin/python", "-m", "bench", *argv])


def elapsed(began: float) -> str:
    return f"{time.monotonic() - began:.0f} s"
