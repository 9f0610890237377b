"""`warehouse.duckdb:` settings: typed in the configuration (a wrong value names its key), applied by the engine,
overridable for one process by the environment."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from oppsync_pipeline.lib.config import ConfigError, DuckDBSettings, parse_config
from oppsync_pipeline.lib.warehouse.engine import make_engine


def settings_of(engine) -> tuple[str, int]:
    with engine.connect() as c:
        return (
            c.execute(text("SELECT current_setting('memory_limit')")).scalar(),
            int(c.execute(text("SELECT current_setting('threads')")).scalar()),
        )


def test_the_configured_settings_reach_duckdb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("OPPSYNC_DUCKDB_MEMORY_LIMIT", raising=False)
    monkeypatch.delenv("OPPSYNC_DUCKDB_THREADS", raising=False)
    cfg = parse_config(
        {"warehouse": {"url": f"duckdb:///{tmp_path / 'w.duckdb'}", "duckdb": {"memory_limit": "300MB", "threads": 1}}}
    )
    limit, threads = settings_of(make_engine(cfg.warehouse.url, cfg.warehouse.duckdb))
    assert (limit, threads) == ("286.1 MiB", 1)  # DuckDB reports 300 MB (10^6 bytes) in MiB


def test_the_environment_overrides_them_for_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OPPSYNC_DUCKDB_THREADS", "2")
    engine = make_engine(f"duckdb:///{tmp_path / 'w.duckdb'}", DuckDBSettings(threads=1))
    assert settings_of(engine)[1] == 2


@pytest.mark.parametrize(
    "duckdb, key",
    [
        ({"memory_limit": "lots"}, "warehouse.duckdb.memory_limit"),
        ({"threads": 0}, "warehouse.duckdb.threads"),
        ({"memroy_limit": "1GB"}, "warehouse.duckdb.memroy_limit"),
    ],
)
def test_a_wrong_setting_names_its_key(duckdb: dict, key: str):
    with pytest.raises(ConfigError) as err:
        parse_config({"warehouse": {"url": "duckdb:///w.duckdb", "duckdb": duckdb}})
    assert key in str(err.value)
