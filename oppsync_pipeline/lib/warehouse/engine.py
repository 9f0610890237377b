"""Engines for the two warehouses, and transactions on them (bulk loading: dialect.py).

DuckDB allows one writing process per file: connections are opened per unit of work (NullPool) and
opening retries while another process holds the file, so Dagster runs of different connections can
share the embedded warehouse one transaction at a time.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from oppsync_pipeline.lib.config import DuckDBSettings
from oppsync_pipeline.lib.warehouse import dialect
from oppsync_pipeline.lib.warehouse.schema import migrate

# Rows per DuckDB row group in the warehouse file (DuckDB's default is 122,880). A statement that writes many
# rows fills one row group per thread in memory before compressing it to disk; with raw CRM payloads of 1-2.5 kB
# that is 110-320 MB per thread, more than the memory limit below allows, and the first full sync of a large
# tenant failed with "Out of Memory". At 16,384 it is 15-45 MB per thread; scans barely notice.
DUCKDB_ROW_GROUP_SIZE = 16_384
DUCKDB_CATALOG = "warehouse"
log = logging.getLogger(__name__)


def make_engine(url: str, duckdb: DuckDBSettings | None = None) -> Engine:
    """An engine for the warehouse at `url`; `duckdb` = the configuration's `warehouse.duckdb` settings."""
    if dialect.is_duckdb_url(url):
        return _duckdb_engine(url, duckdb or DuckDBSettings())
    return create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=2)


def _duckdb_engine(url: str, settings: DuckDBSettings) -> Engine:
    path = url.split(":///", 1)[1] if ":///" in url else ""
    # DuckDB's buffer pool may otherwise grow to 80% of RAM; past this limit it spills to disk. With ART-free
    # fact tables (schema migration 3) and small row groups a full sync of 1,000,000 Salesforce opportunities
    # fits (benchmarks/RESULTS.md, memory); raise it for speed where memory is plentiful. The environment
    # overrides the configuration for one process (a benchmark, a one-off backfill).
    config: dict[str, Any] = {
        "memory_limit": os.environ.get("OPPSYNC_DUCKDB_MEMORY_LIMIT", settings.memory_limit),
        "preserve_insertion_order": False,
    }
    threads = os.environ.get("OPPSYNC_DUCKDB_THREADS") or settings.threads
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

    _FILE_IN_USE[engine] = _FILE_LOCKS.setdefault(str(Path(path).resolve()), threading.RLock())
    return engine


# One DuckDB warehouse file, one connection at a time in this process: each connection is an in-memory database
# that attaches the file, and DuckDB refuses to attach a file a second time while it is attached ("Unique file
# handle conflict"). A sync's helper threads (a page read ahead, the dictionaries asked of the warehouse, the
# users saved) wait for the connection in use instead of failing. Never held while waiting for another thread.
_FILE_LOCKS: dict[str, threading.RLock] = {}
_FILE_IN_USE: weakref.WeakKeyDictionary[Engine, threading.RLock] = weakref.WeakKeyDictionary()


@contextmanager
def transaction(engine: dialect.Bind, attempts: int = 60) -> Iterator[Connection]:
    """A connection in a transaction, retrying the connect while another process holds the DuckDB file (and
    waiting while another thread of this process uses it). Given a connection (the caller's transaction), its
    statements join that transaction: a few short steps in a row share one connect, which on DuckDB starts a
    database instance (~20 ms of CPU)."""
    if isinstance(engine, Connection):
        yield engine
        return
    with _FILE_IN_USE.get(engine, nullcontext()):
        yield from _transaction(engine, attempts)


def _transaction(engine: Engine, attempts: int) -> Iterator[Connection]:
    for attempt in range(attempts):
        try:
            conn = engine.connect()
            break
        except OperationalError as err:
            if not dialect.file_busy(engine, err) or attempt == attempts - 1:
                raise
            time.sleep(min(0.2 * (attempt + 1), 2.0))
    try:
        with conn.begin():
            yield conn
        if dialect.is_duckdb(engine):
            _checkpoint_memory(conn)
    finally:
        conn.close()


# DuckDB's buffer pool for the checkpoint that closing a connection runs (the connection's in-memory database
# detaches the warehouse file, which writes the transaction's changes from the WAL into it). The checkpoint
# fills the pool to its limit whatever it writes: with the default 256MB every staging batch and the reconcile
# raised the sync process by ~250 MB for a moment, its peak (a 60,000-opportunity Dataverse full sync: 572 MB;
# 10,000-row staging batches alone: 410 MB between checkpoints, 590-624 MB at them). The queries keep the
# configured limit; the checkpoint spills past this one rather than fail, and the limit is this connection's
# alone (its in-memory database ends with it).
CHECKPOINT_MEMORY_LIMIT_MB = 96


def _checkpoint_memory(conn: Connection) -> None:
    raw = conn.connection.dbapi_connection
    configured = raw.execute("SELECT current_setting('memory_limit')").fetchone()[0]  # e.g. '244.1 MiB'
    number, _, unit = str(configured).partition(" ")
    factor = {"bytes": 1 / 2**20, "KiB": 1 / 1024, "MiB": 1, "GiB": 1024, "TiB": 2**20}.get(unit)
    checkpoint_mib = (
        CHECKPOINT_MEMORY_LIMIT_MB if factor is None else min(CHECKPOINT_MEMORY_LIMIT_MB, float(number) * factor)
    )
    try:  # DuckDB's SET takes no bound parameter: a number computed here, formatted as a whole MiB (at least 1)
        raw.execute(f"SET memory_limit = '{max(1, int(checkpoint_mib))}MiB'")
    except Exception:  # noqa: BLE001 - best effort: the pool could not shrink, the checkpoint runs as before
        log.debug("could not lower DuckDB's memory limit for the checkpoint", exc_info=True)


def ensure_schema(engine: dialect.Bind) -> list[int]:
    with transaction(engine) as conn:
        return migrate(conn)
