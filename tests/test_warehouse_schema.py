"""Schema migrations on real warehouses: a warehouse created by an older version keeps every row.

Migration 3 rebuilds DuckDB's fact tables without ART indexes (they must fit in DuckDB's memory limit while a
transaction writes them; a 1,000,000-opportunity full sync failed on them). Postgres keeps its keys.
"""

from __future__ import annotations

import re
import threading
from datetime import datetime

import pytest
from sqlalchemy import text

from oppsync_pipeline.lib.warehouse.engine import (
    DUCKDB_CATALOG,
    DUCKDB_ROW_GROUP_SIZE,
    ensure_schema,
    make_engine,
    transaction,
)
from oppsync_pipeline.lib.warehouse.schema import (
    FACT_TABLES,
    MIGRATIONS,
    RAW_COMPRESSION,
    RAW_TABLES,
    SCHEMA,
    UPDATED_TABLES_FILLFACTOR,
    schema_migrations,
)

T0 = datetime(2026, 1, 5, 9, 30)


def _migrate_to(engine, version: int) -> None:
    """Build the schema as a release with migrations up to `version` left it."""
    with transaction(engine) as conn:
        conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
        schema_migrations.create(conn, checkfirst=True)
        for number, step in MIGRATIONS:
            if number <= version:
                step(conn)
                conn.execute(schema_migrations.insert().values(version=number, applied_at=T0))


def _seed(engine) -> None:
    with transaction(engine) as conn:
        conn.execute(
            text(f"""
            INSERT INTO {SCHEMA}.opportunities (connection, source_id, crm, status, row_hash, version, first_seen_at,
                                                last_seen_at, project_name, raw)
            VALUES ('c', '001', 'salesforce', 'open', 'h1', 1, :t, :t, 'O''Brien; DROP', '{{"Id": "001"}}'),
                   ('c', '002', 'salesforce', 'won', 'h2', 2, :t, :t, NULL, NULL)"""),
            {"t": T0},
        )
        conn.execute(
            text(f"""
            INSERT INTO {SCHEMA}.opportunity_events (event_id, connection, crm, source_id, event_type, occurred_at,
                                                     recorded_at, run_id)
            VALUES ('r1:001:created', 'c', 'salesforce', '001', 'created', :t, :t, 'r1')"""),
            {"t": T0},
        )
        conn.execute(
            text(f"""
            INSERT INTO {SCHEMA}.opportunity_history (connection, source_id, version, crm, status, row_hash,
                                                      valid_from)
            VALUES ('c', '001', 1, 'salesforce', 'open', 'h1', :t)"""),
            {"t": T0},
        )


def _keys_and_indexes(conn, table: str) -> int:
    if conn.dialect.name == "duckdb":
        return conn.execute(
            text(
                "SELECT (SELECT count(*) FROM duckdb_indexes() WHERE schema_name = :s AND table_name = :t) + "
                "(SELECT count(*) FROM duckdb_constraints() WHERE schema_name = :s AND table_name = :t "
                "AND constraint_type IN ('PRIMARY KEY', 'UNIQUE'))"
            ),
            {"s": SCHEMA, "t": table},
        ).scalar()
    return conn.execute(
        text("SELECT count(*) FROM pg_indexes WHERE schemaname = :s AND tablename = :t"), {"s": SCHEMA, "t": table}
    ).scalar()


def test_an_older_warehouse_is_migrated_without_losing_rows(warehouse_url: str):
    engine = make_engine(warehouse_url)
    _migrate_to(engine, 2)
    _seed(engine)
    with engine.connect() as conn:
        assert _keys_and_indexes(conn, "opportunities") > 0  # the old layout had its keys

    assert ensure_schema(engine) == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert ensure_schema(engine) == []  # once only

    with engine.connect() as conn:
        rows = conn.execute(
            text(
                f"SELECT source_id, status, version, project_name, raw, first_seen_at "
                f"FROM {SCHEMA}.opportunities ORDER BY source_id"
            )
        ).all()
        assert [tuple(r) for r in rows] == [
            ("001", "open", 1, "O'Brien; DROP", '{"Id": "001"}', T0),
            ("002", "won", 2, None, None, T0),
        ]
        assert conn.execute(text(f"SELECT event_id FROM {SCHEMA}.opportunity_events")).scalar() == "r1:001:created"
        assert conn.execute(text(f"SELECT count(*) FROM {SCHEMA}.opportunity_history")).scalar() == 1
        for table in FACT_TABLES:
            if engine.dialect.name == "duckdb":
                assert _keys_and_indexes(conn, table) == 0, table
            else:
                assert _keys_and_indexes(conn, table) > 0, table  # Postgres keeps its B-trees
        # NOT NULL survives the rebuild
        with pytest.raises(Exception, match="(?i)not.null|null value"):
            conn.execute(
                text(
                    f"INSERT INTO {SCHEMA}.opportunities (connection, source_id, crm, status, row_hash, "
                    "version, first_seen_at, last_seen_at) VALUES ('c', NULL, 'x', 'open', 'h', 1, "
                    "current_timestamp, current_timestamp)"
                )
            )


# The columns migration 4 adds (the stage model, token requests, warnings, mapping version).
M4_COLUMNS = [
    ("opportunities", "stage_id"),
    ("opportunities", "crm_status"),
    ("opportunity_history", "stage_id"),
    ("opportunity_history", "crm_status"),
    ("stage_opportunities", "stage_id"),
    ("stage_opportunities", "crm_status"),
    ("extracts", "token_requests"),
    ("extracts", "warnings"),
    ("extracts", "mapping_version"),
    ("sync_runs", "token_requests"),
    ("sync_runs", "warnings"),
    ("sync_state", "mapping_version"),
]


def _columns(conn, table: str) -> set[str]:
    return set(
        conn.execute(
            text("SELECT column_name FROM information_schema.columns WHERE table_schema = :s AND table_name = :t"),
            {"s": SCHEMA, "t": table},
        ).scalars()
    )


def test_a_version_3_warehouse_gets_the_stage_model_columns_and_keeps_its_rows(warehouse_url: str):
    engine = make_engine(warehouse_url)
    _migrate_to(engine, 3)
    with transaction(engine) as conn:  # as release 3 left it: without migration 4's columns
        for table, column in M4_COLUMNS:
            conn.execute(text(f"ALTER TABLE {SCHEMA}.{table} DROP COLUMN {column}"))
    _seed(engine)
    assert ensure_schema(engine) == [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    with engine.connect() as conn:
        for table, column in M4_COLUMNS:
            assert column in _columns(conn, table), (table, column)
        rows = conn.execute(
            text(f"SELECT source_id, status, stage_id, crm_status FROM {SCHEMA}.opportunities ORDER BY source_id")
        ).all()
        assert [tuple(r) for r in rows] == [("001", "open", None, None), ("002", "won", None, None)]


def _raw_compression(conn, table: str) -> str | None:
    """The compression the table's `raw` column is declared with (None: the database's default)."""
    if conn.dialect.name == "duckdb":
        ddl = conn.execute(
            text("SELECT sql FROM duckdb_tables() WHERE schema_name = :s AND table_name = :t"),
            {"s": SCHEMA, "t": table},
        ).scalar()
        found = re.search(r"\braw VARCHAR USING COMPRESSION (\w+)", ddl, re.IGNORECASE)
        return found.group(1).lower() if found else None
    return conn.execute(
        text(
            "SELECT CASE a.attcompression WHEN 'l' THEN 'lz4' WHEN 'p' THEN 'pglz' END FROM pg_attribute a "
            "WHERE a.attrelid = CAST(:t AS regclass) AND a.attname = 'raw'"
        ),
        {"t": f"{SCHEMA}.{table}"},
    ).scalar()


def test_a_version_11_warehouse_compresses_raw_json_and_keeps_its_rows(warehouse_url: str):
    """Migration 12: `raw` (most of the warehouse's bytes) with zstd on DuckDB (rebuilt: a column's compression is
    set only at CREATE); every row, column and NOT NULL kept, and new rows compressed so. Postgres unchanged."""
    engine = make_engine(warehouse_url)
    _migrate_to(engine, 11)
    _seed(engine)
    with engine.connect() as conn:
        before = {t: _columns(conn, t) for t in RAW_TABLES}
        assert all(_raw_compression(conn, t) is None for t in RAW_TABLES)
    assert ensure_schema(engine) == [12, 13, 14]
    duckdb = warehouse_url.startswith("duckdb")
    with engine.connect() as conn:
        for table in RAW_TABLES:
            assert _columns(conn, table) == before[table], table
            assert _raw_compression(conn, table) == (RAW_COMPRESSION if duckdb else None), table
        rows = conn.execute(text(f"SELECT source_id, project_name, raw FROM {SCHEMA}.opportunities ORDER BY 1")).all()
        assert [tuple(r) for r in rows] == [("001", "O'Brien; DROP", '{"Id": "001"}'), ("002", None, None)]
        with pytest.raises(Exception, match="(?i)not.null|null value"):
            conn.execute(
                text(
                    f"INSERT INTO {SCHEMA}.stage_opportunities (extract_id, connection, source_id, seq, in_open_set, "
                    "crm, status, row_hash) VALUES ('x', 'c', NULL, 1, TRUE, 'x', 'open', 'h')"
                )
            )
    if duckdb:  # the rows a sync writes next are stored with zstd
        with transaction(engine) as conn:
            conn.execute(
                text(f"""
                INSERT INTO {SCHEMA}.stage_opportunities (extract_id, connection, source_id, seq, in_open_set, crm,
                                                          status, row_hash, raw)
                SELECT 'x', 'c', CAST(i AS VARCHAR), i, TRUE, 'salesforce', 'open', 'h', repeat('{{"a": 1}}', 100 + i % 7)
                FROM range(5000) t(i)""")
            )
        with engine.connect() as conn:
            methods = conn.execute(
                text(
                    f"SELECT DISTINCT compression FROM pragma_storage_info('{SCHEMA}.stage_opportunities') "
                    "WHERE column_name = 'raw' AND segment_type = 'VARCHAR'"
                )
            ).scalars()
            assert set(methods) == {"ZSTD"}


def test_the_duckdb_warehouse_is_written_in_small_row_groups(duckdb_url: str):
    """Wide rows are buffered one row group per thread while a statement writes them: the engine attaches the
    file with a small row group size so a large first sync fits the memory limit."""
    engine = make_engine(duckdb_url)
    ensure_schema(engine)
    n = DUCKDB_ROW_GROUP_SIZE * 3
    with transaction(engine) as conn:
        assert conn.execute(text("SELECT current_database()")).scalar() == DUCKDB_CATALOG
        conn.execute(
            text(f"""
            INSERT INTO {SCHEMA}.stage_opportunities (extract_id, connection, source_id, seq, in_open_set, crm,
                                                      status, row_hash, raw)
            SELECT 'x', 'c', CAST(i AS VARCHAR), i, TRUE, 'salesforce', 'open', 'h', repeat('r', 500)
            FROM range({n}) t(i)""")
        )
    with engine.connect() as conn:
        groups = conn.execute(
            text(f"SELECT count(DISTINCT row_group_id) FROM pragma_storage_info('{SCHEMA}.stage_opportunities')")
        ).scalar()
    assert groups >= 3


def test_a_version_4_warehouse_gets_one_event_per_kind_and_close_sources(warehouse_url: str):
    """Migration 5 rewrites the overlapping events of the old model (a close wrote closed_*, stage_changed and
    updated; a stage move stage_changed and updated) to one event per kind of change, with change ids."""
    engine = make_engine(warehouse_url)
    _migrate_to(engine, 4)
    _seed(engine)
    with transaction(engine) as conn:
        conn.execute(text(f"UPDATE {SCHEMA}.opportunities SET closed_at = :t WHERE source_id = '002'"), {"t": T0})
        old_events = [  # (run, source, type, changed_fields)
            ("r1", "a", "closed_won", None),
            ("r1", "a", "stage_changed", None),
            ("r1", "a", "updated", "stage,stage_id,status,amount"),
            ("r2", "b", "stage_changed", None),
            ("r2", "b", "updated", "stage"),
            ("r3", "c", "updated", "amount,owner_crm_id"),
            ("r3", "d", "reopened", None),
            ("r3", "d", "stage_changed", None),
            ("r3", "d", "updated", "stage,crm_status,status"),
        ]
        for run, sid, kind, fields in old_events:
            conn.execute(
                text(f"""
                INSERT INTO {SCHEMA}.opportunity_events (event_id, connection, crm, source_id, event_type,
                                                         occurred_at, recorded_at, run_id, changed_fields)
                VALUES (:id, 'c', 'salesforce', :s, :k, :t, :t, :r, :f)"""),
                {"id": f"{run}:{sid}:{kind}", "s": sid, "k": kind, "t": T0, "r": run, "f": fields},
            )
    assert ensure_schema(engine) == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    with engine.connect() as conn:
        rows = conn.execute(
            text(f"SELECT run_id, source_id, event_type, changed_fields, change_id FROM {SCHEMA}.opportunity_events")
        ).all()
        opps = conn.execute(text(f"SELECT source_id, closed_at_source, in_scope FROM {SCHEMA}.opportunities")).all()
    assert sorted(tuple(r) for r in rows) == [
        ("r1", "001", "created", None, "r1:001"),
        ("r1", "a", "closed_won", None, "r1:a"),
        ("r1", "a", "updated", "amount", "r1:a"),
        ("r2", "b", "stage_changed", None, "r2:b"),
        ("r3", "c", "updated", "amount,owner_crm_id", "r3:c"),
        ("r3", "d", "reopened", None, "r3:d"),
    ]
    assert sorted(tuple(r) for r in opps) == [("001", None, True), ("002", "modified_at", True)]


def test_runs_that_start_at_once_on_a_fresh_postgres_warehouse_all_migrate_it(pg_url: str):
    """Connections' first runs start together on a deployment that skipped `oppsync init-db`: they used to race
    on CREATE SCHEMA (a unique violation in pg_namespace) and all but one failed, losing a retry (0-60 s)."""
    engines = [make_engine(pg_url) for _ in range(6)]
    start = threading.Barrier(len(engines))
    errors: list[BaseException] = []

    def first_run(engine) -> None:
        start.wait()
        try:
            ensure_schema(engine)
        except BaseException as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    threads = [threading.Thread(target=first_run, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with engines[0].connect() as c:
        versions = [r[0] for r in c.execute(text(f"SELECT version FROM {SCHEMA}.schema_migrations ORDER BY version"))]
    assert versions == [v for v, _ in MIGRATIONS]  # each applied once
    for e in engines:
        e.dispose()


def test_postgres_staging_is_indexed_by_extract_and_seq(pg_url: str):
    """Migration 13: the reconcile finds a record's staged row by (extract_id, seq), one index lookup however stale
    the planner's statistics of the staging table (the extract_id index alone made each lookup a scan of the
    whole extract). A fresh warehouse has it too; the old index is gone."""
    engine = make_engine(pg_url)
    _migrate_to(engine, 12)
    with transaction(engine) as conn:  # as release 12 left it: staging indexed by extract_id alone
        conn.execute(text(f"DROP INDEX {SCHEMA}.ix_stage_opp_extract_seq"))
        conn.execute(text(f"CREATE INDEX ix_stage_opp_extract ON {SCHEMA}.stage_opportunities (extract_id)"))
    assert ensure_schema(engine) == [13, 14]
    with engine.connect() as conn:
        indexes = _stage_indexes(conn)
    assert "ix_stage_opp_extract" not in indexes
    assert "(extract_id, seq)" in indexes["ix_stage_opp_extract_seq"]


def _stage_indexes(conn) -> dict[str, str]:
    rows = conn.execute(
        text("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = :s AND tablename = 'stage_opportunities'"),
        {"s": SCHEMA},
    )
    return {str(name): str(definition) for name, definition in rows}


def test_postgres_reconcile_updates_are_heap_only_on_a_migrated_warehouse(pg_url: str):
    """Migration 14: closing a record's current version (valid_to) and rewriting its current row are HOT updates
    (no index entry written), which they could not be while `ix_history_open` indexed valid_to and the pages were
    full. A warehouse release 13 left is migrated: the index goes, both tables keep room on their pages."""
    engine = make_engine(pg_url)
    _migrate_to(engine, 13)
    with transaction(engine) as conn:  # as release 13 left it
        conn.execute(
            text(f"CREATE INDEX ix_history_open ON {SCHEMA}.opportunity_history (connection, source_id, valid_to)")
        )
    assert ensure_schema(engine) == [14]
    with transaction(engine) as conn:
        assert "ix_history_open" not in {
            r[0] for r in conn.execute(text("SELECT indexname FROM pg_indexes WHERE schemaname = :s"), {"s": SCHEMA})
        }
        options = dict(
            conn.execute(
                text(
                    "SELECT c.relname, c.reloptions FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = :s AND c.relname IN ('opportunities', 'opportunity_history')"
                ),
                {"s": SCHEMA},
            ).all()
        )
        assert options == {t: [f"fillfactor={UPDATED_TABLES_FILLFACTOR}"] for t in options} and len(options) == 2
        for i in range(200):  # rows inserted after the migration: their pages keep room
            conn.execute(
                text(f"""
                INSERT INTO {SCHEMA}.opportunities (connection, source_id, crm, status, row_hash, version,
                                                    first_seen_at, last_seen_at, raw)
                VALUES ('c', :id, 'salesforce', 'open', 'h1', 1, :t, :t, :raw)"""),
                {"id": f"{i:03}", "t": T0, "raw": "x" * 300},
            )
            conn.execute(
                text(f"""
                INSERT INTO {SCHEMA}.opportunity_history (connection, source_id, version, crm, status, row_hash,
                                                          valid_from)
                VALUES ('c', :id, 1, 'salesforce', 'open', 'h1', :t)"""),
                {"id": f"{i:03}", "t": T0},
            )
    with transaction(engine) as conn:
        # what the reconcile does to a tenth of the records a run changed (history_close.sql, current_update.sql)
        changed = {"ids": [f"{i:03}" for i in range(0, 200, 10)]}
        conn.execute(
            text(
                f"UPDATE {SCHEMA}.opportunity_history SET valid_to = :t "
                "WHERE connection = 'c' AND valid_to IS NULL AND source_id = ANY(:ids)"
            ),
            {**changed, "t": T0},
        )
        conn.execute(
            text(
                f"UPDATE {SCHEMA}.opportunities SET status = 'won', row_hash = 'h2', version = 2 "
                "WHERE connection = 'c' AND source_id = ANY(:ids)"
            ),
            changed,
        )
        counts = {  # this transaction's own counts
            name: (updated, hot)
            for name, updated, hot in conn.execute(
                text(
                    "SELECT relname, n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables "
                    "WHERE schemaname = :s AND relname IN ('opportunities', 'opportunity_history')"
                ),
                {"s": SCHEMA},
            )
        }
    assert counts == {"opportunities": (20, 20), "opportunity_history": (20, 20)}
    engine.dispose()
