"""DynamicsConnector against Dataverse tenants that differ from the default one (issue 14): API users without
rights to the optional reads, an account lookup that cannot be expanded, custom columns and a custom business
process; `fields:` overrides, permanent errors and token requests."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from oppsync_pipeline.lib.config import OVERRIDABLE_FIELDS, ConnectionConfig
from oppsync_pipeline.lib.crm.dynamics import DynamicsConnector
from oppsync_pipeline.lib.crm.http import CrmError
from oppsync_pipeline.lib.sync import ExtractFailed, build_connector, sync_connection
from oppsync_pipeline.lib.warehouse.engine import make_engine
from oppsync_pipeline.sandbox import dynamics as sandbox
from oppsync_pipeline.sandbox.server import FaultPlan, FaultRule, SandboxServer
from tests.conftest import sandbox_config

N = 200


def serve(variant: str = "default"):
    return SandboxServer(sandbox.build(seed=5, opportunities=N, variant=variant))


def make(srv, **overrides) -> DynamicsConnector:
    conn = ConnectionConfig(
        **{
            "name": "dyn",
            "crm": "dynamics",
            "base_url": srv.url,
            "page_size": 60,
            "credentials": dict.fromkeys(sandbox.SANDBOX_CREDENTIALS, "${X}"),
            "options": {"authority_url": srv.url, **overrides.pop("options", {})},
            **overrides,
        }
    )
    assert DynamicsConnector.validate_connection(conn) == []
    return DynamicsConnector(conn, dict(sandbox.SANDBOX_CREDENTIALS), sleep=lambda s: None)


def fetch(conn, since=None):
    return {o.source_id: o for open_set in (True, False) for page in conn.opportunities(open_set, since) for o in page}


def test_no_optional_rights_falls_back_with_warnings_and_matches_what_the_user_sees():
    with serve("no_optional_rights") as srv:
        conn = make(srv)
        got = fetch(conn)
        truth = sandbox.truth(srv.simulator)
        assert set(got) == set(truth)
        for sid, t in truth.items():
            g = got[sid]
            assert (g.client_name, g.service_location, g.stage, g.stage_id, g.crm_status, g.status, g.currency) == (
                t["client_name"],
                None,
                t["stage"],
                t["stage_id"],
                t["crm_status"],
                t["status"],
                t["currency"],
            )
        # owner names still come from the records' formatted values
        world = srv.simulator.world
        assert all(g.sales_executive == world.users[world.opps[sid].owner].name for sid, g in got.items())
        assert list(conn.users()) == [] and conn.stages() == {}
        assert set(conn.statuses()) == {"1", "2", "3", "4", "5"}  # the default status reasons
        refused = {c.name for c in conn.capabilities.values() if not c.available}
        assert refused == {
            "opportunity attribute metadata",
            "account $expand (client address)",
            "status reason metadata (statuscode)",
            "business process stages (processstages)",
            "systemusers",
            "teams",
        }
        assert all("HTTP 403" in c.detail for c in conn.capabilities.values() if not c.available)
        text = "\n".join(conn.stats.warnings)
        assert "account $expand" in text and "service_location left empty" in text and "systemusers" in text
        # an incremental read cannot ask which accounts were renamed: it re-reads every opportunity, and says so
        inc = fetch(conn, since=world.clock.now())
        assert set(inc) == set(truth) and "account renames cannot be asked for" in conn.stats.warnings[-1]
        quiet = make(srv, options={"incremental_account_names": False})
        assert fetch(quiet, since=world.clock.now()) == {}


def test_refused_account_expand_keeps_the_name_and_drops_only_the_address():
    with serve("no_expand") as srv:
        conn = make(srv)
        got = fetch(conn)
        truth = sandbox.truth(srv.simulator)
        assert {sid: (g.client_name, g.service_location) for sid, g in got.items()} == {
            sid: (t["client_name"], t["service_location"]) for sid, t in truth.items()
        }
        assert any(g.client_name for g in got.values()) and not any(g.service_location for g in got.values())
        assert [w for w in conn.stats.warnings if "account $expand" in w and "HTTP 403" in w and "prvReadAccount" in w]
        assert conn.capabilities["status reason metadata (statuscode)"].available
        assert len(list(conn.users())) == 29


def test_a_navigation_property_the_tenant_does_not_expose_is_a_400_and_falls_back():
    with serve() as srv:
        srv.simulator.hidden_navigation.add("parentaccountid")
        conn = make(srv)
        got = fetch(conn)
        assert len(got) == N and any(g.client_name for g in got.values())
        assert not any(g.service_location for g in got.values())
        assert conn.capabilities["account $expand (client address)"].detail.startswith("HTTP 400")


def test_discovery_reads_custom_columns_and_the_custom_process_stages():
    with serve("custom_fields") as srv:
        conn = make(srv)
        conn.prepare()
        custom = conn.capabilities["custom columns"].detail
        for column in ("new_region", "cr123_legacyid", "new_servicesite", "cr123_dealphase", "_new_signedby_value"):
            assert column in custom
        assert conn.capabilities["stage id"].detail == "stageid"
        assert [s.label for s in conn.stages().values()] == [
            "Discovery",
            "Solution Design",
            "Commercials",
            "Legal Review",
            "Signed",
        ]
        got = fetch(conn)
        truth = sandbox.truth(srv.simulator)
        assert {sid: (g.stage, g.stage_id) for sid, g in got.items()} == {
            sid: (t["stage"], t["stage_id"]) for sid, t in truth.items()
        }
        # custom columns are not selected unless configured
        assert "new_servicesite" not in next(iter(got.values())).raw
        # discover() (what `config check --online` prints) also reads a page of each set
        report = {c.name: c for c in conn.discover()}
        assert report["opportunities (open set)"].available and report["opportunities (not-open set)"].available


def test_every_column_config_check_accepts_exists_in_the_sandbox_tenant():
    with serve() as srv:
        conn = make(srv)
        conn.prepare()
        assert set(DynamicsConnector.known_fields) <= set(conn._attributes)
        assert all(DynamicsConnector.field_known(c) for c in conn._attributes if DynamicsConnector.is_custom_field(c))


def test_every_accepted_field_override_takes_effect():
    """Each canonical field a connection may point elsewhere, pointed at a column this tenant has."""
    fields = {
        "project_name": "description",
        "client_name": "new_servicesite",
        "stage": "cr123_dealphase",
        "amount": "budgetamount",
        "close_date": "actualclosedate",
        "probability": "new_winchance",
        "created_at": "new_originalcreatedon",
        "created_by_crm_id": "_new_signedby_value",
        "sales_executive": "_modifiedby_value",
    }
    assert set(fields) == set(OVERRIDABLE_FIELDS)
    with serve("custom_fields") as srv:
        world, sim = srv.simulator.world, srv.simulator
        some = next(o for o in world.live() if o.seq % 4 == 0)
        world.update(some.native_id, description="Phase 2 rollout")
        conn = make(srv, fields=fields)
        got = fetch(conn)
        es = sim.sets["opportunities"]
        for sid, g in got.items():
            o = world.opps[sid]
            assert g.project_name == (o.extra or {}).get("description")
            assert g.client_name == es.columns["new_servicesite"](o)
            assert g.stage == sandbox.DEAL_PHASES[es.columns["cr123_dealphase"](o)]  # the picklist's label
            assert g.stage_id == world.sales_stage_of(o).key
            assert g.amount == es.columns["budgetamount"](o)
            assert g.close_date == es.columns["actualclosedate"](o)
            assert g.probability == es.columns["new_winchance"](o)
            assert g.created_at == es.columns["new_originalcreatedon"](o)
            assert g.created_by_crm_id == es.columns["_new_signedby_value"](o)
            assert g.sales_executive == sim.users_by_id[es.columns["_modifiedby_value"](o)].name
        assert got[some.native_id].project_name == "Phase 2 rollout"
        assert {g.stage for g in got.values()} == set(sandbox.DEAL_PHASES.values())
        assert any(g.created_by_crm_id for g in got.values()) and any(g.close_date for g in got.values())


def test_an_override_naming_a_column_the_tenant_lacks_fails_fast_naming_the_key():
    with serve() as srv:  # the default tenant has no new_servicesite
        conn = make(srv, fields={"client_name": "new_servicesite"})
        with pytest.raises(CrmError) as err:
            fetch(conn)
        assert err.value.permanent and "fields.client_name" in str(err.value) and conn.stats.seconds_waited == 0
        assert conn.stats.retries == 0
    with serve("no_optional_rights") as srv:  # no metadata: Dataverse's own 400 says it, named the same way
        conn = make(srv, fields={"client_name": "new_servicesite"})
        with pytest.raises(CrmError) as err:
            fetch(conn)
        assert err.value.permanent and err.value.status == 400 and "fields.client_name" in str(err.value)


def test_permanent_errors_fail_fast_and_name_what_to_check():
    with serve() as srv:
        srv.simulator.denied.add("prvReadOpportunity")
        conn = make(srv)
        with pytest.raises(CrmError) as err:
            fetch(conn)
        assert err.value.permanent and err.value.status == 403 and conn.stats.retries == 0
        assert (
            conn.stats.seconds_waited == 0
        )  # at once: neither retried nor waited (the seconds: benchmarks/fail_fast.py)
        assert "prvReadOpportunity" in str(err.value) and "security role" in str(err.value)
        assert "'opportunity' table" in str(err.value)
        assert conn.stats.warnings == []  # the required read failed; no optional read is blamed
        # base_url pointing somewhere that is not the Web API root
        srv.simulator.denied.clear()
        conn = make(srv)
        conn.prepare()
        with pytest.raises(CrmError) as err:
            conn.client.get_json("/api/data/v9.2/nosuchset")
        assert err.value.permanent and "base_url" in str(err.value)


def test_transient_errors_are_retried_in_the_client():
    with serve() as srv:
        srv.simulator.faults = FaultPlan([FaultRule("server_error", after=4, count=2, path="/api/data")])
        conn = make(srv)
        assert len(fetch(conn)) == N and conn.stats.retries == 2


def test_token_requests_are_counted_with_the_requests():
    with serve() as srv:
        conn = make(srv)
        before = srv.simulator.request_count
        fetch(conn)
        assert conn.stats.token_requests == 1
        # every request the simulator received (the token request included) is in api_requests
        assert conn.stats.requests == srv.simulator.request_count - before
        # a token that expires mid-run: one more token request, counted in both
        srv.simulator.faults = FaultPlan([FaultRule("token_expiry", after=1, path="/api/data")])
        fetch(conn)
        assert conn.stats.token_requests == 2 and conn.stats.token_refreshes == 1
        assert conn.stats.requests == srv.simulator.request_count - before
        meta = conn.stats.as_metadata()
        assert meta["token_requests"] == 2 and meta["api_requests"] == conn.stats.requests


def test_a_permanent_error_fails_the_sync_at_once_and_skips_the_retry_policy(duckdb_url, tmp_path):
    with serve() as srv:
        srv.simulator.denied.add("prvReadOpportunity")
        cfg = sandbox_config({"dynamics": srv}, duckdb_url, tmp_path)
        engine = make_engine(cfg.warehouse.url)
        connector = build_connector(cfg, cfg.connections[0])
        with pytest.raises(ExtractFailed) as err:
            sync_connection(cfg, cfg.connections[0], engine, run_id="denied", connector=connector)
        assert (
            connector.stats.retries == 0 and connector.stats.seconds_waited == 0
        )  # at once: neither retried nor waited (the seconds: benchmarks/fail_fast.py)
        assert err.value.permanent and "prvReadOpportunity" in str(err.value)
        with engine.connect() as c:
            row = c.execute(
                text("SELECT status, error, retries, token_requests FROM oppsync.sync_runs WHERE run_id = 'denied'")
            ).one()
        engine.dispose()
        assert row.status == "failed" and "prvReadOpportunity" in row.error and row.retries == 0
        assert row.token_requests == 1
