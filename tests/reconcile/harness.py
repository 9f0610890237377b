"""Drive the reconcile engine the way the sync layer does, without a CRM, and read back what it wrote.

A sync here is: take the lock, stage pages of canonical records (open set first, then the not-open set)
and optional native delete-feed entries, mark the extract complete, reconcile, release the lock.
`snapshot` reads the current table, the event log and the history in a backend-neutral, sorted form,
so two warehouses (or the engine and the reference model) can be compared with ==.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

from oppsync_pipeline.lib.reconcile import ReconcileResult, reconcile
from oppsync_pipeline.lib.record import CANONICAL, Opportunity
from oppsync_pipeline.lib.warehouse import store
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine, transaction

CONNECTION = "c1"
CRM = "salesforce"
LOCK_TTL = timedelta(hours=1)
T0 = datetime(2026, 3, 1, 9, 0)

# Every oppsync table a reconcile writes or reads (emptied between property-test examples).
TABLES = (
    "opportunities",
    "opportunity_history",
    "opportunity_events",
    "stage_opportunities",
    "stage_deletes",
    "extracts",
    "sync_runs",
    "sync_state",
    "sync_locks",
)

# The canonical columns (record.CANONICAL; `crm` is the harness's one CRM), then the warehouse's own.
RECORD_COLUMNS = tuple(c for c in CANONICAL if c != "crm")
CURRENT_COLUMNS = (
    "source_id",
    *RECORD_COLUMNS,
    "row_hash",
    "version",
    "first_seen_at",
    "last_seen_at",
    "closed_at",
    "closed_at_source",
    "deleted_at",
    "last_run_id",
    "in_scope",
    "scope_changed_at",
)
EVENT_COLUMNS = (
    "run_id",
    "source_id",
    "event_type",
    "occurred_at",
    "recorded_at",
    "changed_fields",
    "old_value",
    "new_value",
    "owner_crm_id",
    "created_by_crm_id",
    "amount",
    "status",
    "change_id",
)
HISTORY_COLUMNS = ("source_id", "version", *RECORD_COLUMNS, "row_hash", "valid_from", "valid_to", "run_id")


def open_engine(url: str) -> Engine:
    """An engine on a migrated warehouse. DuckDB keeps one connection open (as a long-lived process
    would): the production engine reopens the file per transaction (~0.1 s each), which would make
    these many small syncs slow without testing anything more of the engine."""
    engine = (
        create_engine(url, poolclass=QueuePool, pool_size=1, max_overflow=0)
        if url.startswith("duckdb:")
        else make_engine(url)
    )
    ensure_schema(engine)
    return engine


@contextmanager
def warehouse_database(backend: str, tmp_dir: Path) -> Iterator[str]:
    """A warehouse URL for a whole test module (creating a Postgres database costs ~1 s; tests share it and
    empty the oppsync tables instead)."""
    # imported here: the crash test's child process imports this module and must start fast
    from tests.conftest import warehouse_database as shared

    with shared(backend, tmp_dir) as url:
        yield url


@contextmanager
def migrated_engine(backend: str, tmp_dir: Path) -> Iterator[Engine]:
    """`open_engine` on a module's warehouse, disposed afterwards."""
    with warehouse_database(backend, tmp_dir) as url:
        engine = open_engine(url)
        try:
            yield engine
        finally:
            engine.dispose()


def opp(
    source_id: str,
    *,
    status: str = "open",
    stage: str | None = None,
    amount: float | None = 1000.0,
    modified_at: datetime | None = datetime(2026, 2, 1, 12, 0),
    created_at: datetime | None = None,
    **fields: Any,
) -> Opportunity:
    """A canonical record with plausible defaults; any canonical field can be overridden."""
    values: dict[str, Any] = dict(
        project_name=f"Project {source_id}",
        client_name="Acme",
        service_location="Austin",
        sales_executive="Dana",
        owner_crm_id="u1",
        currency="USD",
        close_date=date(2026, 6, 30),
        probability=20.0,
        created_by_crm_id="u2",
    )
    values.update(fields)
    stage = stage or {"open": "Prospecting", "won": "Closed Won", "lost": "Closed Lost"}[status]
    return Opportunity(
        CONNECTION,
        CRM,
        source_id,
        stage=stage,
        status=status,
        amount=amount,
        created_at=created_at or datetime(2026, 1, 15, 8, 30),
        modified_at=modified_at,
        raw={"Id": source_id},
        **values,
    )


@dataclass
class Extract:
    """What one extract staged: pages as (in_open_set, records), native delete-feed entries, and the scope
    verdict (store.SCOPE_*) of staged records that are not simply in scope, by id."""

    mode: str = "full"
    pages: list[tuple[bool, Sequence[Opportunity]]] = field(default_factory=list)
    deletes: list[tuple[str, datetime | None]] = field(default_factory=list)
    scopes: dict[str, str] = field(default_factory=dict)

    def scope_of(self, source_id: str) -> str:
        return self.scopes.get(source_id, store.SCOPE_IN)


def stage_extract(
    engine: Engine, extract_id: str, extract: Extract, started_at: datetime, connection: str = CONNECTION
) -> None:
    store.begin_extract(
        engine,
        extract_id=extract_id,
        connection=connection,
        crm=CRM,
        mode=extract.mode,
        started_at=started_at,
        since=None,
    )
    seq = 0
    writer = store.StagingWriter(engine, extract_id)
    for in_open_set, page in extract.pages:
        writer.add(page, in_open_set, seq, [extract.scope_of(o.source_id) for o in page])
        seq += len(page)
    writer.flush()
    if extract.deletes:
        store.stage_deletes(engine, extract_id, connection, extract.deletes)
    store.finish_extract(engine, extract_id, status="complete", finished_at=started_at)


def reconcile_extract(
    engine: Engine, run_id: str, mode: str, at: datetime, max_delete_share: float = 0.5
) -> ReconcileResult:
    """Reconcile an already staged, complete extract (run_id == extract_id, as in the sync layer)."""
    return reconcile(
        engine,
        extract_id=run_id,
        connection=CONNECTION,
        crm=CRM,
        mode=mode,
        run_id=run_id,
        observed_at=at,
        recorded_at=at + timedelta(minutes=1),
        max_delete_share=max_delete_share,
    )


def sync(engine: Engine, run_id: str, extract: Extract, at: datetime, max_delete_share: float = 0.5) -> ReconcileResult:
    """One whole sync: lock, stage, reconcile, unlock (the lock is released whatever happens)."""
    store.acquire_lock(engine, CONNECTION, run_id, at, LOCK_TTL)
    try:
        stage_extract(engine, run_id, extract, at)
        return reconcile_extract(engine, run_id, extract.mode, at, max_delete_share)
    finally:
        store.release_lock(engine, CONNECTION, run_id)


def full(*records: Opportunity, closed: Sequence[Opportunity] = (), **kw: Any) -> Extract:
    """A full extract: open records on one page, not-open ones on another."""
    return Extract(
        "full",
        [
            (True, [r for r in records if r.status == "open"]),
            (False, [r for r in records if r.status != "open"] + list(closed)),
        ],
        **kw,
    )


def incremental(*records: Opportunity, **kw: Any) -> Extract:
    return Extract(
        "incremental",
        [(True, [r for r in records if r.status == "open"]), (False, [r for r in records if r.status != "open"])],
        **kw,
    )


def _rows(engine: Engine, table: str, columns: Sequence[str], order: str) -> list[dict[str, Any]]:
    """Rows sorted in Python (the two backends' collations need not agree on text order)."""
    keys = [k.strip() for k in order.split(",")]
    with transaction(engine) as conn:
        result = conn.execute(
            text(f"SELECT {', '.join(columns)} FROM oppsync.{table} WHERE connection = :c"), {"c": CONNECTION}
        )
        rows = [dict(r._mapping) for r in result]
    return sorted(rows, key=lambda r: tuple(r[k] for k in keys))


def current(engine: Engine) -> dict[str, dict[str, Any]]:
    return {r["source_id"]: r for r in _rows(engine, "opportunities", CURRENT_COLUMNS, "source_id")}


def events(engine: Engine, run_id: str | None = None) -> list[dict[str, Any]]:
    rows = _rows(engine, "opportunity_events", EVENT_COLUMNS, "run_id, source_id, event_type")
    return [r for r in rows if run_id is None or r["run_id"] == run_id]


def history(engine: Engine) -> list[dict[str, Any]]:
    return _rows(engine, "opportunity_history", HISTORY_COLUMNS, "source_id, version")


def snapshot(engine: Engine) -> dict[str, Any]:
    """Everything a reconcile leaves behind that a re-run or another backend must reproduce exactly."""
    with transaction(engine) as conn:
        state = conn.execute(
            text(
                "SELECT connection, cursor, last_full_sync_at, last_success_at, last_run_id "
                "FROM oppsync.sync_state ORDER BY connection"
            )
        ).fetchall()
        runs = conn.execute(
            text(
                "SELECT run_id, status, fetched, created, updated, closed, reopened, deleted, "
                "restored, skipped FROM oppsync.sync_runs ORDER BY run_id"
            )
        ).fetchall()
        extracts = conn.execute(text("SELECT extract_id, status FROM oppsync.extracts ORDER BY 1")).fetchall()
        staged = conn.execute(text("SELECT count(*) FROM oppsync.stage_opportunities")).scalar()
        staged_deletes = conn.execute(text("SELECT count(*) FROM oppsync.stage_deletes")).scalar()
    return {
        "current": current(engine),
        "events": events(engine),
        "history": history(engine),
        "sync_state": [tuple(r) for r in state],
        "sync_runs": [tuple(r) for r in runs],
        "extracts": [tuple(r) for r in extracts],
        "staged": staged,
        "staged_deletes": staged_deletes,
    }


def empty_tables(engine: Engine) -> None:
    """Reset the warehouse between examples (schema kept: creating it is the slow part on Postgres)."""
    with transaction(engine) as conn:
        for table in TABLES:
            conn.execute(text(f"DELETE FROM oppsync.{table}"))


def event_types(engine: Engine, run_id: str) -> list[tuple[str, str]]:
    return sorted((e["source_id"], e["event_type"]) for e in events(engine, run_id))
