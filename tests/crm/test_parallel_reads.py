"""Parallel full reads (lib/crm/parallel.py) against the simulators over HTTP: the same records in the same order as
the sequential read, never more requests in flight than the CRM allows (counted by the simulator), and a slice
that fails fails the read."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import requests

from oppsync_pipeline.lib.config import ConfigError
from oppsync_pipeline.lib.crm.http import CrmError
from oppsync_pipeline.lib.crm.parallel import one_ahead, ordered_map, split_after, streams
from oppsync_pipeline.lib.sync import build_connector
from oppsync_pipeline.sandbox import autotask as at
from oppsync_pipeline.sandbox.cluster import build_simulator, crm_module
from oppsync_pipeline.sandbox.server import FaultPlan, FaultRule, SandboxServer
from tests.conftest import sandbox_config

# -- the mechanism, without HTTP -------------------------------------------------------------------------------------


def test_one_ahead_runs_the_next_items_fn_while_the_consumer_works_one_at_a_time_in_order() -> None:
    started: list[int] = []
    running, overlapped = [0], [0]
    lock = threading.Lock()

    def lookup(x: int) -> int:
        with lock:
            running[0] += 1
            assert running[0] == 1  # never two at once: fn may fill caches
            started.append(x)
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return x * 10

    out = []
    for item, value in one_ahead(lookup, range(6)):
        time.sleep(0.05)  # the consumer's own work (mapping, staging) on this item
        with lock:
            overlapped[0] += max(started) > item  # the next item's lookup began before this one was consumed
        out.append((item, value))
    assert out == [(i, i * 10) for i in range(6)] and started == list(range(6))
    assert overlapped[0] == 5  # every item but the last had the next one's lookup under way


def test_one_ahead_raises_a_failure_at_its_items_turn() -> None:
    def lookup(x: int) -> int:
        if x == 2:
            raise CrmError("refused")
        return x

    got = []
    with pytest.raises(CrmError):
        for item, _ in one_ahead(lookup, range(5)):
            got.append(item)
    assert got == [0, 1]


def test_ordered_map_keeps_the_order_and_bounds_the_threads() -> None:
    in_flight, peak, lock = [0], [0], threading.Lock()

    def slow_square(x: int) -> int:
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.002 * (x % 3))
        with lock:
            in_flight[0] -= 1
        return x * x

    assert list(ordered_map(slow_square, range(40), 4)) == [x * x for x in range(40)]
    assert 1 < peak[0] <= 4


def test_ordered_map_raises_the_first_failure_in_order() -> None:
    def fail_on_7(x: int) -> int:
        if x == 7:
            raise CrmError("boom", status=500)
        return x

    got = []
    with pytest.raises(CrmError, match="boom"):
        for x in ordered_map(fail_on_7, range(20), 3):
            got.append(x)
    assert got == list(range(7))


def test_streams_concatenate_the_slices_in_order() -> None:
    slices = [lambda i=i: iter(range(i * 10, i * 10 + 10)) for i in range(5)]
    assert list(streams(slices, 3)) == list(range(50))


def test_a_failing_slice_fails_the_whole_read() -> None:
    def broken():
        yield 100
        raise CrmError("slice 2 failed", status=503)

    slices = [lambda: iter([1, 2]), broken, lambda: iter([200, 201])]
    got = []
    with pytest.raises(CrmError, match="slice 2 failed"):
        for x in streams(slices, 3):
            got.append(x)
    assert got == [1, 2, 100]  # nothing of the slice after it: the read is not a short success


def test_split_after_covers_the_rest_from_the_first_page_on() -> None:
    bounds = split_after(low=1, high=500, read=500, remaining=1500, parts=3)
    assert bounds[0] == 500 and bounds == sorted(bounds) and len(bounds) == 3
    assert bounds[1] - bounds[0] == pytest.approx(1500 * 499 / 500 / 3)  # the rest at the first page's density


# -- the connectors against the simulators ---------------------------------------------------------------------------


def _read(crm: str, server: SandboxServer, tmp_path: Path, degree: int, **extra: object) -> list[tuple]:
    """Both sets, read with `options.parallel_reads: degree`, as (set, id, some mapped fields) in read order."""
    options = {**getattr(crm_module(crm), "connection_options", lambda url: {})(server.url), "parallel_reads": degree}
    cfg = sandbox_config(
        {crm: server}, f"duckdb:///{tmp_path / 'w.duckdb'}", tmp_path, {crm: {**extra, "options": options}}
    )
    connector = build_connector(cfg, cfg.connections[0])  # real sleeps: HubSpot paces its searches
    assert connector.degree == degree
    out = []
    for open_set in (True, False):
        for page in connector.opportunities(open_set, None):
            out += [(open_set, o.source_id, o.project_name, o.amount, o.stage, o.client_name) for o in page]
    assert connector.stats.rate_limited == 0  # within the CRM's limits: nothing refused, nothing retried
    return out


@pytest.mark.parametrize(
    ("crm", "page_size", "degree"),
    [("salesforce", 200, 4), ("dynamics", 150, 4), ("autotask", 150, 3), ("hubspot", 100, 5)],
)
def test_split_read_equals_the_sequential_read(crm: str, page_size: int, degree: int, tmp_path: Path) -> None:
    sim = build_simulator(crm, seed=5, opportunities=1200, faults=FaultPlan(latency_ms=5))
    with SandboxServer(sim) as server:
        sequential = _read(crm, server, tmp_path, 1, page_size=page_size)
        parallel = _read(crm, server, tmp_path, degree, page_size=page_size)
    assert len(sequential) == sum(1 for o in sim.world.live())
    assert parallel == sequential  # the same records, in the same order
    if sim.in_flight is not None:
        assert sim.in_flight.refused == 0
        assert max(sim.in_flight.peak.values()) > 1  # the slices did run side by side


def test_connectwise_forecasts_read_concurrently_give_the_same_amounts(tmp_path: Path) -> None:
    sim = build_simulator("connectwise", seed=5, opportunities=120, faults=FaultPlan(latency_ms=5))
    with SandboxServer(sim) as server:
        sequential = _read("connectwise", server, tmp_path, 1)
        parallel = _read("connectwise", server, tmp_path, 10)
    assert parallel == sequential
    assert any(row[3] is not None for row in parallel)  # amounts come from the forecasts


def test_autotask_full_read_stays_within_three_threads_per_endpoint(tmp_path: Path) -> None:
    sim = build_simulator("autotask", seed=5, opportunities=1500, faults=FaultPlan(latency_ms=20))
    with SandboxServer(sim) as server:
        rows = _read("autotask", server, tmp_path, 3, page_size=100)
    assert len(rows) == sum(1 for o in sim.world.live())
    opportunities = {k: v for k, v in sim.in_flight.peak.items() if k[1] == "opportunities"}
    assert max(opportunities.values()) == at.THREAD_LIMIT  # three side by side, never a fourth
    assert sim.in_flight.refused == 0


def test_autotask_simulator_refuses_a_fourth_concurrent_request() -> None:
    sim = build_simulator("autotask", seed=5, opportunities=50, faults=FaultPlan(latency_ms=400))
    creds = at.SANDBOX_CREDENTIALS
    headers = {
        "ApiIntegrationCode": creds["integration_code"],
        "UserName": creds["username"],
        "Secret": creds["secret"],
    }
    with SandboxServer(sim) as server:
        url = f"{server.url}/ATServicesRest/V1.0/Opportunities/query"
        answers: list[requests.Response] = []

        def post() -> None:
            answers.append(
                requests.post(
                    url, json={"MaxRecords": 10, "filter": [{"op": "gt", "field": "id", "value": 0}]}, headers=headers
                )
            )

        threads = [threading.Thread(target=post) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200, 200, 200, 429]
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.json()["errors"] and "threads" in refused.json()["errors"][0]


def test_a_failing_slice_fails_the_autotask_read(tmp_path: Path) -> None:
    sim = build_simulator("autotask", seed=5, opportunities=1200)
    with SandboxServer(sim) as server:
        # the 4th opportunity query of the run: a slice's first request (after the first set's first page)
        sim.faults.rules = [FaultRule("bad_request", path=r"(?i).*/opportunities/query$", after=3)]
        with pytest.raises(CrmError) as err:
            _read("autotask", server, tmp_path, 3, page_size=100)
    assert err.value.status == 400


def test_parallel_reads_is_validated_with_its_key(tmp_path: Path) -> None:
    sim = build_simulator("autotask", seed=5, opportunities=10)
    with SandboxServer(sim) as server, pytest.raises(ConfigError, match=r"options\.parallel_reads"):
        sandbox_config(
            {"autotask": server},
            f"duckdb:///{tmp_path / 'w.duckdb'}",
            tmp_path,
            {"autotask": {"options": {"parallel_reads": 0}}},
        )


@pytest.mark.parametrize("crm", ["salesforce", "dynamics"])
def test_records_edited_during_a_split_read_are_all_read(crm: str, tmp_path: Path) -> None:
    """The ranges are of the creation date, which an edit does not move: a record edited while the ranges are
    read stays in its range (by the modification stamp it would jump to the last range, and be missed when
    that range had been read already: a missing record is a delete to a full sync)."""
    sim = build_simulator(crm, seed=5, opportunities=1200, faults=FaultPlan(latency_ms=20))
    with SandboxServer(sim) as server:
        options = {**getattr(crm_module(crm), "connection_options", lambda url: {})(server.url), "parallel_reads": 4}
        cfg = sandbox_config(
            {crm: server}, f"duckdb:///{tmp_path / 'w.duckdb'}", tmp_path, {crm: {"page_size": 200, "options": options}}
        )
        connector = build_connector(cfg, cfg.connections[0])
        read: list[str] = []
        for open_set in (True, False):
            for n, page in enumerate(connector.opportunities(open_set, None)):
                read += [o.source_id for o in page]
                if n == 0:  # the ranges are being read: edit records of every range, oldest first
                    for opp in sorted(sim.world.live(), key=lambda o: o.created_at)[::50]:
                        sim.world.update(opp.native_id, name=f"{opp.name} (edited)")
    assert sorted(read) == sorted(o.native_id for o in sim.world.live())
