"""The CRM registry (lib/crm/registry.py) agrees with the code it names: each spec's connector and simulator
exist and are that CRM's, its credential keys are the ones the connector asks for and the simulator accepts,
its secret keys are credentials, its sandbox options are valid connector options, its docs page exists. A new
CRM's spec is checked here before any suite runs it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from oppsync_pipeline.lib.config import ConnectionConfig
from oppsync_pipeline.lib.crm.registry import CRMS, REGISTRY, CrmSpec, connector_class, spec

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("crm_spec", REGISTRY.values(), ids=CRMS)
def test_spec_matches_its_connector_and_simulator(crm_spec: CrmSpec):
    connector, simulator = crm_spec.connector_class(), crm_spec.simulator_module()
    assert connector.crm == simulator.CRM == crm_spec.name
    assert tuple(connector.credential_keys) == crm_spec.credential_keys
    assert set(simulator.SANDBOX_CREDENTIALS) == set(crm_spec.credential_keys)
    assert crm_spec.secret_keys and set(crm_spec.secret_keys) <= set(crm_spec.credential_keys)
    re.compile(crm_spec.page_path)
    assert {"project_name", "created_at", "optional"} <= set(crm_spec.page_fields)
    assert (ROOT / crm_spec.docs).is_file(), crm_spec.docs
    url = "http://127.0.0.1:1"
    for options in (crm_spec.sandbox_connection_options(url), {**crm_spec.test_options, **crm_spec.lean_options}):
        connector.Options.model_validate(options)
    legacy = getattr(simulator, "connection_options", None)  # the simulator's own copy, while it has one
    if legacy is not None:
        assert legacy(url) == crm_spec.sandbox_connection_options(url)
    conn = ConnectionConfig(name="x", crm=crm_spec.name, base_url=url, options=crm_spec.sandbox_connection_options(url))
    assert conn.crm == crm_spec.name


def test_names_and_ports_are_unique_and_lookups_name_the_known_crms():
    assert len(set(CRMS)) == len(CRMS) == len(REGISTRY)
    assert len({s.port for s in REGISTRY.values()}) == len(CRMS)
    assert connector_class("salesforce").__name__ == "SalesforceConnector"
    with pytest.raises(KeyError, match="one of"):
        spec("pipedrive")


def test_importing_the_registry_imports_no_connector_or_simulator():
    """Config validation reads the registry at import time; the connectors import config: it must stay cheap."""
    import subprocess

    code = (
        "import sys, oppsync_pipeline.lib.config, oppsync_pipeline.lib.crm; "
        "print(sorted(m for m in sys.modules if m.startswith(('oppsync_pipeline.lib.crm.', "
        "'oppsync_pipeline.sandbox'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "['oppsync_pipeline.lib.crm.registry']", out.stdout + out.stderr
