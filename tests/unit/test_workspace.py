"""The derivation's on-disk maps keep the reference's choice rules (processors/workspace.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from processors.linkage import Owner
from processors.workspace import Workspace


def test_each_owner_gets_the_most_recent_blueprint_of_its_threads_ties_to_the_later() -> None:
    with Workspace() as work:
        work.best_blueprints(
            [
                ("t1", "b1", 5),
                ("t1", "b2", 5),  # same thread, same recency: the later row wins
                ("t2", "b3", 9),
                ("t2", "b4", 1),  # older: ignored
                ("t3", "b5", 9),  # ties t2's best; t3 comes later among ann's threads
                ("t4", "b6", 3),
            ]
        )
        first = work.add_threads([("t1", "ann"), ("t2", "ann"), ("t4", "bob")])
        second = work.add_threads([("t3", "ann"), ("t5", "cid"), ("t6", "bob")])
        assert first == ["ann", "bob"]
        assert second == ["cid"]
        pages = list(work.owner_pages(2))
        assert pages == [[("ann", "b5"), ("bob", "b6")], [("cid", None)]]


def test_threads_are_linked_to_their_owners_autopilot() -> None:
    with Workspace() as work:
        work.add_threads([("t1", "ann"), ("t2", "bob"), ("t3", "ann")])
        work.set_owners({"ann": Owner(7, "ap-ann", 2), "bob": Owner(8, "ap-bob", 1)})
        found = work.owners_of(["t1", "t2", "t3", "anonymous"])
        assert found == {
            "t1": Owner(7, "ap-ann", 2),
            "t2": Owner(8, "ap-bob", 1),
            "t3": Owner(7, "ap-ann", 2),
        }
        assert set(work.owners_of(["t2", "anonymous"])) == {"t2"}


def test_lookups_of_more_keys_than_one_statement_binds() -> None:
    with Workspace() as work:
        threads = [(f"t{n}", f"o{n % 7}") for n in range(1234)]
        work.add_threads(threads)
        work.add_runs(f"r{n}" for n in range(0, 1500, 2))
        assert set(work.owners_of(t for t, _ in threads)) == {t for t, _ in threads}
        assert len(work.imported_runs(f"r{n}" for n in range(1500))) == 750


def test_the_first_title_with_the_smallest_sort_key_wins() -> None:
    with Workspace() as work:
        work.offer_titles({"t1": (5.0, "five"), "t2": (1.0, "one")})
        work.offer_titles({"t1": (3.0, "three"), "t2": (1.0, "also one")})
        work.offer_titles({"t1": (4.0, "four")})
        assert work.titles(["t1", "t2", "t3"]) == {"t1": "three", "t2": "one"}


def test_users_emails_and_handles_given_out_by_the_run() -> None:
    with Workspace() as work:
        work.add_users(
            [("user_1", 11, "Ann", "ann@x.io", None), ("user_2", 12, "Bo", "b@x.io", "bo")]
        )
        assert work.users(["user_2", "user_9"]) == {"user_2": (12, "Bo", "b@x.io", "bo")}
        assert work.has_user(["user_1", "user_9"]) == {"user_1"}
        work.reserve_emails([("ann@x.io", "user_1")])
        assert work.email_holders(["ann@x.io", "b@x.io"]) == {"ann@x.io": "user_1"}
        assert work.take_handle("ann-autopilot") is True
        assert work.take_handle("ann-autopilot") is False


def test_the_file_is_gone_when_the_workspace_closes() -> None:
    with Workspace() as work:
        folder = Path(work._dir.name)
        assert folder.exists()
    assert not folder.exists()


def test_workspaces_of_gone_processes_are_deleted_and_live_ones_kept(tmp_path: Path) -> None:
    exited = subprocess.Popen(["true"])  # its pid is then free (and not reused at once)
    exited.wait()
    abandoned = tmp_path / f"khala-derivation-{exited.pid}-abc"
    live = tmp_path / f"khala-derivation-{os.getpid()}-xyz"
    other = tmp_path / "khala-derivation-notes"
    for path in (abandoned, live, other):
        path.mkdir()
        (path / "maps.sqlite").write_bytes(b"x" * 1024)
    with Workspace(parent=tmp_path):
        mine = [p for p in tmp_path.iterdir() if p not in (live, other)]
        assert len(mine) == 1 and mine[0].name.startswith(f"khala-derivation-{os.getpid()}-")
        assert not abandoned.exists()
        assert live.exists() and other.exists()
    assert not mine[0].exists()


def test_lookups_of_every_size_share_a_few_statement_texts() -> None:
    """IN lists are padded to powers of two: sqlite3 keeps one prepared statement per SQL
    text (128 at most), and one per list length made the process grow with the export."""
    users = [f"u{i}" for i in range(500)]
    with Workspace() as work:
        lengths: set[int] = set()
        # The trace shows each statement with its values bound: count the values.
        work._db.set_trace_callback(lambda sql: lengths.add(sql.count(",") + 1))
        for n in range(1, 501):  # every page size
            assert work.has_user(users[:n]) == set()
        work._db.set_trace_callback(None)
    assert len(lengths) == 10  # 1, 2, 4, ... 512
