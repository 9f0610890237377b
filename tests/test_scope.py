"""The scope rules as pure functions: fingerprints, what changed, the stage trigger's order per pipeline."""

from __future__ import annotations

import pytest

from oppsync_pipeline.lib.config import ConfigError, ConnectionConfig
from oppsync_pipeline.lib.record import StageInfo
from oppsync_pipeline.lib.scope import StageTrigger, scope_changes, scope_fingerprint, scope_text, verdict
from tests.reconcile.harness import opp


def conn(**kw) -> ConnectionConfig:
    return ConnectionConfig(name="c", crm="hubspot", base_url="https://api.hubapi.com", **kw)


def test_the_fingerprint_follows_what_decides_the_scope_and_nothing_else():
    base = scope_fingerprint(conn())
    assert scope_fingerprint(conn(page_size=10, overlap_minutes=3)) == base  # not scope
    assert scope_fingerprint(conn(filters=[{"field": "amount", "op": "at_least", "value": 5}])) != base
    assert scope_fingerprint(conn(open_statuses=["a", "b"])) == scope_fingerprint(conn(open_statuses=["b", "a"]))
    assert scope_fingerprint(conn(open_statuses=[])) != base  # [] is not "no rule"
    assert scope_fingerprint(conn(stage_categories={"x": "won", "y": "lost"})) == scope_fingerprint(
        conn(stage_categories={"y": "lost", "x": "won"})
    )
    assert scope_fingerprint(conn(track_from_stage="Qualified")) != base


def test_scope_changes_name_each_part_that_changed():
    old = scope_text(conn())
    new = conn(filters=[{"field": "amount", "op": "at_least", "value": 5}], track_from_stage="Qualified")
    lines = scope_changes(old, new)
    assert len(lines) == 2 and lines[0].startswith("filters: [] -> ") and "at_least" in lines[0]
    assert lines[1] == 'track_from_stage: null -> "Qualified"'
    assert scope_changes(None, new) == [] and scope_changes(old, conn()) == []


STAGES = {
    s.key: s
    for s in [
        StageInfo("a1", "Lead", False, False, 1, pipeline="sales"),
        StageInfo("a2", "Qualified", False, False, 2, "sales"),
        StageInfo("a3", "Proposal", False, False, 3, pipeline="sales"),
        StageInfo("a4", "Won", True, True, 4, "sales"),
        StageInfo("b1", "Qualified", False, False, 7, pipeline="renewals"),
        StageInfo("b0", "Lead", False, False, 5, "renewals"),
        StageInfo("c1", "Intake", False, False, 1, pipeline="support"),
    ]
}


@pytest.mark.parametrize(
    "stage_id, reached",
    [
        ("a1", False),
        ("a2", True),
        ("a3", True),
        ("a4", True),  # closed stages after it count
        ("b0", False),
        ("b1", True),  # another pipeline: its own position
        ("c1", False),
        ("zz", False),
    ],
)  # no such stage in the pipeline / unknown
def test_the_trigger_is_reached_at_its_stage_or_later_in_the_records_pipeline(stage_id, reached):
    trigger = StageTrigger.resolve(conn(track_from_stage="qualified"), STAGES)  # names match case-blind
    record = opp("x", stage=STAGES[stage_id].label if stage_id in STAGES else "?", stage_id=stage_id)
    assert trigger.reached(record) is reached
    assert verdict(record, trigger) == ("in" if reached else "before_stage")
    assert verdict(record, trigger, matches_filters=False) == "filtered_out"


def test_an_unknown_or_unreadable_trigger_stage_is_a_configuration_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"track_from_stage: no stage 'Qualifyed'.*'Qualified'"):
        StageTrigger.resolve(conn(track_from_stage="Qualifyed"), STAGES)
    with pytest.raises(ConfigError, match="needs the tenant's stage list"):
        StageTrigger.resolve(conn(track_from_stage="Qualified"), {})
    assert StageTrigger.resolve(conn(), STAGES) is None
