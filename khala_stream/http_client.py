"""What the HTTP clients of outside services (WorkOS, a live Khala deployment) share: one
lifecycle (opened once with `async with`, never reopened), one reading of `Retry-After`, and one
backoff between attempts. What each service's answers mean stays with its client."""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    import httpx

__all__ = ["Backoff", "HttpSession", "Retryable", "parse_retry_after"]


class Retryable(Exception):
    """A response or transport failure worth another attempt (429, 5xx, timeout, transport)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        self.reason = reason
        self.retry_after = retry_after
        super().__init__(reason)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or HTTP date), or None."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if seconds == seconds else None  # NaN is no answer
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=UTC)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with full jitter (spreads concurrent workers' retries)."""

    base_s: float
    cap_s: float

    def capped(self, retry_after: float) -> float:
        """A server's Retry-After, at most four caps: a hostile or buggy one must not stall
        the work for hours."""
        return min(retry_after, self.cap_s * 4)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before the attempt after `attempt` (1 for the first)."""
        if retry_after is not None:
            return self.capped(retry_after)
        return random.uniform(0.0, min(self.cap_s, self.base_s * 2 ** (attempt - 1)))


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class HttpSession:
    """An httpx client for one service, opened by `async with` once; redirects are not
    followed. Subclasses name the service in `name` and never put a secret in `repr`."""

    name = "HttpSession"

    def __init__(
        self,
        *,
        base_url: str,
        headers: Mapping[str, str],
        timeout_s: float,
        max_connections: int = 100,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._headers = dict(headers)
        self._timeout_s = timeout_s
        self._max_connections = max_connections
        self._http: httpx.AsyncClient | None = None
        self._state = _State.NEW

    def __repr__(self) -> str:  # the headers hold the secret: never shown
        return f"{self.name}(base_url={self._base_url!r}, state={self._state.value})"

    async def __aenter__(self) -> Self:
        if self._state is not _State.NEW:
            raise RuntimeError(f"{self.name} cannot be opened when it is {self._state.value}")
        import httpx  # only the commands that talk to a service pay for loading it

        self._http = httpx.AsyncClient(
            base_url=self._base_url,
            headers=self._headers,
            timeout=self._timeout_s,
            limits=httpx.Limits(max_connections=self._max_connections),
            follow_redirects=False,
        )
        self._state = _State.OPEN
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._state = _State.CLOSED
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def _open_http(self) -> httpx.AsyncClient:
        """The client, while open; RuntimeError otherwise."""
        if self._http is None or self._state is not _State.OPEN:
            raise RuntimeError(f"{self.name} is {self._state.value}; use it inside `async with`")
        return self._http
