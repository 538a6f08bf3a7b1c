"""A scriptable WorkOS API on 127.0.0.1, served by a real HTTP server in a thread.

    with FakeWorkos(api_key="sk_test") as fake:
        fake.users["user_1"] = {"email": "a@example.com", "first_name": "Ada"}
        fake.script(user_path("user_2"), Reply(429, headers={"Retry-After": "1"}))
        client = WorkosClient(api_key="sk_test", base_url=fake.base_url)

Resolution of one request, in order: wrong or missing bearer key -> 401; the next scripted
reply queued for the path; `GET /user_management/users` -> an empty list; a known user -> 200
with its body; else 404. Every request is recorded (path, query, headers, start and end on
`time.monotonic()`, start on `time.time()`), and the most requests in flight at once is kept.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from tests.fakes.http_fake import FakeHttpServer, send_reply

USERS_PATH = "/user_management/users"


def user_path(workos_id: str) -> str:
    return f"{USERS_PATH}/{quote(workos_id, safe='')}"


@dataclass(frozen=True)
class Reply:
    """One scripted answer. `body` may be a JSON-able value, or str/bytes sent verbatim
    (for malformed JSON). `delay` is slept before answering; `drop` closes the connection
    without any answer."""

    status: int = 200
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    started: float
    finished: float
    wall: float  # time.time() at the start, to compare with HTTP dates


class FakeWorkos(FakeHttpServer):
    name = "fake-workos"

    def __init__(self, *, api_key: str = "sk_test_fake", latency: float = 0.0) -> None:
        super().__init__()
        self.api_key = api_key
        self.latency = latency  # slept by every request, to make concurrency observable
        self.users: dict[str, Any] = {}
        self.requests: list[RecordedRequest] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._scripts: dict[str, deque[Reply]] = defaultdict(deque)
        self._lock = threading.Lock()
        self._closing = threading.Event()

    # ------------------------------------------------------------------ scripting

    def script(self, path: str, *replies: Reply) -> None:
        """Queue replies for `path`; they are used before the default behaviour."""
        with self._lock:
            self._scripts[path].extend(replies)

    def requests_to(self, path: str) -> list[RecordedRequest]:
        return [r for r in self.settled_requests() if r.path == path]

    def settled_requests(self, wait_s: float = 20.0) -> list[RecordedRequest]:
        """Every request, once none is in flight (for at most `wait_s`). A request is recorded
        after its reply is sent: the client may have its answer before the server thread has
        written the record, or have given up on a reply that is still being delayed."""
        deadline = time.monotonic() + wait_s
        while True:
            with self._lock:
                if self._in_flight == 0 or time.monotonic() > deadline:
                    return list(self.requests)
            time.sleep(0.01)

    # ------------------------------------------------------------------ lifecycle

    def _before_shutdown(self) -> None:
        self._closing.set()  # wakes handlers sleeping on a delay

    # ------------------------------------------------------------------ serving

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        started = time.monotonic()
        wall = time.time()
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        split = urlsplit(handler.path)
        try:
            reply = self._choose(split.path, handler.headers.get("Authorization"))
            pause = self.latency + reply.delay
            if pause > 0:
                self._closing.wait(pause)
            if reply.drop:
                handler.close_connection = True
                return
            self._send(handler, reply)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test): nothing to answer
        finally:
            with self._lock:
                self._in_flight -= 1
                self.requests.append(
                    RecordedRequest(
                        method=handler.command,
                        path=split.path,
                        query=split.query,
                        headers=dict(handler.headers.items()),
                        started=started,
                        finished=time.monotonic(),
                        wall=wall,
                    )
                )

    def _choose(self, path: str, authorization: str | None) -> Reply:
        if authorization != f"Bearer {self.api_key}":
            return Reply(401, {"code": "unauthorized", "message": "Unauthorized"})
        with self._lock:
            queue = self._scripts.get(path)
            if queue:
                return queue.popleft()
        if path == USERS_PATH:
            return Reply(200, {"data": [], "list_metadata": {"before": None, "after": None}})
        prefix = USERS_PATH + "/"
        if path.startswith(prefix):
            body = self.users.get(unquote(path[len(prefix) :]))
            if body is not None:
                return Reply(200, body)
        return Reply(404, {"code": "entity_not_found", "message": "Not found"})

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, reply: Reply) -> None:
        if isinstance(reply.body, bytes):
            payload = reply.body
        elif isinstance(reply.body, str):
            payload = reply.body.encode()
        elif reply.body is None:
            payload = b""
        else:
            payload = json.dumps(reply.body).encode()
        send_reply(handler, reply.status, payload, reply.headers)
