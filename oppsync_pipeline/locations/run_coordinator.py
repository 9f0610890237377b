"""The run queue of every oppsync instance (dagster.yaml, deploy/*/dagster.yaml): Dagster's QueuedRunCoordinator,
which first gives a run of one connection's assets that connection's `oppsync/connection` tag.

Why: the queue's per-connection limit (tag_concurrency_limits on `oppsync/connection`) only sees run tags. The
sync jobs, schedules, sensors and the CLI set the tag, but the UI's "Materialize" launches the implicit asset
job `__ASSET_JOB` with the selected assets and no tags at all: Dagster 1.13 derives no run tags from the assets
(asset `tags` and `op_tags` stay on the asset and its step; pools limit steps, not queued runs). Here, at
submission, before the queue first looks at the run, the tag is copied from the selected assets' own
`oppsync/connection` tag (defs/crm/assets.py) when they all belong to one connection.
"""

from __future__ import annotations

from collections.abc import Iterable

import dagster as dg

CONNECTION_TAG = "oppsync/connection"


def connection_of(asset_tags: Iterable[dict[str, str]]) -> str | None:
    """The one connection a run's assets belong to, or None (no connection's assets: the mart; or several)."""
    names = {tags.get(CONNECTION_TAG) for tags in asset_tags}
    names.discard(None)
    return names.pop() if len(names) == 1 else None


class ConnectionTaggingRunCoordinator(dg.QueuedRunCoordinator):
    """QueuedRunCoordinator (same configuration) that tags a run of one connection's assets with the connection."""

    def submit_run(self, context: dg.SubmitRunContext) -> dg.DagsterRun:
        run = context.dagster_run
        if CONNECTION_TAG not in run.tags:
            name = connection_of(self._selected_asset_tags(context))
            if name is not None:
                self._instance.add_run_tags(run.run_id, {CONNECTION_TAG: name})
                run = self._instance.get_run_by_id(run.run_id) or run
        return super().submit_run(context._replace(dagster_run=run))

    @staticmethod
    def _selected_asset_tags(context: dg.SubmitRunContext) -> list[dict[str, str]]:
        run = context.dagster_run
        keys = set(run.asset_selection or ())
        keys |= {check.asset_key for check in run.asset_check_selection or ()}
        graph = context.workspace.asset_graph
        return [dict(graph.get(key).tags or {}) for key in keys if graph.has(key)]
