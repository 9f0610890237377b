"""Read-only access to the warehouse for the dashboard, that never stands in a sync's way.

DuckDB lets one process write a file, and a process holding it open, even read-only, keeps a writer out. So the
dashboard opens the file read-only for one page's queries and closes it at once (milliseconds); a sync's
connect retries meanwhile (lib/warehouse/engine.transaction), and the dashboard retries the same way while a
sync holds the file. Postgres: an ordinary pool whose sessions default to read-only transactions.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from oppsync_pipeline.lib.warehouse import dialect


class WarehouseBusy(RuntimeError):
    """The DuckDB file stayed locked by a writer for longer than the dashboard waits."""


@functools.cache
def read_only_engine(url: str) -> Engine:
    if dialect.is_duckdb_url(url):
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if not path or path == ":memory:" or not Path(path).exists():
            raise FileNotFoundError(
                f"warehouse.url: {url} has no warehouse file yet; run `oppsync run` (or `make run`) first"
            )
        # NullPool: no connection outlives its page, so the file is free for writers between page loads
        return create_engine(
            f"duckdb:///{path}", poolclass=NullPool, connect_args={"read_only": True, "config": {"threads": 2}}
        )
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=2,
        max_overflow=2,
        # a session that cannot write, whatever the role's rights: the dashboard only reads the marts
        connect_args={"options": "-c default_transaction_read_only=on"},
    )


@contextmanager
def read_only(url: str, wait_seconds: float = 30.0) -> Iterator[Connection]:
    """A read-only connection for one page's queries, closed afterwards. Waits while a sync writes DuckDB."""
    engine = read_only_engine(url)
    deadline = time.monotonic() + wait_seconds
    delay = 0.05
    while True:
        try:
            conn = engine.connect()
            break
        except OperationalError as err:
            if not dialect.file_busy(engine, err):
                raise
            if time.monotonic() > deadline:
                raise WarehouseBusy(
                    f"the warehouse file stayed locked by a writer for {wait_seconds:.0f} s; try again"
                ) from err
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
    try:
        with conn.begin():
            yield conn
    finally:
        conn.close()
