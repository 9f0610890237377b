"""The `topology` fixture (harness.py): the deployment's processes against a fresh Postgres database, stopped
after the test; when the test fails, the tail of every process's log is added to the report."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.topology.harness import Topology


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[pytest.TestReport]:
    report = yield
    topo = getattr(item, "funcargs", {}).get("topology")
    if report.failed and isinstance(topo, Topology):
        report.sections.append(("process logs", topo.logs()))
    return report


@pytest.fixture
def topology(tmp_path: Path, pg_url: str, dbt_manifest: Path) -> Iterator[Topology]:
    """Nothing started yet: each test starts what it needs (start_sandbox first: it writes oppsync.yaml).
    `dbt_manifest`: the mart location reads dbt's manifest, parsed once per test run (tests/conftest.py)."""
    with Topology(tmp_path, pg_url) as topo:
        yield topo
