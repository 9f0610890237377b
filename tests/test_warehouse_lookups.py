"""The dictionary entries kept in the warehouse (lib/warehouse/lookups.py) on both databases: a run finds the keys
it asks for (more than one statement's worth, keys that need quoting, keys not kept), a full run only what it
stored itself, and a completed full run leaves only its own entries."""

from __future__ import annotations

from datetime import datetime

from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine
from oppsync_pipeline.lib.warehouse.lookups import _CHUNK, WarehouseLookups

EARLIER, NOW = datetime(2026, 11, 1), datetime(2026, 12, 1)
ODD_KEYS = ["o'brien", 'say "hi"', "back\\slash", "comma,key", "%_like", "ünïcode", ""]


def test_fetch_finds_what_was_stored_and_nothing_else(warehouse_url: str):
    engine = make_engine(warehouse_url)
    ensure_schema(engine)
    keys = [str(10_000 + i) for i in range(_CHUNK + 300)] + ODD_KEYS
    earlier = WarehouseLookups(engine, "c1", EARLIER, full=True)
    earlier.store("companies", [(k, f'{{"name":"{i}"}}') for i, k in enumerate(keys)], [])
    WarehouseLookups(engine, "c2", EARLIER, full=True).store("companies", [("10000", '{"name":"other"}')], [])

    incremental = WarehouseLookups(engine, "c1", NOW, full=False)
    asked = keys[::3] + ["missing", "10000 "]
    got = incremental.fetch("companies", asked)
    assert got == {k: f'{{"name":"{keys.index(k)}"}}' for k in keys[::3]}
    assert incremental.fetch("contacts", asked) == {}
    assert incremental.fetch("companies", []) == {}
    assert len(incremental.fetch("companies", None)) == len(keys)

    full = WarehouseLookups(engine, "c1", NOW, full=True)  # a full run sees only what it stored
    assert full.fetch("companies", keys) == {}
    full.store("companies", [(ODD_KEYS[0], '{"name":"renamed"}')], [])
    assert full.fetch("companies", keys) == {ODD_KEYS[0]: '{"name":"renamed"}'}
    full.finish()
    assert incremental.fetch("companies", keys) == {ODD_KEYS[0]: '{"name":"renamed"}'}
    assert WarehouseLookups(engine, "c2", NOW, full=False).fetch("companies", ["10000"]) == {
        "10000": '{"name":"other"}'
    }
    engine.dispose()
