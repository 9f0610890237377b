"""`oppsync sync --connection NAME [--full]` from the shell: the run goes through Dagster into the instance
in DAGSTER_HOME, so it shows in the UI's run history next to scheduled runs, tagged with what started it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg

from tests.dagster.conftest import REPO, every_creator_mapped, start_servers, stop_servers, write_config

OPPSYNC = Path(sys.executable).parent / "oppsync"


def oppsync(*args: str, home: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DAGSTER_HOME": str(home), "GX_ANALYTICS_ENABLED": "false", "TQDM_DISABLE": "1"}
    env.pop("OPPSYNC_CONFIG", None)
    return subprocess.run([str(OPPSYNC), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_sync_now_from_the_shell_is_a_dagster_run_with_its_tags(tmp_path: Path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    servers = start_servers({"sandbox-salesforce": "salesforce", "sandbox-hubspot": "hubspot"}, opportunities=40)
    try:
        config = write_config(
            tmp_path / "oppsync.yaml",
            servers,
            f"duckdb:///{tmp_path / 'warehouse.duckdb'}",
            users=every_creator_mapped(servers),
        )
        full = oppsync(
            "--config", str(config), "sync", "--connection", "sandbox-salesforce", "--full", home=home, cwd=tmp_path
        )
        assert full.returncode == 0, full.stdout + full.stderr
        assert "sandbox-salesforce" in full.stdout and "success" in full.stdout
        unknown = oppsync("--config", str(config), "sync", "--connection", "nope", home=home, cwd=tmp_path)
        assert unknown.returncode == 2 and "nope" in unknown.stderr
    finally:
        stop_servers(servers)

    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()  # newest first
        assert [(r.job_name, r.is_success) for r in runs] == [("sync_sandbox_salesforce", True)]
        run = runs[0]
        assert run.tags["oppsync/trigger"] == "cli" and run.tags["oppsync/mode"] == "full"
        assert run.tags["oppsync/connection"] == "sandbox-salesforce" and run.tags["crm"] == "salesforce"
        assert run.run_config["ops"]["oppsync__sandbox_salesforce__extract"]["config"] == {"mode": "full"}
        latest = instance.get_latest_materialization_event(
            dg.AssetKey(["oppsync", "sandbox_salesforce", "opportunities"])
        )
        assert latest.run_id == run.run_id
        assert latest.asset_materialization.metadata["mode"].value == "full"
        # only the connection asked for was synced
        assert instance.get_latest_materialization_event(dg.AssetKey(["oppsync", "sandbox_hubspot", "extract"])) is None
    # nothing was written outside DAGSTER_HOME for Dagster's state
    assert not (tmp_path / ".oppsync" / "dagster").exists()
