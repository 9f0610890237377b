"""Staging: an extract's records as rows of `oppsync.stage_opportunities`, written in batches while the CRM is
read, with the row hash of each computed by DuckDB's vectorised md5 (in the DuckDB warehouse during the insert, in
process for Postgres; by Python for the few values DuckDB would print otherwise). Pages become Arrow record batches
column by column (columnar.py); staged_rows, the row-at-a-time form, stays as the definition the columnar path is
tested against. Nothing outside staging
changes until the reconcile applies a completed extract."""

from __future__ import annotations

import functools
import io
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from operator import attrgetter
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
from sqlalchemy import Date, DateTime, Double
from sqlalchemy.engine import Engine

from oppsync_pipeline.lib.columnar import STAGE_SCHEMA, raw_chars, stage_batch
from oppsync_pipeline.lib.record import (
    CANONICAL,
    FIELDS,
    TRACKED_FIELDS,
    CanonicalField,
    Opportunity,
    clean_text,
    raw_json,
    row_hash,
    to_utc,
)
from oppsync_pipeline.lib.warehouse import dialect
from oppsync_pipeline.lib.warehouse.dialect import bulk_insert
from oppsync_pipeline.lib.warehouse.engine import transaction
from oppsync_pipeline.lib.warehouse.schema import SCHEMA as S

log = logging.getLogger(__name__)

STAGE_COLUMNS = list(STAGE_SCHEMA.names)  # columnar.STAGE_SCHEMA: the batch and the table take the same order

# Why a staged record is (not) in the connection's scope (scope.py): only `in` records are synced as such.
SCOPE_IN, SCOPE_FILTERED_OUT, SCOPE_BEFORE_STAGE = "in", "filtered_out", "before_stage"


# How DuckDB computes record.row_hash while it inserts a staged batch: the same text of each value,
# the same separator and digest (tests/test_row_hash_sql.py holds the two to each other). Hashing in Python
# was a fifth of staging time (4.5 us a record); vectorised in DuckDB it is a small part of the insert.
# DuckDB rounds halves away from zero where Python rounds the exact binary value, so the few records with a
# number of more than 6 decimals (or not a float, or a date-time before year 1000) keep their Python hash,
# passed in the row_hash column, which the expression keeps (columnar.python_hash_mask decides which, the
# same for both databases). Postgres-bound batches get the same expression from an in-process DuckDB (_hashed).
def _duckdb_hash_text(field: CanonicalField) -> str:
    """The text record.row_hash gives a value of this field, as DuckDB writes it (NULL is chr(0))."""
    name = field.name
    if field.sql_type is Double:
        text_of = f"CAST(CAST({name} AS DOUBLE) AS VARCHAR)"  # shortest round-trip form, as repr()
    elif field.sql_type is Date:
        text_of = f"CAST(CAST({name} AS DATE) AS VARCHAR)"
    elif field.sql_type is DateTime:
        text_of = f"strftime(CAST({name} AS TIMESTAMP), '%Y-%m-%dT%H:%M:%S.%f')"
    else:
        text_of = f"CAST({name} AS VARCHAR)"
    return f"coalesce({text_of}, chr(0))"


_TRACKED = [f for f in FIELDS if f.tracked]
DUCKDB_ROW_HASH = f"coalesce(row_hash, md5(concat_ws(chr(31), {', '.join(map(_duckdb_hash_text, _TRACKED))})))"
RAW = STAGE_COLUMNS.index("raw")
ROW_HASH = STAGE_COLUMNS.index("row_hash")

# How staged_rows reads a record: the canonical values in column order, which of them are CRM text (NUL
# bytes cleaned), date-times (to naive UTC), and the numbers and date-times whose DuckDB hash text can differ
# from Python's (_hash_needs_python).
_CANONICAL_VALUES = attrgetter(*CANONICAL)
_TRACKED_SLICE = slice(CANONICAL.index(TRACKED_FIELDS[0]), CANONICAL.index(TRACKED_FIELDS[-1]) + 1)
assert CANONICAL[_TRACKED_SLICE] == TRACKED_FIELDS, "the tracked fields must be contiguous in record.FIELDS"
_CLEANED = tuple(i for i, f in enumerate(FIELDS) if f.cleaned)
_DATETIMES = tuple(i for i, f in enumerate(FIELDS) if f.sql_type is DateTime)
_HASHED_NUMBERS = tuple(i for i, f in enumerate(FIELDS) if f.tracked and f.sql_type is Double)
_HASHED_DATETIMES = tuple(i for i, f in enumerate(FIELDS) if f.tracked and f.sql_type is DateTime)


def _hash_needs_python(values: Sequence[Any]) -> bool:
    for i in _HASHED_NUMBERS:
        v = values[i]
        # whole numbers first: round(v, 6) is a decimal conversion (~1 us), is_integer a comparison
        if v is not None and (type(v) is not float or not (v.is_integer() or round(v, 6) == v)):
            return True
    return any(values[i] is not None and values[i].year < 1000 for i in _HASHED_DATETIMES)


def staged_rows(
    extract_id: str,
    page: Sequence[Opportunity],
    in_open_set: bool,
    seq0: int,
    *,
    with_hash: bool = True,
    scopes: Sequence[str] | None = None,
) -> list[tuple]:
    """One page of extracted records as staging rows (STAGE_COLUMNS order): the row-at-a-time definition of
    what columnar.stage_batch builds, kept for write_staged and the tests. With with_hash=False the
    row_hash is None where DUCKDB_ROW_HASH computes it the same, during the insert. `scopes`: each record's
    scope verdict (SCOPE_*), all `in` when None.

    The row hash is taken over the values as they will be stored (NUL bytes cleaned), so a record whose
    stored values are unchanged always hashes the same."""
    rows = []
    add = rows.append
    for i, o in enumerate(page):
        values = list(_CANONICAL_VALUES(o))
        for j in _CLEANED:
            values[j] = clean_text(values[j])
        for j in _DATETIMES:
            if values[j] is not None:
                values[j] = to_utc(values[j])
        digest = row_hash(*values[_TRACKED_SLICE]) if with_hash or _hash_needs_python(values) else None
        add(
            (
                extract_id,
                o.connection,
                o.source_id,
                seq0 + i,
                in_open_set,
                scopes[i] if scopes is not None else SCOPE_IN,
                *values,
                raw_json(o.raw),
                digest,
            )
        )
    return rows


def write_staged(engine: Engine, rows: Sequence[tuple]) -> int:
    """Write staging rows (from staged_rows) in one short transaction (the row path; StagingWriter takes the
    columnar one). On DuckDB the insert computes the row hashes the rows leave as None."""
    with transaction(engine) as conn:
        computed = {"row_hash": DUCKDB_ROW_HASH} if dialect.hashes_in_database(engine) else None
        return bulk_insert(conn, f"{S}.stage_opportunities", STAGE_COLUMNS, rows, computed=computed)


def stage_page(engine: Engine, extract_id: str, page: Sequence[Opportunity], in_open_set: bool, seq0: int) -> int:
    """Write one page of extracted records to staging at once (its own short transaction)."""
    writer = StagingWriter(engine, extract_id)
    writer.add(page, in_open_set, seq0)
    writer.flush()
    return writer.written


def write_batch(engine: Engine, table: pa.Table) -> int:
    """Write staging columns (columnar.stage_batch) in one short transaction, the row hashes the batch leaves null
    computed by DuckDB's vectorised md5 (DUCKDB_ROW_HASH). DuckDB computes them as it scans the Arrow table in
    place; for Postgres an in-process DuckDB computes them (`_hashed`) and the batch goes by COPY (CSV written
    by Arrow's C++ writer) straight into staging."""
    if not table.num_rows:
        return 0
    cols = ", ".join(STAGE_COLUMNS)
    with transaction(engine) as conn:
        raw = conn.connection.dbapi_connection
        if dialect.is_duckdb(engine):
            name = f"_stage_in_{id(table)}"
            values = ", ".join(DUCKDB_ROW_HASH if c == "row_hash" else c for c in STAGE_COLUMNS)
            raw.register(name, table)
            try:
                raw.execute(f"INSERT INTO {S}.stage_opportunities ({cols}) SELECT {values} FROM {name}")
            finally:
                raw.unregister(name)
        else:
            _postgres_copy_arrow(raw, _hashed(table), f"{S}.stage_opportunities", cols)
    return table.num_rows


# Postgres staging used to COPY each batch into a temporary table and move it over with the digest computed by
# Postgres (md5 over to_char / float8 text, its own expression of the same text): a second write of every row,
# and the digest in one backend. The same 202,000 synthetic records staged in 3.3 s that way, in 2.4 s with the
# digest from DuckDB (one thread: 0.3 s more CPU here) and one COPY. One expression of the digest for both
# warehouses, so their hashes cannot drift apart (tests/test_row_hash_sql.py).
@functools.cache
def _hasher() -> Any:
    """An in-memory DuckDB for the digests of Postgres-bound batches: one thread, a small memory limit (it streams
    one column out of a batch already in memory). Each call takes its own cursor (thread-safe)."""
    import duckdb

    return duckdb.connect(config={"threads": 1, "memory_limit": "64MB"})


_INHERITED_HASHERS: list[Any] = []


def _fresh_hasher_in_child() -> None:
    """A forked process (a run worker from the warm launcher, a Celery worker) starts its own hasher: the parent's
    DuckDB came along without its threads. Kept referenced, never closed here (closing an inherited instance can
    crash the child, as engine._keep_inherited_instances says)."""
    if _hasher.cache_info().currsize:
        _INHERITED_HASHERS.append(_hasher())
        _hasher.cache_clear()


os.register_at_fork(after_in_child=_fresh_hasher_in_child)


def _hashed(table: pa.Table) -> pa.Table:
    """The batch with its row_hash column filled (DUCKDB_ROW_HASH keeps the Python hashes already there)."""
    cursor = _hasher().cursor()
    try:
        cursor.register("batch", table)
        digests = cursor.sql(f"SELECT {DUCKDB_ROW_HASH} FROM batch").to_arrow_table().column(0)
    finally:
        cursor.close()
    return table.set_column(ROW_HASH, "row_hash", digests.cast(pa.string()))


def _postgres_copy_arrow(raw: Any, table: pa.Table, name: str, cols: str) -> None:
    # Every valid value is quoted and a null is an empty unquoted field: in CSV mode a quoted field is never
    # NULL, so an empty CRM text stays empty and a text that reads \N stays text.
    buf = io.BytesIO()
    pa_csv.write_csv(table, buf, pa_csv.WriteOptions(include_header=False, quoting_style="all_valid"))
    buf.seek(0)
    cursor = raw.cursor()
    try:
        cursor.copy_expert(f"COPY {name} ({cols}) FROM STDIN WITH (FORMAT csv)", buf)
    finally:
        cursor.close()


# A staging batch is written once it holds this many rows or this many characters of raw payload. 8 MB, not the
# 16 MB of a batch written in the caller's thread: a batch is written while the next one fills (StagingWriter), and
# two of 8 MB kept the peak where one of 16 MB had it (Dynamics at 100,000: 478-493 MB against 486-489 MB).
STAGING_BATCH_ROWS = 50_000
STAGING_BATCH_CHARS = 8_000_000
# Pages are converted to Arrow columns this many records at a time (at least): a conversion costs ~40 Arrow calls
# whatever its size, which a page of 500 (Autotask) or 200 (HubSpot) records does not repay: an Autotask page's
# records took 13.5 us each converted 500 at a time, 7.6 us 2,000 at a time (the CPU time of columnar.stage_batch).
CONVERT_ROWS = 2_000


class StagingWriter:
    """Stages an extract's pages in batches: one short warehouse transaction per batch, not per page.

    A transaction has a fixed cost that a page does not repay: on DuckDB, opening the file, committing and
    the checkpoint when it is closed take ~50 ms, more than writing 10,000 rows (a 1,000,000-row extract
    spent 14 of its 37 staging seconds there). The warehouse file stays free between batches, so other
    connections' runs get their transactions in, and memory stays bounded by the batch limits (about
    two batches of 8 MB of raw payload, whatever the CRM's page size). Pages are converted to Arrow record batches
    (columnar.stage_batch) as they arrive, `convert_rows` records at a time: consecutive pages of one set are
    converted together. Nothing is written until `flush` (or a full batch), and a failed extract simply never
    flushes the rest: its staging is discarded anyway.

    A full batch is written behind the read: by a helper thread, while the caller goes on adding pages (the
    write is the database's work, done without the GIL: DuckDB's insert, Postgres's COPY). Written in the
    caller's thread, the read stalled for each batch's write: an Autotask full sync of 100,000 had no request
    in flight for ~3 s of its 13-17, most of it while a batch was written. One batch is written at a time, the
    next filling meanwhile (memory: two batches at most), and `add` waits for the one before before it hands on
    the next. `flush` returns once everything added is written; a write's failure raises in the `add` or `flush`
    after it. An extract that fails calls `abandon`, so that no write lands after its staging is dropped. One
    helper thread per writer, kept until `flush`: a thread per batch raised a sync's peak (each new thread's
    allocations start afresh)."""

    def __init__(
        self,
        engine: Engine,
        extract_id: str,
        *,
        batch_rows: int | None = None,
        batch_chars: int | None = None,
        convert_rows: int | None = None,
    ) -> None:
        """The limits default to the module's STAGING_BATCH_ROWS, STAGING_BATCH_CHARS and CONVERT_ROWS."""
        self.engine, self.extract_id = engine, extract_id
        self.batch_rows = batch_rows or STAGING_BATCH_ROWS
        self.batch_chars = batch_chars or STAGING_BATCH_CHARS
        self.convert_rows = convert_rows or CONVERT_ROWS
        self.written = 0
        self._batches: list[pa.RecordBatch] = []
        self._rows = 0
        self._chars = 0
        # pages not converted yet: consecutive (by seq) pages of one set, and their scopes (None: all in scope)
        self._pages: list[tuple[Sequence[Opportunity], Sequence[str] | None]] = []
        self._pages_open = True
        self._pages_seq0 = self._pages_end = 0
        self._writing: Future[int] | None = None  # the batch being written behind the read
        self._writer: ThreadPoolExecutor | None = None

    def add(
        self, page: Sequence[Opportunity], in_open_set: bool, seq0: int, scopes: Sequence[str] | None = None
    ) -> int:
        if not page:
            return 0
        if self._pages and (in_open_set != self._pages_open or seq0 != self._pages_end):
            self._convert()
        if not self._pages:
            self._pages_open, self._pages_seq0 = in_open_set, seq0
        self._pages.append((page, scopes))
        self._pages_end = seq0 + len(page)
        pending = self._pages_end - self._pages_seq0
        if pending >= self.convert_rows or self._rows + pending >= self.batch_rows:
            self._convert()
        if self._rows >= self.batch_rows or self._chars >= self.batch_chars:
            self._write_behind()
        return len(page)

    def _convert(self) -> None:
        pages, self._pages = self._pages, []
        if not pages:
            return
        records = [o for page, _ in pages for o in page] if len(pages) > 1 else pages[0][0]
        scopes = None
        if any(s is not None for _, s in pages):
            scopes = [x for page, s in pages for x in (s if s is not None else [SCOPE_IN] * len(page))]
        batch = stage_batch(self.extract_id, records, self._pages_open, self._pages_seq0, scopes, SCOPE_IN)
        self._batches.append(batch)
        self._rows += batch.num_rows
        self._chars += raw_chars(batch)  # the raw JSON dominates a row's size (UTF-8 bytes, near enough chars)

    def flush(self) -> int:
        """Write what is held, and wait until everything added is written; the rows written since the last flush."""
        before = self.written
        table = self._take()
        try:
            self.wait()
        finally:
            self._stop_writer()
        if table is not None:
            self.written += write_batch(self.engine, table)
        return self.written - before

    def wait(self) -> None:
        """Wait for the batch being written behind the read (its failure raises here)."""
        writing, self._writing = self._writing, None
        if writing is not None:
            self.written += writing.result()

    def abandon(self) -> None:
        """The extract failed: wait for a write under way, whatever its outcome (the failure being handled is
        the one reported), so that it cannot land after the extract's staging is dropped. What is held is
        never written."""
        self._pages, self._batches, self._rows, self._chars = [], [], 0, 0
        try:
            self.wait()
        except Exception:  # noqa: BLE001 - logged; the extract's own failure is the one raised
            log.warning("a staging batch of failed extract %s failed to write as well", self.extract_id, exc_info=True)
        finally:
            self._stop_writer()

    def _stop_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown()

    def _take(self) -> pa.Table | None:
        """What is held, as one table (None: nothing), the writer left empty."""
        self._convert()
        batches, self._batches, self._rows, self._chars = self._batches, [], 0, 0
        return pa.Table.from_batches(batches, schema=STAGE_SCHEMA) if batches else None

    def _write_behind(self) -> None:
        """Hand what is held (a full batch, converted before waiting) to the helper thread."""
        table = self._take()
        self.wait()  # one batch at a time: the one before is written first
        if table is not None:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="oppsync-stage")
            self._writing = self._writer.submit(write_batch, self.engine, table)


def stage_deletes(engine: Engine, extract_id: str, connection: str, page: Iterable[tuple[str, datetime | None]]) -> int:
    rows = [(extract_id, connection, str(sid), to_utc(at) if at else None) for sid, at in page]
    with transaction(engine) as conn:
        return bulk_insert(conn, f"{S}.stage_deletes", ["extract_id", "connection", "source_id", "deleted_at"], rows)
