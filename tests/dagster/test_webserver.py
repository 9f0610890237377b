"""The Dagster UI's server, as `make dev` starts it: `dagster-webserver -w workspace.yaml` in a subprocess,
with DAGSTER_HOME and OPPSYNC_CONFIG in tmp_path and the CRM simulator served by this test process. Its
GraphQL API shows the asset graph, the checks and the schedules, and "sync now" (launchRun) runs a
connection's job to SUCCESS in a run worker subprocess.

The test's dagster.yaml is the repository's with the DefaultRunCoordinator instead of the
QueuedRunCoordinator: a queued run waits for `dagster-daemon` to dequeue it, which would add a second
long-lived process and its polling interval to a test about the webserver. The queue's limits are
configuration, checked where they are parsed (test_postgres_instance.py loads the production file)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from sqlalchemy import create_engine, text

from tests.dagster.conftest import REPO, every_creator_mapped, start_servers, stop_servers, write_config

BIN = Path(sys.executable).parent
STARTUP_SECONDS = 180
RUN_SECONDS = 420  # a run worker loads the definitions again; minutes on a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Webserver:
    url: str
    warehouse_url: str
    log: Path
    crm_ids: set[str]

    def graphql(self, query: str, **variables) -> dict:
        r = requests.post(f"{self.url}/graphql", json={"query": query, "variables": variables}, timeout=60)
        r.raise_for_status()
        body = r.json()
        assert "errors" not in body, body["errors"]
        return body["data"]


def write_instance_yaml(home: Path) -> None:
    config = yaml.safe_load((REPO / "dagster.yaml").read_text(encoding="utf-8"))
    config["run_coordinator"] = {"module": "dagster._core.run_coordinator", "class": "DefaultRunCoordinator"}
    (home / "dagster.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")


@pytest.fixture
def webserver(tmp_path: Path) -> Iterator[Webserver]:
    servers = start_servers({"sandbox-salesforce": "salesforce"}, opportunities=60)
    home = tmp_path / "dagster_home"
    home.mkdir()
    write_instance_yaml(home)
    warehouse_url = f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    config = write_config(tmp_path / "oppsync.yaml", servers, warehouse_url, users=every_creator_mapped(servers))
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(
        yaml.safe_dump(
            {
                "load_from": [
                    {
                        "python_module": {
                            "module_name": "oppsync_pipeline.definitions",
                            "working_directory": str(REPO),
                            "location_name": "oppsync",
                        }
                    }
                ]
            }
        ),
        encoding="utf-8",
    )
    port = free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "OPPSYNC_CONFIG": str(config),
        "GX_ANALYTICS_ENABLED": "false",
        "TQDM_DISABLE": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = tmp_path / "webserver.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w", str(workspace)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            assert proc.poll() is None, f"dagster-webserver exited {proc.returncode}:\n{log.read_text()[-4000:]}"
            try:
                if requests.get(f"{url}/server_info", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"no /server_info after {STARTUP_SECONDS}s:\n{log.read_text()[-4000:]}"
            time.sleep(0.5)
        yield Webserver(
            url, warehouse_url, log, {o.native_id for o in servers["sandbox-salesforce"].simulator.world.live()}
        )
    finally:
        # the webserver, its code server and any run worker share the session: end them together
        try:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)
        stop_servers(servers)


REPOSITORY = """
{ repositoriesOrError { ... on RepositoryConnection { nodes {
    name location { name }
    jobs { name }
    schedules { name cronSchedule executionTimezone scheduleState { status } }
    sensors { name }
} } ... on PythonError { message } } }
"""

ASSETS = """
{ assetNodes {
    assetKey { path } groupName
    dependencyKeys { path }
    assetChecksOrError { ... on AssetChecks { checks { name blocking } } }
} }
"""

LAUNCH = """
mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on PythonError { message stack }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on InvalidSubsetError { message }
    ... on PipelineNotFoundError { message }
} }
"""

RUN = """
query($runId: ID!) { runOrError(runId: $runId) {
    ... on Run { status tags { key value } assetMaterializations { assetKey { path } } }
} }
"""


@pytest.mark.slow  # ~60-110 s: a webserver, its code server and a run worker each load the definitions
def test_the_ui_shows_the_graph_checks_and_schedules_and_syncs_now(webserver: Webserver):
    repos = webserver.graphql(REPOSITORY)["repositoriesOrError"]["nodes"]
    assert len(repos) == 1
    repo = repos[0]
    assert {j["name"] for j in repo["jobs"]} >= {"sync_sandbox_salesforce", "build_mart"}
    schedules = {s["name"]: s for s in repo["schedules"]}
    # the connection's hourly and nightly syncs, and dbt's tests of the mart every hour (`mart_tests`)
    assert set(schedules) == {"sync_sandbox_salesforce", "full_sync_sandbox_salesforce", "mart_tests_hourly"}
    assert schedules["sync_sandbox_salesforce"]["cronSchedule"] == "30 * * * *"
    assert schedules["sync_sandbox_salesforce"]["executionTimezone"] == "UTC"
    assert schedules["sync_sandbox_salesforce"]["scheduleState"]["status"] == "RUNNING"
    assert {s["name"] for s in repo["sensors"]} >= {"mart_follows_syncs"}

    nodes = {tuple(n["assetKey"]["path"]): n for n in webserver.graphql(ASSETS)["assetNodes"]}
    extract = nodes[("oppsync", "sandbox_salesforce", "extract")]
    opportunities = nodes[("oppsync", "sandbox_salesforce", "opportunities")]
    assert extract["groupName"] == opportunities["groupName"] == "crm_sandbox_salesforce"
    assert {"path": ["oppsync", "sandbox_salesforce", "extract"]} in opportunities["dependencyKeys"]
    assert extract["assetChecksOrError"]["checks"] == [{"name": "extract_quality", "blocking": True}]
    assert {c["name"] for c in opportunities["assetChecksOrError"]["checks"]} == {
        "counts_match_crm",
        "quarantine",
        "attribution_and_stages",
    }
    assert nodes[("marts", "outcomes")]["groupName"] == "mart"

    # "Synchronize now" for one connection
    launched = webserver.graphql(
        LAUNCH,
        params={
            "selector": {
                "repositoryLocationName": repo["location"]["name"],
                "repositoryName": repo["name"],
                "jobName": "sync_sandbox_salesforce",
            },
            "runConfigData": {"ops": {"oppsync__sandbox_salesforce__extract": {"config": {"mode": "auto"}}}},
            "executionMetadata": {"tags": [{"key": "oppsync/trigger", "value": "ui"}]},
        },
    )["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]

    deadline = time.monotonic() + RUN_SECONDS
    while True:
        run = webserver.graphql(RUN, runId=run_id)["runOrError"]
        if run["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
            break
        assert time.monotonic() < deadline, f"run {run_id} still {run['status']} after {RUN_SECONDS}s"
        time.sleep(1)
    assert run["status"] == "SUCCESS", webserver.log.read_text()[-4000:]
    tags = {t["key"]: t["value"] for t in run["tags"]}
    assert tags["oppsync/trigger"] == "ui" and tags["oppsync/connection"] == "sandbox-salesforce"
    assert {tuple(m["assetKey"]["path"]) for m in run["assetMaterializations"]} == {
        ("oppsync", "sandbox_salesforce", "extract"),
        ("oppsync", "sandbox_salesforce", "opportunities"),
    }

    engine = create_engine(webserver.warehouse_url)
    with engine.connect() as c:
        assert (
            c.execute(text("SELECT status FROM oppsync.sync_runs WHERE run_id = :r"), {"r": run_id}).scalar()
            == "success"
        )
        assert {r[0] for r in c.execute(text("SELECT source_id FROM oppsync.opportunities"))} == webserver.crm_ids
    engine.dispose()
