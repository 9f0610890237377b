"""Quality rules for an extracted set, as a Great Expectations 1.x suite (run in an ephemeral context).

GX is imported inside the function: the import costs seconds and most code paths never need it.
dagster-ge is not used: it pins great-expectations < 1.0 (style.md trap 3).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pandas as pd
from sqlalchemy import text
from sqlalchemy.engine import Engine

from oppsync_pipeline.lib.warehouse.engine import transaction

STATUSES = ["open", "won", "lost"]


@dataclass
class SuiteResult:
    success: bool
    rows: int
    failures: list[dict[str, Any]]
    expectations: list[dict[str, Any]]


def staged_frame(engine: Engine, extract_id: str) -> pd.DataFrame:
    """The columns the suite checks, one row per distinct (id, set, version, content) of the extract.

    Exact duplicates (the same record on two pages) and newer versions of a record changed while it was
    being read are legitimate, and reconcile keeps the latest; two *different* contents for the same id,
    set and modification time are not, and fail the uniqueness expectation."""
    with transaction(engine) as conn:
        rows = conn.execute(text(
            "SELECT DISTINCT source_id, in_open_set, modified_at, row_hash, status, amount, created_at "
            "FROM oppsync.stage_opportunities WHERE extract_id = :x"), {"x": extract_id}).fetchall()
    return pd.DataFrame(rows, columns=["source_id", "in_open_set", "modified_at", "row_hash", "status", "amount",
                                       "created_at"])


def validate_extract(frame: pd.DataFrame, server_now: datetime, tolerance: timedelta = timedelta(hours=1)) -> SuiteResult:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # GX's per-metric progress bars would flood run logs
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx
    import great_expectations.expectations as gxe

    context = gx.get_context(mode="ephemeral")
    source = context.data_sources.add_pandas("oppsync")
    batch = source.add_dataframe_asset("extract").add_batch_definition_whole_dataframe("extract")
    suite = context.suites.add(gx.ExpectationSuite(name="extracted_opportunities"))
    for expectation in (
        gxe.ExpectColumnValuesToNotBeNull(column="source_id"),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["source_id", "in_open_set", "modified_at"]),
        gxe.ExpectColumnValuesToBeInSet(column="status", value_set=STATUSES),
        gxe.ExpectColumnValuesToBeBetween(column="created_at", max_value=server_now + tolerance),
        gxe.ExpectColumnValuesToBeBetween(column="amount", min_value=0),
    ):
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="extract", data=batch, suite=suite))
    frame = frame.copy()
    frame["created_at"] = pd.to_datetime(frame["created_at"])
    frame["amount"] = pd.to_numeric(frame["amount"])
    result = definition.run(batch_parameters={"dataframe": frame})
    expectations, failures = [], []
    for r in result.results:
        cfg = r.expectation_config
        item = {"expectation": cfg.type, "column": cfg.kwargs.get("column") or cfg.kwargs.get("column_list"),
                "success": bool(r.success),
                "unexpected_count": (r.result or {}).get("unexpected_count"),
                "partial_unexpected_list": [str(v) for v in ((r.result or {}).get("partial_unexpected_list") or [])[:5]]}
        expectations.append(item)
        if not r.success:
            failures.append(item)
    return SuiteResult(bool(result.success), len(frame), failures, expectations)
