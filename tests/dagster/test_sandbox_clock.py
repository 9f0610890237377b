"""The sandbox demo (issue 20 item 3): `oppsync run --advance-hours 3` and `oppsync sandbox advance` move the
sandbox's clock hours ahead of ours, and every connection still syncs: the quality checks judge "the future" on
the CRM's clock (its `Date` header, which the simulators send from their virtual clock), as they must for a real
CRM whose clock differs from ours. Before, every connection was refused.

The CLI's own steps, in-process, without the mart build (dbt; `tests/test_cli_run.py` covers `oppsync run`
end to end): the sandbox as `run --advance-hours 3` starts it, each connection's sync job as `run` launches it,
then `sandbox advance --hours 3` against the running sandbox and an incremental sync of each."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml

from oppsync_pipeline import cli
from oppsync_pipeline.sandbox.cluster import CRMS, crm_module, env_var
from tests.reliability.harness import connection_extra
from tests.sandbox.test_serve_cli import free_port_base


def five_crm_sandbox(tmp_path: Path) -> Path:
    """oppsync.yaml for the built-in sandbox, every CRM, on free ports (as `sandbox serve --write-config`)."""
    base, secrets, connections = free_port_base(len(CRMS)), [], []
    for i, crm in enumerate(CRMS):
        name, mod, url = f"sandbox-{crm}", crm_module(crm), f"http://127.0.0.1:{base + i}"
        entry = {"name": name, "crm": crm, "base_url": url, **connection_extra(crm)}
        entry["credentials"] = {k: "${" + env_var(name, k) + "}" for k in mod.SANDBOX_CREDENTIALS}
        options = {**entry.get("options", {}), **getattr(mod, "connection_options", lambda u: {})(url)}
        if options:
            entry["options"] = options
        connections.append(entry)
        secrets += [f"{env_var(name, k)}={v}" for k, v in mod.SANDBOX_CREDENTIALS.items()]
    (tmp_path / "secrets.env").write_text("\n".join(secrets) + "\n")
    cfg = {
        "warehouse": {"url": f"duckdb:///{tmp_path / 'warehouse.duckdb'}"},
        "secrets_file": "secrets.env",
        "sandbox": {"enabled": True, "seed": 9, "opportunities": 40},
        "connections": connections,
    }
    (tmp_path / "oppsync.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return tmp_path / "oppsync.yaml"


def test_advance_hours_3_then_sandbox_advance_syncs_all_five(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    monkeypatch.chdir(tmp_path)  # the sandbox keeps its anchor in ./.oppsync
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    config = five_crm_sandbox(tmp_path)
    _, cfg = cli._prepare_dagster(str(config))
    with cli._sandbox(cfg, advance_hours=3):  # `oppsync run --advance-hours 3`
        defs = cli._load_defs("syncs")
        with dg.DagsterInstance.get() as instance:
            first = [(c, cli.run_connection(defs, instance, c, "auto")) for c in cfg.connections]
            assert cli.cmd_sandbox_advance(str(config), 3) == 0  # `oppsync sandbox advance --hours 3`
            second = [(c, cli.run_connection(defs, instance, c, "auto")) for c in cfg.connections]
        capsys.readouterr()
        assert cli._print_summary(cfg, first + second)
    table = capsys.readouterr().out
    for crm in CRMS:
        modes = [line.split()[2:4] for line in table.splitlines() if line.startswith(f"sandbox-{crm} ")]
        assert modes == [["full", "success"], ["incremental", "success"]], table
    assert all(result.success for _, result in first + second)
