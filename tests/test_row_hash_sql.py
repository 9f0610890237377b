"""DuckDB computes the row hash of staged records itself (store.DUCKDB_ROW_HASH); Postgres stages through COPY
and keeps record.row_hash. Both must give the same digest for the same stored values, or a warehouse
whose hashes were written by one would see the other's records as touched. Checked here on generated values
of every tracked type, staged through the real write path into a real DuckDB file."""

from __future__ import annotations

from datetime import date, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from oppsync_pipeline.lib.record import Opportunity, row_hash
from oppsync_pipeline.lib.warehouse import store
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine, transaction

texts = st.none() | st.text(max_size=30)
# amounts and probabilities as CRMs send them, and the awkward ones: tiny, huge, more decimals than kept
# (halves, more than 6 decimals, integers), and whole ranges of both
numbers = (
    st.none()
    | st.floats(allow_nan=False)
    | st.integers(-(10**12), 10**12)
    | st.sampled_from(
        [
            0.0,
            -0.0,
            0.1 + 0.2,
            1e-7,
            2.675,
            1.5078125,
            231197.0945595,
            1234.5000005,
            1e16,
            123456789.123456789,
            5e-324,
            2500.5,
            99999.99,
        ]
    )
)
dates = st.none() | st.dates()
datetimes = st.none() | st.datetimes()


def opportunity(i: int, values: tuple) -> Opportunity:
    name, client, owner, stage, amount, close, prob, created, creator, *rest = values
    closed_at = rest[0] if rest else None
    return Opportunity(
        connection="c1",
        crm="salesforce",
        source_id=f"id{i}",
        project_name=name,
        client_name=client,
        service_location=None,
        sales_executive=owner,
        owner_crm_id=owner,
        stage=stage,
        stage_id=None if stage is None else f"id:{stage}",
        crm_status=client,
        status="open",
        amount=amount,
        currency="USD",
        close_date=close,
        probability=prob,
        created_at=created,
        created_by_crm_id=creator,
        modified_at=datetime(2026, 1, 1) + timedelta(seconds=i),
        raw={"Id": f"id{i}"},
        crm_closed_at=closed_at,
        crm_closed_at_field=None if closed_at is None else "closedDate",
    )


@pytest.fixture(scope="module")
def duckdb_engine(tmp_path_factory):
    engine = make_engine(f"duckdb:///{tmp_path_factory.mktemp('hash') / 'w.duckdb'}")
    ensure_schema(engine)
    yield engine
    engine.dispose()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(texts, texts, texts, texts, numbers, dates, numbers, datetimes, texts, datetimes),
        min_size=1,
        max_size=40,
    )
)
def test_duckdb_hashes_staged_records_as_python_does(duckdb_engine, records):
    page = [opportunity(i, values) for i, values in enumerate(records)]
    with transaction(duckdb_engine) as c:
        c.execute(text("DELETE FROM oppsync.stage_opportunities"))
    store.stage_page(duckdb_engine, "x", page, True, 0)
    with transaction(duckdb_engine) as c:
        stored = dict(c.execute(text("SELECT source_id, row_hash FROM oppsync.stage_opportunities")).fetchall())
    # the hash is over the values as stored: NUL bytes are cleaned from text first
    expected = {o.source_id: store.staged_rows("x", [o], True, 0)[0][-1] for o in page}
    assert stored == expected


def test_the_python_hash_is_the_definition():
    o = opportunity(
        0,
        (
            "Deal",
            "Acme",
            "005A",
            "Prospecting",
            1000.0,
            date(2026, 5, 1),
            10.0,
            datetime(2026, 1, 2, 3, 4, 5, 6),
            "005B",
            datetime(2026, 4, 30, 17, 0),
        ),
    )
    assert store.staged_rows("x", [o], True, 0)[0][-1] == row_hash(
        "Deal",
        "Acme",
        None,  # account_id
        None,
        "005A",
        "005A",
        "Prospecting",
        "id:Prospecting",
        "Acme",
        "open",
        1000.0,
        "USD",
        None,  # amount_base
        None,  # base_currency
        None,  # revenue_one_time
        None,  # revenue_recurring
        None,  # cost
        date(2026, 5, 1),
        10.0,
        datetime(2026, 1, 2, 3, 4, 5, 6),
        "005B",
        datetime(2026, 4, 30, 17, 0),
        None,  # extra_fields
    )
