"""WorkOS look-ups against a real HTTP server on 127.0.0.1 (SPEC §3.5, §8.10), and the
cross-run cache on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from email.utils import formatdate
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from khala_stream.errors import WorkosAuthError, WorkosKeyError, WorkosUnreachable
from khala_stream.http_client import parse_retry_after
from processors.workos import LookupStats, WorkosClient, WorkosUser
from processors.workos_cache import (
    CACHE_TABLE_NAME,
    MemoryWorkosCache,
    SqlWorkosCache,
    resolve_with_cache,
)
from tests.fakes.workos_server import USERS_PATH, FakeWorkos, Reply, user_path

KEY = "sk_test_9f8e7d6c5b4a"
T = TypeVar("T")

ADA = {
    "object": "user",
    "id": "user_ada",
    "email": "  Ada.Lovelace@Example.COM ",
    "first_name": "Ada",
    "last_name": "Lovelace",
    "profile_picture_url": "https://img.example.com/ada.png",
}
GRACE = {
    "object": "user",
    "id": "user_grace",
    "email": "grace@example.com",
    "firstName": " Grace ",
    "lastName": "   ",
    "profilePictureUrl": None,
}


@pytest.fixture
def fake() -> Iterator[FakeWorkos]:
    with FakeWorkos(api_key=KEY) as server:
        yield server


def client_for(fake: FakeWorkos, **overrides: Any) -> WorkosClient:
    # Small backoff values keep the suite fast; the behaviour is the same.
    options: dict[str, Any] = {
        "api_key": KEY,
        "base_url": fake.base_url,
        "backoff_base": 0.01,
        "backoff_cap": 0.05,
        "timeout": 2.0,
    }
    options.update(overrides)
    return WorkosClient(**options)


def with_client(
    fake: FakeWorkos, action: Callable[[WorkosClient], Awaitable[T]], **overrides: Any
) -> tuple[T, LookupStats]:
    async def main() -> tuple[T, LookupStats]:
        async with client_for(fake, **overrides) as client:
            return await action(client), client.stats

    return asyncio.run(main())


def gap(fake: FakeWorkos, path: str) -> float:
    first, second = fake.requests_to(path)[:2]
    return second.started - first.started


# --------------------------------------------------------------------------- answers


def test_snake_case_body_is_mapped_and_key_sent_as_bearer(fake: FakeWorkos) -> None:
    fake.users["user_ada"] = ADA
    user, stats = with_client(fake, lambda c: c.get_user("user_ada"))
    assert user == WorkosUser(
        email="ada.lovelace@example.com",
        name="Ada Lovelace",
        avatar="https://img.example.com/ada.png",
    )
    (request,) = fake.settled_requests()
    assert request.path == user_path("user_ada")
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert stats == LookupStats(calls=1, cache_hits=0, retries=0, failures=0)


def test_camel_case_body_drops_blank_name_parts(fake: FakeWorkos) -> None:
    fake.users["user_grace"] = GRACE
    fake.users["user_anon"] = {"email": "anon@example.com", "firstName": "", "last_name": None}
    users, _ = with_client(fake, lambda c: c.get_users(["user_grace", "user_anon"]))
    assert users == {
        "user_grace": WorkosUser(email="grace@example.com", name="Grace", avatar=None),
        "user_anon": WorkosUser(email="anon@example.com", name=None, avatar=None),
    }


@pytest.mark.parametrize(
    "body",
    [
        {"email": "not-an-email", "first_name": "X"},
        {"email": "   ", "first_name": "X"},
        {"email": None},
        {"email": 42},
        {"first_name": "No", "last_name": "Email"},
        {"email": "someone@localhost"},
    ],
    ids=["invalid", "blank", "null", "number", "missing", "special-use-domain"],
)
def test_answer_without_a_valid_email_is_unresolved(fake: FakeWorkos, body: Any) -> None:
    fake.users["user_x"] = body
    user, stats = with_client(fake, lambda c: c.get_user("user_x"))
    assert user is None
    assert stats.failures == 0  # WorkOS answered: a definite negative, not a failure


def test_404_is_unresolved_without_retry(fake: FakeWorkos) -> None:
    result, stats = with_client(fake, lambda c: c.lookup("user_missing"))
    assert result.user is None
    assert not result.failed
    assert stats == LookupStats(calls=1, cache_hits=0, retries=0, failures=0)


def test_user_id_is_trimmed_and_path_escaped(fake: FakeWorkos) -> None:
    fake.users["user_a/b"] = {"email": "ab@example.com"}
    user, _ = with_client(fake, lambda c: c.get_user("  user_a/b "))
    assert user is not None
    assert fake.settled_requests()[0].path == "/user_management/users/user_a%2Fb"
    blank, stats = with_client(fake, lambda c: c.get_user("   "))
    assert blank is None
    assert stats.calls == 0


# --------------------------------------------------------------------------- retries


def test_429_retry_after_seconds_is_honoured(fake: FakeWorkos) -> None:
    fake.users["user_ada"] = ADA
    fake.script(user_path("user_ada"), Reply(429, {}, headers={"Retry-After": "1"}))
    # backoff alone would wait at most 0.05 s; only Retry-After explains a 1 s gap
    user, stats = with_client(fake, lambda c: c.get_user("user_ada"), backoff_cap=0.5)
    assert user is not None
    assert gap(fake, user_path("user_ada")) >= 1.0
    assert stats.retries == 1


def test_429_retry_after_http_date_is_honoured(fake: FakeWorkos) -> None:
    fake.users["user_ada"] = ADA
    target = int(time.time()) + 2  # an HTTP date has whole seconds: the wait is 1..2 s
    fake.script(
        user_path("user_ada"),
        Reply(429, {}, headers={"Retry-After": formatdate(target, usegmt=True)}),
    )
    user, _ = with_client(fake, lambda c: c.get_user("user_ada"), backoff_cap=1.0)
    assert user is not None
    first, second = fake.requests_to(user_path("user_ada"))
    assert second.wall >= target - 0.01  # not asked again before the date WorkOS gave
    assert second.started - first.started >= 0.5


def test_retry_after_is_capped(fake: FakeWorkos) -> None:
    fake.users["user_ada"] = ADA
    fake.script(user_path("user_ada"), Reply(429, {}, headers={"Retry-After": "3600"}))
    user, _ = with_client(fake, lambda c: c.get_user("user_ada"), backoff_cap=0.05)
    assert user is not None
    assert 0.2 <= gap(fake, user_path("user_ada")) < 2.0  # capped at backoff_cap * 4


def test_parse_retry_after_forms() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("3", now=now) == 3.0
    assert parse_retry_after(formatdate(now + 7, usegmt=True), now=now) == 7.0
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("-5", now=now) == 0.0
    assert parse_retry_after("soon", now=now) is None
    assert parse_retry_after(None) is None


def test_429_without_retry_after_backs_off_and_succeeds(fake: FakeWorkos) -> None:
    fake.users["user_ada"] = ADA
    fake.script(user_path("user_ada"), Reply(429, {}), Reply(429, {}))
    user, stats = with_client(fake, lambda c: c.get_user("user_ada"))
    assert user is not None
    assert len(fake.requests_to(user_path("user_ada"))) == 3
    assert stats == LookupStats(calls=3, cache_hits=0, retries=2, failures=0)


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_then_success(fake: FakeWorkos, status: int) -> None:
    fake.users["user_ada"] = ADA
    fake.script(user_path("user_ada"), Reply(status, {"message": "boom"}))
    user, stats = with_client(fake, lambda c: c.get_user("user_ada"))
    assert user is not None and user.email == "ada.lovelace@example.com"
    assert stats.retries == 1


def test_timeouts_then_success(fake: FakeWorkos) -> None:
    fake.users["user_ada"] = ADA
    fake.script(user_path("user_ada"), Reply(delay=1.5), Reply(delay=1.5))
    started = time.monotonic()
    user, stats = with_client(fake, lambda c: c.get_user("user_ada"), timeout=0.2)
    assert user is not None
    assert stats.calls == 3 and stats.retries == 2
    assert time.monotonic() - started < 1.5  # the client gave up on the slow answers


def test_dropped_connection_then_success(fake: FakeWorkos) -> None:
    fake.users["user_ada"] = ADA
    fake.script(user_path("user_ada"), Reply(drop=True))
    user, stats = with_client(fake, lambda c: c.get_user("user_ada"))
    assert user is not None
    assert stats.retries == 1


def test_malformed_json_is_retried(fake: FakeWorkos) -> None:
    fake.users["user_ada"] = ADA
    fake.script(user_path("user_ada"), Reply(200, '{"email": "ada@'), Reply(200, "[1, 2]"))
    user, stats = with_client(fake, lambda c: c.get_user("user_ada"))
    assert user is not None
    assert stats == LookupStats(calls=3, cache_hits=0, retries=2, failures=0)


def test_exhausted_retries_are_unresolved_and_counted(fake: FakeWorkos) -> None:
    fake.users["user_ada"] = ADA
    fake.script(user_path("user_ada"), *[Reply(503, {}) for _ in range(5)])
    fake.users["user_grace"] = GRACE
    results, stats = with_client(fake, lambda c: c.lookup_many(["user_ada", "user_grace"]))
    assert results["user_ada"].user is None and results["user_ada"].failed
    assert results["user_grace"].user is not None and not results["user_grace"].failed
    assert len(fake.requests_to(user_path("user_ada"))) == 5
    assert stats == LookupStats(calls=6, cache_hits=0, retries=4, failures=1)


def test_unexpected_status_is_a_failure_without_retry(fake: FakeWorkos) -> None:
    fake.script(user_path("user_odd"), Reply(422, {"message": "bad id"}))
    result, stats = with_client(fake, lambda c: c.lookup("user_odd"))
    assert result.failed and result.user is None
    assert stats == LookupStats(calls=1, cache_hits=0, retries=0, failures=1)


# --------------------------------------------------------------------------- the key


def test_check_key_accepts_a_good_key(fake: FakeWorkos) -> None:
    with_client(fake, lambda c: c.check_key())
    (request,) = fake.settled_requests()
    assert (request.path, request.query) == (USERS_PATH, "limit=1")


def test_check_key_refused_is_a_usage_error(fake: FakeWorkos) -> None:
    with pytest.raises(WorkosKeyError) as caught:
        with_client(fake, lambda c: c.check_key(), api_key="sk_test_wrong")
    assert caught.value.reason == "the API key was refused (HTTP 401)"
    assert caught.value.exit_code == 2
    fake.script(USERS_PATH, Reply(403, {}))
    with pytest.raises(WorkosKeyError, match=r"HTTP 403"):
        with_client(fake, lambda c: c.check_key())


def test_check_key_when_workos_keeps_failing(fake: FakeWorkos) -> None:
    """Not a refused key: a run-time failure (exit 1), as for any unreachable service."""
    fake.script(USERS_PATH, *[Reply(500, {}) for _ in range(3)])
    with pytest.raises(WorkosUnreachable, match=r"HTTP 500 after 3 attempts") as caught:
        with_client(fake, lambda c: c.check_key(), max_attempts=3)
    assert caught.value.exit_code == 1


def test_check_key_when_workos_is_unreachable() -> None:
    with socket.socket() as sock:  # a port nobody listens on once this socket closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def main() -> None:
        async with WorkosClient(
            api_key=KEY, base_url=f"http://127.0.0.1:{port}", backoff_base=0.01, max_attempts=2
        ) as client:
            await client.check_key()

    with pytest.raises(WorkosUnreachable, match=r"could not check the API key.*ConnectError"):
        asyncio.run(main())


def test_missing_key_is_a_usage_error() -> None:
    with pytest.raises(WorkosKeyError, match="WORKOS_API_KEY is not set"):
        WorkosClient(api_key="  ")


def test_401_mid_run_stops_the_lookups(fake: FakeWorkos) -> None:
    with pytest.raises(WorkosAuthError) as caught:
        with_client(fake, lambda c: c.get_user("user_ada"), api_key="sk_test_revoked")
    assert caught.value.status == 401
    assert caught.value.exit_code == 1

    ids = [f"user_{i}" for i in range(40)]
    fake.requests.clear()
    fake.latency = 0.01
    fake.script(user_path("user_3"), Reply(403, {}))
    with pytest.raises(WorkosAuthError, match=r"HTTP 403"):
        with_client(fake, lambda c: c.get_users(ids), concurrency=2)
    assert len(fake.requests) < len(ids)  # the other look-ups were cancelled


def test_client_lifecycle_is_explicit(fake: FakeWorkos) -> None:
    client = client_for(fake)
    with pytest.raises(RuntimeError, match="inside `async with`"):
        asyncio.run(client.get_user("user_ada"))

    async def reuse() -> None:
        async with client:
            pass
        async with client:
            pass

    with pytest.raises(RuntimeError, match="cannot be opened when it is closed"):
        asyncio.run(reuse())
    assert KEY not in repr(client)


# --------------------------------------------------------------------------- limits


def test_concurrency_is_bounded(fake: FakeWorkos) -> None:
    ids = [f"user_{i}" for i in range(50)]
    for workos_id in ids:
        fake.users[workos_id] = {"email": f"{workos_id}@example.com"}
    fake.latency = 0.03
    users, stats = with_client(fake, lambda c: c.get_users(ids), concurrency=5)
    assert list(users) == ids and all(u is not None for u in users.values())
    assert len(fake.settled_requests()) == 50 and stats.calls == 50
    assert 2 <= fake.max_in_flight <= 5  # concurrent, but never more than allowed


def test_rate_limit_spaces_request_starts(fake: FakeWorkos) -> None:
    ids = [f"user_{i}" for i in range(6)]
    rate = 20.0
    with_client(fake, lambda c: c.get_users(ids), concurrency=6, rate_per_second=rate)
    starts = sorted(r.started for r in fake.settled_requests())
    assert starts[-1] - starts[0] >= (len(ids) - 1) / rate * 0.9


def test_duplicate_ids_are_looked_up_once(fake: FakeWorkos) -> None:
    fake.users["user_ada"] = ADA
    users, stats = with_client(fake, lambda c: c.get_users(["user_ada", "user_ada", "user_x"]))
    assert list(users) == ["user_ada", "user_x"]
    assert stats.calls == 2


# --------------------------------------------------------------------------- the cache

CACHE_METADATA = sa.MetaData()
sa.Table(
    CACHE_TABLE_NAME,
    CACHE_METADATA,
    sa.Column("workos_id", sa.Text(), primary_key=True),
    sa.Column("found", sa.Boolean(), nullable=False),
    sa.Column("email", sa.Text(), nullable=True),
    sa.Column("name", sa.Text(), nullable=True),
    sa.Column("avatar", sa.Text(), nullable=True),
    sa.Column("fetched_at", sa.DateTime(), nullable=False),
)


async def _engine_with_table(url: str) -> AsyncEngine:
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(CACHE_METADATA.create_all)
    return engine


def _populate(fake: FakeWorkos) -> list[str]:
    fake.users["user_ada"] = ADA
    fake.users["user_grace"] = GRACE
    fake.users["user_bad_email"] = {"email": "nope"}
    return ["user_ada", "user_grace", "user_bad_email", "user_gone"]  # user_gone: 404


def test_sql_cache_survives_a_restart(fake: FakeWorkos, db_url: str) -> None:
    ids = _populate(fake)

    async def run_once() -> tuple[dict[str, WorkosUser | None], int, LookupStats]:
        engine = await _engine_with_table(db_url)  # a new engine each run: a restart
        try:
            async with client_for(fake) as client:
                answers, from_cache = await resolve_with_cache(client, SqlWorkosCache(engine), ids)
                return answers, from_cache, client.stats
        finally:
            await engine.dispose()

    first, first_cached, _ = asyncio.run(run_once())
    assert first_cached == 0
    assert len(fake.settled_requests()) == 4
    assert first["user_ada"] == WorkosUser(
        email="ada.lovelace@example.com", name="Ada Lovelace", avatar=ADA["profile_picture_url"]
    )
    assert first["user_bad_email"] is None and first["user_gone"] is None

    fake.requests.clear()
    second, second_cached, stats = asyncio.run(run_once())
    assert second == first
    assert second_cached == 4 and stats.cache_hits == 4
    assert fake.settled_requests() == []  # negatives (404, no valid email) are cached too


def test_sql_cache_does_not_keep_failures(fake: FakeWorkos, db_url: str) -> None:
    fake.users["user_ada"] = ADA
    fake.users["user_flaky"] = {"email": "flaky@example.com"}
    fake.script(user_path("user_flaky"), *[Reply(500, {}) for _ in range(5)])

    async def run_once() -> tuple[dict[str, WorkosUser | None], int]:
        engine = await _engine_with_table(db_url)
        try:
            async with client_for(fake) as client:
                return await resolve_with_cache(
                    client, SqlWorkosCache(engine), ["user_ada", "user_flaky"]
                )
        finally:
            await engine.dispose()

    first, _ = asyncio.run(run_once())
    assert first["user_flaky"] is None
    fake.requests.clear()
    second, from_cache = asyncio.run(run_once())
    assert from_cache == 1  # user_ada only
    assert [r.path for r in fake.requests] == [user_path("user_flaky")]
    assert second["user_flaky"] == WorkosUser(email="flaky@example.com", name=None, avatar=None)


def test_sql_cache_upserts_and_honours_ttl(fake: FakeWorkos, db_url: str) -> None:
    fake.users["user_ada"] = ADA

    async def main() -> None:
        engine = await _engine_with_table(db_url)
        try:
            cache = SqlWorkosCache(engine)
            await cache.put_many({"user_ada": None, "user_b": None})
            await cache.put_many({"user_ada": WorkosUser("old@example.com", "Old", None)})
            assert await cache.get_many(["user_ada", "user_b", "user_c"]) == {
                "user_ada": WorkosUser("old@example.com", "Old", None),
                "user_b": None,
            }
            async with engine.connect() as conn:
                count = await conn.scalar(sa.text(f"SELECT count(*) FROM {CACHE_TABLE_NAME}"))
            assert count == 2

            await asyncio.sleep(0.05)
            async with client_for(fake) as client:
                fresh, from_cache = await resolve_with_cache(
                    client, cache, ["user_ada"], ttl_seconds=0.01
                )
            assert from_cache == 0  # older than the ttl: asked again, and replaced
            assert fresh["user_ada"] is not None
            assert fresh["user_ada"].email == "ada.lovelace@example.com"
            async with client_for(fake) as client:
                _, from_cache = await resolve_with_cache(
                    client, cache, ["user_ada"], ttl_seconds=3600
                )
            assert from_cache == 1
        finally:
            await engine.dispose()

    asyncio.run(main())
    assert len(fake.requests) == 1


def test_memory_cache_lives_for_one_run_only(fake: FakeWorkos) -> None:
    ids = _populate(fake)

    async def run(cache: MemoryWorkosCache) -> int:
        async with client_for(fake) as client:
            _, from_cache = await resolve_with_cache(client, cache, ids)
            return from_cache

    dry_run_cache = MemoryWorkosCache()
    assert asyncio.run(run(dry_run_cache)) == 0
    assert asyncio.run(run(dry_run_cache)) == 4  # within one run, asked once
    assert len(fake.requests) == 4
    assert asyncio.run(run(MemoryWorkosCache())) == 0  # a new run starts empty
    assert len(fake.requests) == 8


# --------------------------------------------------------------------------- secrecy


def test_logs_and_errors_never_show_the_key_or_emails(
    fake: FakeWorkos, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, httpx and httpcore included
    fake.users["user_ada"] = ADA
    fake.users["user_bad_email"] = {"email": "broken-at-example.com"}
    fake.users["user_flaky"] = {"email": "flaky@example.com"}
    fake.script(user_path("user_ada"), Reply(429, {}, headers={"Retry-After": "0"}))
    fake.script(user_path("user_flaky"), *[Reply(503, {}) for _ in range(5)])
    fake.script(user_path("user_revoked"), Reply(401, {}))
    fake.script(user_path("user_odd"), Reply(400, {"email": "odd@example.com"}))

    async def main() -> list[str]:
        messages: list[str] = []
        async with client_for(fake) as client:
            await client.check_key()
            await resolve_with_cache(
                client,
                MemoryWorkosCache(),
                ["user_ada", "user_bad_email", "user_flaky", "user_gone", "user_odd"],
            )
            try:
                await client.get_user("user_revoked")
            except WorkosAuthError as exc:
                messages.append(str(exc))
        async with client_for(fake, api_key=KEY + "_wrong") as client:
            try:
                await client.check_key()
            except WorkosKeyError as exc:
                messages.append(str(exc))
        return messages

    messages = asyncio.run(main())
    assert len(messages) == 2
    text = caplog.text + "\n".join(messages)
    for record in caplog.records:
        text += f"\n{record.args!r} {record.__dict__!r}"
    assert "workos_id=user_flaky" in caplog.text  # failures are logged, by id
    for secret in (
        KEY,
        "ada.lovelace@example.com",
        "Ada.Lovelace@Example.COM",
        "broken-at-example.com",
        "flaky@example.com",
        "odd@example.com",
    ):
        assert secret not in text
