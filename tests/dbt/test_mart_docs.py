"""The marts as a BI tool sees them.

Against built warehouses (DuckDB and Postgres), in tests/dbt/test_mart.py on the build it already makes:
`mart_docs.check_mart_docs` (every column of every mart has a description, equal to its comment in the
warehouse: DuckDB's duckdb_columns(), Postgres's col_description()) and `mart_docs.check_docs_catalog`
(`dbt docs generate` shows them).

Here, without a warehouse: the checker itself flags what it must (an undocumented column, a new mart, a stale
comment), and the parsed project (`dbt parse`, which validates the semantic manifest and fails on an invalid
one) has the group, access, persist_docs, semantic model, metrics, time spine and exposure.
"""

from __future__ import annotations

import json
from pathlib import Path

from mart_docs import MARTS, mart_models, undocumented_and_wrong


def _node(description: str, **columns: str) -> dict:
    return {"description": description, "columns": {c: {"description": d} for c, d in columns.items()}}


def test_checker_flags_undocumented_columns_new_marts_and_stale_comments() -> None:
    models = {m: _node(f"{m} grain", id="The id.") for m in MARTS}
    rows = [(m, "id", "The id.", f"{m} grain") for m in MARTS]
    assert undocumented_and_wrong(models, rows) == ([], [])

    # a column another change adds to the relation and to the contract, with no description
    models["outcomes"]["columns"]["amount_base"] = {"description": "  "}
    rows.append(("outcomes", "amount_base", None, "outcomes grain"))
    # a new mart model (not one of the three) with one undocumented column
    models["user_outcomes"] = _node("", user_id="")
    rows.append(("user_outcomes", "user_id", None, None))
    # a comment the build did not refresh
    rows[0] = (rows[0][0], "id", "old text", rows[0][3])
    undocumented, wrong = undocumented_and_wrong(models, rows)
    assert sorted(undocumented) == ["outcomes.amount_base", "user_outcomes (the model itself)", "user_outcomes.user_id"]
    assert wrong == [f"{rows[0][0]}.id: comment 'old text'"]


def test_semantic_model_metrics_time_spine_and_exposure_parse(dbt_manifest: Path) -> None:
    manifest = json.loads(dbt_manifest.read_text(encoding="utf-8"))
    semantic = json.loads((dbt_manifest.parent / "semantic_manifest.json").read_text(encoding="utf-8"))
    models = mart_models(manifest)
    assert set(models) >= MARTS

    # one owner, public, comments written: dbt_project.yml's folder config reaches every mart model
    assert manifest["groups"]["group.oppsync.outcomes"]["owner"]["name"]
    for name, node in models.items():
        assert (node["group"], node["access"]) == ("outcomes", "public"), name
        assert node["config"]["persist_docs"] == {"relation": True, "columns": True}, name

    (model,) = [m for m in semantic["semantic_models"] if m["name"] == "outcomes_daily"]
    assert model["node_relation"]["alias"] == "outcomes"
    assert {e["name"] for e in model["entities"]} >= {"user", "connection"}
    metrics = {m["name"]: m for m in semantic["metrics"]}
    wanted = {"opportunities_created", "opportunities_won", "opportunities_lost", "win_rate"}
    assert wanted | {"amount_created", "amount_won", "amount_lost"} <= set(metrics)
    assert metrics["win_rate"]["type"] == "ratio"
    assert metrics["win_rate"]["type_params"]["numerator"]["name"] == "opportunities_won"
    assert metrics["win_rate"]["type_params"]["denominator"]["name"] == "opportunities_closed"
    assert all(metrics[m]["description"] and metrics[m]["label"] for m in wanted)
    spines = semantic["project_configuration"]["time_spines"]
    assert [(s["node_relation"]["alias"], s["primary_column"]["name"]) for s in spines] == [
        ("time_spine_daily", "date_day")
    ]

    (exposure,) = [e for e in manifest["exposures"].values() if e["name"] == "outcomes_dashboard"]
    assert exposure["type"] == "dashboard" and exposure["owner"]["name"]
    assert {"model.oppsync.outcomes", "model.oppsync.opportunities"} <= set(exposure["depends_on"]["nodes"])
