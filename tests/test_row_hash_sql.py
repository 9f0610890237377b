"""DuckDB computes the row hash of staged records (staging.DUCKDB_ROW_HASH: in the DuckDB warehouse as it inserts,
in process for a Postgres-bound batch), except for the few values columnar.python_hash_mask leaves to
record.row_hash. Both must give the same digest for the same stored values, on both warehouses, or a warehouse
whose hashes were written one way would see records written the other way as touched. Checked here on generated values of every tracked type, staged
through the real (columnar) write path into a real DuckDB file and a real Postgres database."""

from __future__ import annotations

from datetime import date, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Double, text

from oppsync_pipeline.lib.columnar import field_array, python_hash_mask
from oppsync_pipeline.lib.record import FIELDS, Opportunity, row_hash
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


@pytest.fixture
def postgres_engine(pg_url):  # pg_url: conftest marks the test `postgres`
    engine = make_engine(pg_url)
    ensure_schema(engine)
    yield engine
    engine.dispose()


def staged_hashes(engine, page: list[Opportunity]) -> dict[str, str]:
    with transaction(engine) as c:
        c.execute(text("DELETE FROM oppsync.stage_opportunities"))
    store.stage_page(engine, "x", page, True, 0)
    with transaction(engine) as c:
        return dict(c.execute(text("SELECT source_id, row_hash FROM oppsync.stage_opportunities")).fetchall())


records = st.lists(
    st.tuples(texts, texts, texts, texts, numbers, dates, numbers, datetimes, texts, datetimes),
    min_size=1,
    max_size=40,
)


def python_hashes(page: list[Opportunity]) -> dict[str, str]:
    # the hash is over the values as stored: NUL bytes are cleaned from text first
    return {o.source_id: store.staged_rows("x", [o], True, 0)[0][-1] for o in page}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records)
def test_duckdb_hashes_staged_records_as_python_does(duckdb_engine, records):
    page = [opportunity(i, values) for i, values in enumerate(records)]
    assert staged_hashes(duckdb_engine, page) == python_hashes(page)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records)
def test_postgres_hashes_staged_records_as_python_does(postgres_engine, records):
    page = [opportunity(i, values) for i, values in enumerate(records)]
    assert staged_hashes(postgres_engine, page) == python_hashes(page)


# One page whose every value the databases hash themselves (python_hash_mask leaves all to them): so the
# agreement below is between the two SQL expressions, not two copies of record.row_hash.
SHARED_CASE = [
    (
        "Deal",
        "Acme \x00 Ltd",
        None,
        "Prospecting",
        1000.0,
        date(2026, 5, 1),
        10.0,
        datetime(2026, 1, 2, 3, 4, 5, 6),
        "005B",
        None,
    ),
    ("", "Ünïcødé ☃", "005A", None, 2.675, date(1999, 12, 31), 0.0, datetime(2026, 2, 1), None, datetime(2026, 4, 30)),
    ('"quoted", \\N', None, None, "Closed Won", 231197.09, None, 99.5, None, "\\N", datetime(1000, 1, 1, 0, 0)),
    (
        "Deal 4",
        "a\nb",
        "005C",
        "Negotiation",
        -0.0,
        date(2026, 1, 1),
        0.0001,
        datetime(2026, 3, 1, 23, 59, 59, 999999),
        "x",
        None,
    ),
]


def test_duckdb_and_postgres_digests_agree_on_a_shared_case(duckdb_engine, postgres_engine):
    page = [opportunity(i, values) for i, values in enumerate(SHARED_CASE)]
    values = {f.name: [getattr(o, f.name) for o in page] for f in FIELDS}
    assert not python_hash_mask(values, {f.name: field_array(values[f.name], f) for f in FIELDS}).any()
    duck, pg = staged_hashes(duckdb_engine, page), staged_hashes(postgres_engine, page)
    assert duck == pg == python_hashes(page)


@pytest.mark.parametrize(
    ("amount", "python"),
    [
        (1000.0, False),
        (2.675, False),
        (-0.0, False),
        (0.1 + 0.2, True),
        (1e16, True),
        (1e-5, True),
        (1000, True),
        (float("nan"), True),
        (float("inf"), True),
        (None, False),
    ],
)
def test_numbers_the_databases_would_print_otherwise_keep_the_python_hash(amount, python):
    field = next(f for f in FIELDS if f.name == "amount")
    assert field.sql_type is Double
    assert python_hash_mask({"amount": [amount]}, {"amount": field_array([amount], field)}).tolist() == [python]


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
