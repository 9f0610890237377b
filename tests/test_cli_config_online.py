"""`oppsync config check --online`: the discovery a run does, printed per connection (what will and will not
be read, and why), against the sandbox started from the configuration as `make run` starts it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from oppsync_pipeline.cli import main
from oppsync_pipeline.sandbox.cluster import CRMS, crm_module, env_var
from tests.sandbox.test_serve_cli import free_port_base


def write_config(tmp_path: Path, variants: dict[str, str] | None = None) -> Path:
    base = free_port_base(len(CRMS))
    secrets, connections = [], []
    for i, crm in enumerate(CRMS):
        name, mod = f"sandbox-{crm}", crm_module(crm)
        url = f"http://127.0.0.1:{base + i}"
        entry = {
            "name": name,
            "crm": crm,
            "base_url": url,
            "credentials": {k: "${" + env_var(name, k) + "}" for k in mod.SANDBOX_CREDENTIALS},
        }
        options = getattr(mod, "connection_options", lambda url: {})(url)
        if options:
            entry["options"] = options
        connections.append(entry)
        secrets += [f"{env_var(name, k)}={v}" for k, v in mod.SANDBOX_CREDENTIALS.items()]
    (tmp_path / "secrets.env").write_text("\n".join(secrets) + "\n")
    cfg = {
        "warehouse": {"url": f"duckdb:///{tmp_path / 'warehouse.duckdb'}"},
        "secrets_file": "secrets.env",
        "sandbox": {"enabled": True, "seed": 3, "opportunities": 30, "variants": variants or {}},
        "connections": connections,
    }
    path = tmp_path / "oppsync.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def sections(out: str) -> dict[str, str]:
    """Connection name -> its block of the report."""
    parts = re.split(r"\n(?=sandbox-)", out)
    return {p.split(" ", 1)[0]: p for p in parts if p.startswith("sandbox-")}


def test_every_connection_of_the_default_sandbox_will_sync(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    assert main(["--config", str(write_config(tmp_path)), "config", "check", "--online"]) == 0
    report = sections(capsys.readouterr().out)
    assert sorted(report) == sorted(f"sandbox-{crm}" for crm in CRMS)
    for block in report.values():
        assert ": will sync;" in block, block
        assert re.search(r"\n  read +opportunities \(open set\)", block), block
        assert "REFUSED" not in block, block


def test_an_api_user_without_rights_to_optional_endpoints_still_syncs_and_is_told_what_is_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    variants = {crm: "no_optional_rights" for crm in CRMS if "no_optional_rights" in crm_module(crm).VARIANTS}
    assert main(["--config", str(write_config(tmp_path, variants)), "config", "check", "--online"]) == 0
    report = sections(capsys.readouterr().out)
    for crm in variants:
        block = report[f"sandbox-{crm}"]
        assert ": will sync;" in block, block
        assert re.search(r"\n  skipped +\S", block), f"{crm}: no optional read reported as skipped:\n{block}"
        assert "HTTP 403" in block, block


def test_an_unknown_trigger_stage_is_named_with_the_tenants_stages(tmp_path):
    """track_from_stage is resolved against the tenant's stage list: a typo cannot pass the online check."""
    from oppsync_pipeline.lib.sync import build_connector
    from oppsync_pipeline.sandbox.cluster import build_simulator
    from oppsync_pipeline.sandbox.server import SandboxServer
    from tests.conftest import sandbox_config

    with SandboxServer(build_simulator("salesforce", opportunities=20)) as server:
        for stage, ok in (("Qualification", True), ("Qualifcation", False)):
            cfg = sandbox_config(
                {"salesforce": server},
                f"duckdb:///{tmp_path}/w.duckdb",
                tmp_path,
                extra={"salesforce": {"track_from_stage": stage}},
            )
            caps = {c.name: c for c in build_connector(cfg, cfg.connections[0]).discover()}
            assert caps["stage trigger"].available is ok
            if not ok:
                assert "no stage 'Qualifcation'" in caps["stage trigger"].detail
                assert "Qualification" in caps["stage trigger"].detail


@pytest.mark.parametrize("crm", CRMS)
def test_stage_and_status_names_in_the_configuration_are_checked_against_the_tenant(tmp_path, crm):
    """A typo in open_statuses used to pass `config check` and mark every deal closed; in stage_categories or
    the qualification stages it silently matched nothing. The online check names it, with the closest name."""
    from oppsync_pipeline.lib.sync import build_connector
    from oppsync_pipeline.sandbox.cluster import build_simulator
    from oppsync_pipeline.sandbox.server import SandboxServer
    from tests.conftest import sandbox_config

    with SandboxServer(build_simulator(crm, opportunities=20)) as server:

        def discover(extra: dict) -> dict:
            cfg = sandbox_config({crm: server}, f"duckdb:///{tmp_path}/w.duckdb", tmp_path, extra={crm: extra})
            return {c.name: c for c in build_connector(cfg, cfg.connections[0]).discover()}

        plain = build_connector(
            *(lambda cfg: (cfg, cfg.connections[0]))(
                sandbox_config({crm: server}, f"duckdb:///{tmp_path}/w.duckdb", tmp_path)
            )
        )
        names = sorted({s.label for s in (*plain.stages().values(), *plain.statuses().values()) if len(s.label) > 4})
        real = names[0]
        typo = real[:2] + real[3:]  # one letter dropped
        good = discover({"open_statuses": [real], "stage_categories": {real: "open"}})
        assert good["stage and status names"].available, good["stage and status names"].detail
        for extra, key in (
            ({"open_statuses": [typo]}, "open_statuses"),
            ({"stage_categories": {typo: "won"}}, "stage_categories"),
            ({"qualification": {"stages": [typo]}}, "qualification.stages"),
        ):
            cap = discover(extra)["stage and status names"]
            assert not cap.available and cap.detail.startswith("REQUIRED"), cap
            assert f"{key}: '{typo}' is not a stage or status of this tenant" in cap.detail
            assert f"did you mean '{real}'?" in cap.detail, cap.detail
