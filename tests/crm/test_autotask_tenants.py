"""AutotaskConnector against tenant variants of the simulator: discovery, the stage model, optional reads that
are refused, permanent errors, every accepted field override, requests counted (issue 14)."""

from __future__ import annotations

import dataclasses

import pytest
import requests

from oppsync_pipeline.lib.config import OVERRIDABLE_FIELDS, ConfigError, ConnectionConfig, RecordFilter
from oppsync_pipeline.lib.crm.autotask import AutotaskConnector, classify
from oppsync_pipeline.lib.crm.http import CrmError
from oppsync_pipeline.sandbox import autotask as at
from oppsync_pipeline.sandbox.server import SandboxServer

CREDS = dict(at.SANDBOX_CREDENTIALS)


def connector(url: str, **kw) -> AutotaskConnector:
    conn = ConnectionConfig(
        name="at-test", crm="autotask", base_url=url, credentials={k: "${AT_" + k.upper() + "}" for k in CREDS}, **kw
    )
    return AutotaskConnector(conn, dict(CREDS), sleep=lambda s: None)


def fetch(c: AutotaskConnector, since=None) -> dict:
    return {o.source_id: o for open_set in (True, False) for p in c.opportunities(open_set, since) for o in p}


@pytest.fixture(scope="module")
def custom():
    sim = at.build(seed=21, opportunities=300, variant="custom_statuses")
    with SandboxServer(sim) as srv:
        yield sim, srv


@pytest.fixture(scope="module")
def no_rights():
    sim = at.build(seed=22, opportunities=150, variant="no_optional_rights")
    with SandboxServer(sim) as srv:
        yield sim, srv


def test_custom_statuses_labels_values_and_flags(custom):
    sim, srv = custom
    c = connector(srv.url)
    assert {k: (s.label, s.category) for k, s in c.statuses().items()} == {
        "0": ("Nurture", "open"),
        "1": ("Open", "open"),
        "2": ("Lost Deal", "lost"),
        "3": ("Won", "won"),
        "4": ("Implemented", "won"),
        "11": ("Awaiting Budget", "open"),
        "12": ("Cancelled", "lost"),
    }
    assert {k: s.label for k, s in c.stages().items()} == {
        "101": "Discovery",
        "102": "Demo Given",
        "103": "Quote Sent",
        "104": "Closed Won",
        "105": "Closed Lost",
    }
    got = fetch(c)
    w = sim.world
    for o in w.live():
        rec = got[o.native_id]
        assert (rec.stage, rec.stage_id) == (w.sales_stages[o.sales_stage].label, o.sales_stage)
        assert (rec.crm_status, rec.status) == (w.stages[o.stage].label, w.status(o))
    # the tenant leaves deals Open while they sit in the won stage: without a mapping they are open
    won_stage_open = [r for r in got.values() if r.stage == "Closed Won" and r.crm_status == "Open"]
    assert won_stage_open and {r.status for r in won_stage_open} == {"open"}


def test_seed_003_won_stage_while_status_active_counts_as_won(custom):
    sim, srv = custom
    c = connector(srv.url, stage_categories={"Closed Won": "won"})
    got = fetch(c)
    assert set(got) == {o.native_id for o in sim.world.live()}  # the two sets still cover every record
    won_stage = [r for r in got.values() if r.stage == "Closed Won"]
    assert {r.crm_status for r in won_stage} >= {"Open", "Won"} and {r.status for r in won_stage} == {"won"}
    # by status label too, and open_statuses by label moves the set queries
    c = connector(srv.url, open_statuses=["Open", "Awaiting Budget"])
    open_ids = {o.source_id for p in c.opportunities(True, None) for o in p}
    assert open_ids == {o.native_id for o in sim.world.live() if o.stage in ("1", "11")}
    got = fetch(c)
    assert {r.status for r in got.values() if r.crm_status == "Nurture"} == {"lost"}


def test_no_optional_rights_warns_and_falls_back(no_rights):
    sim, srv = no_rights
    c = connector(srv.url)
    got = fetch(c)
    assert set(got) == {o.native_id for o in sim.world.live()}
    truth = at.truth(sim)
    for sid, rec in got.items():
        for f in ("client_name", "service_location", "stage", "stage_id", "crm_status", "status", "owner_crm_id"):
            assert getattr(rec, f) == truth[sid][f], (sid, f)
    assert list(c.users()) == []
    refused = {w.split(":")[0] for w in c.stats.warnings}
    assert refused == {
        "Opportunities/entityInformation/fields",
        "Opportunities/entityInformation/userDefinedFields",
        "ThresholdInformation",
        "Companies",
        "Contacts",
        "Resources",
        "Currencies",
    }
    assert all("HTTP 403" in w for w in c.stats.warnings)
    assert c.stats.quota_limit is None
    # each refused read is asked once per run, not once per page
    before = c.stats.requests
    fetch(c)
    assert c.stats.requests - before <= 4
    caps = {cap.name: cap for cap in c.discover()}
    assert not caps["Companies"].available and "403" in caps["Companies"].detail
    assert caps["opportunities (open set)"].available and caps["opportunities (not-open set)"].available


def test_countries_refused_keeps_the_rest_of_the_address():
    sim = at.build(seed=23, opportunities=60)
    sim.tenant = dataclasses.replace(sim.tenant, refused=frozenset({"countries"}))
    with SandboxServer(sim) as srv:
        c = connector(srv.url)
        got = fetch(c)
        truth = at.truth(sim)
        assert {sid: r.service_location for sid, r in got.items()} == {
            sid: t["service_location"] for sid, t in truth.items()
        }
        assert c.stats.warnings and c.stats.warnings[0].startswith("Countries: HTTP 403")


def test_required_read_refused_fails_fast_naming_the_permission():
    sim = at.build(seed=24, opportunities=30)
    sim.tenant = dataclasses.replace(sim.tenant, refused=frozenset({"opportunities"}))
    with SandboxServer(sim) as srv:
        c = connector(srv.url)
        with pytest.raises(CrmError) as err:
            fetch(c)
        assert (
            c.stats.seconds_waited == 0 and c.stats.retries == 0
        )  # at once: neither retried nor waited (the seconds: benchmarks/fail_fast.py)
        assert err.value.permanent and err.value.status == 403
        assert "CRM > Opportunities" in str(err.value) and "security level" in str(err.value)


def _response(status: int, body: str, url: str) -> requests.Response:
    r = requests.Response()
    r.status_code, r._content, r.url = status, body.encode(), url
    return r


def test_classify_permission_500_as_403_and_query_errors_as_permanent():
    base = "https://webservices5.autotask.net/ATServicesRest/V1.0/"
    err = classify(
        _response(
            500,
            '{"errors":["The logged in Resource does not have the adequate permissions to query this entity type."]}',
            base + "Companies/query",
        )
    )
    assert isinstance(err, CrmError) and err.status == 403 and err.permanent and "Companies" in str(err)
    err = classify(
        _response(
            500, '{"errors":["Unable to find descriptio in the Opportunity entity."]}', base + "Opportunities/query"
        )
    )
    assert err.permanent and err.status == 500 and "`filters`" in str(err)
    err = classify(_response(404, '{"Message":"No HTTP resource was found"}', base + "Opportunitie/query"))
    assert err.permanent and "base_url" in str(err)
    assert classify(_response(503, "", base + "Opportunities/query")) is None  # transient: retried
    assert classify(_response(429, "", base + "Opportunities/query")) is None


def test_configured_fields_missing_in_the_tenant_are_config_errors():
    sim = at.build(seed=25, opportunities=20, variant="udf_fields")
    with SandboxServer(sim) as srv:
        c = connector(
            srv.url,
            fields={"created_at": "udf:Original Create Date", "project_name": "udf:Region"},
            filters=[RecordFilter(field="description", op="equal", value="x")],
        )
        with pytest.raises(ConfigError) as err:
            c.prepare()
        text = str(err.value)
        assert "fields.project_name" in text and "'Region'" in text and "Territory" in text
        assert "filters[0].field" in text and "'description'" in text
        assert "fields.created_at" not in text
        # the udf_fields tenant's own fields work
        c = connector(
            srv.url,
            fields={"client_name": "udf:Deal Source"},
            filters=[RecordFilter(field="udf:Territory", op="equal", value="North")],
        )
        got = fetch(c)
        assert got and {sim._udf(sim.world.get(s), "Territory") for s in got} == {"North"}
        assert {r.client_name for r in got.values()} <= {"Referral", "Web", "Partner: Müller & Söhne"}


def test_every_accepted_field_override_takes_effect():
    sim = at.build(seed=26, opportunities=60)
    with SandboxServer(sim) as srv:
        overrides = {
            "created_at": "udf:Original Create Date",
            "created_by_crm_id": "udf:Original Creator",
            "project_name": "udf:Region",
            "client_name": "title",
            "stage": "status",
            "amount": "cost",
            "close_date": "startDate",
            "probability": "rating",
            "sales_executive": "leadSource",
        }
        assert set(overrides) == set(OVERRIDABLE_FIELDS)
        c = connector(srv.url, fields=overrides)
        assert AutotaskConnector.validate_connection(c.conn) == []
        got = fetch(c)
        assert got
        for rec in got.values():
            raw = rec.raw
            udf = {u["name"]: u["value"] for u in raw["userDefinedFields"]}
            assert rec.project_name == udf["Region"]
            assert rec.client_name == raw["title"]
            assert rec.stage == c.statuses()[str(raw["status"])].label and rec.stage_id == str(raw["status"])
            assert rec.amount == raw["cost"] and rec.probability == raw["rating"]
            assert rec.close_date.isoformat() == raw["startDate"][:10]
            assert rec.sales_executive == str(raw["leadSource"])  # no picklist in this tenant: the value
            assert rec.created_by_crm_id == udf["Original Creator"]
            assert (rec.created_at is None) == (udf["Original Create Date"] is None)
        # the default: `fields: {stage: stage}` is the stage picklist's label
        c = connector(srv.url, fields={"stage": "stage"})
        rec = next(iter(fetch(c).values()))
        assert rec.stage == c.stages()[str(rec.raw["stage"])].label and rec.stage_id == str(rec.raw["stage"])


def test_every_request_counted_zone_lookup_included_no_tokens():
    sim = at.build(seed=27, opportunities=120)
    with SandboxServer(sim) as srv:
        c = connector(srv.url, page_size=50)
        before = sim.request_count
        fetch(c)
        list(c.users())
        assert c.stats.requests == sim.request_count - before
        assert c.stats.token_requests == 0  # Autotask has no tokens; the zone lookup is a plain request
        meta = c.stats.as_metadata()
        assert meta["api_requests"] == c.stats.requests and meta["token_requests"] == 0


def test_discovery_runs_once_per_run():
    sim = at.build(seed=28, opportunities=40)
    with SandboxServer(sim) as srv:
        c = connector(srv.url)
        c.prepare()
        n = c.stats.requests
        c.prepare()
        c.stages()
        c.statuses()
        assert c.stats.requests == n
        caps = {cap.name: cap for cap in c.discover()}
        assert caps["stage picklist"].available and caps["Opportunities/entityInformation/fields"].available


def test_sync_fails_fast_on_a_refused_required_read_and_records_refused_optional_reads(warehouse_url, tmp_path):
    from sqlalchemy import text

    from oppsync_pipeline.lib.sync import ExtractFailed, build_connector, sync_connection
    from oppsync_pipeline.lib.warehouse.engine import make_engine
    from tests.conftest import sandbox_config

    sim = at.build(seed=29, opportunities=40)
    sim.tenant = dataclasses.replace(sim.tenant, refused=frozenset({"opportunities", "thresholdinformation"}))
    with SandboxServer(sim) as srv:
        cfg = sandbox_config({"autotask": srv}, warehouse_url, tmp_path)
        engine = make_engine(cfg.warehouse.url)
        try:
            conn = build_connector(cfg, cfg.connections[0])
            with pytest.raises(ExtractFailed) as err:
                sync_connection(cfg, cfg.connections[0], engine, run_id="at-refused", mode="full", connector=conn)
            assert (
                err.value.permanent and conn.stats.retries == 0 and conn.stats.seconds_waited == 0
            )  # at once: neither retried nor waited (the seconds: benchmarks/fail_fast.py)
            assert "CRM > Opportunities" in str(err.value)
            # the optional read refused on the way is a warning, the required one the error
            sim.tenant = dataclasses.replace(sim.tenant, refused=frozenset({"thresholdinformation"}))
            done = sync_connection(cfg, cfg.connections[0], engine, run_id="at-ok", mode="full")
            assert done.extract.status == "complete"
            with engine.connect() as c:
                row = c.execute(
                    text("SELECT warnings, api_requests, token_requests FROM oppsync.sync_runs WHERE run_id = 'at-ok'")
                ).one()
            assert "ThresholdInformation: HTTP 403" in row.warnings and row.api_requests > 0
            assert row.token_requests == 0
        finally:
            engine.dispose()


def test_company_changes_unreadable_only_loses_renames_until_the_next_full_sync():
    sim = at.build(seed=30, opportunities=80)
    with SandboxServer(sim) as srv:
        since = sim.world.clock.now()
        sim.world.advance(hours=2, rate=0.05)
        ent = sim.entities["companies"]
        ent.fields = {k: v for k, v in ent.fields.items() if k != "lastTrackedModifiedDateTime"}
        c = connector(srv.url)
        got = fetch(c, since=since)
        assert set(got) == {o.native_id for o in sim.world.live() if o.modified_at >= since}
        assert any(w.startswith("Companies changed since the cursor: HTTP 500") for w in c.stats.warnings)
