"""The richer marts (issue 19 item 4) on a small hand-made warehouse, on DuckDB and on Postgres.

Two connections hold amounts in three currencies (EUR and USD in a multi-currency Salesforce org, GBP and USD in
HubSpot; base currency USD), synced through the pipeline code in three runs (full, incremental, full) with a
loss after two stage moves, a win, a deal first seen already lost and a delete. One `dbt build` per backend
(models, contracts, data and unit tests), then every number below was worked out by hand from the records:
  * base-currency sums: marts.outcomes amounts are sums of amount_base, never of mixed raw amounts, and the
    currency column is the base currency (no 'MIXED');
  * expected revenue with the configured default probability (overall and per connection, through dbt_vars);
  * lost at stage from the history;
  * marts.user_outcomes equals the sum of the connection grain;
  * marts.pipeline_snapshots equals the open pipeline at each week's end;
  * marts.accounts holds each account as its latest opportunity shows it, joined from marts.opportunities;
  * marts.opportunity_fields types each connection's extra_fields: per config (a value that is not of the type
    is null), and a change in an extra field alone is an `updated` event;
  * marts.opportunities carries the revenue breakdown (one-time, recurring, cost) and margin = amount - cost.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from datetime import date, datetime
from typing import Any

import pytest
from mart_docs import MARTS, configured_columns, undocumented_and_wrong
from mart_world import BASE_USERS, CONNECTIONS, Dbt, _sync, config, dbt_env
from sqlalchemy.engine import make_url

from oppsync_pipeline.lib.config import parse_config
from oppsync_pipeline.lib.dbt_env import dbt_vars
from oppsync_pipeline.lib.record import Opportunity
from oppsync_pipeline.lib.warehouse import store
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine

R1, R2, R3 = datetime(2026, 3, 2, 6), datetime(2026, 3, 9, 6), datetime(2026, 3, 16, 6)
EUR_1000 = round(1000 / 0.92, 4)  # what the CRM reports as the base amount of EUR 1000 at 0.92 EUR per USD


def _opp(conn: str, sid: str, **v: Any) -> Opportunity:
    return Opportunity(
        connection=conn,
        crm=CONNECTIONS[conn]["crm"],
        source_id=sid,
        project_name=f"Project {sid}",
        client_name=v.get("client"),
        service_location=v.get("address"),
        sales_executive=None,
        owner_crm_id=v["owner"],
        stage=v["stage"],
        status=v["status"],
        amount=v["amount"],
        currency=v["currency"],
        close_date=date(2026, 6, 30),
        probability=v.get("probability"),
        created_at=v["created"],
        created_by_crm_id=v["creator"],
        modified_at=v["modified"],
        raw={"id": sid},
        amount_base=v["amount_base"],
        base_currency="USD",
        account_id=v.get("account"),
        revenue_one_time=v.get("one_time"),
        revenue_recurring=v.get("recurring"),
        cost=v.get("cost"),
        # as the connectors store them (record.extra_fields_json): raw CRM values, keys sorted
        extra_fields=json.dumps(v["extra"], sort_keys=True) if "extra" in v else None,
    )


def _replace(o: Opportunity, **changes: Any) -> Opportunity:
    return dataclasses.replace(o, **changes)


def runs() -> list[dict[str, list[Opportunity]]]:
    """What each run sees per connection (run 2 is incremental: the changed records only)."""
    sf_eur = _opp(
        "sf",
        "sf-eur",
        account="001A",
        client="Acme",
        address="1 Main St, Austin, TX, USA",
        owner="005A",
        creator="005A",
        stage="Qualification",
        status="open",
        probability=20.0,
        amount=1000.0,
        currency="EUR",
        amount_base=EUR_1000,
        created=datetime(2026, 2, 24, 10),
        modified=datetime(2026, 2, 24, 11),
        extra={
            "lead_source": "Web",
            "next_step_date": "2026-04-01",
            "seats": "12",
            "score": "4.5",
            "renewal": True,
            "signed_at": "2026-03-01T10:30:00.250+02:00",
        },
    )
    sf_usd = _opp(
        "sf",
        "sf-usd",
        account="001A",
        client="Acme",
        address="1 Main St, Austin, TX, USA",
        owner="005B",
        creator="005B",
        stage="Prospecting",
        status="open",
        probability=None,
        amount=500.0,
        currency="USD",
        amount_base=500.0,
        created=datetime(2026, 2, 25, 9),
        modified=datetime(2026, 2, 25, 9),
        # none of these reads as its type: null in the mart, on both backends, never a failed build
        extra={
            "next_step_date": "2026-02-30",
            "seats": "12.5",
            "score": "n/a",
            "renewal": "maybe",
            "signed_at": "2026-03-01T25:00:00Z",
        },
    )
    sf_first_lost = _opp(
        "sf",
        "sf-first-lost",
        owner="005A",
        creator="005A",
        stage="Closed Lost",
        status="lost",
        probability=0.0,
        amount=300.0,
        currency="USD",
        amount_base=300.0,
        created=datetime(2026, 2, 10, 9),
        modified=datetime(2026, 2, 15, 9),
    )
    sf_noprob = _opp(
        "sf",
        "sf-noprob",
        account="001B",
        client="Globex",
        owner="005A",
        creator="005A",
        stage="Prospecting",
        status="open",
        probability=None,
        amount=400.0,
        currency="USD",
        amount_base=400.0,
        created=datetime(2026, 3, 4, 9),
        modified=datetime(2026, 3, 4, 9),
        extra={"lead_source": "Partner", "next_step_date": "2026-03-20T00:00:00Z"},
    )
    hs_gbp = _opp(
        "hs",
        "hs-gbp",
        account="9876",
        client="Initech",
        address="5 Side Rd, Leeds, UK",
        owner="101",
        creator="9001",
        stage="appointmentscheduled",
        status="open",
        probability=None,
        amount=790.0,
        currency="GBP",
        amount_base=1000.0,
        created=datetime(2026, 2, 26, 9),
        modified=datetime(2026, 2, 26, 9),
        one_time=190.0,
        recurring=600.0,
        cost=500.0,
        # HubSpot sends every property as a string; a JSON number is typed too
        extra={"lead_source": "Referral", "seats": 3.0, "renewal": "false", "signed_at": "2026-03-01T08:00:00Z"},
    )
    hs_deleted = _opp(
        "hs",
        "hs-deleted",
        account="5555",
        client="Umbrella",
        owner="102",
        creator="9002",
        stage="qualifiedtobuy",
        status="open",
        probability=40.0,
        amount=200.0,
        currency="USD",
        amount_base=200.0,
        created=datetime(2026, 3, 3, 9),
        modified=datetime(2026, 3, 3, 9),
    )
    sf_eur2 = _replace(sf_eur, stage="Proposal", probability=60.0, modified_at=datetime(2026, 3, 6, 9))
    sf_won = _replace(sf_usd, stage="Closed Won", status="won", probability=100.0, modified_at=datetime(2026, 3, 5, 9))
    sf_lost = _replace(
        sf_eur2,
        stage="Closed Lost",
        status="lost",
        probability=0.0,
        modified_at=datetime(2026, 3, 12, 10),
        client_name="Acme Inc",
    )
    # run 3: only an extra field of sf-noprob changes (the lead source): an update like any tracked field
    sf_noprob3 = _replace(sf_noprob, extra_fields=json.dumps({"lead_source": "Web", "next_step_date": "2026-03-20"}))
    return [
        {"sf": [sf_eur, sf_usd, sf_first_lost], "hs": [hs_gbp]},
        {"sf": [sf_eur2, sf_won, sf_noprob], "hs": [hs_deleted]},
        {"sf": [sf_lost, sf_won, sf_first_lost, sf_noprob3], "hs": [hs_gbp]},  # full: hs-deleted is gone
    ]


def fill(url: str) -> None:
    engine = make_engine(url)
    try:
        ensure_schema(engine)
        store.save_directory(engine, config(BASE_USERS), R1)
        for conn, c in CONNECTIONS.items():
            store.save_users(engine, conn, c["users"], R1)
            store.save_stages(engine, conn, c["stages"], {})
        for n, (mode, at) in enumerate([("full", R1), ("incremental", R2), ("full", R3)]):
            for conn, records in runs()[n].items():
                _sync(engine, conn, records, mode=mode, at=at, run_id=f"{conn}-rich{n + 1}")
    finally:
        engine.dispose()


def mart_vars() -> dict[str, Any]:
    """The dbt variables oppsync.yaml gives: a 10% default overall, 25% for the Salesforce connection."""
    cfg = parse_config(
        {
            "mart": {"default_probability": 10},
            "connections": [
                {
                    "name": "sf",
                    "crm": "salesforce",
                    "base_url": "https://x.my.salesforce.com",
                    "default_probability": 25,
                    "extra_fields": {
                        "lead_source": {"field": "LeadSource"},
                        "next_step_date": {"field": "NextStepDate__c", "type": "date"},
                        "seats": {"field": "Seats__c", "type": "integer"},
                        "score": {"field": "Score__c", "type": "number"},
                        "renewal": {"field": "Renewal__c", "type": "boolean"},
                        "signed_at": {"field": "SignedAt__c", "type": "timestamp"},
                    },
                },
                {
                    "name": "hs",
                    "crm": "hubspot",
                    "base_url": "https://api.hubapi.com",
                    "extra_fields": {
                        "lead_source": {"field": "hs_analytics_source", "type": "text"},
                        "seats": {"field": "seats", "type": "integer"},
                        "renewal": {"field": "is_renewal", "type": "boolean"},
                        "signed_at": {"field": "signed_at", "type": "timestamp"},
                    },
                },
            ],
        }
    )
    out = dbt_vars(cfg)
    assert out["default_probability_by_connection"] == {"sf": 25.0} and out["default_probability"] == 10.0
    assert out["extra_fields"] == {  # the union over connections, in configuration order
        "lead_source": "text",
        "next_step_date": "date",
        "seats": "integer",
        "score": "number",
        "renewal": "boolean",
        "signed_at": "timestamp",
    }
    return out


def rows(dbt: Dbt, sql: str) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in dbt.query(sql)]


def check(dbt: Dbt) -> None:
    fill(dbt.url)
    models = ("+opportunities", "+outcomes", "+user_outcomes", "+pipeline_snapshots", "+accounts")
    models += ("+opportunity_fields", "+opportunity_events")
    dbt("build", "--select", *models, vars=mart_vars())
    opps = {o["source_id"]: o for o in rows(dbt, "select * from marts.opportunities")}
    outcomes = rows(dbt, "select * from marts.outcomes")

    # -- amounts in the base currency ------------------------------------------------------------------------
    assert {o["base_currency"] for o in opps.values()} == {"USD"}
    assert opps["sf-eur"]["amount"] == 1000 and opps["sf-eur"]["amount_base"] == pytest.approx(EUR_1000)
    assert {r["currency"] for r in outcomes} == {"USD"}  # never 'MIXED'
    created = defaultdict(float)
    for r in outcomes:
        if r["period_grain"] == "month":
            created[r["connection"]] += r["amount_created"]
    # sf: EUR 1000 (1086.9565 USD) + 500 + 300 + 400; hs: GBP 790 (1000 USD), the deleted deal left out
    assert created["sf"] == pytest.approx(EUR_1000 + 1200)
    assert created["hs"] == pytest.approx(1000)
    week = {(r["period_start"], r["connection"], r["user_id"]): r for r in outcomes if r["period_grain"] == "week"}
    assert week[(date(2026, 3, 9), "sf", "alice")]["amount_lost"] == pytest.approx(EUR_1000)

    # -- expected revenue, the default probability where the CRM has none -----------------------------------
    expected = {  # source_id: (expected_probability, is_default, expected_revenue, expected_revenue_base)
        "sf-eur": (0.0, False, 0.0, 0.0),
        "sf-usd": (100.0, False, 500.0, 500.0),
        "sf-noprob": (25.0, True, 100.0, 100.0),  # the connection's default
        "hs-gbp": (10.0, True, 79.0, 100.0),  # the overall default, in GBP and in USD
        "hs-deleted": (40.0, False, 80.0, 80.0),
    }
    for sid, (prob, is_default, revenue, revenue_base) in expected.items():
        o = opps[sid]
        got = (
            o["expected_probability"],
            o["probability_is_default"],
            o["expected_revenue"],
            o["expected_revenue_base"],
        )
        assert got == pytest.approx((prob, is_default, revenue, revenue_base)), sid

    # -- lost at stage -------------------------------------------------------------------------------------
    assert (opps["sf-eur"]["lost_at_stage"], opps["sf-eur"]["lost_at_stage_id"]) == ("Proposal", "Proposal")
    assert opps["sf-first-lost"]["lost_at_stage"] is None  # never seen open, its stage is a closed one
    assert opps["sf-noprob"]["lost_at_stage"] is None  # open

    # -- per-user rollup = the sum of the connection grain ---------------------------------------------------
    metrics = ("opportunities_created", "amount_created", "opportunities_won", "amount_won")
    metrics += ("opportunities_lost", "amount_lost", "opportunities_created_qualified")
    summed: dict[tuple, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in outcomes:
        key = (r["period_grain"], r["period_start"], r["user_id"], r["currency"])
        for m in metrics:
            summed[key][m] += r[m]
        summed[key]["connections"] += 1
    users = {
        (r["period_grain"], r["period_start"], r["user_id"], r["currency"]): r
        for r in rows(dbt, "select * from marts.user_outcomes")
    }
    assert set(users) == set(summed)
    for key, want in summed.items():
        assert {m: users[key][m] for m in want} == pytest.approx(dict(want)), key
    alice = users[("week", date(2026, 2, 23), "alice", "USD")]  # sf-eur and hs-gbp, one per connection
    assert (alice["connections"], alice["opportunities_created"]) == (2, 2)
    assert alice["amount_created"] == pytest.approx(EUR_1000 + 1000)

    # -- open pipeline at each week's end (versions dated by the syncs that saw them) -----------------------
    snaps = rows(dbt, "select * from marts.pipeline_snapshots where period_grain = 'week'")
    got = {
        (r["period_start"], r["connection"], r["owner_user_id"]): (r["open_opportunities"], r["open_amount"])
        for r in snaps
    }
    want = {
        # Sunday 03-01 24:00: sf-eur (alice), sf-usd (bob), hs-gbp (alice)
        (date(2026, 2, 23), "sf", "alice"): (1, EUR_1000),
        (date(2026, 2, 23), "sf", "bob"): (1, 500.0),
        (date(2026, 2, 23), "hs", "alice"): (1, 1000.0),
        # 03-08 24:00: sf-usd's win was first seen by run 2 (03-09 06:00), so it is still open then
        (date(2026, 3, 2), "sf", "alice"): (2, EUR_1000 + 400),
        (date(2026, 3, 2), "sf", "bob"): (1, 500.0),
        (date(2026, 3, 2), "hs", "alice"): (1, 1000.0),
        (date(2026, 3, 2), "hs", "bob"): (1, 200.0),
        # 03-15 24:00: sf-eur's loss and hs-deleted's delete were seen by run 3 (03-16 06:00)
        (date(2026, 3, 9), "sf", "alice"): (2, EUR_1000 + 400),
        (date(2026, 3, 9), "hs", "alice"): (1, 1000.0),
        (date(2026, 3, 9), "hs", "bob"): (1, 200.0),
    }
    assert set(got) == set(want)
    for key, (n, amount) in want.items():
        assert got[key][0] == n and got[key][1] == pytest.approx(amount), key
    assert {r["currency"] for r in snaps} == {"USD"}

    # -- accounts, joined from marts.opportunities by account id -------------------------------------------
    accounts = {(r["connection"], r["account_id"]): r for r in rows(dbt, "select * from marts.accounts")}
    got = {
        k: (r["account_name"], r["address"], r["opportunities"], r["open_opportunities"]) for k, r in accounts.items()
    }
    assert got == {
        ("sf", "001A"): ("Acme Inc", "1 Main St, Austin, TX, USA", 2, 0),  # as the latest edit (the loss) shows it
        ("sf", "001B"): ("Globex", None, 1, 1),
        ("hs", "9876"): ("Initech", "5 Side Rd, Leeds, UK", 1, 1),
        ("hs", "5555"): ("Umbrella", None, 0, 0),  # known from a deleted opportunity only
    }
    joined = rows(
        dbt,
        "select o.source_id, a.account_name from marts.opportunities o "
        "left join marts.accounts a on o.connection = a.connection and o.account_id = a.account_id",
    )
    assert {r["source_id"]: r["account_name"] for r in joined} == {
        "sf-eur": "Acme Inc",
        "sf-usd": "Acme Inc",
        "sf-first-lost": None,  # no account
        "sf-noprob": "Globex",
        "hs-gbp": "Initech",
        "hs-deleted": "Umbrella",
    }

    # -- revenue breakdown and margin (null where the CRM keeps none) ---------------------------------------
    parts = ("revenue_one_time", "revenue_recurring", "cost", "margin")
    assert {p: opps["hs-gbp"][p] for p in parts} == pytest.approx(
        {"revenue_one_time": 190.0, "revenue_recurring": 600.0, "cost": 500.0, "margin": 290.0}
    )
    assert all(opps["sf-eur"][p] is None for p in parts)

    # -- extra fields, typed per config; a value that is not of the type is null ----------------------------
    fields = {r["source_id"]: r for r in rows(dbt, "select * from marts.opportunity_fields")}
    assert set(fields) == set(opps)
    extra = ("lead_source", "next_step_date", "seats", "score", "renewal", "signed_at")
    got = {sid: tuple(r[c] for c in extra) for sid, r in fields.items()}
    assert got == {
        # +02:00 in UTC, to the millisecond
        "sf-eur": ("Web", date(2026, 4, 1), 12, 4.5, True, datetime(2026, 3, 1, 8, 30, 0, 250000)),
        "sf-usd": (None, None, None, None, None, None),  # 30 February, 12.5 seats, 'n/a', 'maybe', hour 25
        "sf-first-lost": (None,) * 6,  # no extra fields stored
        "sf-noprob": ("Web", date(2026, 3, 20), None, None, None, None),  # the date of a date-time
        "hs-gbp": ("Referral", None, 3, None, False, datetime(2026, 3, 1, 8)),
        "hs-deleted": (None,) * 6,
    }
    assert fields["hs-deleted"]["is_deleted"] and not fields["hs-gbp"]["is_deleted"]
    assert {r["crm"] for r in fields.values()} == {"salesforce", "hubspot"}
    # a change in an extra field alone is an update (extra_fields is tracked: part of the row hash)
    updates = rows(
        dbt,
        "select event_type, changed_fields from marts.opportunity_events "
        "where source_id = 'sf-noprob' and event_type = 'updated'",
    )
    assert len(updates) == 1 and "extra_fields" in updates[0]["changed_fields"], updates


def test_mart_docs_accept_only_the_configured_columns_of_opportunity_fields() -> None:
    """marts.opportunity_fields' configured columns have no YAML description (the configuration names them);
    the docs check accepts exactly those, and still refuses any other undescribed column."""
    node = {"description": "d", "columns": {"connection": {"description": "c"}}}
    models = dict.fromkeys((*MARTS, "opportunity_fields"), node)
    built = [(m, "connection", "c", "d") for m in models]
    built += [("opportunity_fields", "seats", None, "d"), ("opportunity_fields", "stray", None, "d")]
    built += [("opportunities", "seats", None, "d")]
    undocumented, _ = undocumented_and_wrong(models, built, configured_columns(mart_vars()))
    assert undocumented == ["opportunity_fields.stray", "opportunities.seats"]


def test_rich_marts_duckdb(duckdb_rich: Dbt) -> None:
    check(duckdb_rich)


@pytest.mark.postgres
def test_rich_marts_postgres(postgres_rich: Dbt) -> None:
    check(postgres_rich)


@pytest.fixture
def duckdb_rich(tmp_path) -> Dbt:
    path = tmp_path / "warehouse.duckdb"
    return Dbt("duckdb", dbt_env(tmp_path, OPPSYNC_DUCKDB_PATH=str(path)), f"duckdb:///{path}")


@pytest.fixture
def postgres_rich(pg_url: str, tmp_path) -> Dbt:
    u = make_url(pg_url)
    env = dbt_env(
        tmp_path,
        OPPSYNC_PG_HOST=u.host or "127.0.0.1",
        OPPSYNC_PG_PORT=str(u.port or 5432),
        OPPSYNC_PG_USER=u.username or "postgres",
        OPPSYNC_PG_PASSWORD=u.password or "",
        OPPSYNC_PG_DBNAME=u.database,
    )
    return Dbt("postgres", env, pg_url)
