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

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from oppsync_pipeline.lib.sync import ExtractFailed, build_connector, sync_connection
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine
from oppsync_pipeline.sandbox.cluster import CRMS, build_simulator
from oppsync_pipeline.sandbox.server import FaultRule, SandboxServer
from tests.conftest import sandbox_config
from tests.reliability.harness import FULL, OPPORTUNITY_PAGES, PageHook, client_sleep, invariants, snapshot

SIZE = {"connectwise": 200}          # ConnectWise pays one forecast request per opportunity
OPPORTUNITIES = 300
PAGE_SIZE = 40                       # 300 opportunities -> several pages per set: faults land mid-paging
EXTRA = {"hubspot": {"options": {"search_requests_per_second": 0}}}
# A field each CRM's page carries that the mapping treats as optional (the "missing optional field" drift).
OPTIONAL_KEY = {"salesforce": "Amount", "hubspot": "amount", "dynamics": "estimatedvalue",
                "connectwise": "expectedCloseDate", "autotask": "amount"}

RESULTS: dict[tuple[str, str], tuple[bool, str]] = {}


@dataclass
class Case:
    name: str
    rules: Callable[[str], list[FaultRule]] = lambda crm: []
    outcomes: Callable[[str], set[str]] = lambda crm: {"complete"}
    drift: Callable[[object, str], None] | None = None          # applied to the world at state B
    hook: Callable[[object, str], PageHook] | None = None       # page hook during T's faulted run only
    persistent_hook: Callable[[object, str], PageHook] | None = None  # part of the CRM's state B (all runs)
    setup: Callable[[object, object], Callable[[], None]] | None = None  # (sim, connector) -> undo
    relaxed_events: bool = False
    notes: list[str] = field(default_factory=list)


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
    key = OPTIONAL_KEY[crm]

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
    Case("rate_limit_storm", rules=lambda crm: [opp_rule("rate_limit", crm, after=2, count=4, seconds=2)],
         outcomes=lambda crm: {"skipped"} if crm == "salesforce" else {"complete"}),
    Case("quota_spent", setup=lambda sim, c: (salesforce_allocation_spent if sim.crm == "salesforce"
                                              else autotask_threshold_reached)(sim, c),
         outcomes=lambda crm: {"skipped", "failed"}),
    Case("server_error_burst", rules=lambda crm: [opp_rule("server_error", crm, after=2, count=3)]),
    Case("slow_responses", rules=lambda crm: [opp_rule("slow", crm, after=1, count=4, seconds=0.15)]),
    Case("read_timeouts", rules=lambda crm: [opp_rule("timeout", crm, after=2, count=2, seconds=0.8)],
         setup=short_read_timeout),
    Case("dropped_connections", rules=lambda crm: [opp_rule("drop", crm, after=2, count=2)]),
    Case("token_expiry_mid_paging", rules=lambda crm: [opp_rule("token_expiry", crm, after=3, count=1)]),
    Case("malformed_page", rules=lambda crm: [opp_rule("malformed", crm, after=3, count=1)],
         outcomes=lambda crm: {"failed"}),
    Case("truncated_page", rules=lambda crm: [opp_rule("truncated", crm, after=2, count=1)],
         outcomes=lambda crm: {"failed"}),
    Case("duplicates_across_pages", hook=duplicate_across_pages),
    # Fails today on HubSpot, Dynamics, ConnectWise and Autotask: a record reopened after the open set was
    # read is in neither set, so the full run infers a delete (and the next run a restore). Kept red on purpose.
    Case("moves_open_closed_mid_sync", hook=move_between_sets, relaxed_events=True),
    Case("drift_new_field", persistent_hook=add_unknown_field),
    Case("drift_missing_optional_field", persistent_hook=drop_optional_field),
    Case("drift_null_account", drift=null_accounts),
    Case("drift_10k_character_name", drift=huge_names),
]
# The normal suite: four representative cases (each costs ~10-15 s, mostly DuckDB file opens) to stay
# under a minute; HubSpot's cases wait on its real 5-searches-a-second limit and run in full mode only.
FAST_CASES = {("salesforce", "rate_limit_storm"), ("dynamics", "malformed_page"),
              ("connectwise", "token_expiry_mid_paging"), ("autotask", "rate_limit_storm")}
CASE_IDS = [(crm, case) for crm in CRMS for case in CASES
            if (FULL or (crm, case.name) in FAST_CASES)
            and (case.name != "quota_spent" or crm in ("salesforce", "autotask"))]


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


def run_case(crm: str, case: Case, tmp_path: Path) -> str:
    """Run one cell of the matrix; returns a note for the table, raises AssertionError on failure."""
    sim = build_simulator(crm, seed=11, opportunities=SIZE.get(crm, OPPORTUNITIES))
    with SandboxServer(sim) as server:
        extra = {crm: {"page_size": PAGE_SIZE, **EXTRA.get(crm, {})}}
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
        assert status in case.outcomes(crm), f"faulted run ended '{status}' ({detail}), expected {case.outcomes(crm)}"
        if case.rules(crm):
            assert fired, "the fault never fired: it did not test anything"
        if status != "complete":
            assert snapshot(test_wh, conn.name).differences(before) == [], "a stopped run changed the warehouse"
        if isinstance(detail, ExtractFailed):
            assert "Traceback" not in str(detail)

        # 4. cleared: run again; 5. reference
        status, detail = _sync(cfg, conn, test_wh, "t-again", sleep)
        assert status == "complete", f"re-run after the fault: {status} ({detail})"
        status, detail = _sync(cfg, conn, ref_wh, "r-b", sleep)
        assert status == "complete", f"reference run: {status} ({detail})"
        if persistent:
            persistent.remove()

        got, want = snapshot(test_wh, conn.name), snapshot(ref_wh, conn.name)
        problems = invariants(test_wh, conn.name)
        if case.relaxed_events:
            lost = want.events - got.events
            extra = got.events - want.events
            bad_extra = {k: v for k, v in extra.items() if k[1] in ("created", "deleted", "restored")}
            assert not lost, f"events lost: {list(lost.items())[:5]}"
            assert not bad_extra, f"spurious events: {list(bad_extra.items())[:5]}"
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
    t0 = time.monotonic()
    try:
        note = run_case(crm, case, tmp_path)
    except AssertionError as err:
        RESULTS[(crm, case.name)] = (False, str(err).splitlines()[0][:160])
        raise
    RESULTS[(crm, case.name)] = (True, f"{time.monotonic() - t0:.1f}s {note}".strip())


def test_fault_matrix_summary(capsys: pytest.CaptureFixture):
    """Print the CRM x fault table (visible with -s, as `make reliability` runs it) and fail on any failure."""
    if not RESULTS:
        pytest.skip("no fault case ran in this process (selected out, or run by another xdist worker)")
    names = [c.name for c in CASES if any(k[1] == c.name for k in RESULTS)]
    crms = [c for c in CRMS if any(k[0] == c for k in RESULTS)]
    width = max(len(n) for n in names) + 2
    lines = ["", "fault matrix (CRM x fault)", " " * width + "".join(f"{c:<13}" for c in crms)]
    for n in names:
        cells = []
        for c in crms:
            r = RESULTS.get((c, n))
            cells.append(f"{'-' if r is None else ('passed' if r[0] else 'FAILED'):<13}")
        lines.append(f"{n:<{width}}" + "".join(cells))
    failed = {k: v for k, v in RESULTS.items() if not v[0]}
    for (c, n), (_, why) in failed.items():
        lines.append(f"  FAILED {c} / {n}: {why}")
    lines.append(f"{len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    with capsys.disabled():
        print("\n".join(lines))
    assert not failed, f"{len(failed)} fault case(s) failed: {sorted(failed)}"
