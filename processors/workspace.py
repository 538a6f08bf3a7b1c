"""The derivation's working maps, on disk: so that its memory does not grow with the export.

A derivation needs a few maps over the whole export (thread → owner, owner → autopilot, the
users it resolved, the runs it imported, each thread's title and best blueprint, the emails
and handles it gave out). At a million documents they held about a hundred thousand entries
each and made the `process` stage's memory follow the export's size (issue #5). They live
here instead, in a temporary SQLite file of this process, read and written a page of
documents at a time. The file is scratch: it is rebuilt by every derivation (a redo after a
crash starts from an empty one), so it needs no durability and is deleted when done, or by
the next derivation on the machine when its process was killed.

The calls are synchronous: each is one statement over at most a page of keys on a local
file, shorter than the database round trips the derivation awaits around it.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from khala_stream.processes import pid_alive
from processors.linkage import Owner

_SCHEMA = """
CREATE TABLE threads (thread_id TEXT PRIMARY KEY, owner TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE owners (
    seq INTEGER PRIMARY KEY,
    workos_id TEXT NOT NULL UNIQUE,
    blueprint TEXT, recency INTEGER,
    user_id INTEGER, autopilot_id TEXT, config_version INTEGER
);
CREATE TABLE blueprints (thread_id TEXT PRIMARY KEY, doc_key TEXT, recency INTEGER)
    WITHOUT ROWID;
CREATE TABLE users (
    workos_id TEXT PRIMARY KEY, id INTEGER, name TEXT, email TEXT, handle TEXT
) WITHOUT ROWID;
CREATE TABLE emails (email TEXT PRIMARY KEY, workos_id TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE handles (handle TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE runs (run_id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE titles (thread_id TEXT PRIMARY KEY, sort_key REAL, title TEXT) WITHOUT ROWID;
"""
_CHUNK = 500  # keys per IN list: well under SQLite's limit on bound parameters
_PREFIX = "khala-derivation-"  # then the owning process's pid


class Workspace:
    """One derivation's maps. Use as a context manager; the file goes when it closes."""

    def __init__(self, parent: Path | None = None) -> None:
        parent = parent or Path(tempfile.gettempdir())
        _remove_abandoned(parent)
        self._dir = tempfile.TemporaryDirectory(prefix=f"{_PREFIX}{os.getpid()}-", dir=parent)
        self._db = sqlite3.connect(Path(self._dir.name) / "maps.sqlite", isolation_level=None)
        # Scratch: nothing to recover after a crash, so no journal and no syncing; a small
        # page cache, since bounding memory is the point.
        self._db.executescript(
            "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; PRAGMA cache_size = -2048;"
            + _SCHEMA
        )

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *_: object) -> None:
        self._db.close()
        self._dir.cleanup()

    # -- threads and their owners ------------------------------------------------------------

    def add_threads(self, threads: Sequence[tuple[str, str]]) -> list[str]:
        """Records (thread, owner) pairs in file order; returns the owners first seen here.

        Each thread's best blueprint (`best_blueprints`, complete before this) competes for
        its owner's: the most recent wins, ties the later thread, as the reference's loop.
        """
        known = self._present("owners", "workos_id", {owner for _, owner in threads})
        new: list[str] = []
        for _, owner in threads:
            if owner not in known:
                known.add(owner)
                new.append(owner)
        with self._transaction():
            self._db.executemany("INSERT OR REPLACE INTO threads VALUES (?, ?)", threads)
            self._db.executemany("INSERT INTO owners (workos_id) VALUES (?)", ((o,) for o in new))
            self._db.executemany(
                "UPDATE owners SET blueprint = b.doc_key, recency = b.recency"
                " FROM blueprints b WHERE b.thread_id = ? AND owners.workos_id = ?"
                " AND (owners.recency IS NULL OR b.recency >= owners.recency)",
                threads,
            )
        return new

    def owners_of(self, thread_ids: Iterable[str]) -> dict[str, Owner]:
        """Each owned thread's owner, with the owner's autopilot (after `set_owners`)."""
        return {
            thread_id: Owner(user_id, autopilot_id, version)
            for thread_id, user_id, autopilot_id, version in self._select(
                "SELECT t.thread_id, o.user_id, o.autopilot_id, o.config_version FROM threads t"
                " JOIN owners o ON o.workos_id = t.owner WHERE t.thread_id IN ({})",
                thread_ids,
            )
        }

    # -- blueprints: each thread's best, then each owner's ------------------------------------

    def best_blueprints(self, found: Sequence[tuple[str, str, int]]) -> None:
        """(thread, document key, recency) in file order: the most recent wins, ties the later
        row (reference §5.1). Must be complete before `add_threads`."""
        with self._transaction():
            self._db.executemany(
                "INSERT INTO blueprints VALUES (?, ?, ?) ON CONFLICT (thread_id) DO UPDATE"
                " SET doc_key = excluded.doc_key, recency = excluded.recency"
                " WHERE excluded.recency >= blueprints.recency",
                found,
            )

    def owner_pages(self, size: int) -> Iterator[list[tuple[str, str | None]]]:
        """Owners in order of their first thread, with the key of their chosen blueprint."""
        last = 0
        while True:
            rows = self._db.execute(
                "SELECT seq, workos_id, blueprint FROM owners WHERE seq > ? ORDER BY seq LIMIT ?",
                (last, size),
            ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield [(workos_id, blueprint) for _, workos_id, blueprint in rows]

    def set_owners(self, owners: dict[str, Owner]) -> None:
        with self._transaction():
            self._db.executemany(
                "UPDATE owners SET user_id = ?, autopilot_id = ?, config_version = ?"
                " WHERE workos_id = ?",
                [(o.user_id, o.autopilot_id, o.config_version, w) for w, o in owners.items()],
            )

    # -- users, emails and handles given out by this run -------------------------------------

    def add_users(self, users: Iterable[tuple[str, int, str, str, str | None]]) -> None:
        with self._transaction():
            self._db.executemany("INSERT OR REPLACE INTO users VALUES (?, ?, ?, ?, ?)", users)

    def users(self, workos_ids: Iterable[str]) -> dict[str, tuple[int, str, str, str | None]]:
        return {
            w: (user_id, name, email, handle)
            for w, user_id, name, email, handle in self._select(
                "SELECT workos_id, id, name, email, handle FROM users WHERE workos_id IN ({})",
                workos_ids,
            )
        }

    def has_user(self, workos_ids: Iterable[str]) -> set[str]:
        return self._present("users", "workos_id", workos_ids)

    def reserve_emails(self, reserved: Iterable[tuple[str, str]]) -> None:
        with self._transaction():
            self._db.executemany("INSERT OR REPLACE INTO emails VALUES (?, ?)", reserved)

    def email_holders(self, emails: Iterable[str]) -> dict[str, str]:
        return dict(self._select("SELECT email, workos_id FROM emails WHERE email IN ({})", emails))

    def take_handle(self, handle: str) -> bool:
        """Claims a handle for this run; False when this run already gave it out."""
        cursor = self._db.execute("INSERT OR IGNORE INTO handles VALUES (?)", (handle,))
        return cursor.rowcount == 1

    # -- runs and titles ---------------------------------------------------------------------

    def add_runs(self, run_ids: Iterable[str]) -> None:
        with self._transaction():
            self._db.executemany("INSERT OR IGNORE INTO runs VALUES (?)", ((r,) for r in run_ids))

    def imported_runs(self, run_ids: Iterable[str]) -> set[str]:
        return self._present("runs", "run_id", run_ids)

    def offer_titles(self, titles: dict[str, tuple[float, str]]) -> None:
        """Keeps each thread's title with the smallest sort key (the first one on ties)."""
        with self._transaction():
            self._db.executemany(
                "INSERT INTO titles VALUES (?, ?, ?) ON CONFLICT (thread_id) DO UPDATE"
                " SET sort_key = excluded.sort_key, title = excluded.title"
                " WHERE excluded.sort_key < titles.sort_key",
                [(t, key, title) for t, (key, title) in titles.items()],
            )

    def titles(self, thread_ids: Iterable[str]) -> dict[str, str]:
        return dict(
            self._select("SELECT thread_id, title FROM titles WHERE thread_id IN ({})", thread_ids)
        )

    # -- plumbing ----------------------------------------------------------------------------

    def _select(self, sql: str, keys: Iterable[str]) -> Iterator[Any]:
        wanted = list(dict.fromkeys(keys))
        for start in range(0, len(wanted), _CHUNK):
            chunk = _padded(wanted[start : start + _CHUNK])
            with closing(self._db.execute(sql.format(",".join("?" * len(chunk))), chunk)) as rows:
                yield from rows.fetchall()

    def _present(self, table: str, column: str, keys: Iterable[str]) -> set[str]:
        sql = f"SELECT {column} FROM {table} WHERE {column} IN ({{}})"
        return {key for (key,) in self._select(sql, keys)}

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One commit per batch of writes instead of one per statement."""
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


def _padded(keys: list[str]) -> list[str]:
    """`keys` lengthened to a power of two by repeating the last one (the IN list means the
    same): sqlite3 keeps the last 128 statements prepared, and one per list length held
    about 10 MB more at 1M documents than at 100k."""
    size = 1 << max(0, len(keys) - 1).bit_length()
    return keys + keys[-1:] * (size - len(keys))


def _remove_abandoned(parent: Path) -> None:
    """Delete the workspaces of processes that are gone: one killed while deriving (kill -9,
    OOM) cannot, and its file can run to tens of MB. Those of live processes are left alone."""
    for path in parent.glob(f"{_PREFIX}*-*"):
        pid = path.name.removeprefix(_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
