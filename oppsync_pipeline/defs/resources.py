"""The one resource every oppsync asset uses: the validated configuration and the warehouse engine."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import dagster as dg
from sqlalchemy.engine import Engine

from oppsync_pipeline.lib.config import DuckDBSettings, OppsyncConfig, config_path, load_config
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine


def _engine(url: str, duckdb: DuckDBSettings | None = None) -> Engine:
    """One engine per process and warehouse (schema ensured once)."""
    return _cached_engine(url, duckdb or DuckDBSettings())


@cache
def _cached_engine(url: str, duckdb: DuckDBSettings) -> Engine:
    engine = make_engine(url, duckdb)
    ensure_schema(engine)
    return engine


@cache
def _parsed(path: str, mtime_ns: int, size: int) -> OppsyncConfig:
    return load_config(path)


def app_config(path: str | Path) -> OppsyncConfig:
    """The configuration at `path`, parsed once per process (a code location server, a run worker, the CLI)
    however many definitions, assets and checks ask for it; parsed again only when the file changes."""
    p = Path(path)
    if not p.is_file():
        return load_config(p)  # its error names the file and the fix
    st = p.stat()
    return _parsed(str(p.resolve()), st.st_mtime_ns, st.st_size)


class OppsyncResource(dg.ConfigurableResource):
    """Where oppsync.yaml is; everything else (warehouse, connections, secrets) comes from it."""

    config_path: str

    def app_config(self) -> OppsyncConfig:
        return app_config(self.config_path)

    def engine(self) -> Engine:
        """The warehouse engine (one per process and warehouse), with the typed `warehouse.duckdb` settings."""
        warehouse = self.app_config().warehouse
        return _engine(warehouse.url, warehouse.duckdb)


def load_app_config() -> tuple[str, OppsyncConfig]:
    """The configuration the definitions are built from (OPPSYNC_CONFIG, else ./oppsync.yaml), read at
    definitions-load time, never at import time."""
    path = str(config_path().resolve())
    return path, app_config(path)


def resource_definitions() -> dg.Definitions:
    """The shared resource, and the executor of every job in both locations: in-process. A sync's steps (extract,
    checks, reconcile) and a mart build run one after the other anyway; the default multiprocess executor started
    a process per step that loaded the code location again (~10 s each on 2 cores), and that was most of the
    time from a CRM's webhook to the mart (make bench, freshness)."""
    path, _ = load_app_config()
    return dg.Definitions(resources={"oppsync": OppsyncResource(config_path=path)}, executor=dg.in_process_executor)


@dg.definitions
def defs() -> dg.Definitions:
    return resource_definitions()
