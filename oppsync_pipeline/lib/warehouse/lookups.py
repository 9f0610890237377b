"""The dictionary entries connectors keep between runs (`oppsync.crm_lookups`, lib/crm/lookups.py): a run asks
for the keys of each page it enriches and stores what it read from the CRM in batches; a full run's entries
become all the connection keeps when its extract completes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import bindparam, delete, or_, select
from sqlalchemy.engine import Engine

from oppsync_pipeline.lib.crm.lookups import LookupCache
from oppsync_pipeline.lib.warehouse.dialect import bulk_insert
from oppsync_pipeline.lib.warehouse.engine import transaction
from oppsync_pipeline.lib.warehouse.schema import SCHEMA as S
from oppsync_pipeline.lib.warehouse.schema import crm_lookups

_CHUNK = 1000  # keys per IN list (Postgres and DuckDB take far more; statements stay readable in logs)
_t = crm_lookups.c


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
                stmt = query.where(_t.lookup_key.in_(bindparam("keys", expanding=True)))
                for i in range(0, len(keys), _CHUNK):
                    found.update((k, v) for k, v in conn.execute(stmt, {"keys": list(keys[i : i + _CHUNK])}))
        return found

    def store(self, kind: str, entries: Sequence[tuple[str, str]], removed: Sequence[str]) -> None:
        keys = [k for k, _ in entries] + list(removed)
        stmt = delete(crm_lookups).where(
            _t.connection == self.connection, _t.kind == kind, _t.lookup_key.in_(bindparam("keys", expanding=True))
        )
        with transaction(self.engine) as conn:
            for i in range(0, len(keys), _CHUNK):
                conn.execute(stmt, {"keys": keys[i : i + _CHUNK]})
            bulk_insert(
                conn,
                f"{S}.crm_lookups",
                ["connection", "kind", "lookup_key", "value", "read_at"],
                [(self.connection, kind, key, value, self.read_at) for key, value in entries],
            )

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
