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


def test_a_store_replaces_its_keys_and_drops_the_removed_in_one_batch(warehouse_url: str):
    """A flush writes tens of thousands of entries: each key is replaced (never doubled: the primary key), the
    removed ones go, and the entries of other kinds and connections stay."""
    engine = make_engine(warehouse_url)
    ensure_schema(engine)
    first = WarehouseLookups(engine, "c1", EARLIER, full=False)
    keys = [str(i) for i in range(3 * _CHUNK)] + ODD_KEYS
    first.store("contacts", [(k, '{"v":1}') for k in keys], [])
    first.store("companies", [(k, '{"v":"company"}') for k in keys[:10]], [])
    WarehouseLookups(engine, "c2", EARLIER, full=False).store("contacts", [("0", '{"v":"other"}')], [])

    later = WarehouseLookups(engine, "c1", NOW, full=False)
    later.store("contacts", [(k, '{"v":2}') for k in keys[::2]], keys[1::2][:100])
    got = later.fetch("contacts", None)
    removed = set(keys[1::2][:100])
    assert got == {k: '{"v":2}' if i % 2 == 0 else '{"v":1}' for i, k in enumerate(keys) if k not in removed}
    assert later.fetch("companies", keys[:10]) == dict.fromkeys(keys[:10], '{"v":"company"}')
    assert WarehouseLookups(engine, "c2", NOW, full=False).fetch("contacts", ["0"]) == {"0": '{"v":"other"}'}
    later.store("contacts", [], keys[:2])  # only removals
    assert later.fetch("contacts", keys[:3]) == {keys[2]: '{"v":2}'}
    engine.dispose()


def test_postgres_fetches_by_the_whole_key_after_a_large_store(pg_url: str):
    """A full sync fills the table within the run, long before autovacuum analyzes it: with the statistics of
    the empty table the planner read every entry of the kind and filtered the keys (34 ms a page's fetch at
    100,000 entries). A large store refreshes them, so a page's keys are found through the whole primary key."""
    from sqlalchemy import text

    engine = make_engine(pg_url)
    ensure_schema(engine)
    full = WarehouseLookups(engine, "c1", NOW, full=True)
    for start in range(0, 60_000, 20_000):
        full.store("contacts", [(str(i), '{"v":1}') for i in range(start, start + 20_000)], [])
    with engine.connect() as conn:
        plan = "\n".join(
            row[0]
            for row in conn.execute(
                text(
                    "EXPLAIN SELECT lookup_key, value FROM oppsync.crm_lookups WHERE connection = 'c1' "
                    "AND kind = 'contacts' AND read_at = :at AND lookup_key = ANY(:keys)"
                ),
                {"at": NOW, "keys": [str(i) for i in range(0, 60_000, 300)]},
            )
        )
    assert "lookup_key" in plan.split("Index Cond:", 1)[-1].splitlines()[0], plan
    engine.dispose()
