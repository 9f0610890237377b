"""The dictionary entries connectors keep between runs (`oppsync.crm_lookups`, lib/crm/lookups.py): a run asks
for the keys of each page it enriches and stores what it read from the CRM in batches; a full run's entries
become all the connection keeps when its extract completes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import ARRAY, String, any_, bindparam, delete, or_, select
from sqlalchemy.engine import Engine

from oppsync_pipeline.lib.crm.lookups import LookupCache
from oppsync_pipeline.lib.warehouse.dialect import analyze, bulk_insert
from oppsync_pipeline.lib.warehouse.engine import transaction
from oppsync_pipeline.lib.warehouse.schema import SCHEMA as S
from oppsync_pipeline.lib.warehouse.schema import crm_lookups

_CHUNK = 1000  # keys per fetch statement (a page asks for a few hundred; more is chunked)
_t = crm_lookups.c
# The keys as one array parameter (`lookup_key = ANY(:keys)`; both databases take a list parameter as an array),
# not an IN list of a parameter each: that statement was compiled anew for every count of keys, and DuckDB ran
# a 1,000-key IN list as a scan per statement (a 20,000-entry store: 20 DELETEs, 0.37 s; one ANY, 0.02 s).
_KEYS = bindparam("keys", type_=ARRAY(String))
# Postgres: a store this large refreshes the table's statistics. A full sync fills the table from what the
# previous one left; with statistics from before it, the planner expected a handful of rows per kind, read every
# entry of the kind through the primary key's first two columns and filtered the keys (34 ms a page's fetch at
# 100,000 entries, against 0.1 ms by the whole key once analyzed; autovacuum comes too late for the run).
_ANALYZE_AFTER = 5_000


class WarehouseLookups:
    """A connection's kept entries, as one run sees them. Entries this run stores carry `read_at` = the run's
    start; a full run sees only those (it re-reads every entry: the periodic refresh) and, when it completes,
    drops the rest. What a run stored before it failed stays: each entry is what the CRM answered."""

    def __init__(self, engine: Engine, connection: str, read_at: datetime, *, full: bool):
        self.engine, self.connection, self.read_at, self.full = engine, connection, read_at, full

    def _mine(self, kind: str) -> list:
        where = [_t.connection == self.connection, _t.kind == kind]
        return where + [_t.read_at == self.read_at] if self.full else where

    def fetch(self, kind: str, keys: Sequence[str] | None) -> dict[str, str]:
        found: dict[str, str] = {}
        query = select(_t.lookup_key, _t.value).where(*self._mine(kind))
        with transaction(self.engine) as conn:
            if keys is None:
                found.update((k, v) for k, v in conn.execute(query))
            else:
                stmt = query.where(_t.lookup_key == any_(_KEYS))
                for i in range(0, len(keys), _CHUNK):
                    found.update((k, v) for k, v in conn.execute(stmt, {"keys": list(keys[i : i + _CHUNK])}))
        return found

    def store(self, kind: str, entries: Sequence[tuple[str, str]], removed: Sequence[str]) -> None:
        keys = [k for k, _ in entries] + list(removed)
        stmt = delete(crm_lookups).where(
            _t.connection == self.connection, _t.kind == kind, _t.lookup_key == any_(_KEYS)
        )
        with transaction(self.engine) as conn:
            if keys:  # one statement for the batch (a flush writes up to RESIDENT_MAX - RESIDENT_KEEP entries)
                conn.execute(stmt, {"keys": keys})
            bulk_insert(
                conn,
                f"{S}.crm_lookups",
                ["connection", "kind", "lookup_key", "value", "read_at"],
                [(self.connection, kind, key, value, self.read_at) for key, value in entries],
            )
            if len(entries) >= _ANALYZE_AFTER:
                analyze(conn, f"{S}.crm_lookups", ["connection", "kind", "lookup_key", "read_at"])

    def discard_prefixes(self, kind: str, prefixes: Sequence[str]) -> None:
        with transaction(self.engine) as conn:
            for i in range(0, len(prefixes), _CHUNK):
                matches = [_t.lookup_key.startswith(p, autoescape=True) for p in prefixes[i : i + _CHUNK]]
                conn.execute(delete(crm_lookups).where(*self._mine(kind), or_(*matches)))

    def finish(self) -> None:
        if self.full:
            with transaction(self.engine) as conn:
                conn.execute(delete(crm_lookups).where(_t.connection == self.connection, _t.read_at != self.read_at))


def open_lookups(
    engine: Engine, connection: str, read_at: datetime, *, full: bool, resumed: bool = False
) -> LookupCache:
    """The connection's dictionaries for a run that started at `read_at` (a full run starts empty; one that
    reads on a paused full read, `resumed`, starts from what it stored: its runs share the first one's `read_at`)."""
    return LookupCache(WarehouseLookups(engine, connection, read_at, full=full), full=full, resumed=resumed)
