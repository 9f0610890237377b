"""The one resource every oppsync asset uses: the validated configuration and the warehouse engine."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import dagster as dg
from sqlalchemy.engine import Engine

from oppsync_pipeline.lib.config import OppsyncConfig, config_path, load_config
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine


@cache
def _engine(url: str) -> Engine:
    engine = make_engine(url)
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
        return load_config(p)   # its error names the file and the fix
    st = p.stat()
    return _parsed(str(p.resolve()), st.st_mtime_ns, st.st_size)


class OppsyncResource(dg.ConfigurableResource):
    """Where oppsync.yaml is; everything else (warehouse, connections, secrets) comes from it."""

    config_path: str

    def app_config(self) -> OppsyncConfig:
        return app_config(self.config_path)

    def engine(self) -> Engine:
        return _engine(self.app_config().warehouse.url)


def load_app_config() -> tuple[str, OppsyncConfig]:
    """The configuration the definitions are built from (OPPSYNC_CONFIG, else ./oppsync.yaml), read at
    definitions-load time, never at import time."""
    path = str(config_path().resolve())
    return path, app_config(path)


def resource_definitions() -> dg.Definitions:
    path, _ = load_app_config()
    return dg.Definitions(resources={"oppsync": OppsyncResource(config_path=path)})


@dg.definitions
def defs() -> dg.Definitions:
    return resource_definitions()
