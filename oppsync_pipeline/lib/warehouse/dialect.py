"""Every difference between the two warehouses, decided here by one test (`is_duckdb`).

DuckDB is the embedded default (one writing process per file, optimistic concurrency, fast DataFrame scans);
Postgres the shared one (row locks, COPY, a planner that needs statistics). The rest of the warehouse layer
asks this module, never `dialect.name`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

Bind = Engine | Connection


def is_duckdb_url(url: str) -> bool:
    return url.startswith("duckdb:")


def is_duckdb(bind: Bind) -> bool:
    return bind.dialect.name == "duckdb"


def file_busy(bind: Bind, err: OperationalError) -> bool:
    """DuckDB allows one writing process per file: opening fails while another holds it (retry)."""
    return is_duckdb(bind) and "lock" in str(err).lower()


def out_of_memory(bind: Bind, err: DBAPIError) -> bool:
    """DuckDB refused a statement's memory (its buffer pool at its limit, and what it holds could not spill)."""
    if not is_duckdb(bind):
        return False
    import duckdb

    return isinstance(err.orig, duckdb.OutOfMemoryException)


def lost_a_race(bind: Bind, err: DBAPIError) -> bool:
    """DuckDB runs concurrent transactions optimistically: of two that write the same row, the later one
    fails (a write-write conflict, or a duplicate key found at commit). Postgres orders them with row locks
    instead, so there a DBAPIError is never a lost race."""
    if not is_duckdb(bind):
        return False
    import duckdb

    if isinstance(err.orig, duckdb.ConstraintException):
        # the insert meets the other starter's row, not yet committed (ON CONFLICT only skips committed ones)
        return "duplicate key" in str(err.orig).lower()
    return isinstance(err.orig, duckdb.TransactionException)


def locks_rows(bind: Bind) -> bool:
    """Postgres can lock a row read inside a transaction (SELECT ... FOR UPDATE); DuckDB has no row locks
    (its conflicts surface at commit: lost_a_race)."""
    return not is_duckdb(bind)


def hashes_in_database(bind: Bind) -> bool:
    """On the row path (staging.write_staged, the reference the columnar path is tested against) DuckDB computes
    row hashes while it inserts (DUCKDB_ROW_HASH) and Postgres gets them from Python. The columnar path
    (staging.StagingWriter) has DuckDB compute them for both (DUCKDB_ROW_HASH; in process for Postgres)."""
    return is_duckdb(bind)


def analyze(conn: Connection, table: str, columns: Sequence[str] = ()) -> None:
    """Postgres: autovacuum never analyzes temporary tables; without statistics the planner takes a fresh one
    for a few rows and picks nested loops (the delete inference ran 90 s at 20,000 rows, hours at a million).
    DuckDB keeps its own statistics as it writes. `columns`: only the ones joins and filters use (the row
    count comes with any); sampling every column of the wide staged copy took 1.1 s of a 200,000-row
    reconcile, its source_id alone 0.1 s."""
    if not is_duckdb(conn):
        conn.execute(text(f"ANALYZE {table}" + (f" ({', '.join(columns)})" if columns else "")))


# Memory for each sort and hash of one reconcile transaction (Postgres; SET LOCAL: it ends with the transaction).
# At the server's default 4 MB every hash join of a 200,000-row reconcile spilled to temporary files in
# batches: 13.7 s, against 7.8 s at 256 MB (benchmarks/RESULTS.md). DuckDB sizes its operators itself.
RECONCILE_WORK_MEM = "256MB"


def tune_reconcile(conn: Connection) -> None:
    """Session settings for a transaction of whole-extract set queries, the reconcile's and the extract's counts
    (Postgres only; they end with it). RECONCILE_WORK_MEM, and no JIT compilation: each of these statements
    costs more than `jit_above_cost`, and compiling one took ~0.4 s of its 2.6 s (the extract's counts at
    1,000,000, EXPLAIN ANALYZE), time the statement did not win back: that UPDATE 2.27 -> 1.90 s. The reconcile of
    1,000,000 with 10% changed, on three clones of one database, interleaved (2026-12-07): 22.6 / 23.0 / 22.9 s
    with JIT, 22.3 / 22.7 / 21.6 s without (the server's CPU 20.9 -> 20.4 s). Small, and never slower."""
    if not is_duckdb(conn):
        # set_config(..., true) is SET LOCAL with the value bound, not formatted into the statement
        conn.execute(text("SELECT set_config('work_mem', :value, true)"), {"value": RECONCILE_WORK_MEM})
        conn.execute(text("SELECT set_config('jit', 'off', true)"))


def bulk_insert(
    conn: Connection,
    table: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    computed: Mapping[str, str] | None = None,
) -> int:
    """Insert many rows in one statement-level operation: DuckDB scans an Arrow table, Postgres uses COPY.

    `computed` (DuckDB only) gives some columns as SQL expressions over the inserted ones (the column itself
    included), evaluated by the insert."""
    if not rows:
        return 0
    if computed and not is_duckdb(conn):
        raise ValueError("computed columns are a DuckDB insert feature; COPY cannot evaluate expressions")
    if is_duckdb(conn):
        _duckdb_insert(conn, table, columns, rows, computed)
    else:
        _postgres_copy(conn, table, columns, rows)
    return len(rows)


def _duckdb_insert(
    conn: Connection,
    table: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    computed: Mapping[str, str] | None,
) -> None:
    data = _arrow_table(columns, rows)
    raw = conn.connection.dbapi_connection
    name = f"_bulk_{id(data)}"
    raw.register(name, data)
    try:
        cols = ", ".join(columns)
        values = ", ".join((computed or {}).get(c, c) for c in columns)
        raw.execute(f"INSERT INTO {table} ({cols}) SELECT {values} FROM {name}")
    finally:
        raw.unregister(name)


def _arrow_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Any:
    """The rows as one Arrow table, each column's type inferred by Arrow: ints stay ints where None is among them
    (the DataFrame this replaces made such a column float64, and an id past 2**53 came back changed), date-times keep
    their zone, and no value is boxed into a pandas object (an Autotask full sync stores a dictionary entry per
    company and contact it meets). A column Arrow cannot take as one plain type (mixed types, an int past 64 bits,
    a lone surrogate, a nested value) sends the rows through pandas as before."""
    import pyarrow as pa

    try:
        arrays = [pa.array(values) for values in zip(*rows, strict=True)]
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, UnicodeEncodeError, ValueError):
        arrays = None
    if arrays is None or any(pa.types.is_nested(a.type) for a in arrays):
        import pandas as pd

        return pd.DataFrame.from_records(rows, columns=list(columns))
    return pa.Table.from_arrays(arrays, names=list(columns))


def _postgres_copy(conn: Connection, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    # Every value is quoted and NULL is the unquoted \N: in CSV mode a quoted field is never NULL, so a
    # CRM text that reads exactly \N survives (csv.writer left it unquoted, and it came back as \\N).
    buf = io.StringIO()
    for row in rows:
        buf.write(",".join("\\N" if v is None else _pg_csv_quoted(v) for v in row) + "\n")
    buf.seek(0)
    cursor = conn.connection.dbapi_connection.cursor()
    try:
        cursor.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv, NULL '\\N')", buf)
    finally:
        cursor.close()


def _pg_csv_quoted(v: Any) -> str:
    text_ = ("t" if v else "f") if isinstance(v, bool) else str(v)
    return '"' + text_.replace('"', '""') + '"'
