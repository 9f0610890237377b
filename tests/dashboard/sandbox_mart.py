"""A warehouse as a user has it after `oppsync run`: sandbox CRMs served over HTTP, synced by the real sync code,
the mart built by a real `dbt run`. Small tenants: the dashboard tests are about the page, not volume."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from oppsync_pipeline.lib.config import OppsyncConfig, load_config
from oppsync_pipeline.lib.dbt_env import DBT_PROJECT_DIR, dbt_env, dbt_executable, dbt_target, dbt_vars
from oppsync_pipeline.lib.sync import sync_connection
from oppsync_pipeline.lib.warehouse.engine import make_engine
from oppsync_pipeline.sandbox.server import SandboxServer
from tests.dagster.conftest import start_servers, stop_servers, write_config

CONNECTIONS = {"sandbox-salesforce": "salesforce", "sandbox-hubspot": "hubspot"}
SIZE = 150


@dataclass
class SandboxMart:
    config_path: Path
    cfg: OppsyncConfig
    servers: dict[str, SandboxServer]

    @property
    def url(self) -> str:
        return self.cfg.warehouse.url

    @property
    def duckdb_path(self) -> Path:
        return Path(self.url.split(":///", 1)[1])

    def sync(self, only: str | None = None) -> None:
        engine = make_engine(self.url, self.cfg.warehouse.duckdb)
        try:
            for conn in self.cfg.connections:
                if only and conn.name != only:
                    continue
                summary = sync_connection(self.cfg, conn, engine, run_id=f"test-{uuid.uuid4().hex[:8]}")
                assert summary.result is not None, f"{conn.name}: {summary.extract}"
        finally:
            engine.dispose()

    def build_mart(self, tmp: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DBT_", "OPPSYNC_"))}
        env.update(
            dbt_env(self.cfg),
            DBT_SEND_ANONYMOUS_USAGE_STATS="false",
            DO_NOT_TRACK="1",
            # never dbt/target: other runs (and other test workers) use it
            DBT_TARGET_PATH=str(tmp / "dbt_target"),
            DBT_LOG_PATH=str(tmp / "dbt_logs"),
        )
        cmd = [dbt_executable(), "run", "--select", "+marts.outcomes", "+marts.opportunities"]
        cmd += ["--project-dir", str(DBT_PROJECT_DIR), "--profiles-dir", str(DBT_PROJECT_DIR)]
        cmd += ["--target", dbt_target(self.cfg), "--vars", json.dumps(dbt_vars(self.cfg))]
        proc = subprocess.run(cmd, cwd=DBT_PROJECT_DIR, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"dbt run failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-2000:]}"

    def stop(self) -> None:
        stop_servers(self.servers)


def users_and_teams(servers: dict[str, SandboxServer]) -> tuple[list[dict], dict[str, list[str]]]:
    """Most simulated CRM users linked to internal users (one per connection left unmapped, as in real tenants),
    and two teams splitting them."""
    users: list[dict] = []
    for name, server in servers.items():
        for u in server.simulator.world.users[:-1]:
            ids = [u.native_id] + ([u.alt_id] if u.alt_id else [])
            users.append({"id": f"{name.removeprefix('sandbox-')}.{u.idx}", "name": u.name, "crm_ids": {name: ids}})
    teams = {"East": [u["id"] for u in users[0::2]], "West": [u["id"] for u in users[1::2]]}
    return users, teams


def sandbox_mart(tmp: Path, warehouse_url: str | None = None) -> SandboxMart:
    servers = start_servers(CONNECTIONS, opportunities=SIZE)
    try:
        users, teams = users_and_teams(servers)
        url = warehouse_url or f"duckdb:///{tmp / 'warehouse.duckdb'}"
        # seed 004 on one connection, so "qualified only" changes the numbers
        extra = {"sandbox-salesforce": {"qualification": {"min_probability": 50}}}
        path = write_config(tmp / "oppsync.yaml", servers, url, extra, users=users, teams=teams)
        mart = SandboxMart(path, load_config(path), servers)
        mart.sync()
        mart.build_mart(tmp)
        return mart
    except BaseException:
        stop_servers(servers)
        raise
