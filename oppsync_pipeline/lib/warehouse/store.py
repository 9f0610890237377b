"""The warehouse as the sync, the Dagster definitions and the command line use it: one module to import.

Each role lives in its own module (lease.py, runs.py, directory.py, ../staging.py); their public functions are
named here so that callers, and the crash tests that stop a run inside them, reach them as `store.<name>`.
What is left here are the reads the sync and the checks make of a run's records.

Every statement uses bound parameters; table and column names come from schema.py, never from input.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import distinct, func, select, text
from sqlalchemy.engine import Engine

from oppsync_pipeline.lib.staging import (  # noqa: F401  (the warehouse's public interface)
    DUCKDB_ROW_HASH,
    SCOPE_BEFORE_STAGE,
    SCOPE_FILTERED_OUT,
    SCOPE_IN,
    STAGE_COLUMNS,
    StagingWriter,
    stage_deletes,
    stage_page,
    staged_rows,
    write_staged,
)
from oppsync_pipeline.lib.warehouse.dialect import bulk_insert
from oppsync_pipeline.lib.warehouse.directory import save_directory, save_stages, save_users  # noqa: F401
from oppsync_pipeline.lib.warehouse.engine import transaction
from oppsync_pipeline.lib.warehouse.lease import (  # noqa: F401
    LockHeld,
    _pid_alive,
    acquire_lock,
    assert_lock,
    holder_id,
    release_lock,
)
from oppsync_pipeline.lib.warehouse.lookups import open_lookups  # noqa: F401
from oppsync_pipeline.lib.warehouse.runs import (  # noqa: F401
    SyncState,
    begin_extract,
    finish_extract,
    get_state,
    load_extract,
    paused_extract,
    save_completeness,
    state_mapping_version,
)
from oppsync_pipeline.lib.warehouse.schema import SCHEMA as S
from oppsync_pipeline.lib.warehouse.schema import opportunities, quarantine, stage_opportunities


def missing_ids(engine: Engine, extract_id: str, connection: str) -> list[str]:
    """The connection's opportunities not deleted in the warehouse that this extract did not stage: a full
    sync reads them by id to tell the ones that left its scope from the ones the CRM no longer has."""
    with transaction(engine) as conn:
        return list(
            conn.execute(
                text(f"""
            SELECT o.source_id FROM {S}.opportunities o
            WHERE o.connection = :c AND o.deleted_at IS NULL
              AND NOT EXISTS (SELECT 1 FROM {S}.stage_opportunities s
                              WHERE s.extract_id = :x AND s.source_id = o.source_id)
              AND NOT EXISTS (SELECT 1 FROM {S}.quarantine q
                              WHERE q.extract_id = :x AND q.source_id = o.source_id)
            ORDER BY o.source_id"""),
                {"c": connection, "x": extract_id},
            ).scalars()
        )


def save_quarantine(engine: Engine, extract_id: str, connection: str, entries: Sequence[Any], now: datetime) -> int:
    """Set records aside (quarantine.Quarantined): they stay out of staging; the reconcile neither updates nor
    deletes them."""
    if not entries:
        return 0
    with transaction(engine) as conn:
        return bulk_insert(
            conn,
            f"{S}.quarantine",
            ["extract_id", "connection", "crm", "source_id", "field", "reason", "value", "quarantined_at"],
            [(extract_id, connection, q.crm, q.source_id, q.field, q.reason, q.value, now) for q in entries],
        )


def quarantined(engine: Engine, extract_id: str, limit: int = 20) -> tuple[int, list[dict[str, Any]]]:
    """How many distinct records an extract quarantined, and the first entries (id, field, reason)."""
    q = quarantine.c
    with transaction(engine) as conn:
        n = (
            conn.execute(
                select(func.count(distinct(func.coalesce(q.source_id, "")))).where(q.extract_id == extract_id)
            ).scalar()
            or 0
        )
        rows = conn.execute(
            select(q.source_id, q.field, q.reason)
            .where(q.extract_id == extract_id)
            .order_by(q.source_id, q.field)
            .limit(limit)
        ).mappings()
        return n, [dict(r) for r in rows]


def staged_count(engine: Engine, extract_id: str) -> int:
    """Distinct records an extract staged."""
    s = stage_opportunities.c
    with transaction(engine) as conn:
        return conn.execute(select(func.count(distinct(s.source_id))).where(s.extract_id == extract_id)).scalar() or 0


def live_count(engine: Engine, connection: str) -> int:
    """The connection's opportunities the warehouse holds as not deleted."""
    o = opportunities.c
    with transaction(engine) as conn:
        return (
            conn.execute(select(func.count()).where(o.connection == connection, o.deleted_at.is_(None))).scalar() or 0
        )


def warehouse_counts(engine: Engine, connection: str) -> dict[str, int]:
    """Live, in-scope opportunities of a connection by status (for the post-reconcile count check)."""
    o = opportunities.c
    with transaction(engine) as conn:
        rows = conn.execute(
            select(o.status, func.count())
            .where(o.connection == connection, o.deleted_at.is_(None), o.in_scope.is_not(False))
            .group_by(o.status)
        ).fetchall()
    return dict(rows)


def attribution_gaps(engine: Engine, connection: str) -> dict[str, Any]:
    """Share of live opportunities whose creator links to no internal user, and stages the tenant's stage
    list does not know (WARN checks: visible, never blocking)."""
    with transaction(engine) as conn:
        total = (
            conn.execute(
                text(f"SELECT count(*) FROM {S}.opportunities WHERE connection = :c AND deleted_at IS NULL"),
                {"c": connection},
            ).scalar()
            or 0
        )
        # A link names any id of the person (ConnectWise: the member id or its identifier; HubSpot: the owner
        # id or the user id): both sides are matched through crm_users' alt_ids, as the mart's attribution does.
        unmapped = (
            conn.execute(
                text(f"""
            SELECT count(*) FROM {S}.opportunities o
            WHERE o.connection = :c AND o.deleted_at IS NULL AND NOT EXISTS (
                SELECT 1 FROM {S}.user_links l WHERE l.connection = o.connection
                  AND l.crm_user_id = o.created_by_crm_id)
              AND NOT EXISTS (
                SELECT 1 FROM {S}.user_links l
                JOIN {S}.crm_users u ON u.connection = l.connection
                  AND (u.crm_user_id = l.crm_user_id
                       OR ',' || COALESCE(u.alt_ids, '') || ',' LIKE '%,' || l.crm_user_id || ',%')
                WHERE l.connection = o.connection AND (u.crm_user_id = o.created_by_crm_id
                      OR ',' || COALESCE(u.alt_ids, '') || ',' LIKE '%,' || o.created_by_crm_id || ',%'))"""),
                {"c": connection},
            ).scalar()
            or 0
        )
        unknown = conn.execute(
            text(f"""
            SELECT o.stage, count(*) FROM {S}.opportunities o
            WHERE o.connection = :c AND o.deleted_at IS NULL AND NOT EXISTS (
                SELECT 1 FROM {S}.crm_stages s WHERE s.connection = o.connection
                  AND s.stage_key = COALESCE(o.stage_id, o.stage))
            GROUP BY o.stage ORDER BY 2 DESC"""),
            {"c": connection},
        ).fetchall()
    return {"total": total, "unmapped_creators": unmapped, "unknown_stages": {str(stage): n for stage, n in unknown}}
