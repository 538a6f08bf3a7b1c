"""Issue 22 item 3: a database error's text never carries a value of the data.

Real errors from PostgreSQL and SQLite: `describe` (logs, final errors) and `refusal_reason`
(dead letters, --json) keep the SQLSTATE, table, column and constraint and drop every value
(parameters, the server's DETAIL, a value quoted in the message, asyncpg's repr of an argument).
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream.db.engine import create_engine
from khala_stream.db.errors import describe, is_refusal, refusal_reason
from khala_stream.db.laravel_tables import TABLES
from khala_stream.errors import UsageError
from tests.contract.engine import run_on

EMAIL = "grace.hopper@pii-errors.example.com"
TEXT = "my secret message text"


async def _failure(engine: AsyncEngine, stmt: Any, params: Any = None) -> BaseException:
    try:
        async with engine.begin() as conn:
            await conn.execute(stmt, params)
    except Exception as exc:
        return exc
    raise AssertionError("the statement did not fail")


def _clean(*texts: str) -> None:
    for text in texts:
        assert EMAIL not in text and TEXT not in text, text
        assert "grace" not in text, text


def test_errors_name_the_place_and_never_a_value(db_url: str) -> None:
    users = TABLES["users"]

    async def body(engine: AsyncEngine) -> None:
        row = {"name": "Grace", "email": EMAIL, "workos_id": "w1", "avatar": "", "handle": "g"}
        async with engine.begin() as conn:
            await conn.execute(sa.insert(users).values(**row))
        # A unique violation: PostgreSQL's DETAIL and SQLAlchemy's parameters hold the email.
        duplicate = await _failure(engine, sa.insert(users), dict(row, workos_id="w2", handle="h"))
        assert is_refusal(duplicate)
        _clean(describe(duplicate), refusal_reason(duplicate))
        # A column missing from the target: the statement fails as a whole, values unseen.
        async with engine.begin() as conn:
            await conn.execute(sa.text("ALTER TABLE messages DROP COLUMN content"))
        missing = await _failure(
            engine,
            sa.text("INSERT INTO messages (id, content) VALUES (:id, :content)"),
            {"id": "m1", "content": TEXT},
        )
        _clean(str(missing), describe(missing))  # hide_parameters: no [parameters: ...]
        assert "content" in describe(missing)
        if engine.dialect.name != "postgresql":
            return
        assert "SQLSTATE 23505" in describe(duplicate)
        assert "table users, constraint users_email_unique" in describe(duplicate)
        assert "SQLSTATE 42703" in describe(missing)
        # A value PostgreSQL quotes in its message (22P02) is dropped, the type stays.
        bad_cast = await _failure(
            engine, sa.text("SELECT CAST(CAST(:v AS text) AS integer)"), {"v": EMAIL}
        )
        _clean(describe(bad_cast), refusal_reason(bad_cast))
        assert refusal_reason(bad_cast) == "invalid input syntax for type integer"
        # asyncpg refuses an argument before the server sees it, with a repr of the value.
        client = await _failure(
            engine,
            sa.insert(TABLES["threads"]),  # as the sink writes: `VALUES ($1::VARCHAR, ...)`
            {"id": "t1", "user_id": EMAIL, "title": "x"},
        )
        assert is_refusal(client)
        reason = refusal_reason(client)
        _clean(describe(client), reason)
        assert reason.startswith("invalid input for threads.user_id"), reason

    run_on(db_url, body)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url", "DATABASE_URL is not a database URL"),
        ("mysql://someone:Pa55word@db/app", "unsupported database 'mysql'"),
        ("sqlite+aiosqlite:////no/such/folder/khala.sqlite", "folder does not exist"),
    ],
)
def test_a_bad_database_url_is_a_usage_error_that_does_not_repeat_it(
    url: str, expected: str
) -> None:
    with pytest.raises(UsageError) as caught:
        create_engine(url)
    assert expected in str(caught.value)
    assert "Pa55word" not in str(caught.value)
