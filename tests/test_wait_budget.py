"""The run's wait budget (issue 22): a CRM that asks for a long Retry-After ends the run as skipped at once,
instead of holding it (and the connection's lock) for up to 300 s per answer; a short one is still honoured.

Against the sandboxes whose rate limit is an HTTP 429 with Retry-After, on both warehouses, with the client's
sleep recorded (and not slept)."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from sqlalchemy import text

from oppsync_pipeline.lib.config import ConfigError, parse_config
from oppsync_pipeline.lib.crm import connector_class
from oppsync_pipeline.lib.crm.http import ApiClient, Auth, CrmError, QuotaBudget, QuotaExhausted
from oppsync_pipeline.lib.sync import build_connector, sync_connection
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine
from oppsync_pipeline.sandbox.cluster import build_simulator
from oppsync_pipeline.sandbox.server import FaultPlan, FaultRule, SandboxServer
from tests.conftest import sandbox_config
from tests.reliability.harness import OPPORTUNITY_PAGES, snapshot

# Sandboxes that enforce no limit in real time (HubSpot's 5 searches a second would answer 429s of its own
# to a client whose sleep is not slept); ConnectWise without its per-opportunity forecast reads.
EXTRA = {"connectwise": {"options": {"forecast": False}}, "autotask": {}}


class RecordingSleep:
    """The client's sleep: recorded, never slept."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def run_with_retry_after(cfg, engine, sim, seconds: float, run_id: str):
    """A full sync whose second opportunity page is answered 429 with `Retry-After: seconds`."""
    conn = cfg.connections[0]
    crm = conn.crm
    sim.faults = FaultPlan([FaultRule("rate_limit", after=2, count=1, seconds=seconds, path=OPPORTUNITY_PAGES[crm])])
    sleep = RecordingSleep()
    summary = sync_connection(
        cfg, conn, engine, run_id=run_id, mode="full", connector=build_connector(cfg, conn, sleep=sleep)
    )
    return summary, sleep


def last_run(engine, connection: str) -> tuple[str, str | None, float | None]:
    with engine.connect() as c:
        return tuple(
            c.execute(
                text(
                    "SELECT status, error, seconds_waited FROM oppsync.sync_runs WHERE connection = :c "
                    "ORDER BY started_at DESC LIMIT 1"
                ),
                {"c": connection},
            ).one()
        )


def lock_holder(engine, connection: str):
    with engine.connect() as c:
        return c.execute(
            text("SELECT run_id FROM oppsync.sync_locks WHERE connection = :c"), {"c": connection}
        ).scalar()


@pytest.mark.parametrize("crm", sorted(EXTRA))
def test_a_long_retry_after_skips_the_run_without_sleeping_and_a_short_one_is_honoured(
    crm: str, warehouse_url: str, tmp_path: Path
):
    sim = build_simulator(crm, seed=5, opportunities=90)
    with SandboxServer(sim) as server:
        cfg = sandbox_config({crm: server}, warehouse_url, tmp_path, extra={crm: {"page_size": 20, **EXTRA[crm]}})
        conn = cfg.connections[0]
        engine = make_engine(cfg.warehouse.url)
        ensure_schema(engine)
        assert sync_connection(cfg, conn, engine, run_id="r1", mode="full").result is not None
        sim.world.advance(hours=1, rate=0.2)
        before = snapshot(engine, conn.name)

        skipped, sleep = run_with_retry_after(cfg, engine, sim, 300, "r2")

        # a full read that the next run can resume pauses instead (lib/resume.py): the same, what it staged kept
        stopped = "paused" if connector_class(crm).resumable_full_reads else "skipped"
        assert skipped.extract.status == stopped and skipped.result is None
        assert sleep.calls == []  # 0 s slept: the budget is 120 s
        assert snapshot(engine, conn.name) == before  # warehouse unchanged
        assert lock_holder(engine, conn.name) is None  # the next run is not locked out
        status, error, waited = last_run(engine, conn.name)
        assert status == stopped and not waited
        assert "Retry-After: 300" in error and "quota.max_wait_seconds" in error

        done, sleep = run_with_retry_after(cfg, engine, sim, 3, "r3")

        assert done.extract.status == "complete" and done.result is not None
        assert sleep.calls == [3.0]
        assert last_run(engine, conn.name)[:1] == ("success",)
        assert snapshot(engine, conn.name) != before  # the hour's changes arrived
        engine.dispose()


def test_the_budget_counts_every_wait_of_the_run_and_is_configurable(tmp_path: Path):
    """Waits add up across requests: with quota.max_wait_seconds 5, two 3 s Retry-Afters do not both fit."""
    sim = build_simulator("autotask", seed=6, opportunities=90)
    with SandboxServer(sim) as server:
        cfg = sandbox_config(
            {"autotask": server},
            "duckdb:///:memory:",
            tmp_path,
            extra={"autotask": {"page_size": 20, "quota": {"max_wait_seconds": 5}}},
        )
        sim.faults = FaultPlan(
            [FaultRule("rate_limit", after=2, count=2, seconds=3, path=OPPORTUNITY_PAGES["autotask"])]
        )
        sleep = RecordingSleep()
        connector = build_connector(cfg, cfg.connections[0], sleep=sleep)
        with pytest.raises(QuotaExhausted, match=r"Retry-After: 3\b.*waited 3s"):
            for _ in connector.opportunities(open_set=True, since=None):
                pass
        assert sleep.calls == [3.0] and connector.stats.seconds_waited == 3.0


def test_backoff_after_server_errors_counts_too_and_fails_the_run_transiently(tmp_path: Path):
    """A CRM that keeps failing without asking for a wait is not 'slow down': the run fails (retried later)
    once its backoff would pass the budget, naming the budget."""
    sim = build_simulator("connectwise", seed=6, opportunities=30)
    with SandboxServer(sim) as server:
        sim.faults = FaultPlan([FaultRule("server_error", count=0)])
        sleep = RecordingSleep()
        client = ApiClient(server.url, Auth(), budget=QuotaBudget(max_wait_seconds=2.0), sleep=sleep)
        with pytest.raises(CrmError, match="wait budget") as caught:
            client.request("GET", "/sales/opportunities")
        assert not isinstance(caught.value, QuotaExhausted) and caught.value.permanent is False
        assert sum(sleep.calls) <= 2.0 and client.stats.requests < client.max_attempts


def test_max_wait_seconds_defaults_to_two_minutes_and_is_validated():
    base = {"name": "c", "crm": "hubspot", "base_url": "https://api.hubapi.com"}
    assert parse_config({"connections": [base]}).connections[0].quota.max_wait_seconds == 120
    assert (
        parse_config({"connections": [{**base, "quota": {"max_wait_seconds": 0}}]})
        .connections[0]
        .quota.max_wait_seconds
        == 0
    )
    with pytest.raises(ConfigError) as err:
        parse_config({"connections": [{**base, "quota": {"max_wait_seconds": -1}}]})
    assert any(p.startswith("connections[0].quota.max_wait_seconds:") for p in err.value.problems)


def test_a_connections_budget_reaches_its_client(tmp_path: Path):
    sim = build_simulator("autotask", seed=6, opportunities=5)
    with SandboxServer(sim) as server:
        cfg = sandbox_config(
            {"autotask": server},
            "duckdb:///:memory:",
            tmp_path,
            extra={"autotask": {"quota": {"max_wait_seconds": 7.5}}},
        )
        connector = build_connector(cfg, cfg.connections[0], session=requests.Session())
        assert connector.client.budget.max_wait_seconds == 7.5
