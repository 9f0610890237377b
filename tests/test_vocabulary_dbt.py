"""dbt's `accepted_values` tests name the values the pipeline writes: they must be the Python enums' values
exactly (a kind added in Python and not in dbt fails the mart's tests in production; one listed in dbt and
never written hides a typo)."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
import yaml

from oppsync_pipeline.lib.record import EventKind, Status
from oppsync_pipeline.lib.warehouse.runs import ExtractStatus, RunStatus

MODELS = Path(__file__).resolve().parents[1] / "dbt" / "models"

# The column names (as the dbt models call them) that hold a value the pipeline writes.
WRITTEN = {
    "status": set(get_args(Status)),
    "stage_category": set(get_args(Status)),
    "event_type": {k.value for k in EventKind},
    "run_status": {s.value for s in RunStatus},
    "extract_status": {s.value for s in ExtractStatus},
}
# Values dbt derives itself (no Python writes them): the activity an outcome counts, a period's grain.
DBT_ONLY = {"activity", "period_grain"}


def _accepted_values() -> list[tuple[str, str, str, set[str]]]:
    """(file, model, column, values) of every accepted_values test under dbt/models."""
    found = []
    for path in sorted(MODELS.rglob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for model in doc.get("models") or []:
            for column in model.get("columns") or []:
                for test in column.get("data_tests") or column.get("tests") or []:
                    if isinstance(test, dict) and "accepted_values" in test:
                        spec = test["accepted_values"]
                        values = (spec.get("arguments") or spec).get("values")
                        found.append((path.name, model["name"], column["name"], {str(v) for v in values}))
    return found


def test_dbt_accepted_values_are_the_python_vocabularies():
    found = _accepted_values()
    assert found, "no accepted_values test found under dbt/models"
    checked = set()
    for file, model, column, values in found:
        if column in DBT_ONLY:
            continue
        assert column in WRITTEN, (
            f"{file}: {model}.{column} has accepted_values but no Python vocabulary here; "
            "add it to WRITTEN (or DBT_ONLY if dbt derives it)"
        )
        assert values == WRITTEN[column], (
            f"{file}: {model}.{column} accepts {sorted(values)}, the pipeline writes {sorted(WRITTEN[column])}"
        )
        checked.add(column)
    # the event kinds and the record statuses are checked in dbt today; keep them so
    assert {"event_type", "status"} <= checked


@pytest.mark.parametrize("enum", [EventKind, ExtractStatus, RunStatus])
def test_enum_values_are_the_stored_text(enum):
    # StrEnum members are their values: comparisons with the stored text and bound parameters see the text
    assert all(member == member.value and str(member) == member.value for member in enum)
