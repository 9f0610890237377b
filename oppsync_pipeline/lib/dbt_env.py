"""What dbt needs to reach the warehouse oppsync is configured for: a target and its environment."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import make_url

from oppsync_pipeline.lib.config import OppsyncConfig

DBT_PROJECT_DIR = Path(__file__).resolve().parents[2] / "dbt"


def dbt_target(cfg: OppsyncConfig) -> str:
    return cfg.warehouse.backend  # "duckdb" | "postgres": the target names in dbt/profiles.yml


def dbt_env(cfg: OppsyncConfig) -> dict[str, str]:
    url = cfg.warehouse.url
    if cfg.warehouse.backend == "duckdb":
        path = url.split(":///", 1)[1]
        return {"OPPSYNC_DUCKDB_PATH": str(Path(path).resolve())}
    u = make_url(url)
    return {"OPPSYNC_PG_HOST": u.host or "127.0.0.1", "OPPSYNC_PG_PORT": str(u.port or 5432),
            "OPPSYNC_PG_USER": u.username or "postgres", "OPPSYNC_PG_PASSWORD": u.password or "",
            "OPPSYNC_PG_DBNAME": u.database or "postgres"}


def dbt_vars(cfg: OppsyncConfig) -> dict[str, str]:
    return {"reporting_timezone": cfg.reporting.timezone}
