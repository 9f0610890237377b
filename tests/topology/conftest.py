"""The `topology` fixture (harness.py): the deployment's processes against a fresh Postgres database, started
once per module and stopped after its last test; when a test fails, the tail of every process's log is added to
the report."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import warehouse_database
from tests.topology.harness import Topology


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[pytest.TestReport]:
    report = yield
    topo = getattr(item, "funcargs", {}).get("topology")
    if report.failed and isinstance(topo, Topology):
        report.sections.append(("process logs", topo.logs()))
    return report


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory, dbt_manifest: Path) -> Iterator[Topology]:
    """Nothing started yet: the module starts what its tests share (start_sandbox first: it writes oppsync.yaml),
    once: a webserver, daemon or receiver costs tens of seconds to start on the loaded CI machine. One fresh
    Postgres database (the warehouse and Dagster's storage), dropped afterwards.
    `dbt_manifest`: the mart location reads dbt's manifest, parsed once per test run (tests/conftest.py)."""
    tmp = tmp_path_factory.mktemp("topology")
    with warehouse_database("postgres", tmp) as pg_url, Topology(tmp, pg_url) as topo:
        yield topo
