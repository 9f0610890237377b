"""OppsyncDbtCliResource (defs/mart/dbt_cli.py): the same dbt invocation without `dbt --version` in a subprocess
and without an in-process adapter handle. The mart's end-to-end tests (tests/dbt, tests/dagster) run every build
through it; these check what they cannot see."""

import re
import subprocess
from pathlib import Path

import pytest
from dagster_dbt import DbtCliResource
from dagster_dbt.core import resource as dagster_dbt_resource

from oppsync_pipeline.defs.mart.dbt_cli import OppsyncDbtCliResource
from oppsync_pipeline.lib.dbt_env import DBT_PROJECT_DIR, dbt_executable

pytestmark = pytest.mark.unit


def resource() -> OppsyncDbtCliResource:
    return OppsyncDbtCliResource(
        project_dir=str(DBT_PROJECT_DIR), dbt_executable=dbt_executable(), profiles_dir=str(DBT_PROJECT_DIR)
    )


def test_the_overridden_methods_still_exist_in_dagster_dbt():
    # an upgrade that renames them would leave our overrides unused and the costs back, silently
    assert "_cli_version" in vars(DbtCliResource)
    assert "_initialize_dbt_core_adapter" in vars(DbtCliResource)
    source = Path(dagster_dbt_resource.__file__).read_text(encoding="utf-8")
    assert "adapter = self._initialize_dbt_core_adapter(args)" in source


def test_version_is_the_installed_dbt_cores_without_a_subprocess(monkeypatch):
    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"subprocess started: {args}")

    monkeypatch.setattr(dagster_dbt_resource, "check_output", no_subprocess)
    ours = resource()._cli_version
    monkeypatch.undo()
    out = subprocess.check_output([dbt_executable(), "--version"], text=True)
    assert str(ours) == re.search(r"(\d+\.\d+\.\d+)", out).group(1)


def test_no_adapter_handle_is_built():
    assert resource()._initialize_dbt_core_adapter(["run"]) is None
