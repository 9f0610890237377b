"""`oppsync run`, the main job of `make run`, as a user runs it: a subprocess, the embedded sandbox,
a DuckDB warehouse, Dagster runs recorded in DAGSTER_HOME, the mart built. Twice: the second run is
incremental and records no duplicate events."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import yaml

from oppsync_pipeline.sandbox.cluster import crm_module, env_var
from tests.sandbox.test_serve_cli import free_port_base

BIN = Path(sys.executable).parent
CRMS = ("salesforce", "autotask")


def write_config(tmp_path: Path) -> Path:
    base = free_port_base(len(CRMS))
    secrets, connections = [], []
    for i, crm in enumerate(CRMS):
        name = f"sandbox-{crm}"
        creds = crm_module(crm).SANDBOX_CREDENTIALS
        connections.append(
            {
                "name": name,
                "crm": crm,
                "base_url": f"http://127.0.0.1:{base + i}",
                "credentials": {k: "${" + env_var(name, k) + "}" for k in creds},
            }
        )
        secrets += [f"{env_var(name, k)}={v}" for k, v in creds.items()]
    (tmp_path / "secrets.env").write_text("\n".join(secrets) + "\n")
    cfg = {
        "warehouse": {"url": f"duckdb:///{tmp_path / 'warehouse.duckdb'}"},
        "secrets_file": "secrets.env",
        "sandbox": {"enabled": True, "seed": 3, "opportunities": 150},
        "connections": connections,
        "users": [{"id": "u1", "name": "First User", "crm_ids": {}}],
    }
    path = tmp_path / "oppsync.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(tmp_path: Path, config: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster"), "OPPSYNC_CONFIG": str(config)}
    (tmp_path / "dagster").mkdir(exist_ok=True)
    return subprocess.run(
        [str(BIN / "oppsync"), "run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_oppsync_run_builds_the_mart_and_a_second_run_adds_no_duplicate_events(tmp_path: Path):
    config = write_config(tmp_path)
    first = run(tmp_path, config)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "sandbox-salesforce" in first.stdout and "full" in first.stdout
    assert "mart: built" in first.stdout and f"warehouse: {tmp_path / 'warehouse.duckdb'}" in first.stdout

    db = duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True)
    assert db.execute("SELECT count(*) FROM marts.outcomes").fetchone()[0] > 0
    events = db.execute("SELECT count(*) FROM oppsync.opportunity_events").fetchone()[0]
    db.close()

    second = run(tmp_path, config)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "incremental" in second.stdout
    assert_readable_console(first)
    assert_readable_console(second)
    assert len((second.stdout + second.stderr).splitlines()) < 40, second.stdout + second.stderr
    db = duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True)
    assert db.execute("SELECT count(*) FROM oppsync.opportunity_events").fetchone()[0] == events
    assert db.execute("SELECT count(*), count(DISTINCT event_id) FROM oppsync.opportunity_events").fetchone() == (
        events,
        events,
    )
    runs = db.execute("SELECT count(*) FROM oppsync.sync_runs WHERE status = 'success'").fetchone()[0]
    db.close()
    assert runs == 2 * len(CRMS)
    # the runs went through Dagster and are in its history
    assert any((tmp_path / "dagster").rglob("*")), "DAGSTER_HOME is empty: runs did not go through Dagster"


def assert_readable_console(done: subprocess.CompletedProcess) -> None:
    """Issue 20: a progress line per connection, dbt's node lines and Dagster's warnings in the log file (its
    path printed first), nothing on stderr (tests/test_cli_console.py checks the parts)."""
    lines = done.stdout.splitlines()
    assert lines[0].startswith("log: ") and Path(lines[0].split()[1]).is_file()
    for crm in CRMS:
        assert any(line.startswith(f"sandbox-{crm}: read ") and "records/s" in line for line in lines), done.stdout
    assert not any("[RUN]" in line or "OK created" in line for line in lines), done.stdout
    assert done.stderr == "", done.stderr
