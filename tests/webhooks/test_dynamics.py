"""Dataverse webhooks: the shared key (WebhookKey `?code=` or an HttpHeader) compared before anything is read, the
RemoteExecutionContext read into opportunity ids and system-job event ids, the simulator's own deliveries accepted
through the app, and registration of the service endpoint and its steps against the simulator (once, however often
it runs)."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import requests
import uvicorn
from sqlalchemy import func, select

from oppsync_pipeline.lib.config import ConnectionConfig, parse_config
from oppsync_pipeline.lib.crm.dynamics import DynamicsConnector
from oppsync_pipeline.lib.webhooks import inbox
from oppsync_pipeline.lib.webhooks.app import create_app
from oppsync_pipeline.lib.webhooks.dynamics import DynamicsReceiver, filtering_attributes
from oppsync_pipeline.lib.webhooks.receiver import IncomingRequest, Refused
from oppsync_pipeline.sandbox import dynamics as sandbox
from oppsync_pipeline.sandbox import dynamics_webhooks as hooks
from oppsync_pipeline.sandbox.server import SandboxServer

KEY = sandbox.SANDBOX_WEBHOOK_SECRETS["webhook_key"]
OPP = "6d81597f-0f9f-e711-8122-000d3aa2331c"
OPERATION = "4af10637-4ea2-e711-8122-000d3aa2331c"
ORG = "4ef5b371-e89e-e711-8122-000d3aa2331c"


def context(**over) -> dict:
    """The shape of use-webhooks.md's sample (an asynchronous post-operation Update step), on an opportunity."""
    ctx = {
        "BusinessUnitId": "e2b9dd85-e89e-e711-8122-000d3aa2331c",
        "CorrelationId": "b374239d-4233-41a9-8b17-a86cb4f737b5",
        "Depth": 1,
        "InitiatingUserId": "75c2dd85-e89e-e711-8122-000d3aa2331c",
        "InputParameters": [
            {
                "key": "Target",
                "value": {
                    "__type": "Entity:http://schemas.microsoft.com/xrm/2011/Contracts",
                    "Attributes": [{"key": "name", "value": "Renewal"}, {"key": "opportunityid", "value": OPP}],
                    "EntityState": None,
                    "FormattedValues": [],
                    "Id": OPP,
                    "KeyAttributes": [],
                    "LogicalName": "opportunity",
                    "RelatedEntities": [],
                    "RowVersion": None,
                },
            }
        ],
        "IsExecutingOffline": False,
        "IsInTransaction": False,
        "IsOfflinePlayback": False,
        "IsolationMode": 1,
        "MessageName": "Update",
        "Mode": 1,
        "OperationCreatedOn": "/Date(1506409448000-0700)/",
        "OperationId": OPERATION,
        "OrganizationId": ORG,
        "OrganizationName": "OrgName",
        "OutputParameters": [],
        "OwningExtension": {
            "Id": "75417616-4ea2-e711-8122-000d3aa2331c",
            "KeyAttributes": [],
            "LogicalName": "sdkmessageprocessingstep",
            "Name": None,
            "RowVersion": None,
        },
        "ParentContext": None,
        "PostEntityImages": [],
        "PreEntityImages": [],
        "PrimaryEntityId": OPP.upper(),
        "PrimaryEntityName": "opportunity",
        "RequestId": None,
        "SecondaryEntityName": "none",
        "SharedVariables": [],
        "Stage": 40,
        "UserId": "75c2dd85-e89e-e711-8122-000d3aa2331c",
    }
    ctx.update(over)
    return ctx


def connection(**options) -> ConnectionConfig:
    return ConnectionConfig(
        name="dyn",
        crm="dynamics",
        base_url="https://org.crm.dynamics.com",
        webhooks={"enabled": True, "secrets": {"webhook_key": "${DYN_WEBHOOK_KEY}"}, "options": options},
    )


def request(body: bytes | dict, query: dict | None = None, headers: dict | None = None) -> IncomingRequest:
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    return IncomingRequest(
        method="POST",
        url="https://hooks.example.com/webhooks/dyn",
        path="/webhooks/dyn",
        query=query or {},
        headers={k.lower(): v for k, v in (headers or {}).items()},
        body=raw,
        client="127.0.0.1",
    )


# -- pure ---------------------------------------------------------------------------------------------------------


def test_the_key_in_code_verifies_and_the_context_names_the_opportunity_and_the_system_job():
    r = DynamicsReceiver(connection(), {"webhook_key": KEY})
    req = request(context(), {"code": KEY})
    r.verify(req)
    [n] = r.notifications(req)
    assert n.object_ids == (OPP,)  # lower-case, as the Web API returns opportunityid
    assert n.event_id == f"{OPERATION}:{OPP}"
    assert n.kind == "updated"
    assert n.occurred_at is not None and n.occurred_at.isoformat() == "2017-09-26T07:04:08"
    kinds = {m: r.notifications(request(context(MessageName=m), {"code": KEY}))[0].kind for m in ("Create", "Delete")}
    assert kinds == {"Create": "created", "Delete": "deleted"}


@pytest.mark.parametrize(
    ("options", "query", "headers"),
    [
        ({}, {"code": "wrong"}, {}),
        ({}, {}, {}),
        ({}, {}, {"x-oppsync-webhook-key": KEY}),  # the key, but not where WebhookKey sends it
        ({"auth": "http_header"}, {"code": KEY}, {}),
        ({"auth": "http_header"}, {}, {"x-oppsync-webhook-key": KEY + "x"}),
        ({"auth": "http_header", "header_name": "x-api-key"}, {}, {"x-oppsync-webhook-key": KEY}),
        ({"organization_id": "00000000-0000-0000-0000-00000000beef"}, {"code": KEY}, {}),
    ],
)
def test_a_wrong_or_missing_key_or_another_organization_is_refused_401(options, query, headers):
    r = DynamicsReceiver(connection(**options), {"webhook_key": KEY})
    with pytest.raises(Refused) as err:
        r.verify(request(context(), query, headers))
    assert err.value.status == 401 and KEY not in err.value.reason


def test_the_http_header_scheme_and_the_organization_check_accept_the_right_request():
    r = DynamicsReceiver(
        connection(auth="http_header", header_name="X-Api-Key", organization_id=ORG.upper()), {"webhook_key": KEY}
    )
    r.verify(request(context(), headers={"X-Api-Key": KEY}))
    assert r.authvalue() == f'<settings><setting name="x-api-key" value="{KEY}"/></settings>'


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        json.dumps(context(PrimaryEntityId="006A")).encode(),
        json.dumps(context(MessageName=None)).encode(),
        json.dumps(context(OperationId="x")).encode(),
        json.dumps(context(OperationId=None, CorrelationId=None)).encode(),
    ],
)
def test_a_malformed_context_is_refused_400(body):
    r = DynamicsReceiver(connection(), {"webhook_key": KEY})
    req = request(body, {"code": KEY})
    r.verify(req)
    with pytest.raises(Refused) as err:
        r.notifications(req)
    assert err.value.status == 400


def test_other_tables_are_dropped_and_a_synchronous_step_keys_on_its_correlation():
    r = DynamicsReceiver(connection(), {"webhook_key": KEY})
    assert r.notifications(request(context(PrimaryEntityName="account"))) == []
    [n] = r.notifications(request(context(OperationId="00000000-0000-0000-0000-000000000000")))
    assert n.event_id.startswith("sync:b374239d-") and n.object_ids == (OPP,)


def test_configuration_problems_are_named():
    bad = connection(auth="basic", header_name="not a header", organization_id="x", color="red")
    problems = " ".join(DynamicsReceiver.problems(bad))
    for word in ("color", "auth", "header_name", "organization_id"):
        assert word in problems
    assert DynamicsReceiver.problems(connection()) == []


def test_the_update_step_filters_on_the_columns_the_sync_reads():
    attrs = filtering_attributes(connection())
    assert {"estimatedvalue", "statecode", "statuscode", "parentaccountid", "ownerid", "stageid"} <= set(attrs)
    assert not {"modifiedon", "opportunityid", "createdon"} & set(attrs)
    assert all(not a.startswith("_") for a in attrs)


# -- the simulator's deliveries, through the app ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def receiver_app(tmp_path: Path):
    """The receiver app on uvicorn (the simulator posts over HTTP), its inbox, and a connection config."""
    port = _free_port()
    cfg = parse_config(
        {
            "warehouse": {"url": f"duckdb:///{tmp_path / 'w.duckdb'}"},
            "connections": [
                {
                    "name": "dyn",
                    "crm": "dynamics",
                    "base_url": "https://org.crm.dynamics.com",
                    "webhooks": {"enabled": True, "secrets": {"webhook_key": "${DYN_WEBHOOK_KEY}"}},
                }
            ],
        }
    )
    receiver = DynamicsReceiver(cfg.connections[0], {"webhook_key": KEY})
    server = uvicorn.Server(
        uvicorn.Config(create_app(cfg, {"dyn": receiver}), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}/webhooks/dyn", inbox.engine_for(cfg), receiver
    server.should_exit = True
    thread.join(5)


def stored(engine) -> int:
    with engine.connect() as c:
        return c.execute(select(func.count()).select_from(inbox.webhook_inbox)).scalar()


def waiting_ids(engine) -> list[str]:
    return [json.loads(w["object_ids"])[0] for w in inbox.pending(engine).get("dyn", [])]


def test_the_simulators_notifications_are_accepted_and_a_duplicate_is_stored_once(receiver_app):
    url, engine, _ = receiver_app
    sim = sandbox.build(seed=5, opportunities=60)
    with SandboxServer(sim) as srv:  # no endpoint registered: the default registration (WebhookKey)
        r = requests.post(f"{srv.url}/__sandbox/webhooks", json={"url": url, "faults": {"duplicate": 1.0}})
        assert r.status_code == 200  # duplicate: Dataverse delivers at least once
        opp = list(sim.world.live())[0]
        sim.world.update(opp.native_id, amount=(opp.amount or 0) + 1000)
        assert sim.webhooks.idle()
        assert [s["status"] for s in sim.webhooks.sent] == [204, 204]
        assert waiting_ids(engine) == [opp.native_id] and stored(engine) == 1
        created = sim.world.create(stage="1", account=None, amount=5.0)
        gone = list(sim.world.live())[1]
        sim.world.delete(gone.native_id)
        assert sim.webhooks.idle()
        assert sorted(waiting_ids(engine)) == sorted([opp.native_id, created.native_id, gone.native_id])
        assert all(s["status"] == 204 for s in sim.webhooks.sent)


def test_what_the_simulator_sends_is_a_remote_execution_context(receiver_app):
    url, _, receiver = receiver_app
    sim = sandbox.build(seed=5, opportunities=20)
    sim.webhooks.url = url
    opp = list(sim.world.live())[2]
    sim.world.update(opp.native_id, name="Renamed deal")
    sim.webhooks.idle()
    [out] = sim.registrations.build([hooks.Change("updated", opp, 99)])  # the same request, built again
    assert out.path_and_query == f"?code={KEY}"
    assert out.headers["x-ms-dynamics-entity-name"] == "opportunity"
    assert out.headers["x-ms-dynamics-request-name"] == "Update"
    assert out.headers["x-ms-dynamics-organization"] == hooks.ORGANIZATION_HOST
    assert b"\\/Date(" in out.body  # DataContractJsonSerializer's escaped dates
    ctx = json.loads(out.body)
    assert ctx["PrimaryEntityId"] == opp.native_id and ctx["MessageName"] == "Update" and ctx["Stage"] == 40
    assert ctx["OperationId"] != ctx["CorrelationId"]
    req = request(out.body, {"code": KEY})
    receiver.verify(req)
    assert receiver.notifications(req)[0].object_ids == (opp.native_id,)


def test_a_forged_delivery_is_refused_and_nothing_is_stored(receiver_app, tmp_path):
    url, engine, _ = receiver_app
    sim = sandbox.build(seed=5, opportunities=20)
    sim.registrations.default_key = "not-the-key"
    sim.webhooks.url = url
    sim.world.update(list(sim.world.live())[0].native_id, name="x")
    assert sim.webhooks.idle()
    assert [s["status"] for s in sim.webhooks.sent] == [401] and stored(engine) == 0


# -- registration ---------------------------------------------------------------------------------------------


def connector(srv: SandboxServer, options: dict | None = None) -> DynamicsConnector:
    conn = ConnectionConfig(
        name="dyn",
        crm="dynamics",
        base_url=srv.url,
        credentials=dict.fromkeys(sandbox.SANDBOX_CREDENTIALS, "${X}"),
        options={"authority_url": srv.url},
        webhooks={"enabled": True, "secrets": {"webhook_key": "${K}"}, "options": options or {}},
    )
    return DynamicsConnector(conn, dict(sandbox.SANDBOX_CREDENTIALS), sleep=lambda s: None)


@pytest.mark.parametrize("options", [{}, {"auth": "http_header", "header_name": "x-api-key"}])
def test_registration_creates_one_endpoint_and_three_steps_and_the_simulator_posts_there(receiver_app, options):
    url, engine, _ = receiver_app
    sim = sandbox.build(seed=5, opportunities=40)
    with SandboxServer(sim) as srv:
        conn = connector(srv, options)
        key = "registered-key-1"
        receiver = DynamicsReceiver(conn.conn, {"webhook_key": key})
        first = receiver.register(conn, url)
        again = receiver.register(conn, url)
        assert any("created" in line for line in first) and not any("created" in line for line in again)
        reg = sim.registrations
        [endpoint] = reg.endpoints.values()
        assert (endpoint["url"], endpoint["contract"], endpoint["authtype"]) == (url, 8, 5 if options else 4)
        assert sorted(
            next(n for n, i in hooks.SDK_MESSAGES.items() if i == s["_sdkmessageid_value"]) for s in reg.steps.values()
        ) == ["Create", "Delete", "Update"]
        assert all(s["mode"] == 1 and s["stage"] == 40 for s in reg.steps.values())
        update = next(s for s in reg.steps.values() if s["filteringattributes"])
        assert "estimatedvalue" in update["filteringattributes"].split(",")
        assert sim.webhooks.url == url
        # the app checks the registered key, not the sandbox default
        app_receiver = receiver_app[2]
        app_receiver.secrets["webhook_key"] = key
        app_receiver.auth = options.get("auth", "webhook_key")
        app_receiver.header_name = options.get("header_name", "x-oppsync-webhook-key")
        opp = list(sim.world.live())[3]
        sim.world.update(opp.native_id, amount=(opp.amount or 0) + 10)
        sim.world.update(opp.native_id, bump=True)  # touched, no column the step filters on changed: nothing sent
        assert sim.webhooks.idle()
        assert [s["status"] for s in sim.webhooks.sent] == [204]
        assert waiting_ids(engine) == [opp.native_id]


def test_the_registration_tables_answer_like_dataverse():
    sim = sandbox.build(seed=5, opportunities=10)
    with SandboxServer(sim) as srv:
        client = connector(srv).client
        r = client.request(
            "POST",
            "/api/data/v9.2/serviceendpoints",
            json={"name": "e", "url": "https://h/x", "contract": 8, "authtype": 4, "authvalue": "k"},
        )
        ident = r.headers["OData-EntityId"].rsplit("(", 1)[1].rstrip(")")
        row = client.get_json(f"/api/data/v9.2/serviceendpoints({ident})")
        assert "authvalue" not in row  # write-only
        update = hooks.SDK_MESSAGES["Update"]
        step = {
            "name": "s",
            "mode": 1,
            "stage": 20,  # asynchronous steps run post-operation only
            "eventhandler_serviceendpoint@odata.bind": f"/serviceendpoints({ident})",
            "sdkmessageid@odata.bind": f"/sdkmessages({update})",
        }
        with pytest.raises(Exception, match="PostOperation"):
            client.request("POST", "/api/data/v9.2/sdkmessageprocessingsteps", json=step)
        create = hooks.SDK_MESSAGES["Create"]
        wrong = {
            **step,
            "stage": 40,
            "sdkmessageid@odata.bind": f"/sdkmessages({create})",
            "filteringattributes": "name",
        }
        with pytest.raises(Exception, match="Update message"):
            client.request("POST", "/api/data/v9.2/sdkmessageprocessingsteps", json=wrong)
