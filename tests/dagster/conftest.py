"""Fixtures for the Dagster tests: in-process CRM simulators, an oppsync.yaml written into tmp_path that
points at them, and the definitions loaded from it the way `dagster dev` loads them (OPPSYNC_CONFIG, then
the defs folder)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from oppsync_pipeline.sandbox.cluster import build_simulator, crm_module, env_var
from oppsync_pipeline.sandbox.server import SandboxServer

REPO = Path(__file__).resolve().parents[2]
DEFS_ROOT = REPO / "oppsync_pipeline"
# Small tenants: these tests are about Dagster wiring, not volume.
SIZE = 120
FAST = {"hubspot": {"options": {"search_requests_per_second": 0}}}


def crm_of(server: SandboxServer) -> str:
    return server.simulator.world.profile.crm


def write_config(
    path: Path,
    servers: dict[str, SandboxServer],
    warehouse_url: str,
    extra: dict[str, dict[str, Any]] | None = None,
    **top: Any,
) -> Path:
    """oppsync.yaml for `servers` ({connection name: server}), credentials in a secrets file beside it, as a
    user would write them. `extra` adds keys per connection name; `top` adds top-level keys."""
    secrets, connections = [], []
    for name, server in servers.items():
        crm, mod = crm_of(server), crm_module(crm_of(server))
        entry: dict[str, Any] = {
            "name": name,
            "crm": crm,
            "base_url": server.url,
            "credentials": {k: "${" + env_var(name, k) + "}" for k in mod.SANDBOX_CREDENTIALS},
        }
        entry.update(FAST.get(crm, {}))
        options = getattr(mod, "connection_options", lambda url: {})(server.url)
        if options:
            entry["options"] = {**entry.get("options", {}), **options}
        entry.update((extra or {}).get(name, {}))
        connections.append(entry)
        secrets += [f"{env_var(name, k)}={v}" for k, v in mod.SANDBOX_CREDENTIALS.items()]
    secrets_file = path.with_name(path.stem + ".secrets.env")
    secrets_file.write_text("\n".join(secrets) + "\n", encoding="utf-8")
    config = {"warehouse": {"url": warehouse_url}, "secrets_file": secrets_file.name, "connections": connections, **top}
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def every_creator_mapped(servers: dict[str, SandboxServer]) -> list[dict[str, Any]]:
    """`users:` linking every simulated CRM user to an internal user, so the attribution check passes."""
    users = []
    for name, server in servers.items():
        for u in server.simulator.world.users:
            ids = [u.native_id] + ([u.alt_id] if u.alt_id else [])
            users.append({"id": f"{name}.{u.idx}", "name": u.name, "crm_ids": {name: ids}})
    return users


def load_defs(config: Path, monkeypatch: pytest.MonkeyPatch) -> dg.Definitions:
    monkeypatch.setenv("OPPSYNC_CONFIG", str(config))
    return dg.load_from_defs_folder(path_within_project=DEFS_ROOT)


def start_servers(crms: dict[str, str], seed: int = 11, opportunities: int = SIZE) -> dict[str, SandboxServer]:
    """{connection name: crm} -> {connection name: a started simulator on a free port}."""
    return {
        name: SandboxServer(build_simulator(crm, seed=seed, opportunities=opportunities)).start()
        for name, crm in crms.items()
    }


def stop_servers(servers: dict[str, SandboxServer]) -> None:
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="session", autouse=True)
def _manifest_before_definitions(dbt_manifest: Path) -> Path:
    """Every test here loads the definitions, which read dbt's manifest: parsed once per run (tests/conftest.py)."""
    return dbt_manifest


@pytest.fixture
def dagster_instance(tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    """An instance on disk (SQLite in tmp_path), so runs and events can be read back."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        yield instance
