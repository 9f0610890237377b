"""Code location `oppsync-syncs`: the connections' syncs (see locations/__init__.py)."""

import dagster as dg

from oppsync_pipeline.locations import load_location


@dg.definitions
def defs() -> dg.Definitions:
    return load_location("syncs")
