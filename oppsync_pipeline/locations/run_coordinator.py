"""The run queue of every oppsync instance (dagster.yaml, deploy/*/dagster.yaml): Dagster's QueuedRunCoordinator,
which first gives a run of one connection's assets that connection's `oppsync/connection` tag, and a run of the
mart's assets an `oppsync/mart` tag.

Why: the queue's per-connection limit (tag_concurrency_limits on `oppsync/connection`) only sees run tags. The
sync jobs, schedules, sensors and the CLI set the tag, but the UI's "Materialize" launches the implicit asset
job `__ASSET_JOB` with the selected assets and no tags at all: Dagster 1.13 derives no run tags from the assets
(asset `tags` and `op_tags` stay on the asset and its step; pools limit steps, not queued runs). Here, at
submission, before the queue first looks at the run, the tag is copied from the selected assets' own
`oppsync/connection` tag (defs/crm/assets.py) when they all belong to one connection.

The mart's runs, one at a time (tag_concurrency_limits on `oppsync/mart`, any value): dbt rebuilds a view by
renaming the old one away and dropping it with CASCADE, which drops every view built on it until the same dbt
run recreates them. A second build running meanwhile read a view that was gone ("relation
intermediate.int_opportunities__categorized does not exist", make bench freshness: three failed builds in a
row, and changes that never reached the mart). The automation, `build_mart`, `mart_tests` and the hourly
aggregates tag their runs; a UI "Materialize" of mart assets gets `oppsync/mart=ui` here.
"""

from __future__ import annotations

from collections.abc import Iterable

import dagster as dg

CONNECTION_TAG = "oppsync/connection"
MART_TAG = "oppsync/mart"  # defs/mart/assets.py MART_RUN_TAG (not imported: this module loads in every process)
MART_GROUP = "mart"


def connection_of(asset_tags: Iterable[dict[str, str]]) -> str | None:
    """The one connection a run's assets belong to, or None (no connection's assets: the mart; or several)."""
    names = {tags.get(CONNECTION_TAG) for tags in asset_tags}
    names.discard(None)
    return names.pop() if len(names) == 1 else None


class ConnectionTaggingRunCoordinator(dg.QueuedRunCoordinator):
    """QueuedRunCoordinator (same configuration) that tags a run of one connection's assets with the connection."""

    def submit_run(self, context: dg.SubmitRunContext) -> dg.DagsterRun:
        run = context.dagster_run
        tags = {}
        if CONNECTION_TAG not in run.tags or MART_TAG not in run.tags:
            nodes = self._selected_assets(context)
            name = connection_of(dict(node.tags or {}) for node in nodes)
            if CONNECTION_TAG not in run.tags and name is not None:
                tags[CONNECTION_TAG] = name
            if MART_TAG not in run.tags and any(node.group_name == MART_GROUP for node in nodes):
                tags[MART_TAG] = "ui"
        if tags:
            self._instance.add_run_tags(run.run_id, tags)
            run = self._instance.get_run_by_id(run.run_id) or run
        return super().submit_run(context._replace(dagster_run=run))

    @staticmethod
    def _selected_assets(context: dg.SubmitRunContext) -> list:
        run = context.dagster_run
        keys = set(run.asset_selection or ())
        keys |= {check.asset_key for check in run.asset_check_selection or ()}
        graph = context.workspace.asset_graph
        return [graph.get(key) for key in keys if graph.has(key)]
