"""Engines for the two warehouses and bulk loading into them.

DuckDB allows one writing process per file: connections are opened per unit of work (NullPool) and
opening retries while another process holds the file, so Dagster runs of different connections can
share the embedded warehouse one transaction at a time.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from oppsync_pipeline.lib.warehouse.schema import migrate


# Rows per DuckDB row group in the warehouse file (DuckDB's default is 122,880). A statement that writes many
# rows fills one row group per thread in memory before compressing it to disk; with raw CRM payloads of 1-2.5 kB
# that is 110-320 MB per thread, more than the memory limit below allows, and the first full sync of a large
# tenant failed with "Out of Memory". At 16,384 it is 15-45 MB per thread; scans barely notice.
DUCKDB_ROW_GROUP_SIZE = 16_384
DUCKDB_CATALOG = "warehouse"


def make_engine(url: str) -> Engine:
    if url.startswith("duckdb:"):
        return _duckdb_engine(url)
    return create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=2)


def _duckdb_engine(url: str) -> Engine:
    path = url.split(":///", 1)[1] if ":///" in url else ""
    # DuckDB's buffer pool may otherwise grow to 80% of RAM; past this limit it spills to disk. With ART-free
    # fact tables (schema migration 3) and small row groups a full sync of 1,000,000 Salesforce opportunities
    # fits (benchmarks/RESULTS.md, memory); raise it for speed where memory is plentiful.
    config: dict[str, Any] = {"memory_limit": os.environ.get("OPPSYNC_DUCKDB_MEMORY_LIMIT", "256MB"),
                              "preserve_insertion_order": False}
    threads = os.environ.get("OPPSYNC_DUCKDB_THREADS")
    if threads:
        config["threads"] = int(threads)
    if not path or path == ":memory:":
        return create_engine(url, poolclass=NullPool, connect_args={"config": config})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # The row group size is an option of ATTACH, not of opening a file: open an in-memory database and attach
    # the warehouse file as the default catalog. Spill files go where DuckDB puts them for a file database.
    config["temp_directory"] = f"{path}.tmp"
    engine = create_engine("duckdb:///:memory:", poolclass=NullPool, connect_args={"config": config})

    @event.listens_for(engine, "connect")
    def attach_warehouse(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute(f"ATTACH ? AS {DUCKDB_CATALOG} (ROW_GROUP_SIZE {DUCKDB_ROW_GROUP_SIZE})", [path])
        dbapi_connection.execute(f"USE {DUCKDB_CATALOG}")

    return engine


def backend(engine: Engine) -> str:
    return "duckdb" if engine.dialect.name == "duckdb" else "postgres"


@contextmanager
def transaction(engine: Engine, attempts: int = 60) -> Iterator[Connection]:
    """A connection in a transaction, retrying the connect while another process holds the DuckDB file."""
    for attempt in range(attempts):
        try:
            conn = engine.connect()
            break
        except OperationalError as err:
            if backend(engine) != "duckdb" or "lock" not in str(err).lower() or attempt == attempts - 1:
                raise
            time.sleep(min(0.2 * (attempt + 1), 2.0))
    try:
        with conn.begin():
            yield conn
    finally:
        conn.close()


def ensure_schema(engine: Engine) -> list[int]:
    with transaction(engine) as conn:
        return migrate(conn)


def bulk_insert(conn: Connection, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                computed: Mapping[str, str] | None = None) -> int:
    """Insert many rows in one statement-level operation: DuckDB scans a DataFrame, Postgres uses COPY.

    `computed` (DuckDB only) gives some columns as SQL expressions over the inserted ones (the column itself
    included), evaluated by the insert."""
    if not rows:
        return 0
    if computed and conn.dialect.name != "duckdb":
        raise ValueError("computed columns are a DuckDB insert feature; COPY cannot evaluate expressions")
    if conn.dialect.name == "duckdb":
        import pandas as pd

        frame = pd.DataFrame.from_records(rows, columns=list(columns))
        raw = conn.connection.dbapi_connection
        name = f"_bulk_{id(frame)}"
        raw.register(name, frame)
        try:
            cols = ", ".join(columns)
            values = ", ".join((computed or {}).get(c, c) for c in columns)
            raw.execute(f"INSERT INTO {table} ({cols}) SELECT {values} FROM {name}")
        finally:
            raw.unregister(name)
    else:
        # Every value is quoted and NULL is the unquoted \N: in CSV mode a quoted field is never NULL, so a
        # CRM text that reads exactly \N survives (csv.writer left it unquoted, and it came back as \\N).
        buf = io.StringIO()
        for row in rows:
            buf.write(",".join("\\N" if v is None else _pg_csv_quoted(v) for v in row) + "\n")
        buf.seek(0)
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            cursor.copy_expert(
                f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv, NULL '\\N')", buf)
        finally:
            cursor.close()
    return len(rows)


def _pg_csv_quoted(v: Any) -> str:
    text = ("t" if v else "f") if isinstance(v, bool) else str(v)
    return '"' + text.replace('"', '""') + '"'

