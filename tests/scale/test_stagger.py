"""The schedules' spread (lib/scale.py) and the configuration keys of many-connection deployments."""

from __future__ import annotations

from collections import Counter

import pytest

from oppsync_pipeline.lib.config import ConfigError, parse_config
from oppsync_pipeline.lib.scale import effective_spread, stagger_offset, staggered_cron
from oppsync_pipeline.sandbox.cluster import tenant_urls, tenants_config


def test_offsets_are_deterministic_and_within_the_window() -> None:
    assert stagger_offset("t0001-hubspot", 30) == stagger_offset("t0001-hubspot", 30)
    offsets = [stagger_offset(f"t{i:04d}-x", 30) for i in range(500)]
    assert set(offsets) == set(range(30))  # every minute of the window used
    assert max(Counter(offsets).values()) <= 30  # ~17 a minute on average; no minute takes a crowd


@pytest.mark.parametrize(
    ("cron", "offset_applies"),
    [("30 * * * *", True), ("0 2 * * *", True), ("0,30 * * * *", True), ("*/15 * * * *", False), ("* * * * *", False)],
)
def test_only_plain_minutes_move(cron: str, offset_applies: bool) -> None:
    name = next(n for n in (f"c{i}" for i in range(100)) if stagger_offset(n, 30) == 7)
    moved = staggered_cron(cron, name, 30)
    if not offset_applies:
        assert moved == cron
        return
    minutes = [int(m) for m in cron.split()[0].split(",")]
    assert moved.split()[0] == ",".join(str(m) for m in sorted((m + 7) % 60 for m in minutes))
    assert moved.split()[1:] == cron.split()[1:]  # hours, days untouched


def test_no_spread_keeps_the_configured_minute() -> None:
    assert staggered_cron("30 * * * *", "anything", 0) == "30 * * * *"
    assert staggered_cron("30 * * * *", "anything", 1) == "30 * * * *"


def test_default_spread_follows_the_deployment_size() -> None:
    assert effective_spread(None, 5, 20, 30) == 0  # a small deployment syncs at :30, as documented
    assert effective_spread(None, 500, 20, 30) == 30
    assert effective_spread(0, 500, 20, 30) == 0  # configured: never
    assert effective_spread(10, 5, 20, 30) == 10


def scale_config(n: int, warehouse_url: str, **top) -> dict:
    return tenants_config(tenant_urls(n, 9000), warehouse_url, **top)[0]


def test_config_reads_schedules_spread_minutes() -> None:
    cfg = parse_config(scale_config(3, "duckdb:///w.duckdb", schedules={"spread_minutes": 15}))
    assert cfg.spread_minutes() == 15
    assert parse_config(scale_config(3, "duckdb:///w.duckdb")).spread_minutes() == 0
    with pytest.raises(ConfigError, match=r"schedules\.spread_minutes"):
        parse_config(scale_config(3, "duckdb:///w.duckdb", schedules={"spread_minutes": 61}))


def test_duckdb_refuses_a_large_deployment_naming_the_key_and_the_fix() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(scale_config(51, "duckdb:///w.duckdb"))
    (problem,) = err.value.problems
    assert problem.startswith("warehouse.url: 51 connections on DuckDB")
    assert "warehouse.duckdb.max_connections" in problem
    assert "postgresql+psycopg2://" in problem
    # Postgres takes them; a user who knows better raises the limit
    assert len(parse_config(scale_config(51, "postgresql+psycopg2://u@h:5432/db")).connections) == 51
    raised = scale_config(51, "duckdb:///w.duckdb")
    raised["warehouse"]["duckdb"] = {"max_connections": 60}
    assert len(parse_config(raised).connections) == 51


def test_generated_config_has_unique_tenants_the_crms_in_turn() -> None:
    cfg = parse_config(scale_config(10, "postgresql+psycopg2://u@h:5432/db"))
    assert [c.crm for c in cfg.connections[:5]] == ["salesforce", "hubspot", "dynamics", "connectwise", "autotask"]
    assert len({c.base_url for c in cfg.connections}) == 10
    assert all(not c.webhooks.enabled for c in cfg.connections)
