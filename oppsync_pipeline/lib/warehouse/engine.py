"""Engines for the two warehouses, and transactions on them (bulk loading: dialect.py).

DuckDB allows one writing process per file: the file is attached per unit of work (NullPool; one in-memory
DuckDB instance per process, `_Instance`) and detached when it ends, and attaching retries while another process
holds the file, so Dagster runs of different connections can share the embedded warehouse one transaction at a
time.
"""

from __future__ import annotations

import functools
import logging
import os
import re
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

from oppsync_pipeline.lib.config import MEMORY_LIMIT_PATTERN, ConfigError, DuckDBSettings
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
    memory_limit = os.environ.get("OPPSYNC_DUCKDB_MEMORY_LIMIT", settings.memory_limit)
    if not re.match(MEMORY_LIMIT_PATTERN, memory_limit):
        raise ConfigError([f"OPPSYNC_DUCKDB_MEMORY_LIMIT: {memory_limit!r} is not a size such as 256MB, 1GiB or 50%"])
    config: dict[str, Any] = {
        "memory_limit": memory_limit,
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
    instance = _Instance(config)

    @event.listens_for(engine, "do_connect")
    def connect_to_instance(*_args: Any) -> Any:
        return _attached_connection_type()(instance)

    @event.listens_for(engine, "connect")
    def attach_warehouse(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute(f"ATTACH ? AS {DUCKDB_CATALOG} (ROW_GROUP_SIZE {DUCKDB_ROW_GROUP_SIZE})", [path])
        dbapi_connection.execute(f"USE {DUCKDB_CATALOG}")

    _FILE_IN_USE[engine] = _FILE_LOCKS.setdefault(str(Path(path).resolve()), threading.RLock())
    return engine


class _Instance:
    """The in-memory DuckDB database an engine's connections share (one engine per process and warehouse,
    defs/resources.py). Starting a DuckDB instance (its catalog of built-in functions) takes 16-18 ms of CPU and
    closing it ~9 ms, ~45 ms of wall time a transaction on a busy machine; attaching the file takes ~3 ms. The file
    itself is attached per connection and detached when it closes, so other processes still take turns with it
    between transactions."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.memory_limit = config["memory_limit"]
        self.threads: int | None = config.get("threads")  # None: DuckDB's default, one per core
        self.configured_mib: float | None = None  # the configured limit as DuckDB reads it (50% -> MiB)
        self._db: Any = None
        self._pid = 0
        self._lock = threading.Lock()
        _INSTANCES.add(self)

    def cursor(self) -> Any:
        import duckdb

        with self._lock:
            if self._db is None or self._pid != os.getpid():
                if self._db is not None:  # a forked child: the parent's instance is not ours to close or use
                    _INHERITED.append(self._db)
                self._db, self._pid = duckdb.connect(":memory:", config=self.config), os.getpid()
                self.configured_mib = _mib(self._db.execute("SELECT current_setting('memory_limit')").fetchone()[0])
            return self._db.cursor()

    def discard(self) -> None:
        """Close the instance (it releases the file, whatever state a failed detach left); the next connection
        starts a new one."""
        with self._lock:
            db, self._db = self._db, None
        if db is not None and self._pid == os.getpid():
            db.close()


_INHERITED: list[Any] = []
_INSTANCES: weakref.WeakSet[_Instance] = weakref.WeakSet()


def _keep_inherited_instances() -> None:
    """In a forked child: the parent's DuckDB instances came along without their threads, and closing one here (the
    garbage collector finalizing an engine the parent no longer used) can crash the child. Kept referenced, they
    are never closed in it; the child's first connect starts an instance of its own (`_Instance.cursor`)."""
    _INHERITED.extend(instance._db for instance in list(_INSTANCES) if instance._db is not None)


os.register_at_fork(after_in_child=_keep_inherited_instances)


@functools.cache
def _attached_connection_type() -> type:
    """duckdb-engine's connection class, extended. Imported at the first connect, never when this module is: importing
    duckdb_engine opens a DuckDB instance (it probes for COMMENT support), whose threads each take a malloc arena
    before `limit_malloc_arenas` (lib/memory.py) can bound them; a process that imported it first peaked ~55 MB
    higher in a 100,000-opportunity Salesforce full sync (588 against 530 MB)."""
    from duckdb_engine import ConnectionWrapper

    class _AttachedConnection(ConnectionWrapper):
        """duckdb-engine's connection over a cursor of the shared instance; closing it detaches the warehouse file
        (DuckDB checkpoints it then, as it did when each connection was an instance of its own)."""

        def __init__(self, instance: _Instance) -> None:
            super().__init__(instance.cursor())
            self._instance = instance
            self._single_thread = False

        def set_memory_limit(self, lean: bool) -> None:
            """The instance's memory limit for the statements that follow: LEAN_MEMORY_LIMIT_MB (never above the
            configured one), or the configured one. The connection's close sets the configured one again."""
            if lean:
                configured = self._instance.configured_mib
                lean_mib = LEAN_MEMORY_LIMIT_MB if configured is None else min(LEAN_MEMORY_LIMIT_MB, configured)
                # DuckDB's SET takes no bound parameter: a number computed here, as a whole MiB (at least 1)
                self.execute(f"SET memory_limit = '{max(1, int(lean_mib))}MiB'")
            else:
                self.execute(f"SET memory_limit = '{self._instance.memory_limit}'")

        def set_single_thread(self, single: bool) -> None:
            """One DuckDB thread for the statements that follow, or the configured number again (only if changed:
            closing every connection calls this)."""
            if single == self._single_thread:
                return
            if single:
                self.execute("SET threads = 1")
            elif self._instance.threads is None:
                self.execute("RESET threads")
            else:
                self.execute(f"SET threads = {int(self._instance.threads)}")
            self._single_thread = single

        def close(self) -> None:
            try:
                # IF EXISTS: a failed ATTACH (the file busy in another process) leaves nothing to detach
                self.execute("USE memory")
                self.execute(f"DETACH DATABASE IF EXISTS {DUCKDB_CATALOG}")
                # The configured limit again: the checkpoint (and the reconcile) lowered it, and the limit belongs to
                # the instance, not to one connection. Setting it also hands back to the system what the instance's
                # allocator kept of the transaction's memory: without it a live instance stayed ~90-125 MB larger
                # after a 100,000-row transaction (test_duckdb_settings), until the next statement that sets it.
                self.set_memory_limit(lean=False)
                self.set_single_thread(False)  # the instance's threads are for the next connection too
            except Exception:  # noqa: BLE001 - the file may still be attached: a new instance for the next connection
                log.warning("could not detach the DuckDB warehouse file; starting a new DuckDB instance", exc_info=True)
                self._instance.discard()
            finally:
                super().close()

    return _AttachedConnection


# One DuckDB warehouse file, one connection at a time in this process: each connection attaches the file to the
# process's in-memory instance (_Instance), and DuckDB refuses to attach a file a second time while it is attached
# ("Unique file handle conflict"). A sync's helper threads (a page read ahead, the dictionaries asked of the
# warehouse, the users saved) wait for the connection in use instead of failing. Never held while waiting for another
# thread.
_FILE_LOCKS: dict[str, threading.RLock] = {}
_FILE_IN_USE: weakref.WeakKeyDictionary[Engine, threading.RLock] = weakref.WeakKeyDictionary()


@contextmanager
def transaction(engine: dialect.Bind, attempts: int = 60) -> Iterator[Connection]:
    """A connection in a transaction, retrying the connect while another process holds the DuckDB file (and
    waiting while another thread of this process uses it). Given a connection (the caller's transaction), its
    statements join that transaction: a few short steps in a row share one connect (on DuckDB one ATTACH, one
    checkpoint at the DETACH)."""
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


# DuckDB's buffer pool for the work that need not be fast in memory, and would otherwise fill the pool to the
# configured limit whatever it holds:
# - the checkpoint that closing a connection runs (it detaches the warehouse file, which writes the transaction's
#   changes from the WAL into it). With the default 256MB every staging batch and the reconcile raised the sync
#   process by ~250 MB for a moment, its peak (a 60,000-opportunity Dataverse full sync: 572 MB; 10,000-row
#   staging batches alone: 410 MB between checkpoints, 590-624 MB at them);
# - the reconcile (reconcile/apply.py), which spills its working tables past it at the same speed: a first full
#   reconcile of 1,000,000 synthetic opportunities peaked at 362-368 MB RSS instead of 483 MB, in 8.9-10.1 s
#   against 8.8 s.
# Both spill past this limit rather than fail; closing the connection sets the configured limit again.
LEAN_MEMORY_LIMIT_MB = 96


def set_memory_limit(conn: Connection, lean: bool) -> None:
    """DuckDB: LEAN_MEMORY_LIMIT_MB (at most the configured limit) or the configured limit for the statements that
    follow on this connection; nothing elsewhere (Postgres, an in-memory DuckDB engine)."""
    _attached_setting(conn, "set_memory_limit", lean)


def set_single_thread(conn: Connection, single: bool) -> None:
    """DuckDB: one thread (or the configured number again) for the statements that follow on this connection: an
    insert keeps a row group of the target table in memory per thread; nothing elsewhere."""
    _attached_setting(conn, "set_single_thread", single)


@contextmanager
def configured_memory(conn: Connection) -> Iterator[None]:
    """The configured memory limit for the statements inside, the lean one again after them."""
    set_memory_limit(conn, lean=False)
    yield
    set_memory_limit(conn, lean=True)


@contextmanager
def single_thread(conn: Connection) -> Iterator[None]:
    """One DuckDB thread for the statements inside, the configured number again after them."""
    set_single_thread(conn, True)
    yield
    set_single_thread(conn, False)


def _attached_setting(conn: Connection, method: str, value: bool) -> None:
    """Call an _AttachedConnection's setting method; other connections (Postgres, an in-memory DuckDB engine) have
    none, and nothing to set."""
    setter = getattr(conn.connection.dbapi_connection, method, None)
    if setter is not None:
        setter(value)


def _checkpoint_memory(conn: Connection) -> None:
    try:
        _attached_setting(conn, "set_memory_limit", True)
    except Exception:  # noqa: BLE001 - best effort: the pool could not shrink, the checkpoint runs as before
        log.debug("could not lower DuckDB's memory limit for the checkpoint", exc_info=True)


def _mib(setting: str) -> float | None:
    """A DuckDB memory setting as it prints it (e.g. '244.1 MiB') in MiB; None if the unit is unknown."""
    number, _, unit = str(setting).partition(" ")
    factor = {"bytes": 1 / 2**20, "KiB": 1 / 1024, "MiB": 1, "GiB": 1024, "TiB": 2**20}.get(unit)
    return None if factor is None else float(number) * factor


def ensure_schema(engine: dialect.Bind) -> list[int]:
    with transaction(engine) as conn:
        return migrate(conn)
