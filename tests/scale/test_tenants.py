"""Many small sandbox tenants (`oppsync sandbox serve --tenants N`) and the configuration generated for them
(`oppsync config generate --tenants N`)."""

from __future__ import annotations

from pathlib import Path

import requests
import yaml

from oppsync_pipeline.cli import main
from oppsync_pipeline.lib.config import check_config, load_config
from oppsync_pipeline.sandbox.cluster import Tenants


def test_each_tenant_answers_at_its_own_root_with_its_own_data(tmp_path: Path) -> None:
    with Tenants(count=6, opportunities=5) as tenants:
        path = tenants.write_config(tmp_path / "oppsync.yaml", f"duckdb:///{tmp_path / 'w.duckdb'}")
        cfg = load_config(path)
        assert check_config(cfg) == []  # every credential resolves from the secrets file beside it
        assert [c.base_url for c in cfg.connections] == tenants.urls()
        states = [requests.get(f"{u}/__sandbox/state", timeout=10).json() for u in tenants.urls()]
    assert len(states) == 6
    # tenants 0 and 5 are both Salesforce, from different seeds: not the same org twice
    assert cfg.connections[0].crm == cfg.connections[5].crm == "salesforce"
    assert states[0] != states[5]


def test_config_generate_writes_a_loadable_file_and_refuses_duckdb_at_size(tmp_path: Path, capsys) -> None:
    out = tmp_path / "scale.yaml"
    assert main(["config", "generate", "--tenants", "60", "--port-base", "9100", "--out", str(out)]) == 0
    cfg = load_config(out)
    assert len(cfg.connections) == 60 and cfg.connections[59].base_url == "http://127.0.0.1:9159"
    assert check_config(cfg) == []
    assert "spread over 30 min" in capsys.readouterr().out

    refused = tmp_path / "duck.yaml"
    code = main(
        ["config", "generate", "--tenants", "60", "--warehouse-url", "duckdb:///w.duckdb", "--out", str(refused)]
    )
    assert code == 2 and not refused.exists()
    assert "warehouse.duckdb.max_connections" in capsys.readouterr().err
    assert yaml.safe_load(out.read_text())["warehouse"]["url"].startswith("postgresql+psycopg2://")
