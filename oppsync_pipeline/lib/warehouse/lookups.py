"""The dictionary entries connectors keep between runs (`oppsync.crm_lookups`, lib/crm/lookups.py): loaded
before an incremental extract, stored when an extract completes."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, select
from sqlalchemy.engine import Engine

from oppsync_pipeline.lib.crm.lookups import LookupCache
from oppsync_pipeline.lib.warehouse.dialect import bulk_insert
from oppsync_pipeline.lib.warehouse.engine import transaction
from oppsync_pipeline.lib.warehouse.schema import SCHEMA as S
from oppsync_pipeline.lib.warehouse.schema import crm_lookups

_DELETE_CHUNK = 1000


def load_lookups(engine: Engine, connection: str) -> LookupCache:
    """The connection's kept entries, for an incremental run (saving it stores only what the run wrote)."""
    t = crm_lookups.c
    entries: dict[str, dict[str, Any]] = defaultdict(dict)
    with transaction(engine) as conn:
        for kind, key, value in conn.execute(select(t.kind, t.lookup_key, t.value).where(t.connection == connection)):
            entries[kind][key] = json.loads(value)
    return LookupCache(dict(entries), full=False)


def save_lookups(engine: Engine, connection: str, cache: LookupCache, now: datetime) -> int:
    """Store what the run read: a full run's cache replaces the connection's entries (entries no record names
    any more go); an incremental run's written entries replace their old versions."""
    rows = list(cache.to_save())
    t = crm_lookups.c
    with transaction(engine) as conn:
        if cache.full:
            conn.execute(delete(crm_lookups).where(t.connection == connection))
        else:
            by_kind: dict[str, list[str]] = defaultdict(list)
            for kind, key, _ in rows:
                by_kind[kind].append(key)
            for kind, key in cache.to_remove():
                by_kind[kind].append(key)
            stmt = delete(crm_lookups).where(
                t.connection == connection,
                t.kind == bindparam("k"),
                t.lookup_key.in_(bindparam("keys", expanding=True)),
            )
            for kind, keys in by_kind.items():
                for i in range(0, len(keys), _DELETE_CHUNK):
                    conn.execute(stmt, {"k": kind, "keys": keys[i : i + _DELETE_CHUNK]})
        return bulk_insert(
            conn,
            f"{S}.crm_lookups",
            ["connection", "kind", "lookup_key", "value", "read_at"],
            [(connection, kind, key, value, now) for kind, key, value in rows],
        )
