"""Parallel full reads (lib/crm/parallel.py) against the simulators over HTTP: the same records as the sequential
read, never more requests in flight than the CRM allows (counted by the simulator), and a slice
that fails fails the read."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import requests

from oppsync_pipeline.lib.config import ConfigError
from oppsync_pipeline.lib.crm.http import CrmError, InFlightLimit
from oppsync_pipeline.lib.crm.parallel import (
    begun,
    chain_ahead,
    in_background,
    one_ahead,
    ordered_map,
    split_after,
    streams,
)
from oppsync_pipeline.lib.sync import ExtractFailed, build_connector, sync_connection
from oppsync_pipeline.lib.warehouse.engine import make_engine
from oppsync_pipeline.sandbox import autotask as at
from oppsync_pipeline.sandbox.cluster import build_simulator, crm_module
from oppsync_pipeline.sandbox.server import FaultPlan, FaultRule, HttpError, SandboxServer
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


def test_streams_give_every_slice_s_items_each_slice_in_its_order() -> None:
    slices = [lambda i=i: iter(range(i * 10, i * 10 + 10)) for i in range(5)]
    got = list(streams(slices, 3))
    assert sorted(got) == list(range(50))
    for i in range(5):
        assert [x for x in got if x // 10 == i] == list(range(i * 10, i * 10 + 10))


def test_the_consumer_takes_whichever_slice_delivered_first() -> None:
    """A slow slice does not hold back the others: its items come when it delivers them (taken in turn, the
    consumer waited on the slice it was taking while the others stood idle with their page held)."""

    def slow():
        time.sleep(0.3)
        yield "slow"

    got = list(streams([slow, lambda: iter(["a1", "a2"]), lambda: iter(["b1"])], 3))
    assert got.index("slow") == 3 and sorted(got[:3]) == ["a1", "a2", "b1"]


def test_each_slice_holds_one_item_the_consumer_has_not_taken() -> None:
    """A slice reads its next page only once the consumer took the last one: the memory a split read holds ahead is
    one page per slice (parallel.READ_AHEAD), however slow the consumer; every slice has its next request under way
    meanwhile."""
    read = [0, 0, 0]
    lock = threading.Lock()

    def slice_(s: int):
        for k in range(6):
            with lock:
                read[s] += 1
            yield s * 10 + k

    got = []
    for x in streams([lambda s=s: slice_(s) for s in range(3)], 3):
        got.append(x)
        time.sleep(0.02)  # the consumer maps and stages; workers would read on if they did not wait for it
        with lock:
            for s in range(3):
                taken = sum(1 for y in got if y // 10 == s)
                assert read[s] <= taken + 1, (s, read, got)
    assert sorted(got) == [s * 10 + k for s in range(3) for k in range(6)]
    # the slices were read side by side, not one after another
    first_of = [next(n for n, y in enumerate(got) if y // 10 == s) for s in range(3)]
    assert max(first_of) < 6, got


def test_a_failing_slice_fails_the_whole_read() -> None:
    def broken():
        yield 100
        raise CrmError("slice 2 failed", status=503)

    slices = [lambda: iter([1, 2]), broken, lambda: iter([200, 201])]
    got = []
    with pytest.raises(CrmError, match="slice 2 failed"):
        for x in streams(slices, 3):
            got.append(x)
    assert 100 in got and len(got) <= 5  # the read failed; it is not a short success


def test_split_after_covers_the_rest_from_the_first_page_on() -> None:
    bounds = split_after(low=1, high=500, read=500, remaining=1500, parts=3)
    assert bounds[0] == 500 and bounds == sorted(bounds) and len(bounds) == 3
    assert bounds[1] - bounds[0] == pytest.approx(1500 * 499 / 500 / 3)  # the rest at the first page's density


def _slow_reads(log: list[tuple[str, int, float]], sizes: list[int], wait: float = 0.05):
    """A start function per read: each item takes `wait` seconds to read (a request), logged with its start."""

    def start(r: int):
        for k in range(sizes[r]):
            log.append(("read", r, time.monotonic()))
            time.sleep(wait)
            yield r * 100 + k

    return [lambda r=r: start(r) for r in range(len(sizes))]


def test_chain_ahead_keeps_the_order_and_reads_the_next_item_and_read_ahead() -> None:
    log: list[tuple[str, int, float]] = []
    t0 = time.monotonic()
    got = []
    for i, item in chain_ahead(_slow_reads(log, [3, 2, 2])):
        got.append((i, item))
        time.sleep(0.05)  # the consumer's own work on the item
    took = time.monotonic() - t0
    assert got == [(0, 0), (0, 1), (0, 2), (1, 100), (1, 101), (2, 200), (2, 201)]
    # 7 reads and 7 items of work of 50 ms each: serial 0.7 s; overlapped, the reads hide behind the work
    assert took < 0.6
    # the first items of reads 0 and 1 were read side by side, before anything was consumed
    first: dict[int, float] = {}
    for _, r, began in log:
        first.setdefault(r, began)
    assert abs(first[1] - first[0]) < 0.03


def test_chain_ahead_in_turn_begins_a_read_when_the_one_before_has_given_its_last_item() -> None:
    events: list[str] = []

    def read(r: int, size: int):
        events.append(f"begin {r}")
        for k in range(size):
            time.sleep(0.01)
            yield r * 100 + k
        events.append(f"end {r}")

    got = []
    for i, item in chain_ahead([lambda: read(0, 3), lambda: read(1, 0), lambda: read(2, 2)], side_by_side=False):
        got.append((i, item))
        events.append(f"used {item}")
        time.sleep(0.03)
    assert got == [(0, 0), (0, 1), (0, 2), (2, 200), (2, 201)]  # an empty read in between gives nothing
    # in turn: each read begins only after the one before it ended
    assert events.index("end 0") < events.index("begin 1") < events.index("end 1") < events.index("begin 2")


def test_chain_ahead_per_read_the_sync_s_sets_beside_each_other_its_change_reads_after_them() -> None:
    events: list[str] = []

    def read(r: int):
        events.append(f"begin {r}")
        for k in range(3):
            time.sleep(0.02)
            yield r * 100 + k
        events.append(f"end {r}")

    reads = [lambda r=r: read(r) for r in range(4)]
    got = [item for _, item in chain_ahead(reads, side_by_side=[True, False, True])]
    assert got == [r * 100 + k for r in range(4) for k in range(3)]
    assert events.index("begin 1") < events.index("end 0")  # the not-open set beside the open set
    assert events.index("end 1") < events.index("begin 2")  # the change reads after the sets' last request
    assert events.index("begin 3") < events.index("end 2")  # and beside each other


def test_chain_ahead_raises_a_failed_read_ahead_at_its_turn_never_as_an_empty_read() -> None:
    def broken():
        raise CrmError("the not-open set's first page", status=400)

    got = []
    with pytest.raises(CrmError, match="first page"):
        for i, item in chain_ahead([lambda: iter([1, 2, 3]), broken]):
            got.append((i, item))
    assert got == [(0, 1), (0, 2), (0, 3)]  # read 0 whole, then the failure: not a read 1 that looks empty


def test_chain_ahead_closes_the_reads_the_consumer_leaves() -> None:
    closed = []

    def read(r: int):
        try:
            yield from range(r * 10, r * 10 + 5)
        finally:
            closed.append(r)

    for _, item in chain_ahead([lambda: read(0), lambda: read(1)]):
        if item == 1:
            break
    assert sorted(closed) == [0, 1]  # read 1 had begun (its first item read ahead): it is closed too


def test_in_background_returns_the_result_or_raises_at_the_call() -> None:
    started = time.monotonic()
    slow = in_background(lambda: time.sleep(0.1) or 42)
    assert time.monotonic() - started < 0.05  # the caller went on
    assert slow() == 42

    def refused() -> int:
        raise CrmError("refused", status=403)

    failing = in_background(refused)
    time.sleep(0.02)
    with pytest.raises(CrmError, match="refused"):
        failing()


def test_begun_reads_the_first_item_after_its_turn_while_the_caller_works() -> None:
    events: list[str] = []

    def read():
        events.append("read")
        yield from (1, 2, 3)

    users = in_background(lambda: time.sleep(0.05) or events.append("users"))
    pages = begun(read(), after=users)
    time.sleep(0.1)  # the caller's own work (writing to the warehouse)
    assert events == ["users", "read"]  # begun before it was iterated, once `after` had returned
    assert list(pages) == [1, 2, 3]

    def refused():
        raise CrmError("the open set's first page", status=403)
        yield

    failing = begun(refused())
    with pytest.raises(CrmError, match="first page"):
        next(failing)


def test_in_flight_limit_bounds_each_key_and_not_the_others() -> None:
    limit = InFlightLimit(2, lambda method, path: path.split("/")[0] if "/" in path else None)
    in_flight: dict[str, int] = {}
    peak: dict[str, int] = {}
    lock = threading.Lock()

    def request(path: str) -> None:
        key = path.split("/")[0] if "/" in path else "free"
        with limit.slot("POST", path):
            with lock:
                in_flight[key] = in_flight.get(key, 0) + 1
                peak[key] = max(peak.get(key, 0), in_flight[key])
            time.sleep(0.02)
            with lock:
                in_flight[key] -= 1

    paths = ["Opportunities/query"] * 6 + ["Companies/query"] * 6 + ["zone"] * 6
    threads = [threading.Thread(target=request, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak["Opportunities"] == 2 and peak["Companies"] == 2  # each endpoint at its limit, side by side
    assert peak["free"] > 2  # what no limit counts is not held


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
    # the same records, each set whole before the next; within a set the ranges' pages interleave
    assert sorted(parallel) == sorted(sequential)
    assert [row[0] for row in parallel] == [row[0] for row in sequential]
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


def test_a_failing_read_ahead_fails_the_full_sync_and_changes_nothing(tmp_path: Path) -> None:
    """The sync reads the not-open set's first page beside the open set (parallel.chain_ahead): when that request
    fails, the sync fails, at the not-open set's turn, and infers no delete from the records it did not read."""
    sim = build_simulator("salesforce", seed=5, opportunities=600, faults=FaultPlan(latency_ms=5))
    with SandboxServer(sim) as server:
        cfg = sandbox_config({"salesforce": server}, f"duckdb:///{tmp_path / 'w.duckdb'}", tmp_path)
        conn = cfg.connections[0]
        engine = make_engine(cfg.warehouse.url)
        try:
            assert sync_connection(cfg, conn, engine, run_id="r1", mode="full").extract.status == "complete"
            inner, refused = sim.handle, []

            def handle(req):  # the not-open set's first page of the full read: a query the CRM refuses
                soql = req.arg("q") or ""
                if "IsClosed = true ORDER BY CreatedDate" in soql and not refused:
                    refused.append(soql)
                    return sim.error_response(HttpError(400, "MALFORMED_QUERY", "refused for the test"))
                return inner(req)

            sim.handle = handle
            connector = build_connector(cfg, conn, sleep=lambda s: None)
            with pytest.raises(ExtractFailed, match="MALFORMED_QUERY|refused for the test"):
                sync_connection(cfg, conn, engine, run_id="r2", mode="full", connector=connector)
            assert refused  # the read ahead was the request refused
            with engine.connect() as c:
                deleted = c.exec_driver_sql(
                    "SELECT count(*) FROM oppsync.opportunities WHERE deleted_at IS NOT NULL"
                ).scalar()
            assert deleted == 0
        finally:
            engine.dispose()


def test_autotask_looks_up_pages_side_by_side_each_id_once(tmp_path: Path) -> None:
    """Autotask's map_pages has several pages' company and contact lookups in flight (within three per endpoint),
    and asks for each id once, the same ids as one page after another would (ids an earlier page's lookup under way
    will bring are left out)."""
    asked: dict[str, list[int]] = {}
    lock = threading.Lock()

    class Log(requests.Session):
        def request(self, method, url, *args, **kwargs):  # type: ignore[override]
            entity = url.rsplit("/V1.0/", 1)[-1].split("/")[0]
            body = kwargs.get("json") or {}
            for f in body.get("filter", []):
                if entity in ("Companies", "Contacts") and f.get("op") == "in":
                    with lock:
                        asked.setdefault(entity, []).extend(f["value"])
            return super().request(method, url, *args, **kwargs)

    def read(degree: int) -> tuple[list[tuple], int]:  # the rows, the most lookups of an endpoint at once
        asked.clear()
        sim = build_simulator("autotask", seed=5, opportunities=1500, faults=FaultPlan(latency_ms=20))
        with SandboxServer(sim) as server:
            cfg = sandbox_config(
                {"autotask": server},
                f"duckdb:///{tmp_path / f'w{degree}.duckdb'}",
                tmp_path,
                {"autotask": {"page_size": 100, "options": {"parallel_reads": degree}}},
            )
            connector = build_connector(cfg, cfg.connections[0], session=Log())
            rows = [
                (o.source_id, o.client_name, o.sales_executive, o.service_location)
                for open_set in (True, False)
                for page in connector.opportunities(open_set, None)
                for o in page
            ]
            assert sim.in_flight.refused == 0
            lookups = {k: v for k, v in sim.in_flight.peak.items() if k[1] in ("companies", "contacts")}
            return rows, max(lookups.values())

    sequential, _ = read(1)
    one_by_one = {k: sorted(v) for k, v in asked.items()}
    parallel, peak = read(3)
    assert sorted(parallel) == sorted(sequential)  # the same records mapped alike (the ranges' pages interleave)
    assert {k: sorted(v) for k, v in asked.items()} == one_by_one  # the same ids
    assert all(len(v) == len(set(v)) for v in asked.values())  # each asked once
    assert 1 < peak <= at.THREAD_LIMIT  # several pages' lookups at once, never a fourth


def test_autotask_count_asked_beside_the_first_page_fails_the_read_when_refused(tmp_path: Path) -> None:
    """The set's count goes beside its first page; refused, the read fails before a record is handed on (the
    sync would otherwise compare what it received with no count, or page without a bound)."""
    sim = build_simulator("autotask", seed=5, opportunities=1200)
    with SandboxServer(sim) as server:
        sim.faults.rules = [FaultRule("bad_request", path=r"(?i).*/opportunities/query/count$")]
        options = {"parallel_reads": 3}
        cfg = sandbox_config(
            {"autotask": server},
            f"duckdb:///{tmp_path / 'w.duckdb'}",
            tmp_path,
            {"autotask": {"page_size": 100, "options": options}},
        )
        connector = build_connector(cfg, cfg.connections[0], sleep=lambda s: None)
        handed_on = []
        with pytest.raises(CrmError) as err:
            for page in connector.opportunities(True, None):
                handed_on.append(page)
    assert err.value.status == 400 and handed_on == []
