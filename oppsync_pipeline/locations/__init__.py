"""Code locations: the deployment runs the pipeline as two of them (workspace.yaml), so a sync's run worker
never imports dbt.

- `oppsync_pipeline.locations.syncs`: per connection, the extract and reconcile assets, their checks, the sync
  job and its schedules (defs/crm), the alert sensors (defs/alerts.py) with the shared resource.
- `oppsync_pipeline.locations.mart`: the dbt mart, the dashboard and the sensor that builds them after syncs
  (defs/mart) with the shared resource. Its models depend on the syncs' assets across locations.

Why two: a sync's run worker loads its whole code location. With dagster-dbt, dbt-core, agate and sqlglot
imported beside it, the worker starts ~95 MB larger (measured: `import dagster` 67 MB, `+ dagster_dbt` 160 MB,
`+ dbt.cli.main` 182 MB) for a run that never calls dbt. `oppsync_pipeline.definitions` (the whole defs folder
in one location) stays what `dg check defs`, `dg list defs` and the tests load.
"""

from __future__ import annotations

import importlib

import dagster as dg

# each location's stage: the module and function that build its definitions (besides defs/resources.py's,
# which both use). Called directly rather than through `dg.load_defs`: the components loader imports every
# installed component package (dagster-dbt among them), which is what this split avoids.
# The alert sensors live with the syncs: a run-failure sensor watches the runs of its own location's jobs.
STAGES = {
    "syncs": [
        ("oppsync_pipeline.defs.crm.definitions", "crm_definitions"),
        ("oppsync_pipeline.defs.alerts", "alert_definitions"),
    ],
    "mart": [("oppsync_pipeline.defs.mart.definitions", "mart_stage_definitions")],
}


def load_location(name: str) -> dg.Definitions:
    """One location's definitions: its stage's defs folder and the shared resource."""
    if name not in STAGES:
        raise KeyError(f"no code location '{name}'; the locations are {', '.join(STAGES)}")
    from oppsync_pipeline.defs.resources import resource_definitions

    stages = [getattr(importlib.import_module(module), builder)() for module, builder in STAGES[name]]
    return dg.Definitions.merge(*stages, resource_definitions())
