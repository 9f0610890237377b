"""dagster-dbt's `DbtCliResource` without two costs it adds to every dbt invocation that oppsync never uses.

Measured on the freshness path (make bench, freshness: a webhook's change waits for a mart build): a build's step
spent ~6 s on an idle machine (17 s at load 5) before dbt logged its first line. Two of those seconds went to
things this project does not need:

- `_cli_version` runs `dbt --version` in a subprocess (a whole Python start importing dbt, ~2.3 CPU-s) once per
  run worker, only to learn the version. dbt here is always dbt-core installed beside this interpreter
  (lib/dbt_env.dbt_executable), so the package metadata says the same without a process.
- `_initialize_dbt_core_adapter` imports dbt's adapter stack in the run worker and loads the profile and project
  to hand the invocation an adapter handle. dagster-dbt uses that handle only for `fetch_row_counts()` and
  `fetch_column_metadata()`; oppsync counts rows itself after dbt exits (assets.with_row_counts: an in-process
  DuckDB handle would collide with dbt's). Without it the invocation gets `adapter=None`, exactly what dagster-dbt
  passes for the dbt Fusion engine.

Both are private methods of dagster-dbt (pinned in constraints.txt); tests/dagster/test_dbt_cli_resource.py fails
when an upgrade renames them, so the saving cannot silently disappear.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from importlib.metadata import version as installed_version

from dagster_dbt import DbtCliResource
from packaging import version


class OppsyncDbtCliResource(DbtCliResource):
    @cached_property
    def _cli_version(self) -> version.Version:
        return version.parse(installed_version("dbt-core"))

    def _initialize_dbt_core_adapter(self, args: Sequence[str]):  # noqa: ARG002 - dagster-dbt's signature
        return None
