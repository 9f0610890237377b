"""`warehouse.duckdb:` settings: typed in the configuration (a wrong value names its key), applied by the engine,
overridable for one process by the environment."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from oppsync_pipeline.lib.config import ConfigError, DuckDBSettings, parse_config
from oppsync_pipeline.lib.warehouse.engine import (
    CHECKPOINT_MEMORY_LIMIT_MB,
    _checkpoint_memory,
    make_engine,
    transaction,
)


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


def test_the_checkpoint_at_close_runs_under_a_lower_limit_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """engine.transaction lowers DuckDB's memory limit after the commit, for the checkpoint that closing runs;
    the statements ran under the configured limit, and the next transaction has it again."""
    monkeypatch.delenv("OPPSYNC_DUCKDB_MEMORY_LIMIT", raising=False)
    engine = make_engine(f"duckdb:///{tmp_path / 'w.duckdb'}", DuckDBSettings(memory_limit="300MB"))
    seen = []
    with transaction(engine) as c:
        seen.append(c.execute(text("SELECT current_setting('memory_limit')")).scalar())
        c.execute(text("CREATE TABLE t AS SELECT range AS i, repeat('x', 200) AS s FROM range(50000)"))
        _checkpoint_memory(c)
        seen.append(c.execute(text("SELECT current_setting('memory_limit')")).scalar())
    with transaction(engine) as c:
        seen.append(c.execute(text("SELECT current_setting('memory_limit')")).scalar())
        assert c.execute(text("SELECT count(*) FROM t")).scalar() == 50000
    assert seen == ["286.1 MiB", f"{CHECKPOINT_MEMORY_LIMIT_MB:.1f} MiB", "286.1 MiB"]


def test_the_checkpoint_limit_is_never_above_the_configured_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("OPPSYNC_DUCKDB_MEMORY_LIMIT", raising=False)
    engine = make_engine(f"duckdb:///{tmp_path / 'w.duckdb'}", DuckDBSettings(memory_limit="64MiB"))
    with engine.connect() as c:
        _checkpoint_memory(c)
        assert c.execute(text("SELECT current_setting('memory_limit')")).scalar() == "64.0 MiB"
