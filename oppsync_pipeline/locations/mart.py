"""Code location `oppsync-mart`: the dbt mart and the dashboard (see locations/__init__.py)."""

import dagster as dg

from oppsync_pipeline.locations import load_location


@dg.definitions
def defs() -> dg.Definitions:
    return load_location("mart")
