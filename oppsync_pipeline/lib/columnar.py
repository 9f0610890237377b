"""A page of extracted records as one Arrow record batch of staging columns, built column by column.

The per-record Python loop that made staging rows (a tuple per record, each value cleaned, converted and hashed
in Python) was most of a sync's warehouse time: 13 s of 18 s for 200,000 records on DuckDB, 19 s of 30 s on
Postgres (issue 21). Here each canonical field is read from the whole page at once (`map(attrgetter)`, C
speed), converted to an Arrow array in one call, and cleaned with Arrow compute kernels; the row hash is left
to the database (staging.py), except for the few records whose values the database would print differently
from Python (`python_hash_mask`): those carry record.row_hash, which the database keeps.

Driven by record.FIELDS: a canonical field added there is staged and hashed without a change here.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from operator import attrgetter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import Date, DateTime, Double, String, Text

from oppsync_pipeline.lib.record import FIELDS, CanonicalField, Opportunity, clean_text, raw_json, row_hash, to_utc

ARROW_TYPES = {
    String: pa.string(),
    Text: pa.string(),
    Double: pa.float64(),
    Date: pa.date32(),
    DateTime: pa.timestamp("us"),
}

STAGE_SCHEMA = pa.schema(
    [
        ("extract_id", pa.string()),
        ("connection", pa.string()),
        ("source_id", pa.string()),
        ("seq", pa.int64()),
        ("in_open_set", pa.bool_()),
        ("scope", pa.string()),
        *((f.name, ARROW_TYPES[f.sql_type]) for f in FIELDS),
        ("raw", pa.string()),
        ("row_hash", pa.string()),
    ]
)
STAGE_COLUMNS: list[str] = STAGE_SCHEMA.names

_TRACKED = tuple(f for f in FIELDS if f.tracked)
_TRACKED_NAMES = tuple(f.name for f in _TRACKED)
_NONE = type(None)

# The numbers both databases print as Python's repr(round(v, 6)) does: at most 6 decimals (then round(v, 6) is
# v itself), positional notation in Python (1e-4 <= |v| < 1e16) and in Postgres (|v| < 1e15), and few enough
# digits that no printing can differ (< 1e9 with 6 decimals is 15 significant digits). Amounts and
# probabilities are all in here; anything else keeps its Python hash.
_HASHABLE_MIN, _HASHABLE_MAX = 1e-4, 1e9


def _coerce(value: Any, field: CanonicalField) -> Any:
    """A value Arrow would not take as the field's type, as the warehouse column stores it (COPY and the
    DataFrame insert did the same conversions)."""
    if value is None:
        return None
    if field.sql_type is Double:
        return float(value)
    if field.sql_type is Date:
        return value.date() if isinstance(value, datetime) else value
    if field.sql_type is DateTime:
        return to_utc(value)
    return str(value)


def field_array(values: list[Any], field: CanonicalField) -> pa.Array:
    """One canonical field of a page as an Arrow array of its column's type: tz-aware date-times become naive
    UTC (Arrow converts them), CRM text loses its NUL bytes (record.clean_text, as one kernel call)."""
    arrow_type = ARROW_TYPES[field.sql_type]
    try:
        array = pa.array(values, type=arrow_type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError):  # ints past 64 bits, non-str text
        array = pa.array([_coerce(v, field) for v in values], type=arrow_type)
    if field.cleaned and array.null_count < len(array):
        array = pc.replace_substring(array, "\x00", "")
    return array


def python_hash_mask(page_values: dict[str, list[Any]], arrays: dict[str, pa.Array]) -> np.ndarray:
    """Which records' row hash Python must compute (True): a tracked number that is not a float, or that the
    databases would print otherwise than repr(round(v, 6)) (see _HASHABLE_*), or a date / date-time before
    year 1000 (Python's strftime does not pad such years). Vectorised; the rare records it flags are hashed
    one by one."""
    n = len(next(iter(arrays.values())))
    mask = np.zeros(n, dtype=bool)
    for f in _TRACKED:
        array = arrays.get(f.name)
        if array is None or array.null_count == n:
            continue
        if f.sql_type is Double:
            if not set(map(type, page_values[f.name])) <= {float, _NONE}:  # ints hash as "1000", not "1000.0"
                mask |= np.array([v is not None and type(v) is not float for v in page_values[f.name]])
            v = array.to_numpy(zero_copy_only=False)  # NaN where None (and where NaN)
            nulls = array.is_null().to_numpy(zero_copy_only=False)
            with np.errstate(invalid="ignore", over="ignore"):
                # rint(v * 1e6) / 1e6 == v exactly when round(v, 6) == v, for |v| < 2**53 / 1e6
                ok = ((v == 0) | ((np.abs(v) >= _HASHABLE_MIN) & (np.abs(v) < _HASHABLE_MAX))) & (
                    np.rint(v * 1e6) / 1e6 == v
                )
            mask |= ~(ok | nulls)  # a NaN is no NULL: Postgres prints it 'NaN', Python 'nan'
        elif f.sql_type in (Date, DateTime):
            early = pc.fill_null(pc.less(pc.year(array), 1000), False)
            mask |= early.to_numpy(zero_copy_only=False)
    return mask


def stage_batch(
    extract_id: str,
    page: Sequence[Opportunity],
    in_open_set: bool,
    seq0: int,
    scopes: Sequence[str] | None,
    default_scope: str,
) -> pa.RecordBatch:
    """One page as staging columns (STAGE_SCHEMA). `row_hash` is null where the database computes it."""
    n = len(page)
    values = {f.name: list(map(attrgetter(f.name), page)) for f in FIELDS}
    arrays = {f.name: field_array(values[f.name], f) for f in FIELDS}
    hashes: list[str | None] = [None] * n
    for i in np.flatnonzero(python_hash_mask(values, arrays)):
        hashes[i] = row_hash(*(_stored(values[name][i], f) for name, f in zip(_TRACKED_NAMES, _TRACKED)))
    columns = [
        pa.array([extract_id] * n, type=pa.string()),
        pa.array(list(map(attrgetter("connection"), page)), type=pa.string()),
        pa.array(list(map(attrgetter("source_id"), page)), type=pa.string()),
        pa.array(np.arange(seq0, seq0 + n, dtype=np.int64)),
        pa.array(np.full(n, bool(in_open_set))),
        pa.array(list(scopes) if scopes is not None else [default_scope] * n, type=pa.string()),
        *(arrays[f.name] for f in FIELDS),
        pa.array([raw_json(o.raw) for o in page], type=pa.string()),
        pa.array(hashes, type=pa.string()),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=STAGE_SCHEMA)


def _stored(value: Any, field: CanonicalField) -> Any:
    """A tracked value as staging stores it (what record.row_hash is taken over)."""
    if field.cleaned:
        return clean_text(value)
    if value is not None and field.sql_type is DateTime:
        return to_utc(value)
    return value


def raw_chars(batch: pa.RecordBatch) -> int:
    """The raw payload's size in a batch (UTF-8 bytes of its JSON: what bounds a staging batch's memory)."""
    raw = batch.column("raw")
    return int(pc.sum(pc.binary_length(raw)).as_py() or 0)
