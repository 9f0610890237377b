"""The UI's asset graph has no external assets, and a UI "Materialize" of one connection's assets carries the
connection's tag (issue 20 item 7), so the run queue's per-connection limit (dagster.yaml: tag_concurrency_limits
on `oppsync/connection`) holds for it too; one of the mart's assets carries `oppsync/mart` (one mart run at a time).

The launch is the UI's own GraphQL mutation (launchPipelineExecution on the implicit asset job `__ASSET_JOB` with
an asset selection, no tags), against the project served by a real code server, on an instance with the
repository's dagster.yaml run coordinator. No daemon runs: the run stays QUEUED, which is where
the queue's limit reads its tags."""

from __future__ import annotations

import tomllib
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql

from oppsync_pipeline.locations.run_coordinator import connection_of
from tests.dagster.conftest import REPO

# the whole project as one location, named as [tool.dg.project] code_location_name says (dg dev's name for it)
LOCATION = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["dg"]["project"]["code_location_name"]
LAUNCH = """
mutation($executionParams: ExecutionParams!) { launchPipelineExecution(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on InvalidSubsetError { message }
    ... on PythonError { message stack }
    ... on RunConfigValidationInvalid { errors { message } }
} }
"""

ASSET_NODES = "{ assetNodes { assetKey { path } isExecutable isMaterializable } }"


def config_with_two_connections(path: Path) -> Path:
    """Definitions only (nothing runs): two connections whose CRMs are never called."""
    connections = [
        {
            "name": name,
            "crm": "salesforce",
            "base_url": "http://127.0.0.1:9",
            "credentials": {"client_id": "${UI_TAGS_ID}", "client_secret": "${UI_TAGS_SECRET}"},
        }
        for name in ("acme-eu", "acme_us")
    ]
    path.write_text(
        yaml.safe_dump({"warehouse": {"url": f"duckdb:///{path.parent / 'w.duckdb'}"}, "connections": connections})
    )
    return path


def launch_like_the_ui(context, repository: str, asset_paths: list[list[str]]) -> str:
    result = execute_dagster_graphql(
        context,
        LAUNCH,
        variables={
            "executionParams": {
                "selector": {
                    "repositoryLocationName": LOCATION,
                    "repositoryName": repository,
                    "pipelineName": "__ASSET_JOB",
                    "assetSelection": [{"path": p} for p in asset_paths],
                },
                "runConfigData": {},
                "executionMetadata": {"tags": []},
            }
        },
    )
    launched = result.data["launchPipelineExecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return launched["run"]["runId"]


def test_a_ui_materialize_of_a_connections_assets_carries_its_tag(tmp_path, monkeypatch, capfd):
    """Also: the code server loading the project under its configured name logs no code-location name warning."""
    monkeypatch.setenv("OPPSYNC_CONFIG", str(config_with_two_connections(tmp_path / "oppsync.yaml")))
    workspace = tmp_path / "workspace.yaml"
    entry = {
        "python_module": {
            "module_name": "oppsync_pipeline.definitions",
            "location_name": LOCATION,
            "working_directory": str(REPO),
        }
    }
    workspace.write_text(yaml.safe_dump({"load_from": [entry]}))
    coordinator = yaml.safe_load((REPO / "dagster.yaml").read_text())["run_coordinator"]
    (tmp_path / "home").mkdir()

    with (
        dg.instance_for_test(overrides={"run_coordinator": coordinator}, temp_dir=str(tmp_path / "home")) as instance,
        define_out_of_process_context(str(workspace), None, instance) as context,
    ):
        repository = next(iter(context.get_code_location(LOCATION).get_repositories()))
        both = launch_like_the_ui(
            context, repository, [["oppsync", "acme_eu", "extract"], ["oppsync", "acme_eu", "opportunities"]]
        )
        one = launch_like_the_ui(context, repository, [["oppsync", "acme_us", "opportunities"]])
        mart = launch_like_the_ui(context, repository, [["marts", "opportunities"]])

        # what the UI's asset graph shows: every asset can be materialized; no external (phantom) asset such as
        # the `oppsync/opportunities` that dbt source tests once made
        nodes = execute_dagster_graphql(context, ASSET_NODES).data["assetNodes"]
        assert len(nodes) > 10, nodes
        assert [n["assetKey"]["path"] for n in nodes if not (n["isExecutable"] and n["isMaterializable"])] == []
        assert not [n for n in nodes if len(n["assetKey"]["path"]) == 2 and n["assetKey"]["path"][0] == "oppsync"]

        for run_id, connection in ((both, "acme-eu"), (one, "acme_us")):
            run = instance.get_run_by_id(run_id)
            assert run.job_name == "__ASSET_JOB"
            assert run.status == dg.DagsterRunStatus.QUEUED  # in the queue, where the limit reads the tag
            assert run.tags["oppsync/connection"] == connection, run.tags
            assert "oppsync/mart" not in run.tags
        # a UI build of the mart waits for any other mart run: dbt's view rebuilds drop the views built on them
        run = instance.get_run_by_id(mart)
        assert run.tags["oppsync/mart"] == "ui" and "oppsync/connection" not in run.tags, run.tags
        assert {"key": "oppsync/mart", "limit": 1} in coordinator["config"]["tag_concurrency_limits"]
    logged = capfd.readouterr()
    assert "code location name" not in logged.out + logged.err


@pytest.mark.parametrize(
    ("asset_tags", "expected"),
    [
        ([{"oppsync/connection": "a", "crm": "x"}, {"oppsync/connection": "a"}], "a"),
        ([{"oppsync/connection": "a"}, {"oppsync/connection": "b"}], None),  # two connections: no single limit
        ([{"dagster/kind/dbt": ""}], None),  # the mart
        ([], None),
    ],
)
def test_the_connection_of_a_selection(asset_tags, expected):
    assert connection_of(asset_tags) == expected
