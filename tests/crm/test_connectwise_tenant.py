"""ConnectWise against the tenants the vendor documents and our default did not meet (issue 14): API members
without rights to the optional areas, renamed statuses and stages, extra custom fields; every accepted
`fields:` override taking effect; permanent errors that fail fast and name what to check. Over HTTP, no mocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from oppsync_pipeline.lib.config import OVERRIDABLE_FIELDS, ConnectionConfig
from oppsync_pipeline.lib.crm.connectwise import ConnectWiseConnector
from oppsync_pipeline.lib.crm.http import AuthError, CrmError
from oppsync_pipeline.lib.sync import ExtractFailed, build_connector, sync_connection
from oppsync_pipeline.lib.warehouse.engine import make_engine
from oppsync_pipeline.sandbox import connectwise as cw
from oppsync_pipeline.sandbox.server import SandboxServer
from tests.conftest import sandbox_config

CREDS = dict(cw.SANDBOX_CREDENTIALS)


def connector(
    url: str, creds: dict | None = None, session: requests.Session | None = None, **kw
) -> ConnectWiseConnector:
    conn = ConnectionConfig(
        name="sandbox-connectwise",
        crm="connectwise",
        base_url=url,
        credentials={k: "${CW_" + k.upper() + "}" for k in CREDS},
        page_size=kw.pop("page_size", 50),
        **kw,
    )
    return ConnectWiseConnector(conn, creds or CREDS, sleep=lambda s: None, session=session)


def collect(conn: ConnectWiseConnector) -> dict:
    return {
        o.source_id: o
        for open_set in (True, False)
        for page in conn.opportunities(open_set=open_set, since=None)
        for o in page
    }


class CountingSession(requests.Session):
    def __init__(self):
        super().__init__()
        self.paths: list[str] = []

    def request(self, method, url, *args, **kwargs):
        self.paths.append(url.split("?", 1)[0].split("/apis/3.0", 1)[-1])
        return super().request(method, url, *args, **kwargs)


def served(variant: str, n: int = 150, seed: int = 21):
    return SandboxServer(cw.build(seed=seed, opportunities=n, variant=variant))


# -- no_optional_rights: every optional area refused, the run still reads everything it must ---------------------


def test_refused_optional_reads_are_warnings_with_their_fallbacks():
    with served("no_optional_rights") as srv:
        sim = srv.simulator
        conn = connector(srv.url)
        got = collect(conn)
        truth = cw.truth(sim)
        assert set(got) == set(truth)
        for sid, opp in got.items():
            want = truth[sid]
            assert {k: getattr(opp, k) for k in want} == want, sid
        # the fallbacks: the record's stage name, the site's name, the creator's identifier, no amount
        assert all(o.amount is None for o in got.values())
        assert any(o.created_by_crm_id and not o.created_by_crm_id.isdigit() for o in got.values())
        assert list(conn.users()) == []
        warned = "\n".join(conn.stats.warnings)
        for what in ("sales stages", "members", "company sites", "forecast", "probabilities"):
            assert what in warned, what
        assert "HTTP 403" in warned
        refused = {c.name for c in conn.capabilities.values() if not c.available}
        assert {
            "sales stages (/sales/stages)",
            "members (/system/members)",
            "company sites (service_location)",
            "forecast (amount)",
            "probabilities (/sales/probabilities)",
        } <= refused


def test_a_refused_area_is_asked_once_per_run_not_once_per_record():
    with served("no_optional_rights") as srv:
        session = CountingSession()
        got = collect(connector(srv.url, session=session))
        assert len(got) > 100
        assert sum("/forecast" in p for p in session.paths) == 1
        assert sum("/sites/" in p for p in session.paths) == 1


def test_the_403_is_in_connectwise_shape():
    with served("no_optional_rights", n=20) as srv:
        api = f"{srv.url}/v4_6_release/apis/3.0"
        auth = (f"{CREDS['company_id']}+{CREDS['public_key']}", CREDS["private_key"])
        r = requests.get(f"{api}/sales/stages", auth=auth, headers={"clientId": CREDS["client_id"]}, timeout=10)
        assert r.status_code == 403
        assert r.json()["code"] == "Unauthorized" and "permission" in r.json()["message"]


# -- custom_statuses: names and ids that are not the default's ---------------------------------------------------


def test_renamed_statuses_and_stages_map_by_name_and_flags():
    with served("custom_statuses") as srv:
        sim = srv.simulator
        conn = connector(srv.url, options={"forecast": False})
        got = collect(conn)
        assert {o.stage for o in got.values()} <= {name for _, name, _ in cw.CUSTOM_SALES_STAGES}
        assert {o.crm_status for o in got.values()} <= {row[1] for row in cw.CUSTOM_STATUSES}
        assert {o.stage_id for o in got.values()} <= {str(row[0]) for row in cw.CUSTOM_SALES_STAGES}
        for sid, opp in got.items():
            assert opp.status == sim.world.status(sim.world.opps[sid])
        assert {s.label for s in conn.stages().values()} == {name for _, name, _ in cw.CUSTOM_SALES_STAGES}
        # "Stalled" is inactive but not closed: open
        assert any(o.crm_status == "Stalled" and o.status == "open" for o in got.values())


def test_open_statuses_and_stage_categories_by_name_on_a_renamed_tenant():
    with served("custom_statuses") as srv:
        conn = connector(
            srv.url,
            options={"forecast": False},
            open_statuses=["Active", "Pending Contract"],
            stage_categories={"Signed": "won"},
        )
        open_ids = {o.source_id for page in conn.opportunities(open_set=True, since=None) for o in page}
        got = collect(
            connector(
                srv.url,
                options={"forecast": False},
                open_statuses=["Active", "Pending Contract"],
                stage_categories={"Signed": "won"},
            )
        )
        for opp in got.values():
            if opp.stage == "Signed":
                assert opp.status == "won"
            elif opp.crm_status in ("Active", "Pending Contract"):
                assert opp.status == "open"
            else:
                assert opp.status in ("won", "lost")  # Stalled is not listed: closed
        assert open_ids == {sid for sid, o in got.items() if o.crm_status in ("Active", "Pending Contract")}


# -- custom_fields: captions that look like standard fields are never read as them ------------------------------


def test_custom_fields_named_like_standard_fields_are_not_read_as_them():
    with served("custom_fields") as srv:
        sim = srv.simulator
        conn = connector(srv.url)
        got = collect(conn)
        truth = cw.truth(sim)
        for sid, opp in got.items():
            assert (opp.stage, opp.amount, opp.service_location) == (
                truth[sid]["stage"],
                truth[sid]["amount"],
                truth[sid]["service_location"],
            )
        seen = conn.capabilities["custom fields"].detail
        assert all(c in seen for c in ("Region", "Stage", "Amount", "Site", "Renewal"))
        # ... and are read when a connection asks for one
        got = collect(connector(srv.url, fields={"amount": "custom:Amount", "stage": "custom:Stage"}))
        for sid, opp in got.items():
            o = sim.world.opps[sid]
            assert opp.amount == round((o.seq * 137.5) % 9000, 2)
            raw = {cf["caption"]: cf.get("value") for cf in opp.raw["customFields"]}
            assert opp.stage == raw["Stage"] and opp.stage_id is None


def test_a_configured_custom_field_the_tenant_lacks_is_a_warning():
    with served("default", n=30) as srv:
        conn = connector(srv.url, options={"forecast": False}, fields={"created_at": "custom:Date Opened"})
        got = collect(conn)
        assert all(o.created_at is None for o in got.values())
        assert any("Date Opened" in w for w in conn.stats.warnings)


# -- every accepted `fields:` override takes effect ---------------------------------------------------------------

OVERRIDES = {
    "project_name": ("company/identifier", lambda r: r["company"]["identifier"] if r.get("company") else None),
    "client_name": ("site/name", lambda r: r["site"]["name"] if r.get("site") else None),
    "sales_executive": ("primarySalesRep/identifier", lambda r: r["primarySalesRep"]["identifier"]),
    "stage": ("status/name", lambda r: r["status"]["name"]),
    "amount": ("custom:Amount", None),
    "close_date": ("closedDate", lambda r: r["closedDate"] and r["closedDate"][:10]),
    "probability": ("probability/id", lambda r: float(r["probability"]["id"]) if r.get("probability") else None),
    "created_at": ("_info/lastUpdated", lambda r: r["_info"]["lastUpdated"].replace("T", " ").rstrip("Z")),
    "created_by_crm_id": ("primarySalesRep/id", lambda r: str(r["primarySalesRep"]["id"])),
}


def test_every_overridable_field_has_a_case():
    assert set(OVERRIDES) == set(OVERRIDABLE_FIELDS)


@pytest.mark.parametrize("canonical", sorted(OVERRIDES))
def test_a_field_override_takes_effect(canonical):
    path, want = OVERRIDES[canonical]
    with served("custom_fields", n=60) as srv:
        conn = ConnectionConfig(
            name="x",
            crm="connectwise",
            base_url=srv.url,
            credentials={k: "${CW_" + k.upper() + "}" for k in CREDS},
            fields={canonical: path},
        )
        assert ConnectWiseConnector.validate_connection(conn) == []  # what `config check` accepts
        got = collect(connector(srv.url, fields={canonical: path}))
        default = collect(connector(srv.url))
        changed = 0
        for sid, opp in got.items():
            value = getattr(opp, canonical)
            if want is None:  # a custom field
                expected = next(cf.get("value") for cf in opp.raw["customFields"] if cf["caption"] == "Amount")
            else:
                expected = want(opp.raw)
            assert (str(value) if value is not None else None) == (str(expected) if expected is not None else None)
            changed += value != getattr(default[sid], canonical)
        assert changed, f"fields.{canonical}: {path} changed nothing"


def test_stage_override_to_stage_name_keeps_the_status_from_the_crm():
    """Issue 14: `fields: {stage: stage/name}` turned every opportunity open."""
    with served("default", n=120) as srv:
        sim = srv.simulator
        got = collect(connector(srv.url, options={"forecast": False}, fields={"stage": "stage/name"}))
        assert {o.status for o in got.values()} == {"open", "won", "lost"}
        for sid, opp in got.items():
            o = sim.world.opps[sid]
            assert opp.status == sim.world.status(o)
            assert (opp.stage, opp.stage_id) == (sim.world.sales_stage_of(o).label, sim.world.sales_stage_of(o).key)


# -- addresses, users, no I/O while mapping, requests counted ------------------------------------------------------


def test_each_site_is_read_once_and_mapping_does_no_io():
    with served("default", n=200) as srv:
        session = CountingSession()
        conn = connector(srv.url, session=session, page_size=30)
        got = collect(conn)
        site_reads = [p for p in session.paths if "/sites/" in p]
        assert len(site_reads) == len(set(site_reads)) > 10
        assert len(site_reads) == len(
            {(o.raw["company"]["id"], o.raw["site"]["id"]) for o in got.values() if o.raw.get("company")}
        )
        # every request the connector sent is counted (Basic auth: no token requests exist)
        assert conn.stats.requests == len(session.paths) == srv.simulator.request_count
        assert conn.stats.token_requests == 0

        def no_network(*a, **k):
            raise AssertionError("network I/O inside _map")

        session.request = no_network  # type: ignore[method-assign]
        raw = dict(next(iter(got.values())).raw, site={"id": 999999, "name": "Unread site"})
        assert conn._map(raw).service_location == "Unread site"


def test_owner_and_creator_resolve_to_configured_identifiers_through_alt_ids():
    with served("default", n=40) as srv:
        conn = connector(srv.url, options={"forecast": False})
        by_id = {u.crm_user_id: u for u in conn.users()}
        for opp in collect(conn).values():
            owner, creator = by_id[opp.owner_crm_id], by_id[opp.created_by_crm_id]
            assert owner.alt_ids == (opp.raw["primarySalesRep"]["identifier"],)
            assert creator.alt_ids == (opp.raw["_info"]["enteredBy"],)


# -- permanent errors fail fast and say what to check -------------------------------------------------------------


def test_a_refused_required_read_fails_at_once_naming_the_security_role():
    with served("default", n=30) as srv:
        srv.simulator.refused = frozenset({"statuses"})
        conn = connector(srv.url)
        with pytest.raises(CrmError) as err:
            collect(conn)
        assert (
            conn.stats.seconds_waited == 0 and conn.stats.retries == 0
        )  # at once: neither retried nor waited (the seconds: benchmarks/fail_fast.py)
        assert err.value.permanent and err.value.status == 403
        assert "Opportunity Status" in str(err.value) and "Security Roles" in str(err.value)
        srv.simulator.refused = frozenset({"opportunities"})
        with pytest.raises(CrmError) as err:
            collect(connector(srv.url))
        assert err.value.permanent and "Sales > Opportunities" in str(err.value)


def _response(status: int, body: dict, url: str) -> requests.Response:
    r = requests.Response()
    r.status_code, r._content = status, json.dumps(body).encode()
    r.request = requests.Request("GET", url).prepare()
    return r


def test_400_404_401_name_the_config_key():
    with served("default", n=20) as srv:
        with pytest.raises(CrmError) as err:
            collect(connector(srv.url, options={"codebase": "v1_nosuch/"}))
        assert err.value.permanent and err.value.status == 404 and "options.codebase" in str(err.value)
        conn = connector(srv.url)
        wrong = connector(srv.url, creds={**CREDS, "public_key": "wrong"})
        with pytest.raises(AuthError) as err:
            collect(wrong)
        assert (
            wrong.stats.retries == 0 and wrong.stats.seconds_waited == 0
        )  # at once: neither retried nor waited (the seconds: benchmarks/fail_fast.py)
        assert "credentials.company_id, public_key and private_key" in str(err.value)
    url = "https://api-na.myconnectwise.net/v4_6_release/apis/3.0/sales/opportunities?conditions=x"
    bad = conn.classify(_response(400, {"code": "InvalidObject", "message": "conditions: Unknown field 'x'"}, url))
    assert bad.permanent and "Unknown field 'x'" in str(bad) and "filters and fields" in str(bad)
    assert "conditions=x" not in str(bad)  # filter values stay out of messages
    bad = conn.classify(_response(400, {"code": "InvalidObject", "message": "A clientId header is required"}, url))
    assert "credentials.client_id" in str(bad)


def test_a_permanent_error_fails_the_sync_run_without_dagster_retry(warehouse_url: str, tmp_path: Path):
    sim = cw.build(seed=5, opportunities=30)
    sim.refused = frozenset({"opportunities"})
    with SandboxServer(sim) as srv:
        cfg = sandbox_config({"connectwise": srv}, warehouse_url, tmp_path)
        engine = make_engine(cfg.warehouse.url)
        try:
            conn = build_connector(cfg, cfg.connections[0])
            with pytest.raises(ExtractFailed) as err:
                sync_connection(cfg, cfg.connections[0], engine, run_id="cw-403", mode="full", connector=conn)
            assert (
                err.value.permanent and conn.stats.retries == 0 and conn.stats.seconds_waited == 0
            )  # at once: neither retried nor waited (the seconds: benchmarks/fail_fast.py)
            assert "Sales > Opportunities" in str(err.value)
        finally:
            engine.dispose()


def test_discover_reports_what_will_and_will_not_be_read_and_runs_once():
    with served("no_optional_rights", n=30) as srv:
        session = CountingSession()
        conn = connector(srv.url, session=session)
        report = {c.name: c for c in conn.discover()}
        assert report["opportunities (open set)"].available and report["opportunities (not-open set)"].available
        assert not report["members (/system/members)"].available
        assert "HTTP 403" in report["sales stages (/sales/stages)"].detail
        assert "Region" in report["custom fields"].detail
        assert sum(p.endswith("/forecast") for p in session.paths) == 1  # refused once, then not asked again
        # a check reads small pages: the custom-field sample and one page of each set
        assert len([p for p in session.paths if p.endswith("/sales/opportunities")]) == 3
        collect(conn)  # the same run: discovery and dictionaries are not read again
        assert sum(p.endswith("/sales/opportunities/statuses") for p in session.paths) == 1
        assert sum(p.endswith("/login/companyinfo/" + CREDS["company_id"]) for p in session.paths) == 1


def test_a_status_created_mid_run_is_read_before_the_page_is_mapped():
    from oppsync_pipeline.sandbox.world import SimStage

    with served("default", n=40) as srv:
        sim = srv.simulator
        conn = connector(srv.url, options={"forecast": False})
        conn.prepare()  # the run's dictionaries are read
        sim.status_rows = [*cw.STATUSES, (8, "Verbal Yes", False, False, False, False, False, 90.0)]
        sim.world.stages["8"] = SimStage("8", "Verbal Yes", False, False, 90.0, 8)
        sim.statuses[8] = sim.world.stages["8"]
        victim = next(iter(sim.world.live()))
        sim.world.update(victim.native_id, stage="8")
        got = collect(conn)  # status 8 is outside the known open ids: it comes with the not-open set
        assert got[victim.native_id].crm_status == "Verbal Yes" and got[victim.native_id].status == "open"
        assert set(got) == {o.native_id for o in sim.world.live()}


def test_an_opportunity_deleted_before_its_forecast_is_read_does_not_fail_the_run():
    with served("default", n=40) as srv:
        sim = srv.simulator
        conn = connector(srv.url, page_size=40)
        conn.prepare()
        pages = conn.opportunities(open_set=True, since=None)
        victim = next(o for o in sim.world.live() if sim.world.status(o) == "open" and o.amount is not None)
        real = conn._forecasts

        def delete_first(rows):
            sim.world.delete(victim.native_id)
            return real(rows)

        conn._forecasts = delete_first  # type: ignore[method-assign]
        got = {o.source_id: o for page in pages for o in page}
        assert got[victim.native_id].amount is None
        assert any("deleted while it was read" in w for w in conn.stats.warnings)
