"""What dbt needs to reach the warehouse oppsync is configured for: a target and its environment."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from oppsync_pipeline.lib.config import OppsyncConfig

DBT_PROJECT_DIR = Path(__file__).resolve().parents[2] / "dbt"


def dbt_project_files() -> list[Path]:
    """The dbt project's own sources (models, macros, YAML), not what dbt writes or installs (target/,
    dbt_packages/, logs/): what a parsed manifest is stale against."""
    skip = {"target", "dbt_packages", "logs"}
    return [
        p
        for p in DBT_PROJECT_DIR.rglob("*")
        if p.suffix in (".sql", ".yml", ".yaml") and not skip.intersection(p.relative_to(DBT_PROJECT_DIR).parts)
    ]


def dbt_executable() -> str:
    """dbt is installed beside this interpreter; the virtualenv need not be activated or on PATH."""
    return str(Path(sys.executable).parent / "dbt")


def dbt_target(cfg: OppsyncConfig) -> str:
    return cfg.warehouse.backend  # "duckdb" | "postgres": the target names in dbt/profiles.yml


def dbt_env(cfg: OppsyncConfig) -> dict[str, str]:
    url = cfg.warehouse.url
    if cfg.warehouse.backend == "duckdb":
        path = url.split(":///", 1)[1]
        return {"OPPSYNC_DUCKDB_PATH": str(Path(path).resolve())}
    u = make_url(url)
    return {
        "OPPSYNC_PG_HOST": u.host or "127.0.0.1",
        "OPPSYNC_PG_PORT": str(u.port or 5432),
        "OPPSYNC_PG_USER": u.username or "postgres",
        "OPPSYNC_PG_PASSWORD": u.password or "",
        "OPPSYNC_PG_DBNAME": u.database or "postgres",
    }


def dbt_vars(cfg: OppsyncConfig) -> dict[str, Any]:
    """The project variables oppsync.yaml decides (dbt_project.yml holds their defaults)."""
    return {
        "reporting_timezone": cfg.reporting.timezone,
        "default_probability": cfg.mart.default_probability,
        "default_probability_by_connection": {
            c.name: c.default_probability for c in cfg.connections if c.default_probability is not None
        },
        "extra_fields": extra_field_columns(cfg),
    }


def extra_field_columns(cfg: OppsyncConfig) -> dict[str, str]:
    """marts.opportunity_fields' typed columns: every connection's extra field names, in configuration order,
    each with its type (one type per name across connections: the configuration refuses two)."""
    columns: dict[str, str] = {}
    for conn in cfg.connections:
        for name, extra in conn.extra_fields.items():
            columns.setdefault(name, extra.type)
    return columns


@contextmanager
def dbt_environment(cfg: OppsyncConfig) -> Iterator[None]:
    """dbt's environment for the duration of one dbt call (parse at definitions load, build in the mart asset):
    the profile's variables for the configured warehouse. The process environment is restored after, so
    nothing else in the process (a sync in the same CLI run, another location) sees dbt's settings.

    PATH starts with the virtualenv's bin: dagster-dbt's manifest preparer runs `dbt parse` with the executable
    named "dbt" from PATH, and `make run` on a fresh checkout (no manifest yet) does not activate the venv."""
    wanted = dbt_env(cfg)
    bin_dir = str(Path(dbt_executable()).parent)
    path = os.environ.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        wanted["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
