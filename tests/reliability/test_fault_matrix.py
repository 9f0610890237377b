"""Fault matrix (issue 8): every CRM x every fault. Each case, on DuckDB:

  1. state A: a clean full sync into the warehouse under test (T) and into a reference warehouse (R);
  2. the CRM changes (simulated activity, plus the case's schema drift if any): state B;
  3. T: a full sync with the fault. It completes, or stops cleanly (ExtractFailed, or 'skipped' for a quota
     stop) and then T's opportunities, events and history are exactly what they were before;
  4. the fault is cleared and T syncs again (same mode, as a retry would);
  5. R: one fault-free full sync of the same CRM state.
  T must equal R: same current rows, same (source_id, event_type) multiset, same history versions.

The one case where the CRM moves records while T is paging compares current state exactly and events
as "nothing lost, nothing duplicated": T may hold the intermediate observations (a stage change seen
half-way) that R, reading once, never saw; never an extra created / deleted / restored.

`make reliability` runs every case and prints the table; the normal suite runs a few per CRM.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import text

from oppsync_pipeline.lib.sync import ExtractFailed, build_connector, sync_connection
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine
from oppsync_pipeline.sandbox.cluster import CRMS, build_simulator
from oppsync_pipeline.sandbox.server import FaultRule, SandboxServer
from tests.conftest import sandbox_config
from tests.reliability.harness import (
    FULL,
    OPPORTUNITY_PAGES,
    PageHook,
    client_sleep,
    connection_extra,
    invariants,
    page_field,
    snapshot,
)
from tests.reliability.report import reported, unclear

SIZE = {"connectwise": 200}  # ConnectWise pays one forecast request per opportunity
OPPORTUNITIES = 300
PAGE_SIZE = 40  # 300 opportunities -> several pages per set: faults land mid-paging
# A field each CRM's page carries that the mapping treats as optional (the "missing optional field" drift),
# the key of a record's id (null ids must fail the page, not become a row named 'None'), and where the page
# carries the opportunity's name and created date (for the bad-record case): harness.page_field.


@dataclass
class Case:
    name: str
    rules: Callable[[str], list[FaultRule]] = lambda crm: []
    outcomes: Callable[[str], set[str]] = lambda crm: {"complete"}
    drift: Callable[[object, str], None] | None = None  # applied to the world at state B
    hook: Callable[[object, str], PageHook] | None = None  # page hook during T's faulted run only
    persistent_hook: Callable[[object, str], PageHook] | None = None  # part of the CRM's state B (all runs)
    setup: Callable[[object, object], Callable[[], None]] | None = None  # (sim, connector) -> undo
    relaxed_events: bool = False
    notes: list[str] = field(default_factory=list)
    # a regex the error of a stopped run must match (what it must name); None: any error free of tracebacks
    must_name: str | None = None
    # after the faulted run: (engine, connection name, crm) -> number of secret forms found in the warehouse
    leak_scan: Callable[[object, str, str], int] | None = None


def opp_rule(kind: str, crm: str, **kw) -> FaultRule:
    return FaultRule(kind, path=OPPORTUNITY_PAGES[crm], **kw)


# -- world and page manipulations ------------------------------------------------------------------------------


def duplicate_across_pages(sim, crm: str) -> PageHook:
    """Each page repeats the last record of the page before it (an offset shifting under the reader)."""
    last: list = []

    def rewrite(records: list, n: int, req) -> None:
        if "queryall" in req.path.lower():
            return  # Salesforce's delete feed: a live record there would be a different fault
        # only a record of the same kind (Salesforce answers stage and user lists on the same /query path)
        if last and isinstance(records[0], dict) and set(last[0]) == set(records[0]):
            records.insert(0, last[0])
        last[:] = [records[-1]]

    return PageHook(sim, crm, rewrite=rewrite).install()


def move_between_sets(sim, crm: str) -> PageHook:
    """After the second page, six open records are won and six closed ones reopened (a user at work)."""
    world = sim.world

    def after(n: int) -> None:
        if n != 2:
            return
        live = sorted(world.live(), key=lambda o: o.seq)
        opened = [o for o in live if world.status(o) == "open"][:6]
        closed = [o for o in live if world.status(o) != "open"][:6]
        for o in opened:
            world.update(o.native_id, stage=world.stage_for(world.stages[o.stage].pipeline, "won").key)
        for o in closed:
            world.update(o.native_id, stage=world.stage_for(world.stages[o.stage].pipeline, "open").key)

    return PageHook(sim, crm, after=after).install()


def add_unknown_field(sim, crm: str) -> PageHook:
    def rewrite(records: list, n: int, req) -> None:
        for r in records:
            if isinstance(r, dict):
                r["brand_new_field_x"] = {"nested": [1, "two"], "note": "added by the CRM vendor"}

    return PageHook(sim, crm, rewrite=rewrite).install()


def drop_optional_field(sim, crm: str) -> PageHook:
    key = page_field(crm, "optional")

    def rewrite(records: list, n: int, req) -> None:
        for r in records:
            if isinstance(r, dict):
                r.pop(key, None)
                if isinstance(r.get("properties"), dict):
                    r["properties"].pop(key, None)

    return PageHook(sim, crm, rewrite=rewrite).install()


def null_accounts(world, crm: str) -> None:
    for o in sorted(world.live(), key=lambda o: o.seq)[:10]:
        world.update(o.native_id, account=None)


def huge_names(world, crm: str) -> None:
    for i, o in enumerate(sorted(world.live(), key=lambda o: o.seq)[10:15]):
        world.update(o.native_id, name=("Ω" if i % 2 else "x") * 10_000)


def opportunity_pages(crm: str, rewrite: Callable[[list, int], None]) -> Callable[[list, int, object], None]:
    """A PageHook rewrite applied to pages of opportunity records only, numbered among themselves (Salesforce's
    /query also serves the stage, user and organization lists)."""
    seen = {"n": 0}

    id_key = page_field(crm, "id")

    def is_opportunity(record) -> bool:
        if not isinstance(record, dict) or id_key not in record:
            return False
        return crm != "salesforce" or (record.get("attributes") or {}).get("type") == "Opportunity"

    def hook(records: list, n: int, req) -> None:
        if records and is_opportunity(records[0]):
            seen["n"] += 1
            rewrite(records, seen["n"])

    return hook


def null_ids(sim, crm: str) -> PageHook:
    """One record of the second opportunity page has a null id."""

    def rewrite(records: list, n: int) -> None:
        if n == 2:
            records[-1][page_field(crm, "id")] = None

    return PageHook(sim, crm, rewrite=opportunity_pages(crm, rewrite)).install()


def looping_cursor(sim, crm: str) -> PageHook:
    """The next-page cursor of a later page points back at an earlier one (each CRM's own form of it)."""
    loop_back = importlib.import_module(f"tests.crm.test_{crm}_hostile").loop_back
    return PageHook(sim, crm, rewrite_body=loop_back).install()


def short_page(sim, crm: str) -> PageHook:
    """The second page silently lacks five of its records (valid shape): the CRM's count says more exist."""

    def rewrite(records: list, n: int) -> None:
        if n == 2 and len(records) > 6:
            del records[:5]

    return PageHook(sim, crm, rewrite=opportunity_pages(crm, rewrite)).install()


def _set(record: dict, key: str, value) -> None:
    """Set a field where this CRM's page carries it (HubSpot under properties, dotted paths nested)."""
    target = record.get("properties") if isinstance(record.get("properties"), dict) else record
    *parents, last = key.split(".")
    for p in parents:
        target = target.setdefault(p, {})
    target[last] = value


def bad_records(sim, crm: str) -> PageHook:
    """Two records of the second page cannot be trusted: a lone surrogate in the name, an unreadable created
    date. They are quarantined; the rest of the sync proceeds and nothing is deleted for them."""
    done = []

    def rewrite(records: list, n: int) -> None:
        if not done and len(records) > 2:  # the first real page (not a one-record discovery probe)
            done.append(n)
            _set(records[0], page_field(crm, "project_name"), "Deal \ud800 broken")
            _set(records[1], page_field(crm, "created_at"), "31/12/2025 25:61")

    return PageHook(sim, crm, rewrite=opportunity_pages(crm, rewrite)).install()


def secrets_in_warehouse(engine, connection: str, crm: str) -> int:
    """Secret forms stored in the runs' error and warning text: any 8-character piece of a credential, or an
    Authorization value that is not masked."""
    from oppsync_pipeline.sandbox.cluster import crm_module

    values = [v for v in crm_module(crm).SANDBOX_CREDENTIALS.values() if isinstance(v, str) and len(v) >= 8]
    with engine.connect() as c:
        stored = " ".join(
            str(v)
            for row in c.execute(
                text(
                    "SELECT error, warnings FROM oppsync.sync_runs WHERE connection = :c UNION ALL "
                    "SELECT error, warnings FROM oppsync.extracts WHERE connection = :c"
                ),
                {"c": connection},
            )
            for v in row
            if v
        )
    found = sum(1 for v in values if any(v[i : i + 8] in stored for i in range(len(v) - 7)))
    return found + len(re.findall(r"(?:Bearer|Basic)\s+(?!\*\*\*)[A-Za-z0-9+/=._-]{8,}", stored))


def salesforce_allocation_spent(sim, connector) -> Callable[[], None]:
    """The real thing rather than an injected fault: the org's daily allocation runs out mid-run."""
    limit = sim.daily_limit
    sim.daily_limit = sim.api_usage + 6
    return lambda: setattr(sim, "daily_limit", limit)


def autotask_threshold_reached(sim, connector) -> Callable[[], None]:
    threshold = sim.threshold
    sim.threshold = len(sim._window) + 6
    return lambda: setattr(sim, "threshold", threshold)


def short_read_timeout(sim, connector) -> Callable[[], None]:
    connector.client.timeout = (2.0, 0.3)
    return lambda: None


CASES = [
    Case(
        "rate_limit_storm",
        rules=lambda crm: [opp_rule("rate_limit", crm, after=2, count=4, seconds=2)],
        outcomes=lambda crm: {"skipped"} if crm == "salesforce" else {"complete"},
    ),
    Case(
        "quota_spent",
        setup=lambda sim, c: (salesforce_allocation_spent if sim.crm == "salesforce" else autotask_threshold_reached)(
            sim, c
        ),
        outcomes=lambda crm: {"skipped", "failed"},
    ),
    Case("server_error_burst", rules=lambda crm: [opp_rule("server_error", crm, after=2, count=3)]),
    Case("slow_responses", rules=lambda crm: [opp_rule("slow", crm, after=1, count=4, seconds=0.15)]),
    Case(
        "read_timeouts",
        rules=lambda crm: [opp_rule("timeout", crm, after=2, count=2, seconds=0.8)],
        setup=short_read_timeout,
    ),
    Case("dropped_connections", rules=lambda crm: [opp_rule("drop", crm, after=2, count=2)]),
    Case("token_expiry_mid_paging", rules=lambda crm: [opp_rule("token_expiry", crm, after=3, count=1)]),
    Case(
        "malformed_page",
        rules=lambda crm: [opp_rule("malformed", crm, after=3, count=1)],
        outcomes=lambda crm: {"failed"},
    ),
    Case(
        "truncated_page",
        rules=lambda crm: [opp_rule("truncated", crm, after=2, count=1)],
        outcomes=lambda crm: {"failed"},
    ),
    Case("duplicates_across_pages", hook=duplicate_across_pages),
    # Fails today on HubSpot, Dynamics, ConnectWise and Autotask: a record reopened after the open set was
    # read is in neither set, so the full run infers a delete (and the next run a restore). Kept red on purpose.
    Case("moves_open_closed_mid_sync", hook=move_between_sets, relaxed_events=True),
    Case("drift_new_field", persistent_hook=add_unknown_field),
    Case("drift_missing_optional_field", persistent_hook=drop_optional_field),
    Case("drift_null_account", drift=null_accounts),
    Case("drift_10k_character_name", drift=huge_names),
    # issue 22: hostile answers
    Case(
        "wrong_shape_page",
        rules=lambda crm: [opp_rule("wrong_shape", crm, after=2, count=1)],
        outcomes=lambda crm: {"failed"},
        must_name=r"page \d+ of \S+: unexpected page shape",
    ),
    Case("null_id", hook=null_ids, outcomes=lambda crm: {"failed"}, must_name=r"page \d+ of .*(Id|id)"),
    Case(
        "looping_cursor",
        hook=looping_cursor,
        outcomes=lambda crm: {"failed"},
        must_name=r"paging loops|pages repeat|more pages",
    ),
    Case("short_page", hook=short_page),
    Case("bad_records_quarantined", hook=bad_records),
    Case(
        "echoed_secrets",
        rules=lambda crm: [opp_rule("echo_headers", crm, after=2, count=1)],
        outcomes=lambda crm: {"failed"},
        leak_scan=secrets_in_warehouse,
    ),
]
# The normal suite: four representative cases (each costs ~10-15 s, mostly DuckDB file opens) to stay
# under a minute; HubSpot's cases wait on its real 5-searches-a-second limit and run in full mode only.
FAST_CASES = {
    ("salesforce", "rate_limit_storm"),
    ("dynamics", "malformed_page"),
    ("connectwise", "token_expiry_mid_paging"),
    ("autotask", "rate_limit_storm"),
    ("salesforce", "wrong_shape_page"),
    ("autotask", "looping_cursor"),
    ("dynamics", "null_id"),
}
CASE_IDS = [
    (crm, case)
    for crm in CRMS
    for case in CASES
    if (FULL or (crm, case.name) in FAST_CASES) and (case.name != "quota_spent" or crm in ("salesforce", "autotask"))
]


def _sync(cfg, conn, engine, run_id: str, sleep, setup=None, sim=None):
    connector = build_connector(cfg, conn, sleep=sleep)
    undo = setup(sim, connector) if setup else None
    try:
        summary = sync_connection(cfg, conn, engine, run_id=run_id, mode="full", connector=connector)
        return summary.extract.status, summary
    except ExtractFailed as err:
        return "failed", err
    finally:
        if undo:
            undo()


def run_case(crm: str, case: Case, tmp_path: Path, row) -> str:
    """Run one cell of the matrix, filling the report row (lost / duplicated events, leaked secrets, unclear
    errors); returns a note, raises AssertionError on failure."""
    sim = build_simulator(crm, seed=11, opportunities=SIZE.get(crm, OPPORTUNITIES))
    with SandboxServer(sim) as server:
        extra = {crm: connection_extra(crm, page_size=PAGE_SIZE)}
        cfg = sandbox_config({crm: server}, f"duckdb:///{tmp_path / 'unused.duckdb'}", tmp_path, extra=extra)
        conn = cfg.connections[0]
        test_wh, ref_wh = (make_engine(f"duckdb:///{tmp_path / n}.duckdb") for n in ("test", "reference"))
        for e in (test_wh, ref_wh):
            ensure_schema(e)
        sleep = client_sleep(crm)

        # 1. state A, both warehouses
        for e, rid in ((test_wh, "t-a"), (ref_wh, "r-a")):
            status, detail = _sync(cfg, conn, e, rid, sleep)
            assert status == "complete", f"baseline sync {rid}: {status} ({detail})"

        # 2. state B
        sim.world.advance(hours=1, rate=0.05)
        if case.drift:
            case.drift(sim.world, crm)
        persistent = case.persistent_hook(sim, crm) if case.persistent_hook else None

        # 3. the faulted run
        before = snapshot(test_wh, conn.name)
        sim.faults.rules = case.rules(crm)
        hook = case.hook(sim, crm) if case.hook else None
        status, detail = _sync(cfg, conn, test_wh, "t-fault", sleep, setup=case.setup, sim=sim)
        fired = sum(r.fired for r in sim.faults.rules)
        sim.faults.rules = []
        if hook:
            hook.remove()
        error = str(detail) if status != "complete" else None
        if status == "skipped":
            error = detail.extract.error
        row.unclear_errors = unclear(error, case.must_name if status == "failed" else None)
        if case.leak_scan:
            row.leaked_secrets = case.leak_scan(test_wh, conn.name, crm)
        assert status in case.outcomes(crm), f"faulted run ended '{status}' ({detail}), expected {case.outcomes(crm)}"
        if case.rules(crm):
            assert fired, "the fault never fired: it did not test anything"
        if hook and not case.rules(crm):
            assert hook.pages, "the page hook never saw a page: it did not test anything"
        if status != "complete":
            assert snapshot(test_wh, conn.name).differences(before) == [], "a stopped run changed the warehouse"
        assert not row.unclear_errors, f"unclear error: {error}"
        assert not row.leaked_secrets, f"{row.leaked_secrets} secret form(s) stored in the warehouse"

        # 4. cleared: run again; 5. reference
        status, detail = _sync(cfg, conn, test_wh, "t-again", sleep)
        assert status == "complete", f"re-run after the fault: {status} ({detail})"
        status, detail = _sync(cfg, conn, ref_wh, "r-b", sleep)
        assert status == "complete", f"reference run: {status} ({detail})"
        if persistent:
            persistent.remove()

        got, want = snapshot(test_wh, conn.name), snapshot(ref_wh, conn.name)
        problems = invariants(test_wh, conn.name)
        lost, extra = want.events - got.events, got.events - want.events
        row.lost_events = sum(lost.values())
        # an extra intermediate stage change seen half-way is an observation; an extra created / deleted /
        # restored (or any extra event where the case allows none) is a duplicate
        row.duplicated_events = sum(
            v for k, v in extra.items() if not case.relaxed_events or k[1] in ("created", "deleted", "restored")
        )
        if case.relaxed_events:
            assert not lost, f"events lost: {list(lost.items())[:5]}"
            assert not row.duplicated_events, f"spurious events: {list(extra.items())[:5]}"
            assert got.current == want.current, got.differences(want)
            note = f"{sum(extra.values())} intermediate events" if extra else ""
        else:
            assert got.differences(want) == [], got.differences(want)
            note = ""
        assert not problems, problems
        waits = sum(sleep.calls)
        return f"{note} waited {waits:.0f}s (recorded)" if waits else note


@pytest.mark.parametrize("crm,case", CASE_IDS, ids=[f"{crm}-{case.name}" for crm, case in CASE_IDS])
def test_fault_case(crm: str, case: Case, tmp_path: Path):
    with reported(case.name, crm) as row:
        row.note = run_case(crm, case, tmp_path, row)
