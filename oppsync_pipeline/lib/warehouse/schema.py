"""The `oppsync` schema, and its migrations.

Tables are defined once with SQLAlchemy Core, so DuckDB and Postgres get the same DDL. Migrations are
numbered steps recorded in `oppsync.schema_migrations`; each runs once, in a transaction, and only ever
adds (raw tables are additive-only: a CRM schema change never drops data, docs/peer-tools.md item 4).
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Double,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.engine import Connection

from oppsync_pipeline.lib.record import FIELDS
from oppsync_pipeline.lib.warehouse import dialect

SCHEMA = "oppsync"
metadata = MetaData(schema=SCHEMA)


def _canonical_columns() -> list[Column]:
    """The canonical record's columns (record.FIELDS), in each table that holds the record."""
    return [Column(f.name, f.sql_type, nullable=f.nullable) for f in FIELDS]


opportunities = Table(
    "opportunities",
    metadata,
    Column("connection", String, nullable=False),
    Column("source_id", String, nullable=False),
    *_canonical_columns(),
    Column("raw", Text),
    Column("row_hash", String, nullable=False),
    Column("version", Integer, nullable=False),
    Column("first_seen_at", DateTime, nullable=False),
    Column("last_seen_at", DateTime, nullable=False),
    Column("closed_at", DateTime),
    Column("deleted_at", DateTime),
    Column("last_run_id", String),
    # where closed_at came from: the CRM field (crm_closed_at_field), else `modified_at` or `observed`
    Column("closed_at_source", String),
    # False once the record left the connection's scope (a filter no longer matches it): kept, not tracked
    Column("in_scope", Boolean),
    Column("scope_changed_at", DateTime),
    PrimaryKeyConstraint("connection", "source_id"),
)

opportunity_history = Table(
    "opportunity_history",
    metadata,
    Column("connection", String, nullable=False),
    Column("source_id", String, nullable=False),
    Column("version", Integer, nullable=False),
    *_canonical_columns(),
    Column("row_hash", String, nullable=False),
    Column("valid_from", DateTime, nullable=False),
    Column("valid_to", DateTime),
    Column("run_id", String),
    # No index on valid_to (migration 14): the primary key's (connection, source_id) prefix finds a record's
    # versions, and closing the current one can then be a HOT update
    PrimaryKeyConstraint("connection", "source_id", "version"),
)

opportunity_events = Table(
    "opportunity_events",
    metadata,
    Column("event_id", String, primary_key=True),
    Column("connection", String, nullable=False),
    Column("crm", String, nullable=False),
    Column("source_id", String, nullable=False),
    Column("event_type", String, nullable=False),
    Column("occurred_at", DateTime),
    Column("recorded_at", DateTime, nullable=False),
    Column("run_id", String, nullable=False),
    Column("changed_fields", Text),
    Column("old_value", Text),
    Column("new_value", Text),
    Column("owner_crm_id", String),
    Column("created_by_crm_id", String),
    Column("amount", Double),
    Column("status", String),
    Column("change_id", String),  # the events one observed CRM edit produced share it
    Index("ix_events_conn_source", "connection", "source_id"),
)

stage_opportunities = Table(
    "stage_opportunities",
    metadata,
    Column("extract_id", String, nullable=False),
    Column("connection", String, nullable=False),
    Column("source_id", String, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("in_open_set", Boolean, nullable=False),
    Column("scope", String),  # in | filtered_out | before_stage (store.SCOPE_*)
    *_canonical_columns(),
    Column("raw", Text),
    Column("row_hash", String, nullable=False),
    # (extract_id, seq): the reconcile finds the staged row of each new or changed record by seq (Postgres only:
    # DuckDB's fact tables keep no index, migration 3)
    Index("ix_stage_opp_extract_seq", "extract_id", "seq"),
)

stage_deletes = Table(
    "stage_deletes",
    metadata,
    Column("extract_id", String, nullable=False),
    Column("connection", String, nullable=False),
    Column("source_id", String, nullable=False),
    Column("deleted_at", DateTime),
)

extracts = Table(
    "extracts",
    metadata,
    Column("extract_id", String, primary_key=True),
    Column("connection", String, nullable=False),
    Column("crm", String, nullable=False),
    Column("mode", String, nullable=False),
    Column("status", String, nullable=False),  # runs.ExtractStatus (running, complete, paused, reconciled ...)
    Column("started_at", DateTime, nullable=False),
    Column("finished_at", DateTime),
    Column("since_cursor", DateTime),
    Column("new_cursor", DateTime),
    Column("fetched_open", Integer),
    Column("fetched_closed", Integer),
    Column("fetched_deleted", Integer),
    # distinct ids by status as the CRM reported them (latest version per id): the count check's reference
    Column("reported_open", Integer),
    Column("reported_closed", Integer),
    Column("api_requests", Integer),
    Column("retries", Integer),
    Column("seconds_waited", Double),
    Column("quota_used", Integer),
    Column("quota_limit", Integer),
    Column("error", Text),
    Column("new_resume_token", Text),
    Column("resume_state", Text),  # JSON: where a paused full read continues (sync.ResumeState)
    Column("token_requests", Integer),
    Column("warnings", Text),
    Column("mapping_version", Integer),
    Column("scope_fingerprint", String),
    Column("scope", Text),  # the scope the extract read (scope.py)
    # A full read's completeness: the CRM's own count of each set and the distinct records it delivered;
    # deletes are inferred only when every set delivered at least what the CRM counts (`deletes_inferable`).
    Column("crm_count_open", Integer),
    Column("crm_count_closed", Integer),
    Column("received_open", Integer),
    Column("received_closed", Integer),
    Column("deletes_inferable", Boolean),
    Column("quarantined", Integer),
    Column("crm_clock", DateTime),  # the CRM's clock at the run's start (Date header): "the future" is judged by it
)

sync_runs = Table(
    "sync_runs",
    metadata,
    Column("run_id", String, primary_key=True),
    Column("connection", String, nullable=False),
    Column("crm", String, nullable=False),
    Column("mode", String, nullable=False),
    Column("started_at", DateTime, nullable=False),
    Column("finished_at", DateTime),
    Column("status", String, nullable=False),  # success | failed | skipped | paused | refused
    Column("fetched", Integer),
    Column("created", Integer),
    Column("updated", Integer),
    Column("closed", Integer),
    Column("reopened", Integer),
    Column("deleted", Integer),
    Column("restored", Integer),
    Column("skipped", Integer),  # fetched rows that were unchanged (not rewritten)
    Column("api_requests", Integer),
    Column("retries", Integer),
    Column("seconds_waited", Double),
    Column("quota_used", Integer),
    Column("quota_limit", Integer),
    Column("error", Text),
    # OAuth / session token requests (also counted in api_requests: the CRM counts them too)
    Column("token_requests", Integer),
    Column("warnings", Text),  # optional reads that were refused (403/404) and the fallback used, one a line
    # counts of the other event kinds (each count is the number of events of its kind)
    Column("stage_changed", Integer),
    Column("left_scope", Integer),
    Column("entered_scope", Integer),
    Column("scope_fingerprint", String),
    Column("quarantined", Integer),  # records set aside (oppsync.quarantine), neither synced nor deleted
)

# Records a run set aside: they failed validation (quarantine.py), with the field and the reason. Kept per run
# (the extract's id) for diagnosis; a record fixed in the CRM simply stops appearing.
quarantine = Table(
    "quarantine",
    metadata,
    Column("extract_id", String, nullable=False),
    Column("connection", String, nullable=False),
    Column("crm", String, nullable=False),
    Column("source_id", String),
    Column("field", String, nullable=False),
    Column("reason", Text, nullable=False),
    Column("value", Text),
    Column("quarantined_at", DateTime, nullable=False),
)

# Every field a revenue write-back planned, wrote, refused or failed to write (lib/writeback), one row each; rows
# refused by the input contract have no field. The last `written` value per field is the baseline a later run
# compares the CRM with, to tell someone else's edit (a conflict) from our own.
writeback_log = Table(
    "writeback_log",
    metadata,
    Column("log_id", String, primary_key=True),
    Column("run_id", String, nullable=False),
    Column("connection", String, nullable=False),
    Column("crm", String, nullable=False),
    Column("opportunity_id", String),
    Column("field", String),
    Column("before", Text),  # JSON of the CRM's value before (null: the field or its record did not exist)
    Column("after", Text),  # JSON of the value written (or that would be, in a dry run)
    # planned (dry run) | written | not_applied (the CRM kept another value) | conflict | failed | invalid
    # | not_attempted (the quota ran out first) | unchanged | skipped (one row per opportunity, no field)
    Column("status", String, nullable=False),
    Column("error", Text),
    Column("trigger", String, nullable=False),  # manual | automatic
    Column("logged_at", DateTime, nullable=False),
    Index("ix_writeback_log_opp", "connection", "opportunity_id", "field"),
)

sync_state = Table(
    "sync_state",
    metadata,
    Column("connection", String, primary_key=True),
    Column("cursor", DateTime),
    Column("last_full_sync_at", DateTime),
    Column("last_success_at", DateTime),
    Column("last_run_id", String),
    Column("resume_token", Text),  # a CRM's own change cursor to carry between runs (Dataverse delta link)
    Column("mapping_version", Integer),  # record.MAPPING_VERSION of the last successful sync
    Column("scope_fingerprint", String),
    Column("scope", Text),  # the scope of the last successful sync
)

sync_locks = Table(
    "sync_locks",
    metadata,
    Column("connection", String, primary_key=True),
    Column("run_id", String, nullable=False),
    Column("holder", String, nullable=False),  # host:pid, to recognise a crashed holder on this host
    Column("acquired_at", DateTime, nullable=False),
    Column("expires_at", DateTime, nullable=False),
)

crm_users = Table(
    "crm_users",
    metadata,
    Column("connection", String, nullable=False),
    Column("crm_user_id", String, nullable=False),
    Column("name", Text),
    Column("email", Text),
    Column("kind", String),
    Column("active", Boolean),
    Column("alt_ids", Text),
    Column("updated_at", DateTime),
    PrimaryKeyConstraint("connection", "crm_user_id"),
)

crm_stages = Table(
    "crm_stages",
    metadata,
    Column("connection", String, nullable=False),
    Column("stage_key", String, nullable=False),
    Column("label", Text),
    Column("pipeline", Text),
    Column("is_closed", Boolean),
    Column("is_won", Boolean),
    Column("sort_order", Integer),
    Column("probability", Double),
    Column("category", String, nullable=False),  # open | won | lost, after the connection's stage mapping
    PrimaryKeyConstraint("connection", "stage_key"),
)

users = Table(
    "users",
    metadata,
    Column("user_id", String, primary_key=True),
    Column("name", Text, nullable=False),
    Column("email", Text),
)

user_links = Table(
    "user_links",
    metadata,
    Column("user_id", String, nullable=False),
    Column("connection", String, nullable=False),
    Column("crm_user_id", String, nullable=False),
    Column("link_order", Integer, nullable=False),  # first linked wins when several users share a CRM user
    Column("linked_at", DateTime, nullable=False),
    PrimaryKeyConstraint("user_id", "connection", "crm_user_id"),
)

connections = Table(
    "connections",
    metadata,
    Column("name", String, primary_key=True),
    Column("crm", String, nullable=False),
    Column("qualified_stages", Text),
    Column("qualified_min_probability", Double),
    Column("updated_at", DateTime),
)

# Dictionary entries a connector keeps between runs (lib/crm/lookups.py): companies, contacts, sites ... read
# once and reused by the next incremental syncs; a full sync replaces a connection's entries.
crm_lookups = Table(
    "crm_lookups",
    metadata,
    Column("connection", String, nullable=False),
    Column("kind", String, nullable=False),
    Column("lookup_key", String, nullable=False),
    Column("value", Text, nullable=False),  # JSON
    Column("read_at", DateTime, nullable=False),
    PrimaryKeyConstraint("connection", "kind", "lookup_key"),
)

schema_migrations = Table(
    "schema_migrations",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("applied_at", DateTime, nullable=False),
)


def _m1_initial(conn: Connection) -> None:
    for table in metadata.sorted_tables:
        if table.name != "schema_migrations":
            table.create(conn, checkfirst=True)


def _m2_resume_tokens(conn: Connection) -> None:
    for table, column in (("sync_state", "resume_token"), ("extracts", "new_resume_token")):
        conn.execute(text(f"ALTER TABLE {SCHEMA}.{table} ADD COLUMN IF NOT EXISTS {column} TEXT"))


# The tables that grow with the CRM (one row per opportunity, version, event or staged record).
FACT_TABLES = ("opportunities", "opportunity_history", "opportunity_events", "stage_opportunities")


def _unindexed_copy(table: Table, name: str) -> Table:
    """The table's columns (types, NOT NULL) without its primary key or indexes."""
    columns = [Column(c.name, c.type, nullable=c.nullable) for c in table.columns]
    return Table(name, MetaData(schema=SCHEMA), *columns)


def _m3_duckdb_fact_tables_without_art(conn: Connection) -> None:
    """DuckDB only: rebuild the fact tables without primary keys or indexes.

    DuckDB enforces keys with ART indexes that must fit in its memory limit while a transaction writes them
    and are not spilled: a full sync of 1,000,000 opportunities writes about 5 million index entries in one
    transaction and failed with "Out of Memory" under a 192 MB limit. DuckDB joins by hashing, so it never
    needs them to be fast; uniqueness is the reconcile's job (one row per id out of its dedupe window,
    versions numbered from the current row, event ids from run, id and type), checked by its property
    test and by the mart's dbt tests. Postgres keeps its keys: B-trees live on disk.
    """
    if not dialect.is_duckdb(conn):
        return
    for name in FACT_TABLES:
        has_index = conn.execute(
            text("SELECT count(*) FROM duckdb_indexes() WHERE schema_name = :s AND table_name = :t"),
            {"s": SCHEMA, "t": name},
        ).scalar()
        has_key = conn.execute(
            text(
                "SELECT count(*) FROM duckdb_constraints() WHERE schema_name = :s AND table_name = :t "
                "AND constraint_type IN ('PRIMARY KEY', 'UNIQUE')"
            ),
            {"s": SCHEMA, "t": name},
        ).scalar()
        if not has_index and not has_key:
            continue
        rebuilt = _unindexed_copy(metadata.tables[f"{SCHEMA}.{name}"], f"{name}__m3")
        rebuilt.create(conn)
        # the columns the old table has (later migrations add theirs; the copy leaves them NULL)
        existing = set(
            conn.execute(
                text("SELECT column_name FROM information_schema.columns WHERE table_schema = :s AND table_name = :t"),
                {"s": SCHEMA, "t": name},
            ).scalars()
        )
        cols = ", ".join(c.name for c in rebuilt.columns if c.name in existing)
        conn.execute(text(f"INSERT INTO {SCHEMA}.{name}__m3 ({cols}) SELECT {cols} FROM {SCHEMA}.{name}"))
        conn.execute(text(f"DROP TABLE {SCHEMA}.{name}"))
        conn.execute(text(f"ALTER TABLE {SCHEMA}.{name}__m3 RENAME TO {name}"))


def _m4_stage_model(conn: Connection) -> None:
    """The stage model (stage name, stage id, CRM status), token requests and optional-read warnings per run,
    and the mapping version a connection was last synced with (record.MAPPING_VERSION)."""
    text_columns = [
        (t, c)
        for t in ("opportunities", "opportunity_history", "stage_opportunities")
        for c in ("stage_id", "crm_status")
    ] + [("extracts", "warnings"), ("sync_runs", "warnings")]
    integer_columns = [
        ("extracts", "token_requests"),
        ("extracts", "mapping_version"),
        ("sync_runs", "token_requests"),
        ("sync_state", "mapping_version"),
    ]
    for table, column in text_columns:
        conn.execute(text(f"ALTER TABLE {SCHEMA}.{table} ADD COLUMN IF NOT EXISTS {column} TEXT"))
    for table, column in integer_columns:
        conn.execute(text(f"ALTER TABLE {SCHEMA}.{table} ADD COLUMN IF NOT EXISTS {column} INTEGER"))


def _m5_history_truth(conn: Connection) -> None:
    """Close times from the CRM, scope as a first-class thing, one event model (change_id)."""
    columns = [
        (t, "crm_closed_at", "TIMESTAMP") for t in ("opportunities", "opportunity_history", "stage_opportunities")
    ]
    columns += [
        (t, "crm_closed_at_field", "TEXT") for t in ("opportunities", "opportunity_history", "stage_opportunities")
    ]
    columns += [
        ("opportunities", "closed_at_source", "TEXT"),
        ("opportunities", "in_scope", "BOOLEAN"),
        ("opportunities", "scope_changed_at", "TIMESTAMP"),
        ("opportunity_events", "change_id", "TEXT"),
        ("stage_opportunities", "scope", "TEXT"),
        ("extracts", "scope_fingerprint", "TEXT"),
        ("extracts", "scope", "TEXT"),
        ("sync_state", "scope_fingerprint", "TEXT"),
        ("sync_state", "scope", "TEXT"),
        ("sync_runs", "stage_changed", "INTEGER"),
        ("sync_runs", "left_scope", "INTEGER"),
        ("sync_runs", "entered_scope", "INTEGER"),
        ("sync_runs", "scope_fingerprint", "TEXT"),
    ]
    for table, column, type_ in columns:
        conn.execute(text(f"ALTER TABLE {SCHEMA}.{table} ADD COLUMN IF NOT EXISTS {column} {type_}"))
    conn.execute(text(f"UPDATE {SCHEMA}.opportunities SET in_scope = TRUE WHERE in_scope IS NULL"))
    # closes recorded so far were dated by the record's last edit (the next sync's re-baseline corrects them)
    conn.execute(
        text(
            f"UPDATE {SCHEMA}.opportunities SET closed_at_source = 'modified_at' "
            "WHERE closed_at IS NOT NULL AND closed_at_source IS NULL"
        )
    )
    _rewrite_events_to_one_event_model(conn)


# The tracked fields a status transition owns, and those a stage move owns (lib/reconcile's event model).
_STATUS_OWNED = {"status", "stage", "stage_id", "crm_status", "crm_closed_at"}
_STAGE_OWNED = {"stage", "stage_id", "crm_status"}


def _rewrite_events_to_one_event_model(conn: Connection) -> None:
    """Events written before version 5 overlapped: a close wrote closed_*, stage_changed and updated (listing
    status and stage); a stage move stage_changed and updated (listing stage). Rewritten to one event per kind:
    the stage_changed of a close or reopen is dropped, the fields another event owns leave `updated` (which
    goes when nothing is left), and the events of one run and record share a change_id."""
    e = f"{SCHEMA}.opportunity_events"
    conn.execute(text(f"UPDATE {e} SET change_id = run_id || ':' || source_id WHERE change_id IS NULL"))
    status_kinds = "('closed_won', 'closed_lost', 'reopened')"
    rows = conn.execute(
        text(f"""
        SELECT u.event_id, u.changed_fields,
               EXISTS (SELECT 1 FROM {e} x WHERE x.change_id = u.change_id AND x.connection = u.connection
                       AND x.event_type IN {status_kinds}) AS status_event,
               EXISTS (SELECT 1 FROM {e} x WHERE x.change_id = u.change_id AND x.connection = u.connection
                       AND x.event_type = 'stage_changed') AS stage_event
        FROM {e} u WHERE u.event_type = 'updated'""")
    ).all()
    rewritten = []
    for event_id, fields, status_event, stage_event in rows:
        owned = _STATUS_OWNED if status_event else _STAGE_OWNED if stage_event else set()
        kept = [f for f in (fields or "").split(",") if f and f not in owned]
        if len(kept) != len([f for f in (fields or "").split(",") if f]):
            rewritten.append((event_id, ",".join(kept)))
    conn.execute(
        text(f"""
        DELETE FROM {e} WHERE event_type = 'stage_changed' AND EXISTS (
            SELECT 1 FROM {e} x WHERE x.change_id = {e}.change_id AND x.connection = {e}.connection
            AND x.event_type IN {status_kinds})""")
    )
    if not rewritten:
        return
    conn.execute(text("CREATE TEMPORARY TABLE m5_updated (event_id TEXT, changed_fields TEXT)"))
    dialect.bulk_insert(conn, "m5_updated", ["event_id", "changed_fields"], rewritten)
    conn.execute(text(f"DELETE FROM {e} WHERE event_id IN (SELECT event_id FROM m5_updated WHERE changed_fields = '')"))
    conn.execute(
        text(f"""UPDATE {e} SET changed_fields = m.changed_fields FROM m5_updated m
                          WHERE {e}.event_id = m.event_id AND m.changed_fields <> ''""")
    )
    conn.execute(text("DROP TABLE m5_updated"))


def _m6_hostile_answers(conn: Connection) -> None:
    """Counts from the CRM guard deletes; bad records are quarantined (issue 22)."""
    columns = [
        ("extracts", c, "INTEGER")
        for c in ("crm_count_open", "crm_count_closed", "received_open", "received_closed", "quarantined")
    ]
    columns += [
        ("extracts", "deletes_inferable", "BOOLEAN"),
        ("extracts", "crm_clock", "TIMESTAMP"),
        ("sync_runs", "quarantined", "INTEGER"),
    ]
    for table, column, type_ in columns:
        conn.execute(text(f"ALTER TABLE {SCHEMA}.{table} ADD COLUMN IF NOT EXISTS {column} {type_}"))
    quarantine.create(conn, checkfirst=True)


def _m7_writeback(conn: Connection) -> None:
    """Revenue write-back (issue 17): the audit log, and an empty input table where the user has none yet."""
    from oppsync_pipeline.lib.writeback.contract import create_input_table

    writeback_log.create(conn, checkfirst=True)
    create_input_table(conn)


def _m8_base_currency(conn: Connection) -> None:
    """Amounts in the org's base currency and the account id (issue 19): `amount_base` / `base_currency` /
    `account_id` on every table that holds the canonical record. Existing rows keep NULL until the next sync's re-baseline (record.MAPPING_VERSION 4)
    fills them without recording events."""
    for table in ("opportunities", "opportunity_history", "stage_opportunities"):
        conn.execute(text(f"ALTER TABLE {SCHEMA}.{table} ADD COLUMN IF NOT EXISTS amount_base DOUBLE PRECISION"))
        conn.execute(text(f"ALTER TABLE {SCHEMA}.{table} ADD COLUMN IF NOT EXISTS base_currency TEXT"))
        conn.execute(text(f"ALTER TABLE {SCHEMA}.{table} ADD COLUMN IF NOT EXISTS account_id TEXT"))


def _m9_revenue_and_extra_fields(conn: Connection) -> None:
    """The amount's breakdown and cost (`revenue_one_time` / `revenue_recurring` / `cost`) and the connection's
    extra fields as JSON text (`extra_fields`, typed in dbt), issue 19. Existing rows keep NULL until the next
    sync's re-baseline (record.MAPPING_VERSION 5) fills them without recording events."""
    for table in ("opportunities", "opportunity_history", "stage_opportunities"):
        for column in ("revenue_one_time", "revenue_recurring", "cost"):
            conn.execute(text(f"ALTER TABLE {SCHEMA}.{table} ADD COLUMN IF NOT EXISTS {column} DOUBLE PRECISION"))
        conn.execute(text(f"ALTER TABLE {SCHEMA}.{table} ADD COLUMN IF NOT EXISTS extra_fields TEXT"))


def _m10_crm_lookups(conn: Connection) -> None:
    """Dictionary entries kept between runs (issue 21): incremental syncs read only the ids they do not know."""
    crm_lookups.create(conn, checkfirst=True)


def _m11_paused_extracts(conn: Connection) -> None:
    """A full read stopped by its quota share keeps its staging and where it stopped, for the next run."""
    conn.execute(text(f"ALTER TABLE {SCHEMA}.extracts ADD COLUMN IF NOT EXISTS resume_state TEXT"))


# DuckDB's compression for the CRM's raw record (`raw`: compact JSON, ~1 kB a Salesforce row, ~2.5 kB a Dataverse
# row with its annotations): most of a warehouse's bytes, written twice a sync (staging, then the current row) and
# read rarely. DuckDB's own choice (DICT_FSST, after trying every method on each segment at the checkpoint) was a
# sixth of a 100,000-opportunity Dataverse full sync's CPU (15.9 -> 13.5 s with zstd) and left the file 2.8x
# larger (221 -> 79 MB). (Postgres: lz4 instead of pglz made no difference a sync could measure, 2026-12-07.)
RAW_COMPRESSION = "zstd"
RAW_TABLES = ("opportunities", "stage_opportunities")


def _m12_raw_compression(conn: Connection) -> None:
    """DuckDB only: `raw` compressed with RAW_COMPRESSION. DuckDB sets a column's compression only when the table
    is created, so the two tables are rebuilt as they are (columns in order, types, NOT NULL) with it."""
    if dialect.is_duckdb(conn):
        for name in RAW_TABLES:
            _rebuild_duckdb_table(conn, name, {"raw": RAW_COMPRESSION})


def _rebuild_duckdb_table(conn: Connection, name: str, compression: dict[str, str]) -> None:
    """Recreate a DuckDB table with the same columns (order, type, NOT NULL, default) and its rows, the named
    columns compressed with the given method."""
    columns = conn.execute(
        text(
            "SELECT column_name, data_type, is_nullable, column_default FROM duckdb_columns() "
            "WHERE schema_name = :s AND table_name = :t ORDER BY column_index"
        ),
        {"s": SCHEMA, "t": name},
    ).all()
    ddl = ", ".join(
        f'"{column}" {type_}'
        + ("" if nullable else " NOT NULL")
        + (f" DEFAULT {default}" if default is not None else "")
        + (f" USING COMPRESSION {compression[column]}" if column in compression else "")
        for column, type_, nullable, default in columns
    )
    names = ", ".join(f'"{c[0]}"' for c in columns)
    conn.execute(text(f"CREATE TABLE {SCHEMA}.{name}__rebuilt ({ddl})"))
    conn.execute(text(f"INSERT INTO {SCHEMA}.{name}__rebuilt ({names}) SELECT {names} FROM {SCHEMA}.{name}"))
    conn.execute(text(f"DROP TABLE {SCHEMA}.{name}"))
    conn.execute(text(f"ALTER TABLE {SCHEMA}.{name}__rebuilt RENAME TO {name}"))


def _m13_stage_index_by_seq(conn: Connection) -> None:
    """Postgres: staged rows indexed by (extract_id, seq) instead of extract_id alone. The reconcile takes a new or
    changed record's values from its staged row by seq; where the planner's statistics of the staging table
    predate the extract (autovacuum analyzed it between two runs), it expects a handful of rows per extract and
    joins by nested loop: with the extract_id index alone each of 500 new records scanned all 50,500 staged rows
    (17 s of an 18 s reconcile, make bench 2026-12-07); with seq in the index each is one lookup."""
    if dialect.is_duckdb(conn):
        return
    conn.execute(
        text(f"CREATE INDEX IF NOT EXISTS ix_stage_opp_extract_seq ON {SCHEMA}.stage_opportunities (extract_id, seq)")
    )
    conn.execute(text(f"DROP INDEX IF EXISTS {SCHEMA}.ix_stage_opp_extract"))


# Postgres: the share of each heap page the fact tables that the reconcile updates in place leave free when rows
# are inserted. An update of a column no index holds is then HOT (heap-only: the new version on the same page, no
# index entry written), instead of a new tuple elsewhere plus an entry in every index.
UPDATED_TABLES_FILLFACTOR = 85


def _m14_hot_updates(conn: Connection) -> None:
    """Postgres: the reconcile's in-place updates made heap-only (HOT). Closing a record's current version
    (`history_close.sql`, valid_to) could never be HOT while `ix_history_open` indexed valid_to, and neither
    table left room on its pages. Measured on a 1,000,000-opportunity warehouse with 10% changed (110,000 rows
    updated in each table; 2026-12-07, interleaved runs): the history close 2.5-3.0 s -> 1.4-1.7 s, the current-row
    update 2.0-2.4 -> 1.5-2.0 s; 109,998 and 108,104 of the 110,000 updates HOT; the reconcile 19.1-23.6 s (6 runs,
    mean 21.6) -> 18.4-22.9 s (8 runs, mean 20.1), the machine's own drift between runs being as large; the two
    tables take 6-9% more space. The primary key's (connection, source_id) prefix serves what the dropped index did
    (a record has a few versions). Pages written before this migration stay full: an existing warehouse gains as
    its rows are rewritten."""
    if dialect.is_duckdb(conn):
        return  # DuckDB updates columnar segments; there is no heap page to keep room in (and no index, migration 3)
    conn.execute(text(f"DROP INDEX IF EXISTS {SCHEMA}.ix_history_open"))
    for table in ("opportunities", "opportunity_history"):
        conn.execute(text(f"ALTER TABLE {SCHEMA}.{table} SET (fillfactor = {UPDATED_TABLES_FILLFACTOR})"))


MIGRATIONS: list[tuple[int, Callable[[Connection], None]]] = [
    (1, _m1_initial),
    (2, _m2_resume_tokens),
    (3, _m3_duckdb_fact_tables_without_art),
    (4, _m4_stage_model),
    (5, _m5_history_truth),
    (6, _m6_hostile_answers),
    (7, _m7_writeback),
    (8, _m8_base_currency),
    (9, _m9_revenue_and_extra_fields),
    (10, _m10_crm_lookups),
    (11, _m11_paused_extracts),
    (12, _m12_raw_compression),
    (13, _m13_stage_index_by_seq),
    (14, _m14_hot_updates),
]


MIGRATION_LOCK_KEY = 0x6F70_7073_796E_6321  # "oppsync!": the advisory lock of `migrate` on Postgres


def migrate(conn: Connection) -> list[int]:
    """Bring the schema up to date; returns the versions applied. Safe to call on every run, from any number of
    runs at once."""
    if conn.dialect.name == "postgresql":
        # Connections' first runs start together on a warehouse nobody ran `init-db` on: CREATE SCHEMA / TABLE IF
        # NOT EXISTS race (a unique violation in pg_catalog) and all but one failed. One migrates; the others
        # wait here, then find it done. Held to the end of this transaction. (DuckDB: one writer per file.)
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
    schema_migrations.create(conn, checkfirst=True)
    done = {r[0] for r in conn.execute(schema_migrations.select().with_only_columns(schema_migrations.c.version))}
    applied = []
    for version, step in MIGRATIONS:
        if version in done:
            continue
        step(conn)
        conn.execute(schema_migrations.insert().values(version=version, applied_at=text("CURRENT_TIMESTAMP")))
        applied.append(version)
    return applied
