"""The dbt project end to end, on DuckDB and on Postgres.

A warehouse is filled through the pipeline code (conftest.fill_warehouse), `dbt build` runs (models,
contracts, data tests, unit tests), and the marts are checked against what was synced:
  * per grain, connection and user, outcomes sums equal counts from marts.opportunities, and per period
    they equal periods computed here in Python with zoneinfo (an independent time-zone implementation);
  * won / lost agree with the latest closed_* event in marts.opportunity_events (type and user);
  * first linked user wins, alt ids, the unmapped bucket, owner at close, deleted rows, unknown stages;
  * the automated build after a sync (`dbt run` of the per-opportunity models, no tests: defs/mart/assets.py
    dbt_command, what mart_follows_syncs runs) leaves the mart exactly as a full `dbt build` leaves it. The
    change between the builds is one a sync makes through the pipeline code: a CRM user linked to an internal
    user after the fact, which re-credits past opportunities and events (attribution is computed at read time,
    so any row can change: why marts.opportunities stays a full table rebuild, not an incremental model);
  * after that link and a dbt re-run with reporting_timezone Europe/Berlin: retroactive attribution
    and the 2026-03-01 23:30 UTC deal on Monday 2026-03-02.
Four dbt invocations per backend (each costs seconds), on one filled warehouse.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from mart_docs import check_docs_catalog, check_mart_docs
from mart_world import CONNECTIONS, Dbt, World, link_erin

from oppsync_pipeline.defs.mart.assets import AGGREGATES

CREDIT = {  # CRM id -> internal user the mart must credit (first linked wins; HubSpot alt ids)
    "sf": {"005A": "alice", "005B": "bob", "005Z": "unmapped"},
    "hs": {"9001": "alice", "101": "alice", "9002": "bob", "102": "bob", "9999": "unmapped"},
}
GRAINS = ("day", "week", "month")
MARTS = ("marts.opportunities", "marts.opportunity_events")


def period_start(grain: str, ts: datetime, tz: str) -> date:
    local = ts.replace(tzinfo=ZoneInfo("UTC")).astimezone(ZoneInfo(tz)).date()
    if grain == "day":
        return local
    if grain == "week":
        return local - timedelta(days=local.weekday())
    return local.replace(day=1)


def rows(dbt: Dbt, sql: str) -> list[dict]:
    return [dict(r._mapping) for r in dbt.query(sql)]


def check_mart(dbt: Dbt, world: World, tz: str, credit: dict[str, dict[str, str]]) -> dict[str, list[dict]]:
    opps = rows(dbt, "select * from marts.opportunities")
    outcomes = rows(dbt, "select * from marts.outcomes")
    events = rows(dbt, "select * from marts.opportunity_events")
    by_id = {(o["connection"], o["source_id"]): o for o in opps}

    # every synced opportunity is there once; deleted ones flagged, not dropped
    assert set(by_id) == {(c, k) for c, recs in world.opps.items() for k in recs}
    assert {k for k, o in by_id.items() if o["is_deleted"]} == world.deleted
    live = [o for o in opps if not o["is_deleted"]]

    # users credited as configured (independent of the SQL): creators, and owners at close
    for o in opps:
        rec = world.opps[o["connection"]][o["source_id"]]
        assert o["created_by_user_id"] == credit[o["connection"]][rec.created_by_crm_id], o
        if not o["is_deleted"]:  # a deleted row keeps the state it had when last seen
            assert o["owner_user_id"] == credit[o["connection"]][rec.owner_crm_id], o
            assert o["stage_category"] == rec.status, o

    # outcomes == marts.opportunities, for every grain, per connection and user, and per period
    expected: dict[tuple, Counter] = defaultdict(Counter)
    for o in live:
        for grain in GRAINS:
            key = (grain, period_start(grain, o["created_at"], tz), o["connection"], o["created_by_user_id"])
            expected[key]["opportunities_created"] += 1
            expected[key]["amount_created"] += o["amount"] or 0
            expected[key]["opportunities_created_qualified"] += int(o["is_qualified"])
            if o["stage_category"] in ("won", "lost"):
                key = (grain, period_start(grain, o["closed_at"], tz), o["connection"], o["owner_at_close_user_id"])
                expected[key][f"opportunities_{o['stage_category']}"] += 1
                expected[key][f"amount_{o['stage_category']}"] += o["amount"] or 0
    metrics = [
        "opportunities_created",
        "amount_created",
        "opportunities_won",
        "amount_won",
        "opportunities_lost",
        "amount_lost",
        "opportunities_created_qualified",
    ]
    actual = {}
    for r in outcomes:
        key = (r["period_grain"], r["period_start"], r["connection"], r["user_id"])
        assert key not in actual, f"duplicate outcomes row {key}"
        actual[key] = r
        if any(r[m] for m in metrics):
            assert key in expected, f"unexpected activity {key}: {r}"
        closed = r["opportunities_won"] + r["opportunities_lost"]
        assert (r["win_rate"] is None) == (closed == 0)
        if closed:
            assert r["win_rate"] == pytest.approx(r["opportunities_won"] / closed)
    for key, counts in expected.items():
        assert key in actual, f"missing outcomes row {key}"
        for m in metrics:
            assert actual[key][m] == pytest.approx(counts[m]), (key, m)
    for grain in GRAINS:
        grain_rows = [r for r in outcomes if r["period_grain"] == grain]
        assert sum(r["opportunities_created"] for r in grain_rows) == len(live)
        assert sum(r["amount_created"] for r in grain_rows) == pytest.approx(sum(o["amount"] or 0 for o in live))
        for cat in ("won", "lost"):
            assert sum(r[f"opportunities_{cat}"] for r in grain_rows) == sum(o["stage_category"] == cat for o in live)
        if grain == "week":
            assert {r["period_start"].weekday() for r in grain_rows} == {0}  # weeks start Monday
        if grain == "month":
            assert {r["period_start"].day for r in grain_rows} == {1}

    # won / lost agree with the latest close event of each live opportunity (its type and its user)
    latest: dict[tuple, dict] = {}
    for e in sorted(events, key=lambda e: (e["recorded_at"], e["occurred_at"] or datetime.min, e["event_id"])):
        if e["event_type"] in ("closed_won", "closed_lost"):
            latest[(e["connection"], e["source_id"])] = e
    for cat in ("won", "lost"):
        from_events = [
            k for k, e in latest.items() if e["event_type"] == f"closed_{cat}" and not by_id[k]["is_deleted"]
        ]
        assert len(from_events) == sum(o["stage_category"] == cat for o in live)
    for k, e in latest.items():
        assert by_id[k]["owner_at_close_user_id"] == e["user_id"]
    created_events = {(e["connection"], e["source_id"]): e for e in events if e["event_type"] == "created"}
    assert all(created_events[k]["user_id"] == by_id[k]["created_by_user_id"] for k in by_id)

    # one unmapped bucket per connection at most, named Unmapped
    unmapped = {(r["connection"], r["user_id"], r["user_name"]) for r in outcomes if r["user_id"] == "unmapped"}
    assert unmapped <= {(c, "unmapped", "Unmapped") for c in CONNECTIONS}
    return {"opportunities": opps, "outcomes": outcomes, "events": events}


def snapshot(dbt: Dbt) -> dict[str, list[tuple]]:
    return {t: sorted(tuple(str(v) for v in r) for r in dbt.query(f"select * from {t}")) for t in MARTS}


def check_fast_path(dbt: Dbt) -> None:
    """On a built mart (a deployment's earlier builds): Erin's link, then what mart_follows_syncs' run executes
    after the sync, then a full `dbt build`: the same rows."""
    before = snapshot(dbt)
    link_erin(dbt.url)
    dbt("run", "--exclude", *sorted(AGGREGATES))  # what mart_follows_syncs' run executes after the sync
    fast = snapshot(dbt)
    assert fast != before, "the change did not reach the mart"
    dbt("build")
    assert fast == snapshot(dbt)


def check_scenario(dbt: Dbt, world: World) -> None:
    dbt("build")
    utc = check_mart(dbt, world, "UTC", CREDIT)
    opps = {(o["connection"], o["source_id"]): o for o in utc["opportunities"]}

    # first linked user wins: Carol linked 005A after Alice and is never credited
    assert not [r for r in utc["outcomes"] if r["user_id"] == "carol"]
    # HubSpot creators reference user ids, owners owner ids: both reach Alice / Bob through alt ids
    assert (
        opps[("hs", next(k for k, o in world.opps["hs"].items() if o.created_by_crm_id == "9001"))][
            "created_by_user_id"
        ]
        == "alice"
    )
    # unmapped creators (005Z before Erin's link, HubSpot 9999) are kept in the unmapped bucket
    for conn in ("sf", "hs"):
        n = sum(
            1
            for o in utc["opportunities"]
            if o["connection"] == conn and not o["is_deleted"] and o["created_by_user_id"] == "unmapped"
        )
        assert n > 0
        assert (
            sum(
                r["opportunities_created"]
                for r in utc["outcomes"]
                if r["connection"] == conn and r["period_grain"] == "month" and r["user_id"] == "unmapped"
            )
            == n
        )
    # won under Alice, handed to Bob afterwards: the win stays Alice's
    handover = opps[("sf", "sf-handover")]
    assert (handover["owner_user_id"], handover["owner_at_close_user_id"], handover["stage_category"]) == (
        "bob",
        "alice",
        "won",
    )
    # an unknown stage keeps its status category and is flagged
    unknown = opps[("sf", world.facts["unknown_stage_id"])]
    assert (unknown["stage_known"], unknown["stage_category"]) == (False, "open")
    # time-zone boundary in UTC: Sunday 2026-03-01, week of Monday 2026-02-23
    utc_rows = {(r["period_grain"], r["period_start"], r["connection"], r["user_id"]): r for r in utc["outcomes"]}
    assert utc_rows[("day", date(2026, 3, 1), "sf", "bob")]["opportunities_created"] >= 1

    # a link added later, as a sync stores it: the fast path after a sync equals a full build
    check_fast_path(dbt)

    # + Berlin reporting time: re-run dbt (models only)
    dbt("run", vars={"reporting_timezone": "Europe/Berlin"})
    credit = {**CREDIT, "sf": {**CREDIT["sf"], "005Z": "erin"}}
    berlin = check_mart(dbt, world, "Europe/Berlin", credit)
    opps = {(o["connection"], o["source_id"]): o for o in berlin["opportunities"]}
    by_zed = [
        o
        for o in world.opps["sf"].values()
        if o.created_by_crm_id == "005Z" and ("sf", o.source_id) not in world.deleted
    ]
    assert by_zed and all(opps[("sf", o.source_id)]["created_by_user_id"] == "erin" for o in by_zed)
    assert sum(
        r["opportunities_created"]
        for r in berlin["outcomes"]
        if r["user_id"] == "erin" and r["period_grain"] == "month"
    ) == len(by_zed)
    assert not [r for r in berlin["outcomes"] if r["connection"] == "sf" and r["user_id"] == "unmapped"]
    tz_deal = opps[("sf", "sf-tz")]
    assert tz_deal["created_at"] == datetime(2026, 3, 1, 23, 30)
    assert tz_deal["created_at_local"] == datetime(2026, 3, 2, 0, 30)
    berlin_rows = {(r["period_grain"], r["period_start"], r["connection"], r["user_id"]): r for r in berlin["outcomes"]}
    bob_created_local = Counter(
        o["created_at_local"].date()
        for o in berlin["opportunities"]
        if o["connection"] == "sf" and o["created_by_user_id"] == "bob" and not o["is_deleted"]
    )
    assert (
        berlin_rows[("day", date(2026, 3, 2), "sf", "bob")]["opportunities_created"]
        == bob_created_local[date(2026, 3, 2)]
        >= 1
    )
    assert berlin_rows[("week", date(2026, 3, 2), "sf", "bob")]["opportunities_created"] >= 1


@pytest.mark.slow
def test_mart_duckdb(duckdb_dbt: tuple[Dbt, World]) -> None:
    check_scenario(*duckdb_dbt)
    # the same build, as a BI tool sees it: every mart column described, in comments and in dbt docs
    check_mart_docs(duckdb_dbt[0])
    check_docs_catalog(duckdb_dbt[0], vars={"reporting_timezone": "Europe/Berlin"})


@pytest.mark.slow
@pytest.mark.postgres
def test_mart_postgres(postgres_dbt: tuple[Dbt, World]) -> None:
    check_scenario(*postgres_dbt)
    check_mart_docs(postgres_dbt[0])  # col_description() of every mart column is its YAML description
