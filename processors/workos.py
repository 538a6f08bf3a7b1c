"""WorkOS user look-ups for `--resolve-workos-users` (SPEC §3.5, §8.10; reference §4.5).

`WorkosClient` is an async context manager that owns one `httpx.AsyncClient`:

    async with WorkosClient(api_key=key, base_url=url) as client:
        await client.check_key()                 # once, before anything is written
        users = await client.get_users(ids)      # {id: WorkosUser | None}

Outcomes of one look-up, decided here and nowhere else:

    200 with a valid email        -> WorkosUser            (cacheable)
    200 without a valid email     -> None                  (cacheable negative)
    404                           -> None                  (cacheable negative)
    401 / 403                     -> WorkosAuthError       (the run stops, resumable)
    429 / 5xx / timeout /
    connection error / bad JSON   -> retried; after `max_attempts` -> None, counted as a failure,
                                     NOT cacheable so the next run tries again
    any other status              -> None, counted as a failure, not retried, not cacheable

The API key and the email addresses never reach a log line or an exception message: logs
carry user ids, statuses and exception class names only.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from email_validator import EmailNotValidError, validate_email

from khala_stream import metrics
from khala_stream.errors import WorkosAuthError, WorkosKeyError, WorkosUnreachable
from khala_stream.http_client import Backoff, HttpSession, Retryable, parse_retry_after

if TYPE_CHECKING:
    # Imported where a client opens: every stage imports this module, few call WorkOS, and
    # httpx takes about a tenth of a second to import.
    import httpx

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.workos.com"

_USERS_PATH = "/user_management/users"


@dataclass(frozen=True, slots=True)
class WorkosUser:
    """What a WorkOS user contributes to identity resolution (reference §4.5)."""

    email: str | None
    name: str | None
    avatar: str | None


@dataclass(frozen=True, slots=True)
class LookupStats:
    """Counters of one client: HTTP requests sent, answers served from the cache,
    requests that were retries, and look-ups that ended unresolved by failure."""

    calls: int
    cache_hits: int
    retries: int
    failures: int


@dataclass(frozen=True, slots=True)
class LookupResult:
    """One look-up's answer. `failed` marks an answer that is not WorkOS's word on the user
    (retries exhausted, unexpected status): it must not be cached."""

    user: WorkosUser | None
    failed: bool = False


def _is_valid_email(value: str) -> bool:
    """SPEC §3.11: email-validator 2.x with deliverability checks off decides."""
    try:
        validate_email(value, check_deliverability=False)
    except EmailNotValidError:
        return False
    return True


def user_from_body(body: Mapping[str, Any]) -> WorkosUser | None:
    """Map a WorkOS user object to a `WorkosUser`, or None when it has no valid email.

    Both camelCase (SDK) and snake_case (raw API) keys are accepted (reference §4.5).
    """
    raw_email = body.get("email")
    if not isinstance(raw_email, str):
        return None
    # Stored lower-cased and trimmed as given, not normalised further (SPEC §8.5).
    email = raw_email.strip().lower()
    if not email or not _is_valid_email(email):
        return None
    parts = [
        _text(body, "firstName", "first_name"),
        _text(body, "lastName", "last_name"),
    ]
    name = " ".join(part for part in parts if part) or None
    avatar = _text(body, "profilePictureUrl", "profile_picture_url")
    return WorkosUser(email=email, name=name, avatar=avatar)


def _text(body: Mapping[str, Any], *keys: str) -> str | None:
    """The first non-blank string among `keys`, trimmed."""
    for key in keys:
        value = body.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


class _RateLimiter:
    """Token bucket of capacity one: request starts at least 1/rate seconds apart."""

    def __init__(self, rate_per_second: float) -> None:
        self._interval = 1.0 / rate_per_second
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            loop = asyncio.get_running_loop()
            now = loop.time()
            wait = self._next - now
            if wait > 0:
                await asyncio.sleep(wait)
            self._next = max(now, self._next) + self._interval


def _outcome(status: int) -> metrics.WorkosOutcome:
    if status == 200:
        return "ok"
    if status == 404:
        return "not_found"
    return "retryable" if status == 429 or status >= 500 else "failed"


class WorkosClient(HttpSession):
    """Looks WorkOS users up by id: bounded concurrency, optional rate limit, retries.

    Use as `async with`; a client is opened once and cannot be reused after closing.
    """

    name = "WorkosClient"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        concurrency: int = 8,
        max_attempts: int = 5,
        timeout: float = 10.0,
        backoff_base: float = 0.5,
        backoff_cap: float = 8.0,
        rate_per_second: float | None = None,
    ) -> None:
        if not api_key or not api_key.strip():
            raise WorkosKeyError("WORKOS_API_KEY is not set")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        if timeout <= 0 or backoff_base < 0 or backoff_cap < 0:
            raise ValueError("timeout must be positive and backoff values non-negative")
        if rate_per_second is not None and rate_per_second <= 0:
            raise ValueError(f"rate_per_second must be positive, got {rate_per_second}")
        super().__init__(
            base_url=base_url,
            headers={"Authorization": f"Bearer {api_key.strip()}", "Accept": "application/json"},
            timeout_s=timeout,
            max_connections=concurrency,
        )
        self._max_attempts = max_attempts
        self._backoff = Backoff(backoff_base, backoff_cap)
        self._limiter = _RateLimiter(rate_per_second) if rate_per_second is not None else None
        self._semaphore = asyncio.Semaphore(concurrency)
        # A 429 throttles the whole key, not one user: every request waits until this
        # loop time before starting.
        self._paused_until = 0.0
        self._calls = 0
        self._cache_hits = 0
        self._retries = 0
        self._failures = 0

    @property
    def stats(self) -> LookupStats:
        return LookupStats(
            calls=self._calls,
            cache_hits=self._cache_hits,
            retries=self._retries,
            failures=self._failures,
        )

    def note_cache_hits(self, count: int) -> None:
        """Called by the cache layer so `stats` covers answers that needed no request."""
        self._cache_hits += count

    async def check_key(self) -> None:
        """One request before any write (SPEC §8.10).

        Raises WorkosKeyError (exit 2) when the key is refused or WorkOS answers something
        unexpected, WorkosUnreachable (exit 1) when it cannot be reached or keeps failing after
        retries.
        """
        try:
            response = await self._request_with_retries(f"{_USERS_PATH}?limit=1", label="key check")
        except Retryable as exc:
            raise WorkosUnreachable(
                f"could not check the API key at {self._base_url}: {exc.reason} "
                f"after {self._max_attempts} attempts"
            ) from None
        if response.status_code in (401, 403):
            raise WorkosKeyError(f"the API key was refused (HTTP {response.status_code})")
        if response.status_code != 200:
            raise WorkosKeyError(
                f"unexpected HTTP {response.status_code} from GET {_USERS_PATH} "
                f"at {self._base_url}; is WORKOS_BASE_URL right?"
            )

    async def get_user(self, workos_id: str) -> WorkosUser | None:
        """The user, or None when unresolved. Raises WorkosAuthError on 401/403."""
        return (await self.lookup(workos_id)).user

    async def get_users(self, ids: Sequence[str]) -> dict[str, WorkosUser | None]:
        """Look many ids up concurrently (bounded). Raises WorkosAuthError on 401/403."""
        return {key: result.user for key, result in (await self.lookup_many(ids)).items()}

    async def lookup_many(self, ids: Iterable[str]) -> dict[str, LookupResult]:
        """Like `get_users`, but says which answers are failures (not to be cached)."""
        unique = list(dict.fromkeys(ids))
        results: dict[str, LookupResult] = {}
        pending = iter(unique)

        async def worker() -> None:
            # Workers pull ids from one iterator, so 100k ids never means 100k tasks.
            for workos_id in pending:
                results[workos_id] = await self.lookup(workos_id)

        workers = [
            asyncio.create_task(worker()) for _ in range(min(self._max_connections, len(unique)))
        ]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            # A 401 (or a cancellation) stops every other look-up at once.
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            raise
        return {workos_id: results[workos_id] for workos_id in unique}

    async def lookup(self, workos_id: str) -> LookupResult:
        """Look one id up. Raises WorkosAuthError on 401/403."""
        trimmed = workos_id.strip()
        if not trimmed:
            return LookupResult(None)
        try:
            response = await self._request_with_retries(
                f"{_USERS_PATH}/{quote(trimmed, safe='')}", label=trimmed, parse_json=True
            )
        except Retryable as exc:
            self._failures += 1
            logger.warning(
                "WorkOS lookup unresolved: workos_id=%s attempts=%d reason=%s",
                trimmed,
                self._max_attempts,
                exc.reason,
            )
            return LookupResult(None, failed=True)
        status = response.status_code
        if status == 200:
            body = response.json()
            user = user_from_body(body)
            if user is None:
                logger.info("WorkOS user has no valid email: workos_id=%s", trimmed)
            return LookupResult(user)
        if status == 404:
            return LookupResult(None)
        if status in (401, 403):
            raise WorkosAuthError(status)
        self._failures += 1
        logger.warning(
            "WorkOS lookup unresolved: workos_id=%s status=%d (not retried)", trimmed, status
        )
        return LookupResult(None, failed=True)

    async def _request_with_retries(
        self, path: str, *, label: str, parse_json: bool = False
    ) -> httpx.Response:
        """GET `path` until it gives a final answer; raises Retryable when attempts run out.

        Only 429, 5xx, timeouts, transport errors and (with `parse_json`) a 200 whose body
        is not a JSON object are retried; every other status is returned to the caller.
        """
        for attempt in range(1, self._max_attempts + 1):
            if attempt > 1:
                self._retries += 1
                metrics.workos_retry()
            try:
                return await self._attempt(path, parse_json=parse_json)
            except Retryable as exc:
                if attempt == self._max_attempts:
                    raise
                delay = self._backoff.delay(attempt, exc.retry_after)
                logger.debug(
                    "WorkOS retry: target=%s attempt=%d reason=%s delay=%.3f",
                    label,
                    attempt,
                    exc.reason,
                    delay,
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable: the loop returns or raises")

    async def _attempt(self, path: str, *, parse_json: bool) -> httpx.Response:
        import httpx  # already loaded by __aenter__

        http = self._open_http()
        async with self._semaphore:
            await self._wait_for_turn()
            self._calls += 1
            try:
                response = await http.get(path)
            except httpx.TimeoutException as exc:
                metrics.workos_request("retryable")
                raise Retryable(f"timeout ({type(exc).__name__})") from exc
            except httpx.TransportError as exc:
                metrics.workos_request("retryable")
                raise Retryable(f"transport error ({type(exc).__name__})") from exc
        status = response.status_code
        metrics.workos_request(_outcome(status))
        if status == 429 or status >= 500:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if status == 429 and retry_after is not None:
                loop = asyncio.get_running_loop()
                self._paused_until = max(
                    self._paused_until, loop.time() + self._backoff.capped(retry_after)
                )
            raise Retryable(f"HTTP {status}", retry_after)
        if parse_json and status == 200:
            try:
                body = response.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise Retryable("malformed JSON") from None
            if not isinstance(body, dict):
                raise Retryable("JSON body is not an object")
        return response

    async def _wait_for_turn(self) -> None:
        loop = asyncio.get_running_loop()
        pause = self._paused_until - loop.time()
        if pause > 0:
            await asyncio.sleep(pause)
        if self._limiter is not None:
            await self._limiter.acquire()
