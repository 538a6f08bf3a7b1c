"""An HTTP client of a live Khala deployment's streaming export API (`producers/live_api.py`).

    async with LiveClient(base_url=url, deploy_key=key, deadline_s=120) as client:
        tables = await client.tables()                      # checks the key first
        page = await client.snapshot_page("users", snapshot=s, cursor=c)
        changes = await client.deltas(cursor)

Outcomes of one request, decided here and nowhere else:

    200 with the documented shape   -> the parsed page
    200 of another shape            -> SourceAnswerError naming the endpoint (not retried)
    401 / 403                       -> DeployKeyError (exit 2)
    a 4xx saying the snapshot is
    no longer served                -> SnapshotExpired (the caller restarts the snapshot)
    a 4xx saying the delta cursor is
    older than the changes kept     -> CursorExpired (the caller follows from a new snapshot)
    429 / 5xx / timeout / transport -> retried with capped exponential backoff and jitter,
                                       honouring Retry-After, until `deadline_s` has passed
                                       since the first failure; then SourceUnreachable (exit 1)
    any other status                -> SourceAnswerError (not retried)

The deploy key never reaches a log line, an exception message or a repr.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson

from khala_stream import metrics
from khala_stream.errors import DeployKeyError, SourceAnswerError, SourceUnreachable
from khala_stream.http_client import Backoff, HttpSession, Retryable, parse_retry_after
from producers import live_api
from producers.live_api import Cursor, DeltaPage, SnapshotPage

logger = logging.getLogger(__name__)


class SnapshotExpired(Exception):
    """The deployment no longer serves the snapshot asked for: walk a new one."""

    def __init__(self, snapshot: Cursor | None) -> None:
        self.snapshot = snapshot
        super().__init__(f"snapshot {snapshot!r} is no longer served")


class CursorExpired(Exception):
    """The deployment no longer keeps the changes after this delta cursor: take a new
    snapshot and follow from there."""

    def __init__(self, cursor: Cursor) -> None:
        self.cursor = cursor
        super().__init__(f"changes after cursor {cursor!r} are no longer kept")


class LiveClient(HttpSession):
    """Reads one deployment. Use as `async with`; a client cannot be reopened."""

    name = "LiveClient"

    def __init__(
        self,
        *,
        base_url: str,
        deploy_key: str,
        deadline_s: float = 120.0,
        timeout_s: float = 30.0,
        backoff_base_s: float = 0.25,
        backoff_cap_s: float = 8.0,
    ) -> None:
        if not deploy_key.strip():
            raise DeployKeyError("KHALA_DEPLOY_KEY is not set")
        super().__init__(
            base_url=base_url,
            headers={"Authorization": f"Convex {deploy_key.strip()}", "Accept": "application/json"},
            timeout_s=timeout_s,
        )
        self._deadline_s = deadline_s
        self._backoff = Backoff(backoff_base_s, backoff_cap_s)
        self.retries = 0
        """Requests sent again after a 429, 5xx or transport failure."""

    async def tables(self) -> list[str]:
        """The deployment's tables (`json_schemas`); the first request, so a refused key is
        DeployKeyError before anything else happens."""
        body = await self._get(live_api.JSON_SCHEMAS, live_api.schemas_params())
        return live_api.parse_schemas(body)

    async def snapshot_page(
        self, table: str | None, *, snapshot: Cursor | None, cursor: Cursor | None
    ) -> SnapshotPage:
        """One page of a snapshot walk; SnapshotExpired when `snapshot` is no longer served."""
        params = live_api.snapshot_params(table, snapshot, cursor)
        return live_api.parse_snapshot(
            await self._get(live_api.LIST_SNAPSHOT, params, snapshot=snapshot)
        )

    async def deltas(self, cursor: Cursor) -> DeltaPage:
        """The changes after `cursor` (every table, whole transactions); CursorExpired when
        the deployment no longer keeps them."""
        body = await self._get(live_api.DOCUMENT_DELTAS, live_api.deltas_params(cursor))
        return live_api.parse_deltas(body)

    async def _get(
        self, endpoint: str, params: dict[str, str], *, snapshot: Cursor | None = None
    ) -> Any:
        """GET until a final answer: the JSON body of a 200; raises as the module says."""
        failing_since: float | None = None
        attempt = 0
        while True:
            attempt += 1
            try:
                body = await self._attempt(endpoint, params, snapshot)
                metrics.source_request(endpoint, "ok")
                return body
            except Retryable as exc:
                now = time.monotonic()
                failing_since = now if failing_since is None else failing_since
                waited = now - failing_since
                if waited >= self._deadline_s:
                    raise SourceUnreachable(endpoint, exc.reason, waited) from None
                delay = self._backoff.delay(attempt, exc.retry_after)
                delay = min(delay, max(0.0, self._deadline_s - waited))
                logger.info(
                    "Khala deployment: endpoint=%s reason=%s attempt=%d retry_in=%.2f",
                    endpoint,
                    exc.reason,
                    attempt,
                    delay,
                )
                self.retries += 1
                metrics.source_request(endpoint, "retried")
                await asyncio.sleep(delay)

    async def _attempt(self, endpoint: str, params: dict[str, str], snapshot: Cursor | None) -> Any:
        import httpx

        http = self._open_http()
        try:
            response = await http.get(endpoint, params=params)
        except httpx.TimeoutException as exc:
            raise Retryable(f"timeout ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise Retryable(f"transport error ({type(exc).__name__})") from exc
        status = response.status_code
        if status == 429 or status >= 500:
            raise Retryable(
                f"HTTP {status}", parse_retry_after(response.headers.get("Retry-After"))
            )
        body = _json(response.content)
        if status in (401, 403):
            raise DeployKeyError(f"the deploy key was refused (HTTP {status} from GET {endpoint})")
        if status != 200:
            if endpoint == live_api.LIST_SNAPSHOT and live_api.snapshot_expired(status, body):
                raise SnapshotExpired(snapshot)
            if endpoint == live_api.DOCUMENT_DELTAS and live_api.cursor_expired(status, body):
                raise CursorExpired(params["cursor"])
            code = body.get("code") if isinstance(body, dict) else None
            suffix = f" ({str(code)[:80]})" if isinstance(code, str) else ""
            raise SourceAnswerError(endpoint, f"HTTP {status}{suffix}")
        if body is _NOT_JSON:
            raise SourceAnswerError(endpoint, "a body that is not JSON")
        return body


_NOT_JSON: Any = object()


def _json(content: bytes) -> Any:
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return _NOT_JSON
