"""The reconcile on DuckDB runs under the engine's lean memory limit (its working tables spill past it), its UPDATE of
the current rows under the configured one, and a reconcile that runs out of the lean limit runs again, whole, under
the configured limit (reconcile/apply.py)."""

from __future__ import annotations

import logging
from datetime import timedelta
from unittest import mock

import pytest
from sqlalchemy import event, text

from oppsync_pipeline.lib.reconcile import apply
from oppsync_pipeline.lib.warehouse import engine as engine_module
from oppsync_pipeline.lib.warehouse import store
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine
from tests.reconcile.harness import (
    CONNECTION,
    LOCK_TTL,
    T0,
    current,
    full,
    history,
    opp,
    reconcile_extract,
    stage_extract,
    sync,
)


@pytest.fixture
def engine(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """The production engine (the harness's keeps one plain DuckDB connection, which has no limits to switch)."""
    monkeypatch.delenv("OPPSYNC_DUCKDB_MEMORY_LIMIT", raising=False)
    engine = make_engine(f"duckdb:///{tmp_path / 'w.duckdb'}")
    ensure_schema(engine)
    yield engine
    engine.dispose()


def test_the_reconcile_is_lean_but_for_the_update_of_current_rows(engine):
    sync(engine, "r1", full(*(opp(f"o{i}") for i in range(50))), T0)
    steps: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def statement(_conn, _cursor, sql, *_args):
        steps.append(" ".join(sql.split()[:3]))

    real = engine_module.set_memory_limit
    spy = mock.Mock(side_effect=lambda conn, lean: (steps.append(f"lean={lean}"), real(conn, lean))[1])
    # the reconcile's own call, and those of the engine's configured_memory around the UPDATE
    with mock.patch.object(apply, "set_memory_limit", spy), mock.patch.object(engine_module, "set_memory_limit", spy):
        sync(engine, "r2", full(*(opp(f"o{i}", amount=2000.0) for i in range(50))), T0 + timedelta(hours=1))
    event.remove(engine, "before_cursor_execute", statement)

    limits = [s for s in steps if s.startswith("lean=")]
    assert limits == ["lean=True", "lean=False", "lean=True"]
    update = steps.index("UPDATE oppsync.opportunities AS")
    assert steps[update - 1] == "lean=False" and steps[update + 1] == "lean=True"
    assert steps.index("lean=True") < steps.index("CREATE TEMPORARY TABLE")  # before the first working table
    assert {o["amount"] for o in current(engine).values()} == {2000.0}


def test_a_reconcile_out_of_the_lean_limit_runs_again_whole_under_the_configured_one(
    engine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """1 MiB is too little for any of the reconcile's working tables: DuckDB refuses the first attempt, which rolls
    back whole; the second, under the configured limit, writes everything exactly once."""
    records = [opp(f"o{i}", project_name="p" * 2000) for i in range(3000)]
    store.acquire_lock(engine, CONNECTION, "r1", T0, LOCK_TTL)
    stage_extract(engine, "r1", full(*records), T0)
    monkeypatch.setattr(engine_module, "LEAN_MEMORY_LIMIT_MB", 1)  # the reconcile's only: staging is done
    with caplog.at_level(logging.WARNING, logger=apply.__name__):
        result = reconcile_extract(engine, "r1", "full", T0)
    assert "ran out of DuckDB's lean memory limit" in caplog.text
    assert result.created == 3000
    assert len(current(engine)) == 3000
    assert len(history(engine)) == 3000
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM oppsync.opportunity_events")).scalar() == 3000
        assert c.execute(text("SELECT count(*) FROM oppsync.stage_opportunities")).scalar() == 0


def test_new_rows_written_in_passes_where_memory_is_lean_are_each_written_once(engine, monkeypatch: pytest.MonkeyPatch):
    """Passes of 7 over 50 new records, some staged twice (the latest version wins): every record once, as staged."""
    monkeypatch.setattr(apply, "NEW_ROWS_PER_PASS", 7)
    passes = []

    @event.listens_for(engine, "before_cursor_execute")
    def statement(_conn, _cursor, sql, *_args):
        if sql.lstrip().startswith("INSERT INTO oppsync.opportunities "):
            passes.append(sql)

    with engine.connect() as c:
        threads = c.execute(text("SELECT current_setting('threads')")).scalar()
    records = [opp(f"o{i}") for i in range(50)]
    again = [opp(f"o{i}", amount=5.0, modified_at=T0) for i in range(0, 50, 10)]
    real = engine_module.set_single_thread
    single = mock.patch.object(
        engine_module,  # engine.single_thread's
        "set_single_thread",
        side_effect=lambda conn, one: (passes.append(f"single={one}"), real(conn, one))[1],
    )
    with single:
        result = sync(engine, "r1", full(*records, *again), T0)
    event.remove(engine, "before_cursor_execute", statement)
    # ceil(50 / 7) passes over the seq range of the 55 staged rows, on one DuckDB thread
    assert passes[0] == "single=True" and passes[-1] == "single=False" and len(passes) == 10
    with engine.connect() as c:  # the next connection has the instance's threads again
        assert c.execute(text("SELECT current_setting('threads')")).scalar() == threads
    assert result.created == 50
    rows = current(engine)
    assert sorted(rows) == sorted(f"o{i}" for i in range(50))
    assert {k for k, o in rows.items() if o["amount"] == 5.0} == {f"o{i}" for i in range(0, 50, 10)}
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM oppsync.opportunities")).scalar() == 50
