"""The one resource every oppsync asset uses: the validated configuration and the warehouse engine."""

from __future__ import annotations

from functools import cache

import dagster as dg
from sqlalchemy.engine import Engine

from oppsync_pipeline.lib.config import OppsyncConfig, config_path, load_config
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine


@cache
def _engine(url: str) -> Engine:
    engine = make_engine(url)
    ensure_schema(engine)
    return engine


class OppsyncResource(dg.ConfigurableResource):
    """Where oppsync.yaml is; everything else (warehouse, connections, secrets) comes from it."""

    config_path: str

    def app_config(self) -> OppsyncConfig:
        return load_config(self.config_path)

    def engine(self) -> Engine:
        return _engine(self.app_config().warehouse.url)


def load_app_config() -> tuple[str, OppsyncConfig]:
    """The configuration the definitions are built from (OPPSYNC_CONFIG, else ./oppsync.yaml), read at
    definitions-load time, never at import time."""
    path = str(config_path().resolve())
    return path, load_config(path)


@dg.definitions
def defs() -> dg.Definitions:
    path, _ = load_app_config()
    return dg.Definitions(resources={"oppsync": OppsyncResource(config_path=path)})
