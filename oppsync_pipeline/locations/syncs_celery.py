"""Code location `oppsync-syncs` with every step executed by Celery workers (README "Scaling out").

The same definitions as `oppsync_pipeline.locations.syncs`; only the executor differs: `celery_executor` hands
each step (extract, checks, reconcile) to a `dagster-celery` worker through the broker (`oppsync workers`), so
many connections' syncs run on as many machines as there are workers. Point workspace.yaml here instead of at
`syncs` and give each run the broker in its run config (`execution.config`, deploy/celery/worker.yaml).
dagster-celery is a dev dependency (an image adds it with EXTRA_PACKAGES, Dockerfile): the default locations
never import it.
"""

import dagster as dg
from dagster_celery import celery_executor

from oppsync_pipeline.defs.crm.definitions import crm_definitions
from oppsync_pipeline.defs.resources import resource_definitions


@dg.definitions
def defs() -> dg.Definitions:
    # the shared resource without its executor (in-process, defs/resources.py): Definitions.merge takes one
    shared = resource_definitions()
    return dg.Definitions.merge(crm_definitions(), dg.Definitions(resources=shared.resources, executor=celery_executor))
