"""A Khala deployment's streaming export API on 127.0.0.1, served by a real HTTP server in a
thread, following `../shared/reference/khala-streaming-export.md`.

    with FakeKhala(deploy_key="dk") as fake:
        fake.load_export(generated_zip, ts_s=1_700_000_000)   # the initial state, one commit
        fake.commit(ts_s=1_700_000_010, put=[("users", doc)], delete=[("messages", "m:1")])
        fake.script(DOCUMENT_DELTAS, Reply(429, headers={"Retry-After": "1"}))
        fake.write_export(tmp / "state.zip")                   # a ZIP export of the state now

State: a log of commits (one `_ts` in nanoseconds each), replayed to serve a snapshot at any
timestamp. `list_snapshot` pages a table by `_id` (`page_size` values, the cursor is the last
`_id`); without `tableName` it pages every table by (table, `_id`). `document_deltas` gives the
versions committed after the cursor in `_ts` order, whole commits per page (at least one, then
up to `delta_page_size` values), cursor = the last `_ts` served. A wrong or missing
`Authorization: Convex <key>` is 401; a snapshot in `expired` is a 400 naming it (and the one
being walked expires after `expire_at_page` pages, calling `on_expiry`); scripted
replies (per path) come before the normal answer.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
import zipfile
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

from producers.live_api import DOCUMENT_DELTAS, JSON_SCHEMAS, LIST_SNAPSHOT, export_order
from tests.fakes.http_fake import FakeHttpServer, send_reply

__all__ = ["DOCUMENT_DELTAS", "JSON_SCHEMAS", "LIST_SNAPSHOT", "FakeKhala", "Reply"]

NS = 1_000_000_000


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: Any = None
    """JSON-able, or bytes: the JSON already encoded."""
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Recorded:
    path: str
    params: dict[str, str]
    authorization: str | None
    status: int


@dataclass(frozen=True)
class _Commit:
    ts: int
    writes: tuple[tuple[str, str, dict[str, Any] | None], ...]  # table, _id, doc (None: deleted)


class FakeKhala(FakeHttpServer):
    name = "fake-khala"

    def __init__(
        self, *, deploy_key: str = "dev:fake|khala-deploy-key", page_size: int = 7,
        delta_page_size: int = 5,
    ) -> None:  # fmt: skip
        super().__init__()
        self.deploy_key = deploy_key
        self.page_size = page_size
        self.delta_page_size = delta_page_size
        self.expired: set[int] = set()
        self.expire_at_page: int | None = None
        """Snapshot pages served before the snapshot being walked expires (once)."""
        self.on_expiry: Callable[[], None] | None = None
        """Called as the snapshot expires (to commit something: time moves on)."""
        self.held: set[str] = set()
        """Tables whose snapshot pages answer 503 with Retry-After for now (a deployment slow
        to serve one table)."""
        self._pages_served = 0
        self._cache: dict[Any, Any] = {}
        self._rendered: dict[tuple[int, str, int, int, str | None], bytes] = {}
        """Encoded snapshot pages (`prepare_snapshot(render=True)`): (snapshot, table, log
        length, page size, cursor asked after) -> body."""
        self.deltas_kept_after = 0
        """`_ts` (ns): a delta cursor older than this is refused as out of retention."""
        self.requests: list[Recorded] = []
        self._log: list[_Commit] = []
        self._tables: set[str] = set()
        self._scripts: dict[str, deque[Reply]] = defaultdict(deque)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ state

    def load_export(self, path: Path, *, ts_s: int) -> dict[str, int]:
        """Every JSON-object line of a ZIP export as one commit at `ts_s` (whole seconds);
        a document without a string `_id` gets one, without a numeric `_creationTime` its
        line's (a live deployment always has both); the last of an `_id` wins. Documents per
        table."""
        writes: list[tuple[str, dict[str, Any]]] = []
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                parts = name.strip("/").split("/")
                if len(parts) != 2 or parts[1] != "documents.jsonl":
                    continue
                table = parts[0]
                self._tables.add(table)
                for n, line in enumerate(archive.read(name).split(b"\n"), start=1):
                    try:
                        doc = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue
                    if not isinstance(doc, dict):
                        continue
                    if not isinstance(doc.get("_id"), str) or not doc["_id"]:
                        doc["_id"] = f"{table}:line{n}"
                    created = doc.get("_creationTime")
                    if isinstance(created, bool) or not isinstance(created, int | float):
                        doc["_creationTime"] = float(1_600_000_000_000 + n)
                    writes.append((table, doc))
        self.commit(ts_s=ts_s, put=writes)
        counts: dict[str, int] = defaultdict(int)
        for table, _ in writes:
            counts[table] += 1
        return dict(counts)

    def commit(
        self,
        *,
        ts_s: float,
        put: Iterable[tuple[str, dict[str, Any]]] = (),
        delete: Iterable[tuple[str, str]] = (),
    ) -> int:
        """One transaction at `ts_s` seconds (after every earlier one); its `_ts` (ns)."""
        ts = round(ts_s * NS)
        with self._lock:
            if self._log and ts <= self._log[-1].ts:
                raise ValueError("commits go forward in time")
            writes: list[tuple[str, str, dict[str, Any] | None]] = []
            for table, doc in put:
                self._tables.add(table)
                writes.append((table, doc["_id"], orjson.loads(orjson.dumps(doc))))
            writes += [(table, doc_id, None) for table, doc_id in delete]
            self._log.append(_Commit(ts, tuple(writes)))
            self._rendered = {}  # of the log before
        return ts

    def state(self, at: int | None = None) -> dict[str, dict[str, dict[str, Any]]]:
        """Table -> _id -> document, as of `_ts` `at` (default: now)."""
        out: dict[str, dict[str, dict[str, Any]]] = {t: {} for t in self._tables}
        with self._lock:
            log = list(self._log)
        for c in log:
            if at is not None and c.ts > at:
                break
            for table, doc_id, doc in c.writes:
                if doc is None:
                    out[table].pop(doc_id, None)
                else:
                    out[table][doc_id] = doc
        return out

    def get(self, table: str, doc_id: str) -> dict[str, Any]:
        return dict(self.state()[table][doc_id])

    @property
    def now(self) -> int:
        with self._lock:
            return self._log[-1].ts if self._log else 0

    def prepare_snapshot(self, *, render: bool = False) -> None:
        """Work out the pages of the snapshot now, of every table, before a walk asks for
        them (a bench's untimed set-up: a deployment has its snapshot at hand, and serves it
        from another machine). `render`: encode every page of a per-table walk as well, so
        that serving one costs a lookup (about the export's size in memory)."""
        snapshot = self.now
        for table in [None, *sorted(self._tables)]:
            self._snapshot_items(snapshot, table)
        if not render:
            return
        rendered: dict[tuple[int, str, int, int, str | None], bytes] = {}
        for table in sorted(self._tables):
            after: str | None = None
            while True:
                body = self._snapshot_body(snapshot, table, after)
                key = (snapshot, table, len(self._log), self.page_size, after)
                rendered[key] = orjson.dumps(body)
                if not body["hasMore"]:
                    break
                after = body["cursor"]
        with self._lock:
            self._rendered = rendered

    def export_tables(self) -> dict[str, list[dict[str, Any]]]:
        """The state as an export lists it: per table, by `_creationTime` then `_id`."""
        return {
            table: sorted(docs.values(), key=export_order)
            for table, docs in sorted(self.state().items())
        }

    def write_export(self, out: Path) -> Path:
        """A ZIP export of the state now; its entries' time is the last commit's (whole
        seconds: the ZIP format keeps even seconds, so commit on even seconds)."""
        when = datetime.fromtimestamp(self.now // NS, tz=UTC)
        stamp = (when.year, when.month, when.day, when.hour, when.minute, when.second)
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for table, docs in self.export_tables().items():
                body = b"".join(orjson.dumps(d) + b"\n" for d in docs)
                info = zipfile.ZipInfo(f"{table}/documents.jsonl", date_time=stamp)
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, body)
        return out

    # ------------------------------------------------------------------ faults

    def script(self, path: str, *replies: Reply) -> None:
        with self._lock:
            self._scripts[path].extend(replies)

    def requests_to(self, path: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    # ------------------------------------------------------------------ serving

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        split = urlsplit(handler.path)
        params = {k: v[-1] for k, v in parse_qs(split.query).items()}
        authorization = handler.headers.get("Authorization")
        reply = self._answer(split.path, params, authorization)
        with self._lock:
            self.requests.append(Recorded(split.path, params, authorization, reply.status))
        if isinstance(reply.body, bytes):
            payload = reply.body
        else:
            payload = b"" if reply.body is None else orjson.dumps(reply.body)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client left
            send_reply(handler, reply.status, payload, reply.headers)

    def _answer(self, path: str, params: dict[str, str], authorization: str | None) -> Reply:
        if authorization != f"Convex {self.deploy_key}":
            return Reply(401, {"code": "BadDeployKey", "message": "The deploy key is invalid"})
        with self._lock:
            queue = self._scripts.get(path)
            if queue:
                return queue.popleft()
        if params.get("format") != "json":
            return Reply(400, {"code": "BadFormat", "message": "format must be json"})
        if path == JSON_SCHEMAS:
            return Reply(200, {t: {"type": "object"} for t in sorted(self._tables)})
        if path == LIST_SNAPSHOT:
            return self._snapshot(params)
        if path == DOCUMENT_DELTAS:
            return self._deltas(params)
        return Reply(404, {"code": "NotFound", "message": "no such route"})

    def _snapshot(self, params: dict[str, str]) -> Reply:
        snapshot = int(params["snapshot"]) if "snapshot" in params else self.now
        if params.get("tableName") in self.held:
            return Reply(503, {"code": "Unavailable"}, {"Retry-After": "1"})
        if "tableName" in params:
            self._pages_served += 1
            if self._pages_served == self.expire_at_page:
                self.expired.add(snapshot)
                if self.on_expiry is not None:
                    self.on_expiry()
        if snapshot in self.expired:
            return Reply(
                400,
                {"code": "SnapshotTooOld", "message": f"snapshot {snapshot} is out of retention"},
            )
        table, after = params.get("tableName"), params.get("cursor")
        if table is not None:
            with self._lock:
                key = (snapshot, table, len(self._log), self.page_size, after)
                rendered = self._rendered.get(key)
            if rendered is not None:
                return Reply(200, rendered)
        return Reply(200, self._snapshot_body(snapshot, table, after))

    def _snapshot_body(self, snapshot: int, table: str | None, after: str | None) -> Any:
        """The `list_snapshot` answer: the page after the cursor `after`."""
        items, keys, ts_of = self._snapshot_items(snapshot, table)
        start = 0 if after is None else bisect.bisect_right(keys, after)
        page = items[start : start + self.page_size]
        more = start + self.page_size < len(items)
        values = [{**d, "_table": t, "_ts": ts_of[(t, i)]} for t, i, d in page]
        cursor = _page_key(page[-1][0], page[-1][1], table) if page else after
        return {"values": values, "cursor": cursor, "hasMore": more, "snapshot": snapshot}

    def _snapshot_items(
        self, snapshot: int, table: str | None
    ) -> tuple[list[tuple[str, str, dict[str, Any]]], list[Any], dict[tuple[str, str], int]]:
        """A snapshot's documents in page order, their page keys, and their versions' `_ts`
        (kept per snapshot and table while the log does not grow, for every table at once:
        a page costs its size, as a real deployment's does, not the table's, however many
        tables are walked at the same time)."""
        with self._lock:
            key = (snapshot, table, len(self._log))
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        state, versions = self._state_at(snapshot, key[2])
        items = sorted(
            (t, i, d) for t, docs in state.items() if table in (None, t) for i, d in docs.items()
        )
        found = (items, [_page_key(t, i, table) for t, i, _ in items], versions)
        self._keep(key, found)
        return found

    def _state_at(
        self, snapshot: int, log_length: int
    ) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[tuple[str, str], int]]:
        """The state and versions' `_ts` as of `snapshot`, worked out once for all its tables
        (a deployment reads its snapshot; it does not replay its history for every table)."""
        key = (snapshot, "\x00state", log_length)
        with self._lock:
            cached = self._cache.get(key)
        if cached is None:
            cached = (self.state(snapshot), self._versions(snapshot))
            self._keep(key, cached)
        return cached

    def _keep(self, key: tuple[int, str | None, int], value: Any) -> None:
        """Cache `value` under `key`, dropping what belongs to another snapshot or log length."""
        with self._lock:
            kept = {k: v for k, v in self._cache.items() if k[0] == key[0] and k[2] == key[2]}
            self._cache = {**kept, key: value}

    def _versions(self, at: int) -> dict[tuple[str, str], int]:
        with self._lock:
            log = list(self._log)
        ts: dict[tuple[str, str], int] = {}
        for c in log:
            if c.ts > at:
                break
            for table, doc_id, _ in c.writes:
                ts[(table, doc_id)] = c.ts
        return ts

    def _deltas(self, params: dict[str, str]) -> Reply:
        try:
            cursor = int(params["cursor"])
        except (KeyError, ValueError):
            return Reply(400, {"code": "BadCursor", "message": "cursor is required"})
        if cursor < self.deltas_kept_after:
            message = f"cursor {cursor} is outside the retention window"
            return Reply(400, {"code": "CursorOutOfRetention", "message": message})
        table = params.get("tableName")
        with self._lock:
            log = [c for c in self._log if c.ts > cursor]
        values: list[dict[str, Any]] = []
        served = cursor
        for commit in log:
            if values and len(values) >= self.delta_page_size:
                break
            for t, doc_id, doc in commit.writes:
                if table not in (None, t):
                    continue
                if doc is None:
                    values.append({"_id": doc_id, "_table": t, "_ts": commit.ts, "_deleted": True})
                else:
                    values.append({**doc, "_table": t, "_ts": commit.ts})
            served = commit.ts
        has_more = any(c.ts > served for c in log)
        return Reply(200, {"values": values, "cursor": served, "hasMore": has_more})


def _page_key(table: str, doc_id: str, filtered: str | None) -> str:
    return doc_id if filtered is not None else f"{table}\x00{doc_id}"
