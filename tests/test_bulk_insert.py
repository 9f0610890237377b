"""dialect.bulk_insert on both warehouses: what goes in comes back, value for value (DuckDB scans an Arrow table,
Postgres takes COPY), and what Arrow cannot take as one plain type per column still goes in (through pandas)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from oppsync_pipeline.lib.warehouse import dialect
from oppsync_pipeline.lib.warehouse.engine import make_engine, transaction

COLUMNS = ["id", "big", "name", "flag", "seen_at", "amount", "day"]
ROWS = [
    (1, 2**62 + 1, "Acme", True, datetime(2026, 3, 1, 9, 30, 15, 123456), 1.5, None),
    (2, None, None, None, None, None, None),
    (3, -(2**62) - 3, "naïve — ünïcode \\N", False, datetime(1, 1, 1), -0.0, "2026-02-28"),
    (4, 7, "", True, datetime(9999, 12, 31, 23, 59, 59), 1e300, None),
]


def _create(conn) -> None:
    conn.execute(
        text(
            "CREATE TABLE bulk_t (id INTEGER, big BIGINT, name TEXT, flag BOOLEAN, seen_at TIMESTAMP, "
            "amount DOUBLE PRECISION, day TEXT)"
        )
    )


def _read(engine) -> list[tuple]:
    with engine.connect() as c:
        return [tuple(r) for r in c.execute(text(f"SELECT {', '.join(COLUMNS)} FROM bulk_t ORDER BY id"))]


def test_rows_come_back_value_for_value(warehouse_url: str):
    engine = make_engine(warehouse_url)
    with transaction(engine) as c:
        _create(c)
        assert dialect.bulk_insert(c, "bulk_t", COLUMNS, ROWS) == len(ROWS)
    # a 64-bit integer beside a None stays exact (a DataFrame made the column float64: 2**62 + 1 came back even)
    assert _read(engine) == ROWS
    engine.dispose()


def test_a_zoned_datetime_is_stored_as_utc(warehouse_url: str):
    engine = make_engine(warehouse_url)
    at = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
    with transaction(engine) as c:
        _create(c)
        dialect.bulk_insert(c, "bulk_t", ["id", "seen_at"], [(1, at), (2, None)])
    with engine.connect() as c:
        assert c.execute(text("SELECT seen_at FROM bulk_t WHERE id = 1")).scalar() == datetime(2026, 3, 1, 9, 30)
    engine.dispose()


@pytest.mark.parametrize(
    "rows, expected",
    [
        # one column, two Python types: Arrow refuses it as one type; DuckDB casts each value, as before
        ([(1, "7"), (2, 8)], [(1, "7"), (2, "8")]),
        # past 64 bits: Arrow overflows; the DataFrame keeps it as an object, DuckDB as text
        ([(1, 2**70)], [(1, str(2**70))]),
    ],
)
def test_what_arrow_cannot_type_still_goes_in_on_duckdb(duckdb_url: str, rows, expected):
    engine = make_engine(duckdb_url)
    with transaction(engine) as c:
        _create(c)
        dialect.bulk_insert(c, "bulk_t", ["id", "name"], rows)
    with engine.connect() as c:
        assert [tuple(r) for r in c.execute(text("SELECT id, name FROM bulk_t ORDER BY id"))] == expected
    engine.dispose()


def test_computed_columns_are_evaluated_by_the_duckdb_insert(duckdb_url: str):
    engine = make_engine(duckdb_url)
    with transaction(engine) as c:
        _create(c)
        dialect.bulk_insert(
            c, "bulk_t", ["id", "name"], [(1, "a"), (2, None)], computed={"name": "coalesce(name, 'x')"}
        )
    with engine.connect() as c:
        assert [tuple(r) for r in c.execute(text("SELECT id, name FROM bulk_t ORDER BY id"))] == [(1, "a"), (2, "x")]
    engine.dispose()


def test_postgres_set_query_settings_hold_for_their_transaction_only(pg_url: str):
    """tune_reconcile (the reconcile's and the extract counts' transactions): sorts and hashes in memory, no JIT
    compilation, and a pooled connection that serves the next transaction has the server's defaults back."""
    engine = make_engine(pg_url)
    with transaction(engine) as conn:
        default = conn.execute(text("SELECT current_setting('work_mem'), current_setting('jit')")).one()
    with transaction(engine) as conn:
        dialect.tune_reconcile(conn)
        tuned = conn.execute(text("SELECT current_setting('work_mem'), current_setting('jit')")).one()
    with transaction(engine) as conn:
        after = conn.execute(text("SELECT current_setting('work_mem'), current_setting('jit')")).one()
    engine.dispose()
    assert tuned == (dialect.RECONCILE_WORK_MEM, "off")
    assert after == default != tuned
