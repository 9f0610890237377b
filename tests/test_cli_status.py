"""`oppsync status` on a synced sandbox (DuckDB): one connection synced twice, one whose credentials the CRM
refuses (failed twice: failing since the first failure), one never synced; the table and `--json`. Then the
status's own rules (freshness windows, next run in the schedule's time zone, what the Dagster instance adds)
on the same warehouse."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from oppsync_pipeline import cli
from oppsync_pipeline.lib.config import load_config
from oppsync_pipeline.lib.status import SchedulerView, connection_status, freshness_windows, next_run
from oppsync_pipeline.lib.sync import ExtractFailed, sync_connection
from oppsync_pipeline.lib.warehouse.engine import make_engine
from oppsync_pipeline.sandbox.cluster import env_var
from tests.dagster.conftest import start_servers, stop_servers, write_config

NAMES = {"sf": "salesforce", "hs-broken": "hubspot", "at-new": "autotask"}


@pytest.fixture(scope="module")
def synced(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("status")
    servers = start_servers(NAMES, opportunities=30)
    mp = pytest.MonkeyPatch()
    try:
        config = write_config(tmp / "oppsync.yaml", servers, f"duckdb:///{tmp / 'warehouse.duckdb'}")
        # the environment wins over the secrets file: a token the CRM refuses
        mp.setenv(env_var("hs-broken", "access_token"), "pat-na1-revoked")
        cfg = load_config(config)
        engine = make_engine(cfg.warehouse.url)
        for run_id in ("sf-1", "sf-2"):
            sync_connection(cfg, cfg.connection("sf"), engine, run_id=run_id)
        for run_id in ("hs-1", "hs-2"):
            with pytest.raises(ExtractFailed):
                sync_connection(cfg, cfg.connection("hs-broken"), engine, run_id=run_id)
        yield config, cfg, engine
    finally:
        mp.undo()
        stop_servers(servers)


def status_output(config: Path, tmp_path: Path, monkeypatch, capsys, *args: str) -> str:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "no-dagster-here"))
    assert cli.main(["--config", str(config), "status", *args]) == 0
    return capsys.readouterr().out


def test_status_table_shows_each_connection(synced, tmp_path: Path, monkeypatch, capsys):
    config, _, _ = synced
    out = status_output(config, tmp_path, monkeypatch, capsys)
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()}
    assert lines["connection"].split()[:4] == ["connection", "crm", "last", "sync"]
    sf = lines["sf"]
    assert " success " in sf and " incremental " in sf and " ok" in sf and "fresh (" in sf
    # the second sync found what it read (the overlap window) unchanged: shown as unchanged, not "skipped"
    assert re.search(r" \+0 ~0 =[1-9]\d* -0 ", sf)
    assert " failed " in lines["hs-broken"] and "failing since" in lines["hs-broken"]
    assert "never" in lines["at-new"] and "never synced" in lines["at-new"]
    # the failure's own message, one line, without the token
    assert lines["hs-broken:"].startswith("hs-broken: ") and "pat-na1-revoked" not in out
    assert "no Dagster instance" in out


def test_status_json_for_scripts(synced, tmp_path: Path, monkeypatch, capsys):
    config, _, _ = synced
    doc = json.loads(status_output(config, tmp_path, monkeypatch, capsys, "--json"))
    by = {c["connection"]: c for c in doc["connections"]}
    assert set(by) == set(NAMES)
    sf = by["sf"]
    assert sf["health"] == "ok" and sf["freshness"] == "fresh" and sf["last_sync"]["mode"] == "incremental"
    ok = sf["last_success"]
    assert ok["unchanged"] == ok["fetched"] > 0 and ok["created"] == 0 and "skipped" not in ok
    assert sf["last_sync"]["api_requests"] > 0 and sf["requests_24h"] > sf["last_sync"]["api_requests"]
    assert datetime.fromisoformat(sf["next_run_at"]).minute == 30  # the default schedule, at half past
    hs = by["hs-broken"]
    assert hs["health"] == "failing" and hs["last_sync"]["status"] == "failed" and hs["last_success"] is None
    # failing since the first of the two failures
    assert hs["failing_since"] < hs["last_sync"]["started_at"]
    assert by["at-new"]["health"] == "never synced" and by["at-new"]["last_sync"] is None


def test_freshness_and_what_the_dagster_instance_adds(synced):
    _, cfg, engine = synced
    sf = cfg.connection("sf")
    warn, fail = freshness_windows(sf.schedule)
    assert (warn, fail) == (timedelta(minutes=75), timedelta(hours=2))
    late = connection_status(engine, sf, datetime.utcnow() + timedelta(minutes=80))  # noqa: DTZ003 - naive UTC, as stored
    assert (late.freshness, late.health) == ("late", "late")
    stale = connection_status(engine, sf, datetime.utcnow() + timedelta(hours=3))  # noqa: DTZ003
    assert stale.health == "stale"
    # a schedule switched off in the UI: no next run; a Dagster run that failed before it reached the warehouse
    at = datetime.utcnow()  # noqa: DTZ003
    view = SchedulerView(
        schedules={"sf": (False, True)}, daemon_running=True, latest_runs={"sf": ("run-x", "FAILURE", at)}
    )
    s = connection_status(engine, sf, at + timedelta(seconds=1), view)
    assert s.schedule_on is False and s.next_run_at is None and s.next_full_sync_at is not None
    assert s.health == "failing" and "run-x" in (s.detail or "")


def test_next_run_in_the_schedules_time_zone():
    # 02:00 in Chicago (CST, UTC-6) on 2026-12-05 is 08:00 UTC
    assert next_run("0 2 * * *", "America/Chicago", datetime(2026, 12, 5, 7, 0)) == datetime(2026, 12, 5, 8, 0)
    assert next_run("30 * * * *", "UTC", datetime(2026, 12, 5, 7, 31)) == datetime(2026, 12, 5, 8, 30)
