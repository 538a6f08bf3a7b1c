"""Issue 25: `khala-stream follow` of a live deployment (the fake on 127.0.0.1) ends, after
the snapshot and after each scripted step of changes, with the ten Laravel tables a merge
import of an export of the source at that point gives (`import-chat` of a ZIP of the fake's
state, into a second database) — with --propagate-deletes on both sides or on neither; a
refused key writes nothing (exit 2); throttling and server errors are waited out; kill -9 of
`follow` anywhere, then a rerun, reaches the same end state."""

from __future__ import annotations

import copy
import random
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from khala_stream.broker.local_broker import LocalBroker, start_local_broker
from khala_stream.db.importer_tables import FOLLOW, RUNS, SOURCE_DOCUMENTS
from tests.e2e.harness import CliResult, env_for, khala, ok, rows, run_db
from tests.e2e.snapshot import Snapshot, assert_same_tables, table_snapshot
from tests.e2e.stages import MakeStages, Stages, fresh_database, generated_export, stage_env
from tests.fakes.khala_server import DOCUMENT_DELTAS, LIST_SNAPSHOT, FakeKhala, Reply
from tests.fixtures.own_postgres import LocalPostgres

pytestmark = pytest.mark.timeout(600)

T0 = 1_780_000_000  # even seconds: a ZIP entry keeps the time to 2 s
KEY = "prod:khala-fake|0123456789abcdef"


@pytest.fixture
def fake(export_dir: Path) -> Iterator[FakeKhala]:
    export = generated_export(export_dir, seed=25, users=4)
    with FakeKhala(deploy_key=KEY, page_size=9, delta_page_size=4) as server:
        server.load_export(export, ts_s=T0)
        yield server


def _follow(env: dict[str, str], fake: FakeKhala, *flags: str) -> CliResult:
    return khala(
        ["follow", "--deployment", fake.base_url, "--until-caught-up", *flags],
        {**env, "KHALA_DEPLOY_KEY": KEY},
        timeout=300,
    )


class Mirror:
    """The comparison side: merge imports of ZIP exports of the fake's state, one per step,
    on a database and prefix of their own."""

    def __init__(self, tmp: Path, kafka: str, db_url: str, flags: tuple[str, ...]) -> None:
        self.tmp, self.flags, self.db_url = tmp, flags, db_url
        self.env = env_for(kafka, f"cmp_{tmp.name[-12:].replace('-', '_')}", db_url)
        self.step = 0

    def import_state(self, fake: FakeKhala) -> Snapshot:
        self.step += 1
        export = fake.write_export(self.tmp / f"state-{self.step}.zip")
        ok(khala(["import-chat", str(export), *self.flags], self.env, timeout=300))
        return table_snapshot(self.db_url)


def _by_key(docs: dict[str, dict[str, Any]], field: str) -> list[dict[str, Any]]:
    """Documents with a string `field`, in export order (stable choice of victims)."""
    return sorted(
        (d for d in docs.values() if isinstance(d.get(field), str)),
        key=lambda d: (d["_creationTime"], d["_id"]),
    )


def step_one(fake: FakeKhala) -> dict[str, Any]:
    """New, changed and deleted documents of every table; a blueprint that changes its
    owner's autopilot; a user message that changes its thread's title."""
    state = fake.state()
    users, threads = _by_key(state["users"], "userId"), _by_key(state["threads"], "threadId")
    runs, receipts = _by_key(state["runs"], "runId"), _by_key(state["receipts"], "runId")
    messages = [m for m in _by_key(state["messages"], "messageId") if m.get("role") == "user"]
    blueprints = _by_key(state["blueprints"], "threadId")
    now = (T0 + 10) * 1000

    owner = threads[0]["ownerId"]
    new_user = {"_id": "live_user_1", "_creationTime": now, "userId": "user_01LIVEFOLLOW0001",
                "email": "live.follower@example.com", "name": "Live Follower",
                "createdAtMs": now}  # fmt: skip
    changed_user = {**users[1], "name": "Renamed At Source", "updatedAtMs": now}
    new_thread = {"_id": "live_thread_1", "_creationTime": now + 1,
                  "threadId": "aaaaaaaa-0000-4000-8000-000000000001",
                  "ownerId": new_user["userId"], "createdAtMs": now + 1,
                  "updatedAtMs": now + 1}  # fmt: skip
    new_message = {"_id": "live_message_1", "_creationTime": now + 2,
                   "threadId": new_thread["threadId"],
                   "messageId": "aaaaaaaa-0000-4000-8000-000000000002", "role": "user",
                   "status": "final", "text": "Followed from a live deployment",
                   "createdAtMs": now + 2, "updatedAtMs": now + 2}  # fmt: skip
    # The first user message of a thread seeds its title: change its text.
    titled = min(
        (m for m in messages if m["threadId"] == threads[0]["threadId"]),
        key=lambda m: (m.get("createdAtMs", 0), m["_creationTime"]),
    )
    retitled = {**titled, "text": "A title written while follow ran", "updatedAtMs": now}
    new_run = {"_id": "live_run_1", "_creationTime": now + 3,
               "threadId": new_thread["threadId"],
               "runId": "aaaaaaaa-0000-4000-8000-000000000003", "status": "final",
               "cancelRequested": False, "createdAtMs": now + 3,
               "updatedAtMs": now + 3}  # fmt: skip
    changed_run = {**runs[0], "status": "canceled", "updatedAtMs": now}
    new_receipt = {"_id": "live_receipt_1", "_creationTime": now + 4,
                   "threadId": new_thread["threadId"], "runId": new_run["runId"],
                   "kind": "tool", "json": {"tool": "live.follow", "ok": True},
                   "createdAtMs": now + 4}  # fmt: skip
    blueprint = copy.deepcopy(
        next(
            b
            for b in reversed(blueprints)
            if isinstance(b.get("blueprint"), dict) and isinstance(b["blueprint"].get("docs"), dict)
        )
    )
    docs = blueprint["blueprint"]["docs"]
    identity = docs.get("identity") if isinstance(docs.get("identity"), dict) else {}
    docs["identity"] = {**identity, "vibe": "changed at the source, live"}
    blueprint["updatedAtMs"] = now
    fake.commit(
        ts_s=T0 + 10,
        put=[("users", new_user), ("users", changed_user), ("threads", new_thread),
             ("messages", new_message), ("messages", retitled), ("runs", new_run),
             ("runs", changed_run), ("receipts", new_receipt), ("blueprints", blueprint),
             ("lightningInvoices", {"_id": "inv_live", "_creationTime": now, "ownerId": owner})],
        delete=[("users", users[-1]["_id"]), ("threads", threads[-1]["_id"]),
                ("messages", messages[-1]["_id"]), ("runs", runs[-1]["_id"]),
                ("receipts", receipts[-1]["_id"]), ("blueprints", blueprints[0]["_id"])],
    )  # fmt: skip
    return {"thread": threads[0]["threadId"], "title": retitled["text"]}


def step_two(fake: FakeKhala) -> None:
    """A second batch: changes to what step one added, and deletions of it."""
    now = (T0 + 20) * 1000
    message = fake.get("messages", "live_message_1")
    fake.commit(
        ts_s=T0 + 20,
        put=[("messages", {**message, "text": "Edited at the source", "updatedAtMs": now}),
             ("users", {**fake.get("users", "live_user_1"), "email": "LIVE.F@Example.com"})],
        delete=[("receipts", "live_receipt_1"), ("runs", "live_run_1")],
    )  # fmt: skip


def _compare(follow_url: str, expected: Snapshot, stages: Stages, context: str) -> None:
    stages.wait_applied(follow_url, timeout=180)
    try:
        assert_same_tables(expected, table_snapshot(follow_url), context=context)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stages.tails()}") from None


@pytest.mark.parametrize("propagate", [False, True], ids=["merge", "propagate-deletes"])
def test_follow_equals_a_merge_import_after_the_snapshot_and_each_step(
    fake: FakeKhala,
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    make_stages: MakeStages,
    propagate: bool,
) -> None:
    flags = ("--propagate-deletes",) if propagate else ()
    env = stage_env(kafka_bootstrap, topic_prefix, pg_url)
    stages = make_stages(env).start()
    # Throttling and server errors on the way: waited out, honouring Retry-After.
    fake.script(LIST_SNAPSHOT, Reply(429, {"code": "RateLimited"}, {"Retry-After": "1"}))
    fake.script(DOCUMENT_DELTAS, Reply(500, {"code": "Internal"}), Reply(503, None))
    # The snapshot expires in the middle of the walk while a user is added: walked again.
    fake.expire_at_page = 6
    late = {"_id": "late_user", "_creationTime": (T0 + 2) * 1000.0,
            "userId": "user_01LATEARRIVAL01", "email": "late@example.com"}  # fmt: skip
    fake.on_expiry = lambda: fake.commit(ts_s=T0 + 2, put=[("users", late)]) and None
    with fresh_database(pg_admin_url) as other:
        mirror = Mirror(tmp_path, kafka_bootstrap, other, flags)

        result = ok(_follow(env, fake, *flags))
        assert "(restarted 1x)" in result.stdout
        assert "runs published: " in result.stdout
        expected = mirror.import_state(fake)
        assert all(expected[t] for t in ("users", "threads", "messages", "autopilots"))
        _compare(pg_url, expected, stages, "after the snapshot")
        statuses = [r.status for r in fake.requests]
        assert 429 in statuses and 500 in statuses and 503 in statuses

        before = table_snapshot(pg_url)
        facts = step_one(fake)
        result = ok(_follow(env, fake, *flags))
        assert "deleted at the source: blueprints=1 messages=1" in result.stdout
        expected = mirror.import_state(fake)
        _compare(pg_url, expected, stages, "after step one")
        after = table_snapshot(pg_url)
        assert after["autopilot_profiles"] != before["autopilot_profiles"]
        (thread,) = [t for t in rows(pg_url, "threads") if t["id"] == facts["thread"]]
        assert thread["title"] == facts["title"]
        assert (len(after["run_events"]) < len(before["run_events"]) + 1) == propagate
        # An export older than the state follow published: older for every document of the
        # tables follow follows (all of them here), so it changes nothing (a run of its own).
        runs = _runs(pg_url)
        ok(khala(["import-chat", str(tmp_path / "state-1.zip"), *flags], env, timeout=300))
        assert table_snapshot(pg_url) == after and _runs(pg_url) == runs + 1
        # Replacing the tables with it: follow would publish its state over it again.
        replace = khala(["import-chat", str(tmp_path / "state-1.zip"), "--replace"], env)
        assert replace.exit_code == 2, replace.stderr
        assert "--replace of an export older" in replace.stderr
        assert table_snapshot(pg_url) == after and _runs(pg_url) == runs + 1

        step_two(fake)
        ok(_follow(env, fake, *flags))
        expected = mirror.import_state(fake)
        _compare(pg_url, expected, stages, "after step two")

        # A newer export of the deployment imported beside follow, which then goes on: the
        # later state wins either way.
        step_two_message = fake.get("messages", "live_message_1")
        fake.commit(ts_s=T0 + 30, put=[("messages", {**step_two_message, "text": "Third"})])
        newer = fake.write_export(tmp_path / "newer.zip")
        ok(khala(["import-chat", str(newer), *flags], env, timeout=300))
        ok(_follow(env, fake, *flags))
        expected = mirror.import_state(fake)
        _compare(pg_url, expected, stages, "after a newer export, then follow")

        # The source no longer keeps the changes after follow's cursor: a new snapshot, and
        # what it lacks counts as gone (deleted with --propagate-deletes, as in a merge import).
        users = _by_key(fake.state()["users"], "userId")
        fake.commit(ts_s=T0 + 40, delete=[("users", users[0]["_id"]),
                                          ("threads", "live_thread_1")])  # fmt: skip
        fake.deltas_kept_after = fake.now
        result = ok(_follow(env, fake, *flags))
        assert "(restarted 1x)" in result.stdout
        expected = mirror.import_state(fake)
        _compare(pg_url, expected, stages, "after a new snapshot for an expired cursor")

        # Caught up: another follow publishes nothing.
        runs = _runs(pg_url)
        again = ok(_follow(env, fake, *flags))
        assert "runs published: none" in again.stdout
        assert _runs(pg_url) == runs


def test_the_snapshot_is_published_as_it_is_walked_and_sigterm_then_resume_loses_nothing(
    fake: FakeKhala,
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    make_stages: MakeStages,
) -> None:
    env, spool = _spooled_env(tmp_path, kafka_bootstrap, topic_prefix, pg_url)
    stages = make_stages(env).start()
    fake.held = {"users"}  # the source is slow to serve one table
    follow = _start_follow(env, fake, tmp_path / "follow.log")
    stored: dict[str, int] = {}
    try:
        # Tables walked before it reach the processor while it is still being walked.
        deadline = time.monotonic() + 120
        while not stored:
            assert follow.poll() is None, (tmp_path / "follow.log").read_text()
            assert time.monotonic() < deadline
            query = "SELECT source_table, count(*) FROM khala_import_documents GROUP BY 1"
            (found,) = run_db(pg_url, [sa.text(query)])
            stored = dict(found)
            time.sleep(0.2)
        assert "users" not in stored
        assert rows(pg_url, "users") == []  # the run is not complete: nothing derived
        # Stopped by its supervisor half way: it stops, and leaves no written table behind.
        follow.send_signal(signal.SIGTERM)
        code = follow.wait(timeout=30)
    finally:
        follow.kill()
        follow.wait()
    assert code == 143
    assert list(spool.glob("khala-follow-*")) == []
    fake.held = set()
    with fresh_database(pg_admin_url) as other:
        result = ok(_follow(env, fake))
        assert "runs published: " in result.stdout
        expected = Mirror(tmp_path, kafka_bootstrap, other, ()).import_state(fake)
        _compare(pg_url, expected, stages, "after a stopped walk, resumed")


def _mixed_export(followed: Path, older: Path, table: str, out: Path) -> Path:
    """`followed` with the entry of `table` taken from `older` (its time too: the export's
    snapshot time stays the newest entry's)."""
    with (
        zipfile.ZipFile(followed) as new,
        zipfile.ZipFile(older) as old,
        zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as mixed,
    ):
        entry = f"{table}/documents.jsonl"
        for info in new.infolist():
            source = old if info.filename == entry else new
            mixed.writestr(source.getinfo(info.filename), source.read(info.filename))
    return out


def test_an_older_export_keeps_the_followed_tables_and_brings_the_others(
    fake: FakeKhala,
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    make_stages: MakeStages,
) -> None:
    """Documents are versioned by time: an export taken before the state `follow` published
    is older for every document of the tables it follows, whatever the export holds of them,
    and the only source of the others."""
    env = stage_env(kafka_bootstrap, topic_prefix, pg_url)
    stages = make_stages(env).start()
    older = fake.write_export(tmp_path / "older.zip")
    step_one(fake)  # changes in every table, blueprints included
    followed = ["users", "threads", "runs", "messages", "receipts"]
    ok(_follow(env, fake, "--tables", *followed))
    stages.wait_applied(pg_url, timeout=180)
    before = table_snapshot(pg_url)

    result = ok(khala(["import-chat", str(older)], env, timeout=300))
    assert _runs(pg_url) == 2, result.stdout

    # As merge imports of exports alone: the source now without its blueprints (what follow
    # published), then the source's followed tables now with the older export's blueprints.
    now = fake.write_export(tmp_path / "now.zip")
    mixed = _mixed_export(now, older, "blueprints", tmp_path / "mixed.zip")
    with fresh_database(pg_admin_url) as other:
        cmp_env = env_for(kafka_bootstrap, "cmp_mixed", other)
        ok(khala(["import-chat", str(now), "--skip-blueprints"], cmp_env))
        ok(khala(["import-chat", str(mixed)], cmp_env))
        expected = table_snapshot(other)
    _compare(pg_url, expected, stages, "after an older export")
    after = table_snapshot(pg_url)
    assert after["autopilot_profiles"] != before["autopilot_profiles"]  # its blueprints came in
    assert after["messages"] == before["messages"]  # its messages did not


def _runs(db_url: str) -> int:
    ((n,),) = run_db(db_url, [sa.select(sa.func.count()).select_from(RUNS)])[0]
    return int(n)


def test_a_refused_key_is_exit_2_and_writes_nothing(
    fake: FakeKhala, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)
    wrong = khala(
        ["follow", "--deployment", fake.base_url, "--until-caught-up"],
        {**env, "KHALA_DEPLOY_KEY": "not-the-key"},
    )
    assert wrong.exit_code == 2, wrong.stderr
    assert "deploy key was refused (HTTP 401" in wrong.stderr
    assert "Traceback" not in wrong.stderr and "not-the-key" not in wrong.stderr + wrong.stdout
    missing = khala(["follow", "--deployment", fake.base_url, "--until-caught-up"], env)
    assert missing.exit_code == 2 and "KHALA_DEPLOY_KEY" in missing.stderr
    keyed = {**env, "KHALA_DEPLOY_KEY": KEY}
    for args, words in (
        (["--deployment", "ftp://example"], "--deployment must be an http(s) URL"),
        (["--deployment", fake.base_url, "--tables", "users", "lightningInvoices"],
         "--tables: not a source table: lightningInvoices"),
        (["--deployment", fake.base_url, "--poll-interval", "0"], "must be above 0"),
    ):  # fmt: skip
        bad = khala(["follow", *args], keyed)
        assert bad.exit_code == 2 and words in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr
    (tables,) = run_db(
        pg_url,
        [sa.text("SELECT count(*) FROM information_schema.tables WHERE table_schema='public'")],
    )
    assert tables[0][0] == 0  # not even the importer's tables
    assert {r.path for r in fake.requests} == {"/api/json_schemas"}


def test_kill_9_of_follow_anywhere_then_a_rerun_reaches_the_same_end_state(
    fake: FakeKhala,
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    make_stages: MakeStages,
) -> None:
    env, spool = _spooled_env(tmp_path, kafka_bootstrap, topic_prefix, pg_url)
    stages = make_stages(env).start()
    rng = random.Random(29)  # kills: mid-walk, publishing, mid-deltas (see the printout)
    fake.page_size = 3  # many pages: a kill lands inside the walk or the publication
    with fresh_database(pg_admin_url) as other:
        mirror = Mirror(tmp_path, kafka_bootstrap, other, ())
        for step in (None, step_one, step_two):
            if step is not None:
                step(fake)
            # The step's run is published by the rerun, or already by a killed follow.
            before = _runs(pg_url) if _has_runs(pg_url) else 0
            kills = _kill_follow(env, fake, rng, pg_url, 3 if step else 70)
            ok(_follow(env, fake))
            # What the killed follows left in TMPDIR, the rerun removed.
            assert list(spool.glob("khala-follow-*")) == [], kills
            # ... and process or sink killed while they derive or write what follow published.
            stage = rng.choice(["process", "sink"])
            target, delay = ("deriving", 0.3) if stage == "process" else ("derived", 1.0)
            phase = stages.wait_phase(pg_url, target, after_run=before, timeout=120)
            time.sleep(rng.uniform(0, delay))
            stages.kill(stage)
            kills.append(f"{stage} in {phase}")
            stages.restart(stage)
            expected = mirror.import_state(fake)
            print(f"step {step.__name__ if step else 'snapshot'}: follow killed {kills}")
            _compare(pg_url, expected, stages, f"kills at {kills}")
    (state,) = run_db(pg_url, [sa.select(FOLLOW.c.phase, FOLLOW.c.version)])[0]
    assert state.phase == "deltas"


def _spooled_env(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> tuple[dict[str, str], Path]:
    """The stages' environment with the deploy key, and `follow`'s temporary folders (one per
    publication) in a folder of the test's, to see what it leaves behind."""
    spool = tmp_path / "tmp"
    spool.mkdir()
    env = {
        **stage_env(kafka_bootstrap, topic_prefix, pg_url),
        "KHALA_DEPLOY_KEY": KEY,
        "TMPDIR": str(spool),
    }
    return env, spool


def _kill_follow(
    env: dict[str, str], fake: FakeKhala, rng: random.Random, db_url: str, span: int
) -> list[str]:
    """`follow` started and SIGKILLed twice at a seeded random point: after its n-th request
    to the source (inside the snapshot walk or the delta reads), or while it publishes a run;
    where the kills landed."""
    landed = []
    for _ in range(2):
        runs = _runs(db_url) if _has_runs(db_url) else 0
        before = len(fake.requests)
        mode = rng.choice(["request", "publishing"])
        target = rng.randint(1, span)
        proc = subprocess.Popen(
            [sys.executable, "-m", "khala_app", "follow", "--deployment", fake.base_url,
             "--until-caught-up"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if mode == "request" and len(fake.requests) - before >= target:
                break
            if mode == "publishing" and _has_runs(db_url) and _runs(db_url) > runs:
                time.sleep(rng.uniform(0, 0.3))
                break
            time.sleep(0.005)
        proc.kill()
        proc.wait(timeout=30)
        where = f"request {target}" if mode == "request" else "publishing"
        landed.append(f"{where}: {len(fake.requests) - before} requests, exit {proc.returncode}")
    return landed


def _has_runs(db_url: str) -> bool:
    return _has_table(db_url, RUNS.name)


def _has_table(db_url: str, name: str) -> bool:
    query = sa.text("SELECT count(*) FROM information_schema.tables WHERE table_name = :name")
    (found,) = run_db(db_url, [query.bindparams(name=name)])
    return bool(found[0][0])


def test_a_running_follow_publishes_changes_as_they_come_and_lag_shows_the_source(
    fake: FakeKhala,
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    make_stages: MakeStages,
) -> None:
    env = {**stage_env(kafka_bootstrap, topic_prefix, pg_url), "KHALA_DEPLOY_KEY": KEY}
    stages = make_stages(env).start()
    log = (tmp_path / "follow.log").open("wb")
    follow = subprocess.Popen(
        [sys.executable, "-m", "khala_app", "-v", "follow", "--deployment", fake.base_url,
         "--poll-interval", "0.2"],
        env=env, stdout=log, stderr=log,
    )  # fmt: skip
    try:
        stages.wait_applied(pg_url, timeout=180)
        thread = next(iter(_by_key(fake.state()["threads"], "threadId")))
        now_s = int(time.time())
        message = {"_id": "live_now", "_creationTime": now_s * 1000.0,
                   "threadId": thread["threadId"],
                   "messageId": "bbbbbbbb-0000-4000-8000-000000000001", "role": "user",
                   "status": "final", "text": "written a moment ago",
                   "createdAtMs": now_s * 1000, "updatedAtMs": now_s * 1000}  # fmt: skip
        fake.commit(ts_s=now_s, put=[("messages", message)])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            (found,) = run_db(pg_url, [sa.select(FOLLOW.c.freshness_s, FOLLOW.c.freshness_run)])
            if found and found[0].freshness_s is not None:
                break
            assert follow.poll() is None, (tmp_path / "follow.log").read_text()
            time.sleep(0.2)
        freshness = found[0].freshness_s
        print(f"freshness of one change at a 0.2 s poll: {freshness:.2f} s")
        assert freshness is not None and 0 <= freshness < 30
        ids = {m["id"] for m in rows(pg_url, "messages")}
        assert message["messageId"] in ids

        lag = ok(khala(["lag", "--json", "--samples", "1"], env))
        source = orjson.loads(lag.stdout)["source"]
        assert source["deployment"] == fake.base_url
        assert source["behind_seconds"] == 0 and source["freshness_seconds"] == round(freshness, 3)
        assert "freshness" in ok(khala(["lag", "--samples", "1"], env)).stdout
        check = khala(["lag", "--check", "--samples", "1"], env)
        assert check.exit_code == 0 and "; source behind 0.0s" in check.stdout, check.stdout
        watch = subprocess.Popen(
            [sys.executable, "-m", "khala_app", "lag", "--watch", "--json", "--interval", "0.5"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            assert watch.stdout is not None
            first = orjson.loads(watch.stdout.readline())
        finally:
            watch.terminate()
            watch.wait(timeout=30)
        assert first["source"]["deployment"] == fake.base_url
        # The status line comes every 5 s: seen before follow is stopped, however quickly the
        # steps above went (they took longer than 5 s before steps were derived scoped).
        deadline = time.monotonic() + 30
        while "follow: cursor=" not in (tmp_path / "follow.log").read_text():
            assert follow.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        follow.send_signal(signal.SIGTERM)
        code = follow.wait(timeout=30)
        log.close()
    output = (tmp_path / "follow.log").read_text()
    assert code == 143, output
    # With -v: neither the deploy key nor any email of the deployment's documents.
    assert KEY not in output and "follow: run=" in output
    assert "follow: cursor=" in output  # the status line every 5 s
    emails = {d["email"] for d in fake.state()["users"].values() if isinstance(d.get("email"), str)}
    assert all(e not in output for e in emails if "@" in e)


def test_a_database_outage_mid_walk_is_waited_out(
    fake: FakeKhala,
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_prefix: str,
    own_pg: LocalPostgres,
    pg_admin_url: str,
    make_stages: MakeStages,
) -> None:
    """The database stops while `follow` mirrors the snapshot (and the stages store and
    derive it) and comes back: everything waits, and the end state is the uninterrupted one."""
    db_url = own_pg.create_database()
    env, _ = _spooled_env(tmp_path, kafka_bootstrap, topic_prefix, db_url)
    env["KHALA_RETRY_DEADLINE_SECONDS"] = "90"
    stages = make_stages(env).start()
    fake.page_size = 3  # many pages: the walk is still going when the database stops
    log = tmp_path / "follow.log"
    follow = _start_follow(env, fake, log)
    try:
        _wait_for_rows(db_url, SOURCE_DOCUMENTS.name, follow, log)
        own_pg.stop()
        time.sleep(4)
        assert follow.poll() is None, log.read_text()  # waiting, not failed
        own_pg.start()
        code = follow.wait(timeout=240)
    finally:
        follow.kill()
        follow.wait()
    err = log.read_text()
    assert code == 0, err
    assert "Traceback" not in err, err
    assert "waiting for the database" in err, err
    with fresh_database(pg_admin_url) as other:
        expected = Mirror(tmp_path, kafka_bootstrap, other, ()).import_state(fake)
        _compare(db_url, expected, stages, "after a database outage mid-walk")


def test_a_broker_restart_mid_publication_is_waited_out(
    fake: FakeKhala,
    tmp_path: Path,
    own_broker: LocalBroker,
    kafka_bootstrap: str,
    topic_prefix: str,
    pg_url: str,
    pg_admin_url: str,
    make_stages: MakeStages,
) -> None:
    """The broker stops while `follow` publishes the walked tables (and the stages read them)
    and starts again on its data: everything waits, and the end state is the uninterrupted
    one."""
    env, _ = _spooled_env(tmp_path, own_broker.bootstrap, topic_prefix, pg_url)
    env["KHALA_RETRY_DEADLINE_SECONDS"] = "90"
    stages = make_stages(env).start()
    fake.page_size = 3
    log = tmp_path / "follow.log"
    follow = _start_follow(env, fake, log)
    restarted = None
    try:
        _wait_for_rows(pg_url, "khala_import_documents", follow, log)
        own_broker.stop()
        time.sleep(3)
        assert follow.poll() is None, log.read_text()  # waiting, not failed
        restarted = start_local_broker(own_broker.data_dir, port=own_broker.port)
        code = follow.wait(timeout=240)
        err = log.read_text()
        assert code == 0, err
        assert "Traceback" not in err, err
        # The client's complaint at each reconnection attempt (ten a second) is said once
        # in a while, not each time.
        complaints = [line for line in err.splitlines() if " aiokafka" in line]
        assert 0 < len(complaints) <= 10, err
        with fresh_database(pg_admin_url) as other:
            expected = Mirror(tmp_path, kafka_bootstrap, other, ()).import_state(fake)
            _compare(pg_url, expected, stages, "after a broker restart mid-publication")
    finally:
        follow.kill()
        follow.wait()
        stages.stop()
        if restarted is not None:
            restarted.stop()


def _start_follow(env: dict[str, str], fake: FakeKhala, log: Path) -> subprocess.Popen[bytes]:
    """`follow --until-caught-up` in the background, its stderr to `log`."""
    return subprocess.Popen(
        [sys.executable, "-m", "khala_app", "follow", "--deployment", fake.base_url,
         "--until-caught-up"],
        env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"),
    )  # fmt: skip


def _wait_for_rows(db_url: str, table: str, follow: subprocess.Popen[bytes], log: Path) -> None:
    """Until `table` exists and holds a row, `follow` still running."""
    deadline = time.monotonic() + 120
    count = sa.text(f"SELECT count(*) FROM {table}")
    while not (_has_table(db_url, table) and run_db(db_url, [count])[0][0][0]):
        assert follow.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"no row in {table} after 120 s"
        time.sleep(0.02)
