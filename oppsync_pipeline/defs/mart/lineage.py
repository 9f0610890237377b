"""Which Dagster assets feed each `oppsync.*` table the dbt sources read: the lineage of the staging models.

Each connection has two assets (defs/crm/assets.py). Its extract writes the directory before reading any page
(lib/sync.py run_extract: save_directory, save_stages, save_users) and records a failed run in sync_runs; its
reconcile (the `opportunities` asset) writes the opportunity tables, the bookmark and the run's sync_runs row
(lib/reconcile/apply.py). A staging model depends on exactly the assets that write the table it reads: the
users view follows the extracts, the opportunities view the reconciles, not every model on everything."""

from __future__ import annotations

from collections.abc import Iterable

import dagster as dg

from oppsync_pipeline.defs.crm.assets import extract_key, opportunities_key
from oppsync_pipeline.lib.config import ConnectionConfig

EXTRACT = "extract"
RECONCILE = "reconcile"

TABLE_WRITERS: dict[str, frozenset[str]] = {
    "opportunities": frozenset({RECONCILE}),
    "opportunity_events": frozenset({RECONCILE}),
    "opportunity_history": frozenset({RECONCILE}),
    "sync_state": frozenset({RECONCILE}),
    "sync_runs": frozenset({EXTRACT, RECONCILE}),
    "crm_users": frozenset({EXTRACT}),
    "crm_stages": frozenset({EXTRACT}),
    "users": frozenset({EXTRACT}),
    "user_links": frozenset({EXTRACT}),
    "connections": frozenset({EXTRACT}),
}
# A source table added later without an entry here is fed, as far as the graph knows, by both assets of every
# connection: too many edges rather than a model that never goes stale.
UNKNOWN_TABLE = frozenset({EXTRACT, RECONCILE})


def writer_keys(table: str, connections: Iterable[ConnectionConfig]) -> list[dg.AssetKey]:
    """The asset keys that write `oppsync.<table>`, every connection's (the table holds all of them)."""
    roles = TABLE_WRITERS.get(table, UNKNOWN_TABLE)
    keys = []
    for conn in connections:
        if EXTRACT in roles:
            keys.append(extract_key(conn))
        if RECONCILE in roles:
            keys.append(opportunities_key(conn))
    return keys
