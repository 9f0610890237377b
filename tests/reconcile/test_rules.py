"""One focused test per reconcile rule (oppsync_pipeline/lib/warehouse/reconcile.py), on DuckDB and Postgres.

Each test drives the engine as the sync layer does (lock, staged pages, complete extract, reconcile) with
hand-made canonical records, then reads the current table, the event log and the history.
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
from datetime import datetime, timedelta

import pytest
from sqlalchemy import create_engine, text

from oppsync_pipeline.lib.reconcile import DeleteGuardRefused, reconcile
from oppsync_pipeline.lib.record import MAPPING_VERSION
from oppsync_pipeline.lib.warehouse import store
from oppsync_pipeline.lib.warehouse.engine import transaction
from tests.reconcile.harness import (
    CONNECTION,
    LOCK_TTL,
    T0,
    Extract,
    current,
    empty_tables,
    event_types,
    events,
    full,
    history,
    incremental,
    migrated_engine,
    opp,
    reconcile_extract,
    snapshot,
    stage_extract,
    sync,
)

T1, T2, T3 = T0 + timedelta(hours=1), T0 + timedelta(hours=2), T0 + timedelta(hours=3)
MOD1, MOD2 = datetime(2026, 2, 1, 12, 0), datetime(2026, 3, 1, 9, 30)


@pytest.fixture(scope="module", params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def module_engine(request, tmp_path_factory):
    with migrated_engine(request.param, tmp_path_factory.mktemp("rules")) as engine:
        yield engine


@pytest.fixture
def engine(module_engine):
    """Each test starts from an empty warehouse (one database per module and backend)."""
    empty_tables(module_engine)
    return module_engine


def only_event(engine, run_id, source_id, event_type):
    [event] = [e for e in events(engine, run_id) if e["source_id"] == source_id and e["event_type"] == event_type]
    return event


def test_unknown_ids_are_created_at_the_crm_created_date_closed_ones_also_closed(engine):
    created = datetime(2025, 11, 3, 10, 15)
    result = sync(
        engine,
        "r1",
        full(
            opp("a", created_at=created),
            opp("b", status="won", modified_at=MOD1),
            opp("c", status="lost", modified_at=MOD2),
        ),
        T0,
    )
    assert (result.created, result.closed, result.events) == (3, 2, 5)
    assert event_types(engine, "r1") == [
        ("a", "created"),
        ("b", "closed_won"),
        ("b", "created"),
        ("c", "closed_lost"),
        ("c", "created"),
    ]
    assert only_event(engine, "r1", "a", "created")["occurred_at"] == created
    assert only_event(engine, "r1", "b", "closed_won")["occurred_at"] == MOD1
    rows = current(engine)
    assert {sid: (r["version"], r["closed_at"], r["first_seen_at"]) for sid, r in rows.items()} == {
        "a": (1, None, T0),
        "b": (1, MOD1, T0),
        "c": (1, MOD2, T0),
    }
    assert [(h["source_id"], h["version"], h["valid_from"], h["valid_to"]) for h in history(engine)] == [
        ("a", 1, T0, None),
        ("b", 1, T0, None),
        ("c", 1, T0, None),
    ]


def test_changed_values_make_an_updated_event_listing_the_fields_and_a_new_version(engine):
    sync(engine, "r1", full(opp("a"), opp("b")), T0)
    result = sync(engine, "r2", full(opp("a", amount=2500.0, owner_crm_id="u9", modified_at=MOD2), opp("b")), T1)
    assert (result.updated, result.skipped) == (1, 1)
    assert event_types(engine, "r2") == [("a", "updated")]
    event = only_event(engine, "r2", "a", "updated")
    assert (event["changed_fields"], event["occurred_at"], event["amount"]) == ("owner_crm_id,amount", MOD2, 2500.0)
    row = current(engine)["a"]
    assert (row["amount"], row["owner_crm_id"], row["version"], row["last_run_id"]) == (2500.0, "u9", 2, "r2")
    assert [
        (h["version"], h["amount"], h["valid_from"], h["valid_to"]) for h in history(engine) if h["source_id"] == "a"
    ] == [(1, 1000.0, T0, T1), (2, 2500.0, T1, None)]


def test_a_stage_change_records_old_and_new_stage(engine):
    sync(engine, "r1", full(opp("a")), T0)
    result = sync(engine, "r2", full(opp("a", stage="Negotiation", modified_at=MOD2)), T1)
    # one kind of change, one event: the move is not also an `updated`
    assert event_types(engine, "r2") == [("a", "stage_changed")]
    event = only_event(engine, "r2", "a", "stage_changed")
    assert (event["old_value"], event["new_value"], event["occurred_at"]) == ("Prospecting", "Negotiation", MOD2)
    assert (event["changed_fields"], event["change_id"]) == ("stage", "r2:a")
    assert (result.stage_changed, result.updated) == (1, 0)


def test_a_stage_move_with_another_edit_is_one_event_per_kind_sharing_a_change_id(engine):
    sync(engine, "r1", full(opp("a")), T0)
    result = sync(engine, "r2", full(opp("a", stage="Negotiation", amount=7.0, modified_at=MOD2)), T1)
    assert event_types(engine, "r2") == [("a", "stage_changed"), ("a", "updated")]
    assert only_event(engine, "r2", "a", "updated")["changed_fields"] == "amount"
    assert {e["change_id"] for e in events(engine, "r2")} == {"r2:a"}
    assert (result.stage_changed, result.updated) == (1, 1)


@pytest.mark.parametrize("status", ["won", "lost"])
def test_open_to_closed_is_closed_won_or_lost(engine, status):
    sync(engine, "r1", full(opp("a")), T0)
    result = sync(engine, "r2", full(opp("a", status=status, modified_at=MOD2)), T1)
    assert result.closed == 1
    # the close alone: its stage move is part of it, not a stage_changed or an updated
    assert event_types(engine, "r2") == [("a", f"closed_{status}")]
    event = only_event(engine, "r2", "a", f"closed_{status}")
    assert (event["old_value"], event["new_value"], event["occurred_at"]) == ("open", status, MOD2)
    assert event["changed_fields"] == "status,stage"
    assert (current(engine)["a"]["closed_at"], current(engine)["a"]["closed_at_source"]) == (MOD2, "modified_at")
    assert (result.updated, result.stage_changed) == (0, 0)


def test_closed_to_open_is_reopened_and_clears_closed_at(engine):
    sync(engine, "r1", full(opp("a", status="won", modified_at=MOD1)), T0)
    result = sync(engine, "r2", full(opp("a", modified_at=MOD2)), T1)
    assert result.reopened == 1
    assert event_types(engine, "r2") == [("a", "reopened")]
    event = only_event(engine, "r2", "a", "reopened")
    assert (event["old_value"], event["new_value"]) == ("won", "open")
    row = current(engine)["a"]
    assert (row["status"], row["closed_at"], row["version"]) == ("open", None, 2)


def test_full_run_deletes_ids_in_neither_set_and_restores_them_when_back(engine):
    records = [opp(s) for s in "abcd"]
    sync(engine, "r1", full(*records), T0)
    result = sync(engine, "r2", full(*records[1:]), T1)
    assert result.deleted == 1 and event_types(engine, "r2") == [("a", "deleted")]
    assert only_event(engine, "r2", "a", "deleted")["occurred_at"] == T1
    row = current(engine)["a"]
    assert (row["deleted_at"], row["version"], row["last_run_id"]) == (T1, 1, "r2")
    assert [(h["version"], h["valid_to"]) for h in history(engine) if h["source_id"] == "a"] == [(1, T1)]

    result = sync(engine, "r3", full(*records), T2)
    assert result.restored == 1 and event_types(engine, "r3") == [("a", "restored")]
    row = current(engine)["a"]
    assert (row["deleted_at"], row["version"], row["last_run_id"]) == (None, 2, "r3")
    assert [(h["version"], h["valid_from"], h["valid_to"]) for h in history(engine) if h["source_id"] == "a"] == [
        (1, T0, T1),
        (2, T2, None),
    ]


def test_a_restored_record_that_changed_meanwhile_is_restored_and_updated(engine):
    sync(engine, "r1", full(opp("a"), opp("b"), opp("c")), T0)
    sync(engine, "r2", full(opp("b"), opp("c")), T1)
    sync(engine, "r3", full(opp("a", status="lost", modified_at=MOD2), opp("b"), opp("c")), T2)
    assert event_types(engine, "r3") == [("a", "closed_lost"), ("a", "restored")]
    assert current(engine)["a"]["closed_at"] == MOD2


def test_incremental_runs_never_infer_deletes(engine):
    sync(engine, "r1", full(opp("a"), opp("b"), opp("c")), T0)
    result = sync(engine, "r2", incremental(opp("a", amount=5.0, modified_at=MOD2)), T1)
    assert (result.deleted, result.updated) == (0, 1)
    assert all(r["deleted_at"] is None for r in current(engine).values())
    assert event_types(engine, "r2") == [("a", "updated")]


def test_native_delete_feed_deletes_in_incremental_mode_at_the_crm_time(engine):
    sync(engine, "r1", full(opp("a"), opp("b"), opp("c")), T0)
    crm_deleted = datetime(2026, 3, 1, 9, 45)
    # "c" is in the feed but also came back in the extract (deleted then undeleted in the CRM): present wins.
    # "zz" was never seen: nothing to delete.
    result = sync(
        engine, "r2", incremental(opp("c"), deletes=[("a", crm_deleted), ("c", crm_deleted), ("zz", crm_deleted)]), T1
    )
    assert result.deleted == 1 and event_types(engine, "r2") == [("a", "deleted")]
    assert only_event(engine, "r2", "a", "deleted")["occurred_at"] == crm_deleted
    assert {sid: r["deleted_at"] for sid, r in current(engine).items()} == {"a": crm_deleted, "b": None, "c": None}


def test_a_native_delete_also_inferred_by_a_full_run_keeps_the_crm_time(engine):
    sync(engine, "r1", full(opp("a"), opp("b"), opp("c")), T0)
    crm_deleted = datetime(2026, 3, 1, 9, 45)
    result = sync(engine, "r2", full(opp("b"), opp("c"), deletes=[("a", crm_deleted)]), T1)
    assert result.deleted == 1 and event_types(engine, "r2") == [("a", "deleted")]
    assert only_event(engine, "r2", "a", "deleted")["occurred_at"] == crm_deleted
    assert current(engine)["a"]["deleted_at"] == crm_deleted


def test_nothing_changed_writes_nothing(engine):
    sync(engine, "r1", full(opp("a"), opp("b", status="won")), T0)
    before = current(engine)
    # a touched-but-unchanged record (only modified_at moved) is not a change either
    result = sync(engine, "r2", full(opp("a", modified_at=MOD2), opp("b", status="won")), T1)
    assert (result.skipped, result.events, result.updated) == (2, 0, 0)
    assert events(engine, "r2") == []
    assert current(engine) == before  # version, last_run_id, last_seen_at, modified_at: row not rewritten
    assert len(history(engine)) == 2


def test_a_nul_byte_the_warehouse_cleans_away_is_not_a_change(engine):
    sync(engine, "r1", full(opp("a", project_name="O'Brien; drop")), T0)
    result = sync(engine, "r2", full(opp("a", project_name="O'Brien;\x00 drop")), T1)
    assert (result.skipped, result.events) == (1, 0)
    assert (current(engine)["a"]["version"], len(history(engine))) == (1, 1)


def test_delete_guard_refuses_a_full_run_deleting_more_than_half_and_changes_nothing(engine):
    sync(engine, "r1", full(*[opp(s) for s in "abcd"]), T0)
    before = snapshot(engine)
    with pytest.raises(DeleteGuardRefused, match="would delete 3 of 4"):
        sync(engine, "r2", full(opp("a", amount=1.0)), T1)
    after = snapshot(engine)
    assert {k: after[k] for k in ("current", "events", "history", "sync_state", "sync_runs")} == {
        k: before[k] for k in ("current", "events", "history", "sync_state", "sync_runs")
    }


def test_delete_guard_allows_exactly_the_share_and_the_share_is_configurable(engine):
    sync(engine, "r1", full(*[opp(s) for s in "abcd"]), T0)
    assert sync(engine, "r2", full(opp("a"), opp("b")), T1).deleted == 2  # 2 of 4 is not more than 50%
    with pytest.raises(DeleteGuardRefused):
        sync(engine, "r3", full(opp("a")), T2, max_delete_share=0.25)  # 1 of 2 > 25%
    assert sync(engine, "r4", Extract("full", []), T3, max_delete_share=1.0).deleted == 2


def test_duplicates_across_pages_and_sets_count_once_latest_modified_wins(engine):
    early, late = datetime(2026, 2, 1, 9, 0), datetime(2026, 2, 1, 9, 5)
    extract = Extract(
        "full",
        [
            (True, [opp("a", modified_at=early), opp("b", modified_at=late), opp("c")]),
            (True, [opp("c")]),  # the same record again on a later page (offset paging under inserts)
            (False, [opp("a", status="won", modified_at=late), opp("b", status="lost", modified_at=early)]),
        ],
    )
    result = sync(engine, "r1", extract, T0)
    assert (result.fetched, result.created) == (3, 3)
    assert {sid: r["status"] for sid, r in current(engine).items()} == {"a": "won", "b": "open", "c": "open"}
    assert event_types(engine, "r1") == [("a", "closed_won"), ("a", "created"), ("b", "created"), ("c", "created")]


def test_a_tie_on_modified_at_goes_to_the_later_staged_row_and_null_modified_loses(engine):
    same = datetime(2026, 2, 1, 9, 0)
    extract = Extract(
        "full",
        [
            (True, [opp("a", modified_at=same), opp("b", amount=7.0, modified_at=same)]),
            (False, [opp("a", status="lost", modified_at=same), opp("b", status="won", modified_at=None)]),
        ],
    )
    sync(engine, "r1", extract, T0)
    assert {sid: r["status"] for sid, r in current(engine).items()} == {"a": "lost", "b": "open"}


def test_reconciling_the_same_extract_twice_changes_nothing(engine):
    sync(engine, "r1", full(opp("a"), opp("b")), T0)
    first = sync(engine, "r2", full(opp("a", amount=3.0), opp("c", status="won")), T1)
    before = snapshot(engine)
    store.acquire_lock(engine, CONNECTION, "r2", T2, LOCK_TTL)
    again = reconcile_extract(engine, "r2", "full", T2)
    store.release_lock(engine, CONNECTION, "r2")
    # sync_runs keeps the counts, not the number of events: the repeat reports what the first run did
    assert {**again.as_dict(), "events": None} == {**first.as_dict(), "events": None}
    assert snapshot(engine) == before


def test_a_second_run_cannot_take_the_lock_while_the_first_holds_it(engine):
    store.acquire_lock(engine, CONNECTION, "r1", T0, LOCK_TTL)
    with pytest.raises(store.LockHeld, match=r"already running \(run r1, since 2026-03-01 09:00:00 UTC"):
        store.acquire_lock(engine, CONNECTION, "r2", T0 + timedelta(minutes=5), LOCK_TTL)
    # nor reconcile without holding it
    stage_extract(engine, "r2", full(opp("a")), T0)
    with pytest.raises(store.LockHeld, match="lost the lock"):
        reconcile_extract(engine, "r2", "full", T0)
    assert current(engine) == {}
    store.release_lock(engine, CONNECTION, "r1")
    store.acquire_lock(engine, CONNECTION, "r2", T0, LOCK_TTL)
    assert reconcile_extract(engine, "r2", "full", T0).created == 1


def test_a_crashed_holder_or_an_expired_lease_is_taken_over(engine):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead_pid = int(dead.stdout)
    with transaction(engine) as conn:
        conn.execute(
            text("INSERT INTO oppsync.sync_locks VALUES (:c, 'r1', :h, :a, :e)"),
            {"c": CONNECTION, "h": f"{socket.gethostname()}:{dead_pid}", "a": T0, "e": T0 + LOCK_TTL},
        )
    store.acquire_lock(engine, CONNECTION, "r2", T0 + timedelta(minutes=1), LOCK_TTL)  # holder's pid is gone
    # a live holder on another host is trusted until its lease expires
    with transaction(engine) as conn:
        conn.execute(text("UPDATE oppsync.sync_locks SET holder = 'elsewhere:1', run_id = 'r2'"))
    with pytest.raises(store.LockHeld):
        store.acquire_lock(engine, CONNECTION, "r3", T0 + timedelta(minutes=2), LOCK_TTL)
    store.acquire_lock(engine, CONNECTION, "r3", T0 + LOCK_TTL + timedelta(minutes=2), LOCK_TTL)
    with transaction(engine) as conn:
        assert conn.execute(text("SELECT run_id FROM oppsync.sync_locks")).scalar() == "r3"


def test_reconcile_refuses_an_extract_that_is_not_complete(engine):
    store.acquire_lock(engine, CONNECTION, "r1", T0, LOCK_TTL)
    store.begin_extract(
        engine, extract_id="r1", connection=CONNECTION, crm="salesforce", mode="full", started_at=T0, since=None
    )
    store.stage_page(engine, "r1", [opp("a")], True, 0)
    with pytest.raises(RuntimeError, match="'running', not complete"):
        reconcile(
            engine,
            extract_id="r1",
            connection=CONNECTION,
            crm="salesforce",
            mode="full",
            run_id="r1",
            observed_at=T0,
            recorded_at=T0,
        )
    assert current(engine) == {}


def _synced_under_mapping_version(engine, version) -> None:
    with transaction(engine) as c:
        c.execute(
            text("UPDATE oppsync.sync_state SET mapping_version = :v WHERE connection = :c"),
            {"v": version, "c": CONNECTION},
        )


@pytest.mark.parametrize("old_version", [None, 1])
def test_a_warehouse_synced_under_an_older_mapping_is_rebaselined_without_update_events(engine, old_version):
    """Stage ids became stage names (mapping version 2): the first sync after the upgrade rewrites the values
    as new versions, with no `updated` / `stage_changed` events for the remapping; a real close in the same
    run is still recorded, and the next run is ordinary again."""
    sync(engine, "r1", full(opp("a", stage="75698714"), opp("b", stage="contractsent")), T0)
    _synced_under_mapping_version(engine, old_version)
    result = sync(
        engine,
        "r2",
        full(
            opp("a", stage="Proposal", stage_id="75698714", crm_status="75698714"),
            opp("b", status="won", stage="Closed Won", stage_id="closedwon", modified_at=MOD2),
        ),
        T1,
    )
    assert event_types(engine, "r2") == [("b", "closed_won")]
    assert (result.updated, result.closed) == (0, 1)
    rows = current(engine)
    assert (rows["a"]["stage"], rows["a"]["version"]) == ("Proposal", 2)
    with transaction(engine) as c:
        warnings, version = c.execute(
            text(
                "SELECT r.warnings, s.mapping_version FROM oppsync.sync_runs r JOIN oppsync.sync_state s "
                "ON s.connection = r.connection WHERE r.run_id = 'r2'"
            )
        ).one()
    assert "re-baselined" in warnings and version == MAPPING_VERSION
    sync(
        engine,
        "r3",
        full(
            opp("a", stage="Negotiation", stage_id="75698715", modified_at=MOD2),
            opp("b", status="won", stage="Closed Won", stage_id="closedwon", modified_at=MOD2),
        ),
        T2,
    )
    assert event_types(engine, "r3") == [("a", "stage_changed")]


def staged_by_extract(engine) -> dict[str, int]:
    with transaction(engine) as c:
        rows = c.execute(
            text("SELECT extract_id, count(*) FROM oppsync.stage_opportunities GROUP BY extract_id")
        ).fetchall()
    return dict(rows)


def test_a_reconciled_extract_leaves_staging_and_another_extracts_rows_stay(engine):
    """Postgres TRUNCATEs staging when the reconciled extract's rows are the only ones (else: DELETE)."""
    sync(engine, "r1", full(opp("a1"), opp("a2")), T0)
    assert staged_by_extract(engine) == {}
    # another connection's run, staged and not reconciled yet
    other = dataclasses.replace(opp("b1"), connection="other")
    stage_extract(engine, "staging-elsewhere", full(other), T1, connection="other")
    sync(engine, "r2", full(opp("a1"), opp("a2"), opp("a3")), T2)
    assert staged_by_extract(engine) == {"staging-elsewhere": 1}
    assert set(current(engine)) == {"a1", "a2", "a3"}


def test_a_reconcile_does_not_wait_for_another_transaction_reading_staging(engine):
    """The exclusive lock for TRUNCATE is asked NOWAIT: with staging in use, the rows are deleted one by one."""
    if engine.dialect.name == "duckdb":
        pytest.skip("DuckDB: one writer per file, no lock to wait for")
    elsewhere = create_engine(engine.url.render_as_string(hide_password=False))
    with elsewhere.connect() as other, other.begin():
        other.execute(text("SELECT count(*) FROM oppsync.stage_opportunities")).scalar()  # holds a share lock
        sync(engine, "r1", full(opp("a1")), T0)
    elsewhere.dispose()
    assert staged_by_extract(engine) == {} and set(current(engine)) == {"a1"}
