"""What the fakes of outside services share: a threaded HTTP/1.1 server on 127.0.0.1 (a free
port), started and stopped as a context manager, handing every GET to `_handle`."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self


def send_reply(
    handler: BaseHTTPRequestHandler, status: int, payload: bytes, headers: Mapping[str, str]
) -> None:
    """A JSON answer: status, its length, the reply's own headers, then the body."""
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(payload)))
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(payload)
    handler.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a handler asleep on a scripted delay must not block shutdown
    request_queue_size = 128  # the default backlog of 5 drops connects under concurrency tests


class FakeHttpServer:
    """Subclasses answer in `_handle` and may wake delayed handlers in `_before_shutdown`."""

    name = "fake"

    def __init__(self) -> None:
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, f"use {type(self).__name__} as a context manager"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        raise NotImplementedError

    def _before_shutdown(self) -> None:
        """Called first on exit, while handlers may still be running."""

    def __enter__(self) -> Self:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                fake._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep pytest output quiet

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            # a short poll keeps shutdown (and so each test's teardown) quick
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name=self.name,
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._before_shutdown()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
