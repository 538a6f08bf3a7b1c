"""`copy_out_lines` gives back each text value as it was stored, whatever COPY escaped in it
(backslashes, raw control characters), however the server's chunks cut the rows."""

from __future__ import annotations

import io

import orjson
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream.db.queries import copy_out_lines
from tests.contract.engine import run_on

# Text made mostly of what COPY escapes, and JSON text, which escapes only backslashes.
_RAW = st.text(alphabet=st.sampled_from(list('\\\n\r\t\b\f\vnrta "é')), max_size=40)
_VALUES = st.lists(_RAW | _RAW.map(lambda t: orjson.dumps({"t": t}).decode()), max_size=30)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(values=_VALUES, long_rows=st.integers(0, 3))
def test_every_value_comes_back_as_stored(pg_url: str, values: list[str], long_rows: int) -> None:
    # Rows of 200 kB take several of the server's chunks: a row is cut between them.
    values = values + ['\\"' * 100_000] * long_rows

    async def body(engine: AsyncEngine) -> bytes:
        out = io.BytesIO()
        async with engine.begin() as conn:
            await conn.execute(sa.text("CREATE TEMP TABLE copied (n integer, v text)"))
            if values:
                await conn.execute(
                    sa.text("INSERT INTO copied VALUES (:n, :v)"),
                    [{"n": n, "v": v} for n, v in enumerate(values)],
                )
            count = await copy_out_lines(conn, "SELECT v FROM copied ORDER BY n", out=out)
        assert count == len(values)
        return out.getvalue()

    expected = b"".join(v.encode() + b"\n" for v in values)
    assert run_on(pg_url, body, schema=False) == expected
