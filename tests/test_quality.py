"""The extract's quality rules, run in the warehouse over the staged rows (issue 22): the same rules and
semantics as the Great Expectations pandas suite they replace, on DuckDB and Postgres, with up to five example
ids per failed rule, and without loading the extract into Python."""

from __future__ import annotations

import tracemalloc
from dataclasses import replace
from datetime import datetime, timedelta

from oppsync_pipeline.lib.quality import validate_extract
from oppsync_pipeline.lib.record import Opportunity
from oppsync_pipeline.lib.warehouse import store
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine

NOW = datetime(2026, 3, 1, 12, 0)


def deals(start: int, n: int, **changes) -> list[Opportunity]:
    """Opportunities id{start}..id{start+n-1}, each with `changes` applied."""
    return [
        replace(
            Opportunity(
                connection="c1",
                crm="salesforce",
                source_id=f"id{i:05d}",
                project_name=f"Deal {i}",
                client_name="Acme",
                service_location=None,
                sales_executive=None,
                owner_crm_id="005A",
                stage="Prospecting",
                status="open",
                amount=1000.0 + i,
                currency="USD",
                close_date=None,
                probability=10.0,
                created_at=datetime(2026, 1, 1),
                created_by_crm_id="005A",
                modified_at=datetime(2026, 1, 1) + timedelta(seconds=i),
                raw={"n": i},
            ),
            **changes,
        )
        for i in range(start, start + n)
    ]


def warehouse(url: str, *extract_ids: str):
    engine = make_engine(url)
    ensure_schema(engine)
    for x in extract_ids:
        store.begin_extract(
            engine, extract_id=x, connection="c1", crm="salesforce", mode="full", started_at=NOW, since=None
        )
    return engine


def stage(engine, extract_id: str, *pages: tuple[list[Opportunity], bool]) -> None:
    writer = store.StagingWriter(engine, extract_id)
    seq = 0
    for page, open_set in pages:
        seq += writer.add(page, open_set, seq)
    writer.flush()


def by_column(result) -> dict[str, dict]:
    return {str(e["column"]): e for e in result.expectations}


def test_a_clean_extract_passes_every_rule_and_legitimate_repeats_are_not_duplicates(warehouse_url):
    engine = warehouse(warehouse_url, "x")
    newer = deals(3, 1, amount=5.0, modified_at=datetime(2026, 2, 1))  # changed while the sets were read
    stage(
        engine,
        "x",
        (deals(0, 10), True),
        (deals(8, 2), True),  # the same records on two pages
        (newer, True),
        (deals(10, 5, status="won"), False),
        (deals(15, 1, created_at=NOW + timedelta(minutes=50)), True),
    )  # our clock a little behind the CRM's

    result = validate_extract(engine, "x", NOW)

    assert result.success and result.failures == []
    assert result.rows == 10 + 1 + 5 + 1  # distinct (id, set, version, content)
    assert [(e["expectation"], e["column"], e["unexpected_count"]) for e in result.expectations] == [
        ("expect_column_values_to_not_be_null", "source_id", 0),
        ("expect_compound_columns_to_be_unique", ["source_id", "in_open_set", "modified_at"], 0),
        ("expect_column_values_to_be_in_set", "status", 0),
        ("expect_column_values_to_be_between", "created_at", 0),
        ("expect_column_values_to_be_between", "amount", 0),
    ]
    engine.dispose()


def test_each_broken_rule_is_counted_with_example_ids(warehouse_url):
    engine = warehouse(warehouse_url, "x", "other")
    stage(
        engine,
        "x",
        (deals(0, 20), True),
        (deals(20, 7, amount=-1.0), True),  # 7 negative amounts: 5 ids shown
        (deals(30, 1, created_at=NOW + timedelta(hours=2)), True),  # beyond the hour's tolerance
        (deals(40, 1, status="pending"), False),
        (deals(5, 1, amount=1.0), True),
    )  # id00005: two contents, one version
    stage(engine, "other", (deals(50, 3, amount=-9.0), True))  # another extract's rows are not judged

    result = validate_extract(engine, "x", NOW)

    assert not result.success and result.rows == 30
    failed = {
        str(f["column"]): (f["expectation"], f["unexpected_count"], f["partial_unexpected_list"])
        for f in result.failures
    }
    assert failed == {
        "amount": ("expect_column_values_to_be_between", 7, [f"id{i:05d}" for i in range(20, 25)]),
        "created_at": ("expect_column_values_to_be_between", 1, ["id00030"]),
        "status": ("expect_column_values_to_be_in_set", 1, ["id00040"]),
        "['source_id', 'in_open_set', 'modified_at']": ("expect_compound_columns_to_be_unique", 2, ["id00005"]),
    }
    assert by_column(result)["source_id"]["success"]
    assert all(
        set(f) == {"expectation", "column", "success", "unexpected_count", "partial_unexpected_list"}
        for f in result.expectations
    )
    engine.dispose()


def test_the_rules_do_not_pull_the_extract_into_python(warehouse_url):
    """20,000 staged rows: the old suite's DataFrame alone took 14 MB of Python allocations here (tracemalloc
    peak); the rules in SQL take a few kB whatever the extract's size. DuckDB's and libpq's own buffers are
    not Python allocations and are not counted; a rows-into-Python fetch of any shape would be."""
    engine = warehouse(warehouse_url, "x", "warm-up")
    stage(engine, "x", *[(deals(i, 1000), True) for i in range(0, 20_000, 1000)])
    validate_extract(engine, "warm-up", NOW)  # statements compiled and cached once, as in a long-lived process

    tracemalloc.start()
    try:
        result = validate_extract(engine, "x", NOW)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert result.success and result.rows == 20_000
    assert peak < 1_000_000, f"{peak:,} bytes allocated in Python for 20,000 rows"
    engine.dispose()
