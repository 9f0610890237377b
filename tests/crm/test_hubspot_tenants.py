"""The HubSpot connector against the tenants HubSpot users really have: an app without the optional scopes,
custom deal properties pointed at by `fields:`, relabelled stages, status rules on stage names, and the
errors that must stop a run at once with the fix in the message."""

from __future__ import annotations

import pytest
import requests

from oppsync_pipeline.lib.config import RecordFilter
from oppsync_pipeline.lib.crm.http import CrmError
from oppsync_pipeline.sandbox import hubspot as sim
from oppsync_pipeline.sandbox.server import SandboxServer
from tests.crm.test_hubspot_connector import NO_LIMITS, OAUTH, make, sync


def serve(variant: str, n: int = 300, seed: int = 11) -> SandboxServer:
    return SandboxServer(sim.build(seed=seed, opportunities=n, limits=NO_LIMITS, variant=variant))


# -- an app granted crm.objects.deals.read only ------------------------------------------------------------------------


def test_no_optional_rights_syncs_with_warnings_and_the_documented_fallbacks():
    with serve("no_optional_rights") as srv:
        world = srv.simulator.world
        connector = make(srv.url)
        got = sync(connector)
        assert set(got) == {o.native_id for o in world.live()}
        for sid, opp in got.items():
            w = world.opps[sid]
            assert opp.stage == w.stage and opp.stage_id == w.stage and opp.crm_status == w.stage  # no labels
            assert opp.status == world.status(w)  # from hs_is_closed / hs_is_closed_won
            assert opp.client_name is None and opp.service_location is None
            assert opp.sales_executive is None
            assert opp.owner_crm_id == world.users[w.owner].native_id  # ids are deal properties: kept
            assert opp.created_by_crm_id == world.users[w.creator].alt_id
        warnings = "\n".join(connector.stats.warnings)
        for what in ("deal properties", "deal pipelines", "owners", "companies"):
            assert what in warnings, warnings
        assert "HTTP 403" in warnings and list(connector.users()) == []
        caps = {c.name: c for c in connector.discover()}
        assert not caps["owners (scope crm.objects.owners.read)"].available
        assert caps["opportunities (open set)"].available and caps["opportunities (not-open set)"].available


def test_missing_scope_message_names_the_scope():
    with serve("no_optional_rights", n=20) as srv:
        connector = make(srv.url)
        with pytest.raises(CrmError) as err:
            connector.client.get_json("/crm/v3/owners")
        assert err.value.permanent and err.value.status == 403 and err.value.code == "MISSING_SCOPES"
        assert "crm.objects.owners.read" in str(err.value) and "Private apps" in str(err.value)
        raw = requests.get(
            srv.url + "/crm/v3/pipelines/deals",
            timeout=10,
            headers={"Authorization": f"Bearer {sim.PRIVATE_APP_TOKEN}"},
        )
        body = raw.json()  # HubSpot's error shape
        assert raw.status_code == 403 and body["status"] == "error" and body["category"] == "MISSING_SCOPES"
        assert body["correlationId"] and body["links"]["scopes"].startswith("https://developers.hubspot.com")
        assert body["errors"][0]["context"]["requiredGranularScopes"]
        deals = requests.post(
            srv.url + "/crm/v3/objects/deals/search",
            json={"limit": 1},
            timeout=10,
            headers={"Authorization": f"Bearer {sim.PRIVATE_APP_TOKEN}"},
        )
        assert deals.status_code == 200  # the required read is granted


def test_open_statuses_without_the_pipelines_read_every_deal_and_split_by_stage_id():
    with serve("no_optional_rights") as srv:
        world = srv.simulator.world
        got = sync(make(srv.url, open_statuses=["appointmentscheduled", "145236002"]))
        assert set(got) == {o.native_id for o in world.live()}
        opens = {sid for sid, o in got.items() if o.status == "open"}
        assert opens == {o.native_id for o in world.live() if o.stage in ("appointmentscheduled", "145236002")}
        assert {o.status for o in got.values() if o.stage_id == "closedwon"} == {"won"}


def test_unknown_filter_property_without_discovery_fails_at_once_naming_filters():
    with serve("no_optional_rights", n=20) as srv:
        connector = make(srv.url, filters=[RecordFilter(field="project_code", op="equal", value="x")])
        with pytest.raises(CrmError) as err:
            sync(connector)
        assert connector.stats.seconds_waited == 0 and err.value.permanent and connector.stats.retries == 0
        assert "project_code" in str(err.value) and "filters" in str(err.value)


# -- custom deal properties --------------------------------------------------------------------------------------------

ALL_OVERRIDES = {
    "project_name": "project_code",
    "client_name": "client_label",
    "stage": "sales_stage_custom",
    "amount": "contract_value",
    "close_date": "go_live_date",
    "probability": "win_chance",
    "sales_executive": "account_manager",
    "created_at": "original_create_date",
    "created_by_crm_id": "created_by_custom",
}


def test_every_accepted_field_override_takes_effect():
    from oppsync_pipeline.lib.config import OVERRIDABLE_FIELDS

    assert set(ALL_OVERRIDES) == set(OVERRIDABLE_FIELDS)
    with serve("custom_fields") as srv:
        world = srv.simulator.world
        connector = make(srv.url, fields=ALL_OVERRIDES)
        got = sync(connector)
        assert set(got) == {o.native_id for o in world.live()}
        labels = dict(sim.CUSTOM_STAGE_OPTIONS)
        for sid, opp in got.items():
            w = world.opps[sid]
            x = w.extra
            assert opp.project_name == x["project_code"]
            assert opp.client_name == x["client_label"]
            assert opp.stage_id == x["sales_stage_custom"]  # the option's internal value
            assert opp.stage == (labels[x["sales_stage_custom"]] if x["sales_stage_custom"] else None)
            assert opp.crm_status == w.stage  # dealstage still says the status
            assert opp.status == world.status(w)
            assert opp.amount == x["contract_value"]
            assert opp.close_date.isoformat() == x["go_live_date"]
            assert opp.probability == float(x["win_chance"])
            assert opp.sales_executive == srv.simulator._user_by_owner[x["account_manager"]].name  # owner name
            assert opp.created_at == x["original_create_date"]
            assert opp.created_by_crm_id == x["created_by_custom"]
        caps = {c.name: c.detail for c in connector.capabilities.values()}
        assert "custom" in caps["deal properties (scope crm.schemas.deals.read)"]
        assert "owner" in caps["fields.sales_executive"] and "option label" in caps["fields.stage"]


def test_stage_override_with_stage_categories_reads_every_deal_and_splits_by_the_rule():
    with serve("custom_fields") as srv:
        world = srv.simulator.world
        got = sync(make(srv.url, fields={"stage": "sales_stage_custom"}, stage_categories={"Handover": "won"}))
        assert set(got) == {o.native_id for o in world.live()}
        for sid, opp in got.items():
            want = "won" if world.opps[sid].extra["sales_stage_custom"] == "handover" else world.status(world.opps[sid])
            assert opp.status == want


def test_a_configured_property_the_portal_lacks_fails_before_any_deal_is_read():
    with serve("default", n=20) as srv:
        connector = make(srv.url, fields={"created_at": "original_create_date"})
        with pytest.raises(CrmError) as err:
            sync(connector)
        assert (
            connector.stats.retries == 0 and connector.stats.seconds_waited == 0
        )  # at once: neither retried nor waited (the seconds: benchmarks/fail_fast.py)
        assert err.value.permanent and err.value.code == "PROPERTY_DOESNT_EXIST"
        assert "fields.created_at" in str(err.value) and "original_create_date" in str(err.value)
        assert "Settings > Properties" in str(err.value)
        assert connector.stats.requests == 1  # the properties read, nothing else


# -- stages that are not their ids ----------------------------------------------------------------------------------


def test_relabelled_stages_and_rules_by_stage_name():
    with serve("renamed_stages") as srv:
        world = srv.simulator.world
        got = sync(
            make(srv.url, stage_categories={"Proposal out": "won"}, open_statuses=["Intro call booked", "Renewal due"])
        )
        assert set(got) == {o.native_id for o in world.live()}
        assert all(o.stage != o.stage_id for o in got.values())
        assert {o.stage for o in got.values()} >= {"Won", "Lost", "Proposal out", "Renewed"}
        for sid, opp in got.items():
            w = world.opps[sid]
            label = world.stages[w.stage].label
            assert opp.stage == label and opp.stage_id == w.stage
            want = (
                "won"
                if label == "Proposal out"
                else "open"
                if label in ("Intro call booked", "Renewal due")
                else "won"
                if world.stages[w.stage].is_won
                else "lost"
            )
            assert opp.status == want, (label, opp.status)


# -- token requests ---------------------------------------------------------------------------------------------------


def test_token_requests_are_counted_and_reported():
    with serve("default", n=120) as srv:
        private = make(srv.url)
        sync(private)
        before = srv.simulator.request_count
        oauth = make(srv.url, creds=OAUTH, secrets=dict(sim.SANDBOX_OAUTH_CREDENTIALS))
        sync(oauth)
        assert oauth.stats.token_requests == 1 and private.stats.token_requests == 0
        assert oauth.stats.requests == private.stats.requests + 1
        assert oauth.stats.requests == srv.simulator.request_count - before  # every request the API saw
        assert oauth.stats.as_metadata()["token_requests"] == 1


def test_pipelines_refused_alone_labels_come_from_the_dealstage_options(monkeypatch):
    """An app that may read the properties but not the pipelines: the stage keeps its label (the dealstage
    property's options), the status comes from the deal's own hs_is_closed / hs_is_closed_won."""
    monkeypatch.setattr(sim, "OPTIONAL_SCOPES", [p for p in sim.OPTIONAL_SCOPES if p[0] == "/crm/v3/pipelines/"])
    with serve("default") as srv:
        srv.simulator.variant = "no_optional_rights"  # the scope check, restricted to the pipelines
        world = srv.simulator.world
        connector = make(srv.url)
        got = sync(connector)
        assert set(got) == {o.native_id for o in world.live()}
        for sid, opp in got.items():
            w = world.opps[sid]
            assert opp.stage == world.stages[w.stage].label and opp.stage_id == w.stage
            assert opp.status == world.status(w) and opp.client_name == (
                world.accounts[w.account].name if w.account is not None else None
            )
        assert len(connector.stats.warnings) == 1 and "deal pipelines" in connector.stats.warnings[0]
        assert connector.stages() == {}
