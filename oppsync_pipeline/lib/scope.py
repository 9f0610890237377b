"""A connection's scope: which of the CRM's opportunities it tracks, and a fingerprint of that rule.

The scope is what a run read: the record filters (seed 001 conditions), what counts as open / won / lost
(`open_statuses`, `stage_categories`) and the stage trigger (`track_from_stage`). Runs record its fingerprint,
so a run under a different scope is never compared with one under the old scope as if nothing had changed:
a scope change forces a full sync, is announced in the run's metadata, and an opportunity that no longer
matches is `left_scope`, never `deleted` (lib/reconcile).

Each record a run reads gets a verdict (staging.SCOPE_*):
  in            matches the filters and (with a stage trigger) reached the trigger stage;
  filtered_out  read by id without filters (a full sync's check of the ids it missed) and does not match them;
  before_stage  matches the filters but has not reached the trigger stage: ignored unless already tracked
                (once it reached the stage it stays tracked, seed 001).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from oppsync_pipeline.lib.config import ConfigError, ConnectionConfig
from oppsync_pipeline.lib.record import Opportunity, StageInfo
from oppsync_pipeline.lib.staging import SCOPE_BEFORE_STAGE, SCOPE_FILTERED_OUT, SCOPE_IN


def scope_description(conn: ConnectionConfig) -> dict:
    """The parts of a connection's configuration that decide which opportunities it tracks and how they count."""
    return {
        "filters": [f.model_dump(mode="json") for f in conn.filters],
        "open_statuses": sorted(conn.open_statuses) if conn.open_statuses is not None else None,
        "stage_categories": dict(sorted(conn.stage_categories.items())),
        "track_from_stage": conn.track_from_stage,
    }


def scope_text(conn: ConnectionConfig) -> str:
    return json.dumps(scope_description(conn), sort_keys=True, separators=(",", ":"), default=str)


def scope_fingerprint(conn: ConnectionConfig) -> str:
    """Short, stable digest of the scope (equal configurations give equal fingerprints, key order aside)."""
    return hashlib.sha256(scope_text(conn).encode("utf-8")).hexdigest()[:16]


def scope_changes(old_text: str | None, conn: ConnectionConfig) -> list[str]:
    """What changed between a recorded scope and the connection's, one line per part, for the run's metadata."""
    if not old_text:
        return []
    try:
        old = json.loads(old_text)
    except ValueError:
        return ["scope: the recorded scope is unreadable"]
    new = json.loads(scope_text(conn))
    return [f"{key}: {json.dumps(old.get(key))} -> {json.dumps(new[key])}" for key in new if old.get(key) != new[key]]


@dataclass(frozen=True)
class StageTrigger:
    """`track_from_stage` resolved against the tenant's stage dictionary: the trigger's position per pipeline."""

    name: str
    rank_by_pipeline: dict[str | None, int]  # pipeline -> sort_order of the trigger stage in it
    stages: dict[str, StageInfo]

    @classmethod
    def resolve(cls, conn: ConnectionConfig, stages: dict[str, StageInfo]) -> StageTrigger | None:
        wanted = conn.track_from_stage
        if wanted is None:
            return None
        if not stages:
            raise ConfigError(
                [
                    f"connections.{conn.name}.track_from_stage: '{wanted}' needs the tenant's stage list "
                    "(its order), which this API user cannot read; grant read access to the stage "
                    "metadata (see docs/crms) or remove track_from_stage"
                ]
            )
        key = wanted.casefold()
        matches = [s for s in stages.values() if s.label.casefold() == key or s.key.casefold() == key]
        if not matches:
            names = sorted({s.label for s in stages.values()})
            raise ConfigError(
                [f"connections.{conn.name}.track_from_stage: no stage '{wanted}' in this tenant; its stages: {names}"]
            )
        ranks: dict[str | None, int] = {}
        for s in matches:
            ranks[s.pipeline] = min(ranks.get(s.pipeline, s.sort_order), s.sort_order)
        return cls(wanted, ranks, stages)

    def reached(self, opp: Opportunity) -> bool:
        """Whether the record stands at the trigger stage or a later one in the CRM's stage order (closed stages
        included where the CRM orders them after it). Unknown stages and pipelines without the trigger stage
        have not reached it."""
        info = self.stages.get(opp.stage_id) if opp.stage_id is not None else None
        if info is None and opp.stage is not None:
            info = next((s for s in self.stages.values() if s.label == opp.stage), None)
        if info is None:
            return False
        rank = self.rank_by_pipeline.get(info.pipeline)
        if rank is None and len(self.rank_by_pipeline) == 1 and None in self.rank_by_pipeline:
            rank = self.rank_by_pipeline[None]
        return rank is not None and info.sort_order >= rank


def verdict(opp: Opportunity, trigger: StageTrigger | None, matches_filters: bool = True) -> str:
    if not matches_filters:
        return SCOPE_FILTERED_OUT
    if trigger is not None and not trigger.reached(opp):
        return SCOPE_BEFORE_STAGE
    return SCOPE_IN
